"""What a family adapter hands the editor: model inputs plus the masks over prompt and target tokens.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BuiltInputs", "cat_zero_padded", "raw_text_inputs"]


@dataclass
class BuiltInputs:
    """Model inputs for a batch plus the masks the editor and metrics need.

    Attributes:
        inputs: keyword arguments for ``model(**inputs)`` / ``model.generate(**inputs)``.
        target_mask: ``(B, T)`` bool, True exactly at the positions holding target tokens (``None``
            when no targets were given). Position ``t`` is predicted by the logits at ``t - 1``.
        prompt_mask: ``(B, T)`` bool, True at prompt positions (not padding, not target). The router
            pools its textual features over these positions only.
        sequence_keys: the entries of ``inputs`` aligned with ``input_ids`` (what a caller that
            appends tokens, e.g. step-by-step decoding, must extend too).
    """

    inputs: dict[str, Any]
    prompt_mask: torch.Tensor
    target_mask: torch.Tensor | None = None
    sequence_keys: tuple[str, ...] = ("input_ids", "attention_mask")

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "BuiltInputs":
        moved = {}
        for k, v in self.inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device)
                if dtype is not None and v.is_floating_point():
                    v = v.to(dtype)
            moved[k] = v
        return BuiltInputs(
            inputs=moved,
            prompt_mask=self.prompt_mask.to(device),
            target_mask=None if self.target_mask is None else self.target_mask.to(device),
            sequence_keys=self.sequence_keys,
        )

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    @property
    def labels(self) -> torch.Tensor:
        """``input_ids`` with every non-target position set to -100 (HF label convention)."""
        if self.target_mask is None:
            raise ValueError("labels need targets; build the inputs with targets=...")
        return torch.where(self.target_mask, self.input_ids, torch.full_like(self.input_ids, -100))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def right_aligned(self) -> "BuiltInputs":
        """The same rows with their padding moved to the end (every sequence-aligned entry and mask
        rolled left by the row's padding). Every row then starts at position 0, as it does when it is
        run alone, and rows that start with the same tokens hold them at the same positions: what lets
        a replay compute a shared prefix once (:mod:`ldke_peft.tuner.layer_replay`)."""
        am = self.inputs.get("attention_mask")
        if not isinstance(am, torch.Tensor) or am.dim() != 2:
            return self
        real = am.bool()
        lead = (~real).long().cumprod(1).sum(1)  # leading padding of each row
        if not bool(lead.any()):
            return self
        T = real.shape[1]
        src = (torch.arange(T, device=am.device)[None, :] + lead[:, None]) % T

        def roll(t: torch.Tensor) -> torch.Tensor:
            idx = src.to(t.device)
            while idx.dim() < t.dim():
                idx = idx.unsqueeze(-1)
            return torch.gather(t, 1, idx.expand_as(t))

        inputs = dict(self.inputs)
        for k in self.sequence_keys:
            v = inputs.get(k)
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == tuple(am.shape):
                inputs[k] = roll(v)
        return BuiltInputs(
            inputs=inputs,
            prompt_mask=roll(self.prompt_mask),
            target_mask=None if self.target_mask is None else roll(self.target_mask),
            sequence_keys=self.sequence_keys,
        )



def cat_zero_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding every other dim at its end to the largest size.

    This is how the processors themselves batch variable-size image inputs: LLaVA-OneVision pads
    the patch dim of ``pixel_values``; Idefics3 pads the image count and the pixel dims (with a
    zero ``pixel_attention_mask``); the models drop all-zero padding images / patches.
    """
    if len(tensors) == 1:
        return tensors[0]
    shapes = [t.shape for t in tensors]
    if any(len(s) != len(shapes[0]) for s in shapes):
        raise ValueError(f"cannot collate tensors of ranks {[len(s) for s in shapes]}")
    target = [max(s[d] for s in shapes) for d in range(1, len(shapes[0]))]
    out = []
    for t in tensors:
        pad: list[int] = []
        for d in reversed(range(1, t.dim())):
            pad += [0, target[d - 1] - t.shape[d]]
        out.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(out, dim=0)


def raw_text_inputs(family: Any, processor: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
    """Inputs for the model's own forward on text as it is (no chat template, no image), with what the
    family adds to a batch without images (BLIP-2's forward needs a placeholder image no token receives)."""
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    family._finalize_batch(processor, inputs)
    return {k: v.to(input_ids.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
