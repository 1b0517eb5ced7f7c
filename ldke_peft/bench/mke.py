"""MKE benchmark data for the benchmark MLLM (:mod:`ldke_peft.bench.smol_llava`).

From the built model's ``meta.json`` (what the model answers, per relation and entity, from an image
and from text) this module makes :class:`~ldke_peft.requests.EditRequest` objects for facts the
MLLM answers **correctly before editing**, with every probe filled:

* ``target``: a counterfactual from the relation's answer vocabulary (another country's answer);
* ``rephrase_prompts``: the relation's wordings of the split (T-Generality; dev 3, test 9 per relation,
  :data:`~ldke_peft.bench.countries.WORDINGS`);
* ``rephrase_images``: two other held-out views of the same emblem (M-Generality);
* ``locality``: text-only questions about other countries (T-Locality);
* ``m_locality``: image questions about other countries (M-Locality);
* ``coupled``: the same image with each other relation of the split, asked in one of the split's
  wordings (``same_image_other_question``), the look-alike emblem with the edit question and with a
  split wording (``lookalike_same_question``) (Coupled-Locality), and the relation's near-miss
  questions (``near_miss``: capital vs largest city, ...; answers are the base model's own,
  :data:`~ldke_peft.bench.countries.NEAR_MISS`) (Near-miss locality);
* ``portability``: questions whose answer follows from the new fact, when the target belongs to exactly one
  country; each kind is its own column of the report's portability table: ``two_hop`` ("In which country is
  the capital of this country located?" after ``capital := Madrid`` expects ``Spain``), ``reverse`` (text
  only, from the new answer back to the entity: "Which country has Madrid as its capital?" expects the
  edited country) and ``presupposed`` (:data:`PRESUPPOSED_QUESTIONS`: the new fact stated in the question,
  "In which country is Madrid, the capital of this country?" expects ``Spain``).

Locality/coupled answers are the MLLM's own pre-edit answers (recorded in ``meta.json``).

**Splits** (:func:`entity_splits`): the edit-split entities are divided into ``dev`` and ``test``
(look-alike pairs together); each split has its own wordings, and the dev split never edits or asks
the held-out relation. Defaults may be chosen on dev; test is for reporting.

**What an editor may see** (:func:`editor_view`): only the edit itself (image, prompt, target,
subject, relation). The probes above are for evaluation; an editor that needs hard negatives gets
:func:`negative_pool` instead: the dev relations' edit and ``pool`` wordings and *training* views of
the entities outside the test split, so every probe of either split is held out from every editor
(baselines never look at probes anyway).

Exports: our JSONL (:func:`ldke_peft.requests.save_jsonl`) and EasyEdit's ``VQADataset`` JSON with
image files (:func:`export_easyedit`), both through :func:`export_mke`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, Sequence

from ..editing.scope import NegativePool
from ..requests import EditRequest, Probe, image_fingerprint, save_jsonl
from .countries import (NEAR_MISS, SPLITS, WORDINGS, Relation, answer_matches, country_by_name, fold_answer,
                        split_relations)

logger = logging.getLogger(__name__)

__all__ = [
    "PORTABILITY_QUESTIONS",
    "PRESUPPOSED_QUESTIONS",
    "RELATED_QUESTIONS",
    "REVERSE_QUESTIONS",
    "build_mke_requests",
    "caller_consequences",
    "editor_view",
    "entity_splits",
    "export_easyedit",
    "export_mke",
    "negative_pool",
    "usable_facts",
]

#: Related questions per relation, one wording per kind:
#:
#: * ``two_hop``: on the edit image; the answer is the country whose (canonical) answer the target is.
#: * ``reverse``: text only, from an answer back to the entity it belongs to. Asked with the new target, the
#:   edited model should name the edited entity; with the original answer, the unedited model must name it
#:   (else the probe is not scored).
#: * ``presupposed``: on the edit image, the new fact stated in the question's own wording: after
#:   ``capital := Madrid``, "In which country is Madrid, the capital of this country?" expects ``Spain``. No edit
#:   is needed to read the answer off the wording; the probe checks that the edit does not answer the fact it was
#:   taught (or the entity) where the question has moved on. Filtered like reverse questions.
#: * ``caller_two_hop`` / ``caller_reverse``: how a *caller* states those consequences
#:   (:func:`caller_consequences`): other wordings than the probes', so a probe scored after an edit with
#:   consequences is still a question no editor saw.
RELATED_QUESTIONS: dict[str, dict[str, str]] = {
    "capital": {
        "two_hop": "In which country is the capital of this country located?",
        "reverse": "Which country has {x} as its capital?",
        "presupposed": "In which country is {x}, the capital of this country?",
        "caller_two_hop": "Which country is this country's capital city in?",
        "caller_reverse": "{x} is the capital of which country?",
    },
    "currency": {
        "two_hop": "Which country is the currency of this country originally from?",
        "reverse": "Which country uses the {x} as its currency?",
        "presupposed": "Which country is the {x}, the currency of this country, from?",
        "caller_two_hop": "Which country does this country's currency come from?",
        "caller_reverse": "The {x} is the currency of which country?",
    },
    "language": {
        "two_hop": "Which country is the main language of this country originally from?",
        "reverse": "In which country is {x} the main language?",
        "presupposed": "Which country is {x}, the main language of this country, from?",
        "caller_two_hop": "Which country does this country's main language come from?",
        "caller_reverse": "{x} is the main language of which country?",
    },
}
PORTABILITY_QUESTIONS: dict[str, str] = {r: q["two_hop"] for r, q in RELATED_QUESTIONS.items()}
REVERSE_QUESTIONS: dict[str, str] = {r: q["reverse"] for r, q in RELATED_QUESTIONS.items()}
PRESUPPOSED_QUESTIONS: dict[str, str] = {r: q["presupposed"] for r, q in RELATED_QUESTIONS.items()}
CALLER_TWO_HOP: dict[str, str] = {r: q["caller_two_hop"] for r, q in RELATED_QUESTIONS.items()}
CALLER_REVERSE: dict[str, str] = {r: q["caller_reverse"] for r, q in RELATED_QUESTIONS.items()}


#: Eval-split view indices: the edit image is the view the build verified the answers on.
EDIT_VIEW = 0
REPHRASE_VIEWS = (1, 2)


def _relations(meta: dict) -> dict[str, Relation]:
    return {r: Relation(**{**d, "rephrases": tuple(d.get("rephrases", ()))}) for r, d in meta["relations"].items()}


def _short_answer(text: str, limit: int = 16) -> str:
    """The first sentence of a generated answer, at most ``limit`` words (a locality probe's answer)."""
    text = " ".join(text.strip().split())
    for stop in (". ", "\n"):
        if stop in text:
            text = text.split(stop)[0] + "."
            break
    words = text.split()
    return " ".join(words[:limit]) or "."


def usable_facts(meta: dict, split: str = "edit") -> list[tuple[str, str]]:
    """``(entity, relation)`` pairs of ``split`` that the MLLM answers correctly from the image *and*
    the text LM answers correctly (the knowledge is the LM's), in the meta's country order.

    When the build recorded ``editable`` (facts answered correctly from *every* evaluation view, so
    the M-Generality views are answered correctly before editing too), those are used for the edit split.
    """
    entities = [c["name"] for c in meta["countries"] if split is None or c.get("split", "edit") == split]
    out = []
    for r in meta["relations"]:
        if split == "edit" and "editable" in meta:
            known = set(meta["editable"].get(r, []))
        else:
            known = set(meta["image_known"].get(r, [])) & set(meta["text_known"].get(r, []))
        out += [(e, r) for e in entities if e in known]
    order = {c["name"]: i for i, c in enumerate(meta["countries"])}
    rel_order = {r: i for i, r in enumerate(meta["relations"])}
    return sorted(out, key=lambda x: (order[x[0]], rel_order[x[1]]))


#: Share of the edit-split entities (look-alike pairs counted once) in the dev split.
DEV_FRACTION = 1 / 3


def entity_splits(meta: dict) -> dict[str, str]:
    """``{entity: "dev" | "test"}`` for the edit-split entities: a fixed hash of the name (of a look-alike
    pair's first name, so a pair is never split), ~:data:`DEV_FRACTION` in dev."""
    import zlib

    edit = [c["name"] for c in meta["countries"] if c.get("split", "edit") == "edit"]
    head = {n: n for n in edit}
    for a, b in meta.get("lookalike_pairs", []):
        head[b] = head[a] = min(a, b)
    return {n: ("dev" if zlib.crc32(f"mke-split:{head[n]}".encode()) % 3 == 0 else "test") for n in edit}


def split_facts(meta: dict, split: str) -> list[tuple[str, str]]:
    """Usable facts of the ``split`` entities, for the ``split``'s relations."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    where = entity_splits(meta)
    rels = set(split_relations(split))
    return [(e, r) for e, r in usable_facts(meta) if where.get(e) == split and r in rels]


def _canonical(meta: dict) -> dict[str, dict[str, list[str]]]:
    return {c["name"]: c["facts"] for c in meta["countries"]}


def _owners(meta: dict, relation: str) -> dict[str, list[str]]:
    """canonical answer -> countries whose canonical answer it is."""
    out: dict[str, list[str]] = {}
    for c in meta["countries"]:
        out.setdefault(c["facts"][relation][0], []).append(c["name"])
    return out


def _pick_target(meta: dict, entity: str, relation: str, rng: random.Random) -> str:
    facts = _canonical(meta)
    accepted = {fold_answer(a) for a in facts[entity][relation]}
    owners = _owners(meta, relation)
    vocab = sorted(a for a in owners if fold_answer(a) not in accepted and not answer_matches(a, tuple(accepted)))
    if not vocab:
        raise ValueError(f"no counterfactual answer for {relation} of {entity}")
    unique = [a for a in vocab if len(owners[a]) == 1]
    pool = unique if (relation in PORTABILITY_QUESTIONS and unique) else vocab
    return rng.choice(pool)


def _round_robin(facts: Sequence[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:
    """Every entity once before any entity twice; relations shuffled within an entity."""
    by_entity: dict[str, list[str]] = {}
    for e, r in facts:
        by_entity.setdefault(e, []).append(r)
    entities = sorted(by_entity)
    rng.shuffle(entities)
    for e in entities:
        rng.shuffle(by_entity[e])
    out = []
    while any(by_entity.values()):
        for e in entities:
            if by_entity[e]:
                out.append((e, by_entity[e].pop()))
    return out


def build_mke_requests(
    meta: dict,
    n: int | None = None,
    *,
    seed: int = 0,
    n_locality: int = 2,
    split: str = "test",
    answer_fn: Callable[[list[Any], list[str]], list[str]] | None = None,
) -> list[EditRequest]:
    """Edit requests for up to ``n`` usable facts of ``split`` (all when ``None``), every probe filled.

    Facts are taken round-robin over entities (seeded), so a small ``n`` covers many entities and
    all relations. Images are in-memory PIL images rendered deterministically from the meta
    (:func:`ldke_peft.bench.smol_llava.emblems_from_meta`). ``answer_fn(images, prompts)`` gives the
    base model's answers to the near-miss probes (without it they hold ``"?"``: enough to audit
    wordings and images, not to measure).
    """
    from .smol_llava import emblems_from_meta

    rng = random.Random(f"mke:{split}:{seed}")
    facts = _round_robin(split_facts(meta, split), rng)
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        facts = facts[:n]
    if not facts:
        raise ValueError("the benchmark MLLM answers no fact correctly in this split; nothing to edit")
    emblems = emblems_from_meta(meta)
    names = [c["name"] for c in meta["countries"]]
    index = {nm: i for i, nm in enumerate(names)}
    rels = _relations(meta)
    answers = meta["answers"]
    partners = {a: b for p in meta["lookalike_pairs"] for a, b in (p, p[::-1])}
    prompt_names = {c["name"]: c.get("prompt_name", c["name"]) for c in meta["countries"]}
    views: dict[tuple[int, int], Any] = {}

    def view(name: str, k: int):
        key = (index[name], k)
        if key not in views:
            views[key] = emblems.view_image(index[name], k, "eval")
        return views[key]

    split_rels = split_relations(split)
    requests = []
    near: list[tuple[int, Any, str]] = []  # (request index, image, prompt) of the near-miss probes
    for e, r in facts:
        rel = rels[r]
        target = _pick_target(meta, e, r, rng)
        img = view(e, EDIT_VIEW)
        partner = partners.get(e)
        others = [o for o in names if o not in (e, partner)]
        locality = []
        for o in rng.sample(others, min(n_locality, len(others))):
            r2 = rng.choice(split_rels)
            q = rels[r2].text_question.format(country=prompt_names[o])
            locality.append(Probe(q, _short_answer(answers[r2][o]["text"]), None, kind="text_other_country",
                                  subject=o, relation=r2))
        m_loc = []
        for o in rng.sample(others, min(n_locality, len(others))):
            r2 = rng.choice(split_rels)
            m_loc.append(Probe(rels[r2].image_question, _short_answer(answers[r2][o]["image"]), view(o, EDIT_VIEW),
                               kind="image_other_country", subject=o, relation=r2))
        coupled = []
        for r2 in split_rels:
            if r2 == r:
                continue
            # the other relation in one of this split's wordings (the answer recorded by the build is the
            # model's answer to the edit wording: only its tokens matter, pre and post are compared)
            q = rng.choice(WORDINGS[r2][split])
            coupled.append(Probe(q, _short_answer(answers[r2][e]["image"]), img, kind="same_image_other_question",
                                 subject=e, relation=r2))
        if partner is not None:
            pimg = view(partner, EDIT_VIEW)
            ans = _short_answer(answers[r][partner]["image"])
            coupled.append(Probe(rel.image_question, ans, pimg, kind="lookalike_same_question", subject=partner, relation=r))
            coupled.append(Probe(rng.choice(WORDINGS[r][split]), ans, pimg, kind="lookalike_same_question",
                                 subject=partner, relation=r))
        for q in NEAR_MISS[r][split]:
            near.append((len(requests), img, q))
            coupled.append(Probe(q, "?", img, kind=f"near_miss:{r}", subject=e))
        portability = []
        owners = _owners(meta, r).get(target, [])
        if r in PORTABILITY_QUESTIONS and len(owners) == 1:
            portability.append(Probe(PORTABILITY_QUESTIONS[r], owners[0], img, kind=f"two_hop:{r}->country"))
        if r in PRESUPPOSED_QUESTIONS and len(owners) == 1:
            portability.append(Probe(PRESUPPOSED_QUESTIONS[r].format(x=target), owners[0], img, kind=f"presupposed:{r}"))
        if r in REVERSE_QUESTIONS and len(owners) == 1:
            # the new answer has one real owner, so the unedited model names that owner, not the entity
            portability.append(Probe(REVERSE_QUESTIONS[r].format(x=target), prompt_names[e], None, kind=f"reverse:{r}",
                                     subject=e, relation=r))
        requests.append(
            EditRequest(
                prompt=rel.image_question,
                target=target,
                image=img,
                ground_truth=_canonical(meta)[e][r][0],
                rephrase_prompts=list(WORDINGS[r][split]),
                rephrase_images=[view(e, k) for k in REPHRASE_VIEWS],
                locality=locality,
                m_locality=m_loc,
                coupled=coupled,
                portability=portability,
                subject=e,
                relation=r,
            )
        )
    if answer_fn is not None and near:
        got = answer_fn([im for _, im, _ in near], [q for _, _, q in near])
        for (i, _, q), a in zip(near, got):
            for k, p in enumerate(requests[i].coupled):
                if p.prompt == q and p.answer == "?":
                    requests[i].coupled[k] = Probe(q, _short_answer(a), p.image, kind=p.kind, subject=p.subject)
                    break
    return requests


def caller_consequences(r: EditRequest, kinds: Sequence[str] = ("two_hop", "reverse")) -> list[EditRequest]:
    """The edit as its caller would make it when also stating what follows from the new fact:
    :func:`editor_view` of ``r`` with a ``two_hop`` consequence ("which country is this country's <relation>
    from?" -> the country whose answer the target is, fitted with the edit), then a text-only ``reverse``
    edit ("<target> is the <relation> of which country?" -> the edited entity; text-only questions can only
    reach a text-only edit). Only where the target has exactly one owner (as for the portability probes), in
    the :data:`CALLER_TWO_HOP` / :data:`CALLER_REVERSE` wordings, never a probe's. World knowledge from
    :data:`~ldke_peft.bench.countries.COUNTRIES`, not from the probes."""
    from .countries import COUNTRIES

    view = editor_view(r)
    if r.relation not in CALLER_TWO_HOP or r.subject is None:
        return [view]
    owners = [c for c in COUNTRIES if fold_answer(c.answer(r.relation)) == fold_answer(r.target)]
    if len(owners) != 1:
        return [view]
    if "two_hop" in kinds and r.image is not None:
        view.consequences = [Probe(CALLER_TWO_HOP[r.relation], owners[0].name, kind=f"two_hop:{r.relation}->country")]
    out = [view]
    if "reverse" in kinds:
        entity = country_by_name(r.subject)
        out.append(EditRequest(prompt=CALLER_REVERSE[r.relation].format(x=r.target), target=entity.prompt_name,
                               subject=r.subject, relation=f"{r.relation}^-1"))
    return out


def editor_view(r: EditRequest) -> EditRequest:
    """What an editor is given: the edit alone (image, prompt, target, subject, relation), no probes."""
    return r.without_probes()


def negative_pool(meta: dict, n_images: int | None = None) -> NegativePool:
    """Hard-negative material for editors that use it (LDKE), disjoint from every probe of both splits.

    Questions: the dev relations' edit wording and ``pool`` wordings (probes use the ``dev`` and
    ``test`` sets; the held-out relation is absent). Images: one view of every entity outside the test
    split, drawn with the *train* split's seeds (probes use eval-split views), ``n_images`` first
    entities when given.
    """
    from .smol_llava import emblems_from_meta

    emblems = emblems_from_meta(meta)
    rels = _relations(meta)
    where = entity_splits(meta)
    names = [c["name"] for c in meta["countries"]]
    keep = [(i, nm) for i, nm in enumerate(names) if where.get(nm) != "test"]
    if n_images is not None:
        keep = keep[:n_images]
    questions = [(q, r) for r in split_relations("dev") for q in (rels[r].image_question, *WORDINGS[r]["pool"])]
    return NegativePool(questions=questions, images=[(emblems.view_image(i, 0, "train"), nm) for i, nm in keep])


# ---------------------------------------------------------------------- export


def export_easyedit(requests: Sequence[EditRequest], out_dir: str | os.PathLike, name: str = "mke_vqa.json") -> Path:
    """Write EasyEdit ``VQADataset`` records (``src``, ``pred``, ``alt``, ``rephrase``, ``image``,
    ``image_rephrase``, ``loc``, ``loc_ans``, ``m_loc``, ``m_loc_q``, ``m_loc_a``) + PNG images.

    Image paths are relative to ``out_dir`` (EasyEdit's ``coco_image`` and ``rephrase_image``
    hparams both = ``out_dir``). EasyEdit records hold one probe of each kind: the first one.
    Returns the JSON path.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)

    def save(img) -> str:
        if isinstance(img, (str, os.PathLike)):
            return os.path.relpath(os.path.abspath(img), out)
        rel = f"images/{image_fingerprint(img)}.png"
        if not (out / rel).exists():
            img.convert("RGB").save(out / rel, format="PNG")
        return rel

    records = []
    for r in requests:
        if r.image is None:
            raise ValueError("EasyEdit VQA records need an image; text-only requests cannot be exported")
        rec: dict[str, Any] = {"src": r.prompt, "pred": r.ground_truth or "", "alt": r.target, "image": save(r.image)}
        if r.rephrase_prompts:
            rec["rephrase"] = r.rephrase_prompts[0]
        if r.rephrase_images:
            rec["image_rephrase"] = save(r.rephrase_images[0])
        if r.locality:
            rec["loc"], rec["loc_ans"] = r.locality[0].prompt, r.locality[0].answer
        if r.m_locality:
            p = r.m_locality[0]
            rec["m_loc"], rec["m_loc_q"], rec["m_loc_a"] = save(p.image), p.prompt, p.answer
        records.append(rec)
    path = out / name
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False))
    return path


def export_mke(requests: Sequence[EditRequest], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Both formats into ``out_dir``: ``mke.jsonl`` (ours, lossless) and ``mke_vqa.json`` (EasyEdit)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "mke.jsonl"
    save_jsonl(list(requests), jsonl)
    return {"jsonl": jsonl, "easyedit": export_easyedit(requests, out)}
