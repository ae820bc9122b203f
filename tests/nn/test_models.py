"""Tests of torch_dlt/nn/models.py: LeNet5, DeepMLP, DeepCNN and the activation names."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_dlt.nn import ACTIVATIONS, DeepCNN, DeepMLP, LeNet5, activation_layer, cnn_small
from torch_dlt.testing import randn, tiny_cnn, tiny_mlp


def lenet5_parameter_count(in_channels: int, num_classes: int) -> int:
    """By hand: weights + biases of conv 6@5x5, conv 16@5x5 on 6 maps, fc 400-120-84-classes."""
    conv1 = 6 * in_channels * 5 * 5 + 6
    conv2 = 16 * 6 * 5 * 5 + 16
    fc1 = 16 * 5 * 5 * 120 + 120
    fc2 = 120 * 84 + 84
    fc3 = 84 * num_classes + num_classes
    return conv1 + conv2 + fc1 + fc2 + fc3


@pytest.mark.parametrize("input_size", [28, 32])
@pytest.mark.parametrize("in_channels, num_classes", [(1, 10), (3, 7)])
def test_lenet5_shapes_and_parameter_count(input_size, in_channels, num_classes):
    net = LeNet5(num_classes, in_channels=in_channels, input_size=input_size).double()
    x = randn(2, in_channels, input_size, input_size)
    feature_maps = {}
    for name in ("conv1", "pool1", "conv2", "pool2"):
        net.features.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: feature_maps.__setitem__(name, out.shape)
        )
    assert net(x).shape == (2, num_classes)
    assert feature_maps == {
        "conv1": (2, 6, 28, 28),
        "pool1": (2, 6, 14, 14),
        "conv2": (2, 16, 10, 10),
        "pool2": (2, 16, 5, 5),
    }
    assert sum(p.numel() for p in net.parameters()) == lenet5_parameter_count(
        in_channels, num_classes
    )
    assert lenet5_parameter_count(1, 10) == 61706


def test_lenet5_activation_and_pooling_choices():
    default = LeNet5()
    assert default.activation == "tanh"
    assert sum(isinstance(m, nn.Tanh) for m in default.modules()) == 4
    assert sum(isinstance(m, nn.AvgPool2d) for m in default.modules()) == 2
    relu_max = LeNet5(activation="relu", pooling="max")
    assert sum(isinstance(m, nn.ReLU) for m in relu_max.modules()) == 4
    assert sum(isinstance(m, nn.MaxPool2d) for m in relu_max.modules()) == 2
    assert not any(isinstance(m, nn.Tanh) for m in relu_max.modules())
    assert "activation='relu'" in repr(relu_max) and "pooling='max'" in repr(relu_max)


def test_lenet5_forward_is_the_composition_of_its_layers():
    net = LeNet5(activation="relu", pooling="max").double()
    x = randn(3, 1, 28, 28)
    f, c = net.features, net.classifier
    h = F.max_pool2d(F.relu(F.conv2d(x, f.conv1.weight, f.conv1.bias, padding=2)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, f.conv2.weight, f.conv2.bias)), 2).reshape(3, 400)
    h = F.relu(h @ c.fc1.weight.T + c.fc1.bias)
    h = F.relu(h @ c.fc2.weight.T + c.fc2.bias)
    torch.testing.assert_close(net(x), h @ c.fc3.weight.T + c.fc3.bias)


def test_lenet5_bad_arguments():
    with pytest.raises(
        ValueError, match=r"expected input of shape \[B, 1, 28, 28\], got \(2, 1, 32, 32\)"
    ):
        LeNet5()(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="input_size must be 28 or 32"):
        LeNet5(input_size=30)
    with pytest.raises(ValueError, match="activation must be one of"):
        LeNet5(activation="swish")
    with pytest.raises(ValueError, match="pooling must be one of"):
        LeNet5(pooling="median")
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        LeNet5(0)


@pytest.mark.parametrize("activation", ["tanh", "relu", "linear"])
@pytest.mark.parametrize("bias", [True, False])
def test_deep_mlp_structure_and_forward(activation, bias):
    net = tiny_mlp(12, 7, 4, 3, activation=activation, bias=bias)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert net.activation == activation
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 7)] + [(7, 7)] * 3 + [(7, 3)]
    assert all((m.bias is not None) == bias for m in linears)
    x = randn(5, 3, 4)  # flattened to 12 features
    phi = {"tanh": torch.tanh, "relu": torch.relu, "linear": lambda t: t}[activation]
    h = x.reshape(5, 12)
    for m in linears[:-1]:
        h = phi(F.linear(h, m.weight, m.bias))
    torch.testing.assert_close(net(x), F.linear(h, linears[-1].weight, linears[-1].bias))
    assert f"depth=4, out_features=3, activation='{activation}'" in repr(net)


def test_deep_cnn_structure_and_forward():
    net = tiny_cnn(2, 5, 3, 4, activation="relu")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert net.activation == "relu"
    assert [(m.in_channels, m.out_channels) for m in convs] == [(2, 5), (5, 5), (5, 5)]
    x = randn(3, 2, 7, 6)
    h = x
    for m in convs:
        h = torch.relu(F.conv2d(h, m.weight, m.bias, padding=1))
        assert h.shape[-2:] == (7, 6)
    expected = F.linear(h.mean(dim=(2, 3)), net.layers.readout.weight, net.layers.readout.bias)
    torch.testing.assert_close(net(x), expected)

    max_pooled = DeepCNN(1, 3, 2, 2, kernel_size=5, pooling="max")
    assert max_pooled(torch.zeros(1, 1, 9, 9)).shape == (1, 2)
    assert isinstance(max_pooled.layers.pool, nn.AdaptiveMaxPool2d)


def test_deep_nets_bad_arguments():
    with pytest.raises(ValueError, match="DeepMLP: depth must be a positive int"):
        DeepMLP(4, 4, 0, 2)
    with pytest.raises(ValueError, match=r"activation must be one of \('tanh'"):
        DeepMLP(4, 4, 2, 2, activation="softsign")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        DeepCNN(1, 4, 2, 2, kernel_size=4)
    with pytest.raises(
        ValueError, match=r"expected input of shape \[B, 1, H, W\], got \(2, 3, 8, 8\)"
    ):
        DeepCNN(1, 4, 2, 2)(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_layer_computes_the_named_function(name):
    functions = {
        "tanh": torch.tanh,
        "relu": lambda t: t.clamp(min=0),
        "linear": lambda t: t,
        "hardtanh": lambda t: t.clamp(-1, 1),
        "sigmoid": lambda t: 1 / (1 + torch.exp(-t)),
        "gelu": lambda t: t * 0.5 * (1 + torch.erf(t / 2**0.5)),
        "silu": lambda t: t / (1 + torch.exp(-t)),
        "erf": lambda t: torch.tensor([math.erf(v) for v in t.tolist()], dtype=t.dtype),
        "selu": lambda t: (
            1.0507009873554805 * torch.where(t > 0, t, 1.6732632423543772 * (torch.exp(t) - 1))
        ),
    }
    x = randn(50) * 3
    torch.testing.assert_close(activation_layer(name)(x), functions[name](x))
    assert activation_layer(name) is not activation_layer(name)


def test_activation_names_match_the_theory():
    # A model's .activation is handed to torch_dlt.theory: same names, same functions.
    from torch_dlt import theory

    assert set(ACTIVATIONS) == set(theory.ACTIVATIONS)
    x = randn(50) * 3
    for name in ACTIVATIONS:
        expected = theory.ACTIVATIONS[name].function(x.numpy())
        torch.testing.assert_close(activation_layer(name)(x), torch.from_numpy(expected))


def test_cnn_small_has_wong_and_kolters_layers():
    net = cnn_small()
    # conv 16 4x4 (1 in), conv 32 4x4, fc 1568 -> 100, fc 100 -> 10, with biases
    expected = (16 * 16 + 16) + (32 * 16 * 16 + 32) + (32 * 7 * 7 * 100 + 100) + (100 * 10 + 10)
    assert sum(p.numel() for p in net.parameters()) == expected
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    wide = cnn_small(in_channels=3, input_size=32, num_classes=5)
    assert wide(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="input_size must be a multiple of 4"):
        cnn_small(input_size=30)
