"""The load check on PEFT's generic config loader: an LDKE pack's files are validated before any layer is injected.

transformers' ``model.load_adapter()`` reads an adapter's config with PEFT's generic ``PeftConfig.from_pretrained``
(which builds an :class:`~ldke_peft.tuner.config.LDKEConfig` through ``from_peft_type`` and never calls
``LDKEConfig.from_pretrained``), injects the layers, and only then reads the weights: without this check a corrupt
or pickle-carrying pack would leave the model modified before it failed. It is the one PEFT method that importing
ldke_peft changes (README "Architecture"); every other PEFT type passes through untouched.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from typing import Optional

from peft.config import PeftConfig

from .peft_type import LDKEPeftType


def install_generic_loader_check() -> None:
    """Wrap ``PeftConfig.from_pretrained`` so that it validates LDKE packs (idempotent: re-imports do not stack
    wrappers)."""
    current = PeftConfig.__dict__.get("from_pretrained")
    if getattr(getattr(current, "__func__", None), "_ldke_wrapped", False):
        return
    original = PeftConfig.from_pretrained.__func__

    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        config = original(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        # LDKEConfig.from_pretrained validates itself (it reaches this wrapper through super()).
        if getattr(config, "peft_type", None) == LDKEPeftType.LDKE and not getattr(cls, "_validates_on_load", False):
            from .safety import validate_pack

            validate_pack(pretrained_model_name_or_path, config, subfolder=subfolder, **kwargs)
        return config

    from_pretrained._ldke_wrapped = True  # type: ignore[attr-defined]
    from_pretrained.__wrapped__ = original  # type: ignore[attr-defined]
    from_pretrained.__doc__ = original.__doc__
    PeftConfig.from_pretrained = classmethod(from_pretrained)
