"""Scoring an edited model on its requests (:func:`compute_metrics`) and the EasyEdit-style entry point
(:func:`evaluate`).

Layer: product (README "Architecture"): may import every layer; no library layer imports it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..families import Family, family_of
from ..requests import EditRequest, validate_requests

from .pre import (
    PreState,
    _build,
    _check_pre,
    _chunks,
    _eval_mode,
    _forward,
    _Item,
    _locality_batches,
    _model_device_dtype,
    _probe_topk,
    _progress,
    collect_pre,
)
from .scores import (
    LOCALITY_K,
    METRIC_KEYS,
    NEAR_MISS_KIND,
    mean_by_kind,
    normalize_answer,
    portability_kind,
    token_accuracy,
    topk_id_agreement,
)


def _has_locality(requests: Sequence[EditRequest]) -> bool:
    return any(getattr(r, f) for r in requests for f, _ in LOCALITY_K.values())


def _attach_tokenizer(model: Any, family: Family, processor: Any) -> None:
    """An LDKE pack reading question text decodes the inputs with the processor they are built with."""
    from ..tuner.model import attach_tokenizer, is_ldke_model

    if is_ldke_model(model):
        attach_tokenizer(model, family.tokenizer(processor))


def compute_metrics(
    model: torch.nn.Module,
    processor: Any,
    requests: Sequence[EditRequest],
    pre: PreState | None,
    *,
    batch_size: int = 8,
    generate: bool = True,
    locality_positions: str = "sequence",
) -> dict[str, Any]:
    """Evaluate an (edited) model on the requests; see the module docstring for the definitions.

    Args:
        pre: from :func:`collect_pre` on the unedited model (may be ``None`` only when no request has
            locality, m_locality or coupled probes).
        batch_size: rows per forward pass (locality passes reuse ``pre.batch_size`` so their batches
            and padding are identical to the pre-edit ones).
        generate: also compute ``exact_match`` by greedy generation (the slowest part).
        locality_positions: ``"sequence"`` (EasyEdit: every position of prompt + answer) or
            ``"answer"`` (only the positions predicting answer tokens).

    Returns:
        ``{key: mean or None for key in METRIC_KEYS, "per_request": [{key: value or None}, ...],
        "counts": {key: number of requests contributing}, "n": len(requests)}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if locality_positions not in ("sequence", "answer"):
        raise ValueError(f"locality_positions must be 'sequence' or 'answer', got {locality_positions!r}")
    requests = validate_requests(list(requests), open_images=False)
    if pre is None:
        if _has_locality(requests):
            raise ValueError(
                "these requests have locality probes but no pre-edit state was given: call "
                "ldke_peft.metrics.collect_pre(model, processor, requests) BEFORE editing and pass it as `pre`"
            )
    else:
        _check_pre(pre, requests)
    family = family_of(model)
    device, dtype = _model_device_dtype(model)
    scores: list[dict[str, list[float]]] = [{k: [] for k in METRIC_KEYS} for _ in requests]
    kinds: list[dict[str, list[float]]] = [{} for _ in requests]  # portability per kind of related question
    _attach_tokenizer(model, family, processor)

    with _eval_mode(model):
        # teacher-forced accuracies
        with _progress(len(requests), "edit metrics") as bar:
            for start in range(0, len(requests), batch_size):
                chunk = requests[start : start + batch_size]
                items = []
                for off, req in enumerate(chunk):
                    r = start + off
                    items.append(_Item(r, req.image, req.prompt, req.target, metric="reliability"))
                    items += [_Item(r, req.image, p, req.target, metric="t_generality") for p in req.rephrase_prompts]
                    items += [_Item(r, im, req.prompt, req.target, metric="m_generality") for im in req.rephrase_images]
                    items += [_Item(r, p.image, p.prompt, p.answer, metric="portability", kind=portability_kind(p))
                              for p in req.portability]
                for batch in _chunks(items, batch_size):
                    built = _build(family, processor, batch, device, dtype)
                    acc = token_accuracy(_forward(model, built), built.input_ids, built.target_mask).cpu()
                    for it, a in zip(batch, acc.tolist()):
                        scores[it.request][it.metric].append(a)
                        if it.metric == "portability":
                            kinds[it.request].setdefault(it.kind, []).append(a)
                if generate:
                    _exact_match(model, family, processor, chunk, start, scores, device, dtype)
                bar.update(len(chunk))

        # locality: same batches as collect_pre
        if pre is not None and _has_locality(requests):
            with _progress(len(requests), "locality") as bar:
                for done, batch in _locality_batches(requests, pre.batch_size):
                    if batch:
                        post = _probe_topk(model, family, processor, batch, device, dtype)
                        for it, rec in zip(batch, post):
                            ref = pre.probes[it.probe_field][it.request][it.probe_index]
                            if ref.ids.shape != rec.ids.shape:
                                raise ValueError(
                                    f"request {it.request} {it.probe_field}[{it.probe_index}]: the probe now "
                                    f"tokenizes to {rec.ids.shape[0]} positions, {ref.ids.shape[0]} before editing; "
                                    "was pre collected with another processor?"
                                )
                            mask = ref.answer_mask if locality_positions == "answer" else torch.ones_like(ref.answer_mask)
                            value = topk_id_agreement(ref.ids[None], rec.ids[None], mask[None])[0].item()
                            metric = next(m for m, (f, _) in LOCALITY_K.items() if f == it.probe_field)
                            probe = getattr(requests[it.request], it.probe_field)[it.probe_index]
                            if metric == "coupled_locality" and (probe.kind or "").startswith(NEAR_MISS_KIND):
                                metric = "near_miss_locality"
                            scores[it.request][metric].append(value)
                    bar.update(done)

    per_request = []
    for s, by_kind in zip(scores, kinds):
        per_request.append({k: (sum(v) / len(v) if v else None) for k, v in s.items()})
        per_request[-1]["portability_by_kind"] = {k: sum(v) / len(v) for k, v in by_kind.items()}
    result: dict[str, Any] = {}
    counts = {}
    for k in METRIC_KEYS:
        vals = [p[k] for p in per_request if p[k] is not None and not math.isnan(p[k])]
        counts[k] = len(vals)
        result[k] = sum(vals) / len(vals) if vals else None
    result["portability_by_kind"] = mean_by_kind([p["portability_by_kind"] for p in per_request])
    result["per_request"] = per_request
    result["counts"] = counts
    result["n"] = len(requests)
    return result


def _exact_match(model, family: Family, processor: Any, chunk, start: int, scores, device, dtype) -> None:
    """Greedy generation per request; 1.0 when the decoded answer starts with the target."""
    tok = family.tokenizer(processor)
    items = [_Item(start + i, r.image, r.prompt, r.target) for i, r in enumerate(chunk)]
    budgets = [
        len(family.target_ids(processor, family.format_prompt(processor, it.prompt, it.image is not None), it.target)) + 2
        for it in items
    ]
    built = _build(family, processor, items, device, dtype, targets=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        out = model.generate(**built.inputs, max_new_tokens=max(budgets), do_sample=False, num_beams=1, pad_token_id=pad)
    # greedy decoding is deterministic, so cutting a longer generation at a row's own budget equals
    # generating with that budget
    new = out[:, built.input_ids.shape[1] :].cpu()
    for it, row, n in zip(items, new, budgets):
        text = tok.decode(row[:n].tolist(), skip_special_tokens=True)
        hit = normalize_answer(text).startswith(normalize_answer(it.target))
        scores[it.request]["exact_match"].append(1.0 if hit else 0.0)


def _is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return False
    return isinstance(model, PeftModel)


def evaluate(
    model: torch.nn.Module,
    processor: Any,
    requests: Sequence[EditRequest],
    pre: PreState | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`compute_metrics`, collecting the pre-edit state first when it is not given.

    Without ``pre``, a ``peft.PeftModel`` (an LDKE edit pack, or any adapter) is evaluated pre-edit
    inside ``model.disable_adapter()``: the base weights are the unedited model. Any other model
    cannot be "un-edited", so a :class:`ValueError` asks for :func:`collect_pre` before editing
    (unless no request has locality probes, where no pre-edit state is needed).
    """
    requests = validate_requests(list(requests), open_images=False)
    if pre is None and _has_locality(requests):
        if not _is_peft_model(model):
            raise ValueError(
                f"evaluate() needs the pre-edit state for locality metrics, and a {type(model).__name__} "
                "is not a peft.PeftModel whose adapter can be disabled: call "
                "pre = ldke_peft.metrics.collect_pre(model, processor, requests) BEFORE editing, then "
                "evaluate(model, processor, requests, pre=pre)"
            )
        with model.disable_adapter():
            pre = collect_pre(model, processor, requests, batch_size=kwargs.get("batch_size", 8))
    return compute_metrics(model, processor, requests, pre, **kwargs)
