"""A toy world: a tiny real LLaVA that *knows* facts about invented countries.

Every LDKE test and the demo need a multimodal model that answers factual questions correctly, so
that an edit has something to change and locality has something to keep. Pretrained MLLMs are far
too big for CPU tests, so :func:`toy_world` trains one from scratch in well under a minute:

* **Entities** are invented countries with procedural names. Each has an emblem (a flag drawn from
  a layout and colours, see :mod:`._emblems`) and many augmented *views* of it, so "another photo of
  the same entity" is a real generalisation probe. Entities come in **look-alike pairs** whose
  emblems differ only in one recoloured region: the hardest coupled-locality probe.
* **Relations** asked about the image (capital, language, currency, national animal), each with
  three training templates and one template held out for evaluation only.
* **Composed questions** ("Which river flows through the capital of the country shown?") are
  trained for every entity: after editing ``capital(X) := C'`` the portability probe expects
  ``river(C')``.
* **Text-only facts** (no image): "What is the capital of <country>?", "Which river flows through
  <city>?", and one second-hop fact per answer of every relation.

The model is a real ``LlavaForConditionalGeneration`` (Llama text model with 6 decoder layers, a
small CLIP vision tower) with the real ``LlavaProcessor``, and every input is built with
``family_of(model).build_inputs`` -- the same code path the library uses -- so the world matches
what the editor and the metrics see. Built worlds are cached on disk (safetensors + JSON) and load in
about a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from ..io import default_dir_mode
from ..requests import EditRequest, Probe
from . import _emblems

logger = logging.getLogger(__name__)

__all__ = [
    "ToyWorld", "WorldSpec", "toy_world", "build_world", "one_thread", "CODE_VERSION", "DEFAULT_N_ENTITIES",
    "HELDOUT_VIEW_START",
]

#: Bump whenever the facts, rendering, model or training change: it is part of the cache key.
#: 4: the build pins torch to one thread itself (the weights no longer depend on ``OMP_NUM_THREADS``;
#: a v3 cache may hold a default-thread build, so it is not reused). v4 weights = v3 one-thread weights.
CODE_VERSION = 4
#: Default world size: 16 entities x 4 relations = 64 image facts, trained in ~30 s on one core.
DEFAULT_N_ENTITIES = 16
IMAGE_SIZE = 32
PATCH_SIZE = 16  # 32x32 images -> 4 image tokens (CLS dropped): short sequences, fast training
#: Views ``>= HELDOUT_VIEW_START`` are never used in training, whatever the world size.
HELDOUT_VIEW_START = 10_000
EOS = "</s>"

# ---------------------------------------------------------------------- templates
# Image questions: (training templates, evaluation-only templates). Every word of an evaluation
# template also occurs in some training text, so a held-out wording is new, not unreadable.

#: Relations an edit can change, in a fixed order.
EDIT_RELATIONS = ("capital", "language", "currency", "animal")

#: The held-out protocol's splits: ``dev`` (defaults may be chosen on it) and ``test`` (reported).
SPLITS = ("dev", "test")
#: Never edited, asked or pooled in the dev split.
HELDOUT_RELATION = "animal"

IMAGE_TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "capital": (
        (
            "What is the capital of the country shown?",
            "Which city is the capital of this country?",
            "Name the capital of the country in the picture.",
        ),
        ("What city is the capital of the country in the picture?",),
    ),
    "language": (
        (
            "What language is spoken in the country shown?",
            "Which language do people speak in this country?",
            "Name the language of the country in the picture.",
        ),
        ("What is the language of this country?",),
    ),
    "currency": (
        (
            "What is the currency of the country shown?",
            "Which currency is used in this country?",
            "Name the currency of the country in the picture.",
        ),
        ("What currency is used in the country in the picture?",),
    ),
    "animal": (
        (
            "What is the national animal of the country shown?",
            "Which animal is the symbol of this country?",
            "Name the national animal of the country in the picture.",
        ),
        ("What animal is the symbol of the country in the picture?",),
    ),
    "river_of_capital": (
        (
            "Which river flows through the capital of the country shown?",
            "What river runs through the capital of this country?",
            "Name the river in the capital of the country in the picture.",
        ),
        ("Which river runs through the capital of the country in the picture?",),
    ),
    "script_of_language": (
        (
            "Which script is the language of the country shown written in?",
            "In which script is the language of this country written?",
            "Name the script of the language of the country in the picture.",
        ),
        ("What script is the language of this country written in?",),
    ),
    "metal_of_currency": (
        (
            "Which metal is the currency of the country shown made of?",
            "What metal is the currency of this country made of?",
            "Name the metal of the currency of the country in the picture.",
        ),
        ("What metal is the currency of the country in the picture made of?",),
    ),
    "diet_of_animal": (
        (
            "What does the national animal of the country shown eat?",
            "What food does the national animal of this country eat?",
            "Name the food of the national animal of the country in the picture.",
        ),
        ("What does the national animal of this country eat?",),
    ),
    "country": (
        ("Which country is shown?", "What country is this?", "Name the country in the picture."),
        ("Which country is in the picture?",),
    ),
}

#: Text-only questions about an answer of some relation: ``{x}`` is the subject.
TEXT_TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "capital_of": (("What is the capital of {x}?", "Which city is the capital of {x}?"), ("Name the capital of {x}.",)),
    "river": (("Which river flows through {x}?", "What river runs through {x}?"), ("Name the river in {x}.",)),
    "script": (("Which script is {x} written in?", "In which script is {x} written?"), ("Name the script of {x}.",)),
    "metal": (("Which metal is the {x} made of?", "What metal is the {x} made of?"), ("Name the metal of the {x}.",)),
    "diet": (("What does the {x} eat?", "What food does the {x} eat?"), ("Name the food of the {x}.",)),
}

#: Portability: editing ``relation`` changes the composed image question ``composed`` to
#: ``hop(new answer)``, where ``hop`` is a text relation over that relation's answers.
RELATED: dict[str, dict[str, str]] = {
    "capital": {"composed": "river_of_capital", "hop": "river"},
    "language": {"composed": "script_of_language", "hop": "script"},
    "currency": {"composed": "metal_of_currency", "hop": "metal"},
    "animal": {"composed": "diet_of_animal", "hop": "diet"},
}

ANIMALS = [
    "lion", "eagle", "bear", "wolf", "tiger", "falcon", "stag", "owl", "horse", "dragon", "heron", "lynx",
    "bison", "crane", "otter", "boar", "snow leopard", "red fox", "sea eagle", "black swan", "brown bear",
    "white horse", "camel", "panther",
]
METALS = ["gold", "silver", "copper", "bronze", "nickel", "iron", "tin", "brass"]
DIETS = ["meat", "fish", "grass", "fruit", "insects", "seeds", "leaves", "honey"]
_CURRENCY_ADJ = ["new", "royal", "old"]


# ---------------------------------------------------------------------- facts


@dataclass
class WorldSpec:
    """Everything about a world except the weights: plain data, saved as ``world.json``.

    Attributes:
        seed, n_entities: what the world was generated from.
        entities: country names, index = entity id.
        designs: one emblem per entity.
        lookalikes: pairs of entity names whose emblems differ in one recoloured region.
        answers: ``answers[relation][entity]`` for every image relation (edit relations, composed
            questions and ``"country"``).
        hops: ``hops[text_relation][subject]`` -- the text-only facts (``capital_of`` is keyed by
            country name, ``river`` by capital city, ``script`` by language, ...).
        train_views: views ``0 .. train_views - 1`` of every entity were used in training.
    """

    seed: int
    n_entities: int
    entities: list[str]
    designs: list[_emblems.Design]
    lookalikes: list[tuple[str, str]]
    answers: dict[str, dict[str, str]]
    hops: dict[str, dict[str, str]]
    train_views: int
    code_version: int = CODE_VERSION
    build_info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "code_version": self.code_version,
            "seed": self.seed,
            "n_entities": self.n_entities,
            "entities": self.entities,
            "designs": [d.to_json() for d in self.designs],
            "lookalikes": [list(p) for p in self.lookalikes],
            "answers": self.answers,
            "hops": self.hops,
            "train_views": self.train_views,
            "build_info": self.build_info,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "WorldSpec":
        return cls(
            seed=data["seed"],
            n_entities=data["n_entities"],
            entities=list(data["entities"]),
            designs=[_emblems.Design.from_json(d) for d in data["designs"]],
            lookalikes=[tuple(p) for p in data["lookalikes"]],
            answers=data["answers"],
            hops=data["hops"],
            train_views=data["train_views"],
            code_version=data["code_version"],
            build_info=data.get("build_info", {}),
        )


class _Namer:
    """Procedural names, unique across every vocabulary of a world (one word = one token)."""

    ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st", "sh", "th"]
    VOWELS = ["a", "e", "i", "o", "u", "ae", "ou", "ia"]
    CODAS = ["", "", "n", "r", "l", "s", "m", "k"]

    def __init__(self, rng: random.Random, taken: set[str]):
        self.rng = rng
        self.taken = taken

    def syllable(self) -> str:
        r = self.rng
        return r.choice(self.ONSETS) + r.choice(self.VOWELS) + r.choice(self.CODAS)

    def make(self, suffixes: Sequence[str], syllables: int = 2, capital: bool = True) -> str:
        for _ in range(10_000):
            stem = "".join(self.syllable() for _ in range(syllables))
            name = stem + self.rng.choice(suffixes)
            name = name.capitalize() if capital else name
            if name.lower() not in self.taken and len(name) <= 14:
                self.taken.add(name.lower())
                return name
        raise RuntimeError("name space exhausted")  # pragma: no cover


def _pool_size(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n // 2))


def make_spec(seed: int, n_entities: int, train_views: int) -> WorldSpec:
    """Generate the facts of a world (no model): deterministic in ``(seed, n_entities)``."""
    rng = random.Random(f"toy-world:{seed}:{n_entities}")
    taken = {w.lower() for t in list(IMAGE_TEMPLATES.values()) + list(TEXT_TEMPLATES.values()) for s in t[0] + t[1] for w in s.split()}
    taken |= {w for a in ANIMALS + METALS + DIETS + _CURRENCY_ADJ for w in a.split()}
    namer = _Namer(rng, taken)
    n = n_entities
    countries = [namer.make(["ia", "ora", "land", "avia", "enia", "istan", "ar"]) for _ in range(n)]
    capitals = [namer.make(["burg", "grad", "ton", "mar", "holm", "port", "vik"]) for _ in range(n)]
    rivers = [namer.make(["ava", "ene", "ube", "ara", "on", "ist"], syllables=1) for _ in range(n)]
    languages = [namer.make(["ish", "ic", "ese", "i"]) for _ in range(_pool_size(n, 4, 48))]
    scripts = [namer.make(["glyph", "rune", "script"], syllables=1) for _ in languages]
    currencies = []
    for i in range(_pool_size(n, 4, 48)):
        word = namer.make(["", "o", "al", "et"], syllables=1, capital=False)
        currencies.append(f"{_CURRENCY_ADJ[i % 3]} {word}" if i % 4 == 3 else word)
    animals = ANIMALS[: _pool_size(n, 6, len(ANIMALS))]

    designs, pairs = _emblems.make_designs(n, rng)

    def spread(pool: list[str]) -> list[str]:
        # every answer of the pool is used at least once (when n allows), then random
        out = [pool[i % len(pool)] for i in range(n)]
        rng.shuffle(out)
        return out

    lang, curr, anim = spread(languages), spread(currencies), spread(animals)
    hops = {
        "capital_of": dict(zip(countries, capitals)),
        "river": dict(zip(capitals, rivers)),
        "script": dict(zip(languages, scripts)),
        "metal": {c: METALS[i % len(METALS)] for i, c in enumerate(currencies)},
        "diet": {a: DIETS[i % len(DIETS)] for i, a in enumerate(animals)},
    }
    answers: dict[str, dict[str, str]] = {"country": {c: c for c in countries}}
    answers["capital"] = dict(zip(countries, capitals))
    answers["language"] = dict(zip(countries, lang))
    answers["currency"] = dict(zip(countries, curr))
    answers["animal"] = dict(zip(countries, anim))
    for rel, info in RELATED.items():
        answers[info["composed"]] = {c: hops[info["hop"]][answers[rel][c]] for c in countries}
    return WorldSpec(
        seed=seed,
        n_entities=n,
        entities=countries,
        designs=designs,
        lookalikes=[(countries[a], countries[b]) for a, b in pairs],
        answers=answers,
        hops=hops,
        train_views=train_views,
    )


# ---------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class _Recipe:
    """Model size and training schedule for a world of a given size."""

    text_hidden: int  # Llama hidden size (MLP = 2x)
    text_layers: int
    vision_hidden: int
    vision_layers: int
    train_views: int
    steps: int
    batch_size: int
    lr: float


def _recipe(n: int) -> _Recipe:
    # Tuned on one CPU core: the default (n=16) reaches 100% on held-out views in ~400 steps;
    # 500 leave a margin across seeds. Larger worlds need more capacity and more steps per fact.
    if n <= 32:
        return _Recipe(64, 6, 64, 2, train_views=64, steps=500, batch_size=48, lr=3e-3)
    if n <= 256:
        return _Recipe(128, 6, 96, 2, train_views=48, steps=int(500 + 10 * n), batch_size=64, lr=2e-3)
    return _Recipe(128, 6, 128, 2, train_views=32, steps=int(2000 + 6 * n), batch_size=128, lr=2e-3)


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
        from ..families import family_of
        from ..model import attach_tokenizer

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
        from ..scope import NegativePool

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


# ---------------------------------------------------------------------- building


def _all_texts(spec: WorldSpec) -> list[str]:
    texts = []
    for train_t, eval_t in IMAGE_TEMPLATES.values():
        texts.extend(train_t + eval_t)
    for trel, (train_t, eval_t) in TEXT_TEMPLATES.items():
        for subj in spec.hops[trel]:
            texts.extend(t.format(x=subj) for t in train_t + eval_t)
    for by_e in spec.answers.values():
        texts.extend(by_e.values())
    for by_s in spec.hops.values():
        texts.extend(by_s.values())
    return texts


def _make_processor(words: Sequence[str]) -> Any:
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from ._tokenizer import word_tokenizer
    from .tiny import LLAVA_CHAT_TEMPLATE

    tok = word_tokenizer(words)
    ip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def _build_processor(spec: WorldSpec) -> Any:
    """A processor whose word-level vocabulary covers every text the world can produce.

    The vocabulary is collected by pre-tokenizing the *formatted* prompts (chat template applied)
    with a bootstrap processor, so pieces such as the newline-glued first word after ``<image>``
    are words too and nothing ever maps to ``<unk>``.
    """
    from ..families import get_family

    family = get_family("llava")
    texts = _all_texts(spec)
    base_words = {w for t in texts + ["USER: ASSISTANT:"] for w in t.replace("?", " ? ").replace(".", " . ").replace(":", " : ").split()}
    boot = _make_processor(sorted(base_words))
    pre = boot.tokenizer.backend_tokenizer.pre_tokenizer
    words = set(base_words)
    prompts = {t for tr, te in IMAGE_TEMPLATES.values() for t in tr + te}
    formatted = [family.format_prompt(boot, p, True) for p in prompts]
    formatted += [family.format_prompt(boot, t, False) for t in texts]
    formatted += [" " + a for a in texts]
    for f in formatted:
        for piece, _ in pre.pre_tokenize_str(f.replace(boot.image_token, " ")):
            piece = piece.replace("\u2581", "")
            if piece:
                words.add(piece)
    return _make_processor(sorted(words))


def _build_model(spec: WorldSpec, processor: Any, recipe: _Recipe, seed: int) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    th = recipe.text_hidden
    vh = recipe.vision_hidden
    vision = CLIPVisionConfig(
        hidden_size=vh, intermediate_size=vh * 2, num_hidden_layers=recipe.vision_layers, num_attention_heads=max(2, vh // 32),
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=th, intermediate_size=th * 2, num_hidden_layers=recipe.text_layers,
        num_attention_heads=max(2, th // 16), num_key_value_heads=max(1, th // 32), max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(processor.image_token),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


@dataclass
class _Rows:
    """Tokenised training rows: left-padded, targets (answer + EOS) at the end of every row."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    entity: torch.Tensor  # entity index for image rows, -1 for text rows


def _tokenise_rows(family: Any, processor: Any, spec: WorldSpec, render0: list[Image.Image]) -> tuple[_Rows, _Rows]:
    img_items, txt_items = [], []
    for i, e in enumerate(spec.entities):
        for rel, (train_t, _) in IMAGE_TEMPLATES.items():
            for t in train_t:
                img_items.append((i, t, spec.answers[rel][e]))
    for trel, by_s in spec.hops.items():
        for subj, ans in by_s.items():
            for t in TEXT_TEMPLATES[trel][0]:
                txt_items.append((-1, t.format(x=subj), ans))

    def build(items, with_image: bool) -> _Rows:
        parts = []
        for s in range(0, len(items), 512):
            chunk = items[s : s + 512]
            b = family.build_inputs(
                processor,
                [render0[i] for i, _, _ in chunk] if with_image else None,
                [p for _, p, _ in chunk],
                [a + EOS for _, _, a in chunk],
            )
            parts.append(b)
        T = max(p.input_ids.shape[1] for p in parts)
        pad_id = family.tokenizer(processor).pad_token_id

        def lpad(x, fill):
            return torch.cat([torch.full((x.shape[0], T - x.shape[1]), fill, dtype=x.dtype), x], dim=1)

        return _Rows(
            input_ids=torch.cat([lpad(p.input_ids, pad_id) for p in parts]),
            attention_mask=torch.cat([lpad(p.inputs["attention_mask"], 0) for p in parts]),
            target_mask=torch.cat([lpad(p.target_mask, False) for p in parts]),
            entity=torch.tensor([i for i, _, _ in items]),
        )

    return build(img_items, True), build(txt_items, False)


def _pixel_pool(spec: WorldSpec, processor: Any) -> torch.Tensor:
    """``(n_entities, train_views, 3, H, W)`` pixel values of every training view, made by the real
    image processor (the same transform ``build_inputs`` applies)."""
    n, V = spec.n_entities, spec.train_views
    out = torch.empty(n, V, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float16 if n * V > 20_000 else torch.float32)
    for i in range(n):
        imgs = [_render(spec, i, v) for v in range(V)]
        pv = processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
        out[i] = pv.to(out.dtype)
    return out


def _trim(*tensors: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Drop the left columns that are padding in every row."""
    keep = attention_mask.any(0).nonzero()
    start = int(keep[0]) if len(keep) else 0
    return [t[:, start:] for t in tensors]


def _train(model: Any, spec: WorldSpec, img: _Rows, txt: _Rows, pool: torch.Tensor, recipe: _Recipe, seed: int) -> dict[str, Any]:
    """Teacher-forced cross-entropy on the answer tokens (+ EOS), a random training view per image row.

    An auxiliary loss -- a throw-away linear head classifying the entity from the mean of the
    projected image tokens -- makes the vision tower tell entities apart within ~200 steps instead of
    thousands (recognition is the slow part when learning from scratch). The head is not saved: the
    world's model is a plain LLaVA.
    """
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(recipe.text_hidden, spec.n_entities)
    captured: dict[str, torch.Tensor] = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: captured.__setitem__("f", out))
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
    steps = recipe.steps
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    B = recipe.batch_size
    b_txt = max(4, B // 4)
    b_img = B - b_txt
    k_img = int(img.target_mask.sum(1).max())
    k_txt = int(txt.target_mask.sum(1).max())
    V = pool.shape[1]
    t0, c0 = time.perf_counter(), time.process_time()
    ema = None
    model.train()
    # a bar on a terminal; elsewhere (CI logs, pipes) an INFO line every 10% of the steps
    bar = tqdm(range(steps), desc="training the toy world", unit="step", disable=not _terminal(sys.stderr), leave=False)
    every = max(1, steps // 10)
    try:
        for step in bar:
            ii = torch.randint(len(img.input_ids), (b_img,), generator=g)
            ti = torch.randint(len(txt.input_ids), (b_txt,), generator=g)
            ents = img.entity[ii]
            pixel_values = pool[ents, torch.randint(V, (b_img,), generator=g)].float()
            loss = torch.zeros(())
            # image rows and text rows have very different lengths: two forwards, one step
            for rows, idx, pv, k, w in ((img, ii, pixel_values, k_img, b_img / B), (txt, ti, None, k_txt, b_txt / B)):
                am = rows.attention_mask[idx]
                ids, am, tm = _trim(rows.input_ids[idx], am, rows.target_mask[idx], attention_mask=am)
                out = model(input_ids=ids, attention_mask=am, pixel_values=pv, logits_to_keep=k + 1)
                m = tm[:, -k:]
                loss = loss + w * torch.nn.functional.cross_entropy(out.logits[:, :-1][m].float(), ids[:, -k:][m])
                if pv is not None:
                    feats = captured["f"].reshape(len(idx), -1, recipe.text_hidden).mean(1)
                    loss = loss + torch.nn.functional.cross_entropy(head(feats), ents)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            val = loss.item()
            ema = val if ema is None else 0.95 * ema + 0.05 * val
            if step % 10 == 0:
                bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
            if (step + 1) % every == 0:
                logger.log(logging.DEBUG if not bar.disable else logging.INFO, "toy world step %d/%d loss %.4f (%.0fs)",
                           step + 1, steps, ema, time.perf_counter() - t0)
    finally:
        bar.close()
        hook.remove()
        model.eval()
    return {
        "train_seconds": time.perf_counter() - t0,
        "train_cpu_seconds": time.process_time() - c0,
        "final_loss": float(ema or 0.0),
        "steps": steps,
    }


def _terminal(stream: Any) -> bool:
    """Can a progress bar be drawn on ``stream``? A terminal with a width (a pseudo-terminal without a
    size, as under ``script``, would show an empty bar)."""
    try:
        return bool(stream.isatty()) and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block; the caller's thread count is restored after.

    The toy world is built this way whatever ``OMP_NUM_THREADS`` says: its models are so small that
    extra threads only add overhead (2 cores: 927 s with torch's default vs 54 s with one thread), and
    the thread count changes the order of floating-point reductions, so the trained weights.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_world(
    seed: int = 0, n_entities: int = DEFAULT_N_ENTITIES, *, evaluate: bool = True, steps: int | None = None
) -> ToyWorld:
    """Generate and train a world (no cache). :func:`toy_world` is the cached entry point.

    Runs on one torch thread (:func:`one_thread`), so the weights are the same whatever the caller's
    thread settings. ``steps`` overrides the recipe's number of training steps (tests of the build
    itself; a world trained for fewer steps does not know its facts).
    """
    with one_thread():
        return _build_world(seed, n_entities, evaluate=evaluate, steps=steps)


def _build_world(seed: int, n_entities: int, *, evaluate: bool, steps: int | None) -> ToyWorld:
    from ..families import family_of

    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t0, c0 = time.perf_counter(), time.process_time()
    recipe = _recipe(n_entities)
    if steps is not None:
        recipe = dataclasses.replace(recipe, steps=int(steps))
    spec = make_spec(seed, n_entities, recipe.train_views)
    processor = _build_processor(spec)
    model = _build_model(spec, processor, recipe, seed)
    family = family_of(model)
    render0 = [_render(spec, i, 0) for i in range(n_entities)]
    img_rows, txt_rows = _tokenise_rows(family, processor, spec, render0)
    unk = processor.tokenizer.unk_token_id
    if bool((img_rows.input_ids == unk).any() or (txt_rows.input_ids == unk).any()):
        raise RuntimeError("toy world tokenizer produced <unk>; the vocabulary is incomplete")
    pool = _pixel_pool(spec, processor)
    t_prep = time.perf_counter() - t0
    logger.info(
        "toy world seed=%d n=%d: %d image rows, %d text rows, %d views/entity, %.1fM params; training %d steps",
        seed, n_entities, len(img_rows.input_ids), len(txt_rows.input_ids), spec.train_views,
        sum(p.numel() for p in model.parameters()) / 1e6, recipe.steps,
    )
    info = _train(model, spec, img_rows, txt_rows, pool, recipe, seed)
    info["prep_seconds"] = t_prep
    info["torch_threads"] = torch.get_num_threads()
    info["params"] = sum(p.numel() for p in model.parameters())
    info["recipe"] = recipe.__dict__
    spec.build_info = info
    world = ToyWorld(model=model, processor=processor, spec=spec)
    if evaluate:
        t1 = time.perf_counter()
        info["accuracy"] = world.accuracy()
        info["eval_seconds"] = time.perf_counter() - t1
    info["build_seconds"] = time.perf_counter() - t0
    info["build_cpu_seconds"] = time.process_time() - c0
    logger.info("toy world built in %.1fs: %s", info["build_seconds"], info.get("accuracy"))
    return world


# ---------------------------------------------------------------------- cache


def default_cache_root() -> Path:
    """``$LDKE_CACHE/toy_world`` if set, else ``~/.cache/ldke_peft/toy_world``."""
    env = os.environ.get("LDKE_CACHE")
    if env:
        return Path(env).expanduser() / "toy_world"
    return Path.home() / ".cache" / "ldke_peft" / "toy_world"


def cache_key(seed: int, n_entities: int) -> str:
    return f"v{CODE_VERSION}-seed{seed}-n{n_entities}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so concurrent processes build a world once (others wait, then load it)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: rely on the atomic rename alone
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def save_world(world: ToyWorld, directory: Path) -> None:
    """Write ``world`` to ``directory`` atomically (temp dir + rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        os.chmod(tmp, default_dir_mode())  # mkdtemp makes it private; the cache is meant to be shared
        world.model.save_pretrained(tmp / "model", safe_serialization=True)
        world.processor.save_pretrained(tmp / "processor")
        (tmp / "world.json").write_text(json.dumps(world.spec.to_json(), indent=1))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    world.path = directory


def load_world(directory: Path) -> ToyWorld:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    directory = Path(directory)
    spec = WorldSpec.from_json(json.loads((directory / "world.json").read_text()))
    if spec.code_version != CODE_VERSION:
        raise ValueError(f"cached world {directory} has code version {spec.code_version}, expected {CODE_VERSION}")
    model = LlavaForConditionalGeneration.from_pretrained(directory / "model")
    model.eval()
    processor = LlavaProcessor.from_pretrained(directory / "processor")
    return ToyWorld(model=model, processor=processor, spec=spec, path=directory)


def toy_world(
    seed: int = 0, n_entities: int | None = None, cache_dir: str | os.PathLike | None = None, *, force_rebuild: bool = False
) -> ToyWorld:
    """The toy world for ``(seed, n_entities)``: loaded from the cache, or built and cached.

    Args:
        seed: generates the names, facts, emblems and the model initialisation.
        n_entities: number of countries (default :data:`DEFAULT_N_ENTITIES`; >= 2).
        cache_dir: root of the cache (default :func:`default_cache_root`); the world lives in
            ``<cache_dir>/<cache_key(seed, n_entities)>``.
        force_rebuild: ignore (and replace) a cached copy.
    """
    n = DEFAULT_N_ENTITIES if n_entities is None else int(n_entities)
    if n < 2:
        raise ValueError(f"n_entities must be >= 2, got {n}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    key = cache_key(seed, n)
    directory = root / key
    with _file_lock(root / f".{key}.lock"):
        if directory.exists() and not force_rebuild:
            try:
                t0 = time.perf_counter()
                world = load_world(directory)
                logger.info("toy world loaded from %s in %.2fs", directory, time.perf_counter() - t0)
                return world
            except Exception as exc:  # noqa: BLE001 - a broken cache entry is rebuilt, not fatal
                logger.warning("cached toy world at %s is unreadable (%s); rebuilding", directory, exc)
        world = build_world(seed, n)
        save_world(world, directory)
        return world
