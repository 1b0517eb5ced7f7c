"""Routing study (#20, dev): the model as the writer of its own near-miss negatives.

For each edit question, SmolLM2-135M-Instruct (the benchmark MLLM's language model, text only) is asked once, in
a wording that names no domain, for other questions on the same subject that ask for other facts; its lines that
are questions and not a likely rewording of the edit's positives (``same_question``, fuzzy) join that edit's
textual negatives. Wraps benchmarks/routing_study.py; the benchmark's pool is unchanged."""
import json
import os
import re
import sys

import torch

sys.path.insert(0, "benchmarks")
import ldke_peft.editing.scope_fit as scope_fit
from ldke_peft.editing.augment import dedupe, same_question

PROMPTS = [
    'Here is a question: "{q}"\nWrite five different questions about the same subject that ask for other facts. One per line.',
    "Question: {q}\nList 5 other questions about the same thing, each asking something different:",
]
MAX_NEW = int(os.environ.get("SELF_NEG_TOKENS", "96"))
_lm = {}
_cache: dict[str, list[str]] = {}
LOG = []


def _load():
    if not _lm:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from ldke_peft.bench.smol_llava import GGUF_FILE, _gguf_dir
        f = _gguf_dir()
        _lm["tok"] = AutoTokenizer.from_pretrained(f, gguf_file=GGUF_FILE)
        _lm["m"] = AutoModelForCausalLM.from_pretrained(f, gguf_file=GGUF_FILE, dtype=torch.float32)
    return _lm["tok"], _lm["m"]


def generated(q: str) -> list[str]:
    if q not in _cache:
        tok, m = _load()
        lines = []
        for p in PROMPTS:
            ids = tok.apply_chat_template([{"role": "user", "content": p.format(q=q)}], add_generation_prompt=True,
                                          return_tensors="pt")
            if not isinstance(ids, torch.Tensor):
                ids = ids["input_ids"]
            with torch.no_grad():
                out = m.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, repetition_penalty=1.2)
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            for seg in re.split(r"\n|(?<=\?)\s+(?=\d)", text):
                seg = re.sub(r"^\s*\d+[.)]\s*", "", seg).strip()
                if "?" in seg:
                    seg = seg[: seg.index("?") + 1].strip()
                    if 3 <= len(seg.split()) <= 20 and "[" not in seg:
                        lines.append(seg)
        _cache[q] = dedupe(lines)
    return _cache[q]


real = scope_fit.negative_questions


def negative_questions(r, pool, pos_prompts, cap=32, hard=True):
    qs = real(r, pool, pos_prompts, cap=cap, hard=hard)
    if not hard:
        return qs
    gen = [g for g in generated(r.prompt) if not same_question(g, pos_prompts, fuzzy=True)]
    LOG.append({"prompt": r.prompt, "generated": generated(r.prompt), "kept": gen})
    return dedupe(gen + qs)[: cap + len(gen)]


scope_fit.negative_questions = negative_questions
import routing_study

rc = routing_study.main(sys.argv[1:])
out = sys.argv[sys.argv.index("--out") + 1]
with open(out.replace(".json", "_generated.json"), "w") as f:
    json.dump({q: v for q, v in _cache.items()}, f, indent=1)
raise SystemExit(rc)
