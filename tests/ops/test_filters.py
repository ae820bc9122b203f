"""Tests of torch_dlt.ops.filter_grid and spectral_signature: kernels against the references,
the references against torchvision's make_grid, Parseval, gratings and a Gaussian's spectrum."""

import math

import pytest
import torch
from torch.testing import assert_close

from torch_dlt import ops
from torch_dlt.ops import _filters_reference as ref
from torch_dlt.ops._filters_fake import has_filter_ops

COMPILED = ops.has_ops() and has_filter_ops()
needs_ops = pytest.mark.skipif(
    not COMPILED, reason="torch_dlt._C (with the filter ops) is not built"
)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.has_cuda_ops() else [])
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-9, "atol": 1e-9}}
GRID_CASES = [  # (shape, nrow, padding, pad_value, normalize, symmetric, channels)
    ((7, 3, 5, 5), 4, 1, 0.3, "filter", False, "rgb"),
    ((7, 3, 5, 5), 2, 2, 1.0, "global", True, "rgb"),
    ((5, 4, 3, 4), 4, 1, 0.0, "filter", True, "tiles"),
    ((5, 4, 3, 4), 3, 0, 0.0, "global", False, "tiles"),
    ((6, 2, 5, 3), 5, 1, -1.0, "filter", False, "mean"),
    ((6, 1, 7, 7), 8, 3, 0.5, "none", False, "tiles"),
]
SPECTRAL_CASES = [((9, 3, 5, 5), 8, 6, 16), ((4, 2, 7, 4), 4, 3, 17), ((3, 1, 3, 3), 6, 5, 32)]


def _weight(shape, dtype=torch.float64, device="cpu", contiguous=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    if not contiguous:
        w = w.transpose(2, 3).contiguous().transpose(2, 3)
        assert not w.is_contiguous()
    return w


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_filter_grid_kernel_matches_reference(device, dtype, contiguous):
    for shape, *args in GRID_CASES:
        w = _weight(shape, dtype, device, contiguous)
        got = torch.ops.torch_dlt.filter_grid(w, *args)
        want = ref.filter_grid(w.double(), *args)
        assert got.dtype == dtype and got.device == w.device
        assert_close(got.double(), want, **TOL[dtype], msg=lambda m, a=args: f"{a}: {m}")


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_spectral_signature_kernel_matches_reference(device, dtype, contiguous):
    for shape, n_orient, n_freq, n in SPECTRAL_CASES:
        w = _weight(shape, dtype, device, contiguous, seed=1)
        bins = ref.spectral_bins(n, n_orient, n_freq).to(device)
        got = torch.ops.torch_dlt.spectral_signature(w, bins, n_orient, n_freq, n)
        want = ref.spectral_signature(w.double(), bins, n_orient, n_freq, n)
        for name, g, r in zip(ref.SpectralSignature._fields, got, want):
            assert g.dtype == dtype and g.device == w.device
            assert_close(g.double(), r, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


@needs_ops
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    w = _weight((5, 3, 4, 4), torch.float64, device).requires_grad_()
    args = (4, 2, 0.5, "global", True, "tiles")
    # The AOT trace of a backward is the slow part: once (spectral_signature) is enough; the
    # gradient of filter_grid is checked numerically in test_gradcheck.
    torch.library.opcheck(torch.ops.torch_dlt.filter_grid.default, (w.detach(), *args))
    torch.library.opcheck(
        torch.ops.torch_dlt.filter_grid.default,
        (w, *args),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    bins = ref.spectral_bins(8, 4, 3).to(device)
    torch.library.opcheck(torch.ops.torch_dlt.spectral_signature.default, (w, bins, 4, 3, 8))


def test_gradcheck():
    w = _weight((3, 2, 4, 3)).requires_grad_()
    for normalize, symmetric in [("filter", False), ("global", True), ("none", False)]:
        assert torch.autograd.gradcheck(
            lambda t, n=normalize, s=symmetric: ops.filter_grid(t, normalize=n, symmetric=s), (w,)
        )
    assert torch.autograd.gradcheck(
        lambda t: tuple(ops.spectral_signature(t, n_orient=4, n_freq=3, fft_size=8)[::3]), (w,)
    )


def test_torch_compile_fullgraph():
    def picture_and_spectrum(w):
        sig = ops.spectral_signature(w, n_orient=4, n_freq=4, fft_size=16)
        return ops.filter_grid(w, nrow=4).sum() + sig.power.sum() + sig.bandwidth.sum()

    compiled = torch.compile(picture_and_spectrum, fullgraph=True, backend="eager")
    w = _weight((6, 1, 5, 5), torch.float32)
    assert_close(compiled(w), picture_and_spectrum(w), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "shape,scale_each", [((10, 3, 5, 5), True), ((7, 1, 6, 4), True), ((10, 3, 5, 5), False)]
)
def test_filter_grid_equals_torchvision_make_grid(shape, scale_each):
    utils = pytest.importorskip("torchvision.utils")
    w = _weight(shape, torch.float32, seed=3)
    want = utils.make_grid(
        w, nrow=4, padding=2, normalize=True, scale_each=scale_each, pad_value=0.25
    )
    got = ops.filter_grid(
        w, nrow=4, padding=2, pad_value=0.25, normalize="filter" if scale_each else "global"
    )
    # make_grid repeats a grey image into 3 channels.
    assert_close(got, want[: got.shape[0]], rtol=1e-5, atol=1e-6)


def test_filter_grid_symmetric_and_mean_by_loop():
    w = _weight((4, 2, 3, 3), seed=4)
    grid = ops.filter_grid(w, nrow=2, padding=1, symmetric=True, channels="mean")
    for o in range(4):
        tile = w[o].mean(0)
        want = 0.5 + tile / (2 * tile.abs().max())
        top, left = 1 + (o // 2) * 4, 1 + (o % 2) * 4
        assert_close(grid[0, top : top + 3, left : left + 3], want)
    assert float(grid[0, 0].max()) == 0.0 == float(grid[0, :, 4].abs().max())  # padding


def test_filter_grid_tiles_one_row_per_filter_and_constant_filter_is_grey():
    w = _weight((3, 4, 2, 2), seed=5)
    w[1] = 7.0
    grid = ops.filter_grid(w, padding=0)
    assert grid.shape == (1, 3 * 2, 4 * 2)
    assert float((grid[0, 2:4] - 0.5).abs().max()) == 0.0
    lo, hi = w[2].min(), w[2].max()
    assert_close(grid[0, 4:6, 2:4], (w[2, 1] - lo) / (hi - lo))


def _grating(n, ky, kx, size=None, phase=0.3):
    size = size or n
    y, x = torch.meshgrid(
        torch.arange(size, dtype=torch.float64),
        torch.arange(size, dtype=torch.float64),
        indexing="ij",
    )
    return torch.cos(2 * math.pi * (kx * x + ky * y) / n + phase)


@pytest.mark.parametrize("ky,kx", [(0, 5), (3, 4), (7, -2), (6, 0), (-5, 5)])
def test_grating_has_its_orientation_and_frequency(ky, kx):
    n = 32
    fy, fx = ky / n, kx / n
    angle, freq = math.atan2(fy, fx) % math.pi, math.hypot(fx, fy)
    # A whole number of periods over the DFT window: all power in +-(kx, ky).
    w = _grating(n, ky, kx).reshape(1, 1, n, n)
    sig = ops.spectral_signature(w, n_orient=8, n_freq=8, fft_size=n)
    assert abs(float(sig.orientation[0]) - angle) < 1e-9
    assert abs(float(sig.frequency[0]) - freq) < 1e-9
    assert float(sig.bandwidth[0]) < 1e-6
    cell = (round(angle / (math.pi / 8)) % 8, min(int(freq / (0.5 / 8)), 7))
    assert_close(sig.power[0, cell[0], cell[1]], sig.power.sum(), rtol=1e-9, atol=0)
    # A 9x9 crop of the same grating, zero-padded: the peak stays within one DFT bin.
    crop = _grating(n, ky, kx, size=9).reshape(1, 1, 9, 9).repeat(1, 2, 1, 1)
    sig = ops.spectral_signature(crop, fft_size=64)
    peak = torch.tensor([math.cos(float(sig.orientation[0])), math.sin(float(sig.orientation[0]))])
    peak = peak * float(sig.frequency[0])
    true = torch.tensor([fx, fy])
    assert min(float((peak - true).norm()), float((peak + true).norm())) <= 1.5 / 64


def test_binned_power_obeys_parseval():
    w = _weight((5, 3, 6, 5), seed=6)
    n = 20
    sig = ops.spectral_signature(w, n_orient=5, n_freq=4, fft_size=n)
    dc = w.sum((2, 3)).square().sum(1)
    assert_close(sig.power.sum((1, 2)), n * n * w.square().sum((1, 2, 3)) - dc)


def test_gaussian_bandwidth_is_rayleigh_spread():
    # |FT|^2 of exp(-|x|^2 / 2 s^2) is a Gaussian of per-axis std 1 / (2 sqrt(2) pi s) in f,
    # so |f| is Rayleigh-distributed with std  sqrt((4 - pi) / 2) / (2 sqrt(2) pi s).
    s = 2.0
    t = torch.arange(-10, 11, dtype=torch.float64)
    g = torch.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * s * s)).reshape(1, 1, 21, 21)
    sig = ops.spectral_signature(g, fft_size=128)
    want = math.sqrt((4 - math.pi) / 2) / (2 * math.sqrt(2) * math.pi * s)
    assert abs(float(sig.bandwidth[0]) / want - 1) < 0.02
    # Isotropic on a square lattice: a quarter turn (4 of the 8 orientation bins) and the
    # reflection f_y -> -f_y leave the binned power unchanged.
    per_orient = sig.power[0].sum(1)
    assert_close(per_orient, per_orient.roll(4), rtol=1e-9, atol=0)
    assert_close(per_orient[1:4], per_orient[5:8].flip(0), rtol=1e-9, atol=0)


def test_spectral_bins_by_brute_force():
    for n, n_orient, n_freq in [(16, 8, 4), (15, 6, 5), (32, 2, 8)]:
        bins = ref.spectral_bins(n, n_orient, n_freq)
        for ky in range(n):
            for kx in range(n):
                fy = (ky if ky < (n + 1) // 2 else ky - n) / n
                fx = (kx if kx < (n + 1) // 2 else kx - n) / n
                if fx == fy == 0:
                    assert bins[ky, kx] == -1
                    continue
                a = (math.atan2(fy, fx) % math.pi) / (math.pi / n_orient) + 0.5
                r = math.hypot(fx, fy) / (0.5 / n_freq)
                orient, radial = divmod(int(bins[ky, kx]), n_freq)
                # On an edge either neighbour is right; elsewhere the bin is the floor.
                assert orient in {math.floor(a + 1e-9) % n_orient, math.floor(a - 1e-9) % n_orient}
                assert radial in {
                    min(math.floor(r + 1e-9), n_freq - 1),
                    min(math.floor(r - 1e-9), n_freq - 1),
                }


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: ops.filter_grid(torch.ones(3, 5, 5)), ValueError, r"\[O, I, kh, kw\]"),
        (lambda: ops.filter_grid([1.0]), TypeError, "must be a Tensor"),
        (lambda: ops.filter_grid(torch.ones(2, 2, 3, 3, dtype=torch.int64)), TypeError, "float32"),
        (lambda: ops.filter_grid(torch.ones(2, 2, 3, 3), channels="rgb"), ValueError, "3 input"),
        (lambda: ops.filter_grid(torch.ones(2, 1, 3, 3), normalize="x"), ValueError, "normalize"),
        (lambda: ops.filter_grid(torch.ones(2, 1, 3, 3), nrow=0), ValueError, "nrow"),
        (lambda: ops.filter_grid(torch.ones(2, 1, 3, 3), padding=-1), ValueError, "padding"),
        (lambda: ops.spectral_signature(torch.ones(2, 1, 9, 9), fft_size=8), ValueError, ">= 9"),
        (lambda: ops.spectral_signature(torch.ones(2, 1, 3, 3), n_orient=0), ValueError, "n_ori"),
    ],
)
def test_bad_input_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_wrappers_use_the_compiled_op_when_built(monkeypatch):
    calls = []
    real = ref.filter_grid
    monkeypatch.setattr(ref, "filter_grid", lambda *a: calls.append(a) or real(*a))
    ops.filter_grid(_weight((2, 1, 3, 3)))
    assert bool(calls) == (not COMPILED)


def test_half_precision_is_upcast():
    w = _weight((4, 3, 3, 3), torch.float32, seed=7)
    got = ops.spectral_signature(w.half())
    assert got.power.dtype == torch.float32
    assert_close(got.power, ops.spectral_signature(w.half().float()).power)
