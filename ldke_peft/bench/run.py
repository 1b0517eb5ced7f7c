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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import LDKEConfig
from ..editor import edit
from ..scope import NegativePool
from ..families import family_of
from ..metrics import METRIC_KEYS, collect_pre, compute_metrics, mean_by_kind
from ..model import _root_model
from ..requests import EditRequest
from .baselines import BASELINES, Restore
from .mke import editor_view

logger = logging.getLogger(__name__)

__all__ = ["LDKE_VARIANTS", "METHODS", "METHOD_KEYS", "SUITES", "Suite", "bars", "load_suite", "main", "run_benchmark"]

#: LDKE and its ablations: config overrides.
LDKE_VARIANTS: dict[str, dict[str, Any]] = {
    "ldke": {},
    "ldke_no_router": {"use_router": False},
    "ldke_fixed_layer": {"localization": "fixed"},
    "ldke_no_hard_negatives": {"hard_negatives": False},
    # the textual key pooled from the probe layer's hidden states instead of read by the sentence encoder
    "ldke_probe_text": {"router_text_encoder": None, "router_text_margin": None},
}
METHODS: tuple[str, ...] = (*LDKE_VARIANTS, *BASELINES)
BASELINE_NAMES: tuple[str, ...] = tuple(BASELINES)
SEQUENTIAL_METHODS: tuple[str, ...] = ("ldke", "grace", "lora")
#: Keys of each ``results["methods"][name]``.
METHOD_KEYS: tuple[str, ...] = (*METRIC_KEYS, "edit_seconds_median", "adapter_bytes_per_edit")
RESULT_KEYS: tuple[str, ...] = ("suite", "model", "split", "n_edits", "methods", "sequential", "localization",
                                "edit_speed", "inference_overhead", "dev")
CHECKPOINTS: tuple[int, ...] = (1, 10, 100, 1000)

#: Defaults per suite (overridable on the command line).
SUITES: dict[str, dict[str, Any]] = {
    "smoke": {"n_edits": 10, "sequential": [1, 10], "localization": 10, "positions": 1, "speed": 1},
    "full": {"n_edits": None, "sequential": [1, 10, 100], "localization": 20, "positions": 3, "speed": 3},
    "toy": {"n_edits": 8, "sequential": [1, 10], "localization": 8, "positions": 2, "speed": 2},
}

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
#: Where ``benchmarks/inference_overhead.py`` keeps each suite model's routed-inference overhead.
OVERHEAD_FILES: dict[str, str] = {
    "toy": "benchmarks/results/inference_overhead.json",
    "smoke": "benchmarks/results/inference_overhead_smol_llava.json",
    "full": "benchmarks/results/inference_overhead_smol_llava.json",
}
#: The speed issue's bar: median seconds of one LDKE edit on the benchmark MLLM, one CPU thread.
MAX_EDIT_SECONDS = 5.0
#: Order of LDKE's edit phases in reports (a baseline has one, ``edit``).
PHASES: tuple[str, ...] = ("localize", "capture", "delta_fit", "router_fit", "edit")


# ---------------------------------------------------------------------- suites


@dataclass
class Suite:
    """A model, its processor, evaluation requests and the editors' negative pool."""

    name: str
    model: Any
    processor: Any
    model_name: str
    requests: list[EditRequest]
    pool: NegativePool
    info: dict[str, Any] = field(default_factory=dict)
    #: the single-edit table uses the first ``n_single`` requests (the sequential study may use more)
    n_single: int | None = None

    def __post_init__(self) -> None:
        if self.n_single is None:
            self.n_single = len(self.requests)


def load_suite(name: str, n_edits: int | None, *, device: str = "cpu", cache_dir: str | None = None,
               seed: int = 0, toy_entities: int | None = None, n_sequential: int = 0, split: str = "test") -> Suite:
    """Load the suite's model and build the requests of ``split`` (``"dev"`` or ``"test"``): ``n_edits`` for
    the single-edit table (``None`` = every usable fact) and, when ``n_sequential`` is larger, that many for
    the sequential study (as many as there are usable facts). The editors' negative pool is the same for
    both splits and disjoint from every probe of either."""
    if name == "toy":
        from ..testing.toy_world import toy_world

        world = toy_world(seed=seed, **({"n_entities": toy_entities} if toy_entities else {}))
        n = n_edits if n_edits is not None else len(world.entities)
        total = max(n, n_sequential)
        reqs = None
        while reqs is None:  # a world answers only so many facts of a split correctly: take what there is
            try:
                reqs = world.edit_requests(total, seed=seed + 1, split=split)
            except ValueError:
                if total <= 1:
                    raise
                total = max(1, min(total - 1, int(total * 0.8)))
                logger.info("toy world, %s split: trying %d edit requests", split, total)
        model = world.model.to(device)
        return Suite("toy", model, world.processor, f"toy_world(seed={seed}, entities={len(world.entities)})", reqs,
                     world.negative_pool(), {"entities": len(world.entities), "split": split},
                     n_single=min(n, len(reqs)))
    if name in ("smoke", "full"):
        from .mke import build_mke_requests, negative_pool, split_facts
        from .smol_llava import generate_answers, load_smol_llava

        model, processor, meta = load_smol_llava(cache_dir)
        model = model.to(device)

        def answer(images: list[Any], prompts: list[str]) -> list[str]:
            with torch.no_grad():
                return generate_answers(model, processor, images, prompts, max_new_tokens=16, batch_size=16)

        total = None if n_edits is None else max(n_edits, n_sequential)
        usable = len(split_facts(meta, split))
        reqs = build_mke_requests(meta, min(total, usable) if total else None, seed=seed, split=split, answer_fn=answer)
        reqs = _verified_views(reqs, answer)
        reqs, port = _verified_portability(reqs, answer)
        desc = (f"smol-llava: {meta['base_lm']['name']} in a LlavaForConditionalGeneration "
                f"({meta['n_image_tokens']} image tokens, build {meta['build_version']})")
        return Suite(name, model, processor, desc, reqs, negative_pool(meta),
                     {"usable_facts": usable, "split": split, "build": meta.get("code_version"),
                      "recognition": meta.get("recognition", {}).get("heldout_accuracy"),
                      "portability_probes": port},
                     n_single=len(reqs) if n_edits is None else min(n_edits, len(reqs)))
    raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")


def _verified_views(reqs: list[EditRequest], answer: Callable[[list[Any], list[str]], list[str]]) -> list[EditRequest]:
    """Keep the requests whose every probe view (the edit image and each rephrase image) the unedited
    model answers correctly with the edit question: an M-Generality probe the model got wrong before
    the edit measures the model, not the edit."""
    from .countries import answer_matches, country_by_name

    rows = [(i, im) for i, r in enumerate(reqs) for im in [r.image, *r.rephrase_images]]
    got = answer([im for _, im in rows], [reqs[i].prompt for i, _ in rows])
    bad = {i for (i, _), a in zip(rows, got)
           if not answer_matches(a, country_by_name(reqs[i].subject).answers(reqs[i].relation))}
    if bad:
        logger.info("dropped %d of %d requests: the unedited model misses one of their probe views", len(bad), len(reqs))
    return [r for i, r in enumerate(reqs) if i not in bad]


def _verified_portability(reqs: list[EditRequest], answer: Callable[[list[Any], list[str]], list[str]]
                          ) -> tuple[list[EditRequest], dict[str, Any]]:
    """Keep the portability probes the unedited model passes *for the original fact*; a probe it fails before
    any edit measures whether the model can reason in two hops (or back from an answer), not whether the edit
    propagates. Two-hop ("In which country is the capital of this country located?", on the edit image): the
    unedited model must name the entity shown. Reverse ("Which country has <answer> as its capital?", text
    only): asked with the *original* answer, it must name the entity. Returns the requests and
    ``{"kept": n, "dropped": m, "by_kind": {kind: {"kept", "dropped"}}}``."""
    from .countries import answer_matches, country_by_name
    from .mke import REVERSE_QUESTIONS

    def asked(r: EditRequest, p: Any) -> tuple[Any, str]:
        kind, _, rel = (p.kind or "").partition(":")
        if kind == "reverse" and r.ground_truth:
            return None, REVERSE_QUESTIONS[rel].format(x=r.ground_truth)
        return p.image, p.prompt

    rows = [(i, j) for i, r in enumerate(reqs) for j, p in enumerate(r.portability)]
    if not rows:
        return reqs, {"kept": 0, "dropped": 0, "by_kind": {}}
    questions = [asked(reqs[i], reqs[i].portability[j]) for i, j in rows]
    got: list[str] = [""] * len(rows)
    for text_only in (False, True):  # image rows and text-only rows in separate batches
        idx = [k for k, (im, _) in enumerate(questions) if (im is None) == text_only]
        if idx:
            for k, a in zip(idx, answer([questions[k][0] for k in idx], [questions[k][1] for k in idx])):
                got[k] = a
    keep: dict[int, list[int]] = {}
    by_kind: dict[str, dict[str, int]] = {}
    for (i, j), a in zip(rows, got):
        c = country_by_name(reqs[i].subject)
        ok = answer_matches(a, (c.name, c.prompt_name, *c.aliases))
        kind = (reqs[i].portability[j].kind or "portability").split(":")[0]
        by_kind.setdefault(kind, {"kept": 0, "dropped": 0})["kept" if ok else "dropped"] += 1
        if ok:
            keep.setdefault(i, []).append(j)
    kept = sum(len(v) for v in keep.values())
    logger.info("portability: the unedited model passes %d of %d probes for the original fact (%s); the others "
                "are not scored", kept, len(rows), by_kind)
    out = [dataclasses.replace(r, portability=[r.portability[j] for j in keep.get(i, [])]) if r.portability else r
           for i, r in enumerate(reqs)]
    return out, {"kept": kept, "dropped": len(rows) - kept, "by_kind": by_kind}


# ---------------------------------------------------------------------- methods


def _ldke_config(model: Any, overrides: dict[str, Any]) -> LDKEConfig:
    cfg = LDKEConfig(**{k: v for k, v in overrides.items() if k != "localization"})
    if overrides.get("localization") == "fixed":
        cfg.localization = "fixed"
        cfg.fixed_layers = [family_of(model).num_layers(model) // 2]
    return cfg


def ldke_bytes(pm: Any, adapter_name: str = "default") -> int:
    """Adapter bytes (safetensors payload) divided by the pack's number of slots."""
    from peft.utils import get_peft_model_state_dict

    from ..io import stored_state_dict

    sd = get_peft_model_state_dict(pm, state_dict=stored_state_dict(pm), adapter_name=adapter_name)
    n_slots = max(1, pm.peft_config[adapter_name].num_slots)
    return int(sum(t.numel() * t.element_size() for t in sd.values()) / n_slots)


def apply_ldke(model: Any, processor: Any, requests: Sequence[EditRequest], *, overrides: dict[str, Any],
               pool: NegativePool, pack: Any | None = None) -> tuple[Any, Restore]:
    """LDKE (or an ablation) in the baselines' ``(edited_model, restore)`` form."""
    pm = edit(model if pack is None else pack, processor, list(requests), _ldke_config(model, overrides),
              pack=pack, negatives=pool, progress=False)
    reports = getattr(pm, "ldke_reports", [])[-len(requests):]
    return pm, Restore(pm.unload, edit_bytes=ldke_bytes(pm),
                       info={"layers": [r.layers for r in reports], "fit_steps": [r.fit_steps for r in reports],
                             "router": [r.router for r in reports], "phases": [r.phases for r in reports],
                             "fit_tokens": [r.fit_tokens for r in reports], "fit_span": [r.fit_span for r in reports]})


def _editor_requests(r: EditRequest, method: str, protocol: str) -> list[EditRequest]:
    if protocol == "open" and method in LDKE_VARIANTS:
        return [r]
    return [editor_view(r)]


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
                  measure_overhead_if_missing: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
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
    for name in [m for m in SEQUENTIAL_METHODS if m in methods] if sequential else []:
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


# ---------------------------------------------------------------------- bars


def bars(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every bar of the spec with its measured value and ``PASS``/``MISS`` (``n/a`` when not measured)."""
    out: list[dict[str, Any]] = []
    methods = results.get("methods") or {}
    ldke = methods.get("ldke")

    def row(name: str, value: Any, ok: bool | None, detail: str = "") -> None:
        out.append({"bar": name, "value": value, "status": "n/a" if ok is None else ("PASS" if ok else "MISS"),
                    "detail": detail})

    baselines = [b for b in BASELINE_NAMES if b in methods]
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
        hparams=json.loads(args.hparams) if args.hparams else None,
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
