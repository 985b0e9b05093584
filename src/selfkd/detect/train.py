"""Fine-tune Faster R-CNN with a selfkd backbone on VOC and report mAP@0.5 (PS-KD §4.3).

The paper's schedule is the default: 10 epochs, batch 1, SGD (momentum 0.9, weight decay 1e-4:
torchvision's detection reference, the paper names none), lr 1e-3 decayed ×0.1 after epoch 5;
training on VOC 2007+2012 trainval with random horizontal flips, testing on VOC 2007 test.
Writes ``OUT/metrics.jsonl`` (one row per epoch) and ``OUT/final.json`` (mAP and settings),
both atomically; OUT defaults to ``RUN/detect``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from selfkd.detect.backbone import check_resnet, faster_rcnn, load_classifier
from selfkd.detect.evaluate import map50
from selfkd.detect.voc import VOC_CLASSES, voc_sets
from selfkd.errors import ConfigError


@dataclass
class DetectSettings:
    """The fine-tuning settings (defaults: the paper's)."""

    voc_root: str
    train_sets: str = "2007:trainval,2012:trainval"
    test_sets: str = "2007:test"
    epochs: int = 10
    lr: float = 1.0e-3
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    milestones: list[int] = field(default_factory=lambda: [5])
    batch_size: int = 1
    min_size: int = 600
    max_size: int = 1000
    trainable_layers: int = 3
    max_iters: int | None = None  # stop each epoch after this many steps (smoke runs)
    max_test: int | None = None  # evaluate on the first images only (smoke runs)
    seed: int = 0
    device: str = "auto"
    checkpoint: str = "last"


def _collate(batch: list) -> tuple[list, list]:
    return [b[0] for b in batch], [b[1] for b in batch]


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def finetune(
    run: str | Path, settings: DetectSettings, out: str | Path | None = None, log: Any = print
) -> dict[str, Any]:
    """Fine-tune a Faster R-CNN from the backbone of ``run`` and evaluate it; returns final.json."""
    if settings.epochs < 1 or settings.batch_size < 1:
        raise ConfigError("epochs and batch_size must be >= 1")
    torch.manual_seed(settings.seed)
    dev = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if settings.device == "auto"
        else settings.device
    )  # fmt: skip
    classifier, name = load_classifier(run, settings.checkpoint)
    backbone = check_resnet(classifier, name)  # before the data: the cheaper check first
    train_set = voc_sets(settings.voc_root, settings.train_sets, flip=True)
    test_set = voc_sets(settings.voc_root, settings.test_sets)
    model = faster_rcnn(
        backbone, num_classes=len(VOC_CLASSES) + 1,
        trainable_layers=settings.trainable_layers, min_size=settings.min_size,
        max_size=settings.max_size,
    ).to(dev)  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, settings.milestones, gamma=0.1)
    gen = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(
        train_set, batch_size=settings.batch_size, shuffle=True, collate_fn=_collate, generator=gen
    )
    folder = Path(out) if out is not None else Path(run) / "detect"
    folder.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.perf_counter()
    for epoch in range(settings.epochs):
        model.train()
        total, steps = torch.zeros((), device=dev), 0
        for images, targets in loader:
            images = [im.to(dev) for im in images]
            targets = [{k: t[k].to(dev) for k in ("boxes", "labels")} for t in targets]
            losses = model(images, targets)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
            if settings.max_iters is not None and steps >= settings.max_iters:
                break
        sched.step()
        rows.append({"epoch": epoch, "loss": float(total) / max(steps, 1), "steps": steps})
        log(f"epoch {epoch}: loss {rows[-1]['loss']:.4f} ({steps} steps)")
    score = evaluate(model, test_set, settings, dev)
    result = {
        "run": str(run), "backbone": name, "map50": 100.0 * score,
        "seconds": time.perf_counter() - start, "settings": asdict(settings),
    }  # fmt: skip
    _atomic(folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _atomic(folder / "final.json", json.dumps(result, indent=2) + "\n")
    log(f"mAP@0.5 {result['map50']:.2f} -> {folder / 'final.json'}")
    return result


@torch.no_grad()
def evaluate(model: Any, test_set: Any, settings: DetectSettings, dev: torch.device) -> float:
    """mAP@0.5 in [0, 1] of ``model`` on ``test_set``."""
    model.eval()
    preds, gts = [], []
    n = len(test_set) if settings.max_test is None else min(settings.max_test, len(test_set))
    for i in range(n):
        image, target = test_set[i]
        preds.append({k: v.cpu() for k, v in model([image.to(dev)])[0].items()})
        gts.append(target)
    return map50(preds, gts)
