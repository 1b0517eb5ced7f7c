"""Offline veto rules over dump.py's distances (dev): per probe kind, the share routed as it should.
Usage: python rules.py DUMP.json.gz [DUMP.json.gz ...] OUT.json"""
import gzip
import json
import sys
from collections import defaultdict

import torch

IN_SCOPE = {"reliability", "t_generality", "x_in_scope"}


def rules():
    def nn(e, keep=lambda k: True, ratio=1.0, pos_kinds=("pos",)):
        kinds = e["anchor_kinds"]
        pos = torch.tensor([k in pos_kinds for k in kinds])
        neg = torch.tensor([not k.startswith("pos") and keep(k) for k in kinds])
        d = e["dist"]
        dp = d[:, pos].min(1).values
        dn = d[:, neg].min(1).values if neg.any() else torch.full_like(dp, float("inf"))
        return dn * ratio < dp

    def kth(e, k):
        kinds = e["anchor_kinds"]
        pos = torch.tensor([k_ == "pos" for k_ in kinds])
        negm = torch.tensor([not k_.startswith("pos") for k_ in kinds])
        d = e["dist"]
        dp = d[:, pos].min(1).values
        dn = d[:, negm].sort(1).values[:, min(k, int(negm.sum())) - 1]
        return dn < dp

    def vote(e, k):
        # the k nearest anchors vote; out of scope wins only with a majority
        kinds = e["anchor_kinds"]
        pos = torch.tensor([k_ == "pos" for k_ in kinds])
        negm = torch.tensor([not k_.startswith("pos") for k_ in kinds])
        idx = e["dist"][:, pos | negm].argsort(1)[:, :k]
        return (~pos[pos | negm][idx]).sum(1) * 2 > k

    def balanced(e):
        # as many out-of-scope anchors as in-scope ones: the ones nearest the key
        kinds = e["anchor_kinds"]
        pos = torch.tensor([k == "pos" for k in kinds])
        npos = int(pos.sum())
        ak = e["anchor_to_key"]
        negidx = torch.tensor([not k.startswith("pos") for k in kinds]).nonzero()[:, 0]
        keep = negidx[ak[negidx].argsort()[:npos]]
        d = e["dist"]
        return d[:, keep].min(1).values < d[:, pos].min(1).values

    out = {"none": lambda e: torch.zeros(len(e["probe_kinds"]), dtype=torch.bool),
           "nearest (library)": lambda e: nn(e),
           "nearest, template wordings in scope too": lambda e: nn(e, pos_kinds=("pos", "pos_template")),
           "neighbours only": lambda e: nn(e, lambda k: k.startswith("neighbour")),
           "neighbours w/o rephrasings + same-image": lambda e: nn(e, lambda k: k != "neighbour_reph"),
           "same-image only": lambda e: nn(e, lambda k: k == "same_image"),
           "ratio 0.9": lambda e: nn(e, ratio=1 / 0.9),
           "ratio 0.8": lambda e: nn(e, ratio=1 / 0.8),
           "2nd nearest neg": lambda e: kth(e, 2),
           "3rd nearest neg": lambda e: kth(e, 3),
           "4th nearest neg": lambda e: kth(e, 4),
           "5th nearest neg": lambda e: kth(e, 5),
           "vote k=3": lambda e: vote(e, 3),
           "vote k=5": lambda e: vote(e, 5),
           "vote k=7": lambda e: vote(e, 7),
           "balanced count": balanced}
    return out


def main():
    out = {"command": "python " + " ".join(sys.argv), "results": {}}
    dumps, outs = sys.argv[1:-1], sys.argv[-1:]
    for f in dumps:
        with gzip.open(f, "rt") as fh:
            d = json.load(fh)
        for e in d["edits"]:
            e.update({k: torch.tensor(e[k]) for k in ("dist", "inside", "routed", "anchor_to_key", "probe_to_key")})
        print(f, "hold_out_relation", d["hold_out_relation"])
        table = out["results"]["hold_out_relation" if d["hold_out_relation"] else "pool"] = {}
        all_rules = dict(rules())
        all_rules.update({f"first {n} neighbours (library rule)": first_n(n) for n in (2, 4, 6)})
        for name, rule in all_rules.items():
            agg = defaultdict(lambda: [0, 0])
            for e in d["edits"]:
                v = rule(e)
                routed = e["inside"] & ~v
                for k, r in zip(e["probe_kinds"], routed.tolist()):
                    ok = r if k in IN_SCOPE else not r
                    agg[k][0] += int(ok)
                    agg[k][1] += 1
            table[name] = {k: round(a / n, 3) for k, (a, n) in sorted(agg.items())}
            print(f"  {name:42s}", json.dumps(table[name]))
    if outs:
        with open(outs[0], "w") as fh:
            json.dump(out, fh, indent=1)


def source_of(e):
    """For each anchor, the index of the proposed neighbour it comes from (its rephrasings share the word that
    was swapped in), -1 for the other anchors."""
    kinds, texts = e["anchor_kinds"], e["anchor_texts"]
    gen = [t for k, t in zip(kinds, texts) if k == "neighbour"]
    out = []
    for k, t in zip(kinds, texts):
        if not k.startswith("neighbour"):
            out.append(-1)
            continue
        words = set(t.casefold().strip("?.").split())
        own = [set(g.casefold().strip("?.").split()) for g in gen]
        out.append(max(range(len(gen)), key=lambda j: (len(words & own[j]) - len(own[j] - words))))
    return out


def first_n(n):
    def rule(e):
        src = source_of(e)
        kinds = e["anchor_kinds"]
        pos = torch.tensor([k == "pos" for k in kinds])
        neg = torch.tensor([not k.startswith("pos") and (s < n) for k, s in zip(kinds, src)])
        d = e["dist"]
        return d[:, neg].min(1).values < d[:, pos].min(1).values
    return rule


if __name__ == "__main__":
    main()
