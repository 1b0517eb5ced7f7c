"""Offline (#20, dev): per probe, the largest rise of its cosine to the key (edit question / in-scope centroid)
when one word is dropped. Usage: OMP_NUM_THREADS=1 python gain.py ../anchor_rules/dump_pool.json.gz OUT.json"""
import gzip, json, sys, torch, collections
import torch.nn.functional as F
torch.set_num_threads(1)
from ldke_peft.tuner.question_key import load_encoder
enc = load_encoder("sentence-transformers/all-MiniLM-L6-v2").encode
d = json.load(gzip.open(sys.argv[1]))
memo = {}
def emb(texts):
    new = [t for t in texts if t not in memo]
    if new:
        for t, e in zip(new, F.normalize(enc(new).float(), dim=-1)): memo[t] = e
    return torch.stack([memo[t] for t in texts])
def gain(q, key):
    words = q.split()
    if len(words) < 2: return 0.0, None
    rows = [" ".join(words[:i] + words[i+1:]) for i in range(len(words))]
    e = emb([q] + rows)
    s = e @ key
    g = s[1:] - s[0]
    i = int(g.argmax())
    return float(g[i]), words[i]
stats = collections.defaultdict(list)
out = {}
for e in d["edits"]:
    pos = [t for k, t in zip(e["anchor_kinds"], e["anchor_texts"]) if k == "pos"]
    key_q = emb([e["probe_texts"][0]])[0]
    key_c = F.normalize(emb(pos).mean(0), dim=-1)
    rec = []
    for k, t, inside, routed in zip(e["probe_kinds"], e["probe_texts"], e["inside"], e["routed"]):
        gq, wq = gain(t, key_q); gc, wc = gain(t, key_c)
        stats[k].append((gq, gc, inside, routed, t, wq, e["relation"]))
        rec.append((gq, gc))
    arec = []
    for k, t in zip(e["anchor_kinds"], e["anchor_texts"]):
        gq, wq = gain(t, key_q); gc, wc = gain(t, key_c)
        stats["A_" + k].append((gq, gc, True, True, t, wq, e["relation"])); arec.append((gq, gc))
    out[e["subject"] + "/" + e["relation"]] = {"probe": rec, "anchor": arec}
json.dump(out, open(sys.argv[2], "w"))
for j, name in ((0, "key=edit question"), (1, "key=in-scope centroid")):
    print("###", name)
    for k, v in sorted(stats.items()):
        ss = sorted(x[j] for x in v)
        q = lambda p: ss[min(len(ss)-1, int(p*len(ss)))]
        ins = sorted(x[j] for x in v if x[2])
        print(f"{k:28s} n={len(ss):4d} p10={q(.1):.3f} med={q(.5):.3f} p90={q(.9):.3f} max={ss[-1]:.3f}")
for k in ("t_generality", "x_in_scope", "near_miss", "x_near_miss"):
    print("==", k)
    seen = set()
    for gq, gc, inside, routed, t, w, rel in sorted(stats[k], key=lambda x: -x[1]):
        if (t, rel) in seen: continue
        seen.add((t, rel))
        print(f"  q={gq:.3f} c={gc:.3f} in={inside} routed={routed} [{w}] {rel}: {t}")
