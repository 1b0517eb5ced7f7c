"""Baseline editors for the MKE benchmark: FT-L, LoRA, GRACE and IKE, implemented in the harness.

Each baseline is a function ``apply(model, processor, requests, **hp) -> (edited_model, restore)``:
``edited_model`` is evaluated by exactly the same metrics code as LDKE
(:func:`ldke_peft.metrics.compute_metrics`), and ``restore()`` puts the base model back bit for bit
(``restore`` is a :class:`Restore`, which also reports how many bytes the edit adds). Upstream
EasyEdit is not imported (it does not import under transformers 5 without a torchvision swap, see
DESIGN.md); each recipe below follows the upstream code and YAML it names (zjunlp/EasyEdit,
mid-2026 HEAD ``14cea82``), and every deliberate deviation is listed in its docstring.

Only the edit prompt, its image and the target are used by any baseline (never the evaluation
probes). Passing the edited model of a previous call back in as ``model`` continues editing it
(sequential editing) for LoRA and GRACE, as EasyEdit's sequential mode does.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..tuner.routing_state import RoutingState, routing_state_of
from ..errors import InvalidRequestError
from ..families import Family, family_of
from ..requests import EditRequest

logger = logging.getLogger(__name__)

__all__ = [
    "BASELINES",
    "FTLHyperParams",
    "GraceCodebook",
    "GraceHyperParams",
    "IKEHyperParams",
    "IKEModel",
    "LoRAHyperParams",
    "Restore",
    "apply_ft_l",
    "apply_grace",
    "apply_ike",
    "apply_lora",
    "grace_default_layer",
]


# ---------------------------------------------------------------------- shared pieces


@dataclass
class Restore:
    """Undo an edit: ``restore()`` returns the base model to its pre-edit state, bit for bit.

    Attributes:
        fn: the undo action (called once; later calls do nothing).
        edit_bytes: bytes the edit adds to the model (weight delta, adapter, codebook, demonstration),
            for the benchmark's "bytes per edit".
        info: method-specific facts (layer, steps taken, final loss, ...).
    """

    fn: Callable[[], Any]
    edit_bytes: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    _done: bool = False

    def __call__(self) -> Any:
        if self._done:
            return None
        self._done = True
        return self.fn()


def _as_list(requests: Sequence[EditRequest] | EditRequest) -> list[EditRequest]:
    if isinstance(requests, EditRequest):
        requests = [requests]
    requests = list(requests)
    if not requests:
        raise InvalidRequestError("a baseline needs at least one EditRequest", field="requests")
    for i, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            raise InvalidRequestError(f"requests[{i}] is a {type(r).__name__}, expected EditRequest", field="requests")
        r.validate(open_images=True)
    return requests


def _device(model: nn.Module) -> torch.device:
    return next(p for p in model.parameters()).device


def _requires_grad_state(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _set_requires_grad(model: nn.Module, state: dict[str, bool]) -> None:
    for n, p in model.named_parameters():
        if n in state:
            p.requires_grad_(state[n])


class _EvalMode:
    """Run with the module in eval mode (no dropout), restoring its mode afterwards."""

    def __init__(self, model: nn.Module, training: bool = False):
        self.model, self.training = model, training

    def __enter__(self):
        self.was = self.model.training
        self.model.train(self.training)
        return self

    def __exit__(self, *exc):
        self.model.train(self.was)


def _nbytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


# ---------------------------------------------------------------------- FT-L


@dataclass
class FTLHyperParams:
    """FT-L (constrained fine-tuning of one MLP output projection).

    Defaults follow EasyEdit ``hparams/FT/gpt2-xl.yaml`` (the FT-L configuration of the EasyEdit
    survey, arXiv 2401.01286, itself the FT-L of ROME, arXiv 2202.05262): ``num_steps: 25``,
    ``lr: 5e-4`` (Adam), ``weight_decay: 0``, ``norm_constraint: 5e-4`` (an L-infinity box around
    the original weights), ``objective_optimization: "prompt_last"`` (the negative log-likelihood
    of the target tokens read off the *last prompt position*; ``"target_new"`` is FT-M), early stop
    when the loss falls below ``1e-2``.

    ``layer``: a decoder layer index, or ``"located"`` (default): the top-1 layer of LDKE's Fast
    Localization for the (first) request, so FT-L and LDKE change the same layer and differ only
    in how (full-rank unrouted update vs routed low-rank slot). ``"mid"`` = ``L // 2``.
    """

    layer: int | str = "located"
    num_steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0
    norm_constraint: float | None = 5e-4
    objective: str = "prompt_last"
    stop_loss: float = 1e-2


def _ft_layer(model: nn.Module, processor: Any, requests: list[EditRequest], layer: int | str) -> int:
    family = family_of(model)
    L = family.num_layers(model)
    if isinstance(layer, int):
        return family._check_index(model, layer)
    if layer == "mid":
        return L // 2
    if layer == "located":
        from ..editing.localization import locate
        from ..tuner.model import default_probe_layer

        picks = [locate(model, processor, r, probe_layer=default_probe_layer(L)).layers[0] for r in requests]
        return Counter(picks).most_common(1)[0][0]
    raise ValueError(f"layer must be an int, 'located' or 'mid', got {layer!r}")


def apply_ft_l(model: nn.Module, processor: Any, requests: Sequence[EditRequest] | EditRequest, **hp: Any):
    """FT-L: fine-tune ``family.mlp_out_module(layer).weight`` on (image, prompt) -> target, no routing.

    EasyEdit's ``execute_ft`` (``easyeditor/models/ft/ft_main.py``): Adam on the one weight, batch
    size 1 per request, a step only while the loss is ``>= stop_loss``, the L-infinity clamp after
    every step, stop once the epoch's mean loss is below ``stop_loss``; the weight is edited in place.
    Deviations: the prompt is the model's chat-formatted prompt with the edit image (EasyEdit's FT is
    text-only), target ids are the target as it continues that prompt.
    """
    cfg = FTLHyperParams(**hp)
    requests = _as_list(requests)
    if cfg.objective not in ("prompt_last", "target_new"):
        raise ValueError(f"objective must be 'prompt_last' or 'target_new', got {cfg.objective!r}")
    family = family_of(model)
    t0 = time.perf_counter()
    layer = _ft_layer(model, processor, requests, cfg.layer)
    weight = family.mlp_out_module(model, layer).weight
    original = weight.detach().clone()
    grad_state = _requires_grad_state(model)
    device = _device(model)
    for p in model.parameters():
        p.requires_grad_(False)
    weight.requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses: list[float] = []
    steps = 0
    try:
        with _EvalMode(model):
            batches = [_ft_batch(family, processor, r, cfg.objective, device) for r in requests]
            for _ in range(cfg.num_steps):
                epoch = []
                for built, tgt_ids in batches:
                    logits = model(**built.inputs).logits
                    if cfg.objective == "prompt_last":
                        logp = F.log_softmax(logits[0, -1].float(), -1)
                        loss = -logp[tgt_ids].mean()
                    else:
                        pred = logits[0, :-1][built.target_mask[0, 1:]]
                        loss = F.cross_entropy(pred.float(), built.input_ids[0, 1:][built.target_mask[0, 1:]])
                    epoch.append(loss.item())
                    opt.zero_grad(set_to_none=True)
                    if epoch[-1] >= cfg.stop_loss:
                        loss.backward()
                        opt.step()
                        steps += 1
                    if cfg.norm_constraint is not None:
                        with torch.no_grad():
                            weight.copy_(torch.clamp(weight, original - cfg.norm_constraint, original + cfg.norm_constraint))
                losses.append(sum(epoch) / len(epoch))
                if losses[-1] < cfg.stop_loss:
                    break
    finally:
        weight.grad = None
        _set_requires_grad(model, grad_state)

    def restore() -> None:
        with torch.no_grad():
            weight.copy_(original)

    return model, Restore(
        restore,
        edit_bytes=_nbytes([original]) // len(requests),
        info={"layer": layer, "steps": steps, "loss_first": losses[0], "loss_last": losses[-1],
              "seconds": time.perf_counter() - t0},
    )


def _ft_batch(family: Family, processor: Any, r: EditRequest, objective: str, device):
    if objective == "prompt_last":
        built = family.build_inputs(processor, [r.image], [r.prompt]).to(device)
        formatted = family.format_prompt(processor, r.prompt, r.image is not None)
        tgt = torch.tensor(family.target_ids(processor, formatted, r.target), device=device)
        return built, tgt
    return family.build_inputs(processor, [r.image], [r.prompt], [r.target]).to(device), None


# ---------------------------------------------------------------------- LoRA


@dataclass
class LoRAHyperParams:
    """LoRA as EasyEdit's multimodal LoRA edits (``execute_multimodal_lora`` in
    ``easyeditor/models/lora/lora_main.py``; ``hparams/LoRA/qwen2vl-7b.yaml`` and
    ``llavaov-7b.yaml``): rank 8, alpha 32, dropout 0.1 on every language-model layer's attention
    ``q_proj`` / ``v_proj``; plain SGD at ``lr: 0.1`` with ``ExponentialLR(gamma=sh_lr=0.9)`` stepped
    after every batch; ``num_steps: 5``; loss = mean cross-entropy of the target tokens appended to
    the chat-formatted prompt with the image.

    Deviations: ``LoraConfig`` instead of the YAMLs' ``lora_type: "adalora"`` (AdaLoRA needs a
    ``total_step`` under peft 0.21 and its rank allocation never triggers in 5 steps); no gradient
    checkpointing (a memory saving only). The model stays in eval mode during the steps, as
    upstream's freshly loaded model is, so the dropout is inactive there too.
    """

    rank: int = 8
    alpha: int = 32
    dropout: float = 0.1
    target_suffixes: tuple[str, ...] = ("self_attn.q_proj", "self_attn.v_proj")
    num_steps: int = 5
    lr: float = 0.1
    lr_decay: float = 0.9
    weight_decay: float = 0.0
    adapter_name: str = "bench_lora"
    seed: int = 0  # LoRA's A matrices are initialised at random: seeded for reproducible runs


def apply_lora(model: nn.Module, processor: Any, requests: Sequence[EditRequest] | EditRequest, **hp: Any):
    """LoRA edit, unrouted. Pass the returned model back in to keep editing the same adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = LoRAHyperParams(**hp)
    requests = _as_list(requests)
    t0 = time.perf_counter()
    continuing = isinstance(model, PeftModel) and cfg.adapter_name in model.peft_config
    if continuing:
        peft_model = model
        grad_state = getattr(model, "_bench_grad_state")
    else:
        family = family_of(model)
        grad_state = _requires_grad_state(model)
        targets = [f"{family.layers_path_of(model)}.{i}.{s}" for i in range(family.num_layers(model)) for s in cfg.target_suffixes]
        lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            peft_model = get_peft_model(model, lcfg, adapter_name=cfg.adapter_name)
        peft_model._bench_grad_state = grad_state
    family = family_of(peft_model)
    device = _device(peft_model)
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n and cfg.adapter_name in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_decay)
    losses = []
    with _EvalMode(peft_model):
        batches = [family.build_inputs(processor, [r.image], [r.prompt], [r.target]).to(device) for r in requests]
        for _ in range(cfg.num_steps):
            for built in batches:
                out = peft_model(**built.inputs, labels=built.labels)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                sched.step()
                losses.append(out.loss.item())
    for p in params:
        p.grad = None
    n_edits = getattr(peft_model, "_bench_n_edits", 0) + len(requests)
    peft_model._bench_n_edits = n_edits

    def restore():
        base = peft_model.unload()
        _set_requires_grad(base, grad_state)
        return base

    return peft_model, Restore(
        restore,
        edit_bytes=_nbytes(params),
        info={"modules": len(params) // 2, "loss_first": losses[0], "loss_last": losses[-1], "edits_in_adapter": n_edits,
              "seconds": time.perf_counter() - t0},
    )


# ---------------------------------------------------------------------- GRACE


@dataclass
class GraceHyperParams:
    """GRACE (Hartvigsen et al., NeurIPS 2023) as EasyEdit runs it on MLLMs
    (``easyeditor/models/grace/GRACE.py``; ``hparams/GRACE/qwen2vl-7b.yaml``,
    ``llavaov-7b.yaml``): a codebook at one decoder layer's MLP output projection, keyed by that
    projection's *input* activation at the last prompt token, Euclidean distance, deferral radius
    ``eps: 1.0`` for new keys, ``eps_expand: coverage``, ``val_init: cold`` (uniform random value),
    ``replacement: replace_last`` (only the key token's output is replaced), values trained
    ``n_iter: 20`` Adam steps at ``edit_lr: 1.0`` on the target cross-entropy.

    ``layer``: ``None`` = :func:`grace_default_layer` (the YAMLs' layer 18 of 28, scaled to the
    model's depth); or an index.
    """

    layer: int | None = None
    n_iter: int = 20
    edit_lr: float = 1.0
    eps: float = 1.0
    eps_expand: str = "coverage"
    val_init: str = "cold"
    seed: int = 0


def grace_default_layer(num_layers: int) -> int:
    """EasyEdit puts GRACE on layer 18 of the 28-layer Qwen2-VL-7B / LLaVA-OV-7B; same relative depth."""
    return min(num_layers - 1, max(0, round(num_layers * 18 / 28)))


class GraceCodebook(nn.Module):
    """GRACE's codebook as a forward hook on one ``nn.Linear`` (the layer's MLP output projection).

    For every row, the query is the projection's input at the row's key position: the last prompt
    token (from :func:`~ldke_peft.tuner.context.prompt_mask_context` on the model when the caller appended answer
    tokens, else the last position, which is also what each generation step sees). When the nearest
    key is within its radius, that position's output is replaced by the key's value.

    Differences from upstream, on purpose: upstream keeps the *edit prompt's* key position for every
    later input (``key_id`` carried over), so a longer or shorter probe is queried at some other
    token; here every input is queried at its own last prompt token, as the GRACE paper describes.
    Conflicting labels are compared as target strings (upstream compares the mean of the label ids).
    """

    def __init__(self, module: nn.Linear, cfg: GraceHyperParams, routing: RoutingState | None = None):
        super().__init__()
        self.routing = routing  # the model's per-call inputs (the prompt mask of a teacher-forced call)
        self.cfg = cfg
        w = module.weight
        self.keys = torch.zeros(0, w.shape[1], device=w.device, dtype=torch.float32)
        self.values = nn.Parameter(torch.zeros(0, w.shape[0], device=w.device, dtype=torch.float32))
        self.epsilons = torch.zeros(0, device=w.device, dtype=torch.float32)
        self.labels: list[str] = []
        self.module = module
        self.handle = module.register_forward_hook(self._hook)
        self.train_pos: torch.Tensor | None = None  # key positions while fitting a value
        self.force_key: int | None = None
        self.last_query: torch.Tensor | None = None
        self.hits = 0

    # ---------------------------------------------------------------- inference
    def _positions(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        if self.train_pos is not None:
            return self.train_pos
        mask = self.routing.call_prompt_mask if self.routing is not None else None
        if mask is not None and tuple(mask.shape) == (B, T):
            idx = torch.arange(T, device=mask.device).expand(B, T)
            return torch.where(mask.bool(), idx, torch.full_like(idx, -1)).max(1).values.to(x.device)
        return torch.full((B,), T - 1, dtype=torch.long, device=x.device)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        pos = self._positions(x)
        rows = torch.arange(x.shape[0], device=x.device)
        query = x[rows, pos].float()
        self.last_query = query.detach()
        if len(self.keys) == 0:
            return output
        d = torch.cdist(query, self.keys)  # (B, K)
        dist, k = d.min(1)
        if self.force_key is not None:
            k = torch.full_like(k, self.force_key)
            dist = d[rows, k]
        hit = dist <= self.epsilons[k]
        if not bool(hit.any()):
            return output
        self.hits += int(hit.sum())
        out = output.clone()
        val = self.values[k].to(out.dtype)
        out[rows[hit], pos[hit]] = val[hit]
        return out

    def remove(self) -> None:
        self.handle.remove()

    @property
    def edit_bytes(self) -> int:
        return _nbytes([self.keys, self.values.detach(), self.epsilons])

    # ---------------------------------------------------------------- editing
    def add_edit(self, query: torch.Tensor, label: str) -> int:
        """GRACE's codebook update for one edit (upstream ``GRACEAdapter.forward`` at ``iter == 0``).

        Returns the index of the key whose value is trained.
        """
        q = query.detach().float().reshape(1, -1)
        cfg = self.cfg
        new_value = (torch.rand(1, self.values.shape[1], generator=self._gen(), device="cpu") if cfg.val_init == "cold"
                     else torch.zeros(1, self.values.shape[1])).to(q.device)
        if len(self.keys) == 0:
            return self._append(q, new_value, label)
        d = torch.cdist(q, self.keys)[0]
        dist, k = d.min(0)
        k = int(k)
        if float(dist) > cfg.eps + float(self.epsilons[k]):
            return self._append(q, new_value, label)
        if self.labels[k] != label:
            # conflict: a new key, both radii halved to split the space between them
            idx = self._append(q, new_value, label)
            self.epsilons[k] = float(dist) / 2 - 1e-5
            self.epsilons[idx] = float(dist) / 2
            return idx
        if float(dist) > float(self.epsilons[k]) and cfg.eps_expand == "coverage":
            self.epsilons[k] = float(dist)
        return k

    def _gen(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed + len(self.keys))

    def _append(self, q: torch.Tensor, value: torch.Tensor, label: str) -> int:
        self.keys = torch.cat([self.keys, q])
        self.values = nn.Parameter(torch.cat([self.values.detach(), value]))
        self.epsilons = torch.cat([self.epsilons, torch.tensor([self.cfg.eps], device=q.device)])
        self.labels.append(label)
        return len(self.keys) - 1


def apply_grace(model: nn.Module, processor: Any, requests: Sequence[EditRequest] | EditRequest, **hp: Any):
    """GRACE edit(s), one request after another (GRACE is sequential by design).

    A model already carrying a :class:`GraceCodebook` (from an earlier call) gets the new keys
    added to it. ``restore()`` removes the hook: the base weights are never touched.
    """
    cfg = GraceHyperParams(**hp)
    requests = _as_list(requests)
    t0 = time.perf_counter()
    family = family_of(model)
    book: GraceCodebook | None = getattr(model, "_bench_grace", None)
    if book is None:
        layer = cfg.layer if cfg.layer is not None else grace_default_layer(family.num_layers(model))
        book = GraceCodebook(family.mlp_out_module(model, layer), cfg, routing_state_of(model))
        book.layer = layer
        model.__dict__["_bench_grace"] = book  # a plain attribute: not a submodule of the model
    device = _device(model)
    grad_state = _requires_grad_state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    losses = []
    try:
        with _EvalMode(model):
            for r in requests:
                built = family.build_inputs(processor, [r.image], [r.prompt], [r.target]).to(device)
                pos = built.prompt_mask.long().cumsum(1).argmax(1)  # last prompt position
                book.train_pos = pos
                book.force_key = None
                with torch.no_grad():
                    saved = book.keys
                    book.keys = book.keys[:0]  # capture the query without replacement
                    model(**built.inputs)
                    book.keys = saved
                k = book.add_edit(book.last_query[0], r.target.strip())
                book.force_key = k
                opt = torch.optim.Adam([book.values], lr=cfg.edit_lr)
                for _ in range(cfg.n_iter):
                    out = model(**built.inputs, labels=built.labels)
                    opt.zero_grad(set_to_none=True)
                    out.loss.backward()
                    opt.step()
                    losses.append(out.loss.item())
                book.values.grad = None
    finally:
        book.train_pos = None
        book.force_key = None
        _set_requires_grad(model, grad_state)
    n_edits = getattr(model, "_bench_grace_edits", 0) + len(requests)
    model._bench_grace_edits = n_edits

    def restore() -> None:
        book.remove()
        for attr in ("_bench_grace", "_bench_grace_edits"):
            if hasattr(model, attr):
                delattr(model, attr)

    return model, Restore(
        restore,
        edit_bytes=book.edit_bytes // max(1, n_edits),
        info={"layer": book.layer, "keys": len(book.keys), "loss_first": losses[0], "loss_last": losses[-1],
              "seconds": time.perf_counter() - t0},
    )


# ---------------------------------------------------------------------- IKE


@dataclass
class IKEHyperParams:
    """IKE (Zheng et al., EMNLP 2023) as EasyEdit's multimodal IKE builds its context
    (``apply_ike_to_multimodal_model`` in ``easyeditor/models/ike/ike_main.py``): the demonstration
    ``"New Fact: {prompt} {target}\\nPrompt: {prompt} {target}\\n\\n"`` for each edit. EasyEdit's
    ``k`` retrieved training demonstrations need a sentence-embedding model and a training corpus;
    ``k = 0`` here (only the new fact), which is the setting of its ``hparams/IKE/qwen2vl_7b.yaml``.
    """

    template: str = "New Fact: {prompt} {target}\nPrompt: {prompt} {target}\n\n"


class IKEModel(nn.Module):
    """The base model with the IKE demonstration in front of every input: a model wrapper.

    ``forward`` receives the inputs the metrics build for the *original* probe, prepends the
    demonstration's token ids to every row (after the row's left padding, so the demonstration
    directly precedes the chat-formatted probe), runs the base model and returns the logits of the
    original positions only. Every metric (teacher-forced accuracy, top-k locality over the whole
    probe sequence, exact match by ``generate``) is therefore computed by the unchanged metrics
    code on the same positions as for every other method; pre-edit state is the base model's.

    Upstream puts the demonstration inside the user turn after the image; here it precedes the chat
    (where the insertion point is family-independent). The demonstration is text only, as
    upstream's are: the probe's own image is the only image.
    """

    def __init__(self, model: nn.Module, demo_ids: torch.Tensor, pad_id: int):
        super().__init__()
        self.model = model
        self.register_buffer("demo_ids", demo_ids.reshape(1, -1), persistent=False)
        self.pad_id = int(pad_id)

    @property
    def config(self):
        return self.model.config

    @property
    def generation_config(self):
        return self.model.generation_config

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def get_decoder(self):
        """The wrapped model's language model: the structural family adapter finds the decoder layers
        (and checks the model) through the wrapper as through the model itself."""
        return self.model.get_decoder()

    def _extend(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], int]:
        ids = inputs["input_ids"]
        B, T = ids.shape
        D = self.demo_ids.shape[1]
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        new_mask = torch.cat([torch.ones(B, D, dtype=mask.dtype, device=mask.device), mask], 1)
        # stable sort: padding (mask 0) first, then demonstration, then the row's own tokens
        order = torch.argsort(new_mask, dim=1, stable=True)
        out = dict(inputs)
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.dim() == 2 and tuple(value.shape) == (B, T):
                if key == "input_ids":
                    prefix = self.demo_ids.to(ids.device).expand(B, D)
                elif key == "attention_mask":
                    continue
                else:
                    prefix = torch.zeros(B, D, dtype=value.dtype, device=value.device)
                out[key] = torch.gather(torch.cat([prefix, value], 1), 1, order)
        out["attention_mask"] = torch.gather(new_mask, 1, order)
        return out, D

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        ext, D = self._extend(inputs)
        out = self.model(**ext)
        out.logits = out.logits[:, D:]
        if labels is not None:
            logits = out.logits[:, :-1].float()
            out.loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return out

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        ext, D = self._extend({k: v for k, v in inputs.items() if v is not None})
        gen_kwargs = {k: v for k, v in kwargs.items()}
        for k in list(ext):
            gen_kwargs[k] = ext[k]
        out = self.model.generate(**gen_kwargs)
        seq = out if isinstance(out, torch.Tensor) else out.sequences
        new = seq[:, ext["input_ids"].shape[1]:]
        return torch.cat([input_ids, new], 1)


def apply_ike(model: nn.Module, processor: Any, requests: Sequence[EditRequest] | EditRequest, **hp: Any):
    """IKE: an :class:`IKEModel` whose context holds one demonstration per request. Nothing is trained."""
    cfg = IKEHyperParams(**hp)
    requests = _as_list(requests)
    if isinstance(model, IKEModel):  # sequential: extend the context of an existing wrapper
        base, previous = model.model, model.demo_text
    else:
        base, previous = model, ""
    family = family_of(base)
    tok = family.tokenizer(processor)
    text = previous + "".join(cfg.template.format(prompt=r.prompt.strip(), target=r.target.strip()) for r in requests)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long, device=_device(base))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    wrapper = IKEModel(base, ids, pad)
    wrapper.demo_text = text
    wrapper.eval()
    return wrapper, Restore(lambda: base, edit_bytes=len(text.encode()) // max(1, len(requests)),
                            info={"demo_tokens": int(ids.numel())})


#: name -> apply function
BASELINES: dict[str, Callable[..., tuple[nn.Module, Restore]]] = {
    "ft_l": apply_ft_l,
    "lora": apply_lora,
    "grace": apply_grace,
    "ike": apply_ike,
}
