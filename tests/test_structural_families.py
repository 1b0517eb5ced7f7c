"""Every family end to end through the structural family adapter, on real tiny transformers models.

Each family is the real transformers model class built from a tiny config (offline) with its real
processor class around a tokenizer trained on the fly. Two processors cannot be built here and are
replaced, as their builders' docstrings say: ``PixtralProcessor`` (Mistral 3) imports torchvision at
module level, so Mistral 3's inputs come from ``ldke_peft.testing._pixtral`` (the same ``[IMG]`` /
``[IMG_BREAK]`` expansion around the real PIL image processor); ``SmolVLMProcessor`` needs
``num2words``, so SmolVLM's inputs come from ``Idefics3Processor`` (the same image prompt).

Per family (:func:`ldke_peft.testing.roundtrip.round_trip`, which the coverage report runs too): LDKE edits, the pack saves and reloads with ``PeftModel.from_pretrained`` onto a fresh
copy of the base, the reloaded pack gives the edited logits bit for bit on the edit's input and the
base model's logits bit for bit on inputs out of the edit's scope, and ``generate`` with the KV cache
matches step-by-step decoding without a cache. The structural facts the adapter derived (decoder
layers, edit targets, image masks, input building) are checked against every model in
``tests/test_families.py``; here, that the new families need no family code at all, and that models
which cannot work say why before they are touched.
"""

from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image
from torch import nn

import ldke_peft
from ldke_peft import EditRequest, LDKEConfig
from ldke_peft.errors import UnsupportedModelError
from ldke_peft.families import Family, family_of, get_family
from ldke_peft.testing.roundtrip import EDIT_CONFIG, round_trip
from ldke_peft.testing.tiny import tiny_model, tiny_model_types

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

#: the families added with the structural adapter
NEW = ["qwen3_vl", "qwen3_5", "gemma3", "llava_next", "internvl", "smolvlm", "mistral3", "idefics2", "aya_vision",
       "shieldgemma2", "vipllava", "deepseek_vl", "glm4v"]

@pytest.mark.parametrize("model_type", tiny_model_types())
def test_edit_save_reload_route_and_generate(model_type):
    result = round_trip(lambda: tiny_model(model_type))
    assert result.edits and result.reloads, result.reason
    assert result.details["answer"].startswith("Paris")


# ---------------------------------------------------------------------- derived structure


@functools.lru_cache(maxsize=None)
def _tiny(model_type: str):
    return tiny_model(model_type)


@pytest.mark.parametrize("model_type", NEW)
def test_new_families_need_no_family_code(model_type):
    assert type(get_family(model_type)) is Family
    assert family_of(_tiny(model_type)[0]) is get_family(model_type)


@pytest.mark.parametrize("model_type", NEW)
def test_derived_edit_targets_are_the_language_models_mlp_outputs(model_type):
    model, _ = _tiny(model_type)
    fam = family_of(model)
    layers = fam.decoder_layers(model)
    assert len(layers) == fam.text_config(model).num_hidden_layers == 4
    lm_modules = {id(m) for m in fam.language_model(model).modules()}
    vision = {id(m) for v in fam.vision_modules(model) for m in v.modules()}
    assert vision and not lm_modules & vision
    for i, name in enumerate(fam.mlp_out_names(model)):
        mod = model.get_submodule(name)
        assert isinstance(mod, nn.Linear) and mod.out_features == fam.hidden_size(model)
        assert mod.in_features == fam.text_config(model).intermediate_size, f"{name} is the MLP's down projection"
        assert id(mod) in {id(m) for m in layers[i].modules()} and id(mod) not in vision


# ---------------------------------------------------------------------- models that cannot work


@pytest.mark.parametrize(
    "model_type, why",
    [
        ("mllama", "cross-attention layers"),
        ("florence2", "encoder-decoder"),
        ("pix2struct", "encoder-decoder"),
        ("idefics", "cross-attention layers"),
        ("llama", "not an image-text-to-text model type"),
    ],
)
def test_model_types_that_cannot_work_say_why(model_type, why):
    with pytest.raises(UnsupportedModelError, match=why):
        get_family(model_type)


def test_no_image_token_refused_before_the_model_is_touched():
    from _tuner_utils import base_state

    model, processor = tiny_model("llava")
    model.config.image_token_id = None
    before = base_state(model)
    with pytest.raises(UnsupportedModelError, match="no image token id"):
        ldke_peft.edit(model, processor, [EditRequest(image=Image.new("RGB", (64, 64)), prompt="What is it?", target="Paris")],
                       LDKEConfig(**EDIT_CONFIG), progress=False)
    after = base_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_fused_mixture_of_experts_mlp_says_why():
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    cfg = Qwen3VLMoeConfig(
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           patch_size=16, deepstack_visual_indexes=[]),
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         num_experts=4, num_experts_per_tok=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1]}),
        image_token_id=5,
    )
    with pytest.raises(UnsupportedModelError, match="mixture of experts"):
        family_of(Qwen3VLMoeForConditionalGeneration(cfg))
