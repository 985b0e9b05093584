"""Detection transfer: a selfkd run's ResNet fine-tuned as a Faster R-CNN on a generated
VOC-format set (end to end, CLI), mAP on cases with known answers, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torchmetrics")
pytest.importorskip("pycocotools")

from selfkd.cli import main
from selfkd.detect.backbone import check_resnet, faster_rcnn, load_classifier
from selfkd.detect.evaluate import map50
from selfkd.detect.voc import check_layout, voc_sets
from selfkd.errors import DataError, ModelError

BOXES = {  # image id -> [(class, xmin, ymin, xmax, ymax, difficult)] (VOC: 1-based pixels)
    "000001": [("cat", 5, 8, 30, 40, 0)],
    "000002": [("dog", 20, 10, 60, 50, 0), ("cat", 2, 2, 12, 12, 1)],
    "000003": [("person", 10, 10, 50, 60, 0)],
}


def _xml(image_id: str, objects) -> str:
    objs = "".join(
        f"<object><name>{c}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin>"
        f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for c, x1, y1, x2, y2, d in objects
    )
    return (
        f"<annotation><filename>{image_id}.jpg</filename><size><width>64</width>"
        f"<height>64</height><depth>3</depth></size>{objs}</annotation>"
    )


def make_voc(root: Path) -> Path:
    base = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id, objects in BOXES.items():
        pixels = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        for _, x1, y1, x2, y2, _ in objects:
            pixels[y1:y2, x1:x2] = 220
        Image.fromarray(pixels).save(base / "JPEGImages" / f"{image_id}.jpg")
        (base / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, objects))
    (base / "ImageSets/Main/trainval.txt").write_text("000001\n000002\n")
    (base / "ImageSets/Main/test.txt").write_text("000003\n000002\n")
    return root


def _run(tmp_path: Path, model: str) -> Path:
    config = tmp_path / f"{model.replace('/', '_')}.yaml"
    config.write_text(
        f"run: {{name: bb, out_dir: {tmp_path / 'runs' / model.replace('/', '_')}, device: cpu}}\n"
        "data: {name: synthetic, batch_size: 16, options: {num_classes: 3, image_size: 16, "
        "train_per_class: 4, test_per_class: 2}}\n"
        f"model: {{name: {model}}}\ntrain: {{epochs: 1, lr: 0.01}}\nmethod: {{name: pskd}}\n"
    )
    assert main(["train", "-c", str(config), "--quiet"]) == 0
    return tmp_path / "runs" / model.replace("/", "_") / "bb"


def test_voc_reader_gives_boxes_labels_and_difficult_flags(tmp_path):
    root = make_voc(tmp_path)
    ds = voc_sets(root, "2007:trainval")
    assert len(ds) == 2
    x, t = ds[1]
    assert x.shape == (3, 64, 64)
    assert t["labels"].tolist() == [12, 8]  # dog, cat (1-based VOC order)
    assert t["boxes"][0].tolist() == [19.0, 9.0, 60.0, 50.0]  # xmin/ymin made 0-based
    assert t["difficult"].tolist() == [0, 1]


def test_voc_folder_missing_an_annotation_is_a_one_line_error(tmp_path, capsys):
    root = make_voc(tmp_path)
    (root / "VOCdevkit/VOC2007/Annotations/000002.xml").unlink()
    with pytest.raises(DataError) as err:
        check_layout(root, "2007", "trainval")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("VOC annotation ")
    assert "000002.xml is missing" in msg
    with pytest.raises(DataError, match=r"VOC set list .*2012/ImageSets/Main/trainval.txt"):
        check_layout(root, "2012", "trainval")
    run = _run(tmp_path, "resnet18")
    assert main(["detect", str(run), "--voc", str(root), "--train-sets", "2007:trainval"]) == 2
    assert capsys.readouterr().err.startswith("error: VOC annotation ")


def test_map_of_perfect_and_wrong_predictions():
    gts = [
        {"boxes": torch.tensor([[5.0, 8, 30, 40]]), "labels": torch.tensor([8])},
        {"boxes": torch.tensor([[20.0, 10, 60, 50], [2, 2, 12, 12]]),
         "labels": torch.tensor([12, 8]), "difficult": torch.tensor([0, 1])},
    ]  # fmt: skip
    perfect = [
        {"boxes": torch.tensor([[5.0, 8, 30, 40]]), "scores": torch.tensor([0.9]),
         "labels": torch.tensor([8])},
        {"boxes": torch.tensor([[20.0, 10, 60, 50]]), "scores": torch.tensor([0.8]),
         "labels": torch.tensor([12])},
    ]  # fmt: skip
    assert map50(perfect, gts) == pytest.approx(1.0)  # the difficult cat is not required
    wrong_place = [
        {"boxes": torch.tensor([[40.0, 40, 60, 60]]), "scores": torch.tensor([0.9]),
         "labels": torch.tensor([8])},
        {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.8]),
         "labels": torch.tensor([12])},
    ]  # fmt: skip
    assert map50(wrong_place, gts) == pytest.approx(0.0)
    wrong_class = [dict(p, labels=torch.tensor([3])) for p in perfect]
    assert map50(wrong_class, gts) == pytest.approx(0.0)
    # half right: one of two classes found -> mAP 0.5
    assert map50([perfect[0], wrong_place[1]], gts) == pytest.approx(0.5)


def test_a_run_that_is_not_a_resnet_is_refused(tmp_path, capsys):
    run = _run(tmp_path, "resnet8")
    model, name = load_classifier(run)
    with pytest.raises(ModelError) as err:
        check_resnet(model, name)
    assert str(err.value).startswith("model resnet8 (")
    assert "cannot be a Faster R-CNN backbone" in str(err.value)
    root = make_voc(tmp_path)
    assert main(["detect", str(run), "--voc", str(root), "--epochs", "1"]) == 2
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: model resnet8 (")


def test_faster_rcnn_takes_the_run_weights_and_finetunes_end_to_end(tmp_path):
    run = _run(tmp_path, "resnet18")
    classifier, _ = load_classifier(run)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert torch.equal(classifier.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    det = faster_rcnn(check_resnet(classifier, "resnet18"), min_size=64, max_size=64)
    body = det.backbone.body
    assert torch.equal(body.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    assert not body.conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad
    root = make_voc(tmp_path)
    out = tmp_path / "det"
    code = main(
        ["detect", str(run), "--voc", str(root), "--train-sets", "2007:trainval",
         "--test-sets", "2007:test", "--epochs", "2", "--max-iters", "1", "--min-size", "64",
         "--max-size", "64", "--device", "cpu", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    final = json.loads((out / "final.json").read_text())
    assert final["backbone"] == "resnet18"
    assert 0.0 <= final["map50"] <= 100.0
    assert final["settings"]["milestones"] == [5] and final["settings"]["lr"] == 1e-3
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in rows] == [1, 1]
    assert all(np.isfinite(r["loss"]) for r in rows)
