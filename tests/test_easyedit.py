"""EasyEdit integration: hparams, the apply function, restore, the example; EasyEdit end to end (optional).

Without EasyEdit (CI) everything runs on tiny random Qwen2-VL / LLaVA-OneVision models, with request
dicts shaped exactly as EasyEdit's ``MultimodalEditor`` builds them and metrics computed the way
EasyEdit computes them (``integrations.easyedit.evaluate``: ``model(**inputs)`` on prompt + target,
no prompt mask passed). The end-to-end tests at the bottom need an upstream EasyEdit checkout in
``EASYEDIT_SRC`` and are skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft.config import PeftConfig
from PIL import Image

from integrations.easyedit import (
    LDKE_KNOBS,
    EasyEditCopyError,
    EasyEditNotFoundError,
    InvalidHyperParamsError,
    LDKEMultimodalHyperParams,
    PromptMaskHook,
    apply_ldke_to_multimodal_model,
    easyedit_inputs,
    easyedit_locality,
    easyedit_logits,
    easyedit_metrics,
    edit_state,
    hparams_dir,
    register,
    shipped_hparams,
)
from integrations.easyedit.hparams import INTERNAL_CONFIG_FIELDS
from ldke_peft import LDKEConfig, LDKELinear, family_of
from ldke_peft.tuner.context import prompt_mask_context
from ldke_peft.errors import ImageError, LDKEError
from ldke_peft.testing.tiny import tiny_model

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["qwen2_vl", "llava_onevision"]


# ---------------------------------------------------------------------- helpers


def _image(seed: int, size: int = 64) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 255, (size, size, 3), generator=g, dtype=torch.uint8).numpy())


def _request(seed: int = 0, *, image_as_list: bool = True, **over) -> dict:
    """A request dict as MultimodalEditor hands it to a method (Qwen-VL processors give [PIL])."""
    img = _image(seed)
    wrap = (lambda im: [im]) if image_as_list else (lambda im: im)
    r = {
        "prompt": "What is the capital of the country shown?",
        "target": "Paris",
        "image": wrap(img),
        "file_type": "image",
        "rephrase_prompt": "Which city is the capital of the country in the picture?",
        "image_rephrase": wrap(img),
        "locality_prompt": "What currency is used there?",
        "locality_ground_truth": "euro",
        "multimodal_locality_image": wrap(_image(seed + 100)),
        "multimodal_locality_prompt": "Describe the image.",
        "multimodal_locality_ground_truth": "A red flag",
    }
    r.update(over)
    return r


def _second_request(seed: int = 7, **over) -> dict:
    r = {
        "prompt": "What is written on the sign in this picture?",
        "target": "Rome",
        "image": _image(seed),
        "file_type": "image",
        "locality_prompt": "Who wrote Hamlet?",
        "locality_ground_truth": "Shakespeare",
    }
    r.update(over)
    return r


@pytest.fixture(scope="module")
def hparams() -> LDKEMultimodalHyperParams:
    return LDKEMultimodalHyperParams.from_hparams("tiny")


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()},
        "attrs": set(model.__dict__),
    }


def _assert_same(model: torch.nn.Module, snap: dict) -> None:
    after = _snapshot(model)
    assert after["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed"
    assert after["requires_grad"] == snap["requires_grad"]
    assert after["training"] == snap["training"]
    assert after["types"] == snap["types"]
    assert after["hooks"] == snap["hooks"]
    assert after["attrs"] == snap["attrs"]
    assert not any(isinstance(m, LDKELinear) for m in model.modules())


# ---------------------------------------------------------------------- hparams

_EASYEDIT_SUBSTRING = {"qwen2vl-7b": "qwen2-vl", "llavaov-7b": "llava-onevision", "qwen3vl-4b": "qwen3-vl"}


def test_shipped_files():
    assert {"tiny", "qwen2vl-7b", "llavaov-7b", "qwen3vl-4b", "qwen2.5vl-7b", "gemma3-4b", "internvl3-2b"} <= set(
        shipped_hparams()
    )


@pytest.mark.parametrize("name", shipped_hparams())
def test_every_shipped_yaml_loads(name):
    path = hparams_dir() / f"{name}.yaml"
    hp = LDKEMultimodalHyperParams.from_hparams(path)
    assert hp.alg_name == "LDKE"
    assert isinstance(hp.dtype, torch.dtype) and hp.torch_dtype() is hp.dtype
    assert isinstance(hp.edit_lr, float) and isinstance(hp.router_lr, float)  # "1e-2" in the file
    raw = yaml.safe_load(path.read_text())
    assert raw["edit_lr"] == "1e-2"  # YAML 1.1 reads it as a string; the loader made it a float
    assert hp.edit_lr == pytest.approx(0.01)
    cfg = hp.to_ldke_config()
    assert isinstance(cfg, LDKEConfig)
    for k in LDKE_KNOBS:
        assert getattr(cfg, k) == getattr(hp, k), k
    if name == "tiny":
        assert hp.device == "cpu" and hp.dtype == torch.float32
    else:
        assert hp.device == 0 and hp.dtype == torch.bfloat16
        assert hp.model_name.startswith("./hugging_cache/")
        assert 1 <= hp.probe_layer <= 6  # ~L/8 of a 28/36-layer LM
    if name in _EASYEDIT_SUBSTRING:
        assert _EASYEDIT_SUBSTRING[name] in hp.model_name.lower()
    assert hp.name == hp.model_name  # EasyEdit's datasets load the processor from hparams.name
    # loading by bare name (EasyEdit style, no .yaml) finds the shipped file too
    assert LDKEMultimodalHyperParams.from_hparams(name).to_dict() == hp.to_dict()


def test_knobs_cover_every_ldke_config_field():
    base = {f.name for f in dataclasses.fields(PeftConfig)}
    config_fields = {f.name for f in dataclasses.fields(LDKEConfig)} - base
    assert set(LDKE_KNOBS) == config_fields - INTERNAL_CONFIG_FIELDS
    hp_fields = {f.name for f in dataclasses.fields(LDKEMultimodalHyperParams)}
    assert set(LDKE_KNOBS) <= hp_fields


def test_to_ldke_config_carries_non_default_values():
    values = dict(
        rank=3, alpha=6.0, probe_layer=1, router_dim=8, router_storage="float32", delta_storage="float32", router_margin=0.25, router_paraphrases=2, router_neighbour_questions=4, router_anchor_clearance=0.5, router_asked_word=False, router_text_encoder=None, router_text_margin=0.2, router_text_probe=False, router_text_steps=5, auto_views=3, router_views=3, router_pack_guard=False,
        router_steps=17,
        router_lr=0.05,
        num_edit_layers=2, edit_steps=9, edit_lr=0.003, delta_bank_wordings=False, edit_fit_stages=False, edit_fit_dtype="float32",
            max_delta_norm=0.5, localization="fixed",
        fixed_layers=[2, 3], corruption="noise", noise_scale=2.0, hard_negatives=False, use_router=False,
    )
    assert set(values) == set(LDKE_KNOBS)
    hp = LDKEMultimodalHyperParams(alg_name="LDKE", model_name="m", **values)
    cfg = hp.to_ldke_config()
    for k, v in values.items():
        assert getattr(cfg, k) == v, k
    assert hp.to_ldke_config() is not cfg  # a fresh config each call: the editor mutates it


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "hp.yaml"
    p.write_text(text)
    return p


_GOOD = 'alg_name: "LDKE"\nmodel_name: "./hugging_cache/qwen2-vl-7b"\ndevice: 0\ndtype: bfloat16\n'


def test_wrong_alg_name(tmp_path):
    with pytest.raises(InvalidHyperParamsError, match=r"alg_name is 'LoRA'.*expected 'LDKE'") as e:
        LDKEMultimodalHyperParams.from_hparams(_write(tmp_path, _GOOD.replace('"LDKE"', '"LoRA"')))
    assert e.value.key == "alg_name" and str(tmp_path) in str(e.value)
    # upstream's LoRA yaml is refused the same way
    with pytest.raises(InvalidHyperParamsError, match="LoRA"):
        LDKEMultimodalHyperParams(alg_name="LoRA", model_name="x")


def test_unknown_keys_named(tmp_path):
    with pytest.raises(InvalidHyperParamsError, match=r"unknown LDKE hyperparameter\(s\): lora_alpha, rnak") as e:
        LDKEMultimodalHyperParams.from_hparams(_write(tmp_path, _GOOD + "rnak: 4\nlora_alpha: 32\n"))
    assert e.value.key == "lora_alpha"
    with pytest.raises(InvalidHyperParamsError, match="slot_layers is filled in by the editor"):
        LDKEMultimodalHyperParams.from_hparams(_write(tmp_path, _GOOD + "slot_layers: [[3]]\n"))


def test_missing_required_and_empty(tmp_path):
    with pytest.raises(InvalidHyperParamsError, match="missing required key 'model_name'"):
        LDKEMultimodalHyperParams.from_hparams(_write(tmp_path, 'alg_name: "LDKE"\n'))
    with pytest.raises(InvalidHyperParamsError, match="empty"):
        LDKEMultimodalHyperParams.from_hparams(_write(tmp_path, "\n"))
    with pytest.raises(FileNotFoundError, match="qwen2vl-7b"):
        LDKEMultimodalHyperParams.from_hparams(tmp_path / "nope")


@pytest.mark.parametrize(
    "line, key",
    [
        ("rank: 0", "rank"),
        ("rank: two", "rank"),
        ("localization: magic", "localization"),
        ("dtype: int8", "dtype"),
        ("router_margin: 1.5", "router_margin"),
        ("edit_lr: fast", "edit_lr"),
        ("hard_negatives: 3", "hard_negatives"),
        ("edit_steps: 1.5e1", None),  # 15.0 is an integer: accepted
        ("localization: fixed", "fixed_layers"),
        ("device: gpu0", "device"),
    ],
)
def test_bad_values_named(tmp_path, line, key):
    path = _write(tmp_path, _GOOD + line + "\n")
    if key is None:
        assert LDKEMultimodalHyperParams.from_hparams(path).edit_steps == 15
        return
    with pytest.raises(InvalidHyperParamsError) as e:
        LDKEMultimodalHyperParams.from_hparams(path)
    assert e.value.key == key and key in str(e.value)
    assert isinstance(e.value, (LDKEError, ValueError))


def test_scientific_notation_only_for_numbers(tmp_path):
    hp = LDKEMultimodalHyperParams.from_hparams(
        _write(tmp_path, 'alg_name: "LDKE"\nmodel_name: "123"\ndevice: "0"\nedit_lr: 5e-3\nrouter_steps: 2e2\n')
    )
    assert hp.model_name == "123" and hp.device == 0
    assert hp.edit_lr == 0.005 and hp.router_steps == 200 and isinstance(hp.router_steps, int)


def test_hparams_are_mutable_as_easyedit_needs(hparams):
    hp = LDKEMultimodalHyperParams.from_hparams("qwen2vl-7b", device="cpu", dtype="float32")
    assert hp.device == "cpu" and hp.dtype == torch.float32
    hp.batch_size = 1  # MultimodalEditor.edit
    hp.dtype = "bfloat16"  # someone assigns a string later
    assert hp.torch_dtype() == torch.bfloat16
    hp.dtype = torch.float16
    assert hp.torch_dtype() == torch.float16
    assert not dataclasses.is_dataclass(hp) or not hp.__dataclass_params__.frozen


# ---------------------------------------------------------------------- apply: single edit


#: shipped YAMLs of families with no family code of their own -> a tiny model of that family
_YAML_FAMILY = {"qwen3vl-4b": "qwen3_vl", "gemma3-4b": "gemma3", "internvl3-2b": "internvl"}


@pytest.mark.parametrize("name, model_type", sorted(_YAML_FAMILY.items()))
def test_shipped_yaml_edits_a_tiny_model_of_its_family(name, model_type):
    """The YAML's own knobs on a tiny model of its family, through the apply function. Only the device
    and dtype (CPU, fp32) and the probe layer (the tiny language model has 4 layers, not 28-36) are
    overridden."""
    hp = LDKEMultimodalHyperParams.from_hparams(name, device="cpu", dtype="float32", probe_layer=0)
    model, processor = tiny_model(model_type)
    req = _request(0)
    pre = easyedit_metrics(model, processor, req)
    snap = _snapshot(model)
    edited, restore = apply_ldke_to_multimodal_model(model, processor, [req], hp)
    post = easyedit_metrics(edited, processor, req)
    assert post["rewrite_acc"] == 1.0 > pre["rewrite_acc"]
    assert torch.equal(post["locality_output"], pre["locality_output"])
    assert torch.equal(post["multimodal_locality_output"], pre["multimodal_locality_output"])
    restore()
    _assert_same(model, snap)



@pytest.mark.parametrize("model_type", FAMILIES)
def test_apply_single_edit_easyedit_metrics_and_restore(model_type, hparams):
    model, processor = tiny_model(model_type)
    req = _request(0)
    pre = easyedit_metrics(model, processor, req)  # before editing (EasyEdit's single mode gets this wrong)
    assert pre["rewrite_acc"] < 1.0
    snap = _snapshot(model)  # after a first forward: transformers installs its own output-capture hooks lazily

    edited, restore = apply_ldke_to_multimodal_model(
        model, processor, [req], hparams, copy=False, return_orig_weights=True, keep_original_weight=False
    )
    post = easyedit_metrics(edited, processor, req)
    assert post["rewrite_acc"] == 1.0
    assert post["rephrase_acc"] == 1.0
    assert post["image_rephrase_acc"] == 1.0
    # locality probes: logits bit for bit unchanged, hence EasyEdit's locality scores are 1.0
    assert torch.equal(post["locality_output"], pre["locality_output"])
    assert torch.equal(post["multimodal_locality_output"], pre["multimodal_locality_output"])
    assert easyedit_locality(pre, post) == {"locality_acc": 1.0, "multimodal_locality_acc": 1.0}
    # the base model object was edited in place (EasyEdit's copy=False contract)
    assert any(isinstance(m, LDKELinear) for m in model.modules())
    assert easyedit_metrics(model, processor, req)["rewrite_acc"] == 1.0

    assert callable(restore)
    with torch.no_grad():
        restore()
    _assert_same(model, snap)
    again = easyedit_metrics(model, processor, req)
    assert torch.equal(
        easyedit_logits(model, processor, req["prompt"], req["target"], req["image"])[0],
        easyedit_logits(tiny_model(model_type)[0], processor, req["prompt"], req["target"], req["image"])[0],
    )
    assert again["rewrite_acc"] == pre["rewrite_acc"]
    restore()  # twice is harmless
    _assert_same(model, snap)


def test_bare_pil_and_path_images(hparams, tmp_path):
    model, processor = tiny_model("qwen2_vl")
    path = tmp_path / "edit.png"
    _image(3).save(path)
    req = _request(3, image_as_list=False, image=str(path))
    edited, restore = apply_ldke_to_multimodal_model(model, processor, [req], hparams)
    assert easyedit_metrics(edited, processor, req)["rewrite_acc"] == 1.0
    restore()


# ---------------------------------------------------------------------- apply: sequential


@pytest.mark.parametrize("model_type", FAMILIES)
def test_sequential_bare_dicts_grow_one_pack(model_type, hparams):
    model, processor = tiny_model(model_type)
    r1, r2 = _request(0), _second_request()
    pre1, pre2 = easyedit_metrics(model, processor, r1), easyedit_metrics(model, processor, r2)
    snap = _snapshot(model)

    e1, _ = apply_ldke_to_multimodal_model(model, processor, r1, hparams)  # bare dict: sequential mode
    e2, restore = apply_ldke_to_multimodal_model(model, processor, r2, hparams)
    assert e2 is e1  # same pack, grown
    assert e2.peft_config["default"].num_slots == 2
    assert edit_state(model).n_calls == 2
    for req, pre in ((r1, pre1), (r2, pre2)):
        post = easyedit_metrics(e2, processor, req)
        assert post["rewrite_acc"] == 1.0
        assert torch.equal(post["locality_output"], pre["locality_output"])
    # passing the returned PeftModel back in appends to the same pack too
    e3, restore = apply_ldke_to_multimodal_model(e2, processor, [_request(11)], hparams)
    assert e3 is e1 and e3.peft_config["default"].num_slots == 3
    restore()
    _assert_same(model, snap)


def test_keep_original_weight_starts_from_the_base(hparams):
    model, processor = tiny_model("qwen2_vl")
    r1, r2 = _request(0), _second_request()
    pre1 = easyedit_metrics(model, processor, r1)
    apply_ldke_to_multimodal_model(model, processor, [r1], hparams)
    edited, restore = apply_ldke_to_multimodal_model(model, processor, [r2], hparams, keep_original_weight=True)
    assert edited.peft_config["default"].num_slots == 1
    assert easyedit_metrics(edited, processor, r2)["rewrite_acc"] == 1.0
    assert easyedit_metrics(edited, processor, r1)["rewrite_acc"] == pre1["rewrite_acc"]
    restore()


def test_copy_true_leaves_the_original_alone(hparams):
    model, processor = tiny_model("qwen2_vl")
    snap = _snapshot(model)
    req = _request(0)
    edited, restore = apply_ldke_to_multimodal_model(model, processor, [req], hparams, copy=True)
    _assert_same(model, snap)
    assert easyedit_metrics(edited, processor, req)["rewrite_acc"] == 1.0
    with pytest.raises(EasyEditCopyError, match="already carries an LDKE pack"):
        apply_ldke_to_multimodal_model(edited, processor, [req], hparams, copy=True)
    restore()


# ---------------------------------------------------------------------- router prompt mask


@pytest.mark.parametrize("model_type", FAMILIES)
def test_prompt_mask_derived_from_easyedit_inputs(model_type):
    """EasyEdit calls model(**inputs) on prompt + target: the hook must find where the prompt ends."""
    model, processor = tiny_model(model_type)
    family = family_of(model)
    hook = PromptMaskHook(family, processor)
    req = _request(0)
    inputs, labels = easyedit_inputs(processor, req["prompt"], req["target"], req["image"])
    ours = family.build_inputs(processor, [req["image"][0]], [req["prompt"]], [req["target"]])
    assert torch.equal(inputs["input_ids"], ours.input_ids)  # same token sequence as ldke-peft builds
    mask = hook.prompt_mask(inputs["input_ids"], inputs.get("attention_mask"))
    assert torch.equal(mask, ours.prompt_mask)
    # labels (LoRA-style: prompt = -100) give the same answer, without any marker
    hook.markers = []
    assert hook.prompt_mask(inputs["input_ids"], inputs.get("attention_mask")) is None
    assert torch.equal(hook.prompt_mask(inputs["input_ids"], inputs.get("attention_mask"), labels), ours.prompt_mask)
    # text-only locality probe, prompt only (generation prefill): every real position is prompt
    hook = PromptMaskHook(family, processor)
    p_only = family.build_inputs(processor, [None], [req["locality_prompt"]])
    assert torch.equal(hook.prompt_mask(p_only.input_ids, p_only.inputs["attention_mask"]), p_only.prompt_mask)


def test_router_decisions_under_easyedit_calls(hparams):
    model, processor = tiny_model("qwen2_vl")
    req = _request(0)
    edited, restore = apply_ldke_to_multimodal_model(model, processor, [req], hparams)
    tuner = edited.base_model
    easyedit_logits(edited, processor, req["prompt"], req["target"], req["image"])
    assert tuner.last_routing("default").tolist() == [0]
    easyedit_logits(edited, processor, req["multimodal_locality_prompt"], req["multimodal_locality_ground_truth"],
                    req["multimodal_locality_image"])
    assert tuner.last_routing("default").tolist() == [-1]
    easyedit_logits(edited, processor, req["locality_prompt"], req["locality_ground_truth"])
    assert tuner.last_routing("default").tolist() == [-1]
    # labels passed (as EasyEdit's LoRA training does): routed on the prompt, loss computed
    inputs, labels = easyedit_inputs(processor, req["prompt"], req["target"], req["image"])
    out = edited(**inputs, labels=labels)
    assert torch.isfinite(out.loss) and tuner.last_routing("default").tolist() == [0]
    # an explicit prompt_mask_context wins over the hook: a mask holding only the first token leaves the
    # router no question to read, and nothing routes
    only_first = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    only_first[:, 0] = True
    with torch.no_grad(), prompt_mask_context(edited, only_first):
        edited(**inputs)
    assert tuner.last_routing("default").tolist() == [-1]
    restore()


# ---------------------------------------------------------------------- bad input


def test_tensor_images_refused_before_touching_the_model(hparams):
    model, processor = tiny_model("qwen2_vl")
    snap = _snapshot(model)
    req = _request(0, image=torch.zeros(3, 56, 56))
    with pytest.raises(ImageError, match=r"requests\[0\]\.image is a preprocessed torch\.Tensor") as e:
        apply_ldke_to_multimodal_model(model, processor, [req], hparams)
    assert e.value.field == "image"
    with pytest.raises(ImageError, match="multimodal_locality_image"):
        apply_ldke_to_multimodal_model(model, processor, _request(0, multimodal_locality_image=[torch.zeros(3, 8, 8)]), hparams)
    with pytest.raises(LDKEError, match="target"):
        apply_ldke_to_multimodal_model(model, processor, [_request(0, target="")], hparams)
    with pytest.raises(LDKEError, match="empty"):
        apply_ldke_to_multimodal_model(model, processor, [], hparams)
    _assert_same(model, snap)


def test_register_without_easyedit_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "easyeditor", None)  # a real ImportError, whatever is installed
    with pytest.raises(EasyEditNotFoundError) as e:
        register()
    assert isinstance(e.value, ImportError)
    msg = str(e.value)
    for needle in ("git clone https://github.com/zjunlp/EasyEdit", "PYTHONPATH", "torchvision==0.29.1", "transformers <= 5.23"):
        assert needle in msg


# ---------------------------------------------------------------------- the example


def _env_without_easyedit() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EASYEDIT_SRC")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO)  # this checkout, not an installed copy (nor EasyEdit)
    return env


def test_detection_check_names_the_fix(tmp_path):
    """EasyEdit picks the model class from substrings of model_name; a path it would not recognise fails
    later with "'MultimodalEditor' object has no attribute 'model'". The check says why first."""
    from integrations.easyedit import EasyEditDetectionError, check_easyedit_detection
    from integrations.easyedit.tiny import save_tiny_model

    q25 = save_tiny_model("qwen2_5_vl", tmp_path)
    with pytest.raises(EasyEditDetectionError, match=r"detect_qwen2_5_vl=True.*--detect-qwen2-5-vl"):
        check_easyedit_detection(q25)
    assert check_easyedit_detection(q25, detect_qwen2_5_vl=True) == "qwen2_5_vl"
    assert check_easyedit_detection(save_tiny_model("qwen2_vl", tmp_path)) == "qwen2_vl"
    assert check_easyedit_detection(save_tiny_model("llava_onevision", tmp_path)) == "llava_onevision"
    # a Qwen2-VL saved under a neutral name: EasyEdit would load nothing
    model, processor = tiny_model("qwen2_vl")
    plain = tmp_path / "my-model"
    model.save_pretrained(plain)
    with pytest.raises(EasyEditDetectionError, match=r"matches none.*qwen2-vl"):
        check_easyedit_detection(str(plain))
    # a family EasyEdit has no loader for
    with pytest.raises(EasyEditDetectionError, match="no loader for model_type 'llava'.*apply_ldke_to_multimodal_model"):
        check_easyedit_detection("/models/qwen2-vl-copy", model_type="llava")
    # the path says one family, the model is another
    with pytest.raises(EasyEditDetectionError, match="matches 'qwen2_vl' but the model is 'llava_onevision'"):
        check_easyedit_detection("/models/qwen2-vl-ov", model_type="llava_onevision")


def test_example_no_easyedit_runs():
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "easyedit_ldke.py"), "--no-easyedit"],
        cwd=REPO, env=_env_without_easyedit(), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"rewrite_acc": 1.0' in out.stdout
    assert "base model bitwise as before: True" in out.stdout


def test_example_no_easyedit_on_a_request_the_user_writes(tmp_path):
    """The command the README gives for one's own request: a 10-token answer, a drawn card, another photo."""
    from PIL import ImageDraw

    card = Image.new("RGB", (64, 64), (20, 90, 160))
    ImageDraw.Draw(card).ellipse((10, 14, 50, 54), fill=(240, 200, 30))
    card.save(tmp_path / "card.png")
    card.rotate(5).save(tmp_path / "card2.png")
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "easyedit_ldke.py"), "--no-easyedit", "--model-type", "llava_onevision",
         "--image", str(tmp_path / "card.png"), "--prompt", "Which planet does this badge show?",
         "--target", "the red planet Mars", "--rephrase-prompt", "Name the planet on this badge.",
         "--rephrase-image", str(tmp_path / "card2.png"), "--loc-prompt", "Who wrote Hamlet?", "--loc-answer", "Shakespeare"],
        cwd=REPO, env=_env_without_easyedit(), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"rewrite_acc": 1.0, "rephrase_acc": 1.0, "image_rephrase_acc": 1.0, "locality_acc": 1.0' in out.stdout


def test_example_without_easyedit_explains_and_fails():
    out = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['easyeditor'] = None; sys.argv = ['x', '--tiny'];"
         "import runpy; runpy.run_path('examples/easyedit_ldke.py', run_name='__main__')"],
        cwd=REPO, env=_env_without_easyedit(), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2
    assert "PYTHONPATH" in out.stderr and "--no-easyedit" in out.stderr


# ---------------------------------------------------------------------- with EasyEdit (optional)

EASYEDIT_SRC = os.environ.get("EASYEDIT_SRC")
_SKIP_REASON = (
    "EasyEdit end-to-end tests need an upstream EasyEdit checkout: set EASYEDIT_SRC=/path/to/EasyEdit "
    "(in an environment with torchvision and transformers<=5.23; see integrations/easyedit/README.md)"
)


@pytest.fixture(scope="module")
def easyedit():
    if not EASYEDIT_SRC:
        pytest.skip(_SKIP_REASON)
    if EASYEDIT_SRC not in sys.path:
        sys.path.insert(0, EASYEDIT_SRC)
    register()
    register()  # idempotent
    import easyeditor

    return easyeditor


@pytest.fixture()
def tiny_qwen2_vl_dir(tmp_path):
    from integrations.easyedit.tiny import save_tiny_model

    return save_tiny_model("qwen2_vl", tmp_path)


def test_easyedit_registration(easyedit):
    from easyeditor.util import alg_dict

    import importlib

    utils = importlib.import_module("easyeditor.editors.utils")
    assert alg_dict.ALG_MULTIMODAL_DICT["LDKE"] is apply_ldke_to_multimodal_model
    assert "LDKE" in utils.CALLABLE_RESTORE_ALGS
    if hasattr(alg_dict, "MULTIMODAL_EDIT_ALGS"):
        assert "LDKE" in alg_dict.MULTIMODAL_EDIT_ALGS


def _save_png(path: Path, seed: int) -> str:
    _image(seed).save(path)
    return str(path)


def test_easyedit_multimodal_editor_edits_tiny_qwen2_vl(easyedit, tiny_qwen2_vl_dir, tmp_path):
    hp = LDKEMultimodalHyperParams.from_hparams("tiny", model_name=tiny_qwen2_vl_dir)
    editor = easyedit.MultimodalEditor.from_hparams(hp)
    img, loc = _save_png(tmp_path / "e.png", 0), _save_png(tmp_path / "l.png", 100)
    metrics, edited, weights_copy = editor.edit(
        prompts=["What is the capital of the country shown?"], targets=["Paris"], image=[img],
        rephrase_prompts=["Which city is the capital of the country in the picture?"], rephrase_image=[img],
        locality_inputs={"text": {"prompt": ["What currency is used there?"], "ground_truth": ["euro"]},
                         "vision": {"image": [loc], "prompt": ["Describe the image."], "ground_truth": ["A red flag"]}},
        keep_original_weight=True, verbose=False,
    )
    post = metrics[0]["post"]
    print("EasyEdit single edit, post:", {k: float(v) for k, v in post.items() if k.endswith("_acc")})
    assert float(post["rewrite_acc"]) == 1.0
    assert float(post["rephrase_acc"]) == 1.0
    assert float(post["image_rephrase_acc"]) == 1.0
    assert float(post["locality_acc"]) == 1.0 and float(post["multimodal_locality_acc"]) == 1.0
    # CALLABLE_RESTORE: the editor's model is the clean base again
    assert not any(isinstance(m, LDKELinear) for m in editor.model.modules())


def test_easyedit_sequential_edit(easyedit, tiny_qwen2_vl_dir, tmp_path):
    hp = LDKEMultimodalHyperParams.from_hparams("tiny", model_name=tiny_qwen2_vl_dir)
    editor = easyedit.MultimodalEditor.from_hparams(hp)
    imgs = [_save_png(tmp_path / f"e{i}.png", i * 7) for i in range(2)]
    metrics, edited, weights_copy = editor.edit(
        prompts=["What is the capital of the country shown?", "What is written on the sign in this picture?"],
        targets=["Paris", "Rome"], image=imgs,
        locality_inputs={"text": {"prompt": ["What currency is used there?", "Who wrote Hamlet?"],
                                  "ground_truth": ["euro", "Shakespeare"]}},
        keep_original_weight=False, verbose=False, sequential_edit=True,
    )
    for m in metrics:
        print("EasyEdit sequential, pre:", float(m["pre"]["rewrite_acc"]), "post:",
              {k: float(v) for k, v in m["post"].items() if k.endswith("_acc")})
        assert float(m["post"]["rewrite_acc"]) == 1.0
        assert float(m["post"]["locality_acc"]) == 1.0
    assert edited.peft_config["default"].num_slots == 2
    weights_copy()
    assert not any(isinstance(m, LDKELinear) for m in editor.model.modules())


def test_easyedit_edit_dataset(easyedit, tiny_qwen2_vl_dir, tmp_path):
    import json

    records = []
    for i, (q, a) in enumerate([("What is the capital of the country shown?", "Paris"),
                                ("What is written on the sign in this picture?", "Rome")]):
        _save_png(tmp_path / f"d{i}.png", 20 + i)
        _save_png(tmp_path / f"m{i}.png", 40 + i)
        records.append({"src": q, "pred": "x", "alt": a, "rephrase": q.replace("What", "Which"), "image": f"d{i}.png",
                        "image_rephrase": f"d{i}.png", "loc": "Who wrote Hamlet?", "loc_ans": "Shakespeare",
                        "m_loc": f"m{i}.png", "m_loc_q": "Describe the image.", "m_loc_a": "A red flag"})
    data = tmp_path / "vqa.json"
    data.write_text(json.dumps(records))
    hp = LDKEMultimodalHyperParams.from_hparams("tiny", model_name=tiny_qwen2_vl_dir, coco_image=str(tmp_path),
                                                rephrase_image=str(tmp_path))
    editor = easyedit.MultimodalEditor.from_hparams(hp)
    ds = easyedit.VQADataset(str(data), config=hp)
    metrics, edited, _ = editor.edit_dataset(ds, keep_original_weight=False, verbose=False)
    for m in metrics:
        print("EasyEdit edit_dataset, pre:", float(m["pre"]["rewrite_acc"]), "post:",
              {k: float(v) for k, v in m["post"].items() if k.endswith("_acc")})
        assert float(m["post"]["rewrite_acc"]) == 1.0


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
@pytest.mark.parametrize("mode", ["single", "sequential", "dataset"])
def test_easyedit_targets_of_1_to_16_tokens(easyedit, tmp_path, mode, family):
    """Targets of 1, 4, 8 and 16 tokens (written in tests/test_long_targets.py), through upstream EasyEdit's
    MultimodalEditor in all three modes, on the three families EasyEdit detects by name: every case reaches
    rewrite 1.0, rephrase and image-rephrase >= 0.95, and leaves both locality probes alone."""
    import json

    from integrations.easyedit.tiny import save_tiny_model
    from test_long_targets import make_requests

    if family == "qwen2_5_vl":
        register(detect_qwen2_5_vl=True)  # upstream detects Qwen2.5-VL only with this opt-in
    model_dir = save_tiny_model(family, tmp_path / "model")
    _, processor = tiny_model(family)
    reqs = make_requests(processor.tokenizer)
    paths = {}
    for k, r in enumerate(reqs):
        for key, im in (("e", r["image"][0]), ("r", r["image_rephrase"][0]), ("m", r["multimodal_locality_image"][0])):
            paths[(key, k)] = f"{key}{k}.png"
            im.save(tmp_path / paths[(key, k)])
    hp = LDKEMultimodalHyperParams.from_hparams("tiny", model_name=model_dir, coco_image=str(tmp_path),
                                                rephrase_image=str(tmp_path))
    editor = easyedit.MultimodalEditor.from_hparams(hp)
    if mode == "dataset":
        records = [{"src": r["prompt"], "pred": "x", "alt": r["target"], "rephrase": r["rephrase_prompt"],
                    "image": paths[("e", k)], "image_rephrase": paths[("r", k)], "loc": r["locality_prompt"],
                    "loc_ans": r["locality_ground_truth"], "m_loc": paths[("m", k)],
                    "m_loc_q": r["multimodal_locality_prompt"], "m_loc_a": r["multimodal_locality_ground_truth"]}
                   for k, r in enumerate(reqs)]
        (tmp_path / "vqa.json").write_text(json.dumps(records))
        metrics, _, _ = editor.edit_dataset(easyedit.VQADataset(str(tmp_path / "vqa.json"), config=hp),
                                            keep_original_weight=False, verbose=False)
    else:
        metrics, _, _ = editor.edit(
            prompts=[r["prompt"] for r in reqs], targets=[r["target"] for r in reqs],
            image=[str(tmp_path / paths[("e", k)]) for k in range(len(reqs))],
            rephrase_prompts=[r["rephrase_prompt"] for r in reqs],
            rephrase_image=[str(tmp_path / paths[("r", k)]) for k in range(len(reqs))],
            locality_inputs={"text": {"prompt": [r["locality_prompt"] for r in reqs],
                                      "ground_truth": [r["locality_ground_truth"] for r in reqs]},
                             "vision": {"image": [str(tmp_path / paths[("m", k)]) for k in range(len(reqs))],
                                        "prompt": [r["multimodal_locality_prompt"] for r in reqs],
                                        "ground_truth": [r["multimodal_locality_ground_truth"] for r in reqs]}},
            keep_original_weight=mode == "single", verbose=False, sequential_edit=mode == "sequential",
        )
    assert len(metrics) == len(reqs)
    for k, m in enumerate(metrics):
        post = {key: float(v) for key, v in m["post"].items() if key.endswith("_acc")}
        print(f"EasyEdit {mode}, case {k}:", post)
        assert post["rewrite_acc"] == 1.0, (k, post)
        assert post["rephrase_acc"] >= 0.95 and post["image_rephrase_acc"] >= 0.95, (k, post)
        assert post["locality_acc"] >= 0.99 and post["multimodal_locality_acc"] >= 0.99, (k, post)
