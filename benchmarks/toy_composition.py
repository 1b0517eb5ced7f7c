"""Does the toy world compose, or does it memorise its composed questions? (issue #23, item 1)

The toy world trains every entity's composed questions ("Which river flows through the capital of this
country?"), so an edit of ``capital(X)`` can only move ``river_of_capital(X)`` if the model answers it by
composing the two hops it knows (the image's capital, then that city's river) rather than from a memorised
answer. This study builds worlds (no cache) whose composed questions are *not* trained for a share of the
entities (``build_world(compose_holdout=...)``) and asks, on held-out views of those entities:

* each composed question (training and held-out wordings);
* its two hops separately: the image relation (``capital``) and the text fact about its answer (``river``);

and reports the share answered right, per relation, with the share among rows whose two hops are both right
(composition is only possible there). Trained entities are the memorisation baseline.

    OMP_NUM_THREADS=1 python benchmarks/toy_composition.py --sizes 16 64 --out composition.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from ldke_peft.testing.toy_world import ToyWorld, build_world
from ldke_peft.testing.toy_world.spec import IMAGE_TEMPLATES, RELATED, TEXT_TEMPLATES


def probe(world: "ToyWorld", entities: list[str], n_views: int = 2) -> dict:
    """Per relation: composed accuracy, hop accuracies and composed accuracy where both hops are right."""
    spec = world.spec
    rows = []  # (relation, entity, kind, image, prompt, answer)
    for e in entities:
        views = [world.render(e, v) for v in world.heldout_views(n_views)]
        for rel, info in RELATED.items():
            first = spec.answers[rel][e]
            second = spec.hops[info["hop"]][first]
            train_t, eval_t = IMAGE_TEMPLATES[info["composed"]]
            for k, img in enumerate(views):
                for t in train_t + eval_t:
                    rows.append((rel, e, k, "composed", img, t, second))
                rows.append((rel, e, k, "hop1", img, IMAGE_TEMPLATES[rel][0][0], first))
            rows.append((rel, e, -1, "hop2", None, TEXT_TEMPLATES[info["hop"]][0][0].format(x=first), second))
    preds = world.ask_many([r[4] for r in rows], [r[5] for r in rows])
    ok = {}
    for r, p in zip(rows, preds):
        ok.setdefault((r[0], r[1], r[2], r[3]), []).append(p == r[6])
    out = {}
    for rel in RELATED:
        comp = [(e, k, v) for (r, e, k, kind), vs in ok.items() if r == rel and kind == "composed" for v in vs]
        hops_ok = {(e, k): all(ok[(rel, e, k, "hop1")]) and all(ok[(rel, e, -1, "hop2")]) for e, k, _ in comp}
        both = [v for e, k, v in comp if hops_ok[(e, k)]]
        out[rel] = {
            "composed": sum(v for _, _, v in comp) / len(comp),
            "hop1": sum(all(vs) for (r, e, k, kind), vs in ok.items() if r == rel and kind == "hop1")
            / sum(1 for (r, e, k, kind) in ok if r == rel and kind == "hop1"),
            "hop2": sum(all(vs) for (r, e, k, kind), vs in ok.items() if r == rel and kind == "hop2")
            / sum(1 for (r, e, k, kind) in ok if r == rel and kind == "hop2"),
            "composed_where_both_hops_right": (sum(both) / len(both)) if both else None,
            "n_composed_rows": len(comp),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--holdout", type=float, default=0.5, help="share of entities whose compositions are not trained")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-entities", type=int, default=64, help="entities probed per side (held out / trained)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"command": "python benchmarks/toy_composition.py " + " ".join(argv or sys.argv[1:]),
              "commit": commit, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "worlds": []}
    for n in args.sizes:
        t0 = time.perf_counter()
        world = build_world(args.seed, n, evaluate=False, compose_holdout=args.holdout)
        held = world.spec.build_info.get("compose_heldout", [])
        trained = [e for e in world.spec.entities if e not in set(held)]
        if not held or not trained:
            raise SystemExit(f"--holdout {args.holdout} leaves {len(held)} of {n} entities out: nothing to compare")
        row = {"n_entities": n, "holdout": args.holdout, "build_seconds": time.perf_counter() - t0,
               "held_out_entities": len(held), "recipe": world.spec.build_info["recipe"],
               "held_out": probe(world, held[: args.max_entities]),
               "trained": probe(world, trained[: args.max_entities])}
        report["worlds"].append(row)
        print(json.dumps({k: row[k] for k in ("n_entities", "build_seconds", "held_out", "trained")}, indent=1), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
