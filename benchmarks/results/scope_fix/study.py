"""Dev study (#20): does a scope fix (``refine_scope`` / ``ldke route --fix``) carry over to questions nobody filed?

For N dev edits of the full suite (library defaults; the delta fit replaced by a no-op, as in
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

Single edits (each alone, its fix filed alone) or, with ``--pack``, one pack of the N edits made one ``edit`` call
at a time and fixed in one ``refine_scope`` call with every edit's filing; in the pack, a coupled probe that another
edit of the pack covers (same subject and relation) is not scored.
Usage: OMP_NUM_THREADS=1 python benchmarks/results/scope_fix/study.py N OUT.json [--pack]
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


def probes_of(r, slot, facts=frozenset()):
    """(group, image, question, wanted slot) of every scored probe of ``r``; -1 = no slot. A coupled probe that
    another edit of the pack covers (its subject and relation are in ``facts``) is not scored, as in
    ``benchmarks/routing_study.py``: it may be that edit's question."""
    near = [p for p in r.coupled if p.kind.startswith("near_miss")]
    other = [p for p in r.coupled if not p.kind.startswith("near_miss")
             and not ((p.subject, p.relation) != (r.subject, r.relation) and (p.subject, p.relation) in facts)]
    extra = EXTRA.get(r.relation, {"in": [], "near": []})
    return ([("t_gen", r.image, q, slot) for q in r.rephrase_prompts] + [("x_in_scope", r.image, q, slot) for q in extra["in"]]
            + [("near_miss", p.image, p.prompt, -1) for p in near] + [("x_near_miss", r.image, q, -1) for q in extra["near"]]
            + [("other_coupled", p.image, p.prompt, -1) for p in other] + [("t_locality", None, p.prompt, -1) for p in r.locality])


def filings(r):
    """What each scenario files for ``r`` (None: nothing, the routing before any fix)."""
    near = [p for p in r.coupled if p.kind.startswith("near_miss")]
    base = dataclasses.replace(editor_view(r), rephrase_prompts=[], rephrase_images=[])
    filed_near = [Probe(near[0].prompt, "x", image=near[0].image, kind="near_miss")]
    return {"before": None, "near": dataclasses.replace(base, coupled=filed_near),
            "both": dataclasses.replace(base, rephrase_prompts=list(r.rephrase_prompts[:4]), coupled=filed_near)}


def tally_into(tally, examples, name, r, probes, routed, filed_qs):
    for (group, _, q, want), got in zip(probes, routed):
        g = ("filed " if q in filed_qs else "") + group
        ok = (got == want) if want >= 0 else (got < 0)
        tally[f"{name}|{g}"][0] += int(ok)
        tally[f"{name}|{g}"][1] += 1
        if not ok and name != "before":
            examples[f"{name}|{g}"].append(f"{r.subject}/{r.relation}: {q}")


def main():
    editor.fit_delta = _noop_fit
    n, out_path, as_pack = int(sys.argv[1]), sys.argv[2], "--pack" in sys.argv
    suite = load_suite("full", n, split="dev")
    reqs = suite.requests[:n]
    tally = defaultdict(lambda: [0, 0])  # (scenario, group) -> [routed as wished, total]
    examples = defaultdict(list)
    if not as_pack:
        for r in reqs:
            pm = edit(suite.model, suite.processor, [editor_view(r)], LDKEConfig(), negatives=suite.pool, progress=False)
            score(pm, suite.processor, [r], [probes_of(r, 0)], tally, examples)
            print(r.subject, r.relation, {k: f"{a}/{b}" for k, (a, b) in sorted(tally.items())}, flush=True)
            pm.unload()
    else:
        pm = None
        for r in reqs:
            pm = edit(suite.model if pm is None else pm, suite.processor, [editor_view(r)],
                      None if pm is not None else LDKEConfig(), pack=pm, negatives=suite.pool, progress=False)
        facts = {(r.subject, r.relation) for r in reqs}
        score(pm, suite.processor, reqs, [probes_of(r, s, facts) for s, r in enumerate(reqs)], tally, examples)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {"argv": sys.argv, "commit": commit, "n_edits": n, "pack": as_pack,
           "shares": {k: {"ok": a, "n": b, "share": round(a / b, 3)} for k, (a, b) in sorted(tally.items())},
           "misrouted_after_fix": {k: v for k, v in sorted(examples.items())}}
    json.dump(res, open(out_path, "w"), indent=1)
    for k, (a, b) in sorted(tally.items()):
        print(f"{k:40s} {a:4d}/{b:4d} = {a / b:.3f}")


def score(pm, processor, reqs, probe_lists, tally, examples):
    """Route every request's probes before and after each scenario's fix (all requests' filings in one call)."""
    cfg = pm.peft_config["default"]
    router = pm.base_model.router("default")
    probes = [p for ps in probe_lists for p in ps]
    owner = [i for i, ps in enumerate(probe_lists) for _ in ps]
    v, t, h = collect_probe_features(pm, processor, cfg.probe_layer, [p[1] for p in probes], [p[2] for p in probes])
    snap, anchors = _snapshot(router), cfg.router_text_anchors
    for name in ("before", "near", "both"):
        filed = [filings(r)[name] for r in reqs]
        if filed[0] is not None:
            refine_scope(pm, processor, filed)
        routed = router.route(v, t, h).tolist()
        for i, r in enumerate(reqs):
            mine = [j for j, o in enumerate(owner) if o == i]
            f = filed[i]
            filed_qs = set() if f is None else {f.prompt, *f.rephrase_prompts, *(p.prompt for p in f.coupled)}
            tally_into(tally, examples, name, r, [probes[j] for j in mine], [routed[j] for j in mine], filed_qs)
        _restore(router, snap)
        cfg.router_text_anchors = anchors


if __name__ == "__main__":
    main()
