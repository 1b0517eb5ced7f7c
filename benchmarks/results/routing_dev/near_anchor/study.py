"""Diagnostic (#20, dev): would a nearest-anchor textual decision (closer to a positive row than to any negative
row, in the router's projected space) keep near-miss questions out while admitting unseen rewordings?"""
import json, sys
from collections import defaultdict
import torch
torch.set_num_threads(1)
import ldke_peft.editing.editor as editor
from ldke_peft import LDKEConfig, edit
from ldke_peft.bench.mke import editor_view
from ldke_peft.bench.run import load_suite
from ldke_peft.tuner.probe_features import collect_probe_features
from ldke_peft.editing.scope_fit import router_rows

def _noop_fit(peft_model, processor, r, s, *, stats=None, **kw):
    if stats is not None:
        stats.update(capture=0.0, delta_fit=0.0, tokens=0, span=0)
    return 0, 1.0
editor.fit_delta = _noop_fit
n = int(sys.argv[1])
suite = load_suite("full", n, split="dev")
agg = defaultdict(lambda: defaultdict(int))
for r in suite.requests[:n]:
    ev = editor_view(r)
    pm = edit(suite.model, suite.processor, [ev], LDKEConfig(), negatives=suite.pool, progress=False)
    cfg = pm.peft_config["default"]
    router = pm.base_model.router("default")
    labels = {}
    rows, per = router_rows([ev], cfg, suite.pool, lambda k: labels.setdefault(k, len(labels)), seed=0)
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
    key, rad = router.keys_t[0].float(), float(router.radius_t[0])
    route = router.route(v[R:], t[R:], h[R:]).tolist()
    for (kind, _, q), z, g in zip(probes, zt[R:], route):
        dk = float((z - key).norm())
        dp = float(torch.cdist(z[None], zpos).min())
        dn = float(torch.cdist(z[None], zneg).min()) if len(zneg) else float("inf")
        a = agg[kind]
        a["n"] += 1
        a["routed"] += int(g == 0)
        a["text_in_radius"] += int(dk <= rad)
        a["nn_pos"] += int(dp <= dn)
        a["radius_and_nn"] += int(dk <= rad and dp <= dn)
        a["routed_and_nn"] += int(g == 0 and dp <= dn)
    pm.unload()
out = {k: {m: c / v["n"] if m != "n" else c for m, c in v.items()} for k, v in agg.items()}
print(json.dumps(out, indent=1))
json.dump({"command": " ".join(sys.argv), "results": out}, open(sys.argv[2], "w"), indent=1)
