"""Tests of torch_dlt/prune/frontend.py: bases against closed forms / scipy, the front end
against brute-force best K-term approximation."""

import itertools
import math

import pytest
import torch

from torch_dlt.prune import SparsifyingFrontEnd, orthonormal_basis, sparsify


@pytest.mark.parametrize(
    "basis, n, levels",
    [("dct", 7, None), ("dct", 16, None), ("haar", 16, None), ("haar", 12, 2), ("db4", 16, None),
     ("db4", 32, 2), ("db4", 12, 1)],
)  # fmt: skip
def test_bases_are_orthonormal(basis, n, levels):
    b = orthonormal_basis(basis, n, levels=levels)
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(b @ b.T, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(b.T @ b, eye, atol=1e-12, rtol=0)


def test_dct_matches_scipy():
    scipy_fft = pytest.importorskip("scipy.fft")
    x = torch.randn(3, 10, dtype=torch.float64)
    expected = torch.from_numpy(scipy_fft.dct(x.numpy(), type=2, norm="ortho", axis=-1))
    torch.testing.assert_close(x @ orthonormal_basis("dct", 10).T, expected)


def test_haar_level_is_pairwise_sums_and_differences():
    x = torch.randn(8, dtype=torch.float64)
    c = orthonormal_basis("haar", 8, levels=1) @ x
    torch.testing.assert_close(c[:4], (x[0::2] + x[1::2]) / math.sqrt(2))
    torch.testing.assert_close(c[4:], (x[0::2] - x[1::2]) / math.sqrt(2))


def test_db4_wavelets_have_two_vanishing_moments():
    # Daubechies-4 high-pass filters annihilate constants and ramps (away from the periodic wrap).
    n = 16
    b = orthonormal_basis("db4", n, levels=1)
    t = torch.arange(n, dtype=torch.float64)
    interior = b[n // 2 : n - 1]  # the last wavelet row wraps around the end
    zeros = torch.zeros(n // 2 - 1, dtype=torch.float64)
    torch.testing.assert_close(
        interior @ torch.ones(n, dtype=torch.float64), zeros, atol=1e-12, rtol=0
    )
    torch.testing.assert_close(interior @ t, zeros, atol=1e-12, rtol=0)
    # the scaling rows of a constant keep all its energy: sum of the low-pass taps is sqrt(2)
    root2 = torch.full((n // 2,), math.sqrt(2), dtype=torch.float64)
    torch.testing.assert_close(b[: n // 2] @ torch.ones(n, dtype=torch.float64), root2)


@pytest.mark.parametrize("basis", ["dct", "haar", "db4"])
def test_front_end_is_a_projection(basis):
    torch.manual_seed(0)
    front = SparsifyingFrontEnd(12, basis, size=(8, 16)).double()
    x = torch.rand(3, 2, 8, 16, dtype=torch.float64)
    y = front(x)
    torch.testing.assert_close(front(y), y, atol=1e-12, rtol=0)
    assert not torch.allclose(y, x)  # and not the identity at K < N


@pytest.mark.parametrize("basis", ["dct", "haar", "db4"])
def test_front_end_is_exact_at_k_equal_n(basis):
    front = SparsifyingFrontEnd(64, basis, size=8).double()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(front(x), x, atol=1e-12, rtol=0)


def test_front_end_is_the_best_k_term_approximation_by_brute_force():
    # In an orthonormal basis the best K-term approximation (least squared error over all
    # K-subsets of coefficients) keeps the K largest; check against every subset.
    torch.manual_seed(1)
    n, k = 4, 3
    b = orthonormal_basis("db4", n)
    basis2d = torch.einsum("ai,bj->abij", b, b).reshape(n * n, n, n)  # atoms B_a (x) B_b
    x = torch.randn(n, n, dtype=torch.float64)
    best = min(
        float((x - sum(torch.sum(x * basis2d[i]) * basis2d[i] for i in subset)).square().sum())
        for subset in itertools.combinations(range(n * n), k)
    )
    got = SparsifyingFrontEnd(k, "db4", size=n).double()(x)
    assert float((x - got).square().sum()) == pytest.approx(best, rel=1e-10)
    coefficients = b @ got @ b.T
    assert int((coefficients.abs() > 1e-12).sum()) == k


def test_each_slice_is_sparsified_on_its_own():
    torch.manual_seed(2)
    front = SparsifyingFrontEnd(5, "haar", size=8).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = front(x)
    for i, c in itertools.product(range(2), range(3)):
        torch.testing.assert_close(out[i, c], front(x[i, c]))


def test_jacobian_is_the_projection_onto_the_kept_support():
    # Differentiable a.e.: locally the map is B^T diag(mask) B with B = B_H (x) B_W.
    torch.manual_seed(3)
    b = orthonormal_basis("dct", 4)
    x = torch.randn(4, 4, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: sparsify(v, 6, b, b), x).reshape(16, 16)
    big = torch.kron(b, b)  # vec(B X B^T) = (B (x) B) vec(X) for row-major vec
    coefficients = big @ x.flatten()
    mask = torch.zeros(16, dtype=torch.float64)
    mask[coefficients.abs().argsort(descending=True)[:6]] = 1
    torch.testing.assert_close(jac, big.T @ torch.diag(mask) @ big, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0,), dict(size=8), "k must be an int in"),
        ((65,), dict(size=8), r"\[1, 64\]"),
        ((3, "wavelet"), dict(size=8), "basis must be one of"),
        ((3, "haar"), dict(size=8, levels=4), "divisible by 2\\*\\*levels"),
        ((3, "db4"), dict(size=(8, 6), levels=2), "size 6 allows at most 1"),
        ((3, "haar"), dict(size=7), "even size"),
        ((3,), dict(size=(8, 0)), "size must be"),
    ],
)
def test_bad_configuration_raises(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsifyingFrontEnd(*args, **kwargs)


def test_wrong_input_shape_raises():
    with pytest.raises(ValueError, match=r"\[\.\.\., 8, 8\].*\(2, 1, 7, 8\)"):
        SparsifyingFrontEnd(3, size=8)(torch.zeros(2, 1, 7, 8))
