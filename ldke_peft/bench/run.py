"""The MKE benchmark runner: LDKE, its ablations and the baselines, on the benchmark MLLM or the toy world.

``main(argv)`` (wired to ``ldke bench``; also ``python -m ldke_peft.bench.run``) writes into ``--out``:

* ``results.json``: the summary, exactly ``{"suite", "model", "n_edits", "methods", "sequential",
  "localization", "edit_speed", "inference_overhead"}`` (see :data:`METHOD_KEYS`);
* ``details.json``: everything behind it (per-request metrics, per-phase timings, protocol, machine);
* ``report.md``: tables and the bars with PASS/MISS computed from the numbers;
* ``metrics.png``, ``sequential.png``, ``localization_heatmap.png``.

Protocol (the same for every method): each request is edited alone into the unedited model (and
the model restored bit for bit afterwards, checked); metrics come from
:func:`ldke_peft.metrics.compute_metrics` against pre-edit state collected once before any edit.
With ``--protocol heldout`` (default) every editor gets only :func:`~ldke_peft.bench.mke.editor_view`
of a request (image, prompt, target) and LDKE its hard negatives from a pool disjoint from the
probes; ``--protocol open`` hands LDKE the whole request (rephrases, locality and coupled probes
become its positives/negatives), as EasyEdit hands a method its request dict.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..tuner.config import LDKEConfig
from ..editing.editor import edit
from ..editing.scope import NegativePool
from ..families import family_of
from ..metrics import METRIC_KEYS, collect_pre, compute_metrics, mean_by_kind
from ..tuner.model import _root_model
from ..requests import EditRequest
from .baselines import BASELINES, Restore
from .mke import caller_consequences, editor_view

logger = logging.getLogger(__name__)
from .report import METHOD_KEYS, bars, markdown_report
from .suites import SUITES, Suite, load_suite

__all__ = ["LDKE_VARIANTS", "METHODS", "METHOD_KEYS", "SUITES", "Suite", "bars", "load_suite", "main", "run_benchmark"]

#: LDKE and its ablations: config overrides.
LDKE_VARIANTS: dict[str, dict[str, Any]] = {
    "ldke": {},
    "ldke_no_router": {"use_router": False},
    "ldke_fixed_layer": {"localization": "fixed"},
    "ldke_no_hard_negatives": {"hard_negatives": False},
    # the textual key pooled from the probe layer's hidden states instead of read by the sentence encoder
    "ldke_probe_text": {"router_text_encoder": None, "router_text_margin": None},
    # the delta fit as it was before the staged rows and the bfloat16 steps: every row in every step, float32
    "ldke_plain_fit": {"edit_fit_stages": False, "edit_fit_dtype": "float32"},
    # the delta fitted on the edit question and templated rephrasings only, not the pool's wordings of its relation
    "ldke_no_bank_wordings": {"delta_bank_wordings": False},
    # no textual anchors: the textual decision is the radius alone (the default before router_neighbour_questions)
    "ldke_no_neighbours": {"router_neighbour_questions": 0},
    # the caller also states what follows from the new fact: two-hop consequences fitted with the edit, and
    # the reverse question as a text-only edit of the same call
    "ldke_consequences": {"caller_consequences": ("two_hop", "reverse")},
    "ldke_two_hop_consequences": {"caller_consequences": ("two_hop",)},
    # the same, with the reverse text-only edit in a pack of its own beside the image edit's (its own router)
    "ldke_consequences_own_pack": {"caller_consequences": ("two_hop", "reverse"), "text_only_pack": "text"},
}
#: LDKE_VARIANTS keys that are benchmark choices, not ``LDKEConfig`` fields.
_BENCH_KEYS = ("localization", "caller_consequences", "text_only_pack")
METHODS: tuple[str, ...] = (*LDKE_VARIANTS, *BASELINES)
BASELINE_NAMES: tuple[str, ...] = tuple(BASELINES)
SEQUENTIAL_METHODS: tuple[str, ...] = ("ldke", "grace", "lora")
CHECKPOINTS: tuple[int, ...] = (1, 10, 100, 1000)

#: Where ``benchmarks/inference_overhead.py`` keeps each suite model's routed-inference overhead (for the benchmark
#: MLLM, the newest run with the library's default pack contents: textual anchors and asked-for words).
OVERHEAD_FILES: dict[str, str] = {
    "toy": "benchmarks/results/inference_overhead.json",
    "smoke": "benchmarks/results/asked_word/overhead.json",
    "full": "benchmarks/results/asked_word/overhead.json",
}


# ---------------------------------------------------------------------- methods


def _ldke_config(model: Any, overrides: dict[str, Any]) -> LDKEConfig:
    cfg = LDKEConfig(**{k: v for k, v in overrides.items() if k not in _BENCH_KEYS})
    if overrides.get("localization") == "fixed":
        cfg.localization = "fixed"
        cfg.fixed_layers = [family_of(model).num_layers(model) // 2]
    return cfg


def ldke_bytes(pm: Any, adapter_name: str = "default") -> int:
    """Adapter bytes (safetensors payload) divided by the pack's number of slots."""
    from peft.utils import get_peft_model_state_dict

    from ..tuner.io import stored_state_dict

    sd = get_peft_model_state_dict(pm, state_dict=stored_state_dict(pm), adapter_name=adapter_name)
    n_slots = max(1, pm.peft_config[adapter_name].num_slots)
    return int(sum(t.numel() * t.element_size() for t in sd.values()) / n_slots)


def apply_ldke(model: Any, processor: Any, requests: Sequence[EditRequest], *, overrides: dict[str, Any],
               pool: NegativePool, pack: Any | None = None) -> tuple[Any, Restore]:
    """LDKE (or an ablation) in the baselines' ``(edited_model, restore)`` form. With ``text_only_pack`` (single
    edits) the text-only requests go into a second pack of that name, beside the first."""
    second = overrides.get("text_only_pack") if pack is None else None
    apart = [r for r in requests if second and r.image is None]
    first = [r for r in requests if not any(r is a for a in apart)]
    pm = edit(model if pack is None else pack, processor, first, _ldke_config(model, overrides),
              pack=pack, negatives=pool, progress=False)
    if apart:
        pm = edit(pm, processor, apart, _ldke_config(model, overrides), adapter_name=second, negatives=pool,
                  progress=False)
    reports = getattr(pm, "ldke_reports", [])[-len(requests):]
    slots = sum(c.num_slots for c in pm.peft_config.values())
    nbytes = sum(ldke_bytes(pm, a) * max(1, c.num_slots) for a, c in pm.peft_config.items()) // max(1, slots)
    return pm, Restore(pm.unload, edit_bytes=nbytes,
                       info={"layers": [r.layers for r in reports], "fit_steps": [r.fit_steps for r in reports],
                             "router": [r.router for r in reports], "phases": [r.phases for r in reports],
                             "fit_tokens": [r.fit_tokens for r in reports], "fit_span": [r.fit_span for r in reports]})


def _editor_requests(r: EditRequest, method: str, protocol: str) -> list[EditRequest]:
    if protocol == "open" and method in LDKE_VARIANTS:
        return [r]
    kinds = LDKE_VARIANTS.get(method, {}).get("caller_consequences")
    return caller_consequences(r, kinds) if kinds else [editor_view(r)]


def _apply(method: str, model: Any, processor: Any, reqs: list[EditRequest], pool: NegativePool,
           hparams: dict[str, dict[str, Any]], previous: Any | None = None) -> tuple[Any, Restore]:
    if method in LDKE_VARIANTS:
        return apply_ldke(model, processor, reqs, overrides={**LDKE_VARIANTS[method], **hparams.get(method, {})},
                          pool=pool, pack=previous)
    return BASELINES[method](previous if previous is not None else model, processor, reqs, **hparams.get(method, {}))


def model_digest(model: Any) -> str:
    """sha256 of every parameter and buffer (names and bytes): "restored bit for bit" is checked with it."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _mean(rows: Sequence[dict[str, Any]], keys: Sequence[str] = METRIC_KEYS) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None and not (isinstance(r[k], float) and math.isnan(r[k]))]
        out[k] = float(sum(vals) / len(vals)) if vals else None
    return out


def run_single(suite: Suite, method: str, pres: list[Any], *, protocol: str, generate: bool,
               hparams: dict[str, dict[str, Any]], check_restore: bool = True) -> dict[str, Any]:
    """Each request edited alone into the base model, evaluated, and undone."""
    digest = model_digest(suite.model) if check_restore else None
    rows, times, nbytes, infos, kinds = [], [], [], [], []
    for r, pre in zip(suite.requests[: suite.n_single], pres):
        t0 = time.perf_counter()
        edited, restore = _apply(method, suite.model, suite.processor, _editor_requests(r, method, protocol), suite.pool,
                                 hparams)
        times.append(time.perf_counter() - t0)
        m = compute_metrics(edited, suite.processor, [r], pre, generate=generate)
        rows.append({k: m[k] for k in METRIC_KEYS})
        kinds.append(m["portability_by_kind"])
        nbytes.append(restore.edit_bytes)
        infos.append({k: v for k, v in restore.info.items() if k != "seconds"})
        restore()
        logger.info("%s %s/%s -> %r: %s (%.1fs)", method, r.subject, r.relation, r.target,
                    {k: round(v, 3) for k, v in rows[-1].items() if v is not None}, times[-1])
    if check_restore and model_digest(suite.model) != digest:
        raise RuntimeError(f"{method}: the base model was not restored bit for bit")
    out = _mean(rows)
    out["edit_seconds_median"] = statistics.median(times)
    out["adapter_bytes_per_edit"] = int(statistics.median(nbytes))
    out["portability_by_kind"] = mean_by_kind(kinds)
    return {"summary": out, "per_request": rows, "edit_seconds": times, "info": infos,
            "timing": edit_timing(times, infos, decoder_params(suite.model))}


#: A 7B decoder (Llama-2-7B: 32 layers of d=4096, MLP 11008): weights per layer (q, k, v, o, gate, up,
#: down), the size :func:`edit_timing` projects edit cost to.
PARAMS_7B = (32, 4 * 4096 * 4096 + 3 * 4096 * 11008)


def decoder_params(model: Any) -> tuple[int, int] | None:
    """``(layers, weights per layer)`` of the model's language decoder: a token costs about two FLOPs
    per weight per layer forward (and twice that backward)."""
    try:
        layers = family_of(model).decoder_layers(_root_model(model))
    except Exception:  # noqa: BLE001 - a model without a known decoder: no projection
        return None
    per = sum(p.numel() for n, p in layers[0].named_parameters() if p.dim() == 2 and "ldke_" not in n)
    return len(layers), int(per)


def edit_timing(times: Sequence[float], infos: Sequence[dict[str, Any]],
                shape: tuple[int, int] | None = None) -> dict[str, Any]:
    """Median and p90 edit seconds and the median of each phase (LDKE: localize, capture, delta fit,
    router fit; a baseline is one phase, ``edit``). For LDKE with the decoder's ``shape`` (layers,
    weights per layer) also the delta fit's FLOPs per edit (3 x 2 FLOPs per weight per token per layer
    for forward and backward, x tokens x replayed layers x steps), the same rows on a 7B decoder (the
    replayed share of its layers), and the edit seconds projected to the 7B at this machine's rate
    (edit seconds x the ratio of all decoder weights: localization and router scale the same way)."""
    phases: dict[str, list[float]] = {}
    for t, info in zip(times, infos):
        per = info.get("phases")
        if per:
            for p in per:  # one dict per request of the edit call
                for k, v in p.items():
                    phases.setdefault(k, []).append(float(v))
        else:
            phases.setdefault("edit", []).append(float(t))
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)] if ordered else None
    out = {"edit_seconds_median": statistics.median(times) if times else None, "edit_seconds_p90": p90,
           "phase_seconds_median": {k: statistics.median(v) for k, v in phases.items()}}
    fits = [(st, tk, sp) for info in infos
            for st, tk, sp in zip(info.get("fit_steps") or [], info.get("fit_tokens") or [], info.get("fit_span") or [])]
    if shape is not None and fits and times:
        n_layers, per = shape
        big_layers, big_per = PARAMS_7B
        flops = [6 * per * st * tk * sp for st, tk, sp in fits]
        flops_7b = [6 * big_per * st * tk * sp * big_layers / n_layers for st, tk, sp in fits]
        out["fit_tflop_median"] = statistics.median(flops) / 1e12
        out["fit_tflop_7b_median"] = statistics.median(flops_7b) / 1e12
        out["projected_7b_edit_seconds_median"] = statistics.median(times) * (big_layers * big_per) / (n_layers * per)
    return out


def run_sequential(suite: Suite, method: str, pres: list[Any], sizes: Sequence[int], *, protocol: str,
                   hparams: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Edits applied one after another to the same model; at each size every edit so far is evaluated."""
    n = min(max(sizes), len(suite.requests))
    checkpoints = sorted({s for s in sizes if s <= n} | {n})
    out: dict[str, Any] = {}
    edited, restore = None, None
    t_all = time.perf_counter()
    for i, r in enumerate(suite.requests[:n]):
        edited, restore = _apply(method, suite.model, suite.processor, _editor_requests(r, method, protocol), suite.pool,
                                 hparams, previous=edited)
        k = i + 1
        if k in checkpoints:
            facts = {(q.subject, q.relation) for q in suite.requests[:k] if q.subject and q.relation}
            scored = [drop_covered(q, p, facts) for q, p in zip(suite.requests[:k], pres[:k])]
            rows = [{kk: m[kk] for kk in METRIC_KEYS} for m in
                    (compute_metrics(edited, suite.processor, [q], p, generate=False) for q, p, _ in scored)]
            m = _mean(rows)
            m["min_reliability"] = min(x["reliability"] for x in rows)
            m["probes_covered_by_other_edits"] = sum(n for _, _, n in scored)
            m["seconds"] = time.perf_counter() - t_all
            m["adapter_bytes_per_edit"] = int(restore.edit_bytes)
            out[str(k)] = m
            logger.info("sequential %s @%d: %s", method, k, {a: round(b, 3) for a, b in m.items() if b is not None})
    if restore is not None:
        restore()
    return out


def drop_covered(r: EditRequest, pre: Any, facts: set[tuple[str, str]]) -> tuple[EditRequest, Any, int]:
    """``r`` and its pre-edit state without the image probes (``m_locality``, ``coupled``) that another
    edit of the pack covers: a probe asking relation ``rel`` about entity ``e`` when ``(e, rel)`` was
    edited too *should* change (e.g. a look-alike's flag asked the question its own edit answers), so it
    is no locality failure. Returns how many were dropped. Text-only probes stay: an image edit's scope is
    the entity's image, not a question naming it."""
    own = (r.subject, r.relation)
    keep: dict[str, list[int]] = {}
    for f in ("m_locality", "coupled"):
        probes = getattr(r, f)
        keep[f] = [j for j, p in enumerate(probes)
                   if p.subject is None or p.relation is None or (p.subject, p.relation) == own
                   or (p.subject, p.relation) not in facts]
    dropped = sum(len(getattr(r, f)) - len(idx) for f, idx in keep.items())
    if not dropped:
        return r, pre, 0
    r2 = dataclasses.replace(r, **{f: [getattr(r, f)[j] for j in idx] for f, idx in keep.items()})
    probes = {f: ([[recs[j] for j in keep[f]] for recs in per] if f in keep else per) for f, per in pre.probes.items()}
    return r2, dataclasses.replace(pre, probes=probes), dropped


# ---------------------------------------------------------------------- localization / speed / overhead


def run_localization(suite: Suite, n: int, positions: int) -> dict[str, Any]:
    """Fast Localization vs exact per-layer causal tracing on ``n`` requests, and ROME-style
    per-(layer, position) tracing (the cost reference of the speedup bar) on ``positions`` of them."""
    from .studies import run_localization as _run

    return _run(suite.model, suite.processor, suite.requests[:n], n_positions=positions)


def run_edit_speed(suite: Suite, n: int) -> dict[str, Any]:
    from .studies import run_edit_speed as _run

    return _run(suite.model, suite.processor, suite.requests[:n])


def _overhead_from_file(path: Path) -> dict[str, Any] | None:
    """Routed-inference overhead measured by ``benchmarks/inference_overhead.py`` (worst batch size)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    out: dict[str, Any] = {}
    for row in data.get("rows", []):
        name = row.get("model", "")
        if name.startswith("ldke-"):
            k = name.split("-", 1)[1]
            out[k] = max(out.get(k, 0.0), float(row["generate_ratio"]))
    return {"ratios": out, "source": str(path), "model": data.get("config", {}).get("model")} if out else None


def measure_overhead(suite: Suite, pres_request: EditRequest, reps: int = 5) -> dict[str, Any]:
    """A brief measurement when no overhead file exists: ``generate`` of a 1-edit routed pack vs the base
    model, interleaved, median of ``reps``, on a batch of the edit's probes (routing live)."""
    pm, restore = apply_ldke(suite.model, suite.processor, [editor_view(pres_request)], overrides={}, pool=suite.pool)
    fam = family_of(suite.model)
    r = pres_request
    imgs = [r.image, *(p.image for p in r.coupled), *(p.image for p in r.m_locality)]
    prs = [r.prompt, *(p.prompt for p in r.coupled), *(p.prompt for p in r.m_locality)]
    device = next(suite.model.parameters()).device
    inputs = fam.build_inputs(suite.processor, imgs, prs).to(device).inputs
    tok = fam.tokenizer(suite.processor)

    def gen(m):
        t0 = time.perf_counter()
        with torch.no_grad():
            m.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id or 0)
        return time.perf_counter() - t0

    base_t, pack_t = [], []
    try:
        gen(pm)
        for _ in range(reps):
            pack_t.append(gen(pm))
            with pm.disable_adapter():
                base_t.append(gen(pm))
    finally:
        restore()
    return {"ratios": {"1": statistics.median(pack_t) / statistics.median(base_t)}, "source": "measured by bench.run "
            f"(generate 8 tokens, batch {len(prs)}, median of {reps}, adapter disabled = base)"}


# ---------------------------------------------------------------------- the benchmark


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads): on a shared machine, CPU time / cores
    is what the run would take on idle cores."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _Phase:
    def __init__(self, timings: dict[str, float], cpu: dict[str, float], name: str):
        self.timings, self.cpu, self.name = timings, cpu, name

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.timings[self.name] = time.perf_counter() - self.t0
        self.cpu[self.name] = _cpu_seconds() - self.c0


def run_benchmark(suite: Suite, methods: Sequence[str], *, sequential: Sequence[int], n_localization: int,
                  n_positions: int, n_speed: int, protocol: str = "heldout", generate: bool = True,
                  hparams: dict[str, dict[str, Any]] | None = None, overhead_file: Path | None = None,
                  measure_overhead_if_missing: bool = True,
                  sequential_methods: Sequence[str] = SEQUENTIAL_METHODS) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run every study; returns ``(results, details)``."""
    hparams = hparams or {}
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    details: dict[str, Any] = {"protocol": protocol, "methods": {}, "timings": timings, "cpu_seconds": cpu,
                               "suite_info": suite.info, "hparams": hparams,
                               "requests": [{"subject": r.subject, "relation": r.relation, "prompt": r.prompt,
                                             "ground_truth": r.ground_truth, "target": r.target} for r in suite.requests]}
    results: dict[str, Any] = {"suite": suite.name, "model": suite.model_name,
                               "split": suite.info.get("split", "test"), "n_edits": suite.n_single,
                               "methods": {}, "sequential": {}, "localization": None, "edit_speed": None,
                               "inference_overhead": None, "dev": None}
    n_needed = max(suite.n_single, min(max(sequential, default=0), len(suite.requests)))
    with _Phase(timings, cpu, "collect_pre"):
        pres = [collect_pre(suite.model, suite.processor, [r]) for r in suite.requests[:n_needed]]
    with _Phase(timings, cpu, "unedited reference"):
        # the unedited model on the same probes: what a score is worth when nothing was edited (e.g. a
        # multi-token portability answer whose later tokens the base model already predicts)
        ms = [compute_metrics(suite.model, suite.processor, [r], p, generate=generate)
              for r, p in zip(suite.requests[: suite.n_single], pres)]
        details["unedited"] = _mean([{k: m[k] for k in METRIC_KEYS} for m in ms])
        details["unedited"]["portability_by_kind"] = mean_by_kind([m["portability_by_kind"] for m in ms])
    for name in methods:
        with _Phase(timings, cpu, f"single {name}"):
            res = run_single(suite, name, pres, protocol=protocol, generate=generate, hparams=hparams)
        results["methods"][name] = {k: res["summary"].get(k) for k in METHOD_KEYS}
        details["methods"][name] = res
    for name in [m for m in sequential_methods if m in methods] if sequential else []:
        with _Phase(timings, cpu, f"sequential {name}"):
            results["sequential"][name] = run_sequential(suite, name, pres, sequential, protocol=protocol,
                                                         hparams=hparams)
    if n_localization:
        with _Phase(timings, cpu, "localization"):
            loc = run_localization(suite, n_localization, n_positions)
        details["localization"] = loc
        speedup = loc.get("speedup")
        results["localization"] = {"top1_agreement": loc["top1_agreement"], "spearman": loc["spearman"],
                                   "speedup": speedup}
    if n_speed:
        with _Phase(timings, cpu, "edit_speed"):
            es = run_edit_speed(suite, n_speed)
        details["edit_speed"] = es
        results["edit_speed"] = {"cached_vs_full_speedup": es["cached_vs_full_speedup"]}
    with _Phase(timings, cpu, "inference_overhead"):
        ov = _overhead_from_file(overhead_file) if overhead_file is not None else None
        if ov is None and measure_overhead_if_missing and "ldke" in methods:
            ov = measure_overhead(suite, suite.requests[0])
    if ov is not None:
        results["inference_overhead"] = {k: ov["ratios"].get(k) for k in ("1", "1000")}
        details["inference_overhead"] = ov
    return results, details


def run_dev(suite: Suite, methods: Sequence[str], *, protocol: str = "heldout", generate: bool = True,
            hparams: dict[str, dict[str, Any]] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The single-edit study on the dev split (where defaults may be chosen), for the dev-vs-test table."""
    hparams = hparams or {}
    pres = [collect_pre(suite.model, suite.processor, [r]) for r in suite.requests[: suite.n_single]]
    rows = [{k: m[k] for k in METRIC_KEYS} for m in (
        compute_metrics(suite.model, suite.processor, [r], p, generate=generate)
        for r, p in zip(suite.requests[: suite.n_single], pres))]
    out: dict[str, Any] = {"n_edits": suite.n_single, "methods": {}, "unedited": _mean(rows)}
    det: dict[str, Any] = {}
    for name in methods:
        res = run_single(suite, name, pres, protocol=protocol, generate=generate, hparams=hparams)
        out["methods"][name] = {k: res["summary"].get(k) for k in METHOD_KEYS}
        det[name] = res
    return out, det


def _machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine()}
    info["summary"] = f"{info['machine']}, {info['cpu_count']} CPUs visible, torch {info['torch']}, {info['threads']} thread(s)"
    return info


def write_outputs(out: Path, results: dict[str, Any], details: dict[str, Any], plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "details.json").write_text(json.dumps(details, indent=1, default=float))
    (out / "report.md").write_text(markdown_report(results, details))
    if plots:
        from . import plots as P

        P.metrics_bars(results, out / "metrics.png")
        if results.get("sequential"):
            P.sequential_curve(results, out / "sequential.png")
        heat = (details.get("localization") or {}).get("heatmap")
        if heat:
            P.localization_heatmap(heat, out / "localization_heatmap.png")


def _git_commit() -> str | None:
    """The checkout's commit (with ``+dirty`` when it has uncommitted changes), or ``None`` outside git."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _parse_sizes(text: str) -> list[int]:
    if text.strip() in ("", "0", "none"):
        return []
    return sorted({int(x) for x in text.split(",") if x.strip()})


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="ldke bench",
        description="MKE benchmark: LDKE, its ablations and FT-L/LoRA/GRACE/IKE on the benchmark MLLM (smoke, full) "
        "or the toy world (toy). Writes results.json, details.json, report.md and PNG plots into --out.",
    )
    ap.add_argument("--suite", choices=list(SUITES), default="smoke")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<suite>)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--prepare", action="store_true", help="build the benchmark MLLM (reused if built) and exit")
    ap.add_argument("--cache-dir", default=None, help="benchmark MLLM cache (default $LDKE_CACHE/bench or ~/.cache/ldke_peft/bench)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--n-edits", type=int, default=None, help="single-edit requests (default: per suite; full = every usable fact)")
    ap.add_argument("--sequential", default=None, help="comma-separated sequential sizes, e.g. 1,10,100 (0 = skip)")
    ap.add_argument("--sequential-methods", default=",".join(SEQUENTIAL_METHODS),
                    help="those of --methods that also grow a pack for the sequential table (default: %(default)s; "
                    "any method, e.g. an ablation, may be named)")
    ap.add_argument("--localization", type=int, default=None, help="requests for Fast vs exact localization (0 = skip)")
    ap.add_argument("--positions", type=int, default=None, help="of those, traced per (layer, position) too")
    ap.add_argument("--speed", type=int, default=None, help="requests for the cached-vs-full edit-speed study (0 = skip)")
    ap.add_argument("--protocol", choices=("heldout", "open"), default="heldout",
                    help="heldout: editors see only the edit (default); open: LDKE also gets the request's probes")
    ap.add_argument("--split", choices=("dev", "test"), default="test",
                    help="the split of the main tables (default test: entities, wordings and a relation that no "
                    "default was chosen on); dev is where defaults may be tuned")
    ap.add_argument("--dev-methods", default="ldke",
                    help="with --split test: those of --methods also run on the dev split for the dev-vs-test "
                    "table (comma-separated; empty = none)")
    ap.add_argument("--no-generate", action="store_true", help="skip exact-match generation")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--toy-entities", type=int, default=None, help="toy-world size (toy suite)")
    ap.add_argument("--overhead-file", default=None,
                    help="read routed-inference overhead from this file when it exists (default: the suite's model's "
                    "file, " + ", ".join(f"{k}: {v}" for k, v in OVERHEAD_FILES.items()) + ")")
    ap.add_argument("--no-overhead", action="store_true", help="do not measure the overhead when the file is missing")
    ap.add_argument("--export-data", action="store_true",
                    help="also write the benchmark data (our JSONL + EasyEdit VQA JSON + PNG images) into OUT/data")
    ap.add_argument("--hparams", default=None, help='JSON: per-method hyper-parameters, e.g. {"ft_l": {"layer": 12}}')
    ap.add_argument("--refresh-overhead", metavar="DIR", default=None,
                    help="no benchmark: re-read DIR/results.json and details.json, take the routed-inference "
                    "overhead from --overhead-file (e.g. after re-measuring it on an idle machine) and rewrite "
                    "DIR's report and plots")
    ap.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                    help="no benchmark: merge the output folders of runs made in parallel (same suite, model and "
                    "protocol; e.g. --methods ldke in one process and --methods grace,lora,... in another) into "
                    "--out; the single-edit table keeps the runs with the most edits")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.overhead_file is None:
        args.overhead_file = OVERHEAD_FILES[args.suite]
    if args.prepare:
        from .smol_llava import build_smol_llava

        folder = build_smol_llava(args.cache_dir)
        print(f"benchmark MLLM ready at {folder}")
        return 0
    if args.refresh_overhead:
        out = Path(args.refresh_overhead)
        results = json.loads((out / "results.json").read_text())
        details = json.loads((out / "details.json").read_text())
        ov = _overhead_from_file(Path(args.overhead_file)) if args.overhead_file else None
        if ov is None:
            ap.error(f"no overhead measurement in {args.overhead_file}")
        results["inference_overhead"] = {k: ov["ratios"].get(k) for k in ("1", "1000")}
        details["inference_overhead"] = ov
        write_outputs(out, results, details, plots=not args.no_plots)
        print(f"rewrote {out}/report.md with the overhead of {args.overhead_file}")
        return 0
    if args.merge:
        from .merge import MergeError, merge_runs

        if not args.out:
            ap.error("--merge needs --out")
        try:
            results, details = merge_runs(args.merge)
        except MergeError as e:
            ap.error(str(e))
        write_outputs(Path(args.out), results, details, plots=not args.no_plots)
        print(markdown_report(results, details))
        print(f"merged {len(args.merge)} runs into {args.out}")
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    seq_methods = [m.strip() for m in args.sequential_methods.split(",") if m.strip()]
    unknown = [m for m in seq_methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown --sequential-methods {', '.join(unknown)}; known: {', '.join(METHODS)}")
    d = SUITES[args.suite]
    n_edits = args.n_edits if args.n_edits is not None else d["n_edits"]
    sequential = _parse_sizes(args.sequential) if args.sequential is not None else d["sequential"]
    t_all, c_all = time.perf_counter(), _cpu_seconds()
    commit = _git_commit()  # now: the checkout may move on while a long run goes
    suite = load_suite(args.suite, n_edits, device=args.device, cache_dir=args.cache_dir, seed=args.seed,
                       toy_entities=args.toy_entities, n_sequential=max(sequential, default=0), split=args.split)
    t_load, c_load = time.perf_counter() - t_all, _cpu_seconds() - c_all
    dev_methods = [m.strip() for m in args.dev_methods.split(",") if m.strip()] if args.split == "test" else []
    unknown = [m for m in dev_methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown --dev-methods {', '.join(unknown)}; known: {', '.join(METHODS)}")
    dev_methods = [m for m in dev_methods if m in methods]  # a process running other methods leaves them out
    results, details = run_benchmark(
        suite, methods, sequential=sequential,
        n_localization=args.localization if args.localization is not None else d["localization"],
        n_positions=args.positions if args.positions is not None else d["positions"],
        n_speed=args.speed if args.speed is not None else d["speed"],
        protocol=args.protocol, generate=not args.no_generate,
        hparams=json.loads(args.hparams) if args.hparams else None, sequential_methods=seq_methods,
        overhead_file=Path(args.overhead_file) if args.overhead_file else None,
        measure_overhead_if_missing=not args.no_overhead,
    )
    if dev_methods:
        t_dev, c_dev = time.perf_counter(), _cpu_seconds()
        dev_suite = load_suite(args.suite, n_edits, device=args.device, cache_dir=args.cache_dir, seed=args.seed,
                               toy_entities=args.toy_entities, split="dev")
        dev_suite.model, dev_suite.processor = suite.model, suite.processor  # one model in memory
        results["dev"], details["dev"] = run_dev(dev_suite, dev_methods, protocol=args.protocol,
                                                 generate=not args.no_generate,
                                                 hparams=json.loads(args.hparams) if args.hparams else None)
        details["dev"]["requests"] = [{"subject": r.subject, "relation": r.relation, "target": r.target}
                                      for r in dev_suite.requests]
        details["timings"]["dev split"] = time.perf_counter() - t_dev
        details["cpu_seconds"]["dev split"] = _cpu_seconds() - c_dev
    details["timings"]["load"] = t_load
    details["cpu_seconds"]["load"] = c_load
    details["timings"]["total"] = time.perf_counter() - t_all
    details["cpu_seconds"]["total"] = _cpu_seconds() - c_all
    details["machine"] = _machine()
    details["argv"] = list(argv) if argv is not None else sys.argv[1:]
    details["commit"] = commit
    out = Path(args.out or f"benchmarks/results/{args.suite}")
    write_outputs(out, results, details, plots=not args.no_plots)
    if args.export_data and suite.name in ("smoke", "full"):
        from .mke import export_mke

        export_mke(suite.requests, out / "data")
    print(markdown_report(results, details))
    print(f"wrote {out}/results.json, report.md" + ("" if args.no_plots else " and plots"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
