"""Do the model's proposed neighbouring questions coincide with a benchmark probe? For every request of a split,
the neighbours the editor proposes (twice the default count, so whatever the fit's exclusions move up is included)
are compared with the request's own probe wordings (casefolded): a neighbour equal to a coupled or near-miss
probe would make that probe an out-of-scope anchor of the edit. Usage: overlap.py SPLIT OUT"""
import json
import sys
from collections import Counter

import torch

torch.set_num_threads(1)
from peft import get_peft_model

from ldke_peft import LDKEConfig
from ldke_peft.bench.mke import editor_view
from ldke_peft.bench.run import load_suite
from ldke_peft.editing.neighbours import frame_words, neighbour_questions
from ldke_peft.tuner.question_key import DEFAULT_TEXT_ENCODER, load_encoder

split, out = sys.argv[1], sys.argv[2]
suite = load_suite("full", None, split=split)
pm = get_peft_model(suite.model, LDKEConfig(slot_layers=[[20]], num_slots=1))
encode = load_encoder(DEFAULT_TEXT_ENCODER).encode
frame = frame_words([q for q, _ in suite.pool.questions])
n = 2 * LDKEConfig().router_neighbour_questions  # twice the default: the fit excludes the slot's own wordings, which can move later ones up
hits, kinds, proposed = [], Counter(), {}
for r in suite.requests:
    gen = neighbour_questions(pm, suite.processor, r.prompt, n=n, encode=encode, frame=frame, exclude=[r.prompt])
    proposed[r.prompt] = gen
    g = {q.strip().casefold() for q in gen}
    probes = [(p.kind if hasattr(p, "kind") else "t_locality", p.prompt) for p in list(r.coupled) + list(r.locality)]
    probes += [("rephrase", q) for q in r.rephrase_prompts]
    for kind, q in probes:
        kinds[kind] += 1
        if q.strip().casefold() in g:
            hits.append({"subject": r.subject, "relation": r.relation, "kind": kind, "probe": q})
json.dump({"command": " ".join(sys.argv), "split": split, "requests": len(suite.requests), "probes_by_kind": kinds,
           "hits": hits, "proposed": proposed}, open(out, "w"), indent=1)
print(len(suite.requests), "requests;", len(hits), "probe wordings equal to a proposed neighbour;", dict(kinds))
