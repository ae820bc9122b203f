"""Tests of torch_dlt/probes/signal.py: SignalMonitor and correlation_propagation."""

from __future__ import annotations

import contextlib
import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from torch_dlt.nn import DeepMLP
from torch_dlt.probes import SignalMonitor, correlation_propagation, register_layer_type
from torch_dlt.probes import signal as signal_module
from torch_dlt.testing import (
    ModelSnapshot,
    input_pair,
    randn,
    seeded,
    tiny_bn_dropout_net,
    tiny_cnn,
    tiny_mlp,
)


def brute_force_statistics(h: torch.Tensor, feature_dim: int) -> list[float]:
    """[mean, var, excess kurtosis, q] by a loop over features (dim ``feature_dim``)."""
    means, variances, kurtoses = [], [], []
    for f in range(h.shape[feature_dim]):
        unit = h.select(feature_dim, f).reshape(-1)
        centred = unit - unit.sum() / unit.numel()
        m2 = (centred**2).sum() / unit.numel()
        m4 = (centred**4).sum() / unit.numel()
        means.append(float(unit.sum() / unit.numel()))
        variances.append(float(m2))
        kurtoses.append(float(m4 / m2**2 - 3))
    return [
        float(np.mean(means)),
        float(np.mean(variances)),
        float(np.mean(kurtoses)),
        float((h**2).sum() / h.numel()),
    ]


def manual_preactivations(model: nn.Module, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Forward the ``layers`` Sequential child by child: Linear/Conv2d outputs and the output."""
    h = x.flatten(1) if isinstance(model, DeepMLP) else x
    preactivations = {}
    for name, child in model.layers.named_children():
        h = child(h)
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            preactivations[f"layers.{name}"] = h
    return preactivations, h


def manual_pass(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    """Pre-activations, dL/dh and dL/dW per layer for the squared-error loss, by autograd."""
    preactivations, out = manual_preactivations(model, x)
    loss = ((out - target) ** 2).mean()
    grads = torch.autograd.grad(loss, list(preactivations.values()), retain_graph=True)
    weights = [model.get_submodule(name).weight for name in preactivations]
    weight_grads = torch.autograd.grad(loss, weights)
    return preactivations, dict(zip(preactivations, grads)), dict(zip(preactivations, weight_grads))


@pytest.mark.parametrize(
    "make_model, input_shape",
    [(lambda: tiny_mlp(6, 8, 3, 3), (5, 6)), (lambda: tiny_cnn(2, 4, 2, 3), (5, 2, 6, 6))],
    ids=["mlp", "cnn"],
)
def test_monitor_records_match_brute_force(make_model, input_shape):
    model = make_model()
    steps = [(randn(*input_shape, seed=s), randn(input_shape[0], 3, seed=10 + s)) for s in range(3)]
    with SignalMonitor(model) as monitor:
        for x, target in steps:
            ((model(x) - target) ** 2).mean().backward()
    history = monitor.history()
    assert set(history) == set(monitor.layer_names)
    for step, (x, target) in enumerate(steps):
        preactivations, grads, weight_grads = manual_pass(model, x, target)
        assert set(preactivations) == set(history)
        for name, h in preactivations.items():
            record = history[name]
            feature_dim = 1  # channels of a conv output and features of a Linear one
            expected = brute_force_statistics(h.detach(), feature_dim)
            measured = [float(getattr(record, k)[step]) for k in ("mean", "var", "kurtosis", "q")]
            assert measured == pytest.approx(expected, rel=1e-9, abs=1e-12)
            assert float(record.grad_norm[step]) == pytest.approx(
                math.sqrt(float((grads[name] ** 2).sum())), rel=1e-9
            )
            assert float(record.weight_grad_norm[step]) == pytest.approx(
                math.sqrt(float((weight_grads[name] ** 2).sum())), rel=1e-9
            )
    assert all(len(record.q) == 3 and len(record.grad_norm) == 3 for record in history.values())


def _hook_count(model: nn.Module) -> int:
    count = 0
    for module in model.modules():
        count += len(module._forward_hooks) + len(module._forward_pre_hooks)
        count += len(module._backward_hooks) + len(module._backward_pre_hooks)
    for parameter in model.parameters():
        count += len(parameter._backward_hooks or {})
    return count


def test_hooks_removed_on_exit_and_on_exception():
    model = tiny_mlp()
    with SignalMonitor(model) as monitor:
        assert monitor.active and _hook_count(model) > 0
        out = model(randn(4, 6))
    assert not monitor.active and _hook_count(model) == 0
    out.sum().backward()  # this graph's output hooks were removed on exit: nothing is recorded
    assert all(len(record.grad_norm) == 0 for record in monitor.history().values())

    with pytest.raises(ZeroDivisionError):
        with SignalMonitor(model):
            assert _hook_count(model) > 0
            model(randn(4, 6))
            1 / 0  # noqa: B018
    assert _hook_count(model) == 0


def _relu_inplace_bn_dropout_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(6, 8),
            nn.ReLU(inplace=True),
            nn.Linear(8, 8),
            nn.BatchNorm1d(8),
            nn.Dropout(0.3),
            nn.Tanh(),
            nn.Linear(8, 2),
        ).double()


def _train_steps(model: nn.Module, monitor: bool) -> tuple[list, torch.Tensor]:
    outputs = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        with SignalMonitor(model) if monitor else contextlib.nullcontext():
            for step in range(2):
                out = model(randn(5, 6, seed=step))
                out.square().mean().backward()
                outputs.append(out.detach())
        rng_after = torch.get_rng_state()
    return outputs, rng_after


def test_monitor_leaves_outputs_gradients_and_state_identical():
    plain, watched = _relu_inplace_bn_dropout_net(), _relu_inplace_bn_dropout_net()
    plain_outputs, plain_rng = _train_steps(plain, monitor=False)
    watched_outputs, watched_rng = _train_steps(watched, monitor=True)
    for a, b in zip(plain_outputs, watched_outputs):
        assert torch.equal(a, b)
    for (name, p), q in zip(plain.named_parameters(), watched.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for a, b in zip(plain.buffers(), watched.buffers()):
        assert torch.equal(a, b)
    assert torch.equal(plain_rng, watched_rng)


def test_monitor_does_not_touch_the_model():
    model = tiny_bn_dropout_net()
    model[3].eval()  # mixed training flags must survive too
    snapshot = ModelSnapshot.take(model)
    with SignalMonitor(model, layers=[nn.Linear, "1"]) as monitor:
        pass
    monitor.report()
    snapshot.assert_unchanged(model)


def _gaussian_init_(model: nn.Module, sigma_w2: float, sigma_b2: float, seed: int) -> None:
    """W ~ N(0, sigma_w2 / fan_in), b ~ N(0, sigma_b2): the random nets of Poole et al. 2016."""
    generator = seeded(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(
                    0, (sigma_w2 / module.in_features) ** 0.5, generator=generator
                )
                if module.bias is not None:
                    module.bias.normal_(0, sigma_b2**0.5, generator=generator)


def test_relu_signal_and_gradient_growth_follow_mean_field_and_are_flagged():
    # Random ReLU net without bias: q^{l+1} = sigma_w2 / 2 * q^l and, backwards,
    # |dL/dh^l|^2 = chi_1 |dL/dh^{l+1}|^2 with chi_1 = sigma_w2 / 2 (Schoenholz et al. 2017).
    sigma_w2, width, depth = 4.0, 1000, 9
    model = DeepMLP(width, width, depth, 10, activation="relu", bias=False).double()
    _gaussian_init_(model, sigma_w2, 0.0, seed=0)
    with SignalMonitor(model) as monitor:
        model(randn(64, width, seed=1)).square().sum().backward()
    report = monitor.report()
    q = np.array([layer.q for layer in report.layers])
    grad_sq = np.array([layer.grad_norm for layer in report.layers]) ** 2
    # At width N each hidden-to-hidden ratio fluctuates by about sqrt(2 / N) = 4.5% (a chi-square
    # over the rows of W); the 10-unit readout fluctuates far more and is left out.
    hidden = slice(0, depth)
    np.testing.assert_allclose(q[hidden][1:] / q[hidden][:-1], sigma_w2 / 2, rtol=0.2)
    np.testing.assert_allclose(grad_sq[hidden][:-1] / grad_sq[hidden][1:], sigma_w2 / 2, rtol=0.2)

    # Theory for Linear layer l = 1..10: amplitude ratio sqrt(2)^(l-1) to fc1, gradient ratio
    # sqrt(2)^(10-l) to the readout; the default thresholds are 10.
    flags = {layer.name: layer.flags for layer in report.layers}
    assert flags["layers.fc1"] == ("exploding gradient",)  # 1 and 22.6
    assert flags["layers.fc5"] == ()  # 4 and 5.7
    assert flags["layers.readout"] == ("signal explosion",)  # 22.6 and 1
    assert report.flagged[0] == "layers.fc1" and report.flagged[-1] == "layers.readout"


def test_vanishing_tanh_net_is_flagged_and_report_serialises():
    # sigma_w2 = 0.5 < 1 without bias: tanh net in the ordered phase, q -> 0 and chi_1 < 1.
    model = DeepMLP(200, 200, 12, 4, activation="tanh", bias=False).double()
    _gaussian_init_(model, 0.5, 0.0, seed=0)
    with SignalMonitor(model) as monitor:
        for step in range(2):
            model(randn(16, 200, seed=step)).square().sum().backward()
    report = monitor.report()
    flags = {layer.name: layer.flags for layer in report.layers}
    assert "vanishing gradient" in flags["layers.fc1"]
    assert "signal collapse" in flags["layers.fc12"]
    assert all(layer.forward_calls == 2 and layer.backward_calls == 2 for layer in report.layers)
    history = monitor.history()
    for layer in report.layers:
        assert layer.q == pytest.approx(float(history[layer.name].q.mean()))

    as_dict = report.to_dict()
    json.dumps(as_dict, allow_nan=False)
    assert [row["name"] for row in as_dict["layers"]] == [layer.name for layer in report.layers]
    assert as_dict["layers"][0]["flags"] == list(report.layers[0].flags)
    text = str(report)
    for layer in report.layers:
        assert layer.name in text
    assert "vanishing gradient" in text and "signal collapse" in text

    # Thresholds are arguments: a huge factor flags nothing.
    assert monitor.report(signal_ratio=1e30, grad_ratio=1e30).flagged == []


def test_report_without_backward_has_nan_gradients_and_none_in_dict():
    model = tiny_mlp()
    with SignalMonitor(model) as monitor, torch.no_grad():
        model(randn(4, 6))
    report = monitor.report()
    assert all(math.isnan(layer.grad_norm) and layer.backward_calls == 0 for layer in report.layers)
    assert report.to_dict()["layers"][0]["grad_norm"] is None
    monitor.reset()
    assert all(len(record.q) == 0 for record in monitor.history().values())


def test_non_finite_signal_is_flagged_and_serialised_as_none():
    model = tiny_mlp()
    with torch.no_grad():
        model.layers.fc2.weight[0, 0] = math.inf
    with SignalMonitor(model) as monitor, torch.no_grad():
        model(randn(4, 6))
    layers = {layer.name: layer for layer in monitor.report().layers}
    assert "non-finite" in layers["layers.fc2"].flags
    assert "non-finite" not in layers["layers.fc1"].flags
    json.dumps(monitor.report().to_dict(), allow_nan=False)


def test_layer_selection_by_name_and_type():
    model = tiny_cnn()
    assert SignalMonitor(model).layer_names == [
        "layers.conv1",
        "layers.conv2",
        "layers.readout",
    ]
    assert SignalMonitor(model, layers=nn.Linear).layer_names == ["layers.readout"]
    assert SignalMonitor(model, layers=["layers.act2", nn.Conv2d]).layer_names == [
        "layers.conv1",
        "layers.conv2",
        "layers.act2",
    ]


def test_generic_fallback_lays_out_channels_as_features():
    # After a train-mode BatchNorm2d every channel has mean 0 and variance v / (v + eps) over
    # batch x space (Ioffe & Szegedy 2015): only the channel layout gives these moments.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).double()
    x = randn(4, 2, 7, 7) * 3 + 1
    with SignalMonitor(model, layers=[nn.BatchNorm2d]) as monitor, torch.no_grad():
        model(x)
    conv_out = model[0](x).detach()
    variance = conv_out.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=False)
    record = monitor.history()["1"]
    assert float(record.mean[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(record.var[0]) == pytest.approx(float((variance / (variance + 1e-5)).mean()))


def test_unbatched_conv_input_counts_spatial_positions_as_samples():
    conv = tiny_cnn().layers.conv1
    x = randn(2, 6, 6)
    with SignalMonitor(conv) as batched, torch.no_grad():
        conv(x.unsqueeze(0))
    with SignalMonitor(conv) as unbatched, torch.no_grad():
        conv(x)
    a, b = batched.history()[""], unbatched.history()[""]
    for key in ("mean", "var", "kurtosis", "q"):
        assert torch.equal(getattr(a, key), getattr(b, key))


def test_register_layer_type_extends_the_default_selection(monkeypatch):
    monkeypatch.setattr(signal_module, "_FEATURE_LAYOUTS", dict(signal_module._FEATURE_LAYOUTS))

    class Affine(nn.Module):
        def forward(self, x):
            return 2 * x + 1

    model = nn.Sequential(Affine(), nn.Tanh())
    with pytest.raises(ValueError, match="no layer of a supported type"):
        SignalMonitor(model)
    register_layer_type(Affine, lambda layer, h: h.reshape(-1, h.shape[-1]))
    x = randn(10, 3)
    with SignalMonitor(model) as monitor, torch.no_grad():
        model(x)
    assert monitor.layer_names == ["0"]
    assert float(monitor.history()["0"].q[0]) == pytest.approx(float(((2 * x + 1) ** 2).mean()))
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer_type(int, lambda layer, h: h)


def test_bad_input_gives_clear_errors_and_leaves_the_model_alone():
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"supported type \(.*Conv2d.*Linear"):
        SignalMonitor(nn.Sequential(nn.Tanh(), nn.ReLU()))
    with pytest.raises(
        ValueError, match=r"unknown layer name\(s\) \['fc9'\]; available: .*'layers.fc1'"
    ):
        SignalMonitor(model, layers=["fc9"])
    with pytest.raises(ValueError, match="no layer of type"):
        SignalMonitor(model, layers=[nn.Conv2d])
    with pytest.raises(ValueError, match="layers is empty"):
        SignalMonitor(model, layers=[])
    with pytest.raises(TypeError, match="layer names"):
        SignalMonitor(model, layers=[3])
    with pytest.raises(TypeError, match="nn.Module"):
        SignalMonitor("not a model")
    monitor = SignalMonitor(model)
    with pytest.raises(ValueError, match="signal_ratio must be > 1"):
        monitor.report(signal_ratio=1.0)
    with monitor:
        with pytest.raises(RuntimeError, match="already active"):
            monitor.__enter__()
    assert _hook_count(model) == 0


def test_monitor_rejects_layers_returning_non_tensors():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    model = nn.Sequential(Pair())
    with pytest.raises(TypeError, match=r"layer '0' \(Pair\) returned tuple"):
        with SignalMonitor(model, layers=["0"]):
            model(randn(2, 3))
    assert _hook_count(model) == 0


# correlation_propagation


@pytest.mark.parametrize(
    "make_model, input_shape",
    [(lambda: tiny_mlp(6, 8, 3, 3), (4, 6)), (lambda: tiny_cnn(2, 4, 2, 3), (4, 2, 5, 5))],
    ids=["mlp", "cnn"],
)
def test_correlation_matches_manual_forward(make_model, input_shape):
    model = make_model()
    x1, x2 = randn(*input_shape, seed=1), randn(*input_shape, seed=2)
    profile = correlation_propagation(model, x1, x2)
    with torch.no_grad():
        first, _ = manual_preactivations(model, x1)
        second, _ = manual_preactivations(model, x2)
    assert profile.names == list(first)
    for layer, name in enumerate(profile.names):
        for pair in range(4):
            h1, h2 = first[name][pair].reshape(-1), second[name][pair].reshape(-1)
            q11, q22, q12 = (
                float(h1 @ h1) / h1.numel(),
                float(h2 @ h2) / h2.numel(),
                float(h1 @ h2) / h1.numel(),
            )
            assert float(profile.q11[layer, pair]) == pytest.approx(q11, rel=1e-10)
            assert float(profile.q22[layer, pair]) == pytest.approx(q22, rel=1e-10)
            assert float(profile.q12[layer, pair]) == pytest.approx(q12, rel=1e-10, abs=1e-14)
            assert float(profile.c[layer, pair]) == pytest.approx(
                q12 / math.sqrt(q11 * q22), rel=1e-10, abs=1e-14
            )
    assert profile.c_mean.shape == (len(profile.names),)
    json.dumps(profile.to_dict(), allow_nan=False)


def _tanh_mean_field_iterates(q11, q12, sigma_w2, sigma_b2, depth):
    """(q^l, c^l) of the length and correlation maps (Poole et al. 2016, eqs. 3-5) for equal
    input lengths, by Gauss-Hermite quadrature on 80 x 80 nodes."""
    z, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    out = []
    for _ in range(depth):
        c = q12 / q11
        out.append((q11, c))
        u1 = np.sqrt(q11) * z[:, None]
        u2 = np.sqrt(q11) * (c * z[:, None] + np.sqrt(1 - c * c) * z[None, :])
        q12 = sigma_w2 * np.sum(w[:, None] * w[None, :] * np.tanh(u1) * np.tanh(u2)) + sigma_b2
        q11 = sigma_w2 * np.sum(w * np.tanh(np.sqrt(q11) * z) ** 2) + sigma_b2
    return np.array(out)


@pytest.mark.parametrize(
    "sigma_w2, sigma_b2, c0, tolerance",
    [(4.0, 0.05, 0.95, 0.03), (1.2, 0.3, 0.2, 0.06)],
    ids=["chaotic", "ordered"],
)
def test_wide_tanh_net_follows_the_mean_field_correlation_map(sigma_w2, sigma_b2, c0, tolerance):
    # Width 1000: over 10 seeds the measured c^l scatter by at most ~0.02 (chaotic) / ~0.035
    # (ordered) around the map, which moves c by 0.14 / 0.57 over these 6 layers.
    width, depth, q0 = 1000, 6, 1.0
    model = DeepMLP(width, width, depth, 1, activation="tanh").double()
    _gaussian_init_(model, sigma_w2, sigma_b2, seed=0)
    x1, x2 = input_pair(8, width, q=q0, c=c0, seed=1)
    profile = correlation_propagation(model, x1, x2, layers=[f"layers.fc{i}" for i in range(1, 7)])
    theory = _tanh_mean_field_iterates(
        sigma_w2 * q0 + sigma_b2, sigma_w2 * q0 * c0 + sigma_b2, sigma_w2, sigma_b2, depth
    )
    np.testing.assert_allclose(profile.c_mean.numpy(), theory[:, 1], atol=tolerance)
    np.testing.assert_allclose(profile.q11.mean(1).numpy(), theory[:, 0], rtol=0.15)
    np.testing.assert_allclose(profile.q22.mean(1).numpy(), theory[:, 0], rtol=0.15)


@pytest.mark.parametrize("eval_mode", [True, False])
def test_correlation_restores_model_and_rng(eval_mode):
    model = tiny_bn_dropout_net()
    model[2].eval()  # mixed flags
    reference = copy.deepcopy(model)
    x1, x2 = randn(5, 6, seed=1), randn(5, 6, seed=2)
    snapshot = ModelSnapshot.take(model)
    profile = correlation_propagation(model, x1, x2, layers=["0", "4"], eval_mode=eval_mode)
    snapshot.assert_unchanged(model)

    # Oracle: the same forward pass written out, on a copy, from the same (restored) RNG state.
    outputs = {}
    handles = [
        reference.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: outputs.__setitem__(name, out)
        )
        for name in ("0", "4")
    ]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        if eval_mode:
            reference.eval()
        reference(torch.cat([x1, x2]))
    for handle in handles:
        handle.remove()
    for layer, name in enumerate(("0", "4")):
        h1, h2 = outputs[name][:5], outputs[name][5:]
        expected = (h1 * h2).mean(1) / ((h1 * h1).mean(1) * (h2 * h2).mean(1)).sqrt()
        torch.testing.assert_close(profile.c[layer], expected, rtol=1e-12, atol=1e-12)


def test_correlation_bad_input():
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"same shape \[B, \.\.\.\], got \(4, 6\) and \(3, 6\)"):
        correlation_propagation(model, randn(4, 6), randn(3, 6))
    with pytest.raises(TypeError, match="x2 must be a Tensor"):
        correlation_propagation(model, randn(4, 6), [0.0])
    with pytest.raises(ValueError, match="unknown layer name"):
        correlation_propagation(model, randn(4, 6), randn(4, 6), layers="nope")

    shared = nn.Linear(3, 3).double()
    twice = nn.Sequential(shared, nn.Tanh(), shared)
    twice.train()
    with pytest.raises(ValueError, match="ran more than once"):
        correlation_propagation(twice, randn(2, 3), randn(2, 3))
    assert twice.training and _hook_count(twice) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_probes_on_cuda_match_cpu():
    cpu_model = tiny_cnn()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    x, target = randn(5, 2, 6, 6), randn(5, 3, seed=1)
    records = []
    for model, device in ((cpu_model, "cpu"), (gpu_model, "cuda")):
        with SignalMonitor(model) as monitor:
            ((model(x.to(device)) - target.to(device)) ** 2).mean().backward()
        records.append(monitor.history())
    for name, cpu_record in records[0].items():
        for key in ("mean", "var", "kurtosis", "q", "grad_norm", "weight_grad_norm"):
            torch.testing.assert_close(getattr(records[1][name], key), getattr(cpu_record, key))
    snapshot = ModelSnapshot.take(gpu_model)
    on_gpu = correlation_propagation(gpu_model, x.cuda(), x.flip(0).cuda(), eval_mode=False)
    snapshot.assert_unchanged(gpu_model)
    on_cpu = correlation_propagation(cpu_model, x, x.flip(0))
    torch.testing.assert_close(on_gpu.c, on_cpu.c)
