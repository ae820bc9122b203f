"""Upper and empirical lower bounds on a model's Lipschitz constant, so users see the interval
(Szegedy et al. 2014; Virmaux & Scaman 2018; Gopalakrishnan et al. 2018).

The upper bound is the product of the layers' Lipschitz constants along a chain of layers, with
consecutive linear maps merged first and each linear map's exact operator norm (a dense
eigen-decomposition when small, otherwise power iteration through autograd with a stated
failure probability). The lower bound is the largest local Jacobian norm found by gradient
ascent over the inputs.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from torch_dlt.probes._state import forked_rng, restored_mode

__all__ = [
    "LipschitzFactor",
    "LipschitzInterval",
    "lipschitz_factors",
    "lipschitz_interval",
    "lipschitz_lower_bound",
    "lipschitz_upper_bound",
]

# Maps that are linear (affine) in eval mode; consecutive ones are merged into one operator.
_LINEAR_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


_SMOOTH_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu-tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "silu": nn.functional.silu,
}


@functools.cache
def _numeric_constant(name: str) -> float:
    """sup |f'| of a smooth activation whose |f''| <= 2 and whose f' tends outside [-20, 20] to
    a limit below its maximum there: the grid maximum plus (spacing / 2) * sup |f''|."""
    fn = _SMOOTH_ACTIVATIONS[name]
    spacing = 1e-4
    x = torch.arange(-20.0, 20.0 + spacing, spacing, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(fn(x).sum(), x)
    return float(slope.abs().max()) + spacing


def _activation_constant(module: nn.Module) -> float | None:
    """The Lipschitz constant sup |phi'| of an element-wise activation (any l_p norm), or None."""
    if isinstance(
        module,
        (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
         nn.LogSigmoid, nn.CELU),
    ):  # fmt: skip
        return 1.0
    if isinstance(module, nn.Sigmoid):
        return 0.25
    if isinstance(module, nn.Hardsigmoid):
        return 1.0 / 6.0 * (1.0 + 1e-6)  # PyTorch's kernel uses 1/6 rounded up to float32
    if isinstance(module, nn.Hardswish):
        return 1.5  # (2x + 3) / 6 at x = 3
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope))
    if isinstance(module, nn.PReLU):
        return max(1.0, float(module.weight.detach().abs().max()))
    if isinstance(module, nn.ELU):
        return max(1.0, module.alpha)
    if isinstance(module, nn.SELU):
        return 1.0507009873554805 * 1.6732632423543772  # scale * alpha (Klambauer et al. 2017)
    if isinstance(module, nn.GELU):
        if module.approximate == "none":
            # (x Phi(x))' = Phi(x) + x phi(x) peaks at x = sqrt(2): Phi(sqrt 2) + exp(-1)/sqrt(pi)
            return 0.5 * (1.0 + math.erf(1.0)) + math.exp(-1.0) / math.sqrt(math.pi)
        return _numeric_constant("gelu-tanh")
    if isinstance(module, nn.SiLU):
        return _numeric_constant("silu")
    if isinstance(module, nn.Softmax):
        # The Jacobian diag(p) - p p^T: v^T J v is the variance of v under p, at most
        # (max v - min v)^2 / 4 <= |v|^2 / 2; its absolute row sums are 2 p_i (1 - p_i) <= 1/2.
        return 0.5
    return None


def _max_pool_overlap(module: nn.Module, dims: int) -> int:
    """Most windows one input can fall in: per dimension at most the kernel size and at most the
    number of window starts within the span (k - 1) d + 1 of a dilated window."""

    def per_dim(value: object) -> tuple[int, ...]:
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims

    stride = module.stride if module.stride is not None else module.kernel_size
    overlap = 1
    for k, s, d in zip(per_dim(module.kernel_size), per_dim(stride), per_dim(module.dilation)):
        overlap *= min(k, math.ceil(((k - 1) * d + 1) / s))
    return overlap


@dataclass(frozen=True)
class LipschitzFactor:
    """One factor of the product bound: a merged run of linear layers or a non-linear layer.

    Attributes:
        layers (tuple[str, ...]): the module names it covers (in call order).
        kind (str): ``"linear"``, ``"activation"``, ``"max-pool"`` or ``"softmax"``.
        bound (float): its Lipschitz constant (an upper bound on it).
        method (str): how ``bound`` was obtained.
        in_features (int): input size per sample.
        out_features (int): output size per sample.
    """

    layers: tuple[str, ...]
    kind: str
    bound: float
    method: str
    in_features: int
    out_features: int


class LipschitzInterval(NamedTuple):
    """``lower <= Lip(model) <= upper`` in the chosen norm, and the upper bound's factors."""

    lower: float
    upper: float
    factors: list[LipschitzFactor]


@dataclass
class _Call:
    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    device: torch.device


def _check_norm(norm: object, caller: str) -> float:
    if norm in (2, 2.0):
        return 2.0
    if norm in (math.inf, "inf"):
        return math.inf
    raise ValueError(f"{caller}: norm must be 2 or math.inf (or 'inf'), got {norm!r}")


def _atomic(module: nn.Module) -> bool:
    from torch_dlt.prune.frontend import SparsifyingFrontEnd

    return (
        isinstance(module, _LINEAR_TYPES + _MAX_POOLS + (SparsifyingFrontEnd,))
        or _activation_constant(module) is not None
    )


def _float64_copy(model: nn.Module) -> nn.Module:
    """A float64 eval-mode copy. Tensors a forward pass leaves on modules as plain attributes
    (the masked ``weight`` of ``torch.nn.utils.prune``, weight norm) are not graph leaves and
    cannot be deep-copied; they are recomputed in the next forward, so detached copies serve."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo).double().eval()


# What a forward pass may do between layers without changing any value.
_VALUE_PRESERVING = {
    "view", "reshape", "flatten", "unflatten", "contiguous", "size", "dim", "numel", "__get__",
    "to", "double", "float", "type", "detach", "clone",
}  # fmt: skip


class _OpsBetweenLayers(TorchFunctionMode):
    """Records the torch functions a forward pass calls outside every known layer, where a
    functional ReLU or a residual addition would hide from the module hooks."""

    def __init__(self, inside: list[int]) -> None:
        super().__init__()
        self.inside = inside
        self.ops: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", repr(func))
        if self.inside[0] == 0 and name not in _VALUE_PRESERVING:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _layer_chain(model: nn.Module, input_shape: tuple[int, ...], caller: str) -> list[_Call]:
    """Run a float64 eval copy of ``model`` once and read it as a chain of layers, checking that
    each layer's input is the previous layer's output (up to a reshape)."""
    work = _float64_copy(model)
    calls: list[tuple[str, nn.Module, Tensor, Tensor]] = []
    unsupported: list[tuple[str, nn.Module]] = []
    handles = []

    inside = [0]  # how many known layers' forward passes are running

    def enter(mod, args):
        inside[0] += 1

    def visit(prefix: str, module: nn.Module) -> None:
        if _atomic(module):

            def record(mod, args, output, name=prefix):
                inside[0] -= 1
                if len(args) != 1 or not isinstance(args[0], Tensor):
                    unsupported.append((name, mod))
                else:
                    calls.append((name, mod, args[0], output))

            handles.append(module.register_forward_pre_hook(enter, prepend=True))
            handles.append(module.register_forward_hook(record))
            return
        children = list(module.named_children())
        if not children:
            handles.append(
                module.register_forward_hook(
                    lambda mod, args, output, name=prefix: unsupported.append((name, mod))
                )
            )
        for child_name, child in children:
            visit(f"{prefix}.{child_name}" if prefix else child_name, child)

    visit("", work)
    for name, module in work.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is None:
            raise ValueError(
                f"{caller}: BatchNorm layer {name!r} has no running statistics "
                "(track_running_stats=False), so in eval mode it is not a fixed affine map"
            )
    param = next(work.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator(device).manual_seed(0)
    # Several samples, so that a functional op hidden between two layers (a ReLU, say) changes
    # some value and the chain check below sees it.
    x = torch.randn((8, *input_shape[1:]), generator=generator, dtype=torch.float64, device=device)
    between = _OpsBetweenLayers(inside)
    try:
        with torch.no_grad(), between:
            output = work(x)
    except Exception as exc:
        raise ValueError(
            f"{caller}: the model fails on an input of shape {tuple(input_shape)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    if unsupported:
        name, module = unsupported[0]
        raise TypeError(
            f"{caller}: unsupported layer {name or '<root>'!r} ({type(module).__name__}); "
            "supported: Linear, Conv1d/2d/3d, BatchNorm (eval), average and max pooling, "
            "Flatten, Dropout, Identity, Softmax and element-wise activations (ReLU, LeakyReLU, "
            "PReLU, ELU, SELU, CELU, GELU, SiLU, Tanh, Sigmoid, Softplus, hard variants)"
        )
    if between.ops:
        raise ValueError(
            f"{caller}: the model is not a chain of layers: it applies {between.ops[0]!r} "
            "outside any layer the bound knows (a functional operation or a skip connection); "
            "write the model as a sequence of modules"
        )
    if not calls:
        raise ValueError(f"{caller}: the model ran no layer; nothing to bound")
    if not isinstance(output, Tensor):
        raise TypeError(f"{caller}: the model must return one Tensor, got {type(output).__name__}")

    chain = []
    previous_name, previous = "the model input", x
    for name, module, inp, out in calls:
        if inp.numel() != previous.numel() or not torch.equal(inp.flatten(), previous.flatten()):
            raise ValueError(
                f"{caller}: the model is not a chain of layers: the input of {name!r} "
                f"({type(module).__name__}) is not {previous_name} (a skip connection, "
                "a functional operation or a layer the bound does not know sits between "
                "them); write the model as a sequence of modules"
            )
        chain.append(_Call(name, module, tuple(inp.shape[1:]), tuple(out.shape[1:]), inp.device))
        previous_name, previous = f"the output of {name!r}", out
    if output.numel() != previous.numel() or not torch.equal(output.flatten(), previous.flatten()):
        raise ValueError(
            f"{caller}: the model is not a chain of layers: its output is not {previous_name} "
            "(a skip connection or a functional operation follows it); write the model as a "
            "sequence of modules"
        )
    return chain


def _front_end_call(call: _Call, caller: str) -> bool:
    from torch_dlt.prune.frontend import SparsifyingFrontEnd

    if not isinstance(call.module, SparsifyingFrontEnd):
        return False
    if call.module.k < math.prod(call.module.size):
        raise ValueError(
            f"{caller}: layer {call.name!r} (SparsifyingFrontEnd, k={call.module.k}) keeps the "
            "k largest coefficients, a discontinuous map (where two coefficients tie the kept "
            "support and the output jump), so it has no finite Lipschitz constant. Bound the "
            "model behind it: for perturbations that keep the support it is an orthogonal "
            "projection (l2 norm 1), Gopalakrishnan et al.'s locally linear setting"
        )
    return True


class _LinearSegment:
    """A run of linear layers as the operator v -> A v (bias removed) and its adjoint."""

    def __init__(self, calls: Sequence[_Call]) -> None:
        self.calls = list(calls)
        self.in_shape = calls[0].in_shape
        self.out_shape = calls[-1].out_shape
        self.n_in = math.prod(self.in_shape)
        self.n_out = math.prod(self.out_shape)
        self._graph: tuple[Tensor, Tensor] | None = None
        self.device = calls[0].device
        with torch.no_grad():
            self.offset = self._affine(torch.zeros(1, self.n_in, dtype=torch.float64,
                                                   device=self.device))  # fmt: skip

    def _affine(self, v: Tensor, calls: Sequence[_Call] | None = None) -> Tensor:
        for call in calls or self.calls:
            v = call.module(v.reshape(v.shape[0], *call.in_shape))
        return v.reshape(v.shape[0], -1)

    def apply(self, v: Tensor) -> Tensor:
        """A v for v of shape [b, n_in]."""
        return self._affine(v) - self.offset

    def adjoint(self, u: Tensor) -> Tensor:
        """A^T u for u of shape [b, n_out]: A is linear, so one recorded graph serves every u."""
        b = u.shape[0]
        if self._graph is None or self._graph[0].shape[0] != b:
            with torch.enable_grad():
                v = torch.zeros(b, self.n_in, dtype=torch.float64, device=self.device)
                v.requires_grad_(True)
                self._graph = (v, self.apply(v))
        v, out = self._graph
        (g,) = torch.autograd.grad(out, v, u, retain_graph=True)
        return g

    def dense(self, chunk: int = 512) -> Tensor:
        """The matrix A, [n_out, n_in], from the smaller of A applied to the basis vectors
        (columns) and A^T applied to them (rows)."""
        if self.n_in <= self.n_out:
            eye = torch.eye(self.n_in, dtype=torch.float64, device=self.device)
            with torch.no_grad():
                cols = torch.cat(
                    [self.apply(eye[i : i + chunk]) for i in range(0, self.n_in, chunk)]
                )
            return cols.T
        eye = torch.eye(self.n_out, dtype=torch.float64, device=self.device)
        return torch.cat([self.adjoint(eye[i : i + chunk]) for i in range(0, self.n_out, chunk)])

    def abs_row_sums(self) -> Tensor:
        """|A_L| ... |A_1| 1, entry-wise at least the absolute row sums of A = A_L ... A_1: every
        layer with its weights replaced by their absolute values and no bias."""
        abs_calls = []
        for call in self.calls:
            module = copy.deepcopy(call.module)
            with torch.no_grad():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    if module.weight is not None:
                        module.weight.abs_()
                        module.bias.zero_()
                    module.running_mean.zero_()
                elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    module.weight.abs_()
                    if module.bias is not None:
                        module.bias.zero_()
            abs_calls.append(_Call(call.name, module, call.in_shape, call.out_shape, call.device))
        ones = torch.ones(1, self.n_in, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            return self._affine(ones, abs_calls)[0]


def _power_iteration_bound(
    segment: _LinearSegment, iterations: int, failure_probability: float, seed: int
) -> tuple[float, float]:
    r"""(estimate, bound) of the largest singular value of ``A`` by power iteration on A^T A.

    With v_0 ~ N(0, I), c_1 = <u_1, v_0> ~ N(0, 1) for the top right singular vector u_1 and
    |M^k v_0|^2 = sum_i c_i^2 sigma_i^{4k} >= c_1^2 sigma_1^{4k} for M = A^T A. Since
    P(|c_1| < a) <= a sqrt(2 / pi), taking a = delta sqrt(pi / 2) gives, with probability at
    least 1 - delta over v_0, sigma_1 <= (|M^k v_0| / a)^{1 / (2k)}.
    """
    generator = torch.Generator(segment.device).manual_seed(seed)
    v = torch.randn(
        1, segment.n_in, generator=generator, dtype=torch.float64, device=segment.device
    )
    log_growth = float(torch.log(v.norm()))
    v = v / v.norm()
    estimate = 0.0
    for _ in range(iterations):
        w = segment.adjoint(segment.apply(v))
        growth = float(w.norm())
        if growth == 0.0:
            return 0.0, 0.0
        estimate = math.sqrt(float((v * w).sum()))  # Rayleigh quotient: never above sigma_1
        log_growth += math.log(growth)
        v = w / growth
    a = failure_probability * math.sqrt(math.pi / 2.0)
    bound = math.exp((log_growth - math.log(a)) / (2 * iterations))
    return estimate, max(bound, estimate)


def _linear_factor(
    segment: _LinearSegment,
    norm: float,
    dense_limit: int,
    iterations: int,
    failure_probability: float,
    seed: int,
) -> tuple[float, str]:
    small = min(segment.n_in, segment.n_out) <= dense_limit
    small = small and segment.n_in * segment.n_out <= 2**24
    if norm == math.inf:
        if small:
            return float(segment.dense().abs().sum(dim=1).max()), "exact (dense max row sum)"
        bound = float(segment.abs_row_sums().max())
        exact = len(segment.calls) == 1 and not isinstance(
            segment.calls[0].module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
        )
        return bound, "max of |A_L|...|A_1| 1" + (" (exact for one layer)" if exact else "")
    if small:
        a = segment.dense()
        gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
        top = float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0))
        # float64 eigenvalues are accurate to ~n eps |G|; the margin covers that rounding.
        return math.sqrt(top) * (1.0 + 1e-9), "exact (dense eigenvalues)"
    estimate, bound = _power_iteration_bound(segment, iterations, failure_probability, seed)
    return bound, (
        f"power iteration through autograd ({iterations} steps, estimate {estimate:.6g}; "
        f"bound holds with probability >= 1 - {failure_probability:g})"
    )


def lipschitz_factors(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    norm: float = 2,
    merge: bool = True,
    dense_limit: int = 512,
    iterations: int = 1000,
    failure_probability: float = 1e-6,
    seed: int = 0,
) -> list[LipschitzFactor]:
    """The factors whose product is :func:`lipschitz_upper_bound`, one per merged linear run or
    non-linear layer, with how each was computed (arguments as there).

    Returns:
        list[LipschitzFactor]: in the order the model applies them.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2), nn.ReLU(), nn.Flatten(),
        ...                     nn.Linear(18, 3))
        >>> [(f.layers, f.kind) for f in lipschitz_factors(net, (1, 1, 8, 8))]
        [(('0', '1'), 'linear'), (('2',), 'activation'), (('3', '4'), 'linear')]
    """
    caller = "lipschitz_upper_bound"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")
    p = _check_norm(norm, caller)
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else None
    if (
        shape is None
        or len(shape) < 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise ValueError(
            f"{caller}: input_shape must be a sequence of positive ints including the batch "
            f"dimension, e.g. (1, 1, 28, 28), got {input_shape!r}"
        )
    if isinstance(dense_limit, bool) or not isinstance(dense_limit, int) or dense_limit < 0:
        raise ValueError(f"{caller}: dense_limit must be an int >= 0, got {dense_limit!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{caller}: iterations must be an int >= 1, got {iterations!r}")
    if not 0.0 < failure_probability < 1.0:
        raise ValueError(
            f"{caller}: failure_probability must be in (0, 1), got {failure_probability!r}"
        )

    chain = _layer_chain(model, shape, caller)
    factors: list[LipschitzFactor] = []
    run: list[_Call] = []

    def close_run() -> None:
        if not run:
            return
        segment = _LinearSegment(run)
        bound, method = _linear_factor(
            segment, p, dense_limit, iterations, failure_probability, seed
        )
        factors.append(
            LipschitzFactor(
                tuple(c.name for c in run), "linear", bound, method, segment.n_in, segment.n_out
            )
        )
        run.clear()

    for call in chain:
        n_in, n_out = math.prod(call.in_shape), math.prod(call.out_shape)
        if isinstance(call.module, _LINEAR_TYPES) or _front_end_call(call, caller):
            run.append(call)
            if not merge:
                close_run()
            continue
        close_run()
        if isinstance(call.module, _MAX_POOLS):
            if p == math.inf:
                bound, method = 1.0, "max pooling is 1-Lipschitz in l_inf"
            else:
                dims = _MAX_POOLS.index(type(call.module)) + 1
                overlap = _max_pool_overlap(call.module, dims)
                bound = math.sqrt(overlap)
                method = f"sqrt of the most windows an input is in ({overlap})"
            factors.append(LipschitzFactor((call.name,), "max-pool", bound, method, n_in, n_out))
        else:
            constant = _activation_constant(call.module)
            kind = "softmax" if isinstance(call.module, nn.Softmax) else "activation"
            factors.append(LipschitzFactor((call.name,), kind, constant, "sup |phi'|", n_in, n_out))
    close_run()
    return factors


def lipschitz_upper_bound(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    norm: float = 2,
    merge: bool = True,
    dense_limit: int = 512,
    iterations: int = 1000,
    failure_probability: float = 1e-6,
    seed: int = 0,
) -> float:
    r"""An upper bound on the Lipschitz constant of ``model`` (eval mode) in the l_2 or l_inf norm.

    :math:`|f(x) - f(y)|_p \le L |x - y|_p` with :math:`L = \prod_i L_i` over the model's
    chain of layers (Szegedy et al. 2014; Virmaux & Scaman 2018); Gopalakrishnan et al. (2018)
    explain sparsity's robustness by this bound. Consecutive linear layers (Linear, Conv,
    eval BatchNorm, average pooling, Flatten, Dropout) are merged into one operator A first
    (``merge=True``), since |A_2 A_1| <= |A_2| |A_1|. For each A, built from the layers
    themselves through autograd, never from a reshaped kernel:

    * l_2, small A (``min(in, out) <= dense_limit``): exact, the top eigenvalue of the Gram
      matrix of A's dense matrix (A applied to the basis vectors) in float64;
    * l_2, large A: power iteration on A^T A (forward and autograd adjoint) from a Gaussian
      start v_0 with an upward correction: with probability >= 1 - ``failure_probability``,
      sigma_1 <= (|(A^T A)^k v_0| / a)^{1/(2k)}, a = delta sqrt(pi/2), because
      <u_1, v_0> ~ N(0, 1) exceeds a in absolute value with that probability;
    * l_inf: the exact largest absolute row sum when small, else max |A_L|...|A_1| 1 (exact for
      one Linear or zero-padded convolution).

    Element-wise activations contribute sup |phi'| (ReLU, tanh: 1; sigmoid: 1/4; GELU: 1.129;
    LeakyReLU: max(1, |slope|)), Softmax 1/2, max pooling 1 in l_inf and sqrt(r) in l_2 with
    r the most windows one input falls in. The model must be a chain of such modules (checked
    by running it once); the batch dimension does not change the constant, since a model in eval
    mode acts on each sample alone. A :class:`~torch_dlt.prune.SparsifyingFrontEnd` with
    k < H W is refused: hard thresholding is discontinuous.

    Args:
        model (nn.Module): the model; a float64 eval-mode copy is measured, it is not changed.
        input_shape (Sequence[int]): input shape including the batch dimension, e.g.
            ``(1, 1, 28, 28)``.
        norm (float): 2 or ``math.inf``: the same l_p norm on inputs and outputs.
        merge (bool): merge consecutive linear layers before taking norms.
        dense_limit (int): largest ``min(in, out)`` of a linear run handled densely.
        iterations (int): power-iteration steps for larger runs.
        failure_probability (float): the probability that a power-iteration factor is too low.
        seed (int): seeds the power iteration's start vectors (the global RNG is not used).

    Returns:
        float: the bound L.

    Raises:
        TypeError: a layer the bound does not know, named.
        ValueError: a model that is not a chain of layers, a bad argument.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
        >>> upper = lipschitz_upper_bound(net, (1, 10))
        >>> w1, w2 = net[0].weight.detach(), net[2].weight.detach()
        >>> product = torch.linalg.matrix_norm(w1, 2) * torch.linalg.matrix_norm(w2, 2)
        >>> abs(upper - float(product)) < 1e-5
        True
    """
    factors = lipschitz_factors(
        model,
        input_shape,
        norm=norm,
        merge=merge,
        dense_limit=dense_limit,
        iterations=iterations,
        failure_probability=failure_probability,
        seed=seed,
    )
    return math.prod(f.bound for f in factors)


def _local_norms(model: nn.Module, x: Tensor, p: float, create_graph: bool) -> Tensor:
    """|J(x_b)|_{p -> p} for each sample: l_2, the top singular value of the Jacobian; l_inf,
    its largest absolute row sum (the dual l_1 norm of an output's input gradient)."""
    out = model(x).flatten(1)
    rows = []
    for i in range(out.shape[1]):
        (g,) = torch.autograd.grad(out[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        rows.append(g.flatten(1))
    jac = torch.stack(rows, dim=1)  # [B, outputs, inputs]
    if p == math.inf:
        return jac.abs().sum(dim=2).amax(dim=1)
    gram = jac @ jac.transpose(1, 2)
    return torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0.0).sqrt()


def lipschitz_lower_bound(
    model: nn.Module,
    x: Tensor,
    *,
    norm: float = 2,
    steps: int = 20,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> float:
    r"""An empirical lower bound: the largest local Jacobian norm found by gradient ascent.

    For a Lipschitz f, :math:`L \ge |J_f(x)|_{p \to p}` at every x where f is differentiable
    (Virmaux & Scaman 2018). Starting from each sample of ``x``, ``steps`` steps of normalised
    gradient ascent on that local norm (l_2: the top singular value of J, from all output
    gradients; l_inf: the largest l_1 norm of an output's input gradient) look for a larger one;
    where the local norm has no gradient (piecewise-linear nets) the step is random. Every
    point's value is a valid lower bound; the maximum is returned.

    Args:
        model (nn.Module): the model (run in eval mode; parameters, flags, buffers, the RNG and
            ``.grad`` are left as they were).
        x (Tensor[B, ...]): starting points.
        norm (float): 2 or ``math.inf``.
        steps (int): ascent steps (0: the local norms at ``x`` only).
        step_size (float | None): l_2 length of each step per sample; by default a tenth of the
            root-mean-square norm of the samples of ``x``.
        generator (torch.Generator | None): for the random steps (default: seeded with 0).

    Returns:
        float: the lower bound.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Linear(6, 4)
        >>> lower = lipschitz_lower_bound(net, torch.randn(3, 6), steps=0)
        >>> abs(lower - float(torch.linalg.matrix_norm(net.weight.detach(), 2))) < 1e-5
        True
    """
    caller = "lipschitz_lower_bound"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")
    p = _check_norm(norm, caller)
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point() or x.shape[0] < 1:
        raise ValueError(
            f"{caller}: x must be a floating Tensor[B, ...] with a batch dimension, got "
            + (f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__)
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{caller}: steps must be an int >= 0, got {steps!r}")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"{caller}: step_size must be > 0, got {step_size!r}")
    if generator is None:
        generator = torch.Generator(x.device).manual_seed(0)
    x = x.detach()
    if step_size is None:
        step_size = 0.1 * float(x.flatten(1).norm(dim=1).square().mean().sqrt()) or 0.1
    best = 0.0
    with forked_rng(model, x), restored_mode(model), torch.enable_grad():
        point = x.clone().requires_grad_(True)
        for step in range(steps + 1):
            ascent = step < steps
            local = _local_norms(model, point, p, create_graph=ascent)
            best = max(best, float(local.detach().max()))
            if not ascent:
                break
            (g,) = torch.autograd.grad(local.sum(), point, allow_unused=True)
            g = torch.zeros_like(point) if g is None else g
            noise = torch.randn(point.shape, generator=generator, dtype=x.dtype, device=x.device)
            flat_g, flat_noise = g.flatten(1), noise.flatten(1)
            g_norm = flat_g.norm(dim=1, keepdim=True)
            direction = torch.where(
                g_norm > 0,
                flat_g / g_norm.clamp_min(1e-300),
                flat_noise / flat_noise.norm(dim=1, keepdim=True),
            )
            point = (point.detach() + step_size * direction.view_as(point)).requires_grad_(True)
    return best


def lipschitz_interval(
    model: nn.Module,
    x: Tensor,
    *,
    norm: float = 2,
    steps: int = 20,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    **upper_kwargs: object,
) -> LipschitzInterval:
    """Both bounds: ``lower`` from :func:`lipschitz_lower_bound` started at ``x`` and ``upper``
    from :func:`lipschitz_upper_bound` for inputs shaped like ``x`` (``upper_kwargs`` go there).

    Returns:
        LipschitzInterval: ``(lower, upper, factors)``.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> lower, upper, _ = lipschitz_interval(net, torch.randn(4, 8), steps=5)
        >>> 0 < lower <= upper
        True
    """
    factors = lipschitz_factors(model, tuple(x.shape), norm=norm, **upper_kwargs)
    lower = lipschitz_lower_bound(
        model, x, norm=norm, steps=steps, step_size=step_size, generator=generator
    )
    return LipschitzInterval(lower, math.prod(f.bound for f in factors), factors)
