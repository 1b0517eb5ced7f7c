"""``LDKEMultimodalHyperParams``: EasyEdit-style hyperparameters for the LDKE method.

EasyEdit drives every editing method from a YAML file loaded into a ``@dataclass`` with a
``from_hparams(path)`` classmethod; ``MultimodalEditor`` then reads a handful of common fields
(``alg_name``, ``model_name``, ``device``, ``dtype``, ``batch_size``, ...) and hands the object to the
method's apply function. This class follows that convention and adds every LDKE knob of
:class:`ldke_peft.LDKEConfig`, so one YAML file configures both EasyEdit and LDKE.

Differences from upstream's loaders, on purpose:

* unknown keys are an error naming them (upstream: a ``TypeError`` from the dataclass), and a wrong
  ``alg_name`` is an error saying which file and value (upstream: a bare ``assert``);
* scientific-notation strings (``1e-2``, which YAML 1.1 reads as a string) become floats only for
  fields declared as numbers, so ``model_name: "123"`` or ``device: "0"`` keep their type;
* ``dtype`` is normalised to a ``torch.dtype`` on construction (EasyEdit passes ``hparams.dtype``
  straight to ``from_pretrained`` and to ``BatchFeature.to``, which needs a real dtype);
  :meth:`torch_dtype` converts whatever was assigned later, string or dtype.

The object is mutable on purpose: ``MultimodalEditor`` assigns ``dtype`` when missing and forces
``batch_size = 1`` for single edits.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml

from ldke_peft.tuner.config import FIT_DTYPES, LDKEConfig
from ldke_peft.errors import LDKEError

__all__ = [
    "ALG_NAME",
    "INTERNAL_CONFIG_FIELDS",
    "LDKE_KNOBS",
    "InvalidHyperParamsError",
    "LDKEMultimodalHyperParams",
    "hparams_dir",
    "shipped_hparams",
]

#: The method name EasyEdit dispatches on (``hparams.alg_name``).
ALG_NAME = "LDKE"

#: LDKEConfig fields that the editor fills in itself (localization results, pack bookkeeping);
#: they are not hyperparameters and are refused in a YAML file.
INTERNAL_CONFIG_FIELDS = frozenset(
    {
        "target_modules",
        "layers_to_transform",
        "layers_pattern",
        "slot_layers",
        "num_slots",
        "base_model_fingerprint",
        "edits",
        "pack_format_version",
        "router_groups",  # set by ldke_peft.merge for merged packs
        "router_text_dim",  # set by the editor from the text encoder
        "router_text_frame",  # recorded by the editor from the model's chat template
        "router_text_anchors",  # set by the editor with router_neighbour_questions
    }
)

#: Every LDKE knob carried by the hparams and forwarded to :class:`LDKEConfig`.
LDKE_KNOBS = (
    "rank",
    "alpha",
    "probe_layer",
    "router_dim",
    "router_storage",
    "delta_storage",
    "router_margin",
    "router_paraphrases",
    "router_neighbour_questions",
    "router_anchor_clearance",
    "router_asked_word",
    "router_text_encoder",
    "router_text_margin",
    "router_text_probe",
    "router_text_steps",
    "auto_views",
    "router_views",
    "router_pack_guard",
    "router_steps",
    "router_lr",
    "num_edit_layers",
    "edit_steps",
    "edit_lr",
    "delta_bank_wordings",
    "edit_fit_stages",
    "edit_fit_dtype",
    "max_delta_norm",
    "localization",
    "fixed_layers",
    "corruption",
    "noise_scale",
    "hard_negatives",
    "use_router",
)

_LOCALIZATION = ("attribution", "tracing", "fixed")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

_SCI = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class InvalidHyperParamsError(LDKEError, ValueError):
    """An LDKE hparams file or object is malformed; ``key`` names the offending field (if one)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _config_default(name: str) -> Any:
    f = LDKEConfig.__dataclass_fields__[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


@dataclass
class LDKEMultimodalHyperParams:
    """Hyperparameters of LDKE as an EasyEdit multimodal editing method.

    EasyEdit fields (read by ``MultimodalEditor`` / ``VQADataset`` / ``CaptionDataset``):

    Attributes:
        alg_name: must be ``"LDKE"``.
        model_name: checkpoint path. EasyEdit picks the model class by substrings of this path
            (``llava-onevision``, ``qwen2-vl``, ``qwen3-vl``, ...), so keep them in the directory name.
        device: ``0`` (= ``cuda:0``), ``"cuda:1"``, ``"cpu"``, ...
        dtype: ``float32`` / ``bfloat16`` / ``float16`` (string in YAML; a ``torch.dtype`` after loading).
        batch_size: EasyEdit forces 1 for single edits; LDKE edits one request at a time anyway.
        max_length: kept for EasyEdit compatibility (LDKE checks lengths against the model context).
        use_chat_template: kept for compatibility; LDKE always formats prompts with the model's chat
            template, as EasyEdit's HF multimodal evaluation does.
        model_parallel: kept for compatibility (unused by LDKE).
        name: processor/tokenizer path for EasyEdit's datasets (``AutoProcessor.from_pretrained(name)``);
            defaults to ``model_name``.
        coco_image / rephrase_image: image roots of EasyEdit's ``VQADataset`` / ``CaptionDataset``.

    LDKE knobs (see :class:`ldke_peft.LDKEConfig` for their meaning) are forwarded by
    :meth:`to_ldke_config`. Options of :func:`ldke_peft.edit` itself: ``adapter_name``,
    ``cache_hidden``, ``seed``, ``progress``.
    """

    alg_name: str
    model_name: str
    device: Union[int, str] = 0
    dtype: Union[str, torch.dtype] = "float32"
    batch_size: int = 1
    max_length: int = 30
    use_chat_template: bool = True
    model_parallel: bool = False
    name: Optional[str] = None
    coco_image: Optional[str] = None
    rephrase_image: Optional[str] = None

    # LDKE knobs (defaults: LDKEConfig's)
    rank: int = _config_default("rank")
    alpha: float = _config_default("alpha")
    probe_layer: Optional[int] = _config_default("probe_layer")
    router_dim: int = _config_default("router_dim")
    router_storage: str = _config_default("router_storage")
    delta_storage: str = _config_default("delta_storage")
    router_margin: float = _config_default("router_margin")
    router_paraphrases: int = _config_default("router_paraphrases")
    router_neighbour_questions: int = _config_default("router_neighbour_questions")
    router_anchor_clearance: float = _config_default("router_anchor_clearance")
    router_asked_word: bool = _config_default("router_asked_word")
    router_text_encoder: Optional[str] = _config_default("router_text_encoder")
    router_text_margin: Optional[float] = _config_default("router_text_margin")
    router_text_probe: bool = _config_default("router_text_probe")
    router_text_steps: Optional[int] = _config_default("router_text_steps")
    auto_views: int = _config_default("auto_views")
    router_views: int = _config_default("router_views")
    router_pack_guard: bool = _config_default("router_pack_guard")
    router_steps: int = _config_default("router_steps")
    router_lr: float = _config_default("router_lr")
    num_edit_layers: int = _config_default("num_edit_layers")
    edit_steps: int = _config_default("edit_steps")
    edit_lr: float = _config_default("edit_lr")
    delta_bank_wordings: bool = _config_default("delta_bank_wordings")
    edit_fit_stages: bool = _config_default("edit_fit_stages")
    edit_fit_dtype: str = _config_default("edit_fit_dtype")
    max_delta_norm: float = _config_default("max_delta_norm")
    localization: str = _config_default("localization")
    fixed_layers: Optional[list[int]] = field(default=None)
    corruption: str = _config_default("corruption")
    noise_scale: float = _config_default("noise_scale")
    hard_negatives: bool = _config_default("hard_negatives")
    use_router: bool = _config_default("use_router")

    # options of ldke_peft.edit()
    adapter_name: str = "default"
    cache_hidden: bool = True
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.alg_name != ALG_NAME:
            raise InvalidHyperParamsError(
                f"alg_name is {self.alg_name!r}; LDKEMultimodalHyperParams only loads alg_name: {ALG_NAME}",
                key="alg_name",
            )
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise InvalidHyperParamsError("model_name must be a non-empty path string", key="model_name")
        _check_types(self)
        self.dtype = self.torch_dtype()
        if self.name is None:
            self.name = self.model_name
        if isinstance(self.device, str) and self.device.strip().isdigit():
            self.device = int(self.device)
        _check_values(self)

    # ------------------------------------------------------------------ conversions
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype`` (it may have been assigned a string after loading)."""
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        key = str(self.dtype).strip().lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise InvalidHyperParamsError(
                f"dtype {self.dtype!r} is not one of {sorted(set(_DTYPES))}", key="dtype"
            )
        return _DTYPES[key]

    def to_ldke_config(self) -> LDKEConfig:
        """A fresh :class:`ldke_peft.LDKEConfig` carrying every LDKE knob of these hparams."""
        kwargs = {k: getattr(self, k) for k in LDKE_KNOBS}
        if kwargs["fixed_layers"] is not None:
            kwargs["fixed_layers"] = list(kwargs["fixed_layers"])
        return LDKEConfig(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready dict (``dtype`` as its short name); ``from_dict(to_dict())`` round-trips."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["dtype"] = str(self.torch_dtype()).removeprefix("torch.")
        return out

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, config: dict[str, Any], *, source: str = "<dict>") -> "LDKEMultimodalHyperParams":
        """Build from a mapping (e.g. a parsed YAML file), with EasyEdit's key conventions."""
        if not isinstance(config, dict) or not config:
            raise InvalidHyperParamsError(f"{source}: expected a non-empty mapping of hyperparameters")
        config = dict(config)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            internal = sorted(set(unknown) & INTERNAL_CONFIG_FIELDS)
            hint = (
                f" ({', '.join(internal)} {'is' if len(internal) == 1 else 'are'} filled in by the editor, "
                "not set in hparams)"
                if internal
                else ""
            )
            raise InvalidHyperParamsError(
                f"{source}: unknown LDKE hyperparameter(s): {', '.join(unknown)}{hint}. "
                f"Known keys: {', '.join(sorted(names))}",
                key=unknown[0],
            )
        for key in ("alg_name", "model_name"):
            if key not in config:
                raise InvalidHyperParamsError(f"{source}: missing required key {key!r}", key=key)
        if config["alg_name"] != ALG_NAME:
            raise InvalidHyperParamsError(
                f"{source}: alg_name is {config['alg_name']!r}, expected {ALG_NAME!r}; this file is for "
                "another EasyEdit method (load it with that method's HyperParams class)",
                key="alg_name",
            )
        config = _coerce_numbers(cls, config, source)
        try:
            return cls(**config)
        except InvalidHyperParamsError as exc:
            raise InvalidHyperParamsError(f"{source}: {exc}", key=exc.key) from None

    @classmethod
    def from_hparams(cls, hparams_name_or_path: str | os.PathLike, **overrides: Any) -> "LDKEMultimodalHyperParams":
        """Load a YAML file, EasyEdit style; ``overrides`` replace keys after loading.

        ``hparams_name_or_path`` may omit ``.yaml`` (as in EasyEdit) or be the name of a file shipped
        in :func:`hparams_dir` (``"qwen2vl-7b"``, ``"tiny"``, ...).
        """
        path = _resolve(hparams_name_or_path)
        with open(path, encoding="utf-8") as fh:
            try:
                config = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                raise InvalidHyperParamsError(f"{path}: not valid YAML: {exc}") from None
        if config is None:
            raise InvalidHyperParamsError(f"{path}: the file is empty")
        if not isinstance(config, dict):
            raise InvalidHyperParamsError(f"{path}: expected a mapping of hyperparameters, got {type(config).__name__}")
        config.update(overrides)
        return cls.from_dict(config, source=str(path))


# ---------------------------------------------------------------------- shipped files


def hparams_dir() -> Path:
    """Folder of the YAML files shipped with this integration (``hparams/LDKE``)."""
    return Path(__file__).resolve().parent / "hparams" / ALG_NAME


def shipped_hparams() -> list[str]:
    """Names (without ``.yaml``) of the shipped hparams files."""
    return sorted(p.stem for p in hparams_dir().glob("*.yaml"))


def _resolve(name_or_path: str | os.PathLike) -> Path:
    raw = os.fspath(name_or_path)
    candidates = [Path(raw)]
    if not raw.endswith((".yaml", ".yml")):
        candidates.append(Path(raw + ".yaml"))
    candidates.append(hparams_dir() / (Path(raw).name if raw.endswith((".yaml", ".yml")) else Path(raw).name + ".yaml"))
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"no LDKE hparams file {raw!r} (looked at {', '.join(str(c) for c in dict.fromkeys(candidates))}); "
        f"shipped files: {', '.join(shipped_hparams())}"
    )


# ---------------------------------------------------------------------- validation


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_types(tp: Any) -> tuple[Any, ...]:
    """``Optional[Union[int, str]]`` -> ``(int, str, NoneType)``; ``list[int]`` -> ``(list,)``."""
    origin = typing.get_origin(tp)
    if origin is Union:
        out: tuple[Any, ...] = ()
        for a in typing.get_args(tp):
            out += _base_types(a)
        return out
    if origin is not None:
        return (origin,)
    return (tp,)


def _coerce_numbers(cls: type, config: dict[str, Any], source: str) -> dict[str, Any]:
    """Strings like ``1e-2`` -> numbers, for numeric fields only (YAML 1.1 reads them as strings)."""
    hints = _field_types(cls)
    for key, value in list(config.items()):
        if not isinstance(value, str) or not _SCI.match(value.strip()):
            continue
        types = _base_types(hints[key])
        if float in types:
            config[key] = float(value)
        elif int in types and str not in types:
            number = float(value)
            if not number.is_integer():
                raise InvalidHyperParamsError(f"{source}: {key} must be an integer, got {value!r}", key=key)
            config[key] = int(number)
    return config


def _check_types(hp: LDKEMultimodalHyperParams) -> None:
    hints = _field_types(type(hp))
    for f in dataclasses.fields(hp):
        value = getattr(hp, f.name)
        types = _base_types(hints[f.name])
        if value is None:
            if type(None) in types:
                continue
            raise InvalidHyperParamsError(f"{f.name} must not be null", key=f.name)
        if isinstance(value, bool):
            ok = bool in types
        elif isinstance(value, int):
            ok = int in types or float in types
            if ok and int not in types:
                setattr(hp, f.name, float(value))
        elif isinstance(value, float):
            ok = float in types or (int in types and value.is_integer() and f.name not in ("device",))
            if ok and float not in types:
                setattr(hp, f.name, int(value))
        else:
            ok = any(isinstance(value, t) for t in types if isinstance(t, type))
        if not ok:
            wanted = " or ".join(getattr(t, "__name__", str(t)) for t in types if t is not type(None))
            raise InvalidHyperParamsError(
                f"{f.name} must be {wanted}, got {type(value).__name__} {value!r}", key=f.name
            )
    if hp.fixed_layers is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in hp.fixed_layers):
        raise InvalidHyperParamsError(f"fixed_layers must be a list of layer indices, got {hp.fixed_layers!r}", key="fixed_layers")


def _check_values(hp: LDKEMultimodalHyperParams) -> None:
    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise InvalidHyperParamsError(f"{key} {what}, got {getattr(hp, key)!r}", key=key)

    for key in ("rank", "router_dim", "router_steps", "num_edit_layers", "edit_steps", "batch_size", "max_length"):
        need(getattr(hp, key) >= 1, key, "must be >= 1")
    for key in ("alpha", "router_lr", "edit_lr", "noise_scale"):
        need(getattr(hp, key) > 0, key, "must be > 0")
    need(hp.max_delta_norm >= 0, "max_delta_norm", "must be >= 0 (0 = no bound)")
    need(hp.router_paraphrases >= 0, "router_paraphrases", "must be >= 0 (0 = only the request's own wordings)")
    need(hp.router_neighbour_questions >= 0, "router_neighbour_questions", "must be >= 0 (0 = no textual anchors)")
    need(0 <= hp.router_anchor_clearance < 1, "router_anchor_clearance", "must be in [0, 1) (0 = keep every anchor)")
    need(hp.router_text_steps is None or hp.router_text_steps >= 0, "router_text_steps",
         "must be >= 0 (0 = the PCA start only) or null (0 with an encoder, router_steps without)")
    need(hp.router_text_margin is None or 0 <= hp.router_text_margin <= 1, "router_text_margin",
         "must be in [0, 1] (0 = at the farthest positive, 1 = at the nearest negative) or null (= router_margin)")
    need(hp.router_text_encoder is None or (isinstance(hp.router_text_encoder, str) and bool(hp.router_text_encoder.strip())),
         "router_text_encoder", "must be a sentence encoder's Hub id or folder, or null (probe-layer text features)")
    need(hp.auto_views >= 0, "auto_views", "must be >= 0 (0 = only the request's own images)")
    need(hp.router_views >= 0, "router_views", "must be >= 0 (0 = only the request's own images)")
    need(hp.router_storage in ("int8", "float32"), "router_storage", "must be 'int8' or 'float32'")
    need(hp.delta_storage in ("float16", "float32"), "delta_storage", "must be 'float16' or 'float32'")
    need(hp.edit_fit_dtype in FIT_DTYPES, "edit_fit_dtype", f"must be one of {', '.join(FIT_DTYPES)}")
    need(0.0 <= hp.router_margin <= 1.0, "router_margin", "must be between 0 and 1")
    need(hp.probe_layer is None or hp.probe_layer >= 0, "probe_layer", "must be a layer index >= 0 or null")
    need(hp.localization in _LOCALIZATION, "localization", f"must be one of {', '.join(_LOCALIZATION)}")
    if hp.localization == "fixed":
        need(bool(hp.fixed_layers), "fixed_layers", "must list the layers to edit when localization is 'fixed'")
        if hp.probe_layer is not None:
            need(min(hp.fixed_layers) > hp.probe_layer, "fixed_layers", f"must all be above probe_layer {hp.probe_layer}")
    need(isinstance(hp.adapter_name, str) and bool(hp.adapter_name.strip()), "adapter_name", "must be a non-empty string")
    if isinstance(hp.device, int):
        need(hp.device >= 0, "device", "must be a CUDA index >= 0 or a device string")
    else:
        try:
            torch.device(hp.device)
        except (RuntimeError, TypeError):
            need(False, "device", "is not a torch device ('cpu', 'cuda', 'cuda:1', 'mps', or an index)")
