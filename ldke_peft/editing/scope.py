"""What is in an edit's scope and what is not: positives and hard negatives, built from the request,
the caller's :class:`~ldke_peft.requests.NegativePool` and automatic rewrites (never from any benchmark).

Owns: the functions that list an edit's positive views/wordings and its negative questions/images. Knows nothing of models: the delta fit (:mod:`ldke_peft.editing.delta_fit`) and the router fit
(:mod:`ldke_peft.editing.scope_fit`) turn these into rows.

Layer: editing (README "Architecture"): imports data, tuner and editing modules, never the product code.
"""

from __future__ import annotations

from typing import Any, Sequence

from .augment import dedupe, generic_question_bank, image_views, paraphrases, same_question, templated_rephrasings
from ..requests import EditRequest, NegativePool, image_fingerprint


def positive_views(r: EditRequest, seed: int = 0, n_auto: int = 2, n_views: int | None = None,
                   mirror: bool = True, borrowed: Sequence[str] = ()) -> tuple[list[Any], list[str]]:
    """Images and prompts that must trigger the edit (given ones first, automatic ones if too few).

    ``n_auto`` tops up the prompts, ``n_views`` (default ``n_auto``) the images: a request without
    rephrase images gets that many augmented views of its image, so the delta learns the entity and
    not one picture of it (M-Generality). ``mirror``: whether those views may be flipped (see
    :func:`~ldke_peft.editing.augment.image_views`). ``borrowed`` (the caller's own wordings of the edited
    relation, :func:`same_relation_questions`) top up the prompts before templated rephrasings: a wording
    someone really uses differs from the edit question in more than a frame around it.
    """
    n_views = n_auto if n_views is None else n_views
    imgs: list[Any] = []
    if r.image is not None:
        imgs = [r.image] + list(r.rephrase_images)
        if len(imgs) < 1 + n_views:
            imgs += image_views(r.image, 1 + n_views - len(imgs), seed=seed, mirror=mirror)
    prompts = dedupe([r.prompt] + list(r.rephrase_prompts))
    if len(prompts) < 1 + n_auto and borrowed:
        prompts = dedupe(prompts + list(borrowed))[: 1 + n_auto]
    if len(prompts) < 1 + n_auto:
        prompts = dedupe(prompts + templated_rephrasings(r.prompt, 1 + n_auto - len(prompts)))
    return imgs, prompts


def question_bank(pool: NegativePool) -> list[tuple[str, str | None]]:
    """The caller's questions first, then the generic bank: a pool that names only a few relations
    (the caller's own domain) still leaves the router many other questions to tell the edit from."""
    seen: set[str] = set()
    out: list[tuple[str, str | None]] = []
    for q, rel in list(pool.questions) + generic_question_bank():
        k = q.strip().casefold()
        if k not in seen:
            seen.add(k)
            out.append((q, rel))
    return out


def negative_questions(r: EditRequest, pool: NegativePool, pos_prompts: Sequence[str], cap: int = 32,
                       hard: bool = True) -> list[str]:
    """Questions that must *not* trigger the edit on the edit's own image (other relations)."""
    qs: list[str] = []
    if hard:
        qs += [p.prompt for p in r.coupled if p.image is not None and _same_image(p.image, r.image)]
        qs += [q for q, rel in question_bank(pool) if not (r.relation is not None and rel == r.relation)]
    qs += [p.prompt for p in r.locality]
    qs += [p.prompt for p in r.m_locality]
    qs = [q for q in dedupe(qs) if not same_question(q, pos_prompts, fuzzy=r.relation is None)]
    return qs[:cap]


def same_relation_questions(r: EditRequest, pool: NegativePool, n_para: int) -> list[str]:
    """The question bank's wordings of ``r.relation`` (and ``n_para`` rephrasings of each): other ways
    of asking what the edit changes, on the edit's own image. Empty for a request without a relation."""
    if r.relation is None:
        return []
    same = [q for q, rel in question_bank(pool) if rel == r.relation]
    return dedupe(same + [p for q in same for p in paraphrases(q, n_para)])


def delta_borrowed_wordings(r: EditRequest, pool: NegativePool | None, enabled: bool) -> list[str]:
    """The caller's wordings of ``r.relation`` the delta fits on (``LDKEConfig.delta_bank_wordings``)."""
    return same_relation_questions(r, pool, 0) if enabled and pool is not None else []


#: Rule-based rephrasings of each negative question among the router's textual negatives.
NEGATIVE_PARAPHRASES = 2


def rephrased_negatives(neg_q: Sequence[str], pos_prompts: Sequence[str], n: int, *, fuzzy: bool) -> list[tuple[str, str]]:
    """``(rephrasing, source question)`` for each negative question, by the same rules as the positives'.

    The positives come in many forms (the edit question and its rule-based rephrasings), so negatives
    in a single form would let the router learn *form* ("Name the ...", "the X shown") instead of
    *content* (which relation is asked): rephrasing the negatives the same way leaves content as the
    only thing that separates them.
    """
    out: list[tuple[str, str]] = []
    for q in neg_q:
        for p in paraphrases(q, n):
            if not same_question(p, pos_prompts, fuzzy=fuzzy):
                out.append((p, q))
    return out


def negative_images(r: EditRequest, others: Sequence[EditRequest], pool: NegativePool, cap: int = 64,
                    hard: bool = True) -> list[Any]:
    """Images that must *not* trigger the edit with the edit's own question (other, look-alike entities).

    Without ``hard`` (the ablation) only generic multimodal-locality images are used: no look-alike
    probes and no pool of other entities' images."""
    ims: list[Any] = []
    if hard:
        ims += [p.image for p in r.coupled if p.image is not None and not _same_image(p.image, r.image)]
    ims += [p.image for p in r.m_locality if p.image is not None]
    ims += [o.image for o in others if o.image is not None and o.subject != r.subject and not _same_image(o.image, r.image)]
    if hard:
        ims += [im for im, ent in pool.images if ent is None or ent != r.subject]
    out, seen = [], {image_fingerprint(r.image)} if r.image is not None else set()
    for im in ims:
        fp = image_fingerprint(im)
        if fp not in seen:
            seen.add(fp)
            out.append(im)
    return out[:cap]


def _same_image(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return False
    return a is b or image_fingerprint(a) == image_fingerprint(b)
