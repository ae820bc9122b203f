"""Tests of torch_dlt/vis/transfer.py: the linear-probe transfer curve against scikit-learn's
logistic regression, a layer that erases the input, and the model left untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_dlt.data import data_loader
from torch_dlt.testing import ModelSnapshot, seeded
from torch_dlt.vis import transfer_curve


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three overlapping Gaussian classes in 6 dimensions (the same centres for every seed), one
    coordinate constant."""
    centres = torch.randn(3, 6, generator=seeded(100), dtype=torch.float64)
    generator = seeded(seed)
    y = torch.arange(n) % 3
    x = centres[y] + 1.5 * torch.randn(n, 6, generator=generator, dtype=torch.float64)
    x[:, 5] = 2.0
    return x, y


class _Erase(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Identity(), _Erase(), nn.Linear(6, 3)).double()


def test_identity_layer_probe_equals_sklearn_logistic_regression():
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    x_train, y_train = _blobs(240, seed=0)
    x_test, y_test = _blobs(120, seed=1)
    l2 = 1e-2
    curve = transfer_curve(
        _model(),
        ["0"],
        data_loader(x_train, y_train, batch_size=64, seed=0),
        data_loader(x_test, y_test, batch_size=50, shuffle=False),
        l2=l2,
    )
    scaler = preprocessing.StandardScaler().fit(x_train.numpy())
    reference = sklearn_linear.LogisticRegression(
        C=1 / (len(x_train) * l2), tol=1e-10, max_iter=5000
    )
    reference.fit(scaler.transform(x_train.numpy()), y_train.numpy())
    expected_test = reference.score(scaler.transform(x_test.numpy()), y_test.numpy())
    expected_train = reference.score(scaler.transform(x_train.numpy()), y_train.numpy())
    assert curve.depths == [0, 1] and curve.layers == ["input", "0"]
    # Depth 0 (the input) and depth 1 (after the identity) are the same regression.
    for depth in (0, 1):
        assert curve.test_accuracy[depth].item() == pytest.approx(expected_test, abs=1e-12)
        assert curve.train_accuracy[depth].item() == pytest.approx(expected_train, abs=1e-12)


def test_erased_features_give_the_majority_class():
    x_train, y_train = _blobs(100, seed=2)
    keep = (y_train != 2) | (torch.arange(100) < 10)  # class 2 rare, class 0 the majority
    x_train, y_train = x_train[keep], y_train[keep]
    x_test, y_test = _blobs(90, seed=3)
    model = _model()
    curve = transfer_curve(
        model,
        [model[0], model[1]],
        data_loader(x_train, y_train, batch_size=32, shuffle=False),
        data_loader(x_test, y_test, batch_size=32, shuffle=False),
    )
    # Constant features: the head can only learn the class prior, so it predicts the most
    # frequent training class everywhere.
    majority = torch.bincount(y_train).argmax()
    assert curve.layers == ["input", "0", "1"]
    assert curve.test_accuracy[2].item() == pytest.approx((y_test == majority).double().mean())
    assert curve.test_accuracy[1] > curve.test_accuracy[2]


def test_probe_leaves_model_and_rng_untouched_and_pools_feature_maps():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    ).train()
    model[0].weight.requires_grad_(False)
    x = torch.rand(36, 1, 8, 8, generator=seeded(4))
    y = torch.arange(36) % 3
    loader = data_loader(x, y, batch_size=12, seed=1)
    snapshot = ModelSnapshot.take(model)
    curve = transfer_curve(model, ["1", "3"], loader, loader, pool=2, include_input=False)
    snapshot.assert_unchanged(model)
    assert curve.depths == [1, 2] and curve.features == [16, 16]


def test_bad_arguments():
    model = _model()
    x, y = _blobs(12, seed=5)
    loader = data_loader(x, y, batch_size=6)
    with pytest.raises(ValueError, match="no submodule 'conv1'"):
        transfer_curve(model, ["conv1"], loader, loader)
    with pytest.raises(ValueError, match="non-empty sequence"):
        transfer_curve(model, [], loader, loader)
    with pytest.raises(ValueError, match="non-empty sequence"):
        transfer_curve(model, "0", loader, loader)
    with pytest.raises(ValueError, match="not one"):
        transfer_curve(model, [nn.Identity()], loader, loader)
    with pytest.raises(ValueError, match="pool must be None or an int >= 1"):
        transfer_curve(model, ["0"], loader, loader, pool=0)
    with pytest.raises(ValueError, match="l2 must be a finite float > 0"):
        transfer_curve(model, ["0"], loader, loader, l2=0.0)
    with pytest.raises(TypeError, match="train_loader must yield"):
        transfer_curve(model, ["0"], [x], loader)
