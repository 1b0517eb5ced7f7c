"""Which edit fires: the slot each (image, question) routes to, decided as a served call decides it.

An edit pack's scope is a promise: its questions get the edit, every other input the original weights.
:func:`~ldke_peft.evaluate` scores answers; this module shows the routing decision behind them, per
question, so that a user can check which of their own questions (rewordings they expect to reach the
edit, near-by questions they expect it to leave alone) an edit fires on before deploying it. Each row
runs the model's real forward pass (prefill only) with the pack applied, the routing hooks decide, and
the decision is read back: nothing is re-implemented here.

Layer: product (README "Architecture"): may import every layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from ..families import family_of
from ..editing.scope_refine import request_questions, slot_of
from ..requests import EditRequest
from ..tuner.context import prompt_mask_context
from ..tuner.model import NO_SLOT, _root_model, routing_state_of
from ..tuner.peft_type import LDKEPeftType
from .compute import _attach_tokenizer
from .pre import _eval_mode

__all__ = ["Route", "route_requests", "which_slots"]


def _ldke_adapters(model: Any) -> list[str]:
    config = getattr(model, "peft_config", None) or {}
    return [name for name, cfg in config.items() if getattr(cfg, "peft_type", None) == LDKEPeftType.LDKE]


@torch.no_grad()
def which_slots(model: Any, processor: Any, images: Sequence[Any | None], prompts: Sequence[str], *,
                batch_size: int = 8) -> list[dict[str, int]]:
    """For each ``(images[i], prompts[i])``: ``{adapter name: slot}`` of every LDKE adapter of ``model``
    (a ``PeftModel`` or a transformers model a pack was loaded into), ``-1`` where no slot fires (an adapter
    that is not active fires none).

    Rows with and without an image run in separate batches (not every family mixes them in one); the model
    runs in eval mode (no dropout) and is left in the mode it was in."""
    if len(images) != len(prompts):
        raise ValueError(f"which_slots: {len(images)} images for {len(prompts)} prompts")
    if batch_size < 1:
        raise ValueError(f"which_slots: batch_size must be at least 1, got {batch_size}")
    adapters = _ldke_adapters(model)
    if not adapters:
        raise ValueError("which_slots: the model carries no LDKE adapter (load a pack first)")
    root = _root_model(model)
    family = family_of(root)
    device, dtype = next((p.device, p.dtype) for p in root.parameters() if p.is_floating_point())
    _attach_tokenizer(root, family, processor)
    state = routing_state_of(root)
    out: list[dict[str, int]] = [{} for _ in prompts]
    for with_image in (True, False):
        rows = [i for i, im in enumerate(images) if (im is not None) == with_image]
        for k in range(0, len(rows), batch_size):
            chunk = rows[k:k + batch_size]
            built = family.build_inputs(processor, [images[i] for i in chunk], [prompts[i] for i in chunk]).to(device, dtype)
            # every prefill clears the decisions it does not make: an adapter that is not active reads as none
            with _eval_mode(model), prompt_mask_context(model, built.prompt_mask):
                model(**built.inputs, use_cache=False)
            for name in adapters:
                got = state.slots.get(name)
                for j, i in enumerate(chunk):
                    out[i][name] = NO_SLOT if got is None else int(got[j])
    return out


@dataclass
class Route:
    """One question's routing: where it went and where its request says it should go."""

    request: int
    kind: str  # "prompt", "rephrase", "rephrase_image", or a probe field ("locality", "coupled:<kind>", ...)
    prompt: str
    slot: int  # the slot it routed to (-1 = none)
    edit: str | None  # that slot's edit, "prompt -> target" (None when no slot fired)
    in_scope: bool | None  # whether the request wants the edit to fire on it (None: a portability probe)
    expected_slot: int | None  # the request's own slot in the pack, when the pack has it
    ok: bool | None  # routed as the request wants (None: the pack does not hold this request's edit)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _active_adapter(model: Any, adapters: list[str]) -> str:
    active = getattr(model, "active_adapters", None)
    active = active() if callable(active) else active  # a method on transformers models, a property on PeftModel
    if isinstance(active, str):
        active = [active]
    return next((a for a in (active or []) if a in adapters), adapters[0])


def route_requests(model: Any, processor: Any, requests: Sequence[EditRequest], *, adapter_name: str | None = None,
                   batch_size: int = 8) -> list[Route]:
    """Route every question of ``requests`` through ``model``'s pack (``adapter_name``, default the active
    one): the edit question, its rephrasings and other images (in scope: they should reach the request's
    own slot) and its locality and coupled probes (out of scope: no slot should fire). Portability probes
    are routed but not judged (``ok`` None): whether a related question should follow the edit depends on
    how the pack was made. So are the in-scope questions of a request whose edit the pack does not hold."""
    adapters = _ldke_adapters(model)
    if not adapters:
        raise ValueError("route_requests: the model carries no LDKE adapter (load a pack first)")
    name = adapter_name or _active_adapter(model, adapters)
    if name not in adapters:
        raise ValueError(f"route_requests: no LDKE adapter {name!r} (the model has {adapters})")
    edits = list(getattr(model.peft_config[name], "edits", []) or [])
    rows = [(i, *q) for i, r in enumerate(requests) for q in request_questions(r)]
    slots = which_slots(model, processor, [x[2] for x in rows], [x[3] for x in rows], batch_size=batch_size)
    out = []
    for (i, kind, _, prompt, want), got in zip(rows, slots):
        s = got[name]
        own = slot_of(edits, requests[i])
        edit = None
        if 0 <= s < len(edits):
            edit = f"{edits[s].get('prompt')!r} -> {edits[s].get('target')!r}"
        elif s >= 0:
            edit = f"slot {s}"
        if want is None:
            ok = None
        elif want:
            ok = None if own is None else s == own
        else:
            ok = s == NO_SLOT
        out.append(Route(i, kind, prompt, s, edit, want, own, ok))
    return out
