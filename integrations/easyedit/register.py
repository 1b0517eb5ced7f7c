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

from ldke_peft.errors import LDKEError

from .apply import apply_ldke_to_multimodal_model
from .hparams import ALG_NAME

__all__ = ["HOW_TO_GET_EASYEDIT", "EasyEditNotFoundError", "is_easyedit_available", "register"]

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
