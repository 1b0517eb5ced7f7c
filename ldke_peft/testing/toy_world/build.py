"""Building a toy world: its processor, its model, the training rows and the training itself."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from .spec import (DEFAULT_N_ENTITIES, EOS, IMAGE_SIZE, IMAGE_TEMPLATES, PATCH_SIZE, RELATED, TEXT_TEMPLATES, WorldSpec, _recipe,
                   _Recipe, make_spec)
from .world import ToyWorld, _render

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------- building


def _all_texts(spec: WorldSpec) -> list[str]:
    texts = []
    for train_t, eval_t in IMAGE_TEMPLATES.values():
        texts.extend(train_t + eval_t)
    for trel, (train_t, eval_t) in TEXT_TEMPLATES.items():
        for subj in spec.hops[trel]:
            texts.extend(t.format(x=subj) for t in train_t + eval_t)
    for by_e in spec.answers.values():
        texts.extend(by_e.values())
    for by_s in spec.hops.values():
        texts.extend(by_s.values())
    return texts


def _make_processor(words: Sequence[str]) -> Any:
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from .._tokenizer import word_tokenizer
    from ..tiny import LLAVA_CHAT_TEMPLATE

    tok = word_tokenizer(words)
    ip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def _build_processor(spec: WorldSpec) -> Any:
    """A processor whose word-level vocabulary covers every text the world can produce.

    The vocabulary is collected by pre-tokenizing the *formatted* prompts (chat template applied)
    with a bootstrap processor, so pieces such as the newline-glued first word after ``<image>``
    are words too and nothing ever maps to ``<unk>``.
    """
    from ...families import get_family

    family = get_family("llava")
    texts = _all_texts(spec)
    base_words = {w for t in texts + ["USER: ASSISTANT:"] for w in t.replace("?", " ? ").replace(".", " . ").replace(":", " : ").split()}
    boot = _make_processor(sorted(base_words))
    pre = boot.tokenizer.backend_tokenizer.pre_tokenizer
    words = set(base_words)
    prompts = {t for tr, te in IMAGE_TEMPLATES.values() for t in tr + te}
    formatted = [family.format_prompt(boot, p, True) for p in prompts]
    formatted += [family.format_prompt(boot, t, False) for t in texts]
    formatted += [" " + a for a in texts]
    for f in formatted:
        for piece, _ in pre.pre_tokenize_str(f.replace(boot.image_token, " ")):
            piece = piece.replace("\u2581", "")
            if piece:
                words.add(piece)
    return _make_processor(sorted(words))


def _build_model(spec: WorldSpec, processor: Any, recipe: _Recipe, seed: int) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    th = recipe.text_hidden
    vh = recipe.vision_hidden
    vision = CLIPVisionConfig(
        hidden_size=vh, intermediate_size=vh * 2, num_hidden_layers=recipe.vision_layers, num_attention_heads=max(2, vh // 32),
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=th, intermediate_size=th * 2, num_hidden_layers=recipe.text_layers,
        num_attention_heads=max(2, th // 16), num_key_value_heads=max(1, th // 32), max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(processor.image_token),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


@dataclass
class _Rows:
    """Tokenised training rows: left-padded, targets (answer + EOS) at the end of every row."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    entity: torch.Tensor  # entity index for image rows, -1 for text rows


def _tokenise_rows(family: Any, processor: Any, spec: WorldSpec, render0: list[Image.Image],
                   untrained: frozenset[tuple[str, str]] = frozenset()) -> tuple[_Rows, _Rows]:
    img_items, txt_items = [], []
    for i, e in enumerate(spec.entities):
        for rel, (train_t, _) in IMAGE_TEMPLATES.items():
            if (e, rel) in untrained:
                continue
            for t in train_t:
                img_items.append((i, t, spec.answers[rel][e]))
    for trel, by_s in spec.hops.items():
        for subj, ans in by_s.items():
            for t in TEXT_TEMPLATES[trel][0]:
                txt_items.append((-1, t.format(x=subj), ans))

    def build(items, with_image: bool) -> _Rows:
        parts = []
        for s in range(0, len(items), 512):
            chunk = items[s : s + 512]
            b = family.build_inputs(
                processor,
                [render0[i] for i, _, _ in chunk] if with_image else None,
                [p for _, p, _ in chunk],
                [a + EOS for _, _, a in chunk],
            )
            parts.append(b)
        T = max(p.input_ids.shape[1] for p in parts)
        pad_id = family.tokenizer(processor).pad_token_id

        def lpad(x, fill):
            return torch.cat([torch.full((x.shape[0], T - x.shape[1]), fill, dtype=x.dtype), x], dim=1)

        return _Rows(
            input_ids=torch.cat([lpad(p.input_ids, pad_id) for p in parts]),
            attention_mask=torch.cat([lpad(p.inputs["attention_mask"], 0) for p in parts]),
            target_mask=torch.cat([lpad(p.target_mask, False) for p in parts]),
            entity=torch.tensor([i for i, _, _ in items]),
        )

    return build(img_items, True), build(txt_items, False)


def _pixel_pool(spec: WorldSpec, processor: Any) -> torch.Tensor:
    """``(n_entities, train_views, 3, H, W)`` pixel values of every training view, made by the real
    image processor (the same transform ``build_inputs`` applies)."""
    n, V = spec.n_entities, spec.train_views
    out = torch.empty(n, V, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float16 if n * V > 20_000 else torch.float32)
    for i in range(n):
        imgs = [_render(spec, i, v) for v in range(V)]
        pv = processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
        out[i] = pv.to(out.dtype)
    return out


def _trim(*tensors: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Drop the left columns that are padding in every row."""
    keep = attention_mask.any(0).nonzero()
    start = int(keep[0]) if len(keep) else 0
    return [t[:, start:] for t in tensors]


def _train(model: Any, spec: WorldSpec, img: _Rows, txt: _Rows, pool: torch.Tensor, recipe: _Recipe, seed: int) -> dict[str, Any]:
    """Teacher-forced cross-entropy on the answer tokens (+ EOS), a random training view per image row.

    An auxiliary loss -- a throw-away linear head classifying the entity from the mean of the
    projected image tokens -- makes the vision tower tell entities apart within ~200 steps instead of
    thousands (recognition is the slow part when learning from scratch). The head is not saved: the
    world's model is a plain LLaVA.
    """
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(recipe.text_hidden, spec.n_entities)
    captured: dict[str, torch.Tensor] = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: captured.__setitem__("f", out))
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
    steps = recipe.steps
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    B = recipe.batch_size
    b_txt = max(4, B // 4)
    b_img = B - b_txt
    k_img = int(img.target_mask.sum(1).max())
    k_txt = int(txt.target_mask.sum(1).max())
    V = pool.shape[1]
    t0, c0 = time.perf_counter(), time.process_time()
    ema = None
    model.train()
    # a bar on a terminal; elsewhere (CI logs, pipes) an INFO line every 10% of the steps
    bar = tqdm(range(steps), desc="training the toy world", unit="step", disable=not _terminal(sys.stderr), leave=False)
    every = max(1, steps // 10)
    try:
        for step in bar:
            ii = torch.randint(len(img.input_ids), (b_img,), generator=g)
            ti = torch.randint(len(txt.input_ids), (b_txt,), generator=g)
            ents = img.entity[ii]
            pixel_values = pool[ents, torch.randint(V, (b_img,), generator=g)].float()
            loss = torch.zeros(())
            # image rows and text rows have very different lengths: two forwards, one step
            for rows, idx, pv, k, w in ((img, ii, pixel_values, k_img, b_img / B), (txt, ti, None, k_txt, b_txt / B)):
                am = rows.attention_mask[idx]
                ids, am, tm = _trim(rows.input_ids[idx], am, rows.target_mask[idx], attention_mask=am)
                out = model(input_ids=ids, attention_mask=am, pixel_values=pv, logits_to_keep=k + 1)
                m = tm[:, -k:]
                loss = loss + w * torch.nn.functional.cross_entropy(out.logits[:, :-1][m].float(), ids[:, -k:][m])
                if pv is not None:
                    feats = captured["f"].reshape(len(idx), -1, recipe.text_hidden).mean(1)
                    loss = loss + torch.nn.functional.cross_entropy(head(feats), ents)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            val = loss.item()
            ema = val if ema is None else 0.95 * ema + 0.05 * val
            if step % 10 == 0:
                bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
            if (step + 1) % every == 0:
                logger.log(logging.DEBUG if not bar.disable else logging.INFO, "toy world step %d/%d loss %.4f (%.0fs)",
                           step + 1, steps, ema, time.perf_counter() - t0)
    finally:
        bar.close()
        hook.remove()
        model.eval()
    return {
        "train_seconds": time.perf_counter() - t0,
        "train_cpu_seconds": time.process_time() - c0,
        "final_loss": float(ema or 0.0),
        "steps": steps,
    }


def _terminal(stream: Any) -> bool:
    """Can a progress bar be drawn on ``stream``? A terminal with a width (a pseudo-terminal without a
    size, as under ``script``, would show an empty bar)."""
    try:
        return bool(stream.isatty()) and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block; the caller's thread count is restored after.

    The toy world is built this way whatever ``OMP_NUM_THREADS`` says: its models are so small that
    extra threads only add overhead (2 cores: 927 s with torch's default vs 54 s with one thread), and
    the thread count changes the order of floating-point reductions, so the trained weights.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_world(
    seed: int = 0, n_entities: int = DEFAULT_N_ENTITIES, *, evaluate: bool = True, steps: int | None = None,
    compose_holdout: float = 0.0,
) -> ToyWorld:
    """Generate and train a world (no cache). :func:`toy_world` is the cached entry point.

    Runs on one torch thread (:func:`one_thread`), so the weights are the same whatever the caller's
    thread settings. ``steps`` overrides the recipe's number of training steps (tests of the build
    itself; a world trained for fewer steps does not know its facts). ``compose_holdout``: the share of
    entities whose composed questions are *not* trained (listed in ``spec.build_info["compose_heldout"]``):
    whether the world answers those anyway tells composition from memorisation. 0 (the cached worlds)
    changes nothing.
    """
    if not 0.0 <= compose_holdout < 1.0:
        raise ValueError(f"compose_holdout must be in [0, 1), got {compose_holdout}")
    with one_thread():
        return _build_world(seed, n_entities, evaluate=evaluate, steps=steps, compose_holdout=compose_holdout)


def _heldout_compositions(spec: WorldSpec, share: float, seed: int) -> list[str]:
    """The entities whose composed questions are left out of training (a fixed draw per seed)."""
    k = int(round(share * len(spec.entities)))
    return sorted(random.Random(f"compose-{seed}").sample(list(spec.entities), k)) if k else []


def _build_world(seed: int, n_entities: int, *, evaluate: bool, steps: int | None,
                 compose_holdout: float = 0.0) -> ToyWorld:
    from ...families import family_of

    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t0, c0 = time.perf_counter(), time.process_time()
    recipe = _recipe(n_entities)
    if steps is not None:
        recipe = dataclasses.replace(recipe, steps=int(steps))
    spec = make_spec(seed, n_entities, recipe.train_views)
    processor = _build_processor(spec)
    model = _build_model(spec, processor, recipe, seed)
    family = family_of(model)
    render0 = [_render(spec, i, 0) for i in range(n_entities)]
    heldout = _heldout_compositions(spec, compose_holdout, seed)
    composed = [info["composed"] for info in RELATED.values()]
    img_rows, txt_rows = _tokenise_rows(family, processor, spec, render0,
                                        frozenset((e, rel) for e in heldout for rel in composed))
    unk = processor.tokenizer.unk_token_id
    if bool((img_rows.input_ids == unk).any() or (txt_rows.input_ids == unk).any()):
        raise RuntimeError("toy world tokenizer produced <unk>; the vocabulary is incomplete")
    pool = _pixel_pool(spec, processor)
    t_prep = time.perf_counter() - t0
    logger.info(
        "toy world seed=%d n=%d: %d image rows, %d text rows, %d views/entity, %.1fM params; training %d steps",
        seed, n_entities, len(img_rows.input_ids), len(txt_rows.input_ids), spec.train_views,
        sum(p.numel() for p in model.parameters()) / 1e6, recipe.steps,
    )
    info = _train(model, spec, img_rows, txt_rows, pool, recipe, seed)
    info["prep_seconds"] = t_prep
    info["torch_threads"] = torch.get_num_threads()
    info["params"] = sum(p.numel() for p in model.parameters())
    info["recipe"] = recipe.__dict__
    if heldout:
        info["compose_heldout"] = heldout
    spec.build_info = info
    world = ToyWorld(model=model, processor=processor, spec=spec)
    if evaluate:
        t1 = time.perf_counter()
        info["accuracy"] = world.accuracy()
        info["eval_seconds"] = time.perf_counter() - t1
    info["build_seconds"] = time.perf_counter() - t0
    info["build_cpu_seconds"] = time.process_time() - c0
    logger.info("toy world built in %.1fs: %s", info["build_seconds"], info.get("accuracy"))
    return world
