"""Fake (meta) kernels of the R-operator ops, so ``torch.compile`` / ``torch.export`` see shapes.

The ops are not differentiable (they are themselves second-order products), so no autograd
formula is registered.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _activation_jvp_fake(x: Tensor, y: Tensor, v: Tensor, kind: int, a: float, b: float):
    return v.new_empty(v.shape)


def _activation_hvp_backward_fake(x, y, g, rx, rg, kind, a, b):
    return x.new_empty(x.shape), rg.new_empty(rg.shape)


def _loss_curvature_fake(z: Tensor, targets: Tensor, rz: Tensor, loss: int, reduction: int):
    return z.new_empty(z.shape), rz.new_empty(rz.shape)


def _sequential_hvp_fake(inputs, targets, params, directions, program, constants, loss, reduction,
                         ggn, primal):  # fmt: skip
    return [inputs.new_empty(0) if d is None else d.new_empty(d.shape) for d in directions]


def _sequential_primal_fake(inputs, targets, params, program, constants, loss, reduction,
                            gradients):  # fmt: skip
    from torch_dlt.ops._hvp_reference import primal_layout, program_outputs

    outputs = program_outputs(inputs, list(params), list(program), list(constants))
    # The gradient at each output has the output's shape.
    shapes = [o.shape for o in outputs] * (2 if gradients else 1)
    layout = primal_layout(list(program))
    return [inputs.new_empty(shape if kept else (0,)) for shape, kept in zip(shapes, layout)]


def register() -> None:
    """Attach the fake kernels to the R-operator ops of the loaded ``_C`` library."""
    torch.library.register_fake("torch_dlt::activation_jvp")(_activation_jvp_fake)
    torch.library.register_fake("torch_dlt::activation_hvp_backward")(_activation_hvp_backward_fake)
    torch.library.register_fake("torch_dlt::loss_curvature")(_loss_curvature_fake)
    torch.library.register_fake("torch_dlt::sequential_hvp")(_sequential_hvp_fake)
    torch.library.register_fake("torch_dlt::sequential_primal")(_sequential_primal_fake)
