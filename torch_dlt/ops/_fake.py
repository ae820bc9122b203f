"""Fake (meta) kernels and autograd formulas for the compiled ops, registered from Python.

The fake kernels give ``torch.compile`` and ``torch.export`` the output shapes without running a
kernel; the autograd formulas make the ops differentiable (checked by ``gradcheck`` in the tests).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _reduced_shape(x: Tensor, dim: int) -> list:
    shape = list(x.shape)
    del shape[dim % x.dim()]
    return shape


def _moments_fake(x: Tensor, dim: int):
    shape = _reduced_shape(x, dim)
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(shape)


def _moments_setup_context(ctx, inputs, output):
    x, dim = inputs
    mean, var, _ = output
    ctx.save_for_backward(x, mean, var)
    ctx.dim = dim


def _moments_backward(ctx, grad_mean, grad_var, grad_kurt):
    # d mean / dx_i = 1/n;  d m2 / dx_i = 2 d_i / n;  d m4 / dx_i = 4 (d_i^3 - m3) / n,
    # with d_i = x_i - mean; excess kurtosis k = m4 / m2^2 - 3.
    x, mean, var = ctx.saved_tensors
    dim = ctx.dim % x.dim()
    n = x.shape[dim]
    d = x - mean.unsqueeze(dim)
    grad = torch.zeros_like(x)
    if grad_mean is not None:
        grad = grad + grad_mean.unsqueeze(dim) / n
    if grad_var is not None:
        grad = grad + grad_var.unsqueeze(dim) * (2.0 / n) * d
    if grad_kurt is not None:
        d3 = d * d * d
        m3 = d3.mean(dim, keepdim=True)
        m4 = (d3 * d).mean(dim, keepdim=True)
        m2 = var.unsqueeze(dim)
        dk_dm4 = 1.0 / (m2 * m2)
        dk_dm2 = -2.0 * m4 / (m2 * m2 * m2)
        g = grad_kurt.unsqueeze(dim)
        grad = grad + g * (dk_dm4 * 4.0 * (d3 - m3) + dk_dm2 * 2.0 * d) / n
    return grad, None


def register() -> None:
    """Attach fake kernels and autograd formulas to the ops of the loaded ``_C`` library."""
    torch.library.register_fake("torch_dlt::moments")(_moments_fake)
    torch.library.register_autograd(
        "torch_dlt::moments", _moments_backward, setup_context=_moments_setup_context
    )
