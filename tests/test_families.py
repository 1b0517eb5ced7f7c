"""The family registry on real tiny models of every supported family.

Each test runs the real transformers model class and the real processor (PIL image backend, no
torchvision) of every family: decoder layers and edit targets must lie in the language model,
``build_inputs`` must produce left-padded mixed image/text batches the model runs, whose target
mask covers exactly the target tokens and whose image mask covers exactly the positions the model
fills with image features.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
from PIL import Image
from torch import nn

from ldke_peft.errors import InvalidRequestError, UnsupportedModelError
from ldke_peft.families import Family, base_model_of, family_of, get_family, supported_model_types
from ldke_peft.testing.tiny import tiny_model, tiny_model_types

pytestmark = [
    # library-internal deprecations (peft reads `is_gradient_checkpointing`; PaliGemma's processor numpy copy)
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

ORIGINAL = ["llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "blip-2", "idefics3", "paligemma"]
#: the families added with the structural adapter (no family code of their own)
NEW = ["qwen3_vl", "qwen3_5", "gemma3", "llava_next", "internvl", "smolvlm", "mistral3", "idefics2", "aya_vision",
       "shieldgemma2", "vipllava", "deepseek_vl", "glm4v"]
FAMILIES = ORIGINAL + NEW
#: families whose real checkpoints ship a chat template (the tiny processors carry a copy)
WITH_CHAT_TEMPLATE = {"llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", *NEW}
#: families whose generation prompt ends in a non-space ("ASSISTANT:", "Answer:", "Assistant:", "[/INST]"):
#: the answer starts with a space; the others end in a newline ("<|im_start|>assistant\n", PaliGemma's
#: "prompt\n", Gemma 3's "<start_of_turn>model\n")
ANSWER_AFTER_SPACE = {"llava", "blip-2", "idefics3", "llava_next", "smolvlm", "mistral3", "idefics2", "aya_vision",
                      "vipllava", "deepseek_vl"}

PROMPTS = ["What is the capital of the country shown?", "Which language is spoken there?", "Describe the image."]
TARGETS = ["Paris", "euro pound yen", "A red flag with a blue stripe"]


def _images() -> list[Image.Image]:
    # different sizes and aspect ratios: per-image inputs (patch counts, grids) differ between rows
    return [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("RGB", (30, 70), (20, 130, 30))]


@functools.lru_cache(maxsize=None)
def _tiny(model_type: str):
    """Shared read-only tiny model per family (tests that modify a model build their own)."""
    return tiny_model(model_type)


def _mixed_batch(model_type: str):
    model, proc = _tiny(model_type)
    fam = family_of(model)
    a, b = _images()
    images = [a, None, b]
    built = fam.build_inputs(proc, images, PROMPTS, TARGETS)
    return model, proc, fam, images, built


# ---------------------------------------------------------------------- registry


def test_registry_covers_all_families():
    assert set(FAMILIES) <= set(supported_model_types())
    assert set(FAMILIES) <= set(tiny_model_types())
    # hand-written families only where there is a quirk; everything else is the structural adapter
    quirky = {mt for mt in FAMILIES if type(get_family(mt)) is not Family}
    assert quirky == {"blip-2", "paligemma", "llava_onevision"}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_tiny_model_builds_fast_and_is_detected(model_type):
    _tiny(model_type)  # warm imports
    t0 = time.perf_counter()
    model, proc = tiny_model(model_type, seed=1)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"tiny {model_type} took {elapsed:.2f}s to build"
    assert model.config.model_type == model_type
    assert model_type in family_of(model).model_types
    assert family_of(model) is get_family(model_type)
    assert not model.training
    # same seed, same weights
    again, _ = tiny_model(model_type, seed=1)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    has_template = bool(getattr(proc, "chat_template", None))
    assert has_template == (model_type in WITH_CHAT_TEMPLATE)


def test_unknown_model_type_raises_listing_supported():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(UnsupportedModelError) as exc:
        family_of(llama)
    msg = str(exc.value)
    assert "'llama'" in msg and "not an image-text-to-text model type" in msg
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported.*not an image-text-to-text"):
        get_family("gpt2")
    with pytest.raises(UnsupportedModelError, match="available: .*qwen2_vl"):
        tiny_model("gpt2")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_of_through_peft_lora_on_full_target_names(model_type):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model(model_type)  # own copy: LoRA injection modifies it
    fam = family_of(model)
    names = fam.mlp_out_names(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=names))
    assert family_of(peft_model) is fam
    assert base_model_of(peft_model) is model
    assert fam.decoder_layers(peft_model) is fam.decoder_layers(model)
    assert fam.mlp_out_names(peft_model) == names
    # the full names hit exactly the language model's MLP outputs: one LoRA per decoder layer,
    # none in the vision tower (which has modules with the same short names in several families)
    lora_names = [n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")]
    assert sorted(lora_names) == sorted(f"base_model.model.{n}.lora_A" for n in names)


# ---------------------------------------------------------------------- structure


@pytest.mark.parametrize("model_type", FAMILIES)
def test_decoder_layers_and_mlp_outputs_live_in_the_language_model(model_type):
    model, _ = _tiny(model_type)
    fam = family_of(model)
    layers = fam.decoder_layers(model)
    n = fam.text_config(model).num_hidden_layers
    assert isinstance(layers, nn.ModuleList) and len(layers) == n == fam.num_layers(model) == 4
    lm = fam.language_model(model)
    lm_modules = {id(m) for m in lm.modules()}
    vision = fam.vision_modules(model)
    assert vision, "every family names its vision modules"
    vision_modules = {id(m) for v in vision for m in v.modules()}
    assert not lm_modules & vision_modules
    names = fam.mlp_out_names(model)
    assert len(names) == n and len(set(names)) == n
    hidden = fam.hidden_size(model)
    for i, name in enumerate(names):
        mod = fam.mlp_out_module(model, i)
        assert mod is model.get_submodule(name)
        assert isinstance(mod, nn.Linear) and mod.out_features == hidden
        assert id(mod) in lm_modules and id(mod) not in vision_modules, name
        assert id(mod) in {id(m) for m in layers[i].modules()}, f"{name} is not inside decoder layer {i}"
        assert name.startswith(fam.layer_name(model, i) + ".")
        assert name.startswith(fam.structure(model).language_model_path + ".")
    # BLIP-2's ViT has ``fc2`` and Qwen2.5-VL's vision blocks have ``mlp.down_proj`` too: a bare suffix would hit
    # the vision tower, which is why the names are full paths
    suffix = fam.structure(model).mlp_out[0]
    in_vision = [nm for nm, m in model.named_modules() if nm.endswith("." + suffix) and id(m) in vision_modules]
    # the vision side has modules with the same short name: BLIP-2 (ViT fc2), Qwen2.5-VL and GLM-4V (vision blocks),
    # Idefics2 (the perceiver)
    assert bool(in_vision) == (model_type in ("blip-2", "qwen2_5_vl", "idefics2", "glm4v"))
    assert fam.max_positions(model) and fam.input_embeddings(model) is model.get_input_embeddings()
    with pytest.raises(IndexError, match="out of range"):
        fam.mlp_out_name(model, n)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_logits_from_last_decoder_layer_hidden_states(model_type):
    """``final_norm`` + LM head on the last decoder layer's output reproduce the model's logits."""
    model, _, fam, _, built = _mixed_batch(model_type)
    captured = {}

    def grab(_module, _args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output

    handle = fam.decoder_layers(model)[-1].register_forward_hook(grab)
    try:
        with torch.no_grad():
            logits = model(**built.inputs).logits
    finally:
        handle.remove()
    assert fam.final_norm(model) in set(fam.language_model(model).modules())
    with torch.no_grad():
        again = fam.logits_from_hidden(model, captured["hidden"])
    torch.testing.assert_close(again, logits, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------- inputs


@pytest.mark.parametrize("model_type", FAMILIES)
def test_mixed_batch_runs_with_finite_teacher_forced_loss(model_type):
    model, _, fam, _, built = _mixed_batch(model_type)
    with torch.no_grad():
        out = model(**built.inputs)
    logits = out.logits
    assert logits.shape[:2] == built.input_ids.shape
    assert torch.isfinite(logits).all()
    # teacher-forced loss on the target tokens only (position t predicted by logits at t-1)
    labels = built.labels
    assert ((labels != -100) == built.target_mask).all()
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = nll[built.target_mask[:, 1:]].mean()
    assert torch.isfinite(loss) and loss > 0
    # per-image inputs: one entry per image (2), per-row ones: one per row (3)
    for key in ("image_grid_thw", "image_sizes"):
        if key in built.inputs:
            assert built.inputs[key].shape[0] == 2, key
    if "batch_num_images" in built.inputs:
        assert built.inputs["batch_num_images"].tolist() == [1, 0, 1]
    with torch.no_grad():
        hf_loss = model(**built.inputs, labels=labels).loss
    assert torch.isfinite(hf_loss)
    assert torch.allclose(hf_loss, loss, atol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_target_mask_covers_exactly_the_target_tokens(model_type):
    _, proc, fam, _, built = _mixed_batch(model_type)
    tok = fam.tokenizer(proc)
    tm, pm = built.target_mask, built.prompt_mask
    for i, target in enumerate(TARGETS):
        ids = built.input_ids[i]
        expected = (" " if model_type in ANSWER_AFTER_SPACE else "") + target
        assert tok.decode(ids[tm[i]]) == expected
        n_t = int(tm[i].sum())
        assert n_t == len(fam.target_ids(proc, fam.format_prompt(proc, PROMPTS[i], i != 1), target))
        assert tm[i, -n_t:].all(), "target tokens are the last positions of a left-padded row"
        if len(target.split()) > 1:
            assert n_t > 1
    assert not (tm & pm).any()


def test_paligemma_target_matches_the_processors_own_suffix_encoding():
    """PaliGemma's processor encodes an answer itself (``suffix=``, + eos, token_type_ids 1): ours must agree."""
    _, proc, fam, images, built = _mixed_batch("paligemma")
    text = fam.format_prompt(proc, PROMPTS[0], True)
    ref = proc(text=[text], images=[images[0]], suffix=[TARGETS[0]], return_tensors="pt")
    ref_ids, ref_types = ref["input_ids"][0][:-1], ref["token_type_ids"][0][:-1]  # drop the suffix's eos
    n = ref_ids.shape[0]
    assert torch.equal(built.input_ids[0, -n:], ref_ids)
    assert torch.equal(built.inputs["token_type_ids"][0, -n:], ref_types)
    assert torch.equal(built.target_mask[0, -n:], ref_types.bool())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_prompt_and_attention_masks_are_left_padded(model_type):
    _, proc, fam, _, built = _mixed_batch(model_type)
    attn = built.inputs["attention_mask"].bool()
    pm, tm = built.prompt_mask, built.target_mask
    assert torch.equal(attn, pm | tm)
    pad_id = fam._pad_value(proc, "input_ids")
    lengths = attn.sum(1)
    assert lengths.max() == attn.shape[1], "the longest row has no padding"
    for i in range(attn.shape[0]):
        n_pad = attn.shape[1] - int(lengths[i])
        assert not attn[i, :n_pad].any() and attn[i, n_pad:].all(), "padding is on the left only"
        assert (built.input_ids[i, :n_pad] == pad_id).all()
        # prompt then target, contiguous
        n_p = int(pm[i].sum())
        assert pm[i, n_pad : n_pad + n_p].all()
    # the same mask without targets: prompt only
    model, _ = _tiny(model_type)
    plain = fam.build_inputs(proc, [_images()[0], None], PROMPTS[:2])
    assert plain.target_mask is None
    assert torch.equal(plain.inputs["attention_mask"].bool(), plain.prompt_mask)
    with pytest.raises(ValueError, match="targets"):
        plain.labels


@pytest.mark.parametrize("model_type", FAMILIES)
def test_sequence_aligned_inputs_get_the_right_fill_values(model_type):
    _, _, fam, _, built = _mixed_batch(model_type)
    attn = built.inputs["attention_mask"].bool()
    for key, value in built.inputs.items():
        if key in ("input_ids", "attention_mask") or not isinstance(value, torch.Tensor):
            continue
        if value.shape[:2] != built.input_ids.shape:
            continue
        assert key in built.sequence_keys, f"{key} is sequence-aligned but not padded as such"
        assert (value[~attn] == 0).all(), f"{key} must be 0 on padding"
        # PaliGemma's causal suffix vs Qwen's / Gemma 3's text type
        expected = 1 if key == "token_type_ids" and model_type == "paligemma" else 0
        assert (value[built.target_mask] == expected).all(), f"{key} on target tokens"
    if model_type == "paligemma":
        assert (built.inputs["token_type_ids"][built.prompt_mask] == 0).all()
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        mm = built.inputs["mm_token_type_ids"].bool()
        assert torch.equal(mm, fam.image_mask(_tiny(model_type)[0], built.input_ids))
        assert "image_grid_thw" in built.inputs


@pytest.mark.parametrize("model_type", FAMILIES)
def test_image_mask_is_exactly_the_positions_filled_with_image_features(model_type):
    model, proc, fam, images, built = _mixed_batch(model_type)
    mask = fam.image_mask(model, built.input_ids)
    # 1) as many image tokens per row as the processor inserts for that image alone
    # (the text placeholder may differ: Gemma 3's <start_of_image> and Aya Vision's <image> expand to other tokens)
    image_token = fam.image_token_id(model)
    for i, img in enumerate(images):
        if img is None:
            assert not mask[i].any()
            continue
        text = fam.format_prompt(proc, PROMPTS[i], True)
        alone = proc(text=[text], images=[img], return_tensors="pt")["input_ids"]
        assert int(mask[i].sum()) == int((alone == image_token).sum()) > 0
    # 2) exactly the positions whose embeddings the model replaces by image features
    captured = {}

    def grab(_module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    handle = fam.language_model(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**built.inputs)
    finally:
        handle.remove()
    with torch.no_grad():
        plain = fam.input_embeddings(model)(built.input_ids)
    replaced = (captured["embeds"] - plain).abs().amax(-1) > 0
    assert torch.equal(replaced, mask)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_batched_rows_match_rows_run_alone(model_type):
    """Left padding, per-image collation (different image sizes) and fill values change nothing."""
    model, proc, fam, images, built = _mixed_batch(model_type)
    with torch.no_grad():
        batch_logits = model(**built.inputs).logits
    for i in range(len(PROMPTS)):
        alone = fam.build_inputs(proc, [images[i]], [PROMPTS[i]], [TARGETS[i]])
        n = alone.input_ids.shape[1]
        assert torch.equal(built.input_ids[i, -n:], alone.input_ids[0])
        assert torch.equal(built.target_mask[i, -n:], alone.target_mask[0])
        with torch.no_grad():
            logits = model(**alone.inputs).logits[0]
        torch.testing.assert_close(batch_logits[i, -n:], logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generate_on_built_prompts_matches_rows_run_alone(model_type):
    model, proc = _tiny(model_type)
    fam = family_of(model)
    images = [_images()[0], None]
    pad = fam.tokenizer(proc).pad_token_id
    built = fam.build_inputs(proc, images, PROMPTS[:2])
    with torch.no_grad():
        batch = model.generate(**built.inputs, max_new_tokens=3, do_sample=False, pad_token_id=pad)
        for i in range(2):
            alone = fam.build_inputs(proc, [images[i]], [PROMPTS[i]])
            single = model.generate(**alone.inputs, max_new_tokens=3, do_sample=False, pad_token_id=pad)
            assert batch[i, -3:].tolist() == single[0, -3:].tolist()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_text_only_batch_runs(model_type):
    model, proc, fam = *_tiny(model_type), family_of(_tiny(model_type)[0])
    built = fam.build_inputs(proc, None, PROMPTS[:2], TARGETS[:2])
    assert not fam.image_mask(model, built.input_ids).any()
    with torch.no_grad():
        logits = model(**built.inputs).logits
    assert torch.isfinite(logits).all()
    for i, target in enumerate(TARGETS[:2]):
        assert fam.tokenizer(proc).decode(built.input_ids[i][built.target_mask[i]]).strip() == target
    if model_type == "blip-2":
        # the placeholder image BLIP-2's forward needs reaches no token: text rows are the plain OPT forward
        with torch.no_grad():
            lm_logits = fam.language_model(model)(
                input_ids=built.input_ids, attention_mask=built.inputs["attention_mask"]
            ).logits
        torch.testing.assert_close(logits, lm_logits)


def test_family_without_text_only_rows_says_so():
    class ImageOnlyLlava(Family):
        supports_text_only = False

    model, proc = _tiny("llava")
    with pytest.raises(InvalidRequestError, match=r"cannot run text-only rows; images\[1\] is None") as exc:
        ImageOnlyLlava().build_inputs(proc, [_images()[0], None], PROMPTS[:2])
    assert exc.value.field == "image"


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl", "paligemma"])
def test_bad_batches_raise_invalid_request(model_type):
    _, proc = _tiny(model_type)
    fam = get_family(model_type)
    img = _images()[0]
    with pytest.raises(InvalidRequestError) as exc:
        fam.build_inputs(proc, [img], PROMPTS[:2])
    assert exc.value.field == "image"
    with pytest.raises(InvalidRequestError) as exc:
        fam.build_inputs(proc, [img, None], PROMPTS[:2], ["Paris"])
    assert exc.value.field == "target"
    with pytest.raises(InvalidRequestError) as exc:
        fam.build_inputs(proc, [img], PROMPTS[:1], ["   "])
    assert exc.value.field == "target"
    with pytest.raises(InvalidRequestError) as exc:
        fam.build_inputs(proc, [img], [""])
    assert exc.value.field == "prompt"
    with pytest.raises(InvalidRequestError, match="single string"):
        fam.build_inputs(proc, None, "What is it?")


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_video_capable_processors_are_the_real_classes_without_video(model_type, tmp_path):
    import transformers

    model, proc = _tiny(model_type)
    real = getattr(transformers, type(proc).__name__)
    assert isinstance(proc, real) and type(proc).__name__ == real.__name__
    assert type(proc).get_attributes() == ["image_processor", "tokenizer"]
    assert not hasattr(proc, "video_processor")
    assert type(proc.image_processor).__name__.endswith("ImageProcessorPil")
    # save / reload keeps every setting (chat template, token counts): same inputs
    proc.save_pretrained(tmp_path)
    again = type(proc).from_pretrained(tmp_path)
    assert again.chat_template == proc.chat_template
    fam = family_of(model)
    a = fam.build_inputs(proc, [_images()[0], None], PROMPTS[:2], TARGETS[:2])
    b = fam.build_inputs(again, [_images()[0], None], PROMPTS[:2], TARGETS[:2])
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.target_mask, b.target_mask)
