"""Checks an edit runs before anything changes: the pack, the config, the processor and the lengths.

Each raises a specific error naming the problem; none touches the model.

Layer: editing (README "Architecture"): imports data, tuner and editing modules, never the product code.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..tuner.config import LDKEConfig
from ..errors import InvalidRequestError, UnsupportedModelError
from ..families import Family, base_model_of
from ..tuner.model import _root_model
from ..requests import EditRequest


def _fit_target(tok: Any, target: str) -> str:
    """The text the delta is fitted to: the target and then the end of the answer (see :func:`fit_delta`)."""
    eos = getattr(tok, "eos_token", None)
    return target.strip() + (eos if isinstance(eos, str) and eos else "")


def _check_pack(model: Any, pack: Any, adapter_name: str) -> None:
    """``pack`` must carry the LDKE adapter and wrap ``model`` (or be it)."""
    cfg = getattr(pack, "peft_config", {}).get(adapter_name)
    if not isinstance(cfg, LDKEConfig):
        raise InvalidRequestError(
            f"pack has no LDKE adapter named {adapter_name!r} (adapters: {sorted(getattr(pack, 'peft_config', {}))})",
            field="pack",
        )
    if model is not pack and base_model_of(model) is not base_model_of(pack):
        raise InvalidRequestError(
            "model and pack are different models: pass the pack itself (or the model it wraps) as model",
            field="pack",
        )


def _check_host(model: Any) -> None:
    """A ``PeftModel`` given as ``model`` (with no ``pack``) gets the new pack as one more adapter beside its
    LDKE packs; a PeftModel of another PEFT method is refused (an LDKE pack wrapped around another tuner's
    layers would edit and route a model that no longer exists once that adapter is unloaded)."""
    from peft import PeftModel

    from ..tuner.model import LDKEModel

    if isinstance(model, PeftModel) and not isinstance(model.base_model, LDKEModel):
        kinds = sorted({str(getattr(c, "peft_type", "?")).rsplit(".", 1)[-1] for c in model.peft_config.values()})
        raise UnsupportedModelError(
            f"model is a PeftModel with {'/'.join(kinds)} adapter(s): LDKE packs go on the base model or beside "
            "other LDKE packs. Call merge_and_unload() (or unload()) first, then edit the model it returns."
        )


def _check_config(cfg: LDKEConfig | None) -> None:
    """Numbers that no fit survives, refused before the model is touched."""
    if cfg is None:
        return
    for name in ("edit_lr", "router_lr"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InvalidRequestError(f"config.{name} must be a finite positive number, got {value!r}", field=name)
    for name in ("edit_steps", "router_steps", "router_dim", "num_edit_layers"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < (1 if name in ("router_dim", "num_edit_layers") else 0):
            raise InvalidRequestError(f"config.{name} must be a non-negative integer (>= 1 for router_dim and "
                                      f"num_edit_layers), got {value!r}", field=name)
    for knob in ("auto_views", "router_views", "router_paraphrases"):
        v = getattr(cfg, knob)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InvalidRequestError(f"config.{knob} must be an integer >= 0, got {v!r}", field=knob)
    if not math.isfinite(float(cfg.max_delta_norm)) or cfg.max_delta_norm < 0:
        raise InvalidRequestError(f"config.max_delta_norm must be >= 0, got {cfg.max_delta_norm!r}", field="max_delta_norm")


def _check_processor(family: Family, model: Any, processor: Any, requests: Sequence[EditRequest]) -> None:
    """The processor must belong to the model: a processor of another family (a Qwen2-VL processor with a
    LLaVA model, ...) produces image tokens the model does not know or token ids beyond its vocabulary,
    which would only fail deep inside the first forward pass."""
    root = _root_model(model)
    i, sample = next(((i, r) for i, r in enumerate(requests) if r.image is not None), (0, requests[0]))
    name = type(processor).__name__
    try:
        built = family.build_inputs(processor, [sample.image], [sample.prompt])
    except InvalidRequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means "this processor cannot feed this model"
        raise InvalidRequestError(
            f"the processor ({name}) cannot prepare requests[{i}] for a {family.name} model "
            f"({type(exc).__name__}: {exc}); is it the processor of this model?",
            field="processor",
        ) from exc
    ids = built.input_ids
    emb = root.get_input_embeddings()
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise InvalidRequestError(
            f"the processor ({name}) produced token id {int(ids.max())}, but the model's vocabulary has {vocab} "
            "entries: processor and model do not belong together",
            field="processor",
        )
    token = family.image_token_id(root)
    if sample.image is not None and token is not None and not bool(family.image_mask(root, ids).any()):
        raise InvalidRequestError(
            f"the processor ({name}) turned requests[{i}]'s image into no image token of this {family.name} model "
            f"(token id {token}): processor and model do not belong together (a processor of another model family?)",
            field="processor",
        )


def _check_lengths(family: Family, model: Any, processor: Any, requests: Sequence[EditRequest]) -> None:
    """Every target must tokenize to some text, and every input the edit will run must fit the context.

    The inputs checked are those :func:`fit_delta` and :func:`fit_router` build: each prompt and rephrasing
    with the target (and end-of-answer token) on the edit image, the longest of them on each other view,
    and the probes used as hard negatives (their question on the edit image, their image with the edit
    question). Learned position embeddings (OPT/BLIP-2) would otherwise fail mid-edit; rotary ones would
    silently run out of the range the model was trained on.
    """
    root = _root_model(model)
    max_pos = family.max_positions(root)
    tok = family.tokenizer(processor)
    for i, r in enumerate(requests):
        built = family.build_inputs(processor, [r.image], [r.prompt], [r.target])
        ids = built.input_ids[built.target_mask].tolist()
        if not tok.decode(ids, skip_special_tokens=True).strip():
            raise InvalidRequestError(
                f"requests[{i}]: target {r.target!r} tokenizes to no text (token ids {ids}: whitespace, special or "
                "unknown tokens only)",
                field="target",
            )
        if not max_pos:
            continue
        target = _fit_target(tok, r.target)
        prompts = [r.prompt] + list(r.rephrase_prompts)
        longest = max(prompts, key=len)
        rows: list[tuple[Any, str, str | None, str]] = [
            (r.image, p, target, "prompt" if k == 0 else f"rephrase_prompts[{k - 1}]") for k, p in enumerate(prompts)
        ]
        rows += [(im, longest, target, f"rephrase_images[{k}]") for k, im in enumerate(r.rephrase_images)]
        for name in ("locality", "m_locality", "coupled"):
            for k, probe in enumerate(getattr(r, name)):
                rows.append((r.image, probe.prompt, None, f"{name}[{k}].prompt"))
                if r.image is not None and probe.image is not None:
                    rows.append((probe.image, longest, None, f"{name}[{k}].image"))
        for image, prompt, tgt, where in rows:
            b = family.build_inputs(processor, [image], [prompt], None if tgt is None else [tgt])
            n = int(b.input_ids.shape[1])
            if n > max_pos:
                what = "prompt + target" if where == "prompt" else where + (" + target" if tgt is not None else "")
                raise InvalidRequestError(
                    f"requests[{i}]: {what} is {n} tokens, longer than the model's context ({max_pos})",
                    field=where.split("[")[0].split(".")[0],
                )
