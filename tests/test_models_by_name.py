"""Any timm / torchvision model by name (timm/<name>, tv/<name>): taps, training, weights."""

from __future__ import annotations

import copy
import json
import pickle
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from selfkd.cli import main
from selfkd.config import config_from_dict
from selfkd.engine import train
from selfkd.errors import ConfigError, ModelError
from selfkd.models import MODELS, FeatureTaps, build_model

pytest.importorskip("timm")

SMALL = ["timm/test_resnet", "timm/test_efficientnet", "tv/resnet18", "tv/mobilenet_v3_small"]


def synthetic(tiny_dict: dict, model: str, method: dict, **options) -> dict:
    data = copy.deepcopy(tiny_dict)
    data["data"]["options"].update(channels=3, image_size=32, train_per_class=4)
    data["data"]["batch_size"] = 8
    data["model"] = {"name": model, "options": options}
    data["method"] = method
    data["train"]["epochs"] = 1
    data["run"]["name"] = model.replace("/", "-") + "-" + method["name"]
    return data


@pytest.fixture
def no_internet(monkeypatch, tmp_path):
    """Every download path fails at once, as on an offline machine; caches start empty."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name", SMALL)
def test_taps_are_found_and_capture_what_they_claim(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, in_channels=3).eval()
    taps = model.taps
    stages = [t for t in taps if t.startswith("stage")]
    assert stages == [f"stage{i}" for i in range(1, len(stages) + 1)] and len(stages) >= 3
    x = torch.randn(2, 3, 64, 64)
    with FeatureTaps(model, [*stages, "features", "pooled"]) as tapped:
        logits = model(x)
        sizes = [tapped[s].shape[-1] for s in stages]
        assert all(tapped[s].ndim == 4 for s in stages)
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
        pooled = tapped["pooled"]
        features = tapped["features"]
    assert logits.shape == (2, 5)
    head = model.get_submodule(taps["pooled"].partition(":")[0])
    assert isinstance(head, torch.nn.Linear) and head.out_features == 5
    torch.testing.assert_close(head(pooled), logits)  # pooled is the head's whole input
    if hasattr(model, "classifier") and model.classifier is head:
        # the ZF-LS premise: logits = classifier(average-pooled features)
        torch.testing.assert_close(model.classifier(features.mean(dim=(2, 3))), logits)


def test_classifier_alias_adds_no_parameters():
    model = build_model("timm/test_resnet", num_classes=4)
    import timm

    plain = timm.create_model("test_resnet", num_classes=4)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert model.classifier is model.fc and type(model).__name__ == "ResNet"


def test_unknown_names_are_one_line_errors_with_close_matches(tmp_path, tiny_dict, capsys):
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnet5o' \(did you mean: timm/"):
        build_model("timm/resnet5o", num_classes=4)
    with pytest.raises(ConfigError, match=r"unknown torchvision model 'resnet343'.*tv/resnet34"):
        build_model("tv/resnet343", num_classes=4)
    tiny_dict["model"] = {"name": "tv/mobilenet_v4"}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict))
    assert main(["train", "-c", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown torchvision model 'mobilenet_v4' (did you mean: tv/")
    assert "\n" not in err


def test_list_says_how_to_name_library_models(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "  timm/<name> " in out and "timm.list_models" in out
    assert "  tv/<name> " in out and "torchvision.models.list_models()" in out
    assert "timm/test_resnet" in MODELS and "timm/no_such_net" not in MODELS


@pytest.mark.parametrize(
    ("model", "method"),
    [
        ("timm/test_resnet", {"name": "drg"}),
        ("timm/test_efficientnet", {"name": "zfls"}),
        ("timm/test_resnet", {"name": "byot"}),
        ("tv/resnet18", {"name": "byot"}),
        ("tv/mobilenet_v3_small", {"name": "drg"}),
        ("tv/resnet18", {"name": "zfls"}),
    ],
)
def test_one_training_epoch_by_name(model, method, tiny_dict):
    cfg = config_from_dict(synthetic(tiny_dict, model, method))
    final = train(cfg, quiet=True)
    assert final["method"] == method["name"]
    rows = (Path(cfg.run.out_dir) / cfg.run.name / "metrics.jsonl").read_text().splitlines()
    row = json.loads(rows[-1])
    losses = [v for k, v in row.items() if k.startswith("train_") and "loss" in k]
    assert losses and all(v == v and abs(v) < 1e6 for v in losses)  # finite


def test_zfls_on_a_model_without_a_linear_head_is_one_line(tiny_dict):
    cfg = config_from_dict(synthetic(tiny_dict, "tv/mobilenet_v3_small", {"name": "zfls"}))
    with pytest.raises(ModelError, match=r"method zfls needs the model's final nn\.Linear"):
        train(cfg, quiet=True)


def test_user_taps_override_and_bad_taps(tiny_dict):
    model = build_model("tv/resnet18", num_classes=4, taps={"stage2": "layer3", "mine": "conv1"})
    assert model.taps["stage2"] == "layer3" and model.taps["mine"] == "conv1"
    with pytest.raises(ConfigError, match=r"model.options.taps.stage2 = 'layer9' names no module"):
        build_model("tv/resnet18", num_classes=4, taps={"stage2": "layer9"})


def test_pretrained_true_offline_is_one_line(no_internet, tiny_dict, tmp_path, capsys):
    with pytest.raises(ModelError) as info:
        build_model("timm/test_resnet", num_classes=4, pretrained=True)
    message = str(info.value)
    assert message.startswith("cannot get the pretrained weights of timm/test_resnet (")
    assert "model.options.pretrained: PATH" in message and "\n" not in message
    with pytest.raises(ModelError, match="cannot get the pretrained weights of tv/resnet18"):
        build_model("tv/resnet18", num_classes=4, pretrained=True)
    data = synthetic(tiny_dict, "tv/resnet18", {"name": "ce"}, pretrained=True)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["train", "-c", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot get the pretrained weights of tv/")


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_weights_from_a_local_file(fmt, tmp_path):
    torch.manual_seed(1)
    source = build_model("timm/test_resnet", num_classes=4)
    path = tmp_path / f"w.{fmt}"
    if fmt == "pth":
        torch.save({"state_dict": source.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(2)
    loaded = build_model("timm/test_resnet", num_classes=4, pretrained=str(path))
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # another class count: the backbone is loaded, the head is new (and said so)
    with pytest.warns(UserWarning, match=r"another class count\): the backbone is loaded"):
        other = build_model("timm/test_resnet", num_classes=7, weights=str(path))
    assert torch.equal(other.conv1[0].weight, source.conv1[0].weight)
    assert other.fc.out_features == 7


def test_weights_of_another_architecture_or_with_code_are_refused(tmp_path):
    path = tmp_path / "tv.pth"
    torch.save(build_model("tv/resnet18", num_classes=4).state_dict(), path)
    with pytest.raises(ModelError) as info:
        build_model("timm/test_resnet", num_classes=4, weights=str(path))
    assert str(info.value).startswith(f"weights file {path} is for another architecture: ")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(ModelError, match=f"cannot load weights file {bad} safely"):
        build_model("timm/test_resnet", num_classes=4, weights=str(bad))
    assert not marker.exists()
    with pytest.raises(ModelError, match="does not exist"):
        build_model("timm/test_resnet", num_classes=4, weights=str(tmp_path / "nope.pth"))


def test_train_from_local_weights_then_eval_rebuilds_by_name(tiny_dict, tmp_path, capsys):
    source = build_model("tv/resnet18", num_classes=4)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    data = synthetic(tiny_dict, "tv/resnet18", {"name": "ce"}, pretrained=str(path))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["train", "-c", str(config), "-q"]) == 0
    capsys.readouterr()
    run = Path(data["run"]["out_dir"]) / data["run"]["name"]
    final = json.loads((run / "final.json").read_text())
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1_err"] == pytest.approx(final["test_top1_err"])


def test_drg_on_a_vit_without_spatial_stages_is_one_line(tiny_dict):
    cfg = config_from_dict(
        synthetic(tiny_dict, "timm/test_vit", {"name": "drg"}, img_size=32, patch_size=8)
    )
    with pytest.raises(ModelError) as info:
        train(cfg, quiet=True)
    message = str(info.value)
    assert message.startswith("method drg needs feature taps ['stage2']: model VisionTransformer")
    assert "available: pooled" in message and "\n" not in message


def test_tv_pretrained_true_gets_a_new_head_for_another_class_count(monkeypatch):
    """The library's weights (faked: no network) load; the 1000-class head is replaced."""
    import torchvision
    import torchvision.models._api as api

    torch.manual_seed(3)
    library = torchvision.models.resnet18(num_classes=1000).state_dict()
    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return library

    monkeypatch.setattr(api, "load_state_dict_from_url", fake_download)
    with pytest.warns(UserWarning, match="pretrained with 1000 classes; the classifier is new"):
        model = build_model("tv/resnet18", num_classes=4, pretrained=True)
    assert urls and urls[0].startswith("https://download.pytorch.org/models/resnet18")
    assert torch.equal(model.conv1.weight, library["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, library["layer4.1.bn2.running_var"])
    assert model.fc.out_features == 4 and model.classifier is model.fc
    assert model.taps["pooled"] == "fc:input"
    # one input channel: the pretrained RGB filters are averaged into the new first conv
    gray = build_model("tv/resnet18", num_classes=4, in_channels=1, pretrained=True)
    expected = library["conv1.weight"].mean(dim=1, keepdim=True) * 3
    torch.testing.assert_close(gray.conv1.weight, expected)


def test_library_model_names_in_sweeps_and_phase1_runs(tiny_dict, tmp_path):
    """timm/<name> in a run-name template or a phase-1 name becomes timm-<name> (not a path)."""
    from selfkd.engine.runner import phase1_config
    from selfkd.sweep import load_sweep

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_dict))
    spec = {
        "base": str(base),
        "name": "{model}-{method}-s{seed}",
        "out_dir": str(tmp_path / "runs"),
        "grid": {"model.name": ["timm/test_resnet", "tv/resnet18"], "method": ["ce"]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    names = [r.name for r in load_sweep(path).runs]
    assert names == ["timm-test_resnet-ce-s0", "tv-resnet18-ce-s0"]
    cfg = config_from_dict(synthetic(tiny_dict, "timm/test_resnet", {"name": "aikd"}))
    phase1 = phase1_config(cfg)
    assert phase1.run.name.startswith("synthetic-timm-test_resnet-seed0-")
    assert "/" not in phase1.run.name
