"""Routing study (#20, dev): the model's word-swap neighbours (swaps_lib.py) as textual negatives of the radius.
Wraps benchmarks/routing_study.py; the benchmark's pool is unchanged."""
import json
import os
import sys

sys.path.insert(0, "benchmarks")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ldke_peft.editing.scope_fit as scope_fit
from ldke_peft.editing.augment import dedupe
from swaps_lib import lm_swap_negatives

real = scope_fit.negative_questions
LOG = {}


def negative_questions(r, pool, pos_prompts, cap=32, hard=True):
    qs = real(r, pool, pos_prompts, cap=cap, hard=hard)
    if not hard:
        return qs
    gen = LOG[r.prompt] = lm_swap_negatives(r, pool, pos_prompts)
    return dedupe(gen + qs)[: cap + len(gen)]


scope_fit.negative_questions = negative_questions
import routing_study

rc = routing_study.main(sys.argv[1:])
out = sys.argv[sys.argv.index("--out") + 1]
with open(out.replace(".json", "_generated.json"), "w") as f:
    json.dump({"env": {k: v for k, v in os.environ.items() if k.startswith("LM_SWAP")}, "kept": LOG}, f, indent=1)
raise SystemExit(rc)
