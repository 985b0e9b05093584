"""PredictionBank: one-hot start, vectorized row updates, dtypes and exact state round trips."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from selfkd.banks import PredictionBank
from selfkd.errors import ConfigError

LABELS = torch.tensor([2, 0, 1, 2, 3, 0])
N, K = 6, 4


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def expected_one_hot_log(labels) -> np.ndarray:
    out = np.full((len(labels), K), -np.inf)
    out[np.arange(len(labels)), np.asarray(labels)] = 0.0
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_starts_one_hot(dtype: torch.dtype) -> None:
    bank = PredictionBank(N, K, LABELS, dtype=dtype)
    assert bank.table.dtype == dtype and bank.dtype == dtype
    rows = bank.lookup(torch.arange(N))
    assert rows.dtype == torch.float32 and rows.shape == (N, K)
    np.testing.assert_array_equal(rows.numpy(), expected_one_hot_log(LABELS))
    np.testing.assert_array_equal(bank.probs(torch.tensor([4, 1])).numpy(), np.eye(K)[[3, 0]])


def test_update_replaces_rows_and_leaves_others() -> None:
    bank = PredictionBank(N, K, LABELS, dtype=torch.float32)
    logits = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, 0.5, 3.0, 0.0]], requires_grad=True)
    bank.update(torch.tensor([4, 1]), logits)
    assert not bank.table.requires_grad
    rows = bank.lookup(torch.arange(N)).numpy()
    np.testing.assert_allclose(rows[[4, 1]], np_log_softmax(logits.detach().numpy()), atol=1e-6)
    untouched = [0, 2, 3, 5]
    np.testing.assert_array_equal(rows[untouched], expected_one_hot_log(LABELS[untouched]))
    np.testing.assert_allclose(
        bank.probs(torch.tensor([4])).numpy(),
        np.exp(np_log_softmax(logits.detach().numpy()[:1])),
        atol=1e-6,
    )
    bank.reset()
    np.testing.assert_array_equal(
        bank.lookup(torch.arange(N)).numpy(), expected_one_hot_log(LABELS)
    )


def test_update_duplicate_index_keeps_one_of_the_rows() -> None:
    bank = PredictionBank(N, K, LABELS, dtype=torch.float32)
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    bank.update(torch.tensor([3, 3]), logits)
    row = bank.lookup(torch.tensor([3])).numpy()[0]
    candidates = np_log_softmax(logits.numpy())
    assert any(np.allclose(row, c, atol=1e-6) for c in candidates)


def test_update_uses_gather_hook() -> None:
    bank = PredictionBank(N, K, LABELS, dtype=torch.float32)
    extra_logits = torch.tensor([[0.0, 4.0, 0.0, 0.0]])

    def gather(indices: torch.Tensor, logits: torch.Tensor):
        return torch.cat([indices, torch.tensor([5])]), torch.cat([logits, extra_logits])

    bank.update(torch.tensor([0]), torch.zeros(1, K), gather=gather)
    rows = bank.lookup(torch.tensor([0, 5])).numpy()
    np.testing.assert_allclose(rows[0], np.full(K, -np.log(K)), atol=1e-6)
    np.testing.assert_allclose(rows[1], np_log_softmax(extra_logits.numpy())[0], atol=1e-6)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_low_precision_rows_close_to_fp32(dtype: torch.dtype, atol: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(N, K, generator=gen)
    full = PredictionBank(N, K, LABELS, dtype=torch.float32)
    half = PredictionBank(N, K, LABELS, dtype=dtype)
    full.update(torch.arange(N), logits)
    half.update(torch.arange(N), logits)
    idx = torch.arange(N)
    assert half.lookup(idx).dtype == torch.float32
    torch.testing.assert_close(half.probs(idx), full.probs(idx), atol=atol, rtol=0)
    torch.testing.assert_close(half.lookup(idx), full.lookup(idx), atol=0, rtol=4 * atol)


def test_nbytes_and_repr() -> None:
    assert PredictionBank(N, K, LABELS).nbytes == N * K * 2
    assert PredictionBank(N, K, LABELS, dtype="float32").nbytes == N * K * 4
    assert "num_samples=6" in repr(PredictionBank(N, K, LABELS))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, "float8", "half"])
def test_invalid_dtype_rejected(dtype) -> None:
    with pytest.raises(ConfigError):
        PredictionBank(N, K, LABELS, dtype=dtype)


def test_invalid_labels_rejected() -> None:
    with pytest.raises(ConfigError):
        PredictionBank(N, K, LABELS[:3])
    with pytest.raises(ConfigError):
        PredictionBank(N, K, torch.tensor([0, 1, 2, 3, 4, 0]))


def test_update_shape_checked() -> None:
    bank = PredictionBank(N, K, LABELS)
    with pytest.raises(ValueError):
        bank.update(torch.tensor([0, 1]), torch.zeros(2, K + 1))
    with pytest.raises(ValueError):
        bank.update(torch.tensor([0, 1, 2]), torch.zeros(2, K))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_state_dict_round_trip_is_exact(dtype: torch.dtype) -> None:
    bank = PredictionBank(N, K, LABELS, dtype=dtype)
    bank.update(torch.tensor([0, 3]), torch.randn(2, K, generator=torch.Generator().manual_seed(1)))
    state = bank.state_dict()
    assert list(state) == ["table"]  # labels are rebuilt from the dataset, not saved
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = PredictionBank(N, K, LABELS, dtype=dtype)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.table, bank.table)  # -inf entries included
    # the copy does not alias the original
    bank.update(torch.tensor([1]), torch.zeros(1, K))
    assert not torch.equal(fresh.table, bank.table)


def test_to_moves_and_keeps_dtype() -> None:
    bank = PredictionBank(N, K, LABELS).to("cpu")
    assert bank.table.dtype == torch.float16
    assert bank.lookup(torch.tensor([0])).device.type == "cpu"


def test_a_bank_that_does_not_fit_on_the_device_is_refused_with_smaller_options(
    monkeypatch,
) -> None:
    import selfkd.banks as banks

    # pretend the device has 100 MiB free (the check only runs where free memory is known)
    monkeypatch.setattr(banks, "free_device_memory", lambda device: 100 * 2**20)
    n, k = 1_281_167, 1000  # ImageNet-shaped: nothing is allocated when refused
    labels = torch.zeros(n, dtype=torch.long)
    with pytest.raises(ConfigError) as err:
        PredictionBank(n, k, labels, torch.float32)
    message = str(err.value)
    assert "needs 4,887 MiB on cpu but 100 MiB are free" in message
    assert "method.bank_dtype: float16 (2,444 MiB)" in message
    assert "method.bank_topk: 10 (54 MiB)" in message
    with pytest.raises(ConfigError, match=r"method\.bank_topk: 10"):
        PredictionBank(n, k, labels, torch.float16)  # 2,444 MiB: still too large
    small = PredictionBank(n, k, labels, torch.float16, "topk", 10)  # 54 MiB fits
    assert small.nbytes == banks.bank_nbytes(n, k, torch.float16, "topk", 10)
    # a bank built for a device is allocated there directly
    monkeypatch.undo()
    bank = PredictionBank(4, 3, torch.tensor([0, 1, 2, 0]), device="cpu")
    assert bank.table.device.type == "cpu" and bank.labels.device.type == "cpu"
