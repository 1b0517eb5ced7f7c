"""Can the benchmark MLLM follow a new fact at all when it is *told* it? (issue: edits that propagate)

A related question (two-hop, reverse, presupposed) can only follow an edit if the model composes: uses the
fact it holds to answer a question about something else. Before asking a localized edit to propagate, this
measures the best case on the unedited model: the new fact is written into the prompt (no edit at all) and
each portability probe of the suite is scored as ``ldke bench`` scores it (teacher-forced answer tokens).

Columns per kind: ``plain`` (the probe as asked: what the unedited model gets) and one column per way of
stating the fact before the question. Only the probes the bench scores (the unedited model passes them for
the original fact) are used.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/portability_in_context.py --split dev --out results/portability_dev/in_context_dev.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Ways of stating the edited fact before a probe: ``{q}`` the edit question, ``{a}`` the new answer.
CONTEXTS = {
    "statement": "{q} {a}. {p}",
    "question_answer": "Question: {q} Answer: {a}. Question: {p}",
    "given": 'Given that the answer to "{q}" is {a}: {p}',
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=("dev", "test"), default="dev")
    ap.add_argument("--n-edits", type=int, default=None, help="edits of the split (default: all usable)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from ldke_peft.bench.suites import load_suite
    from ldke_peft.metrics import compute_metrics, mean_by_kind

    suite = load_suite("full", args.n_edits, split=args.split)
    reqs = [dataclasses.replace(r.without_probes(), portability=list(r.portability)) for r in suite.requests if r.portability]

    def scores(rewrite) -> dict[str, float]:
        rows = []
        for r in reqs:
            q = dataclasses.replace(r, portability=[dataclasses.replace(p, prompt=rewrite(r, p)) for p in r.portability])
            rows.append(compute_metrics(suite.model, suite.processor, [q], None, generate=False)["portability_by_kind"])
        return mean_by_kind(rows)

    out = {"plain": scores(lambda r, p: p.prompt)}
    for name, fmt in CONTEXTS.items():
        out[name] = scores(lambda r, p, fmt=fmt: fmt.format(q=r.prompt, a=r.target, p=p.prompt))
    counts: dict[str, int] = {}
    for r in reqs:
        for p in r.portability:
            k = p.kind.split(":")[0]
            counts[k] = counts.get(k, 0) + 1
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {"split": args.split, "requests": len(reqs), "probes_by_kind": counts, "portability_by_kind": out,
              "contexts": CONTEXTS, "commit": commit, "command": "python benchmarks/portability_in_context.py "
              + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for k, v in out.items():
        print(f"{k:16s}", {kk: round(vv, 3) for kk, vv in v.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
