"""Figures for localization results (optional: needs the ``plots`` extra, i.e. matplotlib).

matplotlib is imported lazily, with the non-interactive ``Agg`` backend, so importing ldke-peft never
needs it and plots render on headless machines.

Layer: product (README "Architecture"): may import every layer; no library layer imports it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

__all__ = ["layer_scores_chart", "position_heatmap"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib, which is not installed; install it with: pip install 'ldke-peft[plots]'"
        ) from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _scores(result: Any) -> list[float]:
    scores = getattr(result, "scores", result)
    return [float(s) for s in scores]


def layer_scores_chart(
    result: Any,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    chosen: Sequence[int] | None = None,
    candidates: Sequence[int] | None = None,
) -> str:
    """Bar chart of per-decoder-layer causal scores, saved as a PNG; returns the path.

    ``result`` is a :class:`~ldke_peft.editing.localization.LocalizationResult` (its ``layers`` and
    ``candidates`` are used unless given) or a plain sequence of scores. Chosen layers are drawn in
    a strong colour, other candidates in a light one, and excluded layers (layer 0, the router's
    probe layer and below) in grey.
    """
    plt = _pyplot()
    scores = _scores(result)
    chosen = set(chosen if chosen is not None else getattr(result, "layers", []) or [])
    cands = set(candidates if candidates is not None else getattr(result, "candidates", range(len(scores))))
    colors = ["#d62728" if i in chosen else "#1f77b4" if i in cands else "#b0b0b0" for i in range(len(scores))]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(scores) + 2), 3.2))
    try:
        ax.bar(range(len(scores)), scores, color=colors)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("causal score")
        ax.set_xticks(range(len(scores)))
        ax.set_title(title or "Fast Localization: per-layer scores (red = edited)", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=120)
    finally:
        plt.close(fig)
    return os.fspath(path)


def position_heatmap(result: Any, path: str | os.PathLike, *, title: str | None = None, max_tokens: int = 80) -> str:
    """Layer x position heat map of a localization result's ``position_scores``; returns the path."""
    plt = _pyplot()
    pos = getattr(result, "position_scores", None)
    if pos is None:
        raise ValueError("this localization result has no position_scores (run locate(), or trace(positions=True))")
    data = pos.detach().float().cpu().numpy()[:, -max_tokens:]
    tokens = list(getattr(result, "tokens", []) or [])[-max_tokens:]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.18 * data.shape[1] + 2), 0.35 * data.shape[0] + 1.8))
    try:
        lim = float(abs(data).max()) or 1.0
        im = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_ylabel("decoder layer")
        if tokens and len(tokens) == data.shape[1]:
            ax.set_xticks(range(len(tokens)))
            ax.set_xticklabels([t.strip() or repr(t) for t in tokens], rotation=90, fontsize=6)
        ax.set_title(title or "Fast Localization: layer x position scores", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.03)
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=120)
    finally:
        plt.close(fig)
    return os.fspath(path)
