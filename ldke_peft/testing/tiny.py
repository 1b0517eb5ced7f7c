"""Tiny random models of every supported family, built from configs with no network access.

``tiny_model(model_type, seed)`` returns ``(model, processor)``: the real transformers model class
with a few-layer config, and a real processor around a tokenizer trained on the fly. Users can test
their own LDKE pipelines with these in milliseconds.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._tokenizer import bpe_tokenizer

#: Small corpus the tiny BPE tokenizers are trained on.
_CORPUS = [
    "What is the capital of the country shown in the image?",
    "Which language is spoken in the country in the picture?",
    "What currency is used there? Paris London Berlin Rome Madrid Tokyo euro pound yen",
    "Describe the image. A red flag with a blue stripe and a yellow star.",
    "USER: ASSISTANT: system user assistant The answer is",
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

    Supported: see :func:`tiny_model_types`. The model is in eval mode, fp32, on CPU.
    """
    if model_type not in _BUILDERS:
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"no tiny model for model_type {model_type!r}; available: {', '.join(sorted(_BUILDERS))}"
        )
    torch.manual_seed(seed)
    model, processor = _BUILDERS[model_type](seed)
    model.eval()
    return model, processor


def tiny_model_types() -> list[str]:
    return sorted(_BUILDERS)


@_builder("llava")
def _tiny_llava(seed: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = bpe_tokenizer(_CORPUS, vocab_size=400)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=16
    )
    text = LlamaConfig(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        max_position_embeddings=256, **TINY_TEXT,
    )
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
