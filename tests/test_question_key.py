"""The router's textual key reads the question a user asked, in every family, and nothing else.

A pack routes on a sentence encoder's embedding of the question text it decodes from the prompt tokens
(``ldke_peft.tuner.question_key``). These tests pin what that text is (the prompt as the user wrote it, the
chat template's frame stripped, for image and text-only rows), that a missing encoder is a clear error
that leaves the model as it was, and that an edit's scope follows meaning across wordings.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import ldke_peft
from ldke_peft import EditRequest, LDKEConfig
from ldke_peft.editing.scope_fit import _prepare_text_key
from ldke_peft.families import family_of
from ldke_peft.tuner.question_key import (
    DEFAULT_TEXT_ENCODER,
    SENTINEL,
    TextEncoderNotFoundError,
    load_encoder,
    question_texts,
    resolve_encoder,
)
from ldke_peft.testing.tiny import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

RED = Image.new("RGB", (32, 32), (200, 30, 30))
QUESTIONS = ["Who designed the bridge in this photo?", "how many arches does it have", "Describe it, briefly."]


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl", "blip-2", "gemma3", "idefics2", "llava_onevision"])
def test_the_router_reads_back_the_question_the_user_asked(model_type):
    model, proc = tiny_model(model_type)
    fam = family_of(model)
    cfg = LDKEConfig()
    _prepare_text_key(cfg, fam, model, proc, EditRequest(image=RED, prompt="What is shown?", target="x"))
    assert cfg.router_text_dim == load_encoder(DEFAULT_TEXT_ENCODER).dim
    assert cfg.router_text_frame and SENTINEL not in "".join(cfg.router_text_frame)
    tok = fam.tokenizer(proc)
    for images in ([RED] * len(QUESTIONS), [None] * len(QUESTIONS)):
        built = fam.build_inputs(proc, images, QUESTIONS)
        text_mask = built.prompt_mask.bool() & ~fam.image_mask(model, built.input_ids)
        got = question_texts(tok, built.input_ids, text_mask, cfg.router_text_frame)
        # word-level tiny tokenizers may normalise case and spacing; the words are the user's
        norm = [" ".join(q.lower().replace(",", " ,").replace("?", " ?").replace(".", " .").split()) for q in QUESTIONS]
        assert [" ".join(g.lower().replace(",", " ,").replace("?", " ?").replace(".", " .").split()) for g in got] == norm


def test_a_missing_encoder_is_named_and_the_model_is_left_as_it_was():
    model, proc = tiny_model("llava")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    req = EditRequest(image=RED, prompt="Who designed the bridge in this photo?", target="Eiffel")
    with pytest.raises(TextEncoderNotFoundError, match="not available offline"):
        ldke_peft.edit(model, proc, [req], LDKEConfig(router_text_encoder="no-such-org/no-such-encoder"), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert hooks == sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    assert not ldke_peft.is_ldke_model(model)


def test_the_bundled_encoder_resolves_offline_and_its_memo_can_be_off():
    assert resolve_encoder(DEFAULT_TEXT_ENCODER).endswith("model")
    enc = load_encoder(DEFAULT_TEXT_ENCODER)
    a = enc.encode(["Which city is the capital?", "Which city is the capital?"])
    size = enc.memo_size
    try:
        enc.memo_size = 0
        b = enc.encode(["Which city is the capital?"])
        assert len(enc._memo) == 0  # lowering the size drops what was kept, even on a call it could answer
    finally:
        enc.memo_size = size
    assert torch.allclose(a[0], a[1]) and torch.allclose(a[0], b[0], atol=1e-6)
    assert torch.allclose(a.norm(dim=1), torch.ones(2), atol=1e-5)


def test_a_reloaded_pack_finds_the_tokenizer_beside_its_base_model(tmp_path):
    """A base model loaded from a folder that holds its tokenizer (a Hub snapshot, a saved model) needs no
    attach_tokenizer: the pack routes exactly as it did in the editing process."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    model, proc = tiny_model("llava")
    model.save_pretrained(tmp_path / "base")
    proc.save_pretrained(tmp_path / "base")
    req = EditRequest(image=RED, prompt="Who designed the bridge in this photo?", target="Eiffel")
    pm = ldke_peft.edit(model, proc, [req], LDKEConfig(edit_steps=5), progress=False)
    pm.save_pretrained(tmp_path / "pack")
    fam = family_of(model)
    built = fam.build_inputs(proc, [RED, RED], [req.prompt, "How many arches does it have?"])
    with torch.no_grad():
        want = pm(**built.inputs).logits
    routed = pm.base_model.last_routing("default").tolist()
    fresh = LlavaForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "pack")
    with torch.no_grad():
        got = loaded(**built.inputs).logits
    assert routed[0] == 0 and loaded.base_model.last_routing("default").tolist() == routed
    assert torch.equal(got, want)


class _Tripwire:
    """Unpickling this creates ``path``: proof that a pickle was loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_an_encoder_folder_with_pickled_weights_is_never_unpickled(tmp_path):
    """A pack's config names its encoder, and packs come from strangers: an encoder folder whose weights are a
    pickle is refused without running it."""
    from transformers import BertConfig

    from ldke_peft.tuner.question_key import SentenceEncoder

    folder = tmp_path / "enc"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
               vocab_size=30).save_pretrained(folder)
    wire = tmp_path / "unpickled"
    torch.save({"x": _Tripwire(str(wire))}, folder / "pytorch_model.bin")
    with pytest.raises(OSError):
        SentenceEncoder(str(folder))
    assert not wire.exists()
