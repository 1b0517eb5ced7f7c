"""The metrics' definitions on tensors: teacher-forced accuracy, top-k agreement, answer normalisation,
and the result keys. Pure functions; no model, no request.

Layer: product (README "Architecture"): may import every layer; no library layer imports it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

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

#: Portability probes are also scored per kind: the part of ``Probe.kind`` before ``":"`` (``"two_hop:<relation>"``
#: -> ``two_hop``); a probe without a kind counts as ``portability``.
def portability_kind(probe: Any) -> str:
    return (getattr(probe, "kind", "") or "portability").split(":")[0]


def mean_by_kind(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per kind, the mean over the rows that have it (a request without probes of a kind says nothing of it)."""
    acc: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            acc.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


#: Locality metric -> (EditRequest probe field, k of the top-k agreement). k follows EasyEdit.
LOCALITY_K: dict[str, tuple[str, int]] = {
    "t_locality": ("locality", 1),
    "m_locality": ("m_locality", 10),
    "coupled_locality": ("coupled", 1),
}


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
