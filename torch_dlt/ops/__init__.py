"""Public entry points of torch_dlt's custom operators.

Each wrapper runs the compiled ``torch.ops.torch_dlt`` kernel when the extension is built and
supports the tensor's device, and the pure-PyTorch reference in :mod:`torch_dlt.ops._reference`
otherwise. This is the only module that touches ``torch.ops.torch_dlt``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_dlt import _extension
from torch_dlt.ops import _reference
from torch_dlt.ops._reference import Moments

__all__ = ["Moments", "has_ops", "has_cuda_ops", "moments"]

if _extension.load():
    from torch_dlt.ops import _fake, _filters_fake

    _fake.register()
    _filters_fake.register()
    if hasattr(torch.ops.torch_dlt, "sequential_primal"):
        from torch_dlt.ops import _hvp_fake

        _hvp_fake.register()
    from torch_dlt.ops import _bounds_fake

    _bounds_fake.register()


def has_ops() -> bool:
    """Whether the compiled ``torch_dlt._C`` kernels are in use (else the pure-torch reference).

    >>> isinstance(has_ops(), bool)
    True
    """
    return _extension.load()


def has_cuda_ops() -> bool:
    """Whether the compiled library carries CUDA kernels."""
    return _extension.cuda_kernels_built()


def _use_compiled(x: Tensor) -> bool:
    if not has_ops():
        return False
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and has_cuda_ops()


_MOMENT_DTYPES = (torch.float32, torch.float64)


def moments(x: Tensor, dim: int = 0) -> Moments:
    r"""Mean, variance and excess kurtosis of ``x`` along ``dim`` in one pass over memory.

    For each position of the other dimensions, with :math:`n` the size of ``dim`` and
    :math:`m_k = \frac1n \sum_i (x_i - \bar x)^k`, returns :math:`\bar x`, the population variance
    :math:`m_2` and the excess kurtosis :math:`m_4 / m_2^2 - 3` (0 for a Gaussian; ``nan`` where
    the variance is 0). The compiled kernels merge block statistics with the parallel update of
    Chan, Golub & LeVeque (1983) extended to the 3rd and 4th moments (Pebay 2008), so they are
    numerically stable where the naive sums of powers are not.

    Args:
        x (Tensor[..., n, ...]): floating point input; float16 / bfloat16 are computed in float32.
        dim (int): the dimension to reduce (the samples), e.g. 0 for a ``[batch, features]`` input.

    Returns:
        Moments: ``(mean, var, kurtosis)``, each shaped like ``x`` without ``dim``.

    Example:
        >>> x = torch.randn(10_000, 3, dtype=torch.float64)
        >>> m = moments(x, dim=0)
        >>> m.mean.shape
        torch.Size([3])
        >>> bool((m.var - 1).abs().max() < 0.1)
        True
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"moments: x must be a Tensor, got {type(x).__name__}")
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"moments: dim must be an int, got {type(dim).__name__}")
    if x.dim() == 0:
        raise ValueError("moments: x must have at least one dimension, got a 0-d tensor")
    if not -x.dim() <= dim < x.dim():
        raise IndexError(
            f"moments: dim={dim} is out of range for a tensor of shape {tuple(x.shape)} "
            f"(accepted: {-x.dim()} to {x.dim() - 1})"
        )
    if x.shape[dim] == 0:
        raise ValueError(
            f"moments: dimension {dim} of x (shape {tuple(x.shape)}) is empty; "
            "there are no samples to take moments of"
        )
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    elif x.dtype not in _MOMENT_DTYPES:
        raise TypeError(
            f"moments: x has dtype {x.dtype}; accepted are float32, float64 "
            "(and float16/bfloat16, computed in float32)"
        )
    dim = dim % x.dim()
    if _use_compiled(x):
        return Moments(*torch.ops.torch_dlt.moments(x, dim))
    return _reference.moments(x, dim)


from torch_dlt.ops.filters import (  # noqa: E402  (needs _use_compiled above)
    SpectralSignature,
    filter_grid,
    spectral_signature,
)

__all__ += ["SpectralSignature", "filter_grid", "spectral_signature"]

from torch_dlt.ops.hvp import (  # noqa: E402  (needs _use_compiled above)
    ActivationKind,
    LossKind,
    Opcode,
    Reduction,
    activation_hvp_backward,
    activation_jvp,
    has_hvp_ops,
    loss_curvature,
    sequential_hvp,
    sequential_primal,
)

__all__ += [
    "ActivationKind",
    "LossKind",
    "Opcode",
    "Reduction",
    "activation_hvp_backward",
    "activation_jvp",
    "has_hvp_ops",
    "loss_curvature",
    "sequential_hvp",
    "sequential_primal",
]

from torch_dlt.ops.bounds import (  # noqa: E402  (needs has_ops above)
    crown_lines,
    has_bounds_ops,
    ibp_relu_,
    phase_conv,
    relu_lines,
    relu_lines_,
    relu_phase_lower,
)

__all__ += [
    "crown_lines",
    "has_bounds_ops",
    "ibp_relu_",
    "phase_conv",
    "relu_lines",
    "relu_lines_",
    "relu_phase_lower",
]
