import gzip, json, sys, torch
from collections import defaultdict
IN = {"reliability", "t_generality", "x_in_scope", "lookalike_same_question"}
def run(f, cs):
    d = json.load(gzip.open(f, "rt"))
    for c in cs:
        agg = defaultdict(lambda: [0, 0])
        for e in d["edits"]:
            kinds = e["anchor_kinds"]; ak = torch.tensor(e["anchor_to_key"]); dist = torch.tensor(e["dist"])
            pos = torch.tensor([k == "pos" for k in kinds]); neg = torch.tensor([not k.startswith("pos") for k in kinds])
            if c is not None:
                neg = neg & (ak >= c * ak[pos].max())
            dp = dist[:, pos].min(1).values
            dn = dist[:, neg].min(1).values if neg.any() else torch.full_like(dp, float("inf"))
            routed = torch.tensor(e["inside"]) & ~(dn < dp)
            for k, r in zip(e["probe_kinds"], routed.tolist()):
                k = "near_miss" if k.startswith("near_miss") else k
                ok = r if k in IN else not r
                agg[k][0] += ok; agg[k][1] += 1
        print(f.split("/")[-1][:22], c, " ".join(f"{k}={a/n:.3f}" for k, (a, n) in sorted(agg.items()) if k in ("t_generality","x_in_scope","near_miss","x_near_miss")))
for f in sys.argv[1:]:
    run(f, [0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
