"""Model families: the one module that knows where things live inside each supported MLLM.

Everything else in ldke-peft asks a :class:`Family` instead of testing model names: where the
language model's decoder layers are, which module is each layer's MLP output projection (the edit
target), which input positions are image tokens, and how to turn ``(image, prompt, target)`` into
model inputs with a mask over exactly the target tokens.

Families are detected from ``model.config.model_type`` only (never from a path or a class name), so a
model saved under any directory name is handled the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .errors import UnsupportedModelError

__all__ = [
    "BuiltInputs",
    "Family",
    "family_of",
    "get_family",
    "register_family",
    "supported_model_types",
]


@dataclass
class BuiltInputs:
    """Model inputs for a batch plus the masks the editor and metrics need.

    Attributes:
        inputs: keyword arguments for ``model(**inputs)`` / ``model.generate(**inputs)``.
        target_mask: ``(B, T)`` bool, True exactly at the positions holding target tokens (``None``
            when no targets were given). Position ``t`` is predicted by the logits at ``t - 1``.
        prompt_mask: ``(B, T)`` bool, True at prompt positions (not padding, not target). The router
            pools its textual features over these positions only.
    """

    inputs: dict[str, Any]
    prompt_mask: torch.Tensor
    target_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "BuiltInputs":
        moved = {}
        for k, v in self.inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device)
                if dtype is not None and v.is_floating_point():
                    v = v.to(dtype)
            moved[k] = v
        return BuiltInputs(
            inputs=moved,
            prompt_mask=self.prompt_mask.to(device),
            target_mask=None if self.target_mask is None else self.target_mask.to(device),
        )

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    @property
    def labels(self) -> torch.Tensor:
        """``input_ids`` with every non-target position set to -100 (HF label convention)."""
        if self.target_mask is None:
            raise ValueError("labels need targets; build the inputs with targets=...")
        return torch.where(self.target_mask, self.input_ids, torch.full_like(self.input_ids, -100))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class Family:
    """Knowledge about one model family. Subclasses override the class attributes and, where the
    family needs it, :meth:`_process_row` / :meth:`_collate_extra`.

    Class attributes:
        name: human-readable family name.
        model_types: ``config.model_type`` values this family handles.
        layers_path: dotted path from the root model to the language model's decoder ``ModuleList``.
        mlp_out: dotted path inside one decoder layer to the MLP output projection (edit target).
        image_token_attr: attribute of ``model.config`` holding the image placeholder token id.
    """

    name: str = "base"
    model_types: tuple[str, ...] = ()
    layers_path: str = ""
    mlp_out: str = "mlp.down_proj"
    image_token_attr: str = "image_token_id"
    #: keys of processor outputs that are per-image (concatenated along dim 0 when collating rows)
    image_keys: tuple[str, ...] = ("pixel_values",)
    #: keys of processor outputs aligned with ``input_ids`` (padded like it)
    sequence_keys: tuple[str, ...] = ("input_ids", "attention_mask")

    # ------------------------------------------------------------------ structure
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The language model's decoder layers, in order."""
        mod = _get_submodule(model, self.layers_path)
        if not isinstance(mod, nn.ModuleList):
            raise UnsupportedModelError(f"{self.name}: {self.layers_path} is not a ModuleList in {type(model).__name__}")
        return mod

    def num_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))

    def layer_name(self, model: nn.Module, idx: int) -> str:
        """Full module name of decoder layer ``idx`` (relative to the root model)."""
        return f"{self.layers_path}.{idx}"

    def mlp_out_name(self, model: nn.Module, idx: int) -> str:
        """Full module name of the MLP output projection of decoder layer ``idx``."""
        return f"{self.layers_path}.{idx}.{self.mlp_out}"

    def mlp_out_names(self, model: nn.Module) -> list[str]:
        return [self.mlp_out_name(model, i) for i in range(self.num_layers(model))]

    def mlp_out_module(self, model: nn.Module, idx: int) -> nn.Module:
        return _get_submodule(model, self.mlp_out_name(model, idx))

    def hidden_size(self, model: nn.Module) -> int:
        cfg = self.text_config(model)
        return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model"))

    def text_config(self, model: nn.Module) -> Any:
        cfg = model.config
        return getattr(cfg, "text_config", None) or cfg

    def max_positions(self, model: nn.Module) -> int | None:
        cfg = self.text_config(model)
        return getattr(cfg, "max_position_embeddings", None)

    def input_embeddings(self, model: nn.Module) -> nn.Module:
        return model.get_input_embeddings()

    # ------------------------------------------------------------------ tokens
    def image_token_id(self, model_or_config: Any) -> int | None:
        cfg = getattr(model_or_config, "config", model_or_config)
        tok = getattr(cfg, self.image_token_attr, None)
        if tok is None:
            tok = getattr(cfg, "image_token_index", None)
        return None if tok is None else int(tok)

    def image_mask(self, model_or_config: Any, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` bool: which input positions hold image tokens."""
        tok = self.image_token_id(model_or_config)
        if tok is None or input_ids is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == tok

    # ------------------------------------------------------------------ inputs
    def image_placeholder(self, processor: Any) -> str:
        return getattr(processor, "image_token", "<image>")

    def format_prompt(self, processor: Any, prompt: str, has_image: bool) -> str:
        """The prompt as the model expects it at generation time (chat template where there is one)."""
        template = getattr(processor, "chat_template", None)
        if template:
            content: list[dict[str, str]] = []
            if has_image:
                content.append({"type": "image"})
            content.append({"type": "text", "text": prompt})
            return processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        text = prompt
        if has_image:
            text = f"{self.image_placeholder(processor)}\n{prompt}"
        return f"USER: {text} ASSISTANT:"

    def tokenizer(self, processor: Any) -> Any:
        return getattr(processor, "tokenizer", processor)

    def _process_row(self, processor: Any, text: str, image: Any | None) -> dict[str, torch.Tensor]:
        """Run the processor on one (text, image) row; returns tensors with a leading batch dim of 1."""
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
        if image is not None:
            kwargs["images"] = [image]
        out = processor(**kwargs)
        return dict(out)

    def target_ids(self, processor: Any, formatted_prompt: str, target: str) -> list[int]:
        """Token ids of ``target`` as it continues ``formatted_prompt``."""
        tok = self.tokenizer(processor)
        text = target.strip()
        if not formatted_prompt[-1:].isspace():
            text = " " + text
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def build_inputs(
        self,
        processor: Any,
        images: Sequence[Any | None] | None,
        prompts: Sequence[str],
        targets: Sequence[str] | None = None,
    ) -> BuiltInputs:
        """Turn a batch of ``(image, prompt[, target])`` into model inputs and masks.

        ``images[i]`` may be ``None`` for a text-only row. Rows are left-padded (generation friendly).
        With ``targets``, the target tokens are appended to each prompt and ``target_mask`` covers
        exactly them.
        """
        from .requests import load_image

        prompts = list(prompts)
        n = len(prompts)
        if images is None:
            images = [None] * n
        images = list(images)
        if len(images) != n or (targets is not None and len(targets) != n):
            raise ValueError("images, prompts and targets must have the same length")
        rows = []
        for i in range(n):
            img = None if images[i] is None else load_image(images[i], field=f"images[{i}]")
            text = self.format_prompt(processor, prompts[i], img is not None)
            row = self._process_row(processor, text, img)
            ids = row["input_ids"][0]
            n_prompt = int(ids.shape[0])
            if targets is not None:
                t_ids = self.target_ids(processor, text, targets[i])
                if not t_ids:
                    from .errors import InvalidRequestError

                    raise InvalidRequestError(f"target {targets[i]!r} tokenizes to nothing", field="target")
                row = self._append_tokens(row, t_ids)
            rows.append((row, n_prompt))
        return self._collate(processor, rows, with_targets=targets is not None)

    def _append_tokens(self, row: dict[str, torch.Tensor], t_ids: list[int]) -> dict[str, torch.Tensor]:
        t = torch.tensor([t_ids], dtype=row["input_ids"].dtype)
        out = dict(row)
        for key in self.sequence_keys:
            if key not in row:
                continue
            if key == "input_ids":
                out[key] = torch.cat([row[key], t], dim=-1)
            else:
                fill = self._target_fill_value(key)
                ext = torch.full(row[key].shape[:-1] + (len(t_ids),), fill, dtype=row[key].dtype)
                out[key] = torch.cat([row[key], ext], dim=-1)
        return out

    def _target_fill_value(self, key: str) -> int:
        """Value of a sequence-aligned input at appended target positions."""
        if key == "attention_mask":
            return 1
        return 0

    def _pad_value(self, processor: Any, key: str) -> int:
        if key == "input_ids":
            tok = self.tokenizer(processor)
            pad = tok.pad_token_id
            return int(pad if pad is not None else (tok.eos_token_id or 0))
        return 0

    def _collate(self, processor: Any, rows: list[tuple[dict[str, torch.Tensor], int]], with_targets: bool) -> BuiltInputs:
        lengths = [int(r["input_ids"].shape[-1]) for r, _ in rows]
        T = max(lengths)
        batch: dict[str, Any] = {}
        keys = set().union(*(r.keys() for r, _ in rows))
        for key in sorted(keys):
            vals = [r.get(key) for r, _ in rows]
            if key in self.sequence_keys:
                padded = []
                for v, L in zip(vals, lengths):
                    pad = T - L
                    if pad:
                        fill = self._pad_value(processor, key)
                        v = torch.cat([torch.full(v.shape[:-1] + (pad,), fill, dtype=v.dtype), v], dim=-1)
                    padded.append(v)
                batch[key] = torch.cat(padded, dim=0)
            else:
                present = [v for v in vals if v is not None]
                if present and isinstance(present[0], torch.Tensor):
                    batch[key] = torch.cat(present, dim=0)
        prompt_mask = torch.zeros(len(rows), T, dtype=torch.bool)
        target_mask = torch.zeros(len(rows), T, dtype=torch.bool) if with_targets else None
        for i, ((_, n_prompt), L) in enumerate(zip(rows, lengths)):
            start = T - L
            prompt_mask[i, start : start + n_prompt] = True
            if target_mask is not None:
                target_mask[i, start + n_prompt :] = True
        if "attention_mask" not in batch:
            batch["attention_mask"] = (prompt_mask | (target_mask if target_mask is not None else prompt_mask)).long()
        return BuiltInputs(inputs=batch, prompt_mask=prompt_mask, target_mask=target_mask)


# ---------------------------------------------------------------------- families


class LlavaFamily(Family):
    """LLaVA 1.5 style: CLIP tower + projector, image placeholder tokens expanded in ``input_ids``."""

    name = "LLaVA"
    model_types = ("llava",)
    layers_path = "model.language_model.layers"
    mlp_out = "mlp.down_proj"


# ---------------------------------------------------------------------- registry

_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Register (or replace) a family for each of its ``model_types``. Returns the family."""
    for mt in family.model_types:
        _REGISTRY[mt] = family
    return family


for _fam in (LlavaFamily(),):
    register_family(_fam)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_family(model_type: str) -> Family:
    """The family for a ``config.model_type`` string; :class:`UnsupportedModelError` if unknown."""
    fam = _REGISTRY.get(model_type)
    if fam is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by ldke-peft; supported model types: "
            + ", ".join(supported_model_types())
        )
    return fam


def family_of(model: Any) -> Family:
    """The family of a model (or a PeftModel wrapping one), detected from ``config.model_type``."""
    base = model
    # unwrap PeftModel / LDKEModel without importing peft here
    for _ in range(3):
        inner = getattr(base, "base_model", None)
        if inner is None or inner is base:
            break
        if hasattr(inner, "model") and hasattr(inner.model, "config"):
            base = inner.model
        else:
            base = inner
    cfg = getattr(base, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no config.model_type; cannot detect its family")
    return get_family(model_type)


def _get_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no module {path!r}; is this the model the config says "
            f"({getattr(getattr(model, 'config', None), 'model_type', '?')})?"
        ) from None


# ---------------------------------------------------------------------- processors

_IMAGE_ONLY_CLASSES: dict[type, type] = {}


def image_only_processor(processor_cls: type, **components: Any) -> Any:
    """Build a real ``processor_cls`` (e.g. ``Qwen2VLProcessor``) without its video processor.

    Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision processors declare a ``video_processor`` whose every
    implementation needs torchvision, and ``ProcessorMixin`` refuses ``video_processor=None`` (its
    type check itself imports the video-processor registry). Image editing never touches video, so
    we subclass the processor with an ``__init__`` whose signature lacks ``video_processor``:
    ``ProcessorMixin`` derives a processor's sub-components from that signature, so the subclass
    holds only an image processor and a tokenizer. Everything else -- placeholder expansion,
    ``mm_token_type_ids``, chat templates -- is the real class's code, unchanged. The subclass keeps
    the original class name, so a processor saved from it loads as the full processor wherever
    torchvision is installed.
    """
    sub = _IMAGE_ONLY_CLASSES.get(processor_cls)
    if sub is None:

        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            processor_cls.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None, **kwargs)

        sub = type(processor_cls.__name__, (processor_cls,), {"__init__": __init__, "__module__": processor_cls.__module__})
        _IMAGE_ONLY_CLASSES[processor_cls] = sub
    return sub(**components)
