"""Tests of torch_dlt.ops.moments: compiled kernels against the pure-torch reference and numpy."""

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from torch_dlt import ops
from torch_dlt.ops import _reference

needs_ops = pytest.mark.skipif(not ops.has_ops(), reason="torch_dlt._C is not built")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.has_cuda_ops() else [])
SHAPES = [((1000, 7), 0), ((3, 20000), 1), ((4, 129, 70), 1), ((6, 5, 4, 3), 2), ((1,), 0),
          ((2, 3, 5), -1), ((100000,), 0), ((17, 2), 1)]  # fmt: skip
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float64: {"rtol": 1e-9, "atol": 1e-9}}


def _sample(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A skewed, heavy-tailed sample away from zero exercises every moment.
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = 2.0 + 3.0 * x + 0.5 * x * x
    return x.to(dtype=dtype, device=device)


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,dim", SHAPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_compiled_matches_reference(device, dtype, shape, dim, contiguous):
    x = _sample(shape, dtype, device)
    if not contiguous:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
        assert x.dim() == 1 or not x.is_contiguous()
    got = torch.ops.torch_dlt.moments(x, dim)
    want = _reference.moments(x.double(), dim)
    n = x.shape[dim]
    for name, g, w in zip(("mean", "var", "kurtosis"), got, want):
        assert g.dtype == dtype and g.device == x.device
        if name == "kurtosis" and n == 1:
            assert torch.isnan(g).all()
            continue
        assert_close(g.double(), w, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


def test_reference_matches_numpy_formulas():
    x = _sample((500, 4), torch.float64, "cpu").numpy()
    m = _reference.moments(torch.from_numpy(x), 0)
    d = x - x.mean(0)
    np.testing.assert_allclose(m.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.var.numpy(), x.var(0), rtol=1e-12)
    kurt = (d**4).mean(0) / (d**2).mean(0) ** 2 - 3.0
    np.testing.assert_allclose(m.kurtosis.numpy(), kurt, rtol=1e-10)


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
def test_stable_under_large_offset(device):
    # Sums of powers lose every digit at an offset of 1e9; the merged central sums must not.
    g = torch.Generator().manual_seed(1)
    u = torch.rand(300_000, generator=g, dtype=torch.float64)
    m = ops.Moments(*torch.ops.torch_dlt.moments((u + 1e9).to(device), 0))
    exact = _reference.moments(u, 0)  # the offset does not change var or kurtosis
    assert_close(m.var.cpu(), exact.var, rtol=1e-6, atol=0)
    assert_close(m.kurtosis.cpu(), exact.kurtosis, rtol=1e-5, atol=1e-6)
    assert abs(float(exact.kurtosis) + 1.2) < 0.02  # a uniform's excess kurtosis


@needs_ops
def test_constant_column_gives_nan_kurtosis_zero_var():
    x = torch.ones(50, 3)
    m = torch.ops.torch_dlt.moments(x, 0)
    assert_close(m[1], torch.zeros(3))
    assert torch.isnan(m[2]).all()


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    for shape, dim in [((64, 5), 0), ((3, 40, 6), 1), ((9,), 0)]:
        x = _sample(shape, dtype, device).requires_grad_(dtype == torch.float64)
        torch.library.opcheck(torch.ops.torch_dlt.moments.default, (x, dim))


@pytest.mark.parametrize("dim", [0, 1])
def test_gradcheck(dim):
    x = _sample((12, 5), torch.float64, "cpu").requires_grad_()
    assert torch.autograd.gradcheck(lambda t: tuple(ops.moments(t, dim)), (x,))


@needs_ops
def test_gradient_matches_reference_autograd():
    x = _sample((30, 4), torch.float64, "cpu").requires_grad_()
    w = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    compiled = sum((w[i] * t).sum() for i, t in enumerate(torch.ops.torch_dlt.moments(x, 0)))
    (g1,) = torch.autograd.grad(compiled, x)
    reference = sum((w[i] * t).sum() for i, t in enumerate(_reference.moments(x, 0)))
    (g2,) = torch.autograd.grad(reference, x)
    assert_close(g1, g2, rtol=1e-9, atol=1e-10)


def test_torch_compile_fullgraph():
    fn = torch.compile(lambda t: ops.moments(t, 1).var.sum(), fullgraph=True, backend="eager")
    x = _sample((8, 300), torch.float32, "cpu")
    assert_close(fn(x), _reference.moments(x, 1).var.sum(), rtol=1e-4, atol=1e-4)


def test_wrapper_upcasts_half_precision():
    x = _sample((400, 3), torch.float32, "cpu")
    m = ops.moments(x.to(torch.bfloat16), 0)
    assert m.mean.dtype == torch.float32
    assert_close(m.mean, _reference.moments(x.to(torch.bfloat16).float(), 0).mean)


@pytest.mark.parametrize(
    "x,dim,exc,match",
    [
        (torch.ones(3, dtype=torch.int64), 0, TypeError, "float32, float64"),
        (torch.ones(3, 4), 2, IndexError, "dim=2 is out of range"),
        (torch.ones(0, 4), 0, ValueError, "empty"),
        (torch.tensor(1.0), 0, ValueError, "0-d"),
        ([1.0, 2.0], 0, TypeError, "must be a Tensor"),
        (torch.ones(3), 0.5, TypeError, "dim must be an int"),
    ],
)
def test_bad_input_errors(x, dim, exc, match):
    with pytest.raises(exc, match=match):
        ops.moments(x, dim)


def test_has_ops_reports_the_path_in_use(monkeypatch):
    x = _sample((100, 2), torch.float64, "cpu")
    calls = []
    monkeypatch.setattr(_reference, "moments", lambda *a: calls.append(a) or (x[0], x[0], x[0]))
    ops.moments(x, 0)
    assert bool(calls) == (not ops.has_ops())
