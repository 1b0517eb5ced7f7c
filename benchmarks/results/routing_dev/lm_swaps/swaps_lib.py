"""Routing study (#20, dev): the model proposes neighbouring questions by swapping the asked-for word.

For each edit question: the asked-for word is the word whose removal moves the question's sentence embedding
most, among words that are not the question frame (words in at least half of the caller's pool questions).
The language model (SmolLM2-135M-Instruct, the benchmark MLLM's LM, text only) proposes replacement words from
its next-token distribution after the prefix (top LM_SWAP_TOP word tokens); each swapped sentence is scored by
its full log-probability (so the right context counts); swaps whose sentence embedding is closer than
LM_SWAP_TAU to the edit question (likely rewordings) or that repeat the word are dropped; the LM_SWAP_KEEP most
probable join the edit's textual negatives. Wraps benchmarks/routing_study.py; the benchmark's pool is unchanged."""
import json
import os
import sys
from collections import Counter

import torch

from ldke_peft.editing.augment import dedupe

TOP = int(os.environ.get("LM_SWAP_TOP", "400"))
KEEP = int(os.environ.get("LM_SWAP_KEEP", "8"))
TAU = float(os.environ.get("LM_SWAP_TAU", "0.9"))
POS = int(os.environ.get("LM_SWAP_POSITIONS", "1"))
_lm = {}
_cache: dict[str, list] = {}


def _load():
    if not _lm:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from ldke_peft.bench.smol_llava import GGUF_FILE, _gguf_dir
        from ldke_peft.tuner.question_key import DEFAULT_TEXT_ENCODER, load_encoder
        f = _gguf_dir()
        _lm["tok"] = tok = AutoTokenizer.from_pretrained(f, gguf_file=GGUF_FILE)
        tok.pad_token = tok.pad_token or tok.eos_token
        _lm["m"] = AutoModelForCausalLM.from_pretrained(f, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
        _lm["enc"] = load_encoder(DEFAULT_TEXT_ENCODER)
    return _lm["tok"], _lm["m"], _lm["enc"]


def _bare(w):
    return w.strip("?,.!").casefold()


@torch.no_grad()
def swaps(q: str, frame: set) -> list:
    if q in _cache:
        return _cache[q]
    tok, m, enc = _load()
    emb = lambda ts: torch.nn.functional.normalize(enc.encode(ts).float(), dim=-1)
    words = q.split()
    e0 = emb([q])
    drop = [1 - float(emb([" ".join(words[:i] + words[i + 1:])]) @ e0.T) for i in range(len(words))]
    order = [i for i in sorted(range(len(words)), key=lambda i: -drop[i]) if _bare(words[i]) not in frame][:POS]
    cands = []
    for i in order:
        prefix = " ".join(words[:i])
        ids = tok(prefix, return_tensors="pt")["input_ids"]
        nxt = m(ids).logits[0, -1]
        orig = _bare(words[i])
        tail = words[i][len(words[i].rstrip("?,.!")):]
        for t in nxt.topk(TOP).indices.tolist():
            s = tok.decode([t])
            w = s.strip()
            if (prefix and not s.startswith(" ")) or not w.isalpha() or len(w) < 3 or w.casefold().rstrip("s") == orig.rstrip("s"):
                continue
            cands.append(" ".join(words[:i] + [w + tail] + words[i + 1:]))
    lps = []
    for j in range(0, len(cands), 64):
        b = tok(cands[j:j + 64], return_tensors="pt", padding=True)
        lg = m(**b).logits.log_softmax(-1)
        ids = b["input_ids"]
        lps.append((lg[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * b["attention_mask"][:, 1:]).sum(1))
    lp = torch.cat(lps)
    sim = (emb(cands) @ e0.T)[:, 0]
    rows = sorted(zip(cands, lp.tolist(), sim.tolist()), key=lambda r: -r[1])
    _cache[q] = rows
    return rows


def lm_swap_negatives(r, pool, pos_prompts):
    pq = [q for q, _ in pool.questions]
    df = Counter(w for x in pq for w in {_bare(y) for y in x.split()})
    frame = {w for w, c in df.items() if c >= len(pq) / 2}
    return [c for c, lp, s in swaps(r.prompt, frame) if s < TAU and c not in pos_prompts][:KEEP]
