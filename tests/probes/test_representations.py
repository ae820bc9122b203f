"""Tests of torch_dlt.probes.representations: known dimensions, model untouched, hooks removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_dlt.probes.representations import representation_dimensions
from torch_dlt.testing import ModelSnapshot, randn, seeded, tiny_bn_dropout_net
from torch_dlt.theory.intrinsic_dim import intrinsic_dimension


def _projection_net() -> nn.Sequential:
    # Linear R^10 -> R^20 of rank 3: its outputs fill a 3-dim subspace whatever the input.
    low_rank = randn(20, 3, seed=1) @ randn(3, 10, seed=2)
    net = nn.Sequential(nn.Linear(10, 20, bias=False), nn.Tanh()).double()
    with torch.no_grad():
        net[0].weight.copy_(low_rank)
    return net


def test_projection_to_three_dims_measures_three() -> None:
    x = torch.rand(1500, 10, generator=seeded(0), dtype=torch.float64)
    result = representation_dimensions(_projection_net(), x, method="mle")
    assert list(result.dimensions) == ["input", "0", "1"]
    assert result.ambient == {"input": 10, "0": 20, "1": 20}
    assert result.num_samples == 1500
    assert abs(result.dimensions["0"] - 3) <= 0.3
    assert abs(result.dimensions["1"] - 3) <= 0.3
    assert result.dimensions["input"] == intrinsic_dimension(x, method="mle")


def test_batches_and_max_samples_match_direct_estimate() -> None:
    net = _projection_net()
    x = torch.rand(700, 10, generator=seeded(3), dtype=torch.float64)
    loader = [(x[i : i + 64], torch.zeros(64)) for i in range(0, 700, 64)]
    result = representation_dimensions(net, loader, layers=["0"], max_samples=500)
    with torch.no_grad():
        expected = intrinsic_dimension(net[0](x[:500]), method="twonn")
    assert result.num_samples == 500
    assert result.dimensions["0"] == pytest.approx(expected, rel=1e-12)


def test_model_unchanged_and_hooks_removed() -> None:
    net = tiny_bn_dropout_net()
    snapshot = ModelSnapshot.take(net)
    representation_dimensions(net, randn(300, 6, seed=4), method="twonn")
    snapshot.assert_unchanged(net)
    assert all(not m._forward_hooks for m in net.modules())


def test_hooks_removed_and_model_unchanged_when_forward_raises() -> None:
    net = tiny_bn_dropout_net()
    snapshot = ModelSnapshot.take(net)
    with pytest.raises(RuntimeError):
        representation_dimensions(net, randn(300, 5, seed=4))  # wrong number of features
    snapshot.assert_unchanged(net)
    assert all(not m._forward_hooks for m in net.modules())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": ["nope"]}, ValueError, "unknown layers"),
        ({"max_samples": 2}, ValueError, "max_samples"),
        ({"method": "pca"}, ValueError, "method"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    net = tiny_bn_dropout_net()
    snapshot = ModelSnapshot.take(net)
    with pytest.raises(error, match=match):
        representation_dimensions(net, randn(100, 6, seed=5), **kwargs)
    snapshot.assert_unchanged(net)


def test_model_must_be_a_module() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        representation_dimensions(lambda x: x, randn(10, 2))
