"""``LDKELinear``: the tuner layer that wraps an MLP output projection.

A wrapped layer plays one or both of two roles per adapter (edit pack):

* **edited layer** — hosts the low-rank deltas of the slots localized to it:
  ``y = base(x) + scaling * B_k(A_k(x))`` for each row whose routing decision is slot ``k``; rows
  routed to no slot (or to a slot not hosted here) get exactly ``base(x)``.
* **probe layer** — holds the pack's :class:`~ldke_peft.routing.RouterState` (keys, radii,
  projections). The router reads the hidden states *leaving* this decoder layer (a forward hook
  installed by :class:`~ldke_peft.model.LDKEModel`); the state lives here so PEFT saves, loads and
  deletes it with the adapter like any other adapter tensor.

Deltas are stored sparsely: a layer only holds the slots that edit it (``ldke_slot_ids`` maps local
rows to global slot indices), so a pack grows linearly with the number of edits, not with
edits × layers.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn.modules import module as _torch_module
from transformers.pytorch_utils import Conv1D

from .context import _FORCED_SLOT, current_forced_slots
from .routing import NO_SLOT, RouterState
from .routing_state import RoutingState


def _text_encoder(config: Any) -> str | None:
    """The pack's textual-key encoder, or None for probe-layer text features."""
    enc = getattr(config, "router_text_encoder", None)
    return enc or None


def _text_dim(config: Any, d_model: int) -> int | None:
    """Width of the router's textual features: the encoder's (recorded in the config), plus 2 x hidden with
    ``router_text_probe``; None (= 2 x hidden, probe-layer features only) without an encoder."""
    if _text_encoder(config) is None:
        return None
    dim = int(getattr(config, "router_text_dim", 0) or 0)
    if dim <= 0:
        from .question_key import load_encoder

        dim = config.router_text_dim = load_encoder(config.router_text_encoder).dim
    # with router_text_probe, [probe-layer mean; last] (2 x hidden) come first
    return dim + (2 * d_model if getattr(config, "router_text_probe", False) else 0)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


class LDKELayer(BaseTunerLayer):
    adapter_layer_names = ("ldke_A", "ldke_B", "ldke_router")
    other_param_names = ("ldke_slot_ids", "rank", "scaling", "max_delta_norm")

    def __init__(self, base_layer: nn.Module, layer_idx: int, routing_state: RoutingState, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.layer_idx = layer_idx
        self.rank: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.max_delta_norm: dict[str, float] = {}
        self.ldke_A = nn.ParameterDict()
        self.ldke_B = nn.ParameterDict()
        self.ldke_router = nn.ModuleDict()
        self.ldke_slot_ids = BufferDict({}, persistent=True)
        # the same objects, reachable without nn.Module.__getattr__ (read on every forward call)
        object.__setattr__(self, "_A_store", self.ldke_A)
        object.__setattr__(self, "_base_ref", base_layer)
        # the current routing decision's per-row delta factors, ``[(adapter, batch, A, B), ...]``, and
        # the decision version they belong to: built at a decision's first call (the prefill), reused by
        # every decode step (see ``forward``)
        self._plan: list = []
        self._plan_for = -1
        # the plan as one fused call, when it allows one: ``(batch, A, B)`` for a single fp32 adapter
        # without a delta bound (what a decode step of an fp32 model pays: two kernels, no Python loop)
        self._plan_fast: tuple | None = None
        self._plan_stamps: tuple = ()
        self._hosted_cache: dict[str, tuple] = {}
        # per adapter: {decision rows: (validity key, factors)}: a decision seen before (the same slot
        # for a batch-1 request, the same mix of rows) reuses its gathered factors instead of
        # gathering them again at its prefill
        self._factor_cache: dict[str, dict] = {}
        # shared, not a submodule: the model-level routing decisions
        object.__setattr__(self, "_routing", routing_state)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape
        else:
            raise TypeError(f"LDKE can wrap nn.Linear or transformers Conv1D, got {type(base).__name__}")

    # ------------------------------------------------------------------ construction
    def update_layer(self, adapter_name: str, config: Any, inference_mode: bool = False, **kwargs: Any) -> None:
        """Create or resize this layer's containers for ``adapter_name`` from the config.

        Called at injection and again when a pack grows (sequential editing): existing slots keep
        their tensors, new slots start at zero (``B = 0``, so a new slot is a no-op until fitted).
        """
        hosted = [k for k, layers in enumerate(config.slot_layers) if self.layer_idx in layers]
        self.rank[adapter_name] = config.rank
        self.scaling[adapter_name] = config.alpha / config.rank
        self.max_delta_norm[adapter_name] = float(config.max_delta_norm)
        if hosted or adapter_name in self.ldke_A:
            self._resize_deltas(adapter_name, hosted, config.rank)
        if config.probe_layer == self.layer_idx:
            d_model = self.out_features
            if adapter_name in self.ldke_router:
                self.ldke_router[adapter_name].resize(config.num_slots)
            else:
                groups = int(getattr(config, "router_groups", 1))
                self.ldke_router[adapter_name] = RouterState(
                    d_model, config.router_dim, config.num_slots, groups=groups,
                    storage=getattr(config, "router_storage", "float32"),
                    d_text=_text_dim(config, d_model),
                )
            router = self.ldke_router[adapter_name]
            router.text_encoder = _text_encoder(config)
            router.text_probe = bool(getattr(config, "router_text_probe", False)) and router.text_encoder is not None
            router.text_frame = tuple(getattr(config, "router_text_frame", None) or ())
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _resize_deltas(self, adapter_name: str, hosted: list[int], rank: int) -> None:
        old_ids = self.ldke_slot_ids[adapter_name].tolist() if adapter_name in self.ldke_slot_ids else []
        old_A = self.ldke_A[adapter_name].data if adapter_name in self.ldke_A else None
        old_B = self.ldke_B[adapter_name].data if adapter_name in self.ldke_B else None
        A = torch.zeros(len(hosted), self.in_features, rank)
        B = torch.zeros(len(hosted), rank, self.out_features)
        gen = torch.Generator().manual_seed(1000 + self.layer_idx)
        for j, k in enumerate(hosted):
            if k in old_ids and old_A is not None:
                i = old_ids.index(k)
                A[j] = old_A[i].to(A)
                B[j] = old_B[i].to(B)
            else:
                # A random (so gradients reach B), B zero (so a fresh slot changes nothing)
                A[j] = torch.randn(self.in_features, rank, generator=gen) / self.in_features**0.5
        self.ldke_A[adapter_name] = nn.Parameter(A)
        self.ldke_B[adapter_name] = nn.Parameter(B)
        self.ldke_slot_ids[adapter_name] = torch.tensor(hosted, dtype=torch.long)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """PEFT's move to the base layer's device *and dtype*, except that deltas stay fp32.

        A pack grows by re-injection (:meth:`update_layer` runs again), and PEFT's move would round every
        fitted slot to a half-precision base's dtype and train the new slots in fp16/bf16, where Adam's
        small updates are lost (an fp16 edit then never reaches its target). The deltas are tiny; the
        forward pass computes them in fp32 anyway. Router buffers keep fp32 by themselves (RouterState).
        """
        held = {}
        for attr in ("ldke_A", "ldke_B"):
            store = getattr(self, attr)
            if adapter_name in store:
                held[attr] = store.pop(adapter_name)
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        target = device if device is not None else self._get_base_layer_device_and_dtype(self.get_base_layer())[0]
        for attr, param in held.items():
            if param.device.type != "meta":
                data = param.detach().to(target) if target is not None else param.detach()
                if data.dtype in (torch.float16, torch.bfloat16):
                    data = data.float()
                if data.device != param.device or data.dtype != param.dtype:
                    param = nn.Parameter(data, requires_grad=param.requires_grad)
            getattr(self, attr)[adapter_name] = param

    # ------------------------------------------------------------------ helpers
    def router(self, adapter_name: str) -> RouterState | None:
        return self.ldke_router[adapter_name] if adapter_name in self.ldke_router else None

    def hosted_slots(self, adapter_name: str) -> list[int]:
        return self.ldke_slot_ids[adapter_name].tolist() if adapter_name in self.ldke_slot_ids else []

    def slot_delta(self, adapter_name: str, slot: int) -> tuple[nn.Parameter, nn.Parameter, int]:
        """``(A, B, local_index)`` for a global slot hosted here (editor access)."""
        ids = self.hosted_slots(adapter_name)
        if slot not in ids:
            raise KeyError(f"slot {slot} of adapter {adapter_name!r} is not hosted by layer {self.layer_idx}")
        return self.ldke_A[adapter_name], self.ldke_B[adapter_name], ids.index(slot)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Sum of every hosted slot's delta as a dense weight (only used by a *forced* merge)."""
        A, B = self.ldke_A[adapter_name], self.ldke_B[adapter_name]
        w = torch.einsum("kir,kro->io", A.float(), B.float()) * self.scaling[adapter_name]  # (in, out)
        base = self.get_base_layer()
        return (w if isinstance(base, Conv1D) else w.T).to(base.weight.dtype)

    # Anything that changes which deltas apply drops the gathered factors of the current decision
    # (a decode step would otherwise keep applying them until the next prefill).
    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        self.invalidate_plans()
        super().set_adapter(adapter_names, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.invalidate_plans()
        super().delete_adapter(adapter_name)

    def enable_adapters(self, enabled: bool) -> None:
        self.invalidate_plans()
        super().enable_adapters(enabled)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

        self.invalidate_plans()

        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.ldke_A:
                continue
            delta = self.get_delta_weight(name)
            w = self.get_base_layer().weight
            if safe_merge and not torch.isfinite(w.data + delta).all():
                raise ValueError(f"NaNs detected in the merged weights of adapter {name}")
            w.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        self.invalidate_plans()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.ldke_A:
                self.get_base_layer().weight.data -= self.get_delta_weight(name)


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
            and _FORCED_SLOT.get() is None
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
            and _FORCED_SLOT.get() is None
            and all([t._version == v for t, v in self._plan_stamps])
        ):
            # a later call with the same decision (every decode step of a generation): the factors
            # gathered at its first call, or nothing at all when no row is routed to a slot hosted here
            return self._apply_plan(x, result, self._plan) if self._plan else result
        forced = current_forced_slots()
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
