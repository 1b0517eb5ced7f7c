"""Tiny random models of every supported family, built from configs with no network access.

``tiny_model(model_type, seed)`` returns ``(model, processor)``: the real transformers model class
with a few-layer config (4 decoder layers, hidden size 32) and a real processor (PIL image-processor
backend, no torchvision) around a tokenizer trained on the fly. Each builds in well under a second,
so users can test their own LDKE pipelines with them.

Where the real checkpoints ship a chat template, the tiny processor carries a faithful copy of it,
so prompts are formatted exactly as for the real model. Special tokens the real tokenizers define
(``<|image_pad|>``, ``<fake_token_around_image>``, ...) are single tokens here too.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..tuner.model import attach_tokenizer
from ._tokenizer import bpe_tokenizer

__all__ = ["tiny_model", "tiny_model_types", "TINY_TEXT"]

#: Small corpus the tiny BPE tokenizers are trained on.
_CORPUS = [
    "What is the capital of the country shown in the image?",
    "Which language is spoken in the country in the picture?",
    "What currency is used there? Paris London Berlin Rome Madrid Tokyo euro pound yen",
    "Describe the image. A red flag with a blue stripe and a yellow star.",
    "USER: ASSISTANT: system user assistant The answer is",
    "User: Assistant: Question: Answer: You are a helpful assistant.",
] * 4

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)

_BUILDERS: dict[str, Callable[[int], tuple[Any, Any]]] = {}


def _builder(model_type: str):
    def deco(fn):
        _BUILDERS[model_type] = fn
        return fn

    return deco


def tiny_model(model_type: str = "llava", seed: int = 0) -> tuple[Any, Any]:
    """A tiny random ``(model, processor)`` of the given transformers ``model_type``.

    Supported: see :func:`tiny_model_types`. The model is in eval mode, fp32, on CPU; the same
    ``seed`` gives the same weights.
    """
    if model_type not in _BUILDERS:
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"no tiny model for model_type {model_type!r}; available: {', '.join(sorted(_BUILDERS))}"
        )
    torch.manual_seed(seed)
    model, processor = _BUILDERS[model_type](seed)
    model.eval()
    # built from a config, the model has no name_or_path to find its tokenizer by: hand LDKE's routing the
    # tokenizer its inputs are made with, as a user of such a model would (ldke_peft.attach_tokenizer)
    attach_tokenizer(model, processor)
    return model, processor


def tiny_model_types() -> list[str]:
    """The ``config.model_type`` values :func:`tiny_model` can build."""
    return sorted(_BUILDERS)


def _special_ids(tok) -> dict[str, int]:
    return dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


# ---------------------------------------------------------------------- LLaVA


@_builder("llava")
def _tiny_llava(seed: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = bpe_tokenizer(_CORPUS, vocab_size=400)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=16
    )
    text = LlamaConfig(vocab_size=len(tok), max_position_embeddings=256, **_special_ids(tok), **TINY_TEXT)
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(cfg)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, proc


#: LLaVA-1.5's chat template ("USER: <image>\n... ASSISTANT:"), as shipped with llava-hf checkpoints.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# ---------------------------------------------------------------------- LLaVA-OneVision

#: llava-hf/llava-onevision-qwen2-*-hf chat template (ChatML, images first, then text).
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@_builder("llava_onevision")
def _tiny_llava_onevision(seed: int):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from ..families import image_only_processor

    tok = bpe_tokenizer(_CORPUS, vocab_size=400, extra_special=["<video>", "<|im_start|>", "<|im_end|>"])
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=16
    )
    text = Qwen2Config(vocab_size=len(tok), max_position_embeddings=512, **_special_ids(tok), **TINY_TEXT)
    cfg = LlavaOnevisionConfig(
        vision_config=vision, text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
    )
    model = LlavaOnevisionForConditionalGeneration(cfg)
    ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    proc = image_only_processor(
        LlavaOnevisionProcessor, image_processor=ip, tokenizer=tok, num_image_tokens=4,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
    )
    return model, proc


# ---------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL

#: Qwen/Qwen2-VL-*-Instruct and Qwen2.5-VL chat template (ChatML with a default system prompt).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_QWEN_SPECIALS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"]


def _qwen_tokenizer_and_processor(processor_cls):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..families import image_only_processor

    tok = bpe_tokenizer(_CORPUS, vocab_size=400, extra_special=_QWEN_SPECIALS)
    # 56x56 .. 112x112 pixels -> 4x4 .. 8x8 patches of 14 -> 4 .. 16 image tokens after the 2x2 merge
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})
    proc = image_only_processor(processor_cls, image_processor=ip, tokenizer=tok, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    return tok, proc, qwen_vision_ids(tok)


def qwen_vision_ids(tok) -> dict[str, int]:
    """The Qwen-VL config's vision token ids, read from the tokenizer."""
    return {
        "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }


def _qwen_text(tok) -> dict[str, Any]:
    # head_dim 8 -> 4 rotary frequencies split over (temporal, height, width)
    return dict(
        vocab_size=len(tok), max_position_embeddings=512, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1]},
        **_special_ids(tok), **TINY_TEXT,
    )


@_builder("qwen2_vl")
def _tiny_qwen2_vl(seed: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok, proc, ids = _qwen_tokenizer_and_processor(Qwen2VLProcessor)
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=_qwen_text(tok), **ids,
    )
    return Qwen2VLForConditionalGeneration(cfg), proc


@_builder("qwen2_5_vl")
def _tiny_qwen2_5_vl(seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tok, proc, ids = _qwen_tokenizer_and_processor(Qwen2_5_VLProcessor)
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        text_config=_qwen_text(tok), **ids,
    )
    return Qwen2_5_VLForConditionalGeneration(cfg), proc


# ---------------------------------------------------------------------- BLIP-2 (OPT)


@_builder("blip-2")
def _tiny_blip2(seed: int):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok = bpe_tokenizer(_CORPUS, vocab_size=400)
    ip = BlipImageProcessorPil(size={"height": 32, "width": 32})
    proc = Blip2Processor(image_processor=ip, tokenizer=tok, num_query_tokens=4)
    text = OPTConfig(
        vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=256, **_special_ids(tok),
    )
    cfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=16),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            encoder_hidden_size=32, vocab_size=len(tok), max_position_embeddings=64),
        text_config=text, num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return Blip2ForConditionalGeneration(cfg), proc


# ---------------------------------------------------------------------- Idefics3 / SmolVLM

#: HuggingFaceTB/SmolVLM-*-Instruct (model_type ``idefics3``) chat template.
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@_builder("idefics3")
def _tiny_idefics3(seed: int):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    row_col = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = bpe_tokenizer(
        _CORPUS, vocab_size=400,
        extra_special=["<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>", *row_col],
    )
    # 64x64 images, 16x16 patches, pixel-shuffle 2 -> (64/16)^2 / 2^2 = 4 image tokens per image
    ip = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 64}, max_image_size={"longest_edge": 64}
    )
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_CHAT_TEMPLATE)
    text = LlamaConfig(vocab_size=len(tok), max_position_embeddings=512, **_special_ids(tok), **TINY_TEXT)
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=16),
        text_config=text, scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )
    return Idefics3ForConditionalGeneration(cfg), proc


# ---------------------------------------------------------------------- PaliGemma


@_builder("paligemma")
def _tiny_paligemma(seed: int):
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = bpe_tokenizer(_CORPUS, vocab_size=400)
    ip = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    ip.image_seq_length = 4  # (32 / 16)^2 SigLIP patches, as in the real preprocessor_config.json
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    text = GemmaConfig(vocab_size=len(tok), head_dim=8, max_position_embeddings=512, **_special_ids(tok), **TINY_TEXT)
    cfg = PaliGemmaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=16, projection_dim=32),
        text_config=text, projection_dim=32, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return PaliGemmaForConditionalGeneration(cfg), proc


# the families added beyond the original seven register their builders on import
from . import tiny_extra  # noqa: E402,F401  (after _builder and the shared helpers exist)
