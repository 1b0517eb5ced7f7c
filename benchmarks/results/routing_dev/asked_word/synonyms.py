"""Dev look (not adopted): widen the asked-for word to its synonyms by the encoder's contextual token similarity.
A probe counts as naming the word when it does, or when one of its tokens has cosine >= tau with the asked-for
word's token(s) in the edit question (all-MiniLM-L6-v2 last hidden states). Prints the shares for each tau and,
for the probes inside the radius that do not name the word, their best token similarity.
Usage: OMP_NUM_THREADS=1 python synonyms.py DUMP.json.gz"""
import gzip, json, sys, torch, torch.nn.functional as F
torch.set_num_threads(1)
from ldke_peft.tuner.text_anchors import names_word, question_words
from ldke_peft.bench.run import load_suite
from ldke_peft.editing.neighbours import asked_word, frame_words
from ldke_peft.tuner.question_key import load_encoder
from ldke_peft import LDKEConfig
_encoder = load_encoder(LDKEConfig().router_text_encoder)  # the library's loader: safetensors only, no remote code
enc, tok, m = _encoder.encode, _encoder.tokenizer, _encoder.model
suite = load_suite("full", 30, split="dev")
cache = {}
@torch.no_grad()
def toks(t):
    if t not in cache:
        b = tok([t], return_tensors="pt"); h = m(**b).last_hidden_state[0]
        words = tok.convert_ids_to_tokens(b["input_ids"][0])
        cache[t] = (words, F.normalize(h, dim=-1))
    return cache[t]
def word_vec(q, w):
    words, h = toks(q)
    idx = [i for i, x in enumerate(words) if x.strip("#").lower() and w.startswith(x.strip("#").lower()) and len(x.strip("#")) >= 3]
    return h[idx].mean(0) if idx else None
IN = {"reliability", "t_generality", "x_in_scope"}
for path in sys.argv[1:]:
    d = json.load(gzip.open(path)); rows = []
    for e, r in zip(d["edits"], suite.requests):
        qs = [q for q, rel in suite.pool.questions if not (d["hold_out_relation"] and rel == r.relation)]
        w = asked_word(r.prompt, frame_words(qs), enc)
        wv = word_vec(r.prompt, w)
        kinds = e["anchor_kinds"]; dist = torch.tensor(e["dist"]); pos = torch.tensor([k == "pos" for k in kinds])
        named_anchor = names_word([w], e["anchor_texts"])[:, 0] & ~pos
        d_pos = dist[:, pos].min(1).values; veto = dist[:, ~pos].min(1).values < d_pos
        d_named = torch.where(named_anchor, dist, torch.inf).min(1).values
        for j, (k, t, ins) in enumerate(zip(e["probe_kinds"], e["probe_texts"], e["inside"])):
            words, h = toks(t)
            s = float((h[1:-1] @ wv).max())
            rows.append((k, ins, bool(veto[j]), bool(d_named[j] < d_pos[j]), w in question_words(t), s, t))
    for tau in (2.0, 0.9, 0.8, 0.7, 0.6, 0.5):
        agg = {}
        for k, ins, v, vn, has, s, t in rows:
            named = has or s >= tau
            routed = ins and not (vn if named else v)
            ok = routed if k in IN else not routed
            a = agg.setdefault(k, [0, 0]); a[0] += ok; a[1] += 1
        print(path.split("/")[-2:], tau, {k: round(a / n, 3) for k, (a, n) in sorted(agg.items()) if k in ("t_generality", "x_in_scope", "near_miss", "x_near_miss", "x_near_word")})
    # scores of vetoed in-scope without the word, and of near-miss without the word
    seen=set()
    for k, ins, v, vn, has, s, t in sorted(rows, key=lambda x: -x[5]):
        if ins and not has and k in ("t_generality","x_in_scope","near_miss","x_near_miss") and t not in seen:
            seen.add(t); print(f"   {s:.3f} {k[:8]:8s} veto={v} {t}")
