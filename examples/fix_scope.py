"""Fix an edit's scope without re-editing: make it fire on a wording it missed, keep it off near-by questions.

An edit pack decides per question whether the edit applies (its router). Before shipping, route your own
questions through it: the wordings your users will ask (they should fire the edit) and the near-by questions
(same image, other facts; a look-alike image) that should keep the original answer. ``ldke_peft.refine_scope``
then changes only the router (never the edit's weights) so that each of them routes as you filed it; the
command-line equivalent is ``ldke route MODEL PACK checks.jsonl --fix FIXED_PACK``.

Runs offline on the toy world (a tiny LLaVA of invented countries, trained and cached on the first run).

    python examples/fix_scope.py --out ./fixed-pack
"""

from __future__ import annotations

import argparse
import tempfile

from peft import PeftModel

import ldke_peft
from ldke_peft import EditRequest, Probe
from ldke_peft.metrics.routes import which_slots
from ldke_peft.testing.toy_world import toy_world
from quickstart import answer  # greedy answer of a base or edited model (examples/quickstart.py)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for the fixed pack (default: a temporary folder, removed at the end)")
    parser.add_argument("--entity", type=int, default=3, help="which country of the toy world to edit")
    args = parser.parse_args(argv)
    if args.out:
        return run(args, args.out)
    with tempfile.TemporaryDirectory(prefix="ldke-fix-scope-") as out:
        return run(args, out)


def run(args: argparse.Namespace, out: str) -> int:
    world = toy_world()
    model, processor = world.model, world.processor
    country = world.entities[args.entity]
    image = world.render(country)
    question = "What is the national animal of the country shown?"
    old = answer(model, processor, image, question)
    new = next(a for a in world.answer_vocab("animal") if a != old)

    # 1. An edit made from its question alone (no rephrasings given).
    edit = EditRequest(image=image, prompt=question, target=new, ground_truth=old, subject=country, relation="animal")
    edited = ldke_peft.edit(model, processor, [edit], progress=False)

    # 2. Your checks, filed against the same edit (same image, question and target): wordings that should fire
    #    it, and near-by questions that should not (the same flag asked something else, also one that names the
    #    word the edit asks about; a look-alike flag). Wordings that name that word ("animal") fire already; one
    #    in other words may not.
    wording = "What creature is the symbol of the country in the picture?"
    checks = EditRequest(
        image=image, prompt=question, target=new,
        rephrase_prompts=["Which animal is the symbol of this country?", wording],
        coupled=[Probe("What is the capital of the country shown?", "-", image=image, kind="same_image"),
                 Probe("What language is spoken in the country shown?", "-", image=image, kind="same_image"),
                 Probe("What does the national animal of this country eat?", "-", image=image, kind="same_image"),
                 Probe(question, "-", image=world.render(world.lookalike_of(country)), kind="lookalike")],
    )
    before_answer = answer(edited, processor, image, wording)

    # 3. Fix: only the router changes; each row says where the question went before and after, and why.
    fixes = ldke_peft.refine_scope(edited, processor, [checks])
    print(f"{country}: {question}  {old} -> {new}")
    for f in fixes:
        where = {-1: "original weights"}
        print(f"  {f.kind:18s} {f.prompt[:58]:58s} {where.get(f.before, 'edit fired'):16s} -> "
              f"{where.get(f.after, 'edit fired'):16s} {'ok' if f.ok else 'NOT OK'}  {f.action}")
    after_answer = answer(edited, processor, image, wording)
    print(f"'{wording}': {before_answer} before the fix, {after_answer} after")

    # 4. Save with the model card, reload the PEFT way, and check the reloaded pack routes as the fixed one.
    ldke_peft.save_edits(edited, out)
    reloaded = PeftModel.from_pretrained(toy_world().model, out)
    rows = [(checks.image, checks.prompt)] + [(checks.image, q) for q in checks.rephrase_prompts] + \
        [(p.image, p.prompt) for p in checks.coupled]
    fired = [d["default"] for d in which_slots(reloaded, processor, [im for im, _ in rows], [q for _, q in rows])]
    same = fired == [f.after for f in fixes]
    print(f"saved to {out}; reloaded with PeftModel.from_pretrained: {'same routing' if same else 'DIFFERENT routing'}")
    recorded = reloaded.peft_config["default"].edits[0].get("scope_fixes", [])  # the pack says it was hand-fixed
    print(f"the pack records {len(recorded)} scope correction(s), listed on its model card ({out}/README.md)")
    return 0 if same and all(f.ok for f in fixes) and after_answer == new else 1


if __name__ == "__main__":
    raise SystemExit(main())
