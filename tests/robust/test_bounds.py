"""Tests of torch_dlt.robust.bounds: soundness against sampled and PGD points, exactness at
eps = 0, Wong & Kolter's dual network, alpha-CROWN, auto_LiRPA, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from torch_dlt.ops import bounds as bound_ops
from torch_dlt.robust import bounds
from torch_dlt.robust.bounds import (
    Normalize,
    Residual,
    crown_bounds,
    interval_bounds,
    margin_matrix,
)
from torch_dlt.testing import ModelSnapshot, seeded

METHODS = ("crown", "crown-ibp", "wong-kolter", "alpha-crown")


def _bn(layer: nn.Module, generator: torch.Generator) -> nn.Module:
    """A BatchNorm with non-trivial running statistics and affine parameters, in eval mode."""
    size = layer.num_features
    layer.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
    layer.running_var.copy_(0.5 + torch.rand(size, generator=generator))
    layer.weight.data.copy_(0.5 + torch.rand(size, generator=generator))
    layer.bias.data.copy_(0.4 * torch.rand(size, generator=generator) - 0.2)
    return layer.eval()


def random_net(seed: int, layout: tuple[bool, ...]) -> nn.Module:
    """A small float64 image network mixing every supported layer type, chosen by ``layout``."""
    norm, bn, residual, projection, pool, bn1d, stride2 = layout
    torch.manual_seed(seed)
    g = seeded(seed)
    layers: list[nn.Module] = []
    if norm:
        layers.append(Normalize([0.4, 0.6], [0.5, 0.8]))
    layers += [nn.Conv2d(2, 3, 3, stride=2 if stride2 else 1, padding=1)]
    if bn:
        layers.append(_bn(nn.BatchNorm2d(3), g))
    layers.append(nn.ReLU())
    side = 3 if stride2 else 6
    if residual:
        block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))
        layers += [Residual(block, nn.Conv2d(3, 4, 1) if projection else None), nn.ReLU()]
        channels = 4
        if not projection:
            block[2] = nn.Conv2d(4, 3, 1)
            channels = 3
    else:
        channels = 3
    if pool:
        layers.append(nn.AvgPool2d(2, stride=1))
        side -= 1
    layers += [nn.Flatten(), nn.Linear(channels * side * side, 7)]
    if bn1d:
        layers.append(_bn(nn.BatchNorm1d(7), g))
    layers += [nn.ReLU(), nn.Linear(7, 4)]
    return nn.Sequential(*layers).double().eval()


def inputs(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 2, 6, 6, generator=seeded(seed + 1), dtype=torch.float64)


def pgd_extremes(
    net: nn.Module, lower: torch.Tensor, upper: torch.Tensor, C: torch.Tensor, steps: int = 12
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest value of each row of ``C @ net(x)`` found by sign-gradient PGD.

    One copy of the box per (row, direction); returns ``[B, m]`` each.
    """
    B, m = lower.shape[0], C.shape[1]
    shape = lower.shape[1:]
    lo = lower.unsqueeze(1).expand(B, 2 * m, *shape).reshape(-1, *shape)
    hi = upper.unsqueeze(1).expand(B, 2 * m, *shape).reshape(-1, *shape)
    sign = torch.cat([torch.ones(m), -torch.ones(m)]).to(lower).repeat(B)
    rows = torch.cat([C, C], 1).reshape(B * 2 * m, -1)  # the row each copy optimises
    x = lo + (hi - lo) * torch.rand(lo.shape, generator=seeded(5), dtype=lo.dtype)
    for step in range(steps):
        x.requires_grad_(True)
        value = (net(x) * rows).sum(-1)
        (grad,) = torch.autograd.grad((sign * value).sum(), x)
        size = (hi - lo) * 0.5 * 0.7**step
        x = torch.min(torch.max(x.detach() - size * grad.sign(), lo), hi)
    with torch.no_grad():
        value = (net(x) * rows).sum(-1).view(B, 2, m)
    return value[:, 0], value[:, 1]


def sampled_values(net, lower, upper, C, n: int = 64) -> torch.Tensor:
    """``C @ net(x)`` at ``n`` uniform points and all corners' signs mixed, [n, B, m]."""
    u = torch.rand(n, *lower.shape, generator=seeded(7), dtype=lower.dtype)
    u[: n // 4] = u[: n // 4].round()  # vertices of the box
    x = lower + (upper - lower) * u
    with torch.no_grad():
        out = net(x.reshape(-1, *lower.shape[1:])).view(n, lower.shape[0], -1)
    return torch.einsum("bmo,nbo->nbm", C, out)


layouts = st.tuples(*[st.booleans()] * 7)


@settings(max_examples=90, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 10_000),
    layout=layouts,
    eps=st.sampled_from([0.0, 0.01, 0.05, 0.2]),
    margins=st.booleans(),
)
def test_no_sampled_or_pgd_point_leaves_the_bounds(seed, layout, eps, margins):
    """Soundness of every method on random nets; exact at eps = 0; alpha-CROWN >= CROWN."""
    net = random_net(seed, layout)
    x = inputs(seed)
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    y = torch.tensor([seed % 4, (seed + 1) % 4])
    C = margin_matrix(y, 4).double() if margins else torch.eye(4).double().expand(2, 4, 4)
    values = sampled_values(net, lower, upper, C)
    pgd_min, pgd_max = pgd_extremes(net, lower, upper, C)
    lowest = torch.minimum(values.min(0).values, pgd_min)
    highest = torch.maximum(values.max(0).values, pgd_max)
    results = {"ibp": interval_bounds(net, x - eps, x + eps, C=C)}
    for method in METHODS:
        results[method] = crown_bounds(net, x - eps, x + eps, C=C, method=method, alpha_steps=2)
    results["plain crown"] = crown_bounds(net, x - eps, x + eps, C=C, interval_reference=False)
    for method, (lo, hi) in results.items():
        assert (lo <= lowest + 1e-9).all(), method
        assert (hi >= highest - 1e-9).all(), method
        if eps == 0:
            torch.testing.assert_close(lo, values[0], rtol=0, atol=1e-10)
            torch.testing.assert_close(hi, values[0], rtol=0, atol=1e-10)
    assert (results["alpha-crown"][0] >= results["crown"][0] - 1e-12).all()
    assert (results["alpha-crown"][1] <= results["crown"][1] + 1e-12).all()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 10_000),
    layout=layouts,
    eps=st.floats(0.0, 0.2),
    grow=st.floats(0.0, 0.2),
)
def test_interval_bounds_are_monotone_in_eps(seed, layout, eps, grow):
    net = random_net(seed, layout)
    x = inputs(seed)
    inner = interval_bounds(net, x - eps, x + eps)
    outer = interval_bounds(net, x - eps - grow, x + eps + grow)
    assert (outer[0] <= inner[0] + 1e-12).all() and (outer[1] >= inner[1] - 1e-12).all()


def test_crown_adaptive_slope_is_not_monotone_in_eps():
    """Why only IBP is tested monotone: relu(z) on z in [-1, 2] takes the lower line z
    (u > -l), bound -1; on the larger [-3, 2.5] it takes 0, bound 0 (Zhang et al. 2018)."""
    net = nn.Sequential(nn.Linear(1, 1), nn.ReLU()).double()
    nn.init.ones_(net[0].weight), nn.init.zeros_(net[0].bias)
    x = torch.tensor([[0.5]], dtype=torch.float64)
    small = crown_bounds(net, x - 1.5, x + 1.5, domain=None)[0]
    large = crown_bounds(net, x - 3.5, x + 2.0, domain=None)[0]
    assert small.item() == pytest.approx(-1.0) and large.item() == pytest.approx(0.0)
    assert interval_bounds(net, x - 3.5, x + 2.0, domain=None)[0].item() == 0.0


def test_crown_is_tighter_than_ibp_on_average():
    widths = {"ibp": 0.0, "crown": 0.0, "crown-ibp": 0.0}
    for seed in range(8):
        net = random_net(seed, (seed % 2 == 0, True, seed % 3 == 0, False, True, False, True))
        x = inputs(seed)
        lo, hi = interval_bounds(net, x - 0.02, x + 0.02)
        widths["ibp"] += (hi - lo).mean().item()
        for method in ("crown", "crown-ibp"):
            lo, hi = crown_bounds(net, x - 0.02, x + 0.02, method=method)
            widths[method] += (hi - lo).mean().item()
    assert widths["crown"] < widths["crown-ibp"] <= widths["ibp"] + 1e-12
    assert widths["crown"] < 0.5 * widths["ibp"]


def mlp(seed: int, sizes: tuple[int, ...]) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).double()


def wong_kolter_dual_bound(net: nn.Sequential, x: torch.Tensor, eps: float, c: torch.Tensor):
    """Lower bound of ``c @ net(x')`` over ``|x' - x|_inf <= eps`` by the dual network.

    Wong & Kolter (2018), Theorem 1 and Algorithm 1, written from the paper with explicit
    per-layer matrices: nu_k = -c, nu_hat_i = W_i^T nu_{i+1}, nu_i = D_i nu_hat_i with
    D = 0 / 1 / u / (u - l) on dead / active / unstable units, and
    J = -sum nu_{i+1}^T b_i - x^T nu_hat_1 - eps |nu_hat_1|_1 + sum_{unstable} l [nu]_+.
    Intermediate bounds come from the same dual network on the truncated net.
    """
    linears = [m for m in net if isinstance(m, nn.Linear)]
    W = [m.weight.detach() for m in linears]
    b = [m.bias.detach() for m in linears]
    lows, ups = [], []  # pre-activation bounds of z_2 .. z_{k-1}

    def dual(depth: int, c: torch.Tensor) -> torch.Tensor:  # c: [rows, n_depth]
        nu = -c
        value = torch.zeros(c.shape[0], dtype=c.dtype)
        for i in range(depth - 1, -1, -1):
            value = value - nu @ b[i]
            nu_hat = nu @ W[i]
            if i == 0:
                return value - nu_hat @ x - eps * nu_hat.abs().sum(-1)
            lo, up = lows[i - 1], ups[i - 1]
            unstable = (lo < 0) & (up > 0)
            d = torch.where(unstable, up / torch.where(unstable, up - lo, 1.0), (lo >= 0) * 1.0)
            nu = nu_hat * d
            value = value + (lo * unstable * nu.clamp(min=0)).sum(-1)
        raise AssertionError

    for depth in range(1, len(W)):
        eye = torch.eye(W[depth - 1].shape[0], dtype=x.dtype)
        lows.append(dual(depth, eye))
        ups.append(-dual(depth, -eye))
    return dual(len(W), c)


@pytest.mark.parametrize("seed", range(6))
def test_wong_kolter_equals_the_dual_network(seed):
    net = mlp(seed, (5, 12, 10, 8, 3))
    x = torch.rand(5, dtype=torch.float64, generator=seeded(seed))
    c = torch.randn(4, 3, dtype=torch.float64, generator=seeded(seed + 50))
    eps = 0.15
    expected = wong_kolter_dual_bound(net, x, eps, c)
    lower, upper = crown_bounds(
        net,
        (x - eps)[None],
        (x + eps)[None],
        C=c,
        method="wong-kolter",
        domain=None,
        interval_reference=False,
    )
    torch.testing.assert_close(lower[0], expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        upper[0], -wong_kolter_dual_bound(net, x, eps, -c), atol=1e-10, rtol=0
    )
    crown = crown_bounds(net, (x - eps)[None], (x + eps)[None], C=c, domain=None)[0]
    assert not torch.allclose(crown, lower), "the fixed slope must differ from CROWN's choice"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(2))
def test_one_sided_bounds_equal_that_side_of_both(method, seed):
    """``bound_upper=False`` / ``bound_lower=False`` give the same side as the two-sided call
    (which bounds the rows ``C`` and ``-C`` together), on nets of every layer type."""
    layout = tuple(bool((seed + k) % 2) for k in range(7))
    net = random_net(seed, layout)
    x = inputs(seed, batch=3)
    C = margin_matrix(torch.tensor([0, 1, 3]), 4).double()
    for spec in (C, None):
        both = crown_bounds(net, x - 0.05, x + 0.05, C=spec, method=method, alpha_steps=2)
        lower = crown_bounds(
            net, x - 0.05, x + 0.05, C=spec, method=method, alpha_steps=2, bound_upper=False
        )
        upper = crown_bounds(
            net, x - 0.05, x + 0.05, C=spec, method=method, alpha_steps=2, bound_lower=False
        )
        assert lower[1] is None and upper[0] is None
        torch.testing.assert_close(lower[0], both[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(upper[1], both[1], rtol=0, atol=1e-12)
        assert (both[0] < both[1]).any(), "a degenerate net would make the check vacuous"
    with pytest.raises(ValueError, match="both False"):
        crown_bounds(net, x, x, bound_lower=False, bound_upper=False)


def test_alpha_crown_beats_crown_on_a_random_net():
    """Fails if the slopes are not really optimised (auto_LiRPA 0.7.1 on torch 2.14 returns
    CROWN: its slopes start at exactly 0 or 1, where the clamp's gradient is zero)."""
    net = mlp(0, (10, 32, 32, 5))
    x = torch.rand(4, 10, dtype=torch.float64, generator=seeded(1))
    C = margin_matrix(torch.tensor([0, 1, 2, 3]), 5).double()
    crown = crown_bounds(net, x - 0.1, x + 0.1, C=C)[0]
    alpha = crown_bounds(net, x - 0.1, x + 0.1, C=C, method="alpha-crown")[0]
    gain = alpha - crown
    assert (gain >= -1e-12).all()
    assert gain.mean() > 0.02 * (crown.abs().mean()), f"alpha-CROWN gained only {gain.mean():.2e}"


def test_margin_matrix_rows_are_e_y_minus_e_j():
    y = torch.tensor([2, 0, 3])
    C = margin_matrix(y, 4)
    logits = torch.randn(3, 4, generator=seeded(0))
    margins = torch.einsum("bmo,bo->bm", C, logits)
    for b in range(3):
        others = [j for j in range(4) if j != y[b]]
        expected = torch.stack([logits[b, y[b]] - logits[b, j] for j in others])
        torch.testing.assert_close(margins[b], expected)


def test_bounds_are_differentiable_in_the_parameters():
    net = random_net(3, (True, True, True, False, True, True, True))
    x = inputs(3)
    C = margin_matrix(torch.tensor([1, 2]), 4).double()
    weight = net[1].weight
    direction = torch.randn(weight.shape, generator=seeded(9), dtype=torch.float64)
    for method in ("ibp", "crown", "crown-ibp", "wong-kolter", "alpha-crown"):

        def loss(method: str = method) -> torch.Tensor:
            if method == "ibp":
                return interval_bounds(net, x - 0.03, x + 0.03, C=C)[0].sum()
            return crown_bounds(net, x - 0.03, x + 0.03, C=C, method=method, alpha_steps=2)[0].sum()

        (grad,) = torch.autograd.grad(loss(), weight)
        h = 1e-6
        with torch.no_grad():
            weight += h * direction
            plus = loss()
            weight -= 2 * h * direction
            minus = loss()
            weight += h * direction
        assert (grad * direction).sum().item() == pytest.approx(
            ((plus - minus) / (2 * h)).item(), rel=1e-4, abs=1e-6
        ), method


def test_model_and_rng_are_left_untouched():
    net = random_net(4, (True, True, True, True, True, True, False))
    x = inputs(4)
    snapshot = ModelSnapshot.take(net)
    state = torch.get_rng_state()
    for method in METHODS:
        crown_bounds(net, x - 0.05, x + 0.05, method=method, alpha_steps=2)
    interval_bounds(net, x - 0.05, x + 0.05)
    snapshot.assert_unchanged(net)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in net.parameters())


def test_traced_forward_residual_functional_ops_and_wrappers():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.head = nn.Linear(2 * 6 * 6, 3)

        def forward(self, x):
            x = x + torch.relu(self.conv(x))
            return self.head(torch.flatten(x, 1))

    torch.manual_seed(0)
    net = Block().double()
    x = inputs(0)
    reference = crown_bounds(net, x - 0.05, x + 0.05)
    wrapped = crown_bounds(nn.DataParallel(net), (x - 0.05).float(), (x + 0.05).float())
    assert wrapped[0].dtype == torch.float64
    torch.testing.assert_close(wrapped, reference)
    values = sampled_values(
        net,
        (x - 0.05).clamp(0, 1),
        (x + 0.05).clamp(0, 1),
        torch.eye(3).double()[None].expand(2, 3, 3),
    )
    assert (values >= reference[0] - 1e-9).all() and (values <= reference[1] + 1e-9).all()


@pytest.mark.parametrize("method", ["crown", "crown-ibp", "wong-kolter"])
def test_dilated_grouped_convolutions_are_sound(method):
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=2, dilation=2),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 3),
    ).double()
    x = inputs(2)
    lower, upper = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    C = torch.eye(3).double().expand(2, 3, 3)
    values = sampled_values(net, lower, upper, C)
    pgd_min, pgd_max = pgd_extremes(net, lower, upper, C)
    lo, hi = crown_bounds(net, x - 0.05, x + 0.05, method=method)
    assert (lo <= torch.minimum(values.min(0).values, pgd_min) + 1e-9).all()
    assert (hi >= torch.maximum(values.max(0).values, pgd_max) - 1e-9).all()
    ibp = interval_bounds(net, x - 0.05, x + 0.05)
    assert (hi - lo).mean() < (ibp[1] - ibp[0]).mean()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["ibp", *METHODS])
def test_cuda_bounds_equal_cpu_bounds(method):
    net = random_net(6, (True, True, True, True, True, True, True)).float()
    x = inputs(6).float()
    C = margin_matrix(torch.tensor([1, 3]), 4)

    def bound(model, box):
        if method == "ibp":
            return interval_bounds(model, box - 0.03, box + 0.03, C=C)
        return crown_bounds(model, box - 0.03, box + 0.03, C=C, method=method, alpha_steps=2)

    cpu = bound(net, x)
    gpu = bound(net.cuda(), x.cuda())
    assert gpu[0].device.type == "cuda"
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=0, atol=1e-4)


def test_domain_clamps_the_box():
    net = random_net(5, (False,) * 7)
    x = inputs(5)
    clamped = crown_bounds(net, x - 0.3, x + 0.3)
    explicit = crown_bounds(net, (x - 0.3).clamp(0, 1), (x + 0.3).clamp(0, 1), domain=None)
    torch.testing.assert_close(clamped, explicit)
    assert (crown_bounds(net, x - 0.3, x + 0.3, domain=None)[0] < clamped[0] - 1e-6).any()


def test_clear_errors():
    x = torch.rand(2, 4)
    net = nn.Sequential()
    net.add_module("body", nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    with pytest.raises(TypeError, match=r"'body\.1' \(Tanh\)"):
        crown_bounds(net, x, x)
    image = torch.rand(1, 1, 4, 4)
    with pytest.raises(TypeError, match="MaxPool2d"):
        interval_bounds(nn.Sequential(nn.MaxPool2d(2)), image, image)
    with pytest.raises(TypeError, match="end_dim=2"):
        crown_bounds(nn.Sequential(nn.Flatten(1, 2), nn.Flatten()), image, image)

    class Functional(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x)

    with pytest.raises(TypeError, match="sigmoid"):
        crown_bounds(Functional(), x, x)
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"BatchNorm layer '1' is in training mode"):
        crown_bounds(bn, x, x)
    assert bn.training
    linear = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="same shape"):
        interval_bounds(linear, x, x[:1])
    with pytest.raises(ValueError, match="x_lower must be <= x_upper"):
        interval_bounds(linear, x + 1, x)
    with pytest.raises(ValueError, match="method must be one of"):
        crown_bounds(linear, x, x, method="lp")
    with pytest.raises(ValueError, match="must end in the model's output size 3"):
        crown_bounds(linear, x, x, C=torch.ones(2, 5))
    with pytest.raises(ValueError, match="labels must lie in"):
        margin_matrix(torch.tensor([3]), 3)


AUTO_NETS = {
    "mlp": lambda: mlp(0, (72, 20, 20, 5)).float(),
    # C_in k^2 <= C_out on the input: the transposed convolution goes by stride phases
    "few-inputs": lambda: nn.Sequential(
        nn.Conv2d(2, 20, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(20, 4, 2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 5),
    ),
    "cnn": lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(1),
        nn.Flatten(),
        nn.Linear(36, 12),
        nn.ReLU(),
        nn.Linear(12, 5),
    ),
    "residual-bn": lambda: nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        _bn(nn.BatchNorm2d(3), seeded(0)),
        nn.ReLU(),
        Residual(
            nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1))
        ),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(27, 5),
    ),
}


@pytest.mark.parametrize("name", sorted(AUTO_NETS))
@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_matches_auto_lirpa(name, eps):
    auto_lirpa = pytest.importorskip("auto_LiRPA")
    torch.manual_seed(0)
    net = AUTO_NETS[name]().float().eval()
    x = (
        torch.rand(3, 2, 6, 6, generator=seeded(2)).flatten(1)
        if name == "mlp"
        else torch.rand(3, 2, 6, 6, generator=seeded(2))
    )
    C = margin_matrix(torch.tensor([0, 2, 4]), 5)
    lower, upper = x - eps, x + eps
    bounded = auto_lirpa.BoundedModule(
        net, x, verbose=0, bound_opts={"conv_mode": "matrix", "sparse_intermediate_bounds": False}
    )
    net.eval()  # auto_LiRPA leaves the wrapped model in training mode
    ptb = auto_lirpa.PerturbationLpNorm(norm=float("inf"), x_L=lower, x_U=upper)
    box = auto_lirpa.BoundedTensor(x, ptb)
    ours = {
        "IBP": lambda spec: interval_bounds(net, lower, upper, C=spec, domain=None),
        "CROWN": lambda spec: crown_bounds(
            net, lower, upper, C=spec, domain=None, interval_reference=False
        ),
        "CROWN-IBP": lambda spec: crown_bounds(
            net, lower, upper, C=spec, method="crown-ibp", domain=None
        ),
    }
    for method, bound in ours.items():
        for spec in (None, C):
            theirs = bounded.compute_bounds(x=(box,), method=method, C=spec)
            net.eval()
            mine = bound(spec)
            torch.testing.assert_close(mine[0], theirs[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(mine[1], theirs[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("stride", [(1, 1), (2, 2), (3, 2)])
@pytest.mark.parametrize("kernel", [(1, 1), (3, 3), (4, 4), (5, 2)])
def test_transposed_convolution_by_phases_equals_conv_transpose2d(stride, kernel):
    g = seeded(11)
    for padding, extra in (((0, 0), 0), ((1, 1), 1), ((2, 1), 0)):
        if min(kernel) <= max(padding):
            continue
        weight = torch.randn(8, 1, *kernel, generator=g, dtype=torch.float64)
        A = torch.randn(3, 8, 4, 5, generator=g, dtype=torch.float64)
        out_pad = tuple(min(extra, s - 1) for s in stride)
        expected = F.conv_transpose2d(A, weight, None, stride, padding, out_pad)
        got = bounds._transposed_conv(A, weight, stride, padding, expected.shape[-2:], 1, (1, 1))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def _few_inputs_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 32, 4, stride=2, padding=1),  # C_in k^2 <= C_out: by stride phases
        nn.ReLU(),
        nn.Conv2d(32, 5, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(45, 6),
        nn.ReLU(),
        nn.Linear(6, 4),
    ).double()


def _reference_transposed_conv(A, weight, stride, padding, out_hw, groups, dilation, **_):
    """``F.conv_transpose2d`` with the output padding that reaches ``out_hw``."""
    natural = [
        (A.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.shape[2 + i] - 1)
        for i in range(2)
    ]
    out_pad = tuple(out_hw[i] - natural[i] - 1 for i in range(2))
    return F.conv_transpose2d(A, weight, None, stride, padding, out_pad, groups, dilation)


@pytest.mark.parametrize("seed", [0, 1])
def test_first_layer_by_phases_is_sound_and_equals_the_transposed_convolution(seed, monkeypatch):
    """The input convolution concretized in its stride phases: sound against sampling and PGD,
    and equal (values and parameter gradients) to the plain transposed convolution."""
    net = _few_inputs_net(seed)
    x = inputs(seed, batch=3)
    C = margin_matrix(torch.tensor([0, 2, 3]), 4).double()
    lower, upper = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    values = sampled_values(net, lower, upper, C)
    pgd_min, pgd_max = pgd_extremes(net, lower, upper, C)
    parameters = list(net.parameters())
    found = {}
    for method in METHODS:
        lo, hi = crown_bounds(net, x - 0.05, x + 0.05, C=C, method=method, alpha_steps=2)
        assert (lo <= torch.minimum(values.min(0).values, pgd_min) + 1e-9).all(), method
        assert (hi >= torch.maximum(values.max(0).values, pgd_max) - 1e-9).all(), method
        found[method] = (lo, hi, torch.autograd.grad(lo.sum() - hi.sum(), parameters))
    monkeypatch.setattr(bounds, "_by_phases", lambda module: False)
    monkeypatch.setattr(bounds, "_transposed_conv", _reference_transposed_conv)
    for method in METHODS:
        lo, hi = crown_bounds(net, x - 0.05, x + 0.05, C=C, method=method, alpha_steps=2)
        grads = torch.autograd.grad(lo.sum() - hi.sum(), parameters)
        torch.testing.assert_close(lo, found[method][0], rtol=0, atol=1e-10)
        torch.testing.assert_close(hi, found[method][1], rtol=0, atol=1e-10)
        for got, want in zip(found[method][2], grads):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("lines", ["crown", "wong-kolter"])
@pytest.mark.parametrize("below", [None, "shared", "per-example"])
def test_relu_lines_gradient_equals_autograd_of_the_relaxation(lines, below):
    g = seeded(21)
    B, m, K = 3, 4, 10
    A = torch.randn(B, m, K, generator=g, dtype=torch.float64, requires_grad=True)
    slope_u = torch.rand(B, 1, K, generator=g, dtype=torch.float64, requires_grad=True)
    slope_l = slope_u if lines == "wong-kolter" else (torch.rand(B, 1, K, generator=g) > 0.5)
    slope_l = slope_l.to(torch.float64) if lines == "crown" else slope_l
    v_neg = torch.randn(B, K, generator=g, dtype=torch.float64, requires_grad=True)
    v_all = None
    if below is not None:
        v_all = torch.randn(1 if below == "shared" else B, K, generator=g, dtype=torch.float64)
        v_all.requires_grad_(True)
    A_in, bias = bound_ops._ReluLines.apply(A, slope_l, slope_u, v_neg, v_all)
    A_neg = A.clamp(max=0)
    want_in = slope_l * A.clamp(min=0) + slope_u * A_neg
    want_bias = (A_neg * v_neg.unsqueeze(1)).sum(-1)
    if v_all is not None:
        want_bias = want_bias + (A * v_all.unsqueeze(1)).sum(-1)
    torch.testing.assert_close(A_in, want_in, rtol=0, atol=1e-14)
    torch.testing.assert_close(bias, want_bias, rtol=0, atol=1e-13)
    weights = (
        torch.randn(B, m, K, generator=g, dtype=torch.float64),
        torch.randn(B, m, generator=g, dtype=torch.float64),
    )
    inputs_ = [t for t in (A, slope_u, v_neg, v_all) if t is not None]
    got = torch.autograd.grad((A_in * weights[0]).sum() + (bias * weights[1]).sum(), inputs_)
    want = torch.autograd.grad(
        (want_in * weights[0]).sum() + (want_bias * weights[1]).sum(), inputs_
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_per_example_unit_rows_equal_the_rows_of_every_unit(monkeypatch):
    """Each example pushing back only its own unstable units gives the same bounds as every
    example pushing back all units that any example needs."""
    net = mlp(5, (8, 30, 30, 30, 3))
    x = torch.rand(6, 8, generator=seeded(6), dtype=torch.float64)
    used = []
    own = bounds._own_unit_bounds
    monkeypatch.setattr(bounds, "_own_unit_bounds", lambda *a: used.append(a[4]) or own(*a))
    found = crown_bounds(net, x - 0.05, x + 0.05, domain=None)
    assert used, "the per-example rows were never exercised"
    everything = bounds._unit_bounds
    monkeypatch.setattr(bounds, "_unit_bounds", lambda *a: everything(*a[:6]))
    expected = crown_bounds(net, x - 0.05, x + 0.05, domain=None)
    torch.testing.assert_close(found[0], expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(found[1], expected[1], rtol=0, atol=1e-12)


def test_backward_pass_by_blocks_of_examples_equals_all_at_once(monkeypatch):
    """Without autograd the backward pass goes through blocks of examples: the same bounds."""
    net = random_net(8, (True, True, True, True, True, True, False))
    x = inputs(8, batch=3)
    C = margin_matrix(torch.tensor([0, 1, 3]), 4).double()
    with torch.no_grad():
        whole = {m: crown_bounds(net, x - 0.05, x + 0.05, C=C, method=m) for m in METHODS}
        monkeypatch.setattr(bounds, "_PASS_FLOATS", 1)  # one example per block
        for method in METHODS:
            blocks = crown_bounds(net, x - 0.05, x + 0.05, C=C, method=method)
            torch.testing.assert_close(blocks[0], whole[method][0], rtol=0, atol=1e-12)
            torch.testing.assert_close(blocks[1], whole[method][1], rtol=0, atol=1e-12)
