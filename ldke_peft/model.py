"""``LDKEModel``: the PEFT tuner that injects LDKE layers and wires the routing hooks.

Routing needs two signals that no single layer sees: which input positions are image tokens (from
``input_ids`` at the root model) and the hidden states leaving the probe layer. Two persistent hooks
provide them:

* a forward **pre-hook on the root model** records the image-token mask, the prompt mask and whether
  this call is a prefill (empty KV cache) or a decode step;
* a forward **hook on the probe decoder layer** pools features from its output and asks each active
  pack's router for a per-row slot decision, stored in a :class:`~ldke_peft.routing_state.RoutingState`
  shared with every :class:`~ldke_peft.layer.LDKELinear`.

Decode steps reuse the prefill decision (the KV cache holds the prompt). Hooks are installed on the
transformers model itself (not only around ``PeftModel.forward``), so routing also works after
transformers' ``model.load_adapter()`` and with gradient checkpointing.
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
from .context import current_forced_slots, current_prompt_mask
from .errors import MergeRefusedError, UnsupportedModelError
from .families import Family, family_of
from .fingerprint import check_fingerprint, compute_fingerprint
from .layer import LDKELayer, LDKELinear
from .routing import NO_SLOT
from .routing_state import RoutingInputs, RoutingState, pool_features

logger = logging.getLogger(__name__)

_STATE_ATTR = "_ldke_routing_state"


def default_probe_layer(num_layers: int) -> int:
    """Early enough that most layers stay editable, late enough to see entity and relation (≈ L/8, ≥ 1)."""
    return max(1, min(num_layers - 2, round(num_layers / 8)))


def routing_state_of(model: nn.Module) -> RoutingState:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        state = RoutingState()
        object.__setattr__(model, _STATE_ATTR, state)
    return state


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        try:
            return int(cache.get_seq_length())
        except Exception:  # noqa: BLE001 - some cache types need a layer index
            return 0
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):
        return int(cache[0][0].shape[-2])
    return 0


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


def _make_root_exit_hook(state: RoutingState):
    def hook(module: nn.Module, args: tuple, output: Any):
        cur = state.current
        if state.request_depth and cur is not None and cur.prefill and not state.probe_handles:
            # the prefill of a request made through PeftModel has decided: the request's later calls
            # are its decode steps, which reuse the decision; until the request ends they run with
            # no LDKE hook at all (the inner hooks stay off too)
            state.suspend_root_hooks()
            return None
        state.resume_inner_hooks()
        if state.probe_handles:
            # the call ended (or raised, or was cut short) before its probe layer ran: drop the
            # one-shot hook rather than leave it for an unrelated later call
            for idx in list(state.probe_handles):
                state.remove_probe_hook(idx)
        return None

    return hook


def _make_embedding_hook(state: RoutingState):
    def hook(module: nn.Module, args: tuple):
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
            state.pending_ids = args[0].detach()
        return None

    return hook


_DECODE_STEP = RoutingInputs(image_mask=None, prompt_mask=None, batch_size=0, prefill=False)


def _make_entry_hook(state: RoutingState, family: Family, root: nn.Module, *, is_root: bool):
    """Pre-forward hook of an entry module: records what the router needs for this call."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if is_root:
            # the inner (language model, embeddings) hooks must not treat the calls the root is about
            # to make as new ones; the root's exit hook puts them back
            state.suspend_inner_hooks()
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = kwargs.get("cache")
        if cache is not None and _cache_length(cache) > 0:
            # decode step: the prefill decision stands; nothing to compute (keeps generate cheap)
            state.pending_ids = None
            state.current = _DECODE_STEP
            return None
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            state.current = None
            return None
        B, T = int(ref.shape[0]), int(ref.shape[1])
        pend = state.pending_ids
        if input_ids is None and pend is not None and pend.shape[1] == T and B % pend.shape[0] == 0:
            # The prompt was embedded by the caller (BLIP-2 generate); its ids give the image positions.
            # generate expands rows for beams / num_return_sequences with repeat_interleave.
            input_ids = pend.to(ref.device).repeat_interleave(B // pend.shape[0], dim=0)
        state.pending_ids = None
        image_mask = family.image_mask(root, input_ids) if input_ids is not None else None
        pm = current_prompt_mask()
        if pm is not None and tuple(pm.shape) == (B, T):
            prompt_mask = pm.bool()
        else:
            am = kwargs.get("attention_mask")
            prompt_mask = am.bool() if isinstance(am, torch.Tensor) and am.dim() == 2 and tuple(am.shape) == (B, T) else None
        if input_ids is not None and pm is None:
            # A cache-less continuation of the last prompt (generate(use_cache=False), or a
            # teacher-forced pass over prompt + answer): pool over the original prompt only, so the
            # decision equals the one made for the prompt alone.
            prev_ids, prev_mask = state.prompt_ids, state.prompt_mask
            if (
                prev_ids is not None
                and prev_ids.shape[0] == B
                and T > prev_ids.shape[1]
                and prev_ids.device == input_ids.device
                and torch.equal(input_ids[:, : prev_ids.shape[1]], prev_ids)
            ):
                pad = torch.zeros(B, T - prev_ids.shape[1], dtype=torch.bool, device=prev_mask.device)
                prompt_mask = torch.cat([prev_mask, pad], dim=1)
            else:
                state.prompt_ids = input_ids.detach()
                state.prompt_mask = prompt_mask if prompt_mask is not None else torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        state.slots.clear()
        state.current = RoutingInputs(image_mask=image_mask, prompt_mask=prompt_mask, batch_size=B, prefill=True,
                                      input_ids=input_ids)
        state.install_probe_hooks(_make_probe_hook)
        return None

    return hook


def _make_probe_hook(state: RoutingState, idx: int):
    """One-shot forward hook of probe layer ``idx``: pools features and stores each pack's decision."""

    def hook(module: nn.Module, args: tuple, output: Any):
        state.remove_probe_hook(idx)
        cur = state.current
        if cur is None or not cur.prefill or current_forced_slots() is not None:
            # forced slots (fitting, evaluation with a slot given) bypass the decision: nothing to compute
            return None
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return None
        B, T = hidden.shape[:2]
        image_mask = cur.image_mask
        if image_mask is None or tuple(image_mask.shape) != (B, T):
            image_mask = torch.zeros(B, T, dtype=torch.bool, device=hidden.device)
        prompt_mask = cur.prompt_mask
        if prompt_mask is None or tuple(prompt_mask.shape) != (B, T):
            prompt_mask = torch.ones(B, T, dtype=torch.bool, device=hidden.device)
        feats = None
        texts: dict[tuple, dict[int, torch.Tensor]] = {}  # per text key: row -> question features
        with torch.no_grad():
            for m in state.probe_wrappers.get(idx, ()):
                if m.disable_adapters:
                    continue
                for name in m.active_adapters:
                    router = m.router(name)
                    if router is None:
                        continue
                    if feats is None:
                        feats = pool_features(hidden.detach(), image_mask, prompt_mask)
                    if router.text_encoder is None:
                        state.slots[name] = router.route(*feats)
                        continue
                    state.slots[name] = _route_by_question(state, router, feats, cur.input_ids,
                                                           prompt_mask & ~image_mask, texts)
        return None

    return hook


def attach_tokenizer(model: nn.Module, tokenizer: Any) -> None:
    """Tell ``model``'s LDKE routing which tokenizer its inputs were made with (a tokenizer or a processor).

    Packs whose router reads the question text (``LDKEConfig.router_text_encoder``, the default) decode
    the prompt tokens with it. :func:`~ldke_peft.edit` attaches the processor it is given; a pack loaded
    with ``PeftModel.from_pretrained`` finds the tokenizer beside the base model (``name_or_path``) or
    needs this call.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if not hasattr(tok, "decode"):
        raise TypeError(f"attach_tokenizer needs a tokenizer or a processor holding one, got {type(tokenizer).__name__}")
    routing_state_of(_root_model(model)).tokenizer = tok


def _state_tokenizer(state: RoutingState) -> Any:
    if state.tokenizer is None:
        from .question_key import TokenizerNotFoundError

        where = state.name_or_path
        try:
            from transformers import AutoTokenizer

            if not where:
                raise FileNotFoundError("the base model has no name_or_path")
            state.tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, trust_remote_code=False)
        except Exception as err:  # noqa: BLE001 - any miss is the same miss for the user
            raise TokenizerNotFoundError(
                f"this LDKE pack routes by the question's text and needs the tokenizer of the base model "
                f"({where or 'no name_or_path'} has none offline): call ldke_peft.attach_tokenizer(model, processor)"
            ) from err
    return state.tokenizer


def _route_by_question(state: RoutingState, router: Any, feats: tuple, input_ids: torch.Tensor | None,
                       text_mask: torch.Tensor, texts: dict[tuple, dict[int, torch.Tensor]]) -> torch.Tensor:
    """The decision of a router whose textual key reads the question text.

    Only rows that some slot's visual test admits can route, so only their questions are read and
    embedded (most inputs show no edited entity and cost the encoder nothing). ``texts`` shares the
    features between the routers of one call. Without token ids (an embeddings-only call) the question
    cannot be read: nothing routes.
    """
    from .question_key import load_encoder, question_texts

    visual, _, has_image = feats
    out = torch.full((visual.shape[0],), NO_SLOT, dtype=torch.long, device=visual.device)
    rows = router.may_route(visual, has_image).nonzero(as_tuple=True)[0]
    if len(rows) == 0 or input_ids is None or tuple(input_ids.shape) != tuple(text_mask.shape):
        return out
    key = (router.text_encoder, router.text_frame)
    known = texts.setdefault(key, {})
    todo = [int(i) for i in rows.tolist() if int(i) not in known]
    if todo:
        sel = torch.tensor(todo, device=input_ids.device)
        qs = question_texts(_state_tokenizer(state), input_ids[sel], text_mask.to(input_ids.device)[sel], key[1])
        for i, f in zip(todo, load_encoder(key[0]).encode(qs)):
            known[i] = f
    t = torch.stack([known[int(i)] for i in rows.tolist()]).to(visual.device)
    if router.text_probe:
        t = torch.cat([feats[1][rows].float(), t], dim=1)
    out[rows] = router.route(visual[rows], t, has_image[rows])
    return out


def is_ldke_model(model: Any) -> bool:
    """True for a PeftModel (or bare transformers model) carrying at least one LDKE layer."""
    return any(isinstance(m, LDKELinear) for m in model.modules())


__all__ = ["LDKEModel", "attach_tokenizer", "default_probe_layer", "is_ldke_model", "routing_state_of", "NO_SLOT", "BaseTunerLayer"]


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
    from .context import forced_slots, prompt_mask_context

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
                with forced_slots(torch.full((e - s,), NO_SLOT, dtype=torch.long)), prompt_mask_context(built.prompt_mask):
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
            enc = load_encoder(text_key[0]).encode(question_texts(tokenizer, built.input_ids, pm & ~image_mask, text_key[1]))
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
