"""Per-call routing inputs, installed on one model for one block of calls and removed when it ends.

The router pools its textual features over *prompt* positions. When a caller appends answer tokens
(teacher-forced metrics, training), it tells the router which positions are the prompt; while an
edit is fitted, the editor puts every row into one slot and bypasses the router. Both are inputs of
a call, so, as PEFT's Poly tuner hands ``task_ids`` to its layers, they live only as long as the call:

* as arguments of one forward call: ``peft_model(**inputs, ldke_prompt_mask=mask)`` or ``ldke_slots=slots``
  (also on the transformers model a pack was loaded into with ``load_adapter()``): the routing entry
  hook takes them out of the call's arguments and its exit hook removes them
  (:data:`~ldke_peft.tuner.routing_hooks.CALL_KWARGS`);
* for a block of calls (``generate``, whose arguments transformers validates, or code that runs decoder
  layers directly): ``with prompt_mask_context(model, mask): ...`` / ``forced_slots(model, slots)``.

They are stored on the model's :class:`~ldke_peft.tuner.routing_state.RoutingState` (so another model run
inside the block is not affected) and the previous values come back when the block ends or raises.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ..families.unwrap import base_model_of
from .routing_state import RoutingState, routing_state_of

__all__ = ["current_forced_slots", "current_prompt_mask", "forced_slots", "prompt_mask_context", "routing_inputs"]


def _state(model: Any) -> RoutingState:
    if isinstance(model, torch.Tensor) or model is None:
        raise TypeError("the routing context needs the model first: prompt_mask_context(model, mask) / "
                        "forced_slots(model, slots)")
    return routing_state_of(base_model_of(model))


def routing_inputs(model: Any, *, prompt_mask: torch.Tensor | None = None,
                   slots: torch.Tensor | None = None) -> contextlib.AbstractContextManager:
    """Within this block, ``model``'s forward calls pool router text features over ``prompt_mask``
    (``(B, T)`` bool) and, when ``slots`` is given, row ``i`` uses slot ``slots[i]`` (``-1`` = none)
    instead of the router's decision. ``None`` leaves that input as it was."""
    return _installed(_state(model), prompt_mask, slots)  # the model is checked here, not at ``with``


@contextlib.contextmanager
def _installed(state: RoutingState, prompt_mask: torch.Tensor | None, slots: torch.Tensor | None) -> Iterator[None]:
    prev = (state.call_prompt_mask, state.call_slots)
    if prompt_mask is not None:
        state.call_prompt_mask = prompt_mask
    if slots is not None:
        state.call_slots = slots
    try:
        yield
    finally:
        state.call_prompt_mask, state.call_slots = prev


def prompt_mask_context(model: Any, mask: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """Within this block, ``model``'s forward calls pool router text features over ``mask``."""
    return routing_inputs(model, prompt_mask=mask)


def forced_slots(model: Any, slots: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """Bypass ``model``'s router within this block: row ``i`` uses slot ``slots[i]`` (``-1`` = none)."""
    return routing_inputs(model, slots=slots)


def current_prompt_mask(model: Any) -> torch.Tensor | None:
    return _state(model).call_prompt_mask


def current_forced_slots(model: Any) -> torch.Tensor | None:
    return _state(model).call_slots
