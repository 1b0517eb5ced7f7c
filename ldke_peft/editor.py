"""The LDKE edit loop: localize -> build positives/negatives -> fit the delta -> fit the router.

``edit(model, processor, requests)`` returns a ``PeftModel`` carrying an LDKE adapter (an *edit
pack*); passing ``pack=`` appends slots to an existing pack (sequential editing). The base weights are
never modified: every change lives in the adapter, and inputs the router sends to no slot run the
original weights bit for bit.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .augment import dedupe, generic_question_bank, image_views, paraphrases, same_question, templated_rephrasings
from .config import LDKEConfig
from .context import forced_slots, prompt_mask_context
from .errors import InvalidRequestError, LDKEError
from .families import Family, base_model_of, family_of
from .localization import LocalizationResult, locate, trace
from .layer import LDKELayer
from .layer_replay import capture_replay
from .model import LDKEModel, attach_tokenizer, collect_probe_features, default_probe_layer, _root_model
from .requests import EditRequest, image_fingerprint
from .pack_scope import ScopeMemory, entity_key, guard_entities, guard_leaks, probes_of
from .router_fit import SlotCalibration, calibrate_slot, fit_projection

logger = logging.getLogger(__name__)


@dataclass
class NegativePool:
    """Material for hard negatives beyond what each request carries.

    ``questions``: ``(question, relation)`` pairs — a bank of questions the model is asked about
    images (same image + another question must not route). ``images``: ``(image, entity)`` pairs —
    other entities' images (same question + another image must not route).
    """

    questions: list[tuple[str, str | None]] = field(default_factory=list)
    images: list[tuple[Any, str | None]] = field(default_factory=list)
    #: router features of the pool's rows, per model state (the same pool serves every edit)
    _features: dict = field(default_factory=dict, init=False, repr=False, compare=False)


@dataclass
class SlotReport:
    slot: int
    layers: list[int]
    localization: dict[str, Any] | None
    fit_steps: int
    fit_seconds: float
    fit_accuracy: float
    router: dict[str, float]
    seconds: float
    #: False when the delta fit ended (bound or no progress) before every target token of every positive was
    #: the argmax; ``fit_accuracy`` then says how far it got (and the log has said so)
    fit_reached: bool = True
    #: wall seconds of each phase: ``localize``, ``capture`` (the hidden states the fit replays from),
    #: ``delta_fit`` (the optimisation steps) and ``router_fit`` (this edit's share of the router fit)
    phases: dict[str, float] = field(default_factory=dict)
    #: tokens each fit step runs through each of ``fit_span`` decoder layers (forward and backward): what
    #: an edit's cost scales with (a projection to another model size multiplies it by that model's
    #: FLOPs per token and layer)
    fit_tokens: int = 0
    fit_span: int = 0


class EditDivergedError(LDKEError, RuntimeError):
    """The delta fit produced non-finite values (learning rate far too high, or a half-precision overflow).

    Raised instead of returning a pack that would answer garbage (and that the loader would refuse);
    :func:`edit` rolls the model back first.
    """


# ---------------------------------------------------------------------- public API


def edit(
    model: nn.Module,
    processor: Any,
    requests: Sequence[EditRequest] | EditRequest,
    config: LDKEConfig | None = None,
    *,
    pack: Any | None = None,
    adapter_name: str = "default",
    negatives: NegativePool | None = None,
    progress: bool = True,
    cache_hidden: bool = True,
    seed: int = 0,
) -> Any:
    """Edit ``model`` so that each request's image + prompt answers its target, and nothing else changes.

    Args:
        model: a transformers MLLM of a supported family (or a ``PeftModel`` with an LDKE pack).
        processor: its processor.
        requests: one or more :class:`EditRequest`.
        config: an :class:`LDKEConfig` (defaults from the model family when ``None``).
        pack: an existing LDKE ``PeftModel`` to append the new edits to (sequential editing).
        negatives: optional pool of questions/images for hard negatives (e.g. ``world.negative_pool()``).
        cache_hidden: run each optimisation step only through the edited span on cached hidden states
            (the layers below the lowest edited layer never change). ``False`` = full forward/backward
            per step (for comparison only).

    Returns the ``PeftModel``; ``peft_model.ldke_reports`` holds a :class:`SlotReport` per new slot.

    Bad input raises an :class:`~ldke_peft.errors.InvalidRequestError` (:class:`~ldke_peft.errors.ImageError`
    for images) or :class:`~ldke_peft.errors.UnsupportedModelError` before the model is touched. A failure
    after that (a diverged fit, :class:`EditDivergedError`; Ctrl-C; out of memory) rolls the model back
    (a fresh model gets its original modules, hooks and flags back; a ``pack`` its previous slots) and
    re-raises.
    """
    from peft import PeftModel

    if isinstance(requests, EditRequest):
        requests = [requests]
    requests = list(requests)
    if not requests:
        raise InvalidRequestError("edit() needs at least one EditRequest", field="requests")
    if pack is None and isinstance(model, PeftModel) and adapter_name in model.peft_config:
        pack = model
    if pack is not None:
        _check_pack(model, pack, adapter_name)
    family = family_of(pack if pack is not None else model)
    tok = family.tokenizer(processor)
    for i, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            raise InvalidRequestError(f"requests[{i}] is a {type(r).__name__}, expected EditRequest", field="requests")
        try:
            r.validate(tok)
        except InvalidRequestError as exc:
            raise type(exc)(f"requests[{i}]: {exc}", field=exc.field) from None
    _check_config(config if pack is None else pack.peft_config[adapter_name])
    _check_processor(family, pack if pack is not None else model, processor, requests)
    _check_lengths(family, pack if pack is not None else model, processor, requests)

    # Everything above only reads. From here on the model changes; any failure (a late error, a diverged
    # fit, Ctrl-C, out of memory) restores it exactly before the exception propagates.
    rollback = _Rollback(model, pack, adapter_name)
    try:
        return _edit(model, processor, requests, config, family, pack=pack, adapter_name=adapter_name,
                     negatives=negatives, progress=progress, cache_hidden=cache_hidden, seed=seed)
    except BaseException:
        rollback.restore()
        raise


def _edit(model, processor, requests, config, family, *, pack, adapter_name, negatives, progress, cache_hidden, seed):
    """The edit loop proper (inputs already validated); see :func:`edit`."""
    from peft import get_peft_model

    if pack is not None:
        cfg: LDKEConfig = pack.peft_config[adapter_name]
        root = _root_model(pack)
    else:
        cfg = copy.deepcopy(config) if config is not None else LDKEConfig()
        root = _root_model(model)
    L = family.num_layers(root)
    probe = cfg.probe_layer if cfg.probe_layer is not None else default_probe_layer(L)
    cfg.probe_layer = probe
    if cfg.router_text_encoder:
        _prepare_text_key(cfg, family, root, processor, requests[0])
    pool = negatives or NegativePool()

    bar = tqdm(total=len(requests), desc="LDKE edit", disable=not progress or len(requests) < 2, unit="edit")
    # 1. Fast Localization on the unedited model (deltas forced off inside locate)
    locs: list[LocalizationResult | None] = []
    slot_layers: list[list[int]] = []
    loc_model = pack if pack is not None else model
    t_loc = []
    for r in requests:
        t0 = time.perf_counter()
        if cfg.localization == "fixed":
            layers = list(cfg.fixed_layers or [max(probe + 1, L // 2)])
            loc = None
        else:
            fn = locate if cfg.localization == "attribution" else trace
            loc = fn(loc_model, processor, r, num_layers=cfg.num_edit_layers, probe_layer=probe,
                     noise_scale=cfg.noise_scale, corruption=cfg.corruption, seed=seed)
            layers = loc.layers
        locs.append(loc)
        slot_layers.append([int(i) for i in layers])
        t_loc.append(time.perf_counter() - t0)

    meta = [_edit_meta(r) for r in requests]
    # 2. create or grow the pack
    if pack is None:
        cfg.slot_layers = slot_layers
        cfg.num_slots = len(slot_layers)
        cfg.edits = meta
        cfg.base_model_name_or_path = getattr(root, "name_or_path", None) or cfg.base_model_name_or_path
        peft_model = get_peft_model(model, cfg, adapter_name=adapter_name)
        new_slots = list(range(len(requests)))
        fresh = True
    else:
        peft_model = pack
        tuner: LDKEModel = peft_model.base_model
        new_slots = tuner.grow_adapter(adapter_name, slot_layers, meta)
        fresh = False
    tuner: LDKEModel = peft_model.base_model
    cfg = peft_model.peft_config[adapter_name]
    tuner.set_adapter(adapter_name) if len(tuner.active_adapters) == 1 else None

    # 3. localized update, one slot at a time
    reports: list[SlotReport] = []
    for i, (r, s) in enumerate(zip(requests, new_slots)):
        t0 = time.perf_counter()
        phases = {"localize": t_loc[i]}
        stats: dict[str, float] = {}
        steps, acc = fit_delta(peft_model, processor, r, s, adapter_name=adapter_name, cache_hidden=cache_hidden,
                               seed=seed + i, stats=stats)
        phases.update(capture=stats["capture"], delta_fit=stats["delta_fit"])
        reports.append(
            SlotReport(
                slot=s, layers=slot_layers[i], localization=None if locs[i] is None else locs[i].to_dict(),
                fit_steps=steps, fit_seconds=time.perf_counter() - t0, fit_accuracy=acc, router={},
                seconds=t_loc[i] + time.perf_counter() - t0, fit_reached=acc >= 1.0, phases=phases,
                fit_tokens=int(stats["tokens"]), fit_span=int(stats["span"]),
            )
        )
        bar.update(1)
    bar.close()

    # 4. Disentanglement Classifier
    t0 = time.perf_counter()
    old_memory = None if fresh else getattr(peft_model, "ldke_scope_memory", None)
    memory = old_memory.copy() if isinstance(old_memory, ScopeMemory) else ScopeMemory()
    cals = fit_router(peft_model, processor, requests, new_slots, adapter_name=adapter_name, pool=pool,
                      refit_projection=fresh, seed=seed, memory=memory)
    t_router = (time.perf_counter() - t0) / max(1, len(requests))
    for rep, cal in zip(reports, cals):
        rep.router = {
            "radius_v": cal.radius_v, "radius_t": cal.radius_t, "far_pos_v": cal.far_pos_v,
            "near_neg_v": cal.near_neg_v, "far_pos_t": cal.far_pos_t, "near_neg_t": cal.near_neg_t,
            "separable": cal.separable, "leak_cuts": cal.leak_cuts,
        }
        rep.seconds += t_router
        rep.phases["router_fit"] = t_router
    for s, rep in zip(new_slots, reports):
        cfg.edits[s]["layers"] = rep.layers
    prev = getattr(peft_model, "ldke_reports", [])
    peft_model.ldke_reports = list(prev) + reports
    peft_model.ldke_scope_memory = memory
    peft_model.eval()
    return peft_model


# ---------------------------------------------------------------------- positives / negatives


def positive_views(r: EditRequest, seed: int = 0, n_auto: int = 2, n_views: int | None = None,
                   mirror: bool = True) -> tuple[list[Any], list[str]]:
    """Images and prompts that must trigger the edit (given ones first, automatic ones if too few).

    ``n_auto`` tops up the prompts, ``n_views`` (default ``n_auto``) the images: a request without
    rephrase images gets that many augmented views of its image, so the delta learns the entity and
    not one picture of it (M-Generality). ``mirror``: whether those views may be flipped (see
    :func:`~ldke_peft.augment.image_views`).
    """
    n_views = n_auto if n_views is None else n_views
    imgs: list[Any] = []
    if r.image is not None:
        imgs = [r.image] + list(r.rephrase_images)
        if len(imgs) < 1 + n_views:
            imgs += image_views(r.image, 1 + n_views - len(imgs), seed=seed, mirror=mirror)
    prompts = dedupe([r.prompt] + list(r.rephrase_prompts))
    if len(prompts) < 1 + n_auto:
        prompts = dedupe(prompts + templated_rephrasings(r.prompt, 1 + n_auto - len(prompts)))
    return imgs, prompts


def question_bank(pool: NegativePool) -> list[tuple[str, str | None]]:
    """The caller's questions first, then the generic bank: a pool that names only a few relations
    (the caller's own domain) still leaves the router many other questions to tell the edit from."""
    seen: set[str] = set()
    out: list[tuple[str, str | None]] = []
    for q, rel in list(pool.questions) + generic_question_bank():
        k = q.strip().casefold()
        if k not in seen:
            seen.add(k)
            out.append((q, rel))
    return out


def negative_questions(r: EditRequest, pool: NegativePool, pos_prompts: Sequence[str], cap: int = 32,
                       hard: bool = True) -> list[str]:
    """Questions that must *not* trigger the edit on the edit's own image (other relations)."""
    qs: list[str] = []
    if hard:
        qs += [p.prompt for p in r.coupled if p.image is not None and _same_image(p.image, r.image)]
        qs += [q for q, rel in question_bank(pool) if not (r.relation is not None and rel == r.relation)]
    qs += [p.prompt for p in r.locality]
    qs += [p.prompt for p in r.m_locality]
    qs = [q for q in dedupe(qs) if not same_question(q, pos_prompts, fuzzy=r.relation is None)]
    return qs[:cap]


def same_relation_questions(r: EditRequest, pool: NegativePool, n_para: int) -> list[str]:
    """The question bank's wordings of ``r.relation`` (and ``n_para`` rephrasings of each): other ways
    of asking what the edit changes, on the edit's own image. Empty for a request without a relation."""
    if r.relation is None:
        return []
    same = [q for q, rel in question_bank(pool) if rel == r.relation]
    return dedupe(same + [p for q in same for p in paraphrases(q, n_para)])


#: L2 penalty on the *visual* router projection (the textual one has none: see
#: :func:`~ldke_peft.router_fit.fit_projection`). Entities' images differ a lot, so the penalty does not
#: merge them; it keeps the projection smooth, so other views of the edited entity stay inside its radius
#: (1000-entity toy world, 10 single edits: M-Generality 0.90 with it, 0.75 without).
VISUAL_WEIGHT_DECAY = 1e-4

#: Rule-based rephrasings of each negative question among the router's textual negatives.
NEGATIVE_PARAPHRASES = 2


def rephrased_negatives(neg_q: Sequence[str], pos_prompts: Sequence[str], n: int, *, fuzzy: bool) -> list[tuple[str, str]]:
    """``(rephrasing, source question)`` for each negative question, by the same rules as the positives'.

    The positives come in many forms (the edit question and its rule-based rephrasings), so negatives
    in a single form would let the router learn *form* ("Name the ...", "the X shown") instead of
    *content* (which relation is asked): rephrasing the negatives the same way leaves content as the
    only thing that separates them.
    """
    out: list[tuple[str, str]] = []
    for q in neg_q:
        for p in paraphrases(q, n):
            if not same_question(p, pos_prompts, fuzzy=fuzzy):
                out.append((p, q))
    return out


def negative_images(r: EditRequest, others: Sequence[EditRequest], pool: NegativePool, cap: int = 64,
                    hard: bool = True) -> list[Any]:
    """Images that must *not* trigger the edit with the edit's own question (other, look-alike entities).

    Without ``hard`` (the ablation) only generic multimodal-locality images are used: no look-alike
    probes and no pool of other entities' images."""
    ims: list[Any] = []
    if hard:
        ims += [p.image for p in r.coupled if p.image is not None and not _same_image(p.image, r.image)]
    ims += [p.image for p in r.m_locality if p.image is not None]
    ims += [o.image for o in others if o.image is not None and o.subject != r.subject and not _same_image(o.image, r.image)]
    if hard:
        ims += [im for im, ent in pool.images if ent is None or ent != r.subject]
    out, seen = [], {image_fingerprint(r.image)} if r.image is not None else set()
    for im in ims:
        fp = image_fingerprint(im)
        if fp not in seen:
            seen.add(fp)
            out.append(im)
    return out[:cap]


def _same_image(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return False
    return a is b or image_fingerprint(a) == image_fingerprint(b)


# ---------------------------------------------------------------------- delta fit


def fit_delta(
    peft_model: Any,
    processor: Any,
    request: EditRequest,
    slot: int,
    *,
    adapter_name: str = "default",
    cache_hidden: bool = True,
    steps: int | None = None,
    stop_early: bool = True,
    seed: int = 0,
    stats: dict[str, float] | None = None,
) -> tuple[int, float]:
    """Fit slot ``slot``'s low-rank deltas so every positive answers ``request.target``.

    Returns ``(steps taken, final teacher-forced accuracy on the positives)``. With ``cache_hidden``
    the hidden states entering the lowest edited layer are computed once; each step runs only the
    edited span (forward and backward). ``stats``, when given, receives the seconds of ``capture``
    (building the rows and the replay) and ``delta_fit`` (the steps), and the ``tokens`` each step runs
    through each of ``span`` decoder layers.
    """
    t_start = time.perf_counter()
    cfg: LDKEConfig = peft_model.peft_config[adapter_name]
    tuner: LDKEModel = peft_model.base_model
    root = _root_model(peft_model)
    family = family_of(root)
    device = next(root.parameters()).device
    slot_layers = cfg.slot_layers[slot]
    lo = min(slot_layers)

    imgs, prompts = positive_views(request, seed=seed, n_views=cfg.auto_views)
    rows_img, rows_q = _positive_rows(imgs, prompts, request.image is not None)
    # fit the answer *and* the end of the answer: without the EOS the old answer's tail can carry on
    # after a shorter new target ("puro" -> "puro puet")
    tok = family.tokenizer(processor)
    eos = getattr(tok, "eos_token", None)
    fit_target = request.target.strip() + (eos if isinstance(eos, str) and eos else "")
    # right-aligned: each row at the positions it has when run alone, and rows that share a prefix
    # share its positions too (the replay computes a shared prefix once)
    built = family.build_inputs(processor, rows_img, rows_q, [fit_target] * len(rows_q)).right_aligned().to(device)
    B = len(built)
    tgt_mask = built.target_mask
    # logits at t-1 predict token t
    pred_pos = torch.zeros_like(tgt_mask)
    pred_pos[:, :-1] = tgt_mask[:, 1:]
    tgt_ids = built.input_ids[tgt_mask]
    # the answer tokens proper (the appended EOS is trained but does not gate early stopping or the
    # reported accuracy: it only stops the old answer's tail from carrying on)
    core = torch.ones_like(tgt_ids, dtype=torch.bool)
    eos_id = getattr(tok, "eos_token_id", None)
    if fit_target != request.target.strip() and eos_id is not None:
        last = tgt_mask & ~torch.cat([tgt_mask[:, 1:], torch.zeros_like(tgt_mask[:, :1])], dim=1)
        core = ~(last[tgt_mask] & (tgt_ids == eos_id))

    ldke_layers = tuner.ldke_layers(adapter_name)
    params = []
    for l in slot_layers:
        m = ldke_layers[l]
        params += [m.ldke_A[adapter_name], m.ldke_B[adapter_name]]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.edit_lr)
    n_steps = steps if steps is not None else cfg.edit_steps
    slot_vec = torch.full((B,), slot, dtype=torch.long)

    replay = None
    if cache_hidden:
        row_images = [next(k for k, im in enumerate(imgs) if im is x) if x is not None else -1 for x in rows_img]
        probe = None
        if B > 2:
            # the first and last rows (another image and another wording) run alone to check the replay
            pick = [0, B - 1]
            pb = family.build_inputs(processor, [rows_img[i] for i in pick], [rows_q[i] for i in pick],
                                     [fit_target] * 2).right_aligned().to(device)
            pp = torch.zeros_like(pb.target_mask)
            pp[:, :-1] = pb.target_mask[:, 1:]
            probe = (pb, pp, pick)
        replay = capture_replay(root, family, lo, built, pred_pos, row_images=row_images, probe=probe)
    if replay is not None:
        slot_vec = torch.full((replay.rows,), slot, dtype=torch.long)
    step_mask = built.prompt_mask if replay is None or replay.prompt_mask is None else replay.prompt_mask
    t_steps = time.perf_counter()

    def logits_at_targets() -> torch.Tensor:
        with forced_slots(slot_vec), prompt_mask_context(step_mask):
            if replay is not None:
                return family.logits_from_hidden(root, replay.run_at(pred_pos))
            out = root(**built.inputs, use_cache=False)
            return out.logits[pred_pos]

    # an explicit ``steps`` (timing studies), no early stop, or edit_steps=0 (no fit) keep the exact step count
    exact = steps is not None or not stop_early or n_steps == 0
    bound = n_steps if exact else fit_step_bound(n_steps, int(tgt_mask.sum(1).max()))
    taken, acc, reached = 0, 0.0, False
    best: tuple[int, list[torch.Tensor]] | None = None  # (targets hit, parameters) of the best step after phase 1
    stale = 0
    was_training = root.training
    root.eval()  # no dropout: the fit must see what inference sees
    try:
        for step in range(bound):
            logits = logits_at_targets()
            ce = torch.nn.functional.cross_entropy(logits.float(), tgt_ids, reduction="none")
            loss = ce[core].mean() + (0.25 * ce[~core].mean() if bool((~core).any()) else 0.0)
            if not bool(torch.isfinite(loss)):
                raise EditDivergedError(
                    f"edit {request.prompt!r} -> {request.target!r} diverged at step {step}: the loss is "
                    f"{float(loss.detach())} (edit_lr={cfg.edit_lr}); lower edit_lr"
                )
            with torch.no_grad():
                hit_all = logits.argmax(-1) == tgt_ids
                hit = hit_all[core]
                acc = float(hit.float().mean())
                p_min = float(torch.softmax(logits.float(), -1).gather(1, tgt_ids[:, None])[core].min())
            # stop once the answer is confidently the target AND is followed by its end (else the old
            # answer's tail can carry on in generation: "puro" -> "puro puet")
            if stop_early and bool(hit.all()) and p_min > 0.5 and bool(hit_all.all()):
                reached = True
                break
            if step >= n_steps:
                # phase 2 (past the configured steps, up to a bound that grows with the target): keep going
                # until every target token of every positive is the argmax, and keep the best step seen.
                # Where the model cannot reach p > 0.5 at all (a tiny random model whose final norm bounds
                # every logit), this is what ends the fit.
                n_hit = int(hit_all.sum())
                if bool(hit_all.all()):
                    reached = True
                    break
                if best is None or n_hit > best[0]:
                    best, stale = (n_hit, [p.detach().clone() for p in params]), 0
                else:
                    stale += 1
                    if stale >= FIT_PATIENCE:
                        reached = False
                        break
                    if stale % FIT_STALL_STEPS == 0:
                        for g in opt.param_groups:
                            g["lr"] = min(g["lr"] * 2, cfg.edit_lr * FIT_LR_CAP)
                loss = loss + _argmax_hinge(logits.float(), tgt_ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            taken = step + 1
        else:
            reached = False
        if not reached:
            # the loop ran out (or gave up) after a step: score the deltas it ends with, or the best ones seen
            with torch.no_grad():
                hit_all = logits_at_targets().argmax(-1) == tgt_ids
                if best is not None and int(hit_all.sum()) < best[0]:
                    for p, v in zip(params, best[1]):
                        p.copy_(v)
                    hit_all = logits_at_targets().argmax(-1) == tgt_ids
                acc = float(hit_all[core].float().mean())
        if cfg.delta_storage == "float16":
            # the pack stores the factors in float16: round them now and check the edit on what will be saved
            with torch.no_grad():
                for p in params:
                    p.copy_(p.half().float())
                hit_all = logits_at_targets().argmax(-1) == tgt_ids
            rounded = float(hit_all[core].float().mean())
            if rounded < acc:
                logger.info("edit %r -> %r: rounding the factors to float16 lowered target accuracy %.3f -> %.3f",
                            request.prompt, request.target, acc, rounded)
            acc = rounded
    finally:
        root.train(was_training)
        for p in params:
            p.grad = None
    if stats is not None:
        stats["capture"] = t_steps - t_start
        stats["delta_fit"] = time.perf_counter() - t_steps
        stats["tokens"] = replay.rows * int(replay.hidden.shape[1]) if replay is not None else int(built.input_ids.numel())
        stats["span"] = len(replay.layers) if replay is not None else len(family.decoder_layers(root))
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise EditDivergedError(
            f"edit {request.prompt!r} -> {request.target!r} diverged: slot {slot}'s delta has non-finite values "
            f"after {taken} steps (edit_lr={cfg.edit_lr}); lower edit_lr"
        )
    if acc < 1.0:
        logger.warning("edit %r -> %r: NOT REACHED: positives reach %.1f%% target accuracy after %d steps (bound %d); "
                       "the edit will not always answer its target (a larger rank or more edited layers gives the "
                       "delta more room)", request.prompt, request.target, 100 * acc, taken, bound)
    return taken, acc


#: Steps without a new best (more target tokens right) before phase 2 of :func:`fit_delta` gives up.
FIT_PATIENCE = 300

#: Phase 2 doubles the learning rate after this many steps without a new best (up to 16x ``edit_lr``):
#: a fit that stalls is usually one whose delta must grow large to tell nearly equal inputs apart.
FIT_STALL_STEPS = 50

#: The most phase 2 multiplies ``edit_lr`` by.
FIT_LR_CAP = 16

#: Phase 2 of :func:`fit_delta` may run this many extra steps per target token (answer + end token).
FIT_STEPS_PER_TOKEN = 200


def fit_step_bound(edit_steps: int, target_tokens: int) -> int:
    """The most steps :func:`fit_delta` takes: ``edit_steps`` (phase 1, stops once every target token is
    confidently right), then up to :data:`FIT_STEPS_PER_TOKEN` per target token more (phase 2, until every
    target token is the argmax): a 16-token answer needs many more steps than one word."""
    return int(edit_steps) + FIT_STEPS_PER_TOKEN * max(1, int(target_tokens))


def _argmax_hinge(logits: torch.Tensor, tgt_ids: torch.Tensor) -> torch.Tensor:
    """Mean hinge on (best other logit - target logit + margin): pushes exactly the tokens that are not yet
    the argmax. The margin is a tenth of each position's logit spread, so it means the same on a model
    whose logits span 1 (a tiny random one) as on one whose logits span 30."""
    z_t = logits.gather(1, tgt_ids[:, None]).squeeze(1)
    other = logits.scatter(1, tgt_ids[:, None], float("-inf")).amax(-1)
    margin = 0.1 * logits.detach().std(-1)
    return torch.relu(other - z_t + margin).mean()


def _positive_rows(imgs: list[Any], prompts: list[str], has_image: bool) -> tuple[list[Any], list[str]]:
    if not has_image:
        return [None] * len(prompts), list(prompts)
    rows_i, rows_q = [], []
    for i, im in enumerate(imgs):
        for j, q in enumerate(prompts):
            rows_i.append(im)
            rows_q.append(q)
    return rows_i, rows_q


# ---------------------------------------------------------------------- router fit


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
    """
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
        imgs, prompts = positive_views(r, seed=seed + i, n_views=cfg.auto_views)
        out += list(zip(*_positive_rows(imgs, prompts, r.image is not None)))
    rows, _ = router_rows(requests, cfg, pool, lambda key: 0, seed=seed)
    out += list(zip(rows.images, rows.prompts))
    for r in requests:  # the pack-level leak guard reads the requests' own locality probes
        out += probes_of(r)
    used = pool if cfg.hard_negatives else NegativePool()
    for ims, qs, _ in (pool_visual_rows(used), pool_textual_rows(used)):
        out += list(zip(ims, qs))
    return out


# ---------------------------------------------------------------------- helpers


def _prepare_text_key(cfg: LDKEConfig, family: Family, root: Any, processor: Any, r: EditRequest) -> None:
    """Load the textual-key encoder, record its width and the chat frame around a question in ``cfg``
    (a new pack), and hand the routing the tokenizer its inputs are made with."""
    from .question_key import SENTINEL, load_encoder, question_frame

    enc = load_encoder(cfg.router_text_encoder)
    if not cfg.router_text_dim:
        cfg.router_text_dim = enc.dim
    tok = family.tokenizer(processor)
    attach_tokenizer(root, tok)
    if not cfg.router_text_frame:
        built = family.build_inputs(processor, [r.image], [SENTINEL], None)
        image_mask = family.image_mask(root, built.input_ids).to(built.prompt_mask.device)
        cfg.router_text_frame = list(question_frame(tok, built.input_ids, built.prompt_mask.bool() & ~image_mask))


def _edit_meta(r: EditRequest) -> dict[str, Any]:
    return {
        "prompt": r.prompt,
        "target": r.target,
        "ground_truth": r.ground_truth,
        "subject": r.subject,
        "relation": r.relation,
        "image_sha": image_fingerprint(r.image) if r.image is not None else None,
        "fingerprint": r.fingerprint(),
    }


def _fit_target(tok: Any, target: str) -> str:
    """The text the delta is fitted to: the target and then the end of the answer (see :func:`fit_delta`)."""
    eos = getattr(tok, "eos_token", None)
    return target.strip() + (eos if isinstance(eos, str) and eos else "")


# ---------------------------------------------------------------------- checks before anything changes


def _check_pack(model: Any, pack: Any, adapter_name: str) -> None:
    """``pack`` must carry the LDKE adapter and wrap ``model`` (or be it)."""
    cfg = getattr(pack, "peft_config", {}).get(adapter_name)
    if not isinstance(cfg, LDKEConfig):
        raise InvalidRequestError(
            f"pack has no LDKE adapter named {adapter_name!r} (adapters: {sorted(getattr(pack, 'peft_config', {}))})",
            field="pack",
        )
    if model is not pack and base_model_of(model) is not base_model_of(pack):
        raise InvalidRequestError(
            "model and pack are different models: pass the pack itself (or the model it wraps) as model",
            field="pack",
        )


def _check_config(cfg: LDKEConfig | None) -> None:
    """Numbers that no fit survives, refused before the model is touched."""
    if cfg is None:
        return
    for name in ("edit_lr", "router_lr"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InvalidRequestError(f"config.{name} must be a finite positive number, got {value!r}", field=name)
    for name in ("edit_steps", "router_steps", "router_dim", "num_edit_layers"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < (1 if name in ("router_dim", "num_edit_layers") else 0):
            raise InvalidRequestError(f"config.{name} must be a non-negative integer (>= 1 for router_dim and "
                                      f"num_edit_layers), got {value!r}", field=name)
    for knob in ("auto_views", "router_views", "router_paraphrases"):
        v = getattr(cfg, knob)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InvalidRequestError(f"config.{knob} must be an integer >= 0, got {v!r}", field=knob)
    if not math.isfinite(float(cfg.max_delta_norm)) or cfg.max_delta_norm < 0:
        raise InvalidRequestError(f"config.max_delta_norm must be >= 0, got {cfg.max_delta_norm!r}", field="max_delta_norm")


def _check_processor(family: Family, model: Any, processor: Any, requests: Sequence[EditRequest]) -> None:
    """The processor must belong to the model: a processor of another family (a Qwen2-VL processor with a
    LLaVA model, ...) produces image tokens the model does not know or token ids beyond its vocabulary,
    which would only fail deep inside the first forward pass."""
    root = _root_model(model)
    i, sample = next(((i, r) for i, r in enumerate(requests) if r.image is not None), (0, requests[0]))
    name = type(processor).__name__
    try:
        built = family.build_inputs(processor, [sample.image], [sample.prompt])
    except InvalidRequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means "this processor cannot feed this model"
        raise InvalidRequestError(
            f"the processor ({name}) cannot prepare requests[{i}] for a {family.name} model "
            f"({type(exc).__name__}: {exc}); is it the processor of this model?",
            field="processor",
        ) from exc
    ids = built.input_ids
    emb = root.get_input_embeddings()
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise InvalidRequestError(
            f"the processor ({name}) produced token id {int(ids.max())}, but the model's vocabulary has {vocab} "
            "entries: processor and model do not belong together",
            field="processor",
        )
    token = family.image_token_id(root)
    if sample.image is not None and token is not None and not bool(family.image_mask(root, ids).any()):
        raise InvalidRequestError(
            f"the processor ({name}) turned requests[{i}]'s image into no image token of this {family.name} model "
            f"(token id {token}): processor and model do not belong together (a processor of another model family?)",
            field="processor",
        )


def _check_lengths(family: Family, model: Any, processor: Any, requests: Sequence[EditRequest]) -> None:
    """Every target must tokenize to some text, and every input the edit will run must fit the context.

    The inputs checked are those :func:`fit_delta` and :func:`fit_router` build: each prompt and rephrasing
    with the target (and end-of-answer token) on the edit image, the longest of them on each other view,
    and the probes used as hard negatives (their question on the edit image, their image with the edit
    question). Learned position embeddings (OPT/BLIP-2) would otherwise fail mid-edit; rotary ones would
    silently run out of the range the model was trained on.
    """
    root = _root_model(model)
    max_pos = family.max_positions(root)
    tok = family.tokenizer(processor)
    for i, r in enumerate(requests):
        built = family.build_inputs(processor, [r.image], [r.prompt], [r.target])
        ids = built.input_ids[built.target_mask].tolist()
        if not tok.decode(ids, skip_special_tokens=True).strip():
            raise InvalidRequestError(
                f"requests[{i}]: target {r.target!r} tokenizes to no text (token ids {ids}: whitespace, special or "
                "unknown tokens only)",
                field="target",
            )
        if not max_pos:
            continue
        target = _fit_target(tok, r.target)
        prompts = [r.prompt] + list(r.rephrase_prompts)
        longest = max(prompts, key=len)
        rows: list[tuple[Any, str, str | None, str]] = [
            (r.image, p, target, "prompt" if k == 0 else f"rephrase_prompts[{k - 1}]") for k, p in enumerate(prompts)
        ]
        rows += [(im, longest, target, f"rephrase_images[{k}]") for k, im in enumerate(r.rephrase_images)]
        for name in ("locality", "m_locality", "coupled"):
            for k, probe in enumerate(getattr(r, name)):
                rows.append((r.image, probe.prompt, None, f"{name}[{k}].prompt"))
                if r.image is not None and probe.image is not None:
                    rows.append((probe.image, longest, None, f"{name}[{k}].image"))
        for image, prompt, tgt, where in rows:
            b = family.build_inputs(processor, [image], [prompt], None if tgt is None else [tgt])
            n = int(b.input_ids.shape[1])
            if n > max_pos:
                what = "prompt + target" if where == "prompt" else where + (" + target" if tgt is not None else "")
                raise InvalidRequestError(
                    f"requests[{i}]: {what} is {n} tokens, longer than the model's context ({max_pos})",
                    field=where.split("[")[0].split(".")[0],
                )


# ---------------------------------------------------------------------- rollback


class _Rollback:
    """What :func:`edit` may change, captured before its first change, so a failure restores it exactly.

    A fresh edit changes the model by injection (LDKE layers replace the MLP output projections, hooks,
    ``peft_config`` and the routing state on the root, ``requires_grad`` flags); appending to a pack
    changes the pack's config, its layers' slot tensors and router, and may wrap new layers. Restoring
    swaps the original modules back and puts back the captured tensors (the objects themselves: no
    copy of the base weights is ever made).
    """

    _ROOT_ATTRS = ("peft_config", "_ldke_routing_state")

    def __init__(self, model: Any, pack: Any | None, adapter_name: str):
        self.pack = pack
        self.adapter_name = adapter_name
        self.root = _root_model(pack if pack is not None else model)
        self.training = [(m, m.training) for m in self.root.modules()]
        self.requires_grad = [(p, p.requires_grad) for p in self.root.parameters()]
        self.root_attrs = {a for a in self._ROOT_ATTRS if a in self.root.__dict__}
        self.wrapped = {id(m) for m in self.root.modules() if isinstance(m, LDKELayer)}
        self.layer_state: dict[int, dict[str, Any]] = {}
        if pack is not None:
            cfg = pack.peft_config[adapter_name]
            self.cfg_fields = {k: copy.deepcopy(getattr(cfg, k))
                               for k in ("slot_layers", "num_slots", "edits", "target_modules", "layers_to_transform",
                                         "router_groups")}
            tuner = pack.base_model
            self.tuner_lists = {k: list(getattr(tuner, k)) for k in ("targeted_module_names", "targeted_parameter_names")
                                if isinstance(getattr(tuner, k, None), list)}
            for m in self.root.modules():
                if isinstance(m, LDKELayer):
                    self.layer_state[id(m)] = {
                        store: copy.deepcopy(getattr(m, store)[adapter_name])
                        for store in ("ldke_A", "ldke_B", "ldke_slot_ids", "ldke_router")
                        if adapter_name in getattr(m, store)
                    }

    def restore(self) -> None:
        # 1. unwrap every layer this call wrapped (all of them for a fresh edit)
        state = self.root.__dict__.get("_ldke_routing_state")
        if self.pack is None and state is not None:
            state.remove_all()
        for name, m in list(self.root.named_modules()):
            if isinstance(m, LDKELayer) and id(m) not in self.wrapped:
                parent_name, _, child = name.rpartition(".")
                parent = self.root.get_submodule(parent_name) if parent_name else self.root
                setattr(parent, child, m.get_base_layer())
        # 2. a grown pack: back to its previous slots
        if self.pack is not None:
            cfg = self.pack.peft_config[self.adapter_name]
            for k, v in self.cfg_fields.items():
                setattr(cfg, k, v)
            for k, v in self.tuner_lists.items():
                setattr(self.pack.base_model, k, v)
            for m in self.root.modules():
                if isinstance(m, LDKELayer) and id(m) in self.layer_state:
                    saved = self.layer_state[id(m)]
                    for store in ("ldke_A", "ldke_B", "ldke_slot_ids", "ldke_router"):
                        container = getattr(m, store)
                        if store in saved:
                            container[self.adapter_name] = saved[store]
                        elif self.adapter_name in container:
                            del container[self.adapter_name]
                    m.invalidate_plans()
            if state is not None:
                # an interrupted forward (Ctrl-C) can leave a half-recorded call behind
                state.slots.pop(self.adapter_name, None)
                state.reset_call()
        # 3. attributes, flags and modes
        for attr in self._ROOT_ATTRS:
            if attr not in self.root_attrs and attr in self.root.__dict__:
                delattr(self.root, attr)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        for m, mode in self.training:
            m.training = mode
