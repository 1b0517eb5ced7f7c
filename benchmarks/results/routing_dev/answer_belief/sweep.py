"""The unedited model's belief in the original answer (``answer_signal.json``: mean log-probability per token of the
edit's ground truth given the probe, minus the same given the edit question) used with the library's nearest-anchor
veto on the anchor-rules dumps: to lift a veto (``rescue``: a vetoed row routes when the signal >= tau) or as a
second veto (``veto``: a routed row is put out when the signal < tau). Dev only.
Usage: python sweep.py answer_signal.json DUMP.json.gz [DUMP.json.gz ...]"""
import gzip
import json
import sys

import torch

IN_SCOPE = {"reliability", "t_generality", "x_in_scope"}
KINDS = ("t_generality", "x_in_scope", "near_miss", "x_near_miss")

rows = {(r["subject"], r["relation"]): r for r in json.load(open(sys.argv[1]))}
for path in sys.argv[2:]:
    d = json.load(gzip.open(path))
    for mode, taus in (("library", [None]), ("rescue", [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5]),
                       ("veto", [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5])):
        for tau in taus:
            agg = {}
            for e in d["edits"]:
                r = rows[(e["subject"], e["relation"])]
                sig = {p["text"]: p["truth_mean"] - r["probes"][0]["truth_mean"] for p in r["probes"]}
                kinds = e["anchor_kinds"]
                dist = torch.tensor(e["dist"])
                pos = torch.tensor([k == "pos" for k in kinds])
                veto = (dist[:, ~pos].min(1).values < dist[:, pos].min(1).values).tolist()
                for k, t, ins, v in zip(e["probe_kinds"], e["probe_texts"], e["inside"], veto):
                    if k not in KINDS:
                        continue
                    s = sig[t]
                    routed = ins and not v
                    if mode == "rescue":
                        routed = ins and (not v or s >= tau)
                    elif mode == "veto":
                        routed = ins and not v and s >= tau
                    ok = routed if k in IN_SCOPE else not routed
                    a = agg.setdefault(k, [0, 0])
                    a[0] += ok
                    a[1] += 1
            print(path.split("/")[-1], mode, tau, {k: round(a / n, 3) for k, (a, n) in sorted(agg.items())})
