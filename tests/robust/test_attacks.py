"""Tests of torch_dlt.robust.attacks against closed forms (affine classifiers), linear programs,
brute-force loops over the spatial grid (torchvision's rotate, torch.roll) and re-evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linprog
from torch import nn

from torch_dlt.robust.attacks import (
    AttackResult,
    deepfool,
    fgsm,
    pgd,
    robustness,
    spatial,
    spatial_grid,
)
from torch_dlt.testing import ModelSnapshot, seeded, tiny_bn_dropout_net, tiny_mlp

DOUBLE = torch.float64


def affine(in_features: int, classes: int, seed: int = 0) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = nn.Linear(in_features, classes).to(DOUBLE)
    return layer


def refooled(model: nn.Module, result: AttackResult, y: torch.Tensor) -> torch.Tensor:
    """The success flags recomputed from scratch on x_adv."""
    with torch.no_grad():
        return model(result.x_adv).argmax(1) != y


# ---------------------------------------------------------------------------------------------
# DeepFool: exact on affine classifiers


def minimal_l2(w: np.ndarray, b: np.ndarray, x: np.ndarray, label: int) -> np.ndarray:
    """The smallest r (L2) with argmax(W(x + r) + b) != label: the nearest of the hyperplanes
    f_l = f_label, each reached by the minimum-norm solution of one linear equation (lstsq)."""
    f = w @ x + b
    best = None
    for other in range(len(b)):
        if other == label:
            continue
        row = (w[other] - w[label])[None, :]
        r = np.linalg.lstsq(row, np.array([f[label] - f[other]]), rcond=None)[0]
        if best is None or np.linalg.norm(r) < np.linalg.norm(best):
            best = r
    return best


def minimal_linf(w: np.ndarray, b: np.ndarray, x: np.ndarray, label: int) -> np.ndarray:
    """The same in Linf, each hyperplane by the linear program min t, |r_i| <= t, <a, r> = c."""
    f = w @ x + b
    d = len(x)
    best, best_t = None, math.inf
    for other in range(len(b)):
        if other == label:
            continue
        a = w[other] - w[label]
        cost = np.r_[np.zeros(d), 1.0]
        bound_rows = np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]])
        solution = linprog(
            cost,
            A_ub=bound_rows,
            b_ub=np.zeros(2 * d),
            A_eq=np.r_[a, 0.0][None, :],
            b_eq=[f[label] - f[other]],
            bounds=[(None, None)] * d + [(0, None)],
        )
        if solution.x[-1] < best_t:
            best, best_t = solution.x[:d], solution.x[-1]
    return best


@pytest.mark.parametrize("classes", [2, 5])
@pytest.mark.parametrize("norm", [2, float("inf")])
def test_deepfool_is_the_exact_minimal_perturbation_of_an_affine_classifier(classes, norm):
    model = affine(7, classes, seed=classes)
    x = torch.randn(6, 7, generator=seeded(1), dtype=DOUBLE)
    overshoot = 0.02
    result = deepfool(model, x, norm=norm, overshoot=overshoot, domain=None)
    with torch.no_grad():
        labels = model(x).argmax(1)
    oracle = minimal_l2 if norm == 2 else minimal_linf
    w, b = model.weight.detach().numpy(), model.bias.detach().numpy()
    expected = torch.tensor(
        np.stack([oracle(w, b, xi, int(li)) for xi, li in zip(x.numpy(), labels)])
    )
    ord_ = 2 if norm == 2 else math.inf
    torch.testing.assert_close(result.x_adv - x, (1 + overshoot) * expected, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(
        result.norms, (1 + overshoot) * torch.linalg.vector_norm(expected, ord=ord_, dim=1)
    )
    assert result.iterations.tolist() == [1] * 6
    assert result.success.all() and refooled(model, result, labels).all()


def test_deepfool_with_labels_moves_away_from_the_label_and_stops_on_misclassified_inputs():
    model = affine(5, 4, seed=3)
    x = torch.randn(8, 5, generator=seeded(2), dtype=DOUBLE)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[:3] = (pred[:3] + 1) % 4  # already misclassified: nothing to do
    result = deepfool(model, x, y, domain=None)
    assert result.iterations[:3].tolist() == [0, 0, 0]
    assert torch.equal(result.x_adv[:3], x[:3]) and result.norms[:3].eq(0).all()
    by_prediction = deepfool(model, x[3:], domain=None)
    torch.testing.assert_close(result.x_adv[3:], by_prediction.x_adv)
    assert torch.equal(result.success, refooled(model, result, y))


def test_deepfool_with_one_candidate_crosses_towards_the_runner_up_class():
    model = affine(6, 5, seed=8)
    x = torch.randn(7, 6, generator=seeded(9), dtype=DOUBLE)
    result = deepfool(model, x, candidates=1, domain=None, refine=False)
    with torch.no_grad():
        f = model(x)
    top2 = f.topk(2, dim=1).indices
    w = model.weight.detach()
    for i in range(len(x)):
        label, runner_up = top2[i].tolist()
        row = (w[runner_up] - w[label]).numpy()[None, :]
        gap = float(f[i, label] - f[i, runner_up])
        r = np.linalg.lstsq(row, np.array([gap]), rcond=None)[0]
        torch.testing.assert_close(result.x_adv[i] - x[i], 1.02 * torch.from_numpy(r))


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_keeps_inputs_in_the_box_and_its_success_flags_are_honest(norm):
    model = tiny_mlp(in_features=6, width=16, depth=2, out_features=4, seed=1)
    x = torch.rand(24, 6, generator=seeded(3), dtype=DOUBLE)
    x[:, :2] = torch.tensor([0.0, 1.0], dtype=DOUBLE)  # inputs on the faces of the box
    result = deepfool(model, x, norm=norm, max_iter=50)
    with torch.no_grad():
        labels = model(x).argmax(1)
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert torch.equal(result.success, refooled(model, result, labels))
    assert result.success.float().mean() >= 0.9
    size = torch.linalg.vector_norm(
        (result.x_adv - x).flatten(1), ord=2 if norm == "l2" else math.inf, dim=1
    )
    torch.testing.assert_close(result.norms, size)
    one_step = deepfool(model, x, norm=norm, max_iter=1)
    assert one_step.iterations.max() <= 1
    # The refinement only shrinks the paper's final perturbation along its own direction.
    plain = deepfool(model, x, norm=norm, max_iter=50, refine=False)
    assert torch.equal(plain.success, result.success)
    r, r_plain = (result.x_adv - x).flatten(1), (plain.x_adv - x).flatten(1)
    scale = (r * r_plain).sum(1) / (r_plain * r_plain).sum(1).clamp_min(1e-300)
    torch.testing.assert_close(r, scale[:, None] * r_plain)
    assert ((scale > 0) & (scale <= 1 + 1e-12))[result.iterations > 0].all()
    assert (scale < 1 - 1e-3).any()


# ---------------------------------------------------------------------------------------------
# FGSM and PGD


@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("norm", ["linf", 2])
def test_fgsm_matches_the_closed_form_gradient_of_a_linear_softmax_model(norm, targeted):
    model = affine(5, 3, seed=4)
    x = torch.rand(10, 5, generator=seeded(5), dtype=DOUBLE) * 0.6 + 0.2
    y = torch.arange(10) % 3
    w, b = model.weight.detach().numpy(), model.bias.detach().numpy()
    logits = x.numpy() @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - np.eye(3)[y.numpy()]) @ w  # d CE / dx for softmax regression
    grad = -grad if targeted else grad
    if norm == "linf":
        step = np.sign(grad)
    else:
        step = grad / np.linalg.norm(grad, axis=1, keepdims=True)
    expected = torch.tensor(np.clip(x.numpy() + 0.15 * step, 0, 1))
    result = fgsm(model, x, y, eps=0.15, norm=norm, targeted=targeted)
    torch.testing.assert_close(result.x_adv, expected)
    with torch.no_grad():
        pred = model(result.x_adv).argmax(1)
    assert torch.equal(result.success, pred == y if targeted else pred != y)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_on_a_binary_linear_model_reaches_the_worst_point_of_the_ball(norm):
    model = affine(6, 2, seed=6)
    x = torch.randn(5, 6, generator=seeded(7), dtype=DOUBLE)
    y = torch.zeros(5, dtype=torch.int64)
    direction = (model.weight[1] - model.weight[0]).detach()  # raises f_1 - f_0 fastest
    eps = 0.4
    if norm == "linf":
        expected = x + eps * direction.sign()
    else:
        expected = x + eps * direction / direction.norm()
    result = pgd(
        model,
        x,
        y,
        eps=eps,
        norm=norm,
        steps=8,
        step_size=eps / 2,
        random_start=False,
        early_stop=False,
        domain=None,
    )
    torch.testing.assert_close(result.x_adv, expected)
    assert result.iterations.tolist() == [8] * 5


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 1.5)])
@pytest.mark.parametrize("early_stop", [True, False])
def test_pgd_stays_in_the_ball_and_the_domain(norm, eps, early_stop):
    model = tiny_mlp(in_features=6, width=16, depth=2, out_features=3, seed=2)
    x = torch.rand(32, 6, generator=seeded(8), dtype=DOUBLE)
    x[:, 0], x[:, 1] = 0.0, 1.0
    y = torch.arange(32) % 3
    result = pgd(
        model, x, y, eps=eps, norm=norm, steps=15, early_stop=early_stop, generator=seeded(9)
    )
    size = (result.x_adv - x).flatten(1)
    size = size.norm(dim=1) if norm == "l2" else size.abs().amax(dim=1)
    assert (size <= eps * (1 + 1e-9)).all()
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert torch.equal(result.success, refooled(model, result, y))
    torch.testing.assert_close(result.norms, size)
    if early_stop:
        # fooled inputs were frozen at their first adversarial iterate: no more steps after it
        assert (result.iterations[result.success] < 15).any()
    again = pgd(
        model, x, y, eps=eps, norm=norm, steps=15, early_stop=early_stop, generator=seeded(9)
    )
    assert torch.equal(again.x_adv, result.x_adv)


def test_targeted_pgd_reaches_the_target_of_a_linear_model():
    model = affine(4, 3, seed=10)
    x = torch.rand(6, 4, generator=seeded(11), dtype=DOUBLE)
    target = torch.full((6,), 2)
    result = pgd(
        model,
        x,
        target,
        eps=50.0,
        norm="l2",
        steps=50,
        domain=None,
        targeted=True,
        generator=seeded(0),
    )
    with torch.no_grad():
        assert torch.equal(result.success, model(result.x_adv).argmax(1) == 2)
    assert result.success.all()


# ---------------------------------------------------------------------------------------------
# spatial attack


def brute_force_transform(image: torch.Tensor, angle: float, dx: int, dy: int) -> torch.Tensor:
    """torchvision's bilinear rotation, then torch.roll with the wrapped pixels zeroed."""
    from torchvision.transforms.functional import InterpolationMode, rotate

    out = image if angle == 0 else rotate(image, angle, interpolation=InterpolationMode.BILINEAR)
    out = torch.roll(out, shifts=(dy, dx), dims=(-2, -1))
    if dy > 0:
        out[..., :dy, :] = 0
    elif dy < 0:
        out[..., dy:, :] = 0
    if dx > 0:
        out[..., :, :dx] = 0
    elif dx < 0:
        out[..., :, dx:] = 0
    return out


def image_classifier(seed: int, side: int = 8, classes: int = 3) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(side * side, classes)).to(DOUBLE)


def test_spatial_grid_is_the_stated_grid():
    grid = spatial_grid((-30, 30), (-3, 3), (31, 5, 5))
    assert grid.shape == (775, 3)
    angles = sorted(set(grid[:, 0].tolist()))
    assert angles == pytest.approx([-30 + 2 * i for i in range(31)])
    assert sorted(set(grid[:, 1].tolist())) == [-3, -2, 0, 2, 3]
    assert sorted(set(grid[:, 2].tolist())) == [-3, -2, 0, 2, 3]
    assert len({tuple(row) for row in grid.tolist()}) == 775


def test_spatial_grid_search_equals_a_brute_force_loop():
    pytest.importorskip("torchvision")
    model = image_classifier(seed=12)
    x = torch.rand(6, 1, 8, 8, generator=seeded(13), dtype=DOUBLE)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 3  # misclassified from the start: fooled by the first transform
    rotations, translations, counts = (-20, 20), (-2, 2), (5, 3, 3)
    result = spatial(model, x, y, rotations=rotations, translations=translations, grid=counts)
    loops = [
        (float(a), int(dx), int(dy))
        for a in np.linspace(-20, 20, 5)
        for dx in (-2, 0, 2)
        for dy in (-2, 0, 2)
    ]
    for i in range(len(x)):
        best, best_loss, fooled_at = None, -math.inf, None
        for n, (a, dx, dy) in enumerate(loops):
            image = brute_force_transform(x[i : i + 1], a, dx, dy)
            with torch.no_grad():
                logits = model(image)
            if logits.argmax(1).item() != y[i].item():
                best, fooled_at = (image, (a, dx, dy)), n
                break
            loss = F.cross_entropy(logits, y[i : i + 1]).item()
            if loss > best_loss:
                best, best_loss = (image, (a, dx, dy)), loss
        assert bool(result.success[i]) == (fooled_at is not None)
        assert result.iterations[i].item() == (len(loops) if fooled_at is None else fooled_at + 1)
        assert result.transforms[i].tolist() == pytest.approx(list(best[1]))
        torch.testing.assert_close(result.x_adv[i : i + 1], best[0], atol=1e-12, rtol=0)
    assert result.iterations[0].item() == 1


def test_spatial_random_mode_draws_whole_pixel_shifts_in_range_and_is_reproducible():
    pytest.importorskip("torchvision")
    model = image_classifier(seed=14)
    x = torch.rand(10, 1, 8, 8, generator=seeded(15), dtype=DOUBLE)
    y = torch.arange(10) % 3
    kwargs = dict(mode="random", k=6, rotations=(-15, 15), translations=(-2, 2))
    result = spatial(model, x, y, generator=seeded(16), **kwargs)
    again = spatial(model, x, y, generator=seeded(16), **kwargs)
    assert torch.equal(result.x_adv, again.x_adv)
    t = result.transforms
    assert (t[:, 0].abs() <= 15).all() and (t[:, 1:].abs() <= 2).all()
    assert torch.equal(t[:, 1:], t[:, 1:].round())
    for i in range(len(x)):
        a, dx, dy = t[i].tolist()
        expected = brute_force_transform(x[i : i + 1], a, int(dx), int(dy))
        torch.testing.assert_close(result.x_adv[i : i + 1], expected, atol=1e-12, rtol=0)
    assert torch.equal(result.success, refooled(model, result, y))
    assert (result.iterations <= 6).all()


def test_spatial_followed_by_pgd_stays_in_the_domain_and_fools_at_least_as_often():
    model = image_classifier(seed=17)
    x = torch.rand(12, 1, 8, 8, generator=seeded(18), dtype=DOUBLE)
    y = torch.arange(12) % 3
    counts = dict(rotations=(-10, 10), translations=(-1, 1), grid=(3, 3, 3))
    alone = spatial(model, x, y, **counts)
    combined = spatial(model, x, y, pgd={"eps": 0.2, "steps": 10}, generator=seeded(19), **counts)
    assert combined.x_adv.min() >= 0 and combined.x_adv.max() <= 1
    assert torch.equal(combined.success, refooled(model, combined, y))
    assert (combined.success >= alone.success).all()


# ---------------------------------------------------------------------------------------------
# robustness over a loader


def test_robustness_reports_rho_adv_of_deepfool_and_pgd_at_zero_eps_keeps_clean_accuracy():
    model = affine(5, 2, seed=20)
    x = torch.randn(20, 5, generator=seeded(21), dtype=DOUBLE)
    y = torch.arange(20) % 2
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    report = robustness(model, batches, "deepfool", domain=None)
    with torch.no_grad():
        f = model(x)
        clean = float((f.argmax(1) == y).double().mean())
        gap = (model.weight[1] - model.weight[0]).norm()
    distance = 1.02 * (f[:, 1] - f[:, 0]).abs() / gap  # overshoot 0.02 beyond the boundary
    assert report.clean_accuracy == pytest.approx(clean)
    assert report.rho_adv == pytest.approx(float((distance / x.norm(dim=1)).mean()), rel=1e-9)
    assert report.samples == 20
    zero = robustness(model, batches, pgd, eps=0.0, domain=None, generator=seeded(0))
    assert zero.robust_accuracy == pytest.approx(clean) and zero.rho_adv is None


# ---------------------------------------------------------------------------------------------
# errors and side effects


class Probabilities(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x).softmax(1)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m, x, y: fgsm(m, x, y, eps=-0.1), "eps"),
        (lambda m, x, y: pgd(m, x, y, eps=-1.0), "eps"),
        (lambda m, x, y: pgd(m, x, y[:, None], eps=0.1), "y must be class indices"),
        (lambda m, x, y: deepfool(m, x, y[:2]), "y must be class indices"),
        (lambda m, x, y: deepfool(m, x * 3), "outside domain"),
        (lambda m, x, y: pgd(m, x, y, eps=0.1, norm=1), "norm"),
        (lambda m, x, y: deepfool(m, x, y + 5), "labels must lie in"),
        (lambda m, x, y: deepfool(m, x, max_iter=0), "max_iter"),
        (lambda m, x, y: pgd(m, x, y, eps=0.1, domain=(1.0, 0.0)), "domain"),
        (lambda m, x, y: spatial(m, x, y), "images"),
    ],
)
def test_bad_input_raises_a_clear_error_and_leaves_the_model_alone(call, message):
    model = nn.Linear(4, 3)
    x, y = torch.rand(5, 4, generator=seeded(22)), torch.arange(5) % 3
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(ValueError, match=message):
        call(model, x, y)
    snapshot.assert_unchanged(model)


@pytest.mark.parametrize(
    "model,message",
    [
        (lambda x: x.sum(1), r"logits of shape \[B, classes\]"),
        (Probabilities(), "probabilities"),
    ],
)
def test_a_model_that_does_not_return_logits_is_rejected(model, message):
    x, y = torch.rand(5, 4, generator=seeded(23)), torch.arange(5) % 3
    for attack in (lambda: fgsm(model, x, y, eps=0.1), lambda: deepfool(model, x)):
        with pytest.raises(ValueError, match=message):
            attack()


def test_attacks_leave_model_grads_flags_buffers_and_rng_untouched():
    net = tiny_bn_dropout_net()  # train mode, BatchNorm statistics, dropout
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(24)
        cnn = nn.Sequential(
            nn.Conv2d(1, 2, 3),
            nn.BatchNorm2d(2),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Flatten(),
            nn.Linear(2 * 6 * 6, 3),
        ).to(DOUBLE)
    cnn[0].weight.requires_grad_(False)
    x = torch.rand(8, 6, generator=seeded(25), dtype=DOUBLE)
    images = torch.rand(8, 1, 8, 8, generator=seeded(26), dtype=DOUBLE)
    y = torch.arange(8) % 3
    snapshots = ModelSnapshot.take(net), ModelSnapshot.take(cnn)
    grads = [p.grad.clone() for p in net.parameters()]
    fgsm(net, x, y, eps=0.1)
    pgd(net, x, y, eps=0.1, steps=3)
    pgd(net, x, y, eps=0.5, norm=2, steps=3, generator=seeded(1))
    deepfool(net, x, norm="linf", max_iter=5)
    robustness(net, [(x, y)], "deepfool", max_iter=3)
    spatial(cnn, images, y, grid=(3, 3, 3), pgd={"eps": 0.1, "steps": 2})
    spatial(cnn, images, y, mode="random", k=3)
    snapshots[0].assert_unchanged(net)
    snapshots[1].assert_unchanged(cnn)
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
    assert all(p.grad is None for p in cnn.parameters())
