"""selfkd report: grouping by setting and method, mean ± std recomputed from the runs' files."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import yaml

from selfkd.cli import main
from selfkd.errors import RunDirError
from selfkd.report.table import find_runs, group_runs, method_label, report


def fake_run(
    root: Path, name: str, method: dict, seed: int, top1: float | None, epochs: int = 10
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = {
        "run": {"name": name, "seed": seed},
        "data": {"name": "synthetic"},
        "model": {"name": "resnet8", "options": {"width": 4}},
        "train": {"epochs": epochs},
        "method": method,
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    if top1 is not None:
        final = {
            "status": "finished",
            "test_top1_err": top1,
            "test_nll": top1 / 100,
            "test_ece": 1.0 + seed,
            "sec_per_iter": 0.1,
            "parameters": 1000,
        }
        (run / "final.json").write_text(json.dumps(final))
    return run


def test_mean_std_and_grouping(tmp_path, capsys):
    errs = {"ce": [10.0, 12.0, 11.0], "pskd": [9.0, 9.5, 10.5]}
    for method, values in errs.items():
        for seed, value in enumerate(values):
            fake_run(tmp_path, f"{method}-{seed}", {"name": method}, seed, value)
    fake_run(
        tmp_path, "aikd-0", {"name": "aikd", "ablation": "no_adv", "superior": "/x.pt"}, 0, 8.0
    )
    fake_run(tmp_path, "pskd-crashed", {"name": "pskd"}, 3, None)
    fake_run(tmp_path, "ce-other-setting", {"name": "ce"}, 0, 50.0, epochs=99)

    settings = group_runs(find_runs([tmp_path]))
    assert len(settings) == 2  # the 99-epoch run is never averaged with the others
    text = report([tmp_path])
    mean, std = statistics.fmean(errs["ce"]), statistics.stdev(errs["ce"])
    assert f"{mean:.2f} ± {std:.2f}" in text
    p_mean, p_std = statistics.fmean(errs["pskd"]), statistics.stdev(errs["pskd"])
    assert f"<u>{p_mean:.2f} ± {p_std:.2f}</u>" in text  # second best
    assert "**8.00 ± n/a**" in text  # best; one seed has no spread to show
    assert not re.search(r"± 0\.0+(?![0-9])", text)  # never a spread of zero for one seed
    assert "| pskd | 3 (+1 incomplete) |" in text
    assert "aikd (ablation=no_adv)" in text and "/x.pt" not in text
    assert main(["report", str(tmp_path), "--csv", str(tmp_path / "t.csv")]) == 0
    assert "pskd" in (tmp_path / "t.csv").read_text()


def test_labels_and_errors(tmp_path):
    assert method_label({"name": "aikd", "alpha_g": 0.1}) == "aikd"
    assert method_label({"name": "aikd", "critic_norm": "none"}) == "aikd (critic_norm=none)"
    with pytest.raises(RunDirError, match="does not exist"):
        find_runs([tmp_path / "nope"])
    with pytest.raises(RunDirError, match="no run directories"):
        find_runs([tmp_path])


def test_broken_config_or_final_is_listed_and_the_rest_reported(tmp_path, capsys):
    for seed, value in enumerate([10.0, 12.0]):
        fake_run(tmp_path, f"ce-{seed}", {"name": "ce"}, seed, value)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.yaml").write_bytes(b"\x00\xff\xfe not yaml [")
    unclosed = tmp_path / "unclosed"
    unclosed.mkdir()
    (unclosed / "config.yaml").write_text("run: {seed: [1,\n")
    listy = tmp_path / "listy"
    listy.mkdir()
    (listy / "config.yaml").write_text("- 1\n- 2\n")
    corrupt = fake_run(tmp_path, "ce-corrupt", {"name": "ce"}, 2, 11.0)
    (corrupt / "final.json").write_text('{"status": "finished", "test_top1_')

    assert main(["report", str(tmp_path), "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    cell = f"{statistics.fmean([10.0, 12.0]):.2f} ± {statistics.stdev([10.0, 12.0]):.2f}"
    line = next(x for x in out.splitlines() if x.startswith("| ce |"))
    assert line.startswith("| ce | 2 (+1 broken) |") and cell in line
    assert f"- {garbage}: broken: config.yaml is not text (not UTF-8) (skipped)" in out
    assert f"- {unclosed}: broken: config.yaml is not valid YAML at line 2 (skipped)" in out
    assert f"- {listy}: broken: config.yaml holds a list, not a mapping of sections" in out
    assert f"- {corrupt}: broken: final.json is corrupt (not valid JSON: " in out
    listed = [x for x in out.splitlines() if x.startswith("- ")]
    assert len(listed) == 4  # every unreadable folder, one line each
    assert "ce" in (tmp_path / "t.csv").read_text()


def test_seeds_are_distinct_and_duplicates_split_or_warned(tmp_path):
    fake_run(tmp_path, "a-ce-s0", {"name": "ce"}, 0, 10.0)
    fake_run(tmp_path, "b-ce-s0-again", {"name": "ce"}, 0, 30.0)  # same seed, same config
    fake_run(tmp_path, "c-ce-s1", {"name": "ce"}, 1, 12.0)
    text = report([tmp_path], cost=False)
    line = next(x for x in text.splitlines() if x.startswith("| ce |"))
    # two seeds, not three runs; the mean uses the first run of seed 0 by path
    cell = f"{statistics.fmean([10.0, 12.0]):.2f} ± {statistics.stdev([10.0, 12.0]):.2f}"
    assert line.startswith("| ce | 2 (+1 duplicate) |") and cell in line
    a, b = tmp_path / "a-ce-s0", tmp_path / "b-ce-s0-again"
    assert (
        f"ce: seed 0 has 2 finished runs that nothing recorded about the run tells apart "
        f"({a}, {b}); the mean uses {a} only"
    ) in text
    assert f"- {b}: duplicate of seed 0: the mean uses {a}" in text

    # the same seed once in one process and once in two: split by what the records say differs
    split = tmp_path / "split"
    for name, seed, value, world in (
        ("s0", 0, 10.0, 1),
        ("s1", 1, 12.0, 1),
        ("s0-ddp", 0, 11.0, 2),
    ):
        run = fake_run(split, name, {"name": "ce"}, seed, value)
        final = json.loads((run / "final.json").read_text())
        (run / "final.json").write_text(json.dumps({**final, "world_size": world}))
    text = report([split], cost=False)
    single = next(x for x in text.splitlines() if x.startswith("| ce [world_size=1] |"))
    ddp = next(x for x in text.splitlines() if x.startswith("| ce [world_size=2] |"))
    assert single.startswith("| ce [world_size=1] | 2 |") and cell in single
    assert ddp.startswith("| ce [world_size=2] | 1 |") and "11.00 ± n/a" in ddp
    assert "ce: runs of the same seed differ in world_size; each value is its own row" in text
    assert "duplicate" not in text


def test_baseline_adds_paired_differences(tmp_path, capsys):
    errs = {"ce": [10.0, 12.0, 11.0], "pskd": [9.0, 9.5, 10.5]}
    for method, values in errs.items():
        for seed, value in enumerate(values):
            fake_run(tmp_path, f"{method}-{seed}", {"name": method}, seed, value)
    fake_run(tmp_path, "cskd-1", {"name": "cskd"}, 1, 11.5)  # one paired seed
    fake_run(tmp_path, "dlb-7", {"name": "dlb"}, 7, 9.0)  # no seed in common with ce
    assert (
        main(["report", str(tmp_path), "--baseline", "ce", "--csv", str(tmp_path / "t.csv")]) == 0
    )
    out = capsys.readouterr().out
    out = out[out.index("Paired difference to ce (method − ce on the same seeds)") :]
    t2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t_{0.975} with 2 degrees of freedom
    # pskd - ce per seed: -1, -2.5, -0.5 (lower error is better: 3 wins)
    diffs = [p - c for p, c in zip(errs["pskd"], errs["ce"], strict=True)]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = t2 * sd / math.sqrt(3)
    line = next(x for x in out.splitlines() if x.startswith("| pskd | 3 | "))
    cells = line.split(" | ")
    assert cells[2] == f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] 3/3"
    # NLL is top-1/100 here, to 4 digits
    nll = [d / 100 for d in diffs]
    m, s = sum(nll) / 3, math.sqrt(sum((d - sum(nll) / 3) ** 2 for d in nll) / 2)
    h = t2 * s / math.sqrt(3)
    assert cells[3] == f"{m:+.4f} [{m - h:+.4f}, {m + h:+.4f}] 3/3"
    # ECE is 1 + seed for both: no difference, no win
    assert cells[4].startswith("+0.00 [+0.00, +0.00] 0/3")
    assert "| cskd | 1 | -0.50 [n/a] 1/1 |" in out  # 11.5 - 12.0 on seed 1
    assert "| dlb | 0 | - | - | - |" in out
    table = (tmp_path / "t.csv").read_text().splitlines()
    header = table[0].split(",")
    pskd = dict(zip(header, next(r for r in table if ",pskd," in r).split(","), strict=True))
    assert float(pskd["top1_err_diff"]) == pytest.approx(mean)
    assert float(pskd["top1_err_diff_low"]) == pytest.approx(mean - half)
    assert (pskd["top1_err_wins"], pskd["top1_err_pairs"]) == ("3", "3")


def test_baseline_errors_are_one_line(tmp_path, capsys):
    fake_run(tmp_path, "ce-0", {"name": "ce"}, 0, 10.0)
    fake_run(tmp_path, "pskd-1", {"name": "pskd"}, 1, 9.0)
    csv_path = tmp_path / "t.csv"
    assert main(["report", str(tmp_path), "--baseline", "nope", "--csv", str(csv_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not csv_path.exists()
    assert captured.err == (
        "error: --baseline 'nope' is not a method of these runs; methods: ce, pskd (quote a "
        "label with parameters, e.g. --baseline 'aikd (ablation=no_adv)')\n"
    )
    assert main(["report", str(tmp_path), "--baseline", "ce"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "error: --baseline 'ce': no other method has a finished run with the same run.seed "
        "as a ce run in the same setting; paired differences need both methods trained on "
        "the same seeds\n"
    )


def test_meta_section_and_download_flag_do_not_split_settings(tmp_path):
    for seed, (host, download) in enumerate([("a", False), ("b", True)]):
        run = fake_run(tmp_path, f"ce-{seed}", {"name": "ce"}, seed, 10.0 + seed)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["meta"] = {"host": host, "git_commit": f"c{seed}", "world_size": 1}
        config["data"]["download"] = download
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    settings = group_runs(find_runs([tmp_path]))
    assert len(settings) == 1
    ((groups),) = settings.values()
    assert [(g.label, len(g.runs)) for g in groups] == [("ce", 2)]
    # the same seed twice, from two commits: one run is kept, the warning says what differs
    run = fake_run(tmp_path, "ce-0-later", {"name": "ce"}, 0, 11.0)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["meta"] = {"host": "a", "git_commit": "c9", "world_size": 1}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    text = report([tmp_path], cost=False)
    first, later = tmp_path / "ce-0", tmp_path / "ce-0-later"
    assert "| ce | 2 (+1 duplicate) |" in text
    assert (
        "ce: seed 0 has 2 finished runs that nothing recorded about the run tells apart (they "
        f"differ only in git_commit) ({first}, {later}); the mean uses {first} only"
    ) in text


def _val_rows(run: Path, rows: list[dict]) -> None:
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_split_val_reads_the_last_validation_row_and_never_the_test_split(tmp_path, capsys):
    """--split val: the means and paired differences come from each run's last metrics.jsonl
    row that evaluated the validation split (a later row without val_* keys, a truncated line
    and final.json's test numbers are not used)."""
    val = {"ce": [20.0, 22.0], "pskd": [19.0, 21.5]}
    for method, values in val.items():
        for seed, value in enumerate(values):
            run = fake_run(tmp_path, f"{method}-{seed}", {"name": method}, seed, top1=5.0)
            _val_rows(
                run,
                [
                    {"epoch": 1, "val_top1_err": 90.0, "val_nll": 2.0},
                    {"epoch": 2, "val_top1_err": value, "val_nll": value / 10},
                    {"epoch": 2, "train_loss": 0.1},  # no evaluation in this row
                ],
            )
            with (run / "metrics.jsonl").open("a") as handle:
                handle.write('{"epoch": 3, "val_top1')  # truncated line: skipped
    assert main(["report", str(tmp_path), "--split", "val", "--baseline", "ce", "--no-cost"]) == 0
    out = capsys.readouterr().out
    assert "Validation split (held out of the training set), last epoch" in out
    assert "Test split" not in out
    ce = next(x for x in out.splitlines() if x.startswith("| ce | 2 | "))
    mean, sd = statistics.fmean(val["ce"]), statistics.stdev(val["ce"])
    assert f"{mean:.2f} ± {sd:.2f}" in ce and "5.00" not in ce
    assert f"{statistics.fmean([2.0, 2.2]):.4f}" in ce  # NLL from the same rows
    paired = out[out.index("Paired difference to ce") :]
    # pskd - ce per seed: -1.0, -0.5; t_{0.975} with 1 dof = tan(0.475 pi)
    diffs = [-1.0, -0.5]
    m, s = statistics.fmean(diffs), statistics.stdev(diffs)
    half = math.tan(0.475 * math.pi) * s / math.sqrt(2)
    line = next(x for x in paired.splitlines() if x.startswith("| pskd | 2 | "))
    assert line.split(" | ")[2] == f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}] 2/2"


def test_split_val_without_validation_rows_shows_no_values(tmp_path, capsys):
    fake_run(tmp_path, "ce-0", {"name": "ce"}, 0, top1=5.0)  # no metrics.jsonl at all
    assert main(["report", str(tmp_path), "--split", "val", "--no-cost"]) == 0
    out = capsys.readouterr().out
    assert "| ce | 1 |" in out and "5.00" not in out
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path), "--split", "train"])
    assert exc.value.code == 2
