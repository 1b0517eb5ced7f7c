"""MKE benchmark data for the benchmark MLLM (:mod:`ldke_peft.bench.smol_llava`).

From the built model's ``meta.json`` (what the model answers, per relation and entity, from an image
and from text) this module makes :class:`~ldke_peft.requests.EditRequest` objects for facts the
MLLM answers **correctly before editing**, with every probe filled:

* ``target``: a counterfactual from the relation's answer vocabulary (another country's answer);
* ``rephrase_prompts``: the relation's two other wordings (T-Generality);
* ``rephrase_images``: two other held-out views of the same emblem (M-Generality);
* ``locality``: text-only questions about other countries (T-Locality);
* ``m_locality``: image questions about other countries (M-Locality);
* ``coupled``: the same image with each other relation, asked in a wording the editor never sees
  (``same_image_other_question``), and the look-alike emblem with the same question
  (``lookalike_same_question``) (Coupled-Locality);
* ``portability``: a two-hop question whose answer follows from the new fact ("In which country is
  the capital of this country located?" after ``capital := Madrid`` expects ``Spain``), when the
  target belongs to exactly one country.

Locality/coupled answers are the MLLM's own pre-edit answers (recorded in ``meta.json``).

**What an editor may see** (:func:`editor_view`): only the edit itself (image, prompt, target,
subject, relation). The probes above are for evaluation; an editor that needs hard negatives gets
:func:`negative_pool` instead: the relations' *first* wording only and *training* views of the
emblems, so every probe is held out from every editor (baselines never look at probes anyway).

Exports: our JSONL (:func:`ldke_peft.requests.save_jsonl`) and EasyEdit's ``VQADataset`` JSON with
image files (:func:`export_easyedit`), both through :func:`export_mke`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Sequence

from ..editor import NegativePool
from ..requests import EditRequest, Probe, image_fingerprint, save_jsonl
from .countries import COUNTRIES, RELATIONS, Relation, answer_matches, normalize_answer

logger = logging.getLogger(__name__)

__all__ = [
    "PORTABILITY_QUESTIONS",
    "build_mke_requests",
    "editor_view",
    "export_easyedit",
    "export_mke",
    "negative_pool",
    "usable_facts",
]

#: Two-hop questions per relation: the answer is the country whose (canonical) answer the target is.
PORTABILITY_QUESTIONS: dict[str, str] = {
    "capital": "In which country is the capital of this country located?",
    "currency": "Which country is the currency of this country originally from?",
    "language": "Which country is the main language of this country originally from?",
}

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
    accepted = {normalize_answer(a) for a in facts[entity][relation]}
    owners = _owners(meta, relation)
    vocab = sorted(a for a in owners if normalize_answer(a) not in accepted and not answer_matches(a, tuple(accepted)))
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
    split: str = "edit",
) -> list[EditRequest]:
    """Edit requests for up to ``n`` usable facts (all when ``None``), every probe filled.

    Facts are taken round-robin over entities (seeded), so a small ``n`` covers many entities and
    all relations. Images are in-memory PIL images rendered deterministically from the meta
    (:func:`ldke_peft.bench.smol_llava.emblems_from_meta`).
    """
    from .smol_llava import emblems_from_meta

    rng = random.Random(f"mke:{seed}")
    facts = _round_robin(usable_facts(meta, split), rng)
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

    requests = []
    for e, r in facts:
        rel = rels[r]
        target = _pick_target(meta, e, r, rng)
        img = view(e, EDIT_VIEW)
        partner = partners.get(e)
        others = [o for o in names if o not in (e, partner)]
        locality = []
        for o in rng.sample(others, min(n_locality, len(others))):
            r2 = rng.choice(list(rels))
            q = rels[r2].text_question.format(country=prompt_names[o])
            locality.append(Probe(q, _short_answer(answers[r2][o]["text"]), None, kind="text_other_country"))
        m_loc = []
        for o in rng.sample(others, min(n_locality, len(others))):
            r2 = rng.choice(list(rels))
            m_loc.append(Probe(rels[r2].image_question, _short_answer(answers[r2][o]["image"]), view(o, EDIT_VIEW),
                               kind="image_other_country"))
        coupled = []
        for r2, rel2 in rels.items():
            if r2 == r:
                continue
            # a wording of the other relation the editor's negative pool does not contain
            q = rel2.rephrases[0] if rel2.rephrases else rel2.image_question
            coupled.append(Probe(q, _short_answer(answers[r2][e]["image"]), img, kind="same_image_other_question"))
        if partner is not None:
            coupled.append(Probe(rel.image_question, _short_answer(answers[r][partner]["image"]), view(partner, EDIT_VIEW),
                                 kind="lookalike_same_question"))
        portability = []
        owners = _owners(meta, r).get(target, [])
        if r in PORTABILITY_QUESTIONS and len(owners) == 1:
            portability.append(Probe(PORTABILITY_QUESTIONS[r], owners[0], img, kind=f"two_hop:{r}->country"))
        requests.append(
            EditRequest(
                prompt=rel.image_question,
                target=target,
                image=img,
                ground_truth=_canonical(meta)[e][r][0],
                rephrase_prompts=list(rel.rephrases[:2]),
                rephrase_images=[view(e, k) for k in REPHRASE_VIEWS],
                locality=locality,
                m_locality=m_loc,
                coupled=coupled,
                portability=portability,
                subject=e,
                relation=r,
            )
        )
    return requests


def editor_view(r: EditRequest) -> EditRequest:
    """What an editor is given: the edit alone (image, prompt, target, subject, relation), no probes."""
    return EditRequest(prompt=r.prompt, target=r.target, image=r.image, ground_truth=r.ground_truth,
                       subject=r.subject, relation=r.relation)


def negative_pool(meta: dict, n_images: int | None = None) -> NegativePool:
    """Hard-negative material for editors that use it (LDKE), disjoint from every probe.

    Questions: each relation's first wording (probes use the others). Images: one view of every entity
    drawn with the *train* split's seeds (probes use eval-split views), ``n_images`` first entities when
    given.
    """
    from .smol_llava import emblems_from_meta

    emblems = emblems_from_meta(meta)
    rels = _relations(meta)
    names = [c["name"] for c in meta["countries"]]
    if n_images is not None:
        names = names[:n_images]
    return NegativePool(
        questions=[(rel.image_question, r) for r, rel in rels.items()],
        images=[(emblems.view_image(i, 0, "train"), nm) for i, nm in enumerate(names)],
    )


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
