"""Fitting the Disentanglement Classifier of new slots on the model: labelled rows, probe features, the
pack's projection (or an extra projection group), keys and radii, then the pack-level guards.

Owns: :func:`fit_router`, :func:`router_rows`, the negative pool's rows and their cached features, and
:func:`editor_rows` (every row an edit fits on, for the leakage test). The math lives in
:mod:`ldke_peft.editing.router_fit`; positives/negatives in :mod:`ldke_peft.editing.scope`; guards in
:mod:`ldke_peft.editing.pack_scope`.

Layer: editing (README "Architecture"): imports data, tuner and editing modules, never the product code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .anchor_fit import fit_text_anchors
from .augment import dedupe, generic_question_bank, paraphrases
from ..tuner.config import LDKEConfig
from .delta_fit import delta_rows
from ..families import Family
from ..tuner.model import LDKEModel, attach_tokenizer, _root_model
from ..tuner.probe_features import collect_probe_features
from .pack_scope import ScopeMemory, entity_key, guard_entities, guard_leaks, probes_of
from ..requests import EditRequest, image_fingerprint
from .router_fit import SlotCalibration, calibrate_slot, fit_projection
from .scope import (NEGATIVE_PARAPHRASES, NegativePool, delta_borrowed_wordings, negative_images, negative_questions,
                    positive_views, question_bank, rephrased_negatives, same_relation_questions)

logger = logging.getLogger(__name__)

#: L2 penalty on the *visual* router projection (the textual one has none: see
#: :func:`~ldke_peft.editing.router_fit.fit_projection`). Entities' images differ a lot, so the penalty does not
#: merge them; it keeps the projection smooth, so other views of the edited entity stay inside its radius
#: (1000-entity toy world, 10 single edits: M-Generality 0.90 with it, 0.75 without).
VISUAL_WEIGHT_DECAY = 1e-4

@dataclass
class _Rows:
    images: list[Any] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    v_label: list[int] = field(default_factory=list)  # -1 = row not used for the visual part
    t_label: list[int] = field(default_factory=list)
    slot: list[int] = field(default_factory=list)  # owner slot (index into new slots), -1 = shared
    v_pos: list[bool] = field(default_factory=list)
    t_pos: list[bool] = field(default_factory=list)
    core: list[bool] = field(default_factory=list)  # a request's own wording (places the textual key)
    anchor: list[bool] = field(default_factory=list)  # the edit's own image and question

    def add(self, image, prompt, v_label, t_label, owner, v_pos, t_pos, core=True, anchor=False):
        self.core.append(core)
        self.anchor.append(anchor)
        self.images.append(image)
        self.prompts.append(prompt)
        self.v_label.append(v_label)
        self.t_label.append(t_label)
        self.slot.append(owner)
        self.v_pos.append(v_pos)
        self.t_pos.append(t_pos)


def fit_router(
    peft_model: Any,
    processor: Any,
    requests: Sequence[EditRequest],
    slots: Sequence[int],
    *,
    adapter_name: str = "default",
    pool: NegativePool | None = None,
    refit_projection: bool = True,
    seed: int = 0,
    memory: "ScopeMemory | None" = None,
) -> list[SlotCalibration]:
    """Fit the pack's projection (when ``refit_projection``) and the keys/radii of ``slots``.

    With ``memory`` (what earlier calls on the same pack recorded) every new slot's radii are also checked
    against the locality probes of every request the pack was edited with, and every earlier slot's
    against this call's probes (:func:`guard_leaks`); ``memory`` is then extended with this call's slots.

    The fit runs on the CPU whatever the model's device: the probe features it works on are CPU tensors
    (:func:`~ldke_peft.tuner.probe_features.collect_probe_features`), the router is a few small tables,
    and every forward pass made meanwhile forces its slots (the router is not consulted). The router
    goes back to its device afterwards, also when the fit raises.
    """
    router = peft_model.base_model.router(adapter_name)
    home = router.keys_v.device
    router.to("cpu")
    try:
        return _fit_router(peft_model, processor, requests, slots, adapter_name=adapter_name, pool=pool,
                           refit_projection=refit_projection, seed=seed, memory=memory)
    finally:
        router.to(home)


def _fit_router(peft_model: Any, processor: Any, requests: Sequence[EditRequest], slots: Sequence[int], *,
                adapter_name: str, pool: NegativePool | None, refit_projection: bool, seed: int,
                memory: "ScopeMemory | None") -> list[SlotCalibration]:
    cfg: LDKEConfig = peft_model.peft_config[adapter_name]
    tuner: LDKEModel = peft_model.base_model
    router = tuner.router(adapter_name)
    pool = pool or NegativePool()
    hard = cfg.hard_negatives
    labels: dict[str, int] = {}

    def lab(key: str) -> int:
        return labels.setdefault(key, len(labels))

    rows, per_req = router_rows(requests, cfg, pool, lab, seed=seed)
    v, t, has = collect_probe_features(peft_model, processor, cfg.probe_layer, rows.images, rows.prompts)
    v_label = torch.tensor(rows.v_label)
    t_label = torch.tensor(rows.t_label)
    def fit_projections() -> tuple[torch.Tensor, ...]:
        vm = (v_label >= 0) & has
        # the pool adds entity/relation structure beyond the edits: it makes the projection general
        # enough for slots appended later (sequential editing keeps the projection fixed). The
        # no-hard-negatives ablation does without it: the pool *is* the hard-negative material.
        used = pool if hard else NegativePool()
        pv, pl = _pool_features(peft_model, processor, cfg, pool_visual_rows(used), lab, pool=used)
        pt, ptl = _pool_features(peft_model, processor, cfg, pool_textual_rows(used), lab, textual=True, pool=used)
        fv = torch.cat([v[vm], pv]) if len(pv) else v[vm]
        fl = torch.cat([v_label[vm], pl]) if len(pl) else v_label[vm]
        ft = torch.cat([t, pt]) if len(pt) else t
        ftl = torch.cat([t_label, ptl]) if len(ptl) else t_label
        mu_v, P_v = None, None
        if len(fv):
            mu_v, P_v = fit_projection(fv, fl, cfg.router_dim, steps=cfg.router_steps, lr=cfg.router_lr, seed=seed,
                                       weight_decay=VISUAL_WEIGHT_DECAY)
        t_steps = cfg.router_text_steps
        if t_steps is None:
            t_steps = 0 if cfg.router_text_encoder else cfg.router_steps
        mu_t, P_t = fit_projection(ft, ftl, cfg.router_dim, steps=t_steps, lr=cfg.router_lr, seed=seed + 1)
        return mu_v, P_v, mu_t, P_t

    if refit_projection:
        mu_v, P_v, mu_t, P_t = fit_projections()
        if P_v is not None:
            router.set_projection(mu_v=mu_v, proj_v=P_v)
        router.set_projection(mu_t=mu_t, proj_t=P_t)
    v_pos = torch.tensor(rows.v_pos)
    t_pos = torch.tensor(rows.t_pos)
    core = torch.tensor(rows.core)
    anchor = torch.tensor(rows.anchor)

    def calibrate(zv: torch.Tensor, zt: torch.Tensor) -> list[SlotCalibration]:
        cals = []
        for n, ((a, b), r) in enumerate(zip(per_req, requests)):
            sel = torch.zeros(len(rows.prompts), dtype=torch.bool)
            sel[a:b] = True
            # negatives also include every other new slot's rows that are not positives of this slot
            other = ~sel
            zvp = zv[sel & v_pos]
            zvn = torch.cat([zv[sel & ~v_pos & has], zv[other & has & (v_label != v_label[a])]])
            ztp = zt[sel & t_pos]
            ztc = zt[sel & t_pos & core]
            anc = sel & anchor
            ztn = torch.cat([zt[sel & ~t_pos], zt[other & (t_label != t_label[a])]])
            cals.append(calibrate_slot(zvp, zvn, ztp, ztn, needs_image=r.image is not None, margin=cfg.router_margin,
                                       text_margin=cfg.router_text_margin,
                                       zt_core=ztc, zt_anchor=zt[anc], zv_anchor=zv[anc & has]))
        return cals

    zv, zt = (z.detach() for z in router.project(v, t))
    cals = calibrate(zv, zt)
    group = 0
    if not refit_projection and cfg.use_router and not all(c.separable for c in cals):
        # Appending to a pack: projection 0 was fitted for the pack's first edits and need not separate
        # this edit's scope from its negatives (then the radius stops inside the nearest negative and the
        # edit's rephrasings fall outside: "slots after the first do not generalise"). A projection added
        # for an earlier appended slot may do; else fit one on this call's rows, as the same edit made alone
        # would get, and score these slots in it.
        for g in range(1, router.num_groups):
            zg = tuple(z.detach() for z in router.project_group(g, v, t))
            cg = calibrate(*zg)
            if all(c.separable for c in cg):
                group, cals, (zv, zt) = g, cg, zg
                break
        else:
            mu_v, P_v, mu_t, P_t = fit_projections()
            if P_v is None:
                mu_v, P_v = router.mu_v.float(), router.projections()[0]
            cals2 = calibrate(((v.float() - mu_v) @ P_v).detach(), ((t.float() - mu_t) @ P_t).detach())
            if sum(c.separable for c in cals2) > sum(c.separable for c in cals):
                group = router.add_group(mu_v=mu_v, proj_v=P_v, mu_t=mu_t, proj_t=P_t)
                cfg.router_groups = router.num_groups
                # keys and radii in the stored projection's own arithmetic (the router scores with it)
                zv, zt = (z.detach() for z in router.project_group(group, v, t))
                cals = calibrate(zv, zt)
        if group:
            logger.info("router: slot(s) %s are scored in projection %d: the pack's first projection does not "
                        "separate their scope", list(slots), group)
    for cal, s in zip(cals, slots):
        if not cfg.use_router:
            # "always on" (the no-router ablation): a huge *finite* radius, so the pack still passes
            # the loader's finiteness check
            cal.radius_v = cal.radius_t = 1e30
        router.set_slot(s, key_v=cal.key_v, key_t=cal.key_t, radius_v=cal.radius_v, radius_t=cal.radius_t,
                        needs_image=cal.needs_image)
        router.set_slot_group(s, group)
    fit_text_anchors(peft_model, processor, router, cfg, requests, slots, rows, per_req, t, pool)
    if memory is not None and cfg.use_router:
        protected = []
        for (a, b), r in zip(per_req, requests):
            given_i = {image_fingerprint(im) for im in [r.image] + list(r.rephrase_images) if im is not None}
            given_q = [r.prompt] + list(r.rephrase_prompts)
            idx = [i for i in range(a, b) if rows.v_pos[i] and rows.t_pos[i]
                   and (rows.images[i] is None or image_fingerprint(rows.images[i]) in given_i)
                   and any(rows.prompts[i] == q for q in given_q)]
            protected.append(torch.tensor(idx, dtype=torch.long))
        shrunk = guard_leaks(peft_model, processor, router, cfg.probe_layer, requests, slots,
                             [(v[i], t[i], has[i]) for i in protected], memory)
        if cfg.router_pack_guard:
            own = [v[[i for i in range(a, b) if rows.v_pos[i] and rows.images[i] is not None]] for a, b in per_req]
            anchors = [v[i][has[i]] for i in protected]
            for s, n in guard_entities(router, requests, slots, own, anchors, memory, cfg.router_margin).items():
                shrunk[s] = shrunk.get(s, 0) + n
        for cal, s in zip(cals, slots):
            cal.radius_v, cal.radius_t = float(router.radius_v[s]), float(router.radius_t[s])
            cal.leak_cuts = shrunk.get(s, 0)
    return cals


def router_rows(requests: Sequence[EditRequest], cfg: LDKEConfig, pool: NegativePool, lab: Any,
                seed: int = 0) -> tuple["_Rows", list[tuple[int, int]]]:
    """Every (image, question) row the router is calibrated on, labelled: each request's positives (its
    views x its wordings), its hard negatives (same image + other questions, other images + its
    question), and ``per_req[n] = (start, stop)`` of request ``n``'s rows. ``lab`` maps a class key to
    an integer label (shared with the pool rows, so one entity or relation is one class)."""
    # one visual class per entity: an image that is some slot's positive keeps that slot's class when it
    # shows up as another slot's negative (else the projection must split an image from itself and the
    # calibration counts a slot's own image as its nearest negative)
    img_keys: dict[str, str] = {}
    for n, r in enumerate(requests):
        if r.image is not None:
            for im in positive_views(r, seed=seed + n, n_views=cfg.router_views, mirror=False)[0]:
                img_keys.setdefault(image_fingerprint(im), entity_key(r))
    rows = _Rows()
    per_req: list[tuple[int, int]] = []
    hard = cfg.hard_negatives
    n_para = int(getattr(cfg, "router_paraphrases", 0) or 0)
    for n, r in enumerate(requests):
        # fewer augmented views than the delta gets: each widens the visual radius, and in a pack of many
        # slots wide radii add up to other entities' images (M-Locality)
        # unflipped views: the visual radius covers the entity's images, and a mirror image of an asymmetric
        # entity lies as far from it as other entities do
        imgs, prompts = positive_views(r, seed=seed + n, n_views=cfg.router_views, mirror=False)
        if n_para:
            # the scope must cover how else the question is asked, not only the wordings the delta saw
            prompts = dedupe(prompts + paraphrases(r.prompt, n_para))
            # the bank's own wordings of the edited relation are in scope too (and in their other forms):
            # without them every positive is a rewrite of one sentence and the router learns its form
            borrowed = [q for q in same_relation_questions(r, pool, NEGATIVE_PARAPHRASES) if q not in prompts]
            prompts = dedupe(prompts + borrowed)
        else:
            borrowed = []
        # what the caller says follows from the edit is in scope too; like a bank wording it widens the
        # textual radius but does not move the key off the edit's own question
        stated = [c.prompt for c in r.consequences if c.prompt not in prompts]
        prompts, borrowed = dedupe(prompts + stated), borrowed + stated
        own = set(prompts) - set(borrowed)
        others = [o for o in requests if o is not r]
        neg_q = negative_questions(r, pool, prompts, hard=hard)
        neg_q_lab = [(q, q) for q in neg_q]
        if n_para and hard:
            neg_q_lab += rephrased_negatives(neg_q, prompts, NEGATIVE_PARAPHRASES, fuzzy=r.relation is None)
        neg_i = negative_images(r, others, pool, hard=hard) if r.image is not None else []
        ent = lab(entity_key(r))
        # one textual class per relation: two slots editing the same relation of different entities ask
        # the same questions (the visual part tells them apart), so neither is the other's negative
        rel = lab("q:" + (r.relation if r.relation is not None else r.prompt.strip().casefold()))
        start = len(rows.prompts)
        if r.image is not None:
            for k, im in enumerate(imgs):
                for q in prompts:
                    rows.add(im, q, ent, rel, n, True, True, q in own, k == 0 and q == r.prompt)
            for im in imgs[:2]:
                for q, src in neg_q_lab:
                    rows.add(im, q, ent, lab("q:" + _q_relation(src, pool)), n, True, False)
            for k, im in enumerate(neg_i):
                # the visual feature does not depend on the question (image tokens come first), so one
                # question per negative image suffices; two for the closest (request-given) ones
                for q in prompts[: 2 if k < 4 else 1]:
                    rows.add(im, q, lab(img_keys.get(image_fingerprint(im), "img:" + image_fingerprint(im))), rel, n, False, True)
        else:
            for q in prompts:
                rows.add(None, q, -1, rel, n, False, True, q in own, q == r.prompt)
            for q, src in neg_q_lab:
                rows.add(None, q, -1, lab("q:" + _q_relation(src, pool)), n, False, False)
        per_req.append((start, len(rows.prompts)))
    return rows, per_req


def _q_relation(q: str, pool: NegativePool) -> str:
    for qq, rel in question_bank(pool):
        if qq == q and rel is not None:
            return rel
    return q.strip().casefold()


def pool_visual_rows(pool: NegativePool) -> tuple[list[Any], list[str], list[str]]:
    """``(images, questions, class keys)``: one row per pool image (its entity is its visual class)."""
    if not pool.images:
        return [], [], []
    q = pool.questions[0][0] if pool.questions else generic_question_bank()[0][0]
    ents = [ent if ent is not None else f"pool:{i}" for i, (_, ent) in enumerate(pool.images)]
    return [im for im, _ in pool.images], [q] * len(pool.images), [f"ent:{e}" for e in ents]


def pool_textual_rows(pool: NegativePool) -> tuple[list[Any], list[str], list[str]]:
    """``(images, questions, class keys)``: every pool question on the first three pool images (its
    relation is its textual class)."""
    if not pool.questions or not pool.images:
        return [], [], []
    rows_i, rows_q, keys = [], [], []
    for im in [im for im, _ in pool.images][:3]:
        for q, rel in pool.questions:
            rows_i.append(im)
            rows_q.append(q)
            keys.append("q:" + (rel if rel is not None else q.strip().casefold()))
    return rows_i, rows_q, keys


def _pool_features(peft_model, processor, cfg, rows: tuple[list[Any], list[str], list[str]], lab,
                   textual: bool = False, pool: NegativePool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    ims, qs, keys = rows
    if not ims:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    cache = getattr(pool, "_features", None) if pool is not None else None
    key = _pool_key(peft_model, cfg, ims, qs, textual)
    feats = cache.get(key) if cache is not None else None
    if feats is None:
        v, t, _ = collect_probe_features(peft_model, processor, cfg.probe_layer, ims, qs)
        feats = t if textual else v
        if cache is not None:
            if len(cache) >= 8:
                cache.clear()
            cache[key] = feats
    return feats, torch.tensor([lab(k) for k in keys])


def _pool_key(peft_model: Any, cfg: LDKEConfig, ims: list[Any], qs: list[str], textual: bool) -> tuple:
    """What a pool's router features depend on: its rows, the probe layer, the textual key and the
    weights up to the probe layer (their storage and in-place write counters: an edited base model
    is a new key)."""
    root = _root_model(peft_model)
    weights = tuple((p.data_ptr(), p._version) for n, p in root.named_parameters() if "ldke_" not in n)
    text = (cfg.router_text_encoder, tuple(cfg.router_text_frame or ()), cfg.router_text_probe) if textual else None
    return (id(root), weights, cfg.probe_layer, text, tuple(id(i) for i in ims), tuple(qs))


def editor_rows(requests: Sequence[EditRequest], config: LDKEConfig | None = None,
                negatives: NegativePool | None = None, seed: int = 0) -> list[tuple[Any, str]]:
    """Every ``(image, prompt)`` an edit of ``requests`` (in one :func:`edit` call) feeds to the model
    while fitting: the delta's positives, the router's positives and negatives and the pool rows of its
    projection. Built by the same functions the fit uses, so a caller can audit what an edit sees (for
    instance, that no evaluation probe is among them)."""
    cfg = config or LDKEConfig()
    pool = negatives or NegativePool()
    out: list[tuple[Any, str]] = []
    for i, r in enumerate(requests):
        imgs, prompts = positive_views(r, seed=seed + i, n_views=cfg.auto_views,
                                       borrowed=delta_borrowed_wordings(r, pool, cfg.delta_bank_wordings))
        out += list(zip(*delta_rows(r, imgs, prompts)[:2]))
    rows, _ = router_rows(requests, cfg, pool, lambda key: 0, seed=seed)
    out += list(zip(rows.images, rows.prompts))
    for r in requests:  # the pack-level leak guard reads the requests' own locality probes
        out += probes_of(r)
    used = pool if cfg.hard_negatives else NegativePool()
    for ims, qs, _ in (pool_visual_rows(used), pool_textual_rows(used)):
        out += list(zip(ims, qs))
    return out


def _prepare_text_key(cfg: LDKEConfig, family: Family, root: Any, processor: Any, r: EditRequest) -> None:
    """Load the textual-key encoder, record its width and the chat frame around a question in ``cfg``
    (a new pack), and hand the routing the tokenizer its inputs are made with."""
    from ..tuner.question_key import SENTINEL, load_encoder, question_frame

    enc = load_encoder(cfg.router_text_encoder)
    if not cfg.router_text_dim:
        cfg.router_text_dim = enc.dim
    tok = family.tokenizer(processor)
    attach_tokenizer(root, tok)
    if not cfg.router_text_frame:
        built = family.build_inputs(processor, [r.image], [SENTINEL], None)
        image_mask = family.image_mask(root, built.input_ids).to(built.prompt_mask.device)
        cfg.router_text_frame = list(question_frame(tok, built.input_ids, built.prompt_mask.bool() & ~image_mask))
