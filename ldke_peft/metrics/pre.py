"""The pre-edit state (:class:`PreState`): what the unedited model answers on every locality probe,
collected *before* editing (:func:`collect_pre`), and the batching helpers the metrics share.

Layer: product (README "Architecture"): may import every layer; no library layer imports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..tuner.context import prompt_mask_context
from ..families import BuiltInputs, Family, family_of
from ..requests import EditRequest, Probe, image_fingerprint, validate_requests

from .scores import LOCALITY_K, _topk_ids, answer_logit_mask

_PROGRESS_MIN = 10  # show progress bars from this many requests on

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
    kind: str = ""


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
    with torch.no_grad(), prompt_mask_context(model, built.prompt_mask):
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
    under ``torch.no_grad()`` and :func:`~ldke_peft.tuner.context.prompt_mask_context`.
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
