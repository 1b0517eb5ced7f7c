"""``LDKEModel``: the PEFT tuner that injects LDKE layers and installs the routing hooks
(:mod:`ldke_peft.tuner.routing_hooks`, which say why they are hooks on the transformers model itself).

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .config import LDKEConfig
from ..errors import MergeRefusedError, UnsupportedModelError
from ..families import Family, family_of
from .fingerprint import check_fingerprint, compute_fingerprint
from .layer import LDKELayer, LDKELinear
from .routing import NO_SLOT
from .routing_hooks import (
    _make_embedding_hook,
    _make_entry_hook,
    _make_root_exit_hook,
    attach_tokenizer,
    routing_state_of,
)

logger = logging.getLogger(__name__)


def default_probe_layer(num_layers: int) -> int:
    """Early enough that most layers stay editable, late enough to see entity and relation (≈ L/8, ≥ 1)."""
    return max(1, min(num_layers - 2, round(num_layers / 8)))


class LDKEModel(BaseTuner):
    """PEFT tuner for LDKE edit packs. Create with ``get_peft_model(model, LDKEConfig(...))`` or, usually,
    :func:`ldke_peft.edit`; load with ``PeftModel.from_pretrained`` after ``import ldke_peft``."""

    prefix: str = "ldke_"
    tuner_layer_cls = LDKELayer
    target_module_mapping: dict = {}

    # ------------------------------------------------------------------ config / injection
    def _prepare_adapter_config(self, peft_config: LDKEConfig, model_config: dict) -> LDKEConfig:
        family = family_of(self.model)
        n = family.num_layers(self.model)
        if peft_config.probe_layer is None:
            peft_config.probe_layer = default_probe_layer(n)
        layers = sorted(set(peft_config.edit_layers()) | {peft_config.probe_layer})
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise UnsupportedModelError(f"LDKE pack refers to decoder layers {bad}; this model has {n} layers")
        peft_config.layers_to_transform = layers
        peft_config.layers_pattern = family.layers_path_of(self.model)
        peft_config.target_modules = [family.mlp_out_name(self.model, i) for i in layers]
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        config: LDKEConfig = self.peft_config[adapter_name]
        family = family_of(model)
        # Check before touching anything: a pack for another base must leave the model as it was.
        if config.base_model_fingerprint:
            check_fingerprint(config.base_model_fingerprint, model, family)
        else:
            config.base_model_fingerprint = compute_fingerprint(model, family)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._install_hooks(model, family)

    def _create_and_replace(
        self,
        config: LDKEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        layer_idx = self._layer_index(config, current_key)
        if isinstance(target, LDKELayer):
            target.update_layer(adapter_name, config)
            return
        state = routing_state_of(self.model)
        new_module = LDKELinear(target, adapter_name, config, layer_idx=layer_idx, routing_state=state)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _layer_index(config: LDKEConfig, key: str) -> int:
        m = re.search(re.escape(config.layers_pattern) + r"\.(\d+)\.", key)
        if m is None:
            raise UnsupportedModelError(f"cannot find a decoder-layer index in module name {key!r}")
        return int(m.group(1))

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if self.prefix not in n:
                p.requires_grad = False

    # ------------------------------------------------------------------ growing a pack
    def grow_adapter(self, adapter_name: str, new_slot_layers: list[list[int]], new_edits: list[dict] | None = None) -> list[int]:
        """Append slots to an existing pack (sequential editing). Returns the new global slot ids.

        Existing slots keep their deltas and router keys; new layers are wrapped on demand.
        """
        config: LDKEConfig = self.peft_config[adapter_name]
        start = config.num_slots
        for layers in new_slot_layers:
            if min(layers) <= config.probe_layer:
                raise ValueError(f"slot layers {layers} must be above the probe layer {config.probe_layer}")
        config.slot_layers = list(config.slot_layers) + [list(map(int, l)) for l in new_slot_layers]
        config.num_slots = len(config.slot_layers)
        config.edits = list(config.edits) + list(new_edits or [{} for _ in new_slot_layers])
        config.target_modules = None
        # re-run injection for this adapter: existing LDKE layers resize, new targets get wrapped
        super().inject_adapter(self.model, adapter_name)
        self._install_hooks(self.model, family_of(self.model))
        self.set_adapter(self.active_adapters)
        return list(range(start, config.num_slots))

    def _check_new_adapter_config(self, config: LDKEConfig) -> None:
        return None

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Entered by ``PeftModel.generate`` / ``PeftModel.forward`` around one request: the decision
        made at the request's prefill holds for all of its calls, so once it is made the root's
        hooks step aside until the request ends (returns or raises)."""
        state = routing_state_of(self.model)
        state.request_depth += 1
        try:
            yield
        finally:
            state.request_depth -= 1
            if state.request_depth == 0:
                state.end_request()

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self, model: nn.Module, family: Family) -> None:
        state = routing_state_of(model)
        state.name_or_path = getattr(model, "name_or_path", None) or state.name_or_path
        if "root" not in state.hooked_layers:
            # Entry modules: the root model, and the language model, which some families' generate
            # runs directly (BLIP-2: ``language_model.generate(inputs_embeds=...)``). A root call
            # suspends the language model's and the embeddings' hooks until its exit hook (which runs
            # even when the forward raises): every hooked module takes torch's slower call path, and a
            # root call has already decided.
            try:
                lm = family.language_model(model)
            except Exception:  # noqa: BLE001 - a family without a separate LM module
                lm = None
            entry = _make_entry_hook(state, family, model, is_root=True)
            handle = model.register_forward_pre_hook(entry, with_kwargs=True)
            state.hooks.append(handle)
            state.root_hooks.append((model._forward_pre_hooks, model._forward_pre_hooks_with_kwargs, handle.id, entry))
            leave = _make_root_exit_hook(state)
            handle = model.register_forward_hook(leave, always_call=True)
            state.hooks.append(handle)
            state.root_hooks.append((model._forward_hooks, model._forward_hooks_always_called, handle.id, leave))
            if lm is not None and lm is not model:
                inner = [(lm, _make_entry_hook(state, family, model, is_root=False), True)]
                emb = model.get_input_embeddings()
                if emb is not None:
                    inner.append((emb, _make_embedding_hook(state), False))
                for module, hook, with_kwargs in inner:
                    handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
                    state.hooks.append(handle)
                    state.inner_hooks.append((module, handle.id, hook, with_kwargs))
            state.hooked_layers.add("root")
        layers = family.decoder_layers(model)
        for name, cfg in self.peft_config.items():
            p = cfg.probe_layer
            if p is not None:
                state.probe_layers[p] = layers[p]
        # the LDKE layers inside each probe layer (routers live there); refreshed on every injection
        state.probe_wrappers = {
            p: [m for m in layer.modules() if isinstance(m, LDKELinear)] for p, layer in state.probe_layers.items()
        }

    def _remove_hooks(self) -> None:
        routing_state_of(self.model).remove_all()

    # ------------------------------------------------------------------ adapter management
    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        routing_state_of(self.model).slots.pop(adapter_name, None)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self._remove_hooks()
        return model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None, *, force: bool = False):
        """Refused unless ``force=True``: a merged edit fires on *every* input, which undoes the routing
        that keeps unrelated and coupled inputs unchanged. With ``force=True`` all slots' deltas are
        summed into the weights."""
        if not force:
            raise MergeRefusedError(
                "merge_and_unload() would apply every LDKE edit to every input (the router cannot survive a "
                "merge). Keep the adapter, or pass force=True if you really want an unrouted model."
            )
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False, *, force: bool = False) -> None:
        if not force:
            raise MergeRefusedError(
                "merge_adapter() would apply every LDKE edit to every input; pass force=True to do it anyway."
            )
        return super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    # ------------------------------------------------------------------ access for the editor
    def ldke_layers(self, adapter_name: str | None = None) -> dict[int, LDKELinear]:
        """``{decoder layer index: LDKELinear}`` for the layers wrapped (for ``adapter_name`` if given)."""
        out = {}
        for m in self.model.modules():
            if isinstance(m, LDKELinear):
                if adapter_name is None or adapter_name in m.ldke_A or adapter_name in m.ldke_router:
                    out[m.layer_idx] = m
        return out

    def router(self, adapter_name: str):
        for m in self.model.modules():
            if isinstance(m, LDKELinear) and adapter_name in m.ldke_router:
                return m.ldke_router[adapter_name]
        raise KeyError(f"adapter {adapter_name!r} has no router")

    def last_routing(self, adapter_name: str) -> torch.Tensor | None:
        """The per-row slot decision of the last prefill (``-1`` = no slot)."""
        return routing_state_of(self.model).slots.get(adapter_name)

def is_ldke_model(model: Any) -> bool:
    """True for a PeftModel (or bare transformers model) carrying at least one LDKE layer."""
    return any(isinstance(m, LDKELinear) for m in model.modules())


__all__ = ["LDKEModel", "attach_tokenizer", "default_probe_layer", "is_ldke_model", "routing_state_of", "NO_SLOT", "BaseTunerLayer"]


def _root_model(model: nn.Module) -> nn.Module:
    """The transformers model under PeftModel/LDKEModel wrappers."""
    m = model
    for _ in range(4):
        if isinstance(m, BaseTuner):
            m = m.model
        elif hasattr(m, "base_model") and isinstance(getattr(m, "base_model"), BaseTuner):
            m = m.base_model.model
        else:
            break
    return m
