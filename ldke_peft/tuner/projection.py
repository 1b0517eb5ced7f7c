"""Router projection storage: int8 quantization of a fitted projection, and the default projection.

Layer: tuner, a leaf (README "Architecture"): imports nothing of the library.
"""

from __future__ import annotations

import torch


def quantize_projection(proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-column int8 quantization: ``(q int8 (d, p), scale fp32 (p,))``.

    The projections are most of a single-edit pack's bytes (``3 d p`` floats against ``r (d + d_ff)``
    for the delta). Stored as int8 they are 4x smaller, and nothing is approximated at routing time:
    the editor quantizes the fitted projection *before* it places keys and radii, and routing always
    uses :func:`dequantize_projection` of the stored bytes, so calibration and inference see the very
    same matrix. What int8 changes is only which projection that is (a fitted one, perturbed by
    under 0.4% of each column's largest entry).
    """
    p = proj.detach().float()
    scale = p.abs().amax(dim=0).clamp_min(1e-30) / 127.0
    q = torch.round(p / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_projection(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 projection an int8-stored one stands for (the only formula used, so results are exact)."""
    return q.float() * scale.float()


def _init_proj(d_in: int, p: int, seed: int) -> torch.Tensor:
    """Deterministic orthonormal-ish default projection (a fitted pack overwrites it)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d_in, p, generator=g)
    q, _ = torch.linalg.qr(m)
    return q[:, :p].contiguous()
