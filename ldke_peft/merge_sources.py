"""Packs as the merge sees them: read from a folder, a ``PeftModel`` or a ``(config, state_dict)`` pair,
parsed per edited layer and router; written back as a pack folder or a ``PeftModel``.

Owns: :func:`load_pack`, :func:`save_pack`, :func:`to_peft_model` and the parsed form the merge works on.
Knows nothing of how packs are combined (:mod:`ldke_peft.merge`).

Layer: product (README "Architecture"): may import every layer; no library layer imports it.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from .tuner.config import LDKEConfig
from .errors import CorruptAdapterError, LDKEError
from .tuner.routing import dequantize_projection

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
_ROUTER = "ldke_router."
_PEFT_PREFIX = "base_model.model."
_PROJ = ("mu_v", "proj_v", "mu_t", "proj_t")


class MergeError(LDKEError, ValueError):
    """The packs cannot be merged (different probe layers, layer layouts or delta bounds)."""


# ---------------------------------------------------------------------- sources


@dataclass
class _Pack:
    """One source pack, parsed: per edited layer its module name and tensors, and its router."""

    name: str
    config: LDKEConfig
    deltas: dict[int, dict[str, Any]]  # layer -> {"module", "A", "B", "ids"}
    router_module: str
    router: dict[str, torch.Tensor]

    @property
    def scaling(self) -> float:
        return float(self.config.alpha) / float(self.config.rank)

    def groups(self) -> list[tuple[torch.Tensor, ...]]:
        """The pack's projections, ``(mu_v, proj_v, mu_t, proj_t)`` per group."""
        out = [tuple(self._dequantized(n) for n in _PROJ)]
        if "extra_proj_v" in self.router:
            for g in range(self.router["extra_proj_v"].shape[0]):
                out.append(tuple(self.router["extra_" + n][g].float() for n in _PROJ))
        return out

    def _dequantized(self, name: str) -> torch.Tensor:
        t = self.router[name]
        if t.dtype == torch.int8:  # int8 storage: the fp32 matrix the source pack routes with
            return dequantize_projection(t, self.router[name + "_scale"])
        return t.float()

    def slot_group(self, k: int) -> int:
        return int(self.router["proj_group"][k]) if "proj_group" in self.router else 0


def load_pack(source: Any, *, adapter_name: str = "default", name: str | None = None) -> tuple[LDKEConfig, dict[str, torch.Tensor]]:
    """``(config, state_dict)`` of a pack given as a folder, a ``PeftModel`` or a ``(config, state_dict)`` pair.

    A folder is validated like any pack being loaded (:func:`ldke_peft.tuner.safety.validate_pack`: no
    pickles, tensor names/shapes match the config, finite values). State-dict keys are the saved ones
    (``base_model.model.<module>.ldke_A``, ...), without the adapter name.
    """
    if isinstance(source, (str, os.PathLike)):
        from safetensors.torch import load_file

        path = os.fspath(source)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"LDKE pack folder not found: {path}")
        config = LDKEConfig.from_pretrained(path)  # validates the weights file too
        return config, load_file(os.path.join(path, WEIGHTS_NAME))
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], LDKEConfig):
        return copy.deepcopy(source[0]), {k: v.detach().cpu() for k, v in source[1].items()}
    peft_config = getattr(source, "peft_config", None)
    if isinstance(peft_config, dict) and adapter_name in peft_config:
        from peft.utils import get_peft_model_state_dict

        config = peft_config[adapter_name]
        if not isinstance(config, LDKEConfig):
            raise MergeError(f"adapter {adapter_name!r} of {name or 'the model'} is not an LDKE pack")
        sd = get_peft_model_state_dict(source, adapter_name=adapter_name)
        return copy.deepcopy(config), {k: v.detach().cpu().clone() for k, v in sd.items()}
    raise TypeError(
        f"cannot merge a {type(source).__name__}: pass pack folders, PeftModels with an LDKE adapter "
        f"{adapter_name!r}, or (LDKEConfig, state_dict) pairs"
    )


def _parse(name: str, config: LDKEConfig, sd: dict[str, torch.Tensor]) -> _Pack:
    from .tuner.safety import layer_regex, split_key

    try:
        layer_re = layer_regex(config)
    except CorruptAdapterError as exc:
        raise CorruptAdapterError(f"{name}: {exc}") from None
    deltas: dict[int, dict[str, Any]] = {}
    router: dict[str, torch.Tensor] = {}
    router_module = None
    for key, t in sd.items():
        try:
            module, tensor = split_key(key)
        except CorruptAdapterError as exc:
            raise CorruptAdapterError(f"{name}: {exc}") from None
        m = layer_re.search(module + ".")
        if m is None:
            raise CorruptAdapterError(f"{name}: tensor {key!r} is not under the pack's decoder layers")
        layer = int(m.group(1))
        if tensor.startswith(_ROUTER):
            if layer != config.probe_layer:
                raise CorruptAdapterError(f"{name}: router tensor {key!r} is not on the probe layer {config.probe_layer}")
            router_module = module
            router[tensor[len(_ROUTER) :]] = t
        else:
            entry = deltas.setdefault(layer, {"module": module})
            entry[{"ldke_A": "A", "ldke_B": "B", "ldke_slot_ids": "ids"}[tensor]] = t
    if router_module is None or "keys_v" not in router:
        raise CorruptAdapterError(f"{name}: the pack has no router state on its probe layer {config.probe_layer}")
    for layer, entry in deltas.items():
        if not {"A", "B", "ids"} <= set(entry):
            raise CorruptAdapterError(f"{name}: decoder layer {layer} lacks some of ldke_A / ldke_B / ldke_slot_ids")
        entry["ids"] = [int(v) for v in entry["ids"].tolist()]
        want = [k for k, layers in enumerate(config.slot_layers) if layer in layers]
        if entry["ids"] != want:
            raise CorruptAdapterError(f"{name}: layer {layer} hosts slots {entry['ids']}, its config says {want}")
    return _Pack(name, config, deltas, router_module, router)


# ---------------------------------------------------------------------- save / load


def save_pack(config: LDKEConfig, state_dict: dict[str, torch.Tensor], out: str | os.PathLike) -> str:
    """Write a pack folder (safetensors only, plus a model card) and validate it by loading its config."""
    from safetensors.torch import save_file

    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, f".{WEIGHTS_NAME}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out, WEIGHTS_NAME))
    config.save_pretrained(out)
    try:
        from .hub import model_card

        model_card(config).save(os.path.join(out, "README.md"))
    except Exception as exc:  # noqa: BLE001 - the card is documentation; the pack is complete without it
        logger.warning("could not write a model card for the merged pack: %s", exc)
    LDKEConfig.from_pretrained(out)  # re-read: the written pack passes the same checks as any pack
    return out


def to_peft_model(model: Any, config: LDKEConfig, state_dict: dict[str, torch.Tensor], adapter_name: str = "default") -> Any:
    """A ``PeftModel`` carrying the pack ``(config, state_dict)`` (e.g. a :class:`MergeResult`) on ``model``."""
    from peft import get_peft_model, set_peft_model_state_dict

    pm = get_peft_model(model, copy.deepcopy(config), adapter_name=adapter_name)
    result = set_peft_model_state_dict(pm, state_dict, adapter_name=adapter_name)
    missing = [k for k in getattr(result, "missing_keys", []) if "ldke_" in k and adapter_name in k]
    if missing:
        raise CorruptAdapterError(f"the pack does not provide {len(missing)} adapter tensor(s), e.g. {missing[0]}")
    pm.eval()
    return pm
