"""Tests for torch_dlt.init: weight statistics against the mean-field critical variance,
orthogonality, delta-orthogonal norm preservation, generator reproducibility and errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_dlt.init import critical_init_, delta_orthogonal_, edge_of_chaos_
from torch_dlt.theory import critical_sigma_w2, q_star


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_variance(sample, expected):
    """Sample variance within 5 standard errors (sd of a Gaussian sample variance:
    sqrt(2 / n) sigma^2) and mean within 5 standard errors of 0."""
    n = sample.numel()
    sample = sample.double()
    assert abs(sample.var().item() - expected) < 5 * math.sqrt(2 / n) * expected
    assert abs(sample.mean().item()) < 5 * math.sqrt(expected / n)


@pytest.mark.parametrize("shape", [(2000, 1000), (256, 32, 3, 3), (128, 16, 5)])
def test_gaussian_weights_have_the_critical_variance(shape):
    weight = torch.empty(shape)
    returned = edge_of_chaos_(weight, "tanh", 0.05, generator=seeded())
    assert returned is weight
    fan_in = math.prod(shape[1:])
    assert_variance(weight, critical_sigma_w2("tanh", 0.05) / fan_in)


def test_module_bias_has_the_bias_variance():
    layer = nn.Linear(20, 40000)
    assert edge_of_chaos_(layer, "relu", sigma_b2=0.3, generator=seeded()) is layer
    assert_variance(layer.bias.detach(), 0.3)
    assert_variance(layer.weight.detach(), 2.0 / 20)  # relu's line is sigma_w2 = 2
    edge_of_chaos_(layer, "relu", sigma_b2=0.0)
    assert torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (32, 8, 3, 3), (96, 8, 3, 3)])
def test_orthogonal_weights_are_scaled_isometries(shape):
    weight = torch.empty(shape, dtype=torch.float64)
    edge_of_chaos_(weight, "tanh", 0.05, distribution="orthogonal", generator=seeded())
    sigma_w2 = critical_sigma_w2("tanh", 0.05)
    out, fan_in = shape[0], math.prod(shape[1:])
    matrix = weight.reshape(out, fan_in)
    if out >= fan_in:
        gram, expected = matrix.T @ matrix, sigma_w2 * out / fan_in
    else:
        gram, expected = matrix @ matrix.T, sigma_w2
    torch.testing.assert_close(gram, expected * torch.eye(gram.shape[0], dtype=torch.float64))
    # same entry variance as the gaussian initialiser: sigma_w2 / fan_in on average
    assert (matrix**2).mean().item() == pytest.approx(sigma_w2 / fan_in, rel=1e-12)


def test_orthogonal_matrices_are_unbiased_in_sign():
    # Haar measure: E[Q_11] = 0; plain QR (R with positive diagonal) biases it
    firsts = torch.stack(
        [
            edge_of_chaos_(torch.empty(4, 4), "linear", 0.0, distribution="orthogonal")[0, 0]
            for _ in range(400)
        ]
    )
    assert abs(firsts.mean().item()) < 5 * firsts.std().item() / math.sqrt(400)


@pytest.mark.parametrize("distribution", ["gaussian", "orthogonal"])
def test_generator_reproducibility_and_global_rng_untouched(distribution):
    state = torch.get_rng_state()
    a = edge_of_chaos_(torch.empty(50, 30), distribution=distribution, generator=seeded(3))
    b = edge_of_chaos_(torch.empty(50, 30), distribution=distribution, generator=seeded(3))
    c = edge_of_chaos_(torch.empty(50, 30), distribution=distribution, generator=seeded(4))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def mlp(activation_module, widths=(64, 256, 256, 10)):
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), activation_module()]
    return nn.Sequential(*layers[:-1])


@pytest.mark.parametrize(
    "module, name, sigma_b2",
    [(nn.Tanh, "tanh", 0.05), (nn.ReLU, "relu", 0.0), (nn.SELU, "selu", 0.05)],
)
def test_critical_init_reads_the_activation_from_the_model(module, name, sigma_b2):
    net = mlp(module)
    assert critical_init_(net, sigma_b2=sigma_b2, generator=seeded()) is net
    expected = critical_sigma_w2(name, sigma_b2)
    weights = torch.cat([(m.weight * math.sqrt(m.in_features)).flatten() for m in net[::2]])
    assert_variance(weights.detach(), expected)


def test_critical_init_reads_a_model_activation_attribute_and_conv_layers():
    class Net(nn.Module):
        activation = F.relu  # a class attribute: read back as a bound method

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 64, 3)
            self.fc = nn.Linear(64, 30000)

    net = critical_init_(Net(), sigma_b2=0.0, distribution="orthogonal", generator=seeded())
    flat = net.conv.weight.detach().reshape(64, 72)
    torch.testing.assert_close(flat @ flat.T, 2.0 * torch.eye(64), atol=1e-5, rtol=1e-5)
    assert_variance(net.fc.weight.detach(), 2.0 / 64)
    net.activation = "tanh"
    critical_init_(net, sigma_b2=0.05, generator=seeded())
    assert_variance(net.fc.weight.detach(), critical_sigma_w2("tanh", 0.05) / 64)


def test_explicit_activation_overrides_the_model():
    net = mlp(nn.Tanh)
    critical_init_(net, activation="relu", sigma_b2=0.0, generator=seeded())
    weights = torch.cat([(m.weight * math.sqrt(m.in_features)).flatten() for m in net[::2]])
    assert_variance(weights.detach(), 2.0)


@pytest.mark.parametrize(
    "net, match",
    [
        (nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU()), "ReLU, Tanh"),
        (nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU()), "LeakyReLU"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU6()), "ReLU6"),
        (nn.Sequential(nn.Linear(4, 4)), "no activation module"),
        (nn.Sequential(nn.Tanh(), nn.BatchNorm1d(4)), "no nn.Linear"),
        (nn.Sequential(nn.Linear(4, 4), nn.GELU()), "no edge of chaos"),
    ],
)
def test_critical_init_errors_leave_the_model_untouched(net, match):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        critical_init_(net, sigma_b2=0.05)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])


def test_layer_without_weight_is_named():
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    net[2].register_parameter("weight", None)
    before = net[0].weight.clone()
    with pytest.raises(ValueError, match="layer '2' \\(Linear\\) has no weight"):
        critical_init_(net)
    assert torch.equal(net[0].weight, before)


def test_edge_of_chaos_errors():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        edge_of_chaos_(torch.empty(5))
    with pytest.raises(ValueError, match="distribution must be one of"):
        edge_of_chaos_(torch.empty(5, 5), distribution="uniform")
    with pytest.raises(TypeError, match="critical_init_"):
        edge_of_chaos_(nn.BatchNorm1d(3))
    with pytest.raises(TypeError, match="floating point"):
        edge_of_chaos_(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="accepted names"):
        edge_of_chaos_(torch.empty(3, 3), activation="swish")


@torch.no_grad()
@pytest.mark.parametrize("distribution", ["gaussian", "orthogonal"])
def test_deep_critical_tanh_net_settles_at_q_star(distribution):
    # after 12 layers (xi_q ~ 1.5) the length is q* up to finite-width fluctuations, which
    # spread ~2% across seeds at width 1000: 8% is 4 standard deviations
    width, depth = 1000, 12
    net = nn.Sequential(
        *[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())][:-1]
    )
    critical_init_(net, sigma_b2=0.05, distribution=distribution, generator=seeded(1))
    x = torch.randn(64, width, generator=seeded(2))
    q_measured = (net(x) ** 2).mean().item()
    expected = q_star("tanh", critical_sigma_w2("tanh", 0.05), 0.05)
    assert q_measured == pytest.approx(expected, rel=0.08)


def test_delta_orthogonal_centre_is_orthogonal_and_other_taps_zero():
    for shape in [(12, 12, 3), (16, 8, 3, 3), (8, 4, 3, 3, 3), (6, 6, 4, 4)]:
        weight = torch.empty(shape, dtype=torch.float64)
        assert delta_orthogonal_(weight, gain=1.5, generator=seeded()) is weight
        centre = (slice(None), slice(None), *(k // 2 for k in shape[2:]))
        tap = weight[centre]
        torch.testing.assert_close(tap.T @ tap, 2.25 * torch.eye(shape[1], dtype=torch.float64))
        weight[centre] = 0
        assert torch.count_nonzero(weight) == 0


def test_delta_orthogonal_conv_preserves_norms():
    weight = delta_orthogonal_(torch.empty(16, 8, 3, 3, dtype=torch.float64), gain=0.7)
    x = torch.randn(5, 8, 11, 11, dtype=torch.float64, generator=seeded())
    y = F.conv2d(x, weight, padding=1)
    torch.testing.assert_close(y.flatten(1).norm(dim=1), 0.7 * x.flatten(1).norm(dim=1))


def test_delta_orthogonal_errors():
    with pytest.raises(ValueError, match="out_channels >= in_channels"):
        delta_orthogonal_(torch.empty(4, 8, 3, 3))
    with pytest.raises(ValueError, match="3 to 5 dims"):
        delta_orthogonal_(torch.empty(8, 8))
    with pytest.raises(ValueError, match="gain"):
        delta_orthogonal_(torch.empty(8, 8, 3), gain=math.nan)
