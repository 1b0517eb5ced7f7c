"""Fast Localization: which decoder layers causally carry a fact — in a constant number of passes.

Exact causal tracing (ROME; MultimodalCausalTrace for MLLMs) corrupts the subject, then restores one
layer's clean MLP output at a time (or one layer × position at a time) and measures how much of the
target probability comes back: ``L`` (or ``L × T``) forward passes per fact.

Fast Localization estimates all those restorations at once with *attribution patching*: the effect
of restoring layer ``l``'s MLP output is, to first order,

    (m_l^clean - m_l^corrupt) · ∂ log p(target) / ∂ m_l^corrupt

so one clean forward plus one corrupted forward+backward (~4 forward-equivalents) scores every layer
and every position, independent of depth and sequence length.

The subject is the image (its image-token embeddings entering the first decoder layer) — or, for a
text-only request, the question tokens. The default corruption replaces each subject embedding by the
mean of the subject's embeddings: the entity is gone but the input stays in distribution, and it is
deterministic. Gaussian noise (ROME's, ``noise_scale`` × the embedding std) is the alternative; on the
benchmark MLLM the per-layer tracing profile under one noise draw changes its top layer from seed to
seed, so neither the exact reference nor the fast estimate is stable under it.
Layer 0 and every layer at or below the router's probe layer are excluded from the candidates:
restoring layer 0 mostly just undoes the input noise (it dominates any tracing and is not where a
fact is stored), and an edited layer must run *after* the routing decision.

Layer: editing (README "Architecture"): imports data, tuner and editing modules, never the product code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..tuner.config import CORRUPTIONS
from ..tuner.context import routing_inputs
from ..families import BuiltInputs, Family, family_of
from ..requests import EditRequest
from ..tuner.routing import NO_SLOT

logger = logging.getLogger(__name__)


@dataclass
class LocalizationResult:
    """Per-layer causal scores for one request and the layers chosen for editing.

    Attributes:
        scores: ``(L,)`` score per decoder layer (higher = restoring this layer recovers more of the
            target probability). Non-candidate layers are reported too but never chosen.
        layers: chosen layers (top ``k`` candidates), ascending.
        candidates: layers eligible for editing.
        position_scores: ``(L, T)`` per layer × position scores (for heat maps), when computed.
        method: ``"attribution"`` (fast) or ``"tracing"`` / ``"tracing_positions"`` (exact).
        forward_passes: cost in forward-equivalents (a backward counts as 2).
        seconds: wall time.
        tokens: decoded input tokens (heat-map labels).
    """

    scores: torch.Tensor
    layers: list[int]
    candidates: list[int]
    method: str
    forward_passes: float
    seconds: float
    position_scores: torch.Tensor | None = None
    tokens: list[str] = field(default_factory=list)
    clean_prob: float = 0.0
    corrupt_prob: float = 0.0

    def ranking(self) -> list[int]:
        """Candidate layers sorted by score, best first."""
        return sorted(self.candidates, key=lambda i: -float(self.scores[i]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "scores": [float(s) for s in self.scores],
            "layers": self.layers,
            "candidates": self.candidates,
            "method": self.method,
            "forward_passes": self.forward_passes,
            "seconds": self.seconds,
            "clean_prob": self.clean_prob,
            "corrupt_prob": self.corrupt_prob,
        }


def candidate_layers(num_layers: int, probe_layer: int | None) -> list[int]:
    lo = max(1, (probe_layer if probe_layer is not None else 0) + 1)
    return list(range(lo, num_layers))


def _answer(request: EditRequest) -> str:
    """Trace the *existing* fact when it is known (where the old answer lives is where to edit);
    fall back to the new target otherwise."""
    return request.ground_truth or request.target


def _build(model: nn.Module, processor: Any, request: EditRequest) -> tuple[Family, BuiltInputs, nn.Module]:
    from ..tuner.model import _root_model

    family = family_of(model)
    root = _root_model(model)
    built = family.build_inputs(processor, [request.image], [request.prompt], [_answer(request)])
    device = next(root.parameters()).device
    return family, built.to(device), root


def _subject_mask(family: Family, root: nn.Module, built: BuiltInputs) -> torch.Tensor:
    image_mask = family.image_mask(root, built.input_ids)
    if bool(image_mask.any()):
        return image_mask
    return built.prompt_mask  # text-only request: corrupt the question


class _Corruptor:
    """Corrupts the subject positions of the hidden states entering layer 0.

    ``mode="mean"``: each subject position gets the mean of the row's subject positions (rows whose
    subject is a single position would be unchanged by that, so they get the noise instead);
    ``mode="noise"``: fixed Gaussian noise of std ``std`` is added.
    """

    def __init__(self, mask: torch.Tensor, std: float, seed: int, mode: str = "mean"):
        if mode not in CORRUPTIONS:
            raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {mode!r}")
        self.mask = mask
        self.std = std
        self.seed = seed
        self.mode = mode
        self.noise: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs["hidden_states"], None
        m = self.mask.unsqueeze(-1).to(hidden.device, hidden.dtype)
        if self.noise is None or self.noise.shape != hidden.shape:
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            self.noise = (torch.randn(hidden.shape, generator=g) * self.std).to(hidden.device, hidden.dtype)
        if self.mode == "mean":
            count = m.sum(dim=1, keepdim=True)
            mean = (hidden * m).sum(dim=1, keepdim=True) / count.clamp_min(1)
            ablated = hidden * (1 - m) + mean * m
            noisy = hidden + self.noise * m
            hidden = torch.where(count > 1, ablated, noisy)
        else:
            hidden = hidden + self.noise * m
        if rest is not None:
            return (hidden,) + tuple(rest), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = hidden
        return args, kwargs


def _embedding_std(family: Family, root: nn.Module) -> float:
    w = family.input_embeddings(root).weight
    return float(w.detach().float().std())


def _target_logprob(logits: torch.Tensor, built: BuiltInputs) -> torch.Tensor:
    """Sum of log-probs of the target tokens (teacher-forced)."""
    ids = built.input_ids
    mask = built.target_mask
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = ids[:, 1:]
    tok_lp = lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return (tok_lp * mask[:, 1:].float()).sum()


def _run(root: nn.Module, built: BuiltInputs) -> torch.Tensor:
    with routing_inputs(root, slots=torch.full((len(built),), NO_SLOT, dtype=torch.long), prompt_mask=built.prompt_mask):
        return root(**built.inputs, use_cache=False).logits


def locate(
    model: nn.Module,
    processor: Any,
    request: EditRequest,
    *,
    num_layers: int = 1,
    probe_layer: int | None = None,
    noise_scale: float = 3.0,
    seed: int = 0,
    corruption: str = "mean",
) -> LocalizationResult:
    """Fast Localization by attribution patching (clean forward + corrupted forward/backward).

    Any LDKE deltas on ``model`` are switched off for the passes. Returns per-layer and per-position
    scores and the ``num_layers`` best candidate layers above ``probe_layer``.
    """
    t0 = time.perf_counter()
    family, built, root = _build(model, processor, request)
    layers = family.decoder_layers(root)
    L = len(layers)
    mlp_outs = [family.mlp_out_module(root, i) for i in range(L)]
    subject = _subject_mask(family, root, built)
    std = noise_scale * _embedding_std(family, root)

    clean: dict[int, torch.Tensor] = {}

    def keep_clean(i):
        def hook(m, a, out):
            clean[i] = out.detach()

        return hook

    handles = [mlp_outs[i].register_forward_hook(keep_clean(i)) for i in range(L)]
    try:
        with torch.no_grad():
            clean_logits = _run(root, built)
    finally:
        for h in handles:
            h.remove()

    corrupt: dict[int, torch.Tensor] = {}

    def keep_corrupt(i):
        def hook(m, a, out):
            out.retain_grad()
            corrupt[i] = out

        return hook

    corruptor = _Corruptor(subject, std, seed, corruption)
    handles = [mlp_outs[i].register_forward_hook(keep_corrupt(i)) for i in range(L)]
    handles.append(layers[0].register_forward_pre_hook(corruptor, with_kwargs=True))
    req_grad = {p: p.requires_grad for p in root.parameters()}
    try:
        for p in root.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            # gradients must flow from the corrupted activations: make layer-0 input require grad
            logits = _run_with_grad(root, built, layers[0])
            lp = _target_logprob(logits, built)
            lp.backward()
    finally:
        for h in handles:
            h.remove()
        for p, r in req_grad.items():
            p.requires_grad_(r)

    pos_scores = torch.zeros(L, built.input_ids.shape[1])
    for i in range(L):
        g = corrupt[i].grad
        if g is None:
            continue
        diff = (clean[i].float() - corrupt[i].detach().float()) * g.float()
        pos_scores[i] = diff.sum(-1)[0].cpu()
    scores = pos_scores.sum(-1)
    cands = candidate_layers(L, probe_layer)
    chosen = sorted(sorted(cands, key=lambda i: -float(scores[i]))[:num_layers])
    with torch.no_grad():
        clean_p = float(torch.exp(_target_logprob(clean_logits, built)))
        corrupt_p = float(torch.exp(lp.detach()))
    return LocalizationResult(
        scores=scores,
        layers=chosen,
        candidates=cands,
        method="attribution",
        forward_passes=4.0,
        seconds=time.perf_counter() - t0,
        position_scores=pos_scores,
        tokens=_tokens(processor, family, built),
        clean_prob=clean_p,
        corrupt_prob=corrupt_p,
    )


def _run_with_grad(root: nn.Module, built: BuiltInputs, layer0: nn.Module) -> torch.Tensor:
    def make_leaf(m, args, kwargs):
        if args:
            h = args[0].detach().requires_grad_(True)
            return (h,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, kwargs

    h = layer0.register_forward_pre_hook(make_leaf, with_kwargs=True)
    try:
        return _run(root, built)
    finally:
        h.remove()


@torch.no_grad()
def trace(
    model: nn.Module,
    processor: Any,
    request: EditRequest,
    *,
    num_layers: int = 1,
    probe_layer: int | None = None,
    noise_scale: float = 3.0,
    seed: int = 0,
    per_position: bool = False,
    corruption: str = "mean",
) -> LocalizationResult:
    """Exact causal tracing, the reference Fast Localization is measured against.

    For each layer (``per_position=False``: ``L`` + 2 forwards) or each layer × position
    (``per_position=True``, ROME-style: ``L × T`` + 2 forwards), run the corrupted input with that
    MLP output restored to its clean value and score the recovered target log-probability.
    """
    t0 = time.perf_counter()
    family, built, root = _build(model, processor, request)
    layers = family.decoder_layers(root)
    L = len(layers)
    T = built.input_ids.shape[1]
    mlp_outs = [family.mlp_out_module(root, i) for i in range(L)]
    subject = _subject_mask(family, root, built)
    std = noise_scale * _embedding_std(family, root)

    clean: dict[int, torch.Tensor] = {}
    handles = [mlp_outs[i].register_forward_hook(lambda m, a, o, i=i: clean.__setitem__(i, o.detach())) for i in range(L)]
    try:
        clean_lp = float(_target_logprob(_run(root, built), built))
    finally:
        for h in handles:
            h.remove()
    corruptor = _Corruptor(subject, std, seed, corruption)
    h0 = layers[0].register_forward_pre_hook(corruptor, with_kwargs=True)
    passes = 2
    try:
        corrupt_lp = float(_target_logprob(_run(root, built), built))
        pos_scores = torch.zeros(L, T) if per_position else None
        scores = torch.zeros(L)
        for i in range(L):
            positions = range(T) if per_position else [None]
            for t in positions:
                def restore(m, a, out, i=i, t=t):
                    if t is None:
                        return clean[i]
                    out = out.clone()
                    out[:, t] = clean[i][:, t]
                    return out

                h = mlp_outs[i].register_forward_hook(restore)
                try:
                    lp = float(_target_logprob(_run(root, built), built))
                finally:
                    h.remove()
                passes += 1
                if t is None:
                    scores[i] = lp - corrupt_lp
                else:
                    pos_scores[i, t] = lp - corrupt_lp
            if per_position:
                scores[i] = pos_scores[i].max()
    finally:
        h0.remove()
    cands = candidate_layers(L, probe_layer)
    chosen = sorted(sorted(cands, key=lambda i: -float(scores[i]))[:num_layers])
    return LocalizationResult(
        scores=scores,
        layers=chosen,
        candidates=cands,
        method="tracing_positions" if per_position else "tracing",
        forward_passes=float(passes),
        seconds=time.perf_counter() - t0,
        position_scores=pos_scores,
        tokens=_tokens(processor, family, built),
        clean_prob=float(torch.tensor(clean_lp).exp()),
        corrupt_prob=float(torch.tensor(corrupt_lp).exp()),
    )


def _tokens(processor: Any, family: Family, built: BuiltInputs) -> list[str]:
    tok = family.tokenizer(processor)
    return [tok.decode([int(i)]) for i in built.input_ids[0]]
