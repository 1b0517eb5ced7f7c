"""Procedural emblems (flags) for the toy world, and their augmented "views".

An emblem is a :class:`Design`: a layout (how the flag is split into regions) plus one colour per
region. Designs are plain data (JSON-ready), so a cached world re-renders exactly the same pixels.

Views make "another photo of the same entity" a real generalisation probe: view 0 is the canonical
emblem, every other view applies a deterministic random affine transform (rotation, scale, shift)
and photometric jitter (brightness, per-channel gain, noise). The jitter is kept well below the
distance between palette colours, so a look-alike (same layout, one region recoloured) stays
distinguishable from its partner under every view.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

#: Well-separated colours (names are for humans and for debugging only).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 30, 40),
    "white": (245, 245, 240),
    "navy": (25, 45, 150),
    "green": (20, 140, 60),
    "yellow": (250, 210, 25),
    "black": (20, 20, 20),
    "orange": (240, 120, 20),
    "sky": (100, 185, 240),
    "purple": (125, 40, 150),
    "pink": (245, 140, 190),
}
COLOURS = list(PALETTE)

#: Colour behind the flag (visible around it after shrinking/rotating). Not in the palette.
BACKDROP = (128, 128, 128)

#: Supersampling factor: emblems are drawn at ``size * SS`` and downsampled (anti-aliasing).
SS = 4

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Design:
    """A flag: ``layout`` name and one palette colour name per region (``colours[0]`` = field)."""

    layout: str
    colours: tuple[str, ...]

    def to_json(self) -> list:
        return [self.layout, list(self.colours)]

    @classmethod
    def from_json(cls, data: list) -> "Design":
        return cls(layout=data[0], colours=tuple(data[1]))


# ---------------------------------------------------------------------- layouts
# Each layout draws its regions on a flag rectangle given in unit coordinates (0..1 both ways).
# ``regions`` = number of colours it takes; adjacent regions always get different colours.

_Drawer = Callable[[ImageDraw.ImageDraw, Callable[[float, float], tuple[float, float]], list], None]


def _rect(d, P, x0, y0, x1, y1, c):
    d.polygon([P(x0, y0), P(x1, y0), P(x1, y1), P(x0, y1)], fill=c)


def _poly(d, P, pts, c):
    d.polygon([P(x, y) for x, y in pts], fill=c)


def _h3(d, P, c):
    for i in range(3):
        _rect(d, P, 0, i / 3, 1, (i + 1) / 3, c[i])


def _v3(d, P, c):
    for i in range(3):
        _rect(d, P, i / 3, 0, (i + 1) / 3, 1, c[i])


def _h2(d, P, c):
    _rect(d, P, 0, 0, 1, 0.5, c[0])
    _rect(d, P, 0, 0.5, 1, 1, c[1])


def _v2(d, P, c):
    _rect(d, P, 0, 0, 0.5, 1, c[0])
    _rect(d, P, 0.5, 0, 1, 1, c[1])


def _nordic(d, P, c):
    _rect(d, P, 0, 0, 1, 1, c[0])
    _rect(d, P, 0.28, 0, 0.44, 1, c[1])
    _rect(d, P, 0, 0.40, 1, 0.60, c[1])


def _plus(d, P, c):
    _rect(d, P, 0, 0, 1, 1, c[0])
    _rect(d, P, 0.40, 0.1, 0.60, 0.9, c[1])
    _rect(d, P, 0.1, 0.40, 0.9, 0.60, c[1])


def _saltire(d, P, c):
    _rect(d, P, 0, 0, 1, 1, c[0])
    w = 0.12
    _poly(d, P, [(0, 0), (w, 0), (1, 1 - w), (1, 1), (1 - w, 1), (0, w)], c[1])
    _poly(d, P, [(1, 0), (1, w), (w, 1), (0, 1), (0, 1 - w), (1 - w, 0)], c[1])


def _disc(d, P, c):
    _rect(d, P, 0, 0, 1, 1, c[0])
    pts = [(0.5 + 0.28 * math.cos(t), 0.5 + 0.33 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 32, endpoint=False)]
    _poly(d, P, pts, c[1])


def _hoist(d, P, c):
    _rect(d, P, 0, 0, 1, 0.5, c[0])
    _rect(d, P, 0, 0.5, 1, 1, c[1])
    _poly(d, P, [(0, 0), (0.45, 0.5), (0, 1)], c[2])


def _diagonal(d, P, c):
    _poly(d, P, [(0, 0), (1, 0), (0, 1)], c[0])
    _poly(d, P, [(1, 0), (1, 1), (0, 1)], c[1])


def _canton(d, P, c):
    _rect(d, P, 0, 0, 1, 1, c[0])
    _rect(d, P, 0, 0, 0.5, 0.5, c[1])


def _frame(d, P, c):
    _rect(d, P, 0, 0, 1, 1, c[0])
    _rect(d, P, 0.2, 0.2, 0.8, 0.8, c[1])


def _diamond(d, P, c):
    _rect(d, P, 0, 0, 1, 1, c[0])
    _poly(d, P, [(0.5, 0.06), (0.94, 0.5), (0.5, 0.94), (0.06, 0.5)], c[1])


def _quartered(d, P, c):
    _rect(d, P, 0, 0, 1, 1, c[0])
    _rect(d, P, 0.5, 0, 1, 0.5, c[1])
    _rect(d, P, 0, 0.5, 0.5, 1, c[1])


def _h3_disc(d, P, c):
    _rect(d, P, 0, 0, 1, 1 / 3, c[0])
    _rect(d, P, 0, 1 / 3, 1, 2 / 3, c[1])
    _rect(d, P, 0, 2 / 3, 1, 1, c[0])
    pts = [(0.5 + 0.13 * math.cos(t), 0.5 + 0.15 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    _poly(d, P, pts, c[2])


LAYOUTS: dict[str, tuple[int, _Drawer]] = {
    "h3": (3, _h3),
    "v3": (3, _v3),
    "h2": (2, _h2),
    "v2": (2, _v2),
    "nordic": (2, _nordic),
    "plus": (2, _plus),
    "saltire": (2, _saltire),
    "disc": (2, _disc),
    "hoist": (3, _hoist),
    "diagonal": (2, _diagonal),
    "canton": (2, _canton),
    "frame": (2, _frame),
    "diamond": (2, _diamond),
    "quartered": (2, _quartered),
    "h3_disc": (3, _h3_disc),
}


def _random_colours(rng: random.Random, k: int) -> tuple[str, ...]:
    return tuple(rng.sample(COLOURS, k))


def make_designs(n: int, rng: random.Random) -> tuple[list[Design], list[tuple[int, int]]]:
    """``n`` distinct designs, paired into look-alikes.

    Entities ``2i`` and ``2i + 1`` form a look-alike pair: the same layout and colours except one
    recoloured region (the recolour never copies a colour the flag already has, so the two never
    coincide). When ``n`` is odd the last entity has no partner. Layouts are dealt round-robin so
    small worlds see as many different layouts as possible.
    """
    layouts = list(LAYOUTS)
    rng.shuffle(layouts)
    seen: set[Design] = set()
    designs: list[Design] = []
    pairs: list[tuple[int, int]] = []
    li = 0
    while len(designs) < n:
        for _attempt in range(1000):
            layout = layouts[li % len(layouts)]
            k = LAYOUTS[layout][0]
            base = Design(layout, _random_colours(rng, k))
            region = rng.randrange(k)
            new = rng.choice([c for c in COLOURS if c not in base.colours])
            cols = list(base.colours)
            cols[region] = new
            partner = Design(layout, tuple(cols))
            if base not in seen and partner not in seen:
                break
            li += 1
        else:  # pragma: no cover - only for absurd n
            raise ValueError(f"cannot make {n} distinct emblems")
        li += 1
        seen.update((base, partner))
        if len(designs) + 2 <= n:
            pairs.append((len(designs), len(designs) + 1))
            designs.extend([base, partner])
        else:
            designs.append(base)
    return designs, pairs


# ---------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class ViewParams:
    angle: float = 0.0  # degrees
    scale: float = 1.0
    dx: float = 0.0  # fraction of the image side
    dy: float = 0.0
    brightness: float = 1.0
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    noise: float = 0.0  # std in 0..255 units


def view_params(entity_seed: int, view: int) -> ViewParams:
    """Deterministic augmentation parameters of ``view`` (view 0 = canonical, no augmentation)."""
    if view == 0:
        return ViewParams()
    r = random.Random(f"view:{entity_seed}:{view}")
    return ViewParams(
        angle=r.uniform(-12, 12),
        scale=r.uniform(0.85, 1.1),
        dx=r.uniform(-0.09, 0.09),
        dy=r.uniform(-0.09, 0.09),
        brightness=r.uniform(0.85, 1.15),
        gain=(r.uniform(0.93, 1.07), r.uniform(0.93, 1.07), r.uniform(0.93, 1.07)),
        noise=r.uniform(0.0, 8.0),
    )


#: Flag rectangle inside the canvas (unit coordinates): a 5:4 flag with a small margin.
_FLAG_BOX: Box = (0.06, 0.12, 0.94, 0.88)


def render(design: Design, size: int, params: ViewParams, noise_seed: int = 0) -> Image.Image:
    """Draw ``design`` as a ``size`` x ``size`` RGB image under the view ``params``."""
    S = size * SS
    img = Image.new("RGB", (S, S), BACKDROP)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = _FLAG_BOX
    # forward affine map: unit flag coords -> canvas pixels (rotation/scale about the centre, then shift)
    a = math.radians(params.angle)
    ca, sa = math.cos(a) * params.scale, math.sin(a) * params.scale
    cx, cy = 0.5 + params.dx, 0.5 + params.dy

    def P(u: float, v: float) -> tuple[float, float]:
        x = x0 + u * (x1 - x0) - 0.5
        y = y0 + v * (y1 - y0) - 0.5
        return ((ca * x - sa * y + cx) * S, (sa * x + ca * y + cy) * S)

    n_regions, draw = LAYOUTS[design.layout]
    if len(design.colours) != n_regions:
        raise ValueError(f"layout {design.layout} needs {n_regions} colours, got {len(design.colours)}")
    draw(d, P, [PALETTE[c] for c in design.colours])
    img = img.resize((size, size), Image.BOX)
    if params == ViewParams():
        return img
    arr = np.asarray(img, dtype=np.float32)
    arr = arr * params.brightness * np.asarray(params.gain, dtype=np.float32)
    if params.noise > 0:
        arr = arr + np.random.default_rng(noise_seed).normal(0.0, params.noise, arr.shape)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")
