"""Tests of torch_dlt.probes._hvp_ext: ExtProgram.matmat against the dense torch.func Hessian and
the densely built Gauss-Newton matrix J^T H_loss J of tiny models, for every supported layer."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from torch_dlt import ops
from torch_dlt.nn import Erf, LeNet5
from torch_dlt.ops import hvp as hvp_ops
from torch_dlt.probes import _hvp_ext
from torch_dlt.probes._hvp_ext import UnsupportedModelError, ext_program
from torch_dlt.testing import ModelSnapshot, randn, seeded, tiny_cnn, tiny_mlp

PATHS = ["compiled", "reference"] if ops.has_hvp_ops() else ["reference"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.has_cuda_ops() else [])
TOL = {"rtol": 1e-9, "atol": 1e-11}


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setattr(hvp_ops, "_compiled", lambda x: False)
    return request.param


def _build(make, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().double().eval()


def _flat_function(model, fn):
    """fn(flat trainable parameters), and those parameters flat, in model.parameters() order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def unflatten(f):
        out, offset = {}, 0
        for n, p in named:
            out[n] = f[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return out

    return lambda f: fn(unflatten(f)), flat


def dense_hessian(model, loss_fn, x, t):
    fn, flat = _flat_function(
        model, lambda p: loss_fn(torch.func.functional_call(model, p, (x,)), t)
    )
    return torch.func.hessian(fn)(flat)


def dense_ggn(model, loss_fn, x, t):
    fn, flat = _flat_function(model, lambda p: torch.func.functional_call(model, p, (x,)))
    jac = torch.func.jacrev(fn)(flat).reshape(-1, flat.numel())
    z = model(x).detach()
    h_loss = torch.func.hessian(lambda z_: loss_fn(z_, t))(z).reshape(z.numel(), z.numel())
    return jac.T @ h_loss @ jac


class Functional(nn.Module):
    """Activations as function / method calls, and a view-flatten, in a forward."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = F.leaky_relu(self.fc1(x.view(x.size(0), -1)), 0.2)
        h = torch.sigmoid(F.softplus(self.fc2(h), beta=2.0)).tanh()
        return self.fc3(F.gelu(h, approximate="tanh"))


ACTIVATIONS = [nn.ReLU(), nn.LeakyReLU(0.1), nn.Tanh(), nn.Sigmoid(), nn.GELU(),
               nn.GELU("tanh"), nn.ELU(0.7), nn.SELU(), nn.Softplus(2.0, 5.0), nn.SiLU(),
               nn.Hardtanh(-0.5, 0.7), nn.ReLU6(), Erf()]  # fmt: skip

MODELS = {
    **{
        f"mlp-{type(a).__name__}": (
            lambda a=a: nn.Sequential(nn.Linear(4, 5), a, nn.Linear(5, 3)),
            (6, 4),
        )
        for a in ACTIVATIONS
    },
    "functional": (Functional, (6, 2, 3)),
    "cnn-all-layers": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1),
            nn.BatchNorm2d(4),
            nn.Tanh(),
            nn.MaxPool2d(2, stride=1, padding=1),
            nn.Conv2d(4, 4, 2, groups=2, dilation=2),
            nn.Dropout(0.3),
            nn.ELU(),
            nn.AvgPool2d(2, padding=1, ceil_mode=True, count_include_pad=False),
            nn.Identity(),
            nn.Flatten(),
            nn.BatchNorm1d(36),
            nn.Linear(36, 3),
        ),
        (4, 2, 9, 9),
    ),
    "deep-mlp": (lambda: tiny_mlp(depth=3, activation="gelu"), (5, 6)),
    "deep-cnn-avg": (lambda: tiny_cnn(activation="silu"), (3, 2, 5, 5)),
    "deep-cnn-max": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding="same"),
            nn.Softplus(),
            nn.AdaptiveMaxPool2d((2, 1)),
            nn.Flatten(),
            nn.Linear(6, 3),
        ),
        (3, 2, 5, 5),
    ),  # fmt: skip
}


def _batch(model_name, loss):
    _, shape = MODELS[model_name]
    x = randn(*shape, seed=1)
    if loss == "mse":
        return x, randn(shape[0], 3, seed=2)
    return x, torch.arange(shape[0]) % 3


def _model(name):
    model = _build(MODELS[name][0])
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            g = seeded(3)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            nn.init.normal_(m.weight, 1.0, 0.3, generator=g)
            nn.init.normal_(m.bias, 0.0, 0.3, generator=g)
    return model


@pytest.mark.parametrize("budget_outputs", [1, 2, 10**6])
@pytest.mark.parametrize("reuse", [False, True])
def test_cpu_blocks_swept_in_chunks_match_dense(path, monkeypatch, budget_outputs, reuse):
    # Chunks of 1, of 2 (5 directions: an uneven last chunk) and the whole block, with and
    # without a primal pass: the same products.
    model = _model("cnn-all-layers")
    loss_fn = nn.CrossEntropyLoss()
    x, t = _batch("cnn-all-layers", "ce")
    program = ext_program(model, loss_fn)
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel())) for m in model]
    model(x)
    for h in hooks:
        h.remove()
    monkeypatch.setattr(_hvp_ext, "CPU_BLOCK_BYTES", budget_outputs * max(sizes) * 8)
    _, code, constants, params = program._encode(x)
    assert program._chunk(x, params, code, constants, 5) == min(5, budget_outputs)
    V = randn(program.num_params, 5, seed=4)
    primal = program.primal(x, t) if reuse else None
    got = program.matmat(x, t, V, primal=primal)
    assert_close(got, dense_hessian(model, loss_fn, x, t) @ V, **TOL)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("ggn", [False, True])
def test_matmat_matches_dense_curvature(path, name, ggn):
    model = _model(name)
    loss_fn = nn.CrossEntropyLoss()
    x, t = _batch(name, "ce")
    dense = (dense_ggn if ggn else dense_hessian)(model, loss_fn, x, t)
    program = ext_program(model, loss_fn)
    V = randn(program.num_params, 3, seed=4)
    assert_close(program.matmat(x, t, V, ggn=ggn), dense @ V, **TOL)


@pytest.mark.parametrize(
    "loss_fn",
    [nn.CrossEntropyLoss(reduction="sum"), F.cross_entropy, nn.MSELoss(),
     nn.MSELoss(reduction="sum"), functools.partial(F.mse_loss, reduction="sum")],
    ids=["ce-sum", "F.cross_entropy", "mse-mean", "mse-sum", "partial-mse-sum"],
)  # fmt: skip
@pytest.mark.parametrize("k", [1, 4])
def test_losses_and_reductions(path, loss_fn, k):
    name = "cnn-all-layers"
    model = _model(name)
    mse = loss_fn is not F.cross_entropy and "mse" in repr(loss_fn).lower()
    x, t = _batch(name, "mse" if mse else "ce")
    program = ext_program(model, loss_fn)
    V = randn(program.num_params, k, seed=5)
    for ggn, dense in ((False, dense_hessian), (True, dense_ggn)):
        want = dense(model, loss_fn, x, t) @ V
        assert_close(program.matmat(x, t, V, ggn=ggn), want, **TOL)


def test_probability_targets(path):
    model = _model("deep-mlp")
    x = randn(5, 6, seed=1)
    t = torch.softmax(randn(5, 3, seed=2), 1)
    program = ext_program(model, nn.CrossEntropyLoss())
    V = randn(program.num_params, 2, seed=3)
    want = dense_hessian(model, nn.CrossEntropyLoss(), x, t) @ V
    assert_close(program.matmat(x, t, V), want, **TOL)


def test_non_contiguous_inputs_and_vectors(path):
    model = _model("deep-cnn-avg")
    x, t = _batch("deep-cnn-avg", "ce")
    x_strided = x.transpose(2, 3).contiguous().transpose(2, 3)
    program = ext_program(model, nn.CrossEntropyLoss())
    V = randn(3, program.num_params, seed=6).T  # [n, 3], column-major
    assert not x_strided.is_contiguous() and not V.is_contiguous()
    want = dense_hessian(model, nn.CrossEntropyLoss(), x, t) @ V
    assert_close(program.matmat(x_strided, t, V), want, **TOL)


def test_frozen_parameters_are_constants(path):
    model = _model("cnn-all-layers")
    model[0].weight.requires_grad_(False)
    model[10].bias.requires_grad_(False)
    x, t = _batch("cnn-all-layers", "ce")
    program = ext_program(model, nn.CrossEntropyLoss())
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert program.num_params == n
    V = randn(n, 2, seed=7)
    want = dense_hessian(model, nn.CrossEntropyLoss(), x, t) @ V
    assert_close(program.matmat(x, t, V), want, **TOL)


def test_shared_layer_used_twice(path):
    # One Linear applied twice: both uses contribute to its block of H V.
    shared = nn.Linear(4, 4)
    model = _build(lambda: nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 3)))
    x, t = randn(5, 4, seed=1), torch.tensor([0, 1, 2, 0, 1])
    program = ext_program(model, nn.CrossEntropyLoss())
    V = randn(program.num_params, 2, seed=2)
    # Oracle: double backward (functional_call does not see the tie through both uses).
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), t), params, create_graph=True)
    want = []
    for j in range(2):
        v = V[:, j].split([p.numel() for p in params])
        dot = sum((g * u.view_as(g)).sum() for g, u in zip(grads, v))
        hv = torch.autograd.grad(dot, params, retain_graph=True)
        want.append(torch.cat([h.reshape(-1) for h in hv]))
    assert_close(program.matmat(x, t, V), torch.stack(want, 1), **TOL)


def test_lenet5_matches_forward_over_reverse(path):
    # LeNet-5 checks its input shape in forward; too big for a dense Hessian, so the oracle is
    # torch.func's forward-over-reverse product.
    model = _build(lambda: LeNet5(activation="tanh", pooling="max"))
    x, t = randn(3, 1, 28, 28, seed=1), torch.tensor([1, 7, 3])
    program = ext_program(model, nn.CrossEntropyLoss())
    V = randn(program.num_params, 2, seed=2)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)
    sizes = [p.numel() for p in params.values()]

    def loss(*flat):
        p = {n: f.view_as(params[n]) for n, f in zip(names, flat)}
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), t)

    gradient = torch.func.grad(loss, argnums=tuple(range(len(names))))
    primals = tuple(p.reshape(-1) for p in params.values())
    want = torch.stack(
        [torch.cat(torch.func.jvp(gradient, primals, tuple(V[:, j].split(sizes)))[1])
         for j in range(2)], 1,
    )  # fmt: skip
    assert_close(program.matmat(x, t, V), want, **TOL)


def test_model_is_left_unchanged(path):
    model = _model("cnn-all-layers")
    model[5].train()  # dropout with p > 0 in train mode is refused; here only BatchNorm is eval
    model[5].p = 0.0
    x, t = _batch("cnn-all-layers", "ce")
    snapshot = ModelSnapshot.take(model)
    program = ext_program(model, nn.CrossEntropyLoss())
    program.matmat(x, t, randn(program.num_params, 2, seed=1))
    program.matmat(x, t, randn(program.num_params, 1, seed=2), ggn=True)
    snapshot.assert_unchanged(model)
    assert all(p.grad is None for p in model.parameters())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)) + x)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(4, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize(
    "make,loss_fn,match",
    [
        (Recurrent, nn.CrossEntropyLoss(), "'lstm' \\(LSTM\\) is not supported"),
        (Residual, nn.CrossEntropyLoss(), "'add'.*residual"),
        (lambda: nn.Sequential(nn.Linear(4, 2), nn.Softmax(1)), nn.MSELoss(),
         "'1' \\(Softmax\\) is not supported"),
        (lambda: nn.Linear(4, 2), nn.NLLLoss(), "loss_fn NLLLoss"),
        (lambda: nn.Linear(4, 2), nn.CrossEntropyLoss(label_smoothing=0.1), "label smoothing"),
        (lambda: nn.Linear(4, 2), nn.MSELoss(reduction="none"), "reduction 'none'"),
        (lambda: nn.Sequential(nn.Flatten(0), nn.Linear(8, 2)), nn.MSELoss(), "start_dim=0"),
    ],
)  # fmt: skip
def test_unsupported_models_raise_naming_the_culprit(make, loss_fn, match):
    with pytest.raises(UnsupportedModelError, match=match):
        ext_program(_build(make), loss_fn)


def test_train_mode_batchnorm_and_dropout_are_refused_at_call_time():
    model = _model("cnn-all-layers")
    x, t = _batch("cnn-all-layers", "ce")
    program = ext_program(model.train(), nn.CrossEntropyLoss())  # the caller sets the mode later
    snapshot = ModelSnapshot.take(model)
    V = randn(program.num_params, 1, seed=1)
    with pytest.raises(UnsupportedModelError, match="BatchNorm '1' is in training mode"):
        program.matmat(x, t, V)
    model.eval()
    model[5].train()
    with pytest.raises(UnsupportedModelError, match="Dropout '5' is in training mode"):
        program.matmat(x, t, V)
    model.train()
    snapshot.assert_unchanged(model)


def test_bad_vectors_and_inputs_raise():
    model = _model("deep-mlp")
    program = ext_program(model, nn.CrossEntropyLoss())
    x, t = _batch("deep-mlp", "ce")
    with pytest.raises(ValueError, match=f"n = {program.num_params}"):
        program.matmat(x, t, randn(program.num_params + 1, 2))
    with pytest.raises(ValueError, match="model's dtype"):
        program.matmat(x.float(), t, randn(program.num_params, 1))
    with pytest.raises(ValueError, match="negative class indices"):
        program.matmat(x, t - 1, randn(program.num_params, 1))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA kernels")
def test_cuda_matches_cpu():
    model = _model("cnn-all-layers")
    x, t = _batch("cnn-all-layers", "ce")
    program = ext_program(model, nn.CrossEntropyLoss())
    V = randn(program.num_params, 3, seed=1)
    want = program.matmat(x, t, V)
    gpu = ext_program(model.cuda(), nn.CrossEntropyLoss())
    for ggn in (False, True):
        want = program.matmat(x, t, V, ggn=ggn) if ggn else want
        got = gpu.matmat(x.cuda(), t.cuda(), V.cuda(), ggn=ggn)
        assert_close(got.cpu(), want, **TOL)
