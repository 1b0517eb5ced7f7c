"""Packing rows that share a prefix into one sequence, for the layer replay (:mod:`ldke_peft.tuner.layer_replay`).

Under causal attention a token's hidden state depends only on the tokens before it, so rows that share a
prefix share its hidden states at every layer. :func:`pack_rows` builds a trie over the rows' tokens (image
tokens told apart by their image), keeps each distinct prefix token once, and packs every layer call's
per-row tensors and the attention mask so that each token sees exactly what it saw in its own row.
:func:`pack_calls` packs any subset of those tokens again (what :meth:`LayerReplay.select` cuts).

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["CannotPack", "Packing", "layer_cost", "map_calls", "pack_calls", "pack_rows"]


class CannotPack(Exception):
    """A layer call holds something a packed replay cannot reproduce."""



@dataclass
class Packing:
    """What a packed replay was packed from: the calls of the rows as built (``B`` rows of ``T``), each
    packed token's representative ``(rb, rt)`` and the rows' real-token mask."""

    calls: list[tuple[tuple, dict]]
    B: int
    T: int
    rb: torch.Tensor
    rt: torch.Tensor
    real: torch.Tensor


def pack_rows(hidden: torch.Tensor, plain_calls: list[tuple[tuple, dict]], family: Any, root: nn.Module, built: Any,
              row_images: list[int]) -> tuple[torch.Tensor, list[tuple[tuple, dict]], torch.Tensor, torch.Tensor, Packing]:
    """Rows of ``built`` (entering a layer with ``hidden`` and called with ``plain_calls``) packed into one
    sequence of distinct prefix tokens: ``(hidden, calls, index, prompt_mask, packing)`` of the packed sequence."""
    ids = built.input_ids
    am = built.inputs.get("attention_mask")
    B, T = ids.shape
    if B < 2 or len(row_images) != B or hidden.shape[:2] != (B, T):
        raise CannotPack("nothing to share")
    real = am.bool() if isinstance(am, torch.Tensor) and am.shape == (B, T) else torch.ones(B, T, dtype=torch.bool)
    image = family.image_mask(root, ids).cpu()
    ids_l, real_l, image_l = ids.cpu().tolist(), real.cpu().tolist(), image.tolist()
    nodes: dict[tuple, int] = {}
    index = torch.full((B, T), -1, dtype=torch.long)
    rep_b: list[int] = []
    rep_t: list[int] = []
    for b in range(B):
        parent = -1
        for t in range(T):
            if not real_l[b][t]:
                continue
            key = (parent, ids_l[b][t], row_images[b] if image_l[b][t] else None, t)
            node = nodes.get(key)
            if node is None:
                node = nodes[key] = len(rep_b)
                rep_b.append(b)
                rep_t.append(t)
            index[b, t] = parent = node
    N = len(rep_b)
    D = int(hidden.shape[-1])
    if layer_cost(N, N, D) >= B * layer_cost(T, T, D):
        raise CannotPack(f"rows share too little ({N} of {int(real.sum())} tokens distinct, {B} rows of {T})")
    dev = hidden.device
    index = index.to(dev)
    rb = torch.tensor(rep_b, device=dev)
    rt = torch.tensor(rep_t, device=dev)
    where = index >= 0
    # every merged token enters the first replayed layer with the hidden state of its representative
    h = hidden
    if not torch.allclose(h[where], h[rb, rt][index[where]], atol=1e-5, rtol=1e-4):
        raise CannotPack("rows with the same prefix enter the replay with different hidden states")
    calls = pack_calls(plain_calls, B, T, rb, rt, index, real.to(dev), None)
    return (h[rb, rt][None], calls, index, built.prompt_mask.to(dev)[rb, rt][None],
            Packing(plain_calls, B, T, rb, rt, real.to(dev)))


def pack_calls(plain_calls: list[tuple[tuple, dict]], B: int, T: int, rb: torch.Tensor, rt: torch.Tensor,
                index: torch.Tensor, real: torch.Tensor, rows: torch.Tensor | None) -> list[tuple[tuple, dict]]:
    """``plain_calls`` (of ``B`` rows of ``T``) packed into the tokens ``(rb, rt)``; ``index``/``real`` are
    those of the packed rows (``rows`` of the ``B``, or all of them)."""
    def pack(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (tuple(_pack_value(a, B, T, rb, rt, index, real) for a in args),
                {k: (_pack_mask(_rows_of(v, rows, B), index, real)
                     if k == "attention_mask" else _pack_value(v, B, T, rb, rt, index, real))
                 for k, v in kwargs.items()})

    return map_calls(plain_calls, pack)


def map_calls(calls: list[tuple[tuple, dict]], fn: Any) -> list[tuple[tuple, dict]]:
    """``fn(args, kwargs)`` of every layer call, computed once per distinct call (several layers often share
    one call object), in the layers' order."""
    done: dict[int, tuple[tuple, dict]] = {}
    out = []
    for call in calls:
        if id(call) not in done:
            done[id(call)] = fn(*call)
        out.append(done[id(call)])
    return out


def layer_cost(queries: int, keys: int, width: int) -> float:
    """Rough multiply-adds of one decoder layer: ~12 d^2 per token (projections and MLP) and ~2 d per
    query-key pair. One packed sequence attends densely over all its tokens, so many long rows that
    share little (large images, one per row) would cost more packed than as a batch."""
    return queries * 12.0 * width * width + queries * keys * 2.0 * width


def _pack_value(v: Any, B: int, T: int, rb: torch.Tensor, rt: torch.Tensor, index: torch.Tensor, real: torch.Tensor) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        return type(v)(_pack_value(x, B, T, rb, rt, index, real) for x in v)
    if isinstance(v, torch.Tensor):
        if v.dim() == 1 and v.shape[0] == T and not v.is_floating_point():
            return v[rt.to(v.device)]  # cache positions: each token keeps its own
        if v.dim() >= 2 and B != T:
            for d in range(v.dim() - 1):
                if v.shape[d] in (B, 1) and v.shape[d + 1] == T:
                    # per-row (B) or shared by every row (1, e.g. rotary tables of unpadded positions)
                    rows = rb.to(v.device) if v.shape[d] == B else torch.zeros_like(rb, device=v.device)
                    sel = (slice(None),) * d + (rows, rt.to(v.device))
                    return v[sel].unsqueeze(d)
    raise CannotPack(f"a layer call holds {type(v).__name__} {tuple(getattr(v, 'shape', ()))}")


def _rows_of(v: Any, rows: torch.Tensor | None, B: int) -> Any:
    """``v``'s ``rows`` when it is a per-row tensor of ``B`` rows (else ``v``: packing refuses it later)."""
    if rows is None or not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != B:
        return v
    return v[rows.to(v.device)]


def _pack_mask(m: Any, index: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The packed ``(1, 1, N, N)`` mask: token ``n`` sees token ``k`` exactly when, in the row ``n`` came
    from, the forward's own mask let it (the causal relation on the row's path when the forward had no
    mask). A mask that lets a token see a later one (bidirectional image attention) cannot be packed.
    ``index``/``real``: the packed rows' ``(B, T)`` token positions in the packed sequence and real tokens;
    ``m``: those rows' own mask."""
    B, T = index.shape
    N = int(index.max()) + 1
    dev = index.device
    allowed = torch.zeros(N, N, dtype=torch.bool, device=dev)
    if m is not None and not (isinstance(m, torch.Tensor) and m.dim() == 4 and m.shape[0] == B
                              and m.shape[-2] == T and m.shape[-1] >= T and m.shape[1] == 1):
        raise CannotPack("the attention mask is not a (B, 1, T, S) tensor")
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    for b in range(B):
        cols = real[b].nonzero().flatten().to(dev)
        nb = index[b, cols]
        if m is None:
            sub = causal[cols][:, cols]
        else:
            mb = m[b, 0][:, :T].to(dev)
            mb = mb if mb.dtype == torch.bool else mb > torch.finfo(mb.dtype).min / 2
            full = mb[cols][:, cols]
            if bool((full & ~causal[cols][:, cols]).any()):
                raise CannotPack("the attention mask is not causal")
            sub = full
        allowed[nb[:, None], nb[None, :]] |= sub
    if isinstance(m, torch.Tensor) and m.dtype == torch.bool:
        return allowed[None, None]
    dtype = m.dtype if isinstance(m, torch.Tensor) else torch.float32
    out = torch.zeros(N, N, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
    return out[None, None]
