"""Dev study (#20): does a scope fix (``refine_scope`` / ``ldke route --fix``) carry over to questions nobody filed?

For N single dev edits of the full suite (library defaults; the delta fit replaced by a no-op, as in
``benchmarks/routing_study.py``: only routing is read), each edit's probes are routed before and after a fix that
files some of them, and the share routed as wished is reported separately for the filed questions and for the
ones left out of the fix:

* ``near``: one of the edit's two near-miss probes filed as out of scope; the other near-miss probe and the six
  extra near-miss questions of ``../routing_dev/anchor_rules/extra_probes.py`` are not filed;
* ``both``: as ``near``, and the first 4 of the edit's 9 T-Generality wordings filed as in scope; the other 5 and
  the 10 extra in-scope wordings are not filed.

Every other probe of the edit (same-image questions of other relations, look-alike images, text-only locality) is
scored too, unfiled, for collateral damage. Routing level: shares of probes routed to the edit's slot (in scope)
or to none (out of scope), read from the router on the features inference computes.
Usage: OMP_NUM_THREADS=1 python benchmarks/results/scope_fix/study.py N OUT.json
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

import ldke_peft.editing.editor as editor  # noqa: E402
from ldke_peft import LDKEConfig, Probe, edit  # noqa: E402
from ldke_peft.bench.mke import editor_view  # noqa: E402
from ldke_peft.bench.suites import load_suite  # noqa: E402
from ldke_peft.editing.scope_refine import _restore, _snapshot, refine_scope  # noqa: E402
from ldke_peft.tuner.probe_features import collect_probe_features  # noqa: E402


def _noop_fit(peft_model, processor, r, s, *, stats=None, **kw):
    if stats is not None:
        stats.update(capture=0.0, delta_fit=0.0, tokens=0, span=0)
    return 0, 1.0


editor.fit_delta = _noop_fit
n, out_path = int(sys.argv[1]), sys.argv[2]
suite = load_suite("full", n, split="dev")
tally = defaultdict(lambda: [0, 0])  # (scenario, group) -> [routed as wished, total]
examples = defaultdict(list)
for r in suite.requests[:n]:
    pm = edit(suite.model, suite.processor, [editor_view(r)], LDKEConfig(), negatives=suite.pool, progress=False)
    cfg = pm.peft_config["default"]
    router = pm.base_model.router("default")
    near = [p for p in r.coupled if p.kind.startswith("near_miss")]
    other = [p for p in r.coupled if not p.kind.startswith("near_miss")]
    extra = EXTRA.get(r.relation, {"in": [], "near": []})
    tgen = list(r.rephrase_prompts)
    # (group, image, question, wanted slot): 0 = the edit, -1 = none
    probes = ([("t_gen", r.image, q, 0) for q in tgen] + [("x_in_scope", r.image, q, 0) for q in extra["in"]]
              + [("near_miss", p.image, p.prompt, -1) for p in near] + [("x_near_miss", r.image, q, -1) for q in extra["near"]]
              + [("other_coupled", p.image, p.prompt, -1) for p in other] + [("t_locality", None, p.prompt, -1) for p in r.locality])
    v, t, h = collect_probe_features(pm, suite.processor, cfg.probe_layer, [p[1] for p in probes], [p[2] for p in probes])
    snap, anchors = _snapshot(router), cfg.router_text_anchors
    base = dataclasses.replace(editor_view(r), rephrase_prompts=[], rephrase_images=[])
    filings = {"before": None,
               "near": dataclasses.replace(base, coupled=[Probe(near[0].prompt, "x", image=near[0].image, kind="near_miss")]),
               "both": dataclasses.replace(base, rephrase_prompts=tgen[:4],
                                           coupled=[Probe(near[0].prompt, "x", image=near[0].image, kind="near_miss")])}
    for name, filed in filings.items():
        filed_qs = set()
        if filed is not None:
            refine_scope(pm, suite.processor, [filed])
            filed_qs = {filed.prompt, *filed.rephrase_prompts, *(p.prompt for p in filed.coupled)}
        routed = router.route(v, t, h)
        for (group, _, q, want), got in zip(probes, routed.tolist()):
            g = ("filed " if q in filed_qs else "") + group
            ok = (got == 0) if want == 0 else (got < 0)
            tally[f"{name}|{g}"][0] += int(ok)
            tally[f"{name}|{g}"][1] += 1
            if not ok and name != "before":
                examples[f"{name}|{g}"].append(f"{r.subject}/{r.relation}: {q}")
        _restore(router, snap)
        cfg.router_text_anchors = anchors
    print(r.subject, r.relation, {k: f"{a}/{b}" for k, (a, b) in sorted(tally.items())}, flush=True)
    pm.unload()
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
res = {"argv": sys.argv, "commit": commit, "n_edits": n,
       "shares": {k: {"ok": a, "n": b, "share": round(a / b, 3)} for k, (a, b) in sorted(tally.items())},
       "misrouted_after_fix": {k: v for k, v in sorted(examples.items())}}
json.dump(res, open(out_path, "w"), indent=1)
for k, (a, b) in sorted(tally.items()):
    print(f"{k:40s} {a:4d}/{b:4d} = {a / b:.3f}")
