"""``LDKELayer``: what an LDKE-wrapped layer holds per adapter and PEFT's layer protocol around it.

Per adapter (edit pack) a wrapped MLP output projection holds the low-rank deltas of the slots localized to
it (stored sparsely: ``ldke_slot_ids`` maps local rows to global slot indices, so a pack grows linearly with
the number of edits, not with edits x layers) and, on the probe layer, the pack's
:class:`~ldke_peft.tuner.routing.RouterState`, so PEFT saves, loads and deletes it with the adapter like any other
adapter tensor. Owns creating and resizing those containers, moving them with the base layer, and PEFT's
``set_adapter`` / ``delete_adapter`` / ``merge`` / ``unmerge``. The routed forward is
:class:`~ldke_peft.tuner.layer.LDKELinear`'s.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .routing import RouterState
from .routing_state import RoutingState


def _text_encoder(config: Any) -> str | None:
    """The pack's textual-key encoder, or None for probe-layer text features."""
    enc = getattr(config, "router_text_encoder", None)
    return enc or None


def slot_words(config: Any) -> tuple[str, ...]:
    """Each slot's asked-for word from the pack's edit metadata (``""`` where none was recorded, or all of
    them without ``router_asked_word``): what the router's anchor veto reads (:mod:`.text_anchors`)."""
    edits = list(getattr(config, "edits", None) or [])
    if not getattr(config, "router_asked_word", False):
        return ()
    words = [str(e.get("asked_word") or "") if isinstance(e, dict) else "" for e in edits]
    return tuple(words + [""] * (int(config.num_slots) - len(words)))


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
                    d_text=_text_dim(config, d_model), anchors=int(getattr(config, "router_text_anchors", 0) or 0),
                )
            router = self.ldke_router[adapter_name]
            router.text_encoder = _text_encoder(config)
            router.text_probe = bool(getattr(config, "router_text_probe", False)) and router.text_encoder is not None
            router.text_frame = tuple(getattr(config, "router_text_frame", None) or ())
            router.slot_words = slot_words(config)
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
