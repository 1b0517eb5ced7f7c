"""``apply_ldke_to_multimodal_model``: LDKE behind EasyEdit's apply-function contract.

EasyEdit's ``MultimodalEditor`` calls every method as::

    edited_model, weights_copy = apply_X(model, processor, requests, hparams, copy=False,
                                         return_orig_weights=True, keep_original_weight=...)

and then scores ``edited_model(**inputs).logits`` on *prompt + target* token sequences (no
``labels`` are passed; the target is simply appended after the chat template's generation prompt).
Three things make LDKE fit that contract:

* **In place, cumulative.** As for EasyEdit's LoRA, ``copy=False`` edits ``model`` itself: the LDKE
  layers are injected into it. The edit pack is remembered on the model, so the next call on the
  same model (EasyEdit's sequential mode and ``edit_dataset``) appends slots to the same pack.
* **Callable restore.** ``weights_copy`` is a :class:`RestoreBaseModel`: calling it unloads the
  adapter and puts back everything the edit touched (module objects, hooks, ``requires_grad``,
  train/eval flags, attributes), so the base is bitwise what it was. ``register()`` puts ``LDKE``
  into EasyEdit's ``CALLABLE_RESTORE_ALGS`` so single-edit mode calls it after each case.
* **Router prompt mask without a context manager.** LDKE's router pools its textual features over
  the *prompt*; teacher-forced scoring appends the answer, which would change the features.
  ldke-peft's own code says where the prompt ends with :func:`~ldke_peft.tuner.context.prompt_mask_context`;
  EasyEdit cannot. A forward pre-hook on the model (:class:`PromptMaskHook`) derives the prompt from
  the call itself: from ``labels`` when given (positions before the first non ``-100`` label), else
  from the last occurrence of the chat template's generation prompt (e.g.
  ``<|im_end|>\\n<|im_start|>assistant\\n``), which EasyEdit's inputs always contain. An explicit
  ``prompt_mask_context`` always wins.
"""

from __future__ import annotations

import copy as copy_module
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

import ldke_peft
from ldke_peft.tuner.context import current_prompt_mask, prompt_mask_context
from ldke_peft.errors import ImageError, InvalidRequestError, LDKEError
from ldke_peft.families import Family, base_model_of, family_of
from ldke_peft.tuner.model import is_ldke_model
from ldke_peft.requests import EditRequest, requests_from_easyedit_dicts

from .hparams import LDKEMultimodalHyperParams

logger = logging.getLogger(__name__)

__all__ = [
    "EasyEditCopyError",
    "PromptMaskHook",
    "RestoreBaseModel",
    "apply_ldke_to_multimodal_model",
    "easyedit_requests",
    "edit_state",
]

#: attribute (set with ``object.__setattr__``, not a submodule) holding the integration's state
_STATE_ATTR = "_ldke_easyedit_state"
#: request keys that may hold images
_IMAGE_KEYS = ("image", "image_rephrase", "multimodal_locality_image")
#: placeholder user text used to find the chat template's generation prompt
_SENTINEL = "LDKEPROMPTSENTINEL"


class EasyEditCopyError(LDKEError, ValueError):
    """``copy=True`` was asked for a model that already carries an LDKE pack (its routing hooks
    cannot be deep-copied); copy the clean base model instead."""


# ---------------------------------------------------------------------- prompt-mask hook


def generation_markers(family: Family, processor: Any) -> list[list[int]]:
    """Token ids that end a prompt in this processor's format (longest first), or ``[]``.

    The text between the user's words and the answer (``<|im_end|>\\n<|im_start|>assistant\\n`` for
    ChatML, ``" ASSISTANT:"`` for LLaVA-1.5, ...) comes from the family's own prompt formatting, so it
    is exactly what EasyEdit's ``apply_chat_template(..., add_generation_prompt=True)`` produces. The
    marker without its last token is kept as a fallback for tokenizers that merge that token with
    the start of the answer.
    """
    try:
        text = family.format_prompt(processor, _SENTINEL, has_image=False)
    except Exception:  # noqa: BLE001 - a processor without a usable template: no marker, no harm
        logger.debug("cannot format a prompt with %r; router prompt mask falls back to attention mask", processor)
        return []
    if _SENTINEL not in text:
        return []
    suffix = text.rsplit(_SENTINEL, 1)[1]
    if not suffix.strip():
        return []
    tok = family.tokenizer(processor)
    ids = list(tok(suffix, add_special_tokens=False)["input_ids"])
    if not ids:
        return []
    return [ids, ids[:-1]] if len(ids) > 2 else [ids]


def _last_occurrence_end(row: torch.Tensor, marker: torch.Tensor) -> int | None:
    k = int(marker.numel())
    if k == 0 or row.numel() < k:
        return None
    hits = (row.unfold(0, k, 1) == marker).all(dim=1).nonzero()
    if hits.numel() == 0:
        return None
    return int(hits[-1, 0]) + k


class PromptMaskHook:
    """Forward pre-hook (+ always-called forward hook) on the root model that sets the router's
    prompt mask for calls that did not set one.

    Order of evidence per row: ``labels`` (prompt = real positions before the first labelled one),
    then the last generation-prompt marker (prompt = everything up to it), else nothing (LDKE's
    default: the attention mask). Decode steps (one new token) are left alone: routing was decided
    at prefill.
    """

    def __init__(self, family: Family, processor: Any):
        self.family = family
        self.handles: list[Any] = []
        self._stack: list[Any] = []
        self.set_processor(processor)

    def set_processor(self, processor: Any) -> None:
        self.processor = processor
        self.markers = [torch.tensor(m, dtype=torch.long) for m in generation_markers(self.family, processor) if m]

    def install(self, root: nn.Module) -> None:
        if self.handles:
            return
        self.handles = [
            root.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True),
            root.register_forward_hook(self._post, with_kwargs=True, always_call=True),
        ]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        while self._stack:
            cm = self._stack.pop()
            if cm is not None:
                cm.__exit__(None, None, None)

    # ------------------------------------------------------------------ derivation
    def prompt_mask(self, input_ids: torch.Tensor, attention_mask: Any = None, labels: Any = None) -> torch.Tensor | None:
        """``(B, T)`` bool prompt mask for a call, or ``None`` when nothing can be derived."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            return None
        B, T = input_ids.shape
        if isinstance(attention_mask, torch.Tensor) and tuple(attention_mask.shape) == (B, T):
            real = attention_mask.bool()
        else:
            real = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (B, T):
            labels = None
        if labels is None and T <= 1:
            return None
        mask = real.clone()
        derived = False
        markers = [m.to(input_ids.device) for m in self.markers]
        for b in range(B):
            end = None
            if labels is not None:
                lab = (labels[b] != -100) & real[b]
                if lab.any() and (real[b] & ~lab).any():
                    end = int(lab.nonzero()[0, 0])
            if end is None:
                for m in markers:
                    end = _last_occurrence_end(input_ids[b], m)
                    if end is not None:
                        break
            if end is not None:
                mask[b, end:] = False
                derived = True
        return mask if derived else None

    # ------------------------------------------------------------------ hooks
    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cm = None
        if current_prompt_mask(module) is None:
            input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
            mask = self.prompt_mask(input_ids, kwargs.get("attention_mask"), kwargs.get("labels"))
            if mask is not None:
                cm = prompt_mask_context(module, mask)
                cm.__enter__()
        self._stack.append(cm)
        return None

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._stack:
            cm = self._stack.pop()
            if cm is not None:
                cm.__exit__(None, None, None)
        return None


# ---------------------------------------------------------------------- state + restore


@dataclass
class _EditState:
    """What the integration added to one base model, and what it must put back.

    Flags are kept per object (not per name: injection renames ``x.weight`` to
    ``x.base_layer.weight``). Base parameters are frozen only while the editor runs and get their
    own ``requires_grad`` back afterwards: besides being what the user had, this keeps the edited
    model's out-of-scope outputs bitwise equal to the unedited model's (on CPU, a frozen weight can
    take another matmul path and differ in the last bit).
    """

    pack: Any
    hook: PromptMaskHook
    params: list[tuple[nn.Parameter, bool]]
    modules: list[tuple[nn.Module, bool]]
    attrs_absent: list[str]
    n_calls: int = 0
    restored: bool = False

    def freeze_base(self) -> None:
        for p, _ in self.params:
            p.requires_grad_(False)

    def restore_flags(self) -> None:
        for p, flag in self.params:
            p.requires_grad_(flag)
        for m, flag in self.modules:
            m.training = flag


def edit_state(model: Any) -> _EditState | None:
    """The integration's state on ``model`` (a base model or the PeftModel returned by the apply
    function), or ``None`` when it carries no EasyEdit-made LDKE pack."""
    root = base_model_of(model)
    st = root.__dict__.get(_STATE_ATTR)
    return st if isinstance(st, _EditState) and not st.restored else None


class RestoreBaseModel:
    """EasyEdit's ``weights_copy`` for LDKE: a callable that removes the edit pack.

    Calling it unloads the LDKE adapter (the base layers go back in place; their weights were
    never modified), removes the hooks, and restores ``requires_grad``, train/eval flags and the
    attributes PEFT/LDKE set on the model. Calling it twice is harmless. ``restore.model`` is the
    base model.
    """

    def __init__(self, root: nn.Module):
        self.model = root

    def __call__(self) -> nn.Module:
        root = self.model
        st = root.__dict__.get(_STATE_ATTR)
        if not isinstance(st, _EditState) or st.restored:
            return root
        st.hook.remove()
        if is_ldke_model(root):
            st.pack.unload()
        for name in st.attrs_absent:
            if name in root.__dict__:
                object.__delattr__(root, name)
        st.restore_flags()
        st.restored = True
        root.__dict__.pop(_STATE_ATTR, None)
        return root

    def __repr__(self) -> str:
        return f"RestoreBaseModel({type(self.model).__name__})"


# ---------------------------------------------------------------------- requests


def _is_tensor_image(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_is_tensor_image(v) for v in value)
    return False


def easyedit_requests(requests: Any) -> list[EditRequest]:
    """EasyEdit request dict(s) -> validated :class:`EditRequest` list.

    Accepts a list of dicts or one bare dict. Images may be PIL images, one-element lists of them
    (what EasyEdit's Qwen-VL / LLaVA-OneVision vision processors return) or paths. Preprocessed
    tensors (EasyEdit's BLIP-2 / MiniGPT-4 pipelines) are refused: LDKE builds inputs with the
    model's own processor, from the raw image, and a normalised pixel tensor cannot be mapped back
    to one reliably.
    """
    if isinstance(requests, Mapping):
        requests = [requests]
    if not isinstance(requests, (list, tuple)):
        raise InvalidRequestError(
            f"requests must be an EasyEdit request dict or a list of them, got {type(requests).__name__}",
            field="requests",
        )
    if not requests:
        raise InvalidRequestError("requests is empty: nothing to edit", field="requests")
    for i, r in enumerate(requests):
        if not isinstance(r, Mapping):
            continue  # requests_from_easyedit_dicts names the problem
        for key in _IMAGE_KEYS:
            if _is_tensor_image(r.get(key)):
                raise ImageError(
                    f"requests[{i}].{key} is a preprocessed torch.Tensor; LDKE needs the raw image (PIL image or "
                    "file path) because it builds model inputs with the model's own processor. Use an HF "
                    "multimodal model (qwen2-vl, llava-onevision) whose EasyEdit vision processors return PIL "
                    "images, or pass images as paths.",
                    field=key,
                )
    return requests_from_easyedit_dicts(list(requests))


# ---------------------------------------------------------------------- apply


def apply_ldke_to_multimodal_model(
    model: Any,
    tok: Any,
    requests: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    hparams: LDKEMultimodalHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    **kwargs: Any,
) -> tuple[Any, RestoreBaseModel]:
    """Edit ``model`` with LDKE, EasyEdit style. Returns ``(edited_model, weights_copy)``.

    Args:
        model: a transformers MLLM of a family ldke-peft supports (or the ``PeftModel`` a previous
            call returned).
        tok: its processor (EasyEdit's ``editor.tok``).
        requests: EasyEdit request dicts: a list (single/dataset mode) or one dict (sequential mode).
        hparams: :class:`LDKEMultimodalHyperParams`.
        copy: edit a deep copy of ``model`` (which must not already carry an LDKE pack).
        return_orig_weights: accepted for the contract; ``weights_copy`` is always returned.
        keep_original_weight: start from the original weights: an existing pack made by an earlier
            call is removed first. Otherwise edits accumulate in the same pack.
        kwargs: ``negatives`` (a :class:`ldke_peft.editing.scope.NegativePool`) is passed to the editor;
            anything else EasyEdit passes (``train_ds``, ...) is ignored.

    Returns:
        ``edited_model``: a ``peft.PeftModel`` whose ``__call__(**inputs)`` returns the base model's
        output (bit for bit) for inputs the router sends to no edit. ``weights_copy``: a
        :class:`RestoreBaseModel`; calling it removes every edit made through this integration.
    """
    if not isinstance(hparams, LDKEMultimodalHyperParams):
        raise TypeError(f"hparams must be LDKEMultimodalHyperParams, got {type(hparams).__name__}")
    reqs = easyedit_requests(requests)  # validate before touching the model

    if copy:
        if is_ldke_model(model):
            raise EasyEditCopyError(
                "copy=True: this model already carries an LDKE pack, whose routing hooks cannot be deep-copied; "
                "deep-copy the unedited model (or call weights_copy() first)"
            )
        model = copy_module.deepcopy(model)

    root = base_model_of(model)
    family = family_of(root)
    state = edit_state(root)
    if state is not None and keep_original_weight:
        logger.info("keep_original_weight=True: removing the %d earlier LDKE call(s) before this edit", state.n_calls)
        RestoreBaseModel(root)()
        state = None

    if state is None:
        absent = [a for a in ("peft_config", "_ldke_routing_state") if a not in root.__dict__]
        state = _EditState(
            pack=None,
            hook=PromptMaskHook(family, tok),
            params=[(p, p.requires_grad) for p in root.parameters()],
            modules=[(m, m.training) for m in root.modules()],
            attrs_absent=absent,
        )
        pack = model if is_ldke_model(model) and hasattr(model, "peft_config") else None
    else:
        pack = state.pack
        state.hook.set_processor(tok)

    # the hook steps aside while the editor runs its own (explicitly masked) passes; the base is
    # frozen so the delta fit computes no gradients for it
    state.hook.remove()
    state.freeze_base()
    negatives = kwargs.get("negatives")
    try:
        peft_model = ldke_peft.edit(
            model if pack is None else pack,
            tok,
            reqs,
            hparams.to_ldke_config(),
            pack=pack,
            adapter_name=hparams.adapter_name,
            negatives=negatives,
            progress=hparams.progress,
            cache_hidden=hparams.cache_hidden,
            seed=hparams.seed + state.n_calls,
        )
    finally:
        state.restore_flags()
        if state.pack is not None:
            state.hook.install(root)
    state.pack = peft_model
    state.n_calls += 1
    state.hook.install(root)
    object.__setattr__(root, _STATE_ATTR, state)
    return peft_model, RestoreBaseModel(root)
