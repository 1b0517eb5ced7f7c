"""The benchmark's fact table: real countries and four real-world relations.

Each fact has a canonical answer (what an edit's ``ground_truth`` is) and a few accepted spellings
(aliases) because a 135M chat model answers in free text: "The capital of Italy is Rome." counts as
correct for ``Rome``. Values are the common textbook answers (2024): where a country has several
official languages or capitals, the aliases list the ones a reader would accept, and the canonical
answer is the most common one.

The relations are worded twice: with the country named (the text-only question, which tells what the
language model knows) and with "this country" (the image question, which the MLLM must answer from
the emblem alone; it is also the edit prompt).

**Splits.** Every other wording belongs to exactly one of three sets (:data:`WORDINGS`), written
independently of each other and of anything under ``ldke_peft/`` outside ``bench/``:

* ``pool``: what the benchmark hands an editor as the caller's question bank (dev relations only);
* ``dev``: the in-scope probes of the dev split, on which defaults may be chosen;
* ``test``: the in-scope probes of the test split (at least 8 per relation, in varied forms:
  wh-question, imperative, indirect, colloquial, short, long), used for reporting only.

:data:`HELDOUT_RELATION` is never edited, asked or pooled in the dev split. :data:`NEAR_MISS` holds,
per relation, a question on the same topic that must *not* follow the edit (capital vs largest city),
worded per split; its answers are the base model's own.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

__all__ = [
    "COUNTRIES",
    "HELDOUT_RELATION",
    "NEAR_MISS",
    "SPLITS",
    "WORDINGS",
    "RELATIONS",
    "Country",
    "Relation",
    "answer_matches",
    "split_relations",
    "country_by_name",
    "fold_answer",
]


@dataclass(frozen=True)
class Relation:
    """A relation with its text-only and image question templates."""

    name: str
    text_question: str  # formatted with {country}
    image_question: str  # refers to "this country" (the image)
    rephrases: tuple[str, ...] = ()  # other wordings of the image question (T-Generality probes)

    def ask_text(self, country: "Country") -> str:
        return self.text_question.format(country=country.prompt_name)


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation(
            "capital",
            "What is the capital of {country}?",
            "What is the capital of this country?",
            ("Which city is the capital of this country?", "Name the capital city of this country."),
        ),
        Relation(
            "language",
            "What is the main language of {country}?",
            "What is the main language of this country?",
            ("Which language do people speak in this country?", "What is the official language of this country?"),
        ),
        Relation(
            "continent",
            "Which continent is {country} in?",
            "Which continent is this country in?",
            ("On which continent is this country?", "Name the continent where this country lies."),
        ),
        Relation(
            "currency",
            "What is the currency of {country}?",
            "What is the currency of this country?",
            ("Which currency is used in this country?", "Name the money used in this country."),
        ),
    )
}


SPLITS: tuple[str, ...] = ("dev", "test")

#: Never edited, asked or pooled in the dev split: no default can have been chosen on it.
HELDOUT_RELATION = "currency"

#: ``WORDINGS[relation][set]``: image questions beyond the edit prompt (see the module docstring).
WORDINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "capital": {
        "pool": ("Which city is the capital of this country?",),
        "dev": (
            "Name the capital city of this country.",
            "What city serves as this country's capital?",
            "Where is the seat of government of this country?",
            "Give me the capital of the country in the picture.",
            "Do you know what city is the capital here?",
            "Hey, what's the capital over there?",
            "If someone wanted to visit the government seat of the country shown by this emblem, which city would they travel to?",
            "The capital here is?",
            "This country's capital is which city?",
        ),
        "test": (
            "What's the capital city of the nation on this flag?",
            "Tell me the name of this country's capital.",
            "I'd like to know which city is the capital of this country.",
            "Capital of this country?",
            "Which city is the seat of the national government of the country this flag belongs to?",
            "Could you tell me what the capital of this nation is?",
            "So what's this country's capital, then?",
            "In which city does this country have its capital?",
            "Identify the capital of the country represented here.",
        ),
    },
    "language": {
        "pool": ("Which language do people speak in this country?",),
        "dev": (
            "What is the official language of this country?",
            "Name the language spoken in this country.",
            "What language do most people in this country speak?",
            "Give me the language spoken by the people of the country in the picture.",
            "Do you know what language people talk in here?",
            "Hey, what language do they use over there?",
            "If I moved to the country shown by this emblem, which language would I need to learn to talk with locals?",
            "Language spoken here?",
            "This country's people mainly speak which language?",
        ),
        "test": (
            "What language do they speak in the country on this flag?",
            "Tell me the main language of this nation.",
            "I wonder which language is spoken in this country.",
            "Language of this country?",
            "If I traveled to the country whose flag this is, what language would I mostly hear people speaking?",
            "Could you say what the national language of this country is?",
            "So what do folks speak over there in this country?",
            "Which tongue is most widely spoken in this nation?",
            "Identify the primary language of the country represented here.",
        ),
    },
    "continent": {
        "pool": ("On which continent is this country?",),
        "dev": (
            "Name the continent where this country lies.",
            "What continent is this country located on?",
            "This country is part of which continent?",
            "Give me the continent of the country in the picture.",
            "Do you know which continent this place is on?",
            "Hey, what continent's that country in?",
            "If you flew to the country shown by this emblem, which continent would you land on?",
            "Continent here?",
            "This country sits on which continent?",
        ),
        "test": (
            "What continent is the nation on this flag part of?",
            "Tell me which continent this country belongs to.",
            "I'd like to know the continent where this country is found.",
            "Continent of this country?",
            "Looking at a world map, on which of the continents would you find the country this flag represents?",
            "Could you tell me what continent this nation is on?",
            "So which continent is this place in?",
            "Where in the world, continent-wise, is this country?",
            "Identify the continent of the country represented here.",
        ),
    },
    "currency": {
        "pool": (),
        "dev": (),
        "test": (
            "What money do they use in the country on this flag?",
            "Tell me the currency of this nation.",
            "I'd like to know which currency this country uses.",
            "Currency of this country?",
            "If I went shopping in the country this flag belongs to, what currency would I pay with?",
            "Could you tell me what the official currency of this country is?",
            "So what's the money called in this country?",
            "Which currency is legal tender in this nation?",
            "Identify the currency of the country represented here.",
        ),
    },
}

#: ``NEAR_MISS[relation][split]``: same topic or words, another fact (its answer is the model's own).
NEAR_MISS: dict[str, dict[str, tuple[str, ...]]] = {
    "capital": {
        "dev": ("Which city is the largest in this country?", "Which city has the most inhabitants in this country?"),
        "test": ("What is the biggest city in this country?", "Name the most populous city of the nation on this flag."),
    },
    "continent": {
        "dev": ("Which ocean is closest to this country?", "Give me the sea or ocean next to the country in the picture."),
        "test": ("What is the nearest ocean to this country?", "Name the ocean that borders the nation on this flag."),
    },
    "language": {
        "dev": ("Which alphabet is used to write the language of this country?", "What alphabet do people write with in this country?"),
        "test": ("What writing system does this country use?", "Name the script in which this nation's language is written."),
    },
    "currency": {
        "dev": (),
        "test": ("Which bank issues the money of this country?", "Name the central bank of the nation on this flag."),
    },
}


def split_relations(split: str) -> list[str]:
    """The relations edited and asked in ``split`` (dev lacks :data:`HELDOUT_RELATION`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return [r for r in RELATIONS if split == "test" or r != HELDOUT_RELATION]


@dataclass(frozen=True)
class Country:
    """One entity: its name and one accepted-answer tuple per relation (canonical answer first)."""

    name: str
    capital: tuple[str, ...]
    language: tuple[str, ...]
    continent: tuple[str, ...]
    currency: tuple[str, ...]
    article: bool = False  # "the United Kingdom"
    aliases: tuple[str, ...] = field(default=())

    @property
    def prompt_name(self) -> str:
        return f"the {self.name}" if self.article else self.name

    def answers(self, relation: str) -> tuple[str, ...]:
        if relation not in RELATIONS:
            raise KeyError(f"unknown relation {relation!r}; known: {', '.join(RELATIONS)}")
        return getattr(self, relation)

    def answer(self, relation: str) -> str:
        """The canonical answer of ``relation``."""
        return self.answers(relation)[0]


def _c(name, capital, language, continent, currency, article=False):
    tup = lambda v: (v,) if isinstance(v, str) else tuple(v)  # noqa: E731
    return Country(name, tup(capital), tup(language), tup(continent), tup(currency), article)


EU, AS, AF, NA, SA, OC = "Europe", "Asia", "Africa", "North America", "South America", "Oceania"
NA_C = ("North America", "Central America")
NA_K = ("North America", "Caribbean", "Central America")
OC_A = ("Oceania", "Australia")
EURO = ("euro",)

#: The entities, in a fixed order (their index seeds their emblem).
COUNTRIES: tuple[Country, ...] = (
    # Europe
    _c("France", "Paris", "French", EU, EURO),
    _c("Germany", "Berlin", "German", EU, EURO),
    _c("Italy", "Rome", "Italian", EU, EURO),
    _c("Spain", "Madrid", "Spanish", EU, EURO),
    _c("Portugal", "Lisbon", "Portuguese", EU, EURO),
    _c("United Kingdom", "London", "English", EU, ("pound", "sterling"), article=True),
    _c("Ireland", "Dublin", ("Irish", "English"), EU, EURO),
    _c("Netherlands", "Amsterdam", "Dutch", EU, EURO, article=True),
    _c("Greece", "Athens", "Greek", EU, EURO),
    _c("Poland", "Warsaw", "Polish", EU, ("zloty", "złoty")),
    _c("Sweden", "Stockholm", "Swedish", EU, ("krona",)),
    _c("Norway", "Oslo", "Norwegian", EU, ("krone",)),
    _c("Denmark", "Copenhagen", "Danish", EU, ("krone",)),
    _c("Finland", "Helsinki", ("Finnish", "Swedish"), EU, EURO),
    _c("Austria", "Vienna", "German", EU, EURO),
    _c("Switzerland", "Bern", ("German", "French", "Italian"), EU, ("Swiss franc", "franc")),
    _c("Hungary", "Budapest", "Hungarian", EU, ("forint",)),
    _c("Czech Republic", "Prague", "Czech", EU, ("koruna", "crown"), article=True),
    _c("Romania", "Bucharest", "Romanian", EU, ("leu",)),
    _c("Ukraine", "Kyiv", "Ukrainian", EU, ("hryvnia", "hryvna")),
    _c("Russia", ("Moscow",), "Russian", (EU, AS), ("ruble", "rouble")),
    _c("Iceland", "Reykjavik", "Icelandic", EU, ("krona", "króna")),
    _c("Croatia", "Zagreb", "Croatian", EU, EURO),
    _c("Serbia", "Belgrade", "Serbian", EU, ("dinar",)),
    _c("Bulgaria", "Sofia", "Bulgarian", EU, ("lev",)),
    _c("Belgium", "Brussels", ("Dutch", "French", "German", "Flemish"), EU, EURO),
    # Asia
    _c("Japan", "Tokyo", "Japanese", AS, ("yen",)),
    _c("China", ("Beijing", "Peking"), ("Chinese", "Mandarin"), AS, ("yuan", "renminbi")),
    _c("India", ("New Delhi", "Delhi"), ("Hindi", "English"), AS, ("rupee",)),
    _c("South Korea", "Seoul", "Korean", AS, ("won",)),
    _c("Thailand", "Bangkok", "Thai", AS, ("baht",)),
    _c("Vietnam", "Hanoi", "Vietnamese", AS, ("dong",)),
    _c("Indonesia", "Jakarta", "Indonesian", AS, ("rupiah",)),
    _c("Philippines", "Manila", ("Filipino", "Tagalog", "English"), AS, ("peso",), article=True),
    _c("Malaysia", "Kuala Lumpur", "Malay", AS, ("ringgit",)),
    _c("Pakistan", "Islamabad", ("Urdu", "English"), AS, ("rupee",)),
    _c("Bangladesh", "Dhaka", ("Bengali", "Bangla"), AS, ("taka",)),
    _c("Iran", "Tehran", ("Persian", "Farsi"), AS, ("rial",)),
    _c("Iraq", "Baghdad", ("Arabic", "Kurdish"), AS, ("dinar",)),
    _c("Saudi Arabia", "Riyadh", "Arabic", AS, ("riyal",)),
    _c("Israel", "Jerusalem", "Hebrew", AS, ("shekel",)),
    _c("Afghanistan", "Kabul", ("Pashto", "Dari", "Persian"), AS, ("afghani",)),
    _c("Nepal", "Kathmandu", "Nepali", AS, ("rupee",)),
    _c("Mongolia", ("Ulaanbaatar", "Ulan Bator"), "Mongolian", AS, ("tugrik", "tögrög")),
    _c("Kazakhstan", "Astana", ("Kazakh", "Russian"), AS, ("tenge",)),
    _c("Syria", "Damascus", "Arabic", AS, ("pound",)),
    _c("Jordan", "Amman", "Arabic", AS, ("dinar",)),
    _c("Qatar", "Doha", "Arabic", AS, ("riyal",)),
    _c("Turkey", "Ankara", "Turkish", (AS, EU), ("lira",)),
    # Africa
    _c("Egypt", "Cairo", "Arabic", AF, ("pound",)),
    _c("Nigeria", "Abuja", "English", AF, ("naira",)),
    _c("Kenya", "Nairobi", ("Swahili", "English"), AF, ("shilling",)),
    _c("Ethiopia", "Addis Ababa", "Amharic", AF, ("birr",)),
    _c("South Africa", ("Pretoria", "Cape Town", "Bloemfontein"), ("English", "Zulu", "Afrikaans", "Xhosa"), AF, ("rand",)),
    _c("Morocco", "Rabat", ("Arabic", "Berber", "Amazigh"), AF, ("dirham",)),
    _c("Ghana", "Accra", "English", AF, ("cedi",)),
    _c("Algeria", "Algiers", "Arabic", AF, ("dinar",)),
    _c("Tanzania", "Dodoma", ("Swahili", "English"), AF, ("shilling",)),
    _c("Uganda", "Kampala", ("English", "Swahili"), AF, ("shilling",)),
    _c("Senegal", "Dakar", "French", AF, ("CFA franc", "franc")),
    _c("Tunisia", "Tunis", "Arabic", AF, ("dinar",)),
    _c("Libya", "Tripoli", "Arabic", AF, ("dinar",)),
    _c("Sudan", "Khartoum", ("Arabic", "English"), AF, ("pound",)),
    _c("Angola", "Luanda", "Portuguese", AF, ("kwanza",)),
    _c("Madagascar", "Antananarivo", ("Malagasy", "French"), AF, ("ariary",)),
    _c("Rwanda", "Kigali", ("Kinyarwanda", "English", "French"), AF, ("franc",)),
    # Americas
    _c("United States", ("Washington",), "English", NA, ("dollar",), article=True),
    _c("Canada", "Ottawa", ("English", "French"), NA, ("dollar",)),
    _c("Mexico", "Mexico City", "Spanish", NA, ("peso",)),
    _c("Brazil", ("Brasília", "Brasilia"), "Portuguese", SA, ("real",)),
    _c("Argentina", "Buenos Aires", "Spanish", SA, ("peso",)),
    _c("Chile", "Santiago", "Spanish", SA, ("peso",)),
    _c("Peru", "Lima", ("Spanish", "Quechua"), SA, ("sol",)),
    _c("Colombia", ("Bogotá", "Bogota"), "Spanish", SA, ("peso",)),
    _c("Venezuela", "Caracas", "Spanish", SA, ("bolívar", "bolivar")),
    _c("Cuba", "Havana", "Spanish", NA_K, ("peso",)),
    _c("Ecuador", "Quito", "Spanish", SA, ("dollar",)),
    _c("Uruguay", "Montevideo", "Spanish", SA, ("peso",)),
    _c("Jamaica", "Kingston", "English", NA_K, ("dollar",)),
    _c("Guatemala", "Guatemala City", "Spanish", NA_C, ("quetzal",)),
    # Oceania
    _c("Australia", "Canberra", "English", OC_A, ("dollar",)),
    _c("New Zealand", "Wellington", ("English", "Maori", "Māori"), OC_A, ("dollar",)),
    _c("Fiji", "Suva", ("English", "Fijian"), OC_A, ("dollar",)),
    _c("Papua New Guinea", "Port Moresby", ("English", "Tok Pisin"), OC_A, ("kina",)),
)


def country_by_name(name: str) -> Country:
    for c in COUNTRIES:
        if c.name.lower() == name.lower():
            return c
    raise KeyError(f"unknown country {name!r}")


#: letters that NFKD does not decompose into an ASCII base letter
_SPECIAL_LETTERS = str.maketrans({"ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "ø": "o", "Ø": "O", "æ": "ae", "ß": "ss"})


def fold_answer(text: str) -> str:
    """Lower-case, strip accents and punctuation, collapse whitespace: the form in which a generated answer is
    matched against accepted ones (not the metrics' ``normalize_answer``, which keeps accents and punctuation)."""
    text = text.translate(_SPECIAL_LETTERS)
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = re.sub(r"[^0-9a-z]+", " ", text.lower())
    return " ".join(text.split())


def answer_matches(generated: str, accepted: tuple[str, ...] | list[str] | str) -> bool:
    """True when any accepted answer occurs in ``generated`` as whole words (accent/case-insensitive).

    "Exact-ish": ``"The capital of Italy is Rome."`` matches ``("Rome",)``; ``"Romania"`` does not.
    """
    if isinstance(accepted, str):
        accepted = (accepted,)
    hay = f" {fold_answer(generated)} "
    return any(f" {fold_answer(a)} " in hay for a in accepted if fold_answer(a))
