import json, sys
rows = json.load(open(sys.argv[1]))
IN = {"t_generality", "x_in_scope"}; NM = {"near_miss", "x_near_miss"}
def auc(pos, neg):
    c = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg); return c / max(1, len(pos) * len(neg))
for key in [k for k in rows[0]["probes"][0] if k.endswith(("_mean", "_first"))]:
    pos, neg = [], []; per = []
    for r in rows:
        rel = r["probes"][0][key]
        ps = [p[key] - rel for p in r["probes"] if p["kind"] in IN]
        ns = [p[key] - rel for p in r["probes"] if p["kind"] in NM]
        pos += ps; neg += ns; per.append(auc(ps, ns))
    print(key, "pooled AUC %.3f" % auc(pos, neg), "mean per-edit AUC %.3f" % (sum(per) / len(per)))
    for rel_name in ("capital", "continent", "language"):
        p2 = [p[key] - r["probes"][0][key] for r in rows if r["relation"] == rel_name for p in r["probes"] if p["kind"] in IN]
        n2 = [p[key] - r["probes"][0][key] for r in rows if r["relation"] == rel_name for p in r["probes"] if p["kind"] in NM]
        print("   ", rel_name, "AUC %.3f" % auc(p2, n2), len(p2), len(n2))
