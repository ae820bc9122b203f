"""Stochastic variance-reduced gradient (SVRG) as a ``torch.optim`` optimiser.

Johnson & Zhang (2013), "Accelerating stochastic gradient descent using predictive variance
reduction": steps with the mini-batch gradient corrected by its value at a periodic snapshot.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torch_dlt.probes._state import forked_rng

__all__ = ["SVRG", "full_gradient_closure", "svrg"]

Closure = Callable[[], Tensor]


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_real(value: object, name: str, *, positive: bool) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > 0 if positive else value >= 0)
    )
    if not ok:
        accepted = "a finite number > 0" if positive else "a finite number >= 0"
        raise ValueError(f"SVRG: {name} must be {accepted}, got {value!r}")


def _grouped_by_device_and_dtype(tensors: list[Tensor]) -> list[list[int]]:
    # The foreach kernels want every tensor of one call on one device with one dtype.
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def svrg(
    params: list[Tensor],
    grads: list[Tensor],
    snapshot_grads: list[Tensor],
    full_gradients: list[Tensor],
    *,
    lr: float,
    weight_decay: float = 0.0,
    foreach: bool | None = None,
) -> None:
    r"""The SVRG update, in place: :math:`x \leftarrow x - \eta\,(g_i(x) - g_i(\tilde x) + \mu
    + \lambda x)`.

    Johnson & Zhang (2013), eq. (5): :math:`g_i` is the gradient of the loss on mini-batch
    :math:`i`, :math:`\tilde x` the snapshot and :math:`\mu = \nabla f(\tilde x)` the full
    gradient there. The correction has mean zero over :math:`i`, so the step is unbiased, and
    its variance vanishes as :math:`x` and :math:`\tilde x` approach the optimum. The weight
    decay :math:`\lambda` is deterministic and needs no correction.

    Args:
        params (list[Tensor]): the parameters :math:`x`, updated in place.
        grads (list[Tensor]): :math:`g_i(x)`, one per parameter, same shapes.
        snapshot_grads (list[Tensor]): :math:`g_i(\tilde x)` on the same mini-batch.
        full_gradients (list[Tensor]): :math:`\mu`.
        lr (float): step size :math:`\eta`.
        weight_decay (float): L2 coefficient :math:`\lambda`.
        foreach (bool | None): use the multi-tensor ``torch._foreach_*`` kernels; ``None``
            picks them when every parameter is on a GPU.

    Example:
        >>> x = [torch.tensor([1.0, 2.0])]
        >>> svrg(x, [torch.tensor([0.5, 0.5])], [torch.tensor([0.25, 0.0])],
        ...      [torch.tensor([1.0, -1.0])], lr=0.5)
        >>> x[0]
        tensor([0.3750, 2.2500])
    """
    if not (len(params) == len(grads) == len(snapshot_grads) == len(full_gradients)):
        raise ValueError(
            "svrg: params, grads, snapshot_grads and full_gradients must have one entry per "
            f"parameter, got lengths {len(params)}, {len(grads)}, {len(snapshot_grads)}, "
            f"{len(full_gradients)}"
        )
    if foreach is None:
        foreach = bool(params) and all(p.device.type == "cuda" for p in params)
    if not foreach:
        for x, g, g_snap, mu in zip(params, grads, snapshot_grads, full_gradients):
            direction = (g - g_snap).add_(mu)
            if weight_decay != 0:
                direction.add_(x, alpha=weight_decay)
            x.add_(direction, alpha=-lr)
        return
    for group in _grouped_by_device_and_dtype(params):
        xs = [params[i] for i in group]
        directions = torch._foreach_sub(
            [grads[i] for i in group], [snapshot_grads[i] for i in group]
        )
        torch._foreach_add_(directions, [full_gradients[i] for i in group])
        if weight_decay != 0:
            torch._foreach_add_(directions, xs, alpha=weight_decay)
        torch._foreach_add_(xs, directions, alpha=-lr)


class SVRG(Optimizer):
    r"""Stochastic variance-reduced gradient descent (Johnson & Zhang 2013).

    Every step evaluates the mini-batch loss twice, at the current weights :math:`x` and at
    the snapshot :math:`\tilde x`, and moves along

    .. math::
        x \leftarrow x - \eta\,\bigl(g_i(x) - g_i(\tilde x) + \mu + \lambda x\bigr),
        \qquad \mu = \nabla f(\tilde x) = \tfrac1n \textstyle\sum_j g_j(\tilde x).

    On a smooth, strongly convex finite sum, plain SGD with a constant step stalls at a noise
    floor proportional to the step; SVRG's correction makes the gradient noise vanish at the
    optimum, so a constant step converges linearly (Johnson & Zhang 2013, Theorem 1; for
    convex problems they take :math:`m = 2n` single-sample steps between snapshots).

    Your loop stays yours: ``step(closure)`` takes the usual ``torch.optim`` closure
    (re-evaluate the current mini-batch, call ``backward``, return the loss) and runs it once
    with the snapshot weights swapped in, then once at the current weights. The parameters are
    copied back bit for bit, also when the closure raises, and the snapshot pass runs under a
    forked RNG so that both passes draw the same dropout masks (the "same sample" of the
    theory) and the global RNG advances as for one ordinary closure call. After ``step``, each
    ``.grad`` holds :math:`g_i(x)` at the weights before the update, as with any optimiser.

    The full gradient :math:`\mu` comes from ``full_closure``: a closure that accumulates the
    gradient of the whole-data loss into ``.grad`` (:func:`full_gradient_closure` builds one
    from a model, a loss and a loader). :meth:`take_snapshot` runs it; with
    ``snapshot_every=m`` the optimiser re-takes the snapshot itself every ``m`` steps (option I
    of Johnson & Zhang: the snapshot is the last iterate). Parameters that get no gradient from
    the full closure are frozen: they take no part.

    ``state_dict`` holds the snapshot, :math:`\mu` and the steps since the snapshot; the full
    closure is code, not state: give it again to the optimiser that loads the state.

    Memory: three extra copies of the parameters (snapshot, :math:`\mu`, a scratch copy).
    The BatchNorm running statistics of a model in train mode are updated by both passes;
    Defazio & Bottou (2019), "On the ineffectiveness of variance reduced optimization for deep
    learning", discuss why SVRG and BatchNorm mix poorly.

    Args:
        params (Iterable[Tensor] | Iterable[dict]): parameters or parameter groups.
        lr (float): step size :math:`\eta` > 0; works with any LR scheduler.
        snapshot_every (int | None): take a new snapshot every this many steps (for one per
            epoch, ``len(loader)``; Johnson & Zhang use two epochs); ``None``: only when you
            call :meth:`take_snapshot`.
        full_closure (Callable[[], Tensor] | None): the full-data closure used by automatic
            snapshots; :meth:`take_snapshot` can also pass it.
        weight_decay (float): L2 coefficient :math:`\lambda` >= 0.
        foreach (bool | None): see :func:`svrg`.

    Raises:
        ValueError: a hyper-parameter out of range (the message names it).
        TypeError: ``full_closure`` is not callable.

    Example:
        >>> from torch_dlt.data import data_loader
        >>> g = torch.Generator().manual_seed(0)
        >>> x, w = torch.randn(64, 5, generator=g), torch.randn(5, 1, generator=g)
        >>> loader = data_loader(x, x @ w, batch_size=8, seed=0)
        >>> model, loss_fn = nn.Linear(5, 1), nn.MSELoss()
        >>> opt = SVRG(model.parameters(), lr=0.05, snapshot_every=2 * len(loader),
        ...            full_closure=full_gradient_closure(model, loss_fn, loader))
        >>> for epoch in range(30):
        ...     for xb, yb in loader:
        ...         def closure():
        ...             opt.zero_grad()
        ...             loss = loss_fn(model(xb), yb)
        ...             loss.backward()
        ...             return loss
        ...         loss = opt.step(closure)
        >>> bool(loss < 1e-8)
        True
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        *,
        snapshot_every: int | None = None,
        full_closure: Closure | None = None,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
    ) -> None:
        _check_real(lr, "lr", positive=True)
        _check_real(weight_decay, "weight_decay", positive=False)
        if snapshot_every is not None and not _is_positive_int(snapshot_every):
            raise ValueError(
                f"SVRG: snapshot_every must be None or a positive int (steps), "
                f"got {snapshot_every!r}"
            )
        if full_closure is not None and not callable(full_closure):
            raise TypeError(
                f"SVRG: full_closure must be a callable returning the full-data loss, "
                f"got {type(full_closure).__name__}"
            )
        if foreach not in (None, True, False):
            raise ValueError(f"SVRG: foreach must be None, True or False, got {foreach!r}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "foreach": foreach})
        self.snapshot_every = snapshot_every
        self.full_closure = full_closure

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _taking_part(self) -> list[Tensor]:
        return [p for p in self._all_params() if "snapshot" in self.state[p]]

    def _gradients_of(self, closure: Closure) -> tuple[Tensor, list[Tensor | None]]:
        # Fresh gradients for every evaluation: the closure need not zero them itself.
        params = self._all_params()
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, Tensor):
            raise TypeError(
                f"SVRG: the closure must return the loss as a Tensor, got {type(loss).__name__}"
            )
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("SVRG does not support sparse gradients")
        return loss.detach(), [p.grad for p in params]

    @torch.no_grad()
    def take_snapshot(self, full_closure: Closure | None = None) -> Tensor:
        r"""Set the snapshot :math:`\tilde x` to the current weights and :math:`\mu` to the full
        gradient there.

        The parameters and their ``.grad`` are left as they were.

        Args:
            full_closure (Callable[[], Tensor] | None): accumulates the full-data gradient into
                ``.grad`` and returns the full-data loss; it also becomes the closure of later
                automatic snapshots. ``None``: the one given before.

        Returns:
            Tensor[]: the full-data loss at the snapshot.

        Raises:
            RuntimeError: no full closure was ever given, or it produced no gradient.
        """
        if full_closure is not None:
            if not callable(full_closure):
                raise TypeError(
                    f"SVRG.take_snapshot: full_closure must be callable, "
                    f"got {type(full_closure).__name__}"
                )
            self.full_closure = full_closure
        if self.full_closure is None:
            raise RuntimeError(
                "SVRG.take_snapshot: no full_closure; pass one here or to SVRG(full_closure=...)"
            )
        params = self._all_params()
        saved_grads = [p.grad for p in params]
        try:
            loss, full_gradients = self._gradients_of(self.full_closure)
        finally:
            for p, g in zip(params, saved_grads):
                p.grad = g
        if all(g is None for g in full_gradients):
            raise RuntimeError(
                "SVRG.take_snapshot: the full closure left no gradient on any parameter; "
                "it must call backward() on the full-data loss"
            )
        for p, mu in zip(params, full_gradients):
            state = self.state[p]
            if mu is None:
                state.clear()
                continue
            state["snapshot"] = p.detach().clone(memory_format=torch.preserve_format)
            state["full_gradient"] = mu.detach()
            # the inner-loop index of Johnson & Zhang: steps since this snapshot
            state["step"] = torch.zeros((), dtype=torch.int64)
        return loss

    @contextlib.contextmanager
    def _at_snapshot(self, params: list[Tensor]) -> Iterator[None]:
        current = [p.detach().clone() for p in params]
        try:
            for p in params:
                p.copy_(self.state[p]["snapshot"])
            with forked_rng(params):
                yield
        finally:
            for p, x in zip(params, current):
                p.copy_(x)

    def _snapshot_due(self, params: list[Tensor]) -> bool:
        if not params:
            return True
        steps = int(self.state[params[0]]["step"])
        return self.snapshot_every is not None and steps >= self.snapshot_every

    @torch.no_grad()
    def step(self, closure: Closure) -> Tensor:  # type: ignore[override]
        """One SVRG step on the mini-batch that ``closure`` evaluates.

        Args:
            closure (Callable[[], Tensor]): re-evaluates the loss on the current mini-batch,
                calls ``backward`` and returns the loss; it is called twice.

        Returns:
            Tensor[]: the mini-batch loss at the weights before the update.

        Raises:
            TypeError: no closure.
            RuntimeError: no snapshot has been taken and no ``full_closure`` is known.
        """
        if closure is None or not callable(closure):
            raise TypeError(
                "SVRG.step needs closure=, a callable that evaluates the mini-batch loss, calls "
                "backward() and returns the loss (it runs at the current and snapshot weights)"
            )
        params = self._taking_part()
        if self._snapshot_due(params):
            if self.full_closure is None:
                raise RuntimeError(
                    "SVRG.step: no snapshot yet; call take_snapshot(full_closure) first or pass "
                    "SVRG(full_closure=...)"
                )
            self.take_snapshot()
            params = self._taking_part()
        everything = self._all_params()
        position = {p: i for i, p in enumerate(everything)}
        with self._at_snapshot(params):
            _, snapshot_grads = self._gradients_of(closure)
        loss, grads = self._gradients_of(closure)
        for group in self.param_groups:
            xs, gs, gs_snap, mus = [], [], [], []
            for p in group["params"]:
                state = self.state[p]
                if "snapshot" not in state:
                    continue
                g, g_snap = grads[position[p]], snapshot_grads[position[p]]
                xs.append(p)
                gs.append(torch.zeros_like(p) if g is None else g)
                gs_snap.append(torch.zeros_like(p) if g_snap is None else g_snap)
                mus.append(state["full_gradient"])
                state["step"] += 1
            svrg(
                xs,
                gs,
                gs_snap,
                mus,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                foreach=group["foreach"],
            )
        return loss


def full_gradient_closure(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    loader: Iterable[tuple[Tensor, Tensor]],
) -> Closure:
    r"""A closure that accumulates :math:`\nabla f = \frac1n\sum_i \nabla \ell_i` over a loader.

    Each batch ``(inputs, targets)`` is moved to the device of the model's first parameter;
    ``loss_fn(model(inputs), targets)`` must be the batch *mean* (the default reduction of
    torch's losses), and batches of different sizes are weighted by their size, so the result
    is the mean over all samples. The model's ``training`` flag is the caller's: put the model
    in the mode its steps use.

    Args:
        model (nn.Module): the model.
        loss_fn (Callable[[Tensor, Tensor], Tensor]): mean loss of a batch.
        loader (Iterable[tuple[Tensor, Tensor]]): the whole data, e.g. a DataLoader.

    Returns:
        Callable[[], Tensor]: sets the gradient of the full-data mean loss into ``.grad`` (adding
        to what is there) and returns that loss, detached.

    Example:
        >>> model = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0)
        >>> data = [(torch.ones(3, 2), torch.zeros(3, 1)), (torch.ones(1, 2), torch.ones(1, 1))]
        >>> loss = full_gradient_closure(model, nn.MSELoss(), data)()
        >>> round(loss.item(), 6), model.weight.grad.tolist()
        (3.25, [[3.5, 3.5]])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"full_gradient_closure: model must be an nn.Module, got {type(model)}")
    if not callable(loss_fn):
        raise TypeError("full_gradient_closure: loss_fn must be callable (outputs, targets)")

    def closure() -> Tensor:
        device = next(model.parameters()).device
        total_loss, count = 0.0, 0
        previous = [(p, p.grad) for p in model.parameters()]
        for p, _ in previous:
            p.grad = None
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            size = len(targets)
            loss = loss_fn(model(inputs), targets)
            (loss * size).backward()
            total_loss += loss.detach() * size
            count += size
        if count == 0:
            raise ValueError("full_gradient_closure: the loader yielded no sample")
        with torch.no_grad():
            for p, before in previous:
                if p.grad is not None:
                    p.grad.div_(count)
                    if before is not None:
                        p.grad.add_(before)
        return total_loss / count

    return closure
