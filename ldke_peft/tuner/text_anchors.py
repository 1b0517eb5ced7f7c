"""Textual anchors: a nearest-anchor veto on top of each slot's textual radius.

A radius around one key cannot hold both a long rewording of the edit question (far from the key) and
keep out a question about a neighbouring fact (as near to the key). A slot with anchors keeps some of
its own projected textual rows, in scope (its wordings) and out of scope (other questions on the same
image, and the neighbouring questions the model proposed at edit time), and a question inside the radius
is vetoed when its nearest anchor is an out-of-scope one. Slots without anchors (and packs written
before them) decide by the radius alone.

Stored as three router buffers, present only in a pack that has anchors: ``anchors_t`` (rows in the
slot's projection space), ``anchors_slot`` (owner slot, int32) and ``anchors_pos`` (1 = in scope, 0 = out,
-1 = out and naming the slot's asked-for word; a reader that only tests ``> 0.5`` sees it as out).

**The asked-for word.** The proposed neighbours are the edit question with the word it asks about swapped
for another, so a question that still names that word is not one of them: it asks about the edited fact in
other words, and an unseen wording of the edit lies near a neighbour as often as a near-miss question does.
A row that names its slot's word (``named``) is therefore vetoed only by out-of-scope anchors that name it
too: the caller's own out-of-scope questions about the same thing (and ``refine_scope``'s) keep their
power, the model's proposals do not.
Rows and flags are float16 from the moment they are set (a slot keeps dozens of anchors; float32 would put a
single-edit pack past 100 KB), so the veto that runs at fit time is the one that is saved.

Layer: tuner, a leaf (README "Architecture"): imports nothing of the library.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

import torch

ANCHOR_BUFFERS = ("anchors_t", "anchors_slot", "anchors_pos")
#: ``anchors_pos`` of an out-of-scope anchor that names its slot's asked-for word.
NAMED = -1.0
_WORD = re.compile(r"[^\W\d_]+")


def word_form(word: str) -> str:
    """The form words are compared in: NFC, casefolded, a plural ending (-s, -es after a sibilant, -ies) dropped."""
    w = unicodedata.normalize("NFC", word).casefold()
    if len(w) <= 3 or not w.endswith("s") or w.endswith(("ss", "is", "us")):
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("ses", "xes", "zes", "ches", "shes")):
        return w[:-2]
    return w[:-1]


def word_forms(text: str) -> list[str]:
    """The words of ``text`` in :func:`word_form`, in order (letters only: "painter's" gives "painter", "s")."""
    return [word_form(w) for w in _WORD.findall(unicodedata.normalize("NFC", text))]


def question_words(text: str) -> set[str]:
    """The set of :func:`word_forms` of ``text``."""
    return set(word_forms(text))


class WordIndex:
    """Which slots' asked-for words each question names, by one set lookup per word of the question (serving
    reads every routed row's question: a scan over thousands of slots per row would cost more than the routing)."""

    def __init__(self, words: Sequence[str]) -> None:
        self.num = len(words)
        self.slots: dict[str, list[int]] = {}
        for k, w in enumerate(words):
            if w:  # in word form, however it was recorded (the edit metadata is a JSON file a user can edit)
                self.slots.setdefault(word_form(w), []).append(k)

    def __bool__(self) -> bool:
        return bool(self.slots)

    def mask(self, questions: Sequence[str]) -> torch.Tensor:
        """``(len(questions), num)`` bool: question ``i`` names slot ``k``'s word."""
        out = torch.zeros(len(questions), self.num, dtype=torch.bool)
        for i, q in enumerate(questions):
            hits = [k for w in question_words(q) for k in self.slots.get(w, ())]
            if hits:
                out[i, hits] = True
        return out


def names_word(words: Sequence[str], questions: Sequence[str]) -> torch.Tensor:
    """``(len(questions), len(words))`` bool: question ``i`` names word ``k`` (``""`` names nothing)."""
    return WordIndex(words).mask(questions)


def anchor_count(buffers: dict) -> int:
    """How many anchors a router's buffers hold (0 without the anchor buffers)."""
    t = buffers.get("anchors_t")
    return 0 if t is None else int(t.shape[0])


def empty_anchors(n: int, dim: int, device=None) -> dict[str, torch.Tensor]:
    """Zero-filled anchor buffers for ``n`` anchors (what a pack's loader fills)."""
    return {"anchors_t": torch.zeros(n, dim, dtype=torch.float16, device=device),
            "anchors_slot": torch.zeros(n, dtype=torch.int32, device=device),
            "anchors_pos": torch.zeros(n, dtype=torch.float16, device=device)}


def with_slot_anchors(buffers: dict, slot: int, pos: torch.Tensor, neg: torch.Tensor, dim: int,
                      named: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The anchor buffers with slot ``slot``'s anchors replaced by ``pos`` (in scope) and ``neg`` (out;
    ``named``: which of them name the slot's asked-for word)."""
    dev = buffers["keys_t"].device
    old = {k: buffers[k] for k in ANCHOR_BUFFERS} if "anchors_t" in buffers else empty_anchors(0, dim, dev)
    keep = old["anchors_slot"] != int(slot)
    rows = torch.cat([pos, neg]).to(device=dev, dtype=torch.float16)
    out_flags = torch.zeros(len(neg)) if named is None else torch.where(torch.as_tensor(named, dtype=torch.bool).cpu(), NAMED, 0.0)
    flags = torch.cat([torch.ones(len(pos)), out_flags]).to(device=dev, dtype=torch.float16)
    return {
        "anchors_t": torch.cat([old["anchors_t"][keep], rows]),
        "anchors_slot": torch.cat([old["anchors_slot"][keep], torch.full((len(rows),), int(slot), dtype=torch.int32, device=dev)]),
        "anchors_pos": torch.cat([old["anchors_pos"][keep], flags]),
    }


def veto(zt: torch.Tensor, anchors: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor, num_slots: int,
         named: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, K)`` bool: rows whose nearest anchor of slot ``k`` is out of scope (``zt``: rows projected in
    the anchors' space; a slot without an in-scope anchor never vetoes). Where ``named[b, k]`` (row ``b``
    names slot ``k``'s asked-for word) only the out-of-scope anchors that name it count."""
    B = zt.shape[0]
    d = torch.cdist(zt.float(), anchors.float())  # (B, A)
    inf = torch.full((B, num_slots), float("inf"), device=zt.device)
    is_pos = pos > 0.5
    idx = slot.to(device=zt.device, dtype=torch.long).unsqueeze(0).expand(B, -1)
    d_pos = inf.scatter_reduce(1, idx, torch.where(is_pos, d, float("inf")), "amin")
    d_neg = inf.scatter_reduce(1, idx, torch.where(is_pos, float("inf"), d), "amin")
    if named is not None and bool(named.any()):
        d_named = inf.scatter_reduce(1, idx, torch.where(pos < NAMED / 2, d, float("inf")), "amin")
        d_neg = torch.where(named.to(d_neg.device), d_named, d_neg)
    return (d_neg < d_pos) & torch.isfinite(d_pos)
