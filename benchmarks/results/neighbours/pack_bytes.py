"""Bytes per single-edit pack with the default config (float16 anchors), on the first dev edits of the full suite,
measured as the benchmark measures them (ldke_peft.bench.run.ldke_bytes). Usage: pack_bytes.py N OUT"""
import json
import statistics
import subprocess
import sys

import torch

torch.set_num_threads(1)
from ldke_peft import edit
from ldke_peft.bench.mke import editor_view
from ldke_peft.bench.run import ldke_bytes, load_suite

n, out = int(sys.argv[1]), sys.argv[2]
suite = load_suite("full", n, split="dev")
rows = []
for r in suite.requests[:n]:
    pm = edit(suite.model, suite.processor, [editor_view(r)], negatives=suite.pool, progress=False)
    router = pm.base_model.router("default")
    rows.append({"subject": r.subject, "relation": r.relation, "bytes": ldke_bytes(pm), "anchors": router.num_anchors,
                 "anchor_dtype": str(router.anchors_t.dtype)})
    pm.unload()
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
res = {"command": " ".join(sys.argv), "commit": commit, "median_bytes": statistics.median(x["bytes"] for x in rows),
       "rows": rows}
json.dump(res, open(out, "w"), indent=1)
print(res["median_bytes"], rows)
