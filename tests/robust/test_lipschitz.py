"""Tests of torch_dlt/robust/lipschitz.py against dense operator matrices, an FFT formula and the
empirical lower bound."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from torch_dlt.nn import LeNet5
from torch_dlt.prune import SparsifyingFrontEnd
from torch_dlt.robust.lipschitz import (
    lipschitz_interval,
    lipschitz_lower_bound,
    lipschitz_upper_bound,
)
from torch_dlt.testing import ModelSnapshot, tiny_bn_dropout_net

INF = math.inf


def _built(seed, make):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().double()


def _dense_conv_matrix(conv, in_shape):
    """The convolution (no bias) as a matrix, column j = conv(e_j): the test's oracle."""
    n = math.prod(in_shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    fn = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv1d
    out = fn(eye, conv.weight.detach(), None, conv.stride, conv.padding, conv.dilation)
    return out.reshape(n, -1).T


@pytest.mark.parametrize("dense_limit", [512, 0])
def test_exact_for_one_linear_layer(dense_limit):
    net = _built(0, lambda: nn.Linear(30, 20))
    w = net.weight.detach()
    l2 = lipschitz_upper_bound(net, (1, 30), dense_limit=dense_limit)
    sigma = float(torch.linalg.matrix_norm(w, ord=2))
    if dense_limit:
        assert l2 == pytest.approx(sigma, rel=1e-8)
    else:  # power iteration: above the truth, within its stated correction
        assert sigma <= l2 <= sigma * 1.012
    linf = lipschitz_upper_bound(net, (1, 30), norm=INF, dense_limit=dense_limit)
    assert linf == pytest.approx(float(w.abs().sum(dim=1).max()), rel=1e-12)
    # the Jacobian is W everywhere: the empirical lower bound meets the upper bound
    x = torch.randn(3, 30, dtype=torch.float64)
    assert lipschitz_lower_bound(net, x, steps=0) == pytest.approx(sigma, rel=1e-10)
    assert lipschitz_lower_bound(net, x, norm=INF, steps=0) == pytest.approx(linf, rel=1e-10)


@pytest.mark.parametrize(
    "conv, in_shape",
    [
        (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 9, 9)),
        (
            lambda: nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1)),
            (2, 7, 8),
        ),
        (lambda: nn.Conv1d(2, 5, 4, stride=3, padding=2), (2, 17)),
    ],
)
def test_exact_for_one_strided_padded_convolution(conv, in_shape):
    net = _built(1, conv)
    dense = _dense_conv_matrix(net, in_shape)
    sigma = float(torch.linalg.matrix_norm(dense, ord=2))
    shape = (1, *in_shape)
    assert lipschitz_upper_bound(net, shape) == pytest.approx(sigma, rel=1e-8)
    assert sigma <= lipschitz_upper_bound(net, shape, dense_limit=0) <= sigma * 1.012
    row_sums = float(dense.abs().sum(dim=1).max())
    for limit in (512, 0):
        linf = lipschitz_upper_bound(net, shape, norm=INF, dense_limit=limit)
        assert linf == pytest.approx(row_sums, rel=1e-12)


def test_circular_convolution_matches_the_fft_formula():
    # Sedghi, Gupta & Long (2019): a stride-1 circular convolution's singular values are those
    # of the c_out x c_in matrices of the kernel's 2-D DFT at every frequency.
    n = 8
    net = _built(2, lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False))
    w = net.weight.detach()
    # cross-correlation: output(i) = sum_u w(u) x(i + u - 1); its transfer function
    # at frequency k is sum_u w(u) exp(+2 pi i k (u - 1) / n).
    padded = torch.zeros(3, 2, n, n, dtype=torch.float64)
    padded[:, :, :3, :3] = w
    transfer = torch.fft.ifft2(padded) * n * n
    phase = torch.exp(-2j * math.pi * torch.arange(n) / n)  # the shift by one tap (u - 1)
    transfer = transfer * phase[:, None] * phase[None, :]
    sigma = float(torch.linalg.matrix_norm(transfer.permute(2, 3, 0, 1), ord=2).max())
    assert lipschitz_upper_bound(net, (1, 2, n, n)) == pytest.approx(sigma, rel=1e-8)


def test_merging_linear_maps_tightens_the_bound():
    net = _built(3, lambda: nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 6)))
    w1, w2 = net[0].weight.detach(), net[1].weight.detach()
    merged = lipschitz_upper_bound(net, (1, 10))
    separate = lipschitz_upper_bound(net, (1, 10), merge=False)
    assert merged == pytest.approx(float(torch.linalg.matrix_norm(w2 @ w1, ord=2)), rel=1e-8)
    product = float(torch.linalg.matrix_norm(w1, ord=2) * torch.linalg.matrix_norm(w2, ord=2))
    assert separate == pytest.approx(product, rel=1e-8)
    assert merged < 0.95 * separate


def test_conv_batchnorm_conv_is_merged_into_its_exact_norm():
    def make():
        net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3))
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.2, 3)
        net[1].weight.data.uniform_(-2, 2)
        return net

    net = _built(4, make)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: net.eval()(v), x).reshape(2 * 4 * 4, -1)
    net.train()
    merged = lipschitz_upper_bound(net, (5, 2, 6, 6))
    assert merged == pytest.approx(float(torch.linalg.matrix_norm(jac, ord=2)), rel=1e-8)
    assert merged < 0.95 * lipschitz_upper_bound(net, (5, 2, 6, 6), merge=False)


_ACTIVATIONS = [
    nn.ReLU, nn.Tanh, nn.Sigmoid, lambda: nn.LeakyReLU(0.1), lambda: nn.LeakyReLU(1.7), nn.GELU,
    lambda: nn.GELU(approximate="tanh"), nn.SiLU, lambda: nn.ELU(1.5), nn.SELU, nn.Softplus,
    nn.Hardswish, nn.Hardsigmoid, nn.Softsign,
]  # fmt: skip


@pytest.mark.parametrize("make", _ACTIVATIONS)
def test_activation_constants_match_the_largest_slope(make):
    act = make()
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(act(x).sum(), x)
    constant = lipschitz_upper_bound(act, (1, 4))
    assert float(slope.abs().max()) <= constant <= float(slope.abs().max()) + 1e-3


def _random_net(seed):
    g = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    acts = [nn.ReLU, nn.Tanh, lambda: nn.LeakyReLU(0.3), nn.GELU, nn.SiLU, nn.ELU]
    if seed % 2:
        width = int(torch.randint(3, 12, (1,), generator=g))
        layers = [nn.Linear(5, width), pick(acts)()]
        if seed % 3 == 0:
            layers += [nn.BatchNorm1d(width)]
        layers += [nn.Linear(width, width), pick(acts)(), nn.Dropout(0.3), nn.Linear(width, 4)]
        if seed % 5 == 0:
            layers += [nn.Softmax(dim=1)]
        return _built(seed, lambda: nn.Sequential(*layers)), (4, 5)
    pool = pick([lambda: nn.MaxPool2d(3, 1), lambda: nn.AvgPool2d(2), lambda: nn.MaxPool2d(2)])
    layers = [nn.Conv2d(1, 3, 3, padding=1), pick(acts)(), pool(), nn.Conv2d(3, 2, 2),
              pick(acts)(), nn.Flatten()]  # fmt: skip
    net = nn.Sequential(*layers)
    with torch.no_grad():
        n = net(torch.zeros(1, 1, 7, 7)).shape[1]
    net.append(nn.Linear(n, 3))
    return _built(seed, lambda: net), (4, 1, 7, 7)


@pytest.mark.parametrize("norm", [2, INF])
def test_upper_bound_is_never_below_the_empirical_lower_bound(norm):
    for seed in range(12):
        net, shape = _random_net(seed)
        for module in net.modules():  # random BatchNorm statistics
            if isinstance(module, nn.BatchNorm1d):
                module.running_var.uniform_(0.05, 2.0)
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        lower, upper, _ = lipschitz_interval(net, x, norm=norm, steps=6, dense_limit=64)
        assert 0 < lower <= upper, (seed, net)


def test_max_pool_overlap_bound_holds_on_random_pairs():
    # An overlapping max pool (kernel 3, stride 1: each input in up to 9 windows) has an l2
    # constant <= 3; random secants must stay below, and some must exceed 1.
    pool = nn.MaxPool2d(3, stride=1)
    bound = lipschitz_upper_bound(pool, (1, 1, 6, 6))
    assert bound == pytest.approx(3.0)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 1, 6, 6, generator=g)
    b = a.clone()
    b[:, :, 2:4, 2:4] += 1.0  # a bump inside many windows
    ratio = (pool(a) - pool(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert 1.0 < float(ratio.max()) <= bound


def test_lenet_bound_covers_the_lower_bound_and_leaves_the_model_alone():
    net = _built(5, LeNet5).float()
    net.train()
    x = torch.rand(2, 1, 28, 28)
    snapshot = ModelSnapshot.take(net)
    lower, upper, factors = lipschitz_interval(net, x, steps=2, iterations=200)
    snapshot.assert_unchanged(net)
    assert all(p.grad is None for p in net.parameters())
    assert 0 < lower <= upper
    names = [f.layers for f in factors if f.kind == "linear"]
    assert ("features.pool1", "features.conv2") in names  # pooling merged into the next conv


def test_probes_leave_batchnorm_dropout_net_untouched():
    net = tiny_bn_dropout_net(in_features=6, seed=1)
    net.train()
    x = torch.randn(3, 6, dtype=torch.float64)
    snapshot = ModelSnapshot.take(net)
    lipschitz_upper_bound(net, (2, 6), dense_limit=0, iterations=20)
    lipschitz_lower_bound(net, x, steps=2)
    snapshot.assert_unchanged(net)


class _Square(nn.Module):
    def forward(self, x):
        return x * x


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x)


class _FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_errors_name_the_unsupported_layer_or_structure():
    with pytest.raises(TypeError, match=r"unsupported layer '1' \(_Square\)"):
        lipschitz_upper_bound(nn.Sequential(nn.Linear(4, 4), _Square()), (1, 4))
    with pytest.raises(ValueError, match="not a chain of layers"):
        lipschitz_upper_bound(_Residual(), (1, 4))
    hidden = _FunctionalRelu()
    with pytest.raises(ValueError, match=r"applies 'relu' outside any layer"):
        lipschitz_upper_bound(hidden, (1, 4))
    with torch.no_grad():  # the ReLU now changes no value a probe input reaches: still refused
        hidden.fc1.bias.fill_(100.0)
    with pytest.raises(ValueError, match=r"applies 'relu' outside any layer"):
        lipschitz_upper_bound(hidden, (1, 4))
    with pytest.raises(ValueError, match="discontinuous"):
        lipschitz_upper_bound(
            nn.Sequential(SparsifyingFrontEnd(5, size=4), nn.Flatten()), (1, 4, 4)
        )
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="running statistics"):
        lipschitz_upper_bound(bn, (2, 4))
    with pytest.raises(ValueError, match="norm must be 2 or math.inf"):
        lipschitz_upper_bound(nn.Linear(4, 2), (1, 4), norm=1)
    with pytest.raises(ValueError, match="input_shape"):
        lipschitz_upper_bound(nn.Linear(4, 2), (4,))
    with pytest.raises(ValueError, match="fails on an input of shape"):
        lipschitz_upper_bound(nn.Linear(4, 2), (1, 5))
    with pytest.raises(ValueError, match="x must be a floating"):
        lipschitz_lower_bound(nn.Linear(4, 2), torch.ones(4, dtype=torch.long))


def test_full_front_end_is_the_identity():
    net = _built(6, lambda: nn.Sequential(SparsifyingFrontEnd(16, "haar", size=4), nn.Flatten(),
                                          nn.Linear(16, 3)))  # fmt: skip
    sigma = float(torch.linalg.matrix_norm(net[2].weight.detach(), ord=2))
    assert lipschitz_upper_bound(net, (1, 4, 4)) == pytest.approx(sigma, rel=1e-8)


def test_lower_bound_ascent_finds_a_larger_local_norm_on_a_smooth_net():
    net = _built(7, lambda: nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)))
    with torch.no_grad():
        net[0].bias.fill_(3.0)  # saturated start: small local slopes, larger ones elsewhere
    x = torch.zeros(2, 3, dtype=torch.float64)
    at_start = lipschitz_lower_bound(net, x, steps=0)
    searched = lipschitz_lower_bound(net, x, steps=30, step_size=0.5)
    assert searched > 1.5 * at_start
    assert searched <= lipschitz_upper_bound(net, (1, 3))


def test_pruned_model_after_a_training_step_is_bounded_with_its_masks():
    from torch_dlt.prune import magnitude_prune

    net = _built(8, lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
    magnitude_prune(net, 0.6)
    net(torch.randn(2, 6, dtype=torch.float64)).sum().backward()  # leaves non-leaf weights
    masked = [net[0].weight.detach(), net[2].weight.detach()]
    expected = math.prod(float(torch.linalg.matrix_norm(w, ord=2)) for w in masked)
    assert lipschitz_upper_bound(net, (1, 6)) == pytest.approx(expected, rel=1e-8)
