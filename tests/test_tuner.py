"""The LDKE PEFT tuner on real tiny models: registration, routing, caching, saving, merging.

Packs here are hand-set (see ``_tuner_utils``): router keys are the exact probe features of chosen
anchors, deltas have random ``B``. So every assertion is about the tuner mechanics, and the strongest
one is exactness: a row the router sends nowhere must produce *bitwise* the base model's logits.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model

import ldke_peft
from ldke_peft import LDKEConfig, MergeRefusedError
from ldke_peft.tuner.context import forced_slots
from ldke_peft.tuner.layer import LDKELinear
from ldke_peft.tuner.model import routing_state_of

from _tuner_utils import (
    BLUE,
    FAMILIES,
    GREEN,
    PROMPT_A,
    PROMPT_B,
    PROMPT_C,
    RED,
    Anchor,
    SlotSpec,
    assert_same_state,
    base_state,
    build,
    build_inputs,
    generate,
    greedy_without_cache,
    hand_pack,
    ldke_modules,
    logits,
    set_slots,
    supports_text_only,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning"),
]

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

IN_A = Anchor(RED, PROMPT_A)  # slot 0's anchor
IN_B = Anchor(BLUE, PROMPT_B)  # slot 1's anchor
SAME_IMAGE_OTHER_Q = Anchor(RED, PROMPT_B)  # coupled: slot 0's image, slot 1's question
OTHER_IMAGE_SAME_Q = Anchor(GREEN, PROMPT_A)  # coupled: slot 0's question, another image
UNRELATED = Anchor(GREEN, PROMPT_C)
TEXT_ONLY = Anchor(None, PROMPT_A)


def two_slot_pack(model_type: str, seed: int = 0, **kw):
    """Slot 0 on layer 2 fires on ``IN_A``; slot 1 on layers 2 and 3 fires on ``IN_B``."""
    model, proc = build(model_type, seed)
    return model, proc, hand_pack(model, proc, [SlotSpec([2], IN_A), SlotSpec([2, 3], IN_B)], **kw)


def mixed_rows(model) -> list[Anchor]:
    rows = [IN_A, IN_B, SAME_IMAGE_OTHER_Q, OTHER_IMAGE_SAME_Q, UNRELATED]
    return rows + [TEXT_ONLY] if supports_text_only(model) else rows


# ---------------------------------------------------------------------- registration


def test_registration_all_loading_routes(tmp_path):
    model, proc, hp = two_slot_pack("llava")
    hp.model.save_pretrained(tmp_path / "pack")
    pack = str(tmp_path / "pack")
    rows = [IN_A, UNRELATED]
    expected = logits(hp.model, build_inputs(model, proc, rows))

    # the generic peft entry point resolves peft_type "LDKE"
    cfg = PeftConfig.from_pretrained(pack)
    assert isinstance(cfg, LDKEConfig) and cfg.slot_layers == [[2], [2, 3]]

    # PeftModel.from_pretrained
    m1, _ = build("llava")
    pm1 = PeftModel.from_pretrained(m1, pack)
    assert torch.equal(logits(pm1, build_inputs(m1, proc, rows)), expected)

    # PeftModel.load_adapter (a second adapter on an existing PeftModel)
    pm1.load_adapter(pack, adapter_name="again")
    assert isinstance(pm1.peft_config["again"], LDKEConfig)

    # transformers' model.load_adapter (no PeftModel at all)
    m2, _ = build("llava")
    m2.load_adapter(pack)
    assert ldke_modules(m2), "transformers' load_adapter did not inject LDKE layers"
    out = logits(m2, build_inputs(m2, proc, rows))
    assert torch.equal(out, expected), "routing does not work after transformers' load_adapter"


def test_registration_is_idempotent(tmp_path):
    from peft import mapping

    model, proc, hp = two_slot_pack("llava")
    hp.model.save_pretrained(tmp_path / "pack")
    for _ in range(2):
        ldke_peft.tuner.peft_type.register()
    importlib.reload(ldke_peft)
    importlib.import_module("ldke_peft")
    for key in ("LDKE", ldke_peft.LDKEPeftType.LDKE):
        assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] is LDKEConfig
        assert mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] is ldke_peft.LDKEModel
        assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] == "ldke_"
    # the generic loader check is installed once, never wrapped around itself
    fn = PeftConfig.__dict__["from_pretrained"].__func__
    assert getattr(fn, "_ldke_wrapped", False) and not getattr(fn.__wrapped__, "_ldke_wrapped", False)
    m, _ = build("llava")
    pm = PeftModel.from_pretrained(m, str(tmp_path / "pack"))
    assert isinstance(pm.peft_config["default"], LDKEConfig)


# ---------------------------------------------------------------------- round trip (fresh interpreter)

_ROUND_TRIP = textwrap.dedent(
    """
    import sys, json
    sys.path.insert(0, {tests!r})
    import torch
    from peft import PeftConfig
    try:
        PeftConfig.from_pretrained({pack!r})
        registered_without_import = True
    except Exception:
        registered_without_import = False
    import ldke_peft
    from peft import PeftModel
    from safetensors.torch import load_file
    from _tuner_utils import {rows_import}, assert_same_state, base_state, build, build_inputs, logits
    rows = [{rows}]
    model, proc = build({family!r})
    before = base_state(model)
    pm = PeftModel.from_pretrained(model, {pack!r})
    out = logits(pm, build_inputs(model, proc, rows))
    expected = load_file({expected!r})
    assert_same_state(before, pm, "after PeftModel.from_pretrained")
    print(json.dumps(dict(
        registered_without_import=registered_without_import,
        equal=torch.equal(out, expected["logits"]),
        routing=pm.base_model.last_routing("default").tolist(),
        max_diff=float((out - expected["logits"]).abs().max()),
    )))
    """
)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_round_trip_in_fresh_interpreter(model_type, tmp_path):
    from safetensors.torch import save_file

    model, proc, hp = two_slot_pack(model_type)
    names = ["IN_A", "UNRELATED", "SAME_IMAGE_OTHER_Q"] + (["TEXT_ONLY"] if supports_text_only(model) else [])
    rows = [globals()[n] for n in names]
    out = logits(hp.model, build_inputs(model, proc, rows))
    routing = hp.model.base_model.last_routing("default").tolist()
    assert routing[0] == 0 and all(r == -1 for r in routing[1:])
    pack = tmp_path / "pack"
    hp.model.save_pretrained(pack)
    save_file({"logits": out.contiguous()}, str(tmp_path / "expected.safetensors"))

    defs = {
        "IN_A": "Anchor(RED, PROMPT_A)", "UNRELATED": "Anchor(GREEN, PROMPT_C)",
        "SAME_IMAGE_OTHER_Q": "Anchor(RED, PROMPT_B)", "TEXT_ONLY": "Anchor(None, PROMPT_A)",
    }
    code = _ROUND_TRIP.format(
        tests=TESTS_DIR, pack=str(pack), family=model_type, expected=str(tmp_path / "expected.safetensors"),
        rows_import="Anchor, RED, GREEN, PROMPT_A, PROMPT_B, PROMPT_C", rows=", ".join(defs[n] for n in names),
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc_ = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc_.returncode == 0, proc_.stderr[-3000:]
    import json

    result = json.loads(proc_.stdout.strip().splitlines()[-1])
    assert not result["registered_without_import"], "peft resolved LDKE without `import ldke_peft`?"
    assert result["routing"] == routing
    assert result["equal"], f"reloaded logits differ (max |diff| {result['max_diff']})"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_base_weights_bitwise_unchanged(model_type, tmp_path):
    model, proc = build(model_type)
    before = base_state(model)
    cfg = LDKEConfig(slot_layers=[[2], [2, 3]], probe_layer=1, rank=2)
    pm = get_peft_model(model, cfg)
    assert_same_state(before, pm, "get_peft_model")
    set_slots(pm, proc, [SlotSpec([2], IN_A), SlotSpec([2, 3], IN_B)])
    assert_same_state(before, pm, "slot writes")
    logits(pm, build_inputs(model, proc, mixed_rows(model)))
    generate(pm, build_inputs(model, proc, [IN_A, UNRELATED]), 3)
    assert_same_state(before, pm, "forward/generate")
    pm.save_pretrained(tmp_path / "pack")
    assert_same_state(before, pm, "save_pretrained")
    pm.load_adapter(str(tmp_path / "pack"), adapter_name="b")
    assert_same_state(before, pm, "load_adapter")
    pm.delete_adapter("b")
    assert_same_state(before, pm, "delete_adapter")
    assert not any("b" in m.ldke_A or "b" in m.ldke_router for m in pm.modules() if isinstance(m, LDKELinear))
    assert "b" not in routing_state_of(model).slots


# ---------------------------------------------------------------------- routing


@pytest.mark.parametrize("model_type", FAMILIES)
def test_routing_exact_outside_scope(model_type):
    model, proc = build(model_type)
    rows = mixed_rows(model)
    built = build_inputs(model, proc, rows)
    base = logits(model, built)
    singles = [logits(model, build_inputs(model, proc, [r])) for r in rows]
    hp = hand_pack(model, proc, [SlotSpec([2], IN_A), SlotSpec([2, 3], IN_B)])

    out = logits(hp.model, built)
    routing = hp.model.base_model.last_routing("default").tolist()
    assert routing == [0, 1] + [-1] * (len(rows) - 2), routing
    for i in (0, 1):
        assert (out[i] - base[i]).abs().max() > 1e-2, f"routed row {i} did not get its delta"
    for i in range(2, len(rows)):
        assert torch.equal(out[i], base[i]), f"row {i} ({rows[i]}) is out of scope but its logits changed"

    # each row alone: in-scope changes, out-of-scope bitwise equal to the base model alone
    for i, r in enumerate(rows):
        alone = logits(hp.model, build_inputs(model, proc, [r]))
        if i < 2:
            assert hp.model.base_model.last_routing("default").tolist() == [i]
            assert (alone - singles[i]).abs().max() > 1e-2
        else:
            assert torch.equal(alone, singles[i]), f"{r} alone: logits changed"

    with hp.model.disable_adapter():
        assert torch.equal(logits(hp.model, built), base)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_text_only_never_routes_to_image_slot(model_type):
    model, proc = build(model_type)
    if not supports_text_only(model):
        pytest.fail(f"{model_type} tiny model cannot run text-only rows; this test needs one")
    hp = hand_pack(model, proc, [SlotSpec([2], IN_A)])
    router = hp.model.base_model.router("default")
    # Make the textual test pass for the text-only question: key_t = its own features, huge radii.
    v, t, has = ldke_peft.tuner.probe_features.collect_probe_features(hp.model, proc, 1, [None, RED], [PROMPT_A, PROMPT_A])
    assert has.tolist() == [False, True]
    zv, zt = router.project(v, t)
    router.set_slot(0, key_v=zv[1], key_t=zt[0], radius_v=1e6, radius_t=1e6, needs_image=True)
    built = build_inputs(model, proc, [TEXT_ONLY, IN_A, Anchor(None, PROMPT_B)])
    out = logits(hp.model, built)
    assert hp.model.base_model.last_routing("default").tolist() == [-1, 0, -1]
    with hp.model.disable_adapter():
        base = logits(hp.model, built)
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    # the same pack's text-only slot does accept text-only rows (and no image rows)
    router.set_slot(0, key_v=zv[1], key_t=zt[0], radius_v=0.0, radius_t=1e6, needs_image=False)
    logits(hp.model, built)
    assert hp.model.base_model.last_routing("default").tolist() == [0, -1, 0]


# ---------------------------------------------------------------------- generation


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generate_kv_cache_matches_step_by_step(model_type):
    model, proc = build(model_type)
    rows = [IN_A, UNRELATED, IN_B, SAME_IMAGE_OTHER_Q]
    built = build_inputs(model, proc, rows)
    base_gen = generate(model, built, 6)
    hp = hand_pack(model, proc, [SlotSpec([2], IN_A), SlotSpec([2, 3], IN_B)])
    cached = generate(hp.model, built, 6)
    assert hp.model.base_model.last_routing("default").tolist() == [0, -1, 1, -1]
    stepwise = greedy_without_cache(hp.model, built, 6)
    assert torch.equal(cached, stepwise), f"KV-cache generate {cached.tolist()} != step-by-step {stepwise.tolist()}"
    # batched, different decisions per row: routed rows changed, unrouted rows exactly the base output
    assert not torch.equal(cached[0], base_gen[0]) and not torch.equal(cached[2], base_gen[2])
    assert torch.equal(cached[1], base_gen[1]) and torch.equal(cached[3], base_gen[3])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_beam_search(model_type):
    model, proc = build(model_type)
    built = build_inputs(model, proc, [IN_A, UNRELATED, IN_B])
    base_beams = generate(model, built, 5, num_beams=3)
    hp = hand_pack(model, proc, [SlotSpec([2], IN_A), SlotSpec([2, 3], IN_B)])
    beams = generate(hp.model, built, 5, num_beams=3)
    # every beam of a sample carries that sample's decision
    assert hp.model.base_model.last_routing("default").tolist() == [0] * 3 + [-1] * 3 + [1] * 3
    assert not torch.equal(beams[0], base_beams[0]) and not torch.equal(beams[2], base_beams[2])
    assert torch.equal(beams[1], base_beams[1])


# ---------------------------------------------------------------------- several packs


@pytest.mark.parametrize("model_type", FAMILIES)
def test_two_packs_both_active(model_type, tmp_path):
    model, proc = build(model_type)
    pa = hand_pack(model, proc, [SlotSpec([2], IN_A)], seed=1)
    pa.model.save_pretrained(tmp_path / "a")
    model_b, _ = build(model_type)
    pb = hand_pack(model_b, proc, [SlotSpec([3], IN_B)], seed=2)
    pb.model.save_pretrained(tmp_path / "b")

    fresh, _ = build(model_type)
    rows = [IN_A, IN_B, UNRELATED]
    built = build_inputs(fresh, proc, rows)
    base = logits(fresh, built)
    pm = PeftModel.from_pretrained(fresh, str(tmp_path / "a"))
    only_a = logits(pm, built)
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    pm.base_model.set_adapter(["default", "b"])
    assert pm.base_model.active_adapters == ["default", "b"]
    both = logits(pm, built)
    assert pm.base_model.last_routing("default").tolist() == [0, -1, -1]
    assert pm.base_model.last_routing("b").tolist() == [-1, 0, -1]
    assert torch.equal(both[0], only_a[0]), "pack a's row changed when pack b became active"
    assert (both[1] - base[1]).abs().max() > 1e-2, "pack b's row did not get pack b's delta"
    assert torch.equal(both[2], base[2])
    pm.set_adapter("b")
    only_b = logits(pm, built)
    assert torch.equal(only_b[1], both[1]) and torch.equal(only_b[0], base[0])


# ---------------------------------------------------------------------- training


@pytest.mark.parametrize("model_type", FAMILIES)
def test_gradient_checkpointing_grads_only_on_routed_slot(model_type):
    model, proc = build(model_type)
    # three slots on layer 3: only slot 1's anchor is in the batch
    specs = [SlotSpec([3], IN_A), SlotSpec([3], IN_B), SlotSpec([3], SAME_IMAGE_OTHER_Q)]
    hp = hand_pack(model, proc, specs)
    pm = hp.model
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()), "checkpointing is not on"
    built = build_inputs(model, proc, [IN_B, UNRELATED])
    out = pm(**built.inputs, use_cache=False).logits
    assert pm.base_model.last_routing("default").tolist() == [1, -1]
    out.float().pow(2).mean().backward()
    layer = pm.base_model.ldke_layers("default")[3]
    g = layer.ldke_B["default"].grad
    assert g is not None, "no gradient reached ldke_B under gradient checkpointing"
    ids = layer.hosted_slots("default")
    assert g[ids.index(1)].abs().sum() > 0
    for k in (0, 2):
        assert torch.equal(g[ids.index(k)], torch.zeros_like(g[0])), f"slot {k} got a gradient"
    for name, p in pm.named_parameters():
        if "ldke_" not in name:
            assert p.grad is None, f"base parameter {name} got a gradient"


# ---------------------------------------------------------------------- merge / disable / grow


@pytest.mark.parametrize("model_type", FAMILIES)
def test_merge_refused_unless_forced(model_type):
    model, proc = build(model_type)
    hp = hand_pack(model, proc, [SlotSpec([2, 3], IN_A)])
    pm = hp.model
    built = build_inputs(model, proc, [IN_A, UNRELATED])
    with pytest.raises(MergeRefusedError, match="every input"):
        pm.merge_and_unload()
    with pytest.raises(MergeRefusedError, match="every input"):
        pm.merge_adapter()
    assert ldke_modules(pm), "a refused merge must leave the adapter in place"
    with forced_slots(model, torch.zeros(2, dtype=torch.long)):
        always_on = logits(pm, built)
    merged = pm.merge_and_unload(force=True)
    assert not ldke_modules(merged)
    assert not merged._forward_pre_hooks and not merged._forward_hooks, "routing hooks left on the merged model"
    out = logits(merged, built)
    torch.testing.assert_close(out, always_on, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_grow_adapter_keeps_old_slots(model_type):
    model, proc = build(model_type)
    hp = hand_pack(model, proc, [SlotSpec([2], IN_A), SlotSpec([2, 3], IN_B)])
    pm = hp.model
    built = build_inputs(model, proc, [IN_A, IN_B, UNRELATED])
    before = logits(pm, built)
    with pm.disable_adapter():
        base = logits(pm, built)
    new = pm.base_model.grow_adapter("default", [[3], [2, 3]])
    assert new == [2, 3] and pm.peft_config["default"].num_slots == 4
    after = logits(pm, built)
    assert torch.equal(after, before), "growing the pack changed the existing slots' outputs"
    router = pm.base_model.router("default")
    assert router.num_slots == 4 and float(router.radius_v[2:].abs().sum()) == 0.0
    for layer in pm.base_model.ldke_layers("default").values():
        for k in new:
            if k in layer.hosted_slots("default"):
                _, B, i = layer.slot_delta("default", k)
                assert torch.equal(B[i], torch.zeros_like(B[i])), "a new slot must start with B = 0"
    with forced_slots(model, torch.full((3,), 2, dtype=torch.long)):
        assert torch.equal(logits(pm, built), base), "a new (zero) slot changed the output"
    with pytest.raises(ValueError, match="above the probe layer"):
        pm.base_model.grow_adapter("default", [[1]])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_failed_call_does_not_disturb_the_next_generate(model_type):
    """A forward that raises midway (here: image features that do not match the image tokens) must
    leave no half-recorded call behind: the next ``generate`` routes and decodes exactly as on a fresh
    model. BLIP-2's ``generate`` enters the language model directly, so a stale "nested call" mark from
    the failed root call would make it skip routing."""
    model, proc = build(model_type)
    built = build_inputs(model, proc, [IN_A, UNRELATED])
    hp = hand_pack(model, proc, [SlotSpec([2], IN_A)])
    expected = generate(hp.model, built, 4)
    assert hp.model.base_model.last_routing("default").tolist() == [0, -1]
    bad = dict(build_inputs(model, proc, [Anchor(GREEN, "Q?")]).inputs)
    pv = bad["pixel_values"]  # a malformed image (2 colour channels / a cut patch): the vision tower raises
    bad["pixel_values"] = pv[:, :2] if pv.dim() == 4 else pv[..., :-1]
    with pytest.raises(Exception):
        with torch.no_grad():
            hp.model(**bad)
    again = generate(hp.model, built, 4)
    assert hp.model.base_model.last_routing("default").tolist() == [0, -1]
    assert torch.equal(again, expected)


# ---------------------------------------------------------------------- per-decision state


@pytest.mark.parametrize("model_type", ["llava", "blip-2"])
def test_inner_entry_hooks_are_off_during_a_root_call_and_back_after(model_type):
    """A root call takes the language model's and the embeddings' entry hooks off while it runs (the
    root's hook has decided; unhooked modules take torch's fast call path at every decode step) and
    puts them back when it returns *or raises*: a later direct language-model call (BLIP-2's
    ``generate``) must find them."""
    model, proc = build(model_type)
    hp = hand_pack(model, proc, [SlotSpec([2], IN_A)])
    fam = ldke_peft.family_of(model)
    lm, emb = fam.language_model(model), model.get_input_embeddings()
    outside = (dict(lm._forward_pre_hooks), dict(emb._forward_pre_hooks))
    assert outside[0] and outside[1]
    during = []
    spy = fam.decoder_layers(model)[0].register_forward_hook(
        lambda m, a, o: during.append((dict(lm._forward_pre_hooks), dict(emb._forward_pre_hooks))))
    try:
        logits(hp.model, build_inputs(model, proc, [IN_A]))
        assert during and all(not any(k in hooks for k in ids) for d in during for hooks, ids in zip(d, outside))
        assert (dict(lm._forward_pre_hooks), dict(emb._forward_pre_hooks)) == outside
        bad = dict(build_inputs(model, proc, [Anchor(GREEN, "Q?")]).inputs)
        pv = bad["pixel_values"]
        bad["pixel_values"] = pv[:, :2] if pv.dim() == 4 else pv[..., :-1]
        with pytest.raises(Exception), torch.no_grad():
            hp.model(**bad)
        assert (dict(lm._forward_pre_hooks), dict(emb._forward_pre_hooks)) == outside
    finally:
        spy.remove()


def test_a_decisions_gathered_factors_follow_adapter_changes():
    """Decode steps reuse the factors gathered at the decision's first call. Anything that changes what
    applies — disabling adapters, writing a slot's factors in place (the editor's optimizer does) —
    must be seen by the very next call of the same decision, not only after the next prefill."""
    model, proc = build("llava")
    hp = hand_pack(model, proc, [SlotSpec([2], IN_A)])
    logits(hp.model, build_inputs(model, proc, [IN_A]))
    assert hp.model.base_model.last_routing("default").tolist() == [0]
    layer = hp.model.base_model.ldke_layers("default")[2]
    x = torch.randn(1, 3, layer.in_features)
    with torch.no_grad():
        base_out = layer.get_base_layer()(x)
        routed = layer(x)
        assert not torch.equal(routed, base_out)
        assert torch.equal(layer(x), routed)  # the cached plan: same result
        with hp.model.disable_adapter():
            assert torch.equal(layer(x), base_out)
        assert torch.equal(layer(x), routed)
        A, B, j = layer.slot_delta("default", 0)
        B[j].mul_(2.0)
        doubled = layer(x)
        expected = base_out + 2.0 * (routed - base_out)
        assert torch.allclose(doubled, expected, atol=1e-5) and not torch.allclose(doubled, routed)


def test_a_repeated_decision_reuses_its_factors():
    """The same decision again (a batch-1 server sees one per slot) gathers nothing: the layer hands
    back the factors it gathered for it before, and the logits are identical."""
    model, proc = build("llava")
    hp = hand_pack(model, proc, [SlotSpec([2], IN_A)])
    built = build_inputs(model, proc, [IN_A])
    first = logits(hp.model, built)
    layer = hp.model.base_model.ldke_layers("default")[2]
    factors = layer._plan[0][2:]
    logits(hp.model, build_inputs(model, proc, [UNRELATED]))  # another decision in between
    assert hp.model.base_model.last_routing("default").tolist() == [-1]
    again = logits(hp.model, built)
    assert torch.equal(again, first)
    assert all(a is b for a, b in zip(layer._plan[0][2:], factors))


def test_a_peft_generate_keeps_its_prefill_decision_without_hooks():
    """Inside ``PeftModel.generate`` the decision made at the prefill holds for every decode step, so
    after the prefill the root's LDKE hooks step aside (decode steps run exactly the base model's call
    path plus the edited layers); they are back when ``generate`` returns, and when it raises."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model, proc = build("llava")
    built = build_inputs(model, proc, [IN_A, UNRELATED])
    hp = hand_pack(model, proc, [SlotSpec([2], IN_A)])
    outside = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    assert outside[0] and outside[1]
    seen = []
    spy = ldke_peft.family_of(model).decoder_layers(model)[0].register_forward_hook(
        lambda m, a, o: seen.append(len(model._forward_pre_hooks)))
    try:
        expected = generate(hp.model, built, 4)
        assert seen[0] == len(outside[0]) and seen[1:] == [len(outside[0]) - 1] * 3
        assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == outside
        assert torch.equal(expected, greedy_without_cache(hp.model, built, 4))

        class Boom(LogitsProcessor):
            def __call__(self, input_ids, scores):
                if input_ids.shape[1] > built.input_ids.shape[1] + 1:
                    raise RuntimeError("boom")
                return scores

        with pytest.raises(RuntimeError, match="boom"):
            generate(hp.model, built, 4, logits_processor=LogitsProcessorList([Boom()]))
        assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == outside
        assert torch.equal(generate(hp.model, built, 4), expected)
        assert hp.model.base_model.last_routing("default").tolist() == [0, -1]
    finally:
        spy.remove()


# ---------------------------------------------------------------------- per-call routing inputs


@pytest.mark.parametrize("model_type", FAMILIES[:1])
def test_routing_inputs_live_for_one_call(model_type):
    """``ldke_slots=`` / ``ldke_prompt_mask=`` on a call (Poly's ``task_ids`` pattern) act on that call only,
    equal the context-manager form, and leave nothing behind, not even when the call raises."""
    from ldke_peft.tuner.context import current_forced_slots, current_prompt_mask, forced_slots, prompt_mask_context
    from ldke_peft.tuner.routing import NO_SLOT

    model, proc = build(model_type)
    hp = hand_pack(model, proc, [SlotSpec([2, 3], IN_A)])
    pm = hp.model
    built = build_inputs(model, proc, [IN_A, UNRELATED])
    routed = logits(pm, built)
    on = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        forced_kw = pm(**built.inputs, ldke_slots=on).logits
        off_kw = pm(**built.inputs, ldke_slots=torch.full((2,), NO_SLOT, dtype=torch.long)).logits
    with forced_slots(pm, on):
        forced_cm = logits(pm, built)
    torch.testing.assert_close(forced_kw, forced_cm)
    assert not torch.allclose(forced_kw[1], routed[1]), "forcing the unrelated row into the slot must change it"
    with pm.disable_adapter():
        base = logits(pm, built)
    torch.testing.assert_close(off_kw, base)
    # nothing carried over to the next call: the router decides again
    torch.testing.assert_close(logits(pm, built), routed)
    assert current_forced_slots(pm) is None and current_prompt_mask(pm) is None
    # a call that raises still ends its routing inputs
    class Boom(RuntimeError):
        pass

    def boom(*_):
        raise Boom

    handle = ldke_peft.family_of(model).decoder_layers(ldke_peft.families.base_model_of(pm))[0].register_forward_hook(boom)
    try:
        with pytest.raises(Boom), torch.no_grad():
            pm(**built.inputs, ldke_slots=on)
    finally:
        handle.remove()
    assert current_forced_slots(pm) is None
    # the block form restores what was there before, also around a call with its own inputs
    mask = built.prompt_mask
    with prompt_mask_context(pm, mask):
        with torch.no_grad():
            pm(**built.inputs, ldke_slots=on)
        assert current_prompt_mask(pm) is mask and current_forced_slots(pm) is None
    assert current_prompt_mask(pm) is None
    with pytest.raises(TypeError, match="model first"):
        prompt_mask_context(mask, mask)
