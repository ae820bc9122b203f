"""Tests of the diagnose report: sections, the CLI, and that the model is left untouched."""

import math
import re

import pytest
import torch
from torch import nn

from torch_dlt.__main__ import main
from torch_dlt.nn import DeepMLP, LeNet5
from torch_dlt.probes import jacobian_spectrum
from torch_dlt.report import diagnose, load_factory, section_names
from torch_dlt.report.sections import (
    _free_product_prediction,
    _linear_stages,
    layer_variances,
)
from torch_dlt.testing import ModelSnapshot, tiny_bn_dropout_net
from torch_dlt.theory import chi1, critical_sigma_w2


def _images(html: str) -> int:
    return len(re.findall(r'src="data:image/png;base64,', html))


def test_default_report_is_complete_and_self_contained(tmp_path):
    report = diagnose(out=tmp_path / "r.html", quick=True, progress=False)
    assert [s.error for s in report.sections] == [None] * len(section_names())
    html = (tmp_path / "r.html").read_text()
    # every section draws its figure, except one that says it does not apply (the certified
    # bounds are for ReLU nets; the default LeNet-5 is tanh)
    drawn = [s for s in report.sections if not s.summary[0].startswith("not applicable")]
    assert [s.title for s in report.sections if s not in drawn] == [
        "Certified robustness (IBP, CROWN-IBP)"
    ]
    assert _images(html) == len(drawn) >= 8
    assert "http://" not in html and "https://" not in html  # loads nothing from outside
    assert "Mean-field phase" in html and "Jacobian" in html and "Signal propagation" in html
    text = report.summary()
    assert "ordered phase" in text  # PyTorch's default init of a tanh LeNet-5 is ordered


def test_report_leaves_model_grads_and_rng_untouched(tmp_path):
    model = tiny_bn_dropout_net(in_features=64, seed=3).float()
    model.train()
    grads_before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    x, y = torch.randn(32, 64), torch.randint(0, 3, (32,))
    snapshot = ModelSnapshot.take(model)
    report = diagnose(model, (x, y), activation="tanh", out=tmp_path / "r.html", quick=True,
                      progress=False)  # fmt: skip
    assert all(s.error is None for s in report.sections), report.summary()
    snapshot.assert_unchanged(model)
    assert [p.grad for p in model.parameters()] == grads_before


def test_layer_variances_read_sigma_from_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(400, 300), nn.Tanh(), nn.Linear(300, 10, bias=False))
    with torch.no_grad():
        net[0].weight.normal_(0, math.sqrt(1.7 / 400))
        net[0].bias.normal_(0, math.sqrt(0.05))
    first, last = layer_variances(net)
    assert first.fan_in == 400 and last.sigma_b2 == 0.0
    # 120k draws: sigma_w2 within ~4 standard errors (relative s.e. sqrt(2/n))
    assert abs(first.sigma_w2 - 1.7) < 4 * 1.7 * math.sqrt(2 / 120_000)
    assert abs(first.sigma_b2 - 0.05) < 4 * 0.05 * math.sqrt(2 / 300)


@pytest.mark.parametrize("weights", ["gaussian", "orthogonal"])
def test_jacobian_prediction_matches_a_wide_random_net(weights):
    # A wide tanh MLP at criticality: the free-product prediction of the Jacobian spectrum's
    # mean and variance against the exact spectrum (an independent dense SVD).
    torch.manual_seed(1)
    width, depth, sigma_b2 = 300, 6, 0.05
    sigma_w2 = critical_sigma_w2("tanh", sigma_b2)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(width, width).double()
        with torch.no_grad():
            if weights == "gaussian":
                lin.weight.normal_(0, math.sqrt(sigma_w2 / width))
            else:
                nn.init.orthogonal_(lin.weight, gain=math.sqrt(sigma_w2))
            lin.bias.normal_(0, math.sqrt(sigma_b2))
        layers += [lin, nn.Tanh()]
    net = nn.Sequential(*layers, nn.Linear(width, width).double())
    with torch.no_grad():
        nn.init.orthogonal_(net[-1].weight)
        net[-1].bias.zero_()
    x = torch.randn(4, width, dtype=torch.float64) * math.sqrt(0.5)
    stages = _linear_stages(net, x, "tanh")
    mean, var = _free_product_prediction(stages, weights == "gaussian")
    spectrum = jacobian_spectrum(net, x, method="exact")
    assert abs(float(spectrum.mean.mean()) / mean - 1) < 0.1
    assert abs(float(spectrum.variance.mean()) / var - 1) < 0.35
    assert chi1("tanh", sigma_w2, sigma_b2) == pytest.approx(1.0, abs=1e-6)


def test_average_pooling_enters_the_prediction_exactly():
    # A linear net with one 2x2 average pool: J = W2 P W1, and tr(J J^T)/m is known exactly in
    # expectation; with orthogonal W and no nonlinearity it is exactly 1/4.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(16, 16, bias=False))  # fmt: skip
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        nn.init.orthogonal_(net[3].weight)
    stages = _linear_stages(net, torch.randn(2, 1, 8, 8), "linear")
    mean, var = _free_product_prediction(stages, gaussian=False)
    spectrum = jacobian_spectrum(net, torch.randn(2, 1, 8, 8), method="exact")
    assert mean == pytest.approx(0.25)
    assert var == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(spectrum.mean, torch.full((2,), 0.25, dtype=torch.float64))


def test_cli_default_and_user_factory(tmp_path, capsys):
    out = tmp_path / "cli.html"
    rc = main(["diagnose", "--model", "torch_dlt.nn.models:LeNet5", "--out", str(out),
               "--quick", "--no-progress", "--sections", "meanfield", "jacobian"])  # fmt: skip
    assert rc == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert "report written to" in printed and "Mean-field phase" in printed


def test_cli_factory_returning_model_and_data(tmp_path, monkeypatch):
    import sys
    import types

    module = types.ModuleType("user_factory_mod")

    def make():
        net = DeepMLP(20, width=32, depth=3, out_features=4, activation="relu")
        return net, (torch.randn(16, 20), torch.randint(0, 4, (16,)))

    module.make = make
    monkeypatch.setitem(sys.modules, "user_factory_mod", module)
    out = tmp_path / "user.html"
    assert main(["diagnose", "--model", "user_factory_mod:make", "--out", str(out), "--quick",
                 "--no-progress"]) == 0  # fmt: skip
    assert "relu" in out.read_text()


@pytest.mark.parametrize(
    "spec,message",
    [
        ("no_colon_here", "package.module:factory"),
        ("torch_dlt_no_such_module:f", "cannot import module"),
        ("torch_dlt.nn.models:NoSuchNet", "has no attribute"),
        ("torch_dlt.nn.models:ACTIVATIONS", "not callable"),
    ],
)
def test_cli_bad_model_spec(spec, message, capsys):
    assert main(["diagnose", "--model", spec, "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match=message):
        load_factory(spec)


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown sections"):
        diagnose(sections=["nope"], out=tmp_path / "x.html", progress=False)
    with pytest.raises(TypeError, match="must be an nn.Module"):
        diagnose(model="LeNet5", out=tmp_path / "x.html", progress=False)
    with pytest.raises(ValueError, match="accepts none of the digits input shapes"):
        diagnose(nn.Linear(3, 2), out=tmp_path / "x.html", progress=False)


def test_unknown_activation_fails_only_its_sections(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Softplus(), nn.Linear(32, 10))
    report = diagnose(net, out=tmp_path / "s.html", quick=True, progress=False)
    by_title = {s.title: s for s in report.sections}
    assert by_title["meanfield"].error is not None and "Softplus" in by_title["meanfield"].error
    assert all(s.error is None for t, s in by_title.items() if t != "meanfield")
    assert isinstance(LeNet5(), nn.Module)
