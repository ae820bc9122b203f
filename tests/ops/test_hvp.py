"""Tests of the R-operator ops (torch_dlt.ops.hvp): compiled kernels and references against
autograd of PyTorch's own functions, opcheck, and the compiled whole-program sweep against the
torch.func reference."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from torch_dlt import ops
from torch_dlt.ops import ActivationKind, LossKind, Opcode, Reduction, _hvp_reference
from torch_dlt.ops import hvp as hvp_ops
from torch_dlt.testing import randn, seeded

needs_ops = pytest.mark.skipif(not ops.has_hvp_ops(), reason="torch_dlt._C has no R-operator ops")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.has_cuda_ops() else [])
PATHS = ["compiled", "reference"] if ops.has_hvp_ops() else ["reference"]
TOL = {"rtol": 1e-10, "atol": 1e-12}

# (kind, a, b, the activation as PyTorch defines it)
ACTIVATIONS = [
    (ActivationKind.RELU, 0.0, 0.0, F.relu),
    (ActivationKind.LEAKY_RELU, 0.1, 0.0, lambda x: F.leaky_relu(x, 0.1)),
    (ActivationKind.TANH, 0.0, 0.0, torch.tanh),
    (ActivationKind.SIGMOID, 0.0, 0.0, torch.sigmoid),
    (ActivationKind.GELU, 0.0, 0.0, F.gelu),
    (ActivationKind.GELU_TANH, 0.0, 0.0, lambda x: F.gelu(x, approximate="tanh")),
    (ActivationKind.ELU, 0.7, 1.0, lambda x: F.elu(x, 0.7)),
    (ActivationKind.ELU, 1.6732632423543772, 1.0507009873554805, F.selu),
    (ActivationKind.SOFTPLUS, 2.0, 3.0, lambda x: F.softplus(x, 2.0, 3.0)),
    (ActivationKind.SILU, 0.0, 0.0, F.silu),
    (ActivationKind.HARDTANH, -0.5, 0.7, lambda x: F.hardtanh(x, -0.5, 0.7)),
    (ActivationKind.ERF, 0.0, 0.0, torch.erf),
    (ActivationKind.CELU, 0.6, 0.0, lambda x: F.celu(x, 0.6)),
]
IDS = [f"{k.name}-{a}" for k, a, _, _ in ACTIVATIONS]
# PyTorch's CELU backward rounds 1 / alpha to float32 (off by ~5e-7 relative to exp(x / alpha),
# which finite differences confirm), so CELU is checked to that precision.
LOOSE = {"rtol": 2e-6, "atol": 1e-9}


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setattr(hvp_ops, "_compiled", lambda x: False)
    return request.param


def _block(shape, k, seed, device="cpu", contiguous=True):
    b, *rest = shape
    v = randn(k, b, *rest, seed=seed, device=device)
    # A [B, k, ...] view with the direction dimension outermost in memory: not contiguous.
    return v.transpose(0, 1) if not contiguous else v.transpose(0, 1).contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,a,b,fn", ACTIVATIONS, ids=IDS)
@pytest.mark.parametrize("contiguous", [True, False])
def test_activation_jvp_and_hvp_backward_match_autograd(path, device, kind, a, b, fn, contiguous):
    x = randn(3, 4, 5, seed=1, device=device) * 2
    y = fn(x)
    k = 3
    v, rx, rg = (_block(x.shape, k, s, device, contiguous) for s in (2, 3, 4))
    g = randn(3, 4, 5, seed=5, device=device)
    tol = LOOSE if kind == ActivationKind.CELU else TOL
    jvp = ops.activation_jvp(x, y, v, kind, a, b)
    want = torch.stack([torch.func.jvp(fn, (x,), (v[:, j],))[1] for j in range(k)], 1)
    assert_close(jvp, want, **tol)

    gx, rgx = ops.activation_hvp_backward(x, y, g, rx, rg, kind, a, b)

    def backward(x_, g_):
        return torch.func.vjp(fn, x_)[1](g_)[0]

    assert_close(gx, backward(x, g), **tol)
    want = torch.stack(
        [torch.func.jvp(backward, (x, g), (rx[:, j], rg[:, j]))[1] for j in range(k)], 1
    )
    assert_close(rgx, want, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["ce-index", "ce-prob", "mse"])
@pytest.mark.parametrize("reduction", [Reduction.MEAN, Reduction.SUM])
def test_loss_curvature_matches_autograd(path, device, loss, reduction):
    z = randn(6, 4, seed=1, device=device)
    rz = _block(z.shape, 3, 2, device, contiguous=False)
    name = "mean" if reduction == Reduction.MEAN else "sum"
    if loss == "ce-index":
        t = torch.tensor([0, 3, 1, 1, 2, 0], device=device)
    elif loss == "ce-prob":
        t = torch.softmax(randn(6, 4, seed=3, device=device), 1) * 1.5
    else:
        t = randn(6, 4, seed=4, device=device)
    kind = LossKind.MSE if loss == "mse" else LossKind.CROSS_ENTROPY
    fn = F.mse_loss if loss == "mse" else F.cross_entropy
    grad, hz = ops.loss_curvature(z, t, rz, kind, reduction)
    gradient = torch.func.grad(lambda z_: fn(z_, t, reduction=name))
    assert_close(grad, gradient(z), **TOL)
    hessian = torch.func.jacrev(gradient)(z)  # [6, 4, 6, 4], reverse-over-reverse
    assert_close(hz, torch.einsum("bcde,dke->bkc", hessian, rz), **TOL)


def _program(groups: int):
    """conv(stride 2, pad, dil) -> BN2d -> tanh -> maxpool -> conv(groups) -> gelu -> avgpool ->
    adaptive max -> flatten -> linear -> softplus -> linear."""
    g = seeded(7)
    c = groups * 2

    def draw(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    params = [
        draw(c, 2, 3, 3, scale=0.4), draw(c),  # conv 1
        draw(c), torch.rand(c, generator=g, dtype=torch.float64) + 0.5, draw(c), draw(c),  # BN
        draw(4, c // groups, 2, 2, scale=0.4), draw(4),  # conv 2
        draw(5, 8, scale=0.5), draw(5),  # linear 1
        draw(3, 5, scale=0.5),  # linear 2
    ]  # fmt: skip
    program = [
        Opcode.CONV2D, 1, 1, 1, 1, 1, 2, 2, 1,
        Opcode.BATCH_NORM, 1, 1,
        Opcode.ACTIVATION, ActivationKind.TANH,
        Opcode.MAX_POOL2D, 2, 2, 1, 1, 0, 0, 1, 1, 0,
        Opcode.CONV2D, 1, 1, 1, 0, 0, 1, 1, groups,
        Opcode.ACTIVATION, ActivationKind.GELU,
        Opcode.AVG_POOL2D, 2, 2, 1, 1, 1, 1, 1, 0, 0,
        Opcode.ADAPTIVE_MAX_POOL2D, 1, 2,
        Opcode.FLATTEN, 1, -1,
        Opcode.LINEAR, 1,
        Opcode.ACTIVATION, ActivationKind.SOFTPLUS,
        Opcode.LINEAR, 0,
    ]  # fmt: skip
    constants = [1e-5, 0.0, 0.0, 0.0, 0.0, 1.5, 20.0]
    return params, [int(p) for p in program], constants


@needs_ops
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("ggn", [False, True])
@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_sequential_hvp_compiled_matches_reference(groups, k, ggn, reuse, device):
    params, program, constants = _program(groups)
    params = [p.to(device) for p in params]
    x = randn(5, 2, 9, 9, seed=2, device=device)
    t = torch.tensor([0, 2, 1, 1, 0], device=device)
    # Running statistics (entries 2, 3) and the first conv's bias are constants.
    frozen = {1, 2, 3}
    directions = [
        None if i in frozen else randn(k, *p.shape, seed=10 + i, device=device)
        for i, p in enumerate(params)
    ]
    args = (x, t, params, directions, program, constants, LossKind.CROSS_ENTROPY, Reduction.MEAN)
    # With reuse, the forward and the gradient come from a primal pass made beforehand.
    primal = torch.ops.torch_dlt.sequential_primal(*args[:3], *args[4:], not ggn) if reuse else []
    got = torch.ops.torch_dlt.sequential_hvp(*args, ggn, primal)
    want = _hvp_reference.sequential_hvp(*args, ggn)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, i
        assert_close(a, b, **TOL)
    assert all(got[i].numel() == 0 for i in frozen)


@needs_ops
@pytest.mark.parametrize("gradients", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_sequential_primal_compiled_matches_reference(gradients, device):
    params, program, constants = _program(2)
    params = [p.to(device) for p in params]
    x = randn(5, 2, 9, 9, seed=2, device=device)
    t = torch.tensor([0, 2, 1, 1, 0], device=device)
    args = (x, t, params, program, constants, LossKind.CROSS_ENTROPY, Reduction.MEAN, gradients)
    got = torch.ops.torch_dlt.sequential_primal(*args)
    want = _hvp_reference.sequential_primal(*args)
    layers = len(_hvp_reference.parse_program(program))
    assert len(got) == len(want) == (2 if gradients else 1) * layers
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert_close(a, b, **TOL)
    # The output is the network's; the last gradient is the loss gradient at it.
    assert_close(got[layers - 1], _hvp_reference.program_forward(x, params, program, constants))
    empty = [i for i, a in enumerate(got) if a.numel() == 0]
    flatten = 8  # the program's 9th layer; the gradient at its input is left out too
    assert empty == ([flatten, layers + flatten - 1] if gradients else [flatten])


@needs_ops
def test_sequential_hvp_rejects_a_primal_of_other_inputs():
    params, program, constants = _program(1)
    t = torch.tensor([0, 2, 1, 1, 0])
    directions = [randn(1, *p.shape, seed=i) for i, p in enumerate(params)]
    args = (params, directions, program, constants, 0, 0, False)
    x = randn(5, 2, 9, 9, seed=2)
    primal = torch.ops.torch_dlt.sequential_primal(
        x[:3], t[:3], params, program, constants, 0, 0, True
    )
    with pytest.raises(RuntimeError, match=r"primal\[0\] is not sequential_primal's tensor"):
        torch.ops.torch_dlt.sequential_hvp(x, t, *args, primal)
    with pytest.raises(RuntimeError, match="primal must be sequential_primal's"):
        torch.ops.torch_dlt.sequential_hvp(x, t, *args, primal[:3])


def test_reference_sequential_hvp_is_the_dense_hessian():
    # Independent of both implementations: the Hessian of a 2-layer net built by hand.
    w1, w2 = randn(3, 2, seed=1), randn(2, 3, seed=2)
    x, t = randn(4, 2, seed=3), randn(4, 2, seed=4)

    def loss(w1_, w2_):
        return ((torch.tanh(x @ w1_.T) @ w2_.T - t) ** 2).sum()

    program = [Opcode.LINEAR, 0, Opcode.ACTIVATION, ActivationKind.TANH, Opcode.LINEAR, 0]
    v1, v2 = randn(2, 3, 2, seed=5), randn(2, 2, 3, seed=6)
    got = ops.sequential_hvp(
        x, t, [w1, w2], [v1, v2], program, [0.0, 0.0], LossKind.MSE, Reduction.SUM
    )
    h = torch.func.hessian(lambda f: loss(f[:6].view(3, 2), f[6:].view(2, 3)))(
        torch.cat([w1.flatten(), w2.flatten()])
    )
    want = h @ torch.cat([v1.flatten(1), v2.flatten(1)], 1).T
    assert_close(torch.cat([got[0].flatten(1), got[1].flatten(1)], 1).T, want, **TOL)


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = randn(3, 4, seed=1, device=device)
    v = randn(3, 2, 4, seed=2, device=device)
    kind = int(ActivationKind.GELU)
    torch.library.opcheck(
        torch.ops.torch_dlt.activation_jvp.default, (x, x.tanh(), v, kind, 0.0, 0.0)
    )
    torch.library.opcheck(
        torch.ops.torch_dlt.activation_hvp_backward.default,
        (x, x.tanh(), x.cos(), v, v.sin(), kind, 0.0, 0.0),
    )
    torch.library.opcheck(
        torch.ops.torch_dlt.loss_curvature.default,
        (x, torch.tensor([0, 3, 1], device=device), v, 0, 0),
    )
    params, program, constants = _program(1)
    params = [p.to(device) for p in params]
    directions = [randn(2, *p.shape, seed=i, device=device) for i, p in enumerate(params)]
    directions[2] = directions[3] = None
    x, t = randn(2, 2, 9, 9, seed=3, device=device), torch.tensor([1, 2], device=device)
    torch.library.opcheck(
        torch.ops.torch_dlt.sequential_hvp.default,
        (x, t, params, directions, program, constants, 0, 1, False, []),
    )
    primal_args = (x, t, params, program, constants, 0, 1, True)
    torch.library.opcheck(torch.ops.torch_dlt.sequential_primal.default, primal_args)
    primal = torch.ops.torch_dlt.sequential_primal(*primal_args)
    torch.library.opcheck(
        torch.ops.torch_dlt.sequential_hvp.default,
        (x, t, params, directions, program, constants, 0, 1, False, primal),
    )


def test_torch_compile_fullgraph():
    x = randn(4, 5, seed=1)
    v = randn(4, 2, 5, seed=2)
    fn = torch.compile(
        lambda a, b: ops.activation_jvp(a, torch.tanh(a), b, ActivationKind.TANH).sum(),
        fullgraph=True,
        backend="eager",
    )
    assert_close(fn(x, v), ((1 - torch.tanh(x) ** 2).unsqueeze(1) * v).sum(), **TOL)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: ops.activation_jvp(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), 3),
         ValueError, r"\[B, k, \*x.shape\[1:\]\]"),
        (lambda: ops.activation_jvp(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 1, 3), 99),
         ValueError, "kind must be one of"),
        (lambda: ops.activation_jvp(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3),
                                    torch.ones(2, 1, 3), 3), TypeError, "float32, float64"),
        (lambda: ops.loss_curvature(torch.ones(2, 3), torch.zeros(2), torch.ones(2, 1, 3), 5),
         ValueError, "LossKind"),
        (lambda: ops.sequential_hvp(torch.ones(2, 3), torch.zeros(2), [torch.ones(1, 3)], [None],
                                    [1, 0], [], 1, 0), ValueError, "needs a direction"),
        (lambda: ops.sequential_hvp(torch.ones(2, 3), torch.zeros(2), [torch.ones(1, 3)], [],
                                    [1, 0], [], 1, 0), ValueError, "one entry per params"),
    ],
)  # fmt: skip
def test_bad_input_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@needs_ops
def test_compiled_sweep_checks_its_program():
    with pytest.raises(RuntimeError, match="unknown opcode"):
        torch.ops.torch_dlt.sequential_hvp(
            torch.ones(2, 3), torch.zeros(2, 1), [torch.ones(1, 3)], [torch.ones(1, 1, 3)],
            [42], [], 1, 0, False, [],
        )  # fmt: skip


@needs_ops
def test_compiled_loss_curvature_checks_class_indices():
    with pytest.raises(RuntimeError, match=r"class indices must be in \[0, 3\), got 0 to 3"):
        torch.ops.torch_dlt.loss_curvature(
            torch.zeros(2, 3), torch.tensor([0, 3]), torch.zeros(2, 1, 3), 0, 0
        )
