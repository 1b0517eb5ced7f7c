"""Sequential editing: add facts to one edit pack one at a time, and check earlier edits survive.

Each ``ldke_peft.edit(..., pack=edited)`` call appends slots to the existing pack: earlier slots keep
their deltas and router keys, so an earlier edit can only be disturbed through routing (a new key
that captures its inputs). After every step this script re-measures *all* edits made so far, then
saves the pack, reloads it onto a fresh base with ``PeftModel.from_pretrained`` and measures again.

    python examples/sequential_editing.py --edits 4 --out ./seq-pack
"""

from __future__ import annotations

import argparse
import tempfile

from peft import PeftModel

import ldke_peft  # registers the LDKE PEFT type
from ldke_peft.testing.toy_world import toy_world


def fmt(v) -> str:
    return "  n/a" if v is None else f"{v:5.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=4, help="number of facts to add, one per step (default: 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder for the final pack (default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    if args.out:
        return run(args, args.out)
    with tempfile.TemporaryDirectory(prefix="ldke-sequential-") as out:  # removed at the end; --out keeps the pack
        return run(args, out)


def run(args: argparse.Namespace, out: str) -> int:

    world = toy_world(args.seed)
    processor = world.processor
    requests = world.edit_requests(args.edits, seed=args.seed)  # every probe filled: rephrasings, views, locality...

    # Hard negatives for the router: the questions and images this model is asked about. The router's
    # projection is learned with the first edit and kept for later ones, so a broad pool up front is
    # what lets later slots separate cleanly.
    pool = world.negative_pool()  # a NegativePool(questions=[(q, relation)], images=[(image, entity)])
    edited = None
    cols = ("reliability", "t_generality", "m_generality", "t_locality", "m_locality", "coupled_locality")
    short = {"reliability": "rel", "t_generality": "t_gen", "m_generality": "m_gen", "t_locality": "t_loc",
             "m_locality": "m_loc", "coupled_locality": "coupled"}
    print("step  new fact" + " " * 46 + "  ".join(f"{short[c]:>7s}" for c in cols) + "   (means over all edits so far)")
    history = []
    for step, req in enumerate(requests):
        if edited is None:
            edited = ldke_peft.edit(world.model, processor, [req], negatives=pool, progress=False)
        else:
            edited = ldke_peft.edit(edited, processor, [req], pack=edited, negatives=pool, progress=False)
        so_far = requests[: step + 1]
        m = ldke_peft.evaluate(edited, processor, so_far, generate=False)
        history.append(m)
        fact = f"{req.subject}.{req.relation}: {req.ground_truth} -> {req.target}"
        print(f"{step:4d}  {fact[:52]:52s}  " + "  ".join(f"{fmt(m[c]):>7s}" for c in cols))

    cfg = edited.peft_config["default"]
    per_edit = [p["reliability"] for p in history[-1]["per_request"]]
    print("reliability per edit after the last step: " + ", ".join(f"{v:.2f}" for v in per_edit))
    print(f"pack: {cfg.num_slots} slots on layers {cfg.edit_layers()}, router on layer {cfg.probe_layer}")
    edited.save_pretrained(out)

    fresh = toy_world(args.seed).model
    reloaded = PeftModel.from_pretrained(fresh, out)
    final = ldke_peft.evaluate(reloaded, processor, requests, generate=False)
    same = all(abs((final[c] or 0) - (history[-1][c] or 0)) < 1e-6 for c in cols)
    print("reloaded from " + out + ": " + "  ".join(f"{c}={fmt(final[c]).strip()}" for c in cols))
    print("reloaded metrics " + ("match" if same else "DIFFER from") + " the in-memory pack")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
