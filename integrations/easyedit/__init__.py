"""LDKE as an EasyEdit (zjunlp/EasyEdit) multimodal editing method.

Usage, with EasyEdit on ``PYTHONPATH``::

    from integrations.easyedit import LDKEMultimodalHyperParams, register
    from easyeditor import MultimodalEditor

    register()  # ALG_MULTIMODAL_DICT["LDKE"] = apply_ldke_to_multimodal_model
    hparams = LDKEMultimodalHyperParams.from_hparams("integrations/easyedit/hparams/LDKE/qwen2vl-7b.yaml")
    editor = MultimodalEditor.from_hparams(hparams)
    metrics, edited_model, _ = editor.edit(prompts=..., targets=..., image=...)

Nothing here imports EasyEdit until :func:`register` is called.
"""

from .apply import (
    EasyEditCopyError,
    PromptMaskHook,
    RestoreBaseModel,
    apply_ldke_to_multimodal_model,
    easyedit_requests,
    edit_state,
)
from .evaluate import easyedit_inputs, easyedit_locality, easyedit_logits, easyedit_metrics
from .hparams import (
    ALG_NAME,
    LDKE_KNOBS,
    InvalidHyperParamsError,
    LDKEMultimodalHyperParams,
    hparams_dir,
    shipped_hparams,
)
from .register import (
    EASYEDIT_PATH_SUBSTRINGS,
    HOW_TO_GET_EASYEDIT,
    EasyEditDetectionError,
    EasyEditNotFoundError,
    check_easyedit_detection,
    is_easyedit_available,
    register,
)

__all__ = [
    "ALG_NAME",
    "EASYEDIT_PATH_SUBSTRINGS",
    "EasyEditCopyError",
    "EasyEditDetectionError",
    "EasyEditNotFoundError",
    "HOW_TO_GET_EASYEDIT",
    "InvalidHyperParamsError",
    "LDKE_KNOBS",
    "LDKEMultimodalHyperParams",
    "PromptMaskHook",
    "RestoreBaseModel",
    "apply_ldke_to_multimodal_model",
    "check_easyedit_detection",
    "easyedit_inputs",
    "easyedit_locality",
    "easyedit_logits",
    "easyedit_metrics",
    "easyedit_requests",
    "edit_state",
    "hparams_dir",
    "is_easyedit_available",
    "register",
    "shipped_hparams",
]
