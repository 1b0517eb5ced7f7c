"""Loading untrusted or broken edit packs: every failure is a specific error, before the model is touched.

Each broken pack is tried through every loading route (``PeftModel.from_pretrained``, transformers'
``model.load_adapter`` and ``PeftModel.load_adapter`` as a second adapter). After the refusal the
base model must carry no LDKE module, no routing hook, and a bitwise-unchanged state_dict.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tokenize
from pathlib import Path
from typing import Callable

import ldke_peft
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from ldke_peft import LDKEConfig
from ldke_peft.errors import AdapterLoadError, CorruptAdapterError, FingerprintMismatchError, UnsafeAdapterError
from ldke_peft.tuner.safety import validate_pack

from _tuner_utils import (
    BLUE,
    PROMPT_A,
    PROMPT_B,
    RED,
    Anchor,
    SlotSpec,
    assert_same_state,
    base_state,
    build,
    build_inputs,
    hand_pack,
    ldke_modules,
    logits,
)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

WEIGHTS = "adapter_model.safetensors"
LAYER = "base_model.model.model.language_model.layers.{}.mlp.down_proj.{}"
LOADERS = ("PeftModel.from_pretrained", "transformers.load_adapter", "PeftModel.load_adapter")


@pytest.fixture(scope="module")
def good_pack(tmp_path_factory) -> Path:
    """A valid llava pack: slot 0 on layer 2, slot 1 on layers 2 and 3, router on layer 1."""
    model, proc = build("llava")
    hp = hand_pack(model, proc, [SlotSpec([2], Anchor(RED, PROMPT_A)), SlotSpec([2, 3], Anchor(BLUE, PROMPT_B))])
    path = tmp_path_factory.mktemp("packs") / "good"
    hp.model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def probe_text_pack(tmp_path_factory) -> Path:
    """The good pack's slots with the textual key pooled from the probe layer: what every pack written
    before format 1.2 holds."""
    model, proc = build("llava")
    hp = hand_pack(model, proc, [SlotSpec([2], Anchor(RED, PROMPT_A)), SlotSpec([2, 3], Anchor(BLUE, PROMPT_B))],
                   router_text_encoder=None)
    path = tmp_path_factory.mktemp("packs") / "probe_text"
    hp.model.save_pretrained(path)
    return path


@pytest.fixture
def pack(good_pack, tmp_path) -> Path:
    """A fresh copy of the good pack to break."""
    dst = tmp_path / "pack"
    shutil.copytree(good_pack, dst)
    return dst


def _edit_tensors(pack: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(pack / WEIGHTS))
    fn(tensors)
    save_file(tensors, str(pack / WEIGHTS), metadata={"format": "pt"})


def _edit_config(pack: Path, fn: Callable[[dict], None]) -> None:
    path = pack / "adapter_config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def _routing_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def assert_refused(pack: Path, loader: str, error: type[Exception], match: str, model_type: str = "llava", seed: int = 0):
    """Load ``pack`` through ``loader``; expect ``error`` and an untouched base model."""
    if loader == "PeftModel.load_adapter":
        # a second adapter on a model that already carries a good one: that one must keep working
        model, proc = build(model_type, seed)
        first = hand_pack(model, proc, [SlotSpec([3], Anchor(RED, PROMPT_A))]).model
        built = build_inputs(model, proc, [Anchor(RED, PROMPT_A), Anchor(BLUE, PROMPT_B)])
        before_logits, before = logits(first, built), base_state(first)
        n_modules, n_hooks = len(ldke_modules(first)), _routing_hooks(model)
        with pytest.raises(error, match=match) as info:
            first.load_adapter(str(pack), adapter_name="bad")
        assert "bad" not in first.peft_config
        assert not any("bad" in m.ldke_A or "bad" in m.ldke_router for m in first.modules() if hasattr(m, "ldke_A"))
        assert len(ldke_modules(first)) == n_modules and _routing_hooks(model) == n_hooks
        assert_same_state(before, first, f"refused {loader}")
        assert torch.equal(logits(first, built), before_logits)
        return info.value
    model, _ = build(model_type, seed)
    before, n_hooks = base_state(model), _routing_hooks(model)
    with pytest.raises(error, match=match) as info:
        if loader == "PeftModel.from_pretrained":
            PeftModel.from_pretrained(model, str(pack))
        else:
            model.load_adapter(str(pack))
    assert not ldke_modules(model), f"{loader} left LDKE modules on the base model"
    assert _routing_hooks(model) == n_hooks, f"{loader} left routing hooks on the base model"
    assert_same_state(before, model, f"refused {loader}")
    return info.value


def test_good_pack_loads_everywhere(good_pack):
    cfg = LDKEConfig.from_pretrained(str(good_pack))
    validate_pack(str(good_pack), cfg)
    model, proc = build("llava")
    pm = PeftModel.from_pretrained(model, str(good_pack))
    assert len(ldke_modules(pm)) == 3


# ---------------------------------------------------------------------- wrong base model


@pytest.mark.parametrize("loader", LOADERS)
def test_other_seed_is_fingerprint_mismatch(pack, loader):
    err = assert_refused(pack, loader, FingerprintMismatchError, "different base model", seed=1)
    assert "decoder layer" in str(err)


@pytest.mark.parametrize("other", ["qwen2_vl", "blip-2"])
@pytest.mark.parametrize("loader", LOADERS[:2])
def test_other_family_is_fingerprint_mismatch(pack, loader, other):
    assert_refused(pack, loader, FingerprintMismatchError, r"model_type='llava'.*" + other, model_type=other)


# ---------------------------------------------------------------------- corrupt weights


def _truncate(pack: Path) -> None:
    data = (pack / WEIGHTS).read_bytes()
    (pack / WEIGHTS).write_bytes(data[: len(data) // 2])


def _nan(pack: Path) -> None:
    _edit_tensors(pack, lambda t: t[LAYER.format(3, "ldke_B")].view(-1).__setitem__(0, float("nan")))


def _inf(pack: Path) -> None:
    _edit_tensors(pack, lambda t: t[LAYER.format(1, "ldke_router.keys_v")].view(-1).__setitem__(3, float("inf")))


def _missing(pack: Path) -> None:
    _edit_tensors(pack, lambda t: t.pop(LAYER.format(3, "ldke_slot_ids")))


def _extra(pack: Path) -> None:
    _edit_tensors(pack, lambda t: t.__setitem__(LAYER.format(3, "ldke_C"), torch.zeros(2)))


def _wrong_rank(pack: Path) -> None:
    key = LAYER.format(2, "ldke_A")
    _edit_tensors(pack, lambda t: t.__setitem__(key, torch.zeros(t[key].shape[0], t[key].shape[1], 3)))


def _wrong_router_width(pack: Path) -> None:
    key = LAYER.format(1, "ldke_router.keys_t")
    _edit_tensors(pack, lambda t: t.__setitem__(key, torch.zeros(2, 31)))


def _inconsistent_hidden(pack: Path) -> None:
    key = LAYER.format(3, "ldke_B")
    _edit_tensors(pack, lambda t: t.__setitem__(key, torch.zeros(t[key].shape[0], t[key].shape[1], 48)))


def _swapped_slot_ids(pack: Path) -> None:
    _edit_tensors(pack, lambda t: t.__setitem__(LAYER.format(2, "ldke_slot_ids"), torch.tensor([1, 0])))


def _extra_slot_in_config(pack: Path) -> None:
    def fn(cfg):
        cfg["slot_layers"] = cfg["slot_layers"] + [[3]]
        cfg["num_slots"] = 3

    _edit_config(pack, fn)


def _float_projection(pack: Path) -> None:
    key = LAYER.format(1, "ldke_router.proj_v")
    _edit_tensors(pack, lambda t: t.__setitem__(key, t[key].float()))


def _missing_scale(pack: Path) -> None:
    _edit_tensors(pack, lambda t: t.pop(LAYER.format(1, "ldke_router.proj_t_scale")))


def _no_weights(pack: Path) -> None:
    (pack / WEIGHTS).unlink()


def _no_edits_file(pack: Path) -> None:
    (pack / "ldke_edits.json").unlink()


def _edits_file_of_another_save(pack: Path) -> None:
    path = pack / "ldke_edits.json"
    data = json.loads(path.read_text())
    data["num_slots"], data["edits"] = 3, data["edits"] + [{"prompt": "x", "target": "y"}] * 3
    path.write_text(json.dumps(data))


def _edits_file_not_json(pack: Path) -> None:
    (pack / "ldke_edits.json").write_text("{half")


CORRUPTIONS = {
    "truncated": (_truncate, CorruptAdapterError, r"adapter_model\.safetensors.*(truncated|corrupt)"),
    "nan": (_nan, CorruptAdapterError, r"layers\.3\.mlp\.down_proj\.ldke_B.*non-finite"),
    "inf": (_inf, CorruptAdapterError, r"ldke_router\.keys_v.*non-finite"),
    "missing_tensor": (_missing, CorruptAdapterError, r"missing tensor ldke_slot_ids of decoder layer 3"),
    "extra_tensor": (_extra, CorruptAdapterError, r"unexpected tensor .*ldke_C"),
    "wrong_rank": (_wrong_rank, CorruptAdapterError, r"layers\.2\.mlp\.down_proj\.ldke_A.*shape \[2, 64, 3\].*\(2, \*, 2\)"),
    "wrong_router_width": (_wrong_router_width, CorruptAdapterError, r"keys_t.*shape \[2, 31\].*\(2, 32\)"),
    "inconsistent_hidden": (_inconsistent_hidden, CorruptAdapterError, r"ldke_B.*\[1, 2, 48\].*hidden size: 48 vs 32"),
    "slot_ids_disagree": (_swapped_slot_ids, CorruptAdapterError, r"hosts slots \[1, 0\].*say \[0, 1\]"),
    "slot_count_disagrees": (_extra_slot_in_config, CorruptAdapterError, r"layers\.3\.mlp\.down_proj\.ldke_\w+.*shape \[1"),
    "float_projection_in_int8_pack": (_float_projection, CorruptAdapterError, r"proj_v.*F32.*router_storage='int8'"),
    "missing_projection_scale": (_missing_scale, CorruptAdapterError, r"missing tensor ldke_router\.proj_t_scale"),
    "no_safetensors": (_no_weights, CorruptAdapterError, r"has no adapter_model\.safetensors"),
    "no_edits_file": (_no_edits_file, CorruptAdapterError, r"has no ldke_edits\.json"),
    "edits_file_of_another_save": (_edits_file_of_another_save, CorruptAdapterError, r"ldke_edits\.json describes 3 slots"),
    "edits_file_not_json": (_edits_file_not_json, CorruptAdapterError, r"cannot read the LDKE pack's ldke_edits\.json"),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_pack_refused(pack, loader, case):
    breaker, error, match = CORRUPTIONS[case]
    breaker(pack)
    assert_refused(pack, loader, error, match)


def test_num_slots_disagreeing_with_slot_layers(pack):
    _edit_config(pack, lambda cfg: cfg.__setitem__("num_slots", 5))
    for loader in LOADERS:
        assert_refused(pack, loader, AdapterLoadError, r"num_slots=5 disagrees with slot_layers \(2 entries\)")


# ---------------------------------------------------------------------- unsafe config / files


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(
    "field, value",
    [("__class__", "os.system"), ("trust_remote_code", True), ("ldke_future_field", {"x": 1})],
)
def test_unknown_config_fields_refused(pack, loader, field, value):
    _edit_config(pack, lambda cfg: cfg.__setitem__(field, value))
    assert_refused(pack, loader, UnsafeAdapterError, rf"fields LDKE does not know: \['{field}'\]")


@pytest.mark.parametrize("loader", LOADERS)
def test_newer_pack_format_refused(pack, loader):
    _edit_config(pack, lambda cfg: cfg.__setitem__("pack_format_version", "2.0"))
    assert_refused(pack, loader, AdapterLoadError, r"pack format '2\.0' is not supported")


def test_format_1_0_pack_with_fp32_projections_still_loads(probe_text_pack, tmp_path):
    """Packs written before ``router_storage`` existed (format 1.0) stored fp32 projections: they load
    as such and route exactly like the int8 pack they are converted from."""
    good_pack = probe_text_pack
    old = tmp_path / "old"
    shutil.copytree(good_pack, old)
    prefix = LAYER.format(1, "ldke_router.")

    def to_fp32(t):
        for part in ("v", "t"):
            q, scale = t[f"{prefix}proj_{part}"], t.pop(f"{prefix}proj_{part}_scale")
            t[f"{prefix}proj_{part}"] = q.float() * scale

    _edit_tensors(old, to_fp32)

    def to_v1_0(cfg):
        for key in ("router_storage", "router_text_encoder", "router_text_dim", "router_text_frame"):
            cfg.pop(key)
        cfg["pack_format_version"] = "1.0"

    _edit_config(old, to_v1_0)
    assert LDKEConfig.from_pretrained(str(old)).router_storage == "float32"
    # int8 projections: the int8 pack stores them in a quarter of the bytes
    new_bytes, old_bytes = (good_pack / WEIGHTS).stat().st_size, (old / WEIGHTS).stat().st_size
    proj_elems = sum(t.numel() for k, t in load_file(str(old / WEIGHTS)).items() if k.endswith(("proj_v", "proj_t")))
    assert old_bytes - new_bytes >= 3 * proj_elems - 1024  # 4 -> 1 byte each, less the scales and their header entries
    assert LDKEConfig.from_pretrained(str(good_pack)).router_storage == "int8"
    model, proc = build("llava")
    built = build_inputs(model, proc, [Anchor(RED, PROMPT_A), Anchor(BLUE, PROMPT_B), Anchor(BLUE, PROMPT_A)])
    new_pm = PeftModel.from_pretrained(model, str(good_pack))
    want = logits(new_pm, built)
    new_pm.unload()
    model2, _ = build("llava")
    old_pm = PeftModel.from_pretrained(model2, str(old))
    assert old_pm.base_model.router("default").proj_v.dtype == torch.float32
    assert torch.equal(logits(old_pm, built), want)


class _Tripwire:
    """Unpickling this creates ``path``: proof that a pickle was loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name, keep_safetensors", [("adapter_model.bin", True), ("adapter_model.bin", False), ("extra.pt", True)])
def test_pickle_files_refused_and_never_loaded(pack, tmp_path, loader, name, keep_safetensors):
    marker = tmp_path / "unpickled"
    (pack / name).write_bytes(pickle.dumps({"weights": _Tripwire(str(marker))}))
    if not keep_safetensors:
        (pack / WEIGHTS).unlink()
    assert_refused(pack, loader, UnsafeAdapterError, rf"pickle-format file\(s\) \['{name}'\]")
    assert not marker.exists(), "a pickle in the pack was unpickled"


# ---------------------------------------------------------------------- loading by repo id


def test_repo_id_offline_uses_cache_and_refuses_pickles(good_pack, tmp_path, monkeypatch):
    import huggingface_hub

    from ldke_peft.testing.fake_hub import populate_hf_cache

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "cache"
    populate_hf_cache(good_pack, "org/good-pack", cache)
    cfg = LDKEConfig.from_pretrained("org/good-pack", cache_dir=str(cache))
    model, _ = build("llava")
    pm = PeftModel.from_pretrained(model, "org/good-pack", cache_dir=str(cache))
    assert len(ldke_modules(pm)) == 3

    bad = tmp_path / "bad"
    shutil.copytree(good_pack, bad)
    (bad / "adapter_model.bin").write_bytes(b"not even looked at")
    populate_hf_cache(bad, "org/bad-pack", cache)
    with pytest.raises(UnsafeAdapterError, match=r"Hub repo 'org/bad-pack'.*adapter_model\.bin"):
        validate_pack("org/bad-pack", cfg, cache_dir=str(cache))
    with pytest.raises(AdapterLoadError, match="cannot fetch"):
        validate_pack("org/not-cached", cfg, cache_dir=str(cache))


def test_repo_id_online_refuses_pickles_before_download(good_pack, tmp_path):
    from huggingface_hub import HfApi

    from ldke_peft.testing.fake_hub import FakeHub

    bad = tmp_path / "bad"
    shutil.copytree(good_pack, bad)
    (bad / "adapter_model.pth").write_bytes(b"never downloaded")
    cfg = LDKEConfig.from_pretrained(str(good_pack))
    with FakeHub() as hub:
        api = HfApi(endpoint=hub.endpoint, token="t")
        for repo, folder in (("org/good", good_pack), ("org/bad", bad)):
            api.create_repo(repo)
            api.upload_folder(repo_id=repo, folder_path=str(folder))
        kw = dict(endpoint=hub.endpoint, cache_dir=str(tmp_path / "cache"), token="t")
        validate_pack("org/good", cfg, **kw)
        n = len(hub.requests)
        with pytest.raises(UnsafeAdapterError, match=r"'org/bad'.*adapter_model\.pth"):
            validate_pack("org/bad", cfg, **kw)
        assert not any("resolve" in path for _, path in hub.requests[n:]), "downloaded files of a refused pack"


# ---------------------------------------------------------------------- source scan

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [ROOT / "ldke_peft", ROOT / "integrations"]


def unsafe_calls(source: str) -> list[str]:
    """Code (not strings or comments) that could execute untrusted data: ``torch.load(``, any use of
    ``pickle``/``dill``/``marshal``, bare ``eval(``/``exec(``, ``trust_remote_code=True``."""
    toks = [
        t for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    ]
    found = []
    for i, t in enumerate(toks):
        prev = toks[i - 1].string if i else ""
        nxt = toks[i + 1].string if i + 1 < len(toks) else ""
        nxt2 = toks[i + 2].string if i + 2 < len(toks) else ""
        where = f"line {t.start[0]}"
        if t.type == tokenize.NAME:
            if t.string in ("pickle", "cPickle", "dill", "marshal", "cloudpickle"):
                found.append(f"{where}: {t.string}")
            elif t.string in ("eval", "exec") and nxt == "(" and prev != ".":
                found.append(f"{where}: {t.string}(")
            elif t.string == "load" and prev == "." and i >= 2 and toks[i - 2].string == "torch":
                found.append(f"{where}: torch.load")
            elif t.string == "trust_remote_code" and nxt == "=" and nxt2 == "True":
                found.append(f"{where}: trust_remote_code=True")
        elif t.type == tokenize.STRING and t.string.strip("'\"") == "trust_remote_code" and nxt == ":" and nxt2 == "True":
            found.append(f"{where}: 'trust_remote_code': True")
    return found


def test_source_scanner_catches_what_it_should():
    bad = (
        "import pickle\nimport torch\nx = torch.load(p)\ny = eval('1')\nexec(code)\n"
        "m = f(trust_remote_code=True)\nkw = {'trust_remote_code': True}\nfrom dill import loads\n"
    )
    assert [h.split(":")[0] for h in unsafe_calls(bad)] == [f"line {i}" for i in (1, 3, 4, 5, 6, 7, 8)], unsafe_calls(bad)
    fine = "model.eval()\n# pickle torch.load( eval(\ns = 'no pickle files; torch.load( eval('\nf(trust_remote_code=False)\n"
    assert unsafe_calls(fine) == []


def test_library_sources_have_no_unsafe_loading():
    problems = []
    for folder in SCANNED:
        for path in sorted(folder.rglob("*.py")):
            for hit in unsafe_calls(path.read_text()):
                problems.append(f"{path.relative_to(ROOT)} {hit}")
    assert not problems, "unsafe code in library sources:\n" + "\n".join(problems)


def test_format_1_1_pack_routes_on_probe_layer_text_features(probe_text_pack, tmp_path):
    """A pack written before the sentence-encoder textual key (format 1.1) has no ``router_text_*``
    fields: it loads with the probe-layer textual key it was fitted with and routes as it did."""
    old = tmp_path / "v1_1"
    shutil.copytree(probe_text_pack, old)

    def to_v1_1(cfg):
        for key in ("router_text_encoder", "router_text_dim", "router_text_frame"):
            cfg.pop(key)
        cfg["pack_format_version"] = "1.1"

    _edit_config(old, to_v1_1)
    assert LDKEConfig.from_pretrained(str(old)).router_text_encoder is None
    model, proc = build("llava")
    built = build_inputs(model, proc, [Anchor(RED, PROMPT_A), Anchor(BLUE, PROMPT_B), Anchor(BLUE, PROMPT_A)])
    want = logits(PeftModel.from_pretrained(model, str(probe_text_pack)), built)
    model2, _ = build("llava")
    got_pm = PeftModel.from_pretrained(model2, str(old))
    assert got_pm.base_model.router("default").text_encoder is None
    assert torch.equal(logits(got_pm, built), want)
    assert got_pm.base_model.last_routing("default").tolist() == [0, 1, -1]


def test_a_text_keyed_pack_without_a_tokenizer_says_how_to_give_one(good_pack):
    """A base model built from a config has no name_or_path to find its tokenizer by: the first routed
    call names the problem and the fix instead of routing on nothing."""
    from transformers import LlavaForConditionalGeneration

    from ldke_peft.tuner.question_key import TokenizerNotFoundError

    model, proc = build("llava")
    bare = LlavaForConditionalGeneration(model.config).eval()  # same config, no attached tokenizer
    bare.load_state_dict(model.state_dict())
    pm = PeftModel.from_pretrained(bare, str(good_pack))
    built = build_inputs(model, proc, [Anchor(RED, PROMPT_A)])
    with pytest.raises(TokenizerNotFoundError, match="attach_tokenizer"):
        logits(pm, built)
    ldke_peft.attach_tokenizer(pm, proc)
    assert torch.equal(logits(pm, built), logits(PeftModel.from_pretrained(model, str(good_pack)), built))


def test_fitted_factors_are_stored_in_float16_and_reload_bit_for_bit(tmp_path):
    """``delta_storage="float16"`` (the default) halves the delta's bytes without changing what runs: the
    fit rounds the factors and checks the edit on them, ldke-peft's savers write them in float16; an older
    pack format keeps float32."""
    from PIL import Image

    from ldke_peft import EditRequest, edit
    from ldke_peft.testing.tiny import tiny_model

    req = EditRequest(image=Image.new("RGB", (32, 32), (200, 30, 30)), prompt="What is shown?", target="Lyon")
    sizes = {}
    for storage in ("float16", "float32"):
        model, proc = tiny_model("llava")
        pm = edit(model, proc, [req], LDKEConfig(delta_storage=storage, localization="fixed", fixed_layers=[2]),
                  progress=False)
        ldke_peft.save_edits(pm, tmp_path / storage)
        tensors = load_file(str(tmp_path / storage / WEIGHTS))
        # PEFT's own save (nothing patched) keeps the parameters' float32: the same values, twice the bytes
        pm.save_pretrained(tmp_path / f"{storage}_peft")
        plain = load_file(str(tmp_path / f"{storage}_peft" / WEIGHTS))
        assert all(plain[k].dtype == torch.float32 and torch.equal(plain[k], t.float()) for k, t in tensors.items()
                   if k.endswith(("ldke_A", "ldke_B")))
        factors = {k: t for k, t in tensors.items() if k.endswith(("ldke_A", "ldke_B"))}
        assert factors and all(t.dtype == getattr(torch, storage) for t in factors.values())
        sizes[storage] = sum(t.numel() * t.element_size() for t in factors.values())
        built = build_inputs(model, proc, [Anchor(Image.new("RGB", (32, 32), (200, 30, 30)), "What is shown?"),
                                           Anchor(BLUE, PROMPT_B)])
        want = logits(pm, built)
        model2, _ = tiny_model("llava")
        again = PeftModel.from_pretrained(model2, str(tmp_path / storage))
        assert torch.equal(logits(again, built), want), storage
    assert sizes["float16"] * 2 == sizes["float32"]
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "float32", old)
    _edit_config(old, lambda cfg: (cfg.pop("delta_storage"), cfg.update(pack_format_version="1.2")))
    assert LDKEConfig.from_pretrained(str(old)).delta_storage == "float32"


def test_edit_metadata_lives_beside_the_adapter_and_old_packs_keep_theirs(tmp_path):
    """Per-edit prompts and targets are pack content, not hyperparameters: ``adapter_config.json`` holds none
    (format 1.4), ``ldke_edits.json`` holds them, and every loader reads them back. A format-1.3 pack with
    the edits inside its config (and no file) still loads with them. Saving is PEFT's own method: importing
    ldke-peft patches nothing."""
    from PIL import Image

    from ldke_peft import EditRequest, edit
    from ldke_peft.testing.tiny import tiny_model

    assert PeftModel.save_pretrained.__module__ == "peft.peft_model"
    model, proc = tiny_model("llava")
    req = EditRequest(image=Image.new("RGB", (32, 32), (200, 30, 30)), prompt="What is shown?", target="Lyon")
    pm = edit(model, proc, [req], LDKEConfig(localization="fixed", fixed_layers=[2], edit_steps=2), progress=False)
    want = pm.peft_config["default"].edits
    assert want and want[0]["prompt"] == "What is shown?" and want[0]["target"] == "Lyon"
    pm.save_pretrained(tmp_path / "pack")
    cfg = json.loads((tmp_path / "pack" / "adapter_config.json").read_text())
    assert "edits" not in cfg and cfg["pack_format_version"] == "1.9"
    assert json.loads((tmp_path / "pack" / "ldke_edits.json").read_text())["edits"] == json.loads(json.dumps(want))
    assert pm.peft_config["default"].edits is want  # saving leaves the live config as it was
    loaded = [LDKEConfig.from_pretrained(str(tmp_path / "pack")),
              PeftModel.from_pretrained(tiny_model("llava")[0], str(tmp_path / "pack")).peft_config["default"]]
    base = tiny_model("llava")[0]
    base.load_adapter(str(tmp_path / "pack"))
    loaded.append(base.peft_config["default"])
    for c in loaded:
        assert json.loads(json.dumps(c.edits)) == json.loads(json.dumps(want))
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "pack", old)
    (old / "ldke_edits.json").unlink()
    _edit_config(old, lambda c: c.update(edits=json.loads(json.dumps(want)), pack_format_version="1.3"))
    again = PeftModel.from_pretrained(tiny_model("llava")[0], str(old))
    assert again.peft_config["default"].edits[0]["target"] == "Lyon"
    again.save_pretrained(tmp_path / "resaved")  # an old-format config keeps its format's layout
    assert json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())["edits"][0]["target"] == "Lyon"
    assert not (tmp_path / "resaved" / "ldke_edits.json").exists()


def _saved_pack_without_anchors(tmp_path: Path) -> Path:
    """A one-edit pack of a tiny LLaVA, saved without textual anchors: its ``adapter_config.json``."""
    from PIL import Image

    from ldke_peft import EditRequest, edit
    from ldke_peft.testing.tiny import tiny_model

    model, proc = tiny_model("llava")
    req = EditRequest(image=Image.new("RGB", (32, 32), (200, 30, 30)), prompt="What is shown?", target="Lyon")
    pm = edit(model, proc, [req], LDKEConfig(localization="fixed", fixed_layers=[2], edit_steps=2,
                                             router_neighbour_questions=0), progress=False)
    pm.save_pretrained(tmp_path / "pack")
    return tmp_path / "pack" / "adapter_config.json"


def test_a_format_1_6_pack_grows_without_textual_anchors(tmp_path):
    """Format 1.7 added ``router_neighbour_questions`` (on by default): a 1.6 pack, written before the field
    existed, reloads with it off, so slots appended to it are fitted as the pack was made (no anchors)."""
    path = _saved_pack_without_anchors(tmp_path)
    cfg = json.loads(path.read_text())
    assert cfg["router_neighbour_questions"] == 0 and cfg["router_text_anchors"] == 0
    for k in ("router_neighbour_questions", "router_text_anchors"):
        del cfg[k]
    path.write_text(json.dumps({**cfg, "pack_format_version": "1.6"}))
    assert LDKEConfig.from_pretrained(str(tmp_path / "pack")).router_neighbour_questions == 0
    path.write_text(json.dumps({**cfg, "pack_format_version": "1.7"}))
    default = LDKEConfig().router_neighbour_questions
    assert default > 0 and LDKEConfig.from_pretrained(str(tmp_path / "pack")).router_neighbour_questions == default


def test_a_format_1_7_pack_grows_keeping_every_anchor(tmp_path):
    """Format 1.8 added ``router_anchor_clearance`` (on by default): a 1.7 pack reloads with it off, so slots
    appended to it keep their anchors as the pack's first slots did; a 1.8 pack keeps its own value."""
    path = _saved_pack_without_anchors(tmp_path)
    cfg = json.loads(path.read_text())
    default = LDKEConfig().router_anchor_clearance
    assert default > 0 and cfg["router_anchor_clearance"] == default
    path.write_text(json.dumps({**{k: v for k, v in cfg.items() if k != "router_anchor_clearance"},
                                "pack_format_version": "1.7"}))
    assert LDKEConfig.from_pretrained(str(tmp_path / "pack")).router_anchor_clearance == 0.0
    path.write_text(json.dumps({**cfg, "router_anchor_clearance": 0.5}))
    assert LDKEConfig.from_pretrained(str(tmp_path / "pack")).router_anchor_clearance == 0.5


def test_a_format_1_8_pack_grows_without_asked_words(tmp_path):
    """Format 1.9 added ``router_asked_word`` (on by default): a 1.8 pack reloads with it off, so its slots and
    slots appended to it are vetoed as the pack was made; a 1.9 pack keeps its own value."""
    path = _saved_pack_without_anchors(tmp_path)
    cfg = json.loads(path.read_text())
    assert LDKEConfig().router_asked_word is True and cfg["router_asked_word"] is True
    path.write_text(json.dumps({**{k: v for k, v in cfg.items() if k != "router_asked_word"},
                                "pack_format_version": "1.8"}))
    assert LDKEConfig.from_pretrained(str(tmp_path / "pack")).router_asked_word is False
    path.write_text(json.dumps({**cfg, "router_asked_word": False}))
    assert LDKEConfig.from_pretrained(str(tmp_path / "pack")).router_asked_word is False
