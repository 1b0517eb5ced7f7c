"""Neighbouring questions the edited model proposes for an edit question: its asked-for word swapped.

A sentence-embedding key puts a question about a *neighbouring* fact of the same image (who painted it,
next to when it was painted) about as close to the edit question as a reworded question with the same meaning, so
a radius cannot tell them apart, and the caller's negatives rarely name every neighbouring fact. The
question itself says where its neighbours are: swap the word it asks about for other words the model
finds likely in that place and the result asks for another fact in the same frame. These questions are
textual anchors of the router's nearest-anchor veto (:mod:`ldke_peft.editing.anchor_fit`), never
negatives of the radius: a radius fitted on them shrinks until the edit's own rewordings fall out.

Owns: :func:`neighbour_questions`, :func:`asked_word`, :func:`frame_words`. Knows no relation, domain or wording.

Layer: editing (README "Architecture"): imports data, tuner and editing modules, never the product code.
"""

from __future__ import annotations

import copy
import weakref
from collections import Counter, OrderedDict
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..families import family_of, raw_text_inputs
from ..tuner.context import routing_inputs
from ..tuner.model import _root_model
from ..tuner.routing import NO_SLOT
from ..tuner.text_anchors import word_forms

#: How many next-token candidates the model's distribution offers for the swapped word.
CANDIDATES = 400
#: Swaps whose sentence embedding has at least this cosine with the edit question are likely rewordings.
REWORDING_COSINE = 0.9
_BATCH = 64


def _bare(word: str) -> str:
    return word.strip("?,.!;:\"'").casefold()


def frame_words(questions: Sequence[str]) -> set[str]:
    """Words in at least half of ``questions`` (two or more): the frame every question shares ("what",
    "this", the kind of thing shown), which is never the word a question asks about."""
    if len(questions) < 2:
        return set()
    df = Counter(w for q in questions for w in {_bare(x) for x in q.split()})
    return {w for w, c in df.items() if c >= len(questions) / 2}


def _asked_for_word(question: str, frame: set[str], encode: Any) -> int | None:
    """Index of the word whose removal moves the question's sentence embedding most (frame words aside)."""
    words = question.split()
    if len(words) < 2:
        return None
    rows = [question] + [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
    e = F.normalize(encode(rows).float(), dim=-1)
    drop = 1.0 - e[1:] @ e[0]
    order = [int(i) for i in drop.argsort(descending=True) if _bare(words[int(i)]) not in frame and _bare(words[int(i)])]
    return order[0] if order else None


def asked_word(question: str, frame: set[str], encode: Any) -> str:
    """The word ``question`` asks about, in :func:`~ldke_peft.tuner.text_anchors.word_form` (``""`` when none
    is found, or it is not a word of three letters or more): the word :func:`neighbour_questions` swaps."""
    i = _asked_for_word(question, frame, encode)
    if not i:  # none, or the first word, for which no neighbour is proposed (as in _ranked)
        return ""
    forms = word_forms(question.split()[i])  # "time-zone?" -> ["time", "zone"]: the first longest, every run alike
    word = max(forms, key=len) if forms else ""
    return word if len(word) >= 3 else ""


def _logits(model: Any, processor: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The base model's next-token logits for text-only rows, through its own forward (no slot applies)."""
    inputs = raw_text_inputs(family_of(model), processor, ids, mask)
    with routing_inputs(model, prompt_mask=mask.bool(), slots=torch.full((len(ids),), NO_SLOT, device=ids.device)):
        return _root_model(model)(**inputs).logits.float()


@torch.no_grad()
def _sentence_logprobs(model: Any, processor: Any, tok: Any, sentences: Sequence[str]) -> torch.Tensor:
    """Each sentence's total log-probability under the base language model."""
    device = _device(model)
    out = []
    for i in range(0, len(sentences), _BATCH):
        enc = tok(list(sentences[i:i + _BATCH]), return_tensors="pt", padding=True).to(device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        lp = _logits(model, processor, ids, mask).log_softmax(-1)
        tok_lp = lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
        out.append(tok_lp.sum(1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _device(model: Any) -> torch.device:
    return next(_root_model(model).parameters()).device


def neighbour_questions(model: Any, processor: Any, question: str, *, n: int, encode: Any,
                        frame: set[str] = frozenset(), exclude: Sequence[str] = ()) -> list[str]:
    """Up to ``n`` questions that ask for another fact in ``question``'s frame, most likely first.

    The asked-for word (see :func:`_asked_for_word`) is replaced by word tokens the base model predicts
    after the words before it; each swapped sentence is ranked by its full log-probability, so the words
    after the swap count too. Swaps that repeat the word (or its plural), or whose embedding is a likely
    rewording of ``question`` (``encode``: texts -> embeddings), are dropped, as are ``exclude``.
    The ranking depends only on the base model, the question and the frame, so it is computed once per
    model and question (edits of one relation usually share their question).
    """
    if n <= 0:
        return []
    memo = _MEMO.setdefault(_root_model(model), OrderedDict())
    key = (question, frozenset(frame), id(getattr(encode, "__self__", encode)))
    ranked = memo.get(key)
    if ranked is None:
        ranked = memo[key] = _ranked(model, processor, question, set(frame), encode)
        while len(memo) > _MEMO_SIZE:
            memo.popitem(last=False)
    skip = {q.strip().casefold() for q in exclude}
    return [q for q in ranked if q.strip().casefold() not in skip][:n]


#: Ranked neighbours per base model (weakly held) and question: ``_MEMO_SIZE`` questions per model.
_MEMO: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()
_MEMO_SIZE = 256


@torch.no_grad()
def _ranked(model: Any, processor: Any, question: str, frame: set[str], encode: Any) -> list[str]:
    words = question.split()
    i = _asked_for_word(question, frame, encode)
    if not i:  # none, or the first word (the model proposes a word from what comes before it)
        return []
    tok = _right_padded(family_of(model).tokenizer(processor))
    prefix = " ".join(words[:i])
    orig = _bare(words[i]).rstrip("s")
    tail = words[i][len(words[i].rstrip("?,.!;:")):]
    ids = tok(prefix, return_tensors="pt")["input_ids"].to(_device(model))
    logits = _logits(model, processor, ids, torch.ones_like(ids))[0, -1]
    top = logits.topk(min(CANDIDATES, logits.shape[-1])).indices.tolist()
    cands: list[str] = []
    for t in top:
        piece = tok.decode([t])
        w = piece.strip()
        if not piece.startswith(" ") or not w.isalpha() or len(w) < 3 or w.casefold().rstrip("s") == orig:
            continue
        cands.append(" ".join(words[:i] + [w + tail] + words[i + 1:]))
    if not cands:
        return []
    lp = _sentence_logprobs(model, processor, tok, cands)
    e = F.normalize(encode([question] + cands).float(), dim=-1)
    keep = (e[1:] @ e[0]) < REWORDING_COSINE
    return [cands[int(j)] for j in lp.argsort(descending=True) if bool(keep[int(j)])]


def _right_padded(tok: Any) -> Any:
    """A copy of ``tok`` that pads on the right (a sentence's tokens keep their positions), with its
    end-of-sequence token where it has no pad token; the caller's tokenizer is not changed."""
    tok = copy.deepcopy(tok)  # a shallow copy shares the special-token table (and the fast backend's padding)
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok
