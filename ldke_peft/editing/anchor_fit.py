"""Textual anchors of new slots: the rows a slot's nearest-anchor veto compares a question with.

In scope: the slot's own textual positives (the edit's wordings, their rephrasings, the caller's wordings
of the relation). Out of scope: its textual negatives on the edit image, and the neighbouring questions
the model proposes (:mod:`ldke_peft.editing.neighbours`) with their rephrasings. The neighbours never
calibrate the radius: they only veto a question that lies nearer to one of them than to any in-scope
row, so the radius keeps the edit's farthest rewordings (see :mod:`ldke_peft.tuner.text_anchors`).

Owns: :func:`fit_text_anchors`.

Layer: editing (README "Architecture"): imports data, tuner and editing modules, never the product code.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from ..requests import EditRequest
from ..tuner.config import LDKEConfig
from ..tuner.probe_features import collect_probe_features
from ..tuner.question_key import load_encoder
from ..tuner.layer_base import slot_words
from ..tuner.text_anchors import names_word
from .neighbours import asked_word, frame_words, neighbour_questions
from .augment import same_question
from .scope import NEGATIVE_PARAPHRASES, NegativePool, question_bank, rephrased_negatives, same_relation_questions

logger = logging.getLogger(__name__)

#: Out-of-scope anchors farther than this many textual radii from the key can never be a routed
#: question's nearest anchor (the key's own wording is an in-scope anchor), so they are not stored.
_KEEP_RADII = 3.0


def _first_per_prompt(idx: Sequence[int], prompts: Sequence[str]) -> list[int]:
    seen: set[str] = set()
    out = []
    for i in idx:
        if prompts[i] not in seen:
            seen.add(prompts[i])
            out.append(i)
    return out


def _single_wording(cfg: LDKEConfig, r: EditRequest, pool: NegativePool) -> bool:
    """Whether rewrites of ``r.prompt`` are the only wordings of its edit that join the scope."""
    return not r.rephrase_prompts and not (cfg.router_paraphrases and [
        q for q in same_relation_questions(r, pool, 0) if not same_question(q, [r.prompt])])


def _warn_single_wording(cfg: LDKEConfig, requests: Sequence[EditRequest], pool: NegativePool) -> None:
    """Tell the caller which relations reach the veto with rewrites of one question as their only wordings.

    The nearest-anchor veto weighs an edit's wordings against its neighbours; with only rewrites of one
    sentence in scope it keeps more of the edit's other wordings out. Another wording joins the scope from
    the request's ``rephrase_prompts`` or from the question bank (the caller's negatives labelled with the
    relation, when ``router_paraphrases`` lets bank wordings in)."""
    thin = sorted({r.relation for r in requests if r.relation is not None and _single_wording(cfg, r, pool)})
    if thin:
        logger.warning("textual anchors: no other wording of relation(s) %s is known (the requests have no "
                       "rephrase_prompts and the negatives label no other question with it), so the anchors may keep "
                       "other wordings of these edits out; add another wording of each, labelled, to the negatives",
                       thin)


@torch.no_grad()
def fit_text_anchors(peft_model: Any, processor: Any, router: Any, cfg: LDKEConfig, requests: Sequence[EditRequest],
                     slots: Sequence[int], rows: Any, per_req: Sequence[tuple[int, int]], textual: torch.Tensor,
                     pool: NegativePool) -> None:
    """Store each new slot's textual anchors in ``router`` and their count in ``cfg.router_text_anchors``.

    ``rows``/``per_req``/``textual``: the router rows of ``requests`` and their textual features, as
    the radius was calibrated on them."""
    n_gen = int(cfg.router_neighbour_questions)
    if n_gen <= 0 or not cfg.use_router:
        return
    if not cfg.router_text_encoder:
        logger.warning("router_neighbour_questions needs a router_text_encoder; no textual anchors are fitted")
        return
    encode = load_encoder(cfg.router_text_encoder).encode
    caller = [q for q, _ in pool.questions]
    frame = frame_words(caller if len(caller) >= 2 else [q for q, _ in question_bank(pool)])
    dev = router.keys_t.device
    _warn_single_wording(cfg, requests, pool)
    for (a, b), r, s in zip(per_req, requests, slots):
        pos = _first_per_prompt([i for i in range(a, b) if rows.t_pos[i]], rows.prompts)
        neg = _first_per_prompt([i for i in range(a, b) if not rows.t_pos[i]], rows.prompts)
        own = [rows.prompts[i] for i in pos]
        gen = neighbour_questions(peft_model, processor, r.prompt, n=n_gen, encode=encode, frame=frame, exclude=own)
        qs = gen + [p for p, _ in rephrased_negatives(gen, own, NEGATIVE_PARAPHRASES, fuzzy=False)]
        qs = [q for q in dict.fromkeys(qs) if q not in own]
        word = asked_word(r.prompt, frame, encode) if cfg.router_asked_word else ""
        cfg.edits[s]["asked_word"] = word
        named = names_word([word], [rows.prompts[i] for i in neg] + qs)[:, 0]
        t_gen = collect_probe_features(peft_model, processor, cfg.probe_layer, [r.image] * len(qs), qs)[1] if qs \
            else textual[:0]
        g = router.slot_group(s)
        z_pos = router.project_textual(g, textual[pos].to(dev))
        z_neg = router.project_textual(g, torch.cat([textual[neg].to(dev), t_gen.to(dev)]))
        key = router.keys_t[s].float()
        d_neg = (z_neg - key).norm(dim=-1)
        near = d_neg <= _KEEP_RADII * float(router.radius_t[s])
        if cfg.router_anchor_clearance > 0 and len(z_pos) and _single_wording(cfg, r, pool):
            # only rewrites of one sentence in scope: an out-of-scope anchor within their reach of the key
            # would veto the edit's other wordings, which lie farther out
            reach = float((z_pos - key).norm(dim=-1).max())
            near &= d_neg >= cfg.router_anchor_clearance * reach
        router.set_text_anchors(s, z_pos, z_neg[near], named[near])
        logger.info("router: slot %d keeps %d in-scope and %d out-of-scope textual anchors (%d proposed neighbours: %s; "
                    "asked-for word %r)", s, len(z_pos), int(near.sum()), len(gen), gen[:4], word)
    cfg.router_text_anchors = router.num_anchors
    router.slot_words = slot_words(cfg)
