"""AUC of in-scope vs near-miss questions by cosine to the edit question's last-token state, per layer
(standardised over all rows). Usage: python last_token_auc.py OUT.json"""
import json, sys, numpy as np, torch
from safetensors.torch import load_file
res = json.load(open(sys.argv[1])); d = load_file(sys.argv[1] + ".safetensors")
H = [d[f"H{i}"].float() for i in range(len(res))]
POS = ("tgen", "x_in"); NEG = ("near", "x_near")
def auc(pos, neg):
    pos, neg = np.array(pos), np.array(neg)
    return ((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())
allrows = torch.cat(H)  # N x L x d
mu = allrows.mean(0); sd = allrows.std(0) + 1e-3
L = allrows.shape[1]
for l in range(0, L, 2):
    a = []; P = []; Q = []
    for e, h in zip(res, H):
        x = (h[:, l] - mu[l]) / sd[l]
        c = torch.nn.functional.cosine_similarity(x, x[0:1], dim=-1).tolist()
        p = [c[i] for i, k in enumerate(e["kinds"]) if k in POS]; q = [c[i] for i, k in enumerate(e["kinds"]) if k in NEG]
        a.append(auc(p, q)); P += p; Q += q
    P, Q = np.array(P), np.array(Q); thr = np.quantile(P, 0.05)
    print("layer", l, "meanAUC %.3f minAUC %.3f pooled %.3f negOut@95 %.3f" % (np.mean(a), np.min(a), auc(P, Q), (Q < thr).mean()))
