"""Fused steps of the certified bounds (:mod:`torch_dlt.robust.bounds`), one pass over memory.

``relu_lines`` is CROWN's backward step through a ReLU relaxed by per-unit lines (Zhang et al.
2018): for an A-matrix ``A [B, m, K]`` (m specification rows over K units) and the lines'
slopes, it returns ``A_in = slope_l * A+ + slope_u * A-`` and the bias ``A- . v_neg + A . v_all``
[B, m]. ``ibp_relu_`` maps an interval box through a ReLU in place (Gowal et al. 2018);
``crown_lines`` gives the ReLU's relaxation from its interval bounds; ``phase_conv`` and the fused
``relu_phase_lower`` carry A-matrices through a strided input convolution.

These are CPU kernels: they remove costs particular to the CPU (a branch misprediction per
element, pages faulted in for every fresh A-sized tensor, permuted copies between layouts, and
library convolutions that run at a fraction of the core's speed with 4 output channels) and do in
one pass what ATen ops do in four to eight. On accelerators, and without the compiled library,
:mod:`torch_dlt.robust.bounds` runs the same steps as torch operations; the references below are
the tests' oracles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from torch_dlt.ops import has_ops

__all__ = [
    "crown_lines",
    "crown_lines_reference",
    "has_bounds_ops",
    "has_fused_bound",
    "ibp_relu_",
    "phase_conv",
    "relu_lines",
    "relu_lines_",
    "relu_lines_reference",
    "relu_phase_lower",
]


def has_bounds_ops(x: Tensor | None = None) -> bool:
    """Whether the compiled bound kernels exist (and, given ``x``, can run on its device).

    >>> isinstance(has_bounds_ops(), bool)
    True
    """
    if not (has_ops() and hasattr(torch.ops.torch_dlt, "relu_lines")):
        return False
    return x is None or (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64))


def crown_lines_reference(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CROWN's ReLU relaxation from pre-activation bounds, in plain differentiable torch.

    Returns ``(slope_l, slope_u, icpt_u, unstable)``: on unstable units (lower < 0 < upper) the
    upper line ``u (z - l) / (u - l)`` and the adaptive lower line's slope (1 where u > -l, else
    0); slope 1 on active units (lower >= 0) and 0 on inactive ones, intercepts 0.
    """
    unstable = (lower < 0) & (upper > 0)
    active = (lower >= 0).to(lower.dtype)
    width = torch.where(unstable, upper - lower, torch.ones_like(lower))
    slope_u = torch.where(unstable, upper / width, active)
    icpt_u = torch.where(unstable, -slope_u * lower, torch.zeros_like(lower))
    slope_l = torch.where(unstable, (upper > -lower).to(lower.dtype), active)
    return slope_l, slope_u, icpt_u, unstable


def crown_lines(
    lower: Tensor, upper: Tensor, channels_last: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CROWN's ReLU relaxation from pre-activation bounds ``[B, C, ...]``, in one pass.

    See :func:`crown_lines_reference` for the lines. With ``channels_last`` a 4-d map's results
    are laid out channels-last (the memory order of CROWN's A-matrices on maps). Differentiable in
    ``lower`` and ``upper`` (through ``slope_u`` and ``icpt_u``; the lower slope is piecewise
    constant).

    Example:
        >>> lo, up = torch.tensor([[-1.0, 0.5, -2.0]]), torch.tensor([[3.0, 1.0, -1.0]])
        >>> slope_l, slope_u, icpt_u, unstable = crown_lines(lo, up)
        >>> slope_u, icpt_u
        (tensor([[0.7500, 1.0000, 0.0000]]), tensor([[0.7500, 0.0000, 0.0000]]))
        >>> slope_l, unstable
        (tensor([[1., 1., 0.]]), tensor([[ True, False, False]]))
    """
    if not isinstance(lower, Tensor) or not isinstance(upper, Tensor):
        raise TypeError("crown_lines: lower and upper must be Tensors")
    if lower.shape != upper.shape or lower.dim() < 2:
        raise ValueError(
            f"crown_lines: lower {tuple(lower.shape)} and upper {tuple(upper.shape)} must have the "
            "same shape [B, C, ...]"
        )
    if has_bounds_ops(lower) and hasattr(torch.ops.torch_dlt, "crown_lines"):
        return tuple(torch.ops.torch_dlt.crown_lines(lower, upper, channels_last))
    out = crown_lines_reference(lower, upper)
    if channels_last and lower.dim() == 4:
        out = tuple(t.contiguous(memory_format=torch.channels_last) for t in out)
    return out


def relu_lines_reference(
    A: Tensor, slope_l: Tensor, slope_u: Tensor, v_neg: Tensor, v_all: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``relu_lines`` in plain differentiable torch (see the module docstring)."""
    A_neg = A.clamp(max=0)
    A_in = slope_l.unsqueeze(1) * A + (slope_u - slope_l).unsqueeze(1) * A_neg
    bias = (A_neg * v_neg.unsqueeze(1)).sum(-1)
    if v_all is not None:
        bias = bias + (A * v_all.unsqueeze(1)).sum(-1)
    return A_in, bias


def _check(A: Tensor, vectors: dict[str, Tensor | None]) -> None:
    if not isinstance(A, Tensor) or A.dim() != 3:
        raise ValueError(
            "relu_lines: A must be a Tensor [B, m, K], got "
            f"{tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__}"
        )
    batch, _, units = A.shape
    for name, t in vectors.items():
        if t is None and name == "v_all":
            continue
        if (
            not isinstance(t, Tensor)
            or t.dim() != 2
            or t.shape[0] not in (1, batch)
            or t.shape[1] != units
        ):
            raise ValueError(
                f"relu_lines: {name} must be a Tensor [B or 1, K] = [{batch} or 1, {units}], got "
                f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}"
            )
        if t.dtype != A.dtype or t.device != A.device:
            raise ValueError(f"relu_lines: {name} must have A's dtype and device")


def relu_lines(
    A: Tensor, slope_l: Tensor, slope_u: Tensor, v_neg: Tensor, v_all: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """CROWN's backward step through a ReLU relaxed by lines, differentiable in every input.

    Args:
        A (Tensor[B, m, K]): the A-matrix on the ReLU's output (a batch stride of 0 is read as
            is).
        slope_l, slope_u (Tensor[B or 1, K]): slopes of the lower and upper lines.
        v_neg (Tensor[B or 1, K]): taken where A < 0 (the upper line's intercept).
        v_all (Tensor[B or 1, K] | None): taken everywhere (a bias of the layer below).

    Returns:
        tuple[Tensor, Tensor]: ``A_in [B, m, K]`` (positive coefficients take the lower line,
        negative ones the upper) and ``bias [B, m]``.

    Example:
        >>> A = torch.tensor([[[1.0, -2.0]]])
        >>> lo, up, icpt = torch.tensor([[0.0, 0.5]]), torch.tensor([[1.0, 0.5]]), torch.ones(1, 2)
        >>> relu_lines(A, lo, up, icpt)
        (tensor([[[ 0., -1.]]]), tensor([[-2.]]))
    """
    _check(A, {"slope_l": slope_l, "slope_u": slope_u, "v_neg": v_neg, "v_all": v_all})
    if has_bounds_ops(A):
        return tuple(torch.ops.torch_dlt.relu_lines(A, slope_l, slope_u, v_neg, v_all))
    return relu_lines_reference(A, slope_l, slope_u, v_neg, v_all)


def relu_lines_(
    A: Tensor, slope_l: Tensor, slope_u: Tensor, v_neg: Tensor, v_all: Tensor | None = None
) -> Tensor:
    """:func:`relu_lines` with ``A_in`` written over ``A``; returns the bias [B, m].

    For bounds computed without autograd: no second A-sized tensor is made.

    Example:
        >>> A = torch.tensor([[[1.0, -2.0]]])
        >>> relu_lines_(A, torch.zeros(1, 2), torch.full((1, 2), 0.5), torch.ones(1, 2))
        tensor([[-2.]])
        >>> A
        tensor([[[ 0., -1.]]])
    """
    _check(A, {"slope_l": slope_l, "slope_u": slope_u, "v_neg": v_neg, "v_all": v_all})
    if has_bounds_ops(A) and A.is_contiguous():
        return torch.ops.torch_dlt.relu_lines_(A, slope_l, slope_u, v_neg, v_all)
    A_in, bias = relu_lines_reference(A, slope_l, slope_u, v_neg, v_all)
    A.copy_(A_in)
    return bias


def phase_conv(A: Tensor, taps: Tensor) -> Tensor:
    """``conv2d(A, taps, padding=(th - 1, tw - 1))`` for a kernel with few outputs, differentiable.

    CROWN's backward pass through a strided input convolution is this correlation of the
    A-matrices ``[N, C, h, w]`` (N = batch x specification rows) with the stride-phase kernel
    ``taps [P, C, th, tw]`` (P = stride^2 x input channels, e.g. 4). The compiled CPU kernel forms
    each output pixel's P sums in registers, about twice as fast as the library convolution for
    such shapes; elsewhere ``torch.nn.functional.conv2d`` runs. The result is channels-last.

    Example:
        >>> A, taps = torch.randn(3, 8, 5, 5), torch.randn(4, 8, 2, 2)
        >>> torch.allclose(phase_conv(A, taps), F.conv2d(A, taps, padding=1), atol=1e-5)
        True
    """
    if A.dim() != 4 or taps.dim() != 4 or A.shape[1] != taps.shape[1]:
        raise ValueError(
            f"phase_conv: A must be [N, C, h, w] and taps [P, C, th, tw] with the same C, got "
            f"{tuple(A.shape)} and {tuple(taps.shape)}"
        )
    if has_bounds_ops(A) and hasattr(torch.ops.torch_dlt, "phase_conv") and A.dtype == taps.dtype:
        return torch.ops.torch_dlt.phase_conv(A, taps)
    return F.conv2d(A, taps, padding=(taps.shape[2] - 1, taps.shape[3] - 1))


def has_fused_bound(x: Tensor | None = None) -> bool:
    """Whether the compiled :func:`relu_phase_lower` exists (and, given ``x``, runs on it)."""
    return has_bounds_ops(x) and hasattr(torch.ops.torch_dlt, "relu_phase_lower")


def relu_phase_lower(
    A: Tensor,
    slope_l: Tensor,
    slope_u: Tensor,
    v_neg: Tensor,
    v_all: Tensor | None,
    taps: Tensor,
    c_frame: Tensor,
    r_frame: Tensor,
    h: int,
    w: int,
) -> Tensor:
    """The end of CROWN's backward pass from a ReLU on a strided input convolution, fused.

    For each row of ``A [B, m, h w C]`` (units in channels-last order): the ReLU step
    (:func:`relu_lines`), the correlation with the stride-phase kernel ``taps [P, C, th, tw]``
    (:func:`phase_conv`) and the minimum over the input box laid out in the phases' frame
    (``c_frame``, ``r_frame`` [B, rows cols P]: centre and radius), in one compiled pass that never
    writes the ReLU's A-matrix to memory. Differentiable in every tensor input.

    Returns:
        Tensor: the lower bound [B, m] (the ReLU step's bias included).
    """
    lower, _ = torch.ops.torch_dlt.relu_phase_lower(
        A, slope_l, slope_u, v_neg, v_all, taps, c_frame, r_frame, h, w
    )
    return lower


def relu_phase_lower_reference(
    A: Tensor,
    slope_l: Tensor,
    slope_u: Tensor,
    v_neg: Tensor,
    v_all: Tensor | None,
    taps: Tensor,
    c_frame: Tensor,
    r_frame: Tensor,
    h: int,
    w: int,
) -> Tensor:
    """:func:`relu_phase_lower` in plain differentiable torch (the tests' oracle)."""
    batch, rows_m, _ = A.shape
    _, channels, th, tw = taps.shape
    A_in, bias = relu_lines_reference(A, slope_l, slope_u, v_neg, v_all)
    maps = A_in.reshape(batch * rows_m, h, w, channels).permute(0, 3, 1, 2)
    phases = F.conv2d(maps, taps, padding=(th - 1, tw - 1)).permute(0, 2, 3, 1)
    phases = phases.reshape(batch, rows_m, -1)
    centre = (phases * c_frame.unsqueeze(1)).sum(-1)
    return bias + centre - (phases.abs() * r_frame.unsqueeze(1)).sum(-1)


def ibp_relu_(c: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Interval box ``(centre c, radius r)`` through a ReLU, written over ``c`` and ``r``.

    With ``u = relu(c + r)`` and ``l = relu(c - r)``, ``c`` becomes ``u + l`` and ``r`` becomes
    ``u - l``: twice the new centre and radius (the caller keeps the factor 1/2). Not
    differentiable; for bounds computed without autograd.

    Example:
        >>> c, r = torch.tensor([-1.0, 0.5, 2.0]), torch.tensor([0.5, 1.0, 1.0])
        >>> ibp_relu_(c, r)
        (tensor([0.0000, 1.5000, 4.0000]), tensor([0.0000, 1.5000, 2.0000]))
    """
    if c.shape != r.shape or c.dtype != r.dtype:
        raise ValueError(
            f"ibp_relu_: centre {tuple(c.shape)} {c.dtype} and radius {tuple(r.shape)} {r.dtype} "
            "must have the same shape and dtype"
        )
    if has_bounds_ops(c) and c.is_contiguous() and r.is_contiguous():
        torch.ops.torch_dlt.ibp_relu_(c, r)
        return c, r
    upper = (c + r).relu_()
    lower = c.sub_(r).relu_()
    torch.sub(upper, lower, out=r)
    lower.add_(upper)
    return c, r
