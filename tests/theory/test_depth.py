"""Tests for torch_dlt.theory.depth: the constructive nets against numpy compositions, closed-form
errors on dyadic grids, and the exact region counter against brute-force slope counting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from torch_dlt.testing import ModelSnapshot
from torch_dlt.theory import (
    ShallowNet,
    TreeNet,
    binary_tree_function,
    count_linear_regions,
    count_linear_regions_along,
    linear_region_breakpoints,
    polynomial_net,
    sawtooth_net,
    smooth_bivariate_node,
    yarotsky_error_bound,
    yarotsky_product_net,
    yarotsky_square_net,
)


def _tent_numpy(x: np.ndarray, k: int) -> np.ndarray:
    for _ in range(k):
        x = np.where(x <= 0.5, 2.0 * x, 2.0 - 2.0 * x)
    return x


def _eval(net: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x).reshape(len(x), -1)).numpy().reshape(len(x), -1)


def _brute_force_pieces(values: np.ndarray, spacing: float) -> int:
    """Pieces of a sampled continuous piecewise-linear function: runs of equal secant slope.

    On a grid that contains every breakpoint (dyadic nets), each cell lies in one piece."""
    slopes = np.diff(values, axis=0) / spacing
    scale = max(1.0, np.abs(slopes).max())
    return 1 + int((np.abs(np.diff(slopes, axis=0)).max(axis=1) > 1e-9 * scale).sum())


def _autograd_slope_pieces(net: nn.Module, a: float, b: float, n: int) -> int:
    """Pieces seen by dense autograd: slope changes between consecutive sample points."""
    x = torch.linspace(a, b, n, dtype=torch.float64)[1:-1, None].requires_grad_()
    out = net(x)
    slopes = torch.stack(
        [
            torch.autograd.grad(out[:, j].sum(), x, retain_graph=True)[0][:, 0]
            for j in range(out.shape[1])
        ],
        dim=1,
    ).numpy()
    scale = max(1.0, np.abs(slopes).max())
    return 1 + int((np.abs(np.diff(slopes, axis=0)).max(axis=1) > 1e-9 * scale).sum())


@pytest.mark.parametrize("k", range(1, 9))
def test_sawtooth_equals_composed_tent_map_with_2k_pieces_and_2k1_maxima(k):
    x = np.arange(2 ** (k + 4) + 1) / 2 ** (k + 4)
    y = _eval(sawtooth_net(k), x)[:, 0]
    np.testing.assert_array_equal(y, _tent_numpy(x, k))
    assert _brute_force_pieces(y[:, None], x[1] - x[0]) == 2**k
    maxima = (y[1:-1] > y[:-2]) & (y[1:-1] > y[2:])
    assert maxima.sum() == 2 ** (k - 1)
    assert np.all(y[1:-1][maxima] == 1.0)
    assert count_linear_regions(sawtooth_net(k), (0.0, 1.0)) == 2**k
    np.testing.assert_array_equal(
        linear_region_breakpoints(sawtooth_net(k), (0.0, 1.0)), np.arange(2**k + 1) / 2**k
    )


def test_sawtooth_size_and_dtype():
    net = sawtooth_net(5, dtype=torch.float32)
    assert sum(p.numel() for p in net.parameters()) == 6 * 5 + 1
    assert sum(isinstance(layer, nn.ReLU) for layer in net) == 5
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert max(layer.out_features for layer in net if isinstance(layer, nn.Linear)) == 2


@pytest.mark.parametrize("m", range(1, 7))
def test_yarotsky_square_error_is_exactly_attained_at_midpoints(m):
    x = np.arange(2 ** (m + 6) + 1) / 2 ** (m + 6)
    err = np.abs(_eval(yarotsky_square_net(m), x)[:, 0] - x**2)
    assert abs(err.max() - 2.0 ** (-2 * m - 2)) < 1e-12
    assert yarotsky_error_bound(m) == 2.0 ** (-2 * m - 2)
    argmax = x[err > err.max() - 1e-12]
    np.testing.assert_array_equal(argmax * 2**m - 0.5, np.floor(argmax * 2**m))
    knots = np.arange(2**m + 1) / 2**m
    np.testing.assert_array_equal(_eval(yarotsky_square_net(m), knots)[:, 0], knots**2)
    assert count_linear_regions(yarotsky_square_net(m), (0.0, 1.0)) == 2**m


@pytest.mark.parametrize("m", range(1, 5))
def test_yarotsky_product_error_below_bound_and_attained(m):
    grid = np.concatenate([np.linspace(-1, 1, 161), np.arange(-32, 33) / 32])
    xx, yy = np.meshgrid(grid, grid)
    xy = np.stack([xx.ravel(), yy.ravel()], axis=1)
    net = yarotsky_product_net(m)
    err = np.abs(_eval(net, xy)[:, 0] - xy[:, 0] * xy[:, 1])
    bound = yarotsky_error_bound(m)
    assert err.max() <= bound + 1e-15
    corner = np.array([[2.0 ** (-m - 1), 2.0 ** (-m - 1)]])
    assert abs(_eval(net, corner)[0, 0] - corner[0, 0] ** 2) == pytest.approx(bound, abs=1e-15)
    dyadic = np.arange(-32, 33) / 32
    np.testing.assert_array_equal(_eval(net, np.stack([dyadic, 0 * dyadic], 1))[:, 0], 0 * dyadic)


@pytest.mark.parametrize("m", [2, 4])
def test_polynomial_net_error_below_proven_bound(m):
    rng = np.random.default_rng(0)
    coeffs = rng.normal(size=5)
    net, bound = polynomial_net(coeffs, m)
    x = np.linspace(0, 1, 4001)
    err = np.abs(_eval(net, x)[:, 0] - np.polynomial.polynomial.polyval(x, coeffs))
    assert err.max() <= bound + 1e-12
    assert bound == pytest.approx(
        2.0 ** (-2 * m - 2) * sum((k - 1) * abs(coeffs[k]) for k in range(2, 5))
    )


def test_polynomial_net_square_is_tight_and_affine_is_exact():
    net, bound = polynomial_net([0.0, 0.0, 1.0], 3)
    x = np.arange(2**10 + 1) / 2**10
    assert np.abs(_eval(net, x)[:, 0] - x**2).max() == pytest.approx(bound, abs=1e-14)
    net, bound = polynomial_net([0.5, -2.0], 3)
    assert bound == 0.0
    np.testing.assert_allclose(_eval(net, x)[:, 0], 0.5 - 2.0 * x, rtol=0, atol=1e-15)


def _random_net(seed: int, activation: nn.Module, out_features: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(1, 6),
        activation,
        nn.Linear(6, 5),
        activation,
        nn.Sequential(nn.Linear(5, 4), activation),
        nn.Identity(),
        nn.Linear(4, out_features),
    ).double()


@pytest.mark.parametrize(
    "seed, activation, out_features",
    [
        (0, nn.ReLU(), 1),
        (1, nn.ReLU(), 1),
        (2, nn.ReLU(), 3),
        (3, nn.LeakyReLU(0.1), 1),
        (4, nn.Hardtanh(-0.3, 0.4), 2),
        (5, nn.ReLU6(), 1),
    ],
)
def test_count_linear_regions_matches_dense_autograd(seed, activation, out_features):
    net = _random_net(seed, activation, out_features)
    count = count_linear_regions(net, (-3.0, 3.0))
    assert count == _autograd_slope_pieces(net, -3.0, 3.0, 200_001)
    assert count > 2  # the case is not trivial


def test_count_merges_pieces_of_equal_slope():
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
    assert count_linear_regions(net, (-1.0, 1.0)) == 1  # relu(x) - relu(x) = 0
    with torch.no_grad():
        net[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
    np.testing.assert_array_equal(linear_region_breakpoints(net, (-1.0, 1.0)), [-1.0, 0.0, 1.0])


def test_count_along_segment_matches_dense_autograd_and_scalar_reduction():
    net = yarotsky_product_net(2)
    # The ends are not on a kink, which a float32 segment could move inside by a sliver.
    x0 = torch.tensor([-0.9, 0.3], dtype=torch.float64)
    x1 = torch.tensor([0.7, -0.6], dtype=torch.float64)
    along = nn.Sequential(nn.Linear(1, 2).double(), *net)
    with torch.no_grad():
        along[0].weight.copy_((x1 - x0)[:, None])
        along[0].bias.copy_(x0)
    count = count_linear_regions_along(net, x0, x1)
    assert count == _autograd_slope_pieces(along, 0.0, 1.0, 200_001)
    assert count == count_linear_regions(along, (0.0, 1.0))
    assert count > 4


def test_counting_changes_nothing():
    net = _random_net(0, nn.ReLU()).float().eval()
    net[0].weight.requires_grad_(False)
    vector_net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    snapshot = ModelSnapshot.take(net)
    vector_snapshot = ModelSnapshot.take(vector_net)
    count_linear_regions(net, (-1.0, 1.0))
    count_linear_regions_along(vector_net, torch.zeros(3), torch.ones(3))
    snapshot.assert_unchanged(net)
    vector_snapshot.assert_unchanged(vector_net)


def test_constructions_do_not_touch_the_global_rng():
    state = torch.get_rng_state()
    sawtooth_net(3)
    yarotsky_product_net(2)
    polynomial_net([1.0, 2.0, 3.0], 2)
    assert torch.equal(state, torch.get_rng_state())


def test_bad_input_errors():
    with pytest.raises(ValueError, match="k must be"):
        sawtooth_net(0)
    with pytest.raises(TypeError, match="k must be"):
        sawtooth_net(2.0)
    with pytest.raises(ValueError, match="m must be"):
        yarotsky_square_net(0)
    with pytest.raises(ValueError, match="m must be"):
        yarotsky_product_net(-1)
    with pytest.raises(ValueError, match="coefficients"):
        polynomial_net([], 2)
    with pytest.raises(ValueError, match="a < b"):
        count_linear_regions(sawtooth_net(2), (1.0, 0.0))
    with pytest.raises(ValueError, match="a < b"):
        count_linear_regions(sawtooth_net(2), (0.5, 0.5))
    with pytest.raises(TypeError, match="Tanh"):
        count_linear_regions(nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)), (0, 1))
    with pytest.raises(ValueError, match="in_features|Linear"):
        count_linear_regions(yarotsky_product_net(1), (0.0, 1.0))
    with pytest.raises(ValueError, match="differ"):
        count_linear_regions_along(yarotsky_product_net(1), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="d=3"):
        count_linear_regions_along(yarotsky_product_net(1), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="power of 2"):
        TreeNet(6, 3)
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        binary_tree_function(8)(torch.zeros(2, 4))


def test_binary_tree_function_matches_explicit_composition():
    x = torch.rand(7, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = smooth_bivariate_node
    c = [x[:, i] for i in range(8)]
    expected = h(h(h(c[0], c[1]), h(c[2], c[3])), h(h(c[4], c[5]), h(c[6], c[7])))
    torch.testing.assert_close(binary_tree_function(8)(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(
        h(x[:, 0], x[:, 1]), torch.tanh(x[:, 0] * x[:, 1] + (x[:, 0] - x[:, 1]) / 2)
    )


def test_tree_net_matches_per_node_loop_and_shallow_sizes():
    torch.manual_seed(0)
    net = TreeNet(8, node_width=3, dtype=torch.float64)
    assert sum(p.numel() for p in net.parameters()) == 7 * (4 * 3 + 1)
    x = torch.randn(5, 8, dtype=torch.float64)
    level_input = x
    for w1, b1, w2, b2 in zip(net.hidden_weight, net.hidden_bias, net.out_weight, net.out_bias):
        outputs = []
        for node in range(w1.shape[0]):
            pair = level_input[:, 2 * node : 2 * node + 2]
            hidden = torch.relu(pair @ w1[node].T + b1[node])
            outputs.append(hidden @ w2[node] + b2[node])
        level_input = torch.stack(outputs, dim=1)
    torch.testing.assert_close(net(x), level_input[:, 0])
    # Locality: the first-level node on (x1, x2) sees only x1, x2.
    grad = torch.autograd.functional.jacobian(
        lambda z: torch.relu(z.reshape(1, 4, 2)[:, 0] @ net.hidden_weight[0][0].T), x[:1]
    )
    assert torch.all(grad[..., 2:] == 0)
    shallow = ShallowNet(8, ShallowNet.matching_width(8, 91))
    assert sum(p.numel() for p in shallow.parameters()) == (8 + 2) * 9 + 1
    assert shallow(x.float()).shape == (5,)
