"""``LDKELinear``: the tuner layer that wraps an MLP output projection.

A wrapped layer plays one or both of two roles per adapter (edit pack):

* **edited layer** — hosts the low-rank deltas of the slots localized to it:
  ``y = base(x) + scaling * B_k(A_k(x))`` for each row whose routing decision is slot ``k``; rows
  routed to no slot (or to a slot not hosted here) get exactly ``base(x)``.
* **probe layer** — holds the pack's :class:`~ldke_peft.tuner.routing.RouterState` (keys, radii,
  projections). The router reads the hidden states *leaving* this decoder layer (a forward hook
  installed by :class:`~ldke_peft.tuner.model.LDKEModel`); the state lives here so PEFT saves, loads and
  deletes it with the adapter like any other adapter tensor.

What a layer holds per adapter, and PEFT's layer protocol around it, is :class:`~ldke_peft.tuner.layer_base.LDKELayer`;
this module owns the routed forward (per-row factor plans, reused by decode steps).

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

from .layer_base import LDKELayer
from .routing import NO_SLOT
from .routing_state import RoutingState


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


class LDKELinear(nn.Module, LDKELayer):
    """``base(x)`` plus, per row, the delta of the slot the router chose for that row."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: Any, layer_idx: int, routing_state: RoutingState, **kwargs
    ) -> None:
        super().__init__()
        LDKELayer.__init__(self, base_layer, layer_idx, routing_state, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    @staticmethod
    def _per_sample(t: torch.Tensor, batch: int) -> torch.Tensor | None:
        """``t`` as ``(batch, tokens, features)``, or ``None`` if it cannot be split per sample.

        Most decoders call the MLP on ``(B, T, d)``; OPT (BLIP-2) flattens to ``(B*T, d)`` first, which
        is batch-major, so a 2-D input splits into ``batch`` equal row blocks.
        """
        if t.dim() == 3:
            return t if t.shape[0] == batch else None
        if t.dim() == 2 and batch > 0 and t.shape[0] % batch == 0:
            return t.view(batch, t.shape[0] // batch, t.shape[1])
        return None

    def _routed_rows(self, name: str, slots: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(rows, local)``: the batch rows routed to a slot hosted here and that slot's local index."""
        ids = self.ldke_slot_ids[name].to(slots.device)
        match = slots.unsqueeze(1) == ids.unsqueeze(0)  # (B, K_l)
        has = match.any(dim=1) & (slots != NO_SLOT)
        if not bool(has.any()):
            return None, None
        rows = has.nonzero(as_tuple=True)[0]
        return rows, match[rows].float().argmax(dim=1)

    def _local_index(self, name: str) -> dict[int, int]:
        """``{global slot id: local row}`` of the slots hosted here, cached per id tensor and version."""
        ids = self.ldke_slot_ids[name]
        c = self._hosted_cache.get(name)
        if c is None or c[0] is not ids or c[1] != ids._version:
            c = (ids, ids._version, {int(k): j for j, k in enumerate(ids.tolist())})
            self._hosted_cache[name] = c
        return c[2]

    def invalidate_plans(self) -> None:
        """Forget the gathered factors (after the deltas were swapped or rolled back wholesale)."""
        self._plan, self._plan_for, self._plan_fast, self._plan_stamps = [], -1, None, ()
        self._factor_cache.clear()
        self._hosted_cache.clear()

    #: decisions whose factors a layer remembers per adapter (a batch-1 server sees one per slot)
    FACTOR_CACHE_SIZE = 64

    def _row_factors(self, name: str, rows: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`_slot_factors` for a decision given as host-side row slots (what :class:`Decisions`
        already read back), cached per decision: no device work at all for a decision seen before."""
        A, B, ids = self.ldke_A[name], self.ldke_B[name], self.ldke_slot_ids[name]
        # valid while the very same tensors hold the same data (identity, not id(): a freed tensor's id
        # can be reused) and the scaling is unchanged
        held = (A, B, ids)
        stamp = (A._version, B._version, ids._version, self.scaling[name])
        cache = self._factor_cache.setdefault(name, {})
        hit = cache.get(rows)
        if hit is not None and hit[1] == stamp and all(a is b for a, b in zip(hit[0], held)):
            return hit[2]
        where = self._local_index(name)
        local = [where.get(k, -1) for k in rows]
        factors = None
        if max(local, default=-1) >= 0:
            idx = torch.tensor([j if j >= 0 else 0 for j in local], device=A.device)
            scale = float(self.scaling[name])
            keep = torch.tensor([scale if j >= 0 else 0.0 for j in local], device=A.device).view(-1, 1, 1)
            factors = (_f32(A.detach().index_select(0, idx)), _f32(B.detach().index_select(0, idx)) * keep)
        if len(cache) >= self.FACTOR_CACHE_SIZE:
            cache.clear()
        cache[rows] = (held, stamp, factors)
        return factors

    def _slot_factors(self, name: str, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-row delta factors for a routing decision, or ``None`` if no row uses a slot hosted here.

        ``(A, B)`` of shapes ``(batch, in, r)`` / ``(batch, r, out)`` in fp32, the scaling folded into
        ``B``: row ``i`` holds its slot's factors, and rows routed elsewhere hold ``B = 0`` (their delta
        is exactly zero, so their output stays exactly the base output). Built once per decision:
        every decode step of a generation then costs two small ``bmm``, with no indexing.
        """
        A, B = self.ldke_A[name].detach(), self.ldke_B[name].detach()
        ids, order = self.ldke_slot_ids[name].to(A.device).sort()  # global slot ids hosted here
        slots = slots.to(A.device)
        pos = torch.searchsorted(ids, slots).clamp_max(len(ids) - 1)
        hit = ids[pos] == slots  # NO_SLOT (-1) is never a hosted id
        if not bool(hit.any()):
            return None
        pos = order[pos] * hit
        keep = (hit.float() * float(self.scaling[name])).view(-1, 1, 1)
        return _f32(A[pos]), _f32(B[pos]) * keep

    def _bounded(self, name: str, delta: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Scale each position's delta to at most ``max_delta_norm`` × the base output's norm there."""
        bound = self.max_delta_norm[name]
        if bound <= 0:
            return delta
        ref_n = ref.detach().float().norm(dim=-1, keepdim=True)
        norm = delta.float().norm(dim=-1, keepdim=True)
        return delta * torch.clamp(bound * ref_n / norm.clamp_min(1e-12), max=1.0).to(delta.dtype)

    def _apply_plan(self, x: torch.Tensor, result: torch.Tensor, plan: list) -> torch.Tensor:
        """``result`` plus each planned adapter's per-row delta (``B = 0`` rows add exactly zero)."""
        for name, batch, pa, pb in plan:
            x3 = self._per_sample(x, batch)
            res3 = self._per_sample(result, batch)
            if x3 is None or res3 is None:
                continue
            xa = torch.bmm(x3 if x3.dtype == torch.float32 else x3.float(), pa)
            if self.max_delta_norm[name] <= 0 and res3.dtype == torch.float32:
                # one fused op: res + xa @ B (what a decode step of an fp32 model pays)
                out = torch.baddbmm(res3, xa, pb)
            else:
                delta = self._bounded(name, torch.bmm(xa, pb), res3)
                out = res3 + delta.to(res3.dtype)
            result = out if out.shape == result.shape else out.view(result.shape)
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # A decode step of a routed generation: this layer's gathered factors for the current decision,
        # checked with a handful of compares. The fast plan is only made for a plain fp32 nn.Linear
        # base without hooks and one adapter without a delta bound (see ``_forward``); anything else
        # (a new decision, gradients, forced slots, another input shape) takes the general path.
        fast = self._plan_fast
        if (
            fast is not None
            and fast[1] == fast[0].version
            and not args
            and not kwargs
            and not torch.is_grad_enabled()
            and self._routing.call_slots is None
        ):
            params = fast[2]
            if fast[3] is None:
                # nothing to add for this decision here (no row routed to a slot hosted here, or a
                # probe layer that hosts none): the base layer's kernel
                return F.linear(x, params["weight"], params["bias"])
            if (
                fast[6]._version == fast[7]  # the slot factors were not written since they were gathered
                and fast[8]._version == fast[9]
                and x.dim() == 3
                and x.shape[0] == fast[3]
                and x.dtype is torch.float32
            ):
                return torch.baddbmm(F.linear(x, params["weight"], params["bias"]), torch.bmm(x, fast[4]), fast[5])
        return self._forward(x, *args, **kwargs)

    def _fast_plan(self, decisions: Any, factors: tuple | None) -> tuple | None:
        """What :meth:`forward` checks first on the current decision's later calls, or ``None`` when the
        general path must run: ``(decisions, version, base params, batch, A_rows, B_rows, A, A version,
        B, B version)``, with ``batch = None`` when this layer adds nothing for the decision. Only for
        a plain ``nn.Linear`` base without hooks (fp32 when a delta is added)."""
        base = self._base_ref
        if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks \
                or _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
            return None
        if factors is None:
            return (decisions, decisions.version, base._parameters, None)
        if base.weight.dtype != torch.float32:
            return None
        batch, pa, pb = factors
        (A, a_ver), (B, b_ver) = self._plan_stamps
        return (decisions, decisions.version, base._parameters, batch, pa, pb, A, a_ver, B, b_ver)

    def _forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # the common paths come first and touch as little as possible (attributes via __dict__, no
        # nn.Module.__getattr__, no helper calls)
        base = self._base_ref
        if type(base) is nn.Linear and not (
            args or kwargs or base._forward_hooks or base._forward_pre_hooks
            or _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
        ):
            # a plain linear layer without hooks: the same kernel without a second module call
            params = base._parameters
            result = F.linear(x, params["weight"], params["bias"])
        else:
            result = base(x, *args, **kwargs)
        decisions = self._routing.slots
        if not self._A_store:
            # hosts no delta of any adapter (a probe layer that only holds a router)
            self._plan_fast = self._fast_plan(decisions, None)
            return result
        if (
            self._plan_for == decisions.version
            and not torch.is_grad_enabled()
            and self._routing.call_slots is None
            and all([t._version == v for t, v in self._plan_stamps])
        ):
            # a later call with the same decision (every decode step of a generation): the factors
            # gathered at its first call, or nothing at all when no row is routed to a slot hosted here
            return self._apply_plan(x, result, self._plan) if self._plan else result
        forced = self._routing.call_slots
        if forced is None and not decisions.any_routed():
            # no row of the current decision is routed to any slot (the common case): exactly the base
            # layer; remembered, so the decision's later calls stop at the compare above
            if not torch.is_grad_enabled():
                self._plan, self._plan_for, self._plan_stamps = [], decisions.version, ()
                self._plan_fast = self._fast_plan(decisions, None)
            return result
        if self._disable_adapters or self.merged_adapters:
            return result
        grad = torch.is_grad_enabled()
        plan = []
        for name in self.active_adapters:
            if name not in self.ldke_A or self.ldke_A[name].shape[0] == 0:
                continue
            slots = forced if forced is not None else self._routing.slots.get(name)
            if slots is None:
                continue
            slots = slots.to(x.device)
            A, B = self.ldke_A[name], self.ldke_B[name]
            if grad and (A.requires_grad or B.requires_grad):
                # training a slot: only the routed rows, so gradients flow to their factors alone
                x3 = self._per_sample(x, slots.shape[0])
                res3 = self._per_sample(result, slots.shape[0])
                rows, local = self._routed_rows(name, slots) if x3 is not None and res3 is not None else (None, None)
                if rows is None:
                    continue
                # fp32 whatever the model dtype: a small delta added to a large activation in bf16
                # loses most of its bits, and only the routed rows pay for the cast
                delta = torch.bmm(torch.bmm(x3[rows].float(), A[local].float()), B[local].float()) * self.scaling[name]
                delta = self._bounded(name, delta, res3[rows])
                result = res3.index_add(0, rows, delta.to(result.dtype)).view(result.shape)
                continue
            if forced is None:
                # the decision's rows were read back once per decision (Decisions); a layer hosting
                # none of its slots does no tensor work, and a decision seen before reuses its factors
                rows = self._routing.slots.rows(name)
                factors = self._row_factors(name, rows) if rows is not None else self._slot_factors(name, slots)
            else:
                factors = self._slot_factors(name, slots)
            if factors is not None:
                plan.append((name, int(slots.shape[0]), *factors))
        if plan:
            result = self._apply_plan(x, result, plan)
        if forced is None and not grad:
            self._plan, self._plan_for = plan, self._routing.slots.version
            # the factors were gathered from these tensors at these versions: an in-place write (the
            # editor's optimizer) makes the next call gather again
            stores = [(self.ldke_A[e[0]], self.ldke_B[e[0]]) for e in plan]
            self._plan_stamps = tuple((t, t._version) for pair in stores for t in pair)
            decisions = self._routing.slots
            if not plan:
                self._plan_fast = self._fast_plan(decisions, None)
            elif len(plan) == 1 and self.max_delta_norm[plan[0][0]] <= 0:
                self._plan_fast = self._fast_plan(decisions, plan[0][1:])
            else:
                self._plan_fast = None
        return result

    def __repr__(self) -> str:
        return "ldke." + super().__repr__()
