"""The LDKE edit loop: localize -> build positives/negatives -> fit the delta -> fit the router.

``edit(model, processor, requests)`` returns a ``PeftModel`` carrying an LDKE adapter (an *edit
pack*); passing ``pack=`` appends slots to an existing pack (sequential editing). The base weights are
never modified: every change lives in the adapter, and inputs the router sends to no slot run the
original weights bit for bit.

Layer: editing (README "Architecture"): imports data, tuner and editing modules, never the product code.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn
from tqdm.auto import tqdm

from ..tuner.config import LDKEConfig
from .delta_fit import EditDivergedError, fit_delta, fit_step_bound
from .edit_checks import _check_config, _check_host, _check_lengths, _check_processor, _check_pack
from ..errors import InvalidRequestError
from ..families import family_of
from ..tuner.layer import LDKELayer
from .localization import LocalizationResult, locate, trace
from ..tuner.model import LDKEModel, default_probe_layer, _root_model
from .pack_scope import ScopeMemory
from ..requests import EditRequest, image_fingerprint
from ..requests.images import fingerprints_memoized
from .scope import NegativePool, positive_views
from .scope_fit import _prepare_text_key, editor_rows, fit_router, router_rows

__all__ = ["edit", "SlotReport", "EditDivergedError", "NegativePool", "editor_rows", "fit_delta", "fit_router",
           "fit_step_bound", "positive_views", "router_rows"]

logger = logging.getLogger(__name__)


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
    #: the pack (adapter) the slot belongs to: one PeftModel can hold several packs, numbered from 0 each
    adapter_name: str = "default"


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
        model: a transformers MLLM of a supported family, or a ``PeftModel`` with LDKE packs: with an
            ``adapter_name`` it has, the edits are appended to that pack; with a new one, a new pack is added
            beside the others (PEFT's ``add_adapter``) and is active together with the packs that were
            active. A ``PeftModel`` of another PEFT method is refused (:class:`UnsupportedModelError`).
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
    if pack is None and isinstance(model, PeftModel) and isinstance(model.peft_config.get(adapter_name), LDKEConfig):
        pack = model
    if pack is not None:
        _check_pack(model, pack, adapter_name)
    else:
        _check_host(model)
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
        with fingerprints_memoized():
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
    host = _new_pack_host(model, pack)
    was_active = list(host.base_model.active_adapters) if host is not None else []
    if pack is None:
        cfg.slot_layers = slot_layers
        cfg.num_slots = len(slot_layers)
        cfg.edits = meta
        cfg.base_model_name_or_path = getattr(root, "name_or_path", None) or cfg.base_model_name_or_path
        if host is not None:
            host.add_adapter(adapter_name, cfg)
            peft_model = host
        else:
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
    # the fit forces slots per call, not per adapter: only the pack being edited may be active meanwhile
    if len(tuner.active_adapters) == 1 or host is not None:
        tuner.set_adapter(adapter_name)

    # 3. localized update, one slot at a time
    reports: list[SlotReport] = []
    for i, (r, s) in enumerate(zip(requests, new_slots)):
        t0 = time.perf_counter()
        phases = {"localize": t_loc[i]}
        stats: dict[str, float] = {}
        steps, acc = fit_delta(peft_model, processor, r, s, adapter_name=adapter_name, cache_hidden=cache_hidden,
                               seed=seed + i, stats=stats, pool=pool)
        phases.update(capture=stats["capture"], delta_fit=stats["delta_fit"])
        reports.append(
            SlotReport(
                slot=s, layers=slot_layers[i], localization=None if locs[i] is None else locs[i].to_dict(),
                fit_steps=steps, fit_seconds=time.perf_counter() - t0, fit_accuracy=acc, router={},
                seconds=t_loc[i] + time.perf_counter() - t0, fit_reached=acc >= 1.0, phases=phases,
                fit_tokens=int(stats["tokens"]), fit_span=int(stats["span"]), adapter_name=adapter_name,
            )
        )
        bar.update(1)
    bar.close()

    # 4. Disentanglement Classifier
    t0 = time.perf_counter()
    memories = getattr(peft_model, "ldke_scope_memory", None)
    memories = memories if isinstance(memories, dict) else {}
    old_memory = None if fresh else memories.get(adapter_name)
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
    peft_model.ldke_scope_memory = {**memories, adapter_name: memory}  # per pack: each guards its own slots
    if host is not None:  # the new pack works beside the packs that were active
        tuner.set_adapter(list(dict.fromkeys(was_active + [adapter_name])))
    peft_model.eval()
    return peft_model


def _new_pack_host(model: Any, pack: Any | None) -> Any | None:
    """The PeftModel a new pack is added to (beside its LDKE packs), or ``None`` (a fresh model or an append)."""
    from peft import PeftModel

    return model if pack is None and isinstance(model, PeftModel) else None


def _edit_meta(r: EditRequest) -> dict[str, Any]:
    meta = {
        "prompt": r.prompt,
        "target": r.target,
        "ground_truth": r.ground_truth,
        "subject": r.subject,
        "relation": r.relation,
        "image_sha": image_fingerprint(r.image) if r.image is not None else None,
        "fingerprint": r.fingerprint(),
    }
    if r.consequences:  # only when stated: a pack without them is written as before
        meta["consequences"] = [[c.prompt, c.answer] for c in r.consequences]
    return meta


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
        # a new pack added to a PeftModel of LDKE packs: those packs, their hooks and their active set stay
        self.host = _new_pack_host(model, pack)
        self.active = list(self.host.base_model.active_adapters) if self.host is not None else []
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
                                         "router_groups", "router_text_anchors")}
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
        if self.host is not None:
            self.host.base_model.set_adapter(self.active)  # first: deleting an active adapter warns
            if self.adapter_name in self.host.peft_config:
                self.host.base_model.delete_adapter(self.adapter_name)
            if state is not None:
                state.reset_call()  # an interrupted forward (Ctrl-C) can leave a half-recorded call behind
        elif self.pack is None and state is not None:
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
