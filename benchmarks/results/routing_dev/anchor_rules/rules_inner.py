"""Dev study (#20): leave out out-of-scope anchors nearer the key than c x a reference, offline on the dumps.

Usage: python rules_inner.py DUMP.json.gz [...] [--ref max|median|radius] [--c 0.5,0.8,...]
(max: the farthest in-scope anchor; median: the in-scope anchors' median distance; radius: the slot's textual radius).
Reads gzipped JSON only (nothing is unpickled).
"""
import argparse
import gzip
import json
from collections import defaultdict

import torch

IN = {"reliability", "t_generality", "x_in_scope", "lookalike_same_question"}


def run(f, cs, ref):
    d = json.load(gzip.open(f, "rt"))
    for c in cs:
        agg = defaultdict(lambda: [0, 0])
        for e in d["edits"]:
            kinds = e["anchor_kinds"]; ak = torch.tensor(e["anchor_to_key"]); dist = torch.tensor(e["dist"])
            pos = torch.tensor([k == "pos" for k in kinds]); neg = torch.tensor([not k.startswith("pos") for k in kinds])
            if c is not None:
                r = {"max": ak[pos].max(), "median": ak[pos].median(), "radius": torch.tensor(e["radius_t"])}[ref]
                neg = neg & (ak >= c * r)
            dp = dist[:, pos].min(1).values
            dn = dist[:, neg].min(1).values if neg.any() else torch.full_like(dp, float("inf"))
            routed = torch.tensor(e["inside"]) & ~(dn < dp)
            for k, rt in zip(e["probe_kinds"], routed.tolist()):
                k = "near_miss" if k.startswith("near_miss") else k
                ok = rt if k in IN else not rt
                agg[k][0] += ok; agg[k][1] += 1
        label = "" if ref == "max" else f"{ref} "
        print(f.split("/")[-1][:22], f"{label}{c}", " ".join(f"{k}={a/n:.3f}" for k, (a, n) in sorted(agg.items())
                                                        if k in ("t_generality", "x_in_scope", "near_miss", "x_near_miss")))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("dumps", nargs="+")
    ap.add_argument("--ref", default="max", choices=["max", "median", "radius"])
    ap.add_argument("--c", default="none,0.5,0.8,1.0,1.2")
    a = ap.parse_args()
    cs = [None if x == "none" else float(x) for x in a.c.split(",")]
    for f in a.dumps:
        run(f, cs, a.ref)
