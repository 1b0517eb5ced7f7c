"""Dev only (#20): does the unedited MLLM's last-prompt-token state at some layer separate in-scope rewordings from near-miss questions?

Usage: OMP_NUM_THREADS=1 python last_token.py 30 OUT.json  (then last_token_auc.py OUT.json)
"""
import sys, json, torch
torch.set_num_threads(1)
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "anchor_rules"))
from extra_probes import EXTRA
from ldke_peft.bench.run import load_suite
from ldke_peft.families import family_of
from ldke_peft.families.unwrap import base_model_of
from ldke_peft.tuner.question_key import load_encoder
from ldke_peft import LDKEConfig
n = int(sys.argv[1])
suite = load_suite("full", n, split="dev")
model, proc = suite.model, suite.processor
fam = family_of(model); root = base_model_of(model)
enc = load_encoder(LDKEConfig().router_text_encoder).encode
def states(image, prompts):
    out = []
    for p in prompts:
        b = fam.build_inputs(proc, [image], [p], None)
        with torch.no_grad():
            o = root(**b.inputs, output_hidden_states=True, use_cache=False)
        out.append(torch.stack([h[0, -1].float() for h in o.hidden_states]))
    return torch.stack(out)  # rows x layers+1 x d
res = []; allH = []; allE = []
for r in suite.requests[:n]:
    rows = [("edit", r.prompt)] + [("tgen", q) for q in r.rephrase_prompts]
    rows += [("near" if p.kind.startswith("near_miss") else p.kind, p.prompt) for p in r.coupled if p.image is r.image]
    rows += [("x_in", q) for q in EXTRA.get(r.relation, {}).get("in", [])]
    rows += [("x_near", q) for q in EXTRA.get(r.relation, {}).get("near", [])]
    H = states(r.image, [q for _, q in rows])
    E = enc([q for _, q in rows])
    cos_l = torch.nn.functional.cosine_similarity(H, H[0:1], dim=-1)  # rows x layers
    cos_e = torch.nn.functional.cosine_similarity(E, E[0:1], dim=-1)
    allH.append(H.half()); allE.append(E)
    res.append({"subject": r.subject, "relation": r.relation, "kinds": [k for k, _ in rows], "texts": [q for _, q in rows],
                "cos_layers": cos_l.tolist(), "cos_enc": cos_e.tolist()})
    print(r.subject, r.relation, len(rows), flush=True)
json.dump(res, open(sys.argv[2], "w"))
from safetensors.torch import save_file  # the states (not committed: ~32 MB)
save_file({f"H{i}": h.contiguous() for i, h in enumerate(allH)}, sys.argv[2] + ".safetensors")
