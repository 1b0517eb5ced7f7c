"""Studies of the benchmark beside the quality table: Fast Localization against exact causal tracing
(agreement and cost) and the cached-span delta fit against a full forward/backward (cost).

Owns the measurements; :mod:`ldke_peft.bench.run` (the one runner, every suite) calls them and reports.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Sequence

from ..tuner.config import LDKEConfig
from ..editing.delta_fit import fit_delta
from ..families import family_of
from ..editing.localization import locate, trace
from ..tuner.model import default_probe_layer


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    if n < 2:
        return float("nan")
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else float("nan")


def run_localization(model: Any, processor: Any, requests: Sequence[Any], n_positions: int = 3) -> dict[str, Any]:
    """Fast (attribution) vs exact per-layer tracing on every request; per-(layer, position) tracing,
    the ROME-style reference cost, on the first ``n_positions`` requests."""
    L = family_of(model).num_layers(model)
    probe = default_probe_layer(L)
    agree, rhos, fast_t, exact_t, fast_p, exact_p = [], [], [], [], [], []
    pos_t, pos_p = [], []
    heat = None
    for i, r in enumerate(requests):
        f = locate(model, processor, r, probe_layer=probe)
        e = trace(model, processor, r, probe_layer=probe)
        c = f.candidates
        agree.append(f.ranking()[0] == e.ranking()[0])
        rhos.append(_spearman([float(f.scores[j]) for j in c], [float(e.scores[j]) for j in c]))
        fast_t.append(f.seconds)
        exact_t.append(e.seconds)
        fast_p.append(f.forward_passes)
        exact_p.append(e.forward_passes)
        if i < n_positions:
            ep = trace(model, processor, r, probe_layer=probe, per_position=True)
            pos_t.append(ep.seconds)
            pos_p.append(ep.forward_passes)
            if heat is None:
                heat = {
                    "tokens": f.tokens,
                    "fast": f.position_scores.tolist(),
                    "exact": ep.position_scores.tolist(),
                    "prompt": r.prompt,
                }
    rhos_ok = [x for x in rhos if not math.isnan(x)]
    res = {
        "n": len(requests),
        "top1_agreement": sum(agree) / len(agree),
        "spearman": sum(rhos_ok) / max(1, len(rhos_ok)),
        "fast_seconds_median": statistics.median(fast_t),
        "exact_layer_seconds_median": statistics.median(exact_t),
        "fast_forward_passes": statistics.median(fast_p),
        "exact_layer_forward_passes": statistics.median(exact_p),
        "speedup_vs_layer_tracing_wall": statistics.median(exact_t) / statistics.median(fast_t),
    }
    if pos_t:
        res.update(
            {
                "exact_position_seconds_median": statistics.median(pos_t),
                "exact_position_forward_passes": statistics.median(pos_p),
                "speedup": statistics.median(pos_t) / statistics.median(fast_t[: len(pos_t)]),
                "speedup_forward_passes": statistics.median(pos_p) / statistics.median(fast_p),
            }
        )
    res["heatmap"] = heat
    return res


def run_edit_speed(model: Any, processor: Any, requests: Sequence[Any], steps: int = 20) -> dict[str, Any]:
    """Same slot, same layers, same number of steps: cached-span update vs full forward/backward."""
    from peft import get_peft_model

    ratios, cached_t, full_t = [], [], []
    L = family_of(model).num_layers(model)
    for r in requests:
        loc = locate(model, processor, r, probe_layer=default_probe_layer(L))
        res = {}
        for mode in ("cached", "full", "cached2", "full2"):
            cfg = LDKEConfig(slot_layers=[loc.layers], num_slots=1, probe_layer=default_probe_layer(L))
            pm = get_peft_model(model, cfg)
            t0 = time.perf_counter()
            fit_delta(pm, processor, r, 0, cache_hidden=mode.startswith("cached"), steps=steps, stop_early=False)
            res[mode] = time.perf_counter() - t0
            pm.unload()
        c = min(res["cached"], res["cached2"])
        f = min(res["full"], res["full2"])
        cached_t.append(c)
        full_t.append(f)
        ratios.append(f / c)
    return {
        "steps": steps,
        "cached_seconds_median": statistics.median(cached_t),
        "full_seconds_median": statistics.median(full_t),
        "cached_vs_full_speedup": statistics.median(ratios),
    }
