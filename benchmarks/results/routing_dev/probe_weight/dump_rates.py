"""Per probe kind, the share of a dump's probes the library routed as it should (in-scope kinds to the slot,
the others to none). Usage: python dump_rates.py DUMP.json.gz [...]"""
import gzip
import json
import sys
from collections import defaultdict

IN_SCOPE = {"reliability", "t_generality", "x_in_scope"}
for path in sys.argv[1:]:
    d = json.load(gzip.open(path, "rt"))
    agg = defaultdict(lambda: [0, 0])
    for e in d["edits"]:
        for k, routed in zip(e["probe_kinds"], e["routed"]):
            agg[k][0] += int(bool(routed) == (k in IN_SCOPE))
            agg[k][1] += 1
    print(path, {k: round(a / n, 3) for k, (a, n) in sorted(agg.items())})
