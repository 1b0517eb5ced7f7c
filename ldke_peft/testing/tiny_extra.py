"""Tiny random models of the families users deploy today beyond the original seven: Qwen3-VL,
Qwen3.5, Gemma 3, LLaVA-NeXT, InternVL, SmolVLM, Mistral 3, Idefics2 and Aya Vision.

Same recipe as :mod:`ldke_peft.testing.tiny`: the real transformers model class with a few-layer
config, and the real processor class (PIL image backend; video-capable processors built without
their torchvision-only video processor by :func:`~ldke_peft.families.image_only_processor`) around
a tokenizer trained on the fly that defines the special tokens the real tokenizer defines. Chat
templates follow the real checkpoints' single-turn format (user turn with the image first, then
the generation prompt). No family code is involved: these models run through the structural
family adapter.
"""

from __future__ import annotations

from typing import Any

import torch

from ..families import image_only_processor
from ._tokenizer import bpe_tokenizer
from .tiny import _CORPUS, _QWEN_SPECIALS, TINY_TEXT, _builder, _special_ids, qwen_vision_ids

__all__ = ["simple_chat_template"]


def simple_chat_template(user: str, image: str, end: str, assistant: str, bos: str = "") -> str:
    """A single-turn chat template: ``bos + user + (image) + text + end`` for a user turn and
    ``assistant`` as the generation prompt (what the real templates render for one user message)."""
    return (
        f"{bos}{{% for message in messages %}}{{% if message['role'] == 'user' %}}{user}"
        "{% else %}{{ message['role'] }}: {% endif %}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for content in message['content'] %}{% if content['type'] == 'image' %}" + image +
        "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
        f"{end}{{% endfor %}}{{% if add_generation_prompt %}}{assistant}{{% endif %}}"
    )


def _text(tok, **over: Any) -> dict[str, Any]:
    return {**TINY_TEXT, "vocab_size": len(tok), "max_position_embeddings": 512, **_special_ids(tok), **over}


_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

# ---------------------------------------------------------------------- Qwen3-VL / Qwen3.5

#: Qwen3-VL / Qwen3.5 Instruct: ChatML, no default system prompt
QWEN3_CHAT_TEMPLATE = simple_chat_template(
    "<|im_start|>user\n", "<|vision_start|><|image_pad|><|vision_end|>", "<|im_end|>\n", "<|im_start|>assistant\n"
)


def _qwen3_processor():
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = bpe_tokenizer(_CORPUS, vocab_size=400, extra_special=_QWEN_SPECIALS)
    # patch 16, 2x2 merge: 64x64 pixels -> 4x4 patches -> 4 image tokens
    ip = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128}, patch_size=16, merge_size=2, temporal_patch_size=2
    )
    proc = image_only_processor(Qwen3VLProcessor, image_processor=ip, tokenizer=tok, chat_template=QWEN3_CHAT_TEMPLATE)
    return tok, proc, qwen_vision_ids(tok)


_QWEN3_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=16,
                     spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)


@_builder("qwen3_vl")
def _tiny_qwen3_vl(seed: int):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok, proc, ids = _qwen3_processor()
    text = _text(tok, head_dim=8, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                     "mrope_interleaved": True})
    cfg = Qwen3VLConfig(vision_config=dict(_QWEN3_VISION, deepstack_visual_indexes=[0]), text_config=text, **ids)
    return Qwen3VLForConditionalGeneration(cfg), proc


@_builder("qwen3_5")
def _tiny_qwen3_5(seed: int):
    """Qwen3.5: a hybrid stack (Gated DeltaNet linear attention, every 2nd layer full attention)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    tok, proc, ids = _qwen3_processor()
    text = _text(
        tok, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention"] * 2,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                         "partial_rotary_factor": 1.0},
    )
    ids.pop("video_token_id", None)
    cfg = Qwen3_5Config(vision_config=dict(_QWEN3_VISION, deepstack_visual_indexes=[]), text_config=text, **ids)
    return Qwen3_5ForConditionalGeneration(cfg), proc


# ---------------------------------------------------------------------- Gemma 3

#: google/gemma-3-*-it: turns with <start_of_turn>, the image as <start_of_image>
GEMMA3_CHAT_TEMPLATE = simple_chat_template(
    "<start_of_turn>user\n", "<start_of_image>", "<end_of_turn>\n", "<start_of_turn>model\n", bos="{{ bos_token }}"
)


def _gemma3_parts():
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = bpe_tokenizer(
        _CORPUS + ["<start_of_turn>user model<end_of_turn>"], vocab_size=400,
        extra_special=["<start_of_turn>", "<end_of_turn>"],
        named_special={"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"},
    )
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    # 32x32 images, patch 8 -> 4x4 patches, pooled to 2x2 = 4 image tokens
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=GEMMA3_CHAT_TEMPLATE)
    kwargs = dict(
        vision_config=dict(_VISION, image_size=32, patch_size=8, model_type="siglip_vision_model"),
        text_config=_text(tok, head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2),
        mm_tokens_per_image=4,
        boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id, image_token_index=tok.image_token_id,
    )
    return proc, kwargs


def _gemma3_model(cfg: Any) -> Any:
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration(cfg)
    # transformers initialises the projector's matrix to zeros (real checkpoints train it): every image
    # would become the same embedding, so give the tiny model a random one
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.05)
    return model


@_builder("gemma3")
def _tiny_gemma3(seed: int):
    """Gemma 3: SigLIP + pooled projector, Gemma 3 text model with sliding/global layers."""
    from transformers import Gemma3Config

    proc, kwargs = _gemma3_parts()
    return _gemma3_model(Gemma3Config(**kwargs)), proc


@_builder("shieldgemma2")
def _tiny_shieldgemma2(seed: int):
    """ShieldGemma 2: a Gemma 3 (``Gemma3ForConditionalGeneration``) under its own config type. Its
    processor adds safety-policy prompts around Gemma 3's; the tiny model uses ``Gemma3Processor``
    (the same image and chat format) for free-form prompts."""
    from transformers import ShieldGemma2Config

    proc, kwargs = _gemma3_parts()
    return _gemma3_model(ShieldGemma2Config(**kwargs)), proc


# ---------------------------------------------------------------------- LLaVA-NeXT

#: llava-hf/llava-v1.6-mistral-7b-hf: "[INST] <image>\n... [/INST]"
MISTRAL_INST_TEMPLATE = simple_chat_template("[INST] ", "<image>\n", " [/INST]", "", bos="")


@_builder("llava_next")
def _tiny_llava_next(seed: int):
    """LLaVA-NeXT: CLIP + AnyRes tiles, an image newline token per row of patches."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = bpe_tokenizer(_CORPUS + ["[INST] [/INST]"], vocab_size=400)
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    vision = CLIPVisionConfig(**_VISION, image_size=32, patch_size=16)
    cfg = LlavaNextConfig(
        vision_config=vision, text_config=dict(_text(tok), model_type="llama"),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    proc = LlavaNextProcessor(
        image_processor=ip, tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=MISTRAL_INST_TEMPLATE,
    )
    return LlavaNextForConditionalGeneration(cfg), proc


@_builder("vipllava")
def _tiny_vipllava(seed: int):
    """VipLLaVA: LLaVA with a projector over several CLIP layers; LLaVA's processor and prompt format."""
    from transformers import CLIPVisionConfig, LlavaProcessor, VipLlavaConfig, VipLlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from .tiny import LLAVA_CHAT_TEMPLATE

    tok = bpe_tokenizer(_CORPUS, vocab_size=400)
    cfg = VipLlavaConfig(
        vision_config=CLIPVisionConfig(**_VISION, image_size=32, patch_size=16),
        text_config=dict(_text(tok), model_type="llama"),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=[-2, -1],
    )
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return VipLlavaForConditionalGeneration(cfg), proc


# ---------------------------------------------------------------------- InternVL

#: OpenGVLab/InternVL3-*-hf: ChatML, the image as <IMG_CONTEXT> on its own line
INTERNVL_CHAT_TEMPLATE = simple_chat_template(
    "<|im_start|>user\n", "<IMG_CONTEXT>\n", "<|im_end|>\n", "<|im_start|>assistant\n"
)


@_builder("internvl")
def _tiny_internvl(seed: int):
    """InternVL 3: InternViT + pixel-shuffle MLP projector, Qwen2 language model."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = bpe_tokenizer(
        _CORPUS, vocab_size=400, extra_special=["<|im_start|>", "<|im_end|>"],
        named_special={"start_image_token": "<img>", "end_image_token": "</img>",
                       "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False)
    # 32x32 images, patch 8 -> 4x4 patches, pixel shuffle 0.5 -> 4 image tokens
    proc = image_only_processor(
        InternVLProcessor, image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=INTERNVL_CHAT_TEMPLATE
    )
    cfg = InternVLConfig(
        vision_config=dict(_VISION, image_size=[32, 32], patch_size=[8, 8]),
        text_config=dict(_text(tok), model_type="qwen2"), image_token_id=tok.context_image_token_id,
        downsample_ratio=0.5, image_seq_length=4,
    )
    return InternVLForConditionalGeneration(cfg), proc


# ---------------------------------------------------------------------- SmolVLM / Idefics2

#: HuggingFaceTB/SmolVLM2 and Idefics2 instruct: "User:<image>...<end_of_utterance>\nAssistant:"
SMOLVLM_CHAT_TEMPLATE = simple_chat_template(
    "User:", "<image>", "<end_of_utterance>\n", "Assistant:", bos="<|im_start|>"
)
IDEFICS2_CHAT_TEMPLATE = simple_chat_template("User:", "<image>", "<end_of_utterance>\n", "Assistant:")


@_builder("smolvlm")
def _tiny_smolvlm(seed: int):
    """SmolVLM(2): SigLIP + pixel-shuffle connector, a Llama-style LM.

    ``SmolVLMProcessor`` needs the ``num2words`` package (not installed here), so the tiny model's
    inputs come from ``Idefics3Processor``, whose image prompt (``<fake_token_around_image>
    <global-img>`` + ``<image>``*N + ``<fake_token_around_image>``) SmolVLM's processor produces for
    an unsplit image too, with SmolVLM's own (PIL) image processor.
    """
    from transformers import Idefics3Processor, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    row_col = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = bpe_tokenizer(
        _CORPUS, vocab_size=400,
        extra_special=["<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>", *row_col],
    )
    ip = SmolVLMImageProcessorPil(do_image_splitting=False, size={"longest_edge": 64}, max_image_size={"longest_edge": 64})
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=SMOLVLM_CHAT_TEMPLATE)
    cfg = SmolVLMConfig(
        vision_config=dict(_VISION, image_size=64, patch_size=16), text_config=dict(_text(tok), model_type="llama"),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
    )
    return SmolVLMForConditionalGeneration(cfg), proc


@_builder("idefics2")
def _tiny_idefics2(seed: int):
    """Idefics2: SigLIP + perceiver resampler (``resampler_n_latents`` image tokens), Mistral LM."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    tok = bpe_tokenizer(_CORPUS, vocab_size=400, extra_special=["<fake_token_around_image>", "<end_of_utterance>"])
    ip = Idefics2ImageProcessorPil(do_image_splitting=False, size={"shortest_edge": 32, "longest_edge": 64})
    proc = Idefics2Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS2_CHAT_TEMPLATE)
    cfg = Idefics2Config(
        vision_config=dict(_VISION, image_size=64, patch_size=16),
        perceiver_config=dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=8, num_key_value_heads=1),
        text_config=dict(_text(tok), model_type="mistral"),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    model = Idefics2ForConditionalGeneration(cfg)
    # the resampler's random latents (std 1) swamp what one random cross-attention layer reads from the
    # image, so every image would come out nearly the same: shrink them (real checkpoints train them)
    with torch.no_grad():
        model.model.connector.perceiver_resampler.latents.mul_(0.05)
    return model, proc


# ---------------------------------------------------------------------- Mistral 3

#: mistralai/Mistral-Small-3.1-*-Instruct: "<s>[INST][IMG]...text[/INST]"
MISTRAL3_CHAT_TEMPLATE = simple_chat_template("[INST]", "[IMG]", "[/INST]", "", bos="{{ bos_token }}")


@_builder("mistral3")
def _tiny_mistral3(seed: int):
    """Mistral 3: Pixtral vision encoder (rows of [IMG] + [IMG_BREAK]), patch merger, Mistral LM.

    ``PixtralProcessor``'s module imports torchvision (not installed here), so inputs come from
    :class:`~ldke_peft.testing._pixtral.PixtralImageOnlyProcessor`, which expands ``[IMG]`` exactly as
    ``PixtralProcessor.replace_image_token`` does, around the real ``PixtralImageProcessorPil``.
    """
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from ._pixtral import PixtralImageOnlyProcessor as PixtralProcessor

    tok = bpe_tokenizer(_CORPUS + ["[INST] [/INST]"], vocab_size=400, extra_special=["[IMG]", "[IMG_BREAK]", "[IMG_END]"])
    ip = PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size=8)
    proc = PixtralProcessor(
        image_processor=ip, tokenizer=tok, patch_size=8, spatial_merge_size=2, chat_template=MISTRAL3_CHAT_TEMPLATE
    )
    cfg = Mistral3Config(
        vision_config=dict(_VISION, head_dim=8, image_size=32, patch_size=8, model_type="pixtral"),
        text_config=dict(_text(tok), head_dim=8, model_type="mistral"),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2, vision_feature_layer=-1,
    )
    return Mistral3ForConditionalGeneration(cfg), proc


# ---------------------------------------------------------------------- Aya Vision

#: CohereLabs/aya-vision-*: Cohere turn tokens, the image as <image>
AYA_CHAT_TEMPLATE = simple_chat_template(
    "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", "<image>", "<|END_OF_TURN_TOKEN|>",
    "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", bos="{{ bos_token }}",
)


@_builder("aya_vision")
def _tiny_aya_vision(seed: int):
    """Aya Vision: SigLIP + pixel-shuffle projector, Cohere2 LM; each image becomes
    ``<|START_OF_IMG|>TILE_GLOBAL`` + ``<|IMG_PATCH|>``*N + ``<|END_OF_IMG|>``."""
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    specials = ["<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL",
                "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"]
    tok = bpe_tokenizer(_CORPUS, vocab_size=400, extra_special=specials)
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False)
    # 32x32 images, patch 8 -> 4x4 patches, downsample 2 -> 4 image tokens
    proc = AyaVisionProcessor(
        image_processor=ip, tokenizer=tok, patch_size=8, img_size=32, downsample_factor=2,
        chat_template=AYA_CHAT_TEMPLATE,
    )
    cfg = AyaVisionConfig(
        vision_config=dict(_VISION, image_size=32, patch_size=8, model_type="siglip_vision_model"),
        text_config=dict(_text(tok), head_dim=8, model_type="cohere2", layer_types=["sliding_attention", "full_attention"] * 2,
                         sliding_window=16),
        image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"), downsample_factor=2,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    return AyaVisionForConditionalGeneration(cfg), proc


# ---------------------------------------------------------------------- DeepSeek-VL

#: deepseek-community/deepseek-vl-1.3b-chat: "User: <image_placeholder>...\n\nAssistant:"
DEEPSEEK_VL_CHAT_TEMPLATE = simple_chat_template("User: ", "<image_placeholder>", "\n\n", "Assistant:")


@_builder("deepseek_vl")
def _tiny_deepseek_vl(seed: int):
    """DeepSeek-VL: SigLIP + aligner MLP, Llama LM; ``num_image_tokens`` ``<image_placeholder>`` per image."""
    from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration, DeepseekVLProcessor
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil

    tok = bpe_tokenizer(_CORPUS, vocab_size=400, named_special={"image_token": "<image_placeholder>"})
    ip = DeepseekVLImageProcessorPil(size={"height": 32, "width": 32})
    # 32x32 images, patch 16 -> 4 image tokens
    proc = DeepseekVLProcessor(image_processor=ip, tokenizer=tok, num_image_tokens=4,
                               chat_template=DEEPSEEK_VL_CHAT_TEMPLATE)
    cfg = DeepseekVLConfig(
        vision_config=dict(_VISION, image_size=32, patch_size=16, model_type="siglip_vision_model"),
        text_config=dict(_text(tok), model_type="llama"), image_token_id=tok.image_token_id,
    )
    return DeepseekVLForConditionalGeneration(cfg), proc


# ---------------------------------------------------------------------- GLM-4.1V

#: zai-org/GLM-4.1V-*: "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>...<|assistant|>\n"
GLM4V_CHAT_TEMPLATE = simple_chat_template(
    "<|user|>\n", "<|begin_of_image|><|image|><|end_of_image|>", "", "<|assistant|>\n", bos="[gMASK]<sop>"
)


@_builder("glm4v")
def _tiny_glm4v(seed: int):
    """GLM-4.1V: a Qwen2-VL-style native-resolution ViT with M-RoPE, GLM-4 LM (fused gate/up MLP)."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vProcessor
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    specials = ["[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|begin_of_image|>", "<|end_of_image|>",
                "<|image|>", "<|video|>", "<|begin_of_video|>", "<|end_of_video|>"]
    tok = bpe_tokenizer(_CORPUS, vocab_size=400, extra_special=specials)
    ip = Glm4vImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, patch_size=14,
                                merge_size=2, temporal_patch_size=2)
    proc = image_only_processor(Glm4vProcessor, image_processor=ip, tokenizer=tok, chat_template=GLM4V_CHAT_TEMPLATE)
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image|>"), ("video_token_id", "<|video|>"), ("image_start_token_id", "<|begin_of_image|>"),
        ("image_end_token_id", "<|end_of_image|>"), ("video_start_token_id", "<|begin_of_video|>"),
        ("video_end_token_id", "<|end_of_video|>"))}
    cfg = Glm4vConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, image_size=56),
        text_config=_text(tok, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                 "partial_rotary_factor": 1.0}),
        **ids,
    )
    return Glm4vForConditionalGeneration(cfg), proc
