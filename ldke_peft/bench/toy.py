"""The LDKE benchmark on the toy world: single edits, ablations, sequential editing, localization
fidelity/cost and edit speed — every number measured in the same run.

``python -m ldke_peft.bench.toy --out DIR`` (or ``benchmarks/ldke_toy.py``) prints markdown tables and
writes ``DIR/results.json``. Ratios (speedups) are against baselines measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Sequence


from ..config import LDKEConfig
from ..delta_fit import fit_delta
from ..editor import edit
from ..scope import NegativePool
from ..localization import locate, trace
from ..metrics import METRIC_KEYS, collect_pre, compute_metrics
from ..model import default_probe_layer
from .mke import editor_view

logger = logging.getLogger(__name__)

ABLATIONS: dict[str, dict[str, Any]] = {
    "ldke": {},
    "ldke_no_router": {"use_router": False},
    "ldke_fixed_layer": {"localization": "fixed"},
    "ldke_no_hard_negatives": {"hard_negatives": False},
    # the textual key pooled from the probe layer's hidden states instead of read by the sentence encoder
    "ldke_probe_text": {"router_text_encoder": None, "router_text_margin": None},
}


def world_pool(world: Any) -> NegativePool:
    """Question bank and entity images of a toy world, for hard negatives."""
    if hasattr(world, "negative_pool"):
        return world.negative_pool()
    return NegativePool(
        questions=[(q, rel) for rel in world.relations for q in world.question_bank(rel)],
        images=[(world.render(e, 0), e) for e in world.entities],
    )


def _mean_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k in METRIC_KEYS:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = float(sum(vals) / len(vals)) if vals else None
    return out


def _config(world: Any, **overrides: Any) -> LDKEConfig:
    cfg = LDKEConfig(**{k: v for k, v in overrides.items() if k != "localization"})
    if overrides.get("localization") == "fixed":
        L = world.family.num_layers(world.model)
        cfg.localization = "fixed"
        cfg.fixed_layers = [L // 2]
    elif "localization" in overrides:
        cfg.localization = overrides["localization"]
    return cfg


def run_single(world: Any, requests: Sequence[Any], pool: NegativePool, overrides: dict[str, Any],
               generate: bool = True) -> dict[str, Any]:
    """Each request edited alone into a fresh pack on the base model; metrics averaged over requests."""
    rows, times, bytes_per_edit = [], [], []
    for r in requests:
        pre = collect_pre(world.model, world.processor, [r])
        t0 = time.perf_counter()
        # held-out protocol: the editor sees the edit alone (no probe) and the world's negative pool
        pm = edit(world.model, world.processor, [editor_view(r)], _config(world, **overrides), negatives=pool,
                  progress=False)
        times.append(time.perf_counter() - t0)
        m = compute_metrics(pm, world.processor, [r], pre, generate=generate)
        rows.append(m)
        bytes_per_edit.append(_adapter_bytes(pm))
        pm.unload()
    out = _mean_metrics(rows)
    out["edit_seconds_median"] = statistics.median(times)
    out["adapter_bytes_per_edit"] = statistics.median(bytes_per_edit)
    out["n"] = len(rows)
    return out


def _adapter_bytes(pm: Any, adapter_name: str = "default") -> int:
    from peft.utils import get_peft_model_state_dict

    from ..io import stored_state_dict

    sd = get_peft_model_state_dict(pm, state_dict=stored_state_dict(pm), adapter_name=adapter_name)
    n_slots = max(1, pm.peft_config[adapter_name].num_slots)
    return int(sum(t.numel() * t.element_size() for t in sd.values()) / n_slots)


def run_sequential(world: Any, requests: Sequence[Any], pool: NegativePool, checkpoints: Sequence[int],
                   generate: bool = False) -> dict[str, Any]:
    """Edits applied one after another into ONE pack; at each checkpoint every edit so far is evaluated."""
    out: dict[str, Any] = {}
    pm = None
    pres = [collect_pre(world.model, world.processor, [r]) for r in requests]
    t_all = time.perf_counter()
    for i, r in enumerate(requests):
        pm = edit(world.model if pm is None else pm, world.processor, [editor_view(r)], LDKEConfig(), pack=pm,
                  negatives=pool, progress=False)
        n = i + 1
        if n in checkpoints or n == len(requests):
            rows = [compute_metrics(pm, world.processor, [q], p, generate=generate) for q, p in zip(requests[:n], pres[:n])]
            m = _mean_metrics(rows)
            m["min_reliability"] = min(x["reliability"] for x in rows)
            m["frac_reliability_1"] = sum(x["reliability"] >= 0.999 for x in rows) / n
            m["seconds"] = time.perf_counter() - t_all
            m["adapter_bytes_per_edit"] = _adapter_bytes(pm)
            out[str(n)] = m
            logger.info("sequential %d: %s", n, {k: v for k, v in m.items() if v is not None})
    if pm is not None:
        pm.unload()
    return out


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


def run_localization(world: Any, requests: Sequence[Any], n_positions: int = 3) -> dict[str, Any]:
    """Fast (attribution) vs exact per-layer tracing on every request; per-(layer, position) tracing,
    the ROME-style reference cost, on the first ``n_positions`` requests."""
    L = world.family.num_layers(world.model)
    probe = default_probe_layer(L)
    agree, rhos, fast_t, exact_t, fast_p, exact_p = [], [], [], [], [], []
    pos_t, pos_p = [], []
    heat = None
    for i, r in enumerate(requests):
        f = locate(world.model, world.processor, r, probe_layer=probe)
        e = trace(world.model, world.processor, r, probe_layer=probe)
        c = f.candidates
        agree.append(f.ranking()[0] == e.ranking()[0])
        rhos.append(_spearman([float(f.scores[j]) for j in c], [float(e.scores[j]) for j in c]))
        fast_t.append(f.seconds)
        exact_t.append(e.seconds)
        fast_p.append(f.forward_passes)
        exact_p.append(e.forward_passes)
        if i < n_positions:
            ep = trace(world.model, world.processor, r, probe_layer=probe, per_position=True)
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


def run_edit_speed(world: Any, requests: Sequence[Any], steps: int = 20) -> dict[str, Any]:
    """Same slot, same layers, same number of steps: cached-span update vs full forward/backward."""
    from peft import get_peft_model

    ratios, cached_t, full_t = [], [], []
    L = world.family.num_layers(world.model)
    for r in requests:
        loc = locate(world.model, world.processor, r, probe_layer=default_probe_layer(L))
        res = {}
        for mode in ("cached", "full", "cached2", "full2"):
            cfg = LDKEConfig(slot_layers=[loc.layers], num_slots=1, probe_layer=default_probe_layer(L))
            pm = get_peft_model(world.model, cfg)
            t0 = time.perf_counter()
            fit_delta(pm, world.processor, r, 0, cache_hidden=mode.startswith("cached"), steps=steps, stop_early=False)
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


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def markdown(results: dict[str, Any]) -> str:
    lines = []
    keys = list(METRIC_KEYS) + ["edit_seconds_median", "adapter_bytes_per_edit"]
    if results.get("methods"):
        lines.append(f"### Single edits ({results['n_edits']} edits, toy world seed {results['seed']})\n")
        lines.append("| method | " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * (len(keys) + 1))
        for name, m in results["methods"].items():
            lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |")
    if results.get("sequential"):
        lines.append("\n### Sequential editing (one pack, edits appended one at a time)\n")
        sk = ["reliability", "min_reliability", "t_generality", "m_generality", "t_locality", "m_locality",
              "coupled_locality", "adapter_bytes_per_edit", "seconds"]
        lines.append("| edits | " + " | ".join(sk) + " |")
        lines.append("|" + "---|" * (len(sk) + 1))
        for n, m in results["sequential"].items():
            lines.append(f"| {n} | " + " | ".join(_fmt(m.get(k)) for k in sk) + " |")
    if results.get("localization"):
        loc = {k: v for k, v in results["localization"].items() if k != "heatmap"}
        lines.append("\n### Fast Localization vs exact causal tracing\n")
        lines.append("| " + " | ".join(loc) + " |")
        lines.append("|" + "---|" * len(loc))
        lines.append("| " + " | ".join(_fmt(v) for v in loc.values()) + " |")
    if results.get("edit_speed"):
        es = results["edit_speed"]
        lines.append("\n### Edit speed (same layers, same steps)\n")
        lines.append("| " + " | ".join(es) + " |")
        lines.append("|" + "---|" * len(es))
        lines.append("| " + " | ".join(_fmt(v) for v in es.values()) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from ..testing.toy_world import toy_world

    ap = argparse.ArgumentParser(
        prog="python -m ldke_peft.bench.toy",
        description="LDKE on the toy world: single edits + ablations, sequential editing, "
        "Fast Localization vs causal tracing, cached-span edit speed. Prints markdown, writes results.json.",
    )
    ap.add_argument("--out", default="benchmarks/results/toy", help="output directory (results.json, report.md)")
    ap.add_argument("--seed", type=int, default=0, help="toy-world seed")
    ap.add_argument("--n-entities", type=int, default=None, help="toy-world size (default: the library default)")
    ap.add_argument("--n-edits", type=int, default=10, help="edits for the single-edit/ablation table")
    ap.add_argument("--edit-seed", type=int, default=1, help="seed for choosing the edits")
    ap.add_argument("--sequential", type=int, default=0, help="number of sequential edits (0 = skip)")
    ap.add_argument("--localization", type=int, default=20, help="requests for the localization study (0 = skip)")
    ap.add_argument("--positions", type=int, default=3, help="requests also traced per (layer, position)")
    ap.add_argument("--speed", type=int, default=3, help="requests for the edit-speed study (0 = skip)")
    ap.add_argument("--methods", default=",".join(ABLATIONS), help="comma-separated subset of " + ",".join(ABLATIONS))
    ap.add_argument("--no-generate", action="store_true", help="skip exact-match generation (faster)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    world = toy_world(seed=args.seed, **({"n_entities": args.n_entities} if args.n_entities else {}))
    pool = world_pool(world)
    results: dict[str, Any] = {"suite": "toy", "model": "toy_world", "seed": args.seed, "n_edits": args.n_edits,
                               "n_entities": len(world.entities), "methods": {}}
    if args.n_edits:
        reqs = world.edit_requests(args.n_edits, seed=args.edit_seed, split="test")
        results["n_edits"] = len(reqs)
        for name in args.methods.split(","):
            logger.info("method %s", name)
            results["methods"][name] = run_single(world, reqs, pool, ABLATIONS[name], generate=not args.no_generate)
    if args.sequential:
        reqs = world.edit_requests(args.sequential, seed=args.edit_seed + 100, split="test")
        cps = [c for c in (1, 10, 100, 1000) if c <= len(reqs)]
        results["sequential"] = {"ldke": None}
        results["sequential"] = run_sequential(world, reqs, pool, cps)
    if args.localization:
        reqs = world.edit_requests(args.localization, seed=args.edit_seed + 200)
        results["localization"] = run_localization(world, reqs, n_positions=args.positions)
    if args.speed:
        reqs = world.edit_requests(args.speed, seed=args.edit_seed + 300)
        results["edit_speed"] = run_edit_speed(world, reqs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    md = markdown(results)
    (out / "report.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
