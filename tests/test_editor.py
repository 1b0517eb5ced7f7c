"""The LDKE algorithm on the toy world: single-edit bars, sequential editing, routing behaviour and
Fast Localization. These assert the behaviour users rely on: the edit fires on rephrasings and other
views, and nothing else changes."""

from __future__ import annotations

import re

import torch
import pytest

import ldke_peft
from ldke_peft import EditRequest
from ldke_peft.bench.mke import editor_view
from ldke_peft.bench.studies import _spearman
from ldke_peft.editing.localization import locate, trace
from ldke_peft.metrics import collect_pre, compute_metrics
from ldke_peft.tuner.model import default_probe_layer

pytestmark = pytest.mark.slow


@torch.no_grad()
def ask(world, model, image, prompt, max_new_tokens=4):
    """Greedy answer of ``model`` (base or edited) in the world's chat format."""
    fam = world.family
    built = fam.build_inputs(world.processor, [image], [prompt])
    out = model.generate(**built.inputs, max_new_tokens=max_new_tokens, do_sample=False)
    text = fam.tokenizer(world.processor).decode(out[0, built.input_ids.shape[1]:], skip_special_tokens=True)
    return text.strip()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_single_edits_meet_the_bars(world, world_pool):
    """Reliability ≥ 0.99, M-Generality ≥ 0.95, T-Locality ≥ 0.99, Coupled-Locality ≥ 0.95 (T-Generality
    and M-Locality: see below), averaged over a handful of single edits (each in its own pack), on
    the held-out protocol: the editor gets the edit alone and the world's pool, every probe is unseen."""
    base = _state(world.model)
    reqs = world.edit_requests(4, seed=7)
    rows = []
    for r in reqs:
        pre = collect_pre(world.model, world.processor, [r])
        pm = ldke_peft.edit(world.model, world.processor, [editor_view(r)], negatives=world_pool, progress=False)
        rows.append(compute_metrics(pm, world.processor, [r], pre))
        pm.unload()
    mean = {k: sum(m[k] for m in rows) / len(rows) for k in ("reliability", "t_generality", "m_generality",
                                                               "t_locality", "m_locality", "coupled_locality", "exact_match")}
    assert mean["reliability"] >= 0.99, mean
    # wordings the editor never saw: 0.83 here on the held-out protocol (the 0.95 bar is a MISS, reported
    # by the benchmark; the scope issue is what lifts it). This guards against falling further.
    assert mean["t_generality"] >= 0.75, mean
    assert mean["m_generality"] >= 0.95, mean
    assert mean["t_locality"] >= 0.99, mean
    # other entities' canonical images, none of them in the pool: 0.93 here (bar 0.98: a MISS); a floor
    assert mean["m_locality"] >= 0.9, mean
    assert mean["coupled_locality"] >= 0.95, mean
    assert mean["exact_match"] >= 0.99, mean
    # unload() returns the base model with bitwise-identical weights
    after = world.model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)


def test_edit_answers_change_only_in_scope(world, world_pool):
    r = world.edit_requests(1, seed=11)[0]
    coupled_same_image = next(p for p in r.coupled if p.kind == "same_image_other_question")
    lookalike = next((p for p in r.coupled if p.kind == "lookalike_same_question"), None)
    before = {
        "coupled": ask(world, world.model, coupled_same_image.image, coupled_same_image.prompt),
        "text": ask(world, world.model, None, r.locality[0].prompt),
    }
    if lookalike is not None:
        before["lookalike"] = ask(world, world.model, lookalike.image, lookalike.prompt)
    pm = ldke_peft.edit(world.model, world.processor, [editor_view(r)], negatives=world_pool, progress=False)
    try:
        assert ask(world, pm, r.image, r.prompt) == r.target
        assert ask(world, pm, r.image, r.rephrase_prompts[0]) == r.target
        assert ask(world, pm, r.rephrase_images[0], r.prompt) == r.target
        assert ask(world, pm, coupled_same_image.image, coupled_same_image.prompt) == before["coupled"]
        assert ask(world, pm, None, r.locality[0].prompt) == before["text"]
        if lookalike is not None:
            assert ask(world, pm, lookalike.image, lookalike.prompt) == before["lookalike"]
    finally:
        pm.unload()


def test_sequential_edits_survive_later_ones(world, world_pool):
    reqs = world.edit_requests(5, seed=21)
    pres = [collect_pre(world.model, world.processor, [r]) for r in reqs]
    pm = None
    for r in reqs:
        pm = ldke_peft.edit(world.model if pm is None else pm, world.processor, [editor_view(r)], pack=pm,
                            negatives=world_pool, progress=False)
    assert pm.peft_config["default"].num_slots == len(reqs)
    rows = [compute_metrics(pm, world.processor, [r], p, generate=False) for r, p in zip(reqs, pres)]
    assert min(m["reliability"] for m in rows) >= 0.99, [m["reliability"] for m in rows]
    assert sum(m["t_locality"] for m in rows) / len(rows) >= 0.98
    # other entities' images, none of them in the pool: 0.83 here (bar 0.98: a MISS the scope issue's
    # pack-level calibration is for); this guards against falling further
    assert sum(m["m_locality"] for m in rows) / len(rows) >= 0.75
    pm.unload()


def test_batch_edit_in_one_call(world, world_pool):
    reqs = world.edit_requests(3, seed=31)
    pre = collect_pre(world.model, world.processor, reqs)
    pm = ldke_peft.edit(world.model, world.processor, [editor_view(r) for r in reqs], negatives=world_pool,
                        progress=False)
    m = compute_metrics(pm, world.processor, reqs, pre, generate=False)
    assert m["reliability"] >= 0.99 and m["coupled_locality"] >= 0.95, m
    assert len(pm.ldke_reports) == 3 and all(rep.fit_accuracy == 1.0 for rep in pm.ldke_reports)
    pm.unload()


def test_fast_localization_tracks_exact_tracing(world):
    """Constant passes (4 forward-equivalents) and the same ranking as exact per-layer tracing."""
    reqs = world.edit_requests(6, seed=41)
    probe = default_probe_layer(world.family.num_layers(world.model))
    agree, rhos = 0, []
    layers = world.family.decoder_layers(world.model)
    calls = {"forward": 0, "backward": 0}
    hooks = [world.model.register_forward_pre_hook(lambda m, a: calls.__setitem__("forward", calls["forward"] + 1)),
             layers[-1].register_full_backward_hook(lambda m, gi, go: calls.__setitem__("backward", calls["backward"] + 1))]

    def passes(fn):
        """Run ``fn``; its cost in forward-equivalents as the model saw it (a backward counts as 2)."""
        calls.update(forward=0, backward=0)
        out = fn()
        return out, calls["forward"] + 2 * calls["backward"]

    try:
        for r in reqs:
            f, f_passes = passes(lambda: locate(world.model, world.processor, r, probe_layer=probe))
            e, e_passes = passes(lambda: trace(world.model, world.processor, r, probe_layer=probe))
            # what each result reports is what ran: a constant 4 for Fast Localization, L + 2 for tracing
            assert f.forward_passes == f_passes == 4 and e.forward_passes == e_passes == len(layers) + 2
            assert f.candidates == e.candidates and min(f.candidates) > probe
            agree += f.ranking()[0] == e.ranking()[0]
            rhos.append(_spearman([float(f.scores[i]) for i in f.candidates], [float(e.scores[i]) for i in e.candidates]))
    finally:
        for h in hooks:
            h.remove()
    assert agree / len(reqs) >= 0.8
    assert sum(rhos) / len(rhos) >= 0.6


def test_text_only_edit(world, world_pool):
    """A text-only request (no image) edits only text-only inputs."""
    rel, subject, _ = world.text_facts[0]
    prompt = world.text_prompt(rel, subject)
    before = ask(world, world.model, None, prompt)
    vocab = sorted(a for a in {a for (rr, _, a) in world.text_facts if rr == rel} if a != before)
    r = EditRequest(prompt=prompt, target=vocab[0], ground_truth=before, relation=rel)
    pm = ldke_peft.edit(world.model, world.processor, [editor_view(r)], negatives=world_pool, progress=False)
    try:
        assert ask(world, pm, None, prompt) == vocab[0]
        other = next(world.text_prompt(rr, s) for (rr, s, _) in world.text_facts if rr != rel)
        assert ask(world, pm, None, other) == ask(world, world.model, None, other)
    finally:
        pm.unload()


def test_mean_corruption_is_deterministic_and_removes_the_entity(world):
    """The default corruption (each image token replaced by the mean of the image's tokens) gives the
    same scores for every seed and takes the fact away; Gaussian noise changes with the seed."""
    r = world.edit_requests(1, seed=41)[0]
    probe = default_probe_layer(world.family.num_layers(world.model))
    a = locate(world.model, world.processor, r, probe_layer=probe, seed=0)
    b = locate(world.model, world.processor, r, probe_layer=probe, seed=1)
    assert torch.equal(a.scores, b.scores)
    assert a.corrupt_prob < 0.5 * a.clean_prob
    e = trace(world.model, world.processor, r, probe_layer=probe, seed=3)
    assert e.corrupt_prob == pytest.approx(a.corrupt_prob, rel=1e-4)
    n0 = locate(world.model, world.processor, r, probe_layer=probe, seed=0, corruption="noise")
    n1 = locate(world.model, world.processor, r, probe_layer=probe, seed=1, corruption="noise")
    assert not torch.equal(n0.scores, n1.scores)
    with pytest.raises(ValueError, match="corruption"):
        locate(world.model, world.processor, r, probe_layer=probe, corruption="blur")


def test_staged_bfloat16_fit_stops_where_the_float32_fit_would_and_gives_every_weight_back(world, world_pool, monkeypatch):
    """The fast fit (edit image's rows first, bfloat16 steps) must still end with the edit answering in the
    model's own precision, run fewer tokens per step than the plain float32 fit, and leave the base model
    bit for bit as it was (the bfloat16 weights are swapped in and out, never cast back)."""
    from ldke_peft import LDKEConfig
    from ldke_peft.tuner.layer_replay import LayerReplay

    casts = []
    real_cast = LayerReplay.cast
    monkeypatch.setattr(LayerReplay, "cast", lambda self, dtype: casts.append(dtype) or real_cast(self, dtype))
    full = world.edit_requests(1, seed=5)[0]
    r = editor_view(full)
    base = _state(world.model)
    reports = {}
    for name, cfg in {"fast": LDKEConfig(edit_fit_dtype="bfloat16"),
                      "plain": LDKEConfig(edit_fit_stages=False, edit_fit_dtype="float32")}.items():
        casts.clear()
        pm = ldke_peft.edit(world.model, world.processor, [r], cfg, negatives=world_pool, progress=False)
        try:
            reports[name] = pm.ldke_reports[-1]
            assert (torch.bfloat16 in casts) == (name == "fast"), casts
            assert ask(world, pm, full.image, full.prompt) == full.target
        finally:
            pm.unload()
    assert reports["fast"].fit_accuracy == 1.0 and reports["plain"].fit_accuracy == 1.0
    assert reports["fast"].fit_tokens < reports["plain"].fit_tokens
    after = world.model.state_dict()
    assert all(torch.equal(base[k], after[k]) and base[k].dtype == after[k].dtype for k in base)


def test_a_model_that_cannot_step_in_bfloat16_is_fitted_in_its_own_precision(world, world_pool):
    """bfloat16 steps are a speed-up, never a requirement: a layer that refuses bfloat16 inputs (as some
    quantized or custom layers do) sends the fit back to the model's precision, and the edit still takes."""
    from ldke_peft import LDKEConfig

    def refuse(_module, args, kwargs):
        h = args[0] if args else kwargs.get("hidden_states")
        if h is not None and h.dtype == torch.bfloat16:
            raise RuntimeError("this layer does not run in bfloat16")

    layers = world.family.decoder_layers(world.model)
    handles = [layer.register_forward_pre_hook(refuse, with_kwargs=True) for layer in layers]
    r = world.edit_requests(1, seed=5)[0]
    try:
        pm = ldke_peft.edit(world.model, world.processor, [editor_view(r)], LDKEConfig(edit_fit_dtype="bfloat16"),
                            negatives=world_pool, progress=False)
        try:
            assert pm.ldke_reports[-1].fit_accuracy == 1.0
            assert ask(world, pm, r.image, r.prompt) == r.target
        finally:
            pm.unload()
    finally:
        for h in handles:
            h.remove()
    assert all(p.dtype == torch.float32 for p in world.model.parameters())


def test_the_delta_answers_the_callers_own_wordings_of_the_edited_relation(world, world_pool, monkeypatch):
    """Wordings of the edited relation that the caller put in the negatives pool are among the delta's
    positives (before templated rephrasings of the edit question), so the edit answers them; with
    ``delta_bank_wordings=False`` the delta sees only the edit question in other frames."""
    import ldke_peft.editing.delta_fit as delta_fit
    from ldke_peft.requests import NegativePool

    full = world.edit_requests(1, seed=11)[0]
    r = editor_view(full)
    own_wording = full.rephrase_prompts[0]  # the caller's own wording of the relation, in the world's words
    pool = NegativePool(questions=list(world_pool.questions) + [(own_wording, r.relation)], images=list(world_pool.images))
    real = delta_fit.positive_views
    fitted_on: list[list[str]] = []

    def recording(*args, **kwargs):
        imgs, prompts = real(*args, **kwargs)
        fitted_on.append(prompts)
        return imgs, prompts

    monkeypatch.setattr(delta_fit, "positive_views", recording)
    for on in (True, False):
        pm = ldke_peft.edit(world.model, world.processor, [r], ldke_peft.LDKEConfig(delta_bank_wordings=on),
                            negatives=pool, progress=False)
        try:
            assert (own_wording in fitted_on[-1]) is on
            if on:
                assert ask(world, pm, r.image, own_wording) == r.target
        finally:
            pm.unload()


def test_a_second_pack_goes_beside_the_first_and_both_answer(world, world_pool, tmp_path):
    """``edit(pack, ..., adapter_name=new)`` adds a pack to the same PeftModel (no PeftModel inside a PeftModel)
    and leaves both active: here an image edit and a text-only edit of another fact, each answered, an
    unrelated question unchanged, and both packs saved and reloaded as PEFT saves two adapters."""
    from peft import PeftModel

    r = editor_view(world.edit_requests(1, seed=3)[0])
    other = next(e for e in world.entities if e != r.subject)
    q = world.text_prompt("capital_of", r.subject)
    old = ask(world, world.model, None, q)
    new = next(c for c in world.answer_vocab("capital_of") if c != old)
    untouched = {x: ask(world, world.model, None, x) for x in (world.text_prompt("capital_of", other),)}
    pm = ldke_peft.edit(world.model, world.processor, [r], negatives=world_pool, progress=False)
    try:
        same = ldke_peft.edit(pm, world.processor, [EditRequest(prompt=q, target=new)], negatives=world_pool,
                              adapter_name="text", progress=False)
        assert same is pm and not isinstance(pm.base_model.model, PeftModel)
        assert pm.base_model.active_adapters == ["default", "text"]
        assert ask(world, pm, r.image, r.prompt) == r.target
        assert ask(world, pm, None, q) == new
        assert {x: ask(world, pm, None, x) for x in untouched} == untouched
        pm.save_pretrained(tmp_path / "packs")
        # each pack's card lists its own slots only (both packs number theirs from 0)
        ldke_peft.save_edits(pm, tmp_path / "text_card", adapter_name="text")
        assert [r.adapter_name for r in pm.ldke_reports] == ["default", "text"]
        text = (tmp_path / "text_card" / "README.md").read_text()
        reports = text.split("## Edit reports", 1)[1]
        assert new in text and r.target not in text and len(re.findall(r"^\| 0 \|", reports, re.M)) == 1
    finally:
        pm.unload()
    loaded = PeftModel.from_pretrained(world.model, tmp_path / "packs")
    try:
        loaded.load_adapter(str(tmp_path / "packs" / "text"), adapter_name="text")
        loaded.base_model.set_adapter(["default", "text"])
        assert ask(world, loaded, r.image, r.prompt) == r.target
        assert ask(world, loaded, None, q) == new
    finally:
        loaded.unload()


def test_a_stated_consequence_is_answered_in_other_words_and_nothing_coupled_moves(world, world_pool, tmp_path):
    """``EditRequest.consequences``: the caller states what follows from the new fact (the composed
    question after ``capital := C'`` answers the river of C'); the edit answers it in a wording it was not
    given, still answers its own question, and leaves the same image's other questions alone."""
    full = world.edit_requests(1, seed=11)[0]
    composed = world.related[full.relation]["composed"]
    expected = world.related[full.relation]["map"][full.target]
    stated, *_ = [t for t in world.templates[composed]["train"] if t not in {p.prompt for p in full.portability}]
    unseen = world.templates[composed]["eval"][0]
    coupled = next(p for p in full.coupled if p.kind == "same_image_other_question")
    before = {q: ask(world, world.model, full.image, q) for q in (unseen, coupled.prompt)}
    assert before[unseen] != expected  # the unedited world answers with the old fact
    r = editor_view(full)
    r.consequences = [ldke_peft.Probe(stated, expected)]
    pm = ldke_peft.edit(world.model, world.processor, [r], negatives=world_pool, progress=False)
    try:
        assert ask(world, pm, full.image, unseen) == expected
        assert ask(world, pm, full.rephrase_images[0], unseen) == expected
        assert ask(world, pm, full.image, full.prompt) == full.target
        assert ask(world, pm, full.image, coupled.prompt) == before[coupled.prompt]
        # the shared pack says what it was told, and a reload answers the same
        folder = ldke_peft.save_edits(pm, tmp_path / "pack")
        assert f"| 0 | {stated} | **{expected}** |" in (tmp_path / "pack" / "README.md").read_text()
    finally:
        pm.unload()
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(world.model, folder)
    try:
        assert loaded.peft_config["default"].edits[0]["consequences"] == [[stated, expected]]
        assert ask(world, loaded, full.image, unseen) == expected
    finally:
        loaded.unload()
    without = ldke_peft.edit(world.model, world.processor, [editor_view(full)], negatives=world_pool, progress=False)
    try:
        assert ask(world, without, full.image, unseen) != expected  # the edit alone does not propagate here
    finally:
        without.unload()


def test_anchors_warn_when_the_negatives_hold_no_wording_of_the_edited_relation(world, world_pool, caplog):
    """With anchors on, a pool whose only question of the edit's relation is the edit question itself (and a
    request without rephrasings) leaves only rewrites of one question in scope: the caller is told which
    relation needs another wording, and is not told once the pool has one."""
    from ldke_peft import LDKEConfig
    from ldke_peft.requests import NegativePool

    r = editor_view(world.edit_requests(1, seed=5)[0])
    assert r.relation in {rel for _, rel in world_pool.questions}
    thin = NegativePool(questions=[(q, rel) for q, rel in world_pool.questions if rel != r.relation]
                        + [(r.prompt, r.relation)], images=world_pool.images)
    warned = "no other wording of relation(s)"
    with caplog.at_level("WARNING", logger="ldke_peft.editing.anchor_fit"):
        ldke_peft.edit(world.model, world.processor, [r], LDKEConfig(router_neighbour_questions=2), negatives=thin,
                       progress=False).unload()
    assert [m for m in caplog.messages if warned in m and repr(r.relation) in m]
    caplog.clear()
    other = next(q for q in world.question_bank(r.relation) if q != r.prompt)
    thin.questions.append((other, r.relation))
    with caplog.at_level("WARNING", logger="ldke_peft.editing.anchor_fit"):
        ldke_peft.edit(world.model, world.processor, [r], LDKEConfig(router_neighbour_questions=2), negatives=thin,
                       progress=False).unload()
    assert not [m for m in caplog.messages if warned in m]


def test_anchor_clearance_drops_out_of_scope_anchors_inside_a_single_wording_edit(world, world_pool):
    """``router_anchor_clearance``: an edit whose only in-scope wordings are rewrites of its question keeps no
    out-of-scope anchor nearer its key than that fraction of its farthest in-scope anchor; an edit with another
    wording of its relation in the negatives keeps the same anchors as without the option."""
    from ldke_peft import LDKEConfig
    from ldke_peft.requests import NegativePool

    r = editor_view(world.edit_requests(1, seed=9)[0])  # an edit with an out-of-scope anchor inside its reach
    thin = NegativePool(questions=[(q, rel) for q, rel in world_pool.questions if rel != r.relation]
                        + [(r.prompt, r.relation)], images=world_pool.images)

    def anchors(pool, clearance):
        pm = ldke_peft.edit(world.model, world.processor, [r], LDKEConfig(router_neighbour_questions=4,
                            router_anchor_clearance=clearance), negatives=pool, progress=False)
        router = pm.base_model.router("default")
        d = (router.anchors_t.float() - router.keys_t[0].float()).norm(dim=-1)
        pos = router.anchors_pos > 0.5  # out-of-scope anchors are 0, or -1 where they name the asked-for word
        pm.unload()
        return d[pos], d[~pos]

    c = LDKEConfig().router_anchor_clearance
    pos, neg_all = anchors(thin, 0.0)
    reach = float(pos.max())
    assert bool((neg_all < c * reach).any()), "the thin edit must have an out-of-scope anchor to drop"
    pos_c, neg_c = anchors(thin, c)
    assert torch.equal(pos_c, pos) and bool((neg_c >= c * reach - 1e-3).all()) and len(neg_c) < len(neg_all)
    other = next(q for q in world.question_bank(r.relation) if q != r.prompt)
    rich = NegativePool(questions=thin.questions + [(other, r.relation)], images=thin.images)
    assert torch.equal(anchors(rich, c)[1], anchors(rich, 0.0)[1])  # another wording known: every anchor kept
    with pytest.raises(ValueError, match="router_anchor_clearance"):
        LDKEConfig(router_anchor_clearance=1.0)


def test_textual_anchors_are_fitted_saved_and_reloaded_and_only_ever_veto(world, world_pool, tmp_path):
    """``router_neighbour_questions``: each slot keeps textual anchors; the pack still answers its edit and its
    rephrasings, the anchors travel with the safetensors adapter (PEFT's own loader rebuilds them), and a
    reloaded pack routes every probe as the fitted one did. The veto only removes routes: no probe the
    radius-only router leaves unrouted is routed with the anchors."""
    from peft import PeftModel

    from ldke_peft import LDKEConfig
    from ldke_peft.tuner.probe_features import collect_probe_features

    r = editor_view(world.edit_requests(1, seed=5)[0])
    pm = ldke_peft.edit(world.model, world.processor, [r], LDKEConfig(router_neighbour_questions=6),
                        negatives=world_pool, progress=False)
    try:
        cfg = pm.peft_config["default"]
        router = pm.base_model.router("default")
        assert router.num_anchors > 0 and cfg.router_text_anchors == router.num_anchors
        assert set(router.anchors_slot.tolist()) == {0} and 0 < int((router.anchors_pos > 0.5).sum()) < router.num_anchors
        assert ask(world, pm, r.image, r.prompt) == r.target
        other = world.question_bank(next(rel for rel in world.relations if rel != r.relation))[0]
        images = [r.image] * (2 + len(r.rephrase_prompts)) + [None]
        prompts = [r.prompt, other] + list(r.rephrase_prompts) + [other]
        v, t, h = collect_probe_features(pm, world.processor, cfg.probe_layer, images, prompts)
        with_veto = router.route(v, t, h)
        keep = {k: getattr(router, k).clone() for k in router.ANCHOR_BUFFERS}
        for k in router.ANCHOR_BUFFERS:
            delattr(router, k)
        radius_only = router.route(v, t, h)
        for k, val in keep.items():
            router.register_buffer(k, val)
        assert int(with_veto[0]) == 0
        assert not bool(((with_veto >= 0) & (radius_only < 0)).any())
        pm.save_pretrained(tmp_path / "pack")
        ldke_peft.save_edits(pm, tmp_path / "card")
        assert f"Slots keep {router.num_anchors} textual anchors" in (tmp_path / "card" / "README.md").read_text()
    finally:
        pm.unload()
    loaded = PeftModel.from_pretrained(world.model, tmp_path / "pack")
    try:
        lr = loaded.base_model.router("default")
        assert lr.num_anchors == len(keep["anchors_t"]) and torch.equal(lr.anchors_t, keep["anchors_t"])
        v, t, h = collect_probe_features(loaded, world.processor, cfg.probe_layer, images, prompts)
        assert torch.equal(lr.route(v, t, h), with_veto)
        assert ask(world, loaded, r.image, r.prompt) == r.target
    finally:
        loaded.unload()
    # an anchor naming a slot the pack does not have is refused before any weight is loaded
    from safetensors.torch import load_file, save_file

    from ldke_peft.errors import CorruptAdapterError

    f = tmp_path / "pack" / "adapter_model.safetensors"
    tensors = load_file(f)
    key = next(k for k in tensors if k.endswith("anchors_slot"))
    tensors[key] = torch.full_like(tensors[key], 7)
    save_file(tensors, f)
    with pytest.raises(CorruptAdapterError, match=r"anchors_slot.*names slot\(s\) \[7\]"):
        PeftModel.from_pretrained(world.model, tmp_path / "pack")
