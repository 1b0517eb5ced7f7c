"""The transformers model inside PEFT wrappers.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from typing import Any

__all__ = ["base_model_of"]


def base_model_of(model: Any) -> Any:
    """The transformers model inside a ``PeftModel`` / LDKE / other PEFT tuner wrapper (or ``model``).

    Only PEFT wrappers are unwrapped: a transformers model's own ``base_model`` property (e.g.
    ``LlavaForConditionalGeneration.base_model`` -> ``LlavaModel``) must not be followed.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    base = model
    for _ in range(4):
        if isinstance(base, PeftModel):
            base = base.base_model
        elif isinstance(base, BaseTuner):
            base = base.model
        else:
            break
    return base
