"""Tests for torch_dlt.theory.isometry: free-probability predictions against Monte Carlo on wide
random nets, closed forms (Fuss-Catalan numbers) and scipy quadrature."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special

from torch_dlt.theory.isometry import (
    JacobianSpectrumMoments,
    derivative_moments,
    fuss_catalan_density,
    jacobian_spectrum_moments,
)
from torch_dlt.theory.meanfield import critical_sigma_w2

_TORCH_ACTIVATIONS = {
    "linear": lambda h: h,
    "tanh": torch.tanh,
    "hardtanh": torch.nn.functional.hardtanh,
    "relu": torch.relu,
}


def _weight(width: int, sigma_w2: float, weights: str, generator: torch.Generator) -> torch.Tensor:
    a = torch.randn(width, width, generator=generator, dtype=torch.float64)
    if weights == "gaussian":
        return a * math.sqrt(sigma_w2 / width)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)) * math.sqrt(sigma_w2)  # Haar (Mezzadri 2007)


def _monte_carlo_moments(
    activation: str,
    sigma_w2: float,
    sigma_b2: float,
    depth: int,
    weights: str,
    width: int,
    repeats: int,
    q_star: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """tr(JJ^T)/N and tr((JJ^T)^2)/N of real random nets, one input at the fixed point each.

    The net is run forward (h = W x + b, x = phi(h)) and J = prod D W accumulated alongside.
    """
    generator = torch.Generator().manual_seed(seed)
    phi = _TORCH_ACTIVATIONS[activation]
    first, second = [], []
    for _ in range(repeats):
        x = phi(torch.randn(width, generator=generator, dtype=torch.float64) * math.sqrt(q_star))
        jac = torch.eye(width, dtype=torch.float64)
        for _ in range(depth):
            w = _weight(width, sigma_w2, weights, generator)
            b = torch.randn(width, generator=generator, dtype=torch.float64) * math.sqrt(sigma_b2)
            h = (w @ x + b).requires_grad_()
            out = phi(h)
            (slope,) = torch.autograd.grad(out.sum(), h)
            x = out.detach()
            jac = slope[:, None] * (w @ jac)
        gram = jac @ jac.T
        first.append(float(torch.trace(gram)) / width)
        second.append(float((gram * gram).sum()) / width)
    return np.array(first), np.array(second)


@pytest.mark.parametrize(
    ("activation", "sigma_b2", "weights", "depth"),
    [
        ("linear", 0.0, "gaussian", 12),
        ("tanh", 1e-4, "gaussian", 10),
        ("tanh", 1e-4, "orthogonal", 15),
        ("tanh", 0.05, "orthogonal", 8),
        ("hardtanh", 0.05, "orthogonal", 8),
        ("relu", 0.0, "orthogonal", 8),
    ],
)
def test_mean_and_variance_match_monte_carlo_at_criticality(
    activation: str, sigma_b2: float, weights: str, depth: int
) -> None:
    width, repeats = 400, 5
    sigma_w2 = critical_sigma_w2(activation, sigma_b2)
    prediction = jacobian_spectrum_moments(activation, sigma_w2, sigma_b2, depth, weights=weights)
    m1, m2 = _monte_carlo_moments(
        activation, sigma_w2, sigma_b2, depth, weights, width, repeats, prediction.q_star, seed=0
    )
    # The overall scale tr(JJ^T)/N fluctuates by O(sqrt(depth / N)) from net to net; the shape
    # of the spectrum, var / mean^2, is self-averaging and matched tightly.
    normalised = m2 / m1**2 - 1
    expected = prediction.variance / prediction.mean**2
    stderr = normalised.std(ddof=1) / math.sqrt(repeats)
    assert abs(normalised.mean() - expected) <= 4 * stderr + 0.03 * expected, (
        normalised.mean(),
        expected,
    )
    assert prediction.mean == pytest.approx(1.0, abs=1e-9)  # chi1 = 1 at criticality
    assert abs(m1.mean() - prediction.mean) <= 4 * m1.std(ddof=1) / math.sqrt(repeats) + 0.02


def test_mean_and_variance_match_monte_carlo_off_criticality() -> None:
    """Ordered tanh (chi1 < 1): the mean shrinks as chi1^L and the variance scales with it."""
    sigma_w2, sigma_b2, depth, width, repeats = 1.3, 0.3, 6, 400, 5
    prediction = jacobian_spectrum_moments("tanh", sigma_w2, sigma_b2, depth, weights="gaussian")
    assert prediction.chi1 < 0.9
    m1, m2 = _monte_carlo_moments(
        "tanh", sigma_w2, sigma_b2, depth, "gaussian", width, repeats, prediction.q_star, seed=1
    )
    stderr = m1.std(ddof=1) / math.sqrt(repeats)
    assert abs(m1.mean() - prediction.mean) <= 4 * stderr + 0.02 * prediction.mean
    variance = m2 - m1**2
    stderr = variance.std(ddof=1) / math.sqrt(repeats)
    assert abs(variance.mean() - prediction.variance) <= 4 * stderr + 0.03 * prediction.variance


@pytest.mark.parametrize("depth", [1, 2, 5, 30])
@pytest.mark.parametrize("sigma_w2", [1.0, 0.7])
def test_linear_gaussian_moments_are_fuss_catalan_numbers(depth: int, sigma_w2: float) -> None:
    prediction = jacobian_spectrum_moments("linear", sigma_w2, 0.0, depth, num_moments=5)
    expected = [
        sigma_w2 ** (depth * k) * math.comb((depth + 1) * k, k) / (depth * k + 1)
        for k in range(1, 6)
    ]
    np.testing.assert_allclose(prediction.moments, expected, rtol=1e-10)
    assert prediction.variance == pytest.approx(depth * sigma_w2 ** (2 * depth), rel=1e-10)


def test_linear_orthogonal_net_is_exactly_isometric() -> None:
    prediction = jacobian_spectrum_moments(
        "linear", 1.0, 0.0, 200, weights="orthogonal", num_moments=4
    )
    np.testing.assert_allclose(prediction.moments, [1.0, 1.0, 1.0, 1.0], rtol=1e-12)
    assert abs(prediction.variance) < 1e-12
    m1, m2 = _monte_carlo_moments("linear", 1.0, 0.0, 20, "orthogonal", 200, 1, 1.0, seed=2)
    np.testing.assert_allclose([m1[0], m2[0]], [1.0, 1.0], rtol=1e-10)


@pytest.mark.parametrize(
    ("activation", "sigma_w2", "sigma_b2", "weights"),
    [
        ("tanh", 1.3, 0.3, "gaussian"),
        ("tanh", 2.5, 0.1, "orthogonal"),
        ("hardtanh", 1.2, 0.05, "gaussian"),
        ("erf", 1.0, 0.2, "orthogonal"),
        ("relu", 1.5, 0.5, "gaussian"),
    ],
)
def test_first_two_moments_have_the_closed_form(
    activation: str, sigma_w2: float, sigma_b2: float, weights: str
) -> None:
    """m1 = chi1^L and var = m1^2 L (mu2 / mu1^2 - 1 - s1), s1 = -1 (Gaussian) or 0."""
    depth = 7
    prediction = jacobian_spectrum_moments(
        activation, sigma_w2, sigma_b2, depth, weights=weights, num_moments=4
    )
    mu1, mu2 = prediction.derivative_moments[:2]
    s1 = -1.0 if weights == "gaussian" else 0.0
    assert prediction.mean == pytest.approx((sigma_w2 * mu1) ** depth, rel=1e-12)
    assert prediction.variance == pytest.approx(
        prediction.mean**2 * depth * (mu2 / mu1**2 - 1 - s1), rel=1e-9
    )


def test_relu_never_reaches_isometry_and_orthogonal_tanh_does() -> None:
    for depth in (10, 100, 1000):
        relu = jacobian_spectrum_moments("relu", 2.0, 0.0, depth, weights="orthogonal")
        assert relu.variance == pytest.approx(depth, rel=1e-9)  # mu2 / mu1^2 = 2: grows with L
    variances = []
    for sigma_b2 in (1e-2, 1e-5, 1e-10):
        sigma_w2 = critical_sigma_w2("tanh", sigma_b2)
        tanh = jacobian_spectrum_moments("tanh", sigma_w2, sigma_b2, 100, weights="orthogonal")
        gaussian = jacobian_spectrum_moments("tanh", sigma_w2, sigma_b2, 100, weights="gaussian")
        assert gaussian.variance > 100  # Gaussian weights: at least L, like the linear net
        variances.append(tanh.variance)
    assert variances[0] > variances[1] > variances[2]
    # q* -> 0 along the critical line: phi'(h)^2 = sech^4 h = 1 - 2 h^2 + O(h^4) has variance
    # 8 q*^2 + O(q*^3), so the spectrum collapses onto 1 with variance 8 L q*^2.
    assert variances[2] == pytest.approx(8 * 100 * tanh.q_star**2, rel=0.02)
    assert variances[2] < 1e-3


@pytest.mark.parametrize("q", [0.04, 0.7, 3.0, 400.0])
def test_derivative_moments_against_scipy(q: float) -> None:
    def gaussian_mean(f):
        sd = math.sqrt(q)
        value, _ = integrate.quad(
            lambda h: f(h) * math.exp(-h * h / (2 * q)) / (sd * math.sqrt(2 * math.pi)),
            -12 * sd,
            12 * sd,
            points=[-1.0, 0.0, 1.0],
            limit=200,
            epsabs=1e-14,
        )
        return value

    tanh = derivative_moments("tanh", q, 3)
    for k in range(1, 4):
        expected = gaussian_mean(lambda h, k=k: (1 - math.tanh(h) ** 2) ** (2 * k))
        assert tanh[k - 1] == pytest.approx(expected, rel=1e-10)
    # hard tanh: phi'^2 is the indicator of |h| < 1 for every power
    np.testing.assert_allclose(
        derivative_moments("hardtanh", q, 3), special.erf(1 / math.sqrt(2 * q)), rtol=1e-12
    )
    # selu: E[phi'^{2k}] = scale^{2k} / 2 + (scale alpha)^{2k} e^{2 k^2 q} Phi(-2k sqrt(q))
    alpha, scale = 1.6732632423543772, 1.0507009873554805
    expected = [
        scale ** (2 * k) / 2
        + (scale * alpha) ** (2 * k) * math.exp(2 * k * k * q + special.log_ndtr(-2 * k * q**0.5))
        for k in (1, 2)
    ]
    np.testing.assert_allclose(derivative_moments("selu", q, 2), expected, rtol=1e-11)


def _fuss_catalan_integral(depth: int, upper: float, power: int) -> float:
    """int_0^upper lam^power rho(lam) d lam, by composite Gauss-Legendre in t = log(lam)
    (the density grows like lam^{-L/(L+1)} at 0, so the mass below e^-120 is negligible), with
    panels shrinking geometrically towards ``upper``, where the density may have a square-root
    edge."""
    top = math.log(upper)
    edges = np.concatenate([np.linspace(-120.0, top - 1, 200), top - np.geomspace(1, 1e-12, 100)])
    nodes, weights = np.polynomial.legendre.leggauss(20)
    half = 0.5 * np.diff(edges)[:, None]
    t = 0.5 * (edges[1:] + edges[:-1])[:, None] + half * nodes
    lam = np.exp(t)
    return float(np.sum(half * weights * lam ** (power + 1) * fuss_catalan_density(lam, depth)))


def test_fuss_catalan_density_against_moments_and_monte_carlo() -> None:
    depth = 3
    edge = (depth + 1) ** (depth + 1) / depth**depth
    for k, expected in enumerate([1.0, 1.0, depth + 1.0, 22.0]):  # C(4k, k) / (3k + 1)
        assert _fuss_catalan_integral(depth, edge, k) == pytest.approx(expected, rel=1e-8)
    # the law of the squared singular values of a product of 3 independent Gaussian matrices
    generator = torch.Generator().manual_seed(3)
    width = 400
    jac = torch.eye(width, dtype=torch.float64)
    for _ in range(depth):
        jac = _weight(width, 1.0, "gaussian", generator) @ jac
    eigenvalues = torch.linalg.eigvalsh(jac @ jac.T).numpy()
    for threshold in (0.01, 0.1, 0.5, 2.0, 8.0):
        fraction = _fuss_catalan_integral(depth, threshold, 0)
        assert abs(np.mean(eigenvalues <= threshold) - fraction) < 0.03, threshold


def test_fuss_catalan_density_scales_with_sigma_w2() -> None:
    lam = np.array([0.3, 1.0, 4.0])
    np.testing.assert_allclose(
        fuss_catalan_density(lam, 4, sigma_w2=2.0), fuss_catalan_density(lam / 16, 4) / 16
    )


def test_unbounded_activation_uses_scale_invariance_of_its_derivative() -> None:
    """Linear above its critical line: q* is infinite, but phi' = 1 at every length."""
    prediction = jacobian_spectrum_moments("linear", 1.5, 0.0, 4, weights="orthogonal")
    assert math.isinf(prediction.q_star)
    assert prediction.mean == pytest.approx(1.5**4)
    assert prediction.variance == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("tanh", 1.0, 0.0, 0), {}, "depth"),
        (("tanh", 1.0, 0.0, 2.5), {}, "depth"),
        (("tanh", 1.0, 0.0, 3), {"weights": "uniform"}, "weights"),
        (("tanh", 1.0, 0.0, 3), {"num_moments": 1}, "num_moments"),
        (("tanh", -1.0, 0.0, 3), {}, "sigma_w2"),
        (("tanh", 1.0, -0.1, 3), {}, "sigma_b2"),
        (("softsign", 1.0, 0.0, 3), {}, "unknown activation"),
        (("gelu", 50.0, 0.0, 3), {}, "fixed point"),
    ],
)
def test_bad_arguments_raise_clear_errors(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        jacobian_spectrum_moments(*args, **kwargs)


def test_result_fields() -> None:
    prediction = jacobian_spectrum_moments("tanh", 1.2, 0.1, 5, weights="orthogonal")
    assert isinstance(prediction, JacobianSpectrumMoments)
    assert (prediction.activation, prediction.depth, prediction.weights) == (
        "tanh",
        5,
        "orthogonal",
    )
    assert prediction.second_moment == prediction.moments[1]
    with pytest.raises(ValueError, match="q"):
        derivative_moments("tanh", -1.0)
