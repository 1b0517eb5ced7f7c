"""Bad input to ``ldke_peft.edit``: a specific error naming the problem, and the model left exactly as it was.

"Exactly as it was" means: every state-dict tensor bitwise equal, the same modules (no LDKE layer left
behind), the same forward/backward hooks, no ``peft_config`` attribute, the same ``requires_grad``
flags and train/eval modes. Early errors come from validation before anything is touched; late ones
(a diverged fit, Ctrl-C during the fit, while appending to a pack) from the rollback in ``edit``.

Models are the tiny random ones from :mod:`ldke_peft.testing.tiny` (real transformers classes and
processors); every successful edit here takes well under a second.
"""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from tokenizers import Regex, normalizers

import ldke_peft
from ldke_peft import EditRequest, LDKEConfig, Probe
from ldke_peft.editing.delta_fit import EditDivergedError
from ldke_peft.errors import ImageError, InvalidRequestError, UnsupportedModelError
from ldke_peft.tuner.layer import LDKELayer
from ldke_peft.requests import MAX_IMAGE_SIDE
from ldke_peft.testing.tiny import tiny_model

PROMPT = "What is the capital of the country shown?"
FAST = dict(localization="fixed", fixed_layers=[2], router_steps=10, edit_steps=3)

_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def _cfg(**over):
    return LDKEConfig(**{**FAST, **over})


def _flag(color=(200, 30, 30), size=(32, 32), mode="RGB"):
    img = Image.new("RGB", size, color)
    img.paste((20, 20, 220), (0, 0, size[0] // 2, size[1]))
    return img.convert(mode)


def _warm_up(model, processor):
    """One real forward, so transformers' lazily installed output-capturing hooks exist before the snapshot."""
    fam = ldke_peft.family_of(model)
    with torch.no_grad():
        model(**fam.build_inputs(processor, [_flag()], [PROMPT]).inputs)


def snapshot(model) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "hooks": {n: tuple(len(getattr(m, d)) for d in _HOOK_DICTS) for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "attrs": set(model.__dict__),
    }


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert not any(isinstance(m, LDKELayer) for m in model.modules()), "an LDKE layer was left in the model"
    assert not hasattr(model, "peft_config"), "peft_config left on the model"
    assert after["modules"] == before["modules"]
    assert after["hooks"] == before["hooks"], "forward/backward hooks changed"
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["attrs"] == before["attrs"], after["attrs"] ^ before["attrs"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"{k} changed"


@pytest.fixture
def llava():
    model, processor = tiny_model("llava")
    _warm_up(model, processor)
    return model, processor


def _fails(model, processor, requests, exc_type, *words, config=None, field=None, **kwargs):
    """Run edit, expect ``exc_type`` whose message names every word (case-insensitive); model untouched."""
    before = snapshot(model)
    with pytest.raises(exc_type) as info:
        ldke_peft.edit(model, processor, requests, config or _cfg(), progress=False, **kwargs)
    msg = str(info.value).lower()
    for w in words:
        assert w.lower() in msg, f"{w!r} not in {str(info.value)!r}"
    if field is not None:
        assert info.value.field == field
    assert_unchanged(model, before)
    return info.value


# ---------------------------------------------------------------------- images


def test_missing_image_file(llava, tmp_path):
    model, proc = llava
    path = tmp_path / "nope.png"
    _fails(model, proc, [EditRequest(image=str(path), prompt=PROMPT, target="Lyon")], ImageError,
           "not found", "nope.png", field="image")


def test_unreadable_image_file(llava, tmp_path):
    model, proc = llava
    path = tmp_path / "garbage.png"
    path.write_bytes(os.urandom(512))
    _fails(model, proc, [EditRequest(image=str(path), prompt=PROMPT, target="Lyon")], ImageError,
           "cannot read image", "garbage.png", field="image")


def test_zero_byte_image_file(llava, tmp_path):
    model, proc = llava
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _fails(model, proc, [EditRequest(image=str(path), prompt=PROMPT, target="Lyon")], ImageError,
           "0 bytes", "empty.png", field="image")


def test_zero_size_image(llava):
    model, proc = llava
    _fails(model, proc, [EditRequest(image=Image.new("RGB", (0, 24)), prompt=PROMPT, target="Lyon")], ImageError,
           "zero size", "0x24", field="image")


def test_huge_image(llava, tmp_path):
    model, proc = llava
    big = Image.new("L", (MAX_IMAGE_SIDE + 1, 2))
    _fails(model, proc, [EditRequest(image=big, prompt=PROMPT, target="Lyon")], ImageError,
           f"{MAX_IMAGE_SIDE + 1}x2", "limit", field="image")
    path = tmp_path / "huge.png"
    big.save(path)
    _fails(model, proc, [EditRequest(image=str(path), prompt=PROMPT, target="Lyon")], ImageError,
           "huge.png", "limit", field="image")
    # a bad image anywhere in the request is named by its field
    _fails(model, proc, [EditRequest(image=_flag(), prompt=PROMPT, target="Lyon", rephrase_images=[big])],
           ImageError, "rephrase_images[0]", field="rephrase_images[0]")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_non_rgb_images_are_converted(llava, tmp_path, mode):
    """Grayscale, RGBA, palette and CMYK images (in memory and as files) edit like RGB ones."""
    model, proc = llava
    path = tmp_path / f"flag.{'jpg' if mode == 'CMYK' else 'png'}"
    _flag(mode=mode).save(path)
    req = EditRequest(image=_flag(mode=mode), prompt=PROMPT, target="Lyon", rephrase_images=[str(path)])
    pm = ldke_peft.edit(model, proc, [req], _cfg(), progress=False)
    assert pm.peft_config["default"].num_slots == 1
    assert req.image.mode == "RGB" and req.rephrase_images[0].mode == "RGB"
    # the edit routes its own (converted) image to its slot
    fam = ldke_peft.family_of(model)
    with torch.no_grad():
        pm(**fam.build_inputs(proc, [req.image], [PROMPT]).inputs)
    assert pm.base_model.last_routing("default").tolist() == [0]


# ---------------------------------------------------------------------- text


@pytest.mark.parametrize("target", ["", "   \t\n", "\u3000"])
def test_empty_target(llava, target):
    model, proc = llava
    _fails(model, proc, [EditRequest(image=_flag(), prompt=PROMPT, target=target)], InvalidRequestError,
           "target", "non-empty", field="target")


def test_empty_prompt(llava):
    model, proc = llava
    _fails(model, proc, [EditRequest(image=_flag(), prompt="  ", target="Lyon")], InvalidRequestError,
           "prompt", "non-empty", field="prompt")


def test_target_of_only_special_tokens(llava):
    model, proc = llava
    _fails(model, proc, [EditRequest(image=_flag(), prompt=PROMPT, target="</s>")], InvalidRequestError,
           "tokenizes to no text", "'</s>'", field="target")


def test_target_that_tokenizes_to_nothing(llava):
    """A tokenizer whose normalizer drops control characters (as SentencePiece's nmt_nfkc and BERT's clean_text
    do) turns a target of control characters into nothing but the separating space."""
    model, proc = llava
    proc.tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex("[\x00-\x08\x0e-\x1f\x7f]"), "")]
    )
    _fails(model, proc, [EditRequest(image=_flag(), prompt=PROMPT, target="\x07\x08")], InvalidRequestError,
           "tokenizes to no text", field="target")


def test_prompt_longer_than_context(llava):
    model, proc = llava
    ctx = model.config.text_config.max_position_embeddings
    long = "Which city is the capital " * ctx
    _fails(model, proc, [EditRequest(image=_flag(), prompt=long, target="Lyon")], InvalidRequestError,
           "prompt + target", f"context ({ctx})", field="prompt")
    # rephrasings and the probes used as negatives are checked too (they run during the edit)
    _fails(model, proc, [EditRequest(image=_flag(), prompt=PROMPT, target="Lyon", rephrase_prompts=[long])],
           InvalidRequestError, "rephrase_prompts[0]", f"context ({ctx})", field="rephrase_prompts")
    _fails(model, proc, [EditRequest(image=_flag(), prompt=PROMPT, target="Lyon",
                                     locality=[Probe(prompt=long, answer="x")])],
           InvalidRequestError, "locality[0].prompt", f"context ({ctx})", field="locality")


def test_target_longer_than_context(llava):
    model, proc = llava
    ctx = model.config.text_config.max_position_embeddings
    _fails(model, proc, [EditRequest(image=_flag(), prompt=PROMPT, target="Paris " * ctx)], InvalidRequestError,
           "prompt + target", f"context ({ctx})")


# ---------------------------------------------------------------------- arguments


def test_request_list_with_a_non_request(llava):
    model, proc = llava
    good = EditRequest(image=_flag(), prompt=PROMPT, target="Lyon")
    _fails(model, proc, [good, {"prompt": PROMPT, "target": "Lyon"}], InvalidRequestError,
           "requests[1]", "dict", "EditRequest", field="requests")
    _fails(model, proc, [], InvalidRequestError, "at least one", field="requests")


def test_bad_request_in_a_list_names_its_index(llava):
    model, proc = llava
    good = EditRequest(image=_flag(), prompt=PROMPT, target="Lyon")
    _fails(model, proc, [good, EditRequest(image=_flag(), prompt=PROMPT, target=" ")], InvalidRequestError,
           "requests[1]", "target", field="target")


@pytest.mark.parametrize("model_type,processor_type", [("llava", "qwen2_vl"), ("qwen2_vl", "llava")])
def test_processor_of_another_family(model_type, processor_type):
    """Mixing families = a processor built for one family with a model of another. The processor's image
    placeholder is not the model's image token, so nothing could line up; refused before any change."""
    model, own = tiny_model(model_type)
    _warm_up(model, own)
    _, other = tiny_model(processor_type)
    _fails(model, other, [EditRequest(image=_flag(), prompt=PROMPT, target="Lyon")], InvalidRequestError,
           "processor", type(other).__name__, "do not belong together", field="processor")
    # the default (attribution) localization would run the model first: refused all the same
    _fails(model, other, [EditRequest(image=_flag(), prompt=PROMPT, target="Lyon")], InvalidRequestError,
           "processor", field="processor", config=LDKEConfig(router_steps=10, edit_steps=3))


def test_text_only_model_is_unsupported():
    """A plain causal LM is not a multimodal family."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, proc = tiny_model("llava")
    tok = proc.tokenizer
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    _fails(model, tok, [EditRequest(prompt="What is the capital of France?", target="Lyon")], UnsupportedModelError,
           "'llama'", "not supported", "llava")


def test_invalid_config_numbers(llava):
    model, proc = llava
    req = EditRequest(image=_flag(), prompt=PROMPT, target="Lyon")
    _fails(model, proc, [req], InvalidRequestError, "edit_lr", "nan", config=_cfg(edit_lr=float("nan")), field="edit_lr")
    _fails(model, proc, [req], InvalidRequestError, "router_lr", config=_cfg(router_lr=-1.0), field="router_lr")


def test_pack_of_another_model(llava):
    model, proc = llava
    req = EditRequest(image=_flag(), prompt=PROMPT, target="Lyon")
    other, _ = tiny_model("llava", seed=1)
    pack = ldke_peft.edit(other, proc, [req], _cfg(), progress=False)
    _fails(model, proc, [req], InvalidRequestError, "different models", pack=pack, field="pack")


# ---------------------------------------------------------------------- late failures roll back


def test_diverged_fit_rolls_back(llava):
    """A finite but absurd learning rate passes validation and blows the delta up to NaN mid-fit (after
    the layers were injected): EditDivergedError, and the model is back to its original modules and flags."""
    model, proc = llava
    err = _fails(model, proc, [EditRequest(image=_flag(), prompt=PROMPT, target="Lyon")], EditDivergedError,
                 "diverged", "edit_lr", config=_cfg(edit_lr=1e20))
    assert isinstance(err, ldke_peft.LDKEError)
    # and the model edits normally afterwards
    pm = ldke_peft.edit(model, proc, [EditRequest(image=_flag(), prompt=PROMPT, target="Lyon")], _cfg(), progress=False)
    assert pm.peft_config["default"].num_slots == 1


def _interrupt_when(model, condition):
    """A user-side forward hook that raises KeyboardInterrupt (Ctrl-C) the first time ``condition()`` holds
    during a forward pass: the interrupt lands mid-edit, inside the fit."""
    layer = ldke_peft.family_of(model).decoder_layers(model)[0]

    def hook(module, args):
        if condition():
            raise KeyboardInterrupt

    return layer.register_forward_pre_hook(hook)


def test_interrupt_mid_edit_rolls_back(llava):
    model, proc = llava
    handle = _interrupt_when(model, lambda: any(isinstance(m, LDKELayer) for m in model.modules()))
    try:
        _fails(model, proc, [EditRequest(image=_flag(), prompt=PROMPT, target="Lyon")], KeyboardInterrupt)
    finally:
        handle.remove()


def _assert_pack_as_before(pack, proc, before: dict, image) -> None:
    """Same modules, hooks, flags and tensors as in ``before``, and the pack's one slot still routes ``image``."""
    after = snapshot(pack)
    assert after["modules"] == before["modules"]
    assert after["hooks"] == before["hooks"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(v, after["state"][k]) for k, v in before["state"].items())
    with torch.no_grad():
        pack(**ldke_peft.family_of(pack).build_inputs(proc, [image], [PROMPT]).inputs)
    assert pack.base_model.last_routing("default").tolist() == [0]


def test_interrupt_while_appending_to_a_pack_rolls_the_pack_back(llava):
    """Sequential editing: a failure while adding slots (here on a layer the pack did not wrap yet) leaves the
    pack with exactly its previous slots, tensors, wrapped layers and hooks; it still routes, saves and grows."""
    model, proc = llava
    first = EditRequest(image=_flag(), prompt=PROMPT, target="Lyon")
    pack = ldke_peft.edit(model, proc, [first], _cfg(), progress=False)
    cfg = pack.peft_config["default"]
    cfg.fixed_layers = [3]  # the next edit wraps a new layer
    before = snapshot(pack)
    cfg_before = cfg.to_dict()
    second = EditRequest(image=_flag((30, 160, 30)), prompt=PROMPT, target="Rome")
    handle = _interrupt_when(model, lambda: cfg.num_slots > 1)
    try:
        with pytest.raises(KeyboardInterrupt):
            ldke_peft.edit(pack, proc, [second], pack=pack, progress=False)
    finally:
        handle.remove()
    assert cfg.to_dict() == cfg_before
    _assert_pack_as_before(pack, proc, before, first.image)
    # the pack grows normally afterwards
    ldke_peft.edit(pack, proc, [second], pack=pack, progress=False)
    assert cfg.num_slots == 2 and cfg.slot_layers == [[2], [3]]


def test_a_peft_model_of_another_method_is_refused(llava):
    """LDKE packs go on the base model or beside LDKE packs; a LoRA-wrapped model is refused, untouched."""
    from peft import LoraConfig, get_peft_model

    model, proc = llava
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(lora)
    with pytest.raises(UnsupportedModelError, match="LORA.*merge_and_unload"):
        ldke_peft.edit(lora, proc, [EditRequest(image=_flag(), prompt=PROMPT, target="Lyon")], _cfg(), progress=False)
    after = snapshot(lora)
    assert after["modules"] == before["modules"] and after["hooks"] == before["hooks"]
    assert list(lora.peft_config) == ["default"] and not any(isinstance(m, LDKELayer) for m in lora.modules())


def test_interrupt_while_adding_a_second_pack_leaves_the_first_as_it_was(llava):
    """A new adapter on a PeftModel of LDKE packs (``adapter_name`` it does not have): a failure mid-fit removes
    that adapter and nothing else; the first pack keeps its slots, hooks, active set and routing."""
    model, proc = llava
    first = EditRequest(image=_flag(), prompt=PROMPT, target="Lyon")
    pack = ldke_peft.edit(model, proc, [first], _cfg(), progress=False)
    before = snapshot(pack)
    second = EditRequest(image=_flag((30, 160, 30)), prompt=PROMPT, target="Rome")
    handle = _interrupt_when(model, lambda: "other" in pack.peft_config)
    try:
        with pytest.raises(KeyboardInterrupt):
            ldke_peft.edit(pack, proc, [second], _cfg(fixed_layers=[3]), adapter_name="other", progress=False)
    finally:
        handle.remove()
    assert list(pack.peft_config) == ["default"] and pack.base_model.active_adapters == ["default"]
    _assert_pack_as_before(pack, proc, before, first.image)


def test_unknown_corruption_is_refused():
    from ldke_peft.errors import AdapterLoadError

    with pytest.raises(AdapterLoadError, match="corruption"):
        LDKEConfig(corruption="blur")
