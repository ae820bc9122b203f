"""Certification of l-infinity robustness and certified training that composes with any loop.

Certificates are lower bounds on the margins ``logit_y - logit_j`` over an input box (Wong & Kolter
2018; IBP, Gowal et al. 2018; CROWN / CROWN-IBP, Zhang et al. 2018, 2020), from
:mod:`torch_dlt.robust.bounds`; training minimises the cross-entropy of the worst-case logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torch_dlt.probes._state import restored_mode
from torch_dlt.robust import bounds

__all__ = [
    "CertificationResult",
    "CertifiedAccuracy",
    "CertifiedLoss",
    "CertifiedTraining",
    "RampSchedule",
    "certified_accuracy",
    "certify",
    "evaluate_certified",
    "worst_case_logits",
]

CERTIFY_METHODS = ("crown", "crown-ibp", "ibp", "wong-kolter", "alpha-crown")
TRAINING_METHODS = ("crown-ibp", "ibp", "wong-kolter")
_SHAPES = ("linear", "smooth")

# The smooth ramp: a power curve r**_SMOOTH_POWER up to _SMOOTH_MID, then its tangent line.
_SMOOTH_POWER = 4.0
_SMOOTH_MID = 0.25


class CertificationResult(NamedTuple):
    """What :func:`certify` proves about each sample.

    Attributes:
        verified (Tensor[B], bool): the model predicts ``y`` at ``x`` and every margin lower bound
            is positive, so no input in the box changes the prediction.
        margins (Tensor[B, K-1]): lower bounds of ``logit_y - logit_j`` over the box, for the
            classes ``j != y`` in increasing order (the rows of
            :func:`~torch_dlt.robust.bounds.margin_matrix`).
        predicted (Tensor[B], int64): the model's prediction at ``x``.
        correct (Tensor[B], bool): ``predicted == y``.
    """

    verified: Tensor
    margins: Tensor
    predicted: Tensor
    correct: Tensor


class CertifiedAccuracy(NamedTuple):
    """Certified and clean accuracy over a data set (fractions in [0, 1])."""

    certified: float
    clean: float
    num_samples: int


class CertifiedLoss(NamedTuple):
    """The parts of the certified-training loss of one batch (Gowal et al. 2018).

    Attributes:
        loss (Tensor[]): ``kappa * clean + (1 - kappa) * robust``, to back-propagate.
        clean (Tensor[]): cross-entropy of the logits at ``x``.
        robust (Tensor[]): cross-entropy of the worst-case logits over the box.
        clean_error (Tensor[]): fraction of the batch misclassified at ``x`` (detached).
        verified_error (Tensor[]): fraction of the batch the training bound does not verify
            (detached).
    """

    loss: Tensor
    clean: Tensor
    robust: Tensor
    clean_error: Tensor
    verified_error: Tensor


def _unwrap(model: nn.Module) -> nn.Module:
    """The module that holds the layers: bounds walk it, not a (Distributed)DataParallel shell."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, wrappers) else model


def _check_eps(eps: object, owner: str) -> float:
    if isinstance(eps, Tensor) and eps.numel() == 1:
        eps = eps.item()
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{owner}: eps must be a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{owner}: eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def _check_norm(norm: object, owner: str) -> None:
    if norm != "linf":
        raise ValueError(
            f"{owner}: norm must be 'linf' (boxes |x' - x|_inf <= eps are what the bounds "
            f"propagate), got {norm!r}"
        )


def _check_method(method: object, allowed: tuple[str, ...], owner: str) -> None:
    if method not in allowed:
        raise ValueError(f"{owner}: method must be one of {allowed}, got {method!r}")


def _check_domain(domain: object, owner: str) -> tuple[float, float] | None:
    if domain is None:
        return None
    if (
        not isinstance(domain, (tuple, list))
        or len(domain) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in domain)
        or not domain[0] < domain[1]
    ):
        raise ValueError(
            f"{owner}: domain must be None or a pair (low, high), low < high; got {domain!r}"
        )
    return float(domain[0]), float(domain[1])


def _check_batch(x: object, y: object, owner: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError(f"{owner}: x must be a floating Tensor[B, ...], got {_describe(x)}")
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != x.shape[:1]:
        raise ValueError(
            f"{owner}: y must be an int64 Tensor[B] of labels with B = x.shape[0] = "
            f"{x.shape[0]}, got {_describe(y)}"
        )


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"Tensor{list(t.shape)} of {t.dtype}"
    return type(t).__name__


def _check_in_domain(x: Tensor, domain: tuple[float, float] | None, owner: str) -> None:
    if domain is None:
        return
    low, high = float(x.min()), float(x.max())
    if low < domain[0] or high > domain[1]:
        raise ValueError(
            f"{owner}: x has values in [{low:.4g}, {high:.4g}], outside domain={domain}; the "
            "box would be clamped away from x. Pass the data's domain, or domain=None"
        )


def _check_logits(logits: Tensor, y: Tensor, owner: str) -> int:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"{owner}: the model must return logits Tensor[B, K] with K >= 2 classes, got "
            f"{_describe(logits)}"
        )
    num_classes = logits.shape[1]
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{owner}: labels y must lie in [0, {num_classes}) for a model with {num_classes} "
            f"outputs, got values in [{int(y.min())}, {int(y.max())}]"
        )
    return num_classes


def _margin_lower_bound(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    num_classes: int,
    method: str,
    domain: tuple[float, float] | None,
    beta: float = 1.0,
) -> Tensor:
    """Lower bounds ``[B, K-1]`` of ``logit_y - logit_j`` over the (clamped) box, differentiable.

    For ``"crown-ibp"`` the bound is ``beta * CROWN-IBP + (1 - beta) * IBP`` (Zhang et al. 2020).
    """
    C = bounds.margin_matrix(y, num_classes)
    # The bounds clamp the box to the domain themselves.
    x_lower, x_upper = x - eps, x + eps
    if method == "ibp" or (method == "crown-ibp" and beta == 0.0):
        return bounds.interval_bounds(net, x_lower, x_upper, C=C, domain=domain)[0]
    if method != "crown-ibp" or beta == 1.0:
        return bounds.crown_bounds(
            net, x_lower, x_upper, C=C, method=method, domain=domain, bound_upper=False
        )[0]
    linear, interval = bounds._crown_ibp_and_interval(net, x_lower, x_upper, C, domain)
    return beta * linear + (1.0 - beta) * interval


def worst_case_logits(margin_lower: Tensor) -> Tensor:
    r"""Logits of the worst case the margin lower bounds allow, the true class first.

    With :math:`\underline m_j \le z_y - z_j` over the box, the logits :math:`(0, -\underline m)`
    maximise the cross-entropy of class 0 among all logits with those margins, so
    ``cross_entropy(worst_case_logits(m), zeros)`` upper-bounds the loss of every input in the box
    (Wong & Kolter 2018, Gowal et al. 2018).

    Args:
        margin_lower (Tensor[B, K-1]): lower bounds of ``logit_y - logit_j``, ``j != y``.

    Returns:
        Tensor[B, K]: ``[0, -margin_lower]``; the true class is column 0.

    Example:
        >>> worst_case_logits(torch.tensor([[2.0, -1.0]]))
        tensor([[ 0., -2.,  1.]])
    """
    zeros = margin_lower.new_zeros(margin_lower.shape[0], 1)
    return torch.cat([zeros, -margin_lower], dim=1)


def _robust_cross_entropy(margin_lower: Tensor) -> Tensor:
    logits = worst_case_logits(margin_lower)
    return F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.int64))


def certify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    norm: str = "linf",
    method: str = "crown",
    domain: tuple[float, float] | None = (0.0, 1.0),
) -> CertificationResult:
    r"""Prove (or fail to prove) that no :math:`\lVert x' - x\rVert_\infty \le \epsilon` changes
    the prediction.

    The box is clamped to ``domain`` and the margins ``logit_y - logit_j`` are lower-bounded over
    it by IBP (Gowal et al. 2018), CROWN (Zhang et al. 2018), CROWN-IBP (Zhang et al. 2020), the
    Wong & Kolter (2018) dual bound, or alpha-CROWN (Xu et al. 2021). A sample is verified when
    the model predicts ``y`` at ``x`` and every lower bound is positive. The model runs in eval
    mode (BatchNorm with its running statistics) and its mode is restored afterwards.

    Args:
        model (nn.Module): a network the bounds support (Linear, Conv2d, ReLU, Flatten, eval
            BatchNorm, AvgPool2d, Identity, normalisation, residual blocks), possibly wrapped in
            (Distributed)DataParallel.
        x (Tensor[B, ...]): inputs, inside ``domain``.
        y (Tensor[B], int64): labels.
        eps (float): radius of the l-infinity ball, >= 0.
        norm (str): ``"linf"`` (the only norm the bounds propagate).
        method (str): ``"crown"``, ``"crown-ibp"``, ``"ibp"``, ``"wong-kolter"`` or
            ``"alpha-crown"``.
        domain (tuple[float, float] | None): the data's range the box is clamped to.

    Returns:
        CertificationResult: ``verified`` (Tensor[B], bool), ``margins`` (Tensor[B, K-1]),
        ``predicted`` (Tensor[B]), ``correct`` (Tensor[B], bool); all detached.

    Raises:
        ValueError: negative eps, a norm or method not offered, labels of the wrong shape or out
            of range, ``x`` outside ``domain``, or a layer the bounds do not support (named).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x = torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(0))
        >>> y = net(x).argmax(1)
        >>> result = certify(net, x, y, 0.0)
        >>> bool(result.verified.all()), result.margins.shape
        (True, torch.Size([5, 2]))
        >>> bool((certify(net, x, y, 0.5).margins <= result.margins + 1e-6).all())
        True
    """
    owner = "certify"
    eps = _check_eps(eps, owner)
    _check_norm(norm, owner)
    _check_method(method, CERTIFY_METHODS, owner)
    domain = _check_domain(domain, owner)
    _check_batch(x, y, owner)
    _check_in_domain(x, domain, owner)
    net = _unwrap(model)
    # alpha-CROWN optimises its slopes by gradient descent, so it needs autograd.
    grad_mode = torch.enable_grad() if method == "alpha-crown" else torch.no_grad()
    with restored_mode(net), grad_mode:
        with torch.no_grad():
            logits = net(x)
        num_classes = _check_logits(logits, y, owner)
        y = y.to(logits.device)
        margins = _margin_lower_bound(net, x, y, eps, num_classes, method, domain).detach()
    predicted = logits.argmax(dim=1)
    correct = predicted == y
    verified = correct & (margins > 0).all(dim=1)
    return CertificationResult(verified, margins, predicted, correct)


def evaluate_certified(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    eps: float,
    *,
    norm: str = "linf",
    method: str = "crown",
    domain: tuple[float, float] | None = (0.0, 1.0),
    progress: bool = True,
) -> CertifiedAccuracy:
    """Certified and clean accuracy of ``model`` over every batch of ``loader``.

    Args:
        model (nn.Module): as for :func:`certify`.
        loader: an iterable of ``(x, y)`` batches (a DataLoader); moved to the model's device.
        eps, norm, method, domain: as for :func:`certify`.
        progress (bool): show a tqdm bar over the batches.

    Returns:
        CertifiedAccuracy: ``certified``, ``clean`` (fractions) and ``num_samples``.

    Example:
        >>> from torch_dlt.data import data_loader
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> x = torch.rand(8, 2, generator=torch.Generator().manual_seed(0))
        >>> loader = data_loader(x, net(x).argmax(1), batch_size=4, shuffle=False)
        >>> evaluate_certified(net, loader, 0.0, progress=False)
        CertifiedAccuracy(certified=1.0, clean=1.0, num_samples=8)
    """
    owner = "certified_accuracy"
    eps = _check_eps(eps, owner)
    _check_norm(norm, owner)
    _check_method(method, CERTIFY_METHODS, owner)
    domain = _check_domain(domain, owner)
    from tqdm.auto import tqdm

    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    verified = correct = total = 0
    total_batches = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, total=total_batches, desc=f"certify {method}", disable=not progress):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"{owner}: loader must yield (x, y) pairs, got {type(batch).__name__}")
        x, y = batch[0].to(device), batch[1].to(device)
        result = certify(model, x, y, eps, norm=norm, method=method, domain=domain)
        verified += int(result.verified.sum())
        correct += int(result.correct.sum())
        total += len(y)
    if total == 0:
        raise ValueError(f"{owner}: loader yielded no samples")
    return CertifiedAccuracy(verified / total, correct / total, total)


def certified_accuracy(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    eps: float,
    *,
    norm: str = "linf",
    method: str = "crown",
    domain: tuple[float, float] | None = (0.0, 1.0),
    progress: bool = True,
) -> float:
    """Fraction of the samples of ``loader`` that :func:`certify` verifies at radius ``eps``.

    :func:`evaluate_certified` gives the clean accuracy alongside, from the same forward passes.

    Example:
        >>> from torch_dlt.data import data_loader
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> x = torch.rand(8, 2, generator=torch.Generator().manual_seed(0))
        >>> loader = data_loader(x, net(x).argmax(1), batch_size=4, shuffle=False)
        >>> certified_accuracy(net, loader, 0.0, method="ibp", progress=False)
        1.0
    """
    return evaluate_certified(
        model, loader, eps, norm=norm, method=method, domain=domain, progress=progress
    ).certified


@dataclass(frozen=True)
class RampSchedule:
    r"""``start`` for ``warmup_steps`` steps, a ramp to ``end`` over ``ramp_steps``, then ``end``.

    The value after ``t`` steps is ``start + (end - start) * f(r)``, where ``f`` is the ramp's
    shape and :math:`r = \min(1, \max(0, (t - t_w) / t_r))` its progress (``t_w`` warm-up,
    ``t_r`` ramp steps); without a ramp the value jumps to ``end`` at ``t = t_w``.

    The ramp of Gowal et al. (2018) and Zhang et al. (2020) is ``"linear"``, ``f(r) = r``.
    ``"smooth"`` is the
    smoothed ramp of Xu et al. (2020), studied by Shi et al. (2021): with the progress
    :math:`r \in [0, 1]`, a power curve :math:`a r^4` up to :math:`r = 1/4`, then its tangent line
    to :math:`(1, 1)`, so that eps grows gently while the bounds are loosest.

    Args:
        start (float): value during the warm-up.
        end (float): value after the ramp.
        warmup_steps (int): steps at ``start``.
        ramp_steps (int): steps of the ramp (0: jump to ``end`` after the warm-up).
        shape (str): ``"linear"`` or ``"smooth"``.

    Example:
        >>> eps = RampSchedule(0.0, 0.1, warmup_steps=10, ramp_steps=100)
        >>> eps(5), eps(60), eps(500)
        (0.0, 0.05, 0.1)
    """

    start: float
    end: float
    warmup_steps: int = 0
    ramp_steps: int = 0
    shape: str = "linear"

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "ramp_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"RampSchedule: {name} must be an int >= 0, got {value!r}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"RampSchedule: {name} must be a float, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"RampSchedule: {name} must be finite, got {value!r}")
        if self.shape not in _SHAPES:
            raise ValueError(f"RampSchedule: shape must be one of {_SHAPES}, got {self.shape!r}")

    def progress(self, step: int) -> float:
        """Fraction of the ramp done after ``step`` steps, in [0, 1]."""
        if self.ramp_steps == 0:
            return 1.0 if step >= self.warmup_steps else 0.0
        r = min(max((step - self.warmup_steps) / self.ramp_steps, 0.0), 1.0)
        if self.shape == "linear":
            return r
        p, m = _SMOOTH_POWER, _SMOOTH_MID
        scale = 1.0 / (m**p + p * m ** (p - 1) * (1.0 - m))
        if r <= m:
            return scale * r**p
        return scale * (m**p + p * m ** (p - 1) * (r - m))

    def __call__(self, step: int) -> float:
        """The value after ``step`` steps."""
        return self.start + (self.end - self.start) * self.progress(step)


class CertifiedTraining:
    r"""The certified-training loss, with its eps, kappa and beta schedules, for the user's loop.

    ``loss(x, y)`` is :math:`\kappa\,\mathrm{CE}(f(x), y) + (1 - \kappa)\,\mathrm{CE}(\hat z, y)`
    where :math:`\hat z` are the worst-case logits built from lower bounds of the margins over
    the box :math:`\lVert x' - x\rVert_\infty \le \epsilon` (Gowal et al. 2018). The bound is IBP
    (Gowal et al. 2018), the Wong & Kolter (2018) dual bound, or
    :math:`\beta\,\text{CROWN-IBP} + (1 - \beta)\,\text{IBP}` (Zhang et al. 2020). eps stays 0
    for ``warmup_steps``, then ramps to ``eps`` over ``ramp_steps`` (linear or smooth), while
    kappa goes ``kappa_start -> kappa_end`` and beta ``beta_start -> beta_end`` linearly over the
    same steps. ``step()`` advances the schedules; call it once per optimiser step.

    Bounds are computed with the model's layers in eval mode (BatchNorm by its running
    statistics), which is the network later certified. Under DistributedDataParallel the clean
    forward goes through the wrapper, so its reducer all-reduces the gradients of the whole loss
    (bounds included: autograd sums every use of a parameter before the reducer's hook fires).

    Args:
        model (nn.Module): the network, possibly wrapped in DistributedDataParallel.
        eps (float): final training radius.
        method (str): ``"crown-ibp"``, ``"ibp"`` or ``"wong-kolter"``.
        norm (str): ``"linf"``.
        warmup_steps (int): steps with eps = 0 (and kappa, beta at their start values).
        ramp_steps (int): steps of the eps / kappa / beta ramp.
        eps_shape (str): ``"linear"`` or ``"smooth"`` (see :class:`RampSchedule`).
        kappa_start, kappa_end (float): weight of the clean loss, in [0, 1].
        beta_start, beta_end (float): weight of CROWN-IBP against IBP, in [0, 1]
            (``"crown-ibp"`` only).
        domain (tuple[float, float] | None): the data's range the box is clamped to.
        num_classes (int | None): checked against the model's output when given.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> trainer = CertifiedTraining(net, 0.1, method="ibp", warmup_steps=1, ramp_steps=4)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> x = torch.rand(16, 2, generator=torch.Generator().manual_seed(0))
        >>> y = (x[:, 0] > x[:, 1]).long()
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     trainer.loss(x, y).backward()
        ...     opt.step()
        ...     trainer.step()
        >>> trainer.eps, trainer.kappa
        (0.05, 0.75)
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        *,
        method: str = "crown-ibp",
        norm: str = "linf",
        warmup_steps: int = 0,
        ramp_steps: int = 0,
        eps_shape: str = "linear",
        kappa_start: float = 1.0,
        kappa_end: float = 0.5,
        beta_start: float = 1.0,
        beta_end: float = 0.0,
        domain: tuple[float, float] | None = (0.0, 1.0),
        num_classes: int | None = None,
    ) -> None:
        owner = "CertifiedTraining"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
        self.target_eps = _check_eps(eps, owner)
        _check_norm(norm, owner)
        _check_method(method, TRAINING_METHODS, owner)
        for name, value in (
            ("kappa_start", kappa_start),
            ("kappa_end", kappa_end),
            ("beta_start", beta_start),
            ("beta_end", beta_end),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value <= 1
            ):
                raise ValueError(f"{owner}: {name} must be a float in [0, 1], got {value!r}")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise ValueError(
                f"{owner}: num_classes must be None or an int >= 2, got {num_classes!r}"
            )
        self.model = model
        self.method = method
        self.norm = norm
        self.domain = _check_domain(domain, owner)
        self.num_classes = num_classes
        self.eps_schedule = RampSchedule(0.0, self.target_eps, warmup_steps, ramp_steps, eps_shape)
        self.kappa_schedule = RampSchedule(kappa_start, kappa_end, warmup_steps, ramp_steps)
        self.beta_schedule = RampSchedule(beta_start, beta_end, warmup_steps, ramp_steps)
        self.step_count = 0

    @property
    def eps(self) -> float:
        """The training radius at the current step."""
        return self.eps_schedule(self.step_count)

    @property
    def kappa(self) -> float:
        """The weight of the clean cross-entropy at the current step."""
        return self.kappa_schedule(self.step_count)

    @property
    def beta(self) -> float:
        """The weight of the linear-relaxation bound against IBP at the current step.

        ``"ibp"`` uses IBP alone (0) and ``"wong-kolter"`` its dual bound alone (1).
        """
        if self.method == "ibp":
            return 0.0
        if self.method == "wong-kolter":
            return 1.0
        return self.beta_schedule(self.step_count)

    def losses(self, x: Tensor, y: Tensor) -> CertifiedLoss:
        """The loss of the batch ``(x, y)`` and its parts at the current eps, kappa and beta.

        Args:
            x (Tensor[B, ...]): inputs, inside ``domain``.
            y (Tensor[B], int64): labels.

        Returns:
            CertifiedLoss: ``loss`` to back-propagate, its ``clean`` and ``robust`` parts, and the
            batch's ``clean_error`` and ``verified_error`` under the training bound.
        """
        owner = "CertifiedTraining.loss"
        _check_batch(x, y, owner)
        _check_in_domain(x, self.domain, owner)
        logits = self.model(x)
        num_classes = _check_logits(logits, y, owner)
        if self.num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"{owner}: the model returns {num_classes} logits, but num_classes="
                f"{self.num_classes}"
            )
        eps, kappa = self.eps, self.kappa
        clean = F.cross_entropy(logits, y)
        if eps == 0.0:
            # The box is the point itself: the exact margins are the tightest lower bounds.
            C = bounds.margin_matrix(y, num_classes).to(logits.dtype)
            margins = torch.einsum("bmk,bk->bm", C, logits)
        else:
            net = _unwrap(self.model)
            with restored_mode(net):
                margins = _margin_lower_bound(
                    net, x, y, eps, num_classes, self.method, self.domain, self.beta
                )
        robust = _robust_cross_entropy(margins)
        loss = kappa * clean + (1.0 - kappa) * robust
        with torch.no_grad():
            clean_error = (logits.argmax(dim=1) != y).to(logits.dtype).mean()
            verified_error = (margins <= 0).any(dim=1).to(logits.dtype).mean()
        return CertifiedLoss(loss, clean, robust, clean_error, verified_error)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """``kappa * CE(clean) + (1 - kappa) * CE(worst case)`` of the batch, to back-propagate."""
        return self.losses(x, y).loss

    def step(self, step: int | None = None) -> None:
        """Advance the schedules by one step, or set their position to ``step``."""
        if step is None:
            self.step_count += 1
            return
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(
                f"CertifiedTraining.step: step must be None or an int >= 0, got {step!r}"
            )
        self.step_count = step

    def state_dict(self) -> dict:
        """The schedules' position, for checkpoints."""
        return {"step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position saved by :meth:`state_dict`."""
        if not isinstance(state, dict) or set(state) != {"step"}:
            raise ValueError(
                f"CertifiedTraining.load_state_dict: expected {{'step': int}}, got {state!r}"
            )
        self.step(state["step"])

    def __repr__(self) -> str:
        return (
            f"CertifiedTraining(method={self.method!r}, eps={self.eps:.4g}/{self.target_eps:.4g}, "
            f"kappa={self.kappa:.4g}, beta={self.beta:.4g}, step={self.step_count})"
        )
