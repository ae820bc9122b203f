"""Tests of torch_dlt.theory.intrinsic_dim against manifolds of known dimension and numpy loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torch_dlt.theory.intrinsic_dim import (
    hein_audibert_dimension,
    intrinsic_dimension,
    mle_dimension,
    nearest_neighbor_distances,
    pointwise_mle_dimension,
    twonn_dimension,
)

N_POINTS = 3000
AMBIENT = 50
ESTIMATORS = {
    "mle": mle_dimension,
    "twonn": twonn_dimension,
    "hein": hein_audibert_dimension,
}


def _embed(z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # A random orthogonal map R^m -> R^50 keeps all distances, hence the dimension.
    q, _ = np.linalg.qr(rng.standard_normal((AMBIENT, z.shape[1])))
    return z @ q.T


def _manifold(name: str, m: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "cube":
        return _embed(rng.random((N_POINTS, m)), rng)
    if name == "sphere":
        g = rng.standard_normal((N_POINTS, m + 1))
        return _embed(g / np.linalg.norm(g, axis=1, keepdims=True), rng)
    t = 1.5 * np.pi * (1 + 2 * rng.random(N_POINTS))
    height = 21 * rng.random(N_POINTS)
    return _embed(np.stack([t * np.cos(t), height, t * np.sin(t)], axis=1), rng)


@pytest.mark.parametrize(
    ("name", "m"), [("cube", 2), ("cube", 5), ("sphere", 2), ("sphere", 5), ("swiss_roll", 2)]
)
@pytest.mark.parametrize("method", sorted(ESTIMATORS))
def test_estimators_recover_known_dimension(name: str, m: int, method: str) -> None:
    X = _manifold(name, m)
    assert abs(ESTIMATORS[method](X) - m) <= 0.1 * m


@pytest.mark.parametrize("method", sorted(ESTIMATORS))
def test_cube_8_within_boundary_bias(method: str) -> None:
    # With 3000 points in [0,1]^8 most neighbourhoods touch a face, which thins them and biases
    # every k-NN estimator down (Levina & Bickel 2004, Fig. 2); 15% covers that bias, not 10%.
    estimate = ESTIMATORS[method](_manifold("cube", 8))
    assert 0.85 * 8 <= estimate <= 8.4


def test_intrinsic_dimension_dispatches_to_each_estimator() -> None:
    X = _manifold("sphere", 2)
    assert intrinsic_dimension(X, method="mle") == mle_dimension(X)
    assert intrinsic_dimension(X, method="mle", k=12) == mle_dimension(X, k=12)
    assert intrinsic_dimension(X, method="twonn") == twonn_dimension(X)
    assert intrinsic_dimension(X, method="hein", k=30) == hein_audibert_dimension(X, k=30)


def test_torch_input_matches_numpy_input() -> None:
    X = _manifold("cube", 2)[:500]
    assert mle_dimension(torch.from_numpy(X)) == pytest.approx(mle_dimension(X), rel=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_knn_matches_brute_force_loop(chunk_size: int | None) -> None:
    rng = np.random.default_rng(1)
    X = rng.standard_normal((60, 4))
    distances, indices = nearest_neighbor_distances(X, 5, chunk_size=chunk_size)
    for i in range(60):
        row = [(math.dist(X[i], X[j]), j) for j in range(60) if j != i]
        row.sort()
        np.testing.assert_allclose(distances[i].numpy(), [d for d, _ in row[:5]], rtol=1e-12)
        assert indices[i].tolist() == [j for _, j in row[:5]]


def test_knn_float32_selection_keeps_float64_distances() -> None:
    rng = np.random.default_rng(2)
    X = rng.standard_normal((40, 3))
    distances, _ = nearest_neighbor_distances(torch.from_numpy(X).float(), 3)
    reference = np.sort(np.linalg.norm(X[:, None] - X[None], axis=2) + np.eye(40) * 1e9, axis=1)
    assert distances.dtype == torch.float64
    np.testing.assert_allclose(distances.numpy(), reference[:, :3], rtol=1e-6)


def test_twonn_mle_closed_form_on_hand_example() -> None:
    # Points 0, 1, 3, 7 on a line: (r1, r2) = (1, 3), (1, 2), (2, 3), (4, 6).
    X = np.array([[0.0], [1.0], [3.0], [7.0]])
    expected = 4 / (math.log(3) + math.log(2) + math.log(1.5) + math.log(1.5))
    assert twonn_dimension(X, fit="mle") == pytest.approx(expected, rel=1e-12)


def test_twonn_linear_fit_on_hand_example() -> None:
    # Same points, no discarding but the last (F = 1): fit -log(1 - i/4) = d log(mu_(i)).
    X = np.array([[0.0], [1.0], [3.0], [7.0]])
    log_mu = np.sort(np.log([3.0, 2.0, 1.5, 1.5]))[:3]
    y = -np.log(1 - np.arange(1, 4) / 4)
    expected = (log_mu @ y) / (log_mu @ log_mu)
    assert twonn_dimension(X, discard_fraction=0.0) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_pointwise_mle_matches_direct_numpy(unbiased: bool) -> None:
    rng = np.random.default_rng(3)
    X = rng.random((80, 3))
    k = 6
    ours = pointwise_mle_dimension(X, k=k, unbiased=unbiased).numpy()
    order = np.lexsort(X.T[::-1])  # torch.unique(dim=0) sorts rows lexicographically
    expected = []
    for i in order:
        t = np.sort(np.linalg.norm(X - X[i], axis=1))[1 : k + 1]
        expected.append((k - 2 if unbiased else k - 1) / np.sum(np.log(t[-1] / t[:-1])))
    np.testing.assert_allclose(ours, expected, rtol=1e-10)


def test_mle_averages_follow_levina_bickel_and_mackay_ghahramani() -> None:
    X = _manifold("cube", 2)[:400]
    local = {k: pointwise_mle_dimension(X, k=k).numpy() for k in (4, 5, 6)}
    inverse = np.mean([1 / np.mean(1 / local[k]) for k in local])
    direct = np.mean([np.mean(local[k]) for k in local])
    assert mle_dimension(X, k=(4, 6)) == pytest.approx(inverse, rel=1e-12)
    assert mle_dimension(X, k=(4, 6), average="estimate") == pytest.approx(direct, rel=1e-12)


def test_hein_u_statistic_matches_pair_loop() -> None:
    rng = np.random.default_rng(4)
    X = rng.random((50, 3))
    h = 0.5
    r2 = np.sum((X[:, None] - X[None]) ** 2, axis=2)[np.triu_indices(50, 1)]
    u = [np.sum(np.clip(1 - r2 / s**2, 0, None) ** 3) for s in (h, h / 2)]
    assert hein_audibert_dimension(X, h=h, chunk_size=9) == pytest.approx(
        math.log2(u[0] / u[1]), rel=1e-10
    )


def test_duplicates_are_dropped_with_a_warning() -> None:
    X = _manifold("cube", 2)[:500]
    with pytest.warns(UserWarning, match="dropped 100 duplicate"):
        doubled = twonn_dimension(np.concatenate([X, X[:100]]))
    assert doubled == pytest.approx(twonn_dimension(X), rel=1e-12)


@pytest.mark.parametrize(
    ("X", "kwargs", "error", "match"),
    [
        (np.zeros(10), {}, ValueError, "2-D"),
        ([[0.0, 1.0]], {}, TypeError, "Tensor or numpy"),
        (np.array([[0.0, np.nan], [1.0, 2.0], [2, 2]]), {}, ValueError, "NaN"),
        (np.random.default_rng(0).random((10, 2)), {"k": 0}, ValueError, "k must be >= 1"),
        (np.random.default_rng(0).random((10, 2)), {"k": 10}, ValueError, "k must be < "),
        (np.random.default_rng(0).random((10, 2)), {"method": "pca"}, ValueError, "method"),
        (np.random.default_rng(0).random((10, 2)), {"method": "twonn", "k": 5}, ValueError, "k"),
        (np.random.default_rng(0).random((2, 2)), {"method": "twonn"}, ValueError, "3 distinct"),
    ],
)
def test_bad_input_errors(X: object, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        intrinsic_dimension(X, **kwargs)


def test_mle_needs_two_neighbours() -> None:
    with pytest.raises(ValueError, match="k must be >= 2"):
        mle_dimension(np.random.default_rng(0).random((10, 2)), k=1)
