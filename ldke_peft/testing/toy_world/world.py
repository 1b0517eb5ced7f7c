"""The :class:`ToyWorld`: a trained toy model with its facts, templates, images and edit requests."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ...requests import EditRequest, Probe
from .. import _emblems
from .spec import EDIT_RELATIONS, HELDOUT_RELATION, HELDOUT_VIEW_START, IMAGE_SIZE, IMAGE_TEMPLATES, RELATED, SPLITS, TEXT_TEMPLATES, WorldSpec


# ---------------------------------------------------------------------- the world


@dataclass
class ToyWorld:
    """A trained toy LLaVA and the facts it knows.

    Attributes:
        model: ``LlavaForConditionalGeneration`` in eval mode.
        processor: its ``LlavaProcessor`` (word-level tokenizer, chat template).
        family: ``family_of(model)``.
        spec: the generated facts (:class:`WorldSpec`).
        path: the cache directory the world was loaded from (``None`` if not cached).
    """

    model: Any
    processor: Any
    spec: WorldSpec
    path: Path | None = None

    def __post_init__(self) -> None:
        from ...families import family_of
        from ...tuner.model import attach_tokenizer

        self.family = family_of(self.model)
        # the model folder holds no tokenizer (the processor has its own folder): LDKE routing reads
        # question text with this one
        attach_tokenizer(self.model, self.processor)
        self._render_cache: dict[tuple[int, int], Image.Image] = {}
        self._index = {e: i for i, e in enumerate(self.spec.entities)}
        self._partner = {a: b for a, b in self.spec.lookalikes} | {b: a for a, b in self.spec.lookalikes}

    # ------------------------------------------------------------------ fact table
    @property
    def entities(self) -> list[str]:
        return list(self.spec.entities)

    @property
    def relations(self) -> list[str]:
        """The editable image relations."""
        return list(EDIT_RELATIONS)

    @property
    def facts(self) -> dict[tuple[str, str], str]:
        """``facts[(entity, relation)] -> answer`` for every image question (edit relations,
        composed questions and ``"country"``)."""
        return {(e, r): a for r, by_e in self.spec.answers.items() for e, a in by_e.items()}

    @property
    def lookalikes(self) -> list[tuple[str, str]]:
        return list(self.spec.lookalikes)

    def lookalike_of(self, entity: str) -> str | None:
        """The entity whose emblem differs from ``entity``'s in one region (``None`` if unpaired)."""
        return self._partner.get(entity)

    @property
    def templates(self) -> dict[str, dict[str, list[str]]]:
        """``templates[relation] = {"train": [...], "eval": [...]}`` for every image relation."""
        return {r: {"train": list(t), "eval": list(e)} for r, (t, e) in IMAGE_TEMPLATES.items()}

    @property
    def text_templates(self) -> dict[str, dict[str, list[str]]]:
        return {r: {"train": list(t), "eval": list(e)} for r, (t, e) in TEXT_TEMPLATES.items()}

    @property
    def text_facts(self) -> list[tuple[str, str, str]]:
        """Every text-only fact as ``(text_relation, subject, answer)``."""
        return [(r, s, a) for r, by_s in self.spec.hops.items() for s, a in by_s.items()]

    @property
    def related(self) -> dict[str, dict[str, Any]]:
        """Portability definitions: ``related[relation] = {"composed": image relation whose answer
        is ``hop(answer)``, "hop": text relation, "map": {answer: hop answer}}``."""
        return {r: {**info, "map": dict(self.spec.hops[info["hop"]])} for r, info in RELATED.items()}

    def answer_vocab(self, relation: str) -> list[str]:
        """Every answer ``relation`` can take in this world (image or text relation)."""
        if relation in self.spec.answers:
            if relation in RELATED:
                hop = RELATED[relation]["hop"]
                return sorted(self.spec.hops[hop])
            return sorted(set(self.spec.answers[relation].values()))
        if relation in self.spec.hops:
            return sorted(set(self.spec.hops[relation].values()))
        raise KeyError(f"unknown relation {relation!r}; image relations: {sorted(self.spec.answers)}, text: {sorted(self.spec.hops)}")

    def question_bank(self, relation: str | None = None) -> list[str]:
        """All question templates (train and eval) of ``relation``, or of every image relation."""
        rels = [relation] if relation is not None else list(IMAGE_TEMPLATES)
        out: list[str] = []
        for r in rels:
            if r not in IMAGE_TEMPLATES:
                raise KeyError(f"unknown image relation {r!r}; known: {sorted(IMAGE_TEMPLATES)}")
            out.extend(IMAGE_TEMPLATES[r][0] + IMAGE_TEMPLATES[r][1])
        return out

    def pool_wordings(self, relation: str) -> list[str]:
        """The wording of ``relation`` a caller hands the editor (its first training template); every
        other wording of it is a probe."""
        return [IMAGE_TEMPLATES[relation][0][0]]

    def entity_split(self, entity: str) -> str:
        """``"dev"`` or ``"test"`` (a fixed hash of the name; look-alike pairs stay together; ~1/3 dev)."""
        import zlib

        partner = self.lookalike_of(entity)
        head = min(entity, partner) if partner is not None else entity
        return "dev" if zlib.crc32(f"toy-split:{head}".encode()) % 3 == 0 else "test"

    def split_relations(self, split: str | None) -> list[str]:
        """The relations edited and asked in ``split`` (dev lacks :data:`HELDOUT_RELATION`)."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        return [r for r in EDIT_RELATIONS if split != "dev" or r != HELDOUT_RELATION]

    def negative_pool(self) -> Any:
        """Hard-negative material for the editor, disjoint from every probe of :meth:`edit_requests`: one
        wording (:meth:`pool_wordings`) of each dev relation and of "which country is shown", and a
        training view (view 1) of every entity outside the test split."""
        from ...editing.scope import NegativePool

        rels = self.split_relations("dev") + ["country"]
        return NegativePool(
            questions=[(q, r) for r in rels for q in self.pool_wordings(r)],
            images=[(self.render(e, 1), e) for e in self.spec.entities if self.entity_split(e) != "test"],
        )

    def text_prompt(self, text_relation: str, subject: str, template: int = 0, split: str = "train") -> str:
        t = TEXT_TEMPLATES[text_relation][0 if split == "train" else 1]
        return t[template].format(x=subject)

    # ------------------------------------------------------------------ images
    def entity_index(self, entity: str | int) -> int:
        if isinstance(entity, int):
            if not 0 <= entity < len(self.spec.entities):
                raise KeyError(f"entity index {entity} out of range (0..{len(self.spec.entities) - 1})")
            return entity
        if entity not in self._index:
            raise KeyError(f"unknown entity {entity!r}")
        return self._index[entity]

    def render(self, entity: str | int, view: int = 0) -> Image.Image:
        """The emblem of ``entity``: view 0 is canonical, views >= 1 are deterministic augmentations.

        Views ``0 .. spec.train_views - 1`` were seen in training; views >= ``HELDOUT_VIEW_START``
        never were.
        """
        i = self.entity_index(entity)
        key = (i, int(view))
        img = self._render_cache.get(key)
        if img is None:
            img = _render(self.spec, i, int(view))
            if len(self._render_cache) < 4096:
                self._render_cache[key] = img
        return img.copy()

    def heldout_views(self, k: int, offset: int = 0) -> list[int]:
        return list(range(HELDOUT_VIEW_START + offset, HELDOUT_VIEW_START + offset + k))

    # ------------------------------------------------------------------ asking
    def ask(self, image: Image.Image | None, prompt: str, max_new_tokens: int = 4) -> str:
        """Greedy answer of the model to ``prompt`` (about ``image``, or text-only if ``None``)."""
        return self.ask_many([image], [prompt], max_new_tokens=max_new_tokens)[0]

    @torch.no_grad()
    def ask_many(
        self, images: Sequence[Image.Image | None], prompts: Sequence[str], max_new_tokens: int = 4, batch_size: int = 256
    ) -> list[str]:
        """Greedy answers for a batch of questions (rows with and without images may be mixed)."""
        if len(images) != len(prompts):
            raise ValueError("images and prompts must have the same length")
        out: list[str | None] = [None] * len(prompts)
        # rows with and without images are generated separately (same lengths batch better)
        groups = [[i for i in range(len(prompts)) if (images[i] is None) == text_only] for text_only in (False, True)]
        tok = self.family.tokenizer(self.processor)
        for idx in groups:
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size]
                built = self.family.build_inputs(self.processor, [images[i] for i in chunk], [prompts[i] for i in chunk])
                built = built.to(self.model.device)
                gen = self.model.generate(
                    **built.inputs,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
                new = gen[:, built.input_ids.shape[1] :]
                for j, i in enumerate(chunk):
                    out[i] = tok.decode(new[j], skip_special_tokens=True).strip()
        return [o or "" for o in out]

    # ------------------------------------------------------------------ evaluation
    def accuracy(self, max_entities: int = 64, n_views: int = 2) -> dict[str, Any]:
        """Greedy exact-match accuracy, on held-out views.

        Keys (each an accuracy in [0, 1] over probe rows):
            ``image/train_templates``: edit relations, training wordings, held-out views;
            ``image/eval_templates``: edit relations, held-out wordings, held-out views;
            ``image/canonical``: edit relations, first training wording, view 0;
            ``composed/train_templates``, ``composed/eval_templates``: the multi-hop questions;
            ``country/train_templates``, ``country/eval_templates``: "which country is shown";
            ``text/train_templates``, ``text/eval_templates``: text-only facts;
        plus counts: ``n_image_facts`` / ``n_text_facts`` (facts evaluated) and
        ``image_facts_correct`` / ``text_facts_correct`` (facts answered right on *every* probe row
        with a training wording). Worlds larger than ``max_entities`` are evaluated on a fixed
        sample of entities (and the text facts about them).
        """
        spec = self.spec
        ents = list(spec.entities)
        if len(ents) > max_entities:
            ents = random.Random(0).sample(ents, max_entities)
        rows: list[tuple[str, tuple, Image.Image | None, str, str]] = []  # (bucket, fact key, image, prompt, answer)
        for e in ents:
            views = [self.render(e, v) for v in self.heldout_views(n_views)]
            for rel, (train_t, eval_t) in IMAGE_TEMPLATES.items():
                ans = spec.answers[rel][e]
                kind = "image" if rel in EDIT_RELATIONS else ("country" if rel == "country" else "composed")
                for split, temps in (("train_templates", train_t), ("eval_templates", eval_t)):
                    bucket = f"{kind}/{split}"
                    for t in temps:
                        for img in views:
                            rows.append((bucket, ("img", e, rel), img, t, ans))
                if kind == "image":
                    rows.append(("image/canonical", ("img", e, rel), self.render(e, 0), train_t[0], ans))
        chosen = set(ents)
        for trel, by_s in spec.hops.items():
            for subj, ans in by_s.items():
                if trel == "capital_of" and subj not in chosen:
                    continue
                if trel == "river" and subj not in {spec.answers["capital"][e] for e in ents}:
                    continue
                train_t, eval_t = TEXT_TEMPLATES[trel]
                for split, temps in (("train_templates", train_t), ("eval_templates", eval_t)):
                    for t in temps:
                        rows.append((f"text/{split}", ("txt", trel, subj), None, t.format(x=subj), ans))
        preds = self.ask_many([r[2] for r in rows], [r[3] for r in rows])
        result: dict[str, Any] = {}
        totals: dict[str, list[int]] = {}
        fact_ok: dict[tuple, bool] = {}
        for (bucket, key, _img, _p, ans), pred in zip(rows, preds):
            ok = pred == ans
            totals.setdefault(bucket, [0, 0])
            totals[bucket][0] += ok
            totals[bucket][1] += 1
            if bucket in ("image/train_templates", "text/train_templates"):
                fact_ok[key] = fact_ok.get(key, True) and ok
        for bucket, (c, t) in sorted(totals.items()):
            result[bucket] = c / t
        img_facts = [k for k in fact_ok if k[0] == "img"]
        txt_facts = [k for k in fact_ok if k[0] == "txt"]
        result["n_image_facts"] = len(img_facts)
        result["image_facts_correct"] = sum(fact_ok[k] for k in img_facts)
        result["n_text_facts"] = len(txt_facts)
        result["text_facts_correct"] = sum(fact_ok[k] for k in txt_facts)
        result["n_probes"] = len(rows)
        return result

    # ------------------------------------------------------------------ edit requests
    def edit_requests(self, n: int, seed: int = 0, n_locality: int = 2, n_views: int = 2,
                      split: str | None = None) -> list[EditRequest]:
        """``n`` edit requests for facts the model currently answers correctly, with every probe filled.

        ``split`` (``"dev"``/``"test"``) keeps that split's entities and relations (``None``: all). No
        probe is among what :meth:`negative_pool` hands an editor: probes use the wordings other than the
        pool's and the edit's, and views other than the pool's.

        Each request edits ``relation`` of ``subject`` (asked with the canonical view and the
        relation's first training wording) to a ``target`` drawn from the relation's answer vocabulary, preferring
        targets whose second-hop answer differs from the current one (so the portability probe
        discriminates). Probes:

        * ``rephrase_prompts``: the other wordings of the question, except the pool's;
        * ``rephrase_images``: ``n_views`` held-out views of the subject;
        * ``locality``: text-only facts unrelated to the subject (answer = the model's current one);
        * ``m_locality``: image questions about other entities (current answers);
        * ``coupled``: the same image with every other relation, in its held-out wording
          (``same_image_other_question``), and the look-alike's image with the edit question and the
          relation's held-out wording (``lookalike_same_question``), current answers;
        * ``portability``: the composed question on the subject's image, answer ``hop(target)``.

        Different requests edit different entities while there are entities left.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        rng = random.Random(f"edits:{seed}")
        spec = self.spec
        # Entity order: one member of every look-alike pair first, then the partners, so a batch of
        # edits avoids editing both members of a pair (whose coupled probes would then conflict).
        pairs = list(spec.lookalikes)
        rng.shuffle(pairs)
        firsts, seconds = [], []
        for a, b in pairs:
            a, b = (a, b) if rng.random() < 0.5 else (b, a)
            firsts.append(a)
            seconds.append(b)
        paired = {x for p in pairs for x in p}
        singles = [e for e in spec.entities if e not in paired]
        rng.shuffle(singles)
        order = firsts + singles + seconds
        relations = self.split_relations(split)
        if split is not None:
            order = [e for e in order if self.entity_split(e) == split]
        # candidates in rounds: every entity once before any entity twice
        candidates: list[tuple[str, str, int]] = []
        used: dict[str, set[str]] = {e: set() for e in order}
        for _ in relations:
            for e in order:
                partner = self.lookalike_of(e)
                free = [r for r in relations if r not in used[e]]
                pref = [r for r in free if partner is None or r not in used[partner]]
                rel = rng.choice(pref or free)
                used[e].add(rel)
                # the edit is asked in the pool's wording (the canonical one): every other wording of the
                # relation stays a probe, for this edit and for every other edit of a sequential pack
                candidates.append((e, rel, 0))
        # keep facts the model answers right (canonical view, the edit wording); checked in chunks
        chosen: list[tuple[str, str, int]] = []
        edited: set[tuple[str, str]] = set()
        correct: dict[tuple[str, str, int], bool] = {}
        # strict pass: never the same relation on both members of a look-alike pair; then relaxed
        # (the look-alike probe is dropped where the partner's same fact is edited too)
        for strict in (True, False):
            pos = 0
            while len(chosen) < n and pos < len(candidates):
                chunk = candidates[pos : pos + max(16, 2 * (n - len(chosen)))]
                pos += len(chunk)
                todo = [c for c in chunk if c not in correct]
                if todo:
                    preds = self.ask_many(
                        [self.render(e, 0) for e, _, _ in todo], [IMAGE_TEMPLATES[r][0][t] for _, r, t in todo]
                    )
                    correct.update({c: p == spec.answers[c[1]][c[0]] for c, p in zip(todo, preds)})
                for e, rel, t in chunk:
                    if len(chosen) == n or not correct[(e, rel, t)] or (e, rel) in edited:
                        continue
                    if strict and (self.lookalike_of(e), rel) in edited:
                        continue
                    chosen.append((e, rel, t))
                    edited.add((e, rel))
        if len(chosen) < n:
            raise ValueError(
                f"asked for {n} edit requests but only {len(chosen)} non-conflicting facts are answered correctly"
            )

        drafts = []
        pending: list[tuple[Image.Image | None, str]] = []  # probes needing the model's current answer

        def need(image: Image.Image | None, prompt: str) -> int:
            pending.append((image, prompt))
            return len(pending) - 1

        text_pool = [(trel, subj, ans) for trel, by_s in spec.hops.items() for subj, ans in by_s.items()]
        for k, (e, rel, t) in enumerate(chosen):
            cur = spec.answers[rel][e]
            hop = spec.hops[RELATED[rel]["hop"]]
            vocab = [a for a in self.answer_vocab(rel) if a != cur]
            better = [a for a in vocab if hop[a] != hop[cur]]
            target = rng.choice(better or vocab)
            img = self.render(e, 0)
            prompt = IMAGE_TEMPLATES[rel][0][t]
            rephrases = [p for p in self.question_bank(rel) if p != prompt and p not in self.pool_wordings(rel)]
            views = [self.render(e, v) for v in self.heldout_views(n_views, offset=100 + n_views * k)]
            partner = self.lookalike_of(e)
            # locality: text facts that mention neither the subject nor its answers, and whose answer
            # is neither the old nor the new one (such a probe could not see a leak)
            banned = {e, target, *(spec.answers[r][e] for r in EDIT_RELATIONS)}
            loc_src = [x for x in text_pool if x[1] not in banned and x[2] not in (cur, target)]
            loc = [
                need(None, TEXT_TEMPLATES[x[0]][0][rng.randrange(len(TEXT_TEMPLATES[x[0]][0]))].format(x=x[1]))
                for x in rng.sample(loc_src, min(n_locality, len(loc_src)))
            ]
            m_src = [(o, r2) for o in spec.entities if o not in (e, partner) for r2 in relations if (o, r2) not in edited]
            m_loc = [
                need(self.render(o, 0), IMAGE_TEMPLATES[r2][0][rng.randrange(len(IMAGE_TEMPLATES[r2][0]))])
                for o, r2 in rng.sample(m_src, min(n_locality, len(m_src)))
            ]
            coupled = []
            for r2 in relations:
                if r2 != rel and (e, r2) not in edited:
                    coupled.append(("same_image_other_question", img, need(img, IMAGE_TEMPLATES[r2][1][0])))
            if partner is not None and (partner, rel) not in edited:
                pimg = self.render(partner, 0)
                coupled.append(("lookalike_same_question", pimg, need(pimg, prompt)))
                coupled.append(("lookalike_same_question", pimg, need(pimg, IMAGE_TEMPLATES[rel][1][0])))
            drafts.append((e, rel, t, cur, target, img, prompt, rephrases, views, loc, m_loc, coupled))

        current = self.ask_many([p[0] for p in pending], [p[1] for p in pending])
        requests = []
        for e, rel, t, cur, target, img, prompt, rephrases, views, loc, m_loc, coupled in drafts:
            info = RELATED[rel]
            port_ans = spec.hops[info["hop"]][target]
            composed_t = IMAGE_TEMPLATES[info["composed"]][0]
            t = t % len(composed_t)
            requests.append(
                EditRequest(
                    prompt=prompt,
                    target=target,
                    image=img,
                    ground_truth=cur,
                    rephrase_prompts=rephrases,
                    rephrase_images=views,
                    locality=[Probe(pending[i][1], current[i], None, kind="text") for i in loc],
                    m_locality=[Probe(pending[i][1], current[i], pending[i][0], kind="image") for i in m_loc],
                    coupled=[Probe(pending[i][1], current[i], im, kind=kind) for kind, im, i in coupled],
                    portability=[Probe(composed_t[t], port_ans, img, kind=f"composed:{info['composed']}")],
                    subject=e,
                    relation=rel,
                )
            )
        return requests


# ---------------------------------------------------------------------- rendering helper


def _render(spec: WorldSpec, i: int, view: int) -> Image.Image:
    entity_seed = spec.seed * 1_000_003 + i
    return _emblems.render(
        spec.designs[i], IMAGE_SIZE, _emblems.view_params(entity_seed, view), noise_seed=entity_seed * 7919 + view
    )
