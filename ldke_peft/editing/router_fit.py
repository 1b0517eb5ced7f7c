"""Fitting the Disentanglement Classifier: a per-pack projection, then per-slot keys and radii.

Raw probe features share a large common component (cosine distances between unrelated inputs are
tiny), and mean-pooled question features barely move when one word of the question changes. So each pack learns a linear projection per part (visual: ``d -> p``; textual:
``2d -> p``) that pulls samples of the same *class* together and pushes classes apart — classes are
entities for the visual part (all views of one entity vs other and look-alike entities) and
relations for the textual part (rephrasings of one question vs other questions). Keys are the
centroids of each slot's positives; each radius sits between the farthest positive and the nearest
negative (``margin`` = 0.5: the midpoint).

Layer: editing, a leaf (README "Architecture"): imports nothing of the library.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class SlotCalibration:
    key_v: torch.Tensor
    key_t: torch.Tensor
    radius_v: float
    radius_t: float
    needs_image: bool
    #: diagnostics (projected-space distances) for reports
    far_pos_v: float = 0.0
    near_neg_v: float = 0.0
    far_pos_t: float = 0.0
    near_neg_t: float = 0.0
    #: radius cuts made afterwards to keep other requests' locality probes out (``editor.guard_leaks``)
    leak_cuts: int = 0

    @property
    def separable(self) -> bool:
        ok_t = self.near_neg_t > self.far_pos_t
        ok_v = (not self.needs_image) or self.near_neg_v > self.far_pos_v
        return ok_t and ok_v


def _pca_init(x: torch.Tensor, p: int, seed: int) -> torch.Tensor:
    d = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    rand = torch.linalg.qr(torch.randn(d, p, generator=g))[0][:, :p]
    if x.shape[0] < 2:
        return rand
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    k = min(p, vh.shape[0])
    init = rand.clone()
    init[:, :k] = vh[:k].T
    return init


def fit_projection(
    feats: torch.Tensor,
    labels: torch.Tensor,
    dim: int,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
    weight_decay: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Learn ``(mu, P)`` so that ``(x - mu) @ P`` clusters ``feats`` by ``labels``.

    Loss: every sample within distance 0.5 of its class centroid, and at least 2.0 from every other
    class centroid (hinge). Scale is fixed by the hinges; initialised from PCA.

    No weight decay by default: textual features differ by little (one word of a long prompt), so ``P``
    needs a large norm, and an L2 penalty on it (``1e-4`` was the old default for both parts) outweighed
    the hinges and left relations overlapping -- paraphrases of the edit question fell outside the radius
    while other questions fell inside. The hinges are flat once satisfied, so ``P`` does not grow without
    it. The editor keeps the penalty for the visual part (``editor.VISUAL_WEIGHT_DECAY``), where classes
    are far apart and it keeps other views of an entity close.
    """
    x = feats.float()
    mu = x.mean(0)
    xc = x - mu
    # scale so typical norms are ~1 (features are L2-normalised parts, but centring shrinks them)
    scale = xc.norm(dim=1).mean().clamp_min(1e-6)
    P = (_pca_init(xc, dim, seed) / scale).clone().requires_grad_(True)
    classes, inv = torch.unique(labels, return_inverse=True)
    C = len(classes)
    if C < 2:
        return mu, P.detach()
    onehot = torch.nn.functional.one_hot(inv, C).float()
    counts = onehot.sum(0).clamp_min(1)
    opt = torch.optim.Adam([P], lr=lr)
    for _ in range(steps):
        z = xc @ P
        cent = (onehot.T @ z) / counts[:, None]
        d = torch.cdist(z, cent)  # (N, C)
        own = d.gather(1, inv[:, None]).squeeze(1)
        pull = torch.relu(own - 0.5).pow(2).mean()
        other = d.masked_fill(onehot.bool(), float("inf"))
        push = torch.relu(2.0 - other).pow(2)
        push = push[torch.isfinite(push)].mean() if torch.isfinite(push).any() else z.sum() * 0
        loss = pull + push
        if weight_decay:
            loss = loss + weight_decay * P.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mu, P.detach()


def calibrate_slot(
    zv_pos: torch.Tensor,
    zv_neg: torch.Tensor,
    zt_pos: torch.Tensor,
    zt_neg: torch.Tensor,
    *,
    needs_image: bool,
    margin: float = 0.5,
    text_margin: float | None = None,
    zt_core: torch.Tensor | None = None,
    zt_anchor: torch.Tensor | None = None,
    zv_anchor: torch.Tensor | None = None,
) -> SlotCalibration:
    """Key = centroid of positives; radius = farthest positive + ``margin`` × gap to the nearest negative
    (``text_margin`` for the textual part when given).

    ``zt_core`` (default: all textual positives) are the rows that place the textual key: the request's
    own wordings. Wordings borrowed from a question bank widen the radius but do not move the key, so
    the edit's own question stays at the centre even where a bank wording lands far away (a projection
    fitted for earlier slots of the pack and kept for this one).

    When positives and negatives overlap (no gap) the radius is set just inside the nearest negative:
    LDKE prefers missing a paraphrase to firing on an unrelated input, and the overlap is logged. If that
    radius would leave out the edit itself (``*_anchor``: the rows of the edit's own image and question),
    the key moves onto the edit's rows and the radius is placed again from there: the edit must fire on
    its own input, and paraphrases are what gives way (a projection kept from a pack's first edit can
    place a later slot's wordings widely).
    """

    def place(pos: torch.Tensor, neg: torch.Tensor, key: torch.Tensor, margin: float) -> tuple[float, float, float]:
        far = float((pos - key).norm(dim=1).max()) if len(pos) else 0.0
        near = float((neg - key).norm(dim=1).min()) if len(neg) else float("inf")
        if near == float("inf"):
            radius = max(far * 1.5, 1e-3)
        elif near > far:
            radius = far + margin * (near - far)
        else:
            radius = 0.98 * near
        return radius, far, near

    def one(pos: torch.Tensor, neg: torch.Tensor, core: torch.Tensor | None = None,
            anchor: torch.Tensor | None = None, m: float = margin) -> tuple[torch.Tensor, float, float, float]:
        key = (core if core is not None and len(core) else pos).mean(0)
        radius, far, near = place(pos, neg, key, m)
        if anchor is not None and len(anchor) and float((anchor - key).norm(dim=1).max()) >= radius:
            key = anchor.mean(0)
            radius, far, near = place(pos, neg, key, m)
        return key, radius, far, near

    key_t, r_t, far_t, near_t = one(zt_pos, zt_neg, zt_core, zt_anchor, margin if text_margin is None else text_margin)
    if needs_image:
        key_v, r_v, far_v, near_v = one(zv_pos, zv_neg, None, zv_anchor)
    else:
        key_v, r_v, far_v, near_v = torch.zeros(zt_pos.shape[1]), 0.0, 0.0, 0.0
    cal = SlotCalibration(key_v, key_t, r_v, r_t, needs_image, far_v, near_v, far_t, near_t)
    if not cal.separable:
        logger.warning(
            "router: positives and negatives overlap for a slot (visual far/near %.3f/%.3f, textual %.3f/%.3f); "
            "radius set inside the nearest negative, some paraphrases may not route",
            far_v, near_v, far_t, near_t,
        )
    return cal
