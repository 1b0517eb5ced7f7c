"""Offline (#20, dev): each probe with its asked-for word swapped for the edit's; how far its meaning moves
(cosine of the two sentence embeddings). Usage: OMP_NUM_THREADS=1 python swap.py ../anchor_rules/dump_pool.json.gz OUT.json"""
import gzip, json, sys, torch, re
import torch.nn.functional as F
torch.set_num_threads(1)
from ldke_peft.tuner.question_key import load_encoder
from ldke_peft.editing.neighbours import _asked_for_word, frame_words, _bare
from ldke_peft.bench.suites import load_suite
enc = load_encoder("sentence-transformers/all-MiniLM-L6-v2").encode
d = json.load(gzip.open(sys.argv[1]))
suite = load_suite("full", 2, split="dev")
frame = frame_words([q for q, _ in suite.pool.questions])
def swap_sim(q, we):
    words = q.split(); i = _asked_for_word(q, frame, enc)
    if i is None: return 1.0, None
    w = words[i]; tail = w[len(w.rstrip("?,.!;:")):]
    if _bare(w).rstrip("s") == we.rstrip("s"): return 1.0, w
    q2 = " ".join(words[:i] + [we + tail] + words[i+1:])
    e = F.normalize(enc([q, q2]).float(), dim=-1)
    return float(e[0] @ e[1]), w
out = {}
import collections
stats = collections.defaultdict(list)
for e in d["edits"]:
    we_i = _asked_for_word(e["probe_texts"][0], frame, enc)
    we = _bare(e["probe_texts"][0].split()[we_i])
    rows = []
    for k, t, inside, routed in zip(e["probe_kinds"], e["probe_texts"], e["inside"], e["routed"]):
        s, w = swap_sim(t, we)
        rows.append(s)
        stats[k].append((s, inside, routed, t, e["relation"]))
    # anchors
    ans = []
    for k, t in zip(e["anchor_kinds"], e["anchor_texts"]):
        s, w = swap_sim(t, we); ans.append(s); stats["A_" + k].append((s, True, True, t, e["relation"]))
    out[e["subject"] + "/" + e["relation"]] = {"we": we, "probe_s": rows, "anchor_s": ans}
json.dump(out, open(sys.argv[2], "w"))
for k, v in sorted(stats.items()):
    ss = sorted(x[0] for x in v)
    q = lambda p: ss[min(len(ss)-1, int(p*len(ss)))]
    print(f"{k:28s} n={len(ss):4d} min={ss[0]:.3f} p10={q(.1):.3f} p25={q(.25):.3f} med={q(.5):.3f}")
for k in ("t_generality", "x_in_scope", "near_miss", "x_near_miss"):
    print("==", k)
    seen=set()
    for s, inside, routed, t, rel in sorted(stats[k]):
        if (t,rel) in seen: continue
        seen.add((t,rel))
        if (k in ("t_generality","x_in_scope") and s < 0.9) or (k not in ("t_generality","x_in_scope") and (routed or s>0.8)):
            print(f"  {s:.3f} in={inside} routed={routed} {rel}: {t}")
