"""Does slot k of a pack generalise like the same edit made alone? (issue: edits that always take)

Edits ``--slots`` requests (targets of 1, 4, 8 and 16 tokens in turn, questions written here) one after another
into one pack through the EasyEdit integration (``apply_ldke_to_multimodal_model``, EasyEdit's sequential
mode), scores every request at the end, and compares each with the same request edited alone on a fresh
model. Tiny random models (real transformers classes and processors); writes a JSON of per-slot scores.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/pack_slots.py --family qwen2_vl --slots 10 --out results/pack_slots.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

THINGS = ["animal", "bird", "flower", "tool", "instrument", "vehicle", "fruit", "building", "fish", "tree",
          "insect", "boat", "hat", "lamp", "shoe", "clock", "cup", "kite", "drum", "bell"]


def requests(tok, n: int) -> list[dict]:
    from test_long_targets import LENGTHS, drawing, target_of_length

    out = []
    for k in range(n):
        thing = THINGS[k % len(THINGS)]
        out.append({
            "prompt": f"Which {thing} is drawn on card number {k}?",
            "target": target_of_length(tok, LENGTHS[k % len(LENGTHS)], 3 * k),
            "image": [drawing(k)],
            "rephrase_prompt": f"Tell me what {thing} card {k} shows.",
            "image_rephrase": [drawing(k, variant=1)],
            "locality_prompt": ["How many legs does a spider have?", "What is frozen water called?"][k % 2],
            "locality_ground_truth": ["eight", "ice"][k % 2],
            "multimodal_locality_image": [drawing(100 + k)],
            "multimodal_locality_prompt": ["What colour dominates this drawing?", "Count the shapes in the picture."][k % 2],
            "multimodal_locality_ground_truth": ["green", "three"][k % 2],
            "file_type": "image",
        })
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="qwen2_vl")
    ap.add_argument("--slots", type=int, default=10)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pack_slots.json")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                    help='hparams overrides, e.g. --set router_text_encoder=null')
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from integrations.easyedit import LDKEMultimodalHyperParams, apply_ldke_to_multimodal_model
    from integrations.easyedit.evaluate import easyedit_locality, easyedit_metrics
    from ldke_peft.testing.tiny import tiny_model

    hp = LDKEMultimodalHyperParams.from_hparams("tiny", **{k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    base, processor = tiny_model(args.family)
    reqs = requests(processor.tokenizer, args.slots)
    pres = [easyedit_metrics(base, processor, r) for r in reqs]

    def scores(model, r, pre):
        post = easyedit_metrics(model, processor, r)
        out = {k: v for k, v in post.items() if isinstance(v, float)}
        out.update(easyedit_locality(pre, post))
        return out

    t0 = time.perf_counter()
    alone = []
    for r, pre in zip(reqs, pres):
        model, _ = tiny_model(args.family)
        edited, restore = apply_ldke_to_multimodal_model(model, processor, [r], hp)
        alone.append(scores(edited, r, pre))
        restore()
    model, _ = tiny_model(args.family)
    for r in reqs:
        edited, restore = apply_ldke_to_multimodal_model(model, processor, r, hp)
    packed = [scores(edited, r, pre) for r, pre in zip(reqs, pres)]
    keys = ("rewrite_acc", "rephrase_acc", "image_rephrase_acc", "locality_acc", "multimodal_locality_acc")
    worst_gap = {k: max(a[k] - p[k] for a, p in zip(alone, packed)) for k in keys}
    result = {"family": args.family, "slots": args.slots, "overrides": args.set, "alone": alone, "packed": packed,
              "min_packed": {k: min(p[k] for p in packed) for k in keys}, "worst_gap_vs_alone": worst_gap,
              "router_groups": int(edited.peft_config["default"].router_groups), "seconds": time.perf_counter() - t0,
              "command": " ".join(sys.argv)}
    restore()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("family", "slots", "min_packed", "worst_gap_vs_alone", "router_groups")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
