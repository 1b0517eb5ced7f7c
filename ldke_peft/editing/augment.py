"""Automatic positives and negatives when a request does not bring its own.

* Image views (positives for M-Generality): mild random crops, shifts, small rotations, colour jitter
  and flips. Deliberately milder than "another object": a view must still show the same entity.
* Templated rephrasings and rule-based paraphrases (positives for T-Generality) when a request has
  no rephrased prompts of its own.
* A generic question bank (hard negatives: same image + another question) of domain-free VQA
  questions (colour, count, shape, ...), added to the caller's own bank. It names no domain: questions
  about the caller's subject matter come from the caller's negatives (``NegativePool``).

Layer: editing, a leaf (README "Architecture"): imports nothing of the library.
"""

from __future__ import annotations

import random
from typing import Sequence

from PIL import Image, ImageEnhance, ImageOps

GENERIC_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What color is the object in the image?", "color"),
    ("How many objects are in the picture?", "count"),
    ("What is shown in the image?", "identity"),
    ("Where was this picture taken?", "location"),
    ("What shape is the main object?", "shape"),
    ("Is this image in black and white?", "bw"),
    ("What is the background of the image?", "background"),
    ("What material is the object made of?", "material"),
    ("What is the name of the thing in this picture?", "name"),
    ("Describe the image in one word.", "describe"),
)

_REPHRASE_TEMPLATES: tuple[str, ...] = (
    "Question: {q}",
    "{q} Answer briefly.",
    "Please answer: {q}",
    "Tell me, {ql}",
)


def image_views(image: Image.Image, n: int, seed: int = 0, mirror: bool = True) -> list[Image.Image]:
    """``n`` augmented views of ``image`` (deterministic for a seed).

    ``mirror=False`` leaves out the horizontal flips (the other transforms, and so every unflipped view,
    stay the same): a mirror image keeps what is *asked* about it but not always *which* entity it shows
    (text, logos, flags, a landmark's layout), so it suits the delta's positives but not the router's
    picture of where an entity's images lie.
    """
    rng = random.Random(seed)
    w, h = image.size
    out = []
    for _ in range(n):
        im = image.convert("RGB")
        s = rng.uniform(0.85, 1.0)
        cw, ch = max(1, int(w * s)), max(1, int(h * s))
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
        im = im.rotate(rng.uniform(-8, 8), resample=Image.BILINEAR, fillcolor=im.getpixel((0, 0)))
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.85, 1.15))
        im = ImageEnhance.Color(im).enhance(rng.uniform(0.85, 1.15))
        if rng.random() < 0.3 and mirror:
            im = ImageOps.mirror(im)
        out.append(im)
    return out


def templated_rephrasings(prompt: str, n: int = 2) -> list[str]:
    q = prompt.strip()
    ql = q[:1].lower() + q[1:]
    return [t.format(q=q, ql=ql) for t in _REPHRASE_TEMPLATES[:n]]


# Generic English question rewrites: (pattern, replacements). Each keeps the question's content words
# (what is asked, about what) and changes its form -- wh-word, imperative, contraction, deixis -- which
# is how people rephrase a question. Applied to the question itself and to its deictic variants.
_REWRITES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"^what is the (.+?)\?$", ("Which is the {0}?", "Name the {0}.", "Tell me the {0}.", "What's the {0}?",
                                "Give the {0}.")),
    (r"^what are the (.+?)\?$", ("Which are the {0}?", "Name the {0}.", "Tell me the {0}.")),
    (r"^which (\w+) is (.+?) in\?$", ("In which {0} is {1}?", "What {0} is {1} in?", "Name the {0} {1} is in.")),
    (r"^which (\w+) (.+?)\?$", ("What {0} {1}?", "Tell me which {0} {1}.")),
    (r"^what (\w+) (.+?)\?$", ("Which {0} {1}?", "Tell me what {0} {1}.")),
    (r"^(?:name|tell me|give) the (.+?)\.$", ("What is the {0}?", "Which is the {0}?")),
    (r"^(?:who|where|when|how) .+\?$", ()),
)
_DEIXIS = (
    (r"\bthis (\w+)", ("the {0} shown", "the {0} in the picture", "the {0} in this image")),
    (r"\bthe (\w+) (?:shown|in the (?:picture|image|photo))", ("this {0}",)),
)
_HEDGES = r"\b(?:main|primary|principal) "


def paraphrases(prompt: str, n: int = 8) -> list[str]:
    """Up to ``n`` rule-based rephrasings of a question (never the question itself).

    No model is needed and nothing is invented: the rewrites only move the question's own words between
    common question forms ("What is the X of Y?" -> "Name the X of Y.", "Which X ...?" -> "What X
    ...?", "this building" -> "the building shown", "the main entrance" -> "the entrance"). They are the
    router's textual positives when a request brings no rephrasings of its own: fitted on one wording,
    a scope would stop at the edges of that wording (the paper's causal misalignment).
    """
    import re

    q = " ".join(prompt.strip().split())
    if not q:
        return []
    bases = [q]
    for pat, reps in _DEIXIS:
        m = re.search(pat, q, flags=re.IGNORECASE)
        if m:
            bases += [q[: m.start()] + r.format(*m.groups()) + q[m.end():] for r in reps]
    if re.search(_HEDGES, q, flags=re.IGNORECASE):
        bases.append(re.sub(_HEDGES, "", q, count=1, flags=re.IGNORECASE))
    groups: list[list[str]] = []
    for b in bases:
        g = [b]
        for pat, reps in _REWRITES:
            m = re.match(pat, b, flags=re.IGNORECASE)
            if m:
                g += [r.format(*m.groups()) for r in reps]
                break
        groups.append(g)
    # alternate rewrites of the question itself with its deictic/hedge variants (each followed by its
    # own rewrites), so a small ``n`` still mixes the kinds of rewrite; frame templates come last
    own = groups[0][1:]
    others = [g[i] for i in range(max([len(g) for g in groups[1:]], default=0)) for g in groups[1:] if i < len(g)]
    out = [x for pair in zip(own, others) for x in pair]
    out += own[len(others):] + others[len(own):] + templated_rephrasings(q, 2)
    out = [o[:1].upper() + o[1:] for o in out]
    return [o for o in dedupe(out) if o.strip().casefold() != q.casefold()][:n]


def generic_question_bank() -> list[tuple[str, str]]:
    return list(GENERIC_QUESTIONS)


def dedupe(items: Sequence[str]) -> list[str]:
    seen, out = set(), []
    for x in items:
        k = x.strip().casefold()
        if k not in seen:
            seen.add(k)
            out.append(x)
    return out


STOP_WORDS = frozenset(
    "a an the of in on at to is are was what which who whom whose how this that these those there it its "
    "shown picture image photo do does please tell me name".split()
)


def content_words(q: str) -> set[str]:
    words = "".join(c.casefold() if c.isalnum() else " " for c in q).split()
    return {w for w in words if w not in STOP_WORDS}


def same_question(q: str, prompts: Sequence[str], fuzzy: bool = False) -> bool:
    """Exact match, or (``fuzzy``) a likely paraphrase: most content words shared.

    The fuzzy test guards requests without a ``relation``: a generic bank question that paraphrases
    the edit question must not become a negative, or the router would learn to reject the edit."""
    k = q.strip().casefold()
    if any(k == p.strip().casefold() for p in prompts):
        return True
    if not fuzzy:
        return False
    cq = content_words(q)
    for p in prompts:
        cp = content_words(p)
        if cq and cp and len(cq & cp) / len(cq | cp) >= 0.5:
            return True
    return False
