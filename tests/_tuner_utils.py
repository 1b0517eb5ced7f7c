"""Shared helpers for the tuner and pack-loading tests: tiny models, probe inputs, hand-set packs.

A "hand-set" pack is an LDKE adapter whose router keys are the exact probe features of chosen
``(image, prompt)`` anchors (as :func:`ldke_peft.tuner.probe_features.collect_probe_features` computes them) and whose
deltas have random, large ``B`` (so a routed row visibly changes). No fitting is involved, so these
tests isolate the tuner mechanics (injection, routing, caching, saving, loading) from the editor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image

from ldke_peft import LDKEConfig
from ldke_peft.families import base_model_of, family_of
from ldke_peft.tuner.layer import LDKELinear
from ldke_peft.tuner.probe_features import collect_probe_features
from ldke_peft.testing.roundtrip import greedy_without_cache  # noqa: F401  (re-exported for the tests)
from ldke_peft.testing.tiny import tiny_model

#: Families every tuner test runs on (one Llama-style LLaVA, one M-RoPE Qwen2-VL, one OPT BLIP-2).
FAMILIES = ("llava", "qwen2_vl", "blip-2")

PROMPT_A = "What is the capital of the country shown in the image?"
PROMPT_B = "Which language is spoken in the country in the picture?"
PROMPT_C = "What currency is used there?"


def image(color: tuple[int, int, int], size: int = 64, stripe: tuple[int, int, int] | None = None) -> Image.Image:
    """A flat-colour test image (64x64 fits every tiny processor; Qwen2-VL needs >= 56x56)."""
    img = Image.new("RGB", (size, size), color)
    if stripe is not None:
        for x in range(size):
            for y in range(size // 3, 2 * size // 3):
                img.putpixel((x, y), stripe)
    return img


RED = image((220, 30, 30), stripe=(250, 250, 250))
BLUE = image((20, 40, 200), stripe=(250, 220, 0))
GREEN = image((20, 160, 60))


def build(model_type: str, seed: int = 0) -> tuple[Any, Any]:
    """A fresh tiny ``(model, processor)``; skipping is not allowed, so an unknown type fails loudly."""
    return tiny_model(model_type, seed=seed)


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own tensors, under their original names, whatever LDKE wrapped around them."""
    root = base_model_of(model)
    out = {}
    for k, v in root.state_dict().items():
        if "ldke_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().clone()
    return out


def assert_same_state(before: dict[str, torch.Tensor], model: torch.nn.Module, what: str = "") -> None:
    after = base_state(model)
    assert set(after) == set(before), f"{what}: base model parameter names changed: {set(after) ^ set(before)}"
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{what}: base weights changed: {changed[:5]}"


def ldke_modules(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LDKELinear)]


def logits(model: Any, built: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**built.inputs).logits


# ---------------------------------------------------------------------- packs


@dataclass
class Anchor:
    """An input a slot must fire on: the slot's keys are set to its exact probe features."""

    image: Any
    prompt: str


@dataclass
class SlotSpec:
    layers: list[int]
    anchor: Anchor
    needs_image: bool = True


@dataclass
class HandPack:
    """What :func:`hand_pack` built, for assertions."""

    model: Any  # the PeftModel
    processor: Any
    config: LDKEConfig
    adapter: str
    slots: list[SlotSpec] = field(default_factory=list)


def probe_features(model: Any, processor: Any, probe_layer: int, rows: Sequence[Anchor]):
    return collect_probe_features(model, processor, probe_layer, [r.image for r in rows], [r.prompt for r in rows])


def default_negatives() -> list[Anchor]:
    """Inputs the test packs' slots must never fire on (radii are set below their distance)."""
    negs = []
    for img in (RED, BLUE, GREEN, None):
        for p in (PROMPT_A, PROMPT_B, PROMPT_C):
            negs.append(Anchor(img, p))
    return negs


def set_slots(
    peft_model: Any,
    processor: Any,
    slots: Sequence[SlotSpec],
    adapter: str = "default",
    slot_ids: Sequence[int] | None = None,
    negatives: Sequence[Anchor] | None = None,
    b_scale: float = 3.0,
    seed: int = 0,
) -> None:
    """Write keys/radii (and random ``B``) for ``slots`` into ``adapter``'s router and layers.

    Each slot's radii are a third of the distance (visual and textual separately) from its anchor to
    the nearest *other* input among ``negatives`` and the other anchors, so exactly its anchor (up
    to padding noise) routes to it.
    """
    tuner = peft_model.base_model
    cfg = tuner.peft_config[adapter]
    router = tuner.router(adapter)
    slot_ids = list(range(len(slots))) if slot_ids is None else list(slot_ids)
    negatives = default_negatives() if negatives is None else list(negatives)
    anchors = [s.anchor for s in slots]
    rows = anchors + negatives
    v, t, has = probe_features(peft_model, processor, cfg.probe_layer, rows)
    zv, zt = router.project(v, t)
    for j, (spec, k) in enumerate(zip(slots, slot_ids)):
        others = [i for i in range(len(rows)) if i != j and _distinct(rows[i], spec.anchor)]
        dv = torch.cdist(zv[j : j + 1], zv[others])[0]
        dt = torch.cdist(zt[j : j + 1], zt[others])[0]
        # An image slot excludes a row if *either* part is out of its radius: every row with another
        # image fails the visual part, every row with the same image but another question fails the
        # textual part. A text-only slot competes only with text-only rows.
        other_img = torch.tensor([rows[i].image is not None and not _same_image(rows[i], spec.anchor) for i in others])
        other_q = torch.tensor([rows[i].prompt != spec.anchor.prompt for i in others])
        if spec.needs_image:
            r_v, r_t = _third(dv[other_img]), _third(dt[other_q])
        else:
            r_v, r_t = 0.0, _third(dt[other_q & ~has[others]])
        router.set_slot(k, key_v=zv[j], key_t=zt[j], radius_v=r_v, radius_t=r_t, needs_image=spec.needs_image)
    gen = torch.Generator().manual_seed(seed)
    for layer in tuner.ldke_layers(adapter).values():
        if adapter not in layer.ldke_B:
            continue
        ids = layer.hosted_slots(adapter)
        with torch.no_grad():
            for k in slot_ids:
                if k in ids:
                    B = layer.ldke_B[adapter]
                    B[ids.index(k)] = torch.randn(B.shape[1:], generator=gen) * b_scale


def _third(d: torch.Tensor) -> float:
    return float(d.min()) / 3 if d.numel() else 1.0


def _same_image(a: Anchor, b: Anchor) -> bool:
    return a.image is b.image


def _distinct(a: Anchor, b: Anchor) -> bool:
    return not (_same_image(a, b) and a.prompt == b.prompt)


def hand_pack(
    model: Any,
    processor: Any,
    slots: Sequence[SlotSpec],
    probe_layer: int = 1,
    rank: int = 2,
    adapter: str = "default",
    seed: int = 0,
    **config_kwargs: Any,
) -> HandPack:
    """``get_peft_model`` with an LDKE pack whose slots fire exactly on their anchors."""
    from peft import get_peft_model

    cfg = LDKEConfig(slot_layers=[list(s.layers) for s in slots], probe_layer=probe_layer, rank=rank, **config_kwargs)
    pm = get_peft_model(model, cfg, adapter_name=adapter)
    pm.eval()
    set_slots(pm, processor, slots, adapter=adapter, seed=seed)
    return HandPack(pm, processor, pm.peft_config[adapter], adapter, list(slots))


def build_inputs(model: Any, processor: Any, rows: Sequence[Anchor]):
    return family_of(model).build_inputs(processor, [r.image for r in rows], [r.prompt for r in rows])


def supports_text_only(model: Any) -> bool:
    return family_of(model).supports_text_only


def generate(model: Any, built: Any, steps: int, **kwargs: Any) -> torch.Tensor:
    """New tokens of ``model.generate`` (greedy unless ``kwargs`` say otherwise)."""
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        out = model.generate(**built.inputs, max_new_tokens=steps, min_new_tokens=steps, **kwargs)
    return out[:, built.input_ids.shape[1] :]

