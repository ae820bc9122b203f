"""Pure-PyTorch reference implementations of the ``torch.ops.torch_dlt`` operators.

They run wherever torch runs, are used when the compiled library is missing or does not support
the device, and are the oracle of the op tests.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Moments(NamedTuple):
    """Per-feature moments: mean, population variance and excess kurtosis."""

    mean: Tensor
    var: Tensor
    kurtosis: Tensor


def moments(x: Tensor, dim: int) -> Moments:
    """Mean, population variance and excess kurtosis of ``x`` along ``dim`` (two passes)."""
    mean = x.mean(dim, keepdim=True)
    centred = x - mean
    sq = centred * centred
    m2 = sq.mean(dim)
    m4 = (sq * sq).mean(dim)
    return Moments(mean.squeeze(dim), m2, m4 / (m2 * m2) - 3.0)
