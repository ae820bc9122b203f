"""Tests of torch_dlt/optim/svrg.py: SVRG against a numpy loop, its linear rate where SGD stalls,
the exact restoration of the model around the snapshot pass, state_dict and argument errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from torch_dlt.optim import SVRG, InverseTimeLR, full_gradient_closure, svrg
from torch_dlt.testing import ModelSnapshot, devices, randn, seeded


def least_squares(n=40, d=5, seed=0):
    """A noisy least-squares problem: the per-sample gradients do not vanish at the optimum."""
    a = randn(n, d, seed=seed)
    b = a @ randn(d, 1, seed=seed + 1) + 0.5 * randn(n, 1, seed=seed + 2)
    return a, b


def batches_of(n, batch_size, count, seed):
    generator = seeded(seed)
    return [torch.randperm(n, generator=generator)[:batch_size] for _ in range(count)]


def linear_model(d, seed=0):
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(randn(1, d, seed=seed))
    return model


def mse_closure(opt, model, a, b, index):
    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(a[index]), b[index])
        loss.backward()
        return loss

    return closure


def full_closure_of(model, a, b, batch_size=7):
    """The full gradient from unequal batches (40 = 5 * 7 + 5), through the public helper."""
    chunks = [(a[i : i + batch_size], b[i : i + batch_size]) for i in range(0, len(a), batch_size)]
    return full_gradient_closure(model, nn.functional.mse_loss, chunks)


def numpy_svrg(a, b, x, batches, *, lr_at, snapshot_every, weight_decay):
    """Johnson & Zhang's update written out on the closed-form least-squares gradients."""
    a, b, x = a.numpy(), b.numpy()[:, 0], x.numpy().copy()

    def grad(index, w):
        return 2.0 / len(index) * a[index].T @ (a[index] @ w - b[index])

    everything = np.arange(len(a))
    trajectory = []
    for t, index in enumerate(batches):
        if t % snapshot_every == 0:
            snapshot, mu = x.copy(), grad(everything, x)
        index = index.numpy()
        x = x - lr_at(t) * (grad(index, x) - grad(index, snapshot) + mu + weight_decay * x)
        trajectory.append(x.copy())
    return trajectory


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("foreach", [False, True])
def test_svrg_matches_a_brute_force_loop_with_a_scheduler(foreach, device):
    a, b = least_squares()
    model = linear_model(a.shape[1])
    start = model.weight.detach()[0].clone()
    model.to(device)
    batches = batches_of(len(a), 4, 25, seed=3)
    a, b = a.to(device), b.to(device)
    opt = SVRG(
        model.parameters(),
        lr=0.05,
        snapshot_every=10,
        full_closure=full_closure_of(model, a, b),
        weight_decay=0.01,
        foreach=foreach,
    )
    scheduler = InverseTimeLR(opt, t0=20.0)
    expected = numpy_svrg(
        a.cpu(),
        b.cpu(),
        start,
        batches,
        lr_at=lambda t: 0.05 / (1 + t / 20.0),
        snapshot_every=10,
        weight_decay=0.01,
    )
    for index, x_expected in zip(batches, expected):
        opt.step(mse_closure(opt, model, a, b, index))
        scheduler.step()
        np.testing.assert_allclose(model.weight.detach()[0].cpu().numpy(), x_expected, rtol=1e-11)


def test_functional_foreach_and_for_loop_agree_in_float64():
    shapes = [(3, 4), (5,), (2, 2, 2)]
    dtypes = [torch.float64, torch.float32, torch.float64]

    def tensors(seed):
        return [randn(*s, seed=seed + i).to(dt) for i, (s, dt) in enumerate(zip(shapes, dtypes))]

    grads, snaps, mus = tensors(10), tensors(20), tensors(30)
    by_loop, by_foreach = tensors(0), tensors(0)
    svrg(by_loop, grads, snaps, mus, lr=0.3, weight_decay=0.1, foreach=False)
    svrg(by_foreach, grads, snaps, mus, lr=0.3, weight_decay=0.1, foreach=True)
    for x0, x_loop, x_foreach, g, s, mu in zip(tensors(0), by_loop, by_foreach, grads, snaps, mus):
        torch.testing.assert_close(x_loop, x0 - 0.3 * (g - s + mu + 0.1 * x0))
        torch.testing.assert_close(x_foreach, x_loop)


def test_svrg_converges_linearly_where_sgd_with_the_same_step_stalls():
    a, b = least_squares(n=40, d=5, seed=4)
    solution = torch.linalg.lstsq(a, b).solution

    def gap(model):
        with torch.no_grad():
            return (
                nn.functional.mse_loss(model(a), b) - nn.functional.mse_loss(a @ solution, b)
            ).item()

    lr, epochs, steps_per_epoch = 0.02, 30, 40
    batches = batches_of(len(a), 1, epochs * steps_per_epoch, seed=5)
    sgd_model, svrg_model = linear_model(5, seed=6), linear_model(5, seed=6)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=lr)
    opt = SVRG(
        svrg_model.parameters(),
        lr=lr,
        snapshot_every=2 * steps_per_epoch,
        full_closure=full_closure_of(svrg_model, a, b),
    )
    sgd_gaps, svrg_gaps = [], []
    for t, index in enumerate(batches):
        sgd.step(mse_closure(sgd, sgd_model, a, b, index))
        opt.step(mse_closure(opt, svrg_model, a, b, index))
        if (t + 1) % steps_per_epoch == 0:
            sgd_gaps.append(gap(sgd_model))
            svrg_gaps.append(gap(svrg_model))
    half = epochs // 2
    # SGD: no progress in the second half (noise floor), far above SVRG
    assert min(sgd_gaps[half:]) > 0.1 * np.mean(sgd_gaps[half // 2 : half])
    assert sgd_gaps[-1] > 1e-4
    # SVRG: geometric decrease, every 2-epoch snapshot period shrinks the gap by a factor
    assert svrg_gaps[-1] < 1e-12
    log_gaps = np.log(np.maximum(svrg_gaps[: half + 1], 1e-300))
    rate = np.polyfit(np.arange(half + 1), log_gaps, 1)[0]
    assert rate < -1.0  # > e per epoch
    assert max(svrg_gaps[half:]) < 1e-6 * svrg_gaps[0]


@pytest.fixture(autouse=True)
def isolated_rng():
    """The tests below seed the global RNG (dropout draws from it); other tests never see it."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        yield


def dropout_mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3))
    model.double().train()
    model[0].bias.requires_grad_(False)  # a frozen parameter takes no part
    return model


def mlp_closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def test_take_snapshot_leaves_the_model_its_grads_and_flags_as_they_were():
    model = dropout_mlp()
    x, y = randn(16, 6, seed=1), torch.arange(16) % 3
    for p in model.parameters():
        if p.requires_grad:
            p.grad = randn(*p.shape, seed=9)
    grads = {n: p.grad for n, p in model.named_parameters()}
    snapshot = ModelSnapshot.take(model)
    opt = SVRG(model.parameters(), lr=0.1)
    with torch.random.fork_rng(devices=[]):  # the full closure itself draws dropout masks
        opt.take_snapshot(mlp_closure(opt, model, x, y))
    snapshot.assert_unchanged(model)
    for n, p in model.named_parameters():
        assert p.grad is grads[n], n
    assert "snapshot" not in opt.state[model[0].bias]


def rng_state(device: str) -> torch.Tensor:
    return torch.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state(device)


@pytest.mark.parametrize("device", devices())
def test_step_at_the_snapshot_is_a_full_gradient_step_and_restores_the_model(device):
    """Right after a snapshot x == x_snap: the two passes must see the same dropout masks, so
    the step is exactly -lr * mu, .grad is g_i(x), and the RNG advances as for one closure."""
    model = dropout_mlp().to(device)
    reference = copy.deepcopy(model)
    x, y = randn(16, 6, seed=2, device=device), torch.arange(16, device=device) % 3
    opt = SVRG(model.parameters(), lr=0.1)
    full_x = randn(32, 6, seed=3, device=device)
    full_y = torch.arange(32, device=device) % 3
    model.eval()  # a deterministic full gradient
    opt.take_snapshot(mlp_closure(opt, model, full_x, full_y))
    model.train()
    ref_full = torch.autograd.grad(
        nn.functional.cross_entropy(reference.eval()(full_x), full_y),
        [p for p in reference.parameters() if p.requires_grad],
    )
    reference.train()

    torch.manual_seed(123)
    ref_loss = nn.functional.cross_entropy(reference(x), y)
    ref_grads = torch.autograd.grad(
        ref_loss, [p for p in reference.parameters() if p.requires_grad]
    )
    rng_after_one_closure = rng_state(device)

    torch.manual_seed(123)
    loss = opt.step(mlp_closure(opt, model, x, y))
    assert torch.equal(rng_state(device), rng_after_one_closure)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=0, atol=0)
    assert all(module.training for module in model.modules())
    trained = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    for p, p_ref, g_ref, mu in zip(trained, ref_params, ref_grads, ref_full):
        torch.testing.assert_close(p.detach(), p_ref.detach() - 0.1 * mu, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-13, atol=1e-15)
    frozen = model[0].bias
    assert torch.equal(frozen, reference[0].bias) and frozen.grad is None


def test_a_closure_that_raises_at_the_snapshot_leaves_the_weights_in_place():
    a, b = least_squares()
    model = linear_model(5)
    opt = SVRG(model.parameters(), lr=0.05, full_closure=full_closure_of(model, a, b))
    for index in batches_of(40, 4, 3, seed=0):
        opt.step(mse_closure(opt, model, a, b, index))
    snapshot = ModelSnapshot.take(model)

    def broken():
        raise FloatingPointError("boom")

    with pytest.raises(FloatingPointError):
        opt.step(broken)
    snapshot.assert_unchanged(model)


def test_state_dict_round_trip_continues_the_same_trajectory():
    a, b = least_squares()
    batches = batches_of(40, 4, 30, seed=7)
    model = linear_model(5)
    opt = SVRG(model.parameters(), lr=0.05, snapshot_every=8, weight_decay=1e-3)
    opt.take_snapshot(full_closure_of(model, a, b))
    for index in batches[:13]:
        opt.step(mse_closure(opt, model, a, b, index))
    saved = copy.deepcopy(opt.state_dict())

    resumed_model = copy.deepcopy(model)
    resumed = SVRG(
        resumed_model.parameters(),
        lr=1.0,
        snapshot_every=8,
        full_closure=full_closure_of(resumed_model, a, b),
    )
    resumed.load_state_dict(saved)
    state = resumed.state[resumed_model.weight]
    assert state["step"].dtype == torch.int64 and int(state["step"]) == 13 - 8
    assert resumed.param_groups[0]["lr"] == 0.05 and resumed.param_groups[0]["weight_decay"] == 1e-3
    for index in batches[13:]:
        opt.step(mse_closure(opt, model, a, b, index))
        resumed.step(mse_closure(resumed, resumed_model, a, b, index))
        assert torch.equal(model.weight, resumed_model.weight)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": True}, "lr"),
        ({"lr": 0.1, "weight_decay": -1.0}, "weight_decay"),
        ({"lr": 0.1, "snapshot_every": 0}, "snapshot_every"),
        ({"lr": 0.1, "snapshot_every": 2.5}, "snapshot_every"),
        ({"lr": 0.1, "foreach": "yes"}, "foreach"),
    ],
)
def test_bad_hyper_parameters_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SVRG([torch.zeros(2, requires_grad=True)], **kwargs)


def test_misuse_gets_clear_errors_and_leaves_the_model_untouched():
    a, b = least_squares()
    model = linear_model(5)
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(TypeError, match="full_closure"):
        SVRG(model.parameters(), lr=0.1, full_closure=3)
    opt = SVRG(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step(None)
    with pytest.raises(RuntimeError, match="take_snapshot"):
        opt.step(mse_closure(opt, model, a, b, torch.arange(4)))
    with pytest.raises(RuntimeError, match="no full_closure"):
        opt.take_snapshot()
    with pytest.raises(RuntimeError, match="backward"):
        opt.take_snapshot(lambda: nn.functional.mse_loss(model(a), b))
    opt.take_snapshot(full_closure_of(model, a, b))
    with pytest.raises(TypeError, match="Tensor"):
        opt.step(lambda: 1.0)
    snapshot.assert_unchanged(model)
    with pytest.raises(ValueError, match="one entry per parameter"):
        svrg([torch.zeros(2)], [], [], [], lr=0.1)


def test_full_gradient_closure_is_the_dense_gradient_of_the_mean_loss():
    a, b = least_squares()
    model = linear_model(5)
    dense = torch.autograd.grad(nn.functional.mse_loss(model(a), b), model.weight)[0]
    model.weight.grad = torch.ones_like(model.weight)
    loss = full_closure_of(model, a, b, batch_size=9)()  # 40 = 4 * 9 + 4
    torch.testing.assert_close(model.weight.grad, dense + 1.0, rtol=1e-13, atol=0)
    torch.testing.assert_close(
        loss, nn.functional.mse_loss(model(a), b).detach(), rtol=1e-13, atol=0
    )
