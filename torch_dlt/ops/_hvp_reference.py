"""Pure-PyTorch references of the R-operator ops (Pearlmutter 1994) and their shared encoding.

The elementwise references spell the derivative formulas out; the whole-program reference
:func:`sequential_hvp` interprets the layer program as a function and differentiates it with
``torch.func`` (forward-over-reverse for H V, a JVP, the loss curvature and a VJP for G V), so
it is an oracle independent of the hand-written R-forward / R-backward sweeps of the kernels.
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch
import torch.nn.functional as F
from torch import Tensor


class ActivationKind(IntEnum):
    """The ``kind`` of the activation ops; ``(a, b)`` are each kind's constants."""

    RELU = 1
    LEAKY_RELU = 2  # a: negative slope
    TANH = 3
    SIGMOID = 4
    GELU = 5
    GELU_TANH = 6
    ELU = 7  # a: alpha, b: scale (SELU is an ELU)
    SOFTPLUS = 8  # a: beta, b: threshold
    SILU = 9
    HARDTANH = 10  # a: min, b: max
    ERF = 11
    CELU = 12  # a: alpha


class Opcode(IntEnum):
    """Record opcodes of the ``sequential_hvp`` program (ints after the opcode in comments)."""

    LINEAR = 1  # has_bias; tensors W, (b)
    CONV2D = 2  # has_bias, stride h/w, padding h/w, dilation h/w, groups; tensors W, (b)
    ACTIVATION = 3  # kind; constants a, b
    MAX_POOL2D = 4  # kernel h/w, stride h/w, padding h/w, dilation h/w, ceil_mode
    AVG_POOL2D = 5  # kernel h/w, stride h/w, padding h/w, ceil_mode, count_include_pad, divisor
    ADAPTIVE_AVG_POOL2D = 6  # output h/w
    ADAPTIVE_MAX_POOL2D = 7  # output h/w
    FLATTEN = 8  # start_dim, end_dim
    BATCH_NORM = 9  # has_weight, has_bias; tensors mean, var, (weight), (bias); constant eps


RECORD_LENGTH = {
    Opcode.LINEAR: 1,
    Opcode.CONV2D: 8,
    Opcode.ACTIVATION: 1,
    Opcode.MAX_POOL2D: 9,
    Opcode.AVG_POOL2D: 9,
    Opcode.ADAPTIVE_AVG_POOL2D: 2,
    Opcode.ADAPTIVE_MAX_POOL2D: 2,
    Opcode.FLATTEN: 2,
    Opcode.BATCH_NORM: 2,
}


class LossKind(IntEnum):
    CROSS_ENTROPY = 0
    MSE = 1


class Reduction(IntEnum):
    MEAN = 0
    SUM = 1


def activation_forward(x: Tensor, kind: int, a: float, b: float) -> Tensor:
    """The activation itself, ``sigma(x)``."""
    k = ActivationKind(kind)
    if k == ActivationKind.RELU:
        return F.relu(x)
    if k == ActivationKind.LEAKY_RELU:
        return F.leaky_relu(x, a)
    if k == ActivationKind.TANH:
        return torch.tanh(x)
    if k == ActivationKind.SIGMOID:
        return torch.sigmoid(x)
    if k == ActivationKind.GELU:
        return F.gelu(x)
    if k == ActivationKind.GELU_TANH:
        return F.gelu(x, approximate="tanh")
    if k == ActivationKind.ELU:
        return b * F.elu(x, a)
    if k == ActivationKind.SOFTPLUS:
        return F.softplus(x, a, b)
    if k == ActivationKind.SILU:
        return F.silu(x)
    if k == ActivationKind.HARDTANH:
        return F.hardtanh(x, a, b)
    if k == ActivationKind.ERF:
        return torch.erf(x)
    return F.celu(x, a)


def activation_derivatives(
    x: Tensor, y: Tensor, kind: int, a: float, b: float
) -> tuple[Tensor, Tensor]:
    """``(sigma'(x), sigma''(x))`` from the pre-activation ``x`` and output ``y = sigma(x)``."""
    k = ActivationKind(kind)
    zero = torch.zeros_like(x)
    one = torch.ones_like(x)
    if k == ActivationKind.RELU:
        return torch.where(x > 0, one, zero), zero
    if k == ActivationKind.LEAKY_RELU:
        return torch.where(x > 0, one, one * a), zero
    if k == ActivationKind.TANH:
        d1 = 1 - y * y
        return d1, -2 * y * d1
    if k == ActivationKind.SIGMOID:
        d1 = y * (1 - y)
        return d1, d1 * (1 - 2 * y)
    if k == ActivationKind.GELU:
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
        return cdf + x * pdf, pdf * (2 - x * x)
    if k == ActivationKind.GELU_TANH:
        c, kappa = math.sqrt(2 / math.pi), 0.044715
        t = torch.tanh(c * (x + kappa * x**3))
        sech2 = 1 - t * t
        du = c * (1 + 3 * kappa * x * x)
        ddu = 6 * c * kappa * x
        return 0.5 * (1 + t) + 0.5 * x * sech2 * du, sech2 * du + 0.5 * x * sech2 * (
            ddu - 2 * t * du * du
        )
    if k == ActivationKind.ELU:
        e = b * a * torch.exp(torch.clamp(x, max=0))
        return torch.where(x > 0, one * b, e), torch.where(x > 0, zero, e)
    if k == ActivationKind.SOFTPLUS:
        s = torch.sigmoid(a * x)
        linear = x * a > b
        return torch.where(linear, one, s), torch.where(linear, zero, a * s * (1 - s))
    if k == ActivationKind.SILU:
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s)), s * (1 - s) * (2 + x * (1 - 2 * s))
    if k == ActivationKind.HARDTANH:
        return torch.where((x > a) & (x < b), one, zero), zero
    if k == ActivationKind.ERF:
        d1 = 2 / math.sqrt(math.pi) * torch.exp(-x * x)
        return d1, -2 * x * d1
    e = torch.exp(torch.clamp(x, max=0) / a)
    return torch.where(x > 0, one, e), torch.where(x > 0, zero, e / a)


def activation_jvp(x: Tensor, y: Tensor, v: Tensor, kind: int, a: float, b: float) -> Tensor:
    """``sigma'(x) v`` for a block of directions ``v`` [B, k, *x.shape[1:]]."""
    d1, _ = activation_derivatives(x, y, kind, a, b)
    return d1.unsqueeze(1) * v


def activation_hvp_backward(
    x: Tensor, y: Tensor, g: Tensor, rx: Tensor, rg: Tensor, kind: int, a: float, b: float
) -> tuple[Tensor, Tensor]:
    """``(sigma'(x) g, sigma'(x) rg + sigma''(x) g rx)``: backward and R-backward."""
    d1, d2 = activation_derivatives(x, y, kind, a, b)
    return d1 * g, d1.unsqueeze(1) * rg + (d2 * g).unsqueeze(1) * rx


def loss_curvature(
    z: Tensor, targets: Tensor, rz: Tensor, loss: int, reduction: int
) -> tuple[Tensor, Tensor]:
    """Gradient of the loss wrt the outputs ``z`` and the loss Hessian applied to ``rz``."""
    if LossKind(loss) == LossKind.MSE:
        s = 2.0 / (z.numel() if Reduction(reduction) == Reduction.MEAN else 1.0)
        return s * (z - targets), s * rz
    s = 1.0 / z.shape[0] if Reduction(reduction) == Reduction.MEAN else 1.0
    p = torch.softmax(z, dim=1)
    if targets.dtype == torch.int64:
        t = F.one_hot(targets, z.shape[1]).to(z.dtype)
    else:
        t = targets
    mass = t.sum(1, keepdim=True)
    dot = (p.unsqueeze(1) * rz).sum(-1, keepdim=True)
    hz = s * (mass * p).unsqueeze(1) * (rz - dot)
    return s * (mass * p - t), hz


def parse_program(program: list[int]) -> list[tuple[Opcode, list[int]]]:
    """Split the flat program into ``(opcode, attributes)`` records."""
    records, pos = [], 0
    while pos < len(program):
        op = Opcode(program[pos])
        length = RECORD_LENGTH[op]
        records.append((op, list(program[pos + 1 : pos + 1 + length])))
        pos += 1 + length
    return records


def _layer_forward(op: Opcode, attr: list[int], a: Tensor, tensors, values) -> Tensor:
    """One record of the program on ``a``, drawing its tensors and constants from the iterators."""
    if op == Opcode.LINEAR:
        w = next(tensors)
        return F.linear(a, w, next(tensors) if attr[0] else None)
    if op == Opcode.CONV2D:
        w = next(tensors)
        bias = next(tensors) if attr[0] else None
        return F.conv2d(a, w, bias, tuple(attr[1:3]), tuple(attr[3:5]), tuple(attr[5:7]), attr[7])
    if op == Opcode.ACTIVATION:
        return activation_forward(a, attr[0], next(values), next(values))
    if op == Opcode.MAX_POOL2D:
        return F.max_pool2d(
            a, tuple(attr[0:2]), tuple(attr[2:4]), tuple(attr[4:6]), tuple(attr[6:8]), bool(attr[8])
        )
    if op == Opcode.AVG_POOL2D:
        return F.avg_pool2d(
            a, tuple(attr[0:2]), tuple(attr[2:4]), tuple(attr[4:6]), bool(attr[6]), bool(attr[7]),
            attr[8] or None,
        )  # fmt: skip
    if op == Opcode.ADAPTIVE_AVG_POOL2D:
        return F.adaptive_avg_pool2d(a, tuple(attr))
    if op == Opcode.ADAPTIVE_MAX_POOL2D:
        return F.adaptive_max_pool2d(a, tuple(attr))
    if op == Opcode.FLATTEN:
        return a.flatten(attr[0], attr[1])
    mean, var = next(tensors), next(tensors)
    weight = next(tensors) if attr[0] else None
    bias = next(tensors) if attr[1] else None
    return F.batch_norm(a, mean, var, weight, bias, False, 0.0, next(values))


def program_outputs(
    inputs: Tensor, params: list[Tensor], program: list[int], constants: list[float]
) -> list[Tensor]:
    """Every layer's output of the program on ``inputs`` (``params`` in program order)."""
    tensors, values = iter(params), iter(constants)
    outputs, a = [], inputs
    for op, attr in parse_program(program):
        a = _layer_forward(op, attr, a, tensors, values)
        outputs.append(a)
    return outputs


def program_forward(
    inputs: Tensor, params: list[Tensor], program: list[int], constants: list[float]
) -> Tensor:
    """Run the layer program on ``inputs`` with the tensors ``params`` (in program order)."""
    return program_outputs(inputs, params, program, constants)[-1]


def sequential_primal(
    inputs: Tensor,
    targets: Tensor,
    params: list[Tensor],
    program: list[int],
    constants: list[float],
    loss: int,
    reduction: int,
    gradients: bool,
) -> list[Tensor]:
    """Each layer's output, then (``gradients``) the loss gradient with respect to each.

    Where a layer's output is a view of its input (Flatten), its entry is an empty tensor; so is
    the gradient at a Flatten's input.
    """
    with torch.enable_grad():
        detached = [p.detach() for p in params]
        start = inputs.detach().requires_grad_(gradients)
        outputs = program_outputs(start, detached, program, constants)
        grads = []
        if gradients:
            total = _loss(outputs[-1], targets, loss, reduction)
            grads = list(torch.autograd.grad(total, outputs))
    tensors = [out.detach() for out in outputs] + grads
    return [t if kept else inputs.new_empty(0) for t, kept in zip(tensors, primal_layout(program))]


def primal_layout(program: list[int]) -> list[bool]:
    """Which entries of :func:`sequential_primal`'s list hold a tensor (the rest are empty).

    Layer l's output, unless it is a view of its input (Flatten); then the gradient at layer l's
    output, unless layer l + 1 is a Flatten (the gradient at a view's input is a view of the one
    at its output). ``zip`` with the list of outputs only (no gradients) reads the first half.
    """
    views = [op == Opcode.FLATTEN for op, _ in parse_program(program)]
    return [not v for v in views] + [not v for v in views[1:] + [False]]


def _loss(z: Tensor, targets: Tensor, loss: int, reduction: int) -> Tensor:
    name = "mean" if Reduction(reduction) == Reduction.MEAN else "sum"
    if LossKind(loss) == LossKind.MSE:
        # Spelled out: forward-over-reverse through F.mse_loss trips on an immutable ZeroTensor.
        squares = (z - targets) ** 2
        return squares.mean() if name == "mean" else squares.sum()
    return F.cross_entropy(z, targets, reduction=name)


def sequential_hvp(
    inputs: Tensor,
    targets: Tensor,
    params: list[Tensor],
    directions: list[Tensor | None],
    program: list[int],
    constants: list[float],
    loss: int,
    reduction: int,
    ggn: bool,
    primal: list[Tensor] | None = None,
) -> list[Tensor]:
    """H V (or G V) wrt the ``params`` that have a direction ``[k, *shape]``, by ``torch.func``.

    ``primal`` (the kernels' reusable primal pass) is not needed here: the reference recomputes.
    """
    free = [i for i, d in enumerate(directions) if d is not None]
    theta = tuple(params[i] for i in free)
    tangents = tuple(directions[i] for i in free)

    def network(*trainable: Tensor) -> Tensor:
        full = list(params)
        for i, t in zip(free, trainable):
            full[i] = t
        return program_forward(inputs, full, program, constants)

    if ggn:
        z, pullback = torch.func.vjp(network, *theta)

        def product(*v: Tensor) -> tuple[Tensor, ...]:
            _, jz = torch.func.jvp(network, theta, v)
            _, hz = loss_curvature(z, targets, jz.unsqueeze(1), loss, reduction)
            return pullback(hz.squeeze(1))

    else:
        gradient = torch.func.grad(
            lambda *t: _loss(network(*t), targets, loss, reduction),
            argnums=tuple(range(len(theta))),
        )

        def product(*v: Tensor) -> tuple[Tensor, ...]:
            return torch.func.jvp(gradient, theta, v)[1]

    k = tangents[0].shape[0]
    columns = [product(*(t[j] for t in tangents)) for j in range(k)]
    out = [inputs.new_empty(0) for _ in params]
    for n, i in enumerate(free):
        out[i] = torch.stack([column[n] for column in columns])
    return out
