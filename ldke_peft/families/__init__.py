"""Model families: the one package that knows where things live inside each MLLM.

Everything else in ldke-peft asks a :class:`Family` instead of testing model names. The
:class:`Family` base class is the *structural* adapter -- it derives the language model, decoder
layers, MLP output projections, vision modules, image-token id and input building from the model,
its config and its processor -- so any image-text-to-text model whose language model is a standard
decoder works without family code. Hand-written families exist only for real quirks, one module
each:

* :mod:`.blip2` -- no chat template; the forward always needs ``pixel_values``;
* :mod:`.paligemma` -- ``token_type_ids`` mark the causal suffix; no text-only rows in the processor;
* :mod:`.llava_onevision` -- a per-row image count among the processor outputs.

Models that cannot work (encoder-decoder, cross-attention image inputs, no image tokens, fused
mixture-of-experts MLPs) raise :class:`~ldke_peft.errors.UnsupportedModelError` saying why
(:mod:`.support`, :mod:`.structure`), before the model is touched.

Families are found from ``config.model_type`` and the model itself (never from a path or a class
name), so a model saved under any directory name is handled the same way.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from .base import Family
from .blip2 import Blip2Family
from .inputs import BuiltInputs, raw_text_inputs
from .llava_onevision import LlavaOnevisionFamily
from .paligemma import PaliGemmaFamily
from .processors import image_only_processor
from .registry import family_for_config, family_of, get_family, register_family, supported_model_types
from .structure import Structure, derive_structure
from .support import check_config
from .unwrap import base_model_of

__all__ = [
    "raw_text_inputs",
    "Blip2Family",
    "BuiltInputs",
    "Family",
    "LlavaOnevisionFamily",
    "PaliGemmaFamily",
    "Structure",
    "base_model_of",
    "check_config",
    "derive_structure",
    "family_for_config",
    "family_of",
    "get_family",
    "image_only_processor",
    "register_family",
    "supported_model_types",
]

for _fam in (LlavaOnevisionFamily(), Blip2Family(), PaliGemmaFamily()):
    register_family(_fam)
del _fam
