"""Per-call routing context.

The router pools its textual features over *prompt* positions. When a caller appends answer tokens
(teacher-forced metrics, training), it tells the router which positions are the prompt with
:func:`prompt_mask_context`. A context variable (not a forward kwarg) keeps this working for any
model class, wrapped or not, and for models without LDKE adapters, where it is simply ignored.

Layer: tuner, a leaf (README "Architecture"): imports nothing of the library.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

_PROMPT_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("ldke_prompt_mask", default=None)
_FORCED_SLOT: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("ldke_forced_slot", default=None)


@contextlib.contextmanager
def prompt_mask_context(mask: torch.Tensor | None) -> Iterator[None]:
    """Within this block, forward passes pool router text features over ``mask`` (``(B, T)`` bool)."""
    token = _PROMPT_MASK.set(mask)
    try:
        yield
    finally:
        _PROMPT_MASK.reset(token)


def current_prompt_mask() -> torch.Tensor | None:
    return _PROMPT_MASK.get()


@contextlib.contextmanager
def forced_slots(slots: torch.Tensor | None) -> Iterator[None]:
    """Bypass the router: row ``i`` uses slot ``slots[i]`` (``-1`` = none). Used while fitting deltas."""
    token = _FORCED_SLOT.set(slots)
    try:
        yield
    finally:
        _FORCED_SLOT.reset(token)


def current_forced_slots() -> torch.Tensor | None:
    return _FORCED_SLOT.get()
