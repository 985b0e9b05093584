"""Sweeps: plan expansion, errors before anything runs, the shipped paper sweeps, a real sweep."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from selfkd.cli import main
from selfkd.errors import ConfigError
from selfkd.sweep import expand, load_sweep, run_sweep

ROOT = Path(__file__).parents[1]
PAPER = ROOT / "configs" / "paper"
SWEEPS = sorted(
    p
    for p in PAPER.rglob("*.yaml")
    if "grid" in (yaml.safe_load(p.read_text()) or {})
    or "runs" in (yaml.safe_load(p.read_text()) or {})
)
#: run counts per sweep file, as docs/reproduce.md states them
EXPECTED = {
    "aikd/table2_3_cifar100.yaml": 30,
    "aikd/table2_3_tiny_imagenet.yaml": 30,
    "aikd/table2_3_cub200.yaml": 30,
    "aikd/table2_3_stanford_dogs.yaml": 30,
    "aikd/table2_3_mit67.yaml": 30,
    "aikd/table2_3_fgvc_aircraft.yaml": 30,
    "aikd/table4_ablation.yaml": 15,
    "aikd/table5_omega.yaml": 24,
    "aikd/table6_weights.yaml": 18,
    "aikd/table7_mix.yaml": 27,
    "pskd/table1_cifar100.yaml": 30,
    "pskd/table4_imagenet.yaml": 5,
    "pskd/table4_imagenet_cutmix.yaml": 5,
    "drg/table1_cifar100.yaml": 60,
    "drg/table2_tiny_imagenet.yaml": 21,
    "drg/table3_cifar100.yaml": 24,
    "drg/table4_cifar100.yaml": 18,
    "cpu/fmnist_aikd_study.yaml": 12,
    "cpu/fmnist_methods.yaml": 33,
    "cpu/fmnist_comparison.yaml": 54,
    "cpu/fmnist_bank_precision.yaml": 12,
    "cpu/fmnist_stack.yaml": 9,
    "cpu/fmnist_aikd_search.yaml": 24,
    "cpu/fmnist_aikd_verdict.yaml": 15,
    "cpu/fmnist_aikd_regime2.yaml": 15,
    "cpu/fmnist_aikd_regime3.yaml": 15,
}


def write_base(tmp_path: Path, tiny: dict[str, Any]) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(tiny))
    return path


def write_sweep(tmp_path: Path, spec: dict[str, Any], name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --- expansion --------------------------------------------------------------------------------
def test_grid_product_method_shorthand_and_templates(tmp_path, tiny_dict):
    write_base(tmp_path, tiny_dict)
    spec = {
        "base": "base.yaml",
        "name": "{dataset}-{model}-{method}-s{seed}-lr{lr}",
        "out_dir": str(tmp_path / "out"),
        "grid": {
            "method": ["ce", {"name": "aikd", "ablation": "no_adv"}],
            "run.seed": [0, 1],
            "train.lr": [0.05, 0.1],
        },
        "set": {"train.epochs": 7},
    }
    runs = expand(spec, tmp_path)
    assert len(runs) == 8
    names = [r.name for r in runs]
    assert names[:4] == [
        "synthetic-resnet8-ce-s0-lr0.05",
        "synthetic-resnet8-ce-s0-lr0.1",
        "synthetic-resnet8-ce-s1-lr0.05",
        "synthetic-resnet8-ce-s1-lr0.1",
    ]
    assert names[4] == "synthetic-resnet8-aikd-no_adv-s0-lr0.05"
    assert runs[0].config.method == {"name": "ce"}
    assert runs[4].config.method == {"name": "aikd", "ablation": "no_adv"}
    assert all(r.config.train.epochs == 7 for r in runs)
    assert all(r.config.run.out_dir == str(tmp_path / "out") for r in runs)
    assert runs[3].config.run.seed == 1 and runs[3].config.train.lr == 0.1
    assert runs[5].overrides == {
        "method": {"name": "aikd", "ablation": "no_adv"},
        "run.seed": 0,
        "train.lr": 0.1,
    }
    assert {r.status() for r in runs} == {"new"}


def test_method_mapping_merges_with_same_method_and_replaces_another(tmp_path, tiny_dict):
    tiny_dict["method"] = {"name": "cskd", "lam": 3.0}
    write_base(tmp_path, tiny_dict)
    spec = {
        "base": "base.yaml",
        "name": "{method}-{lam}",
        "grid": {"method": [{"tau": 2.0}, {"name": "pskd", "alpha_T": 0.5, "lam": 1}]},
    }
    with pytest.raises(ConfigError, match=r"entry 2 .*unknown key method\.lam"):
        expand(spec, tmp_path)
    spec["grid"]["method"][1].pop("lam")
    spec["name"] = "{method}-{seed}-{mname}"
    spec["grid"]["method"][0]["name"] = "cskd"
    with pytest.raises(ConfigError, match=r"unknown field \{mname\}"):
        expand(spec, tmp_path)
    spec["name"] = "{method}"
    runs = expand(spec, tmp_path)
    assert runs[0].config.method == {"name": "cskd", "lam": 3.0, "tau": 2.0}
    assert runs[0].name == "cskd"
    assert runs[1].config.method == {"name": "pskd", "alpha_T": 0.5}


def test_explicit_runs_are_crossed_with_the_grid(tmp_path, tiny_dict):
    write_base(tmp_path, tiny_dict)
    spec = {
        "base": "base.yaml",
        "name": "w-ce{alpha_ce}-g{method_alpha_g}-s{seed}",
        "set": {"method": {"name": "aikd"}},
        "runs": [
            {"method.alpha_ce": 0.6, "method.alpha_g": 0.1, "run.name": "default-s{seed}"},
            {"method.alpha_ce": 0.7, "method.alpha_g": 0.2, "method.alpha_p": 0.1},
        ],
        "grid": {"run.seed": [0, 1]},
    }
    runs = expand(spec, tmp_path)
    assert [r.name for r in runs] == [
        "default-s0",
        "default-s1",
        "w-ce0.7-g0.2-s0",
        "w-ce0.7-g0.2-s1",
    ]
    assert runs[2].config.method == {
        "name": "aikd",
        "alpha_ce": 0.7,
        "alpha_g": 0.2,
        "alpha_p": 0.1,
    }
    assert runs[2].entry.startswith("entry 3 runs[1] + grid")


def test_cli_set_and_only(tmp_path, tiny_dict):
    write_base(tmp_path, tiny_dict)
    path = write_sweep(
        tmp_path,
        {"base": "base.yaml", "grid": {"method": ["ce", "pskd"], "run.seed": [0, 1]}},
    )
    sweep = load_sweep(path, ["train.epochs=1", "run.out_dir=elsewhere"], only="*pskd-s1")
    assert [r.name for r in sweep.runs] == ["synthetic-resnet8-pskd-s1"]
    assert sweep.runs[0].config.train.epochs == 1
    assert sweep.runs[0].path == Path("elsewhere/synthetic-resnet8-pskd-s1")
    assert len(load_sweep(path, only="pskd").runs) == 2
    with pytest.raises(ConfigError, match="no run name matches"):
        load_sweep(path, only="zzz")


# --- errors -----------------------------------------------------------------------------------
def test_unknown_key_in_grid_names_the_entry_and_key(tmp_path, tiny_dict):
    write_base(tmp_path, tiny_dict)
    spec = {"base": "base.yaml", "grid": {"method": ["ce", "pskd"], "train.epoch": [1]}}
    with pytest.raises(ConfigError, match=r"entry 1 grid .*train\.epoch.*did you mean: epochs"):
        expand(spec, tmp_path)


def test_unknown_method_parameter_or_name(tmp_path, tiny_dict):
    write_base(tmp_path, tiny_dict)
    spec = {"base": "base.yaml", "grid": {"method": ["ce", {"name": "aikd", "ablaton": "x"}]}}
    with pytest.raises(ConfigError, match=r"entry 2 .*method\.ablaton.*did you mean: ablation"):
        expand(spec, tmp_path)
    spec = {"base": "base.yaml", "grid": {"method": ["ce", "aikdd"]}}
    with pytest.raises(ConfigError, match=r"entry 2 .*unknown method 'aikdd'.*aikd"):
        expand(spec, tmp_path)
    spec = {"base": "base.yaml", "grid": {"method.ablation": ["none", "no_advv"]}}
    spec["set"] = {"method": "aikd"}
    with pytest.raises(ConfigError, match=r"entry 2 .*no_advv"):
        expand(spec, tmp_path)


def test_bad_sweep_keys_templates_and_grids(tmp_path, tiny_dict):
    write_base(tmp_path, tiny_dict)
    with pytest.raises(ConfigError, match=r"unknown sweep key 'gird'.*did you mean: grid"):
        expand({"base": "base.yaml", "gird": {}}, tmp_path)
    with pytest.raises(ConfigError, match=r"unknown field \{metod\}.*did you mean: method"):
        expand({"base": "base.yaml", "name": "{metod}-{seed}"}, tmp_path)
    with pytest.raises(ConfigError, match=r"grid\.run\.seed must be a list"):
        expand({"base": "base.yaml", "grid": {"run.seed": 3}}, tmp_path)
    with pytest.raises(ConfigError, match="config file not found"):
        expand({"base": "missing.yaml"}, tmp_path)


def test_duplicate_run_names_are_an_error(tmp_path, tiny_dict):
    write_base(tmp_path, tiny_dict)
    spec = {"base": "base.yaml", "name": "x-{method}", "grid": {"run.seed": [0, 1]}}
    with pytest.raises(ConfigError, match=r"same run .*x-ce: entry 1 .* and entry 2"):
        expand(spec, tmp_path)


# --- the shipped paper sweeps -----------------------------------------------------------------
def test_every_paper_sweep_is_listed():
    assert {str(p.relative_to(PAPER)) for p in SWEEPS} == set(EXPECTED)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: str(p.relative_to(PAPER)))
def test_paper_sweep_dry_run(path, tmp_path, monkeypatch, capsys):
    text = path.read_text()
    if "data.mix" in text:
        mixing = pytest.importorskip(
            "selfkd.data.mixing", reason="needs data.mix (selfkd.data.mixing is not there yet)"
        )
        assert mixing.Mixer is not None
    monkeypatch.chdir(tmp_path)  # run folders are relative to the cwd: nothing may appear here
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    expected = EXPECTED[str(path.relative_to(PAPER))]
    assert f"{expected} runs: 0 finished, 0 partial (to resume), {expected} new" in out
    assert list(tmp_path.iterdir()) == []
    runs = load_sweep(path).runs
    assert len({r.path for r in runs}) == expected


def test_fmnist_study_sweep_reproduces_the_script_names():
    runs = load_sweep(PAPER / "cpu" / "fmnist_aikd_study.yaml").runs
    names = {r.name for r in runs}
    assert names == {
        f"study-aikd-{a}-s{s}"
        for a in ("none", "no_adv", "only_guide", "only_progressive")
        for s in (0, 1, 2)
    }
    assert {r.config.run.out_dir for r in runs} == {"runs/fmnist-study"}
    assert {r.config.data.per_class for r in runs} == {100}
    assert all(r.config.method["name"] == "aikd" for r in runs)


# --- running ----------------------------------------------------------------------------------
def tiny_sweep(tmp_path: Path, tiny: dict[str, Any]) -> Path:
    tiny["train"]["epochs"] = 2
    write_base(tmp_path, tiny)
    return write_sweep(
        tmp_path,
        {
            "base": "base.yaml",
            "name": "{method}-s{seed}",
            "out_dir": str(tmp_path / "runs"),
            "grid": {"method": ["ce", "label_smoothing"], "run.seed": [0, 1]},
        },
    )


def test_real_sweep_interrupt_resume_and_report(tmp_path, tiny_dict):
    from selfkd.report.table import report

    path = tiny_sweep(tmp_path, tiny_dict)
    runs = load_sweep(path).runs
    assert [r.name for r in runs] == ["ce-s0", "ce-s1", "label_smoothing-s0", "label_smoothing-s1"]

    def crash_second_run(trainer, epoch):
        if trainer.cfg.run.name == "ce-s1" and epoch == 1:
            raise RuntimeError("simulated crash after epoch 1")

    seen: list[tuple[str, str]] = []
    first = run_sweep(
        runs,
        log=lambda *_: None,
        on_run_end=lambda run, outcome, error: seen.append((run.name, outcome)),
        callbacks=[crash_second_run],
    )
    assert first.failed == [("ce-s1", "RuntimeError: simulated crash after epoch 1")]
    assert first.trained == ["ce-s0", "label_smoothing-s0", "label_smoothing-s1"]
    assert seen[1] == ("ce-s1", "failed") and len(seen) == 4
    assert [r.status() for r in runs] == ["finished", "partial", "finished", "finished"]

    second = run_sweep(load_sweep(path).runs, log=lambda *_: None)
    assert second.ok
    assert second.skipped == ["ce-s0", "label_smoothing-s0", "label_smoothing-s1"]
    assert second.resumed == ["ce-s1"] and second.trained == []
    assert "resuming" in (tmp_path / "runs" / "ce-s1" / "train.log").read_text()
    rows = (tmp_path / "runs" / "ce-s1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]

    table = report([tmp_path / "runs"], cost=False)
    for method in ("ce", "label_smoothing"):
        errs = [
            json.loads((tmp_path / "runs" / f"{method}-s{s}" / "final.json").read_text())[
                "test_top1_err"
            ]
            for s in (0, 1)
        ]
        cell = f"{statistics.fmean(errs):.2f} ± {statistics.stdev(errs):.2f}"
        line = next(x for x in table.splitlines() if x.startswith(f"| {method} |"))
        assert "| 2 |" in line and cell in line, (cell, line)


def test_cli_sweep_reports_failures_and_goes_on(tmp_path, tiny_dict, capsys):
    tiny_dict["train"]["epochs"] = 1
    write_base(tmp_path, tiny_dict)
    path = write_sweep(
        tmp_path,
        {
            "base": "base.yaml",
            "name": "{dataset}-s{seed}",
            "out_dir": str(tmp_path / "runs"),
            "grid": {"data.name": ["no-such-data", "synthetic"]},
        },
    )
    assert main(["sweep", str(path)]) == 1
    out = capsys.readouterr().out
    assert "1 trained, 0 resumed, 0 skipped (finished), 1 failed" in out
    assert "failed: no-such-data-s0: unknown dataset 'no-such-data'" in out
    assert (tmp_path / "runs" / "synthetic-s0" / "final.json").is_file()
    assert main(["sweep", str(path), "--only", "synthetic", "--dry-run"]) == 0
    assert "1 runs: 1 finished, 0 partial (to resume), 0 new" in capsys.readouterr().out


@pytest.mark.parametrize("stop", ["ctrl-c", "signal"])
def test_interrupt_stops_the_sweep(tmp_path, tiny_dict, stop):
    from selfkd.errors import RunInterrupted

    path = tiny_sweep(tmp_path, tiny_dict)
    calls = []
    error = KeyboardInterrupt() if stop == "ctrl-c" else RunInterrupted("stopped by SIGTERM", 15)

    def fake_train(cfg, **kwargs):
        calls.append((cfg.run.name, kwargs["resume"]))
        if len(calls) == 2:
            raise error

    with pytest.raises(type(error)):
        run_sweep(load_sweep(path).runs, train_fn=fake_train, log=lambda *_: None)
    assert calls == [("ce-s0", False), ("ce-s1", False)]


def test_a_run_failing_before_its_folder_exists_is_recorded_and_reported(tmp_path, tiny_dict):
    from selfkd.report.table import report
    from selfkd.sweep import SWEEP_RECORD, read_failures

    tiny_dict["train"]["epochs"] = 1
    write_base(tmp_path, tiny_dict)
    out = tmp_path / "runs"
    path = write_sweep(
        tmp_path,
        {
            "base": "base.yaml",
            "name": "{dataset}-s{seed}",
            "out_dir": str(out),
            "grid": {"data.name": ["no-such-data", "synthetic"]},
        },
    )
    assert main(["sweep", str(path)]) == 1
    assert not (out / "no-such-data-s0").exists()  # it failed before its folder was made
    record = read_failures(out / SWEEP_RECORD)
    assert list(record) == ["no-such-data-s0"]
    assert record["no-such-data-s0"]["error"].startswith("unknown dataset 'no-such-data'")
    assert record["no-such-data-s0"]["config"]["data"]["name"] == "no-such-data"

    text = report([out], cost=False)
    rows = [x for x in text.splitlines() if x.startswith("| ce |")]
    assert len(rows) == 2  # one per setting: both runs are listed
    assert any(x.startswith("| ce | 0 (+1 failed) |") for x in rows)
    assert any(x.startswith("| ce | 1 |") for x in rows)
    failed = [x for x in text.splitlines() if x.startswith(f"- {out / 'no-such-data-s0'}: ")]
    assert len(failed) == 1
    assert "failed: unknown dataset 'no-such-data'" in failed[0]
    assert failed[0].endswith("(recorded by the sweep)")


def test_the_sweep_record_drops_a_run_once_it_succeeds(tmp_path, tiny_dict):
    from selfkd.report.table import report
    from selfkd.sweep import SWEEP_RECORD, read_failures

    path = tiny_sweep(tmp_path, tiny_dict)
    runs = load_sweep(path).runs[:2]
    record = tmp_path / "runs" / SWEEP_RECORD

    def fail_first(cfg, **kwargs):
        if cfg.run.name == "ce-s0":
            raise RuntimeError("disk on fire")

    first = run_sweep(runs, train_fn=fail_first, log=lambda *_: None)
    assert first.failed == [("ce-s0", "RuntimeError: disk on fire")]
    assert list(read_failures(record)) == ["ce-s0"]
    assert read_failures(record)["ce-s0"]["entry"] == runs[0].entry
    second = run_sweep(runs, train_fn=lambda cfg, **kwargs: None, log=lambda *_: None)
    assert second.ok and read_failures(record) == {}

    # a corrupt record is listed as broken by the report and replaced by the next failure
    record.write_text("{not json")
    fake = tmp_path / "runs" / "ce-s1"
    fake.mkdir()
    (fake / "config.yaml").write_text(yaml.safe_dump(runs[1].config.to_dict()))
    text = report([tmp_path / "runs"], cost=False)
    assert f"- {record}: broken: sweep record is corrupt (not valid JSON: " in text
    assert "| ce | 0 (+1 incomplete) |" in text
    run_sweep(runs[:1], train_fn=fail_first, log=lambda *_: None)
    assert list(read_failures(record)) == ["ce-s0"]
