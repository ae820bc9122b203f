"""Tests of the diagnose report's curvature section (torch_dlt/report/curvature.py)."""

import torch
from torch import nn
from torch.func import functional_call

from torch_dlt.report.curvature import curvature_section
from torch_dlt.report.diagnose import DiagnoseContext
from torch_dlt.testing import ModelSnapshot, randn, tiny_bn_dropout_net


def _dense_hessian(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    buffers = dict(model.named_buffers())

    def loss(theta):
        tensors = dict(
            zip(
                names, (t.view(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes))
            )
        )
        return nn.functional.cross_entropy(functional_call(model, {**tensors, **buffers}, (x,)), y)

    return torch.func.hessian(loss)(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


def test_section_reports_the_dense_hessians_top_eigenvalues_and_trace():
    model = tiny_bn_dropout_net(in_features=5, seed=1).train()
    x, y = (
        randn(40, 5, seed=2),
        torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(3)),
    )
    snapshot = ModelSnapshot.take(model)
    section = curvature_section(
        DiagnoseContext(model, x, y, nn.functional.cross_entropy, quick=False)
    )
    snapshot.assert_unchanged(model)
    assert section.error is None and len(section.figures) == 1
    with torch.no_grad():
        model.eval()
        dense = _dense_hessian(model, x, y)
        model.train()
    exact = torch.linalg.eigvalsh(dense).flip(0)
    reported = torch.tensor([row[1] for row in section.tables[0].rows], dtype=torch.float64)
    torch.testing.assert_close(reported, exact[: len(reported)], rtol=1e-3, atol=1e-9)
    trace_line = section.summary[1]
    estimate, error = (float(s) for s in trace_line.split("trace ")[1].split(" (")[0].split(" +- "))
    assert abs(estimate - float(dense.trace())) <= 4 * error + 1e-9


def test_a_loss_that_does_not_reduce_gets_a_summary_not_an_error():
    model = tiny_bn_dropout_net(in_features=5)
    x, y = randn(8, 5), randn(8, 3)
    section = curvature_section(
        DiagnoseContext(model, x, y, nn.MSELoss(reduction="none"), quick=True)
    )
    assert section.error is None and "not applicable" in section.summary[0]
