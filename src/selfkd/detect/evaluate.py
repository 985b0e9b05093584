"""mAP at IoU 0.5 (PASCAL VOC's criterion) with torchmetrics' MeanAveragePrecision.

VOC's "difficult" objects are passed as ``iscrowd`` so that detecting them is neither rewarded
nor penalised, as VOC's evaluation does. The AP is COCO-style (101-point interpolation), not
VOC2007's 11-point one; torchmetrics averages AP over the classes present (VOC's mAP too).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from selfkd.errors import ConfigError


def _metric():
    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError:
        raise ConfigError(
            "detection mAP needs torchmetrics and pycocotools: pip install 'selfkd[detect]'"
        ) from None
    try:
        return MeanAveragePrecision(iou_type="bbox", iou_thresholds=[0.5], backend="pycocotools")
    except ModuleNotFoundError:
        raise ConfigError(
            "detection mAP needs pycocotools: pip install 'selfkd[detect]' (or pycocotools)"
        ) from None


def map50(predictions: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> float:
    """mAP@0.5 in [0, 1]: ``predictions`` with boxes/scores/labels, ``targets`` with
    boxes/labels (and optional ``difficult``); one dict per image, boxes x1 y1 x2 y2 in pixels."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} images; one each")
    metric = _metric()
    preds = [{k: p[k].detach().cpu() for k in ("boxes", "scores", "labels")} for p in predictions]
    gts = []
    for t in targets:
        crowd = t.get("difficult", torch.zeros(len(t["labels"]), dtype=torch.int64))
        gts.append({"boxes": t["boxes"].cpu(), "labels": t["labels"].cpu(), "iscrowd": crowd.cpu()})
    metric.update(preds, gts)
    return float(metric.compute()["map_50"])
