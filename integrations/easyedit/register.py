"""``register()``: make ``LDKE`` a method of an installed EasyEdit.

EasyEdit has no plugin mechanism: ``MultimodalEditor`` looks the method up in the module-level dict
``easyeditor.util.alg_dict.ALG_MULTIMODAL_DICT`` (it star-imports the same dict object), and
``restore_after_edit`` decides how to undo an edit from the name sets in
``easyeditor.editors.utils``. Registration therefore mutates those objects in place; rebinding a
name would not be seen by the editor.

EasyEdit is not installable from PyPI in a working form (the ``easyeditor`` package there is a 2023
snapshot); it runs from a clone on ``PYTHONPATH``, see :data:`HOW_TO_GET_EASYEDIT`.
"""

from __future__ import annotations

import importlib
import json
import os

from ldke_peft.errors import LDKEError

from .apply import apply_ldke_to_multimodal_model
from .hparams import ALG_NAME

__all__ = [
    "EASYEDIT_PATH_SUBSTRINGS",
    "HOW_TO_GET_EASYEDIT",
    "EasyEditDetectionError",
    "EasyEditNotFoundError",
    "check_easyedit_detection",
    "is_easyedit_available",
    "register",
]

HOW_TO_GET_EASYEDIT = (
    "EasyEdit is not importable. It is not installable from PyPI in a working form; run it from a clone:\n"
    "  git clone https://github.com/zjunlp/EasyEdit /path/to/EasyEdit\n"
    "  export PYTHONPATH=/path/to/EasyEdit:$PYTHONPATH\n"
    "EasyEdit's import needs a torchvision that matches torch, e.g.\n"
    "  pip install torch==2.14.1 torchvision==0.29.1\n"
    "and transformers <= 5.23 (5.24 removed transformers.modeling_attn_mask_utils, which EasyEdit imports),\n"
    "plus EasyEdit's own requirements (hydra-core, omegaconf, higher, nltk, scikit-learn, timm, opencv-python,\n"
    "av, qwen_vl_utils, sentence-transformers, ...). Use a separate virtual environment."
)


class EasyEditNotFoundError(LDKEError, ImportError):
    """``easyeditor`` cannot be imported; the message says how to put EasyEdit on the path."""


class EasyEditDetectionError(LDKEError, ValueError):
    """EasyEdit's ``MultimodalEditor`` would not recognise the model family from ``hparams.model_name``.

    Upstream EasyEdit then loads no model and fails much later with
    ``AttributeError: 'MultimodalEditor' object has no attribute 'model'``; this error says why and what
    to do instead, before EasyEdit is called."""


#: ``config.model_type`` -> substrings of ``model_name`` (lower-cased) from which upstream EasyEdit's
#: ``MultimodalEditor`` loads that family. Qwen2.5-VL is detected only after ``register(detect_qwen2_5_vl=True)``.
EASYEDIT_PATH_SUBSTRINGS: dict[str, tuple[str, ...]] = {
    "qwen2_vl": ("qwen2-vl", "qwen2_vl", "qwen2vl"),
    "llava_onevision": ("llava-onevision",),
    "qwen3_vl": ("qwen3-vl",),
    "qwen3_5": ("qwen3.5",),
    "qwen2_5_vl": ("qwen2.5-vl", "qwen2_5_vl", "qwen2.5vl", "qwen2_5-vl"),
}
_NEEDS_REGISTRATION = {"qwen2_5_vl"}


def _model_type_at(model_name: str) -> str | None:
    path = os.path.join(os.fspath(model_name), "config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def check_easyedit_detection(model_name: str, *, model_type: str | None = None, detect_qwen2_5_vl: bool = False) -> str:
    """The family EasyEdit's ``MultimodalEditor`` will load for ``model_name``, or a clear error.

    ``model_type`` defaults to the ``config.json`` inside ``model_name`` when that is a local folder.
    Raises :class:`EasyEditDetectionError` naming the substrings EasyEdit looks for, and for Qwen2.5-VL
    ``register(detect_qwen2_5_vl=True)`` (``--detect-qwen2-5-vl`` in ``examples/easyedit_ldke.py``), when
    EasyEdit would load nothing (or another family) from that path.
    """
    name = os.fspath(model_name).lower()
    model_type = model_type or _model_type_at(os.fspath(model_name))
    usable = {t: subs for t, subs in EASYEDIT_PATH_SUBSTRINGS.items() if detect_qwen2_5_vl or t not in _NEEDS_REGISTRATION}
    found = next((t for t, subs in usable.items() if any(x in name for x in subs)), None)
    if model_type is not None and model_type not in EASYEDIT_PATH_SUBSTRINGS:
        raise EasyEditDetectionError(
            f"EasyEdit's MultimodalEditor has no loader for model_type {model_type!r} (model_name {model_name!r}); "
            "call integrations.easyedit.apply_ldke_to_multimodal_model(model, processor, requests, hparams) "
            "directly, or use ldke_peft.edit"
        )
    if model_type in _NEEDS_REGISTRATION and not detect_qwen2_5_vl:
        raise EasyEditDetectionError(
            f"upstream EasyEdit does not detect Qwen2.5-VL from model_name {model_name!r} (it would load no model "
            "and fail later with \"'MultimodalEditor' object has no attribute 'model'\"): call "
            "register(detect_qwen2_5_vl=True) (examples/easyedit_ldke.py: --detect-qwen2-5-vl), keeping "
            f"one of {', '.join(EASYEDIT_PATH_SUBSTRINGS['qwen2_5_vl'])} in the path"
        )
    wanted = model_type or found
    if wanted is None or found != wanted:
        subs = EASYEDIT_PATH_SUBSTRINGS.get(wanted) if wanted else None
        what = (f"a path containing one of {', '.join(subs)}" if subs else
                "a path containing one of " + ", ".join(x for v in usable.values() for x in v))
        raise EasyEditDetectionError(
            f"EasyEdit's MultimodalEditor picks the model class from substrings of model_name, and "
            f"{model_name!r} {'matches ' + repr(found) if found else 'matches none'}"
            f"{' but the model is ' + repr(model_type) if model_type and found else ''}: it would load no model (or the "
            f"wrong class) and fail later with \"'MultimodalEditor' object has no attribute 'model'\". Save or link "
            f"the model under {what}"
        )
    return wanted


def _import_easyedit():
    try:
        from easyeditor.util import alg_dict  # the dotted `import easyeditor.util.alg_dict` form is shadowed

        editor_utils = importlib.import_module("easyeditor.editors.utils")
    except Exception as exc:  # noqa: BLE001 - a broken torchvision raises RuntimeError at import, not ImportError
        detail = f"{type(exc).__name__}: {exc}".strip()
        raise EasyEditNotFoundError(f"{HOW_TO_GET_EASYEDIT}\n(import failed with {detail})") from exc
    return alg_dict, editor_utils


def is_easyedit_available() -> bool:
    """Whether ``easyeditor`` imports here (imports it, which takes ~10 s the first time)."""
    try:
        _import_easyedit()
    except EasyEditNotFoundError:
        return False
    return True


def register(*, detect_qwen2_5_vl: bool = False) -> None:
    """Register ``LDKE`` as an EasyEdit multimodal method (idempotent).

    * ``ALG_MULTIMODAL_DICT["LDKE"] = apply_ldke_to_multimodal_model`` (the dict ``MultimodalEditor``
      reads),
    * ``"LDKE"`` added to ``MULTIMODAL_EDIT_ALGS`` where that set exists,
    * ``"LDKE"`` added to ``CALLABLE_RESTORE_ALGS``, so single-edit mode restores the base model
      after each case by calling the ``weights_copy`` the apply function returns.

    With ``detect_qwen2_5_vl=True`` EasyEdit's Qwen-VL detection tables
    (``easyeditor.util.vl_utils``) also learn Qwen2.5-VL (``qwen2.5-vl`` / ``qwen2_5_vl`` in
    ``model_name`` -> ``Qwen2_5_VLForConditionalGeneration``), which upstream does not detect. This
    changes EasyEdit's behaviour for every method, hence opt-in.

    Raises :class:`EasyEditNotFoundError` (an ``ImportError``) when EasyEdit cannot be imported.
    """
    alg_dict, editor_utils = _import_easyedit()
    alg_dict.ALG_MULTIMODAL_DICT[ALG_NAME] = apply_ldke_to_multimodal_model
    algs = getattr(alg_dict, "MULTIMODAL_EDIT_ALGS", None)
    if isinstance(algs, set):
        algs.add(ALG_NAME)
    elif isinstance(algs, list) and ALG_NAME not in algs:
        algs.append(ALG_NAME)
    restore = getattr(editor_utils, "CALLABLE_RESTORE_ALGS", None)
    if restore is None:
        raise EasyEditNotFoundError(
            "this EasyEdit has no easyeditor.editors.utils.CALLABLE_RESTORE_ALGS; LDKE needs an EasyEdit from "
            "2026 or later (restore_after_edit with callable restores)"
        )
    if isinstance(restore, set):
        restore.add(ALG_NAME)
    elif ALG_NAME not in restore:
        restore.append(ALG_NAME)
    if detect_qwen2_5_vl:
        _add_qwen2_5_vl_detection()


def _add_qwen2_5_vl_detection() -> None:
    vl_utils = importlib.import_module("easyeditor.util.vl_utils")
    aliases = getattr(vl_utils, "QWEN_VL_FAMILY_ALIASES", None)
    classes = getattr(vl_utils, "QWEN_VL_MODEL_CLASSES", None)
    if not isinstance(aliases, dict) or not isinstance(classes, dict):
        raise EasyEditNotFoundError(
            "this EasyEdit has no easyeditor.util.vl_utils.QWEN_VL_FAMILY_ALIASES / QWEN_VL_MODEL_CLASSES; "
            "detect_qwen2_5_vl needs an EasyEdit from 2026 or later"
        )
    aliases.setdefault("qwen2.5-vl", ("qwen2.5-vl", "qwen2_5_vl", "qwen2.5vl", "qwen2_5-vl"))
    classes.setdefault("qwen2.5-vl", ("Qwen2_5_VLForConditionalGeneration",))
