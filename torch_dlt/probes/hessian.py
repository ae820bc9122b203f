"""Curvature of the loss as a linear operator: Hessian and Gauss-Newton products, and their uses.

Implements Hessian-vector products (Pearlmutter 1994), the generalised Gauss-Newton matrix
(Schraudolph 2002), Lanczos eigenpairs, Hutch++ traces (Meyer, Musco, Musco & Woodruff 2021) and
spectral densities by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017), with the index of
Pennington & Bahri (2017).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from torch_dlt.probes._state import forked_rng, restored_mode
from torch_dlt.probes.landscape import Batch, Data, LossFn, _batch_size, _batches

__all__ = [
    "CurvatureConvergenceWarning",
    "EigenResult",
    "GGNOperator",
    "HessianOperator",
    "SpectralDensity",
    "TraceEstimate",
    "hessian_index",
    "plot_spectral_density",
    "spectral_density",
    "top_eigenvalues",
    "trace",
]

_BACKENDS = ("auto", "func", "autograd", "ext")
_REDUCTIONS = ("mean", "sum")
_WHICH = ("LA", "SA", "LM")
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


class CurvatureConvergenceWarning(UserWarning):
    """An eigensolver stopped before every wanted eigenpair met its tolerance."""


# ---------------------------------------------------------------------------------------------
# operators


def _loss_reduction(loss_fn: LossFn, reduction: str | None, owner: str) -> str:
    if reduction is None:
        # nn losses say how they reduce; plain functions (F.cross_entropy, ...) default to mean.
        reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"{owner}: the loss must reduce a batch to a scalar by 'mean' or 'sum' (pass "
            f"reduction= for a custom loss), got reduction={reduction!r}"
        )
    return reduction


def _ggn_loss_kind(loss_fn: LossFn) -> str | None:
    if isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is nn.functional.cross_entropy:
        return "cross_entropy"
    if isinstance(loss_fn, nn.MSELoss) or loss_fn is nn.functional.mse_loss:
        return "mse"
    return None


def _traceable_loss(loss_fn: LossFn, reduction: str) -> LossFn:
    """The same loss in a form torch.func can differentiate forward-over-reverse.

    ``F.mse_loss``'s backward has no forward derivative in some torch releases (a ZeroTensor is
    written to in place), so the MSE is spelled out; other losses pass through.
    """
    if _ggn_loss_kind(loss_fn) != "mse":
        return loss_fn
    if reduction == "sum":
        return lambda output, target: (output - target).square().sum()
    return lambda output, target: (output - target).square().mean()


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


@contextlib.contextmanager
def _probing_mode(model: nn.Module, train_mode: bool) -> Iterator[None]:
    """Eval mode (dropout off); with ``train_mode`` BatchNorm normalises by batch statistics.

    BatchNorm in train mode with ``track_running_stats`` off reads the batch statistics and
    writes nothing, so the running statistics are never touched (and vmap sees no in-place
    update of an unbatched buffer).
    """
    tracking = {m: m.track_running_stats for m in model.modules() if isinstance(m, _BN_TYPES)}
    with restored_mode(model, eval_mode=True, restore_buffers=train_mode), forked_rng(model):
        try:
            if train_mode:
                for module in tracking:
                    module.train()
                    module.track_running_stats = False
            yield
        finally:
            for module, flag in tracking.items():
                module.track_running_stats = flag


class _CurvatureOperator:
    """Shared machinery of :class:`HessianOperator` and :class:`GGNOperator`."""

    _ggn = False
    _owner = "HessianOperator"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Data,
        *,
        backend: str = "auto",
        train_mode: bool = False,
        reduction: str | None = None,
        process_group: Any = None,
        chunk_size: int | None = None,
    ) -> None:
        owner = self._owner
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"{owner}: loss_fn must be callable, got {type(loss_fn).__name__}")
        if backend not in _BACKENDS:
            raise ValueError(f"{owner}: backend must be one of {_BACKENDS}, got {backend!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"{owner}: chunk_size must be None or an int >= 1, got {chunk_size!r}")
        model = _unwrap(model)
        self.model = model
        self.loss_fn = loss_fn
        self.train_mode = bool(train_mode)
        self.reduction = _loss_reduction(loss_fn, reduction, owner)
        self._func_loss = _traceable_loss(loss_fn, self.reduction)
        self.process_group = process_group
        self.chunk_size = chunk_size
        self.num_matvecs = 0
        if self._ggn and _ggn_loss_kind(loss_fn) is None:
            raise ValueError(
                f"{owner}: the Gauss-Newton matrix is positive semi-definite for losses convex "
                "in the model's output; supported: nn.CrossEntropyLoss, nn.MSELoss, "
                f"F.cross_entropy, F.mse_loss; got {getattr(loss_fn, '__name__', loss_fn)!r}"
            )
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{owner}: the model has no trainable parameters (requires_grad)")
        self._names = [n for n, _ in named]
        self._shapes = [p.shape for _, p in named]
        self._numels = [p.numel() for _, p in named]
        n = sum(self._numels)
        self.shape = (n, n)
        self.dtype = named[0][1].dtype
        self.device = named[0][1].device
        self.batches = _batches(data, owner)
        local = sum(_batch_size(b) for b in self.batches)
        total = self._all_reduce(torch.tensor(float(local), device=self.device))
        self.num_samples = int(total)
        self._weights = [
            _batch_size(b) / self.num_samples if self.reduction == "mean" else 1.0
            for b in self.batches
        ]
        self._ext = None
        self._pass: tuple | None = None  # (model state key, the one batch's cached pass)
        self.backend = self._choose_backend(backend)

    # -- construction helpers --------------------------------------------------------------

    def _choose_backend(self, backend: str) -> str:
        if backend in ("func", "autograd"):
            return backend
        try:
            from torch_dlt.probes import _hvp_ext
        except ImportError as exc:
            if backend == "ext":
                raise ValueError(
                    f"{self._owner}: backend='ext' needs torch_dlt.probes._hvp_ext ({exc})"
                ) from exc
            return "func"
        tensors_in = all(isinstance(b[0], Tensor) for b in self.batches)
        if backend == "auto":
            from torch_dlt import ops

            # "auto" takes the engine only when its compiled kernels are loaded.
            built = getattr(ops, "has_hvp_ops", ops.has_ops)()
            if not (built and tensors_in and not self.train_mode):
                return "func"
            try:
                self._ext = _hvp_ext.ext_program(self.model, self.loss_fn)
            except _hvp_ext.UnsupportedModelError:
                return "func"
            return "ext"
        if self.train_mode:
            raise _hvp_ext.UnsupportedModelError(
                f"{self._owner}: backend='ext' supports BatchNorm in eval mode only; "
                "use train_mode=False or backend='func'"
            )
        if not tensors_in:
            raise ValueError(f"{self._owner}: backend='ext' needs Tensor inputs in every batch")
        self._ext = _hvp_ext.ext_program(self.model, self.loss_fn)
        return "ext"

    def _all_reduce(self, t: Tensor) -> Tensor:
        if self.process_group is not None:
            import torch.distributed as dist

            t = t.contiguous()  # collectives take dense tensors
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group)
        return t

    # -- pieces shared by the backends -------------------------------------------------------

    def _params(self) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self._names}

    def _constants(self) -> dict[str, Tensor]:
        trainable = set(self._names)
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if n not in trainable}
        return {**frozen, **{n: b for n, b in self.model.named_buffers()}}

    def _on_device(self, batch: Batch) -> tuple[tuple[Tensor, ...], Tensor]:
        inputs, targets = batch
        items = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        args = tuple(x.to(self.device) if isinstance(x, Tensor) else x for x in items)
        return args, targets.to(self.device)

    def _split(self, flat: Tensor) -> dict[str, Tensor]:
        """Tensor[n, k] -> {name: Tensor[k, *shape]}."""
        pieces = torch.split(flat, self._numels, dim=0)
        k = flat.shape[1]
        return {
            n: piece.T.reshape(k, *shape)
            for n, piece, shape in zip(self._names, pieces, self._shapes)
        }

    def _join(self, parts: list[Tensor], k: int) -> Tensor:
        """[Tensor[k, *shape]] -> Tensor[n, k]."""
        return torch.cat([p.reshape(k, -1) for p in parts], dim=1).T.contiguous()

    # -- products ----------------------------------------------------------------------------

    def __matmul__(self, other: Tensor) -> Tensor:
        if not isinstance(other, Tensor):
            return NotImplemented
        n = self.shape[0]
        if other.dim() == 1 and other.shape[0] == n:
            return self.matmat(other[:, None])[:, 0]
        if other.dim() == 2 and other.shape[0] == n:
            return self.matmat(other)
        raise ValueError(
            f"{self._owner}: @ takes Tensor[{n}] or Tensor[{n}, k] (flat over the trainable "
            f"parameters), got shape {tuple(other.shape)}"
        )

    def matmat(self, V: Tensor) -> Tensor:
        """The operator applied to each column of ``V``.

        Args:
            V (Tensor[n, k]): vectors flat over the trainable parameters in
                ``model.parameters()`` order; moved to the operator's device and dtype.

        Returns:
            Tensor[n, k]: the products, in the operator's dtype on its device.
        """
        V = V.detach().to(device=self.device, dtype=self.dtype)
        k = V.shape[1]
        if k == 0:
            return torch.zeros(self.shape[0], 0, dtype=self.dtype, device=self.device)
        out = None
        # The ext engine runs its layer program, not the modules: once its primal pass is made,
        # products need neither eval mode nor a forked RNG.
        hit = self.backend == "ext" and self._pass_is_current()
        with contextlib.nullcontext() if hit else _probing_mode(self.model, self.train_mode):
            for batch, weight in zip(self.batches, self._weights):
                args, targets = self._on_device(batch)
                product = self._batch_matmat(args, targets, V)
                if out is None:
                    out = product.mul_(weight) if weight != 1.0 else product
                else:
                    out.add_(product, alpha=weight)
        self.num_matvecs += k
        return self._all_reduce(out)

    def _batch_matmat(self, args: tuple[Tensor, ...], targets: Tensor, V: Tensor) -> Tensor:
        if self.backend == "ext":
            primal = None
            if len(self.batches) == 1:
                primal = self._cached_pass(
                    lambda: self._ext.primal(args[0], targets, ggn=self._ggn)
                )
            return self._ext.matmat(args[0], targets, V.contiguous(), ggn=self._ggn, primal=primal)
        if self.backend == "func":
            return self._func_matmat(args, targets, V)
        return self._autograd_matmat(args, targets, V)

    def _output_fn(self, args: tuple[Tensor, ...]) -> Callable[[dict[str, Tensor]], Tensor]:
        constants = self._constants()
        return lambda p: functional_call(self.model, {**p, **constants}, args)

    def _func_matmat(self, args: tuple[Tensor, ...], targets: Tensor, V: Tensor) -> Tensor:
        params, k = self._params(), V.shape[1]
        output = self._output_fn(args)
        if self._ggn:
            out, pullback = vjp(output, params)

            def product(v: dict[str, Tensor]) -> dict[str, Tensor]:
                jv = jvp(output, (params,), (v,))[1]
                hjv = jvp(grad(lambda o: self._func_loss(o, targets)), (out,), (jv,))[1]
                return pullback(hjv)[0]
        else:
            gradient = grad(lambda p: self._func_loss(output(p), targets))

            def product(v: dict[str, Tensor]) -> dict[str, Tensor]:
                return jvp(gradient, (params,), (v,))[1]

        tangents = self._split(V)
        if k == 1:
            result = product({n: t[0] for n, t in tangents.items()})
            return self._join([result[n] for n in self._names], 1)
        result = vmap(product, chunk_size=self.chunk_size)(tangents)
        return self._join([result[n] for n in self._names], k)

    def _pass_is_current(self) -> bool:
        """Whether the cached pass (ext primal / autograd graph) is of the model as it is now."""
        return (
            len(self.batches) == 1 and self._pass is not None and self._pass[0] == self._state_key()
        )

    def _cached_pass(self, make: Callable[[], Any]) -> Any:
        """One batch: the pass ``make`` builds serves every product until the model changes."""
        if not self._pass_is_current():
            self._pass = None  # free the old pass before making the new one
            self._pass = (self._state_key(), make())
        return self._pass[1]

    def _state_key(self) -> tuple:
        # In-place updates bump a tensor's version; assignment changes its storage.
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return (self.train_mode, *((t.data_ptr(), t._version) for t in tensors))

    def _autograd_graph(self, args: tuple[Tensor, ...], targets: Tensor) -> dict[str, Any]:
        """The differentiable pieces double backward reuses for every column."""
        leaves = [p.clone().requires_grad_(True) for p in self._params().values()]
        out = self._output_fn(args)(dict(zip(self._names, leaves)))
        if self._ggn:
            out_leaf = out.detach().requires_grad_(True)
            loss_grad = torch.autograd.grad(
                self.loss_fn(out_leaf, targets), out_leaf, create_graph=True
            )[0]
            # J v by the double-vjp trick: d/du (J^T u) applied to v, with a dummy cotangent u.
            dummy = torch.zeros_like(out, requires_grad=True)
            pulled = torch.autograd.grad(out, leaves, dummy, create_graph=True, allow_unused=True)
            used = [(g, i) for i, g in enumerate(pulled) if g is not None]
            return dict(
                leaves=leaves, out=out, out_leaf=out_leaf, loss_grad=loss_grad, dummy=dummy,
                used=used,
            )  # fmt: skip
        loss = self.loss_fn(out, targets)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        used = [(g, i) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return dict(leaves=leaves, used=used)

    def _autograd_matmat(self, args: tuple[Tensor, ...], targets: Tensor, V: Tensor) -> Tensor:
        if len(self.batches) == 1:
            # One batch: its gradient graph serves every product until the model changes.
            graph = self._cached_pass(lambda: self._autograd_graph(args, targets))
        else:
            graph = self._autograd_graph(args, targets)
        leaves, used = graph["leaves"], graph["used"]
        columns = []
        for j in range(V.shape[1]):
            v = [t[0] for t in self._split(V[:, j : j + 1]).values()]
            result: list[Tensor | None] = [None] * len(leaves)
            if used and self._ggn:
                jv = torch.autograd.grad(
                    [g for g, _ in used], graph["dummy"], [v[i] for _, i in used],
                    retain_graph=True,
                )[0]  # fmt: skip
                hjv = torch.autograd.grad(
                    graph["loss_grad"], graph["out_leaf"], jv, retain_graph=True
                )[0]
                result = list(
                    torch.autograd.grad(
                        graph["out"], leaves, hjv, retain_graph=True, allow_unused=True
                    )
                )
            elif used:
                result = list(
                    torch.autograd.grad(
                        [g for g, _ in used],
                        leaves,
                        [v[i] for _, i in used],
                        retain_graph=True,
                        allow_unused=True,
                    )
                )
            columns.append(
                torch.cat(
                    [
                        (torch.zeros(m, dtype=self.dtype, device=self.device) if r is None else r)
                        .detach()
                        .reshape(-1)
                        for r, m in zip(result, self._numels)
                    ]
                )
            )
        return torch.stack(columns, dim=1)

    # -- loss and gradient -------------------------------------------------------------------

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """The loss over all the data (batch-weighted, all-reduced) and its gradient.

        Returns:
            tuple[float, Tensor[n]]: the loss and its gradient flat over the trainable
            parameters; the model's ``.grad`` buffers are not touched.
        """
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        gradient = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        params = self._params()
        with _probing_mode(self.model, self.train_mode):
            for batch, weight in zip(self.batches, self._weights):
                args, targets = self._on_device(batch)
                output = self._output_fn(args)
                value = torch.func.grad_and_value(
                    lambda p, output=output, targets=targets: self.loss_fn(output(p), targets)
                )
                g, loss = value(params)
                total += weight * loss.detach()
                gradient += weight * torch.cat([g[n].reshape(-1) for n in self._names])
        reduced = self._all_reduce(torch.cat([total[None], gradient]))
        return float(reduced[0]), reduced[1:]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.shape[0]}, backend={self.backend!r}, "
            f"batches={len(self.batches)}, samples={self.num_samples}, "
            f"reduction={self.reduction!r}, dtype={self.dtype}, device={self.device})"
        )


class HessianOperator(_CurvatureOperator):
    r"""The Hessian :math:`H = \nabla^2_\theta L(\theta)` of a model's loss as a linear operator.

    ``H @ v`` (Tensor[n]) and ``H @ V`` (Tensor[n, k]) are exact Hessian-vector products
    (Pearlmutter 1994) at the model's current parameters, for vectors flat over its trainable
    parameters (``requires_grad``) in ``model.parameters()`` order. Over a list of batches or a
    DataLoader, :math:`L` is the loss of all the data at once: with ``reduction="mean"`` each
    batch's product is weighted by its share of the samples :math:`N_b / N`, with ``"sum"`` the
    products add, so uneven batches (200 + 56) give exactly the full-batch operator. The
    reduction is read from ``loss_fn.reduction`` (``nn`` losses); a plain function counts as a
    mean over the batch unless ``reduction`` says otherwise.

    Products run with dropout off and BatchNorm on its running statistics (``train_mode=True``:
    each batch's own statistics, running statistics untouched); the model's flags, buffers,
    ``.grad`` and the global RNG are as before after every product.

    Backends: ``"func"`` (torch.func forward-over-reverse, vmapped over the columns),
    ``"autograd"`` (double backward, column by column), ``"ext"`` (the R-operator engine of
    :mod:`torch_dlt.probes._hvp_ext`: all columns in one forward and one backward sweep, for
    sequential nets of Linear, Conv2d, activations, pooling, Flatten and eval-mode BatchNorm with
    cross-entropy or MSE) and ``"auto"`` (``"ext"`` when the model is supported and the compiled
    ops are built, else ``"func"``).

    With a ``process_group`` (``torch.distributed``), each rank holds its shard of the data;
    products, losses and gradients are all-reduced over the group (weights use the global number
    of samples), so every rank gets the operator of the union of the shards. ``None`` means no
    communication.

    Args:
        model (nn.Module): the model (a DistributedDataParallel wrapper is unwrapped).
        loss_fn (Callable[[Tensor, Tensor], Tensor]): ``loss_fn(model(inputs), targets)``, a
            scalar.
        data: one ``(inputs, targets)`` batch or an iterable of them (a DataLoader is read once).
        backend (str): ``"auto"``, ``"func"``, ``"autograd"`` or ``"ext"``.
        train_mode (bool): BatchNorm on batch statistics.
        reduction (str | None): ``"mean"`` or ``"sum"``; ``None`` reads ``loss_fn.reduction``.
        process_group: a ``torch.distributed`` group to all-reduce over, or ``None``.
        chunk_size (int | None): columns vmapped at once by ``"func"`` (``None``: all).

    Attributes:
        shape (tuple[int, int]): ``(n, n)``, n the number of trainable scalars.
        dtype (torch.dtype), device (torch.device): the model's.
        backend (str): the backend in use.
        num_matvecs (int): matrix-vector products computed so far.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]]); y = torch.zeros(2, 1)
        >>> H = HessianOperator(net, nn.MSELoss(), (x, y))
        >>> H @ torch.eye(2)  # 2 X^T X / 2
        tensor([[1., 0.],
                [0., 4.]])
    """


class GGNOperator(_CurvatureOperator):
    r"""The generalised Gauss-Newton matrix :math:`G = J^\top \nabla^2_f \ell\, J`.

    :math:`J` is the Jacobian of the model's output in its parameters and
    :math:`\nabla^2_f \ell` the Hessian of the loss in the output (Schraudolph 2002; Martens
    2020). For cross-entropy and MSE the latter is positive semi-definite, so :math:`G` is too;
    it is the Hessian without the term weighted by the residuals, equal to it where the model
    fits exactly. Same conventions, data weighting, modes and backends as
    :class:`HessianOperator`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
        >>> G = GGNOperator(net, nn.CrossEntropyLoss(), (x, y), backend="func")
        >>> V = torch.randn(G.shape[0], 5)
        >>> bool(torch.linalg.eigvalsh(V.T @ (G @ V)).min() > -1e-5)
        True
    """

    _ggn = True
    _owner = "GGNOperator"


# ---------------------------------------------------------------------------------------------
# eigenvalues


class EigenResult(tuple):
    """``(eigenvalues, eigenvectors)`` with the solver's convergence record as attributes.

    Unpacks as a pair. Attributes: ``eigenvalues`` (Tensor[k], float64, descending),
    ``eigenvectors`` (Tensor[n, k], the operator's dtype), ``residuals`` (Tensor[k], float64:
    relative residual norms :math:`\\lVert H u_i - \\lambda_i u_i\\rVert / |\\lambda_i|`),
    ``error_bounds`` (Tensor[k], float64: estimated relative eigenvalue errors),
    ``converged_mask`` (Tensor[k], bool), ``converged`` (bool: all of them),
    ``num_converged`` (int), ``num_matvecs`` (int), ``iterations`` (int), ``method`` (str).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    error_bounds: Tensor
    converged_mask: Tensor
    converged: bool
    num_converged: int
    num_matvecs: int
    iterations: int
    method: str

    def __new__(
        cls,
        eigenvalues: Tensor,
        eigenvectors: Tensor,
        *,
        residuals: Tensor,
        error_bounds: Tensor,
        converged: Tensor,
        num_matvecs: int,
        iterations: int,
        method: str,
    ) -> EigenResult:
        self = super().__new__(cls, (eigenvalues, eigenvectors))
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors
        self.residuals = residuals
        self.error_bounds = error_bounds
        self.converged_mask = converged
        self.num_converged = int(converged.sum())
        self.converged = self.num_converged == len(converged)
        self.num_matvecs = num_matvecs
        self.iterations = iterations
        self.method = method
        return self

    def __repr__(self) -> str:
        return (
            f"EigenResult(eigenvalues={self.eigenvalues.tolist()}, converged={self.converged} "
            f"({self.num_converged}/{len(self.residuals)}), num_matvecs={self.num_matvecs})"
        )


def _op_info(op: Any, owner: str) -> tuple[int, torch.dtype, torch.device]:
    shape = getattr(op, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1] or not hasattr(op, "__matmul__"):
        raise TypeError(
            f"{owner}: op must be a square linear operator with @, shape, dtype and device "
            f"(HessianOperator, GGNOperator or a symmetric Tensor[n, n]), got {type(op).__name__}"
        )
    return int(shape[0]), op.dtype, op.device


def _generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    if generator is not None:
        return generator
    fresh = torch.Generator(device=device if device.type == "cuda" else "cpu")
    fresh.seed()  # nondeterministic, and the global RNG is not drawn from
    return fresh


def _randn(n: int, k: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    return torch.randn(n, k, generator=gen, dtype=dtype, device=gen.device).to(device)


def _rademacher(n: int, k: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    bits = torch.randint(0, 2, (n, k), generator=gen, device=gen.device)
    return (bits * 2 - 1).to(device=device, dtype=dtype)


def _order(theta: Tensor, which: str) -> Tensor:
    """Indices of ``theta`` from most to least wanted."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _orthonormalise(
    W: Tensor, basis: Tensor, scale: float, gen: torch.Generator, out: Tensor | None = None
) -> tuple[Tensor, Tensor, bool]:
    """Gram-Schmidt of the rows of ``W`` (already orthogonal to the rows of ``basis``).

    Returns ``(Q, R, broke)`` with ``W = R^T Q``; ``W`` is used up (overwritten), ``Q`` is
    written into ``out`` when given. A row that vanishes (the Krylov space became
    invariant) is replaced by a random direction orthogonal to everything so far, with a zero
    on R's diagonal, so the relation still holds and the search goes on in the rest of the
    space, where further copies of a repeated eigenvalue live; ``broke`` says it (nearly) did.
    """
    b, n = W.shape
    Q = torch.empty_like(W) if out is None else out
    R = torch.zeros(b, b, dtype=torch.float64)
    eps = torch.finfo(W.dtype).eps
    tiny, small = 100 * eps * max(scale, 1e-300), math.sqrt(eps) * scale
    broke = False
    for j in range(b):
        w = W[j]
        for _ in range(2):
            if j:
                c = Q[:j] @ w
                w -= c @ Q[:j]
                R[:j, j] += c.double().cpu()
        norm = float(w.norm())
        broke |= norm <= small
        if norm > tiny:
            R[j, j] = norm
            torch.div(w, norm, out=Q[j])
            continue
        z = _randn(n, 1, W.dtype, W.device, gen)[:, 0]
        for _ in range(2):
            z -= (basis @ z) @ basis
            if j:
                z -= (Q[:j] @ z) @ Q[:j]
        Q[j] = z / z.norm()
    return Q, R, broke


def _error_bounds(theta: Tensor, res: Tensor) -> Tensor:
    """Estimated |theta_i - lambda_i|: min(r_i, r_i^2 / gap_i) (Parlett 1998, Sec. 11.7).

    The gap to the rest of the spectrum is estimated by the other Ritz values, each moved
    towards theta_i by its own residual norm.
    """
    distance = (theta[:, None] - theta[None, :]).abs() - res[None, :]
    distance.fill_diagonal_(math.inf)
    if len(theta) == 1:  # no other Ritz value: no estimate of the gap
        return res
    gap = distance.min(dim=1).values
    quadratic = torch.where(gap > 0, res.square() / gap.clamp_min(1e-300), res)
    return torch.minimum(res, quadratic)


def _lanczos(
    op: Any,
    k: int,
    which: str,
    max_iter: int,
    block_size: int,
    max_basis: int,
    gen: torch.Generator,
    start: Tensor | None,
    converged: Callable[..., Tensor],
    bar: Any,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int]:
    """Thick-restart block Lanczos with full re-orthogonalisation (Wu & Simon 2000).

    The basis is stored one vector per row, so every vector is contiguous.
    """
    n, dtype, device = _op_info(op, "top_eigenvalues")
    b = block_size
    basis = torch.empty(max_basis + b, n, dtype=dtype, device=device)
    T = torch.zeros(max_basis + b, max_basis + b, dtype=torch.float64)
    X = _randn(n, b, dtype, device, gen) if start is None else start.to(device, dtype)
    start_rows = X.T.clone(memory_format=torch.contiguous_format)  # never the caller's start
    _orthonormalise(start_rows, basis[:0], float(X.norm()), gen, out=basis[:b])
    s, lo, matvecs, it = 0, 0, 0, 0
    while True:
        it += 1
        W = (op @ basis[s : s + b].T).to(dtype).T.contiguous()
        if W.untyped_storage().data_ptr() == basis.untyped_storage().data_ptr():
            W = W.clone()  # an operator that hands back its input: W is worked on in place
        matvecs += b
        m = s + b
        Q = basis[:m]
        scale = float(W.norm())
        # The recurrence couples the new block only to the rows from lo (the previous block, or
        # the kept Ritz vectors after a restart); one classical Gram-Schmidt pass against the
        # whole basis then removes what rounding left, and a second one runs only when that
        # pass cancelled much (Daniel, Gragg, Kaufman & Stewart 1976).
        C = torch.zeros(m, b, dtype=dtype, device=device)
        C[lo:] = Q[lo:] @ W.T
        W -= C[lo:].T @ Q[lo:]
        for _ in range(2):
            before = float(W.norm())
            correction = Q @ W.T
            W -= correction.T @ Q
            C += correction
            if float(W.norm()) > 0.7071 * before:
                break
        C = C.double().cpu()
        T[:m, s:m] = C
        T[s:m, :m] = C.T
        T[s:m, s:m] = (C[s:m] + C[s:m].T) / 2
        theta, S = torch.linalg.eigh(T[:m, :m])
        exhausted, broke = m >= n, False
        if exhausted:
            res = torch.zeros(m, dtype=torch.float64)
        else:
            # The next block goes straight into the basis (moved down on a restart).
            _, B, broke = _orthonormalise(W, Q, scale, gen, out=basis[m : m + b])
            res = (B @ S[s:m, :]).norm(dim=0)
        order = _order(theta, which)[:k]
        bounds = _error_bounds(theta, res)
        ok = converged(theta[order], res[order], bounds[order], float(theta.abs().max()))
        if bar is not None:
            bar.update(b)
            bar.set_postfix(converged=f"{int(ok.sum())}/{k}")
        # After a breakdown the basis is an invariant subspace: its Ritz pairs are exact, but
        # copies of a repeated eigenvalue may lie outside it, so the search goes on.
        if (len(order) == k and bool(ok.all()) and not broke) or exhausted or it >= max_iter:
            break
        if m + b > max_basis:
            # Keep the most wanted Ritz vectors and the residual block: the projected matrix
            # becomes diag(theta_kept) bordered by B times the Ritz vectors' last rows.
            keep = _order(theta, which)[: max(k, min(m - b, (max_basis + k) // 2))]
            p = len(keep)
            Y = S[:, keep].T.to(dtype=dtype, device=device) @ Q
            nxt = basis[m : m + b].clone()
            basis[:p] = Y
            basis[p : p + b] = nxt
            coupling = B @ S[s:m, keep]
            T.zero_()
            T[:p, :p] = torch.diag(theta[keep])
            T[p : p + b, :p] = coupling
            T[:p, p : p + b] = coupling.T
            s, lo = p, 0
        else:
            s, lo = m, s
    m = S.shape[0]
    order = _order(theta, which)[:k]
    rows = S[:, order].T.to(dtype=dtype, device=device) @ basis[:m]
    return theta[order], rows, res[order], bounds[order], matvecs, it


def _spectral_bound(op: Any, gen: torch.Generator) -> float:
    """An upper bound of the spectral norm from a few Lanczos steps: max |theta| + residual."""
    steps = min(op.shape[0], 12)
    never = lambda theta, res, bounds, norm: torch.zeros_like(theta, dtype=torch.bool)  # noqa: E731
    theta, _, res, _, _, _ = _lanczos(op, 1, "LM", steps, 1, steps, gen, None, never, None)
    return float((theta.abs().max() + res.max()) * 1.01)


def _power(
    op: Any,
    k: int,
    which: str,
    max_iter: int,
    gen: torch.Generator,
    start: Tensor | None,
    converged: Callable[..., Tensor],
    bar: Any,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int]:
    """Subspace (block power) iteration with Rayleigh-Ritz, shifted for LA / SA."""
    n, dtype, device = _op_info(op, "top_eigenvalues")
    shift, sign, matvecs = 0.0, 1.0, 0
    if which != "LM":
        shift = _spectral_bound(op, gen)
        matvecs += min(n, 12)
        sign = 1.0 if which == "LA" else -1.0
    X = _randn(n, k, dtype, device, gen) if start is None else start.to(device, dtype)
    X = torch.linalg.qr(X).Q
    it = 0
    while it < max_iter:
        it += 1
        HX = (op @ X).to(dtype)
        matvecs += k
        W = sign * HX + shift * X  # shifted so that the wanted end is dominant
        C = (X.T @ W).double().cpu()
        mu, S = torch.linalg.eigh((C + C.T) / 2)
        S_d = S.to(dtype=dtype, device=device)
        X, HX, W = X @ S_d, HX @ S_d, W @ S_d
        theta = sign * (mu - shift)
        res = (HX - X * theta.to(dtype=dtype, device=device)).norm(dim=0).double().cpu()
        # The block sees no eigenvalue beyond its own: no gap, so the residual is the bound.
        ok = converged(theta, res, res, max(shift, float(theta.abs().max())))
        if bar is not None:
            bar.update(k)
            bar.set_postfix(converged=f"{int(ok.sum())}/{k}")
        if bool(ok.all()):
            break
        X = torch.linalg.qr(W).Q
    order = _order(theta, which)
    return theta[order], X.T[order], res[order], res[order], matvecs, it


def top_eigenvalues(
    op: Any,
    k: int = 1,
    *,
    tol: float = 1e-4,
    which: str = "LA",
    method: str = "lanczos",
    criterion: str = "eigenvalue",
    max_iter: int | None = None,
    block_size: int = 1,
    max_basis: int | None = None,
    start: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> EigenResult:
    r"""The ``k`` extreme eigenpairs of a symmetric operator (Hessian, GGN, dense matrix).

    ``method="lanczos"``: block Lanczos (block size 1 is the classical Lanczos, 1950) with full
    re-orthogonalisation of every new block against the whole basis, and thick restart (Wu &
    Simon 2000) when the basis reaches ``max_basis`` vectors: the most wanted Ritz vectors and
    the residual block are kept. ``method="power"``: block power (subspace) iteration with
    Rayleigh-Ritz, on :math:`H + sI` (``"LA"``) or :math:`sI - H` (``"SA"``) with :math:`s` a
    bound of the spectral norm.

    Convergence is read from each Ritz pair's residual norm :math:`r = \lVert H u - \theta u
    \rVert` (exact in the Lanczos relation, no extra product). ``criterion="eigenvalue"``
    (default) stops when the eigenvalue error bound :math:`\min(r, r^2/\mathrm{gap})`
    (Parlett 1998, Sec. 11.7; the gap to the other Ritz values) is at most ``tol``
    :math:`|\theta|` for every wanted pair, i.e. ``tol`` is the relative accuracy of the
    eigenvalues; ``criterion="residual"`` asks :math:`r \le` ``tol`` :math:`|\theta|`, which
    also makes the vectors accurate (and costs more products). Relative means relative to
    :math:`\max(|\theta|, \sqrt{\epsilon}\lVert H\rVert)`. If ``max_iter`` ends the run first, a
    :class:`CurvatureConvergenceWarning` says how many converged and ``.converged`` is False.

    Args:
        op: a symmetric operator with ``@`` on Tensor[n, b], ``shape``, ``dtype``, ``device``.
        k (int): number of eigenpairs.
        tol (float): relative tolerance (see ``criterion``).
        which (str): ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
            magnitude.
        method (str): ``"lanczos"`` or ``"power"``.
        criterion (str): ``"eigenvalue"`` or ``"residual"``.
        max_iter (int | None): most iterations (blocks of products); ``None``: 20 n products
            at most, capped at 100 k + 300 iterations.
        block_size (int): Lanczos block size b (b products per iteration, one ``op @ V`` call,
            which the ``"ext"`` and ``"func"`` backends compute in one sweep).
        max_basis (int | None): Lanczos basis size before a restart (``None``: ``max(4k, 60)``
            rounded up to a multiple of b, at most n).
        start (Tensor[n, b] | None): starting block (Lanczos) or Tensor[n, k] (power).
        generator (torch.Generator | None): source of random starts; ``None`` uses a fresh one
            (the global RNG is not touched).
        progress (bool): show a tqdm bar of the products.

    Returns:
        EigenResult: unpacks as ``(eigenvalues Tensor[k] float64 descending, eigenvectors
        Tensor[n, k])``; ``.residuals``, ``.error_bounds``, ``.converged``, ``.num_matvecs``
        say how it went.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> values, vectors = top_eigenvalues(A, 3, tol=1e-8,
        ...                                   generator=torch.Generator().manual_seed(0))
        >>> [round(v, 6) for v in values.tolist()]
        [100.0, 99.0, 98.0]
        >>> low = top_eigenvalues(A, 2, which="SA", generator=torch.Generator().manual_seed(0))
        >>> [round(v, 3) for v in low.eigenvalues.tolist()], low.converged
        ([2.0, 1.0], True)
    """
    owner = "top_eigenvalues"
    n, dtype, device = _op_info(op, owner)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"{owner}: k must be an int in [1, {n}], got {k!r}")
    if which not in _WHICH:
        raise ValueError(f"{owner}: which must be one of {_WHICH}, got {which!r}")
    if method not in ("lanczos", "power"):
        raise ValueError(f"{owner}: method must be 'lanczos' or 'power', got {method!r}")
    if criterion not in ("eigenvalue", "residual"):
        raise ValueError(
            f"{owner}: criterion must be 'eigenvalue' or 'residual', got {criterion!r}"
        )
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"{owner}: tol must be a positive number, got {tol!r}")
    if not isinstance(block_size, int) or not 1 <= block_size <= n:
        raise ValueError(f"{owner}: block_size must be an int in [1, {n}], got {block_size!r}")
    b = block_size if method == "lanczos" else k
    if max_basis is None:
        max_basis = min(n, -(-max(4 * k, 60) // b) * b)
    if not isinstance(max_basis, int) or max_basis > n or max_basis < min(n, k + 2 * b):
        raise ValueError(
            f"{owner}: max_basis must be an int in [min(n, k + 2 block_size), n] = "
            f"[{min(n, k + 2 * b)}, {n}], got {max_basis!r}"
        )
    if max_iter is None:
        max_iter = min(-(-20 * n // b), 100 * k + 300)
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{owner}: max_iter must be an int >= 1, got {max_iter!r}")
    if start is not None and (start.dim() != 2 or tuple(start.shape) != (n, b)):
        raise ValueError(f"{owner}: start must be Tensor[{n}, {b}], got {tuple(start.shape)}")
    floor = math.sqrt(torch.finfo(dtype).eps)

    def scale(theta: Tensor, norm: float) -> Tensor:
        return theta.abs().clamp_min(floor * norm + 1e-300)

    def converged(theta: Tensor, res: Tensor, bounds: Tensor, norm: float) -> Tensor:
        return (bounds if criterion == "eigenvalue" else res) <= tol * scale(theta, norm)

    gen = _generator(generator, device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"{method} ({which}, k={k})", unit="matvec")
    try:
        if method == "lanczos":
            theta, rows, res, bounds, matvecs, it = _lanczos(
                op, k, which, max_iter, b, max_basis, gen, start, converged, bar
            )
        else:
            theta, rows, res, bounds, matvecs, it = _power(
                op, k, which, max_iter, gen, start, converged, bar
            )
    finally:
        if bar is not None:
            bar.close()
    order = torch.argsort(theta, descending=True)
    theta, res, bounds = theta[order], res[order], bounds[order]
    norm = float(theta.abs().max())
    result = EigenResult(
        theta,
        rows[order].T,  # each eigenvector contiguous
        residuals=res / scale(theta, norm),
        error_bounds=bounds / scale(theta, norm),
        converged=converged(theta, res, bounds, norm),
        num_matvecs=matvecs,
        iterations=it,
        method=method,
    )
    if not result.converged:
        warnings.warn(
            f"{owner}: {result.num_converged} of {k} eigenpairs reached tol={tol:g} "
            f"({criterion}) after {matvecs} products ({it} iterations); raise max_iter or tol",
            CurvatureConvergenceWarning,
            stacklevel=2,
        )
    return result


# ---------------------------------------------------------------------------------------------
# trace


class TraceEstimate(NamedTuple):
    """A randomised trace estimate.

    Attributes:
        estimate (float): the estimate of :math:`\\mathrm{tr}(H)`.
        std_error (float): its standard error, from the spread of the random quadratic forms
            (0 when the low-rank part of Hutch++ captured everything).
        num_matvecs (int): products used.
        method (str): ``"hutch++"`` or ``"hutchinson"``.
    """

    estimate: float
    std_error: float
    num_matvecs: int
    method: str


def _quadratic_forms(op: Any, Z: Tensor, block: int) -> Tensor:
    """z_i^T H z_i for the columns of Z, ``block`` products per call."""
    out = []
    for i in range(0, Z.shape[1], block):
        Zi = Z[:, i : i + block]
        out.append(((op @ Zi) * Zi).sum(0).double().cpu())
    return torch.cat(out)


def trace(
    op: Any,
    *,
    method: str = "hutch++",
    num_matvecs: int = 99,
    block: int = 32,
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    r"""Randomised estimate of :math:`\mathrm{tr}(H)` from ``num_matvecs`` products.

    Hutchinson (1989): :math:`\frac1m\sum_i z_i^\top H z_i` with Rademacher :math:`z_i`, unbiased
    with variance :math:`2(\lVert H\rVert_F^2 - \sum_i H_{ii}^2)/m`. Hutch++ (Meyer, Musco,
    Musco & Woodruff 2021, Algorithm 1): a third of the products sketch the top of the spectrum
    (:math:`Q = \mathrm{orth}(HS)`), a third take its trace exactly
    (:math:`\mathrm{tr}(Q^\top H Q)`), the rest run Hutchinson on the deflated
    :math:`(I - QQ^\top) H (I - QQ^\top)`; also unbiased, with error :math:`O(1/m)` instead of
    :math:`O(1/\sqrt m)` when the spectrum decays, as Hessians' do.

    Args:
        op: a symmetric operator (``@``, ``shape``, ``dtype``, ``device``).
        method (str): ``"hutch++"`` or ``"hutchinson"``.
        num_matvecs (int): products to spend (at least 3 for Hutch++).
        block (int): products per ``op @ V`` call.
        generator (torch.Generator | None): source of the probes (``None``: a fresh one).

    Returns:
        TraceEstimate: ``(estimate, std_error, num_matvecs, method)``.

    Example:
        >>> A = torch.diag(torch.linspace(0.0, 1.0, 200, dtype=torch.float64) ** 8)
        >>> est = trace(A, num_matvecs=60, generator=torch.Generator().manual_seed(0))
        >>> abs(est.estimate - float(A.trace())) < 0.05 * float(A.trace())
        True
    """
    owner = "trace"
    n, dtype, device = _op_info(op, owner)
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"{owner}: method must be 'hutch++' or 'hutchinson', got {method!r}")
    least = 3 if method == "hutch++" else 1
    if not isinstance(num_matvecs, int) or num_matvecs < least:
        raise ValueError(f"{owner}: num_matvecs must be an int >= {least}, got {num_matvecs!r}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"{owner}: block must be an int >= 1, got {block!r}")
    gen = _generator(generator, device)
    if method == "hutchinson":
        forms = _quadratic_forms(op, _rademacher(n, num_matvecs, dtype, device, gen), block)
        spread = float(forms.std()) / math.sqrt(num_matvecs) if num_matvecs > 1 else math.inf
        return TraceEstimate(float(forms.mean()), spread, num_matvecs, method)
    sketch = min(num_matvecs // 3, n)
    rest = num_matvecs - 2 * sketch
    S = _rademacher(n, sketch, dtype, device, gen)
    HS = torch.cat([op @ S[:, i : i + block] for i in range(0, sketch, block)], dim=1)
    Q = torch.linalg.qr(HS).Q
    low_rank = float(_quadratic_forms(op, Q, block).sum())
    G = _rademacher(n, rest, dtype, device, gen)
    G = G - Q @ (Q.T @ G)
    forms = _quadratic_forms(op, G, block) if rest else torch.zeros(0, dtype=torch.float64)
    estimate = low_rank + (float(forms.mean()) if rest else 0.0)
    spread = float(forms.std()) / math.sqrt(rest) if rest > 1 else 0.0
    return TraceEstimate(estimate, spread, 2 * sketch + rest, method)


# ---------------------------------------------------------------------------------------------
# spectral density


@dataclass(frozen=True)
class SpectralDensity:
    r"""A spectral density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017).

    For each probe :math:`v` the density :math:`\frac1n\sum_i \delta(\lambda - \lambda_i)` is
    replaced by the Gauss quadrature rule of :math:`v^\top \delta(\lambda - H) v / \lVert
    v\rVert^2`: the nodes are the eigenvalues :math:`\theta_j` of the Lanczos tridiagonal matrix,
    the weights the squared first entries of its eigenvectors. Moments up to :math:`2m - 1` of
    each rule are exact (m Lanczos steps), and their average over probes is unbiased for
    :math:`\mathrm{tr}(H^j)/n`.

    Attributes:
        nodes (Tensor[p, m], float64): quadrature nodes per probe.
        weights (Tensor[p, m], float64): their weights (each row sums to 1).
        n (int): dimension of the operator.
        num_matvecs (int): products used.
    """

    nodes: Tensor
    weights: Tensor
    n: int
    num_matvecs: int

    def moment(self, j: int) -> float:
        r"""The estimate of :math:`\mathrm{tr}(H^j)/n`."""
        return float((self.weights * self.nodes**j).sum(1).mean())

    def negative_fraction(self, threshold: float = 0.0) -> float:
        """Mass of the density below ``-threshold`` (see :func:`hessian_index`)."""
        return float((self.weights * (self.nodes < -threshold)).sum(1).mean())

    def smoothed(
        self, grid: Tensor | None = None, *, sigma: float | None = None, num_points: int = 1000
    ) -> tuple[Tensor, Tensor]:
        """The density broadened by a Gaussian of width ``sigma`` on ``grid``.

        Args:
            grid (Tensor[g] | None): where to evaluate; ``None``: ``num_points`` points over the
                nodes' range padded by 5 sigma.
            sigma (float | None): kernel width; ``None``: 1% of the nodes' range.
            num_points (int): grid size when ``grid`` is ``None``.

        Returns:
            tuple[Tensor[g], Tensor[g]]: the grid and the density on it (float64); it integrates
            to 1 when the grid covers the nodes.
        """
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        if sigma is None:
            sigma = max(hi - lo, abs(hi), abs(lo), 1e-12) / 100
        if not sigma > 0:
            raise ValueError(f"SpectralDensity.smoothed: sigma must be positive, got {sigma!r}")
        if grid is None:
            grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=torch.float64)
        grid = grid.to(torch.float64)
        nodes, weights = self.nodes.reshape(-1), self.weights.reshape(-1) / self.nodes.shape[0]
        kernel = torch.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2)
        return grid, kernel @ weights / (sigma * math.sqrt(2 * math.pi))


def spectral_density(
    op: Any,
    *,
    num_probes: int = 8,
    lanczos_steps: int = 80,
    probes: Tensor | None = None,
    memory_limit: int = 2**27,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> SpectralDensity:
    """The spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Runs ``lanczos_steps`` Lanczos steps with full re-orthogonalisation from each of
    ``num_probes`` Rademacher probes (Ubaru, Chen & Saad 2017; as Ghorbani, Krishnan & Xiao 2019
    do for Hessians). Probes advance together, one ``op @ V`` call per step for as many probes
    as fit their bases in ``memory_limit`` scalars, so block-friendly backends do one sweep for
    all of them.

    Args:
        op: a symmetric operator (``@``, ``shape``, ``dtype``, ``device``).
        num_probes (int): number of random probes p.
        lanczos_steps (int): Lanczos steps m per probe (at most n); the rule is exact for
            moments up to 2m - 1.
        probes (Tensor[n, p] | None): start vectors instead of random ones (normalised here).
        memory_limit (int): most basis scalars held at once.
        generator (torch.Generator | None): source of the probes (``None``: a fresh one).
        progress (bool): show a tqdm bar of the products.

    Returns:
        SpectralDensity: nodes and weights per probe, with ``smoothed``, ``moment`` and
        ``negative_fraction``.

    Example:
        >>> A = torch.diag(torch.tensor([-1.0, 0.5, 2.0, 2.0], dtype=torch.float64))
        >>> d = spectral_density(A, num_probes=2, lanczos_steps=4,
        ...                      generator=torch.Generator().manual_seed(0))
        >>> round(d.moment(1), 6), round(d.moment(2), 6)  # tr(A)/4, tr(A^2)/4 for +-1 probes
        (0.875, 2.3125)
    """
    owner = "spectral_density"
    n, dtype, device = _op_info(op, owner)
    if probes is not None:
        if probes.dim() != 2 or probes.shape[0] != n:
            raise ValueError(f"{owner}: probes must be Tensor[{n}, p], got {tuple(probes.shape)}")
        num_probes = probes.shape[1]
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"{owner}: num_probes must be an int >= 1, got {num_probes!r}")
    if not isinstance(lanczos_steps, int) or not 1 <= lanczos_steps <= n:
        raise ValueError(
            f"{owner}: lanczos_steps must be an int in [1, {n}], got {lanczos_steps!r}"
        )
    gen = _generator(generator, device)
    if probes is None:
        probes = _rademacher(n, num_probes, dtype, device, gen)
    probes = probes.to(device=device, dtype=dtype)
    group = max(1, min(num_probes, memory_limit // (n * (lanczos_steps + 1))))
    nodes, weights = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_probes * lanczos_steps, desc="SLQ", unit="matvec")
    matvecs = 0
    try:
        for first in range(0, num_probes, group):
            V = probes[:, first : first + group]
            a, bt, used = _lanczos_tridiagonal(op, V, lanczos_steps, bar)
            matvecs += used
            for i in range(V.shape[1]):
                length = int((bt[:, i] > 0).sum()) + 1
                T = torch.diag(a[:length, i])
                off = bt[: length - 1, i]
                T += torch.diag(off, 1) + torch.diag(off, -1)
                theta, S = torch.linalg.eigh(T)
                node = torch.full((lanczos_steps,), float(theta[-1]), dtype=torch.float64)
                weight = torch.zeros(lanczos_steps, dtype=torch.float64)
                node[:length], weight[:length] = theta, S[0] ** 2
                nodes.append(node)
                weights.append(weight)
    finally:
        if bar is not None:
            bar.close()
    return SpectralDensity(torch.stack(nodes), torch.stack(weights), n, matvecs)


def _lanczos_tridiagonal(op: Any, V: Tensor, steps: int, bar: Any) -> tuple[Tensor, Tensor, int]:
    """Independent Lanczos recurrences from each column of V, advanced together.

    Returns alpha (Tensor[steps, p]), beta (Tensor[steps - 1, p], 0 after a probe's Krylov space
    became invariant) and the number of products.
    """
    n, p = V.shape
    Q = torch.zeros(steps, n, p, dtype=V.dtype, device=V.device)
    q = V / V.norm(dim=0, keepdim=True)
    alpha = torch.zeros(steps, p, dtype=torch.float64)
    beta = torch.zeros(max(steps - 1, 0), p, dtype=torch.float64)
    active = torch.ones(p, dtype=torch.bool)
    matvecs = 0
    for j in range(steps):
        Q[j] = q
        live = active.nonzero().flatten().tolist()
        w = torch.zeros_like(q)
        w[:, live] = (op @ q[:, live]).to(V.dtype)
        matvecs += len(live)
        alpha[j] = (q * w).sum(0).double().cpu()
        for _ in range(2):  # full re-orthogonalisation against each probe's own basis
            coeff = torch.einsum("jnp,np->jp", Q[: j + 1], w)
            w -= torch.einsum("jnp,jp->np", Q[: j + 1], coeff)
        if bar is not None:
            bar.update(len(live))
        if j == steps - 1:
            break
        norms = w.norm(dim=0)
        scale = torch.tensor([float(alpha[: j + 1, i].abs().max()) for i in range(p)])
        tiny = (norms.double().cpu() <= 100 * torch.finfo(V.dtype).eps * (scale + 1e-300)) & active
        active &= ~tiny
        beta[j] = torch.where(active, norms.double().cpu(), torch.zeros_like(beta[j]))
        keep = active.to(device=V.device, dtype=V.dtype)
        q = w / torch.where(norms > 0, norms, torch.ones_like(norms)) * keep
    return alpha, beta, matvecs


def hessian_index(
    density: SpectralDensity, *, threshold: float | None = None, sigma: float = 0.0
) -> float:
    r"""The index :math:`\alpha`: the fraction of negative eigenvalues (Pennington & Bahri 2017).

    Read from an SLQ density as its mass below ``-threshold``. A Lanczos node averages the
    eigenvalues near it, so the sign of a bulk sitting at 0 cannot be read from it: by default
    eigenvalues within ``threshold = 1e-3`` of the spectral radius (the largest node in
    magnitude) from 0 count as zero. With ``sigma = 0`` (default) the mass is the quadrature
    weight of the nodes below ``-threshold``; with ``sigma > 0`` that of the density smoothed by
    a Gaussian of width ``sigma``, :math:`\sum_j w_j \Phi((-t - \theta_j)/\sigma)`.
    Pennington & Bahri predict :math:`\alpha \approx \alpha_0 |\epsilon - \epsilon_c|^{3/2}`
    near the critical loss :math:`\epsilon_c`, vanishing below it.

    Example:
        >>> A = torch.diag(torch.tensor([-3.0, -1.0, 1.0, 2.0, 4.0], dtype=torch.float64))
        >>> d = spectral_density(A, num_probes=4, lanczos_steps=5,
        ...                      generator=torch.Generator().manual_seed(0))
        >>> round(hessian_index(d), 6)  # 2 of 5 (5 steps resolve all 5 eigenvalues)
        0.4
    """
    if not isinstance(density, SpectralDensity):
        raise TypeError(
            f"hessian_index: density must be a SpectralDensity, got {type(density).__name__}"
        )
    if threshold is None:
        threshold = 1e-3 * float(density.nodes.abs().max())
    if sigma == 0:
        return density.negative_fraction(threshold)
    if not sigma > 0:
        raise ValueError(f"hessian_index: sigma must be >= 0, got {sigma!r}")
    below = torch.special.ndtr((-threshold - density.nodes) / sigma)
    return float((density.weights * below).sum(1).mean())


def plot_spectral_density(
    density: SpectralDensity,
    *,
    ax: Any = None,
    sigma: float | None = None,
    log: bool = True,
    label: str | None = None,
) -> Any:
    """Plot the smoothed density (log scale by default, where the outliers show).

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> d = spectral_density(torch.diag(torch.arange(5.0)), num_probes=2, lanczos_steps=5,
        ...                      generator=torch.Generator().manual_seed(0))
        >>> ax = plot_spectral_density(d)
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    grid, values = density.smoothed(sigma=sigma)
    ax.plot(grid.numpy(), values.clamp_min(1e-12).numpy() if log else values.numpy(), label=label)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(1e-8, float(values.max()) * 1e-8))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    return ax
