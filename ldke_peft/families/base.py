"""The family adapter: one object that knows where things live inside an MLLM and how to feed it.

Everything else in ldke-peft asks a :class:`Family` instead of testing model names: where the
language model's decoder layers are, which module is each layer's MLP output projection (the edit
target), which input positions are image tokens, and how to turn ``(image, prompt, target)`` into
model inputs with a mask over exactly the target tokens.

:class:`Family` itself is the *structural* adapter: every fact is derived from the model and its
processor, never from a name --

* structure (language model, decoder layers, MLP output projections, vision modules, final norm)
  from the module tree (:mod:`~ldke_peft.families.structure`);
* image-token positions from the config's ``image_token_id`` / ``image_token_index`` (also on
  sub-configs);
* inputs from the processor and its chat template; sequence-aligned processor outputs
  (``mm_token_type_ids``, ``token_type_ids``, ...) are recognised by their shape and padded and
  extended over appended target tokens like ``input_ids``;
* the label mask over exactly the appended target tokens.

A model whose language model is a standard decoder therefore works with no family code. Subclasses
exist only for real quirks (each says which), in their own modules of this package.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import InvalidRequestError, UnsupportedModelError
from .inputs import BuiltInputs, cat_zero_padded
from .structure import Structure, derive_structure
from .support import image_token_id_of
from .unwrap import base_model_of

__all__ = ["Family"]


class Family:
    """The structural family adapter; subclasses override class attributes or hooks for quirks.

    Class attributes (overridable by a quirk family):
        name: human-readable family name (defaults to the model type).
        model_types: ``config.model_type`` values this family handles.
        language_model_path / layers_path / final_norm_path / vision_paths / mlp_out: fixed paths that
            replace the derived ones (empty: derive from the model; see :meth:`structure`).
        sequence_keys: processor outputs always treated as aligned with ``input_ids`` (left-padded
            like it, extended over appended target tokens); integer outputs shaped like
            ``input_ids`` are recognised without being listed.
        pad_values / target_fill_values: value of a sequence key at padding / at appended target
            positions (``input_ids`` pads with the tokenizer's pad id; default 0, ``attention_mask`` 1).
        row_keys: per-row (not per-image) outputs, with the value a row without an image gets.
        drop_keys: processor outputs that must not reach ``model(**inputs)`` (e.g. the processor's
            own ``labels``, which would not cover the appended target).
        supports_text_only: whether a row may come without an image.
    """

    name: str = "structural"
    model_types: tuple[str, ...] = ()
    language_model_path: str = ""
    layers_path: str = ""
    mlp_out: str = ""
    vision_paths: tuple[str, ...] = ()
    final_norm_path: str = ""
    #: per-image processor outputs (informational: every output that is neither a sequence key nor a row
    #: key is collated per image, concatenated along dim 0 and zero-padded in the other dims)
    image_keys: tuple[str, ...] = ("pixel_values",)
    sequence_keys: tuple[str, ...] = ("input_ids", "attention_mask")
    pad_values: dict[str, int] = {}
    target_fill_values: dict[str, int] = {"attention_mask": 1}
    row_keys: dict[str, int] = {}
    drop_keys: tuple[str, ...] = ("labels",)
    supports_text_only: bool = True

    def __init__(self, model_type: str | None = None):
        if model_type is not None:
            self.model_types = (model_type,)
            if type(self).name == Family.name:
                self.name = model_type

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_types={self.model_types})"

    # ------------------------------------------------------------------ structure
    def structure(self, model: nn.Module) -> Structure:
        """Where the language model, decoder layers, MLP outputs, vision modules and final norm are
        (``model`` may be wrapped by PEFT). Derived from the module tree; a quirk family's fixed
        paths take precedence."""
        base = base_model_of(model)
        derived = derive_structure(base)
        if not (self.language_model_path or self.layers_path or self.mlp_out or self.vision_paths or self.final_norm_path):
            return derived
        n = len(derived.mlp_out)
        return Structure(
            language_model_path=self.language_model_path or derived.language_model_path,
            layers_path=self.layers_path or derived.layers_path,
            mlp_out=(self.mlp_out,) * n if self.mlp_out else derived.mlp_out,
            vision_paths=self.vision_paths or derived.vision_paths,
            final_norm_path=self.final_norm_path or derived.final_norm_path,
        )

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The language model's decoder layers, in order (``model`` may be wrapped by PEFT)."""
        base = base_model_of(model)
        path = self.structure(base).layers_path
        mod = _get_submodule(base, path)
        if not isinstance(mod, nn.ModuleList):
            raise UnsupportedModelError(f"{self.name}: {path} is not a ModuleList in {type(base).__name__}")
        return mod

    def layers_path_of(self, model: nn.Module) -> str:
        """Dotted path (from the unwrapped root) of the decoder layers' ``ModuleList``."""
        return self.structure(model).layers_path

    def num_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))

    def layer_name(self, model: nn.Module, idx: int) -> str:
        """Full module name of decoder layer ``idx`` (relative to the unwrapped base model)."""
        return f"{self.layers_path_of(model)}.{self._check_index(model, idx)}"

    def mlp_out_name(self, model: nn.Module, idx: int) -> str:
        """Full module name of the MLP output projection of decoder layer ``idx``.

        A full path, never a bare suffix: ``fc2`` / ``mlp.down_proj`` also name modules inside the
        vision towers of BLIP-2, LLaVA, Qwen2.5-VL, ..., so only the full path is unambiguous.
        """
        idx = self._check_index(model, idx)
        st = self.structure(model)
        return f"{st.layers_path}.{idx}.{st.mlp_out[idx]}"

    def mlp_out_names(self, model: nn.Module) -> list[str]:
        return [self.mlp_out_name(model, i) for i in range(self.num_layers(model))]

    def mlp_out_module(self, model: nn.Module, idx: int) -> nn.Module:
        return _get_submodule(base_model_of(model), self.mlp_out_name(model, idx))

    def language_model(self, model: nn.Module) -> nn.Module:
        """The language model (decoder stack) inside the MLLM."""
        return _get_submodule(base_model_of(model), self.structure(model).language_model_path)

    def vision_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules that encode the image (vision tower, projector, Q-Former, ...)."""
        base = base_model_of(model)
        return [_get_submodule(base, p) for p in self.structure(base).vision_paths]

    def hidden_size(self, model: nn.Module) -> int:
        cfg = self.text_config(model)
        return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None) or self.input_embeddings(model).embedding_dim)

    def text_config(self, model: nn.Module) -> Any:
        cfg = base_model_of(model).config
        return getattr(cfg, "text_config", None) or cfg

    def max_positions(self, model: nn.Module) -> int | None:
        cfg = self.text_config(model)
        return getattr(cfg, "max_position_embeddings", None)

    def input_embeddings(self, model: nn.Module) -> nn.Module:
        return base_model_of(model).get_input_embeddings()

    def final_norm(self, model: nn.Module) -> nn.Module:
        path = self.structure(model).final_norm_path
        if not path:
            raise UnsupportedModelError(f"{self.name}: no final norm next to the decoder layers")
        return _get_submodule(base_model_of(model), path)

    def logits_from_hidden(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the hidden states leaving the last decoder layer (final norm + LM head, and
        the config's ``final_logit_softcapping`` where set, as Gemma-style heads do).

        Lets the editor run only the decoder layers it edits on cached hidden states.
        """
        base = base_model_of(model)
        logits = base.get_output_embeddings()(self.final_norm(base)(hidden))
        scale = getattr(self.text_config(base), "logit_scale", None)
        if scale is not None and _forward_scales_logits(type(base)):
            logits = logits * scale  # Cohere-style heads (Aya Vision): as the model's own forward does
        cap = getattr(self.text_config(base), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _check_index(self, model: nn.Module, idx: int) -> int:
        n = self.num_layers(model)
        if not -n <= idx < n:
            raise IndexError(f"{self.name}: decoder layer {idx} out of range; the language model has {n} layers")
        return idx % n

    # ------------------------------------------------------------------ tokens
    def image_token_id(self, model_or_config: Any) -> int | None:
        """The image placeholder id from the config (``image_token_id`` / ``image_token_index``,
        also on sub-configs)."""
        cfg = getattr(base_model_of(model_or_config), "config", model_or_config)
        return image_token_id_of(cfg)

    def image_mask(self, model_or_config: Any, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` bool: which input positions hold image tokens (the positions whose embeddings
        the model replaces by image features; not the text markers around them such as
        ``<|vision_start|>`` or ``<fake_token_around_image>``)."""
        tok = self.image_token_id(model_or_config)
        if tok is None or input_ids is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == tok

    # ------------------------------------------------------------------ inputs
    def image_placeholder(self, processor: Any) -> str:
        return getattr(processor, "image_token", "<image>")

    def format_prompt(self, processor: Any, prompt: str, has_image: bool) -> str:
        """The prompt as the model expects it at generation time (chat template where there is one).

        This is the text handed to the processor, which then expands image placeholders.
        """
        template = getattr(processor, "chat_template", None)
        if template:
            content: list[dict[str, str]] = []
            if has_image:
                content.append({"type": "image"})
            content.append({"type": "text", "text": prompt})
            return processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        return self._plain_prompt(processor, prompt, has_image)

    def _plain_prompt(self, processor: Any, prompt: str, has_image: bool) -> str:
        """Prompt format for processors without a chat template."""
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

    def _text_before_target(self, processor: Any, formatted_prompt: str) -> str:
        """The text the target continues (``formatted_prompt`` plus anything the processor appends)."""
        return formatted_prompt

    def target_ids(self, processor: Any, formatted_prompt: str, target: str) -> list[int]:
        """Token ids of ``target`` as it continues ``formatted_prompt``.

        A target after a non-space character gets one leading space (``"... ASSISTANT:"`` +
        ``" Paris"``); after a newline none (``"<|im_start|>assistant\\n"`` + ``"Paris"``). The ids
        are those of the joint text ``prompt + target`` past the prompt's own ids, so SentencePiece
        tokenizers (which mark word starts) tokenize the target as they would in running text;
        where the prompt's ids are not a prefix of the joint ids, the target is tokenized alone.
        """
        tok = self.tokenizer(processor)
        before = self._text_before_target(processor, formatted_prompt)
        text = target.strip()
        if before and not before[-1].isspace():
            text = " " + text
        alone = list(tok(text, add_special_tokens=False)["input_ids"])
        prefix = list(tok(before, add_special_tokens=False)["input_ids"])
        joint = list(tok(before + text, add_special_tokens=False)["input_ids"])
        if len(joint) > len(prefix) and joint[: len(prefix)] == prefix:
            return joint[len(prefix) :]
        return alone

    def build_inputs(
        self,
        processor: Any,
        images: Sequence[Any | None] | None,
        prompts: Sequence[str],
        targets: Sequence[str] | None = None,
    ) -> BuiltInputs:
        """Turn a batch of ``(image, prompt[, target])`` into model inputs and masks.

        ``images[i]`` may be ``None`` for a text-only row (mixed batches work for every family whose
        :attr:`supports_text_only` is true). Rows are left-padded (generation friendly). With
        ``targets``, the target tokens are appended to each prompt and ``target_mask`` covers
        exactly them; every other sequence-aligned input is extended over them with the family's
        fill value (e.g. PaliGemma's ``token_type_ids`` = 1, the causal suffix).
        """
        from ..requests import load_image

        if isinstance(prompts, str):
            raise InvalidRequestError("prompts must be a sequence of strings, got a single string", field="prompt")
        prompts = list(prompts)
        n = len(prompts)
        if n == 0:
            raise InvalidRequestError("build_inputs needs at least one prompt", field="prompt")
        images = [None] * n if images is None else list(images)
        if len(images) != n:
            raise InvalidRequestError(f"got {len(images)} images for {n} prompts", field="image")
        if targets is not None:
            if isinstance(targets, str):
                raise InvalidRequestError("targets must be a sequence of strings, got a single string", field="target")
            targets = list(targets)
            if len(targets) != n:
                raise InvalidRequestError(f"got {len(targets)} targets for {n} prompts", field="target")
        rows = []
        seq_keys: dict[str, None] = dict.fromkeys(self.sequence_keys)
        for i in range(n):
            if not isinstance(prompts[i], str) or not prompts[i].strip():
                raise InvalidRequestError(f"prompts[{i}] must be a non-empty string, got {prompts[i]!r}", field="prompt")
            img = None if images[i] is None else load_image(images[i], field=f"images[{i}]")
            if img is None and not self.supports_text_only:
                raise InvalidRequestError(
                    f"{self.name} (model_type {', '.join(self.model_types)}) cannot run text-only rows; "
                    f"images[{i}] is None",
                    field="image",
                )
            text = self.format_prompt(processor, prompts[i], img is not None)
            row = {k: v for k, v in self._process_row(processor, text, img).items() if k not in self.drop_keys}
            seq_keys.update(dict.fromkeys(self._sequence_keys_of(row)))
            n_prompt = int(row["input_ids"].shape[-1])
            if targets is not None:
                if not isinstance(targets[i], str) or not targets[i].strip():
                    raise InvalidRequestError(f"targets[{i}] must be a non-empty string, got {targets[i]!r}", field="target")
                t_ids = self.target_ids(processor, text, targets[i])
                if not t_ids:
                    raise InvalidRequestError(f"target {targets[i]!r} tokenizes to nothing", field="target")
                row = self._append_tokens(row, t_ids, tuple(seq_keys))
            rows.append((row, n_prompt))
        built = self._collate(processor, rows, with_targets=targets is not None, sequence_keys=tuple(seq_keys))
        self._finalize_batch(processor, built.inputs)
        return built

    def _sequence_keys_of(self, row: dict[str, Any]) -> list[str]:
        """Processor outputs aligned with ``input_ids``: the declared :attr:`sequence_keys` plus every
        integer/bool tensor of exactly ``input_ids``' shape (``mm_token_type_ids``, ``token_type_ids``,
        ...). Per-image outputs never have that shape: they lead with the image count and their
        other dims are pixels, patches or grid sizes, not the token count."""
        ids = row["input_ids"]
        found = [k for k in self.sequence_keys if k in row]
        for key, value in row.items():
            if (
                key not in found
                and isinstance(value, torch.Tensor)
                and value.shape == ids.shape
                and not value.is_floating_point()
                and key not in self.row_keys
            ):
                found.append(key)
        return found

    def _append_tokens(
        self, row: dict[str, torch.Tensor], t_ids: list[int], sequence_keys: tuple[str, ...] | None = None
    ) -> dict[str, torch.Tensor]:
        t = torch.tensor([t_ids], dtype=row["input_ids"].dtype)
        out = dict(row)
        for key in sequence_keys or self.sequence_keys:
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
        return int(self.target_fill_values.get(key, 0))

    def _pad_value(self, processor: Any, key: str) -> int:
        if key == "input_ids":
            tok = self.tokenizer(processor)
            pad = tok.pad_token_id
            return int(pad if pad is not None else (tok.eos_token_id or 0))
        return int(self.pad_values.get(key, 0))

    def _collate(
        self,
        processor: Any,
        rows: list[tuple[dict[str, torch.Tensor], int]],
        with_targets: bool,
        sequence_keys: tuple[str, ...] | None = None,
    ) -> BuiltInputs:
        sequence_keys = sequence_keys or self.sequence_keys
        lengths = [int(r["input_ids"].shape[-1]) for r, _ in rows]
        T = max(lengths)
        batch: dict[str, Any] = {}
        keys = list(dict.fromkeys(k for r, _ in rows for k in r))
        for key in keys:
            vals = [r.get(key) for r, _ in rows]
            if key in sequence_keys:
                padded = []
                for v, L in zip(vals, lengths):
                    if v is None:  # a row whose processor output lacks this key: all "text"/default
                        v = torch.zeros(1, L, dtype=next(x for x in vals if x is not None).dtype)
                    pad = T - L
                    if pad:
                        fill = self._pad_value(processor, key)
                        v = torch.cat([torch.full(v.shape[:-1] + (pad,), fill, dtype=v.dtype), v], dim=-1)
                    padded.append(v)
                batch[key] = torch.cat(padded, dim=0)
            elif key in self.row_keys:
                ref = next(v for v in vals if v is not None)
                filled = [v if v is not None else torch.full_like(ref[:1], self.row_keys[key]) for v in vals]
                batch[key] = torch.cat(filled, dim=0)
            else:
                present = [v for v in vals if isinstance(v, torch.Tensor)]
                if present:
                    batch[key] = cat_zero_padded(present)
        prompt_mask = torch.zeros(len(rows), T, dtype=torch.bool)
        target_mask = torch.zeros(len(rows), T, dtype=torch.bool) if with_targets else None
        for i, ((_, n_prompt), L) in enumerate(zip(rows, lengths)):
            start = T - L
            prompt_mask[i, start : start + n_prompt] = True
            if target_mask is not None:
                target_mask[i, start + n_prompt :] = True
        if "attention_mask" not in batch:
            batch["attention_mask"] = (prompt_mask | (target_mask if target_mask is not None else prompt_mask)).long()
        return BuiltInputs(
            inputs=batch, prompt_mask=prompt_mask, target_mask=target_mask,
            sequence_keys=tuple(k for k in sequence_keys if k in batch),
        )

    def _finalize_batch(self, processor: Any, inputs: dict[str, Any]) -> None:
        """Last family-specific touch on the collated inputs (in place)."""


@functools.lru_cache(maxsize=None)
def _forward_scales_logits(cls: type) -> bool:
    """Whether ``cls.forward`` multiplies its logits by the config's ``logit_scale``. Read from the class's
    own code because transformers releases differ: Aya Vision's forward ignored the scale its Cohere 2
    text config carries up to 5.24 and applies it from 5.25; Cohere's causal LMs always did."""
    try:
        return "logit_scale" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True


def _get_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no module {path!r}; is this the model the config says "
            f"({getattr(getattr(model, 'config', None), 'model_type', '?')})?"
        ) from None
