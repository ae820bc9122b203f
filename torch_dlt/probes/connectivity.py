"""Mode connectivity: the loss along the straight segment and along trained curves between minima.

Minima of deep nets are joined by paths of nearly constant loss (Venturi, Bandeira & Bruna 2016;
Garipov et al. 2018; Draxler et al. 2018) even where the straight segment crosses a barrier.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from torch_dlt.probes._state import check_same_architecture, forked_rng

__all__ = ["Curve", "LossProfile", "curve_loss_profile", "find_curve", "linear_barrier"]

_KINDS = ("line", "bezier", "polychain")

Batch = tuple[Any, Any]
Data = Union[Batch, Iterable[Batch]]
LossFn = Callable[[Tensor, Any], Tensor]


@dataclass(frozen=True)
class LossProfile:
    r"""The loss at evenly spaced points :math:`t_0 = 0 < \dots < t_{S-1} = 1` of a path.

    Attributes:
        ts (Tensor[S], float64): the path parameters, ``linspace(0, 1, S)``.
        losses (Tensor[S], float64): the loss at each point, averaged over the data (weighted by
            batch size).
        barrier (float): :math:`\max_t L(t) - \max(L(0), L(1))`, the height of the path's
            highest point above the higher endpoint (Garipov et al. 2018; Draxler et al. 2018).
            Zero or negative when the path never rises above its endpoints.
        interpolated_barrier (float): :math:`\max_t [L(t) - ((1-t) L(0) + t L(1))]`, the
            highest point above the straight line between the endpoint losses (Frankle, Dziugaite,
            Roy & Carbin 2020, who measure it against the endpoints' mean; in this form from
            Entezari, Sedghi, Saukh & Neyshabur 2022). Equal to ``barrier`` when both endpoints
            have the same loss.
    """

    ts: Tensor
    losses: Tensor
    barrier: float
    interpolated_barrier: float

    @classmethod
    def from_losses(cls, ts: Tensor, losses: Tensor) -> LossProfile:
        """Build a profile from ``ts`` (from 0 to 1) and the losses there.

        Example:
            >>> p = LossProfile.from_losses(torch.linspace(0, 1, 3), torch.tensor([1.0, 3.0, 0.0]))
            >>> p.barrier, p.interpolated_barrier
            (2.0, 2.5)
        """
        ts = ts.to(torch.float64)
        losses = losses.to(torch.float64)
        chord = (1 - ts) * losses[0] + ts * losses[-1]
        return cls(
            ts=ts,
            losses=losses,
            barrier=float(losses.max() - torch.maximum(losses[0], losses[-1])),
            interpolated_barrier=float((losses - chord).max()),
        )


class Curve:
    r"""A path :math:`\phi(t)`, :math:`t \in [0, 1]`, in weight space from one model to another.

    Kinds (Garipov, Izmailov, Podoprikhin, Vetrov & Wilson 2018, "Loss surfaces, mode
    connectivity, and fast ensembling of DNNs"), with endpoints :math:`w_1, w_2` and bend
    :math:`\theta`:

    - ``"line"``: :math:`\phi(t) = (1-t) w_1 + t w_2` (no bend);
    - ``"bezier"``: :math:`\phi(t) = (1-t)^2 w_1 + 2t(1-t)\theta + t^2 w_2`;
    - ``"polychain"``: :math:`w_1 \to \theta` for :math:`t \in [0, 1/2]`, then
      :math:`\theta \to w_2` for :math:`t \in [1/2, 1]`, both straight.

    The bend starts at the midpoint :math:`(w_1 + w_2)/2`, where either curve is the straight
    segment; :func:`find_curve` trains it. The endpoints are copies: the models are never used
    or changed afterwards. Buffers (BatchNorm running statistics) are not part of the path: a
    point's buffers are the endpoints' interpolated linearly in ``t``, or recomputed on data
    (``recompute_bn``).

    Args:
        model_a (nn.Module): the start, :math:`w_1`.
        model_b (nn.Module): the end, :math:`w_2`; same architecture as ``model_a``.
        kind (str): ``"line"``, ``"bezier"`` or ``"polychain"``.

    Attributes:
        kind (str): as given.
        start (dict[str, Tensor]): :math:`w_1`, parameter name to tensor.
        end (dict[str, Tensor]): :math:`w_2`.
        bend (dict[str, Tensor] | None): :math:`\theta`; ``None`` for ``"line"``.
        history (list[float]): the training loss per step of :func:`find_curve`, else empty.

    Example:
        >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
        >>> curve = Curve(a, b, kind="bezier")
        >>> bool(torch.allclose(curve(0.5)["weight"], (a.weight + b.weight).detach() / 2))
        True
        >>> curve.model_at(1.0).weight.equal(b.weight)
        True
    """

    def __init__(self, model_a: nn.Module, model_b: nn.Module, *, kind: str = "bezier") -> None:
        if kind not in _KINDS:
            raise ValueError(f"Curve: kind must be one of {_KINDS}, got {kind!r}")
        check_same_architecture(model_a, model_b, "Curve")
        self.kind = kind
        self.start = {n: p.detach().clone() for n, p in model_a.named_parameters()}
        self.end = {n: p.detach().clone() for n, p in model_b.named_parameters()}
        self.bend = (
            None if kind == "line" else {n: (self.start[n] + self.end[n]) / 2 for n in self.start}
        )
        self.history: list[float] = []
        self._buffers_start = {n: b.detach().clone() for n, b in model_a.named_buffers()}
        self._buffers_end = {n: b.detach().clone() for n, b in model_b.named_buffers()}
        self._template = copy.deepcopy(model_a)
        for parameter in self._template.parameters():
            parameter.grad = None

    def __repr__(self) -> str:
        size = sum(p.numel() for p in self.start.values())
        return f"Curve(kind={self.kind!r}, parameters={size})"

    def __call__(self, t: float) -> dict[str, Tensor]:
        """Same as :meth:`weights`."""
        return self.weights(t)

    def coefficients(self, t: float) -> tuple[float, float, float]:
        r"""The weights :math:`(c_1, c_\theta, c_2)` with :math:`\phi(t) = c_1 w_1 + c_\theta
        \theta + c_2 w_2`; they sum to 1.

        Example:
            >>> Curve(nn.Linear(1, 1), nn.Linear(1, 1), kind="polychain").coefficients(0.75)
            (0.0, 0.5, 0.5)
        """
        t = _check_t(t)
        if self.kind == "line":
            return 1.0 - t, 0.0, t
        if self.kind == "bezier":
            return (1.0 - t) ** 2, 2.0 * t * (1.0 - t), t * t
        if t <= 0.5:
            return 1.0 - 2.0 * t, 2.0 * t, 0.0
        return 0.0, 2.0 - 2.0 * t, 2.0 * t - 1.0

    def weights(self, t: float) -> dict[str, Tensor]:
        r"""The parameters :math:`\phi(t)`, by name (detached).

        Args:
            t (float): the path parameter in [0, 1].

        Returns:
            dict[str, Tensor]: one tensor per parameter of the model, same shapes.

        Example:
            >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
            >>> Curve(a, b, kind="line").weights(0.0)["bias"].equal(a.bias.detach())
            True
        """
        return self._combine(t, self.bend)

    def _combine(self, t: float, bend: dict[str, Tensor] | None) -> dict[str, Tensor]:
        c_start, c_bend, c_end = self.coefficients(t)
        point = {n: c_start * self.start[n] + c_end * self.end[n] for n in self.start}
        if bend is None:
            return point
        return {n: point[n] + c_bend * bend[n] for n in point}

    def _buffers_at(self, t: float) -> dict[str, Tensor]:
        # Buffers the endpoints share (constants, counters) stay exact; statistics interpolate.
        buffers = {}
        for name, start in self._buffers_start.items():
            end = self._buffers_end[name]
            if start.is_floating_point() and not torch.equal(start, end):
                buffers[name] = (1.0 - t) * start + t * end
            else:
                buffers[name] = start.clone()
        return buffers

    def _state_at(
        self, t: float, bn_batches: Iterable[Batch] | None, work: nn.Module, caller: str
    ) -> dict[str, Tensor]:
        parameters = self.weights(t)
        buffers = self._buffers_at(t)
        if bn_batches is not None:
            buffers = _recomputed_bn_buffers(work, parameters, buffers, bn_batches, caller)
        return {**parameters, **buffers}

    def model_at(self, t: float, *, recompute_bn: Data | bool | None = None) -> nn.Module:
        """A new copy of the model with the weights :math:`\\phi(t)`.

        Args:
            t (float): the path parameter in [0, 1].
            recompute_bn: for a model with BatchNorm, the training data (one ``(inputs,
                targets)`` batch or an iterable of them) to recompute the running statistics
                at :math:`\\phi(t)` (as in :func:`curve_loss_profile`), or ``False`` to take the
                endpoints' statistics interpolated linearly. Ignored without BatchNorm.

        Returns:
            nn.Module: a deep copy of ``model_a`` (training flags and ``requires_grad`` as
            ``model_a`` had them when the curve was built) holding the point's weights.

        Example:
            >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
            >>> m = Curve(a, b, kind="line").model_at(0.5)
            >>> bool(torch.allclose(m.bias, (a.bias + b.bias) / 2))
            True
        """
        _check_t(t)
        bn_batches = _bn_batches(recompute_bn, self._template, "Curve.model_at")
        model = copy.deepcopy(self._template)
        with forked_rng(self._template):
            state = self._state_at(t, bn_batches, copy.deepcopy(self._template), "Curve.model_at")
        with torch.no_grad():
            for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
                tensor.copy_(state[name])
        return model


def linear_barrier(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    steps: int = 21,
    recompute_bn: Data | bool | None = None,
    progress: bool = True,
) -> LossProfile:
    r"""The loss along the straight segment :math:`w(t) = (1-t) w_a + t w_b` and its barrier.

    The segment between two independently trained minima usually crosses a ridge (Goodfellow,
    Vinyals & Saxe 2015; Garipov et al. 2018; Draxler et al. 2018); its height is
    ``barrier = max_t L(w(t)) - max(L(w_a), L(w_b))``, and ``interpolated_barrier`` measures it
    from the chord between the endpoint losses (Frankle et al. 2020; see :class:`LossProfile`).
    The models are evaluated in eval mode, on copies: they are not changed.

    Args:
        model_a (nn.Module): the start :math:`w_a`.
        model_b (nn.Module): the end :math:`w_b`, same parameter names and shapes as ``model_a``.
        loss_fn (Callable[[Tensor, Any], Tensor]): ``loss_fn(outputs, targets)``, the mean loss
            of a batch as a scalar (e.g. ``F.cross_entropy``).
        data: one ``(inputs, targets)`` batch or a re-iterable of them (a ``DataLoader``); the
            loss is averaged over batches weighted by their size.
        steps (int): number of evenly spaced points S >= 2, endpoints included.
        recompute_bn: required when the model has BatchNorm layers: the training data (a batch
            or a re-iterable of batches) to recompute the running statistics at every point by
            one pass in train mode with cumulative averaging (Garipov et al. 2018), or
            ``False`` to use the endpoints' statistics interpolated linearly.
        progress (bool): show a tqdm bar over the points.

    Returns:
        LossProfile: ``ts`` [S], ``losses`` [S], ``barrier``, ``interpolated_barrier``.

    Example:
        >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
        >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
        >>> profile = linear_barrier(a, b, nn.functional.mse_loss, (x, y), steps=5,
        ...                          progress=False)
        >>> profile.losses.shape
        torch.Size([5])
        >>> bool(torch.isclose(profile.losses[0], nn.functional.mse_loss(a(x), y).double()))
        True
    """
    check_same_architecture(model_a, model_b, "linear_barrier")
    curve = Curve(model_a, model_b, kind="line")
    return _profile(curve, loss_fn, data, steps, recompute_bn, progress, "linear_barrier")


def curve_loss_profile(
    curve: Curve,
    loss_fn: LossFn,
    data: Data,
    *,
    steps: int = 21,
    recompute_bn: Data | bool | None = None,
    progress: bool = True,
) -> LossProfile:
    r"""The loss at ``steps`` evenly spaced points of a :class:`Curve` and its barrier.

    A trained curve between two minima has a barrier close to zero where the straight segment
    has a high one (Garipov et al. 2018, Fig. 1 and Table 1; Draxler et al. 2018).

    Args:
        curve (Curve): the path, e.g. from :func:`find_curve`.
        loss_fn (Callable[[Tensor, Any], Tensor]): ``loss_fn(outputs, targets)``, the mean loss
            of a batch as a scalar.
        data: one ``(inputs, targets)`` batch or a re-iterable of them.
        steps (int): number of evenly spaced points S >= 2, endpoints included.
        recompute_bn: as in :func:`linear_barrier`.
        progress (bool): show a tqdm bar over the points.

    Returns:
        LossProfile: ``ts`` [S], ``losses`` [S], ``barrier``, ``interpolated_barrier``.

    Example:
        >>> curve = Curve(nn.Linear(2, 1), nn.Linear(2, 1), kind="polychain")
        >>> batch = (torch.randn(8, 2), torch.randn(8, 1))
        >>> profile = curve_loss_profile(curve, nn.functional.mse_loss, batch, steps=3,
        ...                              progress=False)
        >>> profile.ts.tolist()
        [0.0, 0.5, 1.0]
    """
    if not isinstance(curve, Curve):
        raise TypeError(f"curve_loss_profile: curve must be a Curve, got {type(curve).__name__}")
    return _profile(curve, loss_fn, data, steps, recompute_bn, progress, "curve_loss_profile")


def find_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    loader: Data,
    *,
    curve: str = "bezier",
    epochs: int = 1,
    steps: int | None = None,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> Curve:
    r"""Train the bend of a curve of low loss from ``model_a`` to ``model_b``.

    Garipov et al. 2018 ("Loss surfaces, mode connectivity, and fast ensembling of DNNs"): the
    bend :math:`\theta` minimises :math:`\mathbb{E}_{t \sim U(0, 1)} L(\phi_\theta(t))` by SGD,
    one :math:`t` drawn per mini-batch; the endpoints stay fixed. The bend starts at the
    midpoint :math:`(w_1 + w_2)/2`. The network runs in train mode (dropout on, BatchNorm on
    batch statistics) through ``torch.func.functional_call`` on a private copy, so the models
    and their buffers are not touched; the global RNG is restored afterwards (dropout and the
    loader's shuffling draw from a fork of it, seeded with ``seed``).

    Args:
        model_a (nn.Module): the start :math:`w_1`.
        model_b (nn.Module): the end :math:`w_2`, same architecture.
        loss_fn (Callable[[Tensor, Any], Tensor]): ``loss_fn(outputs, targets)``, scalar.
        loader: the training data: a re-iterable of ``(inputs, targets)`` batches, or one batch.
        curve (str): ``"bezier"`` or ``"polychain"``.
        epochs (int): passes over ``loader`` (when ``steps`` is ``None``).
        steps (int | None): number of SGD steps instead, cycling through ``loader``.
        lr (float): SGD learning rate.
        momentum (float): SGD momentum.
        weight_decay (float): L2 penalty on the bend.
        seed (int): seed of the draws of ``t`` and of the forked RNG.
        progress (bool): show a tqdm bar over the steps.

    Returns:
        Curve: the trained curve; ``curve.history`` holds the loss of every step.

    Example:
        >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
        >>> batch = (torch.randn(16, 2), torch.randn(16, 1))
        >>> c = find_curve(a, b, nn.functional.mse_loss, batch, steps=5, progress=False)
        >>> c.kind, len(c.history), c.start["weight"].equal(a.weight.detach())
        ('bezier', 5, True)
    """
    if curve not in ("bezier", "polychain"):
        raise ValueError(f"find_curve: curve must be 'bezier' or 'polychain', got {curve!r}")
    _check_count(epochs, "epochs", "find_curve", minimum=1)
    if steps is not None:
        _check_count(steps, "steps", "find_curve", minimum=1)
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"find_curve: {name} must be a finite number >= 0, got {value!r}")
    if not callable(loss_fn):
        raise TypeError(f"find_curve: loss_fn must be callable, got {type(loss_fn).__name__}")
    batches = _batch_iterable(loader, "loader", "find_curve")
    check_same_architecture(model_a, model_b, "find_curve")
    path = Curve(model_a, model_b, kind=curve)
    bend = {n: p.clone().requires_grad_(True) for n, p in path.bend.items()}
    optimizer = torch.optim.SGD(
        list(bend.values()), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    draws = torch.Generator().manual_seed(seed)
    work = copy.deepcopy(path._template).train()
    # In train mode BatchNorm writes running statistics into the buffers it is given: scratch.
    scratch = {n: b.clone() for n, b in path._buffers_start.items()}
    device = _device_of(path.start)
    total = steps if steps is not None else _length(batches, epochs)

    from tqdm.auto import tqdm

    with forked_rng(work):
        torch.manual_seed(seed)
        bar = tqdm(
            _training_batches(batches, epochs, steps),
            total=total,
            desc="find_curve",
            disable=not progress,
            leave=False,
        )
        for inputs, targets in bar:
            t = float(torch.rand((), generator=draws, dtype=torch.float64))
            outputs = functional_call(
                work, {**path._combine(t, bend), **scratch}, (_to(inputs, device),)
            )
            loss = loss_fn(outputs, _to(targets, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            path.history.append(float(loss.detach()))
    path.bend = {n: p.detach() for n, p in bend.items()}
    return path


def _profile(
    curve: Curve,
    loss_fn: LossFn,
    data: Data,
    steps: int,
    recompute_bn: Data | bool | None,
    progress: bool,
    caller: str,
) -> LossProfile:
    _check_count(steps, "steps", caller, minimum=2)
    if not callable(loss_fn):
        raise TypeError(f"{caller}: loss_fn must be callable, got {type(loss_fn).__name__}")
    batches = _batch_iterable(data, "data", caller)
    bn_batches = _bn_batches(recompute_bn, curve._template, caller)
    device = _device_of(curve.start)
    work = copy.deepcopy(curve._template)
    ts = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)

    from tqdm.auto import tqdm

    losses = []
    with forked_rng(work):
        for t in tqdm(ts.tolist(), desc=caller, disable=not progress, leave=False):
            state = curve._state_at(t, bn_batches, work, caller)
            work.eval()
            losses.append(_mean_loss(work, state, loss_fn, batches, device, caller))
    return LossProfile.from_losses(ts, torch.tensor(losses, dtype=torch.float64))


def _mean_loss(
    work: nn.Module,
    state: dict[str, Tensor],
    loss_fn: LossFn,
    batches: Iterable[Batch],
    device: torch.device,
    caller: str,
) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in batches:
            loss = loss_fn(
                functional_call(work, state, (_to(inputs, device),)), _to(targets, device)
            )
            if not (isinstance(loss, Tensor) and loss.numel() == 1):
                raise ValueError(
                    f"{caller}: loss_fn must return a scalar tensor (the batch mean), got "
                    f"{type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}"
                )
            size = _batch_size(inputs, targets)
            total += float(loss) * size
            count += size
    if count == 0:
        raise ValueError(f"{caller}: data yielded no samples")
    return total / count


def _recomputed_bn_buffers(
    work: nn.Module,
    parameters: dict[str, Tensor],
    buffers: dict[str, Tensor],
    batches: Iterable[Batch],
    caller: str,
) -> dict[str, Tensor]:
    """Running statistics of every BatchNorm at these weights, from one pass over ``batches``.

    As Garipov et al. 2018 do: fresh statistics, momentum ``None`` (the cumulative average of
    the batch statistics). Only the BatchNorm layers run in train mode, so that dropout is off
    and the statistics are those of the activations the evaluated (eval-mode) network sees.
    """
    buffers = dict(buffers)
    norms = [(name, m) for name, m in work.named_modules() if _tracks_statistics(m)]
    for name, module in norms:
        prefix = f"{name}." if name else ""
        buffers[prefix + "running_mean"] = torch.zeros_like(module.running_mean)
        buffers[prefix + "running_var"] = torch.ones_like(module.running_var)
        buffers[prefix + "num_batches_tracked"] = torch.zeros_like(module.num_batches_tracked)
    momenta = [module.momentum for _, module in norms]
    work.eval()
    for _, module in norms:
        module.train()
        module.momentum = None
    device = _device_of(parameters)
    seen = 0
    try:
        with torch.no_grad():
            for inputs, _ in batches:
                functional_call(work, {**parameters, **buffers}, (_to(inputs, device),))
                seen += 1
    finally:
        for (_, module), momentum in zip(norms, momenta):
            module.momentum = momentum
        work.eval()
    if seen == 0:
        raise ValueError(f"{caller}: recompute_bn yielded no batches")
    return buffers


def _tracks_statistics(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) and module.track_running_stats


def _bn_batches(
    recompute_bn: Data | bool | None, template: nn.Module, caller: str
) -> Iterable[Batch] | None:
    norms = [name for name, m in template.named_modules() if _tracks_statistics(m)]
    if recompute_bn is False or not norms:
        return None
    if recompute_bn is None or recompute_bn is True:
        raise ValueError(
            f"{caller}: the model has BatchNorm layers ({', '.join(norms)}) whose running "
            f"statistics belong to the endpoints, not to the points between: pass "
            f"recompute_bn=<training data> to recompute them at every point (Garipov et al. "
            f"2018), or recompute_bn=False to interpolate the endpoints' statistics"
        )
    return _batch_iterable(recompute_bn, "recompute_bn", caller)


def _batch_iterable(data: Data, argument: str, caller: str) -> Iterable[Batch]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return [tuple(data)]
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"{caller}: {argument} must be an (inputs, targets) batch or an iterable of them "
            f"(e.g. a DataLoader), got {type(data).__name__}"
        )
    if isinstance(data, Iterator):
        raise TypeError(
            f"{caller}: {argument} is a one-shot iterator ({type(data).__name__}) but is read "
            f"several times: pass a list or a DataLoader"
        )
    return data


def _training_batches(batches: Iterable[Batch], epochs: int, steps: int | None) -> Iterator[Batch]:
    done = 0
    for epoch in itertools.count():
        if steps is None and epoch == epochs:
            return
        empty = True
        for batch in batches:
            empty = False
            yield batch
            done += 1
            if steps is not None and done == steps:
                return
        if empty:
            raise ValueError("find_curve: loader yielded no batches")


def _length(batches: Iterable[Batch], epochs: int) -> int | None:
    try:
        return epochs * len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _batch_size(inputs: Any, targets: Any) -> int:
    for part in (targets, inputs):
        if isinstance(part, Tensor) and part.dim() > 0:
            return part.shape[0]
    return len(inputs)


def _to(value: Any, device: torch.device | None) -> Any:
    return value.to(device) if isinstance(value, Tensor) and device is not None else value


def _device_of(tensors: dict[str, Tensor]) -> torch.device | None:
    return next(iter(tensors.values())).device if tensors else None


def _check_t(t: float) -> float:
    if isinstance(t, Tensor) and t.numel() == 1:
        t = t.item()
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise ValueError(f"Curve: t must be a number in [0, 1], got {t!r}")
    return float(t)


def _check_count(value: object, name: str, caller: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{caller}: {name} must be an integer >= {minimum}, got {value!r}")
