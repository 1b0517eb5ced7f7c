"""Tokenizers built on the fly (no Hub): a word-level one for the toy world and a small BPE one for
the tiny random models. Both become ``PreTrainedTokenizerFast`` so processors accept them."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

DEFAULT_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")


def word_tokenizer(words: Iterable[str], extra_special: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: every whitespace/punctuation-separated word in ``words`` is one token.

    Words are stored with the metaspace marker so ``decode`` restores spaces.
    """
    specials = list(DEFAULT_SPECIALS) + [s for s in extra_special if s not in DEFAULT_SPECIALS]
    vocab: dict[str, int] = {}
    for s in specials:
        vocab.setdefault(s, len(vocab))
    for w in sorted(set(words)):
        for tok in (w, "\u2581" + w):
            vocab.setdefault(tok, len(vocab))
    vocab.setdefault("\u2581", len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Punctuation(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)]
    )
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    return _wrap(tk, specials)


def bpe_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 512,
    extra_special: Sequence[str] = (),
    named_special: Mapping[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``corpus`` in milliseconds.

    ``named_special`` maps attribute names to special tokens (``{"boi_token": "<start_of_image>"}``):
    processors such as Gemma 3's read ``tokenizer.boi_token`` / ``tokenizer.boi_token_id``, as the
    real checkpoints' tokenizers define them.
    """
    named = dict(named_special or {})
    extra_special = list(extra_special) + [t for t in named.values() if t not in extra_special]
    specials = list(DEFAULT_SPECIALS) + [s for s in extra_special if s not in DEFAULT_SPECIALS]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(list(corpus), trainer=trainer)
    return _wrap(tk, specials, named)


def _wrap(tk: Tokenizer, specials: Sequence[str], named: Mapping[str, str] | None = None) -> PreTrainedTokenizerFast:
    extra = {"extra_special_tokens": dict(named)} if named else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=[s for s in specials if s not in ("<pad>", "<s>", "</s>", "<unk>")],
        **extra,
    )
    fast.padding_side = "left"
    return fast
