"""Tests of torch_dlt.vis.features: optimised images beat random and dataset inputs with default
arguments; top_examples against a brute-force loop; models and RNG left untouched."""

import pytest
import torch
from torch.testing import assert_close

from torch_dlt.data import data_loader, digits
from torch_dlt.nn import DeepCNN, LeNet5
from torch_dlt.testing import ModelSnapshot
from torch_dlt.vis import infer_image_shape, maximize_activation, top_examples


def _unit_means(model, layer_index, x):
    with torch.no_grad():
        return model.features[: layer_index + 1](x).mean((2, 3))


@pytest.mark.parametrize("kind", ["lenet_1x28", "cnn_3x32"])
def test_optimised_images_beat_random_and_data(kind):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "lenet_1x28":
            model, layer, size, c = LeNet5(), "features.conv2", 28, 1
        else:
            model = DeepCNN(3, width=8, depth=3, out_features=10, activation="relu")
            layer, size, c = "layers.conv3", 32, 3
    model.train()  # the probe must switch to eval and back
    units = [0, 1, 2, 3]
    snapshot = ModelSnapshot.take(model)
    out = maximize_activation(model, layer, units, steps=30)
    snapshot.assert_unchanged(model)
    assert all(p.grad is None for p in model.parameters())
    assert out.images.shape == (4, c, size, size)
    assert float(out.images.min()) >= 0.0 and float(out.images.max()) <= 1.0

    acts = {}
    hook = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, a, o: acts.__setitem__("out", o.mean((2, 3)))
    )
    g = torch.Generator().manual_seed(1)
    x_data = digits(size=size)[0][:300].repeat(1, c, 1, 1)
    with torch.no_grad():
        model.eval()
        model(out.images)
        on_own = acts["out"][range(4), units]
        model(torch.rand(64, c, size, size, generator=g))
        random_max = acts["out"][:, units].max(0).values
        model(x_data)
        data_median = acts["out"][:, units].median(0).values
    hook.remove()
    assert_close(on_own, out.activations)
    assert (out.activations > random_max).all(), (out.activations, random_max)
    assert (out.activations > data_median).all(), (out.activations, data_median)


def test_linear_unit_and_image_shape_inference():
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = LeNet5()
    assert infer_image_shape(model) == (1, 28, 28)
    assert infer_image_shape(DeepCNN(2, 4, 1, 3)) == (2, 28, 28)
    out = maximize_activation(model, model.classifier.fc3, 7, steps=15)
    with torch.no_grad():
        logits = model(torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(3)))
    assert float(out.activations[0]) > float(logits[:, 7].max())


def test_top_examples_match_brute_force():
    with torch.random.fork_rng():
        torch.manual_seed(4)
        model = LeNet5()
    x, y = digits(size=28)
    x, y = x[:150], y[:150]
    loader = data_loader(x, y, batch_size=37, shuffle=False)
    snapshot = ModelSnapshot.take(model)
    top = top_examples(model, "features.conv1", 3, loader, k=5)
    snapshot.assert_unchanged(model)
    with torch.no_grad():
        brute = torch.stack([model.features.conv1(x[i : i + 1])[0, 3].mean() for i in range(150)])
    want = torch.sort(brute, descending=True, stable=True)
    assert top.indices.tolist() == want.indices[:5].tolist()
    assert_close(top.activations, want.values[:5])
    assert torch.equal(top.images, x[top.indices])
    # A tensor of inputs gives the same answer.
    assert top_examples(model, "features.conv1", 3, x, k=5, batch_size=64).indices.tolist() == (
        top.indices.tolist()
    )


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda m: maximize_activation(m, "nope", 0, steps=1), ValueError, "no layer 'nope'"),
        (lambda m: maximize_activation(m, "features.conv1", 6, steps=1), ValueError, r"\[0, 5\]"),
        (lambda m: maximize_activation(m, "features.conv1", 0.5, steps=1), TypeError, "channels"),
        (lambda m: maximize_activation(m, "features.conv1", 0, steps=-1), ValueError, "steps"),
        (
            lambda m: top_examples(m, "features.conv1", 9, torch.zeros(2, 1, 28, 28)),
            ValueError,
            "out of range",
        ),
        (lambda m: top_examples(m, "features.conv1", 0, 5), TypeError, "loader"),
    ],
)
def test_bad_input_errors(call, exc, match):
    model = LeNet5()
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(exc, match=match):
        call(model)
    snapshot.assert_unchanged(model)
