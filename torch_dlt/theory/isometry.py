r"""Dynamical isometry: the predicted spectrum of a deep random net's input-output Jacobian.

Free-probability moments of :math:`JJ^\top` (Pennington, Schoenholz & Ganguli 2017, "Resurrecting
the sigmoid in deep learning through dynamical isometry"; 2018, "The emergence of spectral
universality in deep networks").

Setting: :math:`h^l = W^l x^{l-1} + b^l`, :math:`x^l = \phi(h^l)` for :math:`l = 1..L`, square
``N x N`` weights, ``N -> inf``, every pre-activation at the mean-field fixed point
:math:`h^l_i \sim \mathcal N(0, q^*)`. The input-output Jacobian is

.. math:: J = \frac{\partial x^L}{\partial x^0} = \prod_{l=L}^{1} D^l W^l, \qquad
          D^l = \operatorname{diag}(\phi'(h^l)),

and its squared singular values :math:`\lambda` are the eigenvalues of :math:`JJ^\top`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from torch_dlt.theory.activations import Activation, ActivationLike, resolve_activation
from torch_dlt.theory.meanfield import gaussian_expectation, q_star

__all__ = [
    "JacobianSpectrumMoments",
    "derivative_moments",
    "fuss_catalan_density",
    "jacobian_spectrum_moments",
]

_WEIGHTS = ("gaussian", "orthogonal")


def _derivative_length(act: Activation, q: float, sigma_w2: float, sigma_b2: float) -> float:
    """The length at which to take the law of phi'(h)^2, given the fixed point q*."""
    if math.isinf(q):
        if not act.positively_homogeneous:
            raise ValueError(
                f"{act.name} at sigma_w2={sigma_w2}, sigma_b2={sigma_b2} has no finite "
                "fixed point q* (pre-activation lengths diverge), so there is no stationary "
                "Jacobian spectrum; lower sigma_w2, e.g. to critical_sigma_w2(activation, "
                "sigma_b2)"
            )
        # phi'(a h) = phi'(h) for a > 0: the law of phi'(h)^2 does not depend on the length.
        return 1.0
    return q


def derivative_moments(activation: ActivationLike, q: float, num_moments: int = 2) -> np.ndarray:
    r"""Moments :math:`\mu_k = \mathbb E_{h \sim \mathcal N(0, q)}[\phi'(h)^{2k}]`, k = 1..K.

    The moments of the spectrum of :math:`D^2 = \operatorname{diag}(\phi'(h))^2` that enter the
    Jacobian spectrum (the :math:`\mu_k` of Pennington et al., 2017). Composite
    Gauss-Legendre quadrature split at the activation's kinks (see
    :func:`torch_dlt.theory.meanfield.gaussian_expectation`).

    Args:
        activation: a name in ``torch_dlt.theory.ACTIVATIONS``, an ``Activation`` or a
            numpy-vectorised callable.
        q (float): the pre-activation variance, finite and >= 0.
        num_moments (int): K >= 1.

    Returns:
        ndarray[K]: :math:`(\mu_1, ..., \mu_K)`.

    Example:
        >>> derivative_moments("relu", 3.0, 3)  # phi'(h)^2 is 0 or 1 with probability 1/2
        array([0.5, 0.5, 0.5])
    """
    act = resolve_activation(activation)
    q = float(q)
    if not (math.isfinite(q) and q >= 0):
        raise ValueError(f"q (pre-activation variance) must be finite and >= 0, got {q}")
    _check_count("num_moments", num_moments)
    return np.array(
        [
            gaussian_expectation(act, lambda h, k=k: act.derivative(h) ** (2 * k), q)
            for k in range(1, num_moments + 1)
        ]
    )


@dataclass(frozen=True)
class JacobianSpectrumMoments:
    r"""Predicted moments of the squared singular values :math:`\lambda` of a random net's Jacobian.

    Attributes:
        activation (str): the activation's name.
        sigma_w2 (float): weight variance (``W_ij ~ N(0, sigma_w2 / N)``, or ``sqrt(sigma_w2)``
            times a Haar orthogonal matrix).
        sigma_b2 (float): bias variance.
        depth (int): L, the number of (affine, activation) layers.
        weights (str): ``"gaussian"`` or ``"orthogonal"``.
        q_star (float): the fixed-point pre-activation variance the spectrum is taken at
            (``inf`` for relu / linear above criticality, whose phi'^2 does not depend on it).
        chi1 (float): :math:`\sigma_w^2 \mu_1`, the mean of :math:`\lambda` per layer.
        derivative_moments (tuple[float, ...]): :math:`\mu_k = E[\phi'(h)^{2k}]`, k = 1..K.
        moments (tuple[float, ...]): :math:`m_k = E[\lambda^k]`, k = 1..K, in the
            infinite-width limit.
    """

    activation: str
    sigma_w2: float
    sigma_b2: float
    depth: int
    weights: str
    q_star: float
    chi1: float
    derivative_moments: Tuple[float, ...]
    moments: Tuple[float, ...]

    @property
    def mean(self) -> float:
        r"""float: :math:`m_1 = E[\lambda] = \chi_1^L`."""
        return self.moments[0]

    @property
    def second_moment(self) -> float:
        r"""float: :math:`m_2 = E[\lambda^2]`."""
        return self.moments[1]

    @property
    def variance(self) -> float:
        r"""float: :math:`\sigma^2_{JJ^\top} = m_2 - m_1^2`."""
        return self.moments[1] - self.moments[0] ** 2


def jacobian_spectrum_moments(
    activation: ActivationLike,
    sigma_w2: float,
    sigma_b2: float,
    depth: int,
    *,
    weights: str = "gaussian",
    num_moments: int = 2,
) -> JacobianSpectrumMoments:
    r"""Predicted moments of the squared singular values of a deep random net's Jacobian.

    Free probability (Pennington, Schoenholz & Ganguli 2017): the weights and the
    diagonal derivative matrices are asymptotically free, so the S-transform of
    :math:`JJ^\top` is the product of the layers' S-transforms,

    .. math:: S_{JJ^\top}(z) = S_{D^2}(z)^L \; S_{W^\top W}(z)^L,

    with :math:`S_{W^\top W}(z) = 1 / (\sigma_w^2 (1 + z))` for Gaussian weights (Marchenko-
    Pastur, square) and :math:`1 / \sigma_w^2` for orthogonal ones, and :math:`S_{D^2}` the
    S-transform of the law of :math:`\phi'(h)^2`, :math:`h \sim \mathcal N(0, q^*)`. Writing
    the S-transform of a law with moments :math:`m_k` as the series
    :math:`S(z) = \frac{1}{m_1}\bigl(1 + (1 - m_2/m_1^2)\, z + \dots\bigr)` gives the paper's
    closed forms for the first two moments,

    .. math:: m_1 = (\sigma_w^2 \mu_1)^L = \chi_1^L, \qquad
              \frac{\sigma^2_{JJ^\top}}{m_1^2}
              = L \Bigl(\frac{\mu_2}{\mu_1^2} - 1 - s_1\Bigr),

    where :math:`s_1 = -1` (Gaussian) or :math:`0` (orthogonal) is the linear coefficient of
    :math:`\sigma_w^2 S_{W^\top W}`. At criticality (:math:`\chi_1 = 1`) this is the paper's
    :math:`\sigma^2_{JJ^\top} = L(\mu_2/\mu_1^2 - 1 - s_1)`: a linear Gaussian net has variance
    ``L``, a linear orthogonal one 0; relu (:math:`\mu_2/\mu_1^2 = 2`) has at least ``L`` for
    any weights, so never reaches isometry; tanh with orthogonal weights approaches it as
    :math:`q^* \to 0`. Higher moments are read off the same product of S-transforms by power
    series reversion.

    Args:
        activation: a name in ``torch_dlt.theory.ACTIVATIONS``, an ``Activation`` or a
            numpy-vectorised callable.
        sigma_w2 (float): weight variance, > 0.
        sigma_b2 (float): bias variance, >= 0.
        depth (int): L >= 1.
        weights (str): ``"gaussian"`` or ``"orthogonal"``.
        num_moments (int): how many moments :math:`E[\lambda^k]` to return, >= 2.

    Returns:
        JacobianSpectrumMoments: with ``mean``, ``variance`` and all ``moments``.

    Raises:
        ValueError: bad arguments, or a bounded activation whose lengths diverge (no q*).

    Example:
        >>> p = jacobian_spectrum_moments("linear", 1.0, 0.0, depth=10, num_moments=3)
        >>> [round(m, 9) for m in p.moments]  # Fuss-Catalan numbers C(11k, k) / (10k + 1)
        [1.0, 11.0, 176.0]
        >>> round(jacobian_spectrum_moments("relu", 2.0, 0.0, 10, weights="orthogonal").variance, 9)
        10.0
    """
    act = resolve_activation(activation)
    sigma_w2, sigma_b2 = float(sigma_w2), float(sigma_b2)
    if not (math.isfinite(sigma_w2) and sigma_w2 > 0):
        raise ValueError(f"sigma_w2 (weight variance) must be finite and > 0, got {sigma_w2}")
    if not (math.isfinite(sigma_b2) and sigma_b2 >= 0):
        raise ValueError(f"sigma_b2 (bias variance) must be finite and >= 0, got {sigma_b2}")
    _check_count("depth", depth)
    _check_count("num_moments", num_moments, minimum=2)
    if weights not in _WEIGHTS:
        raise ValueError(f"weights must be one of {_WEIGHTS}, got {weights!r}")

    q = q_star(act, sigma_w2, sigma_b2)
    mu = derivative_moments(act, _derivative_length(act, q, sigma_w2, sigma_b2), num_moments)
    if mu[0] <= 0.0:
        raise ValueError(
            f"{act.name} has E[phi'(h)^2] = 0 at q* = {q}: the Jacobian vanishes identically"
        )
    n = num_moments
    s_d2 = _s_transform(mu)
    if weights == "gaussian":
        s_w = (-1.0) ** np.arange(n) / sigma_w2  # 1 / (sigma_w2 (1 + z))
    else:
        s_w = np.eye(1, n)[0] / sigma_w2
    s_jj = _series_mul(_series_power(s_d2, depth, n), _series_power(s_w, depth, n), n)
    moments = _moments_from_s_transform(s_jj)
    return JacobianSpectrumMoments(
        activation=act.name,
        sigma_w2=sigma_w2,
        sigma_b2=sigma_b2,
        depth=int(depth),
        weights=weights,
        q_star=q,
        chi1=sigma_w2 * float(mu[0]),
        derivative_moments=tuple(float(m) for m in mu),
        moments=tuple(float(m) for m in moments),
    )


def fuss_catalan_density(
    squared_singular_values: np.ndarray, depth: int, sigma_w2: float = 1.0
) -> np.ndarray:
    r"""Density of the squared singular values of a deep *linear* Gaussian net's Jacobian.

    :math:`JJ^\top` for :math:`J = W^L \cdots W^1`, :math:`W_{ij} \sim \mathcal N(0,
    \sigma_w^2/N)`, tends to the Fuss-Catalan law of order L scaled by :math:`\sigma_w^{2L}`
    (its moments are :math:`\binom{(L+1)k}{k} / (Lk + 1)`), the linear case of Pennington et
    al. (2017). Evaluated through the parametrisation of Haagerup & Möller (2013,
    "The law of large numbers for the free multiplicative convolution"): for
    :math:`\varphi \in (0, \pi / (L + 1))`,

    .. math:: \lambda(\varphi) = \frac{\sin^{L+1}((L+1)\varphi)}
                                      {\sin\varphi \, \sin^L(L\varphi)}, \qquad
              \rho(\lambda(\varphi)) = \frac{1}{\pi} \frac{\sin^2\varphi \,
              \sin^{L-1}(L\varphi)}{\sin^L((L+1)\varphi)},

    with :math:`\lambda` decreasing from :math:`(L+1)^{L+1}/L^L` to 0.

    Args:
        squared_singular_values (ndarray[...]): points :math:`\lambda` to evaluate at.
        depth (int): L >= 1.
        sigma_w2 (float): weight variance, > 0.

    Returns:
        ndarray[...]: the density (0 outside the support).

    Example:
        >>> lam = np.array([1.0, 3.0, 5.0])
        >>> fuss_catalan_density(lam, depth=1).round(6)  # Marchenko-Pastur: sqrt((4-x)/x)/(2 pi)
        array([0.275664, 0.091888, 0.      ])
    """
    _check_count("depth", depth)
    sigma_w2 = float(sigma_w2)
    if not (math.isfinite(sigma_w2) and sigma_w2 > 0):
        raise ValueError(f"sigma_w2 (weight variance) must be finite and > 0, got {sigma_w2}")
    lam = np.asarray(squared_singular_values, dtype=np.float64) / sigma_w2**depth
    edge = (depth + 1) ** (depth + 1) / depth**depth
    inside = (lam > 0) & (lam < edge)
    # lambda(phi) is monotone on (0, pi / (L + 1)): invert it by bisection in log space.
    lo = np.zeros(np.count_nonzero(inside))
    hi = np.full_like(lo, math.pi / (depth + 1))
    target = np.log(lam[inside])
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        above = _log_fuss_catalan_lambda(mid, depth) > target
        lo = np.where(above, mid, lo)
        hi = np.where(above, hi, mid)
    phi = 0.5 * (lo + hi)
    density = np.zeros_like(lam)
    density[inside] = np.exp(
        2 * np.log(np.sin(phi))
        + (depth - 1) * np.log(np.sin(depth * phi))
        - depth * np.log(np.sin((depth + 1) * phi))
    ) / (math.pi * sigma_w2**depth)
    return density


def _log_fuss_catalan_lambda(phi: np.ndarray, depth: int) -> np.ndarray:
    return (
        (depth + 1) * np.log(np.sin((depth + 1) * phi))
        - np.log(np.sin(phi))
        - depth * np.log(np.sin(depth * phi))
    )


def _check_count(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# Power series are float64 arrays of coefficients, index = power of z, truncated to n terms.


def _series_mul(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    return np.convolve(a, b)[:n]


def _series_power(a: np.ndarray, exponent: int, n: int) -> np.ndarray:
    result = np.eye(1, n)[0]
    while exponent:
        if exponent & 1:
            result = _series_mul(result, a, n)
        a = _series_mul(a, a, n)
        exponent >>= 1
    return result


def _series_compose(f: np.ndarray, g: np.ndarray, n: int) -> np.ndarray:
    """f(g(z)) for g(0) = 0, by Horner's rule."""
    result = np.zeros(n)
    for coefficient in f[:n][::-1]:
        result = _series_mul(result, g, n)
        result[0] += coefficient
    return result


def _series_reversion(f: np.ndarray) -> np.ndarray:
    """The compositional inverse g of f (f(0) = 0, f'(0) != 0): f(g(z)) = z to order len(f)."""
    n = len(f)
    g = np.zeros(n)
    g[1] = 1.0 / f[1]
    # the z^k coefficient of f(g) is f_1 g_k plus terms in g_1..g_{k-1} only
    for k in range(2, n):
        g[k] -= _series_compose(f, g, n)[k] / f[1]
    return g


def _s_transform(moments: np.ndarray) -> np.ndarray:
    r"""S-transform series (n terms) of a law with moments :math:`m_1..m_n`.

    :math:`\psi(z) = \sum_k m_k z^k`, :math:`S(z) = \frac{1 + z}{z} \psi^{-1}(z)` (Voiculescu;
    Pennington et al. 2017).
    """
    n = len(moments)
    inverse = _series_reversion(np.concatenate([[0.0], moments]))
    return _series_mul(np.array([1.0, 1.0]), inverse[1:], n)


def _moments_from_s_transform(s: np.ndarray) -> np.ndarray:
    """Inverse of `_s_transform`: moments m_1..m_n from the n-term S-transform series."""
    n = len(s)
    # psi^{-1}(z) = z S(z) / (1 + z)
    inverse = np.concatenate([[0.0], _series_mul(s, (-1.0) ** np.arange(n), n)])
    return _series_reversion(inverse)[1:]
