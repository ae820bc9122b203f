"""Tests of torch_dlt/data.py: digits, mnist and data_loader."""

from __future__ import annotations

import math
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_dlt.data import Split, data_loader, digits, mnist

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


@pytest.fixture(scope="module")
def sklearn_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    return datasets.load_digits()


def test_digits_are_the_scaled_sklearn_images(sklearn_digits):
    x, y = digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    np.testing.assert_array_equal(x[:, 0].numpy(), (sklearn_digits.images / 16).astype(np.float32))
    np.testing.assert_array_equal(y.numpy(), sklearn_digits.target)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    counts = torch.bincount(y, minlength=10)
    assert len(counts) == 10 and int(counts.sum()) == 1797 and int(counts.min()) >= 170

    raw, _ = digits(normalize=False, dtype=torch.float64)
    assert raw.dtype == torch.float64
    assert torch.equal(raw, raw.round()) and float(raw.max()) == 16.0


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Half-pixel-centre linear interpolation weights [n_out, n_in] (align_corners=False)."""
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        source = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        left = int(math.floor(source))
        right = min(left + 1, n_in - 1)
        weights[i, left] += 1 - (source - left)
        weights[i, right] += source - left
    return weights


def test_digits_resized_to_28_is_bilinear_upsampling(sklearn_digits):
    x, y = digits(size=28, dtype=torch.float64)
    assert x.shape == (1797, 1, 28, 28)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    a = bilinear_matrix(8, 28)
    for index in (0, 1, 1796):
        expected = a @ (sklearn_digits.images[index] / 16) @ a.T
        np.testing.assert_allclose(x[index, 0].numpy(), expected, atol=1e-12)
    assert torch.equal(y, digits()[1])


def _row_keys(x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
    return sorted(xi.numpy().tobytes() + bytes([int(yi)]) for xi, yi in zip(x, y))


def test_digits_split_is_stratified_deterministic_and_a_partition():
    x, y = digits()
    split = digits(test_fraction=0.25, seed=3)
    assert isinstance(split, Split)
    x_train, y_train, x_test, y_test = split
    assert _row_keys(torch.cat([x_train, x_test]), torch.cat([y_train, y_test])) == _row_keys(x, y)
    class_sizes = torch.bincount(y, minlength=10)
    assert torch.bincount(y_test, minlength=10).tolist() == [
        round(0.25 * int(n)) for n in class_sizes
    ]

    again = digits(test_fraction=0.25, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(split, again))
    other = digits(test_fraction=0.25, seed=4)
    assert not torch.equal(split.y_test, other.y_test) or not torch.equal(
        split.x_test, other.x_test
    )


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"test_fraction": 0.0}, ValueError, r"test_fraction must be None or in \(0, 1\)"),
        ({"test_fraction": 1.5}, ValueError, "test_fraction"),
        ({"test_fraction": 1e-4}, ValueError, "empty split"),
        ({"size": 0}, ValueError, "size must be a positive int"),
        ({"dtype": torch.int64}, TypeError, "floating torch.dtype"),
    ],
)
def test_digits_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        digits(**kwargs)


def test_digits_without_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"torch_dlt\[data\]"):
        digits()


@pytest.mark.skipif(not SHARED_MNIST.exists(), reason=f"no MNIST at {SHARED_MNIST}")
def test_mnist_reads_the_first_samples_of_the_real_file():
    split = mnist(SHARED_MNIST, limit=64)
    assert [tuple(t.shape) for t in split] == [(64, 1, 28, 28), (64,), (64, 1, 28, 28), (64,)]
    # First labels of the original IDX files (shared/data/README.md).
    assert split.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert split.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    with np.load(SHARED_MNIST) as archive:
        x_test = archive["x_test"][:64]
    np.testing.assert_array_equal(split.x_test[:, 0].numpy(), (x_test / 255.0).astype(np.float32))
    assert 0.0 <= float(split.x_train.min()) and float(split.x_train.max()) <= 1.0


def _fake_mnist_arrays(n_train: int = 7, n_test: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
@pytest.mark.parametrize("limit", [None, 3, 100])
def test_mnist_npz_round_trip(tmp_path, save, limit):
    arrays = _fake_mnist_arrays()
    path = tmp_path / "mnist.npz"
    save(path, **arrays)
    split = mnist(path, limit=limit, dtype=torch.float64)
    for key, tensor in zip(("x_train", "y_train", "x_test", "y_test"), split):
        expected = arrays[key][:limit]
        if key.startswith("x"):
            np.testing.assert_allclose(tensor[:, 0].numpy(), expected / 255.0, rtol=1e-15)
        else:
            assert tensor.dtype == torch.int64
            np.testing.assert_array_equal(tensor.numpy(), expected)
    raw = mnist(str(path), normalize=False)
    np.testing.assert_array_equal(raw.x_train[:, 0].numpy(), arrays["x_train"].astype(np.float32))


def test_mnist_bad_files(tmp_path):
    arrays = _fake_mnist_arrays()
    missing_key = tmp_path / "missing.npz"
    np.savez(missing_key, **{k: v for k, v in arrays.items() if k != "y_test"})
    with pytest.raises(ValueError, match=r"lacks the keys \['y_test'\]"):
        mnist(missing_key)
    bad_shape = tmp_path / "flat.npz"
    np.savez(bad_shape, **{**arrays, "x_test": arrays["x_test"].reshape(5, -1)})
    with pytest.raises(ValueError, match=r"x_test of shape \(5, 784\)"):
        mnist(bad_shape)
    with pytest.raises(FileNotFoundError, match="no file at path="):
        mnist(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="limit must be None or a positive int"):
        mnist(missing_key, limit=0)


def test_mnist_without_path_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        mnist(root=tmp_path)
    message = str(info.value)
    assert os.path.join(str(tmp_path), "MNIST", "raw") in message and "path=" in message


def _write_idx(path: Path, array: np.ndarray) -> None:
    # IDX format (LeCun's MNIST files): 0x0000, type 0x08 (ubyte), ndim, big-endian sizes, data.
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_reads_an_existing_torchvision_download(tmp_path):
    pytest.importorskip("torchvision")
    arrays = _fake_mnist_arrays()
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, part in (("train", "train"), ("t10k", "test")):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", arrays[f"x_{part}"])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", arrays[f"y_{part}"])
    split = mnist(root=tmp_path, limit=4)
    np.testing.assert_array_equal(
        split.x_test[:, 0].numpy(), arrays["x_test"][:4] / np.float32(255)
    )
    np.testing.assert_array_equal(split.y_train.numpy(), arrays["y_train"][:4])
    assert split.y_train.dtype == torch.int64


def test_data_loader_visits_every_sample_once_per_epoch_reproducibly():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    first = [yb.tolist() for _, yb in data_loader(x, y, batch_size=4, seed=1)]
    again = [yb.tolist() for _, yb in data_loader(x, y, batch_size=4, seed=1)]
    assert first == again and [len(b) for b in first] == [4, 4, 2]
    assert sorted(sum(first, [])) == list(range(10)) and sum(first, []) != list(range(10))
    ordered = [yb.tolist() for _, yb in data_loader(x, y, batch_size=4, shuffle=False)]
    assert sum(ordered, []) == list(range(10))
    for xb, yb in data_loader(x, y, batch_size=3, seed=2):
        assert torch.equal(xb[:, 0], yb.to(xb.dtype))
    with pytest.raises(ValueError, match="same length"):
        data_loader(x, y[:9])
