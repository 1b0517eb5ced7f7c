"""The editor's layer replay (``ldke_peft.layer_replay``): kept only where it reproduces the forward.

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
from ldke_peft.layer_replay import capture_replay
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
