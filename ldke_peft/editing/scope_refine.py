"""Correcting an edit's scope afterwards: a pack made to route a request's questions as the request wants.

An edit's scope is its slot's radii and textual anchors, fitted once from what the editor knew. A user who
finds a question that fires an edit but should not (a near-by question on the edit's image), or a wording of
the edit that does not fire, should not have to refit the edit: the delta is right, the decision is wrong.
:func:`refine_scope` changes the decision alone, never a delta:

* an out-of-scope question that fires a slot on another image than the edit's own (farther from the slot's
  visual key than every image of the requests that want the slot) is put out by a cut of the visual radius:
  the image is what should decide there, and a textual anchor would also keep that wording out on the edit's
  own image. On the edit's own image it becomes one of the slot's out-of-scope textual anchors, so the
  nearest-anchor veto keeps it out, and with it the questions that lie nearer to it than to any of the edit's
  wordings;
* an in-scope question that the veto keeps out becomes an in-scope anchor, and one outside the textual radius
  widens it. A stored out-of-scope anchor stays out (it is its own nearest anchor). An image outside the
  visual radius (another view of the entity) widens it only as far as the images known to be other entities
  allow: the look-alikes the requests file as out of scope with a question the slot would otherwise take, one
  of which must lie beyond the radius, and the pack's other image edits (by their filed images; an edit the call
  does not file, by the reach of its own radius).

Every change is checked against every row of the call until none moves: a slot none of whose own questions the
call holds is not changed, no wording of a slot's own (its edit question, the wordings filed for it) becomes one
of its out-of-scope anchors, and no cut or anchor moves a question the slot holds to another edit. A row the call
wants elsewhere that a widening lets in too is put out again at once; where it cannot be, or a row routed as
filed would move, the widening is undone. The router is restored when the refinement raises. Every change is
recorded with the edit whose slot it changed (``scope_fixes`` in its metadata), which the pack's model card lists.

Owns: :func:`refine_scope`, :class:`ScopeFix`, :func:`slot_of`, :func:`request_questions`.

Layer: editing (README "Architecture"): imports data, tuner and editing modules, never the product code.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import LDKEError
from ..requests import EditRequest, image_fingerprint
from ..tuner.probe_features import collect_probe_features
from ..tuner.routing import NO_SLOT
from ..tuner.text_anchors import ANCHOR_BUFFERS, NAMED
from .augment import same_question
from .pack_scope import LEAK_RADIUS_FACTOR

logger = logging.getLogger(__name__)

__all__ = ["ScopeFix", "ScopeRefineError", "refine_scope", "request_questions", "slot_of"]

#: A textual radius widened to admit a question ends this factor beyond it (the inverse of the cut's factor).
WIDEN_FACTOR = 1.0 / LEAK_RADIUS_FACTOR
#: Passes over the rows beyond one per slot (a question inside several edits' scopes is put out of one per pass):
#: passes go on while one changes something; this only caps a call that never settles.
_EXTRA_PASSES = 4


class ScopeRefineError(LDKEError, ValueError):
    """A scope refinement was asked of something that cannot hold one (no LDKE pack, no edit of the pack)."""


@dataclass
class ScopeFix:
    """One question of the requests: where it routed before and after, and what was changed for it."""

    request: int
    kind: str  # "prompt", "rephrase", "rephrase_image", or a probe field ("locality", "coupled:<kind>", ...)
    prompt: str
    wanted: int  # the slot it should reach (-1 = none)
    before: int  # the slot it reached before (-1 = none)
    after: int  # the slot it reaches now
    action: str  # what was changed for it, or why nothing could be ("" when nothing was tried)

    @property
    def ok(self) -> bool:
        return self.after == self.wanted

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def slot_of(edits: Sequence[dict], r: EditRequest) -> int | None:
    """The pack's slot of ``r``: the edit with ``r``'s fingerprint (prompt, target and image bytes), so that
    two edits asking the same question of different images are told apart."""
    fp = r.fingerprint()
    for s, e in enumerate(edits):
        if e.get("fingerprint") == fp:
            return s
    return None


def request_questions(r: EditRequest) -> list[tuple[str, Any, str, bool | None]]:
    """``(kind, image, prompt, in scope)`` of every question of ``r``: its edit question, rephrasings and other images
    (True: they should reach its edit), its locality, M-locality and coupled probes (False: no edit should fire) and
    its portability probes (None: whether they should follow the edit depends on how the pack was made)."""
    rows: list[tuple[str, Any, str, bool | None]] = [("prompt", r.image, r.prompt, True)]
    rows += [("rephrase", r.image, q, True) for q in r.rephrase_prompts]
    rows += [("rephrase_image", im, r.prompt, True) for im in r.rephrase_images]
    for field in ("locality", "m_locality", "coupled", "portability"):
        for p in getattr(r, field):
            kind = f"{field}:{p.kind}" if getattr(p, "kind", None) else field
            rows.append((kind, p.image, p.prompt, None if field == "portability" else False))
    return rows


def _rows(requests: Sequence[EditRequest], edits: Sequence[dict]) -> list[tuple[int, str, Any, str, int]]:
    """``(request, kind, image, prompt, wanted slot)`` of every question the requests judge; in-scope questions
    of a request the pack does not hold are left out (nothing says which slot they want)."""
    rows = []
    for i, r in enumerate(requests):
        own = slot_of(edits, r)
        for kind, image, prompt, in_scope in request_questions(r):
            if in_scope is False:
                rows.append((i, kind, image, prompt, NO_SLOT))
            elif in_scope and own is not None:
                rows.append((i, kind, image, prompt, own))
    return rows


def _slot_name(k: int) -> str:
    return "no slot" if k == NO_SLOT else f"slot {k}"


@dataclass
class _Mark:
    """A point a change of :class:`_Refiner` can be undone to."""

    routes: torch.Tensor
    buffers: dict[str, torch.Tensor]
    n_changes: int
    actions: dict[int, str]


class _Refiner:
    """The change loop on one router: raw features of the rows in, radii and anchors of the router out."""

    def __init__(self, router: Any, v: torch.Tensor, t: torch.Tensor, h: torch.Tensor, wanted: torch.Tensor,
                 prompts: Sequence[str], own: dict[int, list[str]]) -> None:
        self.router, self.v, self.t, self.h, self.wanted = router, v, t, h, wanted
        self.prompts = prompts
        #: which rows name which slot's asked-for word (None: no slot has one), as serving reads them
        self.named = router.named_mask(list(prompts))
        #: slot -> its edit question and the wordings the requests file for it: never made out-of-scope anchors
        self.own = own
        self.actions: dict[int, str] = {}
        #: every change applied, in order: (row, slot changed, what) -- a row can change several slots
        self.changes: list[tuple[int, int, str]] = []

    def _changed(self, i: int, s: int, what: str) -> None:
        self.changes.append((i, s, what))
        self.actions[i] = "; ".join(w for j, _, w in self.changes if j == i)

    def route(self) -> torch.Tensor:
        return self.router.route(self.v, self.t, self.h, self.named).cpu()

    def _named(self, rows: torch.Tensor | slice) -> torch.Tensor | None:
        return None if self.named is None else self.named[rows]

    def _anchors(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slot ``s``'s in-scope and out-of-scope anchor rows (float32), and which out-of-scope ones name its
        asked-for word."""
        r = self.router
        if not r.num_anchors:
            empty = r.keys_t[:0].float()
            return empty, empty, torch.zeros(0, dtype=torch.bool)
        mine = r.anchors_slot.long() == s
        pos = r.anchors_pos > 0.5
        return (r.anchors_t[mine & pos].float(), r.anchors_t[mine & ~pos].float(),
                (r.anchors_pos[mine & ~pos] < NAMED / 2).cpu())

    def _z(self, s: int, i: int) -> torch.Tensor:
        return self.router.project_textual(self.router.slot_group(s), self.t[i:i + 1]).float()

    def _set_anchors(self, s: int, pos: torch.Tensor, neg: torch.Tensor, named: torch.Tensor) -> None:
        if not len(pos) and len(neg):  # a veto needs an in-scope anchor: the key stands for the edit's wordings
            pos = self.router.keys_t[s:s + 1].float()
        self.router.set_text_anchors(s, pos, neg, named)

    def _fires(self, s: int, i: int) -> bool:
        return int(self.router.route(self.v[i:i + 1], self.t[i:i + 1], self.h[i:i + 1], self._named(slice(i, i + 1)))[0]) == s

    def _route_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.router.route(self.v[rows], self.t[rows], self.h[rows], self._named(rows)).cpu()

    def _held(self, s: int) -> torch.Tensor:
        """Rows that want slot ``s`` and reach it now: a change for another row must keep them."""
        rows = (self.wanted == s).nonzero(as_tuple=True)[0]
        return rows[self._route_rows(rows) == s]

    def _anchor_out(self, s: int, i: int) -> bool:
        """Make row ``i`` an out-of-scope anchor of slot ``s`` if that puts it out and keeps the slot's held rows;
        where the new anchor would veto a held row, the held rows' wordings join the in-scope anchors first."""
        held = self._held(s)
        pos, neg, named = self._anchors(s)
        z_held = self.router.project_textual(self.router.slot_group(s), self.t[held]).float()
        base = pos if len(pos) else self.router.keys_t[s:s + 1].float()
        # the new anchor names the slot's word where its question does: only then can it veto a question naming it
        named_i = torch.zeros(1, dtype=torch.bool) if self.named is None else self.named[i:i + 1, s]
        for p in (pos, torch.cat([base, z_held])):
            self._set_anchors(s, p, torch.cat([neg, self._z(s, i)]), torch.cat([named, named_i]))
            if not self._fires(s, i) and bool((self._route_rows(held) == s).all()):
                return True
        self.router.set_text_anchors(s, pos, neg, named)
        return False

    def _visual_cut(self, s: int, i: int) -> tuple[float | None, str]:
        """The visual radius that puts row ``i`` out of slot ``s`` and keeps the images of the rows that want it,
        or None and why there is none."""
        r = self.router
        if not (bool(r.needs_image[s] > 0) and bool(self.h[i])):
            return None, "no image"
        keep = (self.wanted == s) & self.h.bool()
        if not bool(keep.any()):
            return None, "no request of the call wants the slot, so none says which images it must keep"
        d = (r.project_visual(r.slot_group(s), self.v) - r.keys_v[s].float()).norm(dim=1)
        cut = LEAK_RADIUS_FACTOR * float(d[i])
        if cut <= float(d[keep].max()):
            return None, "its image is as near the slot's key as an image the edit must keep"
        return cut, ""

    def _visual_widening(self, s: int, dv: float) -> tuple[float | None, str]:
        """The visual radius that lets an image at distance ``dv`` into slot ``s``, or None and why there is none.

        Only images known to be other entities bound it, and the widened radius must leave each of them out as a
        cut would: the look-alikes the call files as out of scope with a question the slot would take but for
        their image (one asking a wording of the slot's own counts wherever it lies; one of them must lie beyond
        the radius: with none, nothing says how far the entity's look-alikes begin), and the pack's other image
        edits (by their filed images; an edit not filed, by the farthest reach of its own radius; an edit scored
        in another projection only by its filed images). A question the textual part decides (another question on
        some image) neither bounds nor blocks it."""
        r = self.router
        g = r.slot_group(s)
        radius = float(r.radius_v[s])
        d = (r.project_visual(g, self.v) - r.keys_v[s].float()).norm(dim=1)
        widened = WIDEN_FACTOR * dv
        reach = widened / LEAK_RADIUS_FACTOR  # an image nearer than this would be let in with the view
        looks = ((self.wanted != s) & self.h.bool()).nonzero(as_tuple=True)[0]
        if len(looks):
            r.radius_v[s] = float("inf")  # which of them the slot would take but for their image
            try:
                taken = (r.scores(self.v[looks], self.t[looks], self.h[looks], self._named(looks))[:, s] <= 1.0).cpu()
            finally:
                r.radius_v[s] = radius
            own = self.own.get(s, [])
            asks_own = torch.tensor([same_question(self.prompts[i], own) for i in looks.tolist()], dtype=torch.bool)
            looks = looks[taken & ((d[looks] > radius).cpu() | asks_own)]
        if len(looks) and float(d[looks].min()) <= reach:
            return None, "a look-alike filed as out of scope lies as near the slot's key"
        if not bool((d[looks] > radius).any()):
            return None, ("no look-alike image asked its question is filed as out of scope beyond it to bound a "
                          "widening: file one as a coupled probe, or re-edit with it in rephrase_images")
        for k in range(r.num_slots):
            if k == s or not bool(r.needs_image[k] > 0):
                continue
            filed = ((self.wanted == k) & self.h.bool()).nonzero(as_tuple=True)[0]
            other = d[filed][d[filed] > radius]  # the edit's images that are not the slot's own entity
            if r.slot_group(k) == g:
                dk = float((r.keys_v[k].float() - r.keys_v[s].float()).norm())
                if dk > radius and not len(filed):
                    # where its images lie is unknown: anywhere within its own radius of its key
                    if dk - float(r.radius_v[k]) <= reach:
                        return None, (f"the images of edit {k} of the pack may lie as near the slot's key: file "
                                      f"edit {k}'s request so the fix can check them")
                    continue
                if dk > radius:
                    other = torch.cat([other, other.new_tensor([dk])])
            elif not len(filed):
                return None, (f"edit {k} of the pack is scored in another projection, where its images cannot be "
                              f"compared with the slot's key: file edit {k}'s request so the fix can check them")
            if len(other) and float(other.min()) <= reach:
                return None, f"an image of edit {k} of the pack lies as near the slot's key"
        return widened, ""

    def keep_out(self, s: int, i: int) -> bool:
        """Put row ``i`` out of slot ``s`` (:meth:`_put_out`), undone where that moves a row that routed as filed (the
        in-scope anchors an anchor brings along can lift the veto on a row the slot's other anchors kept out)."""
        mark = self._mark()
        ok = self._put_out(s, i)
        moved = self._moved(mark)
        return ok if moved is None else self._undo(mark, i, f"putting it out of slot {s} would move {moved}")

    def _put_out(self, s: int, i: int) -> bool:
        """Put row ``i`` out of slot ``s``: by the visual radius where its image lies farther from the key than every
        image the edit must keep (another image: the visual part is what should decide), else by an out-of-scope
        textual anchor (another question on the edit's own image). Neither happens for a slot none of whose own
        questions the requests file (nothing would check the change against them), and no anchor is made of one of
        the slot's own wordings (it would keep that wording out on the edit's other images too)."""
        r = self.router
        if not bool((self.wanted == s).any()):
            self.actions[i] = (f"could not fix: slot {s} fires on it, and the requests file none of slot {s}'s own "
                               "questions to keep (add its request)")
            return False
        cut, why = self._visual_cut(s, i)
        if cut is not None:
            # a narrower radius scores the slot's own rows worse: one may go to an overlapping edit instead
            held, radius = self._held(s), float(r.radius_v[s])
            r.radius_v[s] = min(radius, cut)
            if bool((self._route_rows(held) == s).all()):
                logger.info("scope: slot %d's visual radius %.3f -> %.3f to keep out row %d", s, radius, cut, i)
                self._changed(i, s, f"visual radius of slot {s} cut")
                return True
            r.radius_v[s] = radius
            cut, why = None, "a cut that keeps it out hands a question of the edit to another edit"
        if same_question(self.prompts[i], self.own.get(s, [])):
            self.actions[i] = (f"could not fix: it asks one of slot {s}'s own wordings, and no visual cut fits ({why})")
            return False
        if self._anchor_out(s, i):
            self._changed(i, s, f"out-of-scope anchor of slot {s}")
            return True
        self.actions[i] = (f"could not fix: no textual anchor tells its question from slot {s}'s own wordings, and "
                           f"no visual cut fits ({why})")
        return False

    def let_in(self, s: int, i: int) -> bool:
        """Let row ``i`` into slot ``s`` (:meth:`_widen`). A row the call wants elsewhere that the widening lets in
        too is put out again at once (:meth:`keep_out`); where that cannot be done, or a row that routed as filed
        no longer does, the widening is undone: each bound of a widening is judged on what it knew when it was
        made, so a later one (the textual radius widened for the same row) can reach a look-alike the visual bound
        could not yet count."""
        mark = self._mark()
        ok = self._widen(s, i)
        now = self.route()
        for j in ((now == s) & (mark.routes != s) & (self.wanted != s)).nonzero(as_tuple=True)[0].tolist():
            if j != i and int(self._route_rows(torch.tensor([j]))[0]) == s and not self.keep_out(s, j):
                return self._undo(mark, i, f"letting it into slot {s} would also let in {self.prompts[j]!r} "
                                  f"({self._filed(j)}), and nothing would keep that out")
        moved = self._moved(mark)
        if moved is not None:
            return self._undo(mark, i, f"letting it into slot {s} would move {moved}")
        return ok and self._fires(s, i)

    def _filed(self, j: int) -> str:
        return "filed as out of scope" if int(self.wanted[j]) == NO_SLOT else f"filed for slot {int(self.wanted[j])}"

    def _mark(self) -> _Mark:
        """Where the rows route and what the router, the change list and the actions hold, before a change."""
        return _Mark(self.route(), _snapshot(self.router, _SCOPE_BUFFERS), len(self.changes), dict(self.actions))

    def _moved(self, mark: _Mark) -> str | None:
        """The first row that routed as filed at ``mark`` and no longer does, described; None when there is none."""
        now = self.route()
        moved = ((mark.routes == self.wanted) & (now != self.wanted)).nonzero(as_tuple=True)[0]
        if not len(moved):
            return None
        j = int(moved[0])
        return f"{self.prompts[j]!r} ({self._filed(j)}) to {_slot_name(int(now[j]))}"

    def _undo(self, mark: _Mark, i: int, why: str) -> bool:
        """Put the router, the change list and the actions back as they were at ``mark``; row ``i`` says why."""
        _restore(self.router, mark.buffers)
        del self.changes[mark.n_changes:]
        self.actions = mark.actions
        self.actions[i] = f"could not fix: {why}"
        return False

    def _widen(self, s: int, i: int) -> bool:
        """Widen slot ``s`` for row ``i``: the visual radius (another view of the entity) and the textual radius as
        far as it needs, and an in-scope anchor of its question where the veto keeps it out."""
        r = self.router
        g = r.slot_group(s)
        if bool(r.needs_image[s] > 0):
            if not bool(self.h[i]):
                self.actions[i] = f"could not fix: slot {s} takes image questions only"
                return False
            dv = float((r.project_visual(g, self.v[i:i + 1]) - r.keys_v[s].float()).norm())
            radius = float(r.radius_v[s])
            if dv > radius:
                widened, why = self._visual_widening(s, dv)
                if widened is None:
                    self.actions[i] = f"could not fix: its image lies outside slot {s}'s visual scope ({why})"
                    return False
                logger.info("scope: slot %d's visual radius %.3f -> %.3f to let row %d's image in", s, radius, widened, i)
                r.radius_v[s] = widened
                self._changed(i, s, f"visual radius of slot {s} widened")
        z = self._z(s, i)
        dt = float((z[0] - r.keys_t[s].float()).norm())
        if dt > float(r.radius_t[s]):
            logger.info("scope: slot %d's textual radius %.3f -> %.3f to let %r in", s, float(r.radius_t[s]),
                        WIDEN_FACTOR * dt, i)
            r.radius_t[s] = WIDEN_FACTOR * dt
            self._changed(i, s, f"textual radius of slot {s} widened")
        if r.num_anchors and not self._fires(s, i):
            pos, neg, named = self._anchors(s)
            self._set_anchors(s, torch.cat([pos, z]), neg, named)
            self._changed(i, s, f"in-scope anchor of slot {s}")
        return self._fires(s, i)


#: What a change of :class:`_Refiner` can write: a slot's radii and the textual anchors.
_SCOPE_BUFFERS = ("radius_v", "radius_t", *ANCHOR_BUFFERS)


def _snapshot(router: Any, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    return {k: b.clone() for k, b in router._buffers.items() if b is not None and (names is None or k in names)}


def _restore(router: Any, snap: dict[str, torch.Tensor]) -> None:
    for k in ANCHOR_BUFFERS:
        if k not in snap:
            router._buffers.pop(k, None)
    router._buffers.update(snap)


def _drop_empty_anchors(router: Any) -> None:
    """A router left with no anchor row holds no anchor buffers (the loader expects none for a count of 0)."""
    if not router.num_anchors:
        for k in ANCHOR_BUFFERS:
            router._buffers.pop(k, None)


def _image_id(image: Any) -> str | None:
    """How a record names a row's image: its fingerprint, as the pack's edits name theirs."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return image_fingerprint(image)
    try:
        with Image.open(image) as im:  # a path (the loaders keep paths): the features were read from it
            return image_fingerprint(im)
    except (OSError, ValueError):  # gone since: the record names the path rather than failing after the fix
        return str(image)


def _record(edits: list[dict], rows: Sequence[tuple[int, str, Any, str, int]], changes: Sequence[tuple[int, int, str]]) -> None:
    """Each change applied, in the metadata of the edit whose slot it changed (``scope_fixes``, saved with the pack
    and listed on its card), whether or not its question ends up routed as filed: whoever loads the pack can tell
    a hand-corrected scope from the one the editor fitted."""
    for j, s, what in changes:
        _, kind, image, prompt, want = rows[j]
        if 0 <= s < len(edits):
            edits[s].setdefault("scope_fixes", []).append(
                {"question": prompt, "kind": kind, "image": _image_id(image), "in_scope": want == s, "change": what})


@torch.no_grad()
def refine_scope(peft_model: Any, processor: Any, requests: Sequence[EditRequest], *,
                 adapter_name: str = "default", batch_size: int = 32, progress: bool = True) -> list[ScopeFix]:
    """Change the pack's routing (radii and textual anchors; never a delta) so that every question of ``requests``
    routes as the request wants: its edit question, rephrasings and other images to the request's own edit (when
    the pack holds it, matched by fingerprint), its locality, M-locality and coupled probes to no edit.
    Portability probes are left alone. Returns one :class:`ScopeFix` per question judged; a question that
    cannot be fixed says why in its ``action`` (and routes as before, or as the other fixes left it).
    The router's decision is read on the features inference computes; save the pack afterwards to keep it.
    Each change is recorded in its edit's metadata (``config.edits[slot]["scope_fixes"]``), which the pack's
    model card lists."""
    config = getattr(peft_model, "peft_config", {}).get(adapter_name)
    if config is None or getattr(peft_model, "base_model", None) is None or not hasattr(peft_model.base_model, "router"):
        raise ScopeRefineError(f"refine_scope: the model has no LDKE adapter {adapter_name!r} (load a pack first)")
    edits = list(getattr(config, "edits", []) or [])
    if requests and all(slot_of(edits, r) is None for r in requests):
        raise ScopeRefineError("refine_scope: none of the requests is an edit of this pack (no edit with their prompt, "
                               "target and image): pass the requests the pack was made with")
    rows = _rows(requests, edits)
    if not rows:
        return []
    router = peft_model.base_model.router(adapter_name)
    home = router.keys_v.device
    router.to("cpu")
    snap = _snapshot(router)
    try:
        # the textual key of the adapter being refined, which need not be the active one
        key = None if router.text_encoder is None else (router.text_encoder, router.text_frame, router.text_probe)
        v, t, h = collect_probe_features(peft_model, processor, config.probe_layer, [x[2] for x in rows],
                                         [x[3] for x in rows], batch_size=batch_size, text_key=key)
        wanted = torch.tensor([x[4] for x in rows])
        own: dict[int, list[str]] = {s: [e.get("prompt", "")] for s, e in enumerate(edits)}
        for _, _, _, prompt, want in rows:
            if want != NO_SLOT:
                own.setdefault(want, []).append(prompt)
        ref = _Refiner(router, v, t, h, wanted, [x[3] for x in rows], own)
        before = ref.route()
        n_changes = -1
        for _ in range(router.num_slots + _EXTRA_PASSES):
            now = ref.route()
            wrong = [i for i in range(len(rows)) if int(now[i]) != int(wanted[i]) and not
                     ref.actions.get(i, "").startswith("could not fix")]
            if not wrong or len(ref.changes) == n_changes:  # settled, or the last pass changed nothing
                break
            n_changes = len(ref.changes)
            for i in tqdm(wrong, desc="LDKE scope fix", unit="question", disable=not progress or len(wrong) < 50):
                got, want = int(ref._route_rows(torch.tensor([i]))[0]), int(wanted[i])
                if got == want:  # a change made for an earlier row fixed this one too
                    continue
                if got != NO_SLOT:
                    ref.keep_out(got, i)
                else:
                    ref.let_in(want, i)
        after = ref.route()
        for j in range(len(rows)):
            done = ref.actions.get(j, "")
            if int(after[j]) != int(wanted[j]) and not done.startswith("could not fix"):
                ref.actions[j] = (f"could not fix: still routed to {_slot_name(int(after[j]))} when the passes "
                                  "ended" + (f" (changed for it: {done})" if done else ""))
        _drop_empty_anchors(router)
        config.router_text_anchors = router.num_anchors
    except BaseException:
        _restore(router, snap)
        raise
    finally:
        router.to(home)
    def action(j: int, want: int) -> str:
        done = ref.actions.get(j, "")
        if int(after[j]) == want and int(before[j]) != want and (not done or done.startswith("could not fix")):
            return "fixed by the change for another question"
        return done

    out = [ScopeFix(i, kind, prompt, want, int(before[j]), int(after[j]), action(j, want))
           for j, (i, kind, _, prompt, want) in enumerate(rows)]
    _record(edits, rows, ref.changes)
    for f in out:
        if not f.ok:
            logger.warning("scope: request %d %s %r still routes to %s (wanted %s)%s", f.request, f.kind, f.prompt,
                           f.after, f.wanted, f": {f.action}" if f.action else "")
    return out
