"""Offline, dev only (#20): the nearest-anchor veto computed on raw sentence-encoder cosines instead of the router's
projected [probe-layer text ; encoder] space, on the anchor-rules dumps. Usage: OMP_NUM_THREADS=1 python raw_veto.py"""
import gzip, json, sys, numpy as np, torch
torch.set_num_threads(1)
from ldke_peft import LDKEConfig
from ldke_peft.tuner.question_key import load_encoder
enc = load_encoder(LDKEConfig().router_text_encoder).encode
D = str(__import__("pathlib").Path(__file__).resolve().parent.parent / "anchor_rules") + "/"
IN = ("t_generality", "x_in_scope"); NEAR = ("near_miss", "x_near_miss")
for path in ("dump_pool.json.gz", "dump_hold_out.json.gz"):
    d = json.load(gzip.open(D + path, "rt"))
    cnt = {k: [0, 0] for k in IN + NEAR}; lib = {k: [0, 0] for k in IN + NEAR}
    for e in d["edits"]:
        kinds = e["anchor_kinds"]; keep = [i for i, k in enumerate(kinds) if k != "pos_template"]
        A = enc([e["anchor_texts"][i] for i in keep]); pos = torch.tensor([kinds[i] == "pos" for i in keep])
        P = enc(e["probe_texts"])
        sim = P @ A.T
        nearest_pos = pos[sim.argmax(1)]
        for k, ins, npos, rt in zip(e["probe_kinds"], e["inside"], nearest_pos.tolist(), e["routed"]):
            if k not in cnt: continue
            r = bool(ins) and npos
            cnt[k][0] += (r if k in IN else not r); cnt[k][1] += 1
            lib[k][0] += (rt if k in IN else not rt); lib[k][1] += 1
    print(path, "raw-cosine veto", {k: round(a / b, 3) for k, (a, b) in cnt.items()})
    print(path, "library        ", {k: round(a / b, 3) for k, (a, b) in lib.items()})
