"""Neighbouring questions the edited model proposes (:mod:`ldke_peft.editing.neighbours`), on the toy world."""

from __future__ import annotations

import copy

import pytest

import ldke_peft
from ldke_peft.bench.mke import editor_view
from ldke_peft.editing.neighbours import frame_words, neighbour_questions
from ldke_peft.tuner.question_key import DEFAULT_TEXT_ENCODER, load_encoder

pytestmark = pytest.mark.slow


def test_frame_words_are_those_most_questions_share():
    qs = ["What is the capital of this land?", "Which sea is near this land?", "What is spoken in this land?"]
    assert frame_words(qs) == {"what", "is", "this", "land"}
    assert frame_words(qs[:1]) == set(), "one question has no frame to tell"


def test_neighbours_swap_one_word_for_another_and_never_return_the_question(world, world_pool):
    r = editor_view(world.edit_requests(1, seed=5)[0])
    pm = ldke_peft.edit(world.model, world.processor, [r], negatives=world_pool, progress=False)
    try:
        encode = load_encoder(DEFAULT_TEXT_ENCODER).encode
        frame = frame_words([q for q, _ in world_pool.questions])
        got = neighbour_questions(pm, world.processor, r.prompt, n=5, encode=encode, frame=frame)
        # a tokenizer without a pad token is padded on a copy: the caller's is left as it was
        proc = copy.deepcopy(world.processor)
        tok = world.family.tokenizer(proc)
        tok.pad_token = None
        side = tok.padding_side
        assert neighbour_questions(pm, proc, r.prompt + " ", n=5, encode=encode, frame=frame)  # (another memo key)
        assert tok.pad_token is None and tok.padding_side == side
        words = r.prompt.split()
        assert 0 < len(got) <= 5 and len(set(got)) == len(got)
        for q in got:
            diff = [i for i, (a, b) in enumerate(zip(words, q.split())) if a != b]
            assert len(q.split()) == len(words) and len(diff) == 1, q
            assert words[diff[0]].strip("?").casefold() not in frame, "frame words are never the swapped word"
        again = neighbour_questions(pm, world.processor, r.prompt, n=5, encode=encode, frame=frame, exclude=got[:2])
        assert not set(again) & set(got[:2]), "excluded questions are never proposed"
        assert neighbour_questions(pm, world.processor, r.prompt, n=0, encode=encode, frame=frame) == []
    finally:
        pm.unload()


def test_the_asked_for_word_is_one_word_form_the_same_in_every_process():
    """``asked_word`` gives the asked-for token's longest word form, the first of equal ones ("time-zone" ->
    "time"), so a pack records the same word whatever the process's hash seed; a first word or a short one gives
    none (no neighbour is proposed for it)."""
    import os
    import subprocess
    import sys

    script = ("import torch\nfrom ldke_peft.editing.neighbours import asked_word\n"
              "def enc(rows):\n    return torch.tensor([[1.0, 0.0] if 'time-zone' in r else [0.0, 1.0] for r in rows])\n"
              "print(asked_word('Which time-zone is this city in?', set(), enc))\n"
              "print(repr(asked_word('Time-zone of this city?', set(), enc)))\n")
    outs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3, 6)}
    assert outs == {"time\n''\n"}
