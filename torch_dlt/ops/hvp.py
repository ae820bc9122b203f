"""R-operator ops (Pearlmutter 1994): Hessian- and Gauss-Newton-vector products of sequential nets.

``sequential_hvp`` runs a whole layer program (forward, R-forward, loss curvature, backward,
R-backward) for a block of k directions; the elementwise ops are its fused pieces. The program
encoding (:class:`Opcode`, :class:`ActivationKind`) is in :mod:`torch_dlt.ops._hvp_reference`;
:mod:`torch_dlt.probes._hvp_ext` builds programs from ``nn.Module`` s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_dlt.ops import _hvp_reference, _use_compiled
from torch_dlt.ops._hvp_reference import ActivationKind, LossKind, Opcode, Reduction

__all__ = [
    "ActivationKind",
    "LossKind",
    "Opcode",
    "Reduction",
    "activation_hvp_backward",
    "activation_jvp",
    "has_hvp_ops",
    "loss_curvature",
    "sequential_hvp",
    "sequential_primal",
]


def has_hvp_ops() -> bool:
    """Whether the loaded ``_C`` carries the R-operator ops (it may predate them).

    >>> isinstance(has_hvp_ops(), bool)
    True
    """
    from torch_dlt.ops import has_ops

    return has_ops() and hasattr(torch.ops.torch_dlt, "sequential_primal")


def _compiled(x: Tensor) -> bool:
    return has_hvp_ops() and _use_compiled(x)


def _check_block(x: Tensor, v: Tensor, caller: str, name: str) -> None:
    for t, n in ((x, "x"), (v, name)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{caller}: {n} must be a Tensor, got {type(t).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{caller}: x has dtype {x.dtype}; accepted are float32, float64")
    if (
        x.dim() < 1
        or v.dim() != x.dim() + 1
        or v.shape[0] != x.shape[0]
        or v.shape[2:] != x.shape[1:]
    ):
        raise ValueError(
            f"{caller}: {name} must have shape [B, k, *x.shape[1:]] for x of shape "
            f"{tuple(x.shape)}, got {tuple(v.shape)}"
        )
    if v.dtype != x.dtype or v.device != x.device:
        raise TypeError(f"{caller}: {name} must have x's dtype {x.dtype} and device {x.device}")


def _check_kind(kind: int, caller: str) -> None:
    if kind not in set(ActivationKind):
        raise ValueError(
            f"{caller}: kind must be one of {[int(k) for k in ActivationKind]} "
            f"(torch_dlt.ops.ActivationKind), got {kind!r}"
        )


def activation_jvp(x: Tensor, y: Tensor, v: Tensor, kind: int, a: float = 0.0, b: float = 0.0):
    r"""The R-forward of an activation, :math:`\sigma'(x)\, v`, for k directions at once.

    Args:
        x (Tensor[B, \*]): pre-activations.
        y (Tensor[B, \*]): :math:`\sigma(x)` (tanh and sigmoid read their derivatives off it).
        v (Tensor[B, k, \*]): R-tensors of ``x``, one per direction.
        kind (int): an :class:`ActivationKind`; ``a``, ``b`` its constants (e.g. the slope).

    Returns:
        Tensor[B, k, \*]: :math:`\sigma'(x) v`.

    Example:
        >>> x = torch.tensor([[0.5, -1.0]])
        >>> activation_jvp(x, torch.tanh(x), torch.ones(1, 2, 2), ActivationKind.TANH)[0, 0]
        tensor([0.7864, 0.4200])
    """
    _check_block(x, v, "activation_jvp", "v")
    _check_kind(kind, "activation_jvp")
    if _compiled(x):
        return torch.ops.torch_dlt.activation_jvp(x, y, v, int(kind), float(a), float(b))
    return _hvp_reference.activation_jvp(x, y, v, kind, a, b)


def activation_hvp_backward(
    x: Tensor,
    y: Tensor,
    g: Tensor,
    rx: Tensor,
    rg: Tensor,
    kind: int,
    a: float = 0.0,
    b: float = 0.0,
) -> tuple[Tensor, Tensor]:
    r"""Backward and R-backward of an activation in one pass (Pearlmutter 1994, eq. for R{dE/dx}).

    Args:
        x, y, g (Tensor[B, \*]): pre-activation, output, gradient wrt the output.
        rx, rg (Tensor[B, k, \*]): R of ``x`` and of ``g`` for k directions.
        kind (int): an :class:`ActivationKind`; ``a``, ``b`` its constants.

    Returns:
        tuple[Tensor[B, \*], Tensor[B, k, \*]]: :math:`\sigma'(x) g` and
        :math:`\sigma'(x)\, r_g + \sigma''(x)\, g\, r_x`.

    Example:
        >>> x = torch.tensor([[0.0]])
        >>> gx, rgx = activation_hvp_backward(x, torch.sigmoid(x), torch.ones(1, 1),
        ...                                   torch.ones(1, 1, 1), torch.ones(1, 1, 1),
        ...                                   ActivationKind.SIGMOID)
        >>> float(gx), float(rgx)
        (0.25, 0.25)
    """
    _check_block(x, rg, "activation_hvp_backward", "rg")
    _check_block(x, rx, "activation_hvp_backward", "rx")
    _check_kind(kind, "activation_hvp_backward")
    if _compiled(x):
        return tuple(
            torch.ops.torch_dlt.activation_hvp_backward(
                x, y, g, rx, rg, int(kind), float(a), float(b)
            )
        )
    return _hvp_reference.activation_hvp_backward(x, y, g, rx, rg, kind, a, b)


def loss_curvature(
    z: Tensor, targets: Tensor, rz: Tensor, loss: int, reduction: int = Reduction.MEAN
) -> tuple[Tensor, Tensor]:
    r"""Gradient of the loss wrt the outputs ``z`` and the loss Hessian applied to ``rz``.

    Cross-entropy (``loss=LossKind.CROSS_ENTROPY``, class indices or probabilities): with
    :math:`p = \mathrm{softmax}(z)`, :math:`H r = s\,(p \odot r - p\, \langle p, r\rangle)`;
    MSE: :math:`H r = 2 s r`; ``s`` is 1/batch (cross-entropy) or 1/numel (MSE) for the mean
    reduction and 1 for the sum (Schraudolph 2002 for these Gauss-Newton curvatures).

    Args:
        z (Tensor[B, C]): network outputs (any [B, \*] for MSE).
        targets (Tensor[B] int64 | Tensor[B, C]): labels or probabilities / regression targets.
        rz (Tensor[B, k, C]): R of the outputs for k directions.
        loss (int): a :class:`LossKind`; ``reduction`` a :class:`Reduction`.

    Returns:
        tuple[Tensor[B, C], Tensor[B, k, C]]: the gradient and :math:`H_\ell\, r_z`.

    Example:
        >>> rz = torch.tensor([[[1.0, -1.0]]])
        >>> g, h = loss_curvature(torch.zeros(1, 2), torch.tensor([0]), rz, LossKind.CROSS_ENTROPY)
        >>> g, h
        (tensor([[-0.5000,  0.5000]]), tensor([[[ 0.5000, -0.5000]]]))
    """
    _check_block(z, rz, "loss_curvature", "rz")
    if loss not in set(LossKind) or reduction not in set(Reduction):
        raise ValueError(
            f"loss_curvature: loss must be a LossKind (0 cross-entropy, 1 MSE) and reduction a "
            f"Reduction (0 mean, 1 sum), got {loss!r}, {reduction!r}"
        )
    if _compiled(z):
        return tuple(torch.ops.torch_dlt.loss_curvature(z, targets, rz, int(loss), int(reduction)))
    return _hvp_reference.loss_curvature(z, targets, rz, loss, reduction)


def sequential_hvp(
    inputs: Tensor,
    targets: Tensor,
    params: list[Tensor],
    directions: list[Tensor | None],
    program: list[int],
    constants: list[float],
    loss: int,
    reduction: int,
    ggn: bool = False,
    primal: list[Tensor] | None = None,
) -> list[Tensor]:
    r"""H V or G V of ``loss(program(inputs), targets)`` for k directions, by the R-operator.

    One forward, one R-forward (all k directions batched), the loss curvature, one backward and
    one R-backward sweep (Pearlmutter 1994); with ``ggn=True`` the generalised Gauss-Newton
    :math:`G V = J^\top H_\ell J V` (Schraudolph 2002), which drops the backward of the gradient.

    Args:
        inputs (Tensor[B, \*]): the batch.
        targets (Tensor): as the loss takes them.
        params (list[Tensor]): the tensors the program consumes, in program order.
        directions (list[Tensor[k, \*p.shape] | None]): one per ``params`` entry; ``None`` for
            constants (frozen parameters, running statistics).
        program (list[int]), constants (list[float]): the layer program (:class:`Opcode`).
        loss (int), reduction (int): a :class:`LossKind` and a :class:`Reduction`.
        ggn (bool): Gauss-Newton instead of Hessian.
        primal (list[Tensor] | None): :func:`sequential_primal` of the same inputs, targets,
            params and program, computed once: the products then skip the forward pass and
            the backward of the gradient (``benchmarks/hessian.py``: a product fell from about
            2.1x to 1.3-1.45x a gradient on its MLP and LeNet-5).

    Returns:
        list[Tensor[k, \*p.shape]]: one block per ``params`` entry (empty where no direction).

    Example:
        >>> w = torch.tensor([[2.0]])
        >>> out = sequential_hvp(torch.ones(3, 1), torch.zeros(3, 1), [w], [torch.ones(1, 1, 1)],
        ...                      [Opcode.LINEAR, 0], [], LossKind.MSE, Reduction.SUM)
        >>> out[0]  # d^2/dw^2 sum_b (w x_b)^2 = 2 sum_b x_b^2
        tensor([[[6.]]])
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"sequential_hvp: inputs must be a Tensor, got {type(inputs).__name__}")
    if len(params) != len(directions):
        raise ValueError(
            f"sequential_hvp: directions must have one entry per params entry ({len(params)}), "
            f"got {len(directions)}"
        )
    if all(d is None for d in directions):
        raise ValueError("sequential_hvp: at least one params entry needs a direction")
    primal = [] if primal is None else list(primal)
    if _compiled(inputs):
        return list(
            torch.ops.torch_dlt.sequential_hvp(
                inputs, targets, list(params), list(directions), [int(p) for p in program],
                [float(c) for c in constants], int(loss), int(reduction), bool(ggn), primal,
            )
        )  # fmt: skip
    return _hvp_reference.sequential_hvp(
        inputs, targets, list(params), list(directions), list(program), list(constants),
        int(loss), int(reduction), bool(ggn), primal,
    )  # fmt: skip


def sequential_primal(
    inputs: Tensor,
    targets: Tensor,
    params: list[Tensor],
    program: list[int],
    constants: list[float],
    loss: int,
    reduction: int,
    gradients: bool = True,
) -> list[Tensor]:
    r"""The primal pass of :func:`sequential_hvp`, to reuse across products on one batch.

    Args:
        inputs, targets, params, program, constants, loss, reduction: as for
            :func:`sequential_hvp`.
        gradients (bool): also the loss gradients (needed for H V, not for G V).

    Returns:
        list[Tensor]: every layer's output, then (``gradients``) the loss gradient with respect
        to each; empty tensors where the output is a view of the layer's input (Flatten) and for
        the gradient at a Flatten's input. Pass it as ``primal`` while the inputs, targets and
        params stay the same.

    Example:
        >>> w = torch.tensor([[2.0]])
        >>> args = (torch.ones(3, 1), torch.zeros(3, 1))
        >>> primal = sequential_primal(*args, [w], [Opcode.LINEAR, 0], [], LossKind.MSE,
        ...                            Reduction.SUM)
        >>> [t.flatten().tolist() for t in primal]  # the outputs 2 x, then 2 (2 x - 0)
        [[2.0, 2.0, 2.0], [4.0, 4.0, 4.0]]
        >>> sequential_hvp(*args, [w], [torch.ones(1, 1, 1)], [Opcode.LINEAR, 0], [],
        ...                LossKind.MSE, Reduction.SUM, primal=primal)[0]
        tensor([[[6.]]])
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"sequential_primal: inputs must be a Tensor, got {type(inputs).__name__}")
    if _compiled(inputs):
        return list(
            torch.ops.torch_dlt.sequential_primal(
                inputs, targets, list(params), [int(p) for p in program],
                [float(c) for c in constants], int(loss), int(reduction), bool(gradients),
            )
        )  # fmt: skip
    return _hvp_reference.sequential_primal(
        inputs, targets, list(params), list(program), list(constants), int(loss), int(reduction),
        bool(gradients),
    )  # fmt: skip
