"""Replay of the edited span of decoder layers on cached inputs, checked against the real forward.

Fitting a delta on layers ``lo..L-1`` only needs those layers: the hidden states entering layer
``lo`` do not change while the delta trains. Replaying the span is only sound when the language
model does nothing *between* its layers, and when each layer is called with its own arguments:

* hybrid stacks give each layer its own mask and rotary tables (Gemma 3: sliding vs. global
  layers; Qwen3.5: linear- vs. full-attention layers), so every layer's call is recorded, not one;
* some language models add work between layers (Qwen3-VL's DeepStack adds visual features after
  the first layers), which a replay would skip.

So :func:`capture_replay` records every layer call of one real forward (all deltas off), replays
them, and keeps the replay only if it reproduces the forward's logits at the target positions;
otherwise the editor runs full forwards, which is always correct, just slower.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .context import forced_slots, prompt_mask_context
from .routing import NO_SLOT

logger = logging.getLogger(__name__)

__all__ = ["LayerReplay", "capture_replay"]

#: tolerance of the replay check (fp32 reassociation across a different call path)
_ATOL, _RTOL = 1e-4, 1e-3


@dataclass
class LayerReplay:
    """The hidden states entering the first replayed layer and each replayed layer's own call."""

    hidden: torch.Tensor
    layers: list[nn.Module]
    calls: list[tuple[tuple, dict]]

    def run(self) -> torch.Tensor:
        """Hidden states leaving the last decoder layer (with whatever deltas are active)."""
        h = self.hidden
        for layer, (args, kwargs) in zip(self.layers, self.calls):
            out = layer(h, *args, **kwargs)
            h = out[0] if isinstance(out, (tuple, list)) else out
        return h


def capture_replay(root: nn.Module, family: Any, lo: int, built: Any, pred_pos: torch.Tensor) -> LayerReplay | None:
    """A verified :class:`LayerReplay` of decoder layers ``lo..`` for ``built``, or ``None`` when a
    replay does not reproduce the model's own logits at ``pred_pos``."""
    layers = list(family.decoder_layers(root))[lo:]
    first: dict[int, tuple[torch.Tensor, tuple, dict]] = {}

    def recorder(i: int):
        def grab(_module, args, kwargs):
            if i in first:
                return None
            if args:
                h, rest = args[0], tuple(args[1:])
            else:
                h, rest = kwargs["hidden_states"], ()
            first[i] = (h.detach(), rest, {k: v for k, v in kwargs.items() if k != "hidden_states"})
            return None

        return grab

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    no_slot = torch.full((len(built),), NO_SLOT, dtype=torch.long)
    try:
        with torch.no_grad(), forced_slots(no_slot), prompt_mask_context(built.prompt_mask):
            reference = root(**built.inputs, use_cache=False).logits[pred_pos]
    finally:
        for h in handles:
            h.remove()
    if len(first) != len(layers):
        logger.info("layer replay off: not every decoder layer from %d ran in the forward", lo)
        return None
    replay = LayerReplay(first[0][0], layers, [(first[i][1], first[i][2]) for i in range(len(layers))])
    try:
        with torch.no_grad(), forced_slots(no_slot), prompt_mask_context(built.prompt_mask):
            again = family.logits_from_hidden(root, replay.run()[pred_pos])
    except Exception as exc:  # noqa: BLE001 - any failure to replay: full forwards are always right
        logger.info("layer replay off: replaying decoder layers %d.. failed (%s)", lo, exc)
        return None
    if again.shape != reference.shape or not torch.allclose(again.float(), reference.float(), atol=_ATOL, rtol=_RTOL):
        logger.info(
            "layer replay off: replaying decoder layers %d.. does not reproduce the forward (the language model "
            "works between its layers); fitting with full forwards", lo
        )
        return None
    return replay
