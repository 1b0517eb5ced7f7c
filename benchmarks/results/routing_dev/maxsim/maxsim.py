"""Dev study (#20): late interaction (ColBERT-style MaxSim over the sentence encoder's token embeddings) in place of
the pooled embedding for the nearest-anchor veto, offline on the anchor-rules dumps. ``maxsim``: the nearest anchor by
symmetric MaxSim over all tokens; ``_content``: without frame and function words; ``rawcos``: the pooled encoder
cosine; ``lib``: the library's rule on the dump's distances; AND / OR: both or either veto.
Usage: OMP_NUM_THREADS=1 python maxsim.py DUMP.json.gz [DUMP.json.gz ...]"""
import gzip, json, sys
from collections import defaultdict
import torch, torch.nn.functional as F
from ldke_peft.tuner.question_key import DEFAULT_TEXT_ENCODER, load_encoder
torch.set_num_threads(1)
_enc = load_encoder(DEFAULT_TEXT_ENCODER)  # the library's loader: safetensors only, no remote code
tok, m = _enc.tokenizer, _enc.model
IN_SCOPE = {"reliability", "t_generality", "x_in_scope"}
STOP = set("what which is are the this that of in on a an do does to for me tell name give you know country nation shown picture image ? . , 's".split())
cache = {}
@torch.no_grad()
def toks(texts):
    todo = [t for t in dict.fromkeys(texts) if t not in cache]
    for i in range(0, len(todo), 64):
        b = tok(todo[i:i+64], padding=True, return_tensors="pt")
        h = m(**b).last_hidden_state
        for j, t in enumerate(todo[i:i+64]):
            ids = b["input_ids"][j]; msk = b["attention_mask"][j].bool()
            words = tok.convert_ids_to_tokens(ids[msk])
            hh = h[j][msk]
            pooled = F.normalize(hh.mean(0), dim=-1)
            keep = [k for k, w in enumerate(words) if w not in ("[CLS]", "[SEP]")]
            keep_c = [k for k in keep if words[k].lower().strip("#") not in STOP] or keep
            cache[t] = (F.normalize(hh[keep], dim=-1), F.normalize(hh[keep_c], dim=-1), pooled)
    return [cache[t] for t in texts]

def maxsim(q, a, content):
    Q = q[1] if content else q[0]; A = a[1] if content else a[0]
    s = Q @ A.T
    return 0.5 * (s.max(1).values.mean() + s.max(0).values.mean())

def run(path):
    d = json.load(gzip.open(path))
    res = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for e in d["edits"]:
        kinds = e["anchor_kinds"]; pos = torch.tensor([k == "pos" for k in kinds]); neg = torch.tensor([not k.startswith("pos") for k in kinds])
        A = toks(e["anchor_texts"]); P = toks(e["probe_texts"])
        dist = torch.tensor(e["dist"]); inside = torch.tensor(e["inside"])
        lib = dist[:, neg].min(1).values < dist[:, pos].min(1).values
        for content in (False, True):
            S = torch.tensor([[maxsim(p, a, content) for a in A] for p in P])
            ms = S[:, neg].max(1).values > S[:, pos].max(1).values
            # pooled cos in raw encoder space for reference
            rules = {f"maxsim{'_content' if content else ''}": ms,
                     f"lib AND maxsim{'_c' if content else ''}": lib & ms,
                     f"lib OR maxsim{'_c' if content else ''}": lib | ms}
            if not content:
                rules["lib"] = lib
                Pp = torch.stack([p[2] for p in P]); Ap = torch.stack([a[2] for a in A]); C = Pp @ Ap.T
                rules["rawcos"] = C[:, neg].max(1).values > C[:, pos].max(1).values
            for name, v in rules.items():
                routed = inside & ~v
                for k, r in zip(e["probe_kinds"], routed.tolist()):
                    ok = r if k in IN_SCOPE else not r
                    res[name][k][0] += int(ok); res[name][k][1] += 1
    print(path.split('/')[-1])
    cols = ["t_generality", "x_in_scope", "near_miss", "x_near_miss", "same_image_other_question", "t_locality"]
    print(f"{'rule':22s}" + "".join(f"{c[:12]:>14s}" for c in cols))
    for name, agg in res.items():
        print(f"{name:22s}" + "".join(f"{agg[c][0]/max(1,agg[c][1]):14.3f}" for c in cols))
for p in sys.argv[1:]: run(p)
