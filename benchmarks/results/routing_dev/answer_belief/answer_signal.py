"""Dev study (#20): does the unedited model's belief in the edit's own (original) answer separate in-scope wordings
from near-miss questions on the same image? For each of N single dev edits and each probe (the suite's and the
anchor-rules study's extra ones), the mean log-probability per token of the ground truth and of the model's own greedy
answer to the edit question, teacher-forced after the probe. Usage: OMP_NUM_THREADS=1 python answer_signal.py N OUT.json"""
import json, os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "anchor_rules"))
from extra_probes import EXTRA
from ldke_peft.bench.run import load_suite
from ldke_peft.families.registry import family_of
n = int(sys.argv[1])
suite = load_suite("full", n, split="dev")
model, proc = suite.model, suite.processor
fam = family_of(model)
model.eval()

@torch.no_grad()
def lp(images, prompts, answers):
    b = fam.build_inputs(proc, images, prompts, answers)
    logits = model(**b.inputs).logits.float()
    ids = b.input_ids
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    m = b.target_mask[:, 1:]
    first = torch.stack([logp[i][m[i]][0] for i in range(len(prompts))])
    return ((logp * m).sum(1) / m.sum(1)).tolist(), first.tolist()

@torch.no_grad()
def greedy(image, prompt, k=6):
    b = fam.build_inputs(proc, [image], [prompt], None)
    out = model.generate(**b.inputs, max_new_tokens=k, do_sample=False)
    return proc.tokenizer.decode(out[0, b.input_ids.shape[1]:], skip_special_tokens=True) if hasattr(proc, "tokenizer") else None

rows = []
for r in suite.requests[:n]:
    probes = [("reliability", r.image, r.prompt)] + [("t_generality", r.image, q) for q in r.rephrase_prompts]
    for p in r.coupled:
        probes.append(("near_miss" if p.kind.startswith("near_miss") else p.kind, p.image, p.prompt))
    probes += [("x_in_scope", r.image, q) for q in EXTRA.get(r.relation, {}).get("in", [])]
    probes += [("x_near_miss", r.image, q) for q in EXTRA.get(r.relation, {}).get("near", [])]
    g = greedy(r.image, r.prompt)
    ans = {"truth": r.ground_truth, "greedy": (g or "").strip().split("\n")[0]}
    rec = {"subject": r.subject, "relation": r.relation, "answers": ans, "probes": []}
    scores = {}
    for name, a in ans.items():
        if not a:
            continue
        mean, first = lp([p[1] for p in probes], [p[2] for p in probes], [a] * len(probes))
        scores[name] = (mean, first)
    for i, p in enumerate(probes):
        rec["probes"].append({"kind": p[0], "text": p[2], "same_image": p[1] is r.image,
                              **{f"{k}_mean": v[0][i] for k, v in scores.items()},
                              **{f"{k}_first": v[1][i] for k, v in scores.items()}})
    rows.append(rec)
    print(r.subject, r.relation, ans, flush=True)
json.dump(rows, open(sys.argv[2], "w"), indent=0)
