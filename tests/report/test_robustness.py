"""Tests of the diagnose report's robustness section (torch_dlt/report/robustness.py)."""

import math

import torch
from torch import nn

from torch_dlt.report import diagnose, section_names
from torch_dlt.report.diagnose import DiagnoseContext
from torch_dlt.report.robustness import certified_radius, robustness_section
from torch_dlt.robust.attacks import deepfool
from torch_dlt.testing import ModelSnapshot


def _mlp(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Dropout(0.2), nn.Linear(12, 3))


def _ctx(model, x, y, quick=True):
    return DiagnoseContext(model, x, y, nn.functional.cross_entropy, seed=0, quick=quick)


def test_certified_radius_is_a_lower_bound_on_the_distance_to_the_boundary():
    # For an affine classifier the exact distance to the j-boundary is m_j / |w_y - w_j|_2;
    # the radius from L = |W|_2 must never exceed it, and meets it for W = [w; -w].
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        w = torch.randn(4, 7, generator=g, dtype=torch.float64)
        b = torch.randn(4, generator=g, dtype=torch.float64)
        x = torch.randn(10, 7, generator=g, dtype=torch.float64)
        logits = x @ w.T + b
        y = logits.argmax(1)
        radius = certified_radius(logits, y, float(torch.linalg.matrix_norm(w, 2)))
        for i in range(10):
            exact = min(
                float((logits[i, y[i]] - logits[i, j]) / (w[y[i]] - w[j]).norm())
                for j in range(4)
                if j != y[i]
            )
            assert 0 < radius[i] <= exact + 1e-12
    w = torch.randn(1, 5, generator=g, dtype=torch.float64)
    pair = torch.cat([w, -w])
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    logits = x @ pair.T
    y = logits.argmax(1)
    exact = (logits.amax(1) - logits.amin(1)) / (2 * w.norm())
    radius = certified_radius(logits, y, float(torch.linalg.matrix_norm(pair, 2)))
    torch.testing.assert_close(radius, exact)


def test_section_reports_deepfool_pgd_and_the_lipschitz_interval():
    model = _mlp()
    model.train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(40, 16, generator=g), torch.randint(0, 3, (40,), generator=g)
    snapshot = ModelSnapshot.take(model)
    section = robustness_section(_ctx(model, x, y))
    snapshot.assert_unchanged(model)
    assert all(p.grad is None for p in model.parameters())
    assert section.error is None and len(section.figures) == 1
    text = "\n".join(section.summary)
    # rho_adv as Moosavi-Dezfooli et al. define it, recomputed from DeepFool itself
    result = deepfool(model, x[:32])
    expected = float((result.norms / x[:32].norm(dim=1))[result.success].mean())
    assert f"rho_adv = {expected:.4g}" in text
    eps_table, factor_table = section.tables
    accuracies = [row[1] for row in eps_table.rows]
    clean = float((model.eval()(x[:32]).argmax(1) == y[:32]).float().mean())
    model.train()
    assert accuracies[0] == clean and all(0 <= a <= clean for a in accuracies)
    lower, upper = (float(v) for v in text.split("in [")[1].split("]")[0].split(", "))
    assert 0 < lower <= upper
    w1, w2 = model[0].weight.detach().double(), model[3].weight.detach().double()
    product = float(torch.linalg.matrix_norm(w1, 2) * torch.linalg.matrix_norm(w2, 2))
    assert math.isclose(upper, product, rel_tol=1e-3)  # summary rounds to 4 digits
    assert [row[1] for row in factor_table.rows] == ["linear", "activation", "linear"]


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(x + torch.tanh(self.a(x)))


def test_section_without_labels_outside_the_box_and_without_an_upper_bound():
    torch.manual_seed(0)
    model = _Residual()
    x = 3 * torch.randn(20, 16)
    section = robustness_section(_ctx(model, x, None))
    text = "\n".join(section.summary + section.notes)
    assert "own predictions" in text
    assert "no Lipschitz upper bound" in text and "not a chain" in text
    assert "outside [0, 1]" in text
    assert len(section.tables) == 1  # the eps table, no factor table


def test_section_says_why_it_does_not_apply():
    model = nn.Sequential(nn.Linear(16, 1))
    section = robustness_section(_ctx(model, torch.rand(8, 16), None))
    assert section.error is None and "not applicable" in section.summary[0]
    assert "(8, 1)" in section.summary[0]


def test_section_is_registered_and_runs_in_the_report(tmp_path):
    assert "robustness" in section_names()
    model = _mlp(1)
    x, y = torch.rand(16, 16), torch.arange(16) % 3
    report = diagnose(model, (x, y), sections=["robustness"], out=tmp_path / "r.html",
                      quick=True, progress=False)  # fmt: skip
    assert report.sections[0].error is None
    assert "Robustness to adversarial perturbations" in (tmp_path / "r.html").read_text()
