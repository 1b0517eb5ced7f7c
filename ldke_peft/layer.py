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
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .context import current_forced_slots
from .routing import NO_SLOT, RouterState, RoutingState


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
        # adapter -> (decision tensor, its version, slot-id tensor, its version, rows, local): the
        # rows/slots selected for the current decision, reused by every decode step of a generation
        self._route_cache: dict[str, tuple] = {}
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
                self.ldke_router[adapter_name] = RouterState(d_model, config.router_dim, config.num_slots, groups=groups)
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

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

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

    def _slots_for(self, adapter_name: str, device: torch.device) -> torch.Tensor | None:
        forced = current_forced_slots()
        if forced is not None:
            return forced.to(device)
        slots = self._routing.slots.get(adapter_name)
        return None if slots is None else slots.to(device)

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
        """``(rows, local)``: the batch rows routed to a slot hosted here and that slot's local index.

        The decision is made once per prefill and then reused by every decode step, so the result is
        cached against the identity and version of the decision and slot-id tensors (a new decision,
        an in-place edit or a resized pack recomputes it). Saves a handful of small tensor ops per
        wrapped layer per generated token.
        """
        ids = self.ldke_slot_ids[name]
        c = self._route_cache.get(name)
        if c is not None and c[0] is slots and c[1] == slots._version and c[2] is ids and c[3] == ids._version:
            return c[4], c[5]
        ids_d = ids.to(slots.device)
        match = slots.unsqueeze(1) == ids_d.unsqueeze(0)  # (B, K_l)
        has = match.any(dim=1) & (slots != NO_SLOT)
        if bool(has.any()):
            rows = has.nonzero(as_tuple=True)[0]
            local = match[rows].float().argmax(dim=1)
        else:
            rows = local = None
        self._route_cache[name] = (slots, slots._version, ids, ids._version, rows, local)
        return rows, local

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self._routing.slots and current_forced_slots() is None:
            return result  # no routing decision at all (e.g. before any LDKE forward): base only
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.ldke_A or self.ldke_A[name].shape[0] == 0:
                continue
            slots = self._slots_for(name, x.device)
            if slots is None:
                continue
            x3 = self._per_sample(x, slots.shape[0])
            res3 = self._per_sample(result, slots.shape[0])
            if x3 is None or res3 is None:
                continue
            rows, local = self._routed_rows(name, slots)
            if rows is None:
                continue
            A = self.ldke_A[name][local]  # (n, in, r)
            B = self.ldke_B[name][local]  # (n, r, out)
            # fp32 whatever the model dtype: a small delta added to a large activation in bf16 loses most
            # of its bits, and only the routed rows pay for the cast
            delta = torch.bmm(torch.bmm(x3[rows].float(), A.float()), B.float()) * self.scaling[name]
            bound = self.max_delta_norm[name]
            if bound > 0:
                ref = res3[rows].detach().float().norm(dim=-1, keepdim=True)
                norm = delta.float().norm(dim=-1, keepdim=True)
                delta = delta * torch.clamp(bound * ref / norm.clamp_min(1e-12), max=1.0).to(delta.dtype)
            result = res3.index_add(0, rows, delta.to(result.dtype)).view(result.shape)
        return result

    def __repr__(self) -> str:
        return "ldke." + super().__repr__()
