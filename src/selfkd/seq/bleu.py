"""Decoding and BLEU (sacrebleu) for the token-level path."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from selfkd.errors import ConfigError
from selfkd.seq.corpus import EOS, PAD, Vocab, collate


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenization) of ``hypotheses`` against one
    reference each, in 0..100."""
    try:
        import sacrebleu
    except ImportError:
        raise ConfigError("BLEU needs sacrebleu: pip install 'selfkd[seq]'") from None
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; one each")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


@torch.no_grad()
def translate(
    model: nn.Module,
    sources: Sequence[str],
    vocab: Vocab,
    *,
    batch_size: int = 64,
    num_beams: int = 1,
    max_new_tokens: int = 64,
    device: torch.device | str = "cpu",
) -> list[str]:
    """Translations of ``sources`` with ``model.generate`` (greedy, or beam search)."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(sources), batch_size):
            chunk = [(vocab.encode(s), [EOS]) for s in sources[i : i + batch_size]]
            batch = collate(chunk)
            ids = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                num_beams=num_beams,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=PAD,
                eos_token_id=EOS,
                decoder_start_token_id=PAD,
            )
            # generated sequences start with the decoder start token (pad): decode drops pads
            out.extend(vocab.decode(row.tolist()) for row in ids.cpu())
    finally:
        model.train(was_training)
    return out
