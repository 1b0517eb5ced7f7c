"""Fitting the Disentanglement Classifier: the projection and the material it is fitted on.

The router tells the edit's relation from every other question by a projection learned per pack, so
what it is fitted on decides what reaches the edit: these tests pin the three rules that made
paraphrases route and other questions stay out on the benchmark MLLM.
"""

from __future__ import annotations

import pytest
import torch

from ldke_peft.editing.augment import GENERIC_QUESTIONS, paraphrases
from ldke_peft.editing.scope import (
    NegativePool,
    negative_questions,
    question_bank,
    rephrased_negatives,
    same_relation_questions,
)
from ldke_peft.requests import EditRequest
from ldke_peft.editing.router_fit import fit_projection


def _separation(x: torch.Tensor, lab: torch.Tensor, mu: torch.Tensor, P: torch.Tensor) -> tuple[float, float]:
    """(farthest sample from its own class centroid, nearest sample to another class's centroid)."""
    z = (x - mu) @ P
    C = int(lab.max()) + 1
    cent = torch.stack([z[lab == c].mean(0) for c in range(C)])
    d = torch.cdist(z, cent)
    own = d.gather(1, lab[:, None]).squeeze(1)
    other = d.masked_fill(torch.nn.functional.one_hot(lab, C).bool(), float("inf")).min(1).values
    return float(own.max()), float(other.min())


def test_projection_separates_classes_that_differ_by_one_percent():
    """Prompt features differ by a word in a long template: classes 1% of the norm apart must still end
    up inside their own ball (0.5) and far from the others (the hinge asks 2.0). An L2 penalty on the
    projection (the old 1e-4) stops well short of that: this test fails with it."""
    g = torch.Generator().manual_seed(0)
    d, C, n = 512, 8, 10
    common = torch.randn(d, generator=g)
    cls = torch.randn(C, d, generator=g) * 0.01
    x = torch.cat([common + cls[c] + 0.003 * torch.randn(n, d, generator=g) for c in range(C)])
    x = x / x.norm(dim=1, keepdim=True)
    lab = torch.arange(C).repeat_interleave(n)
    mu, P = fit_projection(x, lab, 16)
    far_own, near_other = _separation(x, lab, mu, P)
    assert far_own < 0.5 and near_other > 1.5, (far_own, near_other)
    mu, P = fit_projection(x, lab, 16, weight_decay=1e-4)
    assert _separation(x, lab, mu, P)[1] < 1.5  # what the penalty did


def _req(relation="language"):
    return EditRequest(prompt="What is the main language of this country?", target="Czech", relation=relation)


def test_bank_wordings_of_the_edited_relation_are_positives():
    bank_lang = ["Which tongue is used here?", "What language is spoken in the country shown?"]
    pool = NegativePool(questions=[(q, "language") for q in bank_lang] + [("What is the capital of this country?", "capital")])
    pos = same_relation_questions(_req(), pool, 2)
    assert all(q in pos for q in bank_lang)
    assert not any("capital" in q.casefold() for q in pos)
    # rephrasings of the bank's wordings come along (other forms of the same question)
    assert any(p in pos for p in paraphrases(bank_lang[1], 2))
    # no relation: nothing can be said to ask the same thing
    assert same_relation_questions(_req(None), pool, 2) == []


def test_negatives_come_from_the_pool_and_the_generic_bank_and_never_ask_the_edit():
    pool = NegativePool(questions=[("What is the capital of this country?", "capital")])
    bank = question_bank(pool)
    assert bank[0] == ("What is the capital of this country?", "capital")  # the caller's first
    assert len(bank) == 1 + len(GENERIC_QUESTIONS)  # the generic ones still there
    r = _req()
    neg = negative_questions(r, pool, [r.prompt])
    assert "What is the capital of this country?" in neg
    assert not any(rel == "language" and q in neg for q, rel in bank)


def test_rephrased_negatives_keep_their_source_and_skip_positives():
    r = _req()
    pos = [r.prompt, *paraphrases(r.prompt, 6)]
    neg = ["What is the capital of this country?", "Which continent is this country in?"]
    out = rephrased_negatives(neg, pos, 2, fuzzy=False)
    assert out and {src for _, src in out} == set(neg)
    for q, src in out:
        assert q in paraphrases(src, 2) and q not in pos
    # a negative whose rephrasing is one of the positives does not bring that rephrasing in
    assert all(q.casefold() != p.casefold() for q, _ in rephrased_negatives([pos[1]], pos, 4, fuzzy=False) for p in pos)


def test_borrowed_wordings_widen_the_radius_but_do_not_move_the_key():
    from ldke_peft.editing.router_fit import calibrate_slot

    own = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1]])
    borrowed = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[3.0, 0.0], [0.0, -3.0]])
    pos = torch.cat([own, borrowed])
    cal = calibrate_slot(pos, neg, pos, neg, needs_image=False, zt_core=own)
    assert torch.allclose(cal.key_t, own.mean(0))
    assert cal.far_pos_t == pytest.approx(float((borrowed[0] - own.mean(0)).norm()), rel=1e-5)
    assert cal.far_pos_t < cal.radius_t < cal.near_neg_t
    moved = calibrate_slot(pos, neg, pos, neg, needs_image=False)
    assert torch.allclose(moved.key_t, pos.mean(0))


def test_an_edit_always_routes_its_own_input():
    """When a negative sits closer to the positives' centre than the edit's own question, the key moves
    onto the edit's own rows: paraphrases may drop out, the edit itself may not."""
    from ldke_peft.editing.router_fit import calibrate_slot

    edit_row = torch.tensor([[2.0, 0.0]])
    pos = torch.cat([edit_row, torch.tensor([[-2.0, 0.0], [0.0, 0.3]])])
    neg = torch.tensor([[0.0, -0.5], [-2.5, 0.0]])  # nearer the centroid (0, 0.1) than the edit row
    plain = calibrate_slot(pos, neg, pos, neg, needs_image=False)
    assert float((edit_row[0] - plain.key_t).norm()) > plain.radius_t  # without the anchor: edit left out
    cal = calibrate_slot(pos, neg, pos, neg, needs_image=False, zt_anchor=edit_row)
    assert torch.allclose(cal.key_t, edit_row[0])
    assert float((neg - cal.key_t).norm(dim=1).min()) > cal.radius_t > 0
