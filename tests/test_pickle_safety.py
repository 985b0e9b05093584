"""Pickled dataset files are data, never code: the restricted unpickler of CIFAR's files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml

from dataset_writers import CIFAR10_NAMES, pickle_file, write_cifar10, write_cifar100
from selfkd.cli import main
from selfkd.data import DATASETS, build_data
from selfkd.data.safe_pickle import UnsafePickleError, load_data_pickle
from selfkd.errors import DataError


class _Payload:
    """Unpickling this calls open(marker, "w"): it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_meta(marker: Path) -> dict:
    names = [n.encode() for n in CIFAR10_NAMES]
    return {b"label_names": names, b"num_cases_per_batch": 4, b"x": _Payload(marker)}


def test_the_payload_runs_under_plain_pickle(tmp_path):
    """The control: plain pickle.load does run the payload (so the tests below can fail)."""
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_evil_meta(marker), protocol=2)
    pickle.loads(blob)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_payload_is_refused_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_evil_meta(marker), protocol=protocol)
    with pytest.raises(UnsafePickleError, match=r"asks for io\.open"):
        load_data_pickle(blob)
    assert not marker.exists()


def test_malicious_cifar_folder_is_refused_and_marker_never_created(tmp_path):
    marker = tmp_path / "pwned"
    write_cifar10(tmp_path / "data", meta=_evil_meta(marker))
    with pytest.raises(DataError) as info:
        DATASETS.get("cifar10")(str(tmp_path / "data"))
    message = str(info.value)
    assert "\n" not in message
    assert "refused to read CIFAR file" in message and "batches.meta" in message
    assert "io.open" in message
    assert not marker.exists()


def test_malicious_cifar_from_the_cli_is_one_line_exit_2(tmp_path, capsys, tiny_dict):
    marker = tmp_path / "pwned"
    root = tmp_path / "data"
    d = write_cifar10(root)
    # a train batch whose labels list carries the payload
    pickle_file(
        d / "data_batch_3",
        {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, _Payload(marker), 3]},
    )
    tiny_dict["data"] = {"name": "cifar10", "root": str(root), "batch_size": 8}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict))
    assert main(["train", "-c", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: refused to read CIFAR file") and "data_batch_3" in err
    assert "\n" not in err
    assert not marker.exists()
    assert not (Path(tiny_dict["run"]["out_dir"]) / "tiny" / "final.json").exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [("os", "system"), ("builtins", "eval"), ("numpy", "load"), ("subprocess", "Popen")],
)
def test_any_global_outside_the_allowlist_is_refused(module, name):
    # GLOBAL opcode naming module.name, then a call with one argument
    blob = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x04\x00\x00\x00echoq\x00\x85R."
    with pytest.raises(UnsafePickleError, match=f"{module}.{name}"):
        load_data_pickle(blob)


def test_codecs_encode_only_for_latin1():
    ok = pickle.dumps(b"\x00\xffabc", protocol=2)  # Python 3 writes _codecs.encode(.., latin1)
    assert load_data_pickle(ok) == b"\x00\xffabc"
    bad = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R."
    with pytest.raises(UnsafePickleError, match="only latin1"):
        load_data_pickle(bad)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_official_layout_still_loads(tmp_path, protocol):
    """Genuine files (dicts of bytes keys, lists, numpy arrays) load at every protocol."""
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    obj = {b"data": arr, b"labels": [1, 2], b"names": [b"a", b"b"], b"n": np.int64(7)}
    back = load_data_pickle(pickle.dumps(obj, protocol=protocol))
    np.testing.assert_array_equal(back[b"data"], arr)
    assert back[b"data"].dtype == np.uint8
    assert back[b"labels"] == [1, 2] and back[b"names"] == [b"a", b"b"] and back[b"n"] == 7

    write_cifar10(tmp_path / "c10")
    write_cifar100(tmp_path / "c100")
    c10 = build_data(name="cifar10", root=str(tmp_path / "c10"))
    assert c10.num_train == 20 and c10.class_names[0] == "plane"
    c100 = build_data(name="cifar100", root=str(tmp_path / "c100"), options={"labels": "coarse"})
    assert c100.num_classes == 20 and c100.num_train == 200
