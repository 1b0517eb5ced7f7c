"""LDKE's PEFT type and its registration in peft's mappings.

``peft.register_peft_method`` only accepts names of peft's closed ``PeftType`` enum, so LDKE uses a
``str``-enum of its own (transformers' ``load_adapter`` reads ``peft_type.value``, so a plain string
would break it) and inserts itself into peft's mapping dicts. Importing :mod:`ldke_peft` does this;
re-importing is harmless.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

import enum


class LDKEPeftType(str, enum.Enum):
    LDKE = "LDKE"


def register() -> None:
    """Make ``peft_type: "LDKE"`` resolvable by peft and transformers. Idempotent."""
    from peft import mapping

    from .config import LDKEConfig
    from .model import LDKEModel

    for key in (LDKEPeftType.LDKE, "LDKE"):
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = LDKEConfig
        mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = LDKEModel
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = LDKEModel.prefix
