"""BLIP-2's quirks: no chat template, and a forward that always encodes ``pixel_values``.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from typing import Any

from .base import Family

__all__ = ["Blip2Family"]


class Blip2Family(Family):
    """BLIP-2 with a decoder-only LM (OPT): ViT + Q-Former, ``num_query_tokens`` image tokens.

    Quirks: there is no chat template; prompts follow BLIP-2's VQA format ``"Question: {prompt}
    Answer:"``, and the processor prepends the image tokens. ``Blip2ForConditionalGeneration``
    always encodes ``pixel_values``, but it only writes the Q-Former output into ``<image>``
    positions; so a batch with no image at all gets one placeholder (black) image that no token
    receives, which leaves text-only rows exactly the plain OPT forward. (Structure is derived: the
    OPT decoder's MLP output is ``fc2`` -- as is the ViT's, which the full paths keep apart.)
    """

    name = "BLIP-2"
    model_types = ("blip-2",)

    def _plain_prompt(self, processor: Any, prompt: str, has_image: bool) -> str:
        return f"Question: {prompt} Answer:"

    def _finalize_batch(self, processor: Any, inputs: dict[str, Any]) -> None:
        if "pixel_values" not in inputs:
            from PIL import Image

            size = _image_size(processor.image_processor)
            pv = processor.image_processor(images=[Image.new("RGB", size)], return_tensors="pt")["pixel_values"]
            inputs["pixel_values"] = pv


def _image_size(image_processor: Any) -> tuple[int, int]:
    """``(width, height)`` of the images an image processor produces (for placeholder images)."""
    size = getattr(image_processor, "size", None) or {}
    size = dict(size) if not isinstance(size, dict) else size
    h = size.get("height") or size.get("shortest_edge") or size.get("longest_edge") or 224
    w = size.get("width") or h
    return int(w), int(h)
