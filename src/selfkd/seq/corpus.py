"""Parallel corpora for the token-level path: vocabularies, batching, a synthetic task.

A vocabulary maps a sentence to ids ending with ``</s>`` and back. :class:`WordVocab` splits on
whitespace (the synthetic task); :class:`BPEVocab` trains a byte-level BPE with the
``tokenizers`` library on the training text (real corpora). Both share the ids ``<pad>`` = 0,
``</s>`` = 1, ``<unk>`` = 2, one vocabulary for source and target (the embeddings are shared).

The synthetic task (:func:`synthetic_parallel`) "translates" a sentence of source words
``s0..s{V-1}`` into target words: every word is replaced by its fixed translation and the order
is reversed. With ``noise`` > 0 each training target word is, with that probability, replaced by
a wrong but consistent alternative (a second dictionary), so that the hard targets are noisy as
in real parallel data; test references are always clean.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from selfkd.errors import ConfigError
from selfkd.losses.pskd import IGNORE_INDEX

PAD, EOS, UNK = 0, 1, 2
SPECIALS = ("<pad>", "</s>", "<unk>")


class Vocab(Protocol):
    size: int

    def encode(self, sentence: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class WordVocab:
    """Whitespace words; ids 0..2 are ``<pad>``, ``</s>``, ``<unk>``."""

    def __init__(self, sentences: Iterable[str]) -> None:
        words = sorted({w for s in sentences for w in s.split()})
        self.itos = [*SPECIALS, *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.size = len(self.itos)

    def encode(self, sentence: str) -> list[int]:
        return [self.stoi.get(w, UNK) for w in sentence.split()] + [EOS]

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i != PAD:
                out.append(self.itos[i] if 0 <= i < self.size else SPECIALS[UNK])
        return " ".join(out)


class BPEVocab:
    """A byte-level BPE of ``size`` tokens trained on ``sentences`` (``tokenizers`` library)."""

    def __init__(self, sentences: Iterable[str], size: int = 10000) -> None:
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError:
            raise ConfigError(
                "data.tokenizer: bpe needs the tokenizers library: pip install 'selfkd[seq]'"
            ) from None
        tok = Tokenizer(models.BPE(unk_token=SPECIALS[UNK]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=size,
            special_tokens=list(SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(list(sentences), trainer)
        self.tokenizer = tok
        self.size = tok.get_vocab_size()

    def encode(self, sentence: str) -> list[int]:
        return [*self.tokenizer.encode(sentence).ids, EOS]

    def decode(self, ids: Sequence[int]) -> str:
        kept = []
        for i in ids:
            if int(i) == EOS:
                break
            if int(i) != PAD:
                kept.append(int(i))
        return self.tokenizer.decode(kept).strip()


def synthetic_parallel(
    n: int, seed: int, words: int = 16, min_len: int = 3, max_len: int = 8, noise: float = 0.0
) -> list[tuple[str, str]]:
    """``n`` (source, target) sentence pairs of the synthetic reverse-and-translate task.

    The dictionaries are fixed (independent of ``seed``); ``seed`` draws the sentences and the
    noise. ``noise`` is the probability that a target word is the alternative translation.
    """
    if not 1 <= min_len <= max_len:
        raise ConfigError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if not 0.0 <= noise < 1.0:
        raise ConfigError(f"noise must be in [0, 1), got {noise}")
    perm = random.Random(1234).sample(range(words), words)
    alt = [(p + 1) % words for p in perm]
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        src = [rng.randrange(words) for _ in range(rng.randint(min_len, max_len))]
        tgt = [alt[w] if noise and rng.random() < noise else perm[w] for w in reversed(src)]
        pairs.append((" ".join(f"s{w}" for w in src), " ".join(f"t{w}" for w in tgt)))
    return pairs


def encode_pairs(
    pairs: Sequence[tuple[str, str]], vocab: Vocab
) -> list[tuple[list[int], list[int]]]:
    """Both sides of every pair as ids (each ending with ``</s>``)."""
    return [(vocab.encode(s), vocab.encode(t)) for s, t in pairs]


def collate(examples: Sequence[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
    """``input_ids``/``attention_mask`` (padded with 0) and ``labels`` (padded with -100)."""
    if not examples:
        raise ConfigError("cannot collate an empty batch")
    src_w = max(len(s) for s, _ in examples)
    tgt_w = max(len(t) for _, t in examples)
    input_ids = torch.full((len(examples), src_w), PAD, dtype=torch.long)
    labels = torch.full((len(examples), tgt_w), IGNORE_INDEX, dtype=torch.long)
    for i, (s, t) in enumerate(examples):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(t)] = torch.tensor(t)
    return {"input_ids": input_ids, "attention_mask": input_ids != PAD, "labels": labels}


def make_batches(
    examples: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Index batches: ``batch_size`` sentences each, or, with ``max_tokens``, length-sorted
    batches whose padded size (sentences × longest side) stays within ``max_tokens`` (fairseq's
    rule); the batch order is shuffled with ``seed``."""
    if (batch_size is None) == (max_tokens is None):
        raise ConfigError("set exactly one of train.batch_size and train.max_tokens")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    batches: list[list[int]] = []
    if batch_size is not None:
        rng.shuffle(order)
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        order.sort(key=lambda i: max(len(examples[i][0]), len(examples[i][1])))
        current: list[int] = []
        longest = 0
        for i in order:
            n = max(len(examples[i][0]), len(examples[i][1]))
            if current and max(longest, n) * (len(current) + 1) > max_tokens:  # type: ignore[operator]
                batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, n)
        if current:
            batches.append(current)
        rng.shuffle(batches)
    return batches
