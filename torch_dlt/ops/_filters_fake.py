"""Fake (meta) kernels and autograd of the filter-visualisation ops, registered from Python.

The kernels are forward-only; their backward differentiates the pure-torch reference (the ops are
cheap next to any training step, and the reference's autograd is the definition of the gradient),
so the compiled and the reference path give the same gradients (checked by ``gradcheck``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_dlt.ops import _filters_reference as ref


def has_filter_ops() -> bool:
    """Whether the loaded ``_C`` carries these ops (a library built before them does not)."""
    return hasattr(torch.ops.torch_dlt, "filter_grid") and hasattr(
        torch.ops.torch_dlt, "spectral_signature"
    )


def _filter_grid_fake(weight, nrow, padding, pad_value, normalize, symmetric, channels):
    o, i, kh, kw = weight.shape
    tiles = o * i if channels == "tiles" else o
    height, width = ref.grid_layout(tiles, nrow, kh, kw, padding)
    return weight.new_empty(3 if channels == "rgb" else 1, height, width)


def _spectral_signature_fake(weight, bin_index, n_orient, n_freq, fft_size):
    o = weight.shape[0]
    return (
        weight.new_empty(o, n_orient, n_freq),
        weight.new_empty(o),
        weight.new_empty(o),
        weight.new_empty(o),
    )


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.arguments = inputs[1:]


def _reference_vjp(fn, ctx, grads):
    (weight,) = ctx.saved_tensors
    with torch.enable_grad():
        w = weight.detach().requires_grad_()
        out = fn(w, *ctx.arguments)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        if not pairs:
            return torch.zeros_like(weight)
        (grad,) = torch.autograd.grad(
            [o for o, _ in pairs], w, [g for _, g in pairs], allow_unused=True
        )
    return torch.zeros_like(weight) if grad is None else grad


def _filter_grid_backward(ctx, grad: Tensor):
    return (_reference_vjp(ref.filter_grid, ctx, (grad,)),) + (None,) * 6


def _spectral_signature_backward(ctx, *grads: Tensor):
    return (_reference_vjp(ref.spectral_signature, ctx, grads),) + (None,) * 4


def register() -> None:
    """Attach fake kernels and autograd to ``filter_grid`` and ``spectral_signature``."""
    if not has_filter_ops():
        return
    torch.library.register_fake("torch_dlt::filter_grid")(_filter_grid_fake)
    torch.library.register_fake("torch_dlt::spectral_signature")(_spectral_signature_fake)
    torch.library.register_autograd(
        "torch_dlt::filter_grid", _filter_grid_backward, setup_context=_save_inputs
    )
    torch.library.register_autograd(
        "torch_dlt::spectral_signature",
        _spectral_signature_backward,
        setup_context=_save_inputs,
    )
