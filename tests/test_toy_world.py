"""The toy world: a tiny real LLaVA trained on invented countries.

One fresh build per session (into pytest's tmp dir, so the test never trusts a stale cache), then
every other test uses it or its cached copy.
"""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import torch

from ldke_peft.families import family_of
from ldke_peft.requests import EditRequest, image_fingerprint
from ldke_peft.testing import _emblems
from ldke_peft.testing import toy_world_module as tw


@pytest.fixture(scope="session")
def cache_root():
    # the machine's toy-world cache (built at most once per machine and code version; the other test
    # files use the same world, so the suite trains it once)
    return tw.default_cache_root()


@pytest.fixture(scope="session")
def fresh(cache_root):
    t0 = time.perf_counter()
    world = tw.toy_world(seed=0, cache_dir=cache_root)
    world.spec.build_info["test_wall_seconds"] = time.perf_counter() - t0
    return world


def _pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


# ---------------------------------------------------------------------- no training needed


def test_spec_is_deterministic_and_names_are_unique():
    a, b = tw.make_spec(3, 40, 8), tw.make_spec(3, 40, 8)
    assert a.to_json() == b.to_json()
    assert tw.make_spec(4, 40, 8).entities != a.entities
    words = a.entities + list(a.hops["river"]) + list(a.hops["river"].values()) + list(a.hops["script"])
    assert len(words) == len(set(words)), "names must be unique across vocabularies"
    assert len(set(a.answers["capital"].values())) == 40  # capital is one-to-one
    # composed answers are the hop of the relation's answer
    for e in a.entities:
        assert a.answers["river_of_capital"][e] == a.hops["river"][a.answers["capital"][e]]
        assert a.answers["diet_of_animal"][e] == a.hops["diet"][a.answers["animal"][e]]


def test_emblems_distinct_at_scale_and_lookalikes_differ_in_one_region():
    spec = tw.make_spec(0, 1000, 4)
    assert len(set(spec.designs)) == 1000
    fps = {image_fingerprint(tw._render(spec, i, 0)) for i in range(1000)}
    assert len(fps) == 1000
    assert len(spec.lookalikes) == 500
    idx = {e: i for i, e in enumerate(spec.entities)}
    for a, b in spec.lookalikes[:50]:
        da, db = spec.designs[idx[a]], spec.designs[idx[b]]
        assert da.layout == db.layout
        assert sum(x != y for x, y in zip(da.colours, db.colours)) == 1


def test_eval_template_words_are_trained():
    """A held-out wording must be new, not unreadable: all its words occur in training texts."""
    train_words = {w for tr, _ in tw.IMAGE_TEMPLATES.values() for t in tr for w in t.replace("?", " ").replace(".", " ").split()}
    train_words |= {w for tr, _ in tw.TEXT_TEMPLATES.values() for t in tr for w in t.replace("?", " ").replace(".", " ").split()}
    for rel, (_, ev) in list(tw.IMAGE_TEMPLATES.items()) + list(tw.TEXT_TEMPLATES.items()):
        for t in ev:
            missing = {w for w in t.replace("?", " ").replace(".", " ").split() if w not in train_words and w != "{x}"}
            assert not missing, (rel, t, missing)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_entities"):
        tw.toy_world(0, n_entities=1, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="code version"):
        d = tmp_path / "w"
        d.mkdir()
        (d / "world.json").write_text(json.dumps({**tw.make_spec(0, 4, 2).to_json(), "code_version": -1}))
        tw.load_world(d)


def test_documented_import_gives_the_function():
    from ldke_peft.testing import toy_world, toy_world_module

    assert callable(toy_world) and toy_world is tw.toy_world
    assert toy_world_module is tw and tw.__name__ == "ldke_peft.testing.toy_world"
    from ldke_peft.testing.toy_world import cache_key  # the dotted module path keeps working

    assert cache_key is tw.cache_key


def test_build_does_not_depend_on_the_thread_count():
    """The same weights whatever the caller's thread count (the smallest world, a few steps: a build
    left on the caller's threads already differs here), and the caller's setting is restored."""
    before = torch.get_num_threads()
    states = {}
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            world = tw.build_world(0, 2, evaluate=False, steps=3)
            assert torch.get_num_threads() == threads, "the caller's thread count must be restored"
            assert world.spec.build_info["torch_threads"] == 1
            states[threads] = world.model.state_dict()
    finally:
        torch.set_num_threads(before)
    assert states[2].keys() == states[1].keys()
    different = [k for k in states[1] if not torch.equal(states[2][k], states[1][k])]
    assert not different, f"weights differ between 2 and 1 caller threads: {different[:5]}"


def test_one_thread_restores_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        with tw.one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="steps"):
        tw.build_world(0, 2, evaluate=False, steps=0)


def test_compose_holdout_leaves_those_entities_compositions_untrained():
    """``compose_holdout`` (the composition study, issue #23) drops exactly the held-out entities' composed
    questions from training, nothing else; a share outside [0, 1) is refused before anything is built."""
    from ldke_peft.families import get_family
    from ldke_peft.testing.toy_world.build import _build_processor, _heldout_compositions, _tokenise_rows
    from ldke_peft.testing.toy_world.spec import IMAGE_TEMPLATES, RELATED, make_spec
    from ldke_peft.testing.toy_world.world import _render

    spec = make_spec(0, 4, 2)
    held = _heldout_compositions(spec, 0.5, seed=0)
    assert len(held) == 2 and set(held) <= set(spec.entities)
    assert held == _heldout_compositions(make_spec(0, 4, 2), 0.5, seed=0)  # a fixed draw per seed
    composed = [info["composed"] for info in RELATED.values()]
    processor, family = _build_processor(spec), get_family("llava")
    render0 = [_render(spec, i, 0) for i in range(4)]
    full_img, full_txt = _tokenise_rows(family, processor, spec, render0)
    img, txt = _tokenise_rows(family, processor, spec, render0, frozenset((e, r) for e in held for r in composed))
    per_entity_composed = sum(len(IMAGE_TEMPLATES[r][0]) for r in composed)
    for i, e in enumerate(spec.entities):
        dropped = int((full_img.entity == i).sum() - (img.entity == i).sum())
        assert dropped == (per_entity_composed if e in held else 0), e
    assert torch.equal(full_txt.input_ids, txt.input_ids)  # the text facts (both hops' second) all stay
    with pytest.raises(ValueError, match="compose_holdout"):
        tw.build_world(0, 4, evaluate=False, steps=1, compose_holdout=1.0)


# ---------------------------------------------------------------------- the trained world


@pytest.mark.slow
def test_build_meets_accuracy_bar(fresh):
    info = fresh.spec.build_info
    acc = info["accuracy"]
    assert type(fresh.model).__name__ == "LlavaForConditionalGeneration"
    assert not fresh.model.training
    assert fresh.family.num_layers(fresh.model) >= 6
    assert acc["n_image_facts"] >= 24 and acc["image/train_templates"] >= 0.95, acc
    assert acc["image_facts_correct"] >= 0.95 * acc["n_image_facts"], acc
    assert acc["n_text_facts"] >= 8 and acc["text/train_templates"] >= 0.95, acc
    assert acc["composed/train_templates"] >= 0.95, acc
    assert acc["country/train_templates"] >= 0.95, acc
    # held-out wordings are a real generalisation probe: most, not necessarily all, are right
    assert acc["image/eval_templates"] >= 0.8, acc
    print("\ntoy world build:", json.dumps({k: v for k, v in info.items() if k != "recipe"}, indent=1))


def test_cache_hit_is_fast_and_identical(fresh, cache_root):
    key_dir = cache_root / tw.cache_key(0, tw.DEFAULT_N_ENTITIES)
    assert (key_dir / "model" / "model.safetensors").is_file()
    assert (key_dir / "world.json").is_file()
    assert not [p for p in cache_root.iterdir() if ".tmp-" in p.name], "temp dirs must be renamed or removed"
    t0 = time.perf_counter()
    loaded = tw.toy_world(seed=0, cache_dir=cache_root)
    assert time.perf_counter() - t0 < 5.0
    assert loaded.spec.to_json()["answers"] == fresh.spec.to_json()["answers"]
    fam = family_of(loaded.model)
    e = loaded.entities[0]
    built = fam.build_inputs(loaded.processor, [loaded.render(e, 3), None], ["What is the capital of the country shown?", loaded.text_prompt("river", loaded.facts[(e, "capital")])])
    with torch.no_grad():
        a = fresh.model(**built.inputs).logits
        b = loaded.model(**built.inputs).logits
    assert torch.equal(a, b)


def test_training_inputs_match_library_inputs(fresh):
    """The training pixel pool and token rows are what ``build_inputs`` makes at inference."""
    fam = fresh.family
    e = 5
    view = 7
    built = fam.build_inputs(fresh.processor, [fresh.render(e, view)], ["Which country is shown?"], [fresh.entities[e] + tw.EOS])
    pool = fresh.processor.image_processor(images=[tw._render(fresh.spec, e, view)], return_tensors="pt")["pixel_values"]
    assert torch.equal(built.inputs["pixel_values"], pool)
    ids = built.input_ids[0]
    assert int((ids == fam.image_token_id(fresh.model)).sum()) == (tw.IMAGE_SIZE // tw.PATCH_SIZE) ** 2
    assert fresh.processor.tokenizer.unk_token_id not in ids.tolist()
    assert fresh.processor.tokenizer.decode(ids[built.target_mask[0]], skip_special_tokens=True).strip() == fresh.entities[e]


def test_views_differ_but_are_recognised(fresh):
    ents = fresh.entities
    views = fresh.heldout_views(2, offset=50)
    for e in ents[:4]:
        base = _pixels(fresh.render(e, 0))
        for v in [1, *views]:
            other = _pixels(fresh.render(e, v))
            assert np.abs(base - other).mean() > 3.0, "views must differ pixel-wise"
        assert np.array_equal(_pixels(fresh.render(e, views[0])), _pixels(fresh.render(e, views[0])))  # deterministic
    images = [fresh.render(e, v) for e in ents for v in views]
    prompts = ["Which country is shown?"] * len(images)
    answers = fresh.ask_many(images, prompts)
    expected = [e for e in ents for _ in views]
    acc = np.mean([a == b for a, b in zip(answers, expected)])
    assert acc >= 0.95, list(zip(answers, expected))
    e = ents[1]
    assert fresh.ask(fresh.render(e, views[1]), fresh.templates["capital"]["train"][1]) == fresh.facts[(e, "capital")]
    assert fresh.ask(None, fresh.text_prompt("capital_of", e)) == fresh.facts[(e, "capital")]


def test_lookalikes_differ_only_slightly(fresh):
    others = []
    pair_diff = []
    for a, b in fresh.lookalikes:
        pa, pb = _pixels(fresh.render(a, 0)), _pixels(fresh.render(b, 0))
        changed = (np.abs(pa - pb).max(-1) > 30).mean()
        assert 0.03 < changed < 0.6, (a, b, changed)
        pair_diff.append(np.abs(pa - pb).mean())
        c = random.Random(a).choice([x for x in fresh.entities if x not in (a, b)])
        others.append(np.abs(pa - _pixels(fresh.render(c, 0))).mean())
    assert np.median(pair_diff) < np.median(others)


def test_edit_requests_are_complete_and_correct(fresh):
    reqs = fresh.edit_requests(8, seed=1)
    assert len(reqs) == 8 and all(isinstance(r, EditRequest) for r in reqs)
    assert len({r.subject for r in reqs}) == 8, "different entities where possible"
    edited = {(r.subject, r.relation) for r in reqs}
    probes: list[tuple[object, str, str]] = []
    for r in reqs:
        r.validate(fresh.processor.tokenizer)
        assert r.relation in fresh.relations
        cur = fresh.facts[(r.subject, r.relation)]
        assert r.ground_truth == cur and r.target != cur
        assert r.target in fresh.answer_vocab(r.relation)
        assert fresh.ask(r.image, r.prompt) == cur, "edits are of facts the model answers correctly"
        assert len(r.rephrase_prompts) >= 2 and r.prompt not in r.rephrase_prompts
        assert set(r.rephrase_prompts) <= set(fresh.question_bank(r.relation))
        assert any(p in fresh.templates[r.relation]["eval"] for p in r.rephrase_prompts)
        assert len(r.rephrase_images) >= 2
        fp = image_fingerprint(r.image)
        assert all(image_fingerprint(im) != fp for im in r.rephrase_images)
        assert r.locality and all(p.image is None for p in r.locality)
        assert r.m_locality and all(p.image is not None for p in r.m_locality)
        kinds = {p.kind for p in r.coupled}
        assert kinds == {"same_image_other_question", "lookalike_same_question"}
        for p in r.coupled:
            if p.kind == "same_image_other_question":
                assert image_fingerprint(p.image) == fp and p.prompt != r.prompt
            else:
                partner = fresh.lookalike_of(r.subject)
                # the edit question, and the relation's held-out wording, on the look-alike's image
                assert p.prompt in (r.prompt, *fresh.templates[r.relation]["eval"])
                assert image_fingerprint(p.image) == image_fingerprint(fresh.render(partner, 0))
                assert (partner, r.relation) not in edited
                diff = np.abs(_pixels(p.image) - _pixels(r.image))
                assert 0.03 < (diff.max(-1) > 30).mean() < 0.6
        info = fresh.related[r.relation]
        assert len(r.portability) == 1
        assert r.portability[0].answer == info["map"][r.target] != info["map"][cur]
        assert r.portability[0].prompt in fresh.question_bank(info["composed"])
        for p in r.locality + r.m_locality + r.coupled:
            probes.append((p.image, p.prompt, p.answer))
    # every locality / coupled answer is the model's current answer
    current = fresh.ask_many([p[0] for p in probes], [p[1] for p in probes])
    assert current == [p[2] for p in probes]
    # the pool: one wording per dev relation and "country", a training view of every non-test entity,
    # none of them a probe (tests/test_leakage.py checks every row an edit fits on)
    pool = fresh.negative_pool()
    dev_entities = [e for e in fresh.entities if fresh.entity_split(e) != "test"]
    assert [e for _, e in pool.images] == dev_entities and 0 < len(dev_entities) < len(fresh.entities)
    assert len(pool.questions) == len(fresh.split_relations("dev")) + 1
    probe_images = {image_fingerprint(p.image) for r in reqs for p in (*r.m_locality, *r.coupled) if p.image is not None}
    assert not probe_images & {image_fingerprint(im) for im, _ in pool.images}


def test_many_edit_requests_relax_gracefully(fresh):
    reqs = fresh.edit_requests(40, seed=2)
    assert len(reqs) == 40
    assert len({(r.subject, r.relation) for r in reqs}) == 40
    assert all(r.coupled and r.portability and r.locality and r.m_locality for r in reqs)
    with pytest.raises(ValueError, match="edit requests"):
        fresh.edit_requests(10_000)


def test_emblem_render_rejects_wrong_colour_count():
    with pytest.raises(ValueError, match="needs 3 colours"):
        _emblems.render(_emblems.Design("h3", ("red", "white")), 32, _emblems.ViewParams())
