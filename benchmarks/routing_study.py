"""Routing-only sequential study on the benchmark MLLM: where do a pack's probes route?

A sequential pack's locality misses are routing misses (a probe some slot takes), so a study of the
router alone tells scope variants apart in minutes instead of the ~20 s delta fit per edit: the delta
fit is replaced by a no-op (every slot's delta stays zero) and each probe's *routing decision* is read
from the pack's router on the same features inference computes. Per probe kind it reports the share
that routes as it should:

* ``reliability`` / ``t_generality`` / ``m_generality``: routed to the edit's own slot;
* ``m_locality`` / ``coupled`` (look-alike and same-image kinds) / ``near_miss`` / ``t_locality``:
  routed to no slot. An image probe that another edit of the pack covers (same entity and relation) is
  not scored, as in ``ldke bench``'s sequential table.

Run on the dev split to choose; the test split is for reporting::

    OMP_NUM_THREADS=1 python benchmarks/routing_study.py --split dev --out benchmarks/results/routing_dev.json
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch


def _noop_fit(peft_model, processor, r, s, *, stats=None, **kw):
    if stats is not None:
        stats.update(capture=0.0, delta_fit=0.0, tokens=0, span=0)
    return 0, 1.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="full", choices=("smoke", "full"))
    ap.add_argument("--split", default="dev", choices=("dev", "test"))
    ap.add_argument("--n", type=int, default=None, help="edits in the pack (default: every usable fact)")
    ap.add_argument("--checkpoints", default="10", help="comma-separated pack sizes also scored (the last is always)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="LDKEConfig override (JSON value), e.g. --set router_margin=0.4")
    ap.add_argument("--single", action="store_true", help="each edit alone on the base model (not one pack)")
    ap.add_argument("--hold-out-relation", action="store_true",
                    help="with --single: each edit's negative pool without the questions of its own relation (what a "
                         "test edit of the held-out relation gets: no caller wordings of the edited relation)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.hold_out_relation and not args.single:
        ap.error("--hold-out-relation needs --single (a pack shares one negative pool)")
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)

    import ldke_peft.editing.editor as editor
    from ldke_peft import LDKEConfig, edit
    from ldke_peft.requests import NegativePool
    from ldke_peft.bench.mke import editor_view
    from ldke_peft.bench.run import load_suite
    from ldke_peft.tuner.probe_features import collect_probe_features

    editor.fit_delta = _noop_fit
    suite = load_suite(args.suite, args.n, split=args.split)
    reqs = suite.requests[: args.n] if args.n else suite.requests
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    cps = sorted({int(c) for c in args.checkpoints.split(",") if c} | {len(reqs)})
    pack, out, t0 = None, {}, time.perf_counter()
    if args.single:
        per = []
        for r in reqs:
            pool = suite.pool
            if args.hold_out_relation:
                pool = NegativePool(questions=[(q, rel) for q, rel in pool.questions if rel != r.relation],
                                    images=pool.images)
            pm = edit(suite.model, suite.processor, [editor_view(r)], LDKEConfig(**overrides), negatives=pool,
                      progress=False)
            per.append(score(pm, suite.processor, [r], collect_probe_features))
            pm.unload()
        kinds = sorted({k for p in per for k in p if k != "slots"})
        out["single"] = {k: {"rate": sum(p[k]["rate"] * p[k]["n"] for p in per if k in p)
                             / max(1, sum(p[k]["n"] for p in per if k in p)),
                             "n": sum(p[k]["n"] for p in per if k in p),
                             "misses": [m for p in per if k in p for m in p[k]["misses"]]} for k in kinds}
        out["single"]["slots"] = [p["slots"][0] for p in per]
        print("single", json.dumps({a: round(b["rate"], 3) for a, b in out["single"].items() if a != "slots"}))
        reqs = []
    for i, r in enumerate(reqs):
        pack = edit(suite.model if pack is None else pack, suite.processor, [editor_view(r)],
                    None if pack is not None else LDKEConfig(**overrides), pack=pack, negatives=suite.pool,
                    progress=False)
        k = i + 1
        if k in cps:
            out[str(k)] = score(pack, suite.processor, reqs[:k], collect_probe_features)
            print(k, json.dumps({a: round(b["rate"], 3) for a, b in out[str(k)].items() if a != "slots"}), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "commit": commit, "overrides": overrides,
                                    "suite": args.suite, "split": args.split,
                                    "hold_out_relation": args.hold_out_relation, "seconds": time.perf_counter() - t0,
                                    "results": out}, indent=1))
    return 0


def score(pack, processor, reqs, collect) -> dict:
    router = pack.base_model.router("default")
    probe = pack.peft_config["default"].probe_layer
    facts = {(q.subject, q.relation) for q in reqs}
    rows = []  # (kind, image, prompt, wanted slot or -1, probe subject, probe relation)
    for s, r in enumerate(reqs):
        rows.append(("reliability", r.image, r.prompt, s, r.subject, r.relation))
        rows += [("t_generality", r.image, q, s, r.subject, r.relation) for q in r.rephrase_prompts]
        rows += [("m_generality", im, r.prompt, s, r.subject, r.relation) for im in r.rephrase_images]
        rows += [("t_locality", None, p.prompt, -1, p.subject, p.relation) for p in r.locality]
        for field, kind in (("m_locality", "m_locality"), ("coupled", None)):
            for p in getattr(r, field):
                if p.subject and p.relation and (p.subject, p.relation) != (r.subject, r.relation) \
                        and (p.subject, p.relation) in facts:
                    continue  # another edit of the pack covers it
                k = kind or ("near_miss" if p.kind.startswith("near_miss") else p.kind)
                rows.append((k, p.image, p.prompt, -1, p.subject, p.relation))
    with torch.no_grad():
        v, t, h = collect(pack, processor, probe, [x[1] for x in rows], [x[2] for x in rows])
        got = router.route(v, t, h, router.named_mask([x[2] for x in rows])).tolist()
    agg = defaultdict(lambda: [0, 0])
    misses = defaultdict(list)
    edited = {q.subject for q in reqs}
    for (kind, _, prompt, want, subj, rel), g in zip(rows, got):
        agg[kind][0] += int(g == want)
        agg[kind][1] += 1
        if g != want:
            misses[kind].append({"prompt": prompt, "subject": subj, "relation": rel, "subject_in_pack": subj in edited,
                                 "routed_to": None if g < 0 else [g, reqs[g].subject, reqs[g].relation]})
    out = {k: {"rate": a / n, "n": n, "misses": misses[k]} for k, (a, n) in sorted(agg.items())}
    out["slots"] = [{"subject": q.subject, "relation": q.relation, "group": router.slot_group(s),
                     "radius_v": float(router.radius_v[s]), "radius_t": float(router.radius_t[s]),
                     **{k: v for k, v in rep.router.items() if k not in ("radius_v", "radius_t")}}
                    for s, (q, rep) in enumerate(zip(reqs, pack.ldke_reports))]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
