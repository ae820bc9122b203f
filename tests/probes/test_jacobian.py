"""Tests for torch_dlt.probes.jacobian: measured Jacobian spectra against dense autograd."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from torch_dlt.probes.jacobian import JacobianSpectrum, jacobian_spectrum
from torch_dlt.theory.isometry import jacobian_spectrum_moments
from torch_dlt.theory.meanfield import critical_sigma_w2


def _dense_squared_singular_values(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Oracle: one full autograd Jacobian per sample, then its SVD."""
    values = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda z: model(z[None])[0], xi)
        jac = jac.reshape(-1, xi.numel()).to(torch.float64)
        values.append(torch.linalg.svdvals(jac) ** 2)
    return torch.stack(values)


def _mlp(n_in: int, hidden: int, n_out: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(n_in, hidden),
        nn.BatchNorm1d(hidden),
        nn.Tanh(),
        nn.Dropout(0.5),
        nn.Linear(hidden, n_out),
    )
    # non-trivial running statistics, so that eval mode differs from train mode
    with torch.no_grad():
        model(torch.randn(64, n_in) * 2 + 1)
    return model


class _Noisy(nn.Module):
    """Draws from the global RNG in its forward pass (a stochastic layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.0 * torch.randn_like(x)


def _double(model: nn.Module) -> nn.Module:
    return model.to(torch.float64)


@pytest.mark.parametrize(("n_in", "n_out"), [(9, 5), (5, 9)])
def test_exact_matches_dense_autograd_jacobian(n_in: int, n_out: int) -> None:
    model = _double(_mlp(n_in, 16, n_out, seed=0))
    x = torch.randn(4, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    spectrum = jacobian_spectrum(model, x, method="exact")
    oracle = _dense_squared_singular_values(model.eval(), x)
    assert spectrum.method == "exact"
    assert spectrum.squared_singular_values.shape == (4, min(n_in, n_out))
    torch.testing.assert_close(spectrum.squared_singular_values, oracle, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(spectrum.mean, oracle.mean(1))
    torch.testing.assert_close(spectrum.variance, oracle.var(1, unbiased=False))
    torch.testing.assert_close(spectrum.top, oracle[:, 0])
    torch.testing.assert_close(spectrum.bottom, oracle[:, -1])
    torch.testing.assert_close(spectrum.singular_values, oracle.sqrt())


def test_exact_on_image_input_and_output() -> None:
    torch.manual_seed(2)
    model = _double(
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 1, 3)
        )
    )
    with torch.no_grad():
        model(torch.randn(8, 2, 5, 5, dtype=torch.float64))
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    spectrum = jacobian_spectrum(model, x)  # auto: rank 9 is small, so exact
    oracle = _dense_squared_singular_values(model.eval(), x)
    assert (spectrum.in_features, spectrum.out_features) == (50, 9)
    torch.testing.assert_close(spectrum.squared_singular_values, oracle, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("n_in", "n_out"), [(40, 60), (60, 40)])
def test_lanczos_over_the_whole_space_recovers_the_spectrum(n_in: int, n_out: int) -> None:
    model = _double(_mlp(n_in, 80, n_out, seed=3))
    x = torch.randn(3, n_in, dtype=torch.float64)
    exact = jacobian_spectrum(model, x, method="exact")
    estimate = jacobian_spectrum(model, x, method="lanczos", lanczos_steps=40)
    assert estimate.method == "lanczos" and estimate.squared_singular_values is None
    # a Krylov space of full dimension holds every eigenvector: the Ritz values are the spectrum
    torch.testing.assert_close(
        estimate.ritz_values.flip(1), exact.squared_singular_values, rtol=1e-7, atol=1e-9
    )
    torch.testing.assert_close(estimate.ritz_weights.sum(1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(estimate.top, exact.top, rtol=1e-9, atol=0)


def test_lanczos_extremes_and_hutchinson_moments_against_exact() -> None:
    model = _double(_mlp(150, 150, 150, seed=4))
    x = torch.randn(4, 150, dtype=torch.float64)
    exact = jacobian_spectrum(model, x, method="exact")
    estimate = jacobian_spectrum(
        model,
        x,
        method="lanczos",
        lanczos_steps=30,
        num_probes=64,
        generator=torch.Generator().manual_seed(0),
    )
    # Ritz values interlace: the top one approaches the largest eigenvalue from below
    assert bool((estimate.top <= exact.top * (1 + 1e-12)).all())
    torch.testing.assert_close(estimate.top, exact.top, rtol=1e-3, atol=0)
    assert bool((estimate.bottom >= exact.bottom * (1 - 1e-12)).all())
    # Hutchinson: unbiased, within a few of its own standard errors
    for measured, stderr, truth in (
        (estimate.mean, estimate.mean_stderr, exact.mean),
        (estimate.second_moment, estimate.second_moment_stderr, exact.second_moment),
    ):
        assert bool(((measured - truth).abs() <= 4 * stderr).all()), (measured, truth, stderr)
        assert bool((stderr < 0.1 * truth).all())


def test_lanczos_handles_an_exactly_isometric_jacobian() -> None:
    """J orthogonal: the Krylov space breaks down after one step and must restart cleanly."""
    torch.manual_seed(5)
    layer = nn.Linear(30, 30, bias=False).to(torch.float64)
    nn.init.orthogonal_(layer.weight)
    x = torch.randn(2, 30, dtype=torch.float64)
    estimate = jacobian_spectrum(layer, x, method="lanczos", lanczos_steps=10)
    torch.testing.assert_close(estimate.ritz_values, torch.ones(2, 10, dtype=torch.float64))
    torch.testing.assert_close(estimate.ritz_weights.sum(1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(estimate.mean, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(
        estimate.variance, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_float32_model_agrees_with_float64() -> None:
    model = _mlp(20, 30, 10, seed=6)
    x = torch.randn(2, 20)
    single = jacobian_spectrum(model, x, method="exact")
    double = jacobian_spectrum(_double(copy.deepcopy(model)), x.double(), method="exact")
    torch.testing.assert_close(
        single.squared_singular_values, double.squared_singular_values, rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("method", ["exact", "lanczos"])
def test_probe_leaves_the_model_and_rng_untouched(method: str) -> None:
    model = nn.Sequential(_mlp(12, 20, 12, seed=7), _Noisy())
    model.train()
    model[0][3].eval()  # a submodule whose flag differs from its parent's
    model[0][0].weight.requires_grad_(False)
    model[0][4].weight.grad = torch.ones_like(model[0][4].weight)
    state = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    requires = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    x = torch.randn(3, 12)
    torch_rng = torch.get_rng_state()

    jacobian_spectrum(model, x, method=method, lanczos_steps=6, num_probes=4)

    after = model.state_dict()
    assert state.keys() == after.keys()
    for key, value in state.items():
        assert torch.equal(value, after[key]), key  # parameters and BatchNorm running stats
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == requires
    for before, p in zip(grads, model.parameters()):
        assert (before is None and p.grad is None) or torch.equal(before, p.grad)
    assert torch.equal(torch.get_rng_state(), torch_rng)


def test_probe_uses_eval_mode() -> None:
    model = _double(_mlp(6, 10, 4, seed=8)).train()
    x = torch.randn(5, 6, dtype=torch.float64)
    spectrum = jacobian_spectrum(model, x, method="exact")
    torch.testing.assert_close(
        spectrum.squared_singular_values, _dense_squared_singular_values(model.eval(), x)
    )


def test_flags_are_restored_when_the_model_fails() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Flatten(0))  # mixes the batch: output [B * 4]
    model.train()
    with pytest.raises(ValueError, match="batch"):
        jacobian_spectrum(model, torch.randn(3, 4))
    assert all(m.training for m in model.modules())


def test_default_generator_is_reproducible() -> None:
    model = _mlp(30, 30, 30, seed=9)
    x = torch.randn(2, 30)
    first = jacobian_spectrum(model, x, method="lanczos", lanczos_steps=5, num_probes=3)
    second = jacobian_spectrum(model, x, method="lanczos", lanczos_steps=5, num_probes=3)
    assert torch.equal(first.ritz_values, second.ritz_values)
    assert torch.equal(first.mean, second.mean)


def test_measured_spectrum_matches_isometry_theory_on_a_random_tanh_net() -> None:
    """The probe on a wide orthogonal tanh net at criticality against the free-probability
    prediction (Pennington et al. 2017); the normalised variance var / mean^2 is compared since
    the overall scale fluctuates from sample to sample at finite width."""
    width, depth, sigma_b2 = 300, 8, 1e-3
    sigma_w2 = critical_sigma_w2("tanh", sigma_b2)
    prediction = jacobian_spectrum_moments("tanh", sigma_w2, sigma_b2, depth, weights="orthogonal")
    torch.manual_seed(10)
    layers = []
    for _ in range(depth):
        linear = nn.Linear(width, width, dtype=torch.float64)
        nn.init.orthogonal_(linear.weight, gain=math.sqrt(sigma_w2))
        nn.init.normal_(linear.bias, std=math.sqrt(sigma_b2))
        layers += [linear, nn.Tanh()]
    model = nn.Sequential(*layers)
    x = torch.tanh(torch.randn(4, width, dtype=torch.float64) * math.sqrt(prediction.q_star))
    measured = jacobian_spectrum(model, x, method="exact")
    normalised = measured.variance / measured.mean**2
    expected = prediction.variance / prediction.mean**2
    assert abs(float(normalised.mean()) - expected) < 0.1 * expected
    assert abs(float(measured.mean.mean()) - prediction.mean) < 0.05
    table = measured.compare(prediction)
    assert f"{prediction.variance:.5g}" in table and f"{float(measured.mean.mean()):.5g}" in table


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": [1.0, 2.0]}, TypeError, "x must be a Tensor"),
        ({"x": torch.randn(5)}, ValueError, "batch"),
        ({"x": torch.randn(0, 5)}, ValueError, "batch"),
        ({"x": torch.ones(2, 5, dtype=torch.long)}, TypeError, "floating"),
        ({"method": "svd"}, ValueError, "method"),
        ({"num_probes": 1}, ValueError, "num_probes"),
        ({"lanczos_steps": 0}, ValueError, "lanczos_steps"),
        ({"lanczos_steps": 6, "method": "lanczos"}, ValueError, "lanczos_steps"),
        ({"generator": 0}, TypeError, "generator"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, error: type, match: str) -> None:
    arguments = {"x": torch.randn(2, 5), **kwargs}
    model = nn.Linear(5, 3)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        jacobian_spectrum(model, **arguments)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_bad_models_raise_clear_errors() -> None:
    x = torch.randn(2, 5)
    with pytest.raises(TypeError, match="model"):
        jacobian_spectrum("not a model", x)
    with pytest.raises(TypeError, match="return a Tensor"):
        jacobian_spectrum(lambda z: (z, z), x)
    with pytest.raises(ValueError, match=r"\[2, \.\.\.\]"):
        jacobian_spectrum(lambda z: z.sum(), x)
    with pytest.raises(TypeError, match="compare"):
        jacobian_spectrum(nn.Linear(5, 5), x).compare(object())


class _HostSyncDouble(torch.autograd.Function):
    """2 x, with a backward that reads a value on the host, which vmap cannot batch."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * (2.0 if grad.abs().sum().item() >= 0 else 0.0)


class _HostSync(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _HostSyncDouble.apply(x)


def test_unbatchable_backward_points_to_lanczos() -> None:
    x = torch.randn(2, 5, dtype=torch.float64)
    estimate = jacobian_spectrum(_HostSync(), x, method="lanczos", lanczos_steps=5)
    torch.testing.assert_close(estimate.ritz_values, torch.full((2, 5), 4.0, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="method='lanczos'"):
        jacobian_spectrum(_HostSync(), x, method="exact")


def test_result_type() -> None:
    spectrum = jacobian_spectrum(nn.Linear(5, 3), torch.randn(2, 5))
    assert isinstance(spectrum, JacobianSpectrum)
    assert spectrum.rank == 3 and spectrum.mean.dtype == torch.float64
