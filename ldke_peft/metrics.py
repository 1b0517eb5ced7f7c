"""Knowledge-editing metrics, defined as EasyEdit's multimodal evaluation defines them.

Per request (an :class:`~ldke_peft.requests.EditRequest`), all on the model's own chat format:

* **reliability**: teacher-forced accuracy of the target tokens given (image, prompt).
* **t_generality**: the same for each rephrased prompt with the edit image (mean over rephrases).
* **m_generality**: the same for the edit prompt with each rephrase image (mean over images).
* **portability**: teacher-forced accuracy of each portability probe's expected (new) answer.
* **t_locality**: top-1 agreement, pre-edit vs post-edit model, on each text-only locality probe
  (prompt + answer teacher-forced).
* **m_locality**: top-10 agreement on each multimodal locality probe.
* **coupled_locality**: top-1 agreement on each coupled probe (same image / other question,
  look-alike image / same question): the entanglement test EasyEdit does not have.
* **near_miss_locality**: the same, on coupled probes whose ``kind`` starts with ``"near_miss"``: a
  question on the same image that shares topic or words with the edited one but asks another fact
  (the hardest coupled input, so it gets its own column instead of being averaged away).
* **exact_match**: greedy generation (``max_new_tokens`` = target tokens + 2) whose decoded text,
  stripped and casefolded, starts with the target, stripped and casefolded.

"Teacher-forced accuracy" (EasyEdit's ``compute_multimodal_hf_edit_quality``): the logits at position
``t - 1`` predict token ``t``; the score is the fraction of target tokens whose argmax is the token.

"Top-k agreement" is what upstream's ``topk_token_match`` (``easyeditor/util/vl_utils.py``, used by
``attach_topk_locality_metrics`` in ``editors/multimodal_editor.py``) computes: take ``topk(k).indices``
of the pre-edit and post-edit logits at every position of the probe sequence (chat-formatted prompt,
image tokens and the teacher-forced answer, i.e. the *whole* sequence, unshifted), and count the
fraction of (position, rank) pairs where the two token ids are equal — a rank-by-rank match, not a
set overlap. That is ``locality_positions="sequence"`` (the default, for numbers comparable with
EasyEdit). ``locality_positions="answer"`` compares only the positions whose logits predict the answer
tokens, a stricter score that prompt/image positions cannot dilute.

A request with no probes of a kind contributes nothing to that key; the reported value is the mean
over the requests that have them, or ``None`` when none has.

Pre-edit state is collected *before* editing with :func:`collect_pre` (EasyEdit's single-edit mode
gets this wrong for in-place methods: it computes "pre" after the edit). For a ``peft.PeftModel``,
:func:`evaluate` computes it inside ``model.disable_adapter()``, which for LDKE is the true pre-edit
model because edits never touch the base weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .context import prompt_mask_context
from .families import BuiltInputs, Family, family_of
from .requests import EditRequest, Probe, image_fingerprint, validate_requests

logger = logging.getLogger(__name__)

__all__ = [
    "METRIC_KEYS",
    "NEAR_MISS_KIND",
    "LOCALITY_K",
    "PreState",
    "ProbeTopK",
    "answer_logit_mask",
    "collect_pre",
    "compute_metrics",
    "evaluate",
    "normalize_answer",
    "token_accuracy",
    "topk_agreement",
    "topk_id_agreement",
]

#: Result keys, in report order.
METRIC_KEYS = (
    "reliability",
    "t_generality",
    "m_generality",
    "t_locality",
    "m_locality",
    "coupled_locality",
    "near_miss_locality",
    "portability",
    "exact_match",
)

#: Coupled probes of this ``kind`` prefix are scored as ``near_miss_locality``.
NEAR_MISS_KIND = "near_miss"

#: Locality metric -> (EditRequest probe field, k of the top-k agreement). k follows EasyEdit.
LOCALITY_K: dict[str, tuple[str, int]] = {
    "t_locality": ("locality", 1),
    "m_locality": ("m_locality", 10),
    "coupled_locality": ("coupled", 1),
}

_PROGRESS_MIN = 10  # show progress bars from this many requests on


# ---------------------------------------------------------------------- pure tensor functions


def token_accuracy(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forced target-token accuracy per row.

    Args:
        logits: ``(B, T, V)`` next-token logits of ``input_ids``.
        input_ids: ``(B, T)``.
        target_mask: ``(B, T)`` bool, True at the target tokens. Position 0 can never be predicted
            and is ignored.

    Returns:
        ``(B,)`` float: per row, the fraction of target tokens ``t`` with
        ``logits[t - 1].argmax() == input_ids[t]``; NaN for a row without target tokens.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or target_mask.shape != input_ids.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
            f"target_mask {tuple(target_mask.shape)}"
        )
    pred = logits[:, :-1].argmax(-1)
    tgt = input_ids[:, 1:]
    mask = target_mask[:, 1:].bool()
    correct = ((pred == tgt) & mask).sum(-1).float()
    return correct / mask.sum(-1).float()


def answer_logit_mask(target_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: the positions whose logits predict a target token (``target_mask`` shifted left)."""
    out = torch.zeros_like(target_mask, dtype=torch.bool)
    out[:, :-1] = target_mask[:, 1:].bool()
    return out


def _topk_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(int(k), logits.shape[-1])
    return torch.topk(logits.float(), k=k, dim=-1).indices


def topk_id_agreement(pre_ids: torch.Tensor, post_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rank-by-rank agreement of top-k token ids, per row.

    Args:
        pre_ids, post_ids: ``(B, T, k)`` top-k token ids (ranked) before and after editing.
        mask: ``(B, T)`` bool, the positions compared.

    Returns:
        ``(B,)``: per row, the fraction of (masked position, rank) pairs with equal ids; NaN for a row
        with an empty mask.
    """
    if pre_ids.shape != post_ids.shape or pre_ids.shape[:2] != mask.shape:
        raise ValueError(
            f"shape mismatch: pre {tuple(pre_ids.shape)}, post {tuple(post_ids.shape)}, mask {tuple(mask.shape)}"
        )
    k = pre_ids.shape[-1]
    eq = (pre_ids == post_ids).float().sum(-1)  # (B, T): matching ranks per position
    mask = mask.bool()
    return (eq * mask).sum(-1) / (mask.sum(-1).float() * k)


def topk_agreement(
    pre_logits: torch.Tensor, post_logits: torch.Tensor, mask: torch.Tensor, k: int
) -> torch.Tensor:
    """EasyEdit's locality score per row: ``topk(k)`` ids of pre vs post logits, compared rank by rank.

    Upstream (``topk_token_match``) compares every position of the sequence; pass
    ``mask = prompt_mask | target_mask`` for that, or :func:`answer_logit_mask` for the answer-only
    variant. ``k`` is clipped to the vocabulary size.

    Args:
        pre_logits, post_logits: ``(B, T, V)``.
        mask: ``(B, T)`` bool, the logit positions compared.
        k: 1 for T-Locality and Coupled-Locality, 10 for M-Locality.

    Returns:
        ``(B,)`` fraction of (position, rank) pairs where ``topk`` ids agree (NaN for an empty row).
    """
    if pre_logits.shape != post_logits.shape:
        raise ValueError(f"pre/post logits differ in shape: {tuple(pre_logits.shape)} vs {tuple(post_logits.shape)}")
    return topk_id_agreement(_topk_ids(pre_logits, k), _topk_ids(post_logits, k), mask)


def normalize_answer(text: str) -> str:
    """Normalisation used by exact match: strip, casefold, collapse whitespace."""
    return " ".join(text.strip().casefold().split())


# ---------------------------------------------------------------------- pre-edit state


@dataclass
class ProbeTopK:
    """What a locality metric needs from one probe before editing.

    Attributes:
        key: identifies the probe (field, prompt, answer, image); checked against the requests later.
        ids: ``(L, k)`` int32, the ranked top-k token ids at each of the probe's L real (non-padding)
            positions, prompt and teacher-forced answer.
        answer_mask: ``(L,)`` bool, the positions whose logits predict answer tokens.
    """

    key: str
    ids: torch.Tensor
    answer_mask: torch.Tensor


@dataclass
class PreState:
    """Pre-edit top-k ids for every locality / m_locality / coupled probe of a list of requests.

    Made by :func:`collect_pre` *before* the model is edited, consumed by :func:`compute_metrics`.
    ``batch_size`` is kept so the post-edit passes batch (and pad) the probes exactly as the pre-edit
    passes did: an unedited model then scores exactly 1.0.
    """

    batch_size: int
    n_requests: int
    probes: dict[str, list[list[ProbeTopK]]] = field(default_factory=dict)


# ---------------------------------------------------------------------- helpers


@dataclass
class _Item:
    request: int
    image: Any
    prompt: str
    target: str
    metric: str = ""
    probe_field: str = ""
    probe_index: int = -1


def _chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype | None]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), None


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Metrics are deterministic only without dropout; restore the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _image_key(image: Any) -> str:
    if image is None:
        return ""
    if isinstance(image, (str, os.PathLike)):
        return "path:" + os.path.abspath(os.fspath(image))
    return "pil:" + image_fingerprint(image)


def _probe_key(field_name: str, probe: Probe) -> str:
    h = hashlib.sha256()
    for part in (field_name, probe.prompt, probe.answer, _image_key(probe.image)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _locality_items(requests: Sequence[EditRequest]) -> list[_Item]:
    items = []
    for _, (field_name, _k) in LOCALITY_K.items():
        for r, req in enumerate(requests):
            for j, p in enumerate(getattr(req, field_name)):
                items.append(_Item(r, p.image, p.prompt, p.answer, probe_field=field_name, probe_index=j))
    return items


def _locality_batches(requests: Sequence[EditRequest], batch_size: int) -> Iterator[tuple[int, list[_Item]]]:
    """Yield ``(n_requests_done, batch)``; the same batches for the same requests and batch size."""
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        items = _locality_items(chunk)
        for it in items:
            it.request += start
        batches = list(_chunks(items, batch_size))
        for b, batch in enumerate(batches):
            yield (len(chunk) if b == len(batches) - 1 else 0), list(batch)
        if not batches:
            yield len(chunk), []


def _build(family: Family, processor: Any, items: Sequence[_Item], device, dtype, targets: bool = True) -> BuiltInputs:
    built = family.build_inputs(
        processor,
        [it.image for it in items],
        [it.prompt for it in items],
        [it.target for it in items] if targets else None,
    )
    return built.to(device, dtype)


def _forward(model: torch.nn.Module, built: BuiltInputs) -> torch.Tensor:
    """Logits of a teacher-forced batch; the router pools over the prompt only."""
    with torch.no_grad(), prompt_mask_context(built.prompt_mask):
        return model(**built.inputs).logits


def _probe_topk(model, family, processor, items, device, dtype) -> list[ProbeTopK]:
    """Top-k ids per real position for a batch of locality items (k per the item's probe field)."""
    built = _build(family, processor, items, device, dtype)
    logits = _forward(model, built)
    real = built.prompt_mask | built.target_mask
    ans = answer_logit_mask(built.target_mask)
    kmax = max(k for _, k in LOCALITY_K.values())
    ids_all = _topk_ids(logits, kmax)
    k_of = {f: k for f, k in LOCALITY_K.values()}
    out = []
    for b, it in enumerate(items):
        k = min(k_of[it.probe_field], ids_all.shape[-1])
        row = real[b]
        out.append(
            ProbeTopK(
                key="",
                ids=ids_all[b][row][:, :k].to("cpu", torch.int32),
                answer_mask=ans[b][row].cpu(),
            )
        )
    return out


def _progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, disable=total < _PROGRESS_MIN, leave=False)


# ---------------------------------------------------------------------- public API


def collect_pre(model: torch.nn.Module, processor: Any, requests: Sequence[EditRequest], batch_size: int = 8) -> PreState:
    """Record, for every locality / m_locality / coupled probe, the top-k ids the metrics compare.

    Call this on the model *before* editing it (or let :func:`evaluate` do it through a PeftModel's
    ``disable_adapter()``). Inputs come from ``family_of(model).build_inputs``; every forward runs
    under ``torch.no_grad()`` and :func:`~ldke_peft.context.prompt_mask_context`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    requests = validate_requests(list(requests), open_images=False)
    family = family_of(model)
    device, dtype = _model_device_dtype(model)
    pre = PreState(
        batch_size=batch_size,
        n_requests=len(requests),
        probes={f: [[] for _ in requests] for f, _ in LOCALITY_K.values()},
    )
    with _eval_mode(model), _progress(len(requests), "pre-edit locality") as bar:
        for done, batch in _locality_batches(requests, batch_size):
            if batch:
                for it, rec in zip(batch, _probe_topk(model, family, processor, batch, device, dtype)):
                    probe = getattr(requests[it.request], it.probe_field)[it.probe_index]
                    rec.key = _probe_key(it.probe_field, probe)
                    pre.probes[it.probe_field][it.request].append(rec)
            bar.update(done)
    return pre


def _check_pre(pre: PreState, requests: Sequence[EditRequest]) -> None:
    if not isinstance(pre, PreState):
        raise ValueError(f"pre must be a PreState from collect_pre(), got {type(pre).__name__}")
    if pre.n_requests != len(requests):
        raise ValueError(
            f"pre-edit state was collected for {pre.n_requests} requests but {len(requests)} were given; "
            "call collect_pre() on the same requests before editing"
        )
    for field_name, per_request in pre.probes.items():
        for r, req in enumerate(requests):
            probes = getattr(req, field_name)
            stored = per_request[r]
            if len(stored) != len(probes) or any(
                s.key != _probe_key(field_name, p) for s, p in zip(stored, probes)
            ):
                raise ValueError(
                    f"pre-edit state does not match request {r}'s {field_name} probes; "
                    "call collect_pre() on the same requests before editing"
                )


def _has_locality(requests: Sequence[EditRequest]) -> bool:
    return any(getattr(r, f) for r in requests for f, _ in LOCALITY_K.values())


def _attach_tokenizer(model: Any, family: Family, processor: Any) -> None:
    """An LDKE pack reading question text decodes the inputs with the processor they are built with."""
    from .model import attach_tokenizer, is_ldke_model

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
                    items += [_Item(r, p.image, p.prompt, p.answer, metric="portability") for p in req.portability]
                for batch in _chunks(items, batch_size):
                    built = _build(family, processor, batch, device, dtype)
                    acc = token_accuracy(_forward(model, built), built.input_ids, built.target_mask).cpu()
                    for it, a in zip(batch, acc.tolist()):
                        scores[it.request][it.metric].append(a)
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
    for s in scores:
        per_request.append({k: (sum(v) / len(v) if v else None) for k, v in s.items()})
    result: dict[str, Any] = {}
    counts = {}
    for k in METRIC_KEYS:
        vals = [p[k] for p in per_request if p[k] is not None and not math.isnan(p[k])]
        counts[k] = len(vals)
        result[k] = sum(vals) / len(vals) if vals else None
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
