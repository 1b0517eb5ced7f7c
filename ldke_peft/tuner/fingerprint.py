"""Base-model fingerprints: an edit pack only loads onto the base model it was made for.

A fingerprint is ``model_type``, hidden size, number of decoder layers and a *weight signature*: a few
deterministically sampled values of every decoder layer's MLP output projection. Sampling (instead
of hashing whole tensors) keeps it O(layers) on a 70B model, and comparing with a tolerance keeps a
pack valid when the same base is loaded in bf16 instead of fp32.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import FingerprintMismatchError
from ..families import Family

_SAMPLES = 16
_RTOL = 2e-2


def _sample_positions(numel: int, layer_idx: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7919 * (layer_idx + 1))
    return torch.randint(0, numel, (_SAMPLES,), generator=g)


def weight_signature(model: torch.nn.Module, family: Family) -> dict[str, list[float]] | None:
    """Sampled MLP-output weights per decoder layer, or ``None`` if weights are not materialised."""
    sig: dict[str, list[float]] = {}
    for i in range(family.num_layers(model)):
        mod = family.mlp_out_module(model, i)
        base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
        w = base.weight
        if w.device.type == "meta":
            return None
        flat = w.detach().reshape(-1)
        pos = _sample_positions(flat.numel(), i).to(flat.device)
        sig[str(i)] = [float(v) for v in flat[pos].float().cpu()]
    return sig


def compute_fingerprint(model: torch.nn.Module, family: Family) -> dict[str, Any]:
    return {
        "model_type": str(model.config.model_type),
        "hidden_size": family.hidden_size(model),
        "num_layers": family.num_layers(model),
        "weight_signature": weight_signature(model, family),
    }


def check_fingerprint(expected: dict[str, Any], model: torch.nn.Module, family: Family) -> None:
    """Raise :class:`FingerprintMismatchError` naming the first difference; return silently if it matches."""
    if not expected:
        return
    actual = compute_fingerprint(model, family)
    for key in ("model_type", "hidden_size", "num_layers"):
        if key in expected and expected[key] != actual[key]:
            raise FingerprintMismatchError(
                f"this LDKE pack was made for a base model with {key}={expected[key]!r}, "
                f"but the model it is being loaded onto has {key}={actual[key]!r}"
            )
    exp_sig, act_sig = expected.get("weight_signature"), actual["weight_signature"]
    if not exp_sig or act_sig is None:
        return
    for layer, values in exp_sig.items():
        got = act_sig.get(layer)
        if got is None:
            raise FingerprintMismatchError(f"this LDKE pack expects decoder layer {layer}, which the model lacks")
        a, b = torch.tensor(values), torch.tensor(got)
        if not torch.allclose(a, b, rtol=_RTOL, atol=1e-3 * float(a.abs().max().clamp_min(1e-6))):
            raise FingerprintMismatchError(
                "this LDKE pack was made for a different base model: the weights of decoder layer "
                f"{layer}'s MLP output projection do not match (model_type {actual['model_type']}); "
                "load it onto the exact base checkpoint it was created with"
            )
