"""Diagnostic (#20, dev): the router's radius as it is, plus a nearest-row veto that also sees the model's
word-swap neighbours (swaps_lib.py): a probe routes only if its nearest textual row (router's own rows in the
projected space, plus the swap negatives) is a positive. Usage: knn.py N OUT [--no-swaps]"""
import json, os, sys
from collections import defaultdict
import torch
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ldke_peft.editing.editor as editor
import ldke_peft.editing.scope_fit as scope_fit
from ldke_peft import LDKEConfig, edit
from ldke_peft.bench.mke import editor_view
from ldke_peft.bench.run import load_suite
from ldke_peft.tuner.probe_features import collect_probe_features
from ldke_peft.editing.augment import dedupe
from swaps_lib import lm_swap_negatives

def _noop_fit(peft_model, processor, r, s, *, stats=None, **kw):
    if stats is not None:
        stats.update(capture=0.0, delta_fit=0.0, tokens=0, span=0)
    return 0, 1.0
editor.fit_delta = _noop_fit
real = scope_fit.negative_questions
SW = "--no-swaps" not in sys.argv
def with_swaps(r, pool, pos_prompts, cap=32, hard=True):
    qs = real(r, pool, pos_prompts, cap=cap, hard=hard)
    gen = lm_swap_negatives(r, pool, pos_prompts) if SW else []
    return dedupe(gen + qs)[: cap + len(gen)]
n = int(sys.argv[1])
suite = load_suite("full", n, split="dev")
agg = defaultdict(lambda: defaultdict(int))
miss = defaultdict(list)
for r in suite.requests[:n]:
    ev = editor_view(r)
    pm = edit(suite.model, suite.processor, [ev], LDKEConfig(), negatives=suite.pool, progress=False)
    cfg = pm.peft_config["default"]
    router = pm.base_model.router("default")
    labels = {}
    scope_fit.negative_questions = with_swaps
    try:
        rows, per = scope_fit.router_rows([ev], cfg, suite.pool, lambda k: labels.setdefault(k, len(labels)), seed=0)
    finally:
        scope_fit.negative_questions = real
    probes = [("t_generality", r.image, q) for q in r.rephrase_prompts]
    probes += [("reliability", r.image, r.prompt)]
    for p in r.coupled:
        k = "near_miss" if p.kind.startswith("near_miss") else p.kind
        if k in ("near_miss", "same_image_other_question"):
            probes.append((k, p.image, p.prompt))
    with torch.no_grad():
        v, t, h = collect_probe_features(pm, suite.processor, cfg.probe_layer, rows.images + [p[1] for p in probes],
                                         rows.prompts + [p[2] for p in probes])
        zv, zt = router.project(v, t)
    R = len(rows.prompts)
    tpos = torch.tensor(rows.t_pos)
    zpos, zneg = zt[:R][tpos], zt[:R][~tpos]
    negq = [q for q, p in zip(rows.prompts, rows.t_pos) if not p]
    route = router.route(v[R:], t[R:], h[R:]).tolist()
    for (kind, _, q), z, g in zip(probes, zt[R:], route):
        dp = float(torch.cdist(z[None], zpos).min())
        dn_all = torch.cdist(z[None], zneg)[0]
        dn = float(dn_all.min())
        a = agg[kind]
        a["n"] += 1
        a["routed"] += int(g == 0)
        for f in (1.0, 1.1, 1.25):
            a[f"routed_and_nn{f}"] += int(g == 0 and dp <= f * dn)
        if (g == 0) != (dp <= dn) or (g == 0 and kind == "near_miss"):
            miss[kind].append({"q": q, "routed": g == 0, "dp": round(dp, 3), "dn": round(dn, 3), "nearest_neg": negq[int(dn_all.argmin())]})
    pm.unload()
out = {k: {m: c / v["n"] if m != "n" else c for m, c in v.items()} for k, v in agg.items()}
print(json.dumps(out, indent=1))
json.dump({"command": " ".join(sys.argv), "env": {k: v for k, v in os.environ.items() if k.startswith("LM_SWAP")},
           "results": out, "cases": miss}, open(sys.argv[2], "w"), indent=1)
