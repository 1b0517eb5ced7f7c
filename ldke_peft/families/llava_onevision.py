"""LLaVA-OneVision's quirk: a per-*row* image count among the processor outputs.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from .base import Family

__all__ = ["LlavaOnevisionFamily"]


class LlavaOnevisionFamily(Family):
    """LLaVA-OneVision (SigLIP tower + AnyRes patches, Qwen2 language model).

    Quirk: the processor returns ``batch_num_images``, the number of images of each *row* (not one
    entry per image, which is how every other non-sequence output is collated), and the model needs
    0 there for a text-only row in a mixed batch. ``pixel_values`` is ``(images, patches, 3, H, W)``
    with a per-image patch count, zero-padded along the patch dim by the generic collation.
    """

    name = "LLaVA-OneVision"
    model_types = ("llava_onevision",)
    image_keys = ("pixel_values", "image_sizes")
    row_keys = {"batch_num_images": 0}
