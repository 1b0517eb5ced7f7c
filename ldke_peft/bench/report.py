"""The benchmark's report: the result schema, the bars, ``report.md`` and the files of a run.
:mod:`ldke_peft.bench.run` measures; this module formats and judges what it measured.
"""

from __future__ import annotations

import logging
import math
from typing import Any


from ..metrics import METRIC_KEYS
from .baselines import BASELINES

logger = logging.getLogger(__name__)

#: Keys of each ``results["methods"][name]``.
METHOD_KEYS: tuple[str, ...] = (*METRIC_KEYS, "edit_seconds_median", "adapter_bytes_per_edit")
RESULT_KEYS: tuple[str, ...] = ("suite", "model", "split", "n_edits", "methods", "sequential", "localization",
                                "edit_speed", "inference_overhead", "dev")
#: The bars (the scope issue's, on the test split): (metric, threshold) for LDKE's own numbers.
METRIC_BARS: tuple[tuple[str, float], ...] = (
    ("reliability", 0.99),
    ("t_generality", 0.95),
    ("m_generality", 0.97),
    ("t_locality", 0.99),
    ("m_locality", 0.99),
    ("coupled_locality", 0.98),
    ("near_miss_locality", 0.97),
)
MAX_BYTES_PER_EDIT = 100_000
#: The speed issue's bar: median seconds of one LDKE edit on the benchmark MLLM, one CPU thread.
MAX_EDIT_SECONDS = 5.0
#: Order of LDKE's edit phases in reports (a baseline has one, ``edit``).
PHASES: tuple[str, ...] = ("localize", "capture", "delta_fit", "router_fit", "edit")


# ---------------------------------------------------------------------- bars


def bars(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every bar of the spec with its measured value and ``PASS``/``MISS`` (``n/a`` when not measured)."""
    out: list[dict[str, Any]] = []
    methods = results.get("methods") or {}
    ldke = methods.get("ldke")

    def row(name: str, value: Any, ok: bool | None, detail: str = "") -> None:
        out.append({"bar": name, "value": value, "status": "n/a" if ok is None else ("PASS" if ok else "MISS"),
                    "detail": detail})

    baselines = [b for b in BASELINES if b in methods]
    for k in METRIC_KEYS:
        if ldke is None or ldke.get(k) is None or not baselines:
            row(f"LDKE >= every baseline on {k}", None, None)
            continue
        # a baseline above LDKE is a loss, at the ceiling or not
        beaten = [b for b in baselines if methods[b].get(k) is not None and methods[b][k] > ldke[k]]
        detail = ", ".join(f"{b} {methods[b][k]:.3f}" for b in beaten)
        row(f"LDKE >= every baseline on {k}", ldke[k], not beaten, ("beaten by " + detail) if beaten else "")
    for k, thr in METRIC_BARS:
        v = None if ldke is None else ldke.get(k)
        row(f"LDKE {k} >= {thr}", v, None if v is None else v >= thr)
    loc = results.get("localization") or {}
    sp, t1 = loc.get("speedup"), loc.get("top1_agreement")
    row("localization speedup >= 20x", sp, None if sp is None else sp >= 20)
    row("localization top-1 agreement >= 0.80", t1, None if t1 is None else t1 >= 0.8)
    ov = results.get("inference_overhead") or {}
    for k in ("1", "1000"):
        v = ov.get(k)
        row(f"routed inference overhead ({k} edit{'s' if k != '1' else ''}) <= 1.05x", v, None if v is None else v <= 1.05)
    b = None if ldke is None else ldke.get("adapter_bytes_per_edit")
    row("LDKE adapter bytes per edit <= 100 KB", b, None if b is None else b <= MAX_BYTES_PER_EDIT)
    t = None if ldke is None else ldke.get("edit_seconds_median")
    if results.get("suite") != "toy":
        row(f"LDKE edit seconds (median) <= {MAX_EDIT_SECONDS:g}", t, None if t is None else t <= MAX_EDIT_SECONDS)
    return out


# ---------------------------------------------------------------------- report


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{nd}f}"
    return str(v)


def _portability_kinds_table(details: dict[str, Any]) -> list[str]:
    """Portability per kind of related question (two-hop, reverse, ...), single edits; empty when no run
    recorded kinds. Each kind counts only the probes the unedited model passes for the original fact."""
    rows = {n: (m.get("summary") or {}).get("portability_by_kind") for n, m in (details.get("methods") or {}).items()
            if isinstance(m, dict)}
    rows = {n: r for n, r in rows.items() if r}
    if not rows:
        return []
    unedited = (details.get("unedited") or {}).get("portability_by_kind") or {}
    kinds = sorted({k for r in (*rows.values(), unedited) for k in r})
    counts = ((details.get("suite_info") or {}).get("portability_probes") or {}).get("by_kind") or {}
    out = ["", "## Portability by kind (single edits; mean over edits that have the kind)", "",
           "Only probes the unedited model answers correctly for the *original* fact are scored ("
           + (", ".join(f"{k}: {c['kept']} kept of {c['kept'] + c['dropped']}" for k, c in sorted(counts.items()))
              or "counts not recorded") + ").", "",
           "| method | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for n, r in rows.items():
        out.append(f"| {n} | " + " | ".join(_fmt(r.get(k)) for k in kinds) + " |")
    if unedited:
        out.append("| *(unedited model)* | " + " | ".join(_fmt(unedited.get(k)) for k in kinds) + " |")
    return out


def markdown_report(results: dict[str, Any], details: dict[str, Any]) -> str:
    lines = [f"# MKE benchmark: suite `{results['suite']}`", "",
             f"Model: {results['model']}. Edits: {results['n_edits']}. Split: `{results.get('split', 'test')}`. "
             f"Protocol: `{details.get('protocol')}`. "
             f"Machine: {details.get('machine', {}).get('summary', '')}", ""]
    if details.get("argv") is not None:
        lines += [f"Produced by `ldke bench {' '.join(details['argv'])}` at commit `{details.get('commit') or 'unknown'}`.", ""]
    lines += ["## Single edits (each edit alone on the base model; mean over edits)", ""]
    keys = list(METHOD_KEYS)
    lines.append("| method | " + " | ".join(keys) + " |")
    lines.append("|---|" + "---:|" * len(keys))
    for name, m in results["methods"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k), 1 if k == "edit_seconds_median" else 3) for k in keys) + " |")
    if details.get("unedited"):
        lines.append("| *(unedited model)* | " + " | ".join(_fmt(details["unedited"].get(k)) for k in keys) + " |")
    lines += _portability_kinds_table(details)
    dev = results.get("dev")
    if dev and dev.get("methods"):
        lines += ["", f"## Dev vs test (single edits; dev: {dev['n_edits']} edits, test: {results['n_edits']})", "",
                  "Defaults may be chosen on dev; test (the table above) is for reporting. The dev split never edits or "
                  "asks the held-out relation.", ""]
        lines.append("| method | split | " + " | ".join(METRIC_KEYS) + " |")
        lines.append("|---|---|" + "---:|" * len(METRIC_KEYS))
        for name, m in dev["methods"].items():
            for split, row in (("dev", m), ("test", results["methods"].get(name, {}))):
                lines.append(f"| {name} | {split} | " + " | ".join(_fmt(row.get(k)) for k in METRIC_KEYS) + " |")
        for split, row in (("dev", dev.get("unedited") or {}), ("test", details.get("unedited") or {})):
            lines.append(f"| *(unedited model)* | {split} | " + " | ".join(_fmt(row.get(k)) for k in METRIC_KEYS) + " |")
    if results.get("sequential"):
        lines += ["", "## Sequential editing (edits applied one after another; every edit so far evaluated)", "",
                  "An image probe that another edit of the pack covers (the entity and relation it asks were edited "
                  "too) is not scored as locality: that edit should change it (`probes_covered_by_other_edits`).", ""]
        sk = ["reliability", "min_reliability", "t_generality", "m_generality", "t_locality", "m_locality",
              "coupled_locality", "near_miss_locality", "portability", "adapter_bytes_per_edit", "seconds",
              "probes_covered_by_other_edits"]
        lines.append("| method | edits | " + " | ".join(sk) + " |")
        lines.append("|---|---:|" + "---:|" * len(sk))
        for name, by_n in results["sequential"].items():
            for n, m in by_n.items():
                lines.append(f"| {name} | {n} | " + " | ".join(_fmt(m.get(k)) for k in sk) + " |")
    timing = {n: m["timing"] for n, m in (details.get("methods") or {}).items() if isinstance(m, dict) and m.get("timing")}
    if timing:
        lines += ["", "## Edit time (wall seconds per single edit, this run)", ""]
        phases = sorted({p for t in timing.values() for p in t.get("phase_seconds_median", {})},
                        key=lambda p: (PHASES.index(p) if p in PHASES else len(PHASES), p))
        lines.append("| method | median | p90 | / grace | " + " | ".join(f"{p} (median)" for p in phases) + " |")
        lines.append("|---|---:|---:|---:|" + "---:|" * len(phases))
        g = (timing.get("grace") or {}).get("edit_seconds_median")
        for name, t in timing.items():
            med = t.get("edit_seconds_median")
            ratio = med / g if med is not None and g else None
            ph = t.get("phase_seconds_median", {})
            lines.append(f"| {name} | {_fmt(med, 2)} | {_fmt(t.get('edit_seconds_p90'), 2)} | {_fmt(ratio, 2)} | "
                         + " | ".join(_fmt(ph.get(p), 2) for p in phases) + " |")
        proj = {n: t for n, t in timing.items() if t.get("fit_tflop_median") is not None}
        if proj:
            lines += ["", "Delta-fit cost (median per edit): 6 FLOPs per weight per token per replayed layer per step "
                      "(forward + backward) over the tokens the fit runs; on a 7B decoder (32 layers, 202M weights per "
                      "layer) the same rows and steps over the same share of layers. The 7B edit time is this run's "
                      "median x the ratio of decoder weights, at this machine's rate (not measured on a 7B).", "",
                      "| method | fit TFLOP | fit TFLOP on a 7B | projected 7B edit seconds (this CPU) |",
                      "|---|---:|---:|---:|"]
            for n, t in proj.items():
                lines.append(f"| {n} | {_fmt(t['fit_tflop_median'], 2)} | {_fmt(t['fit_tflop_7b_median'], 1)} | "
                             f"{_fmt(t['projected_7b_edit_seconds_median'], 0)} |")
    loc = details.get("localization")
    if loc:
        lines += ["", "## Fast Localization vs exact causal tracing", ""]
        shown = {k: v for k, v in loc.items() if k != "heatmap"}
        lines.append("| " + " | ".join(shown) + " |")
        lines.append("|" + "---:|" * len(shown))
        lines.append("| " + " | ".join(_fmt(v) for v in shown.values()) + " |")
        lines.append("")
        lines.append("`speedup` = wall time of ROME-style per-(layer, position) tracing / Fast Localization, same requests.")
    es = details.get("edit_speed")
    if es:
        lines += ["", "## Edit speed (cached hidden states vs full forward/backward; same layers, same steps)", ""]
        lines.append("| " + " | ".join(es) + " |")
        lines.append("|" + "---:|" * len(es))
        lines.append("| " + " | ".join(_fmt(v) for v in es.values()) + " |")
    ov = details.get("inference_overhead")
    lines += ["", "## Routed inference overhead", ""]
    if ov:
        lines.append("| edits in pack | generate time / base |")
        lines.append("|---:|---:|")
        for k, v in (results.get("inference_overhead") or {}).items():
            lines.append(f"| {k} | {_fmt(v)} |")
        lines.append("")
        lines.append(f"Source: {ov.get('source')}" + (f" (model: {ov['model']})" if ov.get("model") else ""))
    else:
        lines.append("Not measured in this run.")
    lines += ["", "## Bars", "", "| bar | value | status | detail |", "|---|---:|---|---|"]
    for b in bars(results):
        lines.append(f"| {b['bar']} | {_fmt(b['value'])} | {b['status']} | {b['detail']} |")
    merged = details.get("merged_from")
    if merged:
        lines += ["", "## Runs merged into this report", "",
                  "| run | folder | single-edit rows | sequential | dropped single-edit rows (fewer edits) | command | commit |",
                  "|---:|---|---|---|---|---|---|"]
        for i, m in enumerate(merged, 1):
            cmd = " ".join(m.get("argv") or [])
            lines.append(f"| {i} | {m['folder']} | {', '.join(m['methods']) or '–'} | {', '.join(m['sequential']) or '–'} "
                         f"| {', '.join(m['dropped_methods']) or '–'} | `ldke bench {cmd}` | `{m.get('commit') or '–'}` |")
    t, c = details.get("timings", {}), details.get("cpu_seconds", {})
    if t:
        lines += ["", "## Timings", "", "Wall seconds on this machine, and CPU seconds of this process (all threads; on "
                  "a shared machine CPU seconds / cores is the wall time idle cores would take).", "",
                  "| phase | wall s | CPU s |", "|---|---:|---:|"]
        for k, v in t.items():
            lines.append(f"| {k} | {v:.1f} | {_fmt(c.get(k), 1)} |")
    return "\n".join(lines) + "\n"
