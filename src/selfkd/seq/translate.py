"""A translation run with CE, token LS or token-level PS-KD: ``python -m selfkd.seq.translate``.

``python -m selfkd.seq.translate --config FILE [--set key.sub=value ...] [--out DIR]`` trains a
randomly initialised ``transformers`` encoder-decoder (MarianMTModel: post-LN Transformer with
shared embeddings) and writes ``DIR/final.json`` (BLEU and settings, atomically) and
``DIR/metrics.jsonl`` (one row per epoch). Config (YAML, read with ``safe_load``)::

    name: str                       # run name (DIR defaults to runs/seq/<name>)
    seed: 0
    device: auto                    # auto | cpu | cuda
    data:   {source: synthetic | hf, ...}
    model:  {d_model, layers, heads, ffn, dropout, attention_dropout, max_positions}
    train:  {epochs, batch_size | max_tokens, lr, betas, eps, weight_decay, warmup, schedule}
    method: {name: ce | ls | pskd, alpha_T: 0.7, smoothing: 0.1}
    eval:   {num_beams, max_new_tokens, batch_size}

``data.source: synthetic`` takes ``n_train``, ``n_test``, ``words``, ``min_len``, ``max_len``,
``noise`` (:func:`selfkd.seq.corpus.synthetic_parallel`; word vocabulary); ``data.source: hf``
takes ``dataset`` and ``config`` (a Hugging Face ``datasets`` id, loaded when online), ``src``
and ``tgt`` (language keys of its ``translation`` column), ``train_split``/``test_split`` and
``bpe`` (byte-level BPE size trained on the training text).
``train.schedule`` is ``inverse_sqrt`` (linear warm-up over ``warmup`` steps, then ∝ 1/√step,
fairseq's) or ``constant``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from selfkd.errors import ConfigError, DataError, SelfKDError
from selfkd.seq.bleu import corpus_bleu, translate
from selfkd.seq.corpus import (
    EOS,
    PAD,
    BPEVocab,
    WordVocab,
    collate,
    encode_pairs,
    make_batches,
    synthetic_parallel,
)
from selfkd.seq.objective import Seq2SeqObjective

DEFAULTS: dict[str, Any] = {
    "name": "seq",
    "seed": 0,
    "device": "auto",
    "data": {"source": "synthetic", "n_train": 2000, "n_test": 200, "words": 16, "min_len": 3,
             "max_len": 8, "noise": 0.1},
    "model": {"d_model": 64, "layers": 2, "heads": 4, "ffn": 128, "dropout": 0.1,
              "attention_dropout": 0.0, "max_positions": 256},
    "train": {"epochs": 10, "batch_size": 64, "max_tokens": None, "lr": 1.0e-3,
              "betas": [0.9, 0.98], "eps": 1.0e-8, "weight_decay": 0.0, "warmup": 100,
              "schedule": "inverse_sqrt"},
    "method": {"name": "ce", "alpha_T": 0.7, "smoothing": 0.1},
    "eval": {"num_beams": 1, "max_new_tokens": 64, "batch_size": 128},
}  # fmt: skip


def _merge(base: dict[str, Any], over: dict[str, Any], where: str = "") -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        name = f"{where}{key}"
        if key not in base and not (where.startswith("data.") or where == "data."):
            raise ConfigError(f"unknown key {name!r}; accepted: {', '.join(sorted(base))}")
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            out[key] = _merge(base[key], value, f"{name}.")
        else:
            out[key] = value
    return out


def load_seq_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """DEFAULTS updated with the YAML file and ``key.sub=value`` overrides (values as YAML)."""
    cfg = DEFAULTS
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML ({type(exc).__name__})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must be a mapping of sections")
        cfg = _merge(cfg, raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set needs KEY=VALUE, got {item!r}")
        nested: Any = yaml.safe_load(value)
        for part in reversed(key.split(".")):
            nested = {part: nested}
        cfg = _merge(cfg, nested)
    return cfg


def _hf_pairs(data: dict[str, Any], split: str) -> list[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "data.source: hf needs the datasets library: pip install 'selfkd[seq]' "
            "(or use data.source: synthetic offline)"
        ) from None
    try:
        ds = datasets.load_dataset(data["dataset"], data.get("config"), split=split)
    except Exception as exc:  # network, unknown id: one line
        reason = " ".join(str(exc).split())[:200]
        raise DataError(
            f"cannot load {data['dataset']}/{data.get('config')} split {split} ({reason}); "
            "it needs network access to the Hugging Face Hub or a local datasets cache"
        ) from None
    src, tgt = data["src"], data["tgt"]
    if "translation" in ds.column_names:
        return [(r["translation"][src], r["translation"][tgt]) for r in ds]
    return [(r[src], r[tgt]) for r in ds]


def load_corpus(data: dict[str, Any], seed: int) -> tuple[Any, list, list]:
    """(vocab, train pairs, test pairs) for ``data``."""
    source = data.get("source")
    if source == "synthetic":
        kw = {k: data[k] for k in ("words", "min_len", "max_len")}
        train = synthetic_parallel(data["n_train"], seed=1000 + seed, noise=data["noise"], **kw)
        test = synthetic_parallel(data["n_test"], seed=999_999, noise=0.0, **kw)
        vocab: Any = WordVocab([s for p in train + test for s in p])
        return vocab, train, test
    if source == "hf":
        train = _hf_pairs(data, data.get("train_split", "train"))
        test = _hf_pairs(data, data.get("test_split", "test"))
        vocab = BPEVocab([s for p in train for s in p], size=int(data.get("bpe", 10000)))
        return vocab, train, test
    raise ConfigError(f"data.source must be synthetic or hf, got {source!r}")


def build_transformer(model: dict[str, Any], vocab_size: int) -> torch.nn.Module:
    """A randomly initialised MarianMTModel with the given sizes."""
    try:
        from transformers import MarianConfig, MarianMTModel
    except ImportError:
        raise ConfigError(
            "the translation path needs transformers: pip install 'selfkd[seq]'"
        ) from None
    conf = MarianConfig(
        vocab_size=vocab_size,
        d_model=model["d_model"],
        encoder_layers=model["layers"],
        decoder_layers=model["layers"],
        encoder_attention_heads=model["heads"],
        decoder_attention_heads=model["heads"],
        encoder_ffn_dim=model["ffn"],
        decoder_ffn_dim=model["ffn"],
        dropout=model["dropout"],
        attention_dropout=model["attention_dropout"],
        activation_dropout=0.0,
        max_position_embeddings=model["max_positions"],
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
        forced_eos_token_id=EOS,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
    )
    return MarianMTModel(conf)


def _lr_factor(step: int, train: dict[str, Any]) -> float:
    if train["schedule"] == "constant":
        return 1.0
    if train["schedule"] != "inverse_sqrt":
        raise ConfigError(
            f"train.schedule must be inverse_sqrt or constant, got {train['schedule']!r}"
        )
    warm = max(1, int(train["warmup"]))
    step = max(1, step)
    return step / warm if step < warm else math.sqrt(warm / step)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run(cfg: dict[str, Any], out: str | Path | None = None, log: Any = None) -> dict[str, Any]:
    """Train and evaluate one config; returns (and writes to ``out``) the final results."""
    log = log or (lambda line: print(line, file=sys.stderr))
    torch.manual_seed(int(cfg["seed"]))
    dev = _device(cfg["device"])
    vocab, train_pairs, test_pairs = load_corpus(cfg["data"], int(cfg["seed"]))
    examples = encode_pairs(train_pairs, vocab)
    model = build_transformer(cfg["model"], vocab.size).to(dev)
    tr, meth = cfg["train"], cfg["method"]
    objective = Seq2SeqObjective(
        meth["name"], int(tr["epochs"]), float(meth["alpha_T"]), float(meth["smoothing"])
    )
    opt = torch.optim.Adam(
        model.parameters(), lr=float(tr["lr"]), betas=tuple(tr["betas"]), eps=float(tr["eps"]),
        weight_decay=float(tr["weight_decay"]),
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s + 1, tr))
    folder = Path(out) if out is not None else Path("runs/seq") / str(cfg["name"])
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    start = time.perf_counter()
    for epoch in range(int(tr["epochs"])):
        model.train()
        objective.start_epoch(model, epoch)
        total, count = torch.zeros((), device=dev), 0
        batches = make_batches(
            examples, batch_size=tr["batch_size"], max_tokens=tr["max_tokens"],
            seed=int(cfg["seed"]) * 100_003 + epoch,
        )  # fmt: skip
        for idx in batches:
            batch = {k: v.to(dev) for k, v in collate([examples[i] for i in idx]).items()}
            loss, _ = objective(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
            count += 1
        row = {"epoch": epoch, "loss": float(total) / max(count, 1), "alpha_t": objective.alpha_t}
        rows.append(row)
        log(f"epoch {epoch}: loss {row['loss']:.4f}")
    ev = cfg["eval"]
    sources = [s for s, _ in test_pairs]
    hyps = translate(
        model, sources, vocab, batch_size=int(ev["batch_size"]), num_beams=int(ev["num_beams"]),
        max_new_tokens=int(ev["max_new_tokens"]), device=dev,
    )  # fmt: skip
    bleu = corpus_bleu(hyps, [t for _, t in test_pairs])
    result = {
        "name": cfg["name"], "method": meth["name"], "seed": cfg["seed"], "bleu": bleu,
        "epochs": tr["epochs"], "train_pairs": len(train_pairs), "test_pairs": len(test_pairs),
        "vocab": vocab.size, "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - start, "config": cfg,
    }  # fmt: skip
    _atomic_write(folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _atomic_write(folder / "final.json", json.dumps(result, indent=2) + "\n")
    log(f"BLEU {bleu:.2f} ({meth['name']}, seed {cfg['seed']}) -> {folder / 'final.json'}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selfkd.seq.translate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", "-c", help="YAML config (default: the synthetic task)")
    parser.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", help="output folder (default runs/seq/<name>)")
    args = parser.parse_args(argv)
    try:
        run(load_seq_config(args.config, args.set), args.out)
    except SelfKDError as exc:
        print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
