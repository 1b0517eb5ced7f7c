"""Router features of given rows, computed exactly as the router computes them at inference, up to the
probe layer only (the rest of the forward is cut short).

Owns :func:`collect_probe_features`, which the router fit, the pack guards and the studies share. Runs
the tuner's model; knows nothing of fitting.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .context import routing_inputs
from ..families import family_of
from ..families.unwrap import base_model_of as _root_model
from .layer import LDKELinear
from .routing import NO_SLOT
from .routing_state import pool_features

class _StopForward(Exception):
    """Raised by a temporary hook to end a forward pass once the probe layer has run."""


@torch.no_grad()
def collect_probe_features(
    model: nn.Module,
    processor: Any,
    probe_layer: int,
    images: list[Any],
    prompts: list[str],
    targets: list[str | None] | None = None,
    *,
    batch_size: int = 32,
    text_key: Any = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router features (``visual``, ``textual``, ``has_image``) of ``(image, prompt[, target])`` rows,
    exactly as the router computes them at inference.

    Runs the model only up to the probe layer (the rest of the forward is cut short), with every LDKE
    delta off. When a row has a target, the answer tokens are appended but pooled out through the
    prompt mask, as in teacher-forced evaluation. ``text_key`` = ``(encoder, frame[, with_probe])`` reads
    the textual part with that sentence encoder (beside the probe layer's text features when
    ``with_probe``), ``None`` pools it from the probe layer; ``"auto"`` does what the
    model's LDKE router on ``probe_layer`` does.
    """
    family = family_of(model)
    root = _root_model(model)
    if text_key == "auto":
        text_key = _text_key_of(root, probe_layer)
    with_probe = bool(text_key is not None and len(text_key) > 2 and text_key[2])
    tokenizer = family.tokenizer(processor) if text_key is not None else None
    layers = family.decoder_layers(root)
    device = next(root.parameters()).device
    out_v, out_t, out_h = [], [], []
    n = len(prompts)
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        tg = None if targets is None else list(targets[s:e])
        if tg is not None and any(t is None for t in tg):
            tg = None
        # right-aligned (each row at the positions it has alone) so that rows sharing a prefix (the chat
        # frame, an image asked several questions) compute it once (layer_replay.packed_hidden)
        built = family.build_inputs(processor, images[s:e], prompts[s:e], tg).right_aligned().to(device)
        hidden = _packed_probe_hidden(root, family, processor, built, images[s:e], prompts[s:e], tg, probe_layer, device)
        if hidden is None:
            captured: dict[str, Any] = {}

            def grab(module, args, output):
                captured["h"] = output[0] if isinstance(output, (tuple, list)) else output
                raise _StopForward

            h = layers[probe_layer].register_forward_hook(grab)
            try:
                with routing_inputs(root, slots=torch.full((e - s,), NO_SLOT, dtype=torch.long), prompt_mask=built.prompt_mask):
                    try:
                        root(**built.inputs, use_cache=False)
                    except _StopForward:
                        pass
            finally:
                h.remove()
            hidden = captured["h"]
        image_mask = family.image_mask(root, built.input_ids)
        v, t, hi = pool_features(hidden, image_mask, built.prompt_mask)
        if text_key is not None:
            from .question_key import load_encoder, question_texts

            pm = built.prompt_mask.to(image_mask.device).bool()
            enc = load_encoder(text_key[0]).encode(question_texts(tokenizer, built.input_ids, pm & ~image_mask, text_key[1]),
                                                   device=hidden.device)  # where serving encodes (routing_hooks)
            t = torch.cat([t.float().cpu(), enc], dim=1) if with_probe else enc
        out_v.append(v.cpu())
        out_t.append(t.cpu())
        out_h.append(hi.cpu())
    return torch.cat(out_v), torch.cat(out_t), torch.cat(out_h)


def _packed_probe_hidden(root: nn.Module, family: Any, processor: Any, built: Any, images: list[Any],
                         prompts: list[str], targets: list[str] | None, probe_layer: int, device: Any) -> torch.Tensor | None:
    """Probe-layer hidden states of ``built``'s rows computed packed (shared prefixes once), checked
    against a real forward of its first and last rows; ``None`` when that cannot be done."""
    from .layer_replay import packed_hidden

    n = len(prompts)
    if n < 4:
        return None
    row_images = [-1 if im is None else next(k for k, x in enumerate(images) if x is im) for im in images]
    pick = [0, n - 1]
    probe = family.build_inputs(processor, [images[i] for i in pick], [prompts[i] for i in pick],
                                None if targets is None else [targets[i] for i in pick]).right_aligned().to(device)
    return packed_hidden(root, family, built, row_images, probe_layer, (probe, pick))


def _text_key_of(root: nn.Module, probe_layer: int) -> tuple[str, tuple[str, ...], bool] | None:
    """``(encoder, frame, with probe text)`` of the first active LDKE router on ``probe_layer``, else None."""
    for m in root.modules():
        if isinstance(m, LDKELinear) and m.layer_idx == probe_layer:
            for name in m.active_adapters:
                router = m.router(name)
                if router is not None and router.text_encoder is not None:
                    return router.text_encoder, router.text_frame, router.text_probe
    return None
