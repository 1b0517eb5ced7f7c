"""Keep rows: questions on an edit's image whose answers the delta must leave as they were.

The router keeps other questions off an edit's slot, but a question it admits by mistake (another fact
on the same topic, asked on the same image) gets the slot's delta too. Fitting the delta so that such
questions keep the unedited model's answers makes a routing mistake cost little at the answer. The
questions come from the model itself (the neighbours it proposes next to the edit question) and from the
caller's negatives (questions labelled with other relations); the unedited model answers each once on
the edit image. A question whose unedited answer is the edit question's own unedited answer asks for the
edited fact, however it is worded, so it is not kept.

Owns: :func:`keep_questions`. Knows nothing of routing beyond forcing "no slot" while it asks.

Layer: editing (README "Architecture"): imports data, tuner and editing modules, never the product code.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from ..families import family_of
from ..requests import EditRequest
from ..tuner.context import routing_inputs
from ..tuner.question_key import load_encoder
from ..tuner.routing import NO_SLOT
from .augment import dedupe, same_question
from .neighbours import frame_words, neighbour_questions
from .scope import NegativePool, question_bank

logger = logging.getLogger(__name__)

#: Tokens of an unedited answer that a keep row fits (the first words carry the answer).
KEEP_ANSWER_TOKENS = 6


def _norm(text: str) -> str:
    return " ".join(text.strip().casefold().split())


def candidate_questions(peft_model: Any, processor: Any, request: EditRequest, pool: NegativePool | None,
                        n: int, encoder: str | None, own: Sequence[str]) -> list[str]:
    """Up to ``n`` questions on the edit image that ask for other facts: the model's proposed neighbours of
    the edit question first (they differ from it in the asked-for word only), then the caller's questions
    of other relations. ``own``: the edit's wordings, never kept."""
    if n <= 0 or request.image is None:
        return []
    caller = [] if pool is None else [(q, rel) for q, rel in pool.questions]
    gen: list[str] = []
    if encoder:
        frame_src = [q for q, _ in caller] if len(caller) >= 2 else [q for q, _ in question_bank(pool or NegativePool())]
        gen = neighbour_questions(peft_model, processor, request.prompt, n=n, encode=load_encoder(encoder).encode,
                                  frame=frame_words(frame_src), exclude=own)
    other = [q for q, rel in caller if rel is not None and rel != request.relation] if request.relation else []
    qs = [q for q in dedupe(gen + other) if not same_question(q, own, fuzzy=request.relation is None)]
    return qs[:n]


@torch.no_grad()
def keep_questions(peft_model: Any, processor: Any, request: EditRequest, pool: NegativePool | None, n: int,
                   encoder: str | None, own: Sequence[str]) -> list[tuple[str, str]]:
    """``(question, unedited answer)`` for the keep rows of ``request`` (empty when ``n`` is 0 or the edit has
    no image). Answers are greedy, at most :data:`KEEP_ANSWER_TOKENS` tokens, with every slot off."""
    qs = candidate_questions(peft_model, processor, request, pool, n, encoder, own)
    if not qs:
        return []
    root = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    family = family_of(root)
    tok = family.tokenizer(processor)
    device = next(root.parameters()).device
    asked = [request.prompt] + qs
    built = family.build_inputs(processor, [request.image] * len(asked), asked, None).to(device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    none = torch.full((len(asked),), NO_SLOT, dtype=torch.long, device=device)
    with routing_inputs(root, slots=none):
        out = root.generate(**built.inputs, max_new_tokens=KEEP_ANSWER_TOKENS, do_sample=False, num_beams=1,
                            pad_token_id=pad)
    answers = [tok.decode(row.tolist(), skip_special_tokens=True).strip() for row in out[:, built.input_ids.shape[1]:]]
    own_answer = _norm(answers[0])
    kept = [(q, a) for q, a in zip(qs, answers[1:]) if a and _norm(a) != own_answer]
    logger.info("edit %r: %d keep rows (%d candidates; the others answer as the edit question does)",
                request.prompt, len(kept), len(qs))
    return kept
