"""ldke-peft: Localized and Disentangled Knowledge Editing for multimodal LLMs, as a PEFT tuner.

``import ldke_peft`` registers the ``LDKE`` PEFT type, so ``PeftModel.from_pretrained(base, path)``
loads LDKE edit packs.
"""

from __future__ import annotations

import logging
import warnings

from .tuner.config import LDKEConfig
from .tuner.context import forced_slots, prompt_mask_context
from .errors import (
    AdapterLoadError,
    CorruptAdapterError,
    FingerprintMismatchError,
    ImageError,
    InvalidRequestError,
    LDKEError,
    MergeRefusedError,
    ProcessorNotFoundError,
    UnsafeAdapterError,
    UnsupportedModelError,
)
from .families import BuiltInputs, Family, family_of, get_family, register_family, supported_model_types
from .tuner.layer import LDKELinear
from .tuner.model import LDKEModel, attach_tokenizer, is_ldke_model
from .tuner.peft_type import LDKEPeftType
from .tuner.peft_type import register as _register
from .requests import EditRequest, Probe

__version__ = "0.1.0"


def edit(model, processor, requests, config=None, *, pack=None, **kwargs):
    """Edit ``model``: see :func:`ldke_peft.editing.editor.edit`. Returns a ``PeftModel`` with an LDKE pack."""
    from .editing.editor import edit as _edit

    return _edit(model, processor, requests, config, pack=pack, **kwargs)


def evaluate(model_or_peft, processor, requests, pre=None, **kwargs):
    """EasyEdit-compatible metrics: see :func:`ldke_peft.metrics.evaluate`."""
    from .metrics import evaluate as _evaluate

    return _evaluate(model_or_peft, processor, requests, pre=pre, **kwargs)


def refine_scope(peft_model, processor, requests, **kwargs):
    """Route the requests' questions as they wish by changing only the pack's router (radii, textual anchors):
    see :func:`ldke_peft.editing.scope_refine.refine_scope`. Returns one ``ScopeFix`` per question."""
    from .editing.scope_refine import refine_scope as _refine_scope

    return _refine_scope(peft_model, processor, requests, **kwargs)


def save_edits(peft_model, save_directory, **kwargs):
    """Save an LDKE pack atomically with LDKE's model card: see :func:`ldke_peft.hub.save_edits`."""
    from .hub import save_edits as _save_edits

    return _save_edits(peft_model, save_directory, **kwargs)


_register()
logging.getLogger(__name__).addHandler(logging.NullHandler())
# peft 0.21's PeftModel.__init__ reads transformers 5's deprecated ``is_gradient_checkpointing``: a
# FutureWarning on every edit and every pack load that no user can act on (it would land in the middle
# of printed results). Only that message is silenced.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__all__ = [
    "AdapterLoadError",
    "BuiltInputs",
    "CorruptAdapterError",
    "EditRequest",
    "Family",
    "FingerprintMismatchError",
    "ImageError",
    "InvalidRequestError",
    "LDKEConfig",
    "LDKEError",
    "LDKELinear",
    "LDKEModel",
    "LDKEPeftType",
    "MergeRefusedError",
    "Probe",
    "ProcessorNotFoundError",
    "UnsafeAdapterError",
    "UnsupportedModelError",
    "attach_tokenizer",
    "edit",
    "evaluate",
    "forced_slots",
    "family_of",
    "get_family",
    "is_ldke_model",
    "prompt_mask_context",
    "register_family",
    "refine_scope",
    "save_edits",
    "supported_model_types",
]
