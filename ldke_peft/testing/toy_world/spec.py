"""The toy world's specification: constants, question templates, the invented facts (:class:`WorldSpec`,
:func:`make_spec`) and the model/training sizes per world size."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence


from .. import _emblems


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
