"""PNG figures of a benchmark run (matplotlib, imported lazily with the headless ``Agg`` backend).

* :func:`metrics_bars`: every metric per method, grouped bars;
* :func:`sequential_curve`: reliability and locality against the number of sequential edits;
* :func:`localization_heatmap`: layer × position scores of one edit, Fast Localization next to exact
  per-(layer, position) causal tracing.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["localization_heatmap", "metrics_bars", "sequential_curve"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("benchmark plots need matplotlib: pip install 'ldke-peft[plots]'") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", format="png")
    _pyplot().close(fig)
    return path


def metrics_bars(results: dict[str, Any], path: str | os.PathLike) -> str:
    """Grouped bars: one group per metric, one bar per method (missing values are left out)."""
    from ..metrics import METRIC_KEYS

    plt = _pyplot()
    methods = list(results.get("methods", {}))
    keys = [k for k in METRIC_KEYS if any(results["methods"][m].get(k) is not None for m in methods)]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(keys) + 2), 4.2))
    width = 0.8 / max(1, len(methods))
    cmap = plt.get_cmap("tab10")
    for j, m in enumerate(methods):
        xs, ys = [], []
        for i, k in enumerate(keys):
            v = results["methods"][m].get(k)
            if v is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(v)
        ax.bar(xs, ys, width=width, label=m, color=cmap(j % 10), edgecolor="black" if m == "ldke" else None,
               linewidth=1.2 if m == "ldke" else 0)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([k.replace("_", "\n") for k in keys], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(f"{results.get('suite')} suite, {results.get('n_edits')} single edits")
    ax.legend(fontsize=7, ncol=4, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def sequential_curve(results: dict[str, Any], path: str | os.PathLike,
                     keys: tuple[str, ...] = ("reliability", "t_generality", "m_locality", "coupled_locality")) -> str:
    """One panel per metric: score against the number of edits applied so far, one line per method."""
    plt = _pyplot()
    seq = results.get("sequential") or {}
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), sharey=True)
    axes = list(axes) if len(keys) > 1 else [axes]
    for ax, k in zip(axes, keys):
        for name, by_n in seq.items():
            pts = sorted((int(n), m.get(k)) for n, m in by_n.items() if m.get(k) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("edits applied")
        ax.set_title(k, fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def localization_heatmap(heat: dict[str, Any], path: str | os.PathLike) -> str:
    """Two heat maps, layers × input positions: Fast Localization's attribution scores and exact
    per-(layer, position) tracing's recovered log-probability, each scaled to its own maximum."""
    import numpy as np

    plt = _pyplot()
    panels = [(name, np.asarray(heat[name], dtype=float)) for name in ("fast", "exact") if heat.get(name) is not None]
    if not panels:
        raise ValueError("heat map data has neither 'fast' nor 'exact' scores")
    T = panels[0][1].shape[1]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.22 * T + 2), 3.2 * len(panels) + 0.8), squeeze=False,
                             constrained_layout=True)
    tokens = [t.replace("\n", "\\n") for t in heat.get("tokens", [])][:T]
    for ax, (name, arr) in zip(axes[:, 0], panels):
        scale = np.nanmax(np.abs(arr)) or 1.0
        im = ax.imshow(arr / scale, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_ylabel("layer")
        ax.set_title(f"{'Fast Localization (attribution)' if name == 'fast' else 'exact causal tracing'}", fontsize=9)
        if tokens:
            ax.set_xticks(range(len(tokens)))
            ax.set_xticklabels(tokens, rotation=90, fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.02)
    if heat.get("prompt"):
        fig.suptitle(heat["prompt"], fontsize=9)
    return _save(fig, path)
