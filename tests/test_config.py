from __future__ import annotations

import pytest

from selfkd.config import apply_overrides, config_from_dict, load_config, parse_override
from selfkd.errors import ConfigError
from selfkd.methods import build_method


def test_defaults_are_the_paper_protocol():
    cfg = config_from_dict({})
    assert cfg.train.epochs == 300 and cfg.train.lr == 0.1 and cfg.train.nesterov
    assert cfg.train.weight_decay == 5e-4 and cfg.train.milestones == [150, 225]
    assert cfg.method == {"name": "ce"}


def test_unknown_key_names_close_match():
    with pytest.raises(ConfigError, match=r"train\.epochz.*did you mean: epochs"):
        config_from_dict({"train": {"epochz": 3}})
    with pytest.raises(ConfigError, match=r"unknown config section 'trian'.*train"):
        config_from_dict({"trian": {}})


def test_types_and_choices_are_checked():
    with pytest.raises(ConfigError, match=r"train.epochs must be an integer"):
        config_from_dict({"train": {"epochs": "many"}})
    with pytest.raises(ConfigError, match=r"run.amp must be one of"):
        config_from_dict({"run": {"amp": "fp8"}})
    with pytest.raises(ConfigError, match=r"train.lr must be positive"):
        config_from_dict({"train": {"lr": -1}})
    # YAML 1.1 reads a bare `off` as false: accepted for on/off choices
    assert config_from_dict({"run": {"amp": False, "progress": False}}).run.amp == "off"
    with pytest.raises(ConfigError, match=r"run\.amp must be a string"):
        config_from_dict({"run": {"amp": True}})
    # YAML reads 5e-4 as a string; it is still accepted as a number
    assert config_from_dict({"train": {"weight_decay": "5e-4"}}).train.weight_decay == 5e-4


def test_overrides_parse_yaml_values():
    assert parse_override("train.lr=0.05") == (["train", "lr"], 0.05)
    assert parse_override("train.milestones=[1, 2]") == (["train", "milestones"], [1, 2])
    data = apply_overrides({"train": {"lr": 0.1}}, ["train.lr=0.5", "method.name=ce"])
    assert data == {"train": {"lr": 0.5}, "method": {"name": "ce"}}
    with pytest.raises(ConfigError, match=r"key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match=r"malformed"):
        parse_override("train..lr=1")


def test_base_file_is_merged(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {epochs: 5, lr: 0.2}\nmethod: {name: ce}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {lr: 0.3}\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.epochs=7"])
    assert (cfg.train.epochs, cfg.train.lr) == (7, 0.3)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1,\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"must be a mapping"):
        load_config(listy)


def test_method_params_are_validated():
    with pytest.raises(ConfigError, match=r"unknown method 'cee'.*did you mean: ce"):
        build_method({"name": "cee"})
    with pytest.raises(ConfigError, match=r"unknown key method.alpha"):
        build_method({"name": "ce", "alpha": 1})


def test_base_cycle_is_a_one_line_error_naming_the_cycle(tmp_path, capsys):
    from selfkd.cli import main

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("base: sub/b.yaml\ntrain: {epochs: 1}\n")
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\n")
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    a, b, me = tmp_path / "a.yaml", tmp_path / "sub" / "b.yaml", tmp_path / "self.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(a)
    assert str(info.value) == (
        f"config {a}: its base: files form a cycle ({a} -> {b} -> {a}); "
        "remove or change one of these base: lines"
    )
    with pytest.raises(ConfigError, match=rf"cycle \({me} -> {me}\)"):
        load_config(me)
    assert main(["train", "-c", str(b)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: config {b}: its base: files form a cycle ({b} -> {a} -> {b}); "
        "remove or change one of these base: lines\n"
    )
    # a sweep whose base is the sweep file itself
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: sweep.yaml\ngrid: {run.seed: [0, 1]}\n")
    assert main(["sweep", str(sweep), "--dry-run"]) == 2
    assert f"cycle ({sweep} -> {sweep})" in capsys.readouterr().err
