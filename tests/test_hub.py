"""Hub sharing without network: model card, load by repo id from a Hugging Face cache, push to a local Hub.

The upload path runs against :class:`ldke_peft.testing.fake_hub.FakeHub`, an HTTP server on
127.0.0.1 that implements the endpoints huggingface_hub calls (create repo, validate YAML,
preupload, commit, repo info/tree, resolve). Pushing to huggingface.co itself is not tested here.
"""

from __future__ import annotations

import copy
import json
import os

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

import ldke_peft
from ldke_peft import EditRequest, Probe
from ldke_peft.tuner.context import prompt_mask_context
from ldke_peft.errors import AdapterLoadError, FingerprintMismatchError, LDKEError, UnsafeAdapterError
from ldke_peft.hub import CARD_TAGS, PACK_FILES, load_edits, model_card, push_edits, save_edits
from ldke_peft.tuner.model import is_ldke_model
from ldke_peft.testing.fake_hub import FakeHub, populate_hf_cache
from ldke_peft.testing.tiny import tiny_model
from peft import PeftModel
from peft.utils import get_peft_model_state_dict

RED = Image.new("RGB", (40, 40), (255, 0, 0))
BLUE = Image.new("RGB", (40, 40), (0, 0, 255))
PROMPT = "What is the capital of the country shown?"


def _request() -> EditRequest:
    return EditRequest(
        image=RED, prompt=PROMPT, target="Paris", ground_truth="London",
        rephrase_prompts=["Which city is the capital of this country?"],
        m_locality=[Probe(PROMPT, "Berlin", image=BLUE)],
        subject="Redland", relation="capital",
    )


def _logits(model, processor) -> torch.Tensor:
    family = ldke_peft.family_of(model)
    built = family.build_inputs(processor, [RED, BLUE, None], [PROMPT, PROMPT, "Describe the image."], ["Paris"] * 3)
    with torch.no_grad(), prompt_mask_context(model, built.prompt_mask):
        return model(**built.inputs).logits


@pytest.fixture(scope="module")
def edited():
    model, processor = tiny_model("llava")
    pm = ldke_peft.edit(model, processor, [_request()], progress=False)
    return pm, processor, _logits(pm, processor)


@pytest.fixture(scope="module")
def pack_dir(edited, tmp_path_factory):
    pm, _, _ = edited
    return save_edits(pm, tmp_path_factory.mktemp("pack") / "pack", repo_id="org/pack")


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def offline_cache(monkeypatch, tmp_path, pack_dir):
    """A Hugging Face cache holding org/pack, as huggingface_hub lays it out, with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hf-cache"
    populate_hf_cache(pack_dir, "org/pack", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads its environment at import: patch the constants it consults at call time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _hooks(model) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}


# ---------------------------------------------------------------------- model card


def test_save_edits_writes_safetensors_pack_and_card_only(pack_dir):
    assert sorted(os.listdir(pack_dir)) == sorted(PACK_FILES)
    tensors = load_file(os.path.join(pack_dir, "adapter_model.safetensors"))
    assert any("ldke_A" in k for k in tensors) and any("ldke_router" in k for k in tensors)


def test_model_card_parses_and_lists_the_edit(edited, pack_dir):
    pm, _, _ = edited
    card = ModelCard.load(os.path.join(pack_dir, "README.md"))
    assert card.data.library_name == "peft"
    assert set(CARD_TAGS) <= set(card.data.tags)
    assert card.data.base_model is None  # the tiny model has no Hub id: never write a path as base_model
    edit = pm.peft_config["default"].edits[0]
    row = next(line for line in card.text.splitlines() if line.startswith("| 0 |"))
    for value in (PROMPT, "**Paris**", "London", "Redland", "capital", edit["image_sha"], ", ".join(map(str, edit["layers"]))):
        assert value in row, (value, row)
    assert "pip install ldke-peft" in card.text
    assert "import ldke_peft  # registers the LDKE PEFT type" in card.text
    assert 'PeftModel.from_pretrained(base, "org/pack")' in card.text
    assert "model_type=llava" in card.text and "FingerprintMismatchError" in card.text
    # edit-time reports come from pm.ldke_reports
    assert "## Edit reports" in card.text


def test_model_card_base_model_metrics_and_escaping(edited):
    pm, _, _ = edited
    config = copy.deepcopy(pm.peft_config["default"])
    config.edits[0]["prompt"] = "a | b\nc"
    metrics = {"reliability": 1.0, "t_generality": 0.5, "m_generality": None, "n": 1}
    card = model_card(config, "org/pack", base_model="llava-hf/llava-1.5-7b-hf", metrics=metrics)
    parsed = ModelCard(str(card))
    assert parsed.data.base_model == "llava-hf/llava-1.5-7b-hf"
    assert "| reliability | 1.000 |" in card.text and "| t_generality | 0.500 |" in card.text
    assert "| m_generality | n/a |" in card.text
    assert "| a \\| b c |" in card.text
    assert 'AutoModelForImageTextToText.from_pretrained("llava-hf/llava-1.5-7b-hf")' in card.text


def test_model_card_refuses_non_ldke_models():
    model, _ = tiny_model("llava")
    with pytest.raises(LDKEError, match="no adapter"):
        model_card(model)


# ---------------------------------------------------------------------- load by repo id, offline


def test_peft_from_pretrained_by_repo_id_from_hf_cache(edited, offline_cache):
    _, processor, reference = edited
    storage = offline_cache / "models--org--pack"
    commit = (storage / "refs" / "main").read_text()
    assert (storage / "snapshots" / commit / "adapter_model.safetensors").is_symlink()
    base, _ = tiny_model("llava")
    loaded = PeftModel.from_pretrained(base, "org/pack")  # repo id, resolved through the cache only
    assert torch.equal(_logits(loaded, processor), reference)


def test_load_edits_by_repo_id_offline(edited, offline_cache):
    _, processor, reference = edited
    base, _ = tiny_model("llava")
    loaded = load_edits(base, "org/pack")
    assert isinstance(loaded, PeftModel)
    assert torch.equal(_logits(loaded, processor), reference)


def test_load_edits_offline_cache_miss_is_a_clear_error(offline_cache):
    base, processor = tiny_model("llava")
    before = _logits(base, processor)
    with pytest.raises(AdapterLoadError, match="org/missing.*offline"):
        load_edits(base, "org/missing")
    assert not is_ldke_model(base)
    assert torch.equal(_logits(base, processor), before)


def test_fingerprint_mismatch_leaves_base_unmodified(offline_cache):
    other, processor = tiny_model("llava", seed=1)  # same architecture, different weights
    state = {k: v.clone() for k, v in other.state_dict().items()}
    before = _logits(other, processor)
    hooks = _hooks(other)
    with pytest.raises(FingerprintMismatchError, match="different base model"):
        load_edits(other, "org/pack")
    assert not hasattr(other, "peft_config")
    assert not is_ldke_model(other)
    assert _hooks(other) == hooks  # no routing hooks left behind
    after = other.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert torch.equal(_logits(other, processor), before)


def test_load_edits_rejects_garbage_source(tmp_path):
    base, _ = tiny_model("llava")
    with pytest.raises(AdapterLoadError, match="neither a local pack folder nor a Hub repo id"):
        load_edits(base, str(tmp_path / "no" / "such" / "pack"))


# ---------------------------------------------------------------------- push to a local Hub


def test_push_records_files_message_and_card(edited, online):
    pm, _, _ = edited
    metrics = {"reliability": 1.0, "coupled_locality": 0.75, "n": 1}
    with FakeHub() as hub:
        url = push_edits(pm, "org/pack", endpoint=hub.endpoint, token="hf_test_token",
                         commit_message="Add the Redland capital edit", metrics=metrics)
        commits = hub.commits("org/pack")
        paths = [p for _, p in hub.requests]
        # a second push to the same repo: create_repo(exist_ok=True) must not fail, default message
        push_edits(pm, "org/pack", endpoint=hub.endpoint, token="hf_test_token")
        second = hub.commits("org/pack")[-1]
    assert len(commits) == 1
    commit = commits[0]
    assert url.endswith("/org/pack/commit/" + commit.oid)
    assert commit.summary == "Add the Redland capital edit"
    assert sorted(commit.files) == sorted(PACK_FILES)
    assert commit.headers.get("authorization") == "Bearer hf_test_token"
    for endpoint in ("/api/repos/create", "/api/validate-yaml", "/api/models/org/pack/preupload/main",
                     "/api/models/org/pack/commit/main"):
        assert endpoint in paths
    card = ModelCard(commit.files["README.md"].decode())
    assert card.data.library_name == "peft" and set(CARD_TAGS) <= set(card.data.tags)
    # the tiny model was never saved: no local path is published as the base model
    assert json.loads(commit.files["adapter_config.json"])["base_model_name_or_path"] is None
    assert "| coupled_locality | 0.750 |" in card.text
    uploaded = load_safetensors(commit.files["adapter_model.safetensors"])
    own = get_peft_model_state_dict(pm)  # exactly what save_pretrained writes
    assert uploaded.keys() == own.keys() and len(own) > 0
    assert all(torch.equal(uploaded[k], own[k]) for k in own)
    assert second.summary == "Upload LDKE edit pack (1 edit)"


def test_push_then_load_by_repo_id_over_http_and_then_offline(edited, online, tmp_path):
    pm, processor, reference = edited
    cache = tmp_path / "cache"
    with FakeHub() as hub:
        push_edits(pm, "org/roundtrip", endpoint=hub.endpoint, token="t")
        base, _ = tiny_model("llava")
        loaded = load_edits(base, "org/roundtrip", endpoint=hub.endpoint, token="t", cache_dir=cache)
        assert torch.equal(_logits(loaded, processor), reference)
    # the server is gone: the cache alone serves the pack
    base, _ = tiny_model("llava")
    again = load_edits(base, "org/roundtrip", cache_dir=cache, local_files_only=True)
    assert torch.equal(_logits(again, processor), reference)


def test_load_refuses_repo_with_pickle_weights(pack_dir, online, tmp_path):
    with FakeHub() as hub:
        api = HfApi(endpoint=hub.endpoint, token="t")
        api.create_repo("org/pickled")
        api.upload_folder(repo_id="org/pickled", folder_path=pack_dir)
        api.upload_file(path_or_fileobj=b"not really a pickle", path_in_repo="adapter_model.bin", repo_id="org/pickled")
        base, _ = tiny_model("llava")
        with pytest.raises(UnsafeAdapterError, match="pickle"):
            load_edits(base, "org/pickled", endpoint=hub.endpoint, cache_dir=tmp_path / "c")
        assert not is_ldke_model(base)


def test_push_rejects_bad_repo_id(edited):
    pm, _, _ = edited
    with pytest.raises(LDKEError, match="invalid Hub repo id"):
        push_edits(pm, "not a repo id", endpoint="http://127.0.0.1:9")
