"""The Disentanglement Classifier: routing state and decision.

Each edit slot ``k`` owns a *visual* key (where the edited entity's image tokens land) and a *textual*
key (where questions about the edited relation land), each with a radius, in a low-dimensional
projection learned per pack. An input is in slot ``k``'s scope only if **both** parts fall inside their
radii; that factorisation is what keeps coupled inputs out (same image + another question fails the
textual test; a look-alike image + the same question fails the visual test). Text-only inputs carry
no visual part and can only match slots whose edit has no image.

The visual feature is pooled from the hidden states leaving the *probe* decoder layer (below every
edited layer), which the model computes anyway. The textual feature is, by default, a small sentence
encoder's embedding of the question read out of the prompt tokens (:mod:`ldke_peft.tuner.question_key`): the
layers below every edited layer carry a question's wording more than what it asks. Packs written
before format 1.2 (or made with ``router_text_encoder=None``) pool it from the probe layer too.

This module holds the storage (:class:`RouterState`, saved with the adapter) and the decision; the
per-call state and feature pooling are :mod:`ldke_peft.tuner.routing_state`. Fitting keys, radii and projections is the editor's job
(:mod:`ldke_peft.editing.router_fit`).

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .projection import _init_proj, dequantize_projection, quantize_projection  # noqa: F401 (re-exported)
from .text_anchors import ANCHOR_BUFFERS, WordIndex, anchor_count, empty_anchors, veto, with_slot_anchors

NO_SLOT = -1

#: How a pack stores its router projections (``LDKEConfig.router_storage``).
ROUTER_STORAGE = ("int8", "float32")


class RouterState(nn.Module):
    """Per-pack router tensors, stored as persistent buffers so PEFT saves/loads them as-is.

    Buffers (``K`` slots, projection width ``p``):
        ``mu_v (d_v,)``, ``proj_v (d_v, p)``: centring + projection of visual features.
        ``mu_t (d_t,)``, ``proj_t (d_t, p)``: the same for textual features.
        ``keys_v (K, p)``, ``keys_t (K, p)``: slot keys in projected space.
        ``radius_v (K,)``, ``radius_t (K,)``: acceptance radii.
        ``needs_image (K,)``: 1.0 for image edits (visual part required), 0.0 for text-only edits.

    With ``storage="int8"`` (the default of :class:`~ldke_peft.LDKEConfig`) ``proj_v``/``proj_t`` are
    int8 and ``proj_v_scale (p,)``/``proj_t_scale (p,)`` hold their per-column scales (see
    :func:`quantize_projection`); the router computes with the dequantized fp32 matrices.

    **Projection groups.** A pack made by one :func:`~ldke_peft.edit` call has one projection, so all
    its keys live in one space. A pack *merged* from packs fitted separately
    (:func:`ldke_peft.merge.merge_packs`) keeps every source pack's projection instead of refitting:
    with ``groups = G > 1`` it also holds

        ``proj_group (K,)`` long: the projection slot ``k``'s keys live in (0 = ``mu_*``/``proj_*``),
        ``extra_mu_v (G-1, d_v)``, ``extra_proj_v (G-1, d_v, p)``, ``extra_mu_t (G-1, d_t)``,
        ``extra_proj_t (G-1, d_t, p)``: projections ``1 .. G-1``.

    Each slot's score is then computed exactly as in its source pack; slots appended later join group 0.
    With ``G == 1`` none of these buffers exist. Floating buffers keep their stored dtype whatever
    ``.to(dtype)`` the model gets (:meth:`_apply`): radii sit between a positive and a negative a few
    percent apart, and bf16 keys/projections would move them.
    """

    BUFFERS = ("mu_v", "proj_v", "mu_t", "proj_t", "keys_v", "keys_t", "radius_v", "radius_t", "needs_image")
    #: Only present with int8 storage: the per-column scales of ``proj_v`` / ``proj_t``.
    SCALE_BUFFERS = ("proj_v_scale", "proj_t_scale")
    #: Only present when ``groups > 1`` (a merged pack that keeps several source projections).
    GROUP_BUFFERS = ("proj_group", "extra_mu_v", "extra_proj_v", "extra_mu_t", "extra_proj_t")
    #: Only present in a pack whose slots keep textual anchors (:mod:`ldke_peft.tuner.text_anchors`).
    ANCHOR_BUFFERS = ANCHOR_BUFFERS

    def __init__(self, d_model: int, proj_dim: int, num_slots: int, groups: int = 1, storage: str = "float32",
                 d_text: int | None = None, text_encoder: str | None = None, text_frame: tuple[str, ...] = (),
                 anchors: int = 0):
        super().__init__()
        if groups < 1:
            raise ValueError(f"a router needs at least one projection group, got groups={groups}")
        if storage not in ROUTER_STORAGE:
            raise ValueError(f"router storage must be one of {ROUTER_STORAGE}, got {storage!r}")
        d_v, d_t = d_model, int(d_text or 2 * d_model)
        #: the sentence encoder whose embedding of the question is the textual feature (None = the
        #: probe layer's pooled hidden states) and the chat frame stripped before it reads (config, not
        #: tensors: the pack's config holds them)
        self.text_encoder = text_encoder
        self.text_frame = tuple(text_frame)
        #: the textual feature is [probe-layer text features ; encoder embedding] (``router_text_probe``)
        self.text_probe = False
        self.slot_words = ()
        self.register_buffer("mu_v", torch.zeros(d_v))
        self.register_buffer("mu_t", torch.zeros(d_t))
        for name, d_in, seed in (("proj_v", d_v, 1), ("proj_t", d_t, 2)):
            proj = _init_proj(d_in, proj_dim, seed=seed)
            if storage == "int8":
                q, scale = quantize_projection(proj)
                self.register_buffer(name, q)
                self.register_buffer(name + "_scale", scale)
            else:
                self.register_buffer(name, proj)
        self.register_buffer("keys_v", torch.zeros(num_slots, proj_dim))
        self.register_buffer("keys_t", torch.zeros(num_slots, proj_dim))
        # radius 0 = the slot never fires until the editor (or the user) sets it
        self.register_buffer("radius_v", torch.zeros(num_slots))
        self.register_buffer("radius_t", torch.zeros(num_slots))
        self.register_buffer("needs_image", torch.ones(num_slots))
        if groups > 1:
            self.register_buffer("proj_group", torch.zeros(num_slots, dtype=torch.long))
            self.register_buffer("extra_mu_v", torch.zeros(groups - 1, d_v))
            self.register_buffer("extra_proj_v", torch.zeros(groups - 1, d_v, proj_dim))
            self.register_buffer("extra_mu_t", torch.zeros(groups - 1, d_t))
            self.register_buffer("extra_proj_t", torch.zeros(groups - 1, d_t, proj_dim))
        if anchors > 0:
            for name, buf in empty_anchors(anchors, proj_dim).items():
                self.register_buffer(name, buf)

    def _apply(self, fn, recurse: bool = True):
        # ``model.to(torch.bfloat16)`` (and PEFT moving an adapter to its base layer's dtype) would round
        # keys, radii and projections: device moves apply, dtype casts of floating buffers do not.
        # (A RouterState has buffers only: no parameters, no submodules.)
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            new = fn(buf)
            if buf.is_floating_point() and new.dtype != buf.dtype:
                new = buf.to(device=new.device)
            self._buffers[name] = new
        return self

    @property
    def num_slots(self) -> int:
        return int(self.keys_v.shape[0])

    @property
    def num_groups(self) -> int:
        """Number of projections (1 unless the pack was merged from packs with different projections)."""
        return 1 + int(self.extra_proj_v.shape[0]) if "extra_proj_v" in self._buffers else 1

    @property
    def storage(self) -> str:
        """``"int8"`` or ``"float32"``: how the projections are stored (see :func:`quantize_projection`)."""
        return "int8" if self.proj_v.dtype == torch.int8 else "float32"

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(proj_v, proj_t)`` as the fp32 matrices routing uses, dequantized once and cached.

        The cache is keyed on the buffers' identity and version (like :meth:`_slot_tables`), so
        ``set_projection`` or ``load_state_dict`` rebuilds it.
        """
        int8 = self.proj_v.dtype == torch.int8
        bufs = (self.proj_v, self.proj_t) + ((self.proj_v_scale, self.proj_t_scale) if int8 else ())

        def build():
            if int8:
                return (dequantize_projection(self.proj_v, self.proj_v_scale),
                        dequantize_projection(self.proj_t, self.proj_t_scale))
            return _f32(self.proj_v), _f32(self.proj_t)

        return _cached(self, "_proj", bufs, build)

    @property
    def proj_dim(self) -> int:
        return int(self.proj_v.shape[1])

    def resize(self, num_slots: int) -> None:
        """Grow (or shrink) the slot dimension, keeping existing slots."""
        k_old = self.num_slots
        if num_slots == k_old:
            return
        resized = [("keys_v", 0.0), ("keys_t", 0.0), ("radius_v", 0.0), ("radius_t", 0.0), ("needs_image", 1.0)]
        if "proj_group" in self._buffers:
            resized.append(("proj_group", 0))  # new slots are fitted in projection 0
        for name, fill in resized:
            old = getattr(self, name)
            shape = (num_slots,) + tuple(old.shape[1:])
            new = torch.full(shape, fill, dtype=old.dtype, device=old.device)
            n = min(k_old, num_slots)
            new[:n] = old[:n]
            setattr(self, name, new)

    # ------------------------------------------------------------------ decision
    def project(self, visual: torch.Tensor, textual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features in projection 0's space (the one new slots are fitted in)."""
        # router math in fp32 whatever the model dtype (bf16 distances are too coarse for radii)
        proj_v, proj_t, mu_v, mu_t = self._projection_tables()
        return _centred(visual, mu_v, proj_v), _centred(textual, mu_t, proj_t)

    def _projection_tables(self) -> tuple[torch.Tensor, ...]:
        """``(proj_v, proj_t, mu_v, mu_t)`` in fp32, derived once (the editor fits keys with this same
        :meth:`project`, so they agree)."""
        proj_v, proj_t = self.projections()
        return _cached(self, "_ptables", (proj_v, proj_t, self.mu_v, self.mu_t), lambda: (
            proj_v, proj_t, _f32(self.mu_v), _f32(self.mu_t)))

    def _slot_tables(self) -> tuple[torch.Tensor, ...]:
        """Per-slot tensors the decision needs, derived from the buffers once and cached.

        Routing runs at every prefill; deriving clamped radii and masks there each time is a dozen
        small kernels. The cache is keyed on each buffer's identity and version, so ``set_slot``,
        ``resize``, ``load_state_dict`` or any in-place write rebuilds it.
        """
        bufs = (self.keys_v, self.keys_t, self.radius_v, self.radius_t, self.needs_image)
        return _cached(self, "_tables", bufs, self._build_slot_tables)

    def _build_slot_tables(self) -> tuple[torch.Tensor, ...]:
        needs = self.needs_image.bool()
        live = (self.radius_t > 0) & ((self.radius_v > 0) | ~needs)
        inf = torch.tensor(float("inf"), device=self.keys_v.device)
        zero = torch.zeros((), device=self.keys_v.device)
        tables = (
            _f32(self.keys_v), _f32(self.keys_t),
            _f32(self.radius_v).clamp_min(1e-12), _f32(self.radius_t).clamp_min(1e-12),
            needs, live,
            # the decision's own tables: inverse radii (a text-only slot's visual part weighs 0), and
            # the penalty that excludes a slot for image rows / for text-only rows
            torch.where(needs, 1.0 / _f32(self.radius_v).clamp_min(1e-12), zero),
            1.0 / _f32(self.radius_t).clamp_min(1e-12),
            torch.where(live & needs, zero, inf), torch.where(live & ~needs, zero, inf),
        )
        return tables

    def scores(self, visual: torch.Tensor, textual: torch.Tensor, has_image: torch.Tensor,
               named: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, K)`` normalised distance (``<= 1`` means inside the slot's scope; ``inf`` = excluded).

        ``named`` (``(B, K)`` bool, see :meth:`named_mask`): which rows name which slot's asked-for word;
        None = none do (a caller without the question texts).

        The score of an image slot is ``max(d_v / r_v, d_t / r_t)``: both parts must be in scope. A
        text-only slot uses the textual part and only accepts text-only inputs; an image slot never
        accepts a text-only input. Written for few kernel calls (it runs at every prefill): distances
        are scaled by cached inverse radii (0 for a text-only slot's visual part), and exclusions are
        a cached ``0 / inf`` penalty chosen per row by whether it has an image.
        """
        inv_v, inv_t, pen_img, pen_txt = self._slot_tables()[6:]
        dv, dt = self._distances(visual, textual)
        img = has_image if has_image.dtype == torch.bool and has_image.device == dv.device else has_image.to(dv.device).bool()
        # a text-only slot's visual part weighs 0, also when the distance overflowed (inf * 0 is NaN)
        score = torch.maximum(torch.where(inv_v > 0, dv * inv_v, 0.0), dt * inv_t)
        score = score + torch.where(img.unsqueeze(1), pen_img, pen_txt)
        if self.num_anchors:
            # anchors only ever veto a row inside a slot's scope: only those slots' anchors are read
            inside = score <= 1.0
            if bool(inside.any()):
                score = torch.where(inside & self._anchor_veto(textual, inside.any(dim=0), named), float("inf"), score)
        return score

    @property
    def num_anchors(self) -> int:
        """Textual anchors held for all slots (0: every slot decides by its radii alone)."""
        return anchor_count(self._buffers)

    @property
    def slot_words(self) -> tuple[str, ...]:
        """Per slot, the word its edit question asks about ("" = none; ``LDKEConfig.router_asked_word``, kept in
        the pack's edit metadata): a question naming it is vetoed only by anchors that name it too."""
        return self._slot_words

    @slot_words.setter
    def slot_words(self, words: Sequence[str]) -> None:
        self._slot_words = tuple(str(w or "") for w in words)
        self._word_index = WordIndex(self._slot_words)

    def named_mask(self, questions: Sequence[str]) -> torch.Tensor | None:
        """``(B, K)`` bool: question ``b`` names slot ``k``'s asked-for word; None when no slot has one."""
        if not self._word_index:
            return None
        named = self._word_index.mask(questions)
        k = self.num_slots
        return named[:, :k] if named.shape[1] >= k else torch.cat([named, named.new_zeros(len(questions), k - named.shape[1])], 1)

    def _anchor_veto(self, textual: torch.Tensor, slots: torch.Tensor, named: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, K)``: rows the textual anchors of ``slots`` (``(K,)`` bool) veto, each slot in its own projection."""
        owner = self.anchors_slot.long()
        mine = slots.to(owner.device)[owner]
        group = self.proj_group[owner] if "proj_group" in self._buffers else torch.zeros_like(owner)
        out = torch.zeros((textual.shape[0], self.num_slots), dtype=torch.bool, device=textual.device)
        for g in range(self.num_groups):
            if bool((sel := mine & (group == g)).any()):
                out |= veto(self.project_textual(g, textual), self.anchors_t[sel], owner[sel], self.anchors_pos[sel],
                            self.num_slots, named)
        return out

    def _group_tables(self, g: int) -> tuple[torch.Tensor, ...]:
        """``project``'s tables for projection group ``g`` (0 = ``mu_*``/``proj_*``)."""
        if g == 0:
            return self._projection_tables()
        bufs = (self.extra_mu_v, self.extra_proj_v, self.extra_mu_t, self.extra_proj_t)

        def build():
            pv, pt = _f32(self.extra_proj_v[g - 1]), _f32(self.extra_proj_t[g - 1])
            return pv, pt, _f32(self.extra_mu_v[g - 1]), _f32(self.extra_mu_t[g - 1])

        return _cached(self, f"_gtables{g}", bufs, build)

    def _distances(self, visual: torch.Tensor, textual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, K)`` visual and textual distances of each row to each slot's keys, in the slot's own space.

        Every group projects with the same formula (:func:`_centred`), so a merged
        pack scores each slot exactly as the source pack it came from did.
        """
        if self.num_groups == 1:
            keys_v, keys_t = self._slot_tables()[:2]
            zv, zt = self.project(visual, textual)
            return torch.cdist(zv, keys_v), torch.cdist(zt, keys_t)
        v, t = _f32(visual), _f32(textual)
        B, K = v.shape[0], self.num_slots
        dv = torch.zeros((B, K), device=v.device)
        dt = torch.zeros((B, K), device=v.device)
        group = self.proj_group.to(v.device)
        for g in range(self.num_groups):
            sel = (group == g).nonzero(as_tuple=True)[0]
            if len(sel) == 0:
                continue
            pv, pt, mv, mt = self._group_tables(g)
            zv, zt = _centred(v, mv, pv), _centred(t, mt, pt)
            dv[:, sel] = torch.cdist(zv, self.keys_v[sel].float())
            dt[:, sel] = torch.cdist(zt, self.keys_t[sel].float())
        return dv, dt

    def _visual_distances(self, visual: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` visual distances of each row to each slot's visual key, in the slot's own space."""
        v = _f32(visual)
        if self.num_groups == 1:
            proj_v, _, mu_v, _ = self._projection_tables()
            return torch.cdist(_centred(v, mu_v, proj_v), self._slot_tables()[0])
        dv = torch.zeros((v.shape[0], self.num_slots), device=v.device)
        group = self.proj_group.to(v.device)
        for g in range(self.num_groups):
            sel = (group == g).nonzero(as_tuple=True)[0]
            if len(sel):
                pv, _, mv, _ = self._group_tables(g)
                dv[:, sel] = torch.cdist(_centred(v, mv, pv), self.keys_v[sel].float())
        return dv

    def may_route(self, visual: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: rows that some slot could take, judged on the visual part alone.

        A row routes only if one slot's visual *and* textual tests pass, so a row no slot's visual test
        admits (and, for text-only rows, a pack without text-only slots) routes nowhere whatever it asks:
        its textual feature need not be computed. :meth:`route` on the other rows gives the decision.
        """
        if self.num_slots == 0:
            return torch.zeros(visual.shape[0], dtype=torch.bool, device=visual.device)
        needs, live = self._slot_tables()[4:6]
        inv_v = self._slot_tables()[6]
        img = has_image.to(visual.device).bool()
        image_ok = ((self._visual_distances(visual) * inv_v <= 1.0) & (live & needs)).any(dim=1)
        text_ok = (live & ~needs).any()
        return torch.where(img, image_ok, text_ok)

    def route(self, visual: torch.Tensor, textual: torch.Tensor, has_image: torch.Tensor,
              named: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` long: the best-scoring slot within scope per row, or :data:`NO_SLOT` (``named``: see
        :meth:`scores`)."""
        if self.num_slots == 0:
            return torch.full((visual.shape[0],), NO_SLOT, dtype=torch.long, device=visual.device)
        best, idx = self.scores(visual, textual, has_image, named).min(dim=1)
        return torch.where(best <= 1.0, idx, NO_SLOT)

    # ------------------------------------------------------------------ direct access
    @torch.no_grad()
    def set_projection(self, *, mu_v=None, proj_v=None, mu_t=None, proj_t=None) -> None:
        """Write the centring vectors / projections (fp32 values; int8 storage quantizes them here, so
        fit keys and radii *after* this call, with :meth:`project`)."""
        for name, val in (("mu_v", mu_v), ("proj_v", proj_v), ("mu_t", mu_t), ("proj_t", proj_t)):
            if val is not None:
                buf = getattr(self, name)
                if tuple(val.shape) != tuple(buf.shape):
                    raise ValueError(f"{name}: expected shape {tuple(buf.shape)}, got {tuple(val.shape)}")
                if buf.dtype == torch.int8:
                    q, scale = quantize_projection(val)
                    buf.copy_(q)
                    getattr(self, name + "_scale").copy_(scale)
                else:
                    buf.copy_(val.to(buf))

    @torch.no_grad()
    def add_group(self, *, mu_v: torch.Tensor, proj_v: torch.Tensor, mu_t: torch.Tensor, proj_t: torch.Tensor) -> int:
        """Append a projection (fp32, as a merged pack stores its extra ones); returns its group index.

        A pack that grows (sequential editing) keeps projection 0, fitted for its first edits; a slot whose
        scope that projection cannot separate gets a projection fitted on its own rows instead, so it
        routes as the same edit made alone would. Put slots into it with :meth:`set_slot_group`.
        """
        dev = self.keys_v.device
        new = {"mu_v": mu_v, "proj_v": proj_v, "mu_t": mu_t, "proj_t": proj_t}
        ref = {"mu_v": self.mu_v, "proj_v": self.proj_v, "mu_t": self.mu_t, "proj_t": self.proj_t}
        for name, val in new.items():
            if tuple(val.shape) != tuple(ref[name].shape):
                raise ValueError(f"{name}: expected shape {tuple(ref[name].shape)}, got {tuple(val.shape)}")
        if "extra_proj_v" not in self._buffers:
            self.register_buffer("proj_group", torch.zeros(self.num_slots, dtype=torch.long, device=dev))
            for name, val in new.items():
                self.register_buffer("extra_" + name, val.detach().float().to(dev)[None].clone())
        else:
            for name, val in new.items():
                old = getattr(self, "extra_" + name)
                setattr(self, "extra_" + name, torch.cat([old, val.detach().float().to(old.device)[None]]))
        return self.num_groups - 1

    @torch.no_grad()
    def set_slot_group(self, slot: int, group: int) -> None:
        """Score slot ``slot`` in projection ``group`` (its keys must be in that projection's space)."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range (pack has {self.num_slots} slots)")
        if not 0 <= group < self.num_groups:
            raise IndexError(f"projection group {group} out of range (router has {self.num_groups})")
        if "proj_group" in self._buffers:
            self.proj_group[slot] = int(group)

    def slot_group(self, slot: int) -> int:
        """The projection group slot ``slot`` is scored in (0 unless the pack holds several)."""
        return int(self.proj_group[slot]) if "proj_group" in self._buffers else 0

    def project_group(self, group: int, visual: torch.Tensor, textual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features in projection ``group``'s space (``project`` for group 0)."""
        pv, pt, mv, mt = self._group_tables(group)
        return _centred(visual, mv, pv), _centred(textual, mt, pt)

    def project_visual(self, group: int, visual: torch.Tensor) -> torch.Tensor:
        """The visual part alone in projection ``group``'s space (what :meth:`project_group` gives for it)."""
        pv, _, mv, _ = self._group_tables(group)
        return _centred(visual, mv, pv)

    def project_textual(self, group: int, textual: torch.Tensor) -> torch.Tensor:
        """The textual part alone in projection ``group``'s space (what :meth:`project_group` gives for it)."""
        _, pt, _, mt = self._group_tables(group)
        return _centred(textual, mt, pt)

    @torch.no_grad()
    def set_text_anchors(self, slot: int, pos: torch.Tensor, neg: torch.Tensor, named: torch.Tensor | None = None) -> None:
        """Replace slot ``slot``'s textual anchors (rows in its projection's space; ``named``: which ``neg``
        rows name the slot's asked-for word; see :mod:`.text_anchors`)."""
        for name, buf in with_slot_anchors(self._buffers, slot, pos, neg, self.proj_dim, named).items():
            if name in self._buffers:
                setattr(self, name, buf)
            else:
                self.register_buffer(name, buf)

    @torch.no_grad()
    def set_slot(self, slot: int, *, key_v, key_t, radius_v: float, radius_t: float, needs_image: bool = True) -> None:
        """Write one slot's keys/radii directly (keys are in *projected* space)."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range (pack has {self.num_slots} slots)")
        self.keys_v[slot] = torch.as_tensor(key_v).to(self.keys_v)
        self.keys_t[slot] = torch.as_tensor(key_t).to(self.keys_t)
        self.radius_v[slot] = float(radius_v)
        self.radius_t[slot] = float(radius_t)
        self.needs_image[slot] = 1.0 if needs_image else 0.0


def _cached(owner: nn.Module, slot: str, bufs: tuple, build):
    """``build()``, cached in ``owner.__dict__[slot]`` while ``bufs`` are the very same tensors (held, so
    their ids cannot be reused) at the same versions (an in-place write, ``set_slot`` or
    ``load_state_dict`` bumps them; a device move makes new tensors)."""
    versions = tuple([b._version for b in bufs])
    hit = owner.__dict__.get(slot)
    if hit is not None and hit[1] == versions and all([a is b for a, b in zip(hit[0], bufs)]):
        return hit[2]
    value = build()
    owner.__dict__[slot] = (bufs, versions, value)
    return value


def _centred(x: torch.Tensor, mu: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``(x - mu) @ proj`` in fp32. Centring first matters: a whitening projection of features with a small
    spread has large entries, and ``x @ P - mu @ P`` then subtracts two large, nearly equal numbers whose
    rounding depends on the matmul kernel (the batch size picks it on some CPUs), and one input lands
    at points farther apart than a tight radius."""
    return (_f32(x) - mu) @ proj


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as fp32 without a kernel call when it already is (the router runs at every prefill)."""
    return t if t.dtype == torch.float32 else t.float()
