"""The step-size decays and batch-size growth of SGD theory, as LR schedulers and a batch sampler.

Robbins & Monro (1951); Bottou, Curtis & Nocedal (2018), "Optimization methods for large-scale
machine learning"; Smith, Kindermans, Ying & Le (2018), "Don't decay the learning rate, increase
the batch size".
"""

from __future__ import annotations

import math
from typing import Iterator, Sized

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import Sampler

__all__ = ["GrowingBatchSampler", "InversePowerLR", "InverseSqrtLR", "InverseTimeLR"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class InversePowerLR(LRScheduler):
    r"""Learning rate :math:`\eta_t = \eta_0\,(1 + t/t_0)^{-p}` after an optional linear warm-up.

    With :math:`W` warm-up steps, scheduler step :math:`t` (``last_epoch``) gets

    .. math::
        \eta_t = \eta_0\,\frac{t+1}{W} \quad (t < W), \qquad
        \eta_t = \eta_0\,\Bigl(1 + \frac{t - W}{t_0}\Bigr)^{-p} \quad (t \ge W),

    where :math:`\eta_0` is the group's initial ``lr``. For :math:`1/2 < p \le 1` the steps
    satisfy the conditions of Robbins & Monro (1951), :math:`\sum_t \eta_t = \infty` and
    :math:`\sum_t \eta_t^2 < \infty`, under which SGD converges. :class:`InverseTimeLR`
    (:math:`p = 1`) and :class:`InverseSqrtLR` (:math:`p = 1/2`) are the two classical cases.

    The scheduler is chainable: each step multiplies the current ``lr`` by
    :math:`\eta_t / \eta_{t-1}`, so it composes with other schedulers (``ChainedScheduler``,
    or several schedulers stepped on one optimiser) and with any optimiser.

    Args:
        optimizer (Optimizer): the wrapped optimiser.
        t0 (float): time scale :math:`t_0 > 0`, in scheduler steps.
        power (float): exponent :math:`p > 0`.
        warmup_steps (int): number :math:`W \ge 0` of linear warm-up steps.
        last_epoch (int): index of the last step, -1 to start (torch's convention).

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = InversePowerLR(opt, t0=2.0, power=2.0, warmup_steps=2)
        >>> lrs = []
        >>> for _ in range(5):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 4))
        ...     opt.step()
        ...     sched.step()
        >>> lrs
        [0.5, 1.0, 1.0, 0.4444, 0.25]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        t0: float = 1.0,
        power: float = 1.0,
        *,
        warmup_steps: int = 0,
        last_epoch: int = -1,
    ) -> None:
        name = type(self).__name__
        if not (_is_real(t0) and t0 > 0):
            raise ValueError(f"{name}: t0 must be a finite number > 0 (steps), got {t0!r}")
        if not (_is_real(power) and power > 0):
            raise ValueError(f"{name}: power must be a finite number > 0, got {power!r}")
        if not (_is_int(warmup_steps) and warmup_steps >= 0):
            raise ValueError(f"{name}: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.t0 = float(t0)
        self.power = float(power)
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, t: int) -> float:
        r""":math:`\eta_t / \eta_0` at scheduler step ``t`` >= 0 (the closed form above).

        Example:
            >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            >>> InversePowerLR(opt, t0=10.0, power=1.0).lr_factor(10)
            0.5
        """
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        return (1.0 + (t - self.warmup_steps) / self.t0) ** -self.power

    def get_lr(self) -> list[float | Tensor]:
        """The learning rates of the step ``last_epoch``, from the current ones (chainable)."""
        t = self.last_epoch
        if t == 0:
            return [group["lr"] * self.lr_factor(0) for group in self.optimizer.param_groups]
        if getattr(self, "_is_initial", False):
            # resuming with last_epoch >= 0: the loaded lr is already this step's
            return [group["lr"] for group in self.optimizer.param_groups]
        ratio = self.lr_factor(t) / self.lr_factor(t - 1)
        return [group["lr"] * ratio for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float | Tensor]:
        return [base_lr * self.lr_factor(self.last_epoch) for base_lr in self.base_lrs]


class InverseTimeLR(InversePowerLR):
    r""":math:`\eta_t = \eta_0 / (1 + t/t_0)`, the :math:`O(1/t)` step of strongly convex SGD.

    Bottou, Curtis & Nocedal (2018), Theorem 4.7: for a :math:`\mu`-strongly convex objective
    with :math:`L`-Lipschitz gradient, SGD with steps :math:`\beta / (\gamma + t)`,
    :math:`\beta > 1/\mu`, has :math:`\mathbb E[f(x_t)] - f^\star = O(1/t)`. Here
    :math:`\beta = \eta_0 t_0` and :math:`\gamma = t_0`: pick :math:`t_0 > 1/(\mu\,\eta_0)`
    with :math:`\eta_0` a stable constant step. A constant step instead stalls at a noise
    floor proportional to the step (their Theorem 4.6). See :class:`InversePowerLR` for the
    warm-up and chaining.

    Args:
        optimizer (Optimizer): the wrapped optimiser.
        t0 (float): time scale :math:`t_0 > 0`, in scheduler steps.
        warmup_steps (int): linear warm-up steps.
        last_epoch (int): index of the last step, -1 to start.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
        >>> sched = InverseTimeLR(opt, t0=100.0)
        >>> for _ in range(100):
        ...     opt.step()
        ...     sched.step()
        >>> round(sched.get_last_lr()[0], 10)
        0.15
    """

    def __init__(
        self,
        optimizer: Optimizer,
        t0: float = 1.0,
        *,
        warmup_steps: int = 0,
        last_epoch: int = -1,
    ) -> None:
        super().__init__(optimizer, t0, 1.0, warmup_steps=warmup_steps, last_epoch=last_epoch)


class InverseSqrtLR(InversePowerLR):
    r""":math:`\eta_t = \eta_0 / \sqrt{1 + t/t_0}`, the step of the convex :math:`O(1/\sqrt T)`.

    For a convex objective with bounded stochastic gradients, steps of order
    :math:`1/\sqrt t` give :math:`O(1/\sqrt T)` suboptimality of the averaged iterate
    (Nemirovski, Juditsky, Lan & Shapiro 2009, "Robust stochastic approximation approach to
    stochastic programming"; Bottou, Curtis & Nocedal 2018, Section 4.4); without strong
    convexity no step schedule does better in general. It is also the decay after warm-up of
    the Transformer (Vaswani et al. 2017). See :class:`InversePowerLR` for warm-up and chaining.

    Args:
        optimizer (Optimizer): the wrapped optimiser.
        t0 (float): time scale :math:`t_0 > 0`, in scheduler steps.
        warmup_steps (int): linear warm-up steps.
        last_epoch (int): index of the last step, -1 to start.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
        >>> sched = InverseSqrtLR(opt, t0=1.0, warmup_steps=10)
        >>> for _ in range(13):
        ...     opt.step()
        ...     sched.step()
        >>> round(sched.get_last_lr()[0], 10)
        0.15
    """

    def __init__(
        self,
        optimizer: Optimizer,
        t0: float = 1.0,
        *,
        warmup_steps: int = 0,
        last_epoch: int = -1,
    ) -> None:
        super().__init__(optimizer, t0, 0.5, warmup_steps=warmup_steps, last_epoch=last_epoch)


class GrowingBatchSampler(Sampler[list[int]]):
    r"""Batches whose size grows geometrically: the batch-size counterpart of a decaying step.

    Smith, Kindermans, Ying & Le (2018), "Don't decay the learning rate, increase the batch
    size": the scale of SGD's gradient noise is :math:`g \approx \eta N / B` (step
    :math:`\eta`, :math:`N` samples, batch :math:`B \ll N`), so multiplying :math:`B` by a
    factor has the effect of dividing :math:`\eta` by it, in fewer, larger steps. Bottou,
    Curtis & Nocedal (2018), Theorem 5.3: with a constant step and geometrically growing
    batches, SGD on a strongly convex objective converges linearly in the number of steps.

    Counting ``k`` in epochs (``unit="epoch"``) or in batches (``unit="step"``, across epochs),

    .. math::
        B_k = \min\bigl(B_{\max},\ \mathrm{round}(B_0\, r^{\lfloor k / \mathrm{every} \rfloor})
        \bigr),

    with :math:`B_{\max}` = ``max_batch_size`` capped at the number of samples and
    round-half-up. Every epoch is one pass over the samples (a fresh permutation from
    ``seed + epoch`` when ``sampler`` is an int and ``shuffle``), cut into consecutive batches;
    the last, shorter batch is kept unless ``drop_last``.

    The epoch advances after an epoch has been iterated to its end; :meth:`set_epoch` sets it
    (as for ``DistributedSampler``, whose ``set_epoch`` is forwarded), so the batches of every
    epoch are reproducible and a run can be resumed. ``len()`` is the number of batches of the
    current epoch.

    Args:
        sampler (int | Sampler[int]): the number of samples, or a sampler of indices with a
            length (e.g. ``RandomSampler``, ``DistributedSampler``) whose order is used as is.
        initial_batch_size (int): :math:`B_0 \ge 1`.
        growth_factor (float): :math:`r \ge 1`.
        every (int): grow every this many units.
        unit (str): ``"epoch"`` or ``"step"``.
        max_batch_size (int | None): :math:`B_{\max} \ge B_0`; ``None``: the number of samples.
        drop_last (bool): drop each epoch's last batch when it is shorter.
        shuffle (bool): with an int ``sampler``, permute the indices every epoch.
        seed (int): with an int ``sampler``, seed of the permutations.

    Raises:
        ValueError, TypeError: an argument out of range or of the wrong type (named).

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.arange(10.0))
        >>> sampler = GrowingBatchSampler(len(data), 2, growth_factor=2, max_batch_size=4)
        >>> loader = DataLoader(data, batch_sampler=sampler)
        >>> [[len(xb) for (xb,) in loader] for epoch in range(3)]
        [[2, 2, 2, 2, 2], [4, 4, 2], [4, 4, 2]]
        >>> sampler.equivalent_lr_schedule(0.1, 3)
        [0.1, 0.05, 0.05]
    """

    def __init__(
        self,
        sampler: int | Sampler[int],
        initial_batch_size: int,
        *,
        growth_factor: float = 2.0,
        every: int = 1,
        unit: str = "epoch",
        max_batch_size: int | None = None,
        drop_last: bool = False,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        name = "GrowingBatchSampler"
        if _is_int(sampler):
            if sampler < 1:
                raise ValueError(f"{name}: the number of samples must be >= 1, got {sampler}")
            num_samples = sampler
        elif isinstance(sampler, Sized) and hasattr(sampler, "__iter__"):
            num_samples = len(sampler)
            if num_samples < 1:
                raise ValueError(f"{name}: sampler has no sample (len 0)")
        else:
            raise TypeError(
                f"{name}: sampler must be the number of samples (int) or a sampler of indices "
                f"with a length, got {type(sampler).__name__}"
            )
        if not (_is_int(initial_batch_size) and initial_batch_size >= 1):
            raise ValueError(
                f"{name}: initial_batch_size must be an int >= 1, got {initial_batch_size!r}"
            )
        if not (_is_real(growth_factor) and growth_factor >= 1):
            raise ValueError(
                f"{name}: growth_factor must be a finite number >= 1, got {growth_factor!r}"
            )
        if not (_is_int(every) and every >= 1):
            raise ValueError(f"{name}: every must be an int >= 1, got {every!r}")
        if unit not in ("epoch", "step"):
            raise ValueError(f"{name}: unit must be 'epoch' or 'step', got {unit!r}")
        if max_batch_size is not None and not (
            _is_int(max_batch_size) and max_batch_size >= initial_batch_size
        ):
            raise ValueError(
                f"{name}: max_batch_size must be None or an int >= initial_batch_size "
                f"({initial_batch_size}), got {max_batch_size!r}"
            )
        for flag_name, flag in (("drop_last", drop_last), ("shuffle", shuffle)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: {flag_name} must be a bool, got {flag!r}")
        if not _is_int(seed):
            raise TypeError(f"{name}: seed must be an int, got {seed!r}")
        self.sampler = sampler
        self.num_samples = num_samples
        self.initial_batch_size = initial_batch_size
        self.growth_factor = float(growth_factor)
        self.every = every
        self.unit = unit
        # a batch larger than the data would make empty epochs with drop_last
        self.max_batch_size = min(max_batch_size or num_samples, num_samples)
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def batch_size_at(self, k: int) -> int:
        r""":math:`B_k`, the batch size after ``k`` units (epochs or steps).

        Example:
            >>> GrowingBatchSampler(1000, 10, growth_factor=1.5, every=2).batch_size_at(4)
            23
        """
        if not (_is_int(k) and k >= 0):
            raise ValueError(f"GrowingBatchSampler.batch_size_at: k must be an int >= 0, got {k!r}")
        growths = k // self.every
        ceiling = math.log(self.max_batch_size / self.initial_batch_size)
        if growths * math.log(self.growth_factor) > ceiling + 1.0:
            return self.max_batch_size  # and r ** growths may overflow a float
        size = math.floor(self.initial_batch_size * self.growth_factor**growths + 0.5)
        return min(self.max_batch_size, size)

    def _growth_over(self, k: int) -> bool:
        return self.growth_factor == 1.0 or self.batch_size_at(k) == self.max_batch_size

    def _sizes_from(self, epoch: int, first_step: int) -> list[int]:
        # the batch sizes of one pass, its first batch being step ``first_step``
        sizes, left = [], self.num_samples
        while left > 0:
            k = epoch if self.unit == "epoch" else first_step + len(sizes)
            size = self.batch_size_at(k)
            if size > left:
                if not self.drop_last:
                    sizes.append(left)
                break
            sizes.append(size)
            left -= size
        return sizes

    def steps_before(self, epoch: int) -> int:
        """The number of batches in the epochs before ``epoch``.

        Example:
            >>> GrowingBatchSampler(10, 2, max_batch_size=4).steps_before(3)
            11
        """
        if not (_is_int(epoch) and epoch >= 0):
            raise ValueError(f"GrowingBatchSampler: epoch must be an int >= 0, got {epoch!r}")
        steps = 0
        for e in range(epoch):
            k = e if self.unit == "epoch" else steps
            if self._growth_over(k):
                # every later epoch is cut the same way
                return steps + (epoch - e) * len(self._sizes_from(e, steps))
            steps += len(self._sizes_from(e, steps))
        return steps

    def batch_sizes(self, epoch: int) -> list[int]:
        """The sizes of the batches of ``epoch``, in order.

        Example:
            >>> GrowingBatchSampler(10, 2, unit="step", every=2).batch_sizes(0)
            [2, 2, 4, 2]
        """
        return self._sizes_from(epoch, self.steps_before(epoch))

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the next epoch to iterate (forwarded to the wrapped sampler)."""
        if not (_is_int(epoch) and epoch >= 0):
            raise ValueError(
                f"GrowingBatchSampler.set_epoch: epoch must be an int >= 0, got {epoch!r}"
            )
        self.epoch = epoch

    def equivalent_lr_schedule(self, lr: float, length: int) -> list[float]:
        r"""The learning rates :math:`\eta B_0 / B_k`, :math:`k < ` ``length``, that give batches
        of the fixed size :math:`B_0` the noise scale of this sampler with step :math:`\eta`.

        Smith et al. (2018): the noise scale :math:`\eta N / B` is what matters, so this
        decaying schedule (per epoch or per step, as ``unit``) is the one that growing the
        batch replaces, e.g. ``LambdaLR(opt, lambda k: schedule[k] / lr)``.

        Example:
            >>> GrowingBatchSampler(1000, 8, growth_factor=4).equivalent_lr_schedule(1.0, 3)
            [1.0, 0.25, 0.0625]
        """
        if not (_is_real(lr) and lr > 0):
            raise ValueError(
                f"GrowingBatchSampler.equivalent_lr_schedule: lr must be > 0, got {lr!r}"
            )
        if not (_is_int(length) and length >= 0):
            raise ValueError(
                f"GrowingBatchSampler.equivalent_lr_schedule: length must be an int >= 0, "
                f"got {length!r}"
            )
        return [lr * self.initial_batch_size / self.batch_size_at(k) for k in range(length)]

    def _indices(self, epoch: int) -> list[int]:
        if not _is_int(self.sampler):
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            indices = list(self.sampler)
            if len(indices) != self.num_samples:
                raise RuntimeError(
                    f"GrowingBatchSampler: the sampler yielded {len(indices)} indices but has "
                    f"len {self.num_samples}"
                )
            return indices
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        indices = self._indices(epoch)
        start = 0
        for size in self.batch_sizes(epoch):
            yield indices[start : start + size]
            start += size
        self.epoch = epoch + 1

    def __len__(self) -> int:
        return len(self.batch_sizes(self.epoch))
