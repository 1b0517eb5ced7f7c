"""The editor's layer replay (``ldke_peft.tuner.layer_replay``): kept only where it reproduces the forward.

Hybrid stacks call each layer with its own mask / rotary tables (Gemma 3: sliding and global
layers; Qwen3.5: linear- and full-attention layers), so a replay must record every layer's call;
Qwen3-VL's DeepStack adds visual features *between* its first layers, which no replay of the layers
alone can reproduce, so from layer 0 the replay must be refused (and the editor then runs full
forwards).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ldke_peft.families import family_of
from ldke_peft.tuner import replay_packing as packing
from ldke_peft.tuner.layer_replay import capture_replay
from ldke_peft.testing.tiny import tiny_model


def _inputs(model_type: str):
    model, processor = tiny_model(model_type)
    fam = family_of(model)
    built = fam.build_inputs(processor, [Image.new("RGB", (64, 64), (200, 30, 30)), None],
                             ["What is the capital of the country shown?", "Which language is spoken there?"],
                             ["Paris", "euro"])
    pred = torch.zeros_like(built.target_mask)
    pred[:, :-1] = built.target_mask[:, 1:]
    return model, fam, built, pred


@pytest.mark.parametrize("model_type, lo", [("gemma3", 1), ("qwen3_5", 1), ("qwen3_vl", 1), ("llava", 0)])
def test_replay_reproduces_the_forward(model_type, lo):
    model, fam, built, pred = _inputs(model_type)
    replay = capture_replay(model, fam, lo, built, pred)
    assert replay is not None and len(replay.layers) == fam.num_layers(model) - lo
    with torch.no_grad():
        ref = model(**built.inputs).logits[pred]
        again = fam.logits_from_hidden(model, replay.run()[pred])
    torch.testing.assert_close(again, ref, atol=1e-4, rtol=1e-3)


def test_replay_refused_where_the_language_model_works_between_layers():
    model, fam, built, pred = _inputs("qwen3_vl")  # DeepStack adds visual features after layer 0
    assert model.config.vision_config.deepstack_visual_indexes
    assert capture_replay(model, fam, 0, built, pred) is None


# ---------------------------------------------------------------------- packed rows


_IMGS = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (20, 90, 220))]
_QS = ["What is the capital of the country shown?", "Name the capital of this country.",
       "Which city is the seat of government here, in a word?"]
#: the delta fit's layout: each image asked each wording
_FIT_ROWS = ([im for im in _IMGS for _ in _QS], [q for _ in _IMGS for q in _QS])


def _fit_rows(model_type: str):
    """The delta fit's layout: two images x three wordings, right-aligned, the target appended."""
    model, processor = tiny_model(model_type)
    fam = family_of(model)
    rows_i, rows_q = _FIT_ROWS
    qs = rows_q[: len(rows_q) // 2]
    built = fam.build_inputs(processor, rows_i, rows_q, ["Paris"] * len(rows_q)).right_aligned()
    pred = torch.zeros_like(built.target_mask)
    pred[:, :-1] = built.target_mask[:, 1:]
    pick = [0, len(rows_q) - 1]
    probe = fam.build_inputs(processor, [rows_i[i] for i in pick], [rows_q[i] for i in pick], ["Paris"] * 2).right_aligned()
    pp = torch.zeros_like(probe.target_mask)
    pp[:, :-1] = probe.target_mask[:, 1:]
    row_images = [0] * len(qs) + [1] * len(qs)
    return model, fam, built, pred, row_images, (probe, pp, pick)


def test_right_aligned_moves_padding_to_the_end_and_keeps_every_row():
    model, processor = tiny_model("llava")
    fam = family_of(model)
    built = fam.build_inputs(processor, [None, None], ["Hi?", "A much longer question about the capital city?"], ["x", "y"])
    right = built.right_aligned()
    am, ram = built.inputs["attention_mask"].bool(), right.inputs["attention_mask"].bool()
    assert not am[0, 0] and am[0, -1], "build_inputs left-pads"
    assert ram[0, 0] and not ram[0, -1], "right_aligned puts the padding last"
    for b in range(2):
        assert torch.equal(built.input_ids[b][am[b]], right.input_ids[b][ram[b]])
        assert torch.equal(built.target_mask[b][am[b]], right.target_mask[b][ram[b]])
        assert torch.equal(built.prompt_mask[b][am[b]], right.prompt_mask[b][ram[b]])


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl", "llava_onevision"])
@pytest.mark.parametrize("lo", [0, 1])
def test_packed_replay_computes_each_shared_prefix_once_and_gives_every_rows_logits(model_type, lo):
    model, fam, built, pred, row_images, probe = _fit_rows(model_type)
    replay = capture_replay(model, fam, lo, built, pred, row_images=row_images, probe=probe)
    assert replay is not None and replay.rows == 1, "six rows with one chat frame and two images pack into one sequence"
    real = int(built.inputs["attention_mask"].sum())
    assert replay.hidden.shape[1] < 0.9 * real
    with torch.no_grad():
        ref = model(**built.inputs).logits[pred]
        again = fam.logits_from_hidden(model, replay.run_at(pred))
    torch.testing.assert_close(again, ref, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("model_type, lo", [("llava", 1), ("qwen2_vl", 0)])
def test_selected_rows_of_a_packed_replay_give_those_rows_logits_from_their_tokens_alone(model_type, lo):
    """The staged fit cuts the edit image's rows out of the packed replay of every row: the cut must be
    the same computation as those rows run on their own, on fewer tokens."""
    model, fam, built, pred, row_images, probe = _fit_rows(model_type)
    _, processor = tiny_model(model_type)
    rows_i, rows_q = _FIT_ROWS
    replay = capture_replay(model, fam, lo, built, pred, row_images=row_images, probe=probe)
    assert replay is not None and replay.packing is not None
    for rows in ([0, 1, 2], [4], [5, 0]):
        part = replay.select(rows)
        assert part.hidden.shape[1] < replay.hidden.shape[1]
        alone = fam.build_inputs(processor, [rows_i[r] for r in rows], [rows_q[r] for r in rows],
                                 ["Paris"] * len(rows)).right_aligned()
        at = torch.zeros_like(alone.target_mask)
        at[:, :-1] = alone.target_mask[:, 1:]
        with torch.no_grad():
            want = model(**alone.inputs).logits[at]
            got = fam.logits_from_hidden(model, part.run_at(pred[rows]))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_a_replay_cast_to_bfloat16_runs_there_and_gives_every_weight_back_bit_for_bit():
    model, fam, built, pred, row_images, probe = _fit_rows("llava")
    model.requires_grad_(False)  # frozen, as under PEFT: trainable parameters keep their dtype
    replay = capture_replay(model, fam, 1, built, pred, row_images=row_images, probe=probe)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        want = fam.logits_from_hidden(model, replay.run_at(pred))
        with replay.cast(torch.bfloat16) as fast:
            assert all(p.dtype == torch.bfloat16 for layer in fast.layers for p in layer.parameters())
            got = fam.logits_from_hidden(model, fast.run_at(pred).float())
    assert got.dtype == torch.float32
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) > 0.9
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.1)
    for n, p in model.named_parameters():
        assert p.dtype == before[n].dtype and torch.equal(p, before[n]), n


def test_packed_replay_refused_for_bidirectional_prefixes_and_for_per_layer_calls():
    # PaliGemma's image+prefix attends both ways: a token's state depends on what follows it
    model, fam, built, pred, row_images, probe = _fit_rows("paligemma")
    replay = capture_replay(model, fam, 1, built, pred, row_images=row_images, probe=probe)
    assert replay is not None and replay.rows == len(built)
    # Gemma 3 gives sliding and global layers their own masks: the plain replay records each
    model, fam, built, pred, row_images, probe = _fit_rows("gemma3")
    replay = capture_replay(model, fam, 1, built, pred, row_images=row_images, probe=probe)
    assert replay is not None
    with torch.no_grad():
        ref = model(**built.inputs).logits[pred]
        again = fam.logits_from_hidden(model, replay.run_at(pred))
    torch.testing.assert_close(again, ref, atol=1e-4, rtol=1e-3)


def test_packed_fit_reaches_the_same_delta_as_the_rows_as_built(monkeypatch):
    """Packing is the same computation: the delta fitted on packed rows equals the one fitted row by row."""
    import ldke_peft.tuner.layer_replay as lr
    from ldke_peft import LDKEConfig, edit
    from ldke_peft.requests import EditRequest

    img = Image.new("RGB", (64, 64), (200, 30, 30))
    req = EditRequest(image=img, prompt="What is the capital of the country shown?", target="Lyon",
                      rephrase_prompts=["Name the capital of this country.", "Capital?", "Its capital city is what?",
                                        "Tell me the capital."])
    deltas, steps, tokens = [], [], []
    # the tiny model's width (32) makes dense attention over one packed sequence look dearer than the
    # batch, so the cost guard would keep the rows as built: force packing, it is the equivalence under test
    real_cost = packing.layer_cost
    monkeypatch.setattr(packing, "layer_cost", lambda q, k, d: real_cost(q, k, 4096))
    for packed in (True, False):
        if not packed:
            monkeypatch.setattr(lr, "_packed", lambda *a, **k: (_ for _ in ()).throw(packing.CannotPack("off")))
        model, processor = tiny_model("qwen2_vl")
        torch.manual_seed(0)
        pm = edit(model, processor, [req], LDKEConfig(localization="fixed", fixed_layers=[1], edit_steps=6,
                                                        edit_fit_dtype="float32"),
                  progress=False)
        rep = pm.ldke_reports[-1]
        steps.append(rep.fit_steps)
        tokens.append(rep.fit_tokens)
        deltas.append({n: p.detach().clone() for n, p in pm.named_parameters() if "ldke_B" in n or "ldke_A" in n})
    assert steps[0] == steps[1] and steps[0] > 0
    assert 0 < tokens[0] < tokens[1], "the packed fit runs fewer tokens per step"
    for n in deltas[0]:
        torch.testing.assert_close(deltas[0][n], deltas[1][n], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl"])
def test_packed_router_features_equal_each_row_run_alone(model_type, monkeypatch):
    import ldke_peft.tuner.layer_replay as lr
    from ldke_peft.tuner.probe_features import collect_probe_features

    model, processor = tiny_model(model_type)
    imgs = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (20, 90, 220))]
    qs = ["What is the capital of the country shown?", "Name the capital.", "Which language is spoken here?"]
    rows_i = [im for im in imgs for _ in qs] + [None]
    rows_q = [q for _ in imgs for q in qs] + ["A question without a picture?"]
    real_cost = packing.layer_cost  # force packing on the narrow tiny model (see the fit test above)
    monkeypatch.setattr(packing, "layer_cost", lambda q, k, d: real_cost(q, k, 4096))
    packed = []
    real = lr.packed_hidden
    monkeypatch.setattr(lr, "packed_hidden", lambda *a, **k: packed.append(real(*a, **k)) or packed[-1])
    v, t, has = collect_probe_features(model, processor, 1, rows_i, rows_q, text_key=None)
    assert packed and packed[0] is not None, "the rows were packed"
    for i in range(len(rows_q)):
        v1, t1, h1 = collect_probe_features(model, processor, 1, [rows_i[i]], [rows_q[i]], text_key=None)
        torch.testing.assert_close(v[i], v1[0], atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(t[i], t1[0], atol=1e-4, rtol=1e-3)
        assert bool(has[i]) == bool(h1[0])


def test_rows_that_share_little_are_not_packed():
    """One packed sequence attends densely over all its tokens: rows that share little stay a batch."""
    model, fam, built, pred, _, probe = _fit_rows("llava")  # a two-token chat frame before the image
    distinct = list(range(len(built)))  # every row its own picture: only the chat frame is shared
    replay = capture_replay(model, fam, 1, built, pred, row_images=distinct, probe=probe)
    assert replay is not None and replay.rows == len(built)
