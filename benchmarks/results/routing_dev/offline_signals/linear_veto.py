"""Offline, dev only (#20): the nearest-anchor veto replaced by a logistic regression over the slot's textual
anchors (in-scope vs out-of-scope), on the anchor-rules dumps. Usage: OMP_NUM_THREADS=1 python linear_veto.py"""
import gzip, json, sys, numpy as np, torch
torch.set_num_threads(1)
from sklearn.linear_model import LogisticRegression
from ldke_peft import LDKEConfig
from ldke_peft.tuner.question_key import load_encoder
enc = load_encoder(LDKEConfig().router_text_encoder).encode
D = str(__import__("pathlib").Path(__file__).resolve().parent.parent / "anchor_rules") + "/"
IN = ("t_generality", "x_in_scope"); NEAR = ("near_miss", "x_near_miss")
def run(path, C, thr, mode):
    d = json.load(gzip.open(D + path, "rt"))
    cnt = {k: [0, 0] for k in IN + NEAR}
    for e in d["edits"]:
        kinds = e["anchor_kinds"]; texts = e["anchor_texts"]
        keep = [i for i, k in enumerate(kinds) if k != "pos_template"]
        X = enc([texts[i] for i in keep]).numpy(); y = np.array([kinds[i] == "pos" for i in keep])
        if mode == "nb":
            keep2 = [j for j, i in enumerate(keep) if kinds[i] in ("pos", "neighbour", "neighbour_reph")]
            X, y = X[keep2], y[keep2]
        clf = LogisticRegression(C=C, class_weight="balanced", max_iter=2000).fit(X, y)
        P = enc(e["probe_texts"]).numpy()
        p = clf.predict_proba(P)[:, 1]
        for k, ins, pp, rt in zip(e["probe_kinds"], e["inside"], p, e["routed"]):
            if k not in cnt: continue
            r = bool(ins) and pp >= thr
            ok = r if k in IN else not r
            cnt[k][0] += ok; cnt[k][1] += 1
    return {k: round(a / b, 3) for k, (a, b) in cnt.items()}
for mode in ("all", "nb"):
    for C in (0.3, 1, 3, 10, 100):
        for thr in (0.5, 0.3):
            print(mode, C, thr, "pool", run("dump_pool.json.gz", C, thr, mode), "held", run("dump_hold_out.json.gz", C, thr, mode), flush=True)
