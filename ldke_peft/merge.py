"""Merging LDKE edit packs: several packs for the same base model -> one pack.

Edits are independent slots, so merging is concatenation: the merged pack's slots are the source
packs' slots (in pack order, or an explicit ``slot_order``), every edited layer hosts the union of
its sources' rows re-indexed to the merged slot ids, and the router's per-slot tensors (keys, radii,
``needs_image``) are concatenated the same way.

**The router.** Each pack learns its own router projection (``mu``/``proj``, see
:mod:`ldke_peft.editing.router_fit`), so keys from different packs live in different spaces: comparing a
feature projected with pack A's projection to a key of pack B is meaningless, and refitting one
projection for all slots would need every pack's calibration features, which packs do not store. A
merged pack therefore keeps **one projection per distinct source projection** (a *projection group*,
:class:`~ldke_peft.tuner.routing.RouterState` with ``groups > 1``) and records, per slot, the group its keys
live in. Each slot's score is computed exactly as its source pack computes it; the merged decision is
the best-scoring slot within scope, the rule a single pack already uses among its own slots. So an
input that exactly one source pack routes is routed the same way by the merged pack, and an input
no source pack routes stays unrouted. Identical projections (packs grown from one pack, or merged
twice) collapse into one group; when all sources share one projection the merged pack has the plain
single-projection layout that every ldke-peft version reads.

**Safety rules.** Packs must be made for the same base model (fingerprints compared with the
tolerance :mod:`ldke_peft.tuner.fingerprint` uses, else :class:`~ldke_peft.errors.FingerprintMismatchError`),
read the router at the same probe layer and bound deltas the same way (else :class:`MergeError`).
Two slots editing the same fact (same image fingerprint and prompt) to *different* targets are a
conflict: ``on_conflict="error"`` (default) raises :class:`MergeConflictError` listing all of them,
``"keep_first"`` / ``"keep_last"`` keep one (by merge order) and report the others as dropped. The
same fact edited to the same target twice is a duplicate: the first copy is kept and the drop is
reported. Nothing is overwritten silently.

Different ranks and router widths are merged exactly: deltas are zero-padded to the largest rank with
each source's ``alpha / rank`` folded into ``B``, projections and keys zero-padded to the widest
router (zero columns add nothing to a distance).

Layer: product (README "Architecture"): may import every layer; no library layer imports it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .tuner.config import PACK_FORMAT_VERSION, LDKEConfig
from .errors import FingerprintMismatchError
from .merge_sources import _PEFT_PREFIX, _PROJ, _ROUTER, MergeError, _Pack, _parse, load_pack, save_pack, to_peft_model

logger = logging.getLogger(__name__)

CONFLICT_POLICIES = ("error", "keep_first", "keep_last")

__all__ = [
    "Conflict",
    "MergeConflictError",
    "MergeError",
    "MergeReport",
    "MergeResult",
    "load_pack",
    "merge_packs",
    "save_pack",
    "to_peft_model",
]

SlotRef = tuple[int, int]  # (source pack index, slot index inside that pack)


class MergeConflictError(MergeError):
    """Packs edit the same fact (same image, same prompt) to different targets; ``.conflicts`` lists them."""

    def __init__(self, message: str, conflicts: Sequence["Conflict"] = ()):
        super().__init__(message)
        self.conflicts = list(conflicts)


@dataclass
class Conflict:
    """One fact edited by several slots with different targets."""

    prompt: str
    image_sha: str | None
    slots: list[SlotRef]
    targets: list[str]
    #: the slot kept (``None`` when the policy was ``"error"``)
    kept: SlotRef | None = None

    def describe(self, names: Sequence[str]) -> str:
        who = ", ".join(f"{names[p]} slot {k} -> {t!r}" for (p, k), t in zip(self.slots, self.targets))
        img = f"image {self.image_sha}" if self.image_sha else "no image"
        return f"{self.prompt!r} ({img}): {who}"


@dataclass
class MergeReport:
    """What a merge did. Slots are ``(source pack index, slot index)``."""

    sources: list[str]
    #: merged slot id -> source slot
    slot_map: list[SlotRef]
    #: router projections kept (1 = every source shared one projection)
    groups: int
    conflicts: list[Conflict] = field(default_factory=list)
    #: ``(dropped, kept)`` pairs of slots editing the same fact to the same target
    duplicates: list[tuple[SlotRef, SlotRef]] = field(default_factory=list)
    #: every source slot left out of the merged pack (conflict losers and duplicates)
    dropped: list[SlotRef] = field(default_factory=list)


class MergeResult(tuple):
    """``(config, state_dict)`` — unpacks like the pair — with the :class:`MergeReport` as ``.report``."""

    report: MergeReport

    def __new__(cls, config: LDKEConfig, state_dict: dict[str, torch.Tensor], report: MergeReport):
        obj = super().__new__(cls, (config, state_dict))
        obj.report = report
        return obj

    def __getnewargs__(self):  # copy / pickle
        return (self[0], self[1], self.report)

    @property
    def config(self) -> LDKEConfig:
        return self[0]

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self[1]


# ---------------------------------------------------------------------- checks


def _fingerprint_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """First difference between two base-model fingerprints (``None`` = same base), same tolerance as
    :func:`ldke_peft.tuner.fingerprint.check_fingerprint`."""
    from .tuner.fingerprint import _RTOL

    for key in ("model_type", "hidden_size", "num_layers"):
        if a.get(key) != b.get(key):
            return f"{key} {a.get(key)!r} vs {b.get(key)!r}"
    sa, sb = a.get("weight_signature"), b.get("weight_signature")
    if sa and sb:
        if set(sa) != set(sb):
            return "weight signatures cover different decoder layers"
        for layer in sorted(sa, key=int):
            x, y = torch.tensor(sa[layer]), torch.tensor(sb[layer])
            atol = 1e-3 * float(x.abs().max().clamp_min(1e-6)) if x.numel() else 0.0
            if x.shape != y.shape or not torch.allclose(x, y, rtol=_RTOL, atol=atol):
                return f"the weights of decoder layer {layer}'s MLP output projection differ"
    return None


def _check_compatible(packs: list[_Pack], base_model: Any | None) -> None:
    ref = packs[0]
    for p in packs:
        if not p.config.base_model_fingerprint:
            raise FingerprintMismatchError(
                f"{p.name} records no base_model_fingerprint, so it cannot be shown to fit the same base model "
                "as the other packs; re-save it with this ldke-peft"
            )
    for p in packs[1:]:
        diff = _fingerprint_difference(ref.config.base_model_fingerprint, p.config.base_model_fingerprint)
        if diff is not None:
            raise FingerprintMismatchError(
                f"cannot merge {p.name} into {ref.name}: they were made for different base models ({diff})"
            )
        if p.config.probe_layer != ref.config.probe_layer:
            raise MergeError(
                f"cannot merge {p.name} (router probe layer {p.config.probe_layer}) with {ref.name} (probe layer "
                f"{ref.config.probe_layer}): a pack routes from one layer; re-edit one of them with probe_layer="
                f"{ref.config.probe_layer}"
            )
        if p.config.layers_pattern != ref.config.layers_pattern:
            raise MergeError(
                f"cannot merge {p.name} (layers under {p.config.layers_pattern!r}) with {ref.name} "
                f"({ref.config.layers_pattern!r})"
            )
        if float(p.config.max_delta_norm) != float(ref.config.max_delta_norm):
            raise MergeError(
                f"cannot merge {p.name} (max_delta_norm={p.config.max_delta_norm}) with {ref.name} "
                f"(max_delta_norm={ref.config.max_delta_norm}): the bound is one value per pack"
            )
    in_features: dict[int, tuple[int, str]] = {}
    for p in packs:
        for layer, e in p.deltas.items():
            n = int(e["A"].shape[1])
            if in_features.setdefault(layer, (n, p.name))[0] != n:
                raise MergeError(f"layer {layer}: {p.name} has input size {n}, {in_features[layer][1]} has {in_features[layer][0]}")
    if base_model is not None:
        from .families import family_of
        from .tuner.fingerprint import check_fingerprint
        from .tuner.model import _root_model

        root = _root_model(base_model)
        family = family_of(root)
        for p in packs:
            try:
                check_fingerprint(p.config.base_model_fingerprint, root, family)
            except FingerprintMismatchError as exc:
                raise FingerprintMismatchError(f"{p.name}: {exc}") from None


# ---------------------------------------------------------------------- conflicts


def _norm(text: Any) -> str:
    return " ".join(str(text).casefold().split())


def _resolve(
    packs: list[_Pack], order: list[SlotRef], on_conflict: str
) -> tuple[list[SlotRef], list[Conflict], list[tuple[SlotRef, SlotRef]]]:
    """Slots to keep (in merge order), the conflicts and the duplicates."""
    facts: "OrderedDict[tuple[Any, str], list[int]]" = OrderedDict()
    for i, (p, k) in enumerate(order):
        edits = packs[p].config.edits
        e = edits[k] if k < len(edits) and isinstance(edits[k], dict) else {}
        if e.get("prompt") is None or e.get("target") is None:
            continue  # a hand-made slot without metadata cannot be compared
        facts.setdefault((e.get("image_sha"), _norm(e["prompt"])), []).append(i)
    drop: set[int] = set()
    conflicts: list[Conflict] = []
    duplicates: list[tuple[SlotRef, SlotRef]] = []
    for (sha, _), pos in facts.items():
        if len(pos) < 2:
            continue
        meta = [packs[order[i][0]].config.edits[order[i][1]] for i in pos]
        targets = [m["target"] for m in meta]
        if len({_norm(t) for t in targets}) == 1:
            duplicates += [(order[i], order[pos[0]]) for i in pos[1:]]
            drop.update(pos[1:])
            continue
        keep = None if on_conflict == "error" else pos[0] if on_conflict == "keep_first" else pos[-1]
        conflicts.append(
            Conflict(meta[0]["prompt"], sha, [order[i] for i in pos], targets, None if keep is None else order[keep])
        )
        drop.update(i for i in pos if i != keep)
    return [s for i, s in enumerate(order) if i not in drop], conflicts, duplicates


# ---------------------------------------------------------------------- merge


def merge_packs(
    paths_or_models: Sequence[Any],
    *,
    base_model: Any | None = None,
    out: str | os.PathLike | None = None,
    on_conflict: str = "error",
    slot_order: Sequence[SlotRef] | None = None,
    adapter_name: str = "default",
    names: Sequence[str] | None = None,
) -> MergeResult:
    """Merge LDKE edit packs into one.

    Args:
        paths_or_models: pack folders, ``PeftModel`` s carrying an LDKE adapter ``adapter_name``, or
            ``(LDKEConfig, state_dict)`` pairs (e.g. an earlier :class:`MergeResult`), in merge order.
        base_model: optional transformers model; every pack's fingerprint is also checked against it.
        out: folder to write the merged pack to (``adapter_config.json``, ``adapter_model.safetensors``,
            ``README.md``); it is re-read and validated after writing.
        on_conflict: ``"error"``, ``"keep_first"`` or ``"keep_last"`` (see the module docstring).
        slot_order: the merged slot order as ``(pack index, slot index)`` pairs covering every source
            slot once; default: pack by pack. "first"/"last" in ``on_conflict`` follow this order.
        names: labels of the sources in messages and ``edits[k]["merged_from"]`` (default: the folder
            path, or ``pack<i>``).

    Returns:
        a :class:`MergeResult`: unpacks as ``(config, state_dict)`` (the state dict in saved-pack key
        form, loadable with :func:`to_peft_model`), with ``.report`` (:class:`MergeReport`).

    Raises:
        FingerprintMismatchError: packs for different base models (or not for ``base_model``).
        MergeError: different probe layers, layer layouts or delta bounds.
        MergeConflictError: conflicting edits with ``on_conflict="error"``.
    """
    if on_conflict not in CONFLICT_POLICIES:
        raise ValueError(f"on_conflict must be one of {CONFLICT_POLICIES}, got {on_conflict!r}")
    sources = list(paths_or_models)
    if not sources:
        raise ValueError("merge_packs() needs at least one pack")
    if names is None:
        names = [os.fspath(s) if isinstance(s, (str, os.PathLike)) else f"pack{i}" for i, s in enumerate(sources)]
    names = list(names)
    if len(names) != len(sources):
        raise ValueError(f"{len(names)} names for {len(sources)} packs")
    packs = [_parse(n, *load_pack(s, adapter_name=adapter_name, name=n)) for n, s in zip(names, sources)]
    _check_compatible(packs, base_model)

    every = [(p, k) for p, pk in enumerate(packs) for k in range(pk.config.num_slots)]
    order = [tuple(map(int, s)) for s in slot_order] if slot_order is not None else every
    if sorted(order) != every:
        raise ValueError("slot_order must list every (pack, slot) of the sources exactly once")
    kept, conflicts, duplicates = _resolve(packs, order, on_conflict)
    if conflicts and on_conflict == "error":
        lines = "\n  ".join(c.describe(names) for c in conflicts)
        raise MergeConflictError(
            f"{len(conflicts)} fact(s) are edited to different targets by the packs being merged:\n  {lines}\n"
            "pass on_conflict='keep_first' or 'keep_last' (CLI: --on-conflict) to keep one edit of each",
            conflicts,
        )
    for c in conflicts:
        logger.warning("merge conflict resolved (%s, kept %s slot %d): %s", on_conflict, names[c.kept[0]], c.kept[1],
                       c.describe(names))
    for dropped, kept_slot in duplicates:
        logger.info("duplicate edit: %s slot %d repeats %s slot %d; kept once", names[dropped[0]], dropped[1],
                    names[kept_slot[0]], kept_slot[1])
    kept_set = set(kept)
    report = MergeReport(
        sources=names, slot_map=list(kept), groups=1, conflicts=conflicts, duplicates=duplicates,
        dropped=[s for s in order if s not in kept_set],
    )
    config, state_dict, report.groups = _assemble(packs, kept)
    if out is not None:
        save_pack(config, state_dict, out)
    return MergeResult(config, state_dict, report)


def _assemble(packs: list[_Pack], kept: list[SlotRef]) -> tuple[LDKEConfig, dict[str, torch.Tensor], int]:
    ref = packs[0]
    new_id = {s: i for i, s in enumerate(kept)}
    same_rank = len({(int(p.config.rank), float(p.config.alpha)) for p in packs}) == 1
    rank = max(int(p.config.rank) for p in packs)
    alpha = float(ref.config.alpha) if same_rank else float(rank)  # scaling folded into B otherwise
    p_dim = max(int(p.router["keys_v"].shape[1]) for p in packs)

    # projection groups: one per distinct source projection, in source order
    groups: list[tuple[torch.Tensor, ...]] = []
    group_of: dict[tuple[int, int], int] = {}
    for i, pk in enumerate(packs):
        for g, proj in enumerate(pk.groups()):
            proj = tuple(_pad_cols(t, p_dim) if n.startswith("proj") else t for n, t in zip(_PROJ, proj))
            for j, other in enumerate(groups):
                if all(torch.equal(a, b) for a, b in zip(proj, other)):
                    group_of[(i, g)] = j
                    break
            else:
                group_of[(i, g)] = len(groups)
                groups.append(proj)
    used = sorted({group_of[(p, packs[p].slot_group(k))] for p, k in kept}) or [0]
    if used[0] != 0:
        used = [0] + used  # group 0 is where slots added later are fitted: keep the first pack's projection
    remap = {g: i for i, g in enumerate(used)}
    groups = [groups[g] for g in used]
    G = len(groups)

    sd: dict[str, torch.Tensor] = {}
    modules: dict[int, str] = {}
    slot_layers = [list(packs[p].config.slot_layers[k]) for p, k in kept]
    for layer in sorted({l for layers in slot_layers for l in layers}):
        rows_A, rows_B, ids = [], [], []
        for m, (p, k) in enumerate(kept):
            if layer not in slot_layers[m]:
                continue
            e = packs[p].deltas[layer]
            modules.setdefault(layer, e["module"])
            j = e["ids"].index(k)
            A, B = e["A"][j].float(), e["B"][j].float()
            if not same_rank:
                B = B * packs[p].scaling
            rows_A.append(_pad_cols(A, rank))
            rows_B.append(_pad_rows(B, rank))
            ids.append(new_id[(p, k)])
        sd[f"{modules[layer]}.ldke_A"] = torch.stack(rows_A).contiguous()
        sd[f"{modules[layer]}.ldke_B"] = torch.stack(rows_B).contiguous()
        sd[f"{modules[layer]}.ldke_slot_ids"] = torch.tensor(ids, dtype=torch.long)

    r = {}
    for name in ("keys_v", "keys_t"):
        r[name] = torch.stack([_pad_cols(packs[p].router[name][k].float()[None], p_dim)[0] for p, k in kept]) \
            if kept else torch.zeros(0, p_dim)
    for name in ("radius_v", "radius_t", "needs_image"):
        r[name] = torch.tensor([float(packs[p].router[name][k]) for p, k in kept], dtype=torch.float32)
    for n, t in zip(_PROJ, groups[0]):
        r[n] = t
    if G > 1:
        r["proj_group"] = torch.tensor(
            [remap[group_of[(p, packs[p].slot_group(k))]] for p, k in kept], dtype=torch.long
        )
        for j, n in enumerate(_PROJ):
            r["extra_" + n] = torch.stack([g[j] for g in groups[1:]])
    r.update(_merged_anchors(packs, kept, p_dim))
    for name, t in r.items():
        sd[f"{ref.router_module}.{_ROUTER}{name}"] = t.contiguous()

    probe = int(ref.config.probe_layer)
    modules[probe] = ref.router_module
    layers = sorted(set(modules))
    edits = []
    for p, k in kept:
        src = packs[p].config.edits
        e = copy.deepcopy(src[k]) if k < len(src) and isinstance(src[k], dict) else {}
        e["merged_from"] = {"pack": packs[p].name, "slot": k}
        if not getattr(packs[p].config, "router_asked_word", False):
            e.pop("asked_word", None)  # its source routed without it: so does the merged slot
        edits.append(e)
    config = dataclasses.replace(
        copy.deepcopy(ref.config),
        slot_layers=slot_layers,
        num_slots=len(kept),
        edits=edits,
        rank=rank,
        alpha=alpha,
        router_dim=p_dim,
        router_groups=G,
        router_text_anchors=int(r["anchors_t"].shape[0]) if "anchors_t" in r else 0,
        # each slot keeps its asked-for word in its edit metadata (none where its source routed without one); the
        # merged pack is written in this library's format, or a first source of an older one would switch it off
        # (every other setting already holds the value its source's format implies)
        router_asked_word=any(bool(getattr(packs[p].config, "router_asked_word", False)) for p, _ in kept),
        pack_format_version=PACK_FORMAT_VERSION,
        # the projections above are the fp32 matrices each source routed with; re-quantizing them could
        # move a slot's scores by an ulp, so a merged pack stores them as they are
        router_storage="float32",
        layers_to_transform=layers,
        target_modules=[modules[l].removeprefix(_PEFT_PREFIX) for l in layers],
    )
    return config, sd, G


def _merged_anchors(packs: Any, kept: list, p_dim: int) -> dict[str, torch.Tensor]:
    """Each kept slot's textual anchors under its new index (in its source projection's space, which the
    merged pack keeps as that slot's group; zero-padded columns leave distances unchanged)."""
    rows_t, rows_slot, rows_pos = [], [], []
    for j, (p, k) in enumerate(kept):
        src = packs[p].router
        if "anchors_t" in src:
            mine = src["anchors_slot"] == k
            rows_t.append(_pad_cols(src["anchors_t"][mine].half(), p_dim))
            rows_slot.append(torch.full((int(mine.sum()),), j, dtype=torch.int32))
            rows_pos.append(src["anchors_pos"][mine].half())
    if not sum(len(x) for x in rows_t):
        return {}
    return {"anchors_t": torch.cat(rows_t), "anchors_slot": torch.cat(rows_slot), "anchors_pos": torch.cat(rows_pos)}


def _pad_cols(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[-1] == n:
        return t
    return torch.cat([t, t.new_zeros(*t.shape[:-1], n - t.shape[-1])], dim=-1)


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[0] == n:
        return t
    return torch.cat([t, t.new_zeros(n - t.shape[0], *t.shape[1:])], dim=0)
