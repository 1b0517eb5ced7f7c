"""Scope across a pack's slots: what one editing session remembers so that slots do not take each other's inputs.

Each slot's keys and radii are calibrated against its own request's negatives and the negative pool
(:mod:`ldke_peft.editing.router_fit`). When a pack grows one ``edit`` call at a time, that leaves two kinds of
cross-slot leak: a slot taking another request's locality probe, and a slot taking the image of an entity
that another call edited. :class:`ScopeMemory` records, per session, what each slot must keep and reject;
:func:`guard_leaks` and :func:`guard_entities` shrink radii (never below a slot's own inputs) to put both out.

Owns: the memory and the two guards. Reads the router's tensors and computes probe features through
:func:`ldke_peft.tuner.probe_features.collect_probe_features`; knows nothing of fitting deltas or building rows.

Layer: editing (README "Architecture"): imports data, tuner and editing modules, never the product code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .augment import same_question
from ..tuner.probe_features import collect_probe_features
from ..requests import EditRequest, image_fingerprint

logger = logging.getLogger(__name__)


def entity_key(r: EditRequest) -> str:
    """Visual class of a request's image: its subject (shared with the negative pool's entity names), else
    the image itself."""
    if r.subject is not None:
        return f"ent:{r.subject}"
    return "ent:img:" + image_fingerprint(r.image) if r.image is not None else "ent:text"


@dataclass
class ScopeMemory:
    """What a pack's slots must reject and keep, recorded in memory by each :func:`edit` call on the pack
    (not saved with it): raw router features of every request's locality probes, and of each slot's own
    inputs (its image(s) with its question and rephrasings). A slot appended later must not take an earlier
    request's locality probe, and an earlier slot must not take a later request's (cross-slot leaks: each
    slot is calibrated only against its own request's negatives)."""

    probe_v: torch.Tensor | None = None
    probe_t: torch.Tensor | None = None
    probe_has: torch.Tensor | None = None
    #: (image fingerprint or None, prompt) per probe row
    probe_keys: list[tuple[str | None, str]] = field(default_factory=list)
    #: slot -> (visual, textual, has_image) of the rows the slot must keep
    protected: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    #: slot -> (its given image fingerprints, its given wordings): probes equal to these are positives
    given: dict[int, tuple[set, list[str]]] = field(default_factory=dict)
    #: slot -> (raw visual features of every image the slot's scope was fitted on, of the edit's given
    #: images, its entity key)
    views: dict[int, tuple[torch.Tensor, torch.Tensor, str]] = field(default_factory=dict)

    def copy(self) -> "ScopeMemory":
        return ScopeMemory(self.probe_v, self.probe_t, self.probe_has, list(self.probe_keys), dict(self.protected),
                           dict(self.given), dict(self.views))


#: A radius shrunk to keep a probe out stops this fraction of the way to it.
LEAK_RADIUS_FACTOR = 0.98


def probes_of(r: EditRequest) -> list[tuple[Any, str]]:
    return [(p.image, p.prompt) for p in list(r.locality) + list(r.m_locality) + list(r.coupled)]


def guard_leaks(peft_model: Any, processor: Any, router: Any, probe_layer: int, requests: Sequence[EditRequest],
                slots: Sequence[int], protected: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                memory: ScopeMemory) -> dict[int, int]:
    """Shrink radii so no slot of the pack takes a locality probe of another request (a cross-slot leak).

    Checks every new slot against the probes in ``memory`` and this call's, and every slot in ``memory``
    against this call's probes. A probe inside a slot's scope (both parts within their radii) is put out by
    shrinking the one part whose cut keeps all of the slot's own rows (``protected``) inside, preferring the
    smaller cut; a probe that cannot be put out that way is logged. ``memory`` is extended in place.
    Returns ``{slot: number of radius cuts}``.
    """
    keys, ims, qs = [], [], []
    seen = set(memory.probe_keys)
    for r in requests:
        for im, q in probes_of(r):
            k = (image_fingerprint(im) if im is not None else None, q.strip())
            if k not in seen:
                seen.add(k)
                keys.append(k)
                ims.append(im)
                qs.append(q)
    if qs:
        nv, nt, nh = collect_probe_features(peft_model, processor, probe_layer, ims, qs)
    else:
        nv = nt = nh = None
    for s, r, (pv, pt, ph) in zip(slots, requests, protected):
        given_i = {image_fingerprint(im) for im in [r.image] + list(r.rephrase_images) if im is not None}
        memory.given[s] = (given_i, [r.prompt] + list(r.rephrase_prompts))
        memory.protected[s] = (pv, pt, ph)
    old_v, old_t, old_h, old_keys = memory.probe_v, memory.probe_t, memory.probe_has, list(memory.probe_keys)

    def cat(a, b):
        return b if a is None else (a if b is None else torch.cat([a, b]))

    all_v, all_t, all_h, all_keys = cat(old_v, nv), cat(old_t, nt), cat(old_h, nh), old_keys + keys
    shrunk: dict[int, int] = {}
    new_slots = set(slots)
    for s, (pv, pt, ph) in memory.protected.items():
        if s >= router.num_slots:
            continue
        if s in new_slots:
            fv, ft, fh, fk = all_v, all_t, all_h, all_keys
        else:
            fv, ft, fh, fk = nv, nt, nh, keys
        if fv is None or not len(fk):
            continue
        given_i, given_q = memory.given.get(s, (set(), []))
        own = torch.tensor([(fp in given_i if fp is not None else not given_i) and same_question(q, given_q, fuzzy=True)
                            for fp, q in fk], dtype=torch.bool)
        n = shrink_to_exclude(router, s, fv[~own], ft[~own], fh[~own], pv, pt, ph)
        if n:
            shrunk[s] = n
    memory.probe_v, memory.probe_t, memory.probe_has, memory.probe_keys = all_v, all_t, all_h, all_keys
    return shrunk


@torch.no_grad()
def shrink_to_exclude(router: Any, s: int, v: torch.Tensor, t: torch.Tensor, has: torch.Tensor,
                       pv: torch.Tensor, pt: torch.Tensor, ph: torch.Tensor) -> int:
    """Cut slot ``s``'s radii until none of the rows ``(v, t, has)`` routes to it; keep ``(pv, pt, ph)`` in."""
    if not len(v):
        return 0
    g = router.slot_group(s)
    needs = bool(router.needs_image[s] > 0)
    key_v, key_t = router.keys_v[s].float(), router.keys_t[s].float()
    zv, zt = router.project_group(g, v, t)
    dv, dt = (zv - key_v).norm(dim=1), (zt - key_t).norm(dim=1)
    if len(pv):
        qv, qt = router.project_group(g, pv, pt)
        keep_v = float((qv - key_v).norm(dim=1)[ph.bool()].max()) if needs and bool(ph.any()) else 0.0
        keep_t = float((qt - key_t).norm(dim=1).max())
    else:
        keep_v = keep_t = 0.0
    eligible = has.bool() if needs else ~has.bool()
    cuts = 0
    rv, rt = float(router.radius_v[s]), float(router.radius_t[s])
    for _ in range(len(v)):
        inside = eligible & (dt <= rt) & ((dv <= rv) if needs else torch.ones_like(eligible))
        if not bool(inside.any()):
            break
        i = int(torch.nonzero(inside)[0])
        options = []
        if needs and LEAK_RADIUS_FACTOR * float(dv[i]) > keep_v:
            options.append((LEAK_RADIUS_FACTOR * float(dv[i]) / rv, "v"))
        if LEAK_RADIUS_FACTOR * float(dt[i]) > keep_t:
            options.append((LEAK_RADIUS_FACTOR * float(dt[i]) / rt, "t"))
        if not options:
            logger.warning("router: slot %d takes a locality probe of another request and cannot be cut without "
                           "losing its own inputs (the probe is as close as they are)", s)
            eligible = eligible.clone()
            eligible[i] = False
            continue
        _, part = max(options)
        if part == "v":
            rv = LEAK_RADIUS_FACTOR * float(dv[i])
        else:
            rt = LEAK_RADIUS_FACTOR * float(dt[i])
        cuts += 1
    if cuts:
        logger.info("router: slot %d's radii cut %d time(s) to keep other requests' locality probes out "
                    "(radius_v %.3f -> %.3f, radius_t %.3f -> %.3f)", s, cuts, float(router.radius_v[s]), rv,
                    float(router.radius_t[s]), rt)
        router.radius_v[s] = rv
        router.radius_t[s] = rt
    return cuts


def guard_entities(router: Any, requests: Sequence[EditRequest], slots: Sequence[int], views: Sequence[torch.Tensor],
                   anchors: Sequence[torch.Tensor], memory: ScopeMemory, margin: float) -> dict[int, int]:
    """Treat the images of every other entity the pack was edited with as visual negatives of each slot.

    A slot is calibrated against its own request's negatives and the negative pool; when edits arrive one
    call at a time, the entities that *other* calls edited are neither, and a visual radius wide enough for
    a slot's own views can reach them: that entity's image asked this slot's question then takes this
    slot's edit. So every new slot's visual radius is placed again (the calibration's rule: farthest own
    view + ``margin`` x the gap) against the views of earlier slots of other entities, and every earlier
    slot's against the new slots' views; radii only shrink. Where another entity's view is as close as the
    slot's own views, the radius stops just inside it, and where it is as close as the edit's own image
    (``anchors``: raw visual features of its given images), just outside that image: the edit keeps its own
    input, every other entity's image farther than it is put out. ``memory.views`` is extended in place.
    Returns ``{slot: 1}`` for each slot whose radius was cut.
    """
    new = set(slots)
    for s, r, w, a in zip(slots, requests, views, anchors):
        memory.views[s] = (w, a, entity_key(r))
    cut: dict[int, int] = {}
    with torch.no_grad():
        for s, (own, anchor, ent) in memory.views.items():
            if s >= router.num_slots or not bool(router.needs_image[s] > 0) or not len(own):
                continue
            others = [w for j, (w, _, e) in memory.views.items()
                      if j != s and e != ent and len(w) and (s in new or j in new)]
            if not others:
                continue
            g = router.slot_group(s)
            key = router.keys_v[s].float()

            def dist(x: torch.Tensor) -> torch.Tensor:
                return (router.project_visual(g, x) - key).norm(dim=1)

            far, near = float(dist(own).max()), float(dist(torch.cat(others)).min())
            keep = float(dist(anchor).max()) if len(anchor) else 0.0
            rv = float(router.radius_v[s])
            radius = far + margin * (near - far) if near > far else LEAK_RADIUS_FACTOR * near
            if radius >= rv:
                continue
            if radius <= keep:
                # another entity's image is as close as the edit's own: cut as far as the edit's image allows,
                # which still puts out every other entity's image beyond it
                radius = keep / LEAK_RADIUS_FACTOR
                logger.warning("router: slot %d's image is as close to another edited entity's image as to its own "
                               "views; its visual radius stops just outside the edit's own image", s)
                if radius >= rv:
                    continue
            logger.info("router: slot %d's visual radius %.3f -> %.3f to keep other edited entities' images out",
                        s, rv, radius)
            router.radius_v[s] = radius
            cut[s] = 1
    return cut
