"""Tests of the certified-bound ops (torch_dlt.ops.relu_lines, ibp_relu_): the compiled kernels
against plain autograd of the defining expressions, gradcheck, opcheck, soundness of the interval
step, and the bounds of torch_dlt.robust with and without the kernels."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from torch_dlt import ops
from torch_dlt.ops import bounds as ob
from torch_dlt.robust import bounds

COMPILED = ops.has_bounds_ops()
needs_ops = pytest.mark.skipif(
    not COMPILED, reason="torch_dlt._C (with the bound ops) is not built"
)
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 1e-12, "atol": 1e-12}}


def _lines_inputs(batch=3, rows=4, units=37, dtype=torch.float64, v_all="batch", seed=0):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    A = draw(batch, rows, units)
    A[:, :, :3] = 0.0  # exact zeros take the lower line
    slope_l = torch.rand(batch, units, generator=g, dtype=torch.float64).to(dtype)
    slope_u = torch.rand(batch, units, generator=g, dtype=torch.float64).to(dtype)
    v_neg = draw(batch, units)
    vall = {"none": None, "batch": draw(batch, units), "shared": draw(1, units)}[v_all]
    return A, slope_l, slope_u, v_neg, vall


def _plain(A, slope_l, slope_u, v_neg, v_all):
    """The definition elementwise: A >= 0 takes the lower line, A < 0 the upper."""
    slope = torch.where(A < 0, slope_u.unsqueeze(1), slope_l.unsqueeze(1))
    bias = torch.where(A < 0, A * v_neg.unsqueeze(1), torch.zeros_like(A)).sum(-1)
    if v_all is not None:
        bias = bias + (A * v_all.unsqueeze(1)).sum(-1)
    return slope * A, bias


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("v_all", ["none", "batch", "shared"])
def test_relu_lines_matches_definition(dtype, v_all):
    inputs = _lines_inputs(dtype=dtype, v_all=v_all)
    got = torch.ops.torch_dlt.relu_lines(*inputs)
    want = _plain(*[t if t is None else t.double() for t in inputs])
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert_close(g.double(), w, **TOL[dtype])
    for g, r in zip(got, ob.relu_lines_reference(*inputs)):
        assert_close(g, r, **TOL[dtype])


@pytest.mark.parametrize("v_all", ["none", "batch", "shared"])
def test_relu_lines_in_place(v_all):
    """relu_lines_ writes A_in over A and returns the bias (compiled, or the reference)."""
    inputs = _lines_inputs(v_all=v_all)
    A_in, bias = _plain(*inputs)
    A = inputs[0].clone()
    assert_close(ops.relu_lines_(A, *inputs[1:]), bias, **TOL[torch.float64])
    assert_close(A, A_in, **TOL[torch.float64])
    if COMPILED:
        A = inputs[0].clone()
        got = torch.ops.torch_dlt.relu_lines_(A, *inputs[1:])
        assert_close(got, bias, **TOL[torch.float64])
        assert_close(A, A_in, **TOL[torch.float64])


@needs_ops
@pytest.mark.parametrize("v_all", ["none", "batch", "shared"])
def test_relu_lines_gradients_match_autograd(v_all):
    inputs = _lines_inputs(v_all=v_all, units=21)
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    twins = [None if t is None else t.clone().requires_grad_() for t in inputs]
    g = torch.Generator().manual_seed(1)
    grad_in = torch.randn(inputs[0].shape, generator=g, dtype=torch.float64)
    grad_bias = torch.randn(inputs[0].shape[:2], generator=g, dtype=torch.float64)
    out = torch.ops.torch_dlt.relu_lines(*leaves)
    torch.autograd.backward(out, (grad_in, grad_bias))
    out = _plain(*twins)
    torch.autograd.backward(out, (grad_in, grad_bias))
    for mine, theirs in zip(leaves, twins):
        if mine is not None:
            assert_close(mine.grad, theirs.grad, **TOL[torch.float64])
    # away from the kink at A = 0, where finite differences straddle both lines
    smooth = [None if t is None else t.detach().clone() for t in inputs]
    smooth[0] = smooth[0] + 0.1 * smooth[0].sign() + 0.1 * (smooth[0] == 0)
    smooth = [None if t is None else t.requires_grad_() for t in smooth]
    assert torch.autograd.gradcheck(torch.ops.torch_dlt.relu_lines, tuple(smooth))


@needs_ops
def test_relu_lines_layouts():
    """An expanded A (batch stride 0), a transposed one, and shared slopes read as such."""
    A, slope_l, slope_u, v_neg, v_all = _lines_inputs()
    shared = A[:1].expand(3, -1, -1)
    assert_close(
        torch.ops.torch_dlt.relu_lines(shared, slope_l, slope_u, v_neg, v_all),
        _plain(shared, slope_l, slope_u, v_neg, v_all),
    )
    strided = A.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    assert_close(
        torch.ops.torch_dlt.relu_lines(strided, slope_l, slope_u, v_neg, v_all),
        _plain(A, slope_l, slope_u, v_neg, v_all),
    )
    one = slope_l[:1]
    assert_close(
        torch.ops.torch_dlt.relu_lines(A, one, one, v_neg[:1], None),
        _plain(A, one.expand(3, -1), one.expand(3, -1), v_neg[:1].expand(3, -1), None),
    )


@needs_ops
def test_opcheck():
    inputs = [t.requires_grad_() for t in _lines_inputs(units=11)]
    torch.library.opcheck(torch.ops.torch_dlt.relu_lines.default, tuple(inputs))
    A, slope_l, slope_u, v_neg, v_all = (t.detach() for t in inputs)
    grads = (torch.randn_like(A), torch.randn(A.shape[:2], dtype=A.dtype))
    torch.library.opcheck(
        torch.ops.torch_dlt.relu_lines_backward.default,
        (*grads, A, slope_l, slope_u, v_neg, None),
    )
    torch.library.opcheck(
        torch.ops.torch_dlt.relu_lines_.default, (A.clone(), slope_l, slope_u, v_neg, v_all)
    )
    c, r = torch.randn(5, 7), torch.rand(5, 7)
    torch.library.opcheck(torch.ops.torch_dlt.ibp_relu_.default, (c, r))


def test_ibp_relu_is_the_interval_of_the_relu():
    """Every point of the box maps into the new box, whose ends are attained (it is the hull)."""
    g = torch.Generator().manual_seed(0)
    c = torch.randn(64, 33, generator=g, dtype=torch.float64)
    r = torch.rand(64, 33, generator=g, dtype=torch.float64)
    c2, r2 = ops.ibp_relu_(c.clone(), r.clone())
    low, high = (c2 - r2) / 2, (c2 + r2) / 2
    points = c + r * (2 * torch.rand(200, *c.shape, generator=g, dtype=torch.float64) - 1)
    outputs = points.relu()
    assert bool((outputs >= low - 1e-12).all() and (outputs <= high + 1e-12).all())
    assert_close(high, (c + r).relu())
    assert_close(low, (c - r).relu())


@needs_ops
def test_ibp_relu_kernel_matches_reference():
    c, r = torch.randn(4, 8, 5, 5), torch.rand(4, 8, 5, 5)
    kernel = (c.clone(), r.clone())
    torch.ops.torch_dlt.ibp_relu_(*kernel)
    upper, lower = (c + r).relu(), (c - r).relu()
    assert torch.equal(kernel[0], upper + lower) and torch.equal(kernel[1], upper - lower)


PHASE_CASES = [  # (N, C, h, w, P, th, tw): the CNN-small's first layer, odd sizes, many outputs
    (5, 16, 14, 14, 4, 2, 2),
    (3, 8, 7, 6, 3, 3, 2),
    (2, 5, 4, 4, 2, 2, 3),
    (4, 32, 7, 7, 9, 2, 2),
    (2, 24, 5, 5, 20, 1, 1),
    (3, 24, 6, 5, 3, 2, 2),
    (2, 32, 3, 4, 1, 3, 3),
]


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", PHASE_CASES)
def test_phase_conv_matches_conv2d(dtype, case):
    n, c, h, w, p, th, tw = case
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    A = A.contiguous(memory_format=torch.channels_last)
    taps = torch.randn(p, c, th, tw, generator=g, dtype=torch.float64).to(dtype)
    out = torch.ops.torch_dlt.phase_conv(A, taps)
    want = torch.nn.functional.conv2d(A.double(), taps.double(), padding=(th - 1, tw - 1))
    assert out.dtype == dtype and out.shape == want.shape
    assert_close(out.double(), want, **TOL[dtype])
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    leaves = (A.double().requires_grad_(), taps.double().requires_grad_())
    torch.nn.functional.conv2d(*leaves, padding=(th - 1, tw - 1)).backward(grad)
    grad_A, grad_taps = torch.ops.torch_dlt.phase_conv_backward(grad.to(dtype), A, taps)
    assert_close(grad_A.double(), leaves[0].grad, **TOL[dtype])
    assert_close(grad_taps.double(), leaves[1].grad, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                 atol=1e-4 if dtype == torch.float32 else 1e-10)  # fmt: skip
    # an NCHW-contiguous A gives the same
    assert_close(torch.ops.torch_dlt.phase_conv(A.contiguous(), taps), out)


@needs_ops
def test_phase_conv_gradcheck_and_opcheck():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(2, 8, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    taps = torch.randn(3, 8, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.torch_dlt.phase_conv, (A, taps))
    torch.library.opcheck(torch.ops.torch_dlt.phase_conv.default, (A, taps))
    with pytest.raises(RuntimeError, match="A has 8 channels, taps 3"):
        torch.ops.torch_dlt.phase_conv(A.detach(), taps.detach()[:, :3])


def test_phase_conv_wrapper():
    A, taps = torch.randn(2, 8, 5, 5), torch.randn(4, 8, 2, 2)
    want = torch.nn.functional.conv2d(A, taps, padding=1)
    assert_close(ops.phase_conv(A, taps), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"taps \[P, C, th, tw\] with the same C"):
        ops.phase_conv(A, taps[:, :3])


def _bounds(shape, seed=0, edges=True):
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(shape, generator=g, dtype=torch.float64)
    radius = torch.rand(shape, generator=g, dtype=torch.float64)
    lower, upper = centre - radius, centre + radius
    if edges:  # a unit with lower = 0, one with upper = -lower
        lower.view(-1)[:2] = torch.tensor([0.0, -1.0], dtype=torch.float64)
        upper.view(-1)[:2] = torch.tensor([1.0, 1.0], dtype=torch.float64)
    return lower, upper


@needs_ops
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (5, 17), (2, 1, 3, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_crown_lines_match_reference(shape, channels_last):
    lower, upper = _bounds(shape)
    got = torch.ops.torch_dlt.crown_lines(lower, upper, channels_last)
    want = ob.crown_lines_reference(lower, upper)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert torch.equal(g, w) if g.dtype == torch.bool else bool(torch.allclose(g, w))
    if channels_last and len(shape) == 4:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    # gradients through slope_u and icpt_u against autograd of the reference
    leaves = (lower.clone().requires_grad_(), upper.clone().requires_grad_())
    twins = (lower.clone().requires_grad_(), upper.clone().requires_grad_())
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2)]
    out = torch.ops.torch_dlt.crown_lines(*leaves, channels_last)
    ((out[1] * weights[0]).sum() + (out[2] * weights[1]).sum()).backward()
    out = ob.crown_lines_reference(*twins)
    ((out[1] * weights[0]).sum() + (out[2] * weights[1]).sum()).backward()
    for mine, theirs in zip(leaves, twins):
        assert_close(mine.grad, theirs.grad, rtol=1e-12, atol=1e-12)


@needs_ops
def test_crown_lines_gradcheck_and_opcheck():
    lower, upper = _bounds((2, 3, 4, 4), seed=3, edges=False)  # finite differences off the kinks
    lower, upper = lower.requires_grad_(), upper.requires_grad_()
    assert torch.autograd.gradcheck(lambda l, u: torch.ops.torch_dlt.crown_lines(l, u, True)[1:3],
                                    (lower, upper))  # fmt: skip
    torch.library.opcheck(torch.ops.torch_dlt.crown_lines.default, (lower, upper, True))


def test_crown_lines_wrapper():
    lower, upper = _bounds((3, 2, 4, 4))
    for got, want in zip(
        ops.crown_lines(lower, upper, True), ob.crown_lines_reference(lower, upper)
    ):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="must have the same shape"):
        ops.crown_lines(lower, upper[:1])


@needs_ops
def test_relu_phase_lower_matches_the_unfused_steps():
    g = torch.Generator().manual_seed(4)
    batch, rows, channels, h, w, phases = 3, 4, 16, 6, 5, 4

    def draw(*shape, positive=False):
        t = torch.rand if positive else torch.randn
        return t(*shape, generator=g, dtype=torch.float64)

    units, frame = h * w * channels, (h + 1) * (w + 1) * phases
    inputs = [
        draw(batch, rows, units),
        draw(batch, units, positive=True),
        draw(batch, units, positive=True),
        draw(batch, units),
        draw(1, units),
        draw(phases, channels, 2, 2),
        draw(batch, frame),
        draw(batch, frame, positive=True),
    ]
    leaves = [t.clone().requires_grad_() for t in inputs]
    twins = [t.clone().requires_grad_() for t in inputs]
    lower = ops.relu_phase_lower(*leaves, h, w)
    want = ob.relu_phase_lower_reference(*twins, h, w)
    assert_close(lower, want, rtol=1e-12, atol=1e-10)
    weights = torch.randn(lower.shape, generator=g, dtype=torch.float64)
    (lower * weights).sum().backward()
    (want * weights).sum().backward()
    for mine, theirs in zip(leaves, twins):
        assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-10)


def test_relu_lines_bad_input():
    A, slope_l, slope_u, v_neg, _ = _lines_inputs()
    with pytest.raises(ValueError, match=r"slope_u must be a Tensor \[B or 1, K\]"):
        ops.relu_lines(A, slope_l, slope_u[:, :5], v_neg)
    with pytest.raises(ValueError, match=r"A must be a Tensor \[B, m, K\]"):
        ops.relu_lines(A[0], slope_l, slope_u, v_neg)
    with pytest.raises(ValueError, match="same shape"):
        ops.ibp_relu_(torch.zeros(3), torch.zeros(4))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(  # a first layer that CROWN passes by its stride phases (fused)
        nn.Conv2d(1, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 20),
        nn.ReLU(),
        nn.Linear(20, 5),
    ).double()


@needs_ops
@pytest.mark.parametrize("spec", ["margins", "none"])
@pytest.mark.parametrize("method", ["crown-ibp", "crown", "wong-kolter"])
def test_bounds_with_and_without_kernels(monkeypatch, method, spec):
    """The bounds and their parameter gradients do not depend on which path runs."""
    net = _net()
    x = torch.rand(6, 1, 14, 14, dtype=torch.float64)
    C = bounds.margin_matrix(torch.arange(6) % 5, 5).double() if spec == "margins" else None
    fused, real = [], ops.relu_phase_lower
    monkeypatch.setattr(bounds._ops, "relu_phase_lower", lambda *a: fused.append(1) or real(*a))

    def run():
        net.zero_grad()
        lower, _ = bounds.crown_bounds(net, x - 0.05, x + 0.05, C=C, method=method)
        lower.sum().backward()
        ibp = bounds.interval_bounds(net, x - 0.05, x + 0.05, C=C)
        with torch.no_grad():
            fast = bounds.interval_bounds(net, x - 0.05, x + 0.05, C=C)
        return lower.detach(), [p.grad.clone() for p in net.parameters()], ibp, fast

    with_kernels = run()
    assert fused  # the first layer went through the fused kernel
    monkeypatch.setattr(bounds._ops, "has_bounds_ops", lambda x=None: False)
    without = run()
    assert_close(with_kernels[0], without[0], rtol=1e-10, atol=1e-10)
    for a, b in zip(with_kernels[1], without[1]):
        assert_close(a, b, rtol=1e-9, atol=1e-10)
    for a, b in zip(with_kernels[2] + with_kernels[3], without[2] + without[3]):
        assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-10)
