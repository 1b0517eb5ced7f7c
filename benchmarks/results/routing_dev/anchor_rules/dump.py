"""Dev study (#20): every probe's distances to its slot's textual anchors, labelled, for offline veto rules.

For N single dev edits (delta fit replaced by a no-op, as in ``benchmarks/routing_study.py``), the library fits
the slot as it does by default; this script then rebuilds the same anchors with their source (in-scope wording /
same-image question / proposed neighbour / rephrasing of a neighbour) and records, for every probe of the edit,
whether it lies inside the slot's radius and its distance to each anchor. ``--hold-out-relation`` takes the edited
relation's questions out of the pool (what an edit of the test split's held-out relation gets).
Usage: OMP_NUM_THREADS=1 python dump.py N OUT.json.gz [--hold-out-relation] [--extra-pos] [--extra-probes FILE]
(--extra-pos: TEMPLATES around the asked-for word, recorded as ``pos_template`` anchors.)
"""
import gzip
import json
import sys

import torch

torch.set_num_threads(1)
import ldke_peft.editing.editor as editor
from ldke_peft import LDKEConfig, edit
from ldke_peft.bench.mke import editor_view
from ldke_peft.bench.run import load_suite
from ldke_peft.editing import anchor_fit
from ldke_peft.editing.neighbours import frame_words, neighbour_questions
from ldke_peft.editing.scope import NEGATIVE_PARAPHRASES, question_bank, rephrased_negatives
from ldke_peft.requests import NegativePool
from ldke_peft.tuner.probe_features import collect_probe_features
from ldke_peft.tuner.question_key import load_encoder


if "--extra-probes" in sys.argv:  # another study's probe file (``../asked_word/extra_probes.py``)
    import importlib.util

    _spec = importlib.util.spec_from_file_location("extra_probes", sys.argv[sys.argv.index("--extra-probes") + 1])
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
    EXTRA = _mod.EXTRA
else:
    from extra_probes import EXTRA  # noqa: E402  (this folder is on sys.path when the script runs)


#: --extra-pos: generic possessive/verb frames around the asked-for word, tried as extra in-scope anchors.
TEMPLATES = ("What {w} does this {x} have?", "Tell me this {x}'s {w}.", "What is this {x}'s {w}?", "{W} of this {x}?",
             "This {x}'s {w} is what?", "Which {w} goes with this {x}?")


def template_wordings(question, frame, encode):
    import re
    from ldke_peft.editing.neighbours import _asked_for_word
    i = _asked_for_word(question, frame, encode)
    m = re.search(r"\bthis (\w+)", question, flags=re.IGNORECASE)
    if i is None or m is None:
        return []
    w = question.split()[i].strip("?,.!;:").lower()
    return [t.format(w=w, W=w.capitalize(), x=m.group(1)) for t in TEMPLATES]


def _noop_fit(peft_model, processor, r, s, *, stats=None, **kw):
    if stats is not None:
        stats.update(capture=0.0, delta_fit=0.0, tokens=0, span=0)
    return 0, 1.0


editor.fit_delta = _noop_fit
captured = {}
real_fit = anchor_fit.fit_text_anchors


def spy(peft_model, processor, router, cfg, requests, slots, rows, per_req, textual, pool):
    captured.update(rows=rows, per_req=per_req, textual=textual.clone(), pool=pool)
    return real_fit(peft_model, processor, router, cfg, requests, slots, rows, per_req, textual, pool)


import ldke_peft.editing.scope_fit as scope_fit
scope_fit.fit_text_anchors = spy

n = int(sys.argv[1])
hold = "--hold-out-relation" in sys.argv
suite = load_suite("full", n, split="dev")
enc = load_encoder(LDKEConfig().router_text_encoder).encode
out = []
for r in suite.requests[:n]:
    pool = suite.pool
    if hold:
        pool = NegativePool(questions=[(q, rel) for q, rel in pool.questions if rel != r.relation], images=pool.images)
    pm = edit(suite.model, suite.processor, [editor_view(r)], LDKEConfig(), negatives=pool, progress=False)
    cfg = pm.peft_config["default"]
    router = pm.base_model.router("default")
    rows, (a, b), textual = captured["rows"], captured["per_req"][0], captured["textual"]
    pos = anchor_fit._first_per_prompt([i for i in range(a, b) if rows.t_pos[i]], rows.prompts)
    neg = anchor_fit._first_per_prompt([i for i in range(a, b) if not rows.t_pos[i]], rows.prompts)
    own = [rows.prompts[i] for i in pos]
    caller = [q for q, _ in pool.questions]
    frame = frame_words(caller if len(caller) >= 2 else [q for q, _ in question_bank(pool)])
    gen = neighbour_questions(pm, suite.processor, r.prompt, n=cfg.router_neighbour_questions, encode=enc, frame=frame,
                              exclude=own)
    reph = [p for p, _ in rephrased_negatives(gen, own, NEGATIVE_PARAPHRASES, fuzzy=False)]
    qs = [q for q in dict.fromkeys(gen + reph) if q not in own]
    tpl = template_wordings(r.prompt, frame, enc) if "--extra-pos" in sys.argv else []
    probes = [("reliability", r.image, r.prompt)] + [("t_generality", r.image, q) for q in r.rephrase_prompts]
    for p in r.coupled:
        k = "near_miss" if p.kind.startswith("near_miss") else p.kind
        probes.append((k, p.image, p.prompt))
    probes += [("t_locality", None, p.prompt) for p in r.locality]
    probes += [("x_in_scope", r.image, q) for q in EXTRA.get(r.relation, {}).get("in", [])]
    probes += [("x_near_miss", r.image, q) for q in EXTRA.get(r.relation, {}).get("near", [])]
    probes += [("x_near_word", r.image, q) for q in EXTRA.get(r.relation, {}).get("near_word", [])]
    with torch.no_grad():
        _, t_gen, _ = collect_probe_features(pm, suite.processor, cfg.probe_layer, [r.image] * len(qs + tpl), qs + tpl)
        v, t, h = collect_probe_features(pm, suite.processor, cfg.probe_layer, [p[1] for p in probes], [p[2] for p in probes])
        g = router.slot_group(0)
        z_anchor = router.project_textual(g, torch.cat([textual[pos], textual[neg], t_gen]))
        z_probe = router.project_textual(g, t)
        routed = router.route(v, t, h)
        router._anchor_veto = lambda tt, ss: torch.zeros(tt.shape[0], router.num_slots, dtype=torch.bool)
        inside = router.route(v, t, h)
    kinds = ["pos"] * len(pos) + ["same_image"] * len(neg) + ["neighbour" if q in gen else "neighbour_reph" for q in qs]
    kinds += ["pos_template"] * len(tpl)
    texts = own + [rows.prompts[i] for i in neg] + qs + tpl
    key = router.keys_t[0].float()
    out.append({"subject": r.subject, "relation": r.relation, "radius_t": float(router.radius_t[0]),
                "anchor_kinds": kinds, "anchor_texts": texts, "anchor_to_key": (z_anchor - key).norm(dim=-1),
                "probe_kinds": [p[0] for p in probes], "probe_texts": [p[2] for p in probes],
                "probe_to_key": (z_probe - key).norm(dim=-1), "dist": torch.cdist(z_probe, z_anchor),
                "inside": (inside == 0), "routed": (routed == 0), "lib_anchors": router.num_anchors})
    print(r.subject, r.relation, "anchors", router.num_anchors, "inside", int((inside == 0).sum()), "routed",
          int((routed == 0).sum()), flush=True)
    pm.unload()
with gzip.open(sys.argv[2], "wt") as fh:  # gzipped JSON, not a pickle: rules.py reads it back with json.load
    json.dump({"argv": sys.argv, "hold_out_relation": hold,
               "edits": [{k: v.tolist() if torch.is_tensor(v) else v for k, v in e.items()} for e in out]}, fh)
