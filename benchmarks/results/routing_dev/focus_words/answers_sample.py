"""Offline (#20, dev): the unedited benchmark MLLM's greedy answers to every third dev edit's question, 3 of its
T-Generality wordings and 2 near-miss probes (is its answer a usable sign of which fact a question asks for?).
Usage: OMP_NUM_THREADS=1 python answers_sample.py > answers_sample.txt"""
import torch; torch.set_num_threads(1)
from ldke_peft.bench.suites import load_suite
from ldke_peft.families import family_of
suite = load_suite("full", 30, split="dev"); m, p = suite.model, suite.processor; m.eval(); fam = family_of(m)
tok = p.tokenizer if hasattr(p, "tokenizer") else p
for r in suite.requests[:30:3]:
    qs = [r.prompt] + list(r.rephrase_prompts[:3]) + [c.prompt for c in r.coupled if c.kind.startswith("near")][:2]
    print("==", r.subject, r.relation, "gt", r.ground_truth, "target", r.target)
    for q in qs:
        b = fam.build_inputs(p, [r.image], [q], None)
        with torch.no_grad():
            out = m.generate(**b.inputs, max_new_tokens=12, do_sample=False)
        print("  ", q, "->", repr(tok.decode(out[0, b.inputs["input_ids"].shape[1]:], skip_special_tokens=True)))
