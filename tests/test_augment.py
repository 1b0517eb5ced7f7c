"""Automatic positives: rule-based question paraphrases (the router's textual scope)."""

from __future__ import annotations

import pytest

from ldke_peft.editing.augment import paraphrases
from ldke_peft.editing.augment import content_words


@pytest.mark.parametrize(
    "question",
    [
        "What is the main language of this country?",
        "Which continent is this country in?",
        "Name the national animal of the country in the picture.",
        "What color is the car?",
        "How many people are in the photo?",
        "Describe the image in one word.",
    ],
)
def test_paraphrases_keep_what_is_asked(question):
    out = paraphrases(question, 8)
    assert out == paraphrases(question, 8), "paraphrases must be deterministic"
    assert 1 <= len(out) <= 8 and len(set(o.casefold() for o in out)) == len(out)
    assert all(o.strip().casefold() != question.casefold() for o in out), "the question itself is not a paraphrase"
    core = content_words(question) - {"main"}  # hedges ("main") may be dropped, nothing else
    for o in out:
        assert core <= content_words(o), f"{o!r} lost content words of {question!r}"
        assert o[:1].isupper()


def test_paraphrases_vary_the_form():
    out = paraphrases("What is the capital of this country?", 8)
    assert any(o.startswith("Name the capital") for o in out)  # imperative
    assert any("the country shown" in o or "in the picture" in o for o in out)  # deixis
    assert any(o.startswith("Which") for o in out)  # wh-word
    assert paraphrases("What is the capital of this country?", 3) == out[:3]
    assert paraphrases("   ") == []
