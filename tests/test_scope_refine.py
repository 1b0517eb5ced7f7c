"""Correcting an edit's scope afterwards (``refine_scope``, ``ldke route --fix``): the questions a user files route as
filed, the edit's own inputs keep firing, no delta changes, the change survives save/load, and bad input changes
nothing."""

from __future__ import annotations

import dataclasses

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
    """Seed 3 with the default anchors: two wordings of the edit are vetoed. The fix makes them in-scope anchors;
    the saved pack (safetensors, PEFT's loader) routes them to the edit, as the fixed model in memory does."""
    r = world.edit_requests(1, seed=3)[0]
    pm = ldke_peft.edit(world.model, world.processor, [editor_view(r)], LDKEConfig(), negatives=world_pool,
                        progress=False)
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
    loaded = PeftModel.from_pretrained(world.model, tmp_path / "pack")
    try:
        assert _fires(world, loaded, r.image, wordings) == fixed
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
