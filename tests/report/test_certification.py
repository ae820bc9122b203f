"""Tests of the diagnose report's certification section (torch_dlt/report/certification.py)."""

from __future__ import annotations

import torch
from torch import nn

from torch_dlt.data import digits
from torch_dlt.nn import LeNet5
from torch_dlt.report.certification import _QUICK_EPS, certification_section
from torch_dlt.report.diagnose import DiagnoseContext
from torch_dlt.testing import ModelSnapshot


def _lenet(activation: str) -> nn.Module:
    """LeNet-5's layers as one Sequential."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = LeNet5(activation=activation, pooling="avg")
    return nn.Sequential(net.features, nn.Flatten(), net.classifier)


def _context(model: nn.Module, labelled: bool = True, size: int = 28) -> DiagnoseContext:
    x, y = digits(size=size)
    x, y = x[:256], y[:256]
    return DiagnoseContext(
        model, x, y if labelled else None, nn.functional.cross_entropy, quick=True
    )


def test_certified_accuracy_starts_at_clean_accuracy_and_stays_below_pgd():
    model = _lenet("relu")
    model.train()
    ctx = _context(model)
    snapshot = ModelSnapshot.take(model)
    section = certification_section(ctx)
    snapshot.assert_unchanged(model)
    assert section.error is None
    (table,) = section.tables
    assert [row[0] for row in table.rows] == list(_QUICK_EPS)
    assert table.flagged_rows == []
    with torch.no_grad():
        clean = float((model.eval()(ctx.inputs[:64]).argmax(1) == ctx.targets[:64]).float().mean())
    model.train()
    first = table.rows[0]
    assert first[1:] == [clean] * (len(first) - 1)
    for column in range(1, len(first)):
        values = [row[column] for row in table.rows]
        assert all(b <= a for a, b in zip(values, values[1:])), (column, values)
    for row in table.rows:
        assert all(certified <= row[1] for certified in row[2:])
    # Untrained, the network is certified only near eps = 0; PGD needs a larger radius.
    assert table.rows[-1][2:] == [0.0, 0.0]
    assert len(section.figures) == 1 and section.figures[0].png.startswith(b"\x89PNG")


def test_without_labels_the_predictions_are_certified():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    section = certification_section(_context(model, labelled=False, size=8))
    (table,) = section.tables
    assert table.rows[0][1:] == [1.0, 1.0, 1.0]
    assert "own predictions" in section.summary[0]


def test_unsupported_models_get_a_summary_naming_the_layer():
    section = certification_section(_context(_lenet("tanh")))
    assert section.error is None and not section.tables
    assert section.summary[0].startswith("not applicable")
    assert "Tanh" in section.summary[0]


class _DataDependentBranch(nn.Module):
    """Chooses its layer from the input's values: no fixed composition for torch.fx to trace."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        self.b = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else self.b(x)


def test_models_the_bounds_cannot_trace_are_not_applicable():
    section = certification_section(_context(_DataDependentBranch()))
    assert section.summary[0].startswith("not applicable")
    assert "_DataDependentBranch" in section.summary[0]


def test_lenet5_itself_is_traced():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LeNet5(activation="relu")
    section = certification_section(_context(model))
    assert section.error is None and len(section.figures) == 1


def test_models_without_class_logits_are_not_applicable():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 1))
    section = certification_section(_context(model))
    assert "not class logits" in section.summary[0]
