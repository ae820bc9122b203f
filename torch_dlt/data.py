"""Small real data sets as tensors: scikit-learn's bundled digits and MNIST (LeCun et al. 1998).

Nothing is downloaded: the digits ship with scikit-learn, MNIST is read from an ``.npz`` file or
from a torchvision download already on disk.
"""

from __future__ import annotations

import math
import os
import zipfile
from typing import NamedTuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["Split", "data_loader", "digits", "mnist"]

_MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")


class Split(NamedTuple):
    """A train/test split; unpacks as ``x_train, y_train, x_test, y_test``.

    Attributes:
        x_train (Tensor[N, 1, H, W]): training images.
        y_train (Tensor[N]): their labels, int64.
        x_test (Tensor[M, 1, H, W]): test images.
        y_test (Tensor[M]): their labels, int64.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def _check_float_dtype(dtype: object, owner: str) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{owner}: dtype must be a floating torch.dtype, got {dtype!r}")


def _stratified_test_mask(labels: Tensor, test_fraction: float, seed: int) -> Tensor:
    # Per class, so that a small test set keeps the class balance of the data.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = order[labels[order] == label]
        mask[members[: round(test_fraction * len(members))]] = True
    return mask


def digits(
    *,
    size: int = 8,
    test_fraction: float | None = None,
    dtype: torch.dtype = torch.float32,
    normalize: bool = True,
    seed: int = 0,
) -> tuple[Tensor, Tensor] | Split:
    """The 1797 real 8x8 handwritten digits bundled with scikit-learn, as tensors.

    The UCI optical digits test set (Alpaydin & Kaynak 1998), 16 grey levels. With ``size != 8``
    the images are resized bilinearly (anti-aliased when shrinking), e.g. to 28 for models
    built for MNIST.

    Args:
        size (int): side of the returned images.
        test_fraction (float | None): ``None`` for all samples, else the fraction in (0, 1) of
            each class put in the test set (rounded per class, so 0.2 gives 359 test samples),
            drawn from ``seed`` (the same split every call).
        dtype (torch.dtype): floating dtype of the images.
        normalize (bool): scale the pixel values 0..16 to [0, 1].
        seed (int): seed of the split.

    Returns:
        ``(x Tensor[1797, 1, size, size], y Tensor[1797])`` or, with ``test_fraction``, a
        :class:`Split`; labels are int64 in 0..9.

    Raises:
        ImportError: scikit-learn is missing (install ``torch_dlt[data]``).

    Example:
        >>> x, y = digits()
        >>> x.shape, y.shape
        (torch.Size([1797, 1, 8, 8]), torch.Size([1797]))
        >>> x_train, y_train, x_test, y_test = digits(size=28, test_fraction=0.2)
        >>> x_test.shape
        torch.Size([359, 1, 28, 28])
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"digits: size must be a positive int, got {size!r}")
    if test_fraction is not None and not (
        isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1
    ):
        raise ValueError(f"digits: test_fraction must be None or in (0, 1), got {test_fraction!r}")
    _check_float_dtype(dtype, "digits")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "digits() needs scikit-learn, which bundles the data: pip install 'torch_dlt[data]'"
        ) from exc
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float64).unsqueeze(1)
    if normalize:
        x = x / 16.0
    if size != 8:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 8
        )
    x = x.to(dtype)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    if test_fraction is None:
        return x, y
    test = _stratified_test_mask(y, float(test_fraction), seed)
    if test.all() or not test.any():
        raise ValueError(f"digits: test_fraction={test_fraction} leaves an empty split")
    return Split(x[~test], y[~test], x[test], y[test])


def _read_npy_rows(archive: zipfile.ZipFile, key: str, limit: int | None) -> np.ndarray:
    # Reading only the first rows of a member decompresses only their bytes.
    with archive.open(key + ".npy") as stream:
        version = np.lib.format.read_magic(stream)
        if limit is not None and version in ((1, 0), (2, 0)):
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(stream)
            if not fortran_order and not dtype.hasobject and len(shape) >= 1:
                rows = min(limit, shape[0])
                count = rows * math.prod(shape[1:])
                data = stream.read(count * dtype.itemsize)
                return np.frombuffer(data, dtype=dtype, count=count).reshape((rows, *shape[1:]))
    with archive.open(key + ".npy") as stream:
        return np.lib.format.read_array(stream, allow_pickle=False)[:limit]


def _read_mnist_npz(path: Union[str, os.PathLike], limit: int | None) -> list[np.ndarray]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mnist: no file at path={os.fspath(path)!r}")
    with zipfile.ZipFile(path) as archive:
        present = {name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")}
        missing = [key for key in _MNIST_KEYS if key not in present]
        if missing:
            raise ValueError(
                f"mnist: {os.fspath(path)!r} lacks the keys {missing}; expected "
                f"{list(_MNIST_KEYS)} (uint8 images [N, 28, 28], labels [N])"
            )
        arrays = [_read_npy_rows(archive, key, limit) for key in _MNIST_KEYS]
    for images_key, images, labels_key, labels in (
        ("x_train", arrays[0], "y_train", arrays[1]),
        ("x_test", arrays[2], "y_test", arrays[3]),
    ):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"mnist: {os.fspath(path)!r} has {images_key} of shape {images.shape} and "
                f"{labels_key} of shape {labels.shape}; expected [N, 28, 28] and [N]"
            )
    return arrays


def _read_torchvision_mnist(root: Union[str, os.PathLike], limit: int | None) -> list[Tensor]:
    where = os.path.join(os.fspath(root), "MNIST", "raw")
    advice = (
        "Pass path= an .npz with keys x_train, y_train, x_test, y_test (uint8 images "
        "[N, 28, 28], labels [N]), or root= a directory where "
        "torchvision.datasets.MNIST(root, download=True) has put the data."
    )
    try:
        from torchvision.datasets import MNIST
    except ImportError as exc:
        raise FileNotFoundError(
            f"mnist: path=None and torchvision is not installed to look under {where!r}. {advice}"
        ) from exc
    try:
        parts = [MNIST(os.fspath(root), train=train, download=False) for train in (True, False)]
    except RuntimeError as exc:
        raise FileNotFoundError(
            f"mnist: path=None and torchvision found no MNIST under {where!r} "
            f"(download=False). {advice}"
        ) from exc
    return [t[:limit] for part in parts for t in (part.data, part.targets)]


def mnist(
    path: Union[str, os.PathLike, None] = None,
    *,
    root: Union[str, os.PathLike] = "data",
    limit: int | None = None,
    dtype: torch.dtype = torch.float32,
    normalize: bool = True,
) -> Split:
    """MNIST (LeCun, Bottou, Bengio & Haffner 1998) as tensors, 60000 train / 10000 test.

    Reads ``path``, an ``.npz`` with keys ``x_train``, ``y_train``, ``x_test``, ``y_test``
    (uint8 images ``[N, 28, 28]``, labels ``[N]``); with ``path=None``, torchvision's MNIST
    files under ``root`` (never downloaded).

    Args:
        path (str | os.PathLike | None): the ``.npz`` file.
        root (str | os.PathLike): torchvision's dataset root, used when ``path`` is None.
        limit (int | None): keep only the first ``limit`` samples of each split; from an
            ``.npz`` only those are read.
        dtype (torch.dtype): floating dtype of the images.
        normalize (bool): scale the pixel values 0..255 to [0, 1].

    Returns:
        Split: images ``Tensor[N, 1, 28, 28]`` and int64 labels ``Tensor[N]``.

    Raises:
        FileNotFoundError: no file at ``path``, or no torchvision MNIST under ``root``.
        ValueError: the ``.npz`` lacks a key or has arrays of the wrong shape.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> images, labels = np.zeros((5, 28, 28), np.uint8), np.arange(5, dtype=np.uint8)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "mnist.npz")
        ...     np.savez(path, x_train=images, y_train=labels, x_test=images, y_test=labels)
        ...     x_train, y_train, x_test, y_test = mnist(path, limit=3)
        >>> x_train.shape, y_train.tolist()
        (torch.Size([3, 1, 28, 28]), [0, 1, 2])
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"mnist: limit must be None or a positive int, got {limit!r}")
    _check_float_dtype(dtype, "mnist")
    if path is None:
        parts = _read_torchvision_mnist(root, limit)
    else:
        parts = [torch.from_numpy(np.array(a)) for a in _read_mnist_npz(path, limit)]
    images = []
    for x in parts[0::2]:
        x = x.to(dtype).unsqueeze(1)
        images.append(x / 255.0 if normalize else x)
    x_train, x_test = images
    return Split(x_train, parts[1].to(torch.int64), x_test, parts[3].to(torch.int64))


def data_loader(
    x: Tensor, y: Tensor, *, batch_size: int = 128, shuffle: bool = True, seed: int = 0
) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` over ``(x[i], y[i])``, shuffled from ``seed``.

    Args:
        x (Tensor[N, ...]): inputs.
        y (Tensor[N, ...]): targets.
        batch_size (int): samples per batch (the last batch may be smaller).
        shuffle (bool): reshuffle every epoch, reproducibly from ``seed``.
        seed (int): seed of the shuffling.

    Example:
        >>> import torch
        >>> loader = data_loader(torch.zeros(10, 3), torch.arange(10), batch_size=4)
        >>> [len(yb) for _, yb in loader]
        [4, 4, 2]
    """
    if len(x) != len(y):
        raise ValueError(
            f"data_loader: x and y must have the same length, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator
    )
