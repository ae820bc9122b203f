"""AdaGrad-Norm: one AdaGrad stepsize for the whole gradient (Ward, Wu & Bottou 2019).

The optimiser `AdaGradNorm` and its functional form `adagrad_norm`, with for-loop and ``foreach``
paths, following the conventions of ``torch.optim``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["AdaGradNorm", "adagrad_norm"]

SCOPES = ("global", "param_group", "layer")
"""Which parameters share one stepsize ``b``: all of them, each param group, each tensor."""

ParamsT = Union[Iterable[Tensor], Iterable[dict]]
_REDUCED_PRECISION = (torch.float16, torch.bfloat16)
_DOT_DTYPES = (torch.float32, torch.float64)
_FOREACH_DEVICES = ("cuda", "xpu")


def _check_hyperparameters(lr: float | Tensor, b0: float, weight_decay: float, where: str) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(
            f"lr{where} must be a float or a one-element tensor, got shape {tuple(lr.shape)}"
        )
    for name, value in (("lr", lr), ("b0", b0), ("weight_decay", weight_decay)):
        if not (math.isfinite(float(value)) and float(value) >= 0.0):
            raise ValueError(f"{name}{where} must be a finite number >= 0, got {value}")


def _accumulator_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    # b^2 sums squares of the whole gradient: in float16 it overflows once ||G|| > 256, so the
    # accumulator is real and at least float32 (float64 when a parameter is float64).
    dtype = torch.float32
    for d in dtypes:
        dtype = torch.promote_types(dtype, d.to_real() if d.is_complex else d)
    return dtype


def _norm_dtype(dtype: torch.dtype) -> torch.dtype | None:
    return torch.float32 if dtype in _REDUCED_PRECISION else None


def _default_foreach(params: list[Tensor]) -> bool:
    # As torch.optim: the foreach kernels pay off on accelerators; on the CPU they loop over
    # tensors in C++ and measure no faster than the Python loop (benchmarks/optim.py).
    return (
        len(params) > 0
        and all(
            type(p) in (Tensor, torch.nn.Parameter) and p.device.type in _FOREACH_DEVICES
            for p in params
        )
        and len({p.device for p in params}) == 1
    )


def _resolve_foreach(params: list[Tensor], foreach: bool | None) -> bool:
    if foreach is None:
        return _default_foreach(params)
    if foreach and len({p.device for p in params}) > 1:
        devices = sorted(str(d) for d in {p.device for p in params})
        raise ValueError(
            f"foreach=True needs the parameters of one step on one device, got {devices}; "
            "use foreach=False or one param group per device"
        )
    return foreach


def _effective_gradients(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    weight_decay: float,
    maximize: bool,
    foreach: bool,
) -> tuple[list[Tensor], bool]:
    """``G = (-grad if maximize else grad) + weight_decay * x``, and whether G is our own copy."""
    owned = False
    if maximize:
        grads = list(torch._foreach_neg(grads)) if foreach else [torch.neg(g) for g in grads]
        owned = True
    if weight_decay != 0:
        if foreach and owned:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        elif foreach:
            grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
        elif owned:
            for g, p in zip(grads, params):
                g.add_(p, alpha=weight_decay)
        else:
            grads = [g.add(p, alpha=weight_decay) for g, p in zip(grads, params)]
        owned = True
    return grads, owned


def _squared_norm(g: Tensor) -> Tensor:
    if g.device.type == "cpu" and g.dtype in _DOT_DTYPES:
        # On the CPU a dot product runs on every thread; linalg.vector_norm runs on one.
        flat = g.reshape(-1)
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(g, dtype=_norm_dtype(g.dtype)).square()


def _squared_norms(grads: list[Tensor], *, foreach: bool) -> list[Tensor]:
    """``||G_i||^2`` per tensor, real, computed in at least float32."""
    dtypes = {g.dtype for g in grads}
    fused = grads[0].device.type != "cpu" or torch.compiler.is_compiling()
    if foreach and fused and len(dtypes) == 1:
        # One multi-tensor kernel on accelerators; under torch.compile the compiler fuses it.
        norms = list(torch._foreach_norm(grads, 2, dtype=_norm_dtype(dtypes.pop())))
        torch._foreach_mul_(norms, norms)
        return norms
    return [_squared_norm(g) for g in grads]


def _sum_of_squares(squares: list[Tensor], like: Tensor) -> Tensor:
    if any(sq.device != like.device for sq in squares):
        squares = [sq.to(like.device) for sq in squares]
    return torch.stack(squares).to(like.dtype).sum()


def _negative_step(sum_sq: Tensor, lr: float | Tensor) -> Tensor:
    # b = 0 only when b0 = 0 and every gradient so far was zero (so G = 0 too): the step is 0.
    b = sum_sq.sqrt()
    return torch.where(b > 0, -lr / b, 0.0)


def _upcast(grads: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    # A device-resident step is cast to the gradient's dtype by the kernels; in float16 a small
    # lr / b is subnormal, so reduced-precision gradients are scaled in the step's dtype.
    return [g.to(dtype) if g.dtype in _REDUCED_PRECISION else g for g in grads]


def _descend(
    params: list[Tensor],
    grads: list[Tensor],
    steps: Tensor | list[Tensor],
    *,
    foreach: bool,
    grads_owned: bool,
) -> None:
    """``x_i += s_i G_i``: ``steps`` is one 0-dim tensor for all, or one per tensor."""
    shared = isinstance(steps, Tensor)
    first = steps if shared else steps[0]
    if first.device.type == "cpu" and not torch.compiler.is_compiling():
        # Reading a CPU scalar is free and keeps the update one pass with no temporary (under
        # torch.compile it would break the graph).
        if shared and foreach:
            torch._foreach_add_(params, grads, alpha=steps.item())
            return
        alphas = [steps.item()] * len(params) if shared else [s.item() for s in steps]
        for p, g, alpha in zip(params, grads, alphas):
            p.add_(g, alpha=alpha)
        return
    # On accelerators and under torch.compile the steps stay on the device: no host sync.
    reduced = any(g.dtype in _REDUCED_PRECISION for g in grads)
    if reduced:
        grads = _upcast(grads, first.dtype)
    if not foreach:
        for i, (p, g) in enumerate(zip(params, grads)):
            p.addcmul_(g, (steps if shared else steps[i]).to(p.device))
    elif not shared:
        torch._foreach_addcmul_(params, grads, steps)
    elif grads_owned and not reduced:
        torch._foreach_mul_(grads, steps)
        torch._foreach_add_(params, grads)
    else:
        torch._foreach_add_(params, torch._foreach_mul(grads, steps))


def _step_per_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    sum_sq: list[Tensor],
    squares: list[Tensor],
    lr: float | Tensor,
    *,
    foreach: bool,
    grads_owned: bool,
) -> None:
    if foreach:
        torch._foreach_add_(sum_sq, squares)
        steps = list(_negative_step(torch.stack(sum_sq), lr).unbind())
    else:
        for acc, square in zip(sum_sq, squares):
            acc.add_(square)
        steps = [_negative_step(acc, lr) for acc in sum_sq]
    _descend(params, grads, steps, foreach=foreach, grads_owned=grads_owned)


def adagrad_norm(
    params: list[Tensor],
    grads: list[Tensor],
    sum_sq: list[Tensor],
    *,
    lr: float | Tensor,
    weight_decay: float = 0.0,
    maximize: bool = False,
    foreach: bool | None = None,
) -> None:
    r"""One AdaGrad-Norm step, in place: the functional form of `AdaGradNorm`.

    With :math:`G = \nabla f(x) + \lambda x` (:math:`\lambda` = ``weight_decay``; the gradient is
    negated first when ``maximize``), Algorithm 1 (AdaGrad-Norm) of Ward, Wu & Bottou (2019):

    .. math::
        b_{j+1}^2 = b_j^2 + \lVert G_j \rVert^2, \qquad
        x_{j+1} = x_j - \eta \, G_j / b_{j+1}.

    Args:
        params (list[Tensor]): parameters :math:`x`, updated in place.
        grads (list[Tensor]): their gradients, same shapes as ``params``; not modified.
        sum_sq (list[Tensor[]]): the accumulators :math:`b^2`, 0-dim real tensors updated in
            place: one tensor (one :math:`b` for the norm of all ``grads`` together) or one per
            parameter (each tensor its own :math:`b`).
        lr (float | Tensor[]): :math:`\eta`.
        weight_decay (float): L2 coefficient :math:`\lambda`, added to the gradient before the
            norm, as ``torch.optim.Adagrad`` does.
        maximize (bool): ascend instead of descend.
        foreach (bool | None): use the ``torch._foreach_*`` kernels; ``None`` picks them when
            every parameter is on one CUDA (or XPU) device, as ``torch.optim`` does.

    Raises:
        ValueError: if the lists do not match, or ``foreach=True`` with parameters on several
            devices.

    References:
        R. Ward, X. Wu, L. Bottou. AdaGrad stepsizes: sharp convergence over nonconvex
        landscapes. ICML 2019; JMLR 21(219), 2020. arXiv:1806.01811.

    Example:
        >>> x = torch.tensor([3.0, 4.0])
        >>> b2 = torch.tensor(0.0)
        >>> adagrad_norm([x], [x.clone()], [b2], lr=1.0)  # loss 0.5 ||x||^2: gradient x
        >>> x, b2.sqrt()
        (tensor([2.4000, 3.2000]), tensor(5.))
    """
    if len(grads) != len(params):
        raise ValueError(f"got {len(params)} params but {len(grads)} grads")
    if len(sum_sq) not in (1, len(params)):
        raise ValueError(
            f"sum_sq must hold 1 accumulator (shared) or one per param ({len(params)}), "
            f"got {len(sum_sq)}"
        )
    if not params:
        return
    foreach = _resolve_foreach(params, foreach)
    grads, owned = _effective_gradients(
        params, grads, weight_decay=weight_decay, maximize=maximize, foreach=foreach
    )
    squares = _squared_norms(grads, foreach=foreach)
    if len(sum_sq) > 1:
        _step_per_tensor(params, grads, sum_sq, squares, lr, foreach=foreach, grads_owned=owned)
        return
    sum_sq[0].add_(_sum_of_squares(squares, sum_sq[0]))
    _descend(params, grads, _negative_step(sum_sq[0], lr), foreach=foreach, grads_owned=owned)


class AdaGradNorm(Optimizer):
    r"""AdaGrad-Norm (Ward, Wu & Bottou 2019): SGD whose stepsize adapts to the gradient norms.

    A single scalar :math:`b` accumulates the squared norms of the gradients and divides the
    step. With :math:`G_j` the (stochastic) gradient at step :math:`j`, plus
    :math:`\lambda x_j` when ``weight_decay`` :math:`=\lambda > 0`:

    .. math::
        b_{j+1}^2 = b_j^2 + \lVert G_j \rVert^2, \qquad
        x_{j+1} = x_j - \frac{\eta}{b_{j+1}} G_j .

    The norm includes the current gradient, so the first step has length at most :math:`\eta`
    whatever :math:`b_0`. Ward et al. prove convergence to a stationary point of a smooth
    nonconvex loss at rate :math:`O(1/N)` with exact gradients and :math:`O(\log N/\sqrt N)`
    with stochastic ones, for *every* :math:`b_0 > 0` and :math:`\eta > 0`: unlike gradient
    descent with a fixed step, which diverges once the step exceeds :math:`2/L`, no knowledge of
    the smoothness constant :math:`L` is needed: with exact gradients :math:`b_j` grows until
    :math:`\eta / b_j` is small enough for the landscape, then levels off.

    Under ``DistributedDataParallel`` the gradients are all-reduced before ``step``, so the norm
    is that of the averaged gradient: every rank computes the same :math:`b` and takes the same
    step.

    Args:
        params (iterable of Tensor or dict): parameters, or param groups (dicts) with their own
            ``lr`` and ``weight_decay`` (and ``b0`` unless ``scope="global"``).
        lr (float | Tensor[]): :math:`\eta`; the paper uses :math:`\eta = 1`. LR schedulers scale
            it as usual.
        b0 (float): initial :math:`b_0 \ge 0`. The default 0.1 is a small initialisation as in
            the paper's experiments: the theory tolerates any :math:`b_0 > 0`, a too small one
            costs only a few early steps of length :math:`\le\eta`, a too large one slows every
            step. :math:`b_0 = 0` is allowed; while :math:`b = 0` (all gradients so far zero) the
            step is zero, never NaN.
        scope (str): which parameters share a :math:`b`. ``"global"`` (the paper): one
            :math:`b` for the norm of all parameters of all param groups; ``"param_group"``: one
            per param group; ``"layer"``: one per parameter tensor.
        weight_decay (float): L2 penalty :math:`\lambda \ge 0`, added to the gradient before
            the norm (as ``torch.optim.Adagrad``).
        maximize (bool): maximise the objective instead of minimising it.
        foreach (bool | None): use the ``torch._foreach_*`` kernels; ``None`` picks them when
            all parameters of a group are on one CUDA (or XPU) device, as ``torch.optim`` does.

    Raises:
        ValueError: for ``lr``, ``b0`` or ``weight_decay`` negative or not finite, an unknown
            ``scope``, or a param group that sets its own ``scope`` (or ``b0`` under
            ``scope="global"``).
        RuntimeError: from ``step`` when a gradient is sparse.

    State:
        ``state[p]["sum_sq"]`` (Tensor[], real, at least float32) holds :math:`b^2`: for every
        tensor ``p`` (``"layer"``), for the first tensor of each group (``"param_group"``) or for
        the first tensor of the first group only (``"global"``). It is created in the
        constructor, so ``state_dict``/``load_state_dict`` resume bit for bit.

    References:
        R. Ward, X. Wu, L. Bottou. AdaGrad stepsizes: sharp convergence over nonconvex
        landscapes. ICML 2019; JMLR 21(219), 2020. arXiv:1806.01811.

    Example:
        >>> x = torch.tensor([3.0, 4.0], requires_grad=True)
        >>> opt = AdaGradNorm([x], lr=1.0, b0=0.0)
        >>> (0.5 * x.pow(2).sum()).backward()  # gradient (3, 4), norm 5
        >>> opt.step()
        >>> x.detach(), opt.state[x]["sum_sq"].sqrt()
        (tensor([2.4000, 3.2000]), tensor(5.))
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        b0: float = 0.1,
        *,
        scope: str = "global",
        weight_decay: float = 0.0,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        _check_hyperparameters(lr, b0, weight_decay, "")
        defaults = {
            "lr": lr,
            "b0": b0,
            "scope": scope,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group; its accumulators start at ``b0 ** 2`` (see `AdaGradNorm`)."""
        where = f" of param group {len(self.param_groups)}"
        scope = self.defaults["scope"]
        if param_group.get("scope", scope) != scope:
            raise ValueError(
                f"scope{where} is {param_group['scope']!r} but the optimiser's is {scope!r}; "
                "scope is set once, in the constructor"
            )
        b0 = param_group.get("b0", self.defaults["b0"])
        if scope == "global" and b0 != self.defaults["b0"]:
            raise ValueError(
                f"b0{where} is {b0} but scope='global' shares one b over all groups "
                f"(b0={self.defaults['b0']}); set b0 in the constructor, or use "
                "scope='param_group'"
            )
        _check_hyperparameters(
            param_group.get("lr", self.defaults["lr"]),
            b0,
            param_group.get("weight_decay", self.defaults["weight_decay"]),
            where,
        )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        params = group["params"]
        if scope == "layer":
            owners = [(p, [p]) for p in params]
        elif scope == "param_group" or self._first_param() is (params[0] if params else None):
            owners = [(params[0], params)] if params else []
        else:
            owners = []
        for owner, covered in owners:
            self.state[owner]["sum_sq"] = torch.full(
                (),
                float(group["b0"]) ** 2,
                dtype=_accumulator_dtype(p.dtype for p in covered),
                device=owner.device,
            )

    def _first_param(self) -> Tensor | None:
        return next((p for g in self.param_groups for p in g["params"]), None)

    def _gather(self, index: int, group: dict) -> tuple[list[Tensor], list[Tensor], bool]:
        params, grads = [], []
        for j, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.layout != torch.strided:
                names = group.get("param_names")
                name = repr(names[j]) if names else f"{j} of param group {index}"
                raise RuntimeError(
                    f"AdaGradNorm does not support sparse gradients, but parameter {name} "
                    f"(shape {tuple(p.shape)}) has a {p.grad.layout} gradient; use dense "
                    "gradients (e.g. nn.Embedding(..., sparse=False)), or torch.optim.SparseAdam "
                    "or torch.optim.Adagrad for sparse ones"
                )
            params.append(p)
            grads.append(p.grad)
        return params, grads, _resolve_foreach(params, group["foreach"]) if params else False

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdaGrad-Norm step on every parameter that has a gradient.

        Args:
            closure (Callable[[], float] | None): re-evaluates the model and returns the loss.

        Returns:
            float | None: the closure's loss, if a closure was given.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every gradient is checked before any parameter moves: a refused step changes nothing.
        gathered = [self._gather(i, g) for i, g in enumerate(self.param_groups)]
        scope = self.defaults["scope"]
        if scope != "global":
            for group, (params, grads, foreach) in zip(self.param_groups, gathered):
                if not params:
                    continue
                owners = params if scope == "layer" else group["params"][:1]
                adagrad_norm(
                    params,
                    grads,
                    [self.state[p]["sum_sq"] for p in owners],
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    maximize=group["maximize"],
                    foreach=foreach,
                )
            return loss
        first = self._first_param()
        if first is None:
            return loss
        sum_sq = self.state[first]["sum_sq"]
        updates, squares = [], []
        for group, (params, grads, foreach) in zip(self.param_groups, gathered):
            if not params:
                continue
            grads, owned = _effective_gradients(
                params,
                grads,
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                foreach=foreach,
            )
            squares.append(_sum_of_squares(_squared_norms(grads, foreach=foreach), sum_sq))
            updates.append((group["lr"], params, grads, foreach, owned))
        if not updates:
            return loss
        sum_sq.add_(sum(squares[1:], squares[0]))
        for lr, params, grads, foreach, owned in updates:
            _descend(params, grads, _negative_step(sum_sq, lr), foreach=foreach, grads_owned=owned)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by an `AdaGradNorm` with the same ``scope`` and param layout.

        The accumulators keep their saved dtype (``torch.optim`` would cast them to the
        parameter's, e.g. bfloat16) and are copied, so the loaded optimiser owns them.

        Raises:
            ValueError: if the state was saved with another ``scope`` (or by another optimiser).
        """
        scope = self.defaults["scope"]
        for i, group in enumerate(state_dict["param_groups"]):
            if group.get("scope") != scope:
                raise ValueError(
                    f"param group {i} of the state_dict has scope={group.get('scope')!r}, but "
                    f"this AdaGradNorm has scope={scope!r}: its b accumulators would not match"
                )
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {}).get("sum_sq")
            if saved is not None:
                self.state[p]["sum_sq"] = saved.to(device=p.device, copy=True)
