"""Shrink any transformers config to a tiny model of the same architecture (no Hub, no weights).

Used by the family coverage report for model types without a hand-made tiny builder: widths, depths,
head counts and expert counts go down in every sub-config; what fixes the geometry of inputs (image
size, patch size, vocabulary, special token ids) stays, so the architecture and its input format
are the real ones. Some architectures tie sizes together in ways a generic shrink cannot know; then
building fails and the report says so.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["shrink_config"]

#: attribute -> tiny value, applied to every (sub-)config that has the attribute
_TINY = {
    "hidden_size": 32,
    "embed_dim": 32,
    "out_hidden_size": 32,
    "projection_dim": 32,
    "vision_output_dim": 32,
    "intermediate_size": 64,
    "ffn_dim": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
}
_DEPTH_ATTRS = ("num_hidden_layers", "depth", "num_layers")


def shrink_config(config: Any, text_layers: int = 4, other_layers: int = 2) -> Any:
    """A deep copy of ``config`` with every sub-config shrunk (see the module docstring)."""
    from ..families.support import sub_configs

    cfg = copy.deepcopy(config)
    text = getattr(cfg, "text_config", None)
    for sub in sub_configs(cfg):
        is_text = sub is text or (text is None and sub is cfg)
        for attr, value in _TINY.items():
            if isinstance(getattr(sub, attr, None), int) and not isinstance(getattr(sub, attr), bool):
                _set(sub, attr, value)
        depth = text_layers if is_text else other_layers
        for attr in _DEPTH_ATTRS:
            if isinstance(getattr(sub, attr, None), int):
                _set(sub, attr, depth)
        types = getattr(sub, "layer_types", None)
        if isinstance(types, (list, tuple)) and types:
            pattern = list(types)
            _set(sub, "layer_types", [pattern[i % len(pattern)] for i in range(depth)] if not is_text else _mixed(pattern, depth))
        rope = getattr(sub, "rope_parameters", None)
        if isinstance(rope, dict) and "mrope_section" in rope:
            rope = dict(rope, mrope_section=[2, 1, 1])
            _set(sub, "rope_parameters", rope)
        for attr, value in (("deepstack_visual_indexes", [0]), ("fullatt_block_indexes", [1]), ("mlp_only_layers", [])):
            if isinstance(getattr(sub, attr, None), (list, tuple)):
                _set(sub, attr, value)
    return cfg


def _mixed(pattern: list[str], n: int) -> list[str]:
    """``n`` layer types keeping every kind of the pattern (a hybrid stack stays hybrid)."""
    kinds = list(dict.fromkeys(pattern))
    out = [pattern[i] for i in range(min(n, len(pattern)))]
    for k, kind in enumerate(kinds):
        if kind not in out and n:
            out[-1 - k % n] = kind
    return out


def _set(cfg: Any, attr: str, value: Any) -> None:
    try:
        setattr(cfg, attr, value)
    except Exception:  # noqa: BLE001 - a read-only / validated attribute: leave it
        pass
