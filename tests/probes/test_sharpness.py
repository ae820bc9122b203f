"""Tests for torch_dlt.probes.sharpness: dense autograd Hessians and a closed-form box maximum."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.func import functional_call

from torch_dlt.data import data_loader
from torch_dlt.probes.sharpness import epsilon_sharpness, top_hessian_eigenvalue
from torch_dlt.testing import ModelSnapshot, randn, seeded, tiny_bn_dropout_net, tiny_mlp

mse = nn.functional.mse_loss


class _Quadratic(nn.Module):
    """f(x) = 0.5 x^T A x + c, whatever the input: the loss is the model's output."""

    def __init__(self, a: torch.Tensor, x0: torch.Tensor, c: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.x = nn.Parameter(x0.clone())
        self.c = c

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.x @ self.a @ self.x + self.c + 0.0 * inputs.sum()


def _own_output(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return output


def _dense_hessian(model: nn.Module, batch) -> torch.Tensor:
    """Oracle: the dense Hessian of the flattened parameters by torch.autograd.functional."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(v: torch.Tensor) -> torch.Tensor:
        tensors, start = {}, 0
        for n, s in zip(names, shapes):
            tensors[n] = v[start : start + s.numel()].view(s)
            start += s.numel()
        return mse(functional_call(model, tensors, (batch[0],)), batch[1])

    return torch.autograd.functional.hessian(loss, flat)


def test_top_hessian_eigenvalue_matches_dense_hessian() -> None:
    model = tiny_mlp(in_features=3, width=4, depth=1, out_features=2).eval()
    batch = (randn(20, 3, seed=1), randn(20, 2, seed=2))
    hessian = _dense_hessian(model, batch)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    snapshot = ModelSnapshot.take(model)
    top = top_hessian_eigenvalue(model, mse, batch, iters=2000, tol=1e-12, generator=seeded(0))
    snapshot.assert_unchanged(model)
    assert top.eigenvalue == pytest.approx(float(eigenvalues[-1]), rel=1e-6)
    flat_v = torch.cat([v.reshape(-1) for v in top.eigenvector])
    assert float(flat_v.norm()) == pytest.approx(1.0, rel=1e-9)
    torch.testing.assert_close(hessian @ flat_v, top.eigenvalue * flat_v, rtol=0, atol=1e-5)
    loader = data_loader(*batch, batch_size=7, shuffle=False)
    looped = top_hessian_eigenvalue(model, mse, loader, iters=2000, tol=1e-12, generator=seeded(0))
    assert looped.eigenvalue == pytest.approx(float(eigenvalues[-1]), rel=1e-6)


def test_top_eigenvalue_of_an_indefinite_hessian_is_the_largest_algebraic() -> None:
    a = torch.diag(torch.tensor([-5.0, 1.0, 2.0], dtype=torch.float64))
    model = _Quadratic(a, randn(3, seed=0))
    batch = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    top = top_hessian_eigenvalue(
        model, _own_output, batch, iters=500, tol=1e-12, generator=seeded(1)
    )
    assert top.eigenvalue == pytest.approx(2.0, rel=1e-6)


def test_epsilon_sharpness_of_a_quadratic_matches_the_box_maximum() -> None:
    a = torch.tensor(
        [[3.0, 1.0, -0.5, 0.0], [1.0, 2.0, 0.3, 0.2], [-0.5, 0.3, 1.5, 0.4], [0.0, 0.2, 0.4, 1.0]],
        dtype=torch.float64,
    )
    eps = 1e-2
    model = _Quadratic(a, torch.zeros(4, dtype=torch.float64))
    batch = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    # A is positive definite, so the convex 0.5 y^T A y peaks at a vertex of the box |y_i| <= eps
    vertices = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)), dtype=torch.float64)
    box_max = float((0.5 * eps**2 * torch.einsum("vi,ij,vj->v", vertices, a, vertices)).max())
    snapshot = ModelSnapshot.take(model)
    result = epsilon_sharpness(
        model, _own_output, batch, epsilon=eps, steps=30, restarts=4, generator=seeded(0)
    )
    snapshot.assert_unchanged(model)
    assert result.loss == 0.0
    assert result.max_loss == pytest.approx(box_max, rel=1e-9)
    assert result.sharpness == pytest.approx(box_max / 1.0 * 100, rel=1e-9)


def test_epsilon_sharpness_box_scales_with_weights_and_loss_offset() -> None:
    # at x0 != 0 the box is |y_i| <= eps (|x0_i| + 1) and the denominator is 1 + f(x0)
    a = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    x0 = torch.tensor([3.0, -1.0], dtype=torch.float64)
    eps, c = 1e-2, 0.5
    model = _Quadratic(a, x0, c=c)
    batch = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    bound = eps * (x0.abs() + 1)
    corner = x0 + torch.sign(x0) * bound  # moving away from the minimum on each axis
    f0 = float(0.5 * x0 @ a @ x0 + c)
    f_max = float(0.5 * corner @ a @ corner + c)
    result = epsilon_sharpness(
        model, _own_output, batch, epsilon=eps, steps=30, generator=seeded(2)
    )
    assert result.loss == pytest.approx(f0, rel=1e-12)
    assert result.max_loss == pytest.approx(f_max, rel=1e-9)
    assert result.sharpness == pytest.approx((f_max - f0) / (1 + f0) * 100, rel=1e-7)


def test_probes_restore_a_train_mode_bn_dropout_net() -> None:
    net = tiny_bn_dropout_net()
    batch = (randn(10, 6, seed=4), randn(10, 3, seed=5))
    snapshot = ModelSnapshot.take(net)
    epsilon_sharpness(net, mse, batch, steps=2, generator=seeded(0))
    epsilon_sharpness(net, mse, batch, steps=2, train=True, generator=seeded(0))
    top_hessian_eigenvalue(net, mse, batch, iters=5, generator=seeded(0))
    top_hessian_eigenvalue(net, mse, batch, iters=5, train=True, generator=seeded(0))
    snapshot.assert_unchanged(net)


def test_bad_input_is_rejected() -> None:
    model = tiny_mlp()
    batch = (randn(4, 6), randn(4, 3))
    with pytest.raises(ValueError, match="epsilon"):
        epsilon_sharpness(model, mse, batch, epsilon=0.0)
    with pytest.raises(ValueError, match="steps"):
        epsilon_sharpness(model, mse, batch, steps=0)
    with pytest.raises(ValueError, match="no batches"):
        epsilon_sharpness(model, mse, [])
    with pytest.raises(ValueError, match="iters"):
        top_hessian_eigenvalue(model, mse, batch, iters=0)
    with pytest.raises(TypeError, match="data"):
        top_hessian_eigenvalue(model, mse, randn(4, 6))
