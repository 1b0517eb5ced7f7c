"""Validation of an LDKE pack's files before anything is loaded into a model.

PEFT loads a config, injects adapter layers into the base model, and only then reads the weights
file. A pack whose weights are corrupt, truncated, poisoned with NaNs or shaped for another config
would therefore fail (or worse, half-load) *after* the base model was modified. :func:`validate_pack`
runs at config-load time (from :meth:`ldke_peft.LDKEConfig.from_pretrained`, which every loading route
goes through) and checks the files alone, without a model:

* no pickle-format weight files in the pack folder (``*.bin``, ``*.pt``, ...): they can run code
  when unpickled, and PEFT would fall back to one of them if the safetensors file were missing;
* ``adapter_model.safetensors`` exists and its header parses;
* the tensor names and shapes are exactly those the config implies (per edited layer ``ldke_A``,
  ``ldke_B``, ``ldke_slot_ids`` for the slots hosted there; the router buffers on the probe layer),
  with internally consistent feature sizes and slot ids;
* every floating tensor is finite.

Cost is one pass over the file (each tensor is read once, one at a time). Whether the pack fits the
*model* (hidden size, weights) is checked at injection by :mod:`ldke_peft.tuner.fingerprint`.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import AdapterLoadError, CorruptAdapterError, UnsafeAdapterError
from .pack_meta import EDITS_FILE, has_edits_file, read_edits

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
#: Suffixes of files that are (or may be) pickle archives. Never opened, only refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

_PEFT_PREFIX = "base_model.model."
_DELTA_TENSORS = ("ldke_A", "ldke_B", "ldke_slot_ids")
_ROUTER_PREFIX = "ldke_router."


def validate_pack(path_or_repo: str, config: Any, subfolder: str | None = None, **hub_kwargs: Any) -> None:
    """Raise an :class:`~ldke_peft.errors.AdapterLoadError` subclass if the pack cannot be loaded safely.

    Args:
        path_or_repo: local pack folder or Hub repo id (as given to ``PeftModel.from_pretrained``).
        config: the pack's :class:`~ldke_peft.LDKEConfig`, already parsed.
        subfolder: folder inside ``path_or_repo`` holding the pack.
        hub_kwargs: ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ... forwarded to
            ``huggingface_hub.hf_hub_download`` for repo ids (``HF_HUB_OFFLINE`` is honoured).

    Raises:
        UnsafeAdapterError: the pack folder contains pickle-format files.
        CorruptAdapterError: the weights file is missing, unreadable, has missing/extra/misshaped
            tensors, slot ids that disagree with the config, or non-finite values; or the edit metadata
            file (:mod:`ldke_peft.tuner.pack_meta`, format 1.4 on) is missing or disagrees with the config.

    On success ``config.edits`` holds the pack's edit metadata (read from its own file since format 1.4).
    """
    names = [WEIGHTS_NAME, EDITS_FILE] if has_edits_file(config) else [WEIGHTS_NAME]
    paths = _resolve_files(str(path_or_repo), subfolder, hub_kwargs, names)
    _check_tensors(paths[0], config)
    if len(paths) > 1:
        config.edits = read_edits(paths[1], config)


# ---------------------------------------------------------------------- file resolution


def _refuse_pickles(names: list[str], where: str) -> None:
    bad = sorted(n for n in names if os.path.basename(n).lower().endswith(PICKLE_SUFFIXES))
    if bad:
        raise UnsafeAdapterError(
            f"LDKE pack at {where} contains pickle-format file(s) {bad}; pickle can execute arbitrary code when "
            f"loaded, so ldke-peft refuses the whole pack. Packs are saved as {WEIGHTS_NAME} only: remove these "
            "files (or get the pack from a trusted source)."
        )


def _resolve_files(path_or_repo: str, subfolder: str | None, hub_kwargs: dict[str, Any],
                   filenames: list[str]) -> list[str]:
    """Paths of the pack's files ``filenames`` (local or downloaded), after refusing pickle files next to them
    (the folder or the repo listing is checked once for all of them)."""
    local = os.path.join(path_or_repo, subfolder) if subfolder else path_or_repo
    if os.path.isdir(local):
        _refuse_pickles([e.name for e in os.scandir(local) if e.is_file() or e.is_symlink()], repr(local))
        paths = [os.path.join(local, f) for f in filenames]
        for f, path in zip(filenames, paths):
            if not os.path.isfile(path):
                raise CorruptAdapterError(f"LDKE pack at {local!r} has no {f}")
        return paths
    return _resolve_from_hub(path_or_repo, subfolder, hub_kwargs, filenames)


def _resolve_from_hub(repo_id: str, subfolder: str | None, hub_kwargs: dict[str, Any], filenames: list[str]) -> list[str]:
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    accepted = set(inspect.signature(huggingface_hub.hf_hub_download).parameters)
    kwargs = {k: v for k, v in hub_kwargs.items() if k in accepted and k not in ("repo_id", "filename", "subfolder")}
    where = f"Hub repo {repo_id!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    offline = huggingface_hub.constants.is_offline_mode() or bool(kwargs.get("local_files_only"))
    if not offline:
        # Refuse before downloading anything when the repo listing shows pickle files.
        try:
            api = huggingface_hub.HfApi(endpoint=kwargs.get("endpoint"))
            files = api.list_repo_files(
                repo_id, revision=kwargs.get("revision"), repo_type=kwargs.get("repo_type"), token=kwargs.get("token")
            )
        except Exception as exc:  # noqa: BLE001 - listing is best effort; the cache check below still runs
            logger.debug("could not list files of %s: %s", repo_id, exc)
        else:
            prefix = f"{subfolder.strip('/')}/" if subfolder else ""
            _refuse_pickles([f for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :]], where)
    paths = []
    for filename in filenames:
        try:
            path = huggingface_hub.hf_hub_download(repo_id, filename, subfolder=subfolder, **kwargs)
        except hub_errors.LocalEntryNotFoundError as exc:
            raise AdapterLoadError(
                f"cannot fetch {filename} of the LDKE pack in {where}: not in the local cache and the Hub is not "
                "reachable (offline mode or local_files_only)"
            ) from exc
        except hub_errors.EntryNotFoundError as exc:
            raise CorruptAdapterError(f"LDKE pack in {where} has no {filename}") from exc
        except Exception as exc:  # noqa: BLE001 - network, auth, offline cache miss: one clear error type
            raise AdapterLoadError(f"cannot fetch {filename} of the LDKE pack in {where}: {exc}") from exc
        paths.append(str(path))
    _refuse_pickles(os.listdir(os.path.dirname(paths[0])), where)
    return paths


# ---------------------------------------------------------------------- tensor checks


@dataclass(frozen=True)
class _Entry:
    key: str
    layer: int
    tensor: str  # "ldke_A", "ldke_B", "ldke_slot_ids" or "ldke_router.<buffer>"
    shape: tuple[int, ...]
    dtype: str


def _open(path: str) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt")
    except Exception as exc:  # noqa: BLE001 - SafetensorError and OS errors alike mean "unreadable"
        raise CorruptAdapterError(f"{path!r} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc


def _read_header(handle: Any, path: str) -> list[tuple[str, tuple[int, ...], str]]:
    try:
        items = []
        for key in handle.keys():
            sl = handle.get_slice(key)
            items.append((key, tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype())))
    except Exception as exc:  # noqa: BLE001
        raise CorruptAdapterError(f"{path!r} has an unreadable safetensors header: {exc}") from exc
    return items


def layer_regex(config: Any) -> re.Pattern:
    """The pattern that finds a tensor's decoder layer index in its key (from the config's ``layers_pattern``)."""
    pattern = getattr(config, "layers_pattern", None)
    if isinstance(pattern, list):
        pattern = pattern[0] if len(pattern) == 1 else None
    if not pattern:
        raise CorruptAdapterError(
            "adapter_config.json has no layers_pattern; it was not written by ldke-peft's save_pretrained"
        )
    return re.compile(r"(?:^|\.)" + re.escape(pattern) + r"\.(\d+)\.")


def split_key(key: str) -> tuple[str, str]:
    """``(module, tensor)`` of an adapter tensor's key: ``tensor`` is ``ldke_A``, ``ldke_B``, ``ldke_slot_ids``
    or ``ldke_router.<buffer>``.

    Raises:
        CorruptAdapterError: the key names no LDKE adapter tensor.
    """
    for suffix in _DELTA_TENSORS:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    idx = key.find("." + _ROUTER_PREFIX)
    if idx < 0:
        raise CorruptAdapterError(f"unexpected tensor {key!r} in the LDKE pack (not an LDKE adapter tensor)")
    return key[:idx], key[idx + 1 :]


def _parse_key(key: str, layer_re: re.Pattern, targets: set[str] | None) -> tuple[int, str]:
    name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
    module, tensor = split_key(name)
    if tensor.startswith(_ROUTER_PREFIX):
        if tensor[len(_ROUTER_PREFIX) :] not in _router_buffers():
            raise CorruptAdapterError(f"unexpected router tensor {key!r} in the LDKE pack")
    m = layer_re.search(module + ".")
    if m is None:
        raise CorruptAdapterError(f"tensor {key!r} is not under the pack's decoder layers")
    if targets is not None and module not in targets:
        raise CorruptAdapterError(f"tensor {key!r} belongs to module {module!r}, which is not a target of the pack")
    return int(m.group(1)), tensor


def _router_buffers() -> tuple[str, ...]:
    from .routing import RouterState

    return RouterState.BUFFERS + RouterState.SCALE_BUFFERS + RouterState.GROUP_BUFFERS + RouterState.ANCHOR_BUFFERS


def _router_storage(config: Any) -> str:
    return str(getattr(config, "router_storage", "float32") or "float32")


#: Router projections, int8 when the config says ``router_storage="int8"``.
_PROJ_TENSORS = (_ROUTER_PREFIX + "proj_v", _ROUTER_PREFIX + "proj_t")


def _router_groups(config: Any) -> int:
    return int(getattr(config, "router_groups", 1) or 1)


def _check_tensors(path: str, config: Any) -> None:
    with _open(path) as handle:
        _check_open_file(handle, path, config)


def _check_open_file(handle: Any, path: str, config: Any) -> None:
    items = _read_header(handle, path)
    layer_re = layer_regex(config)
    targets = set(config.target_modules) if isinstance(config.target_modules, (list, tuple, set)) else None

    entries: dict[tuple[int, str], _Entry] = {}
    modules_per_layer: dict[int, set[str]] = {}
    for key, shape, dtype in items:
        layer, tensor = _parse_key(key, layer_re, targets)
        if (layer, tensor) in entries:
            raise CorruptAdapterError(f"tensor {tensor} of decoder layer {layer} appears twice ({key!r})")
        entries[(layer, tensor)] = _Entry(key, layer, tensor, shape, dtype)
        modules_per_layer.setdefault(layer, set()).add(key.rsplit("." + tensor, 1)[0])
    for layer, mods in modules_per_layer.items():
        if len(mods) > 1:
            raise CorruptAdapterError(f"decoder layer {layer} has LDKE tensors on several modules: {sorted(mods)}")

    expected = _expected_layout(config)
    missing = sorted(set(expected) - set(entries))
    if missing:
        layer, tensor = missing[0]
        raise CorruptAdapterError(
            f"LDKE pack {path!r} is missing tensor {tensor} of decoder layer {layer} "
            f"({len(missing)} missing in all; the config's slot_layers/probe_layer expect it)"
        )
    extra = sorted(set(entries) - set(expected))
    if extra:
        e = entries[extra[0]]
        raise CorruptAdapterError(
            f"LDKE pack {path!r} has tensor {e.key!r} with shape {list(e.shape)}, which its config does not "
            f"account for (slot_layers={config.slot_layers}, probe_layer={config.probe_layer})"
        )
    _check_shapes(entries, expected, config)
    _check_slot_ids_and_values(handle, entries, config, path)


def _expected_layout(config: Any) -> dict[tuple[int, str], tuple[int | None, ...]]:
    """``{(layer, tensor): shape}`` with ``None`` for sizes the config does not know (in/out features)."""
    if config.probe_layer is None:
        raise CorruptAdapterError("adapter_config.json has no probe_layer; a saved LDKE pack always records it")
    r, K, p = int(config.rank), int(config.num_slots), int(config.router_dim)
    layout: dict[tuple[int, str], tuple[int | None, ...]] = {}
    for layer in config.edit_layers():
        k_l = sum(1 for layers in config.slot_layers if layer in layers)
        layout[(layer, "ldke_A")] = (k_l, None, r)
        layout[(layer, "ldke_B")] = (k_l, r, None)
        layout[(layer, "ldke_slot_ids")] = (k_l,)
    P = config.probe_layer
    # textual features: the sentence encoder's width when the pack routes on one, else [mean; last] of
    # the probe layer's hidden states
    t: Any = "2d"
    if getattr(config, "router_text_encoder", None):
        if int(config.router_text_dim) <= 0:
            raise CorruptAdapterError("adapter_config.json names a router_text_encoder but no router_text_dim")
        # [probe-layer text features (2d) ; encoder embedding] or the embedding alone
        t = f"2d+{int(config.router_text_dim)}" if getattr(config, "router_text_probe", False) else int(config.router_text_dim)
    router_shapes = {
        "mu_v": ("d",), "proj_v": ("d", p), "mu_t": (t,), "proj_t": (t, p),
        "keys_v": (K, p), "keys_t": (K, p), "radius_v": (K,), "radius_t": (K,), "needs_image": (K,),
    }
    if _router_storage(config) == "int8":  # int8 projections + per-column scales (routing.quantize_projection)
        router_shapes.update({"proj_v_scale": (p,), "proj_t_scale": (p,)})
    G = _router_groups(config)
    if G > 1:  # a merged pack that keeps several source projections (see RouterState)
        router_shapes.update({
            "proj_group": (K,), "extra_mu_v": (G - 1, "d"), "extra_proj_v": (G - 1, "d", p),
            "extra_mu_t": (G - 1, t), "extra_proj_t": (G - 1, t, p),
        })
    A = int(getattr(config, "router_text_anchors", 0) or 0)
    if A > 0:  # textual anchors (tuner.text_anchors)
        router_shapes.update({"anchors_t": (A, p), "anchors_slot": (A,), "anchors_pos": (A,)})
    for buf, shape in router_shapes.items():
        layout[(P, _ROUTER_PREFIX + buf)] = shape  # type: ignore[assignment]
    return layout


def _check_shapes(entries: dict[tuple[int, str], _Entry], expected: dict, config: Any) -> None:
    sizes: dict[str, tuple[int, str]] = {}  # symbolic size -> (value, tensor key that set it)

    def bind(sym: str, value: int, e: _Entry) -> None:
        if sym in sizes and sizes[sym][0] != value:
            other_val, other_key = sizes[sym]
            raise CorruptAdapterError(
                f"tensor {e.key!r} has shape {list(e.shape)}, inconsistent with {other_key!r} "
                f"({_SYMBOL_DOC[sym]}: {value} vs {other_val})"
            )
        sizes.setdefault(sym, (value, e.key))

    for (layer, tensor), want in expected.items():
        e = entries[(layer, tensor)]
        if len(e.shape) != len(want):
            raise CorruptAdapterError(
                f"tensor {e.key!r} has shape {list(e.shape)}; expected {_fmt(want)} for this config"
            )
        for dim, (got, w) in enumerate(zip(e.shape, want)):
            if w is None:
                sym = {"ldke_A": "in", "ldke_B": "d"}[tensor]
                bind(sym, got, e)
            elif isinstance(w, str):
                extra = int(w.split("+")[1]) if w.startswith("2d+") else 0
                bind("d", got if w == "d" else (got - extra) // 2, e)
                if w != "d" and ((got - extra) % 2 or got <= extra):
                    raise CorruptAdapterError(f"tensor {e.key!r} has shape {list(e.shape)}; expected {w}")
            elif got != w:
                raise CorruptAdapterError(
                    f"tensor {e.key!r} has shape {list(e.shape)}; the config expects {_fmt(want)} "
                    f"({_dim_doc(tensor, dim)}; rank={config.rank}, num_slots={config.num_slots}, "
                    f"router_dim={config.router_dim})"
                )
        if tensor in _PROJ_TENSORS and _router_storage(config) == "int8":
            if e.dtype.upper() != "I8":
                raise CorruptAdapterError(
                    f"tensor {e.key!r} has dtype {e.dtype}; the config says router_storage='int8' (expected I8)"
                )
        elif tensor in _INDEX_TENSORS:
            if not e.dtype.upper().startswith(("I", "U")):
                raise CorruptAdapterError(f"tensor {e.key!r} has dtype {e.dtype}; slot/group ids must be integers")
        elif not e.dtype.upper().startswith(("F", "BF")):
            raise CorruptAdapterError(f"tensor {e.key!r} has dtype {e.dtype}; expected a floating dtype")
    hidden = (config.base_model_fingerprint or {}).get("hidden_size")
    if hidden is not None and "d" in sizes and sizes["d"][0] != int(hidden):
        raise CorruptAdapterError(
            f"tensor {sizes['d'][1]!r} implies hidden size {sizes['d'][0]}, but the pack's base_model_fingerprint "
            f"says {hidden}"
        )
    n_layers = (config.base_model_fingerprint or {}).get("num_layers")
    if n_layers is not None:
        used = sorted({layer for layer, _ in entries})
        if used and used[-1] >= int(n_layers):
            raise CorruptAdapterError(
                f"LDKE pack has tensors for decoder layer {used[-1]}, but its base model has {n_layers} layers"
            )


#: Integer tensors: per-layer slot ids and (merged packs) each slot's projection group.
_INDEX_TENSORS = ("ldke_slot_ids", _ROUTER_PREFIX + "proj_group", _ROUTER_PREFIX + "anchors_slot")

_SYMBOL_DOC = {"in": "input features of the edited MLP projections", "d": "hidden size"}


def _dim_doc(tensor: str, dim: int) -> str:
    if tensor in ("ldke_A", "ldke_B", "ldke_slot_ids") and dim == 0:
        return "dim 0 = number of slots hosted by this layer"
    if tensor in ("ldke_A", "ldke_B"):
        return "rank dimension"
    return "router slot/projection dimension"


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def _check_slot_ids_and_values(handle: Any, entries: dict[tuple[int, str], _Entry], config: Any, path: str) -> None:
    for (layer, tensor), e in sorted(entries.items()):
        try:
            t = handle.get_tensor(e.key)
        except Exception as exc:  # noqa: BLE001
            raise CorruptAdapterError(f"cannot read tensor {e.key!r} from {path!r}: {exc}") from exc
        if tensor == "ldke_slot_ids":
            want = [k for k, layers in enumerate(config.slot_layers) if layer in layers]
            got = [int(v) for v in t.tolist()]
            if got != want:
                raise CorruptAdapterError(
                    f"tensor {e.key!r} says decoder layer {layer} hosts slots {got}, but the config's slot_layers "
                    f"say {want}"
                )
        elif tensor == _ROUTER_PREFIX + "proj_group":
            G = _router_groups(config)
            bad = [int(v) for v in t.tolist() if not 0 <= int(v) < G]
            if bad:
                raise CorruptAdapterError(
                    f"tensor {e.key!r} assigns slots to projection group(s) {sorted(set(bad))}, but the config has "
                    f"router_groups={G}"
                )
        elif tensor == _ROUTER_PREFIX + "anchors_slot":
            bad = [int(v) for v in t.tolist() if not 0 <= int(v) < int(config.num_slots)]
            if bad:
                raise CorruptAdapterError(f"tensor {e.key!r} names slot(s) {sorted(set(bad))} of a pack with "
                                          f"{config.num_slots} slots")
        elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise CorruptAdapterError(
                f"tensor {e.key!r} in {path!r} has {n_bad} non-finite value(s) (NaN/Inf); refusing the pack"
            )
