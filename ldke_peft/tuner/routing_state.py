"""Per-model routing state of a forward call: what the entry hooks captured, the features pooled at the
probe layer and the per-adapter decisions the LDKE layers read.

Owns: :class:`RoutingInputs`, :class:`Decisions`, :class:`RoutingState` (one per model, shared by its
LDKE layers) and :func:`pool_features`. The decision itself is :meth:`ldke_peft.tuner.routing.RouterState.route`;
this module imports nothing else of the library.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .routing import NO_SLOT


def pool_features(
    hidden: torch.Tensor, image_mask: torch.Tensor, prompt_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool probe-layer hidden states into routing features.

    Args:
        hidden: ``(B, T, d)`` hidden states after the probe layer.
        image_mask: ``(B, T)`` bool, image-token positions.
        prompt_mask: ``(B, T)`` bool, prompt positions (no padding, no appended answer).

    Returns:
        ``visual`` ``(B, d)``: mean over image tokens (zeros where a row has none),
        ``textual`` ``(B, 2d)``: [mean over prompt text tokens ; last prompt token] — the mean carries
        the wording, the last token (which attends to the whole question) carries what is asked,
        ``has_image`` ``(B,)`` bool.

    Each part is L2-normalised: residual streams share a large common component and outlier
    dimensions, and the direction (not the norm) is what identifies entity and relation.
    """
    h = hidden if hidden.dtype == torch.float32 else hidden.float()
    B, T, _ = h.shape
    if image_mask.device != h.device:
        image_mask = image_mask.to(h.device)
    if prompt_mask.device != h.device:
        prompt_mask = prompt_mask.to(h.device)
    has_image = image_mask.any(dim=1)
    # One batched matmul pools all three parts: rows of ``w`` select the image tokens, the prompt text
    # tokens and the last prompt position (prompt_mask may be left-padded or followed by answer
    # tokens). Sums, not means: each part is normalised right after, so the count cancels. This runs
    # at every prefill, so it is written for few kernel calls and no host synchronisation.
    last = (prompt_mask * torch.arange(1, T + 1, device=h.device)).argmax(dim=1, keepdim=True)
    is_last = torch.arange(T, device=h.device) == last  # (B, T); position 0 when a row has no prompt
    w = torch.stack([image_mask, prompt_mask & ~image_mask, is_last], dim=1).to(h.dtype)  # (B, 3, T)
    pooled = torch.bmm(w, h)  # (B, 3, d); a row without image tokens stays 0
    # F.normalize's rule (x / max(|x|, 1e-12)) without its Python-level dispatch
    pooled = pooled / torch.linalg.vector_norm(pooled, dim=-1, keepdim=True).clamp_min(1e-12)
    return pooled[:, 0], pooled[:, 1:].reshape(B, -1), has_image


@dataclass
class RoutingInputs:
    """What the root pre-forward hook captured for the current forward call."""

    image_mask: torch.Tensor | None
    prompt_mask: torch.Tensor | None
    batch_size: int
    prefill: bool
    #: the call's token ids (the textual key reads the question from them); None for embeddings-only calls
    input_ids: torch.Tensor | None = None


class Decisions(dict):
    """``{adapter: (B,) slot decision}`` that knows whether *any* row is routed anywhere.

    Every LDKE layer asks :meth:`any_routed` on every forward call (each decode step of every wrapped
    layer), so the answer is cached against a version counter bumped by every mutation: most inputs
    route nowhere, and for them a wrapped layer then costs one attribute compare on top of the base
    layer instead of the per-adapter bookkeeping.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.version = 0
        self._checked = -1
        self._any = False
        self._routed: dict = {}
        self._rows: dict = {}

    def _bump(self) -> None:
        self.version += 1

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self._bump()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self._bump()

    def pop(self, *args):
        out = super().pop(*args)
        self._bump()
        return out

    def popitem(self):
        out = super().popitem()
        self._bump()
        return out

    def clear(self) -> None:
        if self:
            super().clear()
            self._bump()

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        self._bump()

    def setdefault(self, key, default=None):
        out = super().setdefault(key, default)
        self._bump()
        return out

    def _refresh(self) -> None:
        # one host read-back per adapter and decision: each row's slot, and the set of routed slots
        self._rows = {name: tuple(t.tolist()) for name, t in self.items() if isinstance(t, torch.Tensor) and t.dim() == 1}
        self._routed = {name: frozenset(k for k in rows if k != NO_SLOT) for name, rows in self._rows.items()}
        self._any = any(self._routed.values())
        self._checked = self.version

    def any_routed(self) -> bool:
        """True if some row of some adapter's decision is a slot (not :data:`NO_SLOT`)."""
        if self._checked != self.version:
            self._refresh()
        return self._any

    def rows(self, name: str) -> tuple | None:
        """``name``'s decision as a tuple of per-row slot ids (``None`` if it has no decision)."""
        if self._checked != self.version:
            self._refresh()
        return self._rows.get(name)

    def routed_slots(self, name: str) -> frozenset:
        """The slots some row of ``name``'s current decision is routed to (a layer hosting none of them
        has nothing to add for this decision, and can tell without touching a tensor)."""
        if self._checked != self.version:
            self._refresh()
        return self._routed.get(name, frozenset())


@dataclass
class RoutingState:
    """Shared between the hooks and every LDKE layer of one model.

    ``slots[adapter]`` is the ``(B,)`` decision of the last prefill; decode steps of ``generate`` reuse
    it (the KV cache carries the prompt, so the decision must not change mid-generation).
    """

    current: RoutingInputs | None = None
    slots: Decisions = field(default_factory=Decisions)
    #: handles of the persistent entry hooks (root model, language model, input embeddings)
    hooks: list = field(default_factory=list)
    #: input ids / prompt mask of the last fresh prompt (to recognise cache-less continuations)
    prompt_ids: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    hooked_layers: set = field(default_factory=set)
    #: probe decoder layers by index. Their forward hook is installed by the entry hook at each
    #: prefill and removes itself when it has run: a permanent hook would put every decode step of
    #: the layer on torch's slow hook path for nothing (decode steps reuse the prefill decision)
    probe_layers: dict = field(default_factory=dict)
    probe_handles: dict = field(default_factory=dict)
    #: probe layer index -> the LDKE layers inside it (whose routers decide)
    probe_wrappers: dict = field(default_factory=dict)
    #: ``(module, hook id, hook, with_kwargs)`` of the *inner* entry hooks (language model, input
    #: embeddings), which matter only for calls that enter there (BLIP-2's ``generate`` runs its
    #: language model directly). A root call suspends them until it returns: it has already captured
    #: the routing inputs, and unhooked modules take torch's fast call path at every decode step
    inner_hooks: list = field(default_factory=list)
    inner_suspended: bool = False
    #: ``(hook dict, flag dict or None, hook id, hook)`` of the root model's own entry and exit hooks.
    #: Inside a request made through ``PeftModel`` (``generate``/``forward``, see
    #: ``LDKEModel._enable_peft_forward_hooks``) the decision made at its prefill holds for all of its
    #: later calls (its decode steps), so after the prefill they come off too, until the request ends
    root_hooks: list = field(default_factory=list)
    root_suspended: bool = False
    #: depth of PeftModel requests in progress
    request_depth: int = 0
    #: input ids last embedded outside any root call (BLIP-2's ``generate`` embeds the prompt itself
    #: and runs the language model on ``inputs_embeds``; these give it its image mask)
    pending_ids: torch.Tensor | None = None
    #: the edited model's tokenizer, for packs whose textual key reads the question text (set by the
    #: editor or :func:`ldke_peft.attach_tokenizer`, else loaded from ``name_or_path`` on first use)
    tokenizer: Any = None
    name_or_path: str | None = None
    #: per-call inputs (:mod:`ldke_peft.tuner.context`): the prompt positions the router pools over, and the
    #: slot each row is forced into (``None``: the router decides); set only for the block of a call
    call_prompt_mask: torch.Tensor | None = None
    call_slots: torch.Tensor | None = None
    #: the values a call's own ``ldke_prompt_mask=`` / ``ldke_slots=`` replaced (restored when it returns)
    call_saved: tuple | None = None

    def install_probe_hooks(self, make_hook) -> None:
        """(Re)install the one-shot forward hook on every probe layer (called at each prefill)."""
        for idx, layer in self.probe_layers.items():
            if idx not in self.probe_handles:
                self.probe_handles[idx] = layer.register_forward_hook(make_hook(self, idx))

    def remove_probe_hook(self, idx: int) -> None:
        h = self.probe_handles.pop(idx, None)
        if h is not None:
            h.remove()

    def suspend_inner_hooks(self) -> None:
        """Take the inner entry hooks off their modules (a root call is starting)."""
        if self.inner_suspended:
            return
        for module, hid, _hook, with_kwargs in self.inner_hooks:
            module._forward_pre_hooks.pop(hid, None)
            if with_kwargs:
                module._forward_pre_hooks_with_kwargs.pop(hid, None)
        self.inner_suspended = True

    def resume_inner_hooks(self) -> None:
        """Put the inner entry hooks back, under their original ids (a root call has ended or raised)."""
        if not self.inner_suspended:
            return
        for module, hid, hook, with_kwargs in self.inner_hooks:
            module._forward_pre_hooks[hid] = hook
            if with_kwargs:
                module._forward_pre_hooks_with_kwargs[hid] = True
        self.inner_suspended = False

    def suspend_root_hooks(self) -> None:
        """Take the root's entry and exit hooks off (a request's prefill has decided)."""
        if self.root_suspended:
            return
        for hooks, flags, hid, _hook in self.root_hooks:
            hooks.pop(hid, None)
            if flags is not None:
                flags.pop(hid, None)
        self.root_suspended = True

    def resume_root_hooks(self) -> None:
        """Put the root's hooks back under their original ids (the request has ended)."""
        if not self.root_suspended:
            return
        for hooks, flags, hid, hook in self.root_hooks:
            hooks[hid] = hook
            if flags is not None:
                flags[hid] = True
        self.root_suspended = False

    def end_request(self) -> None:
        """Every hook back in place (the outermost request has returned or raised)."""
        self.resume_root_hooks()
        self.resume_inner_hooks()

    def reset_call(self) -> None:
        """Forget the per-call state (after an interrupted forward or a rolled-back edit), including a
        one-shot probe hook whose forward never reached the probe layer."""
        self.current, self.pending_ids = None, None
        if self.call_saved is not None:
            self.call_prompt_mask, self.call_slots = self.call_saved
            self.call_saved = None
        self.end_request()
        for idx in list(self.probe_handles):
            self.remove_probe_hook(idx)

    def remove_all(self) -> None:
        """Remove every hook and forget every decision (the model is being unwrapped)."""
        self.end_request()
        self.inner_hooks.clear()
        self.root_hooks.clear()
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.probe_layers.clear()
        self.probe_wrappers.clear()
        self.hooked_layers.clear()
        self.slots.clear()
        self.reset_call()
        self.prompt_ids = self.prompt_mask = None


_STATE_ATTR = "_ldke_routing_state"


def routing_state_of(model: Any) -> RoutingState:
    """The :class:`RoutingState` of a transformers model (created on first use)."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        state = RoutingState()
        object.__setattr__(model, _STATE_ATTR, state)
    return state
