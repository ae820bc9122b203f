"""Adversarial attacks: FGSM, PGD, DeepFool and the rotation-translation attack.

FGSM (Goodfellow et al. 2015), PGD (Madry et al. 2018), DeepFool (Moosavi-Dezfooli, Fawzi &
Frossard 2016) and the spatial attack of Engstrom et al. (2019), plus :func:`robustness`, which
runs one of them over a data loader and reports robust accuracy and DeepFool's rho_adv.

Every attack runs the model in eval mode and gives it back as it found it (``training`` flags,
parameters, their ``.grad`` and ``requires_grad``, buffers, the global RNG): gradients are taken
with :func:`torch.autograd.grad` with respect to the input only, and randomness comes from the
``generator`` argument alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from torch_dlt.probes._state import forked_rng, restored_mode

__all__ = [
    "AttackResult",
    "RobustnessResult",
    "deepfool",
    "fgsm",
    "pgd",
    "robustness",
    "spatial",
    "spatial_grid",
]

Model = Callable[[Tensor], Tensor]
Domain = tuple[float, float] | None
# Images are pushed through the model in slices of at most this many, to bound memory.
_FORWARD_CHUNK = 4096
# Bisection steps of DeepFool's final refinement: the boundary to 2^-12 of the perturbation.
_REFINE_STEPS = 12
# Images per pass of the spatial search: large enough to keep the model's batches efficient,
# small enough that inputs fooled early do not pay for many transforms they no longer need.
_SEARCH_BATCH = 512


@dataclass
class AttackResult:
    """What an attack found, one entry per input.

    Attributes:
        x_adv (Tensor[B, ...]): the adversarial inputs (like ``x``; inside ``domain``).
        success (Tensor[B], bool): the model's prediction on ``x_adv`` differs from the label
            (untargeted) or equals the target (targeted), evaluated on ``x_adv`` itself.
        norms (Tensor[B]): ``||x_adv - x||`` in the norm named by :attr:`norm`.
        iterations (Tensor[B], int64): gradient steps taken per input (DeepFool, PGD, FGSM), or
            transforms evaluated per input (spatial).
        norm (str): ``"l2"`` or ``"linf"``, the norm of :attr:`norms`.
        transforms (Tensor[B, 3] | None): spatial attack only: the chosen rotation (degrees,
            counter-clockwise) and the integer shifts ``dx`` (columns, right) and ``dy`` (rows,
            down) per input.
    """

    x_adv: Tensor
    success: Tensor
    norms: Tensor
    iterations: Tensor
    norm: str
    transforms: Tensor | None = None

    @property
    def success_rate(self) -> float:
        """Fraction of inputs on which the attack succeeded."""
        return float(self.success.float().mean()) if self.success.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# argument checks


def _norm_name(norm: object, caller: str) -> str:
    if isinstance(norm, str) and norm.lower() in ("l2", "2"):
        return "l2"
    if isinstance(norm, str) and norm.lower() in ("linf", "inf"):
        return "linf"
    if isinstance(norm, (int, float)) and not isinstance(norm, bool):
        if norm == 2:
            return "l2"
        if norm == math.inf:
            return "linf"
    raise ValueError(f"{caller}: norm must be 2 / 'l2' or float('inf') / 'linf', got {norm!r}")


def _check_domain(domain: object, caller: str) -> Domain:
    if domain is None:
        return None
    try:
        lo, hi = (float(v) for v in domain)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(
            f"{caller}: domain must be None or a pair (low, high) of numbers, got {domain!r}"
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{caller}: domain must satisfy low < high (finite), got {domain!r}")
    return lo, hi


def _check_x(x: object, domain: Domain, caller: str, *, image: bool = False) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{caller}: x must be a floating-point Tensor, got {_describe(x)}")
    if image and x.dim() != 4:
        raise ValueError(f"{caller}: x must be images [B, C, H, W], got shape {tuple(x.shape)}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(
            f"{caller}: x must be a non-empty batch [B, ...] with B >= 1, got shape "
            f"{tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{caller}: x contains NaN or infinite values")
    if domain is not None:
        lo, hi = float(x.min()), float(x.max())
        if lo < domain[0] or hi > domain[1]:
            raise ValueError(
                f"{caller}: x lies outside domain={domain} (its values span [{lo:.4g}, "
                f"{hi:.4g}]); pass the valid input box, or domain=None for unbounded inputs"
            )
    return x.detach()


def _check_labels(y: object, x: Tensor, caller: str, argument: str = "y") -> Tensor:
    if not isinstance(y, Tensor) or y.dtype not in (
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
    ):
        raise TypeError(f"{caller}: {argument} must be an integer Tensor, got {_describe(y)}")
    if tuple(y.shape) != (x.shape[0],):
        raise ValueError(
            f"{caller}: {argument} must be class indices of shape [B] = [{x.shape[0]}], got "
            f"shape {tuple(y.shape)}"
        )
    return y.to(device=x.device, dtype=torch.int64)


def _check_nonnegative(value: object, argument: str, caller: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{caller}: {argument} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{caller}: {argument} must be finite and >= 0, got {value!r}")
    return float(value)


def _check_positive_int(value: object, argument: str, caller: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{caller}: {argument} must be a positive int, got {value!r}")
    return value


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"Tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__


def _logits(model: Model, x: Tensor, caller: str, labels: Tensor | None = None) -> Tensor:
    """The model's output on ``x``, checked to be ``[B, classes]`` logits."""
    out = model(x)
    if not isinstance(out, Tensor) or not out.is_floating_point():
        raise ValueError(
            f"{caller}: the model must return a floating Tensor of logits [B, classes], got "
            f"{_describe(out)}"
        )
    if out.dim() != 2 or out.shape[0] != x.shape[0] or out.shape[1] < 2:
        raise ValueError(
            f"{caller}: the model must return logits of shape [B, classes] = "
            f"[{x.shape[0]}, >= 2], got shape {tuple(out.shape)}"
        )
    with torch.no_grad():
        rows_sum_to_one = bool(((out.sum(1) - 1).abs() < 1e-5).all())
        if rows_sum_to_one and bool((out >= 0).all()):
            raise ValueError(
                f"{caller}: the model's outputs are non-negative and sum to 1 per row: they look "
                "like probabilities; attacks need the logits (drop the final softmax)"
            )
    if labels is not None:
        _check_label_range(labels, out.shape[1], caller)
    return out


def _check_label_range(labels: Tensor, classes: int, caller: str) -> None:
    if bool((labels >= classes).any() | (labels < 0).any()):
        raise ValueError(
            f"{caller}: labels must lie in [0, {classes - 1}] for a model with {classes} "
            f"classes, got values in [{int(labels.min())}, {int(labels.max())}]"
        )


# ---------------------------------------------------------------------------------------------
# shared pieces


def _flat_norm(v: Tensor, norm: str) -> Tensor:
    flat = v.flatten(1)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)


def _clip(x: Tensor, domain: Domain) -> Tensor:
    return x if domain is None else x.clamp(domain[0], domain[1])


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """``v`` of shape [B] viewed to broadcast against ``like`` of shape [B, ...]."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _fooled(logits: Tensor, y: Tensor, targeted: bool) -> Tensor:
    pred = logits.argmax(1)
    return pred == y if targeted else pred != y


def _evaluate(model: Model, x: Tensor, y: Tensor, targeted: bool, caller: str) -> Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                _fooled(_logits(model, xc, caller), yc, targeted)
                for xc, yc in zip(x.split(_FORWARD_CHUNK), y.split(_FORWARD_CHUNK))
            ]
        )


def _input_gradient(model: Model, x: Tensor, y: Tensor, caller: str) -> tuple[Tensor, Tensor]:
    """Logits at ``x`` and the gradient of the summed cross-entropy with respect to ``x``."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = _logits(model, xg, caller, y)
        loss = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    return logits.detach(), grad


def _result(
    x: Tensor,
    x_adv: Tensor,
    success: Tensor,
    iterations: Tensor,
    norm: str,
    transforms: Tensor | None = None,
) -> AttackResult:
    return AttackResult(
        x_adv=x_adv,
        success=success,
        norms=_flat_norm(x_adv - x, norm),
        iterations=iterations,
        norm=norm,
        transforms=transforms,
    )


def _steepest_ascent(grad: Tensor, norm: str) -> Tensor:
    """The unit-norm direction maximising <grad, d>: sign(grad) for Linf, grad/||grad|| for L2."""
    if norm == "linf":
        return grad.sign()
    scale = grad.flatten(1).norm(dim=1).clamp_min(torch.finfo(grad.dtype).tiny)
    return grad / _per_sample(scale, grad)


def _project_ball(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    size = delta.flatten(1).norm(dim=1)
    factor = torch.where(size > eps, eps / size.clamp_min(torch.finfo(delta.dtype).tiny), 1.0)
    return delta * _per_sample(factor, delta)


def _generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    if generator is not None:
        return generator
    # A fresh, nondeterministically seeded generator: the global RNG is never drawn from.
    fresh = torch.Generator(device=device)
    fresh.seed()
    return fresh


# ---------------------------------------------------------------------------------------------
# FGSM and PGD


def fgsm(
    model: Model,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str | float = "linf",
    domain: Domain = (0.0, 1.0),
    targeted: bool = False,
) -> AttackResult:
    r"""Fast gradient (sign) method: one step of size ``eps`` along the loss gradient.

    ``x_adv = clip(x + eps * d)`` with ``d = sign(g)`` (Linf, Goodfellow, Shlens & Szegedy 2015)
    or ``d = g / ||g||_2`` (L2), where ``g`` is the gradient of the cross-entropy of ``y`` with
    respect to ``x`` (minus it when ``targeted``: then ``y`` holds the target classes).

    Args:
        model (Callable[[Tensor[B, ...]], Tensor[B, K]]): returns logits.
        x (Tensor[B, ...]): clean inputs inside ``domain``.
        y (Tensor[B], int64): true labels, or targets when ``targeted``.
        eps (float): step size, >= 0.
        norm (str | float): ``"linf"`` / ``float("inf")`` or ``"l2"`` / ``2``.
        domain (tuple[float, float] | None): valid input box; ``None`` for unbounded inputs.
        targeted (bool): move towards class ``y`` instead of away from it.

    Returns:
        AttackResult: ``iterations`` is 1 for every input.

    Example:
        >>> net = torch.nn.Linear(4, 3)
        >>> x, y = torch.full((2, 4), 0.5), torch.tensor([0, 1])
        >>> result = fgsm(net, x, y, eps=0.1)
        >>> bool(((result.x_adv - x).abs() <= 0.1 + 1e-7).all())
        True
    """
    caller = "fgsm"
    norm = _norm_name(norm, caller)
    domain = _check_domain(domain, caller)
    eps = _check_nonnegative(eps, "eps", caller)
    x = _check_x(x, domain, caller)
    y = _check_labels(y, x, caller)
    with restored_mode(model), forked_rng(model, x):
        _, grad = _input_gradient(model, x, y, caller)
        direction = _steepest_ascent(-grad if targeted else grad, norm)
        x_adv = _clip(x + eps * direction, domain)
        success = _evaluate(model, x_adv, y, targeted, caller)
    return _result(x, x_adv, success, torch.ones(len(x), dtype=torch.int64), norm)


def pgd(
    model: Model,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str | float = "linf",
    steps: int = 40,
    step_size: float | None = None,
    random_start: bool = True,
    early_stop: bool = True,
    domain: Domain = (0.0, 1.0),
    generator: torch.Generator | None = None,
    targeted: bool = False,
) -> AttackResult:
    r"""Projected gradient descent on the cross-entropy (Madry et al. 2018), Linf or L2.

    Each step moves along the steepest-ascent direction of the loss for the norm (``sign(g)``
    or ``g / ||g||_2``) by ``step_size``, then projects onto the ``eps``-ball around ``x`` and
    clips to ``domain``. The result is in both: for Linf the two boxes intersect exactly; for
    L2, clipping to a box that contains ``x`` only shrinks ``x_adv - x`` coordinate-wise, so the
    ball is kept.

    Args:
        model (Callable[[Tensor[B, ...]], Tensor[B, K]]): returns logits.
        x (Tensor[B, ...]): clean inputs inside ``domain``.
        y (Tensor[B], int64): true labels, or targets when ``targeted``.
        eps (float): radius of the ball, >= 0.
        norm (str | float): ``"linf"`` / ``float("inf")`` or ``"l2"`` / ``2``.
        steps (int): maximum number of steps.
        step_size (float | None): step length; default ``2.5 * eps / steps`` (Madry et al.).
        random_start (bool): start from a uniform sample of the ball (clipped to ``domain``).
        early_stop (bool): freeze each input at the first iterate that fools the model; without
            it every input takes all ``steps`` and the last iterate is returned.
        domain (tuple[float, float] | None): valid input box; ``None`` for unbounded inputs.
        generator (torch.Generator | None): source of the random start; without one a fresh,
            nondeterministically seeded generator is used (the global RNG is never touched).
        targeted (bool): descend the cross-entropy of class ``y`` instead.

    Returns:
        AttackResult: ``iterations`` counts the steps each input took.

    Example:
        >>> net = torch.nn.Linear(4, 3)
        >>> x, y = torch.full((2, 4), 0.5), torch.tensor([0, 1])
        >>> gen = torch.Generator().manual_seed(0)
        >>> result = pgd(net, x, y, eps=0.1, norm=2, steps=5, generator=gen)
        >>> bool((result.norms <= 0.1 + 1e-6).all()), result.x_adv.shape
        (True, torch.Size([2, 4]))
    """
    caller = "pgd"
    norm = _norm_name(norm, caller)
    domain = _check_domain(domain, caller)
    eps = _check_nonnegative(eps, "eps", caller)
    steps = _check_positive_int(steps, "steps", caller)
    if step_size is None:
        step_size = 2.5 * eps / steps
    step_size = _check_nonnegative(step_size, "step_size", caller)
    x = _check_x(x, domain, caller)
    y = _check_labels(y, x, caller)
    if random_start:
        delta = _random_in_ball(x, eps, norm, _generator(generator, x.device))
    else:
        delta = torch.zeros_like(x)
    x_adv = _clip(x + delta, domain)
    iterations = torch.zeros(len(x), dtype=torch.int64)
    active = torch.arange(len(x), device=x.device)
    sign = -1.0 if targeted else 1.0
    # Every iterate's logits are seen once, so success is read off the last evaluation of each
    # input rather than by another forward pass.
    success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    with restored_mode(model), forked_rng(model, x):
        for step in range(steps + 1):
            logits, grad = _input_gradient(model, x_adv[active], y[active], caller)
            fooled = _fooled(logits, y[active], targeted)
            success[active] = fooled
            if early_stop:
                active, grad = active[~fooled], grad[~fooled]
            if step == steps or len(active) == 0:
                break
            moved = x_adv[active] + step_size * _steepest_ascent(sign * grad, norm)
            delta = _project_ball(moved - x[active], eps, norm)
            x_adv[active] = _clip(x[active] + delta, domain)
            iterations[active.cpu()] += 1
    return _result(x, x_adv, success, iterations, norm)


# spatial() takes a keyword argument named pgd, which hides the function inside it.
_projected_gradient_descent = pgd


def _random_in_ball(x: Tensor, eps: float, norm: str, generator: torch.Generator) -> Tensor:
    """Uniform samples of the ``eps``-ball, one per input."""
    if norm == "linf":
        return eps * (2 * torch.rand(x.shape, generator=generator, device=x.device) - 1).to(x)
    # Uniform in the L2 ball: a uniform direction, radius eps * U^(1/d).
    direction = torch.randn(x.shape, generator=generator, device=x.device).to(x)
    direction = direction / _per_sample(direction.flatten(1).norm(dim=1), x)
    dim = x[0].numel()
    radius = eps * torch.rand(len(x), generator=generator, device=x.device).to(x) ** (1 / dim)
    return direction * _per_sample(radius, x)


# ---------------------------------------------------------------------------------------------
# DeepFool


def deepfool(
    model: Model,
    x: Tensor,
    y: Tensor | None = None,
    *,
    norm: str | float = 2,
    overshoot: float = 0.02,
    max_iter: int = 50,
    domain: Domain = (0.0, 1.0),
    candidates: int | None = None,
    refine: bool = True,
) -> AttackResult:
    r"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard 2016): the smallest perturbation that
    changes the prediction, found by repeatedly crossing the linearised nearest boundary.

    At iterate :math:`x_i`, for every candidate class :math:`k \ne \hat k` (the label) with
    :math:`f'_k = f_k(x_i) - f_{\hat k}(x_i)` and :math:`w'_k = \nabla f_k - \nabla f_{\hat k}`,
    the nearest linearised boundary is :math:`l = \arg\min_k |f'_k| / \|w'_k\|_q` and the step
    is :math:`r_i = |f'_l| \, w'_l / \|w'_l\|_2^2` (L2, :math:`q = 2`) or
    :math:`r_i = |f'_l| \, \mathrm{sign}(w'_l) / \|w'_l\|_1` (Linf, :math:`q = 1`), the dual
    norms of the paper's Eqs. (8)-(11). The iterate is :math:`x_0 + (1 + \eta) \sum_i r_i` with
    the overshoot :math:`\eta`. For an affine classifier the first step is the exact minimal
    perturbation (times :math:`1 + \eta`).

    The candidate-class gradients of a whole batch come from one forward pass and one backward
    pass of the batch sum per candidate class; each input leaves the batch as soon as it is
    fooled. With a ``domain``, the iterate is kept in the box, and coordinates on a face of the box
    whose gradient points out of it are left out of the linearisation (they cannot move that
    way). Clipping the paper's step instead stalls inputs on the faces of the box (a third of
    them after 50 steps on an MNIST CNN); solving each linearised step exactly inside the box
    crosses in one step but lands 5% further away than this.

    Args:
        model (Callable[[Tensor[B, ...]], Tensor[B, K]]): returns logits, K >= 2.
        x (Tensor[B, ...]): clean inputs inside ``domain``.
        y (Tensor[B] | None): labels to move away from; ``None`` uses the model's predictions,
            as in the paper.
        norm (str | float): ``2`` / ``"l2"`` or ``float("inf")`` / ``"linf"``.
        overshoot (float): :math:`\eta >= 0`; the paper uses 0.02.
        max_iter (int): maximum number of steps per input.
        domain (tuple[float, float] | None): valid input box; ``None`` for unbounded inputs.
        candidates (int | None): only the ``candidates`` classes with the largest initial
            logits (other than the label) are considered; ``None`` considers all.
        refine (bool): after the last step, shrink the total perturbation along its direction
            to the smallest multiple that still fools the model (bisection, 12 forward passes)
            and push it ``overshoot`` further again when that still fools it. The linear steps
            overshoot curved boundaries; on an MNIST CNN this makes the median perturbation 3%
            (in the [0, 1] box) to 6% (without it) smaller. It never enlarges a perturbation,
            and leaves the exact answer for affine classifiers as it is. ``False`` returns the
            paper's last iterate.

    Returns:
        AttackResult: ``norms`` are :math:`\|\hat r\|` in ``norm``; ``iterations`` counts the
        steps per input (0 for inputs already misclassified). Inputs not fooled within
        ``max_iter`` steps keep their last iterate and ``success`` False.

    Example:
        >>> net = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.eye(2))
        >>> result = deepfool(net, torch.tensor([[2.0, 0.0]]), overshoot=0.0, domain=None)
        >>> result.norms  # the distance from (2, 0) to the line x1 = x2 is sqrt(2)
        tensor([1.4142])
    """
    caller = "deepfool"
    norm = _norm_name(norm, caller)
    domain = _check_domain(domain, caller)
    overshoot = _check_nonnegative(overshoot, "overshoot", caller)
    max_iter = _check_positive_int(max_iter, "max_iter", caller)
    if candidates is not None:
        candidates = _check_positive_int(candidates, "candidates", caller)
    x = _check_x(x, domain, caller)
    if y is not None:
        y = _check_labels(y, x, caller)
    with restored_mode(model), forked_rng(model, x):
        with torch.no_grad():
            logits0 = torch.cat([_logits(model, xc, caller) for xc in x.split(_FORWARD_CHUNK)])
        if y is None:
            y = logits0.argmax(1)
        else:
            _check_label_range(y, logits0.shape[1], caller)
        other = logits0.scatter(1, y[:, None], -math.inf)
        count = logits0.shape[1] - 1 if candidates is None else min(candidates, other.shape[1] - 1)
        classes = other.topk(count, dim=1).indices  # [B, count]
        x_adv, success, iterations = _deepfool_loop(
            model, x, y, classes, norm, overshoot, max_iter, domain, caller
        )
        if refine:
            moved = success & (iterations > 0).to(success.device)
            x_adv[moved] = _shrink_to_boundary(
                model, x[moved], x_adv[moved], y[moved], overshoot, caller
            )
    return _result(x, x_adv, success, iterations, norm)


def _shrink_to_boundary(
    model: Model, x: Tensor, x_adv: Tensor, y: Tensor, overshoot: float, caller: str
) -> Tensor:
    """The smallest ``x + t (x_adv - x)``, t in (0, 1], that is still misclassified (by
    bisection), pushed ``overshoot`` further if that is still misclassified. Every returned
    point was evaluated and found misclassified."""
    if len(x) == 0:
        return x_adv
    direction = x_adv - x
    lo = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    hi = torch.ones_like(lo)

    def point(t: Tensor) -> Tensor:
        return torch.where(_per_sample(t == 1, x), x_adv, x + _per_sample(t, x) * direction)

    for _ in range(_REFINE_STEPS):
        middle = (lo + hi) / 2
        fooled = _evaluate(model, point(middle), y, False, caller)
        hi, lo = torch.where(fooled, middle, hi), torch.where(fooled, lo, middle)
    pushed = ((1 + overshoot) * hi).clamp(max=1)
    keep_push = _evaluate(model, point(pushed), y, False, caller)
    return point(torch.where(keep_push, pushed, hi))


def _deepfool_loop(
    model: Model,
    x: Tensor,
    y: Tensor,
    classes: Tensor,
    norm: str,
    overshoot: float,
    max_iter: int,
    domain: Domain,
    caller: str,
) -> tuple[Tensor, Tensor, Tensor]:
    scale = 1.0 + overshoot
    x_adv = x.clone()
    # The loop's forward passes see every final iterate: success is read off them.
    success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    r_total = torch.zeros_like(x)
    iterations = torch.zeros(len(x), dtype=torch.int64)
    active = torch.arange(len(x), device=x.device)
    tiny = torch.finfo(x.dtype).tiny
    for step in range(max_iter + 1):
        xa = x_adv[active].requires_grad_(True)
        ya, ca = y[active], classes[active]
        with torch.enable_grad():
            logits = _logits(model, xa, caller)
        keep = logits.detach().argmax(1) == ya
        success[active] = ~keep
        if step == max_iter or not bool(keep.any()):
            break
        # One forward pass, then one backward pass of the batch sum per candidate class: row k
        # of grads holds w'_k(x_b) = grad (f_{c_k} - f_y)(x_b) for every input b at once.
        # (Batching these backward passes with vmap was 2.6x slower on a CPU.)
        f_diff = logits.gather(1, ca) - logits.gather(1, ya[:, None])  # [A, K]
        k = f_diff.shape[1]
        grads = torch.stack(
            [
                torch.autograd.grad(f_diff[:, j].sum(), xa, retain_graph=j < k - 1)[0]
                for j in range(k)
            ]
        )
        f_diff = f_diff.detach().T  # [K, A]
        active, xa, grads, f_diff = active[keep], xa.detach()[keep], grads[:, keep], f_diff[:, keep]
        if domain is not None:
            # A coordinate on a face of the box whose gradient points out of the box cannot
            # move that way: leave it out of the linearisation rather than clip it afterwards.
            blocked = ((xa <= domain[0]) & (grads < 0)) | ((xa >= domain[1]) & (grads > 0))
            grads = grads.masked_fill(blocked, 0.0)
        flat = grads.flatten(2)
        dual = flat.norm(dim=2) if norm == "l2" else flat.abs().sum(dim=2)  # [K, A]
        distance = (f_diff.abs() / dual.clamp_min(tiny)).masked_fill(dual == 0, math.inf)
        nearest = distance.argmin(0)  # [A]
        cols = torch.arange(len(active), device=x.device)
        w, f = grads[nearest, cols], f_diff[nearest, cols].abs()
        if norm == "l2":
            step_r = w * _per_sample(f / dual[nearest, cols].clamp_min(tiny) ** 2, w)
        else:
            step_r = w.sign() * _per_sample(f / dual[nearest, cols].clamp_min(tiny), w)
        r_new = r_total[active] + step_r
        x_new = x[active] + scale * r_new
        if domain is not None:
            x_new = _clip(x_new, domain)
            r_new = (x_new - x[active]) / scale
        r_total[active], x_adv[active] = r_new, x_new
        iterations[active.cpu()] += 1
    return x_adv.detach(), success, iterations


# ---------------------------------------------------------------------------------------------
# spatial attack


def _rotate(images: Tensor, angles: Tensor, fill: float) -> Tensor:
    """Rotate each image counter-clockwise by ``angles`` degrees about its centre (bilinear,
    ``fill`` outside); an angle of exactly 0 returns the image unchanged."""
    b, _, h, w = images.shape
    theta = torch.deg2rad(angles.to(torch.float64))
    cos, sin = theta.cos(), theta.sin()
    xs = torch.arange(w, dtype=torch.float64, device=images.device) - (w - 1) / 2
    ys = torch.arange(h, dtype=torch.float64, device=images.device) - (h - 1) / 2
    qy, qx = torch.meshgrid(ys, xs, indexing="ij")
    # Output pixel q takes the input at R(-angle) q, in coordinates with rows pointing down.
    px = cos[:, None, None] * qx - sin[:, None, None] * qy
    py = sin[:, None, None] * qx + cos[:, None, None] * qy
    grid = torch.stack((2 * px / w, 2 * py / h), dim=-1).to(images.dtype)
    rotated = F.grid_sample(
        images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    rotated = rotated + fill
    unrotated = _per_sample(angles == 0, images)
    return torch.where(unrotated, images, rotated)


def _shift(images: Tensor, dx: Tensor, dy: Tensor, fill: float) -> Tensor:
    """Move each image by whole pixels, ``dx`` columns right and ``dy`` rows down, ``fill``
    entering at the border: an exact index shift, no interpolation."""
    b, c, h, w = images.shape
    pad = int(max(dx.abs().max(), dy.abs().max(), 0))
    padded = F.pad(images, (pad, pad, pad, pad), value=fill)
    rows = torch.arange(h, device=images.device)[None, :] - dy[:, None] + pad  # [B, H]
    cols = torch.arange(w, device=images.device)[None, :] - dx[:, None] + pad  # [B, W]
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _transform(images: Tensor, transforms: Tensor, fill: float) -> Tensor:
    """Rotate, then shift, each image by its row ``(angle, dx, dy)`` of ``transforms``."""
    rotated = _rotate(images, transforms[:, 0], fill)
    return _shift(rotated, transforms[:, 1].long(), transforms[:, 2].long(), fill)


def spatial_grid(
    rotations: tuple[float, float] = (-30.0, 30.0),
    translations: tuple[int, int] = (-3, 3),
    grid: tuple[int, int, int] = (31, 5, 5),
) -> Tensor:
    """The transforms of the spatial attack's grid search, in the order it tries them.

    ``grid[0]`` angles evenly spaced over ``rotations`` (degrees), and for each shift axis
    ``grid[1]`` / ``grid[2]`` values evenly spaced over ``translations``, rounded to whole
    pixels (duplicates dropped), as in Engstrom et al. (2019), whose MNIST grid is 31 angles in
    [-30, 30] and 5 x 5 shifts in [-3, 3] pixels.

    Returns:
        Tensor[T, 3]: rows ``(angle, dx, dy)``, angle-major, float64.

    Example:
        >>> grid = spatial_grid((-30, 30), (-3, 3), (3, 5, 1))
        >>> grid.shape, grid[:5, 1].tolist()
        (torch.Size([15, 3]), [-3.0, -2.0, 0.0, 2.0, 3.0])
    """
    caller = "spatial"
    rot_lo, rot_hi = _check_range(rotations, "rotations", caller)
    tr_lo, tr_hi = _check_range(translations, "translations", caller)
    if not (isinstance(grid, (tuple, list)) and len(grid) == 3):
        raise ValueError(f"{caller}: grid must be (n_rotations, n_dx, n_dy), got {grid!r}")
    n_rot, n_dx, n_dy = (_check_positive_int(n, "grid", caller) for n in grid)
    angles = torch.linspace(rot_lo, rot_hi, n_rot, dtype=torch.float64)
    # round() halves to even: linspace(-3, 3, 5) gives the symmetric shifts -3, -2, 0, 2, 3.
    dxs = torch.linspace(tr_lo, tr_hi, n_dx, dtype=torch.float64).round().unique()
    dys = torch.linspace(tr_lo, tr_hi, n_dy, dtype=torch.float64).round().unique()
    return torch.cartesian_prod(angles, dxs, dys)


def _check_range(value: object, argument: str, caller: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(
            f"{caller}: {argument} must be a pair (low, high), got {value!r}"
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"{caller}: {argument} must satisfy low <= high, got {value!r}")
    return lo, hi


def spatial(
    model: Model,
    x: Tensor,
    y: Tensor,
    *,
    rotations: tuple[float, float] = (-30.0, 30.0),
    translations: tuple[int, int] = (-3, 3),
    grid: tuple[int, int, int] = (31, 5, 5),
    k: int = 10,
    mode: str = "grid",
    pgd: dict | None = None,
    domain: Domain = (0.0, 1.0),
    fill: float = 0.0,
    generator: torch.Generator | None = None,
) -> AttackResult:
    r"""Rotations and translations that fool the model (Engstrom, Tran, Tsipras, Schmidt &
    Madry 2019, "Exploring the landscape of spatial robustness").

    Each image is rotated about its centre (bilinear) and then shifted by whole pixels (an exact
    index shift), ``fill`` entering at the border. ``mode="grid"`` tries every transform of
    :func:`spatial_grid` (31 angles x 5 x 5 shifts for MNIST in the paper); ``mode="random"``
    draws ``k`` transforms per input uniformly (angle in ``rotations``, integer shifts in
    ``translations``), the paper's worst-of-k. Inputs leave the search at their first fooling
    transform, so later transforms are evaluated on the remaining ones only; the others keep the
    transform of largest cross-entropy. With ``pgd`` (a dict of :func:`pgd` keyword arguments,
    e.g. ``{"eps": 0.3}``) PGD then starts from the transformed images the search did not fool,
    with its ball around them (the paper's combined adversary).

    Args:
        model (Callable[[Tensor[B, C, H, W]], Tensor[B, K]]): returns logits.
        x (Tensor[B, C, H, W]): clean images inside ``domain``.
        y (Tensor[B], int64): true labels.
        rotations (tuple[float, float]): angle range in degrees (counter-clockwise positive).
        translations (tuple[int, int]): shift range in pixels, for both axes.
        grid (tuple[int, int, int]): numbers of angles, x shifts and y shifts (grid mode).
        k (int): transforms per input (random mode).
        mode (str): ``"grid"`` or ``"random"``.
        pgd (dict | None): keyword arguments of a PGD attack run after the spatial search.
        domain (tuple[float, float] | None): valid input box; ``None`` for unbounded inputs.
        fill (float): value of the pixels entering the image (inside ``domain``).
        generator (torch.Generator | None): source of the random transforms (and of PGD's
            random start); without one a fresh, nondeterministically seeded generator is used.

    Returns:
        AttackResult: ``transforms`` holds each input's ``(angle, dx, dy)``; ``norms`` is the
        L2 size of ``x_adv - x`` (``norm="l2"``); ``iterations`` counts transforms evaluated.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        >>> y = torch.tensor([0, 1])
        >>> result = spatial(net, x, y, rotations=(-10, 10), translations=(-1, 1), grid=(3, 3, 3))
        >>> result.transforms.shape, bool((result.iterations <= 27).all())
        (torch.Size([2, 3]), True)
    """
    caller = "spatial"
    domain = _check_domain(domain, caller)
    x = _check_x(x, domain, caller, image=True)
    y = _check_labels(y, x, caller)
    fill = float(fill)
    if domain is not None and not domain[0] <= fill <= domain[1]:
        raise ValueError(f"{caller}: fill={fill} must lie inside domain={domain}")
    if mode == "grid":
        candidates = spatial_grid(rotations, translations, grid)[:, None, :]
    elif mode == "random":
        k = _check_positive_int(k, "k", caller)
    else:
        raise ValueError(f"{caller}: mode must be 'grid' or 'random', got {mode!r}")
    if pgd is not None and not isinstance(pgd, dict):
        raise TypeError(f"{caller}: pgd must be None or a dict of pgd() arguments, got {pgd!r}")
    gen = None
    if mode == "random" or (pgd is not None and pgd.get("random_start", True)):
        gen = _generator(generator, x.device)
    with restored_mode(model), forked_rng(model, x):
        if mode == "random":
            candidates = _random_transforms(len(x), k, rotations, translations, gen, x.device)
        x_adv, success, chosen, evaluated = _search(model, x, y, candidates, fill, caller)
        if pgd is not None and not bool(success.all()):
            remaining = ~success
            options = {"domain": domain, "generator": gen, **pgd}
            followed = _projected_gradient_descent(model, x_adv[remaining], y[remaining], **options)
            x_adv[remaining], success[remaining] = followed.x_adv, followed.success
    return _result(x, x_adv, success, evaluated, "l2", chosen.to(x.dtype))


def _random_transforms(
    n: int,
    k: int,
    rotations: tuple[float, float],
    translations: tuple[int, int],
    generator: torch.Generator,
    device: torch.device,
) -> Tensor:
    """``k`` uniform transforms per input, Tensor[k, n, 3] of ``(angle, dx, dy)``."""
    rot_lo, rot_hi = _check_range(rotations, "rotations", "spatial")
    tr_lo, tr_hi = _check_range(translations, "translations", "spatial")
    shift_lo, shift_hi = math.ceil(tr_lo), math.floor(tr_hi)
    if shift_lo > shift_hi:
        raise ValueError(f"spatial: translations={translations} contains no whole pixel shift")
    angles = rot_lo + (rot_hi - rot_lo) * torch.rand(
        k, n, generator=generator, device=device, dtype=torch.float64
    )
    shifts = torch.randint(
        shift_lo, shift_hi + 1, (2, k, n), generator=generator, device=device
    ).to(torch.float64)
    return torch.stack((angles, shifts[0], shifts[1]), dim=-1)


def _search(
    model: Model, x: Tensor, y: Tensor, transforms: Tensor, fill: float, caller: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Try ``transforms`` (Tensor[T, B or 1, 3], in order) on every input until one fools it.

    Fooled inputs drop out of later passes; the others keep the transform of largest loss.
    Each pass evaluates as many consecutive transforms as fill about ``_SEARCH_BATCH`` images
    (one at a time while many inputs remain, many at once for the last few), at most twice as
    many as the previous pass.
    """
    n, total = len(x), transforms.shape[0]
    transforms = transforms.to(x.device).expand(total, n, 3)
    x_adv = x.clone()
    chosen = torch.zeros(n, 3, dtype=torch.float64, device=x.device)
    worst = torch.full((n,), -math.inf, dtype=x.dtype, device=x.device)
    evaluated = torch.zeros(n, dtype=torch.int64, device=x.device)
    fooled_any = torch.zeros(n, dtype=torch.bool, device=x.device)
    active = torch.arange(n, device=x.device)
    done, m = 0, 0
    while done < total and len(active) > 0:
        a = len(active)
        # One transform first, then at most twice as many per pass: inputs about to be fooled
        # waste little.
        m = min(total - done, max(1, _SEARCH_BATCH // a), max(1, 2 * m))
        block = transforms[done : done + m, active]  # [m, A, 3]
        images = _transform(x[active].repeat(m, 1, 1, 1), block.reshape(-1, 3), fill)
        ys = y[active].repeat(m)
        logits = torch.cat([_logits(model, c, caller) for c in images.split(_FORWARD_CHUNK)])
        fooled = (logits.argmax(1) != ys).view(m, a)
        loss = F.cross_entropy(logits, ys, reduction="none").view(m, a)
        any_fooled = fooled.any(0)
        index = torch.where(any_fooled, fooled.int().argmax(0), loss.argmax(0))  # [A]
        cols = torch.arange(a, device=x.device)
        picked_loss = loss[index, cols]
        improves = any_fooled | (picked_loss > worst[active])
        rows = active[improves]
        x_adv[rows] = images.view(m, a, *x.shape[1:])[index, cols][improves]
        chosen[rows] = block[index, cols][improves]
        worst[rows] = picked_loss[improves]
        evaluated[active] += torch.where(any_fooled, index + 1, m)
        fooled_any[active] = any_fooled
        active = active[~any_fooled]
        done += m
    return x_adv, fooled_any, chosen, evaluated.cpu()


# ---------------------------------------------------------------------------------------------
# robustness over a data set


@dataclass
class RobustnessResult:
    """Accuracy of a model under an attack over a data set.

    Attributes:
        attack (str): name of the attack.
        samples (int): number of inputs.
        clean_accuracy (float): fraction classified correctly.
        robust_accuracy (float): fraction classified correctly both before and after the attack.
        success_rate (float): fraction on which the attack reports success.
        median_norm (float): median ``||x_adv - x||`` over successful attacks (nan if none).
        rho_adv (float | None): DeepFool only: mean ``||r|| / ||x||`` over the inputs it fooled,
            in the attack's norm (Moosavi-Dezfooli et al. 2016, Eq. 15); None otherwise.
    """

    attack: str
    samples: int
    clean_accuracy: float
    robust_accuracy: float
    success_rate: float
    median_norm: float
    rho_adv: float | None


_ATTACKS = {"fgsm": fgsm, "pgd": pgd, "deepfool": deepfool, "spatial": spatial}


def robustness(
    model: Model,
    loader: Iterable[tuple[Tensor, Tensor]],
    attack: str | Callable[..., AttackResult],
    **attack_kwargs: object,
) -> RobustnessResult:
    r"""Clean and robust accuracy of ``model`` under ``attack`` over the batches of ``loader``.

    DeepFool is run, as in the paper, on the model's own predictions (``y=None``), and its
    robustness measure :math:`\hat\rho_{adv} = \frac{1}{|D|}\sum_{x \in D}
    \|\hat r(x)\| / \|x\|` (Moosavi-Dezfooli et al. 2016, Eq. 15) is averaged over the inputs it
    fooled; the other attacks are run on the true labels.

    Args:
        model (Callable[[Tensor[B, ...]], Tensor[B, K]]): returns logits.
        loader (Iterable[tuple[Tensor[B, ...], Tensor[B]]]): batches ``(x, y)``.
        attack (str | Callable): one of ``"fgsm"``, ``"pgd"``, ``"deepfool"``, ``"spatial"``,
            or the function itself.
        **attack_kwargs: passed to the attack (e.g. ``eps=0.1``).

    Returns:
        RobustnessResult: accuracies, success rate, median perturbation and ``rho_adv``.

    Example:
        >>> net = torch.nn.Linear(4, 3)
        >>> batches = [(torch.rand(8, 4, generator=torch.Generator().manual_seed(0)),
        ...             torch.arange(8) % 3)]
        >>> report = robustness(net, batches, "deepfool")
        >>> report.rho_adv is not None, report.robust_accuracy <= report.clean_accuracy
        (True, True)
    """
    caller = "robustness"
    if isinstance(attack, str):
        if attack not in _ATTACKS:
            raise ValueError(f"{caller}: attack must be one of {sorted(_ATTACKS)}, got {attack!r}")
        attack_fn = _ATTACKS[attack]
    elif callable(attack):
        attack_fn = attack
    else:
        raise TypeError(f"{caller}: attack must be a name or a callable, got {attack!r}")
    is_deepfool = attack_fn is deepfool
    correct, robust, success, norms, ratios = [], [], [], [], []
    for xb, yb in loader:
        x = xb.detach()
        y = _check_labels(yb, x, caller, "the loader's labels")
        with restored_mode(model), forked_rng(model, x), torch.no_grad():
            clean = _logits(model, x, caller, y).argmax(1) == y
        result = attack_fn(model, x, None if is_deepfool else y, **attack_kwargs)
        with restored_mode(model), forked_rng(model, x), torch.no_grad():
            after = _logits(model, result.x_adv, caller).argmax(1) == y
        correct.append(clean)
        robust.append(clean & after)
        success.append(result.success)
        norms.append(result.norms[result.success])
        if is_deepfool:
            size = _flat_norm(x, result.norm)
            ratios.append((result.norms / size)[result.success])
    if not correct:
        raise ValueError(f"{caller}: the loader yielded no batches")
    fooled_norms = torch.cat(norms)
    return RobustnessResult(
        attack=getattr(attack_fn, "__name__", type(attack_fn).__name__),
        samples=int(sum(len(c) for c in correct)),
        clean_accuracy=float(torch.cat(correct).float().mean()),
        robust_accuracy=float(torch.cat(robust).float().mean()),
        success_rate=float(torch.cat(success).float().mean()),
        median_norm=float(fooled_norms.median()) if fooled_norms.numel() else math.nan,
        rho_adv=float(torch.cat(ratios).mean()) if is_deepfool and ratios else None,
    )
