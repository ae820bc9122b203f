"""Fake kernels and the autograd formula of the certified-bound ops, registered from Python.

``relu_lines`` is differentiable through the compiled ``relu_lines_backward`` (checked against
the reference's autograd by ``gradcheck`` in the tests); ``ibp_relu_`` writes in place and is
used without autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The compiled ops of the certified bounds; a library that lacks any of them is not used for them.
OP_NAMES = (
    "crown_lines",
    "relu_lines",
    "relu_lines_",
    "ibp_relu_",
    "phase_conv",
    "relu_phase_lower",
)


def _relu_lines_fake(A: Tensor, slope_l, slope_u, v_neg, v_all):
    return A.new_empty(A.shape), A.new_empty(A.shape[:2])


def _relu_lines_in_place_fake(A: Tensor, slope_l, slope_u, v_neg, v_all):
    return A.new_empty(A.shape[:2])


def _relu_lines_backward_fake(grad_in, grad_bias, A, slope_l, slope_u, v_neg, v_all):
    batch, _, units = A.shape
    return (A.new_empty(A.shape), *(A.new_empty(batch, units) for _ in range(4)))


def _ibp_relu_fake(c: Tensor, r: Tensor) -> None:
    return None


def _setup(ctx, inputs, output) -> None:
    A, slope_l, slope_u, v_neg, v_all = inputs
    ctx.save_for_backward(A, slope_l, slope_u, v_neg, v_all)
    ctx.shapes = [None if t is None else t.shape for t in inputs]


def _reduce(grad: Tensor, shape) -> Tensor:
    """The per-example gradient [B, K] summed onto an input of batch 1 where it was shared."""
    return grad.sum(0, keepdim=True) if shape[0] == 1 and grad.shape[0] != 1 else grad


def _relu_lines_backward(ctx, grad_in: Tensor | None, grad_bias: Tensor | None):
    A, slope_l, slope_u, v_neg, v_all = ctx.saved_tensors
    if grad_in is None:
        grad_in = A.new_zeros(A.shape)
    if grad_bias is None:
        grad_bias = A.new_zeros(A.shape[:2])
    grads = torch.ops.torch_dlt.relu_lines_backward(
        grad_in, grad_bias, A, slope_l, slope_u, v_neg, v_all
    )
    out = [grads[0]]
    for grad, shape in zip(grads[1:], ctx.shapes[1:]):
        out.append(None if shape is None else _reduce(grad, shape))
    return tuple(out)


def _phase_conv_fake(A: Tensor, taps: Tensor):
    n, _, h, w = A.shape
    p, _, th, tw = taps.shape
    out = A.new_empty(n, h + th - 1, w + tw - 1, p)
    return out.permute(0, 3, 1, 2)


def _phase_conv_backward_fake(grad: Tensor, A: Tensor, taps: Tensor):
    n, c, h, w = A.shape
    return A.new_empty(n, h, w, c).permute(0, 3, 1, 2), taps.new_empty(taps.shape)


def _phase_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _phase_conv_backward(ctx, grad: Tensor):
    A, taps = ctx.saved_tensors
    return tuple(torch.ops.torch_dlt.phase_conv_backward(grad, A, taps))


def _relu_phase_lower_fake(A, slope_l, slope_u, v_neg, v_all, taps, c_frame, r_frame, h, w):
    return A.new_empty(A.shape[:2]), A.new_empty(*A.shape[:2], c_frame.shape[1])


def _relu_phase_lower_backward_fake(
    grad, A, slope_l, slope_u, v_neg, v_all, taps, c_frame, r_frame, phases, h, w
):
    batch, _, units = A.shape
    vectors = [A.new_empty(batch, units) for _ in range(4)]
    frames = [A.new_empty(c_frame.shape), A.new_empty(r_frame.shape)]
    return [A.new_empty(A.shape), *vectors, taps.new_empty(taps.shape), *frames]


def _fused_setup(ctx, inputs, output) -> None:
    A, slope_l, slope_u, v_neg, v_all, taps, c_frame, r_frame, h, w = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(A, slope_l, slope_u, v_neg, v_all, taps, c_frame, r_frame, output[1])
    ctx.size = (h, w)
    ctx.shapes = [None if t is None else t.shape for t in (slope_l, slope_u, v_neg, v_all)]


def _fused_backward(ctx, grad: Tensor | None, _grad_phases):
    A, slope_l, slope_u, v_neg, v_all, taps, c_frame, r_frame, phases = ctx.saved_tensors
    if grad is None:
        grad = A.new_zeros(A.shape[:2])
    grads = torch.ops.torch_dlt.relu_phase_lower_backward(
        grad, A, slope_l, slope_u, v_neg, v_all, taps, c_frame, r_frame, phases, *ctx.size
    )
    vectors = [
        None if shape is None else _reduce(g, shape) for g, shape in zip(grads[1:5], ctx.shapes)
    ]
    return (grads[0], *vectors, grads[5], grads[6], grads[7], None, None)


def _crown_lines_fake(lower: Tensor, upper: Tensor, channels_last: bool):
    layout = torch.channels_last if channels_last and lower.dim() == 4 else torch.contiguous_format
    out = [torch.empty_like(lower, memory_format=layout) for _ in range(3)]
    return (*out, torch.empty_like(lower, dtype=torch.bool, memory_format=layout))


def _crown_lines_backward_fake(grad_slope_u, grad_icpt_u, lower, upper, channels_last):
    return torch.empty_like(lower), torch.empty_like(upper)


def _lines_setup(ctx, inputs, output) -> None:
    lower, upper, channels_last = inputs
    ctx.mark_non_differentiable(output[0], output[3])
    ctx.save_for_backward(lower, upper)
    ctx.channels_last = channels_last


def _crown_lines_backward(ctx, _grad_slope_l, grad_slope_u, grad_icpt_u, _grad_unstable):
    lower, upper = ctx.saved_tensors
    if grad_slope_u is None:
        grad_slope_u = torch.zeros_like(lower)
    if grad_icpt_u is None:
        grad_icpt_u = torch.zeros_like(lower)
    grads = torch.ops.torch_dlt.crown_lines_backward(
        grad_slope_u, grad_icpt_u, lower, upper, ctx.channels_last
    )
    return grads[0], grads[1], None


def register() -> None:
    """Attach the fake kernels and the autograd formulas to the ops of the loaded ``_C``."""
    if not all(hasattr(torch.ops.torch_dlt, name) for name in OP_NAMES):
        return  # an older library: torch_dlt.ops.has_bounds_ops() is False, nothing calls them
    fakes = {
        "relu_lines": _relu_lines_fake,
        "relu_lines_": _relu_lines_in_place_fake,
        "relu_lines_backward": _relu_lines_backward_fake,
        "ibp_relu_": _ibp_relu_fake,
        "phase_conv": _phase_conv_fake,
        "phase_conv_backward": _phase_conv_backward_fake,
        "crown_lines": _crown_lines_fake,
        "crown_lines_backward": _crown_lines_backward_fake,
        "relu_phase_lower": _relu_phase_lower_fake,
        "relu_phase_lower_backward": _relu_phase_lower_backward_fake,
    }
    for name, fake in fakes.items():
        torch.library.register_fake(f"torch_dlt::{name}")(fake)
    for name, backward, setup in (
        ("relu_lines", _relu_lines_backward, _setup),
        ("phase_conv", _phase_conv_backward, _phase_setup),
        ("crown_lines", _crown_lines_backward, _lines_setup),
        ("relu_phase_lower", _fused_backward, _fused_setup),
    ):
        torch.library.register_autograd(f"torch_dlt::{name}", backward, setup_context=setup)
