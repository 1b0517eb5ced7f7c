"""The routing hooks: how one forward call hands the router its inputs and the LDKE layers their decision.

Routing needs two signals that no single layer sees: which input positions are image tokens (from
``input_ids`` at the root model) and the hidden states leaving the probe layer. Persistent hooks on the
transformers model itself provide them (so routing also works after transformers' ``load_adapter()``,
where no ``PeftModel.forward`` runs, and with gradient checkpointing):

* a forward **pre-hook on the root model** (and on the language model and embeddings, for calls that
  enter there) records the image-token mask, the prompt mask and whether this call is a prefill (empty
  KV cache) or a decode step, and installs a **one-shot hook on the probe decoder layer** for this call;
* that hook pools features from the probe layer's output and asks each active pack's router for a
  per-row slot decision, stored in the model's :class:`~ldke_peft.tuner.routing_state.RoutingState`, which
  every :class:`~ldke_peft.tuner.layer.LDKELinear` reads;
* the root's exit hook removes what the call left; decode steps reuse the prefill decision (the KV cache
  holds the prompt).

Owns the hook factories, the per-model state lookup and the question-text route. Imports no editing code
and not :mod:`ldke_peft.tuner.model` (the tuner installs these hooks).

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..families import Family
from ..families.unwrap import base_model_of
from .routing import NO_SLOT
from .routing_state import RoutingInputs, RoutingState, pool_features, routing_state_of



def default_probe_layer(num_layers: int) -> int:
    """Early enough that most layers stay editable, late enough to see entity and relation (≈ L/8, ≥ 1)."""
    return max(1, min(num_layers - 2, round(num_layers / 8)))


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


def _make_root_exit_hook(state: RoutingState):
    def hook(module: nn.Module, args: tuple, output: Any):
        if state.call_saved is not None:
            # this call's own routing inputs (``ldke_prompt_mask=`` / ``ldke_slots=``) end with it
            state.call_prompt_mask, state.call_slots = state.call_saved
            state.call_saved = None
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
            _take_call_inputs(state, kwargs)
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
        pm = state.call_prompt_mask
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


#: Per-call routing arguments a root forward accepts (see :mod:`ldke_peft.tuner.context`).
CALL_KWARGS = ("ldke_prompt_mask", "ldke_slots")


def _take_call_inputs(state: RoutingState, kwargs: dict) -> None:
    """Take this call's routing arguments out of ``kwargs`` (the model's own forward does not know them)
    and install them until the root's exit hook, as Poly installs ``task_ids`` for one call."""
    if not any(k in kwargs for k in CALL_KWARGS):
        return
    mask, slots = kwargs.pop("ldke_prompt_mask", None), kwargs.pop("ldke_slots", None)
    state.call_saved = (state.call_prompt_mask, state.call_slots)
    if mask is not None:
        state.call_prompt_mask = mask
    if slots is not None:
        state.call_slots = slots


def _make_probe_hook(state: RoutingState, idx: int):
    """One-shot forward hook of probe layer ``idx``: pools features and stores each pack's decision."""

    def hook(module: nn.Module, args: tuple, output: Any):
        state.remove_probe_hook(idx)
        cur = state.current
        if cur is None or not cur.prefill or state.call_slots is not None:
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
        texts: dict[tuple, dict[int, tuple[str, torch.Tensor]]] = {}  # per text key: row -> (question, features)
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
    routing_state_of(base_model_of(model)).tokenizer = tok


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
                       text_mask: torch.Tensor, texts: dict[tuple, dict[int, tuple[str, torch.Tensor]]]) -> torch.Tensor:
    """The decision of a router whose textual key reads the question text.

    Only rows that some slot's visual test admits can route, so only their questions are read and
    embedded (most inputs show no edited entity and cost the encoder nothing). ``texts`` shares the
    features between the routers of one call. Without token ids (an embeddings-only call) the question
    cannot be read: nothing routes. The question text also tells the anchor veto which rows name a
    slot's asked-for word (:meth:`~ldke_peft.tuner.routing.RouterState.named_mask`).
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
        for i, q, f in zip(todo, qs, load_encoder(key[0]).encode(qs, device=visual.device)):
            known[i] = (q, f)
    got = [known[int(i)] for i in rows.tolist()]
    t = torch.stack([f for _, f in got]).to(visual.device)
    if router.text_probe:
        t = torch.cat([feats[1][rows].float(), t], dim=1)
    named = router.named_mask([q for q, _ in got]) if router.num_anchors else None  # words matter to anchors only
    out[rows] = router.route(visual[rows], t, has_image[rows], named)
    return out
