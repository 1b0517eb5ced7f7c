"""PaliGemma's quirks: a bidirectional prefix marked by ``token_type_ids``, and no text-only rows.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Family

__all__ = ["PaliGemmaFamily"]


class PaliGemmaFamily(Family):
    """PaliGemma: SigLIP tower + linear projector, Gemma LM with a bidirectional prefix.

    Quirks: the prompt is ``<image>*N <bos> prompt \\n`` (the processor adds ``<bos>`` and ``\\n``)
    with no chat template; the answer ("suffix") follows. ``token_type_ids`` is 0 on the prefix
    (attended bidirectionally) and 1 on the suffix, so appended target tokens get 1 (every other
    family's type ids are 0 there). The processor refuses rows without an image, so a text-only row
    is tokenized as the processor would without the image tokens: ``<bos> prompt \\n``,
    ``token_type_ids`` 0.
    """

    name = "PaliGemma"
    model_types = ("paligemma",)
    sequence_keys = ("input_ids", "attention_mask", "token_type_ids")
    target_fill_values = {"attention_mask": 1, "token_type_ids": 1}

    def _plain_prompt(self, processor: Any, prompt: str, has_image: bool) -> str:
        return f"{self.image_placeholder(processor)}{prompt}" if has_image else prompt

    def _text_before_target(self, processor: Any, formatted_prompt: str) -> str:
        return formatted_prompt + "\n"

    def _process_row(self, processor: Any, text: str, image: Any | None) -> dict[str, torch.Tensor]:
        if image is not None:
            return super()._process_row(processor, text, image)
        tok = self.tokenizer(processor)
        enc = tok([f"{tok.bos_token}{text}\n"], add_special_tokens=False, return_tensors="pt")
        ids = enc["input_ids"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
