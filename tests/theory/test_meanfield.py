"""Tests for torch_dlt.theory.meanfield: closed forms (arcsine, arc-cosine and linear kernels),
scipy quadrature, finite differences of the maps, brute-force iteration, and a Monte-Carlo
wide network."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize

from torch_dlt.theory import (
    ACTIVATIONS,
    Activation,
    c_star,
    chi1,
    correlation_map,
    critical_sigma_w2,
    depth_scales,
    length_map,
    phase,
    phase_diagram,
    q_star,
)

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946

# Scalar reference activations written independently of the library's numpy registry.
SCALAR = {
    "tanh": math.tanh,
    "relu": lambda u: max(u, 0.0),
    "erf": math.erf,
    "hardtanh": lambda u: min(max(u, -1.0), 1.0),
    "sigmoid": lambda u: 1.0 / (1.0 + math.exp(-u)) if u > -700 else 0.0,
    "gelu": lambda u: 0.5 * u * (1.0 + math.erf(u / math.sqrt(2.0))),
    "silu": lambda u: u / (1.0 + math.exp(-u)) if u > -700 else 0.0,
    "selu": lambda u: SELU_SCALE * (u if u > 0 else SELU_ALPHA * math.expm1(u)),
    "linear": lambda u: u,
}
KINKS = {"relu": [0.0], "hardtanh": [-1.0, 1.0], "selu": [0.0]}


def gaussian_quad(f, q, kinks=()):
    """E[f(u)], u ~ N(0, q), by adaptive quadrature split at 0 and the kinks."""
    sd = math.sqrt(q)
    points = sorted({0.0, *(k / sd for k in kinks if abs(k / sd) < 12)})
    edges = [-12.0, *points, 12.0]
    total = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        value, _ = integrate.quad(
            lambda z: f(sd * z) * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi),
            a,
            b,
            epsabs=0.0,
            epsrel=1e-13,
            limit=200,
        )
        total += value
    return total


def pair_quad(f, q, c, kinks=()):
    """E[f(u1) f(u2)] for unit-correlation-c Gaussians of variance q, nested adaptive quad."""
    sd, s = math.sqrt(q), math.sqrt(1 - c * c)

    def inner(z1):
        # kinks of f(u2) in z2: u2 = sd (c z1 + s z2) = k
        ks = [(k / sd - c * z1) / s for k in kinks]
        points = sorted(p for p in {0.0, *ks} if abs(p) < 12)
        edges = [-12.0, *points, 12.0]
        return sum(
            integrate.quad(
                lambda z2: f(sd * (c * z1 + s * z2)) * math.exp(-0.5 * z2 * z2),
                a,
                b,
                epsabs=1e-14,
                epsrel=1e-12,
            )[0]
            for a, b in zip(edges[:-1], edges[1:])
        ) / math.sqrt(2 * math.pi)

    points = sorted({0.0, *(k / sd for k in kinks)})
    edges = [-12.0, *points, 12.0]
    return sum(
        integrate.quad(
            lambda z1: f(sd * z1) * inner(z1) * math.exp(-0.5 * z1 * z1),
            a,
            b,
            epsabs=1e-14,
            epsrel=1e-11,
        )[0]
        for a, b in zip(edges[:-1], edges[1:])
    ) / math.sqrt(2 * math.pi)


def erf_kernel(q11, q22, q12):
    """Williams (1997): E[erf(u1) erf(u2)] = (2/pi) arcsin(2 S12 / sqrt((1+2 S11)(1+2 S22)))."""
    return 2 / math.pi * math.asin(2 * q12 / math.sqrt((1 + 2 * q11) * (1 + 2 * q22)))


def relu_kernel(q, c):
    """Cho & Saul (2009), arc-cosine kernel of degree 1: E[relu(u1) relu(u2)]."""
    theta = math.acos(c)
    return q / (2 * math.pi) * (math.sin(theta) + (math.pi - theta) * c)


@pytest.mark.parametrize("name", ["tanh", "erf", "hardtanh", "sigmoid", "gelu", "silu", "selu"])
@pytest.mark.parametrize("q", [0.01, 0.7, 9.0])
def test_length_map_matches_adaptive_quadrature(name, q):
    f = SCALAR[name]
    expected = 1.7 * gaussian_quad(lambda u: f(u) ** 2, q, KINKS.get(name, ())) + 0.2
    assert length_map(name, 1.7, 0.2, q) == pytest.approx(expected, rel=1e-10)


def test_erf_maps_match_arcsine_kernel():
    sw, sb, q = 2.3, 0.1, 0.8
    assert length_map("erf", sw, sb, q) == pytest.approx(sw * erf_kernel(q, q, q) + sb, rel=1e-12)
    q_next = sw * erf_kernel(q, q, q) + sb
    for c in [-0.9, -0.2, 0.0, 0.45, 0.99, 0.999999]:
        expected = (sw * erf_kernel(q, q, c * q) + sb) / q_next
        assert correlation_map("erf", sw, sb, c, q=q) == pytest.approx(expected, rel=1e-11)
    # chi1 = sigma_w2 E[(2/sqrt(pi))^2 exp(-2 u^2)] = sigma_w2 (4/pi) / sqrt(1 + 4 q*)
    qs = optimize.brentq(lambda x: sw * erf_kernel(x, x, x) + sb - x, 1e-6, 10.0, xtol=1e-15)
    assert q_star("erf", sw, sb) == pytest.approx(qs, rel=1e-12)
    assert chi1("erf", sw, sb) == pytest.approx(sw * 4 / math.pi / math.sqrt(1 + 4 * qs), rel=1e-12)


def test_erf_critical_line_matches_closed_form():
    sb = 0.05
    # on the line: sigma_w2 = (pi/4) sqrt(1 + 4 q) and q = sigma_w2 E[erf^2] + sigma_b2
    q_c = optimize.brentq(
        lambda x: math.pi / 4 * math.sqrt(1 + 4 * x) * erf_kernel(x, x, x) + sb - x,
        1e-6,
        10.0,
        xtol=1e-15,
    )
    expected = math.pi / 4 * math.sqrt(1 + 4 * q_c)
    assert critical_sigma_w2("erf", sb) == pytest.approx(expected, rel=1e-11)


def test_relu_maps_match_arc_cosine_kernel():
    sw, sb, q = 1.5, 0.3, 2.0
    q_next = sw * q / 2 + sb
    assert length_map("relu", sw, sb, q) == pytest.approx(q_next, rel=1e-13)
    for c in [-1.0, -0.5, 0.0, 0.3, 0.9, 0.9999]:
        expected = (sw * relu_kernel(q, c) + sb) / q_next
        assert correlation_map("relu", sw, sb, c, q=q) == pytest.approx(expected, rel=1e-12)
    assert q_star("relu", sw, sb) == pytest.approx(sb / (1 - sw / 2), rel=1e-13)
    assert chi1("relu", sw, sb) == pytest.approx(sw / 2, rel=1e-13)
    assert critical_sigma_w2("relu", 0.0) == pytest.approx(2.0, rel=1e-14)  # He et al. 2015
    assert critical_sigma_w2("relu", 0.4) == pytest.approx(2.0, rel=1e-12)


def test_relu_lengths_diverge_above_critical():
    assert q_star("relu", 2.5, 0.0) == math.inf
    assert q_star("relu", 2.0, 0.1) == math.inf
    assert q_star("relu", 2.0, 0.0, q0=3.5) == pytest.approx(3.5)  # every length is fixed
    assert depth_scales("relu", 2.5, 0.0) == (math.inf, math.inf)
    assert chi1("relu", 2.5, 0.0) == pytest.approx(1.25, rel=1e-12)
    assert c_star("relu", 2.5, 0.0) == 1.0
    with pytest.raises(ValueError, match="q\\* is infinite"):
        correlation_map("relu", 2.5, 0.0, 0.5)


def test_linear_maps():
    sw, sb, q, c = 0.6, 0.2, 1.3, 0.25
    expected = (sw * q * c + sb) / (sw * q + sb)
    assert correlation_map("linear", sw, sb, c, q=q) == pytest.approx(expected, rel=1e-13)
    assert q_star("linear", sw, sb) == pytest.approx(sb / (1 - sw), rel=1e-13)
    assert critical_sigma_w2("linear", 0.0) == pytest.approx(1.0, rel=1e-14)


@pytest.mark.parametrize(
    "name, q, c", [("tanh", 0.9, 0.6), ("tanh", 3.0, -0.4), ("hardtanh", 1.4, 0.7)]
)
def test_correlation_map_matches_nested_quadrature(name, q, c):
    f = SCALAR[name]
    sw, sb = 2.0, 0.05
    kinks = KINKS.get(name, ())
    q_next = sw * gaussian_quad(lambda u: f(u) ** 2, q, kinks) + sb
    expected = (sw * pair_quad(f, q, c, kinks) + sb) / q_next
    assert correlation_map(name, sw, sb, c, q=q) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", ["tanh", "hardtanh", "selu", "sigmoid"])
def test_chi1_is_the_slope_of_the_correlation_map_at_one(name):
    sw, sb = 1.3, 0.1
    steps = np.array([1e-4, 2.5e-5, 6.25e-6])
    slopes = [(1.0 - correlation_map(name, sw, sb, 1.0 - h)) / h for h in steps]
    # the one-sided difference is a + b sqrt(h) + O(h), b != 0 for kinked activations
    basis = np.stack([np.ones(3), np.sqrt(steps), steps], axis=1)
    extrapolated = np.linalg.solve(basis, slopes)[0]
    assert chi1(name, sw, sb) == pytest.approx(extrapolated, rel=1e-5)


def test_chi1_of_tanh_matches_quadrature():
    sw, sb = 1.9, 0.05
    qs = q_star("tanh", sw, sb)
    expected = sw * gaussian_quad(lambda u: (1 - math.tanh(u) ** 2) ** 2, qs)
    assert chi1("tanh", sw, sb) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(
    "name, sw, sb", [("tanh", 1.5, 0.05), ("tanh", 3.0, 0.3), ("erf", 0.8, 0.5)]
)
def test_q_star_is_the_limit_of_iterating_the_length_map(name, sw, sb):
    q = 1.0
    for _ in range(300):
        q = length_map(name, sw, sb, q)
    assert q_star(name, sw, sb) == pytest.approx(q, rel=1e-12)


def test_q_star_of_ordered_tanh_without_bias_is_zero():
    assert q_star("tanh", 0.8, 0.0) == 0.0
    assert q_star("tanh", 1.5, 0.0) > 0.1


@pytest.mark.parametrize("sw, sb", [(4.0, 0.05), (4.0, 0.3)])
def test_c_star_is_the_limit_of_iterating_the_correlation_map(sw, sb):
    c = 0.0
    for _ in range(200):  # xi_c ~ 7 here: 200 layers leave ~1e-12
        c = correlation_map("tanh", sw, sb, c)
    assert c_star("tanh", sw, sb) == pytest.approx(c, abs=1e-10)
    assert c < 1 - 1e-3


def test_c_star_is_a_fixed_point_near_the_edge_of_chaos():
    sw = critical_sigma_w2("tanh", 0.05) + 0.05
    cs = c_star("tanh", sw, 0.05)
    assert 0.9 < cs < 1.0
    assert correlation_map("tanh", sw, 0.05, cs) == pytest.approx(cs, abs=1e-14)
    # stable: the map moves nearby points towards c*
    assert correlation_map("tanh", sw, 0.05, cs - 0.01) > cs - 0.01
    assert correlation_map("tanh", sw, 0.05, cs + 0.01) < cs + 0.01


def test_c_star_is_one_in_the_ordered_phase_and_zero_for_odd_chaos_without_bias():
    assert c_star("tanh", 1.2, 0.05) == 1.0
    assert c_star("tanh", 3.0, 0.0) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("sw", [1.0, 1.5, 2.5, 4.0])
def test_depth_scales_are_the_log_slopes_of_the_maps(sw):
    sb, h = 0.05, 1e-5
    qs, cs = q_star("tanh", sw, sb), c_star("tanh", sw, sb)
    length_slope = (length_map("tanh", sw, sb, qs + h) - length_map("tanh", sw, sb, qs - h)) / (
        2 * h
    )
    xi_q, xi_c = depth_scales("tanh", sw, sb)
    assert xi_q == pytest.approx(-1 / math.log(length_slope), rel=1e-7)
    if cs == 1.0:
        assert xi_c == pytest.approx(-1 / math.log(chi1("tanh", sw, sb)), rel=1e-12)
    else:
        corr_slope = (
            correlation_map("tanh", sw, sb, cs + h) - correlation_map("tanh", sw, sb, cs - h)
        ) / (2 * h)
        assert xi_c == pytest.approx(-1 / math.log(corr_slope), rel=1e-6)


def test_depth_scale_c_diverges_at_the_edge_of_chaos():
    crit = critical_sigma_w2("tanh", 0.05)
    xi = [depth_scales("tanh", crit + d, 0.05)[1] for d in (-0.2, -0.02, -0.002)]
    assert xi[0] < xi[1] < xi[2]
    assert xi[2] > 100


def test_tanh_critical_line():
    # Poole et al. 2016: the line passes through (1, 0); Schoenholz et al. 2017, Fig. 1: ~1.76
    assert critical_sigma_w2("tanh", 0.0) == pytest.approx(1.0, rel=1e-12)
    crit = critical_sigma_w2("tanh", 0.05)
    assert crit == pytest.approx(1.76, abs=0.01)
    qs = optimize.brentq(
        lambda x: crit * gaussian_quad(lambda u: math.tanh(u) ** 2, x) + 0.05 - x, 0.01, 5.0
    )
    slope = crit * gaussian_quad(lambda u: (1 - math.tanh(u) ** 2) ** 2, qs)
    assert slope == pytest.approx(1.0, rel=1e-9)


def test_selu_critical_point_without_bias():
    # q = 0 loses stability where sigma_w2 E[phi'(0+-)^2] = sigma_w2 scale^2 (1 + alpha^2) / 2 = 1
    expected = 2 / (SELU_SCALE**2 * (1 + SELU_ALPHA**2))
    assert critical_sigma_w2("selu", 0.0) == pytest.approx(expected, rel=1e-12)


def test_gelu_edge_of_chaos_is_discontinuous_at_small_bias_and_continuous_at_large():
    with pytest.raises(ValueError, match="jumps"):
        critical_sigma_w2("gelu", 0.05)
    crit = critical_sigma_w2("gelu", 0.5)
    gelu = SCALAR["gelu"]
    qs = optimize.brentq(
        lambda x: crit * gaussian_quad(lambda u: gelu(u) ** 2, x) + 0.5 - x, 1.0, 200.0
    )

    def gelu_slope(u):
        return 0.5 * (1 + math.erf(u / math.sqrt(2))) + u * math.exp(-u * u / 2) / math.sqrt(
            2 * math.pi
        )

    assert crit * gaussian_quad(lambda u: gelu_slope(u) ** 2, qs) == pytest.approx(1.0, rel=1e-9)


def test_phase_labels():
    crit = critical_sigma_w2("tanh", 0.05)
    assert phase("tanh", crit - 0.3, 0.05) == "ordered"
    assert phase("tanh", crit, 0.05) == "critical"
    assert phase("tanh", crit + 0.3, 0.05) == "chaotic"
    assert phase("tanh", crit + 0.3, 0.05, tol=1.0) == "critical"


def test_callable_and_activation_objects_match_the_registry():
    sw, sb = 1.9, 0.05
    expected = (q_star("tanh", sw, sb), chi1("tanh", sw, sb), c_star("tanh", sw, sb))
    from_callable = (q_star(np.tanh, sw, sb), chi1(np.tanh, sw, sb), c_star(np.tanh, sw, sb))
    np.testing.assert_allclose(from_callable, expected, rtol=1e-9)
    custom = Activation.from_callable(np.tanh, lambda u: 1 / np.cosh(u) ** 2, name="mytanh")
    assert chi1(custom, sw, sb) == pytest.approx(expected[1], rel=1e-13)


def test_phase_diagram_grid_and_plot():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    diagram = phase_diagram("tanh", [1.0, 2.0], [0.0, 0.05], ax=ax)
    assert diagram.chi1.shape == (2, 2)
    assert diagram.chi1[1, 0] == pytest.approx(chi1("tanh", 1.0, 0.05), rel=1e-14)
    assert diagram.critical_sigma_w2[1] == pytest.approx(critical_sigma_w2("tanh", 0.05))
    assert len(ax.lines) == 1
    plt.close(fig)
    # no edge of chaos at sigma_b2 = 0.05 for gelu: a gap in the line, not an error
    gelu = phase_diagram("gelu", [1.0], [0.05, 0.5])
    assert math.isnan(gelu.critical_sigma_w2[0])
    assert gelu.critical_sigma_w2[1] == critical_sigma_w2("gelu", 0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sigma_w2": 0.0}, "sigma_w2"),
        ({"sigma_w2": -1.0}, "sigma_w2"),
        ({"sigma_w2": math.nan}, "sigma_w2"),
        ({"sigma_w2": math.inf}, "sigma_w2"),
        ({"sigma_b2": -0.1}, "sigma_b2"),
        ({"sigma_b2": math.inf}, "sigma_b2"),
        ({"activation": "swish"}, "accepted names: tanh, relu"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"activation": "tanh", "sigma_w2": 1.5, "sigma_b2": 0.05, **kwargs}
    for fn in (q_star, c_star, chi1, depth_scales):
        with pytest.raises(ValueError, match=match):
            fn(args["activation"], args["sigma_w2"], args["sigma_b2"])
    if "sigma_w2" not in kwargs:
        with pytest.raises(ValueError, match=match):
            critical_sigma_w2(args["activation"], args["sigma_b2"])


def test_bad_states_raise():
    with pytest.raises(ValueError, match="c \\(correlation\\)"):
        correlation_map("tanh", 1.0, 0.0, 1.5, q=1.0)
    with pytest.raises(ValueError, match="q \\(pre-activation variance\\)"):
        length_map("tanh", 1.0, 0.0, -1.0)
    with pytest.raises(ValueError, match="q0"):
        q_star("tanh", 1.0, 0.0, q0=0.0)
    with pytest.raises(TypeError, match="activation must be"):
        chi1(3, 1.0, 0.0)
    assert set(ACTIVATIONS) == set(SCALAR)


@torch.no_grad()
def test_wide_tanh_network_follows_the_maps():
    """Monte-Carlo: R independent width-N tanh nets; the measured length (mean squared
    pre-activation) and correlation of two inputs match the map iterates within 4 standard
    errors across nets (plus the O(1/N) finite-width bias)."""
    generator = torch.Generator().manual_seed(0)
    nets, width, depth, n_in = 12, 1000, 5, 400
    for sw, sb in [(1.2, 0.05), (3.0, 0.05)]:
        x = torch.randn(2, n_in, generator=generator, dtype=torch.float64)
        x[1] = 0.6 * x[0] + 0.8 * x[1]
        x = x / x.norm(dim=1, keepdim=True) * math.sqrt(n_in)  # (1/n_in) |x|^2 = 1
        q_in = float(x[0] @ x[0]) / n_in
        c_in = float(x[0] @ x[1]) / n_in / q_in
        # theory: layer 1 is affine in the input, then the maps
        q_theory = [sw * q_in + sb]
        c_theory = [(sw * q_in * c_in + sb) / q_theory[0]]
        for _ in range(depth - 1):
            c_theory.append(correlation_map("tanh", sw, sb, c_theory[-1], q=q_theory[-1]))
            q_theory.append(length_map("tanh", sw, sb, q_theory[-1]))
        h = x.expand(nets, 2, n_in)
        q_measured, c_measured = [], []
        for layer in range(depth):
            fan_in = h.shape[-1]
            w = torch.randn(nets, fan_in, width, generator=generator, dtype=torch.float64)
            b = torch.randn(nets, 1, width, generator=generator, dtype=torch.float64)
            inputs = h if layer == 0 else torch.tanh(h)
            h = inputs @ w * math.sqrt(sw / fan_in) + b * math.sqrt(sb)
            q_net = (h**2).mean(dim=-1)  # [nets, 2]
            q_measured.append(q_net.mean(dim=1))
            c_measured.append((h[:, 0] * h[:, 1]).mean(dim=-1) / q_net.prod(dim=1).sqrt())
        for layer in range(depth):
            for measured, theory in ((q_measured, q_theory), (c_measured, c_theory)):
                values = measured[layer].numpy()
                stderr = values.std(ddof=1) / math.sqrt(nets)
                assert abs(values.mean() - theory[layer]) < 4 * stderr + 2 / width, (
                    sw,
                    layer,
                    values.mean(),
                    theory[layer],
                )
