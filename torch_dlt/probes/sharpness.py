"""Sharpness of a minimum: Keskar et al.'s epsilon-sharpness and the top Hessian eigenvalue.

Implements Keskar, Mudigere, Nocedal, Smelyanskiy & Tang (2017), "On large-batch training for
deep learning: generalization gap and sharp minima", plus power iteration on the loss Hessian.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from torch_dlt.probes._state import forked_rng, restored_mode
from torch_dlt.probes.landscape import (
    Batch,
    Data,
    LossFn,
    _batch_size,
    _batches,
    _forward_loss,
    _fresh_generator,
)

__all__ = ["HessianEigen", "Sharpness", "epsilon_sharpness", "top_hessian_eigenvalue"]


class Sharpness(NamedTuple):
    """Keskar et al.'s (2017) epsilon-sharpness of a model at its current weights.

    Attributes:
        sharpness (float): ``(max_loss - loss) / (1 + loss) * 100``.
        loss (float): the loss at the weights.
        max_loss (float): the largest loss found in the box around them.
    """

    sharpness: float
    loss: float
    max_loss: float


class HessianEigen(NamedTuple):
    """The largest eigenvalue of the loss Hessian and its eigenvector.

    Attributes:
        eigenvalue (float): the largest (algebraic) eigenvalue.
        eigenvector (list[Tensor]): unit-norm, shaped like ``model.parameters()``.
        iterations (int): Hessian-vector products used.
    """

    eigenvalue: float
    eigenvector: list[Tensor]
    iterations: int


def _named_state(model: nn.Module) -> tuple[list[str], list[Tensor], dict[str, Tensor]]:
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    if not params:
        raise ValueError("the model has no parameters")
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    return names, params, buffers


def _mean_loss_and_grad(
    model: nn.Module,
    loss_fn: LossFn,
    batches: list[Batch],
    names: list[str],
    point: list[Tensor],
    buffers: dict[str, Tensor],
) -> tuple[float, list[Tensor]]:
    n_samples = sum(_batch_size(b) for b in batches)
    total = 0.0
    grads = [torch.zeros_like(p) for p in point]
    for batch in batches:
        leaves = [p.detach().requires_grad_(True) for p in point]
        loss = _forward_loss(model, loss_fn, {**dict(zip(names, leaves)), **buffers}, batch)
        weight = _batch_size(batch) / n_samples
        for g, gb in zip(grads, torch.autograd.grad(loss, leaves, allow_unused=True)):
            if gb is not None:
                g.add_(gb, alpha=weight)
        total += float(loss.detach()) * weight
    return total, grads


def epsilon_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    epsilon: float = 1e-3,
    steps: int = 20,
    restarts: int = 1,
    step_size: float | None = None,
    train: bool = False,
    generator: torch.Generator | None = None,
) -> Sharpness:
    r"""Keskar et al.'s (2017) :math:`\epsilon`-sharpness in the full parameter space.

    .. math::
        \phi_{x,f}(\epsilon) = \frac{\max_{y \in C_\epsilon} f(x + y) - f(x)}{1 + f(x)}
        \times 100, \qquad C_\epsilon = \{y : |y_i| \le \epsilon (|x_i| + 1)\}.

    Keskar et al. solve the inner maximisation with L-BFGS-B; here it is projected
    (sign-)gradient ascent in the box from a uniform random start, repeated ``restarts`` times,
    keeping the largest loss seen. It finds a local maximiser, so the value is a lower bound of
    the exact sharpness (as L-BFGS-B's is). The loss is the batch-size-weighted mean over
    ``data``; the model runs in eval mode unless ``train`` and is restored exactly.

    Args:
        model (nn.Module): the model at the minimum ``x``.
        loss_fn (Callable[[Tensor, Tensor], Tensor]): ``loss_fn(model(inputs), targets)``.
        data: one ``(inputs, targets)`` batch or an iterable of them.
        epsilon (float): relative box size (Keskar et al. use 1e-3 and 5e-4).
        steps (int): ascent steps per restart.
        restarts (int): random starts.
        step_size (float | None): step as a fraction of each coordinate's box half-width;
            ``None`` takes ``2.5 / steps`` so that a step sequence can cross the box.
        train (bool): evaluate in train mode.
        generator (torch.Generator | None): source of the random starts.

    Returns:
        Sharpness: ``(sharpness, loss, max_loss)``.

    Example:
        >>> net = nn.Linear(3, 1)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> s = epsilon_sharpness(net, nn.functional.mse_loss, (x, y), epsilon=1e-2, steps=5,
        ...                       generator=torch.Generator().manual_seed(0))
        >>> s.max_loss >= s.loss
        True
    """
    owner = "epsilon_sharpness"
    if not (isinstance(epsilon, (int, float)) and epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"{owner}: epsilon must be a positive number, got {epsilon!r}")
    for value, argument in ((steps, "steps"), (restarts, "restarts")):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {argument} must be an int >= 1, got {value!r}")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"{owner}: step_size must be positive, got {step_size!r}")
    step = 2.5 / steps if step_size is None else float(step_size)
    batches = _batches(data, owner)
    names, params, buffers = _named_state(model)
    bounds = [epsilon * (p.abs() + 1) for p in params]
    gen = _fresh_generator(generator, params[0].device)
    with restored_mode(model, eval_mode=not train, restore_buffers=True):
        with forked_rng(model):
            if train:
                model.train()
            with torch.no_grad():
                loss = sum(
                    float(_forward_loss(model, loss_fn, {**dict(zip(names, params)), **buffers}, b))
                    * _batch_size(b)
                    for b in batches
                ) / sum(_batch_size(b) for b in batches)
            max_loss = loss
            for _ in range(restarts):
                delta = [
                    (
                        torch.rand(b.shape, generator=gen, dtype=b.dtype, device=gen.device).to(b)
                        * 2
                        - 1
                    )
                    * b
                    for b in bounds
                ]
                for _ in range(steps + 1):
                    point = [p + d for p, d in zip(params, delta)]
                    value, grads = _mean_loss_and_grad(
                        model, loss_fn, batches, names, point, buffers
                    )
                    max_loss = max(max_loss, value)
                    delta = [
                        torch.clamp(d + step * b * g.sign(), -b, b)
                        for d, b, g in zip(delta, bounds, grads)
                    ]
    return Sharpness((max_loss - loss) / (1 + loss) * 100, loss, max_loss)


def top_hessian_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    iters: int = 100,
    tol: float = 1e-6,
    train: bool = False,
    generator: torch.Generator | None = None,
) -> HessianEigen:
    r"""The largest eigenvalue of the Hessian of the loss in the parameters, by power iteration.

    Hessian-vector products come from double backward (Pearlmutter, 1994). Power iteration
    converges to the eigenvalue of largest magnitude; if that one is negative a second run on
    :math:`H - \lambda_1 I` gives the largest algebraic eigenvalue, the curvature Keskar et al.
    (2017) relate to sharp minima. Convergence is geometric in the ratio of the two largest
    eigenvalues. This is the small, dependency-free probe; the library's curvature operators
    (Lanczos, spectral densities) live in :mod:`torch_dlt.probes.hessian`.

    Args:
        model (nn.Module): the model.
        loss_fn (Callable[[Tensor, Tensor], Tensor]): ``loss_fn(model(inputs), targets)``.
        data: one ``(inputs, targets)`` batch or an iterable of them (batch-size-weighted mean).
        iters (int): most Hessian-vector products per power run.
        tol (float): stop when the Rayleigh quotient changes by less than ``tol`` relatively.
        train (bool): evaluate in train mode (BatchNorm batch statistics).
        generator (torch.Generator | None): source of the starting vector.

    Returns:
        HessianEigen: ``(eigenvalue, eigenvector, iterations)``.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]]); y = torch.zeros(2, 1)
        >>> top = top_hessian_eigenvalue(net, nn.functional.mse_loss, (x, y),
        ...                              generator=torch.Generator().manual_seed(0))
        >>> round(top.eigenvalue, 4)  # H = 2 X^T X / 2 = diag(1, 4)
        4.0
    """
    owner = "top_hessian_eigenvalue"
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{owner}: iters must be an int >= 1, got {iters!r}")
    if not tol > 0:
        raise ValueError(f"{owner}: tol must be positive, got {tol!r}")
    batches = _batches(data, owner)
    names, params, buffers = _named_state(model)
    n_samples = sum(_batch_size(b) for b in batches)
    gen = _fresh_generator(generator, params[0].device)

    with restored_mode(model, eval_mode=not train, restore_buffers=True):
        with forked_rng(model):
            if train:
                model.train()
            leaves = [p.clone().requires_grad_(True) for p in params]
            # With one batch the gradient graph is built once and reused by every product.
            cached = None
            if len(batches) == 1:
                loss = _forward_loss(
                    model, loss_fn, {**dict(zip(names, leaves)), **buffers}, batches[0]
                )
                cached = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)

            def hvp(v: list[Tensor]) -> list[Tensor]:
                out = [torch.zeros_like(p) for p in params]
                for batch in batches:
                    if cached is not None:
                        grads, weight = cached, 1.0
                    else:
                        loss = _forward_loss(
                            model, loss_fn, {**dict(zip(names, leaves)), **buffers}, batch
                        )
                        grads = torch.autograd.grad(
                            loss, leaves, create_graph=True, allow_unused=True
                        )
                        weight = _batch_size(batch) / n_samples
                    dot = sum((g * vi).sum() for g, vi in zip(grads, v) if g is not None)
                    if not dot.requires_grad:  # the loss is at most linear in the parameters
                        continue
                    hv = torch.autograd.grad(dot, leaves, retain_graph=True, allow_unused=True)
                    for o, h in zip(out, hv):
                        if h is not None:
                            o.add_(h.detach(), alpha=weight)
                return out

            start = [
                torch.randn(p.shape, generator=gen, dtype=p.dtype, device=gen.device).to(p)
                for p in params
            ]
            value, vector, used = _power_iteration(hvp, start, 0.0, iters, tol)
            if value < 0:
                shifted, vector, more = _power_iteration(hvp, start, value, iters, tol)
                value, used = shifted + value, used + more
    return HessianEigen(value, [v.detach() for v in vector], used)


def _norm(v: list[Tensor]) -> Tensor:
    return torch.sqrt(sum(x.square().sum() for x in v))


def _power_iteration(
    hvp: object, start: list[Tensor], shift: float, iters: int, tol: float
) -> tuple[float, list[Tensor], int]:
    """Dominant eigenpair of ``H - shift * I`` from ``start``."""
    scale = _norm(start)
    v = [x / scale for x in start]
    value = 0.0
    for it in range(1, iters + 1):
        hv = [h - shift * x for h, x in zip(hvp(v), v)]
        new = float(sum((a * b).sum() for a, b in zip(v, hv)))
        norm = _norm(hv)
        if norm == 0:
            return new, v, it
        v = [h / norm for h in hv]
        if it > 1 and abs(new - value) <= tol * max(abs(new), 1e-30):
            return new, v, it
        value = new
    return value, v, iters
