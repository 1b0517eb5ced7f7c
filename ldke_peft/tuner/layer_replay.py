"""Replay of the edited span of decoder layers on cached inputs, checked against the real forward.

Fitting a delta on layers ``lo..L-1`` only needs those layers: the hidden states entering layer
``lo`` do not change while the delta trains. Replaying the span is only sound when the language
model does nothing *between* its layers, and when each layer is called with its own arguments:

* hybrid stacks give each layer its own mask and rotary tables (Gemma 3: sliding vs. global
  layers; Qwen3.5: linear- vs. full-attention layers), so every layer's call is recorded, not one;
* some language models add work between layers (Qwen3-VL's DeepStack adds visual features after
  the first layers), which a replay would skip.

So :func:`capture_replay` records every layer call of one real forward (all deltas off), replays
them, and keeps the replay only if it reproduces the forward's logits at the target positions;
otherwise the editor runs full forwards, which is always correct, just slower.

The editor's rows repeat themselves: every row starts with the same chat frame, and each image
comes with several questions. Under causal attention a token's hidden state depends only on the
tokens before it, so rows that share a prefix share its hidden states at every layer, deltas
included (all rows are forced to the same slot). :func:`capture_replay` therefore *packs* the
rows into one sequence holding each distinct prefix token once (a trie over tokens, with image
tokens told apart by their image) and a mask that lets each token see exactly what it saw in its
own row: the same computation, each shared token computed once. A packed replay is also checked
against the forward, and dropped for the plain one when any part of a layer call cannot be packed
(non-causal masks, per-row inputs it does not know, a cache).

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .context import routing_inputs
from .replay_packing import CannotPack, Packing, map_calls, pack_calls, pack_rows
from .routing import NO_SLOT

logger = logging.getLogger(__name__)

__all__ = ["LayerReplay", "capture_replay", "packed_hidden"]

#: tolerance of the replay check (fp32 reassociation across a different call path)
_ATOL, _RTOL = 1e-4, 1e-3


@dataclass
class LayerReplay:
    """The hidden states entering the first replayed layer and each replayed layer's own call.

    ``index`` is ``None`` for a plain replay (the layers see the batch as built) and, for a packed
    one, the ``(B, T)`` position of each row's token in the single packed sequence (-1 = padding).
    """

    hidden: torch.Tensor
    layers: list[nn.Module]
    calls: list[tuple[tuple, dict]]
    index: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    #: for a packed replay: what it was packed from, so that :meth:`select` can pack a subset of its rows
    packing: Packing | None = None

    @property
    def rows(self) -> int:
        """Batch size the replayed layers see (1 when packed)."""
        return int(self.hidden.shape[0])

    def run(self) -> torch.Tensor:
        """Hidden states leaving the last decoder layer (with whatever deltas are active), in the
        layers' own layout (see :attr:`index`)."""
        h = self.hidden
        for layer, (args, kwargs) in zip(self.layers, self.calls):
            out = layer(h, *args, **kwargs)
            h = out[0] if isinstance(out, (tuple, list)) else out
        return h

    def run_at(self, where: torch.Tensor) -> torch.Tensor:
        """Hidden states leaving the last decoder layer at the ``(B, T)`` positions ``where``, in the
        order ``h[where]`` gives for the batch as built."""
        h = self.run()
        return h[where] if self.index is None else h[0, self.index[where]]

    @contextmanager
    def cast(self, dtype: torch.dtype) -> Iterator["LayerReplay"]:
        """This replay run in ``dtype``: the replayed layers' frozen weights, the hidden states and the
        calls' floating tensors (masks, rotary tables) cast, for as long as the block lasts.

        A bfloat16 matmul runs several times faster than a float32 one where the hardware has bfloat16
        units, and a fit spends nearly all its time in the replay's matmuls. Trainable parameters and the
        adapters' own factors keep their dtype (the optimiser and the delta stay in full precision). On
        exit every weight gets its original tensor back (not a cast back), so the model is bit for bit
        what it was.
        """
        saved: list[tuple[nn.Parameter, torch.Tensor]] = []
        try:
            for layer in self.layers:
                for name, p in layer.named_parameters():
                    if p.is_floating_point() and p.dtype != dtype and not p.requires_grad and "ldke_" not in name:
                        saved.append((p, p.data))
                        p.data = p.data.to(dtype)
            calls = map_calls(self.calls, lambda args, kwargs: (_cast(args, dtype), _cast(kwargs, dtype)))
            yield replace(self, hidden=self.hidden.to(dtype), calls=calls)
        finally:
            for p, data in reversed(saved):
                p.data = data

    def select(self, rows: Sequence[int]) -> "LayerReplay":
        """The replay of some rows of a packed replay: their distinct tokens only (in the same order), their
        hidden states entering the first replayed layer and their calls, packed as :func:`capture_replay`
        packs. Exact: under causal attention a token sees only its own row's earlier tokens, so dropping
        other rows' tokens changes nothing for these. Its :meth:`run_at` takes ``(len(rows), T)`` positions."""
        pk = self.packing
        if self.index is None or pk is None:
            raise ValueError("only a packed replay can select rows")
        rows_t = torch.as_tensor(list(rows), dtype=torch.long, device=self.index.device)
        sub = self.index[rows_t]
        keep = torch.unique(sub[sub >= 0])
        remap = torch.full((int(self.hidden.shape[1]),), -1, dtype=torch.long, device=keep.device)
        remap[keep] = torch.arange(len(keep), device=keep.device)
        index = torch.where(sub >= 0, remap[sub.clamp(min=0)], torch.full_like(sub, -1))
        real = pk.real[rows_t.to(pk.real.device)]
        calls = pack_calls(pk.calls, pk.B, pk.T, pk.rb[keep], pk.rt[keep], index, real, rows_t)
        return LayerReplay(self.hidden[:, keep], self.layers, calls, index=index,
                           prompt_mask=None if self.prompt_mask is None else self.prompt_mask[:, keep])


def _cast(v: Any, dtype: torch.dtype) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(dtype) if v.is_floating_point() else v
    if isinstance(v, (tuple, list)):
        return type(v)(_cast(x, dtype) for x in v)
    if isinstance(v, dict):
        return {k: _cast(x, dtype) for k, x in v.items()}
    return v


def capture_replay(root: nn.Module, family: Any, lo: int, built: Any, pred_pos: torch.Tensor,
                   row_images: Sequence[int] | None = None,
                   probe: tuple[Any, torch.Tensor, Sequence[int]] | None = None) -> LayerReplay | None:
    """A verified :class:`LayerReplay` of decoder layers ``lo..`` for ``built``, or ``None`` when a
    replay does not reproduce the model's own logits at ``pred_pos``.

    ``row_images`` (each row's image, as an index: equal indices mean the same picture) lets rows
    that share a prefix be packed (see the module docstring); without it the replay is plain.
    ``probe`` = ``(built_rows, pred_pos_rows, rows)``: a few of ``built``'s rows built on their own
    (right-aligned like ``built``). With it, when every decoder layer is called with the same
    arguments, the layers below ``lo`` run packed too, and the replay is checked against a real
    forward of those rows only, instead of a real forward of every row."""
    if row_images is not None and probe is not None:
        try:
            return _capture_packed(root, family, lo, built, pred_pos, list(row_images), probe)
        except CannotPack as why:
            logger.debug("layer replay: no packed capture (%s)", why)
    layers = list(family.decoder_layers(root))[lo:]
    first: dict[int, tuple[torch.Tensor, tuple, dict]] = {}
    handles = _record_calls(first, layers)
    no_slot = torch.full((len(built),), NO_SLOT, dtype=torch.long)
    try:
        with torch.no_grad(), routing_inputs(root, slots=no_slot, prompt_mask=built.prompt_mask):
            reference = root(**built.inputs, use_cache=False).logits[pred_pos]
    finally:
        for h in handles:
            h.remove()
    if len(first) != len(layers):
        logger.info("layer replay off: not every decoder layer from %d ran in the forward", lo)
        return None
    plain = LayerReplay(first[0][0], layers, [(first[i][1], first[i][2]) for i in range(len(layers))])
    candidates = [plain]
    if row_images is not None:
        try:
            candidates.insert(0, _packed(plain, family, root, built, list(row_images)))
        except CannotPack as why:
            logger.debug("layer replay not packed: %s", why)
    for replay in candidates:
        if _reproduces(replay, family, root, built, pred_pos, reference):
            return replay
        if replay is not plain:
            logger.info("packed layer replay does not reproduce the forward; replaying the rows as built")
    logger.info(
        "layer replay off: replaying decoder layers %d.. does not reproduce the forward (the language model "
        "works between its layers); fitting with full forwards", lo
    )
    return None


def _reproduces(replay: LayerReplay, family: Any, root: nn.Module, built: Any, pred_pos: torch.Tensor,
                reference: torch.Tensor) -> bool:
    no_slot = torch.full((replay.rows,), NO_SLOT, dtype=torch.long)
    mask = built.prompt_mask if replay.prompt_mask is None else replay.prompt_mask
    try:
        with torch.no_grad(), routing_inputs(root, slots=no_slot, prompt_mask=mask):
            again = family.logits_from_hidden(root, replay.run_at(pred_pos))
    except Exception as exc:  # noqa: BLE001 - any failure to replay: full forwards are always right
        logger.info("layer replay failed (%s)", exc)
        return False
    return again.shape == reference.shape and torch.allclose(again.float(), reference.float(), atol=_ATOL, rtol=_RTOL)


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """``(hidden states, other positional arguments, other keyword arguments)`` of a decoder layer call."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    return kwargs["hidden_states"], (), {k: v for k, v in kwargs.items() if k != "hidden_states"}


def _record_calls(store: dict[int, tuple[torch.Tensor, tuple, dict]], layers: list[nn.Module]) -> list[Any]:
    """Pre-hooks that keep, per layer index, the first call it gets (hidden states detached); returns the
    handles to remove."""

    def recorder(i: int):
        def grab(_module, args, kwargs):
            if i not in store:
                h, rest, kw = _split_call(args, kwargs)
                store[i] = (h.detach(), rest, kw)
            return None

        return grab

    return [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]


class _Stop(Exception):
    """Ends a forward once the first decoder layer's inputs are recorded."""


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (type(None), bool, int, float, str)):
        return a == b
    return False


def _shared_call(root: nn.Module, layers: list[nn.Module], built: Any, upto: int | None = None) -> Any:
    """A real forward of ``built`` (deltas off): the model's logits, or with ``upto`` the hidden states
    leaving layer ``upto`` (the forward stops there). Raises :class:`CannotPack` unless every layer it
    ran was called with the same arguments (no per-layer masks or rotary tables)."""
    calls: dict[int, tuple[torch.Tensor, tuple, dict]] = {}
    out: list[torch.Tensor] = []

    def stop(_module, _args, output):
        out.append(output[0] if isinstance(output, (tuple, list)) else output)
        raise _Stop

    ran = layers if upto is None else layers[: upto + 1]
    handles = _record_calls(calls, ran)
    if upto is not None:
        handles.append(layers[upto].register_forward_hook(stop))
    off = torch.full((len(built),), NO_SLOT, dtype=torch.long)
    try:
        with torch.no_grad(), routing_inputs(root, slots=off, prompt_mask=built.prompt_mask):
            logits = root(**built.inputs, use_cache=False).logits
    except _Stop:
        logits = None
    finally:
        for h in handles:
            h.remove()
    if len(calls) != len(ran) or not all(_same(calls[i][1:], calls[0][1:]) for i in range(1, len(ran))):
        raise CannotPack("the decoder layers are not all called with the same arguments")
    return logits if upto is None else out[0]


def _packed_inputs(root: nn.Module, family: Any, layers: list[nn.Module], built: Any, row_images: list[int]) -> LayerReplay:
    """Every row of ``built`` up to the first decoder layer (a forward stopped there), packed, with the
    first layer's call for every layer."""
    first: list[tuple[torch.Tensor, tuple, dict]] = []

    def stop(_module, args, kwargs):
        h, rest, kw = _split_call(args, kwargs)
        first.append((h.detach(), rest, kw))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    off = torch.full((len(built),), NO_SLOT, dtype=torch.long)
    try:
        with torch.no_grad(), routing_inputs(root, slots=off, prompt_mask=built.prompt_mask):
            root(**built.inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not first:
        raise CannotPack("the forward never reached the first decoder layer")
    h0, args0, kwargs0 = first[0]
    return _packed(LayerReplay(h0, layers, [(args0, kwargs0)] * len(layers)), family, root, built, row_images)


def _capture_packed(root: nn.Module, family: Any, lo: int, built: Any, pred_pos: torch.Tensor,
                    row_images: list[int], probe: tuple[Any, torch.Tensor, Sequence[int]]) -> LayerReplay:
    """Every layer packed: the first layer's inputs of a forward stopped there, layers ``0..lo-1`` run
    packed (deltas off), and the replay of ``lo..`` checked against a real forward of the probe rows."""
    probe_built, probe_pos, probe_rows = probe
    layers = list(family.decoder_layers(root))
    reference = _shared_call(root, layers, probe_built)[probe_pos]
    packed = _packed_inputs(root, family, layers, built, row_images)
    one = torch.full((1,), NO_SLOT, dtype=torch.long)
    below = LayerReplay(packed.hidden, layers[:lo], packed.calls[:lo])
    with torch.no_grad(), routing_inputs(root, slots=one, prompt_mask=packed.prompt_mask):
        h_lo = below.run()
    replay = LayerReplay(h_lo.detach(), layers[lo:], packed.calls[lo:], index=packed.index,
                         prompt_mask=packed.prompt_mask, packing=replace(packed.packing, calls=packed.packing.calls[lo:]))
    # checked on the probe rows' own tokens: running every row's would cost a whole forward more
    rows = list(probe_rows)
    check = replay.select(rows)
    with torch.no_grad(), routing_inputs(root, slots=one, prompt_mask=check.prompt_mask):
        again = family.logits_from_hidden(root, check.run_at(pred_pos[rows]))
    if again.shape != reference.shape or not torch.allclose(again.float(), reference.float(), atol=_ATOL, rtol=_RTOL):
        raise CannotPack("the packed replay does not reproduce a real forward of the probe rows")
    return replay


def packed_hidden(root: nn.Module, family: Any, built: Any, row_images: Sequence[int], upto: int,
                  probe: tuple[Any, Sequence[int]]) -> torch.Tensor | None:
    """Hidden states leaving decoder layer ``upto`` for every row of the right-aligned ``built``, as a
    ``(B, T, D)`` tensor (zeros at padding), computed with shared prefixes packed and every delta off;
    ``None`` when the rows cannot be packed or the result does not match a real forward of the probe
    rows ``probe = (built_rows, rows)`` (the caller then runs the rows as built)."""
    probe_built, probe_rows = probe
    layers = list(family.decoder_layers(root))
    try:
        reference = _shared_call(root, layers, probe_built, upto=upto)
        packed = _packed_inputs(root, family, layers, built, list(row_images))
    except CannotPack as why:
        logger.debug("router features not packed: %s", why)
        return None
    one = torch.full((1,), NO_SLOT, dtype=torch.long)
    with torch.no_grad(), routing_inputs(root, slots=one, prompt_mask=packed.prompt_mask):
        h = LayerReplay(packed.hidden, layers[: upto + 1], packed.calls[: upto + 1]).run()
    index = packed.index
    out = h[0, index.clamp(min=0)] * (index >= 0).unsqueeze(-1).to(h.dtype)
    real = probe_built.inputs["attention_mask"].bool().to(out.device)
    T = real.shape[1]
    got = out[list(probe_rows), :T][real]
    want = reference[:, : out.shape[1]][real[:, : out.shape[1]]] if T <= out.shape[1] else None
    if want is None or got.shape != want.shape or not torch.allclose(got.float(), want.float(), atol=_ATOL, rtol=_RTOL):
        logger.info("packed router features do not match a real forward; running the rows as built")
        return None
    return out


def _packed(plain: LayerReplay, family: Any, root: nn.Module, built: Any, row_images: list[int]) -> LayerReplay:
    """``plain`` with its rows packed into one sequence of distinct prefix tokens."""
    h, calls, index, prompt_mask, packing = pack_rows(plain.hidden, plain.calls, family, root, built, row_images)
    return LayerReplay(h, plain.layers, calls, index=index, prompt_mask=prompt_mask, packing=packing)
