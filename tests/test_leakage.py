"""The held-out protocol: nothing an editor fits on is something the benchmark later asks.

The editor's rows come from :func:`ldke_peft.editing.scope_fit.editor_rows`, built by the same functions the delta
and router fits call, for exactly what ``ldke bench`` hands LDKE (``editor_view`` of each request and the
suite's negative pool). Every request of the toy, smoke and full suites (both splits) is checked:

* a probe's *wording* (rephrases, same-image coupled and near-miss questions, a look-alike's held-out
  wording, locality questions) must not be among the editor's wordings, compared after casefolding and
  punctuation removal; the editor's wordings include its own rewrites (the router's paraphrased
  positives and negatives, :func:`ldke_peft.editing.augment.paraphrases`), so a probe the editor would have
  written itself and trained on is caught too;
* a probe's *image* (other views, look-alike and other entities' images) must not be among the
  editor's images, compared by fingerprint.

And the library itself knows no benchmark: no relation name, benchmark wording or entity name appears
in ``ldke_peft/`` outside ``bench/`` and ``testing/``.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import pytest

import ldke_peft
from ldke_peft.editing.augment import generic_question_bank, paraphrases
from ldke_peft.bench.countries import COUNTRIES, NEAR_MISS, RELATIONS, WORDINGS
from ldke_peft.bench.mke import build_mke_requests, editor_view, negative_pool, split_facts
from ldke_peft.tuner.config import LDKEConfig
from ldke_peft.editing.scope_fit import editor_rows
from ldke_peft.requests import image_fingerprint
from ldke_peft.testing import toy_world_module as tw

META = Path(__file__).parent / "data" / "smol_llava_meta.json"
LIBRARY = Path(ldke_peft.__file__).parent


def _norm(q: str) -> str:
    q = q.casefold().translate(str.maketrans("", "", string.punctuation))
    return " ".join(q.split())


def _editor_sees(r, pool) -> tuple[set[str], set[str]]:
    """(normalised wordings, image fingerprints) of every row the edit of ``r`` fits on."""
    words, images = set(), set()
    for im, q in editor_rows([editor_view(r)], LDKEConfig(), pool):
        words.add(_norm(q))
        if im is not None:
            images.add(image_fingerprint(im))
    return words, images


def _leaks(requests, pool) -> list[str]:
    """Each request's probes against its own edit's rows (single-edit protocol; a sequential pack also
    holds other edits, whose own images are other requests' locality probes by design)."""
    out = []
    for r in requests:
        words, images = _editor_sees(r, pool)
        edit_img = image_fingerprint(r.image) if r.image is not None else None
        asked = [(p, None) for p in r.rephrase_prompts] + [(r.prompt, im) for im in r.rephrase_images]
        asked += [(p.prompt, p.image) for p in (*r.coupled, *r.locality, *r.portability)]
        asked += [(None, p.image) for p in r.m_locality]  # a generic question on another entity: its image is the probe
        for prompt, image in asked:
            if prompt is not None and prompt != r.prompt and _norm(prompt) in words:
                out.append(f"{r.subject}/{r.relation}: wording {prompt!r}")
            fp = image_fingerprint(image) if image is not None else None
            if fp is not None and fp != edit_img and fp in images:
                out.append(f"{r.subject}/{r.relation}: image {fp}")
    return out


# ---------------------------------------------------------------------- the suites


@pytest.mark.parametrize("split", ["dev", "test"])
def test_toy_suite_probes_are_never_editor_rows(world, split):
    reqs = world.edit_requests(12, seed=1, split=split)
    assert reqs and all(world.entity_split(r.subject) == split for r in reqs)
    assert _leaks(reqs, world.negative_pool()) == []


def test_toy_dev_split_never_touches_the_heldout_relation(world):
    reqs = world.edit_requests(12, seed=1, split="dev")
    asked = {q for r in reqs for q in (r.prompt, *r.rephrase_prompts, *(p.prompt for p in r.coupled))}
    held = set(world.question_bank(tw.HELDOUT_RELATION))
    assert not asked & held
    assert not {q for q, _ in world.negative_pool().questions} & held
    assert {world.entity_split(e) for e in world.entities} == {"dev", "test"}


@pytest.fixture(scope="module")
def meta():
    return json.loads(META.read_text())


@pytest.mark.parametrize("split", ["dev", "test"])
def test_mllm_suites_probes_are_never_editor_rows(meta, split):
    """Every usable fact of the split (the full suite; smoke is its first 10)."""
    reqs = build_mke_requests(meta, None, split=split)
    assert len(reqs) == len(split_facts(meta, split))
    assert _leaks(reqs, negative_pool(meta)) == []


def test_mllm_splits_are_disjoint_and_test_has_the_heldout_relation(meta):
    dev = build_mke_requests(meta, None, split="dev")
    test = build_mke_requests(meta, None, split="test")
    assert not {r.subject for r in dev} & {r.subject for r in test}
    assert {r.relation for r in dev} == set(RELATIONS) - {"currency"}
    assert {r.relation for r in test} == set(RELATIONS)
    for r in test:
        assert len(r.rephrase_prompts) >= 8
        assert any(p.kind.startswith("near_miss") for p in r.coupled)
    pool_entities = {e for _, e in negative_pool(meta).images}
    assert not pool_entities & {r.subject for r in test}


# ---------------------------------------------------------------------- the library


def _benchmark_wordings() -> set[str]:
    out = {r.image_question for r in RELATIONS.values()}
    out |= {q for d in WORDINGS.values() for qs in d.values() for q in qs}
    out |= {q for d in NEAR_MISS.values() for qs in d.values() for q in qs}
    out |= {q for tr, ev in tw.IMAGE_TEMPLATES.values() for q in (*tr, *ev)}
    return {_norm(q) for q in out}


def test_the_generic_question_bank_names_no_benchmark_relation_or_wording():
    bench = _benchmark_wordings()
    relations = set(RELATIONS) | set(tw.IMAGE_TEMPLATES)
    for q, rel in generic_question_bank():
        assert rel not in relations, (q, rel)
        assert _norm(q) not in bench and not {_norm(p) for p in paraphrases(q, 64)} & bench, q


def test_no_benchmark_words_in_the_library():
    """Relation names, entity names and benchmark wordings appear only in bench/ and testing/."""
    words = ["capital", "capitals", "currency", "currencies", "continent", "continents", "country", "countries"]
    patterns = [re.compile(rf"\b{w}\b", re.IGNORECASE) for w in words]
    patterns += [re.compile(rf"\b{re.escape(c.name)}\b") for c in COUNTRIES]
    bench = _benchmark_wordings()
    hits = []
    for path in sorted(LIBRARY.rglob("*.py")):
        rel = path.relative_to(LIBRARY).as_posix()
        if rel.startswith(("bench/", "testing/")):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            hits += [f"{rel}:{n}: {m.group(0)}" for pat in patterns for m in pat.finditer(line)]
            hits += [f"{rel}:{n}: {q}" for q in re.findall(r'"([^"]{12,})"', line) if _norm(q) in bench]
    assert hits == []
