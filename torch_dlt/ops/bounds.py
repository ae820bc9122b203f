"""Fused steps of the certified bounds (:mod:`torch_dlt.robust.bounds`), one pass over memory.

``relu_lines`` is CROWN's backward step through a ReLU relaxed by per-unit lines (Zhang et al.
2018): for an A-matrix ``A [B, m, K]`` (m specification rows over K units) and the lines'
slopes, it returns ``A_in = slope_l * A+ + slope_u * A-`` and the bias ``A- . v_neg + A . v_all``
[B, m]. ``ibp_relu_`` maps an interval box through a ReLU in place (Gowal et al. 2018);
``crown_lines`` gives the ReLU's relaxation from its interval bounds; ``phase_conv`` and the fused
``relu_phase_lower`` carry A-matrices through a strided input convolution.

These are CPU kernels: each does in one pass over memory what ATen ops do in four to eight, with
no data-dependent branch and no permuted copy between layouts. ``benchmarks/bound_kernels.py``
times each against its torch fallback and the CROWN-IBP training step with and without them. On
accelerators, and without the compiled library, :mod:`torch_dlt.robust.bounds` runs the same
steps as the torch fallbacks below (blocked over the batch, so that their temporaries stay in
cache); the ``*_reference`` functions are plain torch, the tests' oracles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from torch_dlt.ops import has_ops
from torch_dlt.ops._bounds_fake import OP_NAMES

__all__ = [
    "crown_lines",
    "crown_lines_reference",
    "has_bounds_ops",
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
    if not (has_ops() and all(hasattr(torch.ops.torch_dlt, name) for name in OP_NAMES)):
        return False
    return x is None or (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64))


def crown_lines_reference(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CROWN's ReLU relaxation from pre-activation bounds, in differentiable torch.

    Returns ``(slope_l, slope_u, icpt_u, unstable)``: on unstable units (lower < 0 < upper) the
    upper line ``u (z - l) / (u - l)`` and the adaptive lower line's slope (1 where u > -l, else
    0); slope 1 on active units (lower >= 0) and 0 on inactive ones, intercepts 0.
    """
    unstable = (lower < 0) & (upper > 0)
    # Masks as 0/1 factors rather than torch.where, which is several times slower on CPU; the
    # width is 1 on stable units, so no 0/0 reaches the values or the gradients.
    mask = unstable.to(lower.dtype)
    active = (lower >= 0).to(lower.dtype)
    width = (upper - lower).mul_(mask).add_(1.0 - mask)
    slope_u = torch.addcdiv(active, upper * mask, width)
    icpt_u = (slope_u * lower).mul_(mask).neg_().add_(0.0)  # + 0: no -0 on stable units
    slope_l = torch.addcmul(active, mask, (upper > -lower).to(lower.dtype))
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
    if has_bounds_ops(lower):
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
    return _ReluLines.apply(
        A, *_slopes_by_example(A, slope_l, slope_u), _by_example(A, v_neg), v_all
    )


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
    slopes = _slopes_by_example(A, slope_l, slope_u)
    return _relu_lines_blocks(A, *slopes, _by_example(A, v_neg), v_all, A)


def phase_conv(A: Tensor, taps: Tensor) -> Tensor:
    """``conv2d(A, taps, padding=(th - 1, tw - 1))`` for a kernel with few outputs, differentiable.

    CROWN's backward pass through a strided input convolution is this correlation of the
    A-matrices ``[N, C, h, w]`` (N = batch x specification rows) with the stride-phase kernel
    ``taps [P, C, th, tw]`` (P = stride^2 x input channels, e.g. 4). The compiled CPU kernel forms
    each output pixel's P sums in registers: at the CNN-small's shapes its forward runs at 1.9x
    the library convolution's speed, forward and gradient together at 0.9-1.2x over runs
    (``benchmarks/bound_kernels.py``). Off the CPU ``torch.nn.functional.conv2d`` runs. The
    kernel's result is channels-last.

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
    if has_bounds_ops(A) and A.dtype == taps.dtype:
        return torch.ops.torch_dlt.phase_conv(A, taps)
    return F.conv2d(A, taps, padding=(taps.shape[2] - 1, taps.shape[3] - 1))


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
    writes the ReLU's A-matrix to memory (without the compiled kernels:
    :func:`relu_phase_lower_reference`). Differentiable in every tensor input.

    Returns:
        Tensor: the lower bound [B, m] (the ReLU step's bias included).
    """
    if not has_bounds_ops(A):
        return relu_phase_lower_reference(
            A, slope_l, slope_u, v_neg, v_all, taps, c_frame, r_frame, h, w
        )
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
    return _relu_box_blocks(c, r)


# ------------------------------------------------------------------------------------------------
# Torch fallbacks: the same steps without the compiled library, blocked along the batch.


def _by_example(A: Tensor, t: Tensor) -> Tensor:
    """A [1, K] vector repeated (as a view) for each of A's examples."""
    return t.expand(A.shape[0], -1)


def _slopes_by_example(A: Tensor, slope_l: Tensor, slope_u: Tensor) -> tuple[Tensor, Tensor]:
    """The slopes as [B, 1, K] views; one tensor stays one (the fallback then skips a pass)."""
    upper = _by_example(A, slope_u).unsqueeze(1)
    return (upper if slope_l is slope_u else _by_example(A, slope_l).unsqueeze(1)), upper


def _relu_box_blocks(c: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """``(u + l, u - l)`` of ``u = relu(c + r)``, ``l = relu(c - r)``, written over c and r.

    Block by block along the batch, with a scratch block the allocator recycles: no fresh
    activation-sized tensor (each costs a pass of page faults), the same values as out of place.
    """
    step = max(1, _BLOCK_FLOATS // max(1, c[0].numel()))
    for first in range(0, c.shape[0], step):
        centre, radius = c[first : first + step], r[first : first + step]
        upper = (centre + radius).relu_()
        lower = centre.sub_(radius).relu_()
        torch.sub(upper, lower, out=radius)
        lower.add_(upper)
    return c, r


# Floats of one example block of the ReLU step's temporaries: small enough to stay in cache and
# to be recycled by the allocator instead of being page-faulted in afresh at every step.
_BLOCK_FLOATS = 1 << 18


def _relu_lines_blocks(
    A: Tensor, slope_l: Tensor, slope_u: Tensor, v_neg: Tensor, v_all: Tensor | None, A_in: Tensor
) -> Tensor:
    """Write ``slope_l A+ + slope_u A-`` into ``A_in`` (which may be A itself) block by block;
    return the bias ``A- . v_neg + A . v_all`` [B, m] (see :class:`_ReluLines`)."""
    batch, rows = A.shape[:2]
    if v_all is not None:
        v_all = v_all.expand(batch, -1)
    bias = A.new_empty(batch, 1, rows)
    step = max(1, _BLOCK_FLOATS // max(1, A[0].numel()))
    for first in range(0, batch, step):
        block = slice(first, first + step)
        a, out = A[block], A_in[block]
        a_neg = a.clamp(max=0)
        # [b, 1, K] @ [b, K, m]: the vector on the left is the fast orientation of bmm
        torch.bmm(v_neg[block].unsqueeze(1), a_neg.transpose(1, 2), out=bias[block])
        if v_all is not None:
            bias[block].baddbmm_(v_all[block].unsqueeze(1), a.transpose(1, 2))
        if slope_l is slope_u:
            torch.mul(a, slope_u[block], out=out)
        else:
            torch.mul(a, slope_l[block], out=out)
            out.addcmul_(a_neg, slope_u[block] - slope_l[block])
    return bias.squeeze(1)


class _ReluLines(torch.autograd.Function):
    """Backward step through a ReLU relaxed by per-unit lines, with a hand-written gradient.

    ``A [B, m, K]``, ``slope_l``, ``slope_u [B, 1, K]`` and the vectors ``v_neg [B, K]``,
    ``v_all [B or 1, K] | None`` give ``A_in = slope_l A+ + slope_u A-`` (A+, A- the positive and
    negative parts) and the bias ``A- . v_neg + A . v_all`` [B, m]: ``v_neg`` carries the upper
    line's intercept, ``v_all`` the bias of the layer below folded in. Autograd of the same
    expression keeps the clamp's mask, runs ``torch.where`` and sums two gradients of A_in,
    each slower on CPU than a plain pass and each a fresh A-sized tensor; here both passes go
    over blocks of examples, so that the only A-sized tensor made is the result.
    """

    @staticmethod
    def forward(ctx, A: Tensor, slope_l: Tensor, slope_u: Tensor, v_neg: Tensor, v_all):
        ctx.same_slopes = slope_l is slope_u
        ctx.save_for_backward(A, slope_l, slope_u, v_neg, v_all)
        A_in = torch.empty(A.shape, dtype=A.dtype, device=A.device)
        return A_in, _relu_lines_blocks(A, slope_l, slope_u, v_neg, v_all, A_in)

    @staticmethod
    def backward(ctx, grad_in: Tensor, grad_bias: Tensor):
        A, slope_l, slope_u, v_neg, v_all = ctx.saved_tensors
        need_A, need_l, need_u, need_neg, need_all = ctx.needs_input_grad[:5]
        same = ctx.same_slopes
        batch, rows = A.shape[:2]
        grad_A = torch.empty(A.shape, dtype=A.dtype, device=A.device) if need_A else None
        grad_l = slope_l.new_empty(slope_l.shape) if need_l and not same else None
        grad_u = slope_u.new_empty(slope_u.shape) if need_u else None
        grad_neg = v_neg.new_empty(v_neg.shape) if need_neg else None
        grad_all = A.new_empty(batch, A.shape[2]) if need_all else None
        shared_all = v_all
        if v_all is not None:
            v_all = v_all.expand(batch, -1)
        step = max(1, _BLOCK_FLOATS // max(1, A[0].numel()))
        for first in range(0, batch, step):
            block = slice(first, first + step)
            a, g = A[block], grad_in[block]
            g_bias = grad_bias[block].unsqueeze(1)  # [b, 1, m]
            a_neg = a.clamp(max=0)
            # sums over the rows as [b, 1, m] @ [b, m, K], faster than a reduction over dim 1
            ones = a.new_ones(a.shape[0], 1, rows)
            if need_u and same:
                torch.bmm(ones, g * a, out=grad_u[block])
            elif need_u or need_l:
                if need_u:
                    torch.bmm(ones, g * a_neg, out=grad_u[block])
                if need_l:
                    torch.bmm(ones, g * a, out=grad_l[block])
                    if need_u:
                        grad_l[block] -= grad_u[block]
            if need_neg:
                torch.bmm(g_bias, a_neg, out=grad_neg[block].unsqueeze(1))
            if need_all:
                torch.bmm(g_bias, a, out=grad_all[block].unsqueeze(1))
            if need_A:
                # slope_l and v_all everywhere, plus (slope_u - slope_l) and v_neg where A < 0
                out = grad_A[block]
                torch.mul(g_bias.transpose(1, 2), v_neg[block].unsqueeze(1), out=out)
                if not same:
                    out.addcmul_(g, slope_u[block] - slope_l[block])
                out.mul_(a_neg.sign_().neg_()).addcmul_(g, slope_l[block])
                if v_all is not None:
                    out.addcmul_(g_bias.transpose(1, 2), v_all[block].unsqueeze(1))
        if need_all and grad_all.shape[0] > shared_all.shape[0]:
            grad_all = grad_all.sum(0, keepdim=True)
        return grad_A, grad_l, grad_u, grad_neg, grad_all
