"""Which family adapter a model gets: a hand-written quirk family where one is registered, else the
structural adapter -- for every image-text-to-text model type transformers ships whose config passes
:func:`~ldke_peft.families.support.check_config`.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

from ..errors import UnsupportedModelError
from .base import Family
from .structure import derive_structure
from .support import check_config, is_image_text_to_text
from .unwrap import base_model_of

__all__ = ["family_for_config", "family_of", "get_family", "register_family", "supported_model_types"]

_REGISTRY: dict[str, Family] = {}
_STRUCTURAL: dict[str, Family] = {}
#: models already checked (config + structure), so the hot paths that ask for a family stay cheap
_CHECKED: "weakref.WeakKeyDictionary[Any, Family]" = weakref.WeakKeyDictionary()


def register_family(family: Family) -> Family:
    """Register (or replace) a family for each of its ``model_types``. Returns the family."""
    for mt in family.model_types:
        _REGISTRY[mt] = family
        _STRUCTURAL.pop(mt, None)
    _CHECKED.clear()
    _supported.cache_clear()
    return family


def get_family(model_type: str) -> Family:
    """The family for a ``config.model_type`` string.

    Raises :class:`UnsupportedModelError` saying why for a type that is not an image-text-to-text
    model, or whose default config already rules it out (encoder-decoder, cross-attention image
    inputs). The image token is checked on a real config (:func:`family_for_config`).
    """
    fam = _REGISTRY.get(model_type) or _STRUCTURAL.get(model_type)
    if fam is not None:
        return fam
    if not is_image_text_to_text(str(model_type)):
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by ldke-peft: it is not an image-text-to-text model type of "
            "this transformers (it has no AutoModelForImageTextToText class); ldke-peft edits multimodal LLMs whose language model reads "
            "image tokens, e.g. " + ", ".join(sorted(_REGISTRY)[:4] + ["llava", "qwen3_vl", "gemma3"])
        )
    default = _default_config(model_type)
    if default is not None:
        check_config(default, require_image_token=False)
    fam = _STRUCTURAL[model_type] = Family(model_type)
    return fam


def family_for_config(config: Any) -> Family:
    """The family for a loaded config, checked against the config itself (before weights are read)."""
    fam = get_family(getattr(config, "model_type", None))
    check_config(config)
    return fam


def family_of(model: Any) -> Family:
    """The family of a model (or a PeftModel wrapping one).

    The model type picks a hand-written family if there is one; the config and the module tree
    are then checked (read-only): an unsupported model raises :class:`UnsupportedModelError` saying
    why before anything is modified.
    """
    base = base_model_of(model)
    try:
        fam = _CHECKED.get(base)
    except TypeError:  # not weak-referenceable
        fam = None
    if fam is not None:
        return fam
    cfg = getattr(base, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no config.model_type; cannot detect its family")
    fam = family_for_config(cfg)
    derive_structure(base)
    try:
        _CHECKED[base] = fam
    except TypeError:
        pass
    return fam


def supported_model_types() -> list[str]:
    """Model types with a family: every registered one, plus each image-text-to-text type of this
    transformers whose default config passes the support check. (Whether a given checkpoint edits
    end to end is shown by ``benchmarks/family_coverage.py``.)"""
    return list(_supported())


@functools.lru_cache(maxsize=None)
def _supported() -> tuple[str, ...]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    out = set(_REGISTRY)
    for mt in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        try:
            get_family(mt)
        except UnsupportedModelError:
            continue
        out.add(mt)
    return tuple(sorted(out))


def _default_config(model_type: str) -> Any:
    """The default config of ``model_type`` (``None`` if transformers cannot build one offline)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type)
    except Exception:  # noqa: BLE001 - any failure: the real config is checked when a model arrives
        return None
