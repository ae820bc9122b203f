"""Tests for torch_dlt.probes.hessian against dense torch.func Hessians and exact spectra."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from torch_dlt.data import data_loader
from torch_dlt.probes.hessian import (
    CurvatureConvergenceWarning,
    GGNOperator,
    HessianOperator,
    hessian_index,
    spectral_density,
    top_eigenvalues,
    trace,
)
from torch_dlt.testing import (
    ModelSnapshot,
    gloo_available,
    randn,
    run_gloo_workers,
    seeded,
    tiny_bn_dropout_net,
    tiny_mlp,
)

# "ext" runs everywhere: the compiled R-operator ops where built, their reference otherwise.
BACKENDS = ["func", "autograd", "ext"]


def _build(seed: int, make) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().double()


def _conv_net() -> nn.Module:
    return _build(
        1,
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(3, 2, 2),
            nn.Sigmoid(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2, 3),
        ),
    )


def _bn_net() -> nn.Module:
    net = _build(
        2,
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.BatchNorm2d(3),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(12, 5),
            nn.BatchNorm1d(5),
            nn.Tanh(),
            nn.Linear(5, 3),
        ),
    )
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for i, m in enumerate(
            m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ):
            m.running_mean.copy_(randn(m.num_features, seed=10 + i) * 0.3)
            m.running_var.copy_(randn(m.num_features, seed=20 + i).abs() + 0.5)
            m.weight.copy_(1 + 0.2 * randn(m.num_features, seed=30 + i))
            m.bias.copy_(0.2 * randn(m.num_features, seed=40 + i))
    return net


MODELS = {
    "mlp_tanh": (lambda: tiny_mlp(in_features=6, width=5, depth=2, out_features=3), (6,)),
    "mlp_gelu": (lambda: tiny_mlp(in_features=6, width=5, depth=1, activation="gelu"), (6,)),
    "conv_pool": (_conv_net, (2, 6, 6)),
    "bn_eval": (_bn_net, (2, 4, 4)),
}


def _data(shape: tuple[int, ...], n: int, loss: str, seed: int = 0):
    x = randn(n, *shape, seed=seed)
    if loss == "ce":
        return x, torch.randint(0, 3, (n,), generator=seeded(seed + 1))
    return x, randn(n, 3, seed=seed + 1)


def _flat_fn(model: nn.Module, fn):
    """fn(output of model at flat parameters theta) for the dense oracle."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    buffers = dict(model.named_buffers())

    def at(theta: torch.Tensor, x: torch.Tensor):
        tensors, start = {}, 0
        for n, s in zip(names, shapes):
            tensors[n] = theta[start : start + s.numel()].view(s)
            start += s.numel()
        return fn(functional_call(model, {**tensors, **buffers}, (x,)))

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return at, flat


def _oracle_loss(kind: str, y: torch.Tensor):
    # MSE spelled out: F.mse_loss has no forward-over-reverse derivative in some torch releases.
    if kind == "ce":
        return lambda out: nn.functional.cross_entropy(out, y)
    return lambda out: (out - y).square().mean()


def _dense_hessian(model: nn.Module, x, y, kind: str) -> torch.Tensor:
    at, flat = _flat_fn(model.eval(), _oracle_loss(kind, y))
    return torch.func.hessian(lambda t: at(t, x))(flat)


def _dense_ggn(model: nn.Module, x, y, kind: str) -> torch.Tensor:
    at, flat = _flat_fn(model.eval(), lambda out: out)
    out = at(flat, x)
    J = torch.func.jacrev(lambda t: at(t, x).reshape(-1))(flat)
    loss = _oracle_loss(kind, y)
    H_out = torch.func.hessian(lambda o: loss(o.view(out.shape)))(out.reshape(-1))
    return J.T @ H_out @ J


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_products_match_the_dense_hessian_and_ggn(backend, model_name, kind):
    make, shape = MODELS[model_name]
    model = make()
    x, y = _data(shape, 7, kind)
    loss_fn = nn.CrossEntropyLoss() if kind == "ce" else nn.MSELoss()
    H_dense = _dense_hessian(model, x, y, kind)
    G_dense = _dense_ggn(model, x, y, kind)
    V = randn(H_dense.shape[0], 3, seed=5)
    snapshot = ModelSnapshot.take(model)
    H = HessianOperator(model, loss_fn, (x, y), backend=backend)
    G = GGNOperator(model, loss_fn, (x, y), backend=backend)
    assert H.backend == backend and H.shape == H_dense.shape and H.dtype == torch.float64
    torch.testing.assert_close(H @ V, H_dense @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H @ V[:, 1], H_dense @ V[:, 1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G @ V, G_dense @ V, rtol=1e-10, atol=1e-12)
    # non-contiguous input
    W = randn(3, H_dense.shape[0], seed=6).T
    torch.testing.assert_close(H @ W, H_dense @ W, rtol=1e-10, atol=1e-12)
    snapshot.assert_unchanged(model)
    assert float(torch.linalg.eigvalsh(G_dense).min()) > -1e-10  # the oracle's GGN is PSD


def test_train_mode_uses_batch_statistics_and_keeps_running_stats():
    model = tiny_bn_dropout_net(in_features=4).train()
    x, y = randn(9, 4, seed=3), randn(9, 3, seed=4)
    snapshot = ModelSnapshot.take(model)
    H = HessianOperator(model, nn.MSELoss(), (x, y), train_mode=True, backend="func")
    V = randn(H.shape[0], 2, seed=1)
    got = H @ V
    snapshot.assert_unchanged(model)
    # oracle: the same net with batch-statistics BatchNorm and no dropout, written out
    lin1, bn, _, _, lin2 = model

    def loss(theta):
        w1, b1, g, b, w2, b2 = torch.split(theta, [p.numel() for p in model.parameters()])
        h = x @ w1.view(8, 4).T + b1
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps) * g + b
        out = torch.tanh(h) @ w2.view(3, 8).T + b2
        return (out - y).square().mean()

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    dense = torch.func.hessian(loss)(flat)
    torch.testing.assert_close(got, dense @ V, rtol=1e-10, atol=1e-12)
    eval_dense = _dense_hessian(model, x, y, "mse")
    model.train()  # _dense_hessian put it in eval mode
    torch.testing.assert_close(HessianOperator(model, nn.MSELoss(), (x, y)) @ V, eval_dense @ V)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "loss_fn", [nn.MSELoss(), nn.MSELoss(reduction="sum"), nn.functional.mse_loss]
)
def test_uneven_loader_gives_exactly_the_full_batch_operator(backend, loss_fn):
    model = tiny_mlp(in_features=5, width=6, depth=1, out_features=3)
    x, y = randn(256, 5, seed=1), randn(256, 3, seed=2)
    loader = data_loader(x, y, batch_size=200, shuffle=True, seed=3)
    assert sorted(len(b[1]) for b in loader) == [56, 200]
    V = randn(sum(p.numel() for p in model.parameters()), 2, seed=4)
    for cls in (HessianOperator, GGNOperator):
        full = cls(model, loss_fn, (x, y), backend=backend)
        looped = cls(model, loss_fn, loader, backend=backend)
        assert looped.num_samples == 256 and len(looped.batches) == 2
        torch.testing.assert_close(looped @ V, full @ V, rtol=1e-12, atol=1e-14)
    loss, gradient = full.loss_and_gradient()
    looped_loss, looped_gradient = looped.loss_and_gradient()
    with torch.no_grad():
        want = float(loss_fn(model(x), y))
    assert looped_loss == pytest.approx(want, rel=1e-12)
    torch.testing.assert_close(looped_gradient, gradient, rtol=1e-12, atol=1e-14)


def test_reduction_argument_for_a_plain_summed_loss():
    model = tiny_mlp(in_features=5, width=4, depth=1, out_features=3)
    x, y = randn(30, 5, seed=1), randn(30, 3, seed=2)
    V = randn(sum(p.numel() for p in model.parameters()), 2, seed=4)

    def summed(out, target):
        return (out - target).square().sum()

    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    full = HessianOperator(model, summed, (x, y), reduction="sum")
    torch.testing.assert_close(
        HessianOperator(model, summed, batches, reduction="sum") @ V, full @ V
    )
    # read as a mean, the two batches would be weighted 2/3 and 1/3: a different operator
    assert not torch.allclose(HessianOperator(model, summed, batches) @ V, full @ V)


def test_a_second_operator_does_not_change_products_or_grad_buffers():
    model = tiny_mlp()
    x, y = randn(12, 6, seed=1), randn(12, 3, seed=2)
    v = randn(sum(p.numel() for p in model.parameters()), seed=3)
    first = {
        b: HessianOperator(model, nn.MSELoss(), (x, y), backend=b) for b in ("func", "autograd")
    }
    before = {b: op @ v for b, op in first.items()}
    for b in ("func", "autograd"):
        second = HessianOperator(model, nn.MSELoss(), (x, y), backend=b)
        torch.testing.assert_close(second @ v, before[b])
        second.loss_and_gradient()
    for b, op in first.items():
        torch.testing.assert_close(op @ v, before[b], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_operator_follows_parameter_updates(backend):
    # autograd and ext keep a per-batch pass between products: an update must invalidate it.
    model = tiny_mlp(in_features=3, width=4, depth=1, out_features=2)
    x, y = randn(10, 3, seed=1), randn(10, 2, seed=2)
    H = HessianOperator(model, nn.MSELoss(), (x, y), backend=backend)
    G = GGNOperator(model, nn.MSELoss(), (x, y), backend=backend)
    v = randn(H.shape[0], seed=3)
    H @ v, G @ v
    with torch.no_grad():
        model.layers.fc1.weight.mul_(1.5)
    torch.testing.assert_close(H @ v, _dense_hessian(model, x, y, "mse") @ v)
    torch.testing.assert_close(G @ v, _dense_ggn(model, x, y, "mse") @ v)
    model.layers.readout.weight = nn.Parameter(model.layers.readout.weight.detach() * 0.5)
    torch.testing.assert_close(H @ v, _dense_hessian(model, x, y, "mse") @ v)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_device_and_dtype_are_the_models(device):
    model = tiny_mlp(dtype=torch.float32).to(device)
    x, y = torch.randn(8, 6), torch.randn(8, 3)  # data on the CPU: moved to the model's device
    H = HessianOperator(model, nn.MSELoss(), (x, y))
    assert H.device == next(model.parameters()).device and H.dtype == torch.float32
    out = H @ torch.randn(H.shape[0], dtype=torch.float64)
    assert out.device == H.device and out.dtype == torch.float32
    values, vectors = top_eigenvalues(H, 2, generator=torch.Generator(device).manual_seed(0))
    assert vectors.device == H.device


def test_unsupported_layer_falls_back_under_auto_and_raises_with_ext():
    model = _build(0, lambda: nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)))
    x, y = randn(6, 4, seed=1), randn(6, 2, seed=2)
    H = HessianOperator(model, nn.MSELoss(), (x, y), backend="auto")
    assert H.backend == "func"
    v = randn(H.shape[0], seed=3)
    # torch.func.hessian (jacfwd of jacrev) mis-differentiates LayerNorm in torch 2.14: the
    # oracle here is double backward, checked against finite differences when written.
    at, flat = _flat_fn(model, _oracle_loss("mse", y))
    dense = torch.autograd.functional.hessian(lambda t: at(t, x), flat)
    torch.testing.assert_close(H @ v, dense @ v)
    from torch_dlt.probes._hvp_ext import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="LayerNorm"):
        HessianOperator(model, nn.MSELoss(), (x, y), backend="ext")


def test_bad_input_is_rejected_with_the_argument_named():
    model = tiny_mlp()
    batch = (randn(4, 6), randn(4, 3))
    with pytest.raises(ValueError, match="backend"):
        HessianOperator(model, nn.MSELoss(), batch, backend="jax")
    with pytest.raises(ValueError, match="reduction"):
        HessianOperator(model, nn.MSELoss(reduction="none"), batch)
    with pytest.raises(ValueError, match="L1Loss"):
        GGNOperator(model, nn.L1Loss(), batch)
    with pytest.raises(TypeError, match="data"):
        HessianOperator(model, nn.MSELoss(), randn(4, 6))
    H = HessianOperator(model, nn.MSELoss(), batch)
    with pytest.raises(ValueError, match="shape"):
        H @ torch.zeros(3)
    with pytest.raises(ValueError, match="which"):
        top_eigenvalues(H, 1, which="BE")
    with pytest.raises(ValueError, match="k must"):
        top_eigenvalues(H, 0)
    with pytest.raises(ValueError, match="num_matvecs"):
        trace(H, num_matvecs=2)
    frozen = tiny_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        HessianOperator(frozen, nn.MSELoss(), batch)


def test_frozen_parameters_are_left_out():
    model = tiny_mlp(in_features=3, width=4, depth=1, out_features=2)
    model.layers.fc1.weight.requires_grad_(False)
    x, y = randn(10, 3, seed=1), randn(10, 2, seed=2)
    H = HessianOperator(model, nn.MSELoss(), (x, y))
    full = _dense_hessian(model, x, y, "mse")
    keep = torch.ones(full.shape[0], dtype=torch.bool)
    keep[: model.layers.fc1.weight.numel()] = False
    assert H.shape[0] == int(keep.sum())
    v = randn(H.shape[0], seed=3)
    torch.testing.assert_close(H @ v, full[keep][:, keep] @ v)


# ---------------------------------------------------------------------------------------------
# algorithms


@pytest.mark.parametrize(
    "which,method,block",
    [(w, "lanczos", b) for w in ("LA", "SA", "LM") for b in (1, 3)]
    + [("LA", "power", 1), ("SA", "power", 1)],
)
def test_top_eigenvalues_match_eigvalsh_of_the_dense_hessian(which, method, block):
    model = tiny_mlp(in_features=4, width=6, depth=1, out_features=3)
    x, y = randn(15, 4, seed=1), torch.randint(0, 3, (15,), generator=seeded(2))
    dense = _dense_hessian(model, x, y, "ce")
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    exact = torch.linalg.eigvalsh(dense)
    k = 4
    if which == "LA":
        want = exact[-k:]
    elif which == "SA":
        want = exact[:k]
    else:
        want = exact[exact.abs().argsort(descending=True)[:k]]
    want = want.sort(descending=True).values
    common = dict(which=which, method=method, block_size=block, max_iter=20000)
    res = top_eigenvalues(H, k, tol=1e-6, criterion="residual", generator=seeded(3), **common)
    assert res.converged and res.num_converged == k
    values, vectors = res
    torch.testing.assert_close(values, want, rtol=1e-8, atol=1e-10)
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(vectors.T @ vectors, eye, atol=1e-8, rtol=0)
    residual = (dense @ vectors - vectors * values).norm(dim=0) / values.abs()
    assert bool((residual <= 1e-6).all())
    torch.testing.assert_close(res.residuals, residual, atol=1e-7, rtol=0)  # reported = true
    if method == "power":
        return
    # the default criterion: tol is the eigenvalues' relative accuracy
    fast = top_eigenvalues(H, k, tol=1e-6, generator=seeded(3), **common)
    assert fast.converged and fast.num_matvecs <= res.num_matvecs
    assert bool(((fast.eigenvalues - want).abs() <= 1e-6 * want.abs()).all())
    assert bool((fast.error_bounds <= 1e-6).all())


def test_lanczos_restarts_and_finds_clustered_eigenvalues_of_a_matrix():
    gen = seeded(0)
    Q = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=torch.float64)).Q
    spectrum = torch.cat(
        [
            torch.tensor([10.0, 9.99, 9.98, 5.0, -7.0]),
            torch.rand(295, generator=gen, dtype=torch.float64),
        ]
    ).double()
    A = Q @ torch.diag(spectrum) @ Q.T
    res = top_eigenvalues(A, 4, tol=1e-8, max_basis=20, generator=seeded(1))
    assert res.converged
    torch.testing.assert_close(
        res.eigenvalues, torch.tensor([10.0, 9.99, 9.98, 5.0], dtype=torch.float64)
    )
    lm = top_eigenvalues(A, 5, which="LM", tol=1e-8, generator=seeded(1))
    assert lm.eigenvalues[-1] == pytest.approx(-7.0, rel=1e-10)


def test_lanczos_finds_a_repeated_eigenvalue_and_an_invariant_start():
    A = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0, 0.5, 0.2, 0.1, 0.0], dtype=torch.float64))
    res = top_eigenvalues(A, 4, tol=1e-10, generator=seeded(0))
    torch.testing.assert_close(
        res.eigenvalues, torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    )


def test_unconverged_run_warns_and_says_so():
    A = torch.diag(torch.linspace(1.0, 2.0, 400, dtype=torch.float64))
    with pytest.warns(CurvatureConvergenceWarning, match="of 3 eigenpairs"):
        res = top_eigenvalues(A, 3, tol=1e-10, max_iter=5, generator=seeded(0))
    assert not res.converged and res.num_matvecs == 5


def _decaying_matrix(n: int = 80, seed: int = 0) -> torch.Tensor:
    Q = torch.linalg.qr(torch.randn(n, n, generator=seeded(seed), dtype=torch.float64)).Q
    spectrum = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.5
    return Q @ torch.diag(spectrum) @ Q.T


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_trace_estimators_are_unbiased_and_improve_with_matvecs(method):
    A = _decaying_matrix()
    exact = float(A.trace())
    gen = seeded(1)
    errors = {}
    for m in (9, 45):
        est = torch.tensor(
            [trace(A, method=method, num_matvecs=m, generator=gen).estimate for _ in range(300)]
        )
        # unbiased: the mean over 300 runs is within 4 standard errors of the trace
        assert abs(float(est.mean()) - exact) < 4 * float(est.std()) / math.sqrt(300) + 1e-12
        errors[m] = float((est - exact).square().mean().sqrt())
    assert errors[45] < errors[9] / (3.0 if method == "hutch++" else 1.8)


def test_hutch_plus_plus_beats_hutchinson_and_reports_its_error():
    A = _decaying_matrix()
    exact = float(A.trace())
    gen = seeded(2)
    pp = [trace(A, num_matvecs=30, generator=gen) for _ in range(100)]
    plain = [trace(A, method="hutchinson", num_matvecs=30, generator=gen) for _ in range(100)]
    rms = lambda runs: math.sqrt(sum((r.estimate - exact) ** 2 for r in runs) / len(runs))  # noqa: E731
    assert rms(pp) < rms(plain) / 2
    mean_reported = sum(r.std_error for r in plain) / len(plain)
    assert 0.7 < mean_reported / rms(plain) < 1.3


def test_slq_density_integrates_to_one_and_has_exact_quadrature_moments():
    A = _decaying_matrix(40) - 0.1 * torch.eye(40, dtype=torch.float64)
    probes = randn(40, 3, seed=7)
    steps = 6
    d = spectral_density(A, lanczos_steps=steps, probes=probes)
    torch.testing.assert_close(d.weights.sum(1), torch.ones(3, dtype=torch.float64))
    grid, values = d.smoothed(sigma=0.01, num_points=4000)
    integral = float(torch.trapezoid(values, grid))
    assert integral == pytest.approx(1.0, abs=1e-6)
    unit = probes / probes.norm(dim=0)
    power = torch.eye(40, dtype=torch.float64)
    for j in range(1, 2 * steps):  # Gauss quadrature with m nodes is exact to degree 2m - 1
        power = power @ A
        exact = float(((unit * (power @ unit)).sum(0)).mean())
        assert d.moment(j) == pytest.approx(exact, rel=1e-9, abs=1e-14)


def test_slq_moments_estimate_normalised_traces_of_powers():
    model = tiny_mlp(in_features=4, width=5, depth=1, out_features=3)
    x, y = randn(20, 4, seed=1), randn(20, 3, seed=2)
    dense = _dense_hessian(model, x, y, "mse")
    n = dense.shape[0]
    H = HessianOperator(model, nn.MSELoss(), (x, y))
    d = spectral_density(H, num_probes=200, lanczos_steps=4, generator=seeded(4))
    assert d.num_matvecs == 800
    power = torch.eye(n, dtype=torch.float64)
    for j in (1, 2, 3):
        power = power @ dense
        # Rademacher probes: Var(v^T A v / n) = 2 (|A|_F^2 - sum A_ii^2) / n^2 per probe
        sd = math.sqrt(2 * float(power.square().sum() - power.diagonal().square().sum())) / n
        assert abs(d.moment(j) - float(power.trace()) / n) < 4 * sd / math.sqrt(200)


def test_index_is_the_fraction_of_negative_eigenvalues():
    spectrum = torch.tensor([-2.0, -0.5, 0.3, 1.0, 2.0, 4.0, 5.0, 8.0], dtype=torch.float64)
    Q = torch.linalg.qr(randn(8, 8, seed=0)).Q
    A = Q @ torch.diag(spectrum) @ Q.T
    d = spectral_density(A, num_probes=3, lanczos_steps=8, generator=seeded(1))
    assert hessian_index(d) == pytest.approx(2 / 8, abs=0.15)  # 3 probes: sampling error
    # the unit vectors as probes: each rule is one eigenvalue with weight 1
    exact = spectral_density(A, lanczos_steps=8, probes=torch.eye(8, dtype=torch.float64))
    assert hessian_index(exact) == pytest.approx(2 / 8, rel=1e-10)
    # -0.5 falls inside a threshold of 0.6: counted as zero
    assert hessian_index(exact, threshold=0.6) == pytest.approx(1 / 8, rel=1e-10)
    # smoothed: the nearest eigenvalue to 0 (0.3) is 3 sigma away, so Phi(-3) / 8 leaks in
    smoothed = hessian_index(exact, threshold=0.0, sigma=0.1)
    assert smoothed == pytest.approx(2 / 8 + (1 - 0.99865) / 8, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# distributed


def _ddp_model() -> nn.Module:
    return tiny_mlp(in_features=5, width=4, depth=1, out_features=3, seed=7)


def _ddp_data():
    return randn(24, 5, seed=8), randn(24, 3, seed=9)


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        x, y = _ddp_data()
        # uneven shards: rank 0 holds 16 samples in two batches, rank 1 holds 8
        shard = [(x[:10], y[:10]), (x[10:16], y[10:16])] if rank == 0 else [(x[16:], y[16:])]
        model = _ddp_model()
        V = randn(sum(p.numel() for p in model.parameters()), 2, seed=10)
        group = dist.group.WORLD
        out = {
            "H": HessianOperator(model, nn.MSELoss(), shard, process_group=group) @ V,
            "G": GGNOperator(model, nn.MSELoss(), shard, process_group=group, backend="autograd")
            @ V,
            "grad": HessianOperator(
                model, nn.MSELoss(), shard, process_group=group
            ).loss_and_gradient(),
        }
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is not available")
def test_two_gloo_processes_give_the_one_process_operator(tmp_path):
    run_gloo_workers(_ddp_worker, (2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    model = _ddp_model()
    x, y = _ddp_data()
    V = randn(sum(p.numel() for p in model.parameters()), 2, seed=10)
    H = HessianOperator(model, nn.MSELoss(), (x, y))
    want_h, want_g = H @ V, GGNOperator(model, nn.MSELoss(), (x, y)) @ V
    want_loss, want_grad = H.loss_and_gradient()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["H"], want_h, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got["G"], want_g, rtol=1e-12, atol=1e-14)
        assert got["grad"][0] == pytest.approx(want_loss, rel=1e-12)
        torch.testing.assert_close(got["grad"][1], want_grad, rtol=1e-12, atol=1e-14)


def test_probes_leave_a_train_mode_bn_dropout_net_untouched():
    net = tiny_bn_dropout_net()
    x, y = randn(10, 6, seed=4), randn(10, 3, seed=5)
    snapshot = ModelSnapshot.take(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureConvergenceWarning)
        for train_mode in (False, True):
            for backend in ("func", "autograd"):
                H = HessianOperator(
                    net, nn.MSELoss(), (x, y), backend=backend, train_mode=train_mode
                )
                top_eigenvalues(H, 2, max_iter=5, generator=seeded(0))
                trace(H, num_matvecs=6, generator=seeded(0))
                spectral_density(H, num_probes=2, lanczos_steps=3, generator=seeded(0))
                H.loss_and_gradient()
    snapshot.assert_unchanged(net)
    assert all(p.grad is None for p in net.parameters())
