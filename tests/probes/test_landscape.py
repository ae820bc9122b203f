"""Tests for torch_dlt.probes.landscape against brute-force loops, direct losses and numpy SVD."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from torch_dlt.data import data_loader
from torch_dlt.probes.landscape import (
    pca_directions,
    project_trajectory,
    random_bn_direction,
    random_direction,
    slice_1d,
    surface_2d,
)
from torch_dlt.testing import ModelSnapshot, randn, seeded, tiny_bn_dropout_net, tiny_cnn

mse = nn.functional.mse_loss
xent = nn.functional.cross_entropy


def _bn_cnn(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 3, 3),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 3),
        ).double()
        with torch.no_grad():
            net(torch.randn(16, 2, 6, 6, dtype=torch.float64) * 2 + 1)
    return net


def _cnn_batch(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = randn(n, 2, 6, 6, seed=seed)
    y = torch.randint(0, 3, (n,), generator=seeded(seed))
    return x, y


def _brute_force_loss(model, directions, coefficients, batch, *, train=False):
    """Oracle: copy perturbed weights into a deepcopy and run it the ordinary way."""
    clone = copy.deepcopy(model)
    clone.train(train)
    with torch.no_grad():
        for j, p in enumerate(clone.parameters()):
            p.add_(sum(c * d[j] for c, d in zip(coefficients, directions)))
        return float(xent(clone(batch[0]), batch[1]))


def test_filter_normalisation_matches_weight_filter_norms() -> None:
    net = _bn_cnn()
    d = random_direction(net, generator=seeded(3))
    assert [t.shape for t in d] == [p.shape for p in net.parameters()]
    for (name, p), t in zip(net.named_parameters(), d):
        if p.dim() <= 1:  # conv/linear biases and BatchNorm weight/bias
            assert float(t.abs().sum()) == 0.0, name
        else:
            torch.testing.assert_close(
                t.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-6, atol=1e-6
            )
            # a direction, not the weights: not parallel to them
            cos = (t * p.detach()).sum() / (t.norm() * p.detach().norm())
            assert abs(float(cos)) < 0.9


def test_ignore_none_and_other_normalisations() -> None:
    net = _bn_cnn()
    params = [p.detach() for p in net.parameters()]
    d = random_direction(net, ignore=None, generator=seeded(0))
    for p, t in zip(params, d):
        if p.dim() == 1:
            torch.testing.assert_close(t, p)  # Li et al.: 1-D directions copy the parameter
    layer = random_direction(net, normalization="layer", generator=seeded(0))
    for p, t in zip(params, layer):
        if p.dim() > 1:
            torch.testing.assert_close(t.norm(), p.norm())
    model = random_direction(net, normalization="model", generator=seeded(0))
    moving = [(p, t) for p, t in zip(params, model) if p.dim() > 1]
    torch.testing.assert_close(
        torch.sqrt(sum(t.square().sum() for _, t in moving)),
        torch.sqrt(sum(p.square().sum() for p, _ in moving)),
    )
    raw = random_direction(net, normalization="none", generator=seeded(0))
    gen = seeded(0)
    expected = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    for p, t, e in zip(params, raw, expected):
        torch.testing.assert_close(t, torch.zeros_like(p) if p.dim() == 1 else e)


def test_surface_origin_and_grid_points_match_brute_force() -> None:
    net = _bn_cnn()
    batch = _cnn_batch()
    gen = seeded(5)
    ds = [random_direction(net, generator=gen) for _ in range(2)]
    snapshot = ModelSnapshot.take(net)
    alphas, betas, losses = surface_2d(net, xent, batch, ds, span=(-0.5, 1.0), steps=4)
    snapshot.assert_unchanged(net)
    assert losses.shape == (4, 4)
    torch.testing.assert_close(alphas, torch.linspace(-0.5, 1.0, 4, dtype=torch.float64))
    torch.testing.assert_close(betas, alphas)
    for i, j in [(0, 0), (1, 3), (3, 2), (2, 1)]:
        oracle = _brute_force_loss(net, ds, (float(alphas[i]), float(betas[j])), batch)
        assert float(losses[i, j]) == pytest.approx(oracle, rel=1e-10)
    # (0, 0) is on the grid for an odd grid on a symmetric span: the model's own loss
    origin = surface_2d(net, xent, batch, ds, span=(-1.0, 1.0), steps=3).losses[1, 1]
    assert float(origin) == pytest.approx(
        float(xent(net.eval()(batch[0]), batch[1]).detach()), rel=1e-12
    )


def test_vmapped_and_looped_evaluation_agree_and_train_mode() -> None:
    net = _bn_cnn()
    net.train()
    batch = _cnn_batch()
    ds = [random_direction(net, generator=seeded(s)) for s in (1, 2)]
    snapshot = ModelSnapshot.take(net)
    vmapped = surface_2d(net, xent, batch, ds, steps=3, chunk_size=4).losses
    looped = surface_2d(net, xent, batch, ds, steps=3, chunk_size=1).losses
    torch.testing.assert_close(vmapped, looped, rtol=1e-10, atol=1e-12)
    train = surface_2d(net, xent, batch, ds, steps=3, train=True).losses
    snapshot.assert_unchanged(net)  # running stats, flags and RNG restored after train mode
    oracle = _brute_force_loss(net, ds, (1.0, -1.0), batch, train=True)
    assert float(train[2, 0]) == pytest.approx(oracle, rel=1e-10)


def test_dropout_train_mode_restores_rng_and_state() -> None:
    net = tiny_bn_dropout_net()
    x, y = randn(10, 6, seed=2), randn(10, 3, seed=3)
    d = random_direction(net, generator=seeded(0))
    snapshot = ModelSnapshot.take(net)
    slice_1d(net, mse, (x, y), d, steps=3, train=True)
    slice_1d(net, mse, (x, y), d, steps=3)
    snapshot.assert_unchanged(net)


def test_slice_between_two_models_hits_each_model() -> None:
    a, b = _bn_cnn(seed=0), _bn_cnn(seed=1)
    batch = _cnn_batch()
    alphas, losses = slice_1d(a, xent, batch, b, span=(0.0, 1.0), steps=5)
    assert float(alphas[0]) == 0.0 and float(alphas[-1]) == 1.0
    assert float(losses[0]) == pytest.approx(
        float(xent(a.eval()(batch[0]), batch[1]).detach()), rel=1e-10
    )
    assert float(losses[-1]) == pytest.approx(
        float(xent(b.eval()(batch[0]), batch[1]).detach()), rel=1e-10
    )
    mid = copy.deepcopy(a)
    with torch.no_grad():
        for t, u in zip(mid.state_dict().values(), b.state_dict().values()):
            if t.is_floating_point():
                t.copy_(0.5 * t + 0.5 * u)
    assert float(losses[2]) == pytest.approx(
        float(xent(mid.eval()(batch[0]), batch[1]).detach()), rel=1e-10
    )


def test_data_loader_average_equals_full_batch() -> None:
    net = tiny_cnn(width=3)
    x, y = _cnn_batch(n=23)
    ds = [random_direction(net, generator=seeded(s)) for s in (7, 8)]
    full = surface_2d(net, xent, (x, y), ds, steps=3).losses
    batched = surface_2d(net, xent, data_loader(x, y, batch_size=5, shuffle=True), ds, steps=3)
    torch.testing.assert_close(batched.losses, full, rtol=1e-10, atol=1e-12)
    listed = slice_1d(net, xent, [(x[:10], y[:10]), (x[10:], y[10:])], ds[0], steps=3).losses
    torch.testing.assert_close(listed, full[:, 1], rtol=1e-10, atol=1e-12)


def test_bn_direction_moves_running_statistics() -> None:
    net = _bn_cnn()
    batch = _cnn_batch()
    zero = [torch.zeros_like(p) for p in net.parameters()]
    bn = random_bn_direction(net, generator=seeded(0))
    assert set(bn) == {"1.running_mean", "1.running_var"}
    _, losses = slice_1d(net, xent, batch, zero, steps=3, span=(0.0, 0.5), buffer_direction=bn)
    clone = copy.deepcopy(net).eval()
    with torch.no_grad():
        clone[1].running_mean.add_(0.5 * bn["1.running_mean"])
        clone[1].running_var.add_(0.5 * bn["1.running_var"]).clamp_(min=0)
        oracle = float(xent(clone(batch[0]), batch[1]))
    assert float(losses[-1]) == pytest.approx(oracle, rel=1e-10)
    assert float(losses[-1]) != pytest.approx(float(losses[0]), rel=1e-6)


def test_pca_directions_match_numpy_svd_and_projection() -> None:
    net = tiny_cnn(width=3)
    rng = np.random.default_rng(0)
    base = [p.detach().clone() for p in net.parameters()]
    path = []
    for t in range(8):
        path.append(
            [
                b
                + 0.1 * t * torch.ones_like(b)
                + 0.05 * torch.from_numpy(rng.standard_normal(tuple(b.shape)))
                for b in base
            ]
        )
    pca = pca_directions(path, n_components=2)
    flat = np.stack([torch.cat([t.reshape(-1) for t in p]).numpy() for p in path])
    rows = flat[:-1] - flat[-1]
    rows = rows - rows.mean(axis=0)
    _, s, vt = np.linalg.svd(rows, full_matrices=False)
    for k in range(2):
        ours = torch.cat([t.reshape(-1) for t in pca.directions[k]]).numpy()
        assert abs(abs(ours @ vt[k]) - 1.0) < 1e-10
    np.testing.assert_allclose(pca.explained_variance_ratio.numpy(), (s**2 / (s**2).sum())[:2])
    basis = np.stack([torch.cat([t.reshape(-1) for t in d]).numpy() for d in pca.directions])
    np.testing.assert_allclose(pca.coordinates.numpy(), (flat - flat[-1]) @ basis.T, atol=1e-12)
    torch.testing.assert_close(project_trajectory(path, pca.directions), pca.coordinates)
    # state_dicts need the model to tell parameters from buffers
    states = [copy.deepcopy(net).state_dict() for _ in range(3)]
    with pytest.raises(ValueError, match="model="):
        pca_directions(states, n_components=1)
    assert len(pca_directions(states, n_components=1, model=net).directions) == 1


def test_bad_input_is_rejected_and_model_untouched() -> None:
    net = _bn_cnn()
    batch = _cnn_batch()
    d = random_direction(net, generator=seeded(0))
    snapshot = ModelSnapshot.take(net)
    with pytest.raises(ValueError, match="steps"):
        surface_2d(net, xent, batch, [d, d], steps=0)
    with pytest.raises(ValueError, match="steps"):
        slice_1d(net, xent, batch, d, steps=0)
    with pytest.raises(ValueError, match="no batches"):
        slice_1d(net, xent, [], d, steps=3)
    with pytest.raises(ValueError, match="no batches"):
        slice_1d(net, xent, data_loader(batch[0][:0], batch[1][:0], shuffle=False), d, steps=3)
    with pytest.raises(ValueError, match="same architecture"):
        slice_1d(net, xent, batch, tiny_cnn(), steps=3)
    wrong = [torch.zeros(2, 2)] + d[1:]
    with pytest.raises(ValueError, match=r"'0.weight'.*expected \(4, 2, 3, 3\)"):
        surface_2d(net, xent, batch, [wrong, d], steps=3)
    with pytest.raises(ValueError, match="tensors"):
        slice_1d(net, xent, batch, d[:-1], steps=3)
    with pytest.raises(ValueError, match="pair"):
        surface_2d(net, xent, batch, [d], steps=3)
    with pytest.raises(ValueError, match="normalization"):
        random_direction(net, normalization="unit")
    snapshot.assert_unchanged(net)


# ---------------------------------------------------------------------------------------------
# grid points stacked through chain-structured models


def _seeded_net(build, seed: int = 0, input_shape: tuple = (2, 6, 6)) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build().double()
        with torch.no_grad():  # BatchNorm running statistics away from their initial 0 / 1
            net.train()(randn(16, *input_shape, seed=9) * 2 + 1)
    return net.eval()


def _conv_chain() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Conv2d(4, 3, 2, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 3),
    )


def _mlp_chain() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(72, 8),
        nn.BatchNorm1d(8),
        nn.GELU(),
        nn.Dropout(0.5),
        nn.Linear(8, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    )


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(72, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + torch.relu(self.conv(x)))


@pytest.mark.parametrize("ignore", ["biasbn", None])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
@pytest.mark.parametrize(
    "build",
    [_conv_chain, _mlp_chain, lambda: tiny_cnn(activation="relu")],
    ids=["conv_chain", "mlp_chain", "deep_cnn"],
)
def test_stacked_chain_matches_brute_force(build, chunk_size, ignore) -> None:
    from torch_dlt.probes.landscape import _StackedChain

    net = _seeded_net(build)
    assert _StackedChain.build(net) is not None  # the stacked evaluation is what runs here
    batch = _cnn_batch()
    gen = seeded(4)
    ds = [random_direction(net, ignore=ignore, generator=gen) for _ in range(2)]
    snapshot = ModelSnapshot.take(net)
    alphas, betas, losses = surface_2d(
        net, xent, batch, ds, span=(-0.7, 0.9), steps=4, chunk_size=chunk_size
    )
    snapshot.assert_unchanged(net)
    for i in range(4):
        for j in range(4):
            oracle = _brute_force_loss(net, ds, (float(alphas[i]), float(betas[j])), batch)
            assert float(losses[i, j]) == pytest.approx(oracle, rel=1e-10), (i, j)


def test_stacked_lenet_with_method_flatten_and_input_check() -> None:
    from torch_dlt.nn import LeNet5
    from torch_dlt.probes.landscape import _StackedChain

    net = _seeded_net(lambda: LeNet5(num_classes=3, pooling="max"), input_shape=(1, 28, 28))
    assert _StackedChain.build(net) is not None
    x, y = randn(5, 1, 28, 28, seed=2), torch.tensor([0, 2, 1, 1, 0])
    ds = [random_direction(net, generator=seeded(s)) for s in (1, 2)]
    line = slice_1d(net, xent, (x, y), ds[0], steps=3)
    surface = surface_2d(net, xent, (x, y), ds, steps=3)
    for i, j in [(0, 2), (2, 1)]:
        point = (float(surface.alphas[i]), float(surface.betas[j]))
        oracle = _brute_force_loss(net, ds, point, (x, y))
        assert float(surface.losses[i, j]) == pytest.approx(oracle, rel=1e-10)
    torch.testing.assert_close(line.losses, surface.losses[:, 1], rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="LeNet5: expected input"):  # its pre-hook still runs
        surface_2d(net, xent, (x[:, :, :20, :20], y), ds, steps=2)


def test_models_outside_the_stacked_form_match_brute_force() -> None:
    from torch_dlt.probes.landscape import _StackedChain

    residual = _seeded_net(_Residual)
    hooked = _seeded_net(_conv_chain)
    hooked[2].register_forward_hook(lambda module, args, out: out * 0.5)
    rescaled = _seeded_net(_mlp_chain)
    rescaled.register_forward_pre_hook(lambda module, args: (args[0] * 3.0,))
    batch = _cnn_batch()
    for net, stacked in ((residual, False), (hooked, False), (rescaled, True)):
        assert (_StackedChain.build(net) is not None) is stacked
        ds = [random_direction(net, generator=seeded(s)) for s in (5, 6)]
        for chunk_size in (None, 3):
            surface = surface_2d(net, xent, batch, ds, steps=3, chunk_size=chunk_size)
            for i, j in [(0, 0), (1, 2), (2, 1)]:
                point = (float(surface.alphas[i]), float(surface.betas[j]))
                oracle = _brute_force_loss(net, ds, point, batch)
                assert float(surface.losses[i, j]) == pytest.approx(oracle, rel=1e-10)
