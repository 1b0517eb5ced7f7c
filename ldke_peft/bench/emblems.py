"""Procedural country emblems ("flags") and their augmented views.

Real flags cannot be downloaded here, and real photos would need a real vision encoder. Instead each
entity gets a procedural emblem: one of a few flag *layouts* (tribands, crosses, cantons, ...) whose
regions are painted with colours from a small palette. The design is fixed per entity (drawn from a
seeded generator), and any two emblems differ in at least two regions or in layout, *except* the
declared look-alike pairs, which share the layout and differ in exactly one recoloured region. Those
pairs are what makes the benchmark's "similar image, same question" locality probes hard.

Every training or evaluation image is an *augmented view* (scale, rotation, shift, colour jitter,
noise) so that "another photo of the same entity" (M-Generality) is a real generalisation test and
not a pixel copy. Augmentation runs batched in torch (``affine_grid``/``grid_sample``): training draws
~100k views and PIL would dominate the build time.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "LAYOUTS",
    "PALETTE",
    "AugmentConfig",
    "EmblemSet",
    "EmblemSpec",
    "region_map",
    "tensor_to_image",
]

#: Ten well-separated colours (RGB 0-255); far enough apart to survive colour jitter.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (206, 17, 38),  # red
    (245, 245, 245),  # white
    (0, 56, 147),  # blue
    (0, 122, 61),  # green
    (252, 209, 22),  # yellow
    (20, 20, 20),  # black
    (255, 130, 0),  # orange
    (92, 178, 235),  # sky blue
    (128, 0, 64),  # maroon
    (112, 48, 160),  # purple
)

RegionFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _horizontal(x, y):
    return np.minimum((y * 3).astype(int), 2)


def _vertical(x, y):
    return np.minimum((x * 3).astype(int), 2)


def _bicolour_disc(x, y):
    out = (y >= 0.5).astype(int)
    out[(x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.22**2] = 2
    return out


def _nordic_cross(x, y):
    out = np.zeros_like(x, dtype=int)
    outer = (np.abs(x - 0.36) < 0.13) | (np.abs(y - 0.5) < 0.13)
    inner = (np.abs(x - 0.36) < 0.06) | (np.abs(y - 0.5) < 0.06)
    out[outer] = 1
    out[inner] = 2
    return out


def _canton(x, y):
    out = (y >= 0.5).astype(int)
    out[(x < 0.45) & (y < 0.5)] = 2
    return out


def _diagonal(x, y):
    d = x - y
    out = (d > 0).astype(int)
    out[np.abs(d) < 0.14] = 2
    return out


def _hoist_triangle(x, y):
    out = (y >= 0.5).astype(int)
    out[x < 0.5 - np.abs(y - 0.5)] = 2
    return out


def _saltire(x, y):
    out = np.zeros_like(x, dtype=int)
    band = (np.abs(x - y) < 0.12) | (np.abs(x + y - 1) < 0.12)
    out[band] = 1
    out[(np.abs(x - 0.5) < 0.14) & (np.abs(y - 0.5) < 0.14)] = 2
    return out


#: Flag layouts: each maps normalised coordinates (x right, y down, in [0, 1)) to a region index.
#: Every layout has exactly three regions so any colour triple fits any layout.
LAYOUTS: dict[str, RegionFn] = {
    "horizontal_triband": _horizontal,
    "vertical_triband": _vertical,
    "bicolour_disc": _bicolour_disc,
    "nordic_cross": _nordic_cross,
    "canton": _canton,
    "diagonal_band": _diagonal,
    "hoist_triangle": _hoist_triangle,
    "saltire": _saltire,
}
N_REGIONS = 3


def region_map(layout: str, size: int) -> np.ndarray:
    """``(size, size)`` int array: the region index of each pixel centre of ``layout``."""
    c = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid(c, c)
    return LAYOUTS[layout](x, y)


@dataclass(frozen=True)
class EmblemSpec:
    """The design of one emblem: a layout and one palette index per region."""

    layout: str
    colours: tuple[int, ...]

    def differs_in(self, other: "EmblemSpec") -> int:
        """How many regions differ (``N_REGIONS + 1`` for a different layout)."""
        if self.layout != other.layout:
            return N_REGIONS + 1
        return sum(a != b for a, b in zip(self.colours, other.colours))

    def to_dict(self) -> dict:
        return {"layout": self.layout, "colours": list(self.colours)}


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random view transform (uniform in ``[-v, v]`` or ``[lo, hi]``)."""

    scale: tuple[float, float] = (0.8, 1.1)
    rotation_deg: float = 15.0
    shift: float = 0.1  # fraction of the image side
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.25
    noise_std: float = 0.03
    background: tuple[float, float] = (0.3, 0.7)  # grey level outside the emblem


class EmblemSet:
    """The emblems of a list of entities, with canonical renders and augmented views.

    Args:
        names: entity names, in a fixed order (the design of entity ``i`` depends on ``seed`` and on
            the designs already drawn for entities ``< i``, so keep the order fixed).
        lookalike_pairs: ``(a, b)`` name pairs; ``b`` gets ``a``'s design with one region recoloured.
        seed: the design seed.
        size: side of the images handed to the model (pixels).
    """

    render_size = 128  # canonical renders are made at 2x and resampled by the view transform

    def __init__(
        self,
        names: Sequence[str],
        lookalike_pairs: Sequence[tuple[str, str]] = (),
        seed: int = 0,
        size: int = 64,
    ):
        self.names = list(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError("entity names must be unique")
        self.index = {n: i for i, n in enumerate(self.names)}
        self.size = size
        self.seed = seed
        partner: dict[int, int] = {}  # later entity of a pair -> earlier one (drawn first)
        paired: set[int] = set()
        self.lookalike_pairs: list[tuple[str, str]] = []
        for a, b in lookalike_pairs:
            if a not in self.index or b not in self.index or a == b:
                raise ValueError(f"look-alike pair {(a, b)} must name two different known entities")
            ia, ib = sorted((self.index[a], self.index[b]))
            if ia in paired or ib in paired:
                raise ValueError(f"an entity of {(a, b)} is already in another look-alike pair")
            paired |= {ia, ib}
            partner[ib] = ia
            self.lookalike_pairs.append((self.names[ia], self.names[ib]))
        self.specs = self._draw_specs(partner)
        self._canonical = torch.stack([self._render(s, self.render_size) for s in self.specs])

    # ------------------------------------------------------------------ designs
    def _draw_specs(self, partner: dict[int, int]) -> list[EmblemSpec]:
        rng = np.random.default_rng(zlib.crc32(f"emblems:{self.seed}".encode()))
        layouts = list(LAYOUTS)
        specs: list[EmblemSpec] = []
        for i in range(len(self.names)):
            for _ in range(10_000):
                if i in partner:  # recolour one region of the partner's design
                    base = specs[partner[i]]
                    region = int(rng.integers(N_REGIONS))
                    cols = list(base.colours)
                    cols[region] = int(rng.integers(len(PALETTE)))
                    cand = EmblemSpec(base.layout, tuple(cols))
                    if cand.differs_in(base) != 1 or len(set(cols)) != N_REGIONS:
                        continue
                    others = [s for j, s in enumerate(specs) if j != partner[i]]
                else:
                    cols = rng.choice(len(PALETTE), size=N_REGIONS, replace=False)
                    cand = EmblemSpec(layouts[int(rng.integers(len(layouts)))], tuple(int(c) for c in cols))
                    others = specs
                if all(cand.differs_in(s) >= 2 for s in others):
                    specs.append(cand)
                    break
            else:  # pragma: no cover - only with absurdly many entities
                raise RuntimeError(f"could not draw a distinct emblem for {self.names[i]!r}")
        return specs

    @staticmethod
    def _render(spec: EmblemSpec, size: int) -> torch.Tensor:
        """``(3, size, size)`` float in [0, 1], anti-aliased by 2x supersampling."""
        regions = region_map(spec.layout, size * 2)
        pal = np.asarray([PALETTE[c] for c in spec.colours], dtype=np.float32) / 255.0
        img = torch.from_numpy(pal[regions]).permute(2, 0, 1)
        return F.avg_pool2d(img[None], 2)[0]

    def region_masks(self, i: int, size: int | None = None) -> np.ndarray:
        """``(N_REGIONS, size, size)`` bool masks of entity ``i``'s regions (pixel centres)."""
        reg = region_map(self.specs[i].layout, size or self.size)
        return np.stack([reg == r for r in range(N_REGIONS)])

    # ------------------------------------------------------------------ images
    def canonical(self, idx: int | Sequence[int] | None = None) -> torch.Tensor:
        """Canonical (un-augmented) emblems at model size: ``(3, s, s)`` or ``(N, 3, s, s)``, in [0, 1]."""
        sel = self._canonical if idx is None else self._canonical[torch.as_tensor(idx)]
        single = sel.dim() == 3
        out = F.interpolate(sel[None] if single else sel, size=(self.size, self.size), mode="area")
        out = _quantize(out)
        return out[0] if single else out

    def canonical_image(self, i: int) -> Image.Image:
        return tensor_to_image(self.canonical(i))

    def views(
        self, idx: Sequence[int] | torch.Tensor, generator: torch.Generator, aug: AugmentConfig = AugmentConfig()
    ) -> torch.Tensor:
        """Augmented views ``(len(idx), 3, s, s)`` in [0, 1] (quantised to 8 bits like a real image)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        src = self._canonical[idx]
        return augment(src, generator, self.size, aug)

    def view_seed(self, i: int, k: int, split: str) -> int:
        """Seed of view ``k`` of entity ``i`` in ``split`` ("train"/"eval"/...): disjoint per split."""
        return zlib.crc32(f"view:{self.seed}:{split}:{self.names[i]}:{k}".encode())

    def view_tensor(self, i: int, k: int = 0, split: str = "eval", aug: AugmentConfig = AugmentConfig()) -> torch.Tensor:
        """View ``k`` of entity ``i`` in ``split`` as ``(3, s, s)`` in [0, 1] (same pixels as :meth:`view_image`)."""
        g = torch.Generator().manual_seed(self.view_seed(i, k, split))
        return self.views([i], g, aug)[0]

    def view_image(self, i: int, k: int = 0, split: str = "eval", aug: AugmentConfig = AugmentConfig()) -> Image.Image:
        """One reproducible augmented view of entity ``i`` as a PIL image."""
        return tensor_to_image(self.view_tensor(i, k, split, aug))

    def view_images(self, i: int, n: int, split: str = "eval", start: int = 0) -> list[Image.Image]:
        return [self.view_image(i, k, split) for k in range(start, start + n)]


def augment(src: torch.Tensor, generator: torch.Generator, size: int, aug: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Random similarity transform + colour jitter + noise of ``src`` ``(N, 3, H, W)`` -> ``(N, 3, size, size)``."""
    n = src.shape[0]

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    scale = u(*aug.scale)
    ang = u(-aug.rotation_deg, aug.rotation_deg) * (math.pi / 180)
    tx, ty = u(-aug.shift, aug.shift) * 2, u(-aug.shift, aug.shift) * 2
    # affine_grid maps output coords to input coords: the inverse of "scale then rotate then shift"
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [torch.stack([cos, sin, -(cos * tx + sin * ty)], 1), torch.stack([-sin, cos, -(-sin * tx + cos * ty)], 1)], 1
    )
    grid = F.affine_grid(theta, [n, 4, size, size], align_corners=False)
    # area-downsample first so bilinear sampling at the smaller size does not alias
    small = F.interpolate(src, size=(size * 2, size * 2), mode="area") if src.shape[-1] > size * 2 else src
    rgba = torch.cat([small, torch.ones_like(small[:, :1])], 1)
    warped = F.grid_sample(rgba, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    rgb, alpha = warped[:, :3], warped[:, 3:]
    bg = u(*aug.background).view(n, 1, 1, 1)
    img = rgb + (1 - alpha) * bg
    # colour jitter: brightness, contrast, saturation
    img = img * u(1 - aug.brightness, 1 + aug.brightness).view(n, 1, 1, 1)
    mean = img.mean(dim=(1, 2, 3), keepdim=True)
    img = (img - mean) * u(1 - aug.contrast, 1 + aug.contrast).view(n, 1, 1, 1) + mean
    grey = img.mean(dim=1, keepdim=True)
    img = (img - grey) * u(1 - aug.saturation, 1 + aug.saturation).view(n, 1, 1, 1) + grey
    noise = torch.randn(img.shape, generator=generator) * u(0, aug.noise_std).view(n, 1, 1, 1)
    return _quantize((img + noise).clamp(0, 1))


def _quantize(img: torch.Tensor) -> torch.Tensor:
    return torch.round(img.clamp(0, 1) * 255) / 255


def tensor_to_image(img: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` float in [0, 1] -> RGB PIL image."""
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
