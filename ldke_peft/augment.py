"""Automatic positives and negatives when a request does not bring its own.

* Image views (positives for M-Generality): mild random crops, shifts, small rotations, colour jitter
  and flips. Deliberately milder than "another object": a view must still show the same entity.
* Templated rephrasings (positives for T-Generality) when a request has no rephrased prompts.
* A generic question bank (hard negatives: same image + another question) of common VQA relations,
  used when the caller supplies no bank of its own.
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
    ("What language is spoken in the country shown?", "language"),
    ("What currency is used in the country shown?", "currency"),
    ("On which continent is the country shown?", "continent"),
    ("What is the capital of the country shown?", "capital"),
)

_REPHRASE_TEMPLATES: tuple[str, ...] = (
    "Question: {q}",
    "{q} Answer briefly.",
    "Please answer: {q}",
    "Tell me, {ql}",
)


def image_views(image: Image.Image, n: int, seed: int = 0) -> list[Image.Image]:
    """``n`` augmented views of ``image`` (deterministic for a seed)."""
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
        if rng.random() < 0.3:
            im = ImageOps.mirror(im)
        out.append(im)
    return out


def templated_rephrasings(prompt: str, n: int = 2) -> list[str]:
    q = prompt.strip()
    ql = q[:1].lower() + q[1:]
    return [t.format(q=q, ql=ql) for t in _REPHRASE_TEMPLATES[:n]]


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
