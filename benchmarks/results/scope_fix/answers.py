"""Dev study (#20): the scope fix at the answer level, with the real edits (delta fitted, library defaults).

For N single dev edits of the full suite: ``evaluate`` (EasyEdit's metrics; locality = top-1 agreement with the
unedited model over the probe's tokens) before and after ``refine_scope`` with one of the edit's two near-miss probes
filed as out of scope (the **near** fix of ``study.py``). Scored, none filed: the suite's 9 T-Generality wordings,
the other near-miss probe and the other coupled probes; the 10 extra in-scope wordings and 6 extra near-miss
questions of ``../routing_dev/anchor_rules/extra_probes.py`` (their answers are not known: the extra near-miss
questions are teacher-forced with "x", which locality compares before and after the edit alike).
Usage: OMP_NUM_THREADS=1 python benchmarks/results/scope_fix/answers.py N OUT.json
"""
import dataclasses
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "routing_dev" / "anchor_rules"))
from extra_probes import EXTRA  # noqa: E402

import ldke_peft  # noqa: E402
from ldke_peft import LDKEConfig, Probe  # noqa: E402
from ldke_peft.bench.mke import editor_view  # noqa: E402
from ldke_peft.bench.suites import load_suite  # noqa: E402


def views(r):
    """The two requests scored: the suite's probes (minus the filed near-miss), and the extra questions."""
    near = [p for p in r.coupled if p.kind.startswith("near_miss")]
    suite_view = dataclasses.replace(r, coupled=[p for p in r.coupled if p is not near[0]], portability=[],
                                     consequences=[], rephrase_images=[], m_locality=[])
    extra = EXTRA.get(r.relation, {"in": [], "near": []})
    extra_view = dataclasses.replace(r, rephrase_prompts=list(extra["in"]), rephrase_images=[], locality=[], m_locality=[],
                                     portability=[], consequences=[],
                                     coupled=[Probe(q, "x", image=r.image, kind="near_miss_extra") for q in extra["near"]])
    return {"suite": suite_view, "extra": extra_view}, near[0]


def main():
    n, out_path = int(sys.argv[1]), sys.argv[2]
    suite = load_suite("full", n, split="dev")
    cols = ("t_generality", "near_miss_locality", "coupled_locality", "reliability")
    sums = defaultdict(lambda: [0.0, 0])
    rows = []
    for r in suite.requests[:n]:
        pm = ldke_peft.edit(suite.model, suite.processor, [editor_view(r)], LDKEConfig(), negatives=suite.pool,
                            progress=False)
        vs, filed_near = views(r)
        rec = {"subject": r.subject, "relation": r.relation}
        for state in ("before", "after"):
            if state == "after":
                filed = dataclasses.replace(editor_view(r), rephrase_prompts=[], rephrase_images=[],
                                            coupled=[Probe(filed_near.prompt, "x", image=filed_near.image, kind="near_miss")])
                ldke_peft.refine_scope(pm, suite.processor, [filed], progress=False)
            for name, v in vs.items():
                m = ldke_peft.evaluate(pm, suite.processor, [v], generate=False)
                for c in cols:
                    val = m.get(c)
                    if val is not None:
                        rec[f"{state}|{name}|{c}"] = float(val)
                        sums[f"{state}|{name}|{c}"][0] += float(val)
                        sums[f"{state}|{name}|{c}"][1] += 1
        rows.append(rec)
        print(r.subject, r.relation, {k: round(v, 3) for k, v in rec.items() if "|" in k}, flush=True)
        pm.unload()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    means = {k: round(a / b, 4) for k, (a, b) in sorted(sums.items())}
    json.dump({"argv": sys.argv, "commit": commit, "n_edits": n, "means": means, "per_edit": rows}, open(out_path, "w"),
              indent=1)
    for k, v in means.items():
        print(f"{k:45s} {v:.3f}")


if __name__ == "__main__":
    main()
