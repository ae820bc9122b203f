"""Tests of torch_dlt/nn/scattering.py: the Morlet filter bank, scattering2d / Scattering2D and
ScatteringNet, against kymatio 0.3, closed-form Fourier transforms and brute-force loops."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from torch_dlt.nn import (
    Scattering2D,
    ScatteringNet,
    morlet_filter_bank,
    scattering2d,
    scattering_channels,
    scattering_padded_shape,
)
from torch_dlt.nn import scattering as scattering_module
from torch_dlt.testing import devices, seeded

# kymatio 0.3 normalises its atoms with 3.1415 for pi; the closed forms below follow it.
_PI_KYMATIO = 3.1415


def _kymatio(J, shape, L, max_order, pre_pad=False):
    kymatio = pytest.importorskip("kymatio")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kymatio.Scattering2D(
            J, shape, L=L, max_order=max_order, pre_pad=pre_pad, frontend="torch"
        )


@pytest.mark.parametrize(
    "J, L, shape, max_order, lead",
    [
        (2, 8, (28, 28), 2, (2, 1)),
        (3, 4, (32, 32), 2, (2,)),
        (1, 6, (8, 8), 2, (3,)),
        (3, 6, (20, 36), 1, (2,)),
        (2, 3, (9, 13), 2, (2, 2)),
        (3, 2, (8, 8), 2, (2,)),  # padding as wide as the image
        (2, 1, (16, 16), 2, (2,)),
    ],
)
def test_matches_kymatio(J, L, shape, max_order, lead):
    x = torch.rand(*lead, *shape, generator=seeded(J * 10 + L))
    expected = _kymatio(J, shape, L, max_order)(x)
    got = Scattering2D(J, shape, L=L, max_order=max_order)(x)
    assert got.shape == expected.shape
    assert got.shape[-3] == scattering_channels(J, L, max_order)
    scale = expected.abs().max()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)


def test_pre_pad_matches_kymatio_and_numpy_reflection():
    J, L, shape = 2, 4, (12, 10)
    padded = scattering_padded_shape(shape, J)
    image = torch.rand(3, *shape, generator=seeded(1), dtype=torch.float64)
    top, left = (padded[0] - shape[0]) // 2, (padded[1] - shape[1]) // 2
    widths = ((0, 0), (top, padded[0] - shape[0] - top), (left, padded[1] - shape[1] - left))
    x_padded = torch.from_numpy(np.pad(image.numpy(), widths, mode="reflect"))
    layer = Scattering2D(J, shape, L=L, pre_pad=True).double()
    got = layer(x_padded)
    torch.testing.assert_close(got, Scattering2D(J, shape, L=L).double()(image))
    expected = _kymatio(J, shape, L, 2, pre_pad=True)(x_padded.float())
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def _aliased_gaussian_spectrum(omega, sigma, theta, xi, slant, aliases=3):
    """Sum over n of the closed-form Fourier transform of the normalised Gabor atom at
    omega + 2 pi n (Poisson summation: the DFT of the sampled, periodised atom)."""
    c, s = math.cos(theta), math.sin(theta)
    rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    inverse_shape = (
        rotation @ torch.diag(torch.tensor([1.0, 1 / slant**2], dtype=torch.float64)) @ rotation.T
    )
    centre = torch.tensor([xi * c, xi * s], dtype=torch.float64)
    total = torch.zeros(omega.shape[:-1], dtype=torch.float64)
    for n1 in range(-aliases, aliases + 1):
        for n2 in range(-aliases, aliases + 1):
            d = omega + 2 * math.pi * torch.tensor([n1, n2], dtype=torch.float64) - centre
            quad = torch.einsum("...i,ij,...j->...", d, inverse_shape, d)
            total += math.pi / _PI_KYMATIO * torch.exp(-(sigma**2) / 2 * quad)
    return total


def _frequency_grid(m, n):
    k1 = torch.fft.fftfreq(m, dtype=torch.float64) * 2 * math.pi
    k2 = torch.fft.fftfreq(n, dtype=torch.float64) * 2 * math.pi
    return torch.stack(torch.meshgrid(k1, k2, indexing="ij"), dim=-1)


def _closed_form_bank(m, n, J, L):
    omega = _frequency_grid(m, n)
    zero = torch.zeros(1, 2, dtype=torch.float64)
    psi = torch.empty(J, L, m, n, dtype=torch.float64)
    for j in range(J):
        sigma, xi = 0.8 * 2**j, 3 * math.pi / 4 / 2**j
        for t in range(L):
            theta = (int(L / 2 - 1) - t) * math.pi / L
            wave = _aliased_gaussian_spectrum(omega, sigma, theta, xi, 4 / L)
            envelope = _aliased_gaussian_spectrum(omega, sigma, theta, 0.0, 4 / L)
            kappa = (
                _aliased_gaussian_spectrum(zero, sigma, theta, xi, 4 / L)
                / _aliased_gaussian_spectrum(zero, sigma, theta, 0.0, 4 / L)
            ).item()
            psi[j, t] = wave - kappa * envelope
    phi = _aliased_gaussian_spectrum(omega, 0.8 * 2 ** (J - 1), 0.0, 0.0, 1.0)
    return psi, phi


@pytest.mark.parametrize("J, L, shape", [(2, 8, (32, 24)), (3, 6, (48, 48))])
def test_fourier_filters_equal_closed_form_transforms(J, L, shape):
    bank = morlet_filter_bank(shape, J, L, dtype=torch.float64)
    psi, phi = _closed_form_bank(*shape, J, L)
    torch.testing.assert_close(bank.fourier.psi[0], psi, rtol=0, atol=1e-9)
    torch.testing.assert_close(bank.fourier.phi[0], phi, rtol=0, atol=1e-9)
    # The spatial atoms are what the spectra are the DFTs of; wavelets have zero mean.
    torch.testing.assert_close(torch.fft.fft2(bank.psi).real, psi, rtol=0, atol=1e-9)
    assert bank.psi.sum(dim=(-2, -1)).abs().max() < 1e-10


def _littlewood_paley(psi, phi):
    """|phi(w)|^2 + 1/2 sum |psi(w)|^2 + |psi(-w)|^2: the wavelet transform of a real signal."""
    mirrored = torch.roll(torch.flip(psi, (-2, -1)), (1, 1), (-2, -1))
    return phi**2 + 0.5 * (psi**2 + mirrored**2).sum(dim=(0, 1))


def test_littlewood_paley_frame_bounds():
    J, L, shape = 3, 8, (32, 32)
    # Frame bounds of the continuous design, from the closed forms on a 3x finer frequency grid.
    fine_psi, fine_phi = _closed_form_bank(3 * shape[0], 3 * shape[1], J, L)
    fine = _littlewood_paley(fine_psi, fine_phi)
    lower, upper = fine.min().item(), fine.max().item()
    assert lower > 0  # a frame: the transform is invertible (Mallat 2012, Sec. 2.2)
    bank = morlet_filter_bank(shape, J, L, dtype=torch.float64)
    lp = _littlewood_paley(bank.fourier.psi[0], bank.fourier.phi[0])
    assert lower - 1e-9 <= lp.min() and lp.max() <= upper + 1e-9
    # Hence the frame inequality on real signals (|x_hat(w)| = |x_hat(-w)|, Parseval).
    x = torch.rand(4, *shape, generator=seeded(2), dtype=torch.float64)
    x_hat = torch.fft.fft2(x)
    energy = torch.fft.ifft2(x_hat * bank.fourier.phi[0]).abs().square().sum(dim=(-2, -1))
    for psi in bank.fourier.psi[0].flatten(0, 1):
        energy = energy + torch.fft.ifft2(x_hat * psi).abs().square().sum(dim=(-2, -1))
    assert torch.all(energy >= lower * x.square().sum(dim=(-2, -1)) - 1e-9)
    assert torch.all(energy <= upper * x.square().sum(dim=(-2, -1)) + 1e-9)


def test_periodised_filters_fold_the_kept_band():
    """Level r keeps the frequencies |k| < M / 2^(r+1) and folds them onto the coarse grid: the
    coarse filter at coarse frequency q equals the fine filter at the representative of q."""
    J, L, (m, n) = 3, 4, (48, 40)
    bank = morlet_filter_bank((m, n), J, L, dtype=torch.float64)
    for r in range(1, J):
        k = 2**r
        coarse_rows = torch.fft.fftfreq(m // k) * (m // k)  # signed coarse frequencies
        coarse_cols = torch.fft.fftfreq(n // k) * (n // k)
        fine_rows = (coarse_rows.long()) % m
        fine_cols = (coarse_cols.long()) % n
        expected = bank.fourier.phi[0][fine_rows[:, None], fine_cols[None, :]]
        torch.testing.assert_close(bank.fourier.phi[r], expected, rtol=0, atol=1e-12)
        if r < len(bank.fourier.psi):
            expected = bank.fourier.psi[0][..., fine_rows[:, None], fine_cols[None, :]]
            torch.testing.assert_close(bank.fourier.psi[r], expected, rtol=0, atol=1e-12)


def _eight_image(size=32):
    """A figure eight of two one-pixel-wide rings: sharp edges, so shifts move pixel energy."""
    u = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    upper = (((u[:, None] - 3) ** 2 + u[None, :] ** 2).sqrt() - 4).abs() < 1
    lower = (((u[:, None] + 4) ** 2 + u[None, :] ** 2).sqrt() - 3).abs() < 1
    return (upper | lower).double()


def test_translation_stability():
    """Mallat (2012, Thm. 2.10): ||S_J x(. - c) - S_J x|| <= C 2^-J |c| ||x||, linear in |c| / 2^J,
    while a one-pixel shift of a line drawing moves more than half of its pixel energy."""
    image = _eight_image()

    layers = {J: Scattering2D(J, tuple(image.shape), L=4).double() for J in (3, 4)}

    def change(J: int, shift: int) -> float:
        layer = layers[J]
        moved = torch.roll(image, shifts=(shift, shift), dims=(0, 1))
        s = layer(image)
        return ((layer(moved) - s).norm() / s.norm()).item()

    moved = torch.roll(image, shifts=(1, 1), dims=(0, 1))
    pixel_change = ((moved - image).norm() / image.norm()).item()
    assert pixel_change > 0.5
    assert change(4, 1) < 0.25 * pixel_change
    # Halving |c| / 2^J halves the change, whether J grows or the shift shrinks.
    assert 1.5 < change(3, 1) / change(4, 1) < 2.5
    assert 1.5 < change(4, 2) / change(4, 1) < 2.5


def test_gradcheck_float64():
    layer = Scattering2D(2, (8, 8), L=2).double()
    x = torch.rand(2, 8, 8, generator=seeded(3), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-6)


def test_gradcheck_float64_subsampling_by_four():
    # J = 3: the second-order paths from j1 = 0 to j2 = 2 sum 4 x 4 aliases (the batched-GEMM
    # path), the others 1 or 2 x 2 (the multiply-add path with its own backward).
    layer = Scattering2D(3, (8, 8), L=1).double()
    x = torch.rand(1, 8, 8, generator=seeded(13), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-6)


def test_gradgradcheck_float64():
    # Second derivatives (e.g. an input-gradient penalty) go through the hand-written backwards.
    layer = Scattering2D(2, (4, 4), L=1).double()
    x = torch.rand(1, 4, 4, generator=seeded(19), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(layer, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("J, L, shape", [(2, 4, (12, 12)), (3, 2, (16, 16))])
def test_gradient_matches_kymatio(J, L, shape):
    x = torch.rand(2, *shape, generator=seeded(J + L))
    expected_out = _kymatio(J, shape, L, 2)(x)
    weights = torch.randn(expected_out.shape, generator=seeded(17))
    x_ours, x_peer = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (Scattering2D(J, shape, L=L)(x_ours) * weights).sum().backward()
    (_kymatio(J, shape, L, 2)(x_peer) * weights).sum().backward()
    scale = x_peer.grad.abs().max()
    torch.testing.assert_close(x_ours.grad, x_peer.grad, rtol=1e-4, atol=1e-5 * scale)


def test_gradcheck_with_respect_to_the_wavelets():
    bank = morlet_filter_bank(scattering_padded_shape((4, 4), 1), 1, 2, dtype=torch.float64)
    x = torch.rand(2, 4, 4, generator=seeded(21), dtype=torch.float64)

    def first_order(psi):
        return scattering2d(x, bank.fourier._replace(psi=(psi,)), max_order=1)

    psi = bank.fourier.psi[0].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(first_order, (psi,), eps=1e-6, atol=1e-6)
    # The same values as the path without gradient for the wavelets.
    torch.testing.assert_close(first_order(psi), first_order(psi.detach()))


def test_public_fft_fallback_gives_the_same_values_and_gradients(monkeypatch):
    # Without the two-sided real-to-complex op, the transform runs on torch.fft.fft2.
    layer = Scattering2D(2, (8, 8), L=2).double()
    x = torch.rand(2, 8, 8, generator=seeded(23), dtype=torch.float64, requires_grad=True)
    out = layer(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    monkeypatch.setattr(scattering_module, "_HAS_R2C", False)
    out_public = layer(x)
    (grad_public,) = torch.autograd.grad(out_public.square().sum(), x)
    torch.testing.assert_close(out_public, out, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_public, grad, rtol=1e-10, atol=1e-12)


def test_gradient_finite_at_zero_modulus():
    layer = Scattering2D(2, (8, 8), L=4)
    x = torch.zeros(1, 8, 8, requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("chunk_bytes", [1, 2**40])
def test_leading_dimensions_equal_per_image_loop(monkeypatch, chunk_bytes):
    # One image per CPU chunk, and all of them in one chunk.
    monkeypatch.setattr(scattering_module, "_CPU_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(scattering_module, "_CPU_CHUNK_MIN_IMAGES", 1)
    layer = Scattering2D(2, (12, 12), L=4).double()
    x = torch.rand(2, 3, 12, 12, generator=seeded(4), dtype=torch.float64)
    batched = layer(x)
    assert batched.shape == (2, 3, scattering_channels(2, 4), 3, 3)
    for i in range(2):
        for c in range(3):
            torch.testing.assert_close(batched[i, c], layer(x[i, c]), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "J, L, shape, max_order, lead", [(2, 3, (12, 12), 2, (2, 1)), (3, 2, (16, 16), 1, (2,))]
)
def test_list_output_matches_kymatio(J, L, shape, max_order, lead):
    x = torch.rand(*lead, *shape, generator=seeded(J * 7 + L))
    kymatio = pytest.importorskip("kymatio")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = kymatio.Scattering2D(
            J, shape, L=L, max_order=max_order, frontend="torch", out_type="list"
        )
    expected = peer(x)
    got = Scattering2D(J, shape, L=L, max_order=max_order, out_type="list")(x)
    assert len(got) == len(expected) == scattering_channels(J, L, max_order)
    for ours, theirs in zip(got, expected):
        assert set(ours) == set(theirs) == {"coef", "j", "n", "theta"}
        assert (ours["j"], ours["n"], ours["theta"]) == (theirs["j"], theirs["n"], theirs["theta"])
        assert ours["coef"].shape == theirs["coef"].shape == (*lead, *got[0]["coef"].shape[-2:])
        scale = theirs["coef"].abs().max()
        torch.testing.assert_close(ours["coef"], theirs["coef"], rtol=1e-5, atol=1e-5 * scale)


def test_list_output_is_the_array_split_by_path():
    J, L, shape = 2, 2, (8, 8)
    x = torch.rand(3, *shape, generator=seeded(8))
    array = Scattering2D(J, shape, L=L)(x)
    bank = morlet_filter_bank(scattering_padded_shape(shape, J), J, L)
    paths = scattering2d(x, bank.fourier, out_type="list")
    # Brute force: enumerate kymatio's path order (order 0; (j1, t1); (j1, t1, j2 > j1, t2)).
    order = [((), ())] + [((j,), (t,)) for j in range(J) for t in range(L)]
    order += [((0, 1), (t1, t2)) for t1 in range(L) for t2 in range(L)]
    assert [(p["j"], p["theta"]) for p in paths] == order
    assert [p["n"] for p in paths][1 + J * L] == (0, L)
    for channel, path in enumerate(paths):
        torch.testing.assert_close(path["coef"], array[:, channel], rtol=0, atol=0)
    assert "out_type='list'" in repr(Scattering2D(J, shape, L=L, out_type="list"))


@pytest.mark.parametrize("out_type", ["tensor", None, "ARRAY"])
def test_bad_out_type(out_type):
    with pytest.raises(
        ValueError, match=r"Scattering2D: out_type must be one of \('array', 'list'\)"
    ):
        Scattering2D(2, (8, 8), out_type=out_type)
    bank = morlet_filter_bank(scattering_padded_shape((8, 8), 2), 2, 2)
    with pytest.raises(ValueError, match=r"scattering2d: out_type must be one of"):
        scattering2d(torch.rand(8, 8), bank.fourier, out_type=out_type)


def test_functional_equals_module_and_extra_repr():
    layer = Scattering2D(2, (16, 16), L=4, max_order=1)
    bank = morlet_filter_bank(scattering_padded_shape((16, 16), 2), 2, 4)
    x = torch.rand(3, 16, 16, generator=seeded(5))
    torch.testing.assert_close(scattering2d(x, bank.fourier, max_order=1), layer(x))
    assert "J=2" in repr(layer) and "max_order=1" in repr(layer)


def test_state_dict_dtype_and_device_moves():
    layer = Scattering2D(2, (16, 16), L=4)
    state = layer.state_dict()
    assert set(state) == {"phi_0", "phi_1", "psi_0"}
    clone = Scattering2D(2, (16, 16), L=4)
    clone.load_state_dict(state)
    x = torch.rand(2, 16, 16, generator=seeded(6))
    expected = layer(x)
    torch.testing.assert_close(clone(x), expected)
    as_double = layer.double()(x.double())
    assert as_double.dtype == torch.float64
    torch.testing.assert_close(as_double.float(), expected, rtol=1e-5, atol=1e-6)
    assert list(layer.parameters()) == []
    for device in devices()[1:]:
        moved = Scattering2D(2, (16, 16), L=4).to(device)
        torch.testing.assert_close(moved(x.to(device)).cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Scattering2D(5, (16, 16)), r"J=5.*2\*\*J = 32.*\(16, 16\)"),
        (lambda: Scattering2D(3, (16, 7)), r"J=3"),
        (lambda: Scattering2D(0, (16, 16)), "J must be an int >= 1"),
        (lambda: Scattering2D(2, (16, 16), L=0), "L must be an int >= 1"),
        (lambda: Scattering2D(2, (16, 16), max_order=3), "max_order must be 1 or 2"),
        (lambda: Scattering2D(2, (16,)), "shape must be two positive ints"),
        (lambda: morlet_filter_bank((20, 20), 3), "multiples of 2\\*\\*J = 8"),
        (lambda: ScatteringNet(2, (8, 8), normalization="l2"), "normalization must be one of"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs():
    layer = Scattering2D(2, (16, 16), L=4)
    with pytest.raises(ValueError, match=r"expects input \[\.\.\., 16, 16\], got \[2, 12, 12\]"):
        layer(torch.rand(2, 12, 12))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., M, N\]"):
        layer(torch.rand(16))
    with pytest.raises(TypeError, match="real float32 or float64"):
        layer(torch.rand(16, 16, dtype=torch.complex64))
    with pytest.raises(TypeError, match="real float32 or float64"):
        layer(torch.ones(16, 16, dtype=torch.int64))
    bank = morlet_filter_bank(scattering_padded_shape((16, 16), 2), 2, 4)
    with pytest.raises(ValueError, match=r"pads to \(20, 20\).*padded grid \(24, 24\)"):
        scattering2d(torch.rand(2, 13, 13), bank.fourier)
    with pytest.raises(TypeError, match="ScatteringFilters"):
        scattering2d(torch.rand(2, 16, 16), bank)
    with pytest.raises(ValueError, match=r"pre_pad=True x must be \[\.\.\., 24, 24\]"):
        scattering2d(torch.rand(2, 16, 16), bank.fourier, pre_pad=True)


def test_scattering_net_features_and_trainable_head():
    torch.manual_seed(0)
    net = ScatteringNet(2, (8, 8), L=4, hidden=16, normalization="log+batchnorm").eval()
    x = torch.rand(5, 1, 8, 8, generator=seeded(7))
    s = Scattering2D(2, (8, 8), L=4)(x).flatten(1, 2)
    bn = net.norm
    expected = (torch.log(s.clamp_min(0) + net.log_eps) - bn.running_mean[:, None, None]) / (
        torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    ) * bn.weight[:, None, None] + bn.bias[:, None, None]
    torch.testing.assert_close(net.features(x), expected, rtol=1e-5, atol=1e-5)
    assert net(x).shape == (5, 10)
    trainable = {name for name, _ in net.named_parameters()}
    assert trainable == {
        "norm.weight",
        "norm.bias",
        "classifier.0.weight",
        "classifier.0.bias",
        "classifier.2.weight",
        "classifier.2.bias",
    }
    with pytest.raises(ValueError, match=r"x must be \[B, 1, 8, 8\]"):
        net(torch.rand(5, 3, 8, 8))


def test_scattering_net_linear_head_learns_digits():
    from torch_dlt.data import digits

    split = digits(size=8, test_fraction=0.3, seed=0)
    torch.manual_seed(0)
    net = ScatteringNet(1, (8, 8), L=8, normalization="batchnorm")
    filters = {name: b.clone() for name, b in net.scattering.named_buffers()}
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    with torch.no_grad():
        s_train = net.scattering(split.x_train)  # the fixed front, computed once
    for _ in range(60):
        optimiser.zero_grad()
        nn.functional.cross_entropy(net.classify(s_train), split.y_train).backward()
        optimiser.step()
    net.eval()
    accuracy = (net(split.x_test).argmax(1) == split.y_test).float().mean()
    # Chance is 0.1; a linear head on a J=1 scattering separates the digits.
    assert accuracy > 0.85
    for name, buffer in net.scattering.named_buffers():
        assert torch.equal(buffer, filters[name]), name
