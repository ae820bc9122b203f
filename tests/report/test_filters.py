"""Tests of the diagnose report's filters section (torch_dlt/report/filters.py)."""

import math

import torch
from torch import nn

from torch_dlt.data import digits
from torch_dlt.nn import DeepMLP, LeNet5
from torch_dlt.report.diagnose import DiagnoseContext
from torch_dlt.report.filters import filters_section
from torch_dlt.testing import ModelSnapshot
from torch_dlt.vis import gabor_atom


def _context(model, size=28):
    x, y = digits(size=size)
    return DiagnoseContext(model, x[:256], y[:256], nn.functional.cross_entropy, quick=True)


def test_gabor_first_layer_stands_out_and_random_init_does_not():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LeNet5()
    snapshot = ModelSnapshot.take(model)
    random_init = filters_section(_context(model))
    snapshot.assert_unchanged(model)
    assert random_init.error is None and len(random_init.figures) == 1
    rows = random_init.tables[0].rows
    assert len(rows) == 6
    # Random init: most filters are no more wavelet-like than Gaussian noise (flagged).
    assert len(random_init.tables[0].flagged_rows) >= 4

    with torch.no_grad():
        for k in range(6):
            model.features.conv1.weight[k, 0] = gabor_atom(5, 1.2, 0.25, k * math.pi / 6)
    gabor = filters_section(_context(model))
    assert list(gabor.tables[0].flagged_rows) == []
    assert all(row[1] > 0.99 for row in gabor.tables[0].rows)
    # The spectral peak sits at each atom's orientation, to within the 32-point DFT's grid.
    for k, row in enumerate(gabor.tables[0].rows):
        diff = abs(row[5] - math.degrees(k * math.pi / 6)) % 180
        assert min(diff, 180 - diff) < 10
    assert "6 of 6 filters above" in gabor.summary[1]


def test_model_without_conv_gets_a_summary_not_an_error():
    section = filters_section(_context(DeepMLP(64, 8, 1, 10), size=8))
    assert section.error is None and section.figures == []
    assert "no nn.Conv2d" in section.summary[0]
