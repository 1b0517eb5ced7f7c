"""Correcting an edit's scope afterwards (``refine_scope``, ``ldke route --fix``): the questions a user files route as
filed, the edit's own inputs keep firing, no delta changes, the change survives save/load, and bad input changes
nothing."""

from __future__ import annotations

import dataclasses

import PIL.Image
import pytest
import torch
from peft import PeftModel

import ldke_peft
from ldke_peft import LDKEConfig, Probe
from ldke_peft.bench.mke import editor_view
from ldke_peft.editing.scope_refine import ScopeRefineError, refine_scope
from ldke_peft.errors import ImageError
from ldke_peft.metrics.routes import which_slots
from ldke_peft.tuner.routing import NO_SLOT


def _router_state(pm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pm.base_model.router("default")._buffers.items()}


def _delta_state(pm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pm.state_dict().items() if "ldke" in k and "ldke_router" not in k}


def _fires(world, pm, image, prompts) -> list[int]:
    return [d["default"] for d in which_slots(pm, world.processor, [image] * len(prompts), list(prompts))]


def test_a_look_alike_leak_is_cut_by_the_image_and_a_near_question_by_an_anchor(world, world_pool):
    """Seed 0 without anchors: the edit question on a look-alike image fires the edit. The fix cuts the visual
    radius (the edit's own image and other views keep firing, and no wording is touched). A near question filed
    as out of scope on the edit's own image becomes an out-of-scope anchor: it stops firing, the edit question
    keeps firing. No delta tensor changes."""
    r = world.edit_requests(1, seed=0)[0]
    pm = ldke_peft.edit(world.model, world.processor, [editor_view(r)], LDKEConfig(router_neighbour_questions=0),
                        negatives=world_pool, progress=False)
    try:
        looks = [p for p in r.coupled if p.kind == "lookalike_same_question"]
        assert looks and all(s == 0 for s in _fires(world, pm, looks[0].image, [p.prompt for p in looks]))
        deltas = _delta_state(pm)
        assert deltas
        fixes = ldke_peft.refine_scope(pm, world.processor, [r])  # the top-level name
        assert all(f.ok for f in fixes)
        assert {f.action for f in fixes if f.before != f.wanted} <= {"visual radius of slot 0 cut",
                                                                     "fixed by the change for another question"}
        assert pm.base_model.router("default").num_anchors == 0  # nothing textual was needed
        assert _fires(world, pm, looks[0].image, [p.prompt for p in looks]) == [NO_SLOT] * len(looks)
        assert _fires(world, pm, r.image, [r.prompt, *r.rephrase_prompts]) == [0] * (1 + len(r.rephrase_prompts))
        for im in r.rephrase_images:
            assert _fires(world, pm, im, [r.prompt]) == [0]

        # a wording of the edit on its own image, filed as out of scope: only a textual anchor can put it out
        near = r.rephrase_prompts[0]
        filed = dataclasses.replace(r, rephrase_prompts=list(r.rephrase_prompts[1:]),
                                    coupled=[Probe(near, "x", image=r.image, kind="near_miss")])
        fixes = refine_scope(pm, world.processor, [filed])
        (fix,) = [f for f in fixes if f.prompt == near and f.kind.startswith("coupled")]
        assert (fix.before, fix.after, fix.action) == (0, NO_SLOT, "out-of-scope anchor of slot 0")
        assert _fires(world, pm, r.image, [near, r.prompt]) == [NO_SLOT, 0]
        assert pm.peft_config["default"].router_text_anchors == pm.base_model.router("default").num_anchors > 0
        after = _delta_state(pm)
        assert after.keys() == deltas.keys() and all(torch.equal(after[k], deltas[k]) for k in deltas)
    finally:
        pm.unload()


def test_vetoed_wordings_are_let_in_and_the_fix_survives_save_and_load(world, world_pool, tmp_path):
    """Seed 3 with the default anchors but no asked-for word: two wordings of the edit are vetoed. The fix makes
    them in-scope anchors; the saved pack (safetensors, PEFT's loader) routes them to the edit, as the fixed model in
    memory does, and records each change in the edit's metadata and on its model card."""
    r = world.edit_requests(1, seed=3)[0]
    pm = ldke_peft.edit(world.model, world.processor, [editor_view(r)], LDKEConfig(router_asked_word=False),
                        negatives=world_pool, progress=False)
    wordings = [q for q in world.question_bank(r.relation) if q != r.prompt]
    try:
        before = _fires(world, pm, r.image, wordings)
        assert NO_SLOT in before
        full = dataclasses.replace(r, rephrase_prompts=wordings)
        fixes = refine_scope(pm, world.processor, [full])
        assert all(f.ok for f in fixes)
        assert {f.action for f in fixes if f.before != f.wanted} <= {"in-scope anchor of slot 0",
                                                                     "fixed by the change for another question"}
        fixed = _fires(world, pm, r.image, wordings)
        assert fixed == [0] * len(wordings)
        assert all(f.after == NO_SLOT for f in fixes if f.wanted == NO_SLOT)  # its probes stay out
        ldke_peft.save_edits(pm, tmp_path / "pack")
    finally:
        pm.unload()
    changed = [f for f in fixes if f.action == "in-scope anchor of slot 0"]
    card = (tmp_path / "pack" / "README.md").read_text()
    assert "## Scope corrections" in card and all(f.prompt[:40] in card for f in changed)
    loaded = PeftModel.from_pretrained(world.model, tmp_path / "pack")
    try:
        assert _fires(world, loaded, r.image, wordings) == fixed
        recorded = loaded.peft_config["default"].edits[0]["scope_fixes"]  # the pack says its scope was hand-fixed
        assert [(x["question"], x["in_scope"], x["change"]) for x in recorded] == [
            (f.prompt, True, f.action) for f in changed]
    finally:
        loaded.unload()


def test_a_filed_question_naming_the_asked_word_is_kept_out_by_an_anchor_naming_it(world, world_pool, tmp_path):
    """Seed 3 with the defaults: the edit's wordings name its asked-for word and route past the proposed neighbours,
    and so does a near-miss question that names it. Filed as out of scope, that question gets an out-of-scope anchor
    that names the word (only such an anchor can veto it): it stays out, the wordings keep routing, also after a
    save and PEFT's loader."""
    r = world.edit_requests(1, seed=3)[0]
    pm = ldke_peft.edit(world.model, world.processor, [editor_view(r)], LDKEConfig(), negatives=world_pool,
                        progress=False)
    wordings = [q for q in world.question_bank(r.relation) if q != r.prompt]
    near = "What does the national animal of this country eat?"
    try:
        assert pm.peft_config["default"].edits[0]["asked_word"] == "animal"
        assert _fires(world, pm, r.image, wordings + [near]) == [0] * (len(wordings) + 1)
        filed = dataclasses.replace(r, rephrase_prompts=wordings,
                                    coupled=[Probe(near, "x", image=r.image, kind="near_miss")])
        fixes = refine_scope(pm, world.processor, [filed])
        (fix,) = [f for f in fixes if f.prompt == near]
        assert (fix.before, fix.after, fix.action) == (0, NO_SLOT, "out-of-scope anchor of slot 0")
        assert _fires(world, pm, r.image, wordings + [near]) == [0] * len(wordings) + [NO_SLOT]
        assert (pm.base_model.router("default").anchors_pos == -1).sum() == 1
        ldke_peft.save_edits(pm, tmp_path / "pack")
    finally:
        pm.unload()
    assert "names the word its edit question asks about (`animal`)" in (tmp_path / "pack" / "README.md").read_text()
    loaded = PeftModel.from_pretrained(world.model, tmp_path / "pack")
    try:
        assert loaded.base_model.router("default").slot_words == ("animal",)
        assert _fires(world, loaded, r.image, wordings + [near]) == [0] * len(wordings) + [NO_SLOT]
    finally:
        loaded.unload()


def test_bad_input_raises_and_leaves_the_router_as_it_was(world, world_pool, tmp_path):
    r = world.edit_requests(1, seed=3)[0]
    pm = ldke_peft.edit(world.model, world.processor, [editor_view(r)], LDKEConfig(), negatives=world_pool,
                        progress=False)
    try:
        state = _router_state(pm)
        anchors = pm.peft_config["default"].router_text_anchors
        wordings = [q for q in world.question_bank(r.relation) if q != r.prompt]
        broken = dataclasses.replace(r, rephrase_prompts=wordings,
                                     coupled=[Probe("What is this?", "x", image=str(tmp_path / "missing.png"))])
        with pytest.raises(ImageError):
            refine_scope(pm, world.processor, [broken])
        now = _router_state(pm)
        assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
        assert pm.peft_config["default"].router_text_anchors == anchors
        with pytest.raises(ScopeRefineError, match="none of the requests is an edit of this pack"):
            refine_scope(pm, world.processor, [dataclasses.replace(r, target=r.target + "x")])
    finally:
        pm.unload()
    with pytest.raises(ScopeRefineError, match="no LDKE adapter"):
        refine_scope(world.model, world.processor, [r])


def test_another_edits_slot_is_changed_only_with_its_own_questions_filed(world, world_pool):
    """Request A files a wording of edit B (on B's image) as out of scope. With B's request absent nothing says
    which of B's questions to keep, so B's slot is left alone ("could not fix"); with B's request filed too, the
    question is put out and every wording of B still fires B."""
    a, b = world.edit_requests(2, seed=0)
    pm = ldke_peft.edit(world.model, world.processor, [editor_view(a), editor_view(b)], LDKEConfig(),
                        negatives=world_pool, progress=False)
    try:
        q = b.rephrase_prompts[0]
        filed = dataclasses.replace(a, m_locality=[Probe(q, "-", image=b.image, kind="other_entity")])
        assert _fires(world, pm, b.image, [q]) == [1]
        state = _router_state(pm)
        (fix,) = [f for f in refine_scope(pm, world.processor, [filed]) if f.kind == "m_locality:other_entity"]
        assert (fix.after, fix.ok) == (1, False) and "add its request" in fix.action
        now = _router_state(pm)
        assert all(torch.equal(now[k], state[k]) for k in state)
        keep = dataclasses.replace(b, rephrase_prompts=list(b.rephrase_prompts[1:]), coupled=[], locality=[],
                                   m_locality=[])
        fixes = refine_scope(pm, world.processor, [filed, keep])
        assert all(f.ok for f in fixes)
        assert _fires(world, pm, b.image, [b.prompt, *b.rephrase_prompts[1:]]) == [1] * len(b.rephrase_prompts)
    finally:
        pm.unload()


def test_a_wording_outside_the_textual_radius_widens_it(world, world_pool):
    """A long wording of the edit lies outside the textual radius: the fix widens the radius just past it, and the
    edit's locality probes (text only, other relations' questions on its image) stay out."""
    r = world.edit_requests(1, seed=3)[0]
    pm = ldke_peft.edit(world.model, world.processor, [editor_view(r)], LDKEConfig(), negatives=world_pool,
                        progress=False)
    try:
        router = pm.base_model.router("default")
        long = f"Could you tell me, for the country whose flag is in this picture, the answer to: {r.prompt}"
        assert _fires(world, pm, r.image, [long]) == [NO_SLOT]
        radius = float(router.radius_t[0])
        fixes = refine_scope(pm, world.processor, [dataclasses.replace(r, rephrase_prompts=[long])])
        assert all(f.ok for f in fixes)
        (fix,) = [f for f in fixes if f.prompt == long]
        assert "textual radius of slot 0 widened" in fix.action and float(router.radius_t[0]) > radius
        assert _fires(world, pm, r.image, [long]) == [0]
    finally:
        pm.unload()


def test_an_error_after_a_change_restores_the_router(world, world_pool, monkeypatch):
    """A failure in the middle of the fix (after a first change was written) leaves the router and the config's
    anchor count exactly as before the call (no asked-for word: the anchors veto wordings the fix lets in)."""
    from ldke_peft.editing import scope_refine

    r = world.edit_requests(1, seed=3)[0]
    pm = ldke_peft.edit(world.model, world.processor, [editor_view(r)], LDKEConfig(router_asked_word=False),
                        negatives=world_pool, progress=False)
    real = scope_refine._Refiner.let_in

    def let_in_then_fail(self, s, i):
        real(self, s, i)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(scope_refine._Refiner, "let_in", let_in_then_fail)
    try:
        state, anchors = _router_state(pm), pm.peft_config["default"].router_text_anchors
        wordings = [q for q in world.question_bank(r.relation) if q != r.prompt]
        with pytest.raises(RuntimeError, match="interrupted"):
            refine_scope(pm, world.processor, [dataclasses.replace(r, rephrase_prompts=wordings)])
        now = _router_state(pm)
        assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
        assert pm.peft_config["default"].router_text_anchors == anchors
    finally:
        pm.unload()


def test_the_edit_question_on_an_image_nearer_than_the_edits_own_is_not_anchored_out():
    """A look-alike image nearer the slot's visual key than the edit's own image, asked the edit question: no
    visual cut keeps the edit's image, and an out-of-scope anchor of the edit question would also keep it out on
    the edit's other views. It is reported as not fixable and the edit keeps every view."""
    from PIL import Image

    from ldke_peft import EditRequest
    from ldke_peft.testing import tiny_model
    from ldke_peft.tuner.probe_features import collect_probe_features

    model, processor = tiny_model("llava")
    prompt = "What is the capital of this country?"
    red = lambda c: Image.new("RGB", (40, 40), c)  # noqa: E731
    views = [red((225, 0, 0)), red((255, 30, 30))]
    req = EditRequest(image=red((255, 0, 0)), prompt=prompt, target="Paris", rephrase_images=views)
    pm = ldke_peft.edit(model, processor, [req], LDKEConfig(), progress=False)
    try:
        router = pm.base_model.router("default")
        shades = [red((255 - k, k // 2, 0)) for k in range(10, 200, 10)]
        v, _, _ = collect_probe_features(pm, processor, pm.peft_config["default"].probe_layer,
                                         shades + [req.image], [prompt] * (len(shades) + 1))
        d = (router.project_visual(0, v) - router.keys_v[0].float()).norm(dim=1)
        fired = [s == 0 for s in (x["default"] for x in which_slots(pm, processor, shades, [prompt] * len(shades)))]
        near = [i for i in range(len(shades)) if fired[i] and float(d[i]) < float(d[-1])]
        assert near, "the test needs a firing shade nearer the key than the edit image"
        look = shades[near[0]]
        state = _router_state(pm)
        fixes = refine_scope(pm, processor, [dataclasses.replace(req, coupled=[Probe(prompt, "-", image=look)])])
        (fix,) = [f for f in fixes if f.kind == "coupled"]
        assert not fix.ok and "one of slot 0's own wordings" in fix.action
        now = _router_state(pm)
        assert all(torch.equal(now[k], state[k]) for k in state)
        assert [x["default"] for x in which_slots(pm, processor, [req.image, *views], [prompt] * 3)] == [0, 0, 0]
    finally:
        pm.unload()


def test_another_view_outside_the_visual_radius_widens_it_only_as_far_as_filed_look_alikes_allow():
    """A view of the entity farther from the slot's visual key than its radius does not fire. Filed alone, or with
    only an unrelated image out of scope, it is not let in (nothing bounds the widening); filed with a look-alike
    asked the edit question farther out, the radius widens just past the view, the look-alike stays out and so does
    another question filed on the view itself; with a look-alike nearer than the view, nothing changes."""
    pm, processor, req = _one_edit()
    prompt, red = req.prompt, _red

    def fired(ks, question=prompt):
        return [x["default"] for x in which_slots(pm, processor, [red(k) for k in ks], [question] * len(ks))]

    try:
        router = pm.base_model.router("default")
        assert fired([0, 20, 30, 60, 70, 80, 90]) == [0, 0, 0, NO_SLOT, NO_SLOT, NO_SLOT, NO_SLOT]
        state, radius = _router_state(pm), float(router.radius_v[0])
        sky = Probe("What is in the sky?", "-", image=PIL.Image.new("RGB", (40, 40), (0, 90, 255)), kind="other")
        view = dataclasses.replace(req, rephrase_images=[red(30), red(20), red(60)], m_locality=[sky])
        (fix,) = [f for f in refine_scope(pm, processor, [view]) if not f.ok]
        assert fix.kind == "rephrase_image" and "no look-alike image asked its question" in fix.action
        assert all(torch.equal(_router_state(pm)[k], state[k]) for k in state)

        too_near = dataclasses.replace(req, rephrase_images=[red(30), red(20), red(80)],
                                       coupled=[Probe(prompt, "-", image=red(70), kind="lookalike_same_question")])
        (fix,) = [f for f in refine_scope(pm, processor, [too_near]) if not f.ok]
        assert fix.kind == "rephrase_image" and "lies as near" in fix.action
        assert all(torch.equal(_router_state(pm)[k], state[k]) for k in state)
        assert "scope_fixes" not in pm.peft_config["default"].edits[0]  # nothing changed, nothing recorded

        # a look-alike that fires the edit now, nearer than the view: no radius keeps it out and lets the view in
        leaking = dataclasses.replace(view, coupled=[Probe(prompt, "-", image=red(35), kind="lookalike_same_question"),
                                                     Probe(prompt, "-", image=red(90), kind="lookalike_same_question")])
        assert fired([35]) == [0]
        fixes = [f for f in refine_scope(pm, processor, [leaking]) if not f.ok]
        assert sorted(f.kind for f in fixes) == ["coupled:lookalike_same_question", "rephrase_image"]
        assert all("lies as near" in f.action or "as near the slot's key as an image the edit must keep" in f.action
                   for f in fixes)
        assert all(torch.equal(_router_state(pm)[k], state[k]) for k in state)

        colour = "What colour is this flag?"
        bounded = dataclasses.replace(view, coupled=[Probe(prompt, "-", image=red(90), kind="lookalike_same_question"),
                                                     Probe(colour, "-", image=red(60), kind="same_view")])
        fixes = refine_scope(pm, processor, [bounded])
        assert all(f.ok for f in fixes)
        (fix,) = [f for f in fixes if f.before != f.wanted]
        assert fix.kind == "rephrase_image" and fix.action == "visual radius of slot 0 widened"
        assert float(router.radius_v[0]) > radius
        assert fired([0, 20, 30, 60, 90]) == [0, 0, 0, 0, NO_SLOT] and fired([60], colour) == [NO_SLOT]
        (rec,) = pm.peft_config["default"].edits[0]["scope_fixes"]
        assert rec == {"question": prompt, "kind": "rephrase_image", "image": ldke_peft.requests.image_fingerprint(red(60)),
                       "in_scope": True, "change": "visual radius of slot 0 widened"}
    finally:
        pm.unload()


def _red(k: int) -> PIL.Image.Image:
    """A flag-sized image that lies farther from pure red as ``k`` grows (a colour ramp of look-alikes)."""
    return PIL.Image.new("RGB", (40, 40), (255 - k, k // 2, 0))


def _one_edit():
    """A tiny LLaVA with a pack of one edit of the capital question on pure red (two nearer shades as other views)."""
    from ldke_peft import EditRequest
    from ldke_peft.testing import tiny_model

    model, processor = tiny_model("llava")
    req = EditRequest(image=_red(0), prompt="What is the capital of this country?", target="Paris",
                      rephrase_images=[_red(30), _red(20)])
    return ldke_peft.edit(model, processor, [req], LDKEConfig(), progress=False), processor, req


def _two_edits():
    """A tiny LLaVA with one pack of two edits of the same question, on images at both ends of the ramp."""
    from ldke_peft import EditRequest
    from ldke_peft.testing import tiny_model

    model, processor = tiny_model("llava")
    prompt = "What is the capital of this country?"
    a = EditRequest(image=_red(0), prompt=prompt, target="Paris", rephrase_images=[_red(30), _red(20)])
    b = EditRequest(image=_red(200), prompt=prompt, target="Rome", rephrase_images=[_red(190), _red(180)])
    return ldke_peft.edit(model, processor, [a, b], LDKEConfig(), progress=False), processor, a, b


def test_a_view_that_fires_another_edit_is_moved_and_each_edit_records_its_own_change():
    """Two edits on images at both ends of a colour ramp; a view of edit 0 lies inside edit 1's visual radius. The fix
    cuts edit 1's radius (its own images keep firing it) and widens edit 0's, bounded by a filed look-alike that
    edit 1 also takes (and is cut to leave out): one question, two changes, each recorded in the metadata of the
    edit it changed."""
    pm, processor, a, b = _two_edits()
    prompt = a.prompt

    def fired(ims):
        return [x["default"] for x in which_slots(pm, processor, ims, [prompt] * len(ims))]

    try:
        look = PIL.Image.new("RGB", (40, 40), (120, 0, 0))  # dark red: far from edit 0's key, inside edit 1's radius
        assert fired([_red(90), look]) == [1, 1]
        filed = dataclasses.replace(a, rephrase_images=[_red(30), _red(20), _red(90)],
                                    coupled=[Probe(prompt, "-", image=look, kind="lookalike_same_question")])
        fixes = refine_scope(pm, processor, [filed, b])
        assert all(f.ok for f in fixes)
        (fix,) = [f for f in fixes if f.kind == "rephrase_image" and f.before != f.wanted]
        assert (fix.before, fix.after) == (1, 0)
        assert fix.action == "visual radius of slot 1 cut; visual radius of slot 0 widened"
        assert fired([_red(0), _red(20), _red(30), _red(90), _red(180), _red(190), _red(200), look]) == [0, 0, 0, 0, 1, 1, 1, NO_SLOT]
        edits = pm.peft_config["default"].edits
        assert [(x["in_scope"], x["change"]) for x in edits[0]["scope_fixes"]] == [(True, "visual radius of slot 0 widened")]
        assert [(x["kind"], x["in_scope"], x["change"]) for x in edits[1]["scope_fixes"]] == [
            ("rephrase_image", False, "visual radius of slot 1 cut"),
            ("coupled:lookalike_same_question", False, "visual radius of slot 1 cut")]
    finally:
        pm.unload()


def test_a_widening_never_takes_in_another_edits_image():
    """Edit 1's visual key moved off the colour ramp, just beyond where a view of edit 0 (with a filed look-alike
    farther out) would widen edit 0's radius to: its images may lie anywhere within its own radius, so the view is
    not let in while edit 1's request is not filed, and nothing changes. The same with edit 1 scored in a projection
    of its own, wherever its key lies: its images cannot be compared there."""
    from ldke_peft.tuner.probe_features import collect_probe_features

    pm, processor, a, b = _two_edits()
    prompt = a.prompt
    try:
        router = pm.base_model.router("default")
        look = PIL.Image.new("RGB", (40, 40), (120, 0, 0))
        filed = dataclasses.replace(a, rephrase_images=[_red(30), _red(20), _red(90)],
                                    coupled=[Probe(prompt, "-", image=look, kind="lookalike_same_question")])
        v, _, _ = collect_probe_features(pm, processor, pm.peft_config["default"].probe_layer, [_red(90)], [prompt])
        reach = float((router.project_visual(0, v) - router.keys_v[0].float()).norm()) / 0.98 ** 2
        assert float(router.radius_v[1]) > 0.05 * reach  # so edit 1's radius reaches back inside ``reach``
        away = torch.nn.functional.normalize(torch.randn(router.keys_v.shape[1], generator=torch.Generator().manual_seed(0)), dim=0)
        with torch.no_grad():
            router.keys_v[1] = router.keys_v[0] + 1.05 * reach * away
        assert [x["default"] for x in which_slots(pm, processor, [_red(90), look], [prompt] * 2)] == [NO_SLOT, NO_SLOT]
        state = _router_state(pm)
        (fix,) = [f for f in refine_scope(pm, processor, [filed]) if not f.ok]
        assert fix.kind == "rephrase_image" and "the images of edit 1 of the pack may lie as near" in fix.action
        assert all(torch.equal(_router_state(pm)[k], state[k]) for k in state)

        with torch.no_grad():  # edit 1 in a projection of its own (a copy of projection 0), its key far away
            router.keys_v[1] = router.keys_v[0] + 10 * reach * away
            pv, pt, mv, mt = router._group_tables(0)
            router.set_slot_group(1, router.add_group(mu_v=mv.clone(), proj_v=pv.clone(), mu_t=mt.clone(), proj_t=pt.clone()))
        state = _router_state(pm)
        (fix,) = [f for f in refine_scope(pm, processor, [filed]) if not f.ok]
        assert fix.kind == "rephrase_image" and "edit 1 of the pack is scored in another projection" in fix.action
        assert all(torch.equal(_router_state(pm)[k], state[k]) for k in state)
    finally:
        pm.unload()


def test_letting_a_view_in_never_lets_in_a_filed_look_alike():
    """A textual radius tightened to just inside a look-alike filed as out of scope with another wording of the edit
    (nearer than a view of the edit, which lies outside both radii): the visual bound does not count the look-alike
    (its question is out now), but the textual radius the view needs would take it. With that wording filed as the
    edit's own, nothing could put the look-alike out again (no cut keeps the view, no anchor is made of an own
    wording), so the view is refused with the look-alike named and nothing changes; with it not filed, the view is
    let in and the look-alike put out by an anchor at once."""
    from ldke_peft.tuner.probe_features import collect_probe_features

    pm, processor, req = _one_edit()
    prompt, wording = req.prompt, "Which city is the capital of this country?"

    def fired(ims, questions):
        return [x["default"] for x in which_slots(pm, processor, ims, questions)]

    try:
        router = pm.base_model.router("default")
        view, look, far = _red(80), _red(60), PIL.Image.new("RGB", (40, 40), (255, 0, 255))
        _, t, _ = collect_probe_features(pm, processor, pm.peft_config["default"].probe_layer, [far, look, view],
                                         [prompt, wording, prompt])
        d_far, d_look, d_view = (router.project_textual(0, t) - router.keys_t[0].float()).norm(dim=1).tolist()
        # the far look-alike's question is in (it bounds the visual widening), the near one's is out, and the
        # textual widening the view needs reaches it
        assert d_far + 0.03 < d_look < d_view - 0.03
        with torch.no_grad():
            router.radius_t[0] = (d_far + d_look) / 2
        assert fired([_red(0), _red(0), _red(20), _red(30), view, look, far],
                     [prompt, wording, prompt, prompt, prompt, wording, prompt]) == [0, 0, 0, 0] + [NO_SLOT] * 3
        state = _router_state(pm)
        filed = dataclasses.replace(req, rephrase_prompts=[wording], rephrase_images=[_red(30), _red(20), view],
                                    coupled=[Probe(wording, "-", image=look, kind="lookalike_wording"),
                                             Probe(prompt, "-", image=far, kind="lookalike_same_question")])
        fixes = refine_scope(pm, processor, [filed])
        (fix,) = [f for f in fixes if not f.ok]
        assert fix.kind == "rephrase_image" and fix.action == (
            f"could not fix: letting it into slot 0 would also let in {wording!r} (filed as out of scope), and nothing "
            "would keep that out")
        assert fired([look], [wording]) == [NO_SLOT]
        assert all(torch.equal(_router_state(pm)[k], state[k]) for k in state)
        assert "scope_fixes" not in pm.peft_config["default"].edits[0]

        # the same wording not filed as the edit's: the look-alike it would let in is kept out by an anchor at once
        fixes = refine_scope(pm, processor, [dataclasses.replace(filed, rephrase_prompts=[])])
        assert all(f.ok for f in fixes)
        (fix,) = [f for f in fixes if f.before != f.wanted]
        assert fix.kind == "rephrase_image" and fix.action.startswith("visual radius of slot 0 widened")
        assert fired([view, look, far, _red(0)], [prompt, wording, prompt, prompt]) == [0, NO_SLOT, NO_SLOT, 0]
        assert [(x["kind"], x["change"]) for x in pm.peft_config["default"].edits[0]["scope_fixes"]] == [
            ("rephrase_image", "visual radius of slot 0 widened"), ("rephrase_image", "textual radius of slot 0 widened"),
            ("coupled:lookalike_wording", "out-of-scope anchor of slot 0")]
    finally:
        pm.unload()


def test_a_visual_cut_never_hands_the_edits_own_question_to_another_edit():
    """A look-alike asked the edit question fires edit 0; the cut that would put it out scores edit 0's own question
    on its own image worse than an overlapping edit 1 (its key put by hand next to edit 0's image) does, so the cut
    is not made: the look-alike is reported as not fixable with that reason, and nothing changes."""
    from ldke_peft.tuner.probe_features import collect_probe_features

    pm, processor, a, b = _two_edits()
    prompt = a.prompt
    try:
        router = pm.base_model.router("default")
        v, t, h = collect_probe_features(pm, processor, pm.peft_config["default"].probe_layer, [_red(0), _red(35)],
                                         [prompt, prompt])
        d_look = float((router.project_visual(0, v[1:]) - router.keys_v[0].float()).norm())
        radius = float(router.radius_v[0])
        s_before = float(router.scores(v[:1], t[:1], h[:1])[0, 0])
        with torch.no_grad():
            router.radius_v[0] = 0.98 * d_look  # the cut keep_out would make
            s_cut = float(router.scores(v[:1], t[:1], h[:1])[0, 0])
            router.radius_v[0] = radius
        assert s_before + 0.02 < s_cut < 1.0
        away = torch.nn.functional.normalize(torch.randn(router.keys_v.shape[1], generator=torch.Generator().manual_seed(0)), dim=0)
        with torch.no_grad():  # edit 1 scores edit 0's question on edit 0's image between the two
            router.keys_v[1] = router.project_visual(0, v[:1])[0] + 0.01 * away
            router.radius_v[1] = 0.01 / ((s_before + s_cut) / 2)
            router.keys_t[1] = router.project_textual(0, t[:1])[0]
        assert [x["default"] for x in which_slots(pm, processor, [_red(0), _red(35)], [prompt] * 2)] == [0, 0]
        state = _router_state(pm)
        look = Probe(prompt, "-", image=_red(35), kind="lookalike_same_question")
        (fix,) = [f for f in refine_scope(pm, processor, [dataclasses.replace(a, coupled=[look])]) if not f.ok]
        assert fix.kind == "coupled:lookalike_same_question" and "hands a question of the edit to another edit" in fix.action
        assert all(torch.equal(_router_state(pm)[k], state[k]) for k in state)
        assert [x["default"] for x in which_slots(pm, processor, [_red(0)], [prompt])] == [0]
    finally:
        pm.unload()


def test_an_anchor_that_would_let_a_kept_out_question_back_in_is_not_made():
    """Edit 0 holds an out-of-scope anchor (another wording of the edit asked of a far look-alike) that keeps that
    wording out on a near look-alike. Keeping a near question on the edit's own image out needs the edit's held
    wordings as in-scope anchors too, which would lift that veto: the near question is reported as not fixable,
    naming the question it would move, and nothing changes."""
    from ldke_peft.tuner.probe_features import collect_probe_features

    pm, processor, req = _one_edit()
    prompt, wording = req.prompt, "Which city is the capital of this country?"
    near = "Which city is the capital of that country?"
    try:
        router = pm.base_model.router("default")
        _, t, _ = collect_probe_features(pm, processor, pm.peft_config["default"].probe_layer, [_red(50)], [wording])
        with torch.no_grad():
            mine, out = router.anchors_slot == 0, router.anchors_pos < 0.5
            # the wording names the edit's asked-for word, as a filed question's anchor would
            router.set_text_anchors(0, router.anchors_t[mine & ~out].float(),
                                    torch.cat([router.anchors_t[mine & out].float(), router.project_textual(0, t).float()]),
                                    named=torch.cat([router.anchors_pos[mine & out] < -0.5, torch.tensor([True])]))
        ims, questions = [_red(0), _red(0), _red(0), _red(25)], [prompt, wording, near, wording]
        assert [x["default"] for x in which_slots(pm, processor, ims, questions)] == [0, 0, 0, NO_SLOT]
        state = _router_state(pm)
        filed = dataclasses.replace(req, rephrase_prompts=[wording],
                                    coupled=[Probe(near, "-", image=_red(0), kind="near_question"),
                                             Probe(wording, "-", image=_red(25), kind="lookalike_wording")])
        (fix,) = [f for f in refine_scope(pm, processor, [filed]) if not f.ok]
        assert fix.prompt == near and fix.action == (
            f"could not fix: putting it out of slot 0 would move {wording!r} (filed as out of scope) to slot 0")
        assert all(torch.equal(_router_state(pm)[k], state[k]) for k in state)
        assert [x["default"] for x in which_slots(pm, processor, ims, questions)] == [0, 0, 0, NO_SLOT]
    finally:
        pm.unload()


def test_a_look_alike_inside_many_edits_scopes_is_put_out_of_each():
    """Six edits of one question on images along the colour ramp, their visual radii widened by hand to take one
    blue look-alike: each pass puts it out of the slot it fires, and passes go on until it fires none. Each edit's
    own image keeps firing it, and each cut is recorded with the edit it changed."""
    from ldke_peft import EditRequest
    from ldke_peft.testing import tiny_model
    from ldke_peft.tuner.probe_features import collect_probe_features

    model, processor = tiny_model("llava")
    prompt = "What is the capital of this country?"
    reqs = [EditRequest(image=_red(k), prompt=prompt, target=f"T{k}") for k in (0, 40, 80, 120, 160, 200)]
    pm = ldke_peft.edit(model, processor, reqs, LDKEConfig(router_neighbour_questions=0), progress=False)
    try:
        router = pm.base_model.router("default")
        blue = PIL.Image.new("RGB", (40, 40), (0, 0, 255))
        v, t, h = collect_probe_features(pm, processor, pm.peft_config["default"].probe_layer, [blue], [prompt])
        with torch.no_grad():
            for s in range(len(reqs)):
                router.radius_v[s] = (1.2 + 0.1 * s) * float((router.project_visual(0, v) - router.keys_v[s].float()).norm())
                d_t = float((router.project_textual(0, t) - router.keys_t[s].float()).norm())
                router.radius_t[s] = max(float(router.radius_t[s]), 1.5 * d_t)
        assert bool((router.scores(v, t, h) <= 1.0).all())
        filed = [dataclasses.replace(reqs[0], coupled=[Probe(prompt, "-", image=blue, kind="lookalike_same_question")]),
                 *reqs[1:]]
        fixes = refine_scope(pm, processor, filed)
        assert all(f.ok for f in fixes)
        (fix,) = [f for f in fixes if f.before != f.wanted]
        assert fix.after == NO_SLOT and fix.action.count("cut") == len(reqs)
        images = [r.image for r in reqs]
        assert [x["default"] for x in which_slots(pm, processor, [*images, blue], [prompt] * 7)] == [0, 1, 2, 3, 4, 5, NO_SLOT]
        edits = pm.peft_config["default"].edits
        assert [[x["change"] for x in e["scope_fixes"]] for e in edits] == [[f"visual radius of slot {s} cut"] for s in range(6)]
    finally:
        pm.unload()


def test_an_inactive_adapter_is_refined_with_its_own_textual_key(tmp_path):
    """Two packs loaded side by side (PEFT's loader), the active one without a sentence encoder, the other with one:
    refining the other reads the questions as its own router does, and the fix holds once it is active."""
    from ldke_peft import EditRequest
    from ldke_peft.hub import save_edits
    from ldke_peft.testing import tiny_model

    prompt = "What is the capital of this country?"
    a = EditRequest(image=_red(0), prompt=prompt, target="Paris", rephrase_images=[_red(30), _red(20)])
    b = EditRequest(image=_red(200), prompt=prompt, target="Rome", rephrase_images=[_red(190)])
    for name, req, cfg in (("x", a, LDKEConfig(router_text_encoder=None)), ("y", b, LDKEConfig())):
        model, processor = tiny_model("llava")
        pm = ldke_peft.edit(model, processor, [req], cfg, progress=False)
        save_edits(pm, tmp_path / name)
        pm.unload()
    model, processor = tiny_model("llava")
    pm = PeftModel.from_pretrained(model, str(tmp_path / "x"), adapter_name="x")
    pm.load_adapter(str(tmp_path / "y"), adapter_name="y")
    try:
        assert pm.active_adapter == "x"
        near = "What is the capital of Italy?"
        filed = dataclasses.replace(b, coupled=[Probe(near, "-", image=_red(200), kind="near_question")])
        (fix,) = [f for f in refine_scope(pm, processor, [filed], adapter_name="y") if f.before != f.wanted]
        assert (fix.prompt, fix.after, fix.action) == (near, NO_SLOT, "out-of-scope anchor of slot 0")
        pm.set_adapter("y")
        assert [d["y"] for d in which_slots(pm, processor, [_red(200)] * 2, [prompt, near])] == [0, NO_SLOT]
    finally:
        pm.unload()


def test_a_pack_with_words_but_no_anchors_gets_a_named_anchor_that_serving_honours(world, world_pool, tmp_path):
    """A slot that recorded its asked-for word but keeps no anchor (all dropped): keeping out a question that names
    the word makes the slot's first anchor, flagged as naming it, so serving (which reads the words once the pack has
    anchors) keeps the question out as the fix decided."""
    r = world.edit_requests(1, seed=3)[0]
    pm = ldke_peft.edit(world.model, world.processor, [editor_view(r)], LDKEConfig(), negatives=world_pool,
                        progress=False)
    near = "What does the national animal of this country eat?"
    try:
        router = pm.base_model.router("default")
        for k in router.ANCHOR_BUFFERS:
            delattr(router, k)
        pm.peft_config["default"].router_text_anchors = 0
        assert router.num_anchors == 0 and router.slot_words == ("animal",)
        assert _fires(world, pm, r.image, [near]) == [0]
        filed = dataclasses.replace(r, coupled=[Probe(near, "x", image=r.image, kind="near_miss")])
        (fix,) = [f for f in refine_scope(pm, world.processor, [filed]) if f.prompt == near]
        assert (fix.after, fix.action) == (NO_SLOT, "out-of-scope anchor of slot 0")
        assert (router.anchors_pos == -1).sum() == 1
        assert _fires(world, pm, r.image, [near, r.prompt]) == [NO_SLOT, 0]
    finally:
        pm.unload()
