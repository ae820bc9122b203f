"""Mean-field signal propagation in wide random networks: length and correlation maps, chi_1,
depth scales and the order-to-chaos line (Poole et al. 2016; Schoenholz et al. 2017).

Setting: a deep fully connected net h^{l+1} = W^{l+1} phi(h^l) + b^{l+1} with weights
W_ij ~ N(0, sigma_w2 / fan_in) and biases b_i ~ N(0, sigma_b2); ``sigma_w2`` and ``sigma_b2``
are variances throughout. In the infinite-width limit a pre-activation is Gaussian with variance
q^l (the *length*) and two inputs' pre-activations have correlation c^l:

    q^{l+1} = sigma_w2 E_z[phi(sqrt(q^l) z)^2] + sigma_b2                            (length map)
    c^{l+1} = (sigma_w2 E[phi(u1) phi(u2)] + sigma_b2) / q^{l+1},
              u1 = sqrt(q) z1,  u2 = sqrt(q) (c z1 + sqrt(1 - c^2) z2)          (correlation map)
    chi1    = sigma_w2 E_z[phi'(sqrt(q*) z)^2]                                  (slope at c = 1)

Gaussian expectations use composite Gauss-Legendre quadrature on [-9, 9] standard deviations,
with panel edges at the activation's kinks and on a grid at the activation's own scale (unit
spacing near 0, doubling outwards); tests/theory/test_meanfield.py checks them to 1e-10 relative
or better against closed forms (erf, relu, linear) and scipy quadrature, kinked activations
included.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence, Tuple

import numpy as np

from torch_dlt.theory.activations import Activation, ActivationLike, resolve_activation

__all__ = [
    "PhaseDiagram",
    "c_star",
    "chi1",
    "correlation_map",
    "critical_sigma_w2",
    "depth_scales",
    "gaussian_expectation",
    "length_map",
    "phase",
    "phase_diagram",
    "q_star",
]

_Z_MAX = 9.0  # the standard normal puts 2e-19 of its mass beyond
_Z_EDGES = np.linspace(-_Z_MAX, _Z_MAX, 25)
_LEGENDRE_NODES, _LEGENDRE_WEIGHTS = np.polynomial.legendre.leggauss(10)
# Panel edges at the activation's scale: tanh's poles sit at +-i pi/2, so unit panels near 0
# and panels that double outwards keep every pole several half-widths away from its panel.
_U_EDGES = np.concatenate(
    [-(2.0 ** np.arange(62, 2, -1)), np.arange(-4.0, 4.5, 1.0), 2.0 ** np.arange(3, 63)]
)
# Outer panel edges around a smoothed kink, in units of the smoothing width.
_BEND_STEPS = 2.0 ** np.arange(-2, 8)
# The length q* = 0 (an ordered net without biases) is evaluated as the limit q -> 0+.
_Q_TINY = 1e-300
# Below this a length counts as 0 (the ordered phase without biases).
_Q_TINY_SEARCH = 1e-250
# Beyond this a length counts as diverged (unbounded activation above its critical line).
_Q_HUGE = 1e100
# Where q* is infinite, E_q[f] -> (f(+inf) + f(-inf)) / 2; f is evaluated this far out.
_U_FAR = 1e8

Expectation = Callable[[np.ndarray], np.ndarray]


def _gaussian_expectation(
    f: Expectation, mean: np.ndarray, sd: float, breakpoints: Sequence[float]
) -> np.ndarray:
    """E[f(mean + sd Z)], Z ~ N(0, 1), for each entry of ``mean`` (float64 ndarrays).

    Composite Gauss-Legendre in z: panel edges on a uniform grid in z (for the Gaussian), and
    on the activation's grid and at ``breakpoints`` (kinks of f) mapped to z, each entry of
    ``mean`` with its own panels.
    """
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    if sd == 0.0:
        return f(mean)
    reach = _Z_MAX * sd
    breaks = np.concatenate([_U_EDGES, np.asarray(breakpoints, dtype=np.float64)])
    breaks = breaks[(breaks > mean.min() - reach) & (breaks < mean.max() + reach)]
    z_breaks = np.clip((breaks[None, :] - mean[:, None]) / sd, -_Z_MAX, _Z_MAX)
    z_grid = np.broadcast_to(_Z_EDGES, (mean.size, _Z_EDGES.size))
    edges = np.sort(np.concatenate([z_grid, z_breaks], axis=1), axis=1)
    half = 0.5 * np.diff(edges, axis=1)[..., None]
    z = 0.5 * (edges[:, 1:] + edges[:, :-1])[..., None] + half * _LEGENDRE_NODES
    weights = half * _LEGENDRE_WEIGHTS * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    with np.errstate(over="ignore"):
        values = f(mean[:, None, None] + sd * z)
    return np.sum(values * weights, axis=(1, 2))


def _expect(act: Activation, f: Expectation, q: float) -> float:
    """E[f(u)], u ~ N(0, q); q = inf is the limit (f(+inf) + f(-inf)) / 2."""
    if math.isinf(q):
        with np.errstate(over="ignore", invalid="ignore"):
            return float(0.5 * np.sum(f(np.array([_U_FAR, -_U_FAR]))))
    return float(_gaussian_expectation(f, np.zeros(1), math.sqrt(max(q, _Q_TINY)), act.kinks)[0])


def gaussian_expectation(activation: ActivationLike, f: Expectation, q: float) -> float:
    """E[f(u)] for u ~ N(0, q), for f built on ``activation`` (1e-10 relative or better against
    closed forms and scipy in tests/theory/test_meanfield.py).

    Composite Gauss-Legendre in z, with panels split at the activation's kinks so that
    piecewise-smooth integrands (relu, hard tanh, selu) converge at the smooth rate;
    ``q = 0`` is the limit q -> 0+ and ``q = inf`` the limit (f(+inf) + f(-inf)) / 2.

    Args:
        activation: whose kinks and scale set the panels (a name, an ``Activation`` or a
            numpy-vectorised callable).
        f: a numpy-vectorised function of u.
        q (float): the variance, >= 0.

    Example:
        >>> act = resolve_activation("relu")
        >>> round(gaussian_expectation(act, lambda u: act.derivative(u) ** 2, 3.0), 12)
        0.5
    """
    q = float(q)
    if math.isnan(q) or q < 0:
        raise ValueError(f"q (a variance) must be >= 0, got {q}")
    return _expect(resolve_activation(activation), f, q)


def _expect_pair(act: Activation, f: Expectation, g: Expectation, q: float, c: float) -> float:
    """E[f(u1) g(u2)] for (u1, u2) ~ N(0, q [[1, c], [c, 1]]): nested 1-D quadratures."""
    sd = math.sqrt(max(q, _Q_TINY))
    # (1 - c)(1 + c) keeps the digits of 1 - c^2 when c is near +-1
    inner_sd = sd * math.sqrt(max((1.0 - c) * (1.0 + c), 0.0))

    def integrand(u1: np.ndarray) -> np.ndarray:
        inner = _gaussian_expectation(g, c * u1, inner_sd, act.kinks)
        return f(u1) * inner.reshape(u1.shape)

    # The inner expectation smooths a kink k of g over a width inner_sd / |c| around u1 = k / c:
    # a narrow bend when c is near +-1, which the outer panels must resolve.
    outer_breaks = list(act.kinks)
    if c != 0.0 and inner_sd > 0.0:
        offsets = inner_sd / abs(c) * np.concatenate([-_BEND_STEPS, [0.0], _BEND_STEPS])
        for kink in act.kinks:
            outer_breaks.extend(kink / c + offsets)
    return float(_gaussian_expectation(integrand, np.zeros(1), sd, outer_breaks)[0])


def _check_variances(sigma_w2: float, sigma_b2: float) -> Tuple[float, float]:
    sigma_w2, sigma_b2 = float(sigma_w2), float(sigma_b2)
    if not (math.isfinite(sigma_w2) and sigma_w2 > 0):
        raise ValueError(f"sigma_w2 (weight variance) must be finite and > 0, got {sigma_w2}")
    if not (math.isfinite(sigma_b2) and sigma_b2 >= 0):
        raise ValueError(f"sigma_b2 (bias variance) must be finite and >= 0, got {sigma_b2}")
    return sigma_w2, sigma_b2


def _find_root(
    g: Callable[[float], float], lo: float, hi: float, g_lo: float, g_hi: float, atol: float
) -> float:
    """A root of g in [lo, hi] given g(lo) g(hi) <= 0: Illinois regula falsi (Dowell &
    Jarratt 1971), bisecting whenever a step fails to halve the bracket."""
    retained = 0  # +1: hi was kept by the last step, -1: lo was
    widths = [math.inf, math.inf]  # the bracket's width one and two steps back
    for _ in range(400):
        if g_lo == 0.0:
            return lo
        if g_hi == 0.0:
            return hi
        width = hi - lo
        if width <= max(atol, 4e-16 * max(abs(lo), abs(hi))):
            break
        x = hi - g_hi * width / (g_hi - g_lo)
        if not lo < x < hi or width > 0.5 * widths[0]:
            x = lo + 0.5 * width
        widths = [widths[1], width]
        gx = g(x)
        if (gx > 0) == (g_hi > 0):
            hi, g_hi = x, gx
            if retained == -1:
                g_lo *= 0.5
            retained = -1
        else:
            lo, g_lo = x, gx
            if retained == 1:
                g_hi *= 0.5
            retained = 1
    return lo + 0.5 * (hi - lo)


def _length_map(act: Activation, sigma_w2: float, sigma_b2: float, q: float) -> float:
    return sigma_w2 * _expect(act, lambda u: act.function(u) ** 2, q) + sigma_b2


def _q_star(act: Activation, sigma_w2: float, sigma_b2: float, q0: float) -> float:
    if act.positively_homogeneous:
        gain = sigma_w2 * _expect(act, lambda u: act.function(u) ** 2, 1.0)
        # gain is 1 up to rounding exactly on the critical point (relu: sigma_w2 = 2)
        if abs(gain - 1.0) <= 1e-12:
            return q0 if sigma_b2 == 0.0 else math.inf
        return sigma_b2 / (1.0 - gain) if gain < 1.0 else math.inf

    def excess(q: float) -> float:
        return _length_map(act, sigma_w2, sigma_b2, q) - q

    lo, g_lo = q0, excess(q0)
    if g_lo == 0.0:
        return q0
    if g_lo > 0:
        # lengths grow from q0: the fixed point is the first q above with L(q) <= q
        hi, g_hi = lo, g_lo
        while g_hi > 0:
            if hi > _Q_HUGE:
                return math.inf
            lo, g_lo = hi, g_hi
            hi = 8.0 * hi if hi < 1e6 else hi * hi
            g_hi = excess(hi)
        return _find_root(excess, lo, hi, g_lo, g_hi, atol=0.0)
    # lengths shrink from q0: the fixed point is the first q below with L(q) >= q
    hi, g_hi = lo, g_lo
    while g_lo < 0:
        if lo < _Q_TINY_SEARCH:
            return 0.0
        hi, g_hi = lo, g_lo
        lo = lo / 8.0 if lo > 1e-6 else lo * lo
        g_lo = excess(lo)
    return _find_root(excess, lo, hi, g_lo, g_hi, atol=0.0)


def _chi1(act: Activation, sigma_w2: float, q: float) -> float:
    return sigma_w2 * _expect(act, lambda u: act.derivative(u) ** 2, q)


def _correlation_map(
    act: Activation, sigma_w2: float, sigma_b2: float, c: float, q: float
) -> float:
    cross = _expect_pair(act, act.function, act.function, q, c)
    return (sigma_w2 * cross + sigma_b2) / _length_map(act, sigma_w2, sigma_b2, q)


def _c_star(act: Activation, sigma_w2: float, sigma_b2: float, q: float) -> float:
    if math.isinf(q) or _chi1(act, sigma_w2, q) <= 1.0:
        return 1.0

    def excess(c: float) -> float:
        return _correlation_map(act, sigma_w2, sigma_b2, c, q) - c

    # C(0) = (sigma_w2 E[phi]^2 + sigma_b2) / q* >= 0, and C(c) < c just below the unstable
    # fixed point c = 1 (slope chi1 > 1): walk 1 - 2^-k towards 1 to bracket the stable one.
    lo, g_lo = 0.0, excess(0.0)
    for k in range(1, 53):
        hi = 1.0 - 2.0**-k
        g_hi = excess(hi)
        if g_hi < 0:
            return _find_root(excess, lo, hi, g_lo, g_hi, atol=1e-16)
        lo, g_lo = hi, g_hi
    return 1.0


def _depth_scale(slope: float) -> float:
    """-1 / log|slope|: the depth over which a perturbation shrinking by ``slope`` per layer
    decays by e; infinite when it does not shrink."""
    if slope == 0.0:
        return 0.0
    return math.inf if abs(slope) >= 1.0 else -1.0 / math.log(abs(slope))


def length_map(activation: ActivationLike, sigma_w2: float, sigma_b2: float, q: float) -> float:
    """One step of the length map (Poole et al. 2016).

    q^{l+1} = sigma_w2 * E_{z ~ N(0,1)}[phi(sqrt(q^l) z)^2] + sigma_b2.

    Args:
        activation: a name (see ``torch_dlt.theory.ACTIVATIONS``), an ``Activation`` or a
            numpy-vectorised callable.
        sigma_w2: weight variance (W_ij ~ N(0, sigma_w2 / fan_in)), > 0.
        sigma_b2: bias variance, >= 0.
        q: the length q^l (variance of a pre-activation), >= 0.

    Returns:
        q^{l+1}.

    Example:
        >>> round(length_map("relu", 2.0, 0.0, 3.0), 12)  # He et al. 2015: lengths preserved
        3.0
    """
    act = resolve_activation(activation)
    sigma_w2, sigma_b2 = _check_variances(sigma_w2, sigma_b2)
    q = float(q)
    if not (math.isfinite(q) and q >= 0):
        raise ValueError(f"q (pre-activation variance) must be finite and >= 0, got {q}")
    return _length_map(act, sigma_w2, sigma_b2, q)


def q_star(
    activation: ActivationLike, sigma_w2: float, sigma_b2: float, *, q0: float = 1.0
) -> float:
    """The fixed point q* of the length map reached from q^0 (Poole et al. 2016).

    Found by bracketing from ``q0`` in the direction the length map moves, then Illinois root
    finding on L(q) - q to double precision, so also slow, near-critical convergence is exact.

    Args:
        activation: a name, an ``Activation`` or a numpy-vectorised callable.
        sigma_w2: weight variance, > 0.
        sigma_b2: bias variance, >= 0.
        q0: the input length q^0 the iteration starts from, > 0. It matters only where the
            length map has several stable fixed points, and for relu / linear exactly on their
            critical point without biases, where every q is fixed and q0 is returned.

    Returns:
        q*. ``0.0`` in the ordered phase without biases (signals die out, e.g. tanh with
        sigma_w2 < 1, sigma_b2 = 0). ``math.inf`` where an unbounded activation's lengths
        diverge (relu: sigma_w2 > 2, or sigma_w2 = 2 with sigma_b2 > 0; linear: sigma_w2 > 1;
        gelu / silu / selu likewise), or exceed 1e100.

    Example:
        >>> round(q_star("relu", 1.0, 0.5), 12)  # q = q / 2 + 0.5
        1.0
        >>> q_star("relu", 3.0, 0.0)
        inf
    """
    act = resolve_activation(activation)
    sigma_w2, sigma_b2 = _check_variances(sigma_w2, sigma_b2)
    q0 = float(q0)
    if not (math.isfinite(q0) and q0 > 0):
        raise ValueError(f"q0 (input length) must be finite and > 0, got {q0}")
    return float(_q_star(act, sigma_w2, sigma_b2, q0))


def chi1(activation: ActivationLike, sigma_w2: float, sigma_b2: float) -> float:
    """chi_1 = sigma_w2 * E_z[phi'(sqrt(q*) z)^2] (Poole et al. 2016).

    The slope of the correlation map at c = 1 and the factor by which a layer multiplies the
    mean squared gradient (Schoenholz et al. 2017): chi1 < 1 is the ordered phase,
    chi1 > 1 the chaotic one, chi1 = 1 the edge of chaos.

    Args:
        activation: a name, an ``Activation`` or a numpy-vectorised callable.
        sigma_w2: weight variance, > 0.
        sigma_b2: bias variance, >= 0.

    Returns:
        chi1 at q* = ``q_star(activation, sigma_w2, sigma_b2)``; where q* = 0 or inf, its
        limit (e.g. sigma_w2 * phi'(0)^2 for tanh without biases, sigma_w2 / 2 for relu).

    Example:
        >>> round(chi1("relu", 2.0, 0.0), 12)
        1.0
        >>> round(chi1("tanh", 0.5, 0.0), 12)  # q* = 0, chi1 = sigma_w2 tanh'(0)^2
        0.5
    """
    act = resolve_activation(activation)
    sigma_w2, sigma_b2 = _check_variances(sigma_w2, sigma_b2)
    return float(_chi1(act, sigma_w2, _q_star(act, sigma_w2, sigma_b2, 1.0)))


def correlation_map(
    activation: ActivationLike,
    sigma_w2: float,
    sigma_b2: float,
    c: float,
    q: float | None = None,
) -> float:
    """One step of the correlation map (Poole et al. 2016).

    For two inputs whose pre-activations both have length q and correlation c,

        c^{l+1} = (sigma_w2 E[phi(u1) phi(u2)] + sigma_b2) / q^{l+1},
        u1 = sqrt(q) z1, u2 = sqrt(q) (c z1 + sqrt(1 - c^2) z2), q^{l+1} = length_map(q).

    At the default q = q* the denominator is q* itself, as in the paper.

    Args:
        activation: a name, an ``Activation`` or a numpy-vectorised callable.
        sigma_w2: weight variance, > 0.
        sigma_b2: bias variance, >= 0.
        c: the correlation c^l, in [-1, 1].
        q: the shared length q^l, finite and >= 0; default q*.

    Returns:
        c^{l+1}.

    Raises:
        ValueError: q is left at q* and q* is infinite (no stationary length to correlate at).

    Example:
        >>> import math
        >>> c1 = correlation_map("relu", 2.0, 0.0, 0.0)  # arc-cosine kernel at c = 0: 1 / pi
        >>> math.isclose(c1, 1 / math.pi, rel_tol=1e-12)
        True
    """
    act = resolve_activation(activation)
    sigma_w2, sigma_b2 = _check_variances(sigma_w2, sigma_b2)
    c = float(c)
    if not -1.0 <= c <= 1.0:
        raise ValueError(f"c (correlation) must lie in [-1, 1], got {c}")
    if q is None:
        q = _q_star(act, sigma_w2, sigma_b2, 1.0)
        if math.isinf(q):
            raise ValueError(
                f"q* is infinite for {act.name} at sigma_w2={sigma_w2}, sigma_b2={sigma_b2} "
                "(lengths diverge); pass a finite q"
            )
    q = float(q)
    if not (math.isfinite(q) and q >= 0):
        raise ValueError(f"q (pre-activation variance) must be finite and >= 0, got {q}")
    return _correlation_map(act, sigma_w2, sigma_b2, c, q)


def c_star(activation: ActivationLike, sigma_w2: float, sigma_b2: float) -> float:
    """The stable fixed point c* of the correlation map at q* (Poole et al. 2016).

    c* = 1 in the ordered phase (chi1 <= 1); in the chaotic phase c = 1 is unstable and c* is
    the fixed point in [0, 1) reached by iterating the map from c = 0 (0 for odd activations
    without biases), found to ~1e-15 by bracketing and Illinois root finding.

    Args:
        activation: a name, an ``Activation`` or a numpy-vectorised callable.
        sigma_w2: weight variance, > 0.
        sigma_b2: bias variance, >= 0.

    Returns:
        c*; 1.0 where q* is infinite (the length-normalised map of an activation that is
        asymptotically linear has slope 1 at c = 1 there).

    Example:
        >>> c_star("tanh", 1.0, 0.05)
        1.0
        >>> round(c_star("tanh", 4.0, 0.0), 12)
        0.0
    """
    act = resolve_activation(activation)
    sigma_w2, sigma_b2 = _check_variances(sigma_w2, sigma_b2)
    return float(_c_star(act, sigma_w2, sigma_b2, _q_star(act, sigma_w2, sigma_b2, 1.0)))


def depth_scales(
    activation: ActivationLike, sigma_w2: float, sigma_b2: float
) -> Tuple[float, float]:
    """Depth scales xi_q, xi_c over which lengths and correlations reach their fixed points.

    Schoenholz et al. (2017): |q^l - q*| ~ exp(-l / xi_q) and
    |c^l - c*| ~ exp(-l / xi_c), with

        xi_q^{-1} = -log(chi1 + sigma_w2 E_z[phi''(sqrt(q*) z) phi(sqrt(q*) z)]),
        xi_c^{-1} = -log(sigma_w2 E[phi'(u1) phi'(u2)]) at (q*, c*).

    The first argument of the log is the slope of the length map at q*, computed here by
    Stein's lemma as sigma_w2 E[u phi(u) phi'(u)] / q* (no phi'' needed, kinks included).
    At c* = 1 the second is chi1, so xi_c = -1 / log(chi1) in the ordered phase and xi_c
    diverges at the edge of chaos; nets are trainable to a depth of about 6 xi_c.

    Args:
        activation: a name, an ``Activation`` or a numpy-vectorised callable.
        sigma_w2: weight variance, > 0.
        sigma_b2: bias variance, >= 0.

    Returns:
        (xi_q, xi_c); ``math.inf`` for a slope >= 1 (critical), and both infinite where q* is
        (lengths diverge and never settle).

    Example:
        >>> xi_q, xi_c = depth_scales("tanh", 0.5, 0.0)  # q* = 0: both slopes are sigma_w2
        >>> round(xi_c * math.log(2.0), 12), round(xi_q * math.log(2.0), 12)
        (1.0, 1.0)
    """
    act = resolve_activation(activation)
    sigma_w2, sigma_b2 = _check_variances(sigma_w2, sigma_b2)
    q = _q_star(act, sigma_w2, sigma_b2, 1.0)
    if math.isinf(q):
        return math.inf, math.inf
    q_eval = max(q, _Q_TINY)
    length_slope = (
        sigma_w2 * _expect(act, lambda u: u * act.function(u) * act.derivative(u), q_eval) / q_eval
    )
    c = _c_star(act, sigma_w2, sigma_b2, q)
    if c == 1.0:
        correlation_slope = _chi1(act, sigma_w2, q)
    else:
        correlation_slope = sigma_w2 * _expect_pair(act, act.derivative, act.derivative, q, c)
    return _depth_scale(length_slope), _depth_scale(correlation_slope)


def critical_sigma_w2(activation: ActivationLike, sigma_b2: float) -> float:
    """The weight variance on the order-to-chaos line: chi1(sigma_w2, sigma_b2) = 1.

    Poole et al. (2016); Schoenholz et al. (2017). Initialising there makes
    xi_c infinite, so signals and gradients propagate through arbitrarily deep nets. Known
    points: relu at sigma_b2 = 0 gives 2 (He et al. 2015), tanh at sigma_b2 = 0 gives 1.

    The first crossing of chi1 = 1 on the doubling grid sigma_w2 = sqrt(2) 2^k (k >= -8) is
    bracketed and refined to double precision by Illinois root finding.

    Args:
        activation: a name, an ``Activation`` or a numpy-vectorised callable.
        sigma_b2: bias variance, >= 0.

    Returns:
        The critical sigma_w2.

    Raises:
        ValueError: there is no edge of chaos at this sigma_b2: chi1 stays below 1 for
            sigma_w2 up to 2^40.5, or jumps across 1 where q* jumps between branches of the
            length map (gelu and silu with small sigma_b2, e.g. gelu at 0.05; continuous from
            about 0.15 for gelu and 1.0 for silu).

    Example:
        >>> round(critical_sigma_w2("relu", 0.0), 12)
        2.0
        >>> round(critical_sigma_w2("tanh", 0.0), 12)
        1.0
    """
    act = resolve_activation(activation)
    _, sigma_b2 = _check_variances(1.0, sigma_b2)
    critical, why_none = _critical_sigma_w2(act, sigma_b2)
    if why_none:
        raise ValueError(f"{act.name} has no edge of chaos at sigma_b2={sigma_b2}: {why_none}")
    return critical


def _critical_sigma_w2(act: Activation, sigma_b2: float) -> Tuple[float, str]:
    """(critical sigma_w2, "") or (nan, why there is none)."""

    def excess(sigma_w2: float) -> float:
        return _chi1(act, sigma_w2, _q_star(act, sigma_w2, sigma_b2, 1.0)) - 1.0

    if sigma_b2 == 0.0 and act.function(np.zeros(1))[0] == 0.0:
        # q = 0 is then a fixed point, where chi1 = sigma_w2 E_{q->0+}[phi'^2] is also the
        # length map's slope. q* from q0 grows with sigma_w2 (the map does), so if q* is still 0
        # just below the sigma_w2 where that slope reaches 1, chi1 first reaches 1 exactly there;
        # beyond it chi1 - 1 is only quadratic in the distance, too flat to bracket precisely.
        threshold = 1.0 / _expect(act, lambda u: act.derivative(u) ** 2, 0.0)
        if _q_star(act, threshold * (1.0 - 1e-6), 0.0, 1.0) == 0.0:
            return float(threshold), ""
    # The grid avoids powers of 2: an asymptotically relu-like activation (gelu, silu) has
    # chi1 = sigma_w2 / 2 = 1 at sigma_w2 = 2 where q* = inf, a touching point, not a crossing.
    lo, g_lo = 0.0, -1.0  # chi1 -> 0 with sigma_w2
    for k in range(-8, 41):
        hi = math.sqrt(2.0) * 2.0**k
        g_hi = excess(hi)
        if g_hi >= 0:
            root = _find_root(excess, lo, hi, g_lo, g_hi, atol=0.0)
            below, above = excess(root * (1 - 1e-9)) + 1.0, excess(root * (1 + 1e-9)) + 1.0
            if above - below > 1e-6:
                return math.nan, (
                    f"chi1 jumps from {below:.4g} to {above:.4g} at sigma_w2={root:.6g}, where "
                    "the length map loses the fixed point reached from q0 = 1 and q* jumps "
                    f"({_q_star(act, root * (1 - 1e-9), sigma_b2, 1.0):.4g} -> "
                    f"{_q_star(act, root * (1 + 1e-9), sigma_b2, 1.0):.4g}); "
                    "a larger sigma_b2 makes the transition continuous"
                )
            return float(root), ""
        lo, g_lo = hi, g_hi
    return math.nan, "chi1 < 1 for all sigma_w2 <= 2^40.5"


def phase(
    activation: ActivationLike, sigma_w2: float, sigma_b2: float, *, tol: float = 1e-3
) -> str:
    """The mean-field phase at (sigma_w2, sigma_b2) (Poole et al. 2016; Schoenholz et al. 2017).

    Args:
        activation: a name, an ``Activation`` or a numpy-vectorised callable.
        sigma_w2: weight variance, > 0.
        sigma_b2: bias variance, >= 0.
        tol: half-width of the band |chi1 - 1| <= tol called critical, >= 0.

    Returns:
        ``"ordered"`` (chi1 < 1 - tol: inputs' correlations go to 1, gradients vanish),
        ``"chaotic"`` (chi1 > 1 + tol: correlations decay, gradients explode; for unbounded
        activations the lengths themselves may diverge) or ``"critical"``.

    Example:
        >>> phase("tanh", 1.0, 0.05), phase("tanh", 1.76, 0.05), phase("tanh", 4.0, 0.05)
        ('ordered', 'critical', 'chaotic')
    """
    tol = float(tol)
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be finite and >= 0, got {tol}")
    slope = chi1(activation, sigma_w2, sigma_b2)
    if slope < 1.0 - tol:
        return "ordered"
    if slope > 1.0 + tol:
        return "chaotic"
    return "critical"


class PhaseDiagram(NamedTuple):
    """chi1 over a (sigma_b2, sigma_w2) grid and the order-to-chaos line.

    Attributes:
        sigma_w2 (ndarray[W]): weight variances (grid columns).
        sigma_b2 (ndarray[B]): bias variances (grid rows).
        chi1 (ndarray[B, W]): chi1 at each grid point.
        critical_sigma_w2 (ndarray[B]): the critical sigma_w2 for each sigma_b2; NaN where
            there is none (`critical_sigma_w2` raises there).
    """

    sigma_w2: np.ndarray
    sigma_b2: np.ndarray
    chi1: np.ndarray
    critical_sigma_w2: np.ndarray


def phase_diagram(
    activation: ActivationLike,
    sigma_w2: np.ndarray,
    sigma_b2: np.ndarray,
    *,
    plot: bool = False,
    ax: object | None = None,
) -> PhaseDiagram:
    """chi1 on a grid and the order-to-chaos line: the phase diagram of Poole et al. (2016)
    and Schoenholz et al. (2017).

    Args:
        activation: a name, an ``Activation`` or a numpy-vectorised callable.
        sigma_w2 (ndarray[W]): weight variances, each > 0.
        sigma_b2 (ndarray[B]): bias variances, each >= 0.
        plot: draw log(chi1) as a heat map (red chaotic, blue ordered) with the critical line;
            matplotlib is imported only then.
        ax: matplotlib Axes to draw on (implies ``plot``); a new figure's if omitted.

    Returns:
        The `PhaseDiagram`.

    Example:
        >>> d = phase_diagram("relu", [1.0, 2.0, 3.0], [0.0])
        >>> d.chi1.round(12).tolist(), d.critical_sigma_w2.round(12).tolist()
        ([[0.5, 1.0, 1.5]], [2.0])
    """
    act = resolve_activation(activation)
    weights = np.asarray(sigma_w2, dtype=np.float64).reshape(-1)
    biases = np.asarray(sigma_b2, dtype=np.float64).reshape(-1)
    if weights.size == 0 or biases.size == 0:
        raise ValueError("sigma_w2 and sigma_b2 must each hold at least one value")
    grid = np.array([[chi1(act, w, b) for w in weights] for b in biases])
    critical = np.array([_critical_sigma_w2(act, b)[0] for b in biases])
    diagram = PhaseDiagram(weights, biases, grid, critical)
    if plot or ax is not None:
        _plot_phase_diagram(act.name, diagram, ax)
    return diagram


def _plot_phase_diagram(name: str, diagram: PhaseDiagram, ax: object | None) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    log_chi1 = np.log(diagram.chi1)
    span = max(float(np.max(np.abs(log_chi1))), 1e-6)
    mesh = ax.pcolormesh(
        diagram.sigma_w2,
        diagram.sigma_b2,
        log_chi1,
        cmap="coolwarm",
        norm=TwoSlopeNorm(0.0, -span, span),
        shading="nearest",
    )
    ax.figure.colorbar(mesh, ax=ax, label=r"$\log \chi_1$")
    ax.plot(diagram.critical_sigma_w2, diagram.sigma_b2, "k-", label=r"$\chi_1 = 1$")
    ax.set_xlabel(r"$\sigma_w^2$")
    ax.set_ylabel(r"$\sigma_b^2$")
    ax.set_title(f"{name}: ordered (blue) / chaotic (red)")
    ax.legend(loc="upper left")
