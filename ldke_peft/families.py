"""Model families: the one module that knows where things live inside each supported MLLM.

Everything else in ldke-peft asks a :class:`Family` instead of testing model names: where the
language model's decoder layers are, which module is each layer's MLP output projection (the edit
target), which input positions are image tokens, and how to turn ``(image, prompt, target)`` into
model inputs with a mask over exactly the target tokens.

Families are detected from ``model.config.model_type`` only (never from a path or a class name), so a
model saved under any directory name is handled the same way.

Supported (``model_type``: decoder layers / MLP output projection, transformers 5.x paths):

* ``llava`` (LLaVA): ``model.language_model.layers`` / ``mlp.down_proj``
* ``llava_onevision`` (LLaVA-OneVision): ``model.language_model.layers`` / ``mlp.down_proj``
* ``qwen2_vl`` (Qwen2-VL), ``qwen2_5_vl`` (Qwen2.5-VL): ``model.language_model.layers`` / ``mlp.down_proj``
* ``blip-2`` (BLIP-2 with OPT): ``language_model.model.decoder.layers`` / ``fc2``
* ``idefics3`` (Idefics3, SmolVLM): ``model.text_model.layers`` / ``mlp.down_proj``
* ``paligemma`` (PaliGemma): ``model.language_model.layers`` / ``mlp.down_proj``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .errors import InvalidRequestError, UnsupportedModelError

__all__ = [
    "BuiltInputs",
    "Family",
    "base_model_of",
    "family_of",
    "get_family",
    "image_only_processor",
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
    family needs it, :meth:`format_prompt`, :meth:`_process_row` or :meth:`_finalize_batch`.

    Class attributes:
        name: human-readable family name.
        model_types: ``config.model_type`` values this family handles.
        language_model_path: dotted path from the root model to the language model (the module whose
            decoder layers LDKE edits).
        layers_path: dotted path from the root model to the language model's decoder ``ModuleList``.
        mlp_out: dotted path inside one decoder layer to the MLP output projection (edit target).
        vision_paths: dotted paths of the vision tower, projector, Q-Former, ...: everything that
            encodes the image. Edit targets must never lie inside one of these.
        image_token_attr: attribute of ``model.config`` holding the image placeholder token id.
        sequence_keys: processor outputs aligned with ``input_ids`` (left-padded like it, extended
            over appended target tokens).
        pad_values / target_fill_values: value of a sequence key at padding / at appended target
            positions (``input_ids`` pads with the tokenizer's pad id).
        row_keys: per-row (not per-image) outputs, with the value a row without an image gets.
        drop_keys: processor outputs that must not reach ``model(**inputs)`` (e.g. the processor's
            own ``labels``, which would not cover the appended target).
        supports_text_only: whether a row may come without an image.
    """

    name: str = "base"
    model_types: tuple[str, ...] = ()
    language_model_path: str = ""
    layers_path: str = ""
    mlp_out: str = "mlp.down_proj"
    vision_paths: tuple[str, ...] = ()
    image_token_attr: str = "image_token_id"
    #: per-image processor outputs (informational: every output that is neither a sequence key nor a row
    #: key is collated per image, concatenated along dim 0 and zero-padded in the other dims)
    image_keys: tuple[str, ...] = ("pixel_values",)
    sequence_keys: tuple[str, ...] = ("input_ids", "attention_mask")
    pad_values: dict[str, int] = {}
    target_fill_values: dict[str, int] = {"attention_mask": 1}
    row_keys: dict[str, int] = {}
    drop_keys: tuple[str, ...] = ("labels",)
    supports_text_only: bool = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_types={self.model_types})"

    # ------------------------------------------------------------------ structure
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The language model's decoder layers, in order (``model`` may be wrapped by PEFT)."""
        base = base_model_of(model)
        mod = _get_submodule(base, self.layers_path)
        if not isinstance(mod, nn.ModuleList):
            raise UnsupportedModelError(f"{self.name}: {self.layers_path} is not a ModuleList in {type(base).__name__}")
        return mod

    def num_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))

    def layer_name(self, model: nn.Module, idx: int) -> str:
        """Full module name of decoder layer ``idx`` (relative to the unwrapped base model)."""
        return f"{self.layers_path}.{self._check_index(model, idx)}"

    def mlp_out_name(self, model: nn.Module, idx: int) -> str:
        """Full module name of the MLP output projection of decoder layer ``idx``.

        A full path, never a bare suffix: ``fc2`` / ``mlp.down_proj`` also name modules inside the
        vision towers of BLIP-2, LLaVA, Qwen2.5-VL, ..., so only the full path is unambiguous.
        """
        return f"{self.layers_path}.{self._check_index(model, idx)}.{self.mlp_out}"

    def mlp_out_names(self, model: nn.Module) -> list[str]:
        return [self.mlp_out_name(model, i) for i in range(self.num_layers(model))]

    def mlp_out_module(self, model: nn.Module, idx: int) -> nn.Module:
        return _get_submodule(base_model_of(model), self.mlp_out_name(model, idx))

    def language_model(self, model: nn.Module) -> nn.Module:
        """The language model (decoder stack) inside the MLLM."""
        return _get_submodule(base_model_of(model), self.language_model_path)

    def vision_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules that encode the image (vision tower, projector, Q-Former, ...)."""
        base = base_model_of(model)
        return [_get_submodule(base, p) for p in self.vision_paths]

    def hidden_size(self, model: nn.Module) -> int:
        cfg = self.text_config(model)
        return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model"))

    def text_config(self, model: nn.Module) -> Any:
        cfg = base_model_of(model).config
        return getattr(cfg, "text_config", None) or cfg

    def max_positions(self, model: nn.Module) -> int | None:
        cfg = self.text_config(model)
        return getattr(cfg, "max_position_embeddings", None)

    def input_embeddings(self, model: nn.Module) -> nn.Module:
        return base_model_of(model).get_input_embeddings()

    #: dotted path of the norm applied after the last decoder layer (default: ``<language_model>.norm``)
    final_norm_path: str = ""

    def final_norm(self, model: nn.Module) -> nn.Module:
        path = self.final_norm_path or f"{self.language_model_path}.norm"
        return _get_submodule(base_model_of(model), path)

    def logits_from_hidden(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the hidden states leaving the last decoder layer (final norm + LM head).

        Lets the editor run only the decoder layers it edits on cached hidden states.
        """
        base = base_model_of(model)
        return base.get_output_embeddings()(self.final_norm(base)(hidden))

    def _check_index(self, model: nn.Module, idx: int) -> int:
        n = self.num_layers(model)
        if not -n <= idx < n:
            raise IndexError(f"{self.name}: decoder layer {idx} out of range; the language model has {n} layers")
        return idx % n

    # ------------------------------------------------------------------ tokens
    def image_token_id(self, model_or_config: Any) -> int | None:
        cfg = getattr(base_model_of(model_or_config), "config", model_or_config)
        tok = getattr(cfg, self.image_token_attr, None)
        if tok is None:
            tok = getattr(cfg, "image_token_index", None)
        return None if tok is None else int(tok)

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
        from .requests import load_image

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
            n_prompt = int(row["input_ids"].shape[-1])
            if targets is not None:
                if not isinstance(targets[i], str) or not targets[i].strip():
                    raise InvalidRequestError(f"targets[{i}] must be a non-empty string, got {targets[i]!r}", field="target")
                t_ids = self.target_ids(processor, text, targets[i])
                if not t_ids:
                    raise InvalidRequestError(f"target {targets[i]!r} tokenizes to nothing", field="target")
                row = self._append_tokens(row, t_ids)
            rows.append((row, n_prompt))
        built = self._collate(processor, rows, with_targets=targets is not None)
        self._finalize_batch(processor, built.inputs)
        return built

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
        return int(self.target_fill_values.get(key, 0))

    def _pad_value(self, processor: Any, key: str) -> int:
        if key == "input_ids":
            tok = self.tokenizer(processor)
            pad = tok.pad_token_id
            return int(pad if pad is not None else (tok.eos_token_id or 0))
        return int(self.pad_values.get(key, 0))

    def _collate(self, processor: Any, rows: list[tuple[dict[str, torch.Tensor], int]], with_targets: bool) -> BuiltInputs:
        lengths = [int(r["input_ids"].shape[-1]) for r, _ in rows]
        T = max(lengths)
        batch: dict[str, Any] = {}
        keys = list(dict.fromkeys(k for r, _ in rows for k in r))
        for key in keys:
            vals = [r.get(key) for r, _ in rows]
            if key in self.sequence_keys:
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
                    batch[key] = _cat_zero_padded(present)
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

    def _finalize_batch(self, processor: Any, inputs: dict[str, Any]) -> None:
        """Last family-specific touch on the collated inputs (in place)."""


def _cat_zero_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding every other dim at its end to the largest size.

    This is how the processors themselves batch variable-size image inputs: LLaVA-OneVision pads
    the patch dim of ``pixel_values``; Idefics3 pads the image count and the pixel dims (with a
    zero ``pixel_attention_mask``); the models drop all-zero padding images / patches.
    """
    if len(tensors) == 1:
        return tensors[0]
    shapes = [t.shape for t in tensors]
    if any(len(s) != len(shapes[0]) for s in shapes):
        raise ValueError(f"cannot collate tensors of ranks {[len(s) for s in shapes]}")
    target = [max(s[d] for s in shapes) for d in range(1, len(shapes[0]))]
    out = []
    for t in tensors:
        pad: list[int] = []
        for d in reversed(range(1, t.dim())):
            pad += [0, target[d - 1] - t.shape[d]]
        out.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(out, dim=0)


# ---------------------------------------------------------------------- families


class LlavaFamily(Family):
    """LLaVA 1.5 style: CLIP tower + projector, image placeholder tokens expanded in ``input_ids``."""

    name = "LLaVA"
    model_types = ("llava",)
    language_model_path = "model.language_model"
    layers_path = "model.language_model.layers"
    mlp_out = "mlp.down_proj"
    vision_paths = ("model.vision_tower", "model.multi_modal_projector")


class LlavaOnevisionFamily(Family):
    """LLaVA-OneVision: SigLIP tower + AnyRes patches, Qwen2 language model.

    ``pixel_values`` is ``(images, patches, 3, H, W)`` with a per-image patch count (from
    ``image_sizes``), so rows are zero-padded along the patch dim like the processor does.
    ``batch_num_images`` counts images per *row* (0 for a text-only row).
    """

    name = "LLaVA-OneVision"
    model_types = ("llava_onevision",)
    language_model_path = "model.language_model"
    layers_path = "model.language_model.layers"
    vision_paths = ("model.vision_tower", "model.multi_modal_projector")
    image_keys = ("pixel_values", "image_sizes")
    row_keys = {"batch_num_images": 0}


class Qwen2VLFamily(Family):
    """Qwen2-VL: native-resolution ViT (``model.visual``) + Qwen2 LM with multimodal RoPE.

    The processor expands ``<|image_pad|>`` to ``grid_t*grid_h*grid_w / merge_size**2`` tokens and
    returns ``mm_token_type_ids`` (1 on image tokens), which the model needs, with
    ``image_grid_thw``, to compute M-RoPE positions; it is 0 on padding and on target tokens.
    ``pixel_values`` is a flat ``(patches, C*T*P*P)`` per image, concatenated over images.
    """

    name = "Qwen2-VL"
    model_types = ("qwen2_vl",)
    language_model_path = "model.language_model"
    layers_path = "model.language_model.layers"
    vision_paths = ("model.visual",)
    image_keys = ("pixel_values", "image_grid_thw")
    sequence_keys = ("input_ids", "attention_mask", "mm_token_type_ids")


class Qwen2_5_VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL: as Qwen2-VL; its vision blocks also have ``mlp.down_proj`` (full paths matter)."""

    name = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)


class Blip2Family(Family):
    """BLIP-2 with a decoder-only LM (OPT): ViT + Q-Former, ``num_query_tokens`` image tokens.

    The OPT decoder's MLP output is ``fc2`` -- and so is the ViT's, hence full paths. There is no
    chat template; prompts follow BLIP-2's VQA format ``"Question: {prompt} Answer:"``, and the
    processor prepends the image tokens. ``Blip2ForConditionalGeneration`` always encodes
    ``pixel_values``, but it only writes the Q-Former output into ``<image>`` positions; so a batch
    with no image at all gets one placeholder (black) image that no token receives, which leaves
    text-only rows exactly the plain OPT forward.
    """

    name = "BLIP-2"
    model_types = ("blip-2",)
    language_model_path = "language_model"
    layers_path = "language_model.model.decoder.layers"
    final_norm_path = "language_model.model.decoder.final_layer_norm"
    mlp_out = "fc2"
    vision_paths = ("vision_model", "qformer", "language_projection")
    final_norm_path = "language_model.model.decoder.final_layer_norm"

    def _plain_prompt(self, processor: Any, prompt: str, has_image: bool) -> str:
        return f"Question: {prompt} Answer:"

    def _finalize_batch(self, processor: Any, inputs: dict[str, Any]) -> None:
        if "pixel_values" not in inputs:
            from PIL import Image

            size = _image_size(processor.image_processor)
            pv = processor.image_processor(images=[Image.new("RGB", size)], return_tensors="pt")["pixel_values"]
            inputs["pixel_values"] = pv


class Idefics3Family(Family):
    """Idefics3 / SmolVLM (model_type ``idefics3``): SigLIP tower + pixel-shuffle connector, Llama LM.

    Each image becomes ``<fake_token_around_image><global-img>`` + ``image_seq_len`` ``<image>``
    tokens + ``<fake_token_around_image>`` (more with image splitting); only the ``<image>`` tokens
    are image positions. ``pixel_values`` is ``(rows, images, 3, H, W)``; rows are zero-padded in
    the image/pixel dims (the model drops all-zero padding images).
    """

    name = "Idefics3"
    model_types = ("idefics3",)
    language_model_path = "model.text_model"
    layers_path = "model.text_model.layers"
    vision_paths = ("model.vision_model", "model.connector")
    image_keys = ("pixel_values", "pixel_attention_mask")


class PaliGemmaFamily(Family):
    """PaliGemma: SigLIP tower + linear projector, Gemma LM with a bidirectional prefix.

    The prompt is ``<image>*N <bos> prompt \\n`` (the processor adds ``<bos>`` and ``\\n``); the
    answer ("suffix") follows. ``token_type_ids`` is 0 on the prefix (attended bidirectionally)
    and 1 on the suffix, so appended target tokens get 1. There is no chat template. The
    processor refuses rows without an image, so a text-only row is tokenized as the processor
    would without the image tokens: ``<bos> prompt \\n``, ``token_type_ids`` 0.
    """

    name = "PaliGemma"
    model_types = ("paligemma",)
    language_model_path = "model.language_model"
    layers_path = "model.language_model.layers"
    vision_paths = ("model.vision_tower", "model.multi_modal_projector")
    sequence_keys = ("input_ids", "attention_mask", "token_type_ids")
    target_fill_values = {"attention_mask": 1, "token_type_ids": 1}

    def _plain_prompt(self, processor: Any, prompt: str, has_image: bool) -> str:
        return f"{self.image_placeholder(processor)}{prompt}" if has_image else prompt

    def _text_before_target(self, processor: Any, formatted_prompt: str) -> str:
        return formatted_prompt + "\n"

    def _process_row(self, processor: Any, text: str, image: Any | None) -> dict[str, torch.Tensor]:
        if image is not None:
            return super()._process_row(processor, text, image)
        tok = self.tokenizer(processor)
        enc = tok([f"{tok.bos_token}{text}\n"], add_special_tokens=False, return_tensors="pt")
        ids = enc["input_ids"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


# ---------------------------------------------------------------------- registry

_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Register (or replace) a family for each of its ``model_types``. Returns the family."""
    for mt in family.model_types:
        _REGISTRY[mt] = family
    return family


for _fam in (
    LlavaFamily(),
    LlavaOnevisionFamily(),
    Qwen2VLFamily(),
    Qwen2_5_VLFamily(),
    Blip2Family(),
    Idefics3Family(),
    PaliGemmaFamily(),
):
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


def base_model_of(model: Any) -> Any:
    """The transformers model inside a ``PeftModel`` / LDKE / other PEFT tuner wrapper (or ``model``).

    Only PEFT wrappers are unwrapped: a transformers model's own ``base_model`` property (e.g.
    ``LlavaForConditionalGeneration.base_model`` -> ``LlavaModel``) must not be followed.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    base = model
    for _ in range(4):
        if isinstance(base, PeftModel):
            base = base.base_model
        elif isinstance(base, BaseTuner):
            base = base.model
        else:
            break
    return base


def family_of(model: Any) -> Family:
    """The family of a model (or a PeftModel wrapping one), detected from ``config.model_type``."""
    base = base_model_of(model)
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


def _image_size(image_processor: Any) -> tuple[int, int]:
    """``(width, height)`` of the images an image processor produces (for placeholder images)."""
    size = getattr(image_processor, "size", None) or {}
    size = dict(size) if not isinstance(size, dict) else size
    h = size.get("height") or size.get("shortest_edge") or size.get("longest_edge") or 224
    w = size.get("width") or h
    return int(w), int(h)


# ---------------------------------------------------------------------- processors

_IMAGE_ONLY_CLASSES: dict[type, type] = {}


def image_only_processor(processor_cls: type, **components: Any) -> Any:
    """Build a real ``processor_cls`` (e.g. ``Qwen2VLProcessor``) without its video processor.

    Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision processors declare a ``video_processor`` whose every
    implementation needs torchvision, and ``ProcessorMixin`` refuses ``video_processor=None`` (its
    type check itself imports the video-processor registry, which needs torchvision). Image
    editing never touches video, so we subclass the processor with an ``__init__`` whose signature
    lacks ``video_processor``: ``ProcessorMixin`` derives a processor's sub-components from that
    signature, so the subclass holds only an image processor and a tokenizer. Everything else --
    placeholder expansion, ``mm_token_type_ids``, chat templates -- is the real class's code,
    unchanged. The subclass keeps the original class name, so a processor saved from it loads as
    the full processor wherever torchvision is installed.
    """
    sub = _IMAGE_ONLY_CLASSES.get(processor_cls)
    if sub is None:
        sub = type(
            processor_cls.__name__,
            (processor_cls,),
            {
                "__init__": _init_without_video(processor_cls),
                "__module__": processor_cls.__module__,
                "__doc__": image_only_processor.__doc__,
            },
        )
        _IMAGE_ONLY_CLASSES[processor_cls] = sub
    return sub(**components)


_UNSET: Any = object()


def _init_without_video(processor_cls: type) -> Any:
    """``processor_cls.__init__`` minus its ``video_processor`` parameter.

    ``ProcessorMixin`` reads a processor's sub-components from ``__init__``'s signature and
    ``from_pretrained`` passes only the arguments ``__init__``'s *code object* names
    (``chat_template``, ``num_image_tokens``, ...), so a bare ``**kwargs`` would drop them on reload.
    The wrapper names every non-video parameter of the video-capable processors we support
    explicitly and forwards only those the caller set; it refuses classes with parameters it does
    not know (no code is generated at run time)."""
    import inspect

    base_init = processor_cls.__init__
    params = [n for n in inspect.signature(base_init).parameters if n not in ("self", "video_processor", "kwargs")]
    unknown = set(params) - set(_KNOWN_PROCESSOR_PARAMS)
    if unknown:
        raise TypeError(f"{processor_cls.__name__}.__init__ has parameters image_only_processor cannot forward: {sorted(unknown)}")

    def __init__(
        self,
        image_processor=_UNSET,
        tokenizer=_UNSET,
        num_image_tokens=_UNSET,
        vision_feature_select_strategy=_UNSET,
        chat_template=_UNSET,
        image_token=_UNSET,
        video_token=_UNSET,
        vision_aspect_ratio=_UNSET,
        **kwargs: Any,
    ) -> None:
        given = {k: v for k, v in locals().items() if k in params and v is not _UNSET}
        base_init(self, video_processor=None, **given, **kwargs)

    return __init__


_KNOWN_PROCESSOR_PARAMS = (
    "image_processor",
    "tokenizer",
    "num_image_tokens",
    "vision_feature_select_strategy",
    "chat_template",
    "image_token",
    "video_token",
    "vision_aspect_ratio",
)
