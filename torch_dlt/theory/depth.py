r"""Why depth helps: exact constructive ReLU networks and exact linear-region counting.

Telgarsky (2015, "Representation benefits of deep feedforward networks"; 2016, "Benefits of depth
in neural networks") sawtooth, Yarotsky (2017, "Error bounds for approximations with deep ReLU
networks") square / product / polynomial nets, and the binary-tree compositional functions of
Poggio, Mhaskar, Rosasco, Miranda & Liao (2017, "Why and when can deep-but not shallow-networks
avoid the curse of dimensionality").

Unlike the rest of :mod:`torch_dlt.theory`, the constructions here are returned as
``nn.Sequential`` stacks of ``nn.Linear`` / ``nn.ReLU``: the objects the theorems are about.
All constructive weights are dyadic rationals, so in float64 the nets are exact on dyadic inputs.
"""

from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Sequence, Tuple

import numpy as np
import torch
from scipy.linalg import block_diag
from torch import Tensor, nn

__all__ = [
    "PolynomialNet",
    "ShallowNet",
    "TreeNet",
    "binary_tree_function",
    "count_linear_regions",
    "count_linear_regions_along",
    "linear_region_breakpoints",
    "polynomial_net",
    "sawtooth_net",
    "smooth_bivariate_node",
    "yarotsky_error_bound",
    "yarotsky_product_net",
    "yarotsky_square_net",
]

# A ReLU net as its affine maps [(W [out, in], b [out]), ...] with a ReLU between consecutive
# maps; the constructions are assembled in this form (float64) and only then become modules.
_Affines = List[Tuple[np.ndarray, np.ndarray]]


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")


def _affine(weight: Sequence, bias: Sequence) -> _Affines:
    return [(np.atleast_2d(np.asarray(weight, dtype=np.float64)), np.asarray(bias, np.float64))]


def _compose(outer: _Affines, inner: _Affines) -> _Affines:
    """outer o inner: inner's last affine map and outer's first one fuse into one Linear."""
    w_out, b_out = outer[0]
    w_in, b_in = inner[-1]
    return inner[:-1] + [(w_out @ w_in, w_out @ b_in + b_out)] + outer[1:]


def _identity(dim: int, hidden_layers: int) -> _Affines:
    """Carries R^dim through hidden ReLU layers exactly as (relu(z), relu(-z))."""
    eye = np.eye(dim)
    if hidden_layers == 0:
        return [(eye, np.zeros(dim))]
    split = np.vstack([eye, -eye])
    swap = np.block([[eye, -eye], [-eye, eye]])
    middle = [(swap, np.zeros(2 * dim)) for _ in range(hidden_layers - 1)]
    return [(split, np.zeros(2 * dim))] + middle + [(np.hstack([eye, -eye]), np.zeros(dim))]


def _parallel(nets: Sequence[_Affines]) -> _Affines:
    """Nets on the same input, outputs stacked; shallower ones are padded with identity layers."""
    depth = max(len(net) for net in nets)
    padded = [
        net
        if len(net) == depth
        else _compose(_identity(net[-1][0].shape[0], depth - len(net)), net)
        for net in nets
    ]
    layers = [
        (np.vstack([net[0][0] for net in padded]), np.concatenate([net[0][1] for net in padded]))
    ]
    for i in range(1, depth):
        weight = block_diag(*[net[i][0] for net in padded])
        layers.append((weight, np.concatenate([net[i][1] for net in padded])))
    return layers


def _to_module(net: _Affines, dtype: torch.dtype) -> nn.Sequential:
    modules: List[nn.Module] = []
    for i, (weight, bias) in enumerate(net):
        if i > 0:
            modules.append(nn.ReLU())
        # skip_init: the weights are set below, so the global RNG must not be drawn from.
        linear = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight))
            linear.bias.copy_(torch.from_numpy(bias))
        modules.append(linear)
    return nn.Sequential(*modules)


def _sawtooth_affines(k: int) -> _Affines:
    # Hidden layer s holds (relu(g_{s-1}), relu(g_{s-1} - 1/2)); g_s = 2 h_0 - 4 h_1.
    tent = np.array([[2.0, -4.0], [2.0, -4.0]])
    half = np.array([0.0, -0.5])
    return (
        [(np.array([[1.0], [1.0]]), half)]
        + [(tent, half) for _ in range(k - 1)]
        + [(np.array([[2.0, -4.0]]), np.zeros(1))]
    )


def sawtooth_net(k: int, *, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    r"""The exact ReLU net of the k-fold tent map (Telgarsky 2015, 2016).

    The tent map :math:`t(x) = 2\,\mathrm{relu}(x) - 4\,\mathrm{relu}(x - 1/2)` equals
    :math:`2x` on :math:`[0, 1/2]` and :math:`2 - 2x` on :math:`[1/2, 1]`; its k-fold
    composition :math:`g_k = t \circ \dots \circ t` is a sawtooth on :math:`[0, 1]` with
    :math:`2^k` linear pieces and :math:`2^{k-1}` maxima (value 1 at the odd multiples of
    :math:`2^{-k}`). The net has k hidden ReLU layers of width 2 and :math:`6k + 1`
    parameters, while a one-hidden-layer ReLU net has at most width + 1 pieces and needs
    width :math:`\ge 2^k - 1` to equal it (Telgarsky 2015, 2016).

    The identity holds on :math:`[0, 1]` only (outside, the first tent is not folded).

    Args:
        k (int): number of compositions, >= 1 (the depth).
        dtype (torch.dtype): parameter dtype; float64 keeps the net exact on dyadic inputs.

    Returns:
        nn.Sequential: maps x (Tensor[B, 1]) in [0, 1] to g_k(x) (Tensor[B, 1]).

    Example:
        >>> net = sawtooth_net(2)
        >>> x = torch.tensor([[0.125], [0.25], [0.5], [0.75]], dtype=torch.float64)
        >>> net(x).flatten().tolist()
        [0.5, 1.0, 0.0, 1.0]
    """
    _check_positive_int(k, "k")
    return _to_module(_sawtooth_affines(k), dtype)


def smooth_bivariate_node(a: Tensor, b: Tensor) -> Tensor:
    r"""The default smooth bivariate constituent of :func:`binary_tree_function`.

    :math:`h(a, b) = \tanh(a b + (a - b) / 2)`: smooth, depends on both arguments
    non-additively, maps bounded inputs to :math:`(-1, 1)` so deep trees stay well scaled.

    Args:
        a (Tensor[...]): first argument.
        b (Tensor[...]): second argument, same shape.

    Returns:
        Tensor[...]: h(a, b).

    Example:
        >>> smooth_bivariate_node(torch.tensor([0.0]), torch.tensor([0.0]))
        tensor([0.])
    """
    return torch.tanh(a * b + 0.5 * (a - b))


# ---- exact linear regions of scalar-input piecewise-linear nets -----------------------------


class _PiecewiseActivation(NamedTuple):
    kinks: Tuple[float, ...]
    # (pre-activation z [P, n] at piece midpoints) -> (gain [P, n], shift [P, n]) such that
    # act(u) = gain * u + shift on the whole piece.
    local_affine: Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]


def _activation_of(layer: nn.Module) -> _PiecewiseActivation | None:
    if isinstance(layer, nn.ReLU):
        return _PiecewiseActivation((0.0,), lambda z: ((z > 0).astype(np.float64), 0.0 * z))
    if isinstance(layer, nn.LeakyReLU):
        slope = float(layer.negative_slope)
        return _PiecewiseActivation((0.0,), lambda z: (np.where(z > 0, 1.0, slope), 0.0 * z))
    if isinstance(layer, nn.Hardtanh):  # also ReLU6
        lo, hi = float(layer.min_val), float(layer.max_val)
        return _PiecewiseActivation(
            (lo, hi),
            lambda z: (
                ((z > lo) & (z < hi)).astype(np.float64),
                np.where(z <= lo, lo, np.where(z >= hi, hi, 0.0)),
            ),
        )
    return None


_SUPPORTED = "nn.Linear, nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.ReLU6, nn.Identity, nn.Sequential"


def _flat_layers(net: nn.Module) -> List[nn.Module]:
    if isinstance(net, nn.Sequential):
        return [leaf for child in net for leaf in _flat_layers(child)]
    if isinstance(net, (nn.Linear, nn.Identity)) or _activation_of(net) is not None:
        return [net]
    raise TypeError(
        f"count_linear_regions supports {_SUPPORTED} (piecewise-linear layers applied in order); "
        f"got layer {type(net).__name__}: {net!r}"
    )


def _check_interval(interval: Tuple[float, float]) -> Tuple[float, float]:
    try:
        a, b = (float(v) for v in interval)
    except (TypeError, ValueError) as err:
        raise TypeError(f"interval must be a pair of numbers (a, b), got {interval!r}") from err
    if not (math.isfinite(a) and math.isfinite(b) and a < b):
        raise ValueError(f"interval must be finite with a < b, got ({a}, {b})")
    return a, b


def _breakpoints(layers: List[nn.Module], a: float, b: float, rtol: float) -> np.ndarray:
    knots = np.array([a, b])
    # Every piece carries each current feature as slope * x + intercept, per piece: [P, n].
    slope = np.ones((1, 1))
    intercept = np.zeros((1, 1))
    # A crossing this close to a piece's end is that end, not a new piece (rounding).
    eps = 1e-12 * (b - a)
    for index, layer in enumerate(layers):
        if isinstance(layer, nn.Identity):
            continue
        if isinstance(layer, nn.Linear):
            if layer.in_features != slope.shape[1]:
                raise ValueError(
                    f"layer {index} ({layer!r}) expects {layer.in_features} features but the net "
                    f"produces {slope.shape[1]} there (the input is a scalar)"
                )
            weight = layer.weight.detach().to("cpu", torch.float64).numpy().T
            slope = slope @ weight
            intercept = intercept @ weight
            if layer.bias is not None:
                intercept = intercept + layer.bias.detach().to("cpu", torch.float64).numpy()
            continue
        act = _activation_of(layer)
        lo, hi = knots[:-1, None], knots[1:, None]
        crossings = [knots]
        for kink in act.kinks:
            moving = slope != 0
            x = np.divide(kink - intercept, slope, out=np.full_like(slope, np.nan), where=moving)
            crossings.append(x[moving & (x > lo + eps) & (x < hi - eps)])
        old_knots = knots
        knots = np.unique(np.concatenate(crossings))
        mids = 0.5 * (knots[:-1] + knots[1:])
        parent = np.searchsorted(old_knots, mids) - 1
        slope, intercept = slope[parent], intercept[parent]
        gain, shift = act.local_affine(slope * mids[:, None] + intercept)
        slope, intercept = gain * slope, gain * intercept + shift
    # Adjacent pieces with the same slope vector are one affine piece (the net is continuous).
    scale = max(1.0, float(np.abs(slope).max()))
    changes = np.abs(np.diff(slope, axis=0)).max(axis=1) > rtol * scale
    return np.concatenate([[a], knots[1:-1][changes], [b]])


def linear_region_breakpoints(
    net: nn.Module, interval: Tuple[float, float], *, rtol: float = 1e-9
) -> np.ndarray:
    r"""Exact breakpoints of a scalar-input piecewise-linear net on ``interval``.

    Tracks, layer by layer in float64, the partition of ``(a, b)`` on which every unit is affine
    in the input: each activation splits a piece where a unit's pre-activation crosses one of the
    activation's kinks. At the end, adjacent pieces whose output slopes agree (to ``rtol`` times
    the largest slope) are merged, so the result delimits the maximal intervals on which the
    net is affine, the linear pieces that Telgarsky (2016) counts. Cost: O(pieces x width) per
    layer.

    Args:
        net (nn.Module): an ``nn.Sequential`` (nested allowed) of ``nn.Linear`` and the
            piecewise-linear activations ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.Hardtanh``,
            ``nn.ReLU6``, ``nn.Identity``; first layer with ``in_features == 1``; any output
            width.
        interval (tuple[float, float]): ``(a, b)`` with a < b.
        rtol (float): relative tolerance for equal slopes.

    Returns:
        np.ndarray[R + 1]: sorted breakpoints, ``a`` and ``b`` included, for R linear pieces.

    Example:
        >>> linear_region_breakpoints(sawtooth_net(2), (0.0, 1.0))
        array([0.  , 0.25, 0.5 , 0.75, 1.  ])
    """
    a, b = _check_interval(interval)
    layers = _flat_layers(net)
    if not layers or not isinstance(
        next(lay for lay in layers if not isinstance(lay, nn.Identity)), nn.Linear
    ):
        raise ValueError("net must start with an nn.Linear(1, ...) (a scalar-input net)")
    return _breakpoints(layers, a, b, rtol)


def count_linear_regions(net: nn.Module, interval: Tuple[float, float]) -> int:
    r"""Exact number of linear pieces of a scalar-input ReLU net on ``interval``.

    The number of maximal sub-intervals of ``(a, b)`` on which the net is affine (Telgarsky
    2016; a one-hidden-layer net of width n has at most n + 1, a depth-L width-n net at most
    :math:`(2n)^L`, and :func:`sawtooth_net` ``(k)`` reaches :math:`2^k` with width 2). See
    :func:`linear_region_breakpoints` for the algorithm and the accepted layers, and
    :func:`count_linear_regions_along` for vector inputs.

    Args:
        net (nn.Module): scalar-input ``nn.Sequential`` of ``nn.Linear`` / piecewise-linear
            activations.
        interval (tuple[float, float]): ``(a, b)`` with a < b.

    Returns:
        int: the number of linear pieces.

    Example:
        >>> count_linear_regions(sawtooth_net(5), (0.0, 1.0))
        32
    """
    return len(linear_region_breakpoints(net, interval)) - 1


def count_linear_regions_along(
    net: nn.Module, x0: Tensor, x1: Tensor, *, rtol: float = 1e-9
) -> int:
    r"""Exact number of linear pieces of a vector-input net along the segment from x0 to x1.

    The restriction :math:`t \mapsto f(x_0 + t (x_1 - x_0))`, :math:`t \in [0, 1]`, is a
    scalar-input net (the segment is one more affine layer in front), so its pieces are counted
    exactly, not sampled; this is the one-dimensional count along a line used by Hanin & Rolnick
    (2019, "Complexity of linear regions in deep networks") and Novak et al. (2018).

    Args:
        net (nn.Module): ``nn.Sequential`` of ``nn.Linear`` / piecewise-linear activations
            whose first Linear has ``in_features == d``.
        x0 (Tensor[d]): start of the segment.
        x1 (Tensor[d]): end of the segment, different from x0.
        rtol (float): relative tolerance for equal slopes.

    Returns:
        int: the number of linear pieces along the segment.

    Example:
        >>> net = yarotsky_product_net(2)
        >>> count_linear_regions_along(net, torch.zeros(2), torch.ones(2))  # f_2(t) on x = y = t
        4
    """
    x0 = torch.as_tensor(x0, dtype=torch.float64).flatten()
    x1 = torch.as_tensor(x1, dtype=torch.float64).flatten()
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape [d], got {x0.shape} and {x1.shape}")
    if torch.equal(x0, x1):
        raise ValueError("x0 and x1 must differ (the segment is empty)")
    layers = _flat_layers(net)
    first = next((lay for lay in layers if not isinstance(lay, nn.Identity)), None)
    if not isinstance(first, nn.Linear) or first.in_features != x0.numel():
        raise ValueError(
            f"net must start with an nn.Linear({x0.numel()}, ...) to take points of dimension "
            f"d={x0.numel()}, got first layer {first!r}"
        )
    segment = nn.utils.skip_init(nn.Linear, 1, x0.numel(), dtype=torch.float64)
    with torch.no_grad():
        segment.weight.copy_((x1 - x0)[:, None])
        segment.bias.copy_(x0)
    return len(_breakpoints([segment, *layers], 0.0, 1.0, rtol)) - 1


# ---- Yarotsky's approximations of x^2, xy and polynomials ------------------------------------


def yarotsky_error_bound(m: int) -> float:
    r"""Sup error :math:`2^{-2m-2}` of :func:`yarotsky_square_net` and :func:`yarotsky_product_net`.

    :math:`f_m` is the piecewise-linear interpolation of :math:`x^2` on the grid
    :math:`k 2^{-m}`; the interpolation error of a parabola on a cell of width h is at most
    :math:`h^2 / 4`, attained at the cell midpoints (Yarotsky 2017, Prop. 2).

    Args:
        m (int): depth parameter, >= 1.

    Returns:
        float: :math:`2^{-2m-2}`.

    Example:
        >>> yarotsky_error_bound(1)
        0.0625
    """
    _check_positive_int(m, "m")
    return 2.0 ** (-2 * m - 2)


def _square_affines(m: int) -> _Affines:
    # Hidden layer s holds (relu(g_{s-1}), relu(g_{s-1} - 1/2), f_{s-1}(x)); f_{s-1} >= x^2 >= 0
    # on [0, 1] (interpolant of a convex function), so the ReLU passes it unchanged.
    layers = [(np.array([[1.0], [1.0], [1.0]]), np.array([0.0, -0.5, 0.0]))]
    for s in range(1, m):
        c = 4.0**-s
        weight = np.array([[2.0, -4.0, 0.0], [2.0, -4.0, 0.0], [-2.0 * c, 4.0 * c, 1.0]])
        layers.append((weight, np.array([0.0, -0.5, 0.0])))
    c = 4.0**-m
    layers.append((np.array([[-2.0 * c, 4.0 * c, 1.0]]), np.zeros(1)))
    return layers


def yarotsky_square_net(m: int, *, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    r"""Yarotsky's ReLU approximation of :math:`x^2` on :math:`[0, 1]` (Yarotsky 2017, Prop. 2).

    .. math:: f_m(x) = x - \sum_{s=1}^m \frac{g_s(x)}{2^{2s}},

    with :math:`g_s` the s-fold tent map (:func:`sawtooth_net`). :math:`f_m` interpolates
    :math:`x^2` linearly at :math:`x = k 2^{-m}` (there it is exact) and
    :math:`\sup_{[0,1]} |f_m(x) - x^2| = 2^{-2m-2}` (:func:`yarotsky_error_bound`), attained at
    the midpoints :math:`(k + 1/2) 2^{-m}`: depth m buys error :math:`4^{-m}`. The net has m
    hidden layers of width 3.

    Args:
        m (int): depth, >= 1.
        dtype (torch.dtype): parameter dtype.

    Returns:
        nn.Sequential: maps x (Tensor[B, 1]) in [0, 1] to f_m(x) (Tensor[B, 1]).

    Example:
        >>> net = yarotsky_square_net(1)
        >>> net(torch.tensor([[0.25], [0.5]], dtype=torch.float64)).flatten().tolist()
        [0.125, 0.25]
    """
    _check_positive_int(m, "m")
    return _to_module(_square_affines(m), dtype)


def _product_affines(m: int) -> _Affines:
    absolute = [(np.array([[1.0], [-1.0]]), np.zeros(2)), (np.array([[1.0, 1.0]]), np.zeros(1))]
    square_of_abs = _compose(_square_affines(m), absolute)
    plus = _compose(square_of_abs, _affine([[0.5, 0.5]], [0.0]))
    minus = _compose(square_of_abs, _affine([[0.5, -0.5]], [0.0]))
    return _compose(_affine([[1.0, -1.0]], [0.0]), _parallel([plus, minus]))


def yarotsky_product_net(m: int, *, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    r"""A ReLU approximation of :math:`xy` on :math:`[-1, 1]^2` from two squares (Yarotsky 2017).

    By the polarisation identity :math:`xy = ((x+y)/2)^2 - ((x-y)/2)^2`, with both
    :math:`|x \pm y| / 2 \in [0, 1]`:

    .. math:: \tilde\times_m(x, y) = f_m(|x+y|/2) - f_m(|x-y|/2),

    :math:`|z| = \mathrm{relu}(z) + \mathrm{relu}(-z)`. Since :math:`0 \le f_m(u) - u^2 \le
    2^{-2m-2}` on [0, 1], the two errors partly cancel and

    .. math:: \sup_{[-1,1]^2} |\tilde\times_m(x, y) - xy| = 2^{-2m-2}

    (:func:`yarotsky_error_bound`; attained at :math:`x = y = 2^{-m-1}`). Yarotsky's Prop. 3
    uses :math:`xy = ((x+y)^2 - x^2 - y^2)/2`, whose bound is twice as large. Also exact:
    :math:`\tilde\times_m(x, 0) = 0`. m + 1 hidden layers of width 6.

    Args:
        m (int): depth of each square, >= 1.
        dtype (torch.dtype): parameter dtype.

    Returns:
        nn.Sequential: maps (x, y) (Tensor[B, 2]) in [-1, 1]^2 to ~xy (Tensor[B, 1]).

    Example:
        >>> net = yarotsky_product_net(3)
        >>> net(torch.tensor([[0.5, -0.75]], dtype=torch.float64)).item()
        -0.375
    """
    _check_positive_int(m, "m")
    return _to_module(_product_affines(m), dtype)


class PolynomialNet(NamedTuple):
    """A ReLU net approximating a polynomial and its proven sup-error bound."""

    net: nn.Sequential
    """maps x (Tensor[B, 1]) in [0, 1] to ~p(x) (Tensor[B, 1])."""
    error_bound: float
    """sup over [0, 1] of |net(x) - p(x)| is at most this."""


def polynomial_net(
    coefficients: Sequence[float], m: int, *, dtype: torch.dtype = torch.float64
) -> PolynomialNet:
    r"""A ReLU net approximating :math:`p(x) = \sum_k a_k x^k` on [0, 1], with a proven bound.

    Powers by repeated approximate multiplication (Yarotsky 2017, proof of Thm. 1):
    :math:`\tilde P_1 = x`, :math:`\tilde P_k = \tilde\times_m(x, \mathrm{clip}_{[0,1]}(\tilde
    P_{k-1}))` with :func:`yarotsky_product_net` and the ReLU clip
    :math:`\mathrm{relu}(z) - \mathrm{relu}(z - 1)`. Clipping keeps the product's arguments in
    its domain and cannot increase the error because :math:`x^{k-1} \in [0, 1]`; with
    :math:`|x| \le 1`, the errors :math:`\delta_k = \sup|\tilde P_k - x^k|` obey
    :math:`\delta_k \le \varepsilon + \delta_{k-1}`, :math:`\delta_1 = 0`, hence

    .. math:: \sup_{[0,1]} |\tilde p - p| \le \varepsilon \sum_{k \ge 2} (k - 1) |a_k|,
              \qquad \varepsilon = 2^{-2m-2}.

    Depth (n - 1)(m + 2) for degree n; polynomials of degree <= 1 are exact affine maps.

    Args:
        coefficients (Sequence[float]): :math:`a_0, a_1, \dots, a_n` (constant term first).
        m (int): depth of each product, >= 1.
        dtype (torch.dtype): parameter dtype.

    Returns:
        PolynomialNet: ``(net, error_bound)``.

    Example:
        >>> net, bound = polynomial_net([1.0, 0.0, -2.0, 1.0], m=4)
        >>> bound  # 2^-10 * (1 * |-2| + 2 * |1|)
        0.00390625
        >>> x = torch.tensor([[0.3]], dtype=torch.float64)
        >>> abs(net(x).item() - (1 - 2 * 0.3**2 + 0.3**3)) <= bound
        True
    """
    _check_positive_int(m, "m")
    coeffs = np.asarray(coefficients, dtype=np.float64)
    if coeffs.ndim != 1 or coeffs.size == 0 or not np.all(np.isfinite(coeffs)):
        raise ValueError(
            f"coefficients must be a non-empty 1-d sequence of finite numbers (a_0 first), "
            f"got {coefficients!r}"
        )
    degree = coeffs.size - 1
    linear = coeffs[1] if degree >= 1 else 0.0
    # State (x, P~_{k-1}, partial sum S_{k-1}).
    net = _affine([[1.0], [1.0], [linear]], [0.0, 0.0, coeffs[0]])
    product = _product_affines(m)
    clip_p = [(np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]), np.array([0.0, -1.0]))]
    clip_p.append((np.array([[1.0, -1.0]]), np.zeros(1)))
    select_x = _affine([[1.0, 0.0, 0.0]], [0.0])
    select_s = _affine([[0.0, 0.0, 1.0]], [0.0])
    power = _compose(product, _parallel([select_x, clip_p]))
    bound = 0.0
    for k in range(2, degree + 1):
        stage = _parallel([select_x, power, select_s])
        update = _affine([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, coeffs[k], 1.0]], np.zeros(3))
        net = _compose(_compose(update, stage), net)
        bound += (k - 1) * abs(coeffs[k]) * 2.0 ** (-2 * m - 2)
    return PolynomialNet(_to_module(_compose(select_s, net), dtype), float(bound))


# ---- compositional functions and locally connected deep nets (Poggio et al. 2017) ------------


def _check_tree_dim(d: int) -> int:
    _check_positive_int(d, "d")
    if d < 2 or d & (d - 1):
        raise ValueError(f"d must be a power of 2 >= 2 (binary tree leaves), got {d}")
    return d.bit_length() - 1


def binary_tree_function(
    d: int, node_fn: Callable[[Tensor, Tensor], Tensor] = smooth_bivariate_node
) -> Callable[[Tensor], Tensor]:
    r"""A hierarchically compositional function on a binary tree (Poggio et al. 2017, Fig. 1).

    For d = 8: :math:`f(x) = h(h(h(x_1, x_2), h(x_3, x_4)), h(h(x_5, x_6), h(x_7, x_8)))`,
    :math:`\log_2 d` levels of the same bivariate constituent h. Such an f of smoothness m is
    approximated to accuracy :math:`\varepsilon` by a deep net with the same tree structure with
    :math:`O((d-1)\varepsilon^{-2/m})` units, while a shallow net needs
    :math:`O(\varepsilon^{-d/m})` (Poggio et al. 2017, Thm. 2 and 1).

    Args:
        d (int): number of inputs, a power of 2.
        node_fn (Callable[[Tensor[...], Tensor[...]], Tensor[...]]): the constituent h,
            elementwise in its two arguments; default :func:`smooth_bivariate_node`.

    Returns:
        Callable[[Tensor[B, d]], Tensor[B]]: the function f.

    Example:
        >>> f = binary_tree_function(4, node_fn=lambda a, b: a * b)
        >>> f(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
        tensor([24.])
    """
    _check_tree_dim(d)

    def compositional(x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != d:
            raise ValueError(f"expected x of shape [B, {d}], got {list(x.shape)}")
        while x.shape[1] > 1:
            x = node_fn(x[:, 0::2], x[:, 1::2])
        return x[:, 0]

    return compositional


class TreeNet(nn.Module):
    r"""A deep locally connected net with the binary-tree structure of Poggio et al. (2017).

    Each of the d - 1 nodes is its own one-hidden-layer ReLU MLP
    :math:`\mathbb R^2 \to \mathbb R` of width ``node_width`` applied to the outputs of its two
    children; :math:`\log_2 d` levels; :math:`(d-1)(4\,\text{node\_width} + 1)` parameters.

    Args:
        d (int): number of inputs, a power of 2.
        node_width (int): hidden units per node, >= 1.
        dtype (torch.dtype, optional): parameter dtype.

    Shape:
        x (Tensor[B, d]) -> Tensor[B].

    Example:
        >>> net = TreeNet(8, node_width=4)
        >>> net(torch.zeros(5, 8)).shape, sum(p.numel() for p in net.parameters())
        (torch.Size([5]), 119)
    """

    def __init__(self, d: int, node_width: int, *, dtype: torch.dtype | None = None):
        super().__init__()
        levels = _check_tree_dim(d)
        _check_positive_int(node_width, "node_width")
        self.d, self.node_width = d, node_width
        self.hidden_weight = nn.ParameterList()
        self.hidden_bias = nn.ParameterList()
        self.out_weight = nn.ParameterList()
        self.out_bias = nn.ParameterList()
        for level in range(levels):
            nodes = d >> (level + 1)
            self.hidden_weight.append(nn.Parameter(torch.empty(nodes, node_width, 2, dtype=dtype)))
            self.hidden_bias.append(nn.Parameter(torch.empty(nodes, node_width, dtype=dtype)))
            self.out_weight.append(nn.Parameter(torch.empty(nodes, node_width, dtype=dtype)))
            self.out_bias.append(nn.Parameter(torch.empty(nodes, dtype=dtype)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default law per node: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        with torch.no_grad():
            for tensors, fan_in in (
                (self.hidden_weight, 2),
                (self.hidden_bias, 2),
                (self.out_weight, self.node_width),
                (self.out_bias, self.node_width),
            ):
                for p in tensors:
                    p.uniform_(-(fan_in**-0.5), fan_in**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"TreeNet expects x of shape [B, {self.d}], got {list(x.shape)}")
        for w1, b1, w2, b2 in zip(
            self.hidden_weight, self.hidden_bias, self.out_weight, self.out_bias
        ):
            pairs = x.reshape(x.shape[0], -1, 2)
            hidden = torch.relu(torch.einsum("bnk,nwk->bnw", pairs, w1) + b1)
            x = torch.einsum("bnw,nw->bn", hidden, w2) + b2
        return x[:, 0]

    def extra_repr(self) -> str:
        return f"d={self.d}, node_width={self.node_width}"


class ShallowNet(nn.Module):
    r"""A one-hidden-layer ReLU net :math:`\mathbb R^d \to \mathbb R` (the shallow baseline).

    :math:`(d + 2)\,\text{width} + 1` parameters; pick ``width`` with
    :meth:`matching_width` to compare against a :class:`TreeNet` of equal size.

    Args:
        d (int): number of inputs.
        width (int): hidden units, >= 1.
        dtype (torch.dtype, optional): parameter dtype.

    Shape:
        x (Tensor[B, d]) -> Tensor[B].

    Example:
        >>> tree = TreeNet(8, node_width=4)
        >>> ShallowNet.matching_width(8, sum(p.numel() for p in tree.parameters()))
        12
    """

    def __init__(self, d: int, width: int, *, dtype: torch.dtype | None = None):
        super().__init__()
        _check_positive_int(d, "d")
        _check_positive_int(width, "width")
        self.hidden = nn.Linear(d, width, dtype=dtype)
        self.out = nn.Linear(width, 1, dtype=dtype)

    @staticmethod
    def matching_width(d: int, num_params: int) -> int:
        """The width whose parameter count (d + 2) width + 1 is closest to num_params (>= 1)."""
        return max(1, round((num_params - 1) / (d + 2)))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.hidden(x)))[:, 0]
