"""Tests of torch_dlt.robust.certified: soundness against attacks and dense sampling, the eps = 0
limit, certified accuracy against a per-sample loop, the schedules against their formulas, the
robust loss against its definition, training on a toy problem, and DistributedDataParallel."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from torch_dlt.data import data_loader
from torch_dlt.robust import bounds
from torch_dlt.robust.certified import (
    CertifiedTraining,
    RampSchedule,
    certified_accuracy,
    certify,
    evaluate_certified,
    worst_case_logits,
)
from torch_dlt.testing import ModelSnapshot, gloo_available, run_gloo_workers, seeded

METHODS = ("ibp", "crown-ibp", "crown", "wong-kolter", "alpha-crown")


def _build(make, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().double()


def _mlp(seed: int = 0) -> nn.Module:
    return _build(
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Linear(6, 12),
            nn.ReLU(),
            nn.Linear(12, 10),
            nn.ReLU(),
            nn.Linear(10, 4),
        ),
        seed,
    )


def _cnn(seed: int = 0) -> nn.Module:
    return _build(
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 3 * 3, 5),
        ),
        seed,
    )


def _inputs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=seeded(seed), dtype=torch.float64)


def _true_margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logit_y - logit_j for j != y in increasing j; ``logits`` may carry leading sample dims."""
    y = y.expand(logits.shape[:-1])
    full = logits.gather(-1, y.unsqueeze(-1)) - logits
    keep = torch.arange(logits.shape[-1]) != y.unsqueeze(-1)
    return full[keep].view(*logits.shape[:-1], logits.shape[-1] - 1)


def _pgd_min_margin(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 40, seed: int = 0
) -> torch.Tensor:
    """Smallest margin min_j (logit_y - logit_j) PGD finds in the box clamped to [0, 1]."""
    low, high = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    delta = torch.rand(x.shape, generator=seeded(seed), dtype=x.dtype)
    z = (low + delta * (high - low)).requires_grad_(True)
    best = torch.full((len(y),), math.inf, dtype=x.dtype)
    for _ in range(steps):
        margin = _true_margins(model(z), y).min(dim=1).values
        best = torch.minimum(best, margin.detach())
        (grad,) = torch.autograd.grad(margin.sum(), z)
        with torch.no_grad():
            z = torch.maximum(torch.minimum(z - eps / 8 * grad.sign(), high), low)
        z.requires_grad_(True)
    return best


# --- soundness: verified samples survive attacks and dense sampling of the box ---------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_verified_samples_cannot_be_broken(method, arch):
    if arch == "mlp":
        model, x = _mlp(seed=1), _inputs((24, 1, 2, 3), seed=2)
    else:
        model, x = _cnn(seed=1), _inputs((24, 1, 6, 6), seed=2)
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    # A radius where part of the batch is verified and part is not.
    eps = 0.02 if arch == "mlp" else 0.01
    result = certify(model, x, y, eps, method=method)
    assert 0 < int(result.verified.sum()) < len(y), result.verified

    pgd = _pgd_min_margin(model, x, y, eps)
    noise = torch.rand((256, *x.shape), generator=seeded(3), dtype=x.dtype)
    corners = torch.randint(0, 2, (64, *x.shape), generator=seeded(4)).to(x.dtype)
    low, high = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    points = low + torch.cat([noise, corners]) * (high - low)
    with torch.no_grad():
        logits = model(points.flatten(0, 1)).view(len(points), len(y), -1)
    sampled = _true_margins(logits, y)  # [S, B, K-1]
    # Every margin bound holds at every sampled point, and at the PGD point for its min margin.
    assert (sampled >= result.margins - 1e-9).all()
    assert (pgd >= result.margins.min(dim=1).values - 1e-9).all()
    assert (sampled[:, result.verified] > 0).all()
    assert (pgd[result.verified] > 0).all()


@pytest.mark.parametrize("method", METHODS)
def test_eps_zero_certifies_exactly_the_correct_predictions(method):
    model, x = _cnn(seed=5), _inputs((16, 1, 6, 6), seed=6)
    y = torch.randint(0, 5, (16,), generator=seeded(7))
    with torch.no_grad():
        logits = model(x)
    result = certify(model, x, y, 0.0, method=method)
    assert result.verified.equal(logits.argmax(1) == y)
    assert result.correct.equal(logits.argmax(1) == y)
    assert result.predicted.equal(logits.argmax(1))
    torch.testing.assert_close(result.margins, _true_margins(logits, y), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_verified_mask_is_correct_and_all_margins_positive(method):
    model, x = _mlp(seed=8), _inputs((40, 1, 2, 3), seed=9)
    y = torch.randint(0, 4, (40,), generator=seeded(10))
    with torch.no_grad():
        y[:30] = model(x[:30]).argmax(1)
    result = certify(model, x, y, 0.01, method=method)
    expected = torch.tensor(
        [
            bool(result.correct[b]) and all(float(m) > 0 for m in result.margins[b])
            for b in range(40)
        ]
    )
    assert result.verified.equal(expected)
    assert result.verified.any() and not result.verified.all()
    # Tighter boxes never verify less: the bounds are monotone in eps.
    smaller = certify(model, x, y, 0.005, method=method)
    assert (smaller.margins >= result.margins - 1e-12).all()
    assert (smaller.verified | ~result.verified).all()


def test_certified_accuracy_equals_a_loop_over_single_samples():
    model, x = _cnn(seed=11), _inputs((21, 1, 6, 6), seed=12)
    y = torch.randint(0, 5, (21,), generator=seeded(13))
    with torch.no_grad():
        y[:15] = model(x[:15]).argmax(1)
    loader = data_loader(x, y, batch_size=8, shuffle=True, seed=0)
    for method in ("ibp", "crown-ibp"):
        verified = [
            bool(certify(model, x[i : i + 1], y[i : i + 1], 0.01, method=method).verified)
            for i in range(21)
        ]
        correct = [bool(model(x[i : i + 1]).argmax(1) == y[i]) for i in range(21)]
        got = evaluate_certified(model, loader, 0.01, method=method, progress=False)
        assert got.num_samples == 21
        assert got.certified == pytest.approx(sum(verified) / 21, abs=1e-15)
        assert got.clean == pytest.approx(sum(correct) / 21, abs=1e-15)
        assert 0 < got.certified < got.clean
        assert (
            certified_accuracy(model, loader, 0.01, method=method, progress=False) == got.certified
        )


def test_certify_leaves_the_model_and_rng_as_they_were():
    model = _build(
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(27, 3),
        ),
        seed=14,
    )
    model.train()
    model[0].weight.requires_grad_(False)
    x = _inputs((6, 1, 3, 3), seed=15)
    y = torch.zeros(6, dtype=torch.int64)
    snapshot = ModelSnapshot.take(model)
    for method in METHODS:
        certify(model, x, y, 0.05, method=method)
        snapshot.assert_unchanged(model)
        assert all(p.grad is None for p in model.parameters())


def test_certify_rejects_bad_input_and_leaves_the_model_untouched():
    model, x = _mlp(), _inputs((4, 1, 2, 3), seed=0)
    y = torch.zeros(4, dtype=torch.int64)
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(ValueError, match="eps"):
        certify(model, x, y, -0.1)
    with pytest.raises(ValueError, match="y must be"):
        certify(model, x, y[:3], 0.1)
    with pytest.raises(ValueError, match="y must be"):
        certify(model, x, y.float(), 0.1)
    with pytest.raises(ValueError, match="norm"):
        certify(model, x, y, 0.1, norm="l2")
    with pytest.raises(ValueError, match="method"):
        certify(model, x, y, 0.1, method="lp")
    with pytest.raises(ValueError, match="labels"):
        certify(model, x, y + 7, 0.1)
    with pytest.raises(ValueError, match="domain"):
        certify(model, x + 2.0, y, 0.1)
    tanh = _build(
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)), 0
    )
    with pytest.raises((ValueError, TypeError, NotImplementedError), match="Tanh"):
        certify(tanh, x, y, 0.1)
    snapshot.assert_unchanged(model)


# --- schedules ----------------------------------------------------------------------------------


def test_linear_ramp_matches_its_formula():
    schedule = RampSchedule(1.0, 0.25, warmup_steps=7, ramp_steps=20)
    for step in range(0, 40):
        r = min(max((step - 7) / 20, 0.0), 1.0)
        assert schedule(step) == pytest.approx(1.0 - 0.75 * r, abs=1e-15)
    # Without a ramp: exactly warmup_steps steps at start, then end.
    assert [RampSchedule(0.0, 0.3, warmup_steps=2)(s) for s in range(4)] == [0.0, 0.0, 0.3, 0.3]
    assert RampSchedule(0.0, 0.3)(0) == 0.3


def test_smooth_ramp_is_a_power_curve_then_its_tangent():
    schedule = RampSchedule(0.0, 2.0, warmup_steps=10, ramp_steps=400, shape="smooth")
    a = 1.0 / (0.25**4 + 4 * 0.25**3 * 0.75)  # f(1) = 1 with f(r) = a r^4 below r = 1/4
    assert schedule(10) == 0.0 and schedule(410) == 2.0 and schedule(1000) == 2.0
    assert schedule(50) == pytest.approx(2.0 * a * 0.1**4, rel=1e-12)
    assert schedule(210) == pytest.approx(2.0 * a * (0.25**4 + 4 * 0.25**3 * 0.25), rel=1e-12)
    values = [schedule(s) for s in range(0, 420)]
    assert all(b >= a_ for a_, b in zip(values, values[1:]))
    # The slope is continuous at the joint r = 1/4 (step 110).
    left, right = schedule(110) - schedule(109), schedule(111) - schedule(110)
    assert right == pytest.approx(left, rel=0.05)


def test_trainer_schedules_follow_gowal_and_zhang():
    net = _mlp()
    trainer = CertifiedTraining(
        net, 0.3, method="crown-ibp", warmup_steps=10, ramp_steps=50, kappa_end=0.0, beta_end=0.2
    )
    seen = []
    for _ in range(70):
        seen.append((trainer.eps, trainer.kappa, trainer.beta))
        trainer.step()
    for step, (eps, kappa, beta) in enumerate(seen):
        r = min(max((step - 10) / 50, 0.0), 1.0)
        assert eps == pytest.approx(0.3 * r, abs=1e-15)
        assert kappa == pytest.approx(1.0 - r, abs=1e-15)
        assert beta == pytest.approx(1.0 - 0.8 * r, abs=1e-15)
    trainer.step(35)
    state = trainer.state_dict()
    other = CertifiedTraining(net, 0.3, warmup_steps=10, ramp_steps=50, kappa_end=0.0, beta_end=0.2)
    other.load_state_dict(state)
    assert (other.eps, other.kappa, other.beta) == (trainer.eps, trainer.kappa, trainer.beta)
    assert other.eps == pytest.approx(0.15)
    assert CertifiedTraining(net, 0.3, method="ibp").beta == 0.0
    assert CertifiedTraining(net, 0.3).eps == 0.3  # no schedule: the full eps from the start
    assert CertifiedTraining(net, 0.3, method="wong-kolter").beta == 1.0
    with pytest.raises(ValueError, match="kappa_end"):
        CertifiedTraining(net, 0.3, kappa_end=1.5)
    with pytest.raises(ValueError, match="method"):
        CertifiedTraining(net, 0.3, method="crown")
    with pytest.raises(ValueError, match="state"):
        other.load_state_dict({"epoch": 3})


# --- the robust loss ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "wong-kolter"])
def test_robust_loss_is_kappa_clean_plus_worst_case_cross_entropy(method):
    model, x = _cnn(seed=16), _inputs((10, 1, 6, 6), seed=17)
    y = torch.randint(0, 5, (10,), generator=seeded(18))
    trainer = CertifiedTraining(model, 0.04, method=method, ramp_steps=10, kappa_end=0.2)
    trainer.step(4)
    kappa, beta = 1.0 - 0.8 * 0.4, 1.0 - 0.4
    parts = trainer.losses(x, y)

    C = bounds.margin_matrix(y, 5)
    low, high = (x - 0.016).clamp(0, 1), (x + 0.016).clamp(0, 1)
    ibp = bounds.interval_bounds(model, low, high, C=C)[0]
    if method == "ibp":
        lower = ibp
    elif method == "crown-ibp":
        lower = beta * bounds.crown_bounds(model, low, high, C=C, method="crown-ibp")[0]
        lower = lower + (1 - beta) * ibp
    else:
        lower = bounds.crown_bounds(model, low, high, C=C, method="wong-kolter")[0]
    # The worst case puts logit 0 on the true class and -lower_j on class j:
    # CE = log(1 + sum_j exp(-lower_j)).
    robust = torch.log1p(torch.exp(-lower).sum(1)).mean()
    clean = F.cross_entropy(model(x), y)
    torch.testing.assert_close(parts.robust, robust)
    torch.testing.assert_close(parts.clean, clean)
    torch.testing.assert_close(parts.loss, kappa * clean + (1 - kappa) * robust)
    assert parts.verified_error == pytest.approx(float((lower <= 0).any(1).double().mean()))
    # The robust loss bounds the loss of every input in the box.
    points = low + torch.rand((32, *x.shape), generator=seeded(19), dtype=x.dtype) * (high - low)
    with torch.no_grad():
        worst_sampled = torch.stack(
            [F.cross_entropy(model(p), y, reduction="none") for p in points]
        )
    assert (worst_sampled.max(0).values <= torch.log1p(torch.exp(-lower).sum(1)) + 1e-9).all()
    # The gradient too: CROWN-IBP and IBP share one interval pass inside the loss.
    parameters = list(model.parameters())
    expected = torch.autograd.grad((1 - kappa) * robust + kappa * clean, parameters)
    for got, want in zip(torch.autograd.grad(parts.loss, parameters), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_loss_at_eps_zero_is_the_clean_loss_and_worst_case_logits_layout():
    model, x = _mlp(seed=20), _inputs((12, 1, 2, 3), seed=21)
    y = torch.randint(0, 4, (12,), generator=seeded(22))
    parts = CertifiedTraining(model, 0.1, warmup_steps=5).losses(x, y)
    torch.testing.assert_close(parts.robust, parts.clean)
    torch.testing.assert_close(parts.loss, parts.clean)
    margins = torch.tensor([[1.5, -0.5, 2.0]])
    assert worst_case_logits(margins).tolist() == [[0.0, -1.5, 0.5, -2.0]]


def test_ibp_training_raises_certified_accuracy_on_a_separable_toy_problem():
    # Two classes at distance >= 0.5 in l-infinity: certifiable at eps = 0.1.
    g = seeded(23)
    n = 128
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.25
    x[:, 0] += 0.05 + 0.65 * y.double()
    x[:, 1] += 0.4
    model = _build(lambda: nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2)), seed=24)
    loader = data_loader(x, y, batch_size=64, shuffle=False)
    before = certified_accuracy(model, loader, 0.1, method="ibp", progress=False)
    trainer = CertifiedTraining(
        model, 0.1, method="ibp", warmup_steps=5, ramp_steps=30, kappa_end=0.0
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(60):
        opt.zero_grad()
        trainer.loss(x, y).backward()
        opt.step()
        trainer.step()
    after = certified_accuracy(model, loader, 0.1, method="ibp", progress=False)
    assert before < 0.6
    assert after > 0.95


# --- DistributedDataParallel: two processes on half batches equal one on the whole batch -------

_DDP_STEPS = 3


def _ddp_model() -> nn.Module:
    return _cnn(seed=30)


def _ddp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return _inputs((12, 1, 6, 6), seed=31), torch.randint(0, 5, (12,), generator=seeded(32))


def _ddp_trainer(model: nn.Module) -> CertifiedTraining:
    # eps > 0 and 0 < beta < 1 from the first step: both bounds enter the gradient.
    trainer = CertifiedTraining(model, 0.05, method="crown-ibp", ramp_steps=4, kappa_end=0.0)
    trainer.step(1)
    return trainer


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        model = DistributedDataParallel(_ddp_model())
        trainer = _ddp_trainer(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        x, y = _ddp_batch()
        part = x.shape[0] // world_size
        xs, ys = x[rank * part : (rank + 1) * part], y[rank * part : (rank + 1) * part]
        for _ in range(_DDP_STEPS):
            opt.zero_grad()
            trainer.loss(xs, ys).backward()
            opt.step()
            trainer.step()
        torch.save([p.detach() for p in model.module.parameters()], f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is not available")
def test_ddp_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    world_size = 2
    run_gloo_workers(
        _ddp_worker, (world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size
    )
    model = _ddp_model()
    trainer = _ddp_trainer(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = _ddp_batch()
    for _ in range(_DDP_STEPS):
        opt.zero_grad()
        trainer.loss(x, y).backward()
        opt.step()
        trainer.step()
    # The same steps on the clean loss alone end elsewhere: the robust part must be in the sync.
    clean_only = _ddp_model()
    clean_opt = torch.optim.SGD(clean_only.parameters(), lr=0.5)
    for _ in range(_DDP_STEPS):
        clean_opt.zero_grad()
        F.cross_entropy(clean_only(x), y).backward()
        clean_opt.step()
    start = list(_ddp_model().parameters())
    for rank in range(world_size):
        ranked = torch.load(tmp_path / f"rank{rank}.pt")
        for got, want, first in zip(ranked, model.parameters(), start):
            assert not torch.allclose(want, first)
            torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    assert not all(
        torch.allclose(a, b) for a, b in zip(model.parameters(), clean_only.parameters())
    )
