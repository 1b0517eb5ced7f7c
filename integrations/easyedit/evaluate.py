"""EasyEdit's HF multimodal metrics, re-implemented (no EasyEdit needed).

``MultimodalEditor`` scores an edited model with teacher-forced *prompt + target* sequences built
from the processor's chat template (``apply_chat_template(..., add_generation_prompt=True)`` + the
target text, no separator), ``labels`` holding the target tokens (tokenized alone) at the end of the
sequence, and a plain ``model(**inputs)`` call -- no labels passed, no prompt mask. This module
builds the same inputs and computes the same numbers, so the integration can be checked (and
EasyEdit-comparable numbers produced) where EasyEdit is not installed:

* ``rewrite_acc`` / ``rephrase_acc`` / ``image_rephrase_acc``: fraction of target tokens whose
  logit argmax at the previous position equals the label;
* ``locality_acc`` (text) / ``multimodal_locality_acc``: top-1 / top-10 token-id agreement, rank by
  rank, between pre- and post-edit logits over the whole sequence.

Calling the model exactly as EasyEdit does is the point: it exercises the router's prompt-mask
derivation of :class:`~integrations.easyedit.apply.PromptMaskHook`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ldke_peft.metrics import token_accuracy, topk_agreement

__all__ = ["easyedit_inputs", "easyedit_logits", "easyedit_metrics", "easyedit_locality"]


def _first_image(image: Any) -> Any:
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            raise ValueError(f"expected one image, got {len(image)}")
        return image[0]
    return image


def easyedit_inputs(processor: Any, prompt: str, target: str, image: Any = None, device: Any = "cpu") -> tuple[dict, torch.Tensor]:
    """``(model inputs, labels)`` for one teacher-forced sample, built as EasyEdit builds them."""
    content: list[dict[str, Any]] = []
    if image is not None:
        content.append({"type": "image"})
    content.append({"type": "text", "text": prompt})
    chat = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    kwargs: dict[str, Any] = {"text": [chat + target], "return_tensors": "pt", "padding": True}
    if image is not None:
        from ldke_peft.requests import load_image

        kwargs["images"] = [load_image(_first_image(image))]
    inputs = dict(processor(**kwargs))
    input_ids = inputs["input_ids"]
    tok = getattr(processor, "tokenizer", processor)
    target_ids = torch.tensor(tok(target, add_special_tokens=False)["input_ids"], dtype=input_ids.dtype)
    target_ids = target_ids[-input_ids.shape[1] :]
    labels = torch.full_like(input_ids, -100)
    labels[:, input_ids.shape[1] - len(target_ids) :] = target_ids
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return inputs, labels.to(device)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def easyedit_logits(model: torch.nn.Module, processor: Any, prompt: str, target: str, image: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of one sample, the model called as EasyEdit calls it (``model(**inputs)``)."""
    inputs, labels = easyedit_inputs(processor, prompt, target, image, _device(model))
    out = model(**inputs)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return logits.detach().float().cpu(), labels.cpu()


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    mask = labels != -100
    ids = torch.where(mask, labels, torch.zeros_like(labels))
    return float(token_accuracy(logits, ids, mask).mean())


def easyedit_metrics(model: torch.nn.Module, processor: Any, request: Mapping[str, Any]) -> dict[str, Any]:
    """EasyEdit's ``compute_multimodal_hf_edit_results`` for one request dict.

    Returns the accuracies (floats) and, for locality probes, the raw logits under
    ``locality_output`` / ``multimodal_locality_output``; combine a pre and a post result with
    :func:`easyedit_locality`.
    """
    was_training = model.training
    model.eval()
    try:
        target, prompt, image = request["target"], request["prompt"], request["image"]
        ret: dict[str, Any] = {"rewrite_acc": _accuracy(*easyedit_logits(model, processor, prompt, target, image))}
        if request.get("rephrase_prompt") is not None:
            ret["rephrase_acc"] = _accuracy(*easyedit_logits(model, processor, request["rephrase_prompt"], target, image))
        if request.get("image_rephrase") is not None:
            ret["image_rephrase_acc"] = _accuracy(*easyedit_logits(model, processor, prompt, target, request["image_rephrase"]))
        if request.get("locality_prompt") is not None:
            ret["locality_output"], _ = easyedit_logits(
                model, processor, request["locality_prompt"], request["locality_ground_truth"], None
            )
        if request.get("multimodal_locality_prompt") is not None:
            ret["multimodal_locality_output"], _ = easyedit_logits(
                model, processor, request["multimodal_locality_prompt"], request["multimodal_locality_ground_truth"],
                request["multimodal_locality_image"],
            )
    finally:
        model.train(was_training)
    return ret


def easyedit_locality(pre: Mapping[str, Any], post: Mapping[str, Any]) -> dict[str, float]:
    """``locality_acc`` (top-1) and ``multimodal_locality_acc`` (top-10), pre vs post, every position."""
    out = {}
    for key, name, k in (("locality_output", "locality_acc", 1), ("multimodal_locality_output", "multimodal_locality_acc", 10)):
        if key in pre and key in post:
            a, b = pre[key], post[key]
            n = min(a.shape[1], b.shape[1])  # EasyEdit aligns on the last n positions
            a, b = a[:, -n:], b[:, -n:]
            mask = torch.ones(a.shape[:2], dtype=torch.bool)
            out[name] = float(topk_agreement(a, b, mask, k).mean())
    return out
