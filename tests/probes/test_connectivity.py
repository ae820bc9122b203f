"""Tests for torch_dlt.probes.connectivity: curves, barriers and BatchNorm recomputation against
closed forms, brute-force loops over state_dicts and a toy loss with a curved valley."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torch_dlt.probes.connectivity import (
    Curve,
    LossProfile,
    curve_loss_profile,
    find_curve,
    linear_barrier,
)
from torch_dlt.testing import ModelSnapshot, randn, tiny_bn_dropout_net, tiny_mlp


def _classification_data(n: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = randn(n, 6, seed=seed)
    return x, torch.arange(n) % 3


def _bn_pair() -> tuple[nn.Module, nn.Module]:
    """Two BatchNorm nets with different, non-trivial running statistics."""
    a, b = tiny_bn_dropout_net(seed=0), tiny_bn_dropout_net(seed=1)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(5)
        a(randn(32, 6, seed=1) * 2 + 1)
        b(randn(32, 6, seed=2) - 1)
    return a, b


def _interpolated(model_a: nn.Module, model_b: nn.Module, t: float) -> nn.Module:
    """Oracle: a deepcopy of model_a loaded with the interpolated state_dict (parameters only)."""
    model = copy.deepcopy(model_a)
    state = model.state_dict()
    params_b = dict(model_b.named_parameters())
    for name, p in model_a.named_parameters():
        state[name] = (1 - t) * p.detach() + t * params_b[name].detach()
    model.load_state_dict(state)
    return model


class Point(nn.Module):
    """A 2-parameter "model": its output is its own weight, whatever the input."""

    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(x.shape[0], 2)


def ring_loss(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Zero on the unit circle: the valley joining the two minima is an arc."""
    return ((out**2).sum(1) - 1).pow(2).mean()


def test_curve_points_match_closed_forms():
    a, b = tiny_mlp(seed=0), tiny_mlp(seed=1)
    wa, wb = dict(a.named_parameters()), dict(b.named_parameters())
    theta = {n: randn(*p.shape, seed=i + 10) for i, (n, p) in enumerate(wa.items())}
    bezier, chain = Curve(a, b, kind="bezier"), Curve(a, b, kind="polychain")
    # Untrained, the Bezier curve is the straight segment: (1-t)^2 a + t(1-t)(a+b) + t^2 b.
    for name in wa:
        torch.testing.assert_close(
            bezier.weights(0.3)[name], 0.7 * wa[name].detach() + 0.3 * wb[name].detach()
        )
    bezier.bend, chain.bend = theta, theta
    for name in wa:
        w1, w2 = wa[name].detach(), wb[name].detach()
        torch.testing.assert_close(bezier(0.5)[name], w1 / 4 + theta[name] / 2 + w2 / 4)
        torch.testing.assert_close(bezier(0.2)[name], 0.64 * w1 + 0.32 * theta[name] + 0.04 * w2)
        assert torch.equal(chain(0.5)[name], theta[name])
        torch.testing.assert_close(chain(0.25)[name], (w1 + theta[name]) / 2)
        torch.testing.assert_close(chain(0.75)[name], (w2 + theta[name]) / 2)
        for curve in (bezier, chain):
            assert torch.equal(curve(0.0)[name], w1)
            assert torch.equal(curve(1.0)[name], w2)
    model = chain.model_at(0.75)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), chain(0.75)[name])


def test_linear_barrier_matches_state_dict_loop():
    a, b = tiny_mlp(seed=0), tiny_mlp(seed=1)
    x, y = _classification_data(20)
    # Batches of 7, 7, 6: the average must weight them by size.
    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    profile = linear_barrier(a, b, F.cross_entropy, loader, steps=6, progress=False)
    expected = []
    for t in torch.linspace(0, 1, 6).tolist():
        with torch.no_grad():
            expected.append(float(F.cross_entropy(_interpolated(a, b, t).eval()(x), y)))
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(profile.losses, expected)
    assert profile.barrier == pytest.approx(float(expected.max() - max(expected[0], expected[-1])))
    chord = torch.tensor([(1 - t) * expected[0] + t * expected[-1] for t in profile.ts])
    assert profile.interpolated_barrier == pytest.approx(float((expected - chord).max()))


def test_curved_valley_trained_curves_beat_the_segment():
    angle = math.radians(30)
    a = Point([math.cos(angle), -math.sin(angle)])
    b = Point([-math.cos(angle), -math.sin(angle)])
    batch = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4))
    line = linear_barrier(a, b, ring_loss, batch, steps=21, progress=False)
    # Closed form: the segment's midpoint (0, -1/2) has |w|^2 = 1/4, loss (1/4 - 1)^2.
    assert line.barrier == pytest.approx(0.5625)
    assert line.losses[0] == pytest.approx(0.0, abs=1e-15)
    snapshots = ModelSnapshot.take(a), ModelSnapshot.take(b)
    for kind in ("bezier", "polychain"):
        curve = find_curve(a, b, ring_loss, batch, curve=kind, steps=300, lr=0.05, progress=False)
        profile = curve_loss_profile(curve, ring_loss, batch, steps=41, progress=False)
        assert profile.barrier < 0.25 * line.barrier, kind
        # Brute force: the profile is the loss of model_at(t), point by point.
        for t, loss in zip(profile.ts.tolist()[::10], profile.losses.tolist()[::10]):
            with torch.no_grad():
                assert loss == pytest.approx(float(ring_loss(curve.model_at(t)(batch[0]), None)))
    for snapshot, model in zip(snapshots, (a, b)):
        snapshot.assert_unchanged(model)


def test_find_curve_keeps_endpoints_and_models_bitwise():
    a, b = _bn_pair()
    x, y = _classification_data(24)
    # Unseeded shuffling draws from the global RNG, which the probe must restore.
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    snapshots = ModelSnapshot.take(a), ModelSnapshot.take(b)
    curve = find_curve(a, b, F.cross_entropy, loader, epochs=3, lr=0.1, progress=False)
    for snapshot, model in zip(snapshots, (a, b)):
        snapshot.assert_unchanged(model)
    assert len(curve.history) == 9
    midpoint = {
        n: (p + dict(b.named_parameters())[n]).detach() / 2 for n, p in a.named_parameters()
    }
    assert any(not torch.equal(curve.bend[n], midpoint[n]) for n in midpoint)
    for name, p in a.named_parameters():
        assert torch.equal(curve.start[name], p.detach())
        assert torch.equal(curve(0.0)[name], p.detach())
    for name, p in b.named_parameters():
        assert torch.equal(curve.end[name], p.detach())
        assert torch.equal(curve(1.0)[name], p.detach())
    again = find_curve(a, b, F.cross_entropy, loader, epochs=3, lr=0.1, progress=False)
    assert all(torch.equal(curve.bend[n], again.bend[n]) for n in midpoint)


def test_bn_recompute_matches_manual_recompute():
    a, b = _bn_pair()
    x, y = _classification_data(20)
    train = DataLoader(TensorDataset(x, y), batch_size=8)
    test = _classification_data(10, seed=3)
    snapshots = ModelSnapshot.take(a), ModelSnapshot.take(b)
    profile = linear_barrier(
        a, b, F.cross_entropy, test, steps=3, recompute_bn=train, progress=False
    )
    for snapshot, model in zip(snapshots, (a, b)):
        snapshot.assert_unchanged(model)
    for t, loss in zip(profile.ts.tolist(), profile.losses.tolist()):
        manual = _interpolated(a, b, t)
        manual[1].reset_running_stats()
        manual[1].momentum = None
        manual.eval()
        manual[1].train()
        with torch.no_grad():
            for xb, _ in train:
                manual(xb)
            manual.eval()
            assert loss == pytest.approx(float(F.cross_entropy(manual(test[0]), test[1])))
    # One full batch: the statistics are the batch mean and unbiased variance of Linear's output.
    curve = Curve(a, b, kind="line")
    model = curve.model_at(0.4, recompute_bn=(x, y))
    pre = F.linear(x, model[0].weight, model[0].bias).detach()
    torch.testing.assert_close(model[1].running_mean, pre.mean(0))
    torch.testing.assert_close(model[1].running_var, pre.var(0, unbiased=True))
    assert model.training and model[3].training  # a's flags, not ours
    # Without recomputation, the endpoints' statistics interpolated.
    plain = curve.model_at(0.4, recompute_bn=False)
    torch.testing.assert_close(
        plain[1].running_mean, 0.6 * a[1].running_mean + 0.4 * b[1].running_mean
    )


def test_profiles_of_untouched_models_in_train_mode():
    a, b = _bn_pair()
    x, y = _classification_data(16)
    # Batches of 6, 6, 4: train-mode BatchNorm needs more than one sample per batch.
    loader = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True)
    snapshots = ModelSnapshot.take(a), ModelSnapshot.take(b)
    curve = find_curve(a, b, F.cross_entropy, loader, curve="polychain", steps=4, progress=False)
    profile = curve_loss_profile(
        curve, F.cross_entropy, loader, steps=3, recompute_bn=loader, progress=False
    )
    curve.model_at(0.5, recompute_bn=loader)
    for snapshot, model in zip(snapshots, (a, b)):
        snapshot.assert_unchanged(model)
    assert isinstance(profile, LossProfile) and profile.losses.isfinite().all()


def test_bad_input_gives_clear_errors():
    a = tiny_mlp(seed=0)
    x, y = _classification_data(8)
    snapshot = ModelSnapshot.take(a)
    with pytest.raises(
        ValueError, match="linear_barrier: parameter 'layers.fc1.weight' is \\(8, 6\\).*\\(9, 6\\)"
    ):
        linear_barrier(a, tiny_mlp(width=9, seed=1), F.cross_entropy, (x, y), progress=False)
    with pytest.raises(ValueError, match="same architecture"):
        find_curve(a, tiny_mlp(activation="relu"), F.cross_entropy, (x, y), progress=False)
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        linear_barrier(a, tiny_mlp(seed=1), F.cross_entropy, (x, y), steps=1, progress=False)
    with pytest.raises(ValueError, match="no samples"):
        linear_barrier(a, tiny_mlp(seed=1), F.cross_entropy, [], progress=False)
    with pytest.raises(ValueError, match="loader yielded no batches"):
        find_curve(a, tiny_mlp(seed=1), F.cross_entropy, [], progress=False)
    with pytest.raises(TypeError, match="one-shot iterator"):
        linear_barrier(a, tiny_mlp(seed=1), F.cross_entropy, iter([(x, y)]), progress=False)
    with pytest.raises(ValueError, match="curve must be 'bezier' or 'polychain'"):
        find_curve(a, tiny_mlp(seed=1), F.cross_entropy, (x, y), curve="line", progress=False)
    with pytest.raises(ValueError, match=r"t must be a number in \[0, 1\]"):
        Curve(a, tiny_mlp(seed=1)).weights(1.5)
    snapshot.assert_unchanged(a)
    bn_a, bn_b = _bn_pair()
    with pytest.raises(ValueError, match=r"BatchNorm layers \(1\).*recompute_bn"):
        linear_barrier(bn_a, bn_b, F.cross_entropy, (x, y), progress=False)
