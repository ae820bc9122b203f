"""Tests of torch_dlt.vis.filters: wavelet-likeness against brute force and known atoms,
show_filters against filter_grid."""

import math

import matplotlib
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from torch_dlt import ops
from torch_dlt.nn import LeNet5
from torch_dlt.vis import first_conv, gabor_atom, show_filters, wavelet_likeness

matplotlib.use("Agg")


def test_exact_atom_scores_one_and_is_recovered():
    k = 7
    sigma = float(torch.logspace(math.log10(0.5), math.log10(k / 2), 6)[3])  # a default scale
    theta, psi, f = 3 * math.pi / 16, 2 * math.pi / 8, 0.25  # on the default grids
    atom = gabor_atom(k, sigma, f, theta, psi, aspect=0.5)
    # Three channels, each a multiple of the atom: still fully explained.
    w = torch.stack([torch.stack([2.0 * atom, -0.5 * atom, 0.0 * atom])])
    got = wavelet_likeness(w)
    assert abs(float(got.score[0]) - 1.0) < 1e-9
    assert_close(got.sigma[0], torch.tensor(sigma, dtype=torch.float64))
    assert float(got.frequency[0]) == f and float(got.aspect[0]) == 0.5
    assert abs(float(got.orientation[0]) - theta) < 1e-12
    assert abs(float(got.phase[0]) - psi) < 1e-12


def test_random_filters_score_clearly_below_gabor_filters():
    g = torch.Generator().manual_seed(0)
    random = torch.randn(64, 1, 5, 5, generator=g, dtype=torch.float64)
    # Gabor filters with parameters off every grid of the dictionary.
    params = torch.rand(64, 4, generator=g, dtype=torch.float64)
    gabors = torch.stack(
        [
            gabor_atom(5, 0.8 + 1.5 * p[0], 0.05 + 0.4 * p[1], math.pi * p[2], 2 * math.pi * p[3])[
                None
            ]
            for p in params.tolist()
        ]
    )
    s_random = wavelet_likeness(random).score
    s_gabor = wavelet_likeness(gabors).score
    assert float(s_gabor.min()) > 0.9
    assert float(s_random.mean()) < 0.7
    assert float(s_random.max()) < float(s_gabor.median())


def test_score_is_the_brute_force_best_correlation():
    w = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scales, freqs = [1.0, 2.0], [0.0, 0.2]
    got = wavelet_likeness(
        w, scales=scales, frequencies=freqs, n_orient=3, n_phase=2, aspects=[1.0, 0.6]
    )
    for o in range(3):
        best = 0.0
        for sigma in scales:
            for f in freqs:
                for t in range(3):
                    for p in range(2):
                        for a in (1.0, 0.6):
                            atom = gabor_atom(6, sigma, f, math.pi * t / 3, math.pi * p / 2, a)
                            corr = (w[o, 0] * atom).sum() / (w[o, 0].norm() * atom.norm())
                            best = max(best, abs(float(corr)))
        assert abs(float(got.score[o]) - best) < 1e-12


def test_gabor_atom_matches_spectral_signature_conventions():
    theta, f = 2 * math.pi / 8, 0.25
    atom = gabor_atom(15, 3.0, f, theta).reshape(1, 1, 15, 15)
    sig = ops.spectral_signature(atom, fft_size=64)
    assert abs(float(sig.orientation[0]) - theta) < 2 * math.pi / 64 / f
    assert abs(float(sig.frequency[0]) - f) <= 1.5 / 64


def test_show_filters_draws_the_filter_grid():
    net = LeNet5(in_channels=3, input_size=32)
    ax = show_filters(net, nrow=3)
    image = ax.get_images()[0].get_array()
    want = ops.filter_grid(net.features.conv1.weight.detach(), nrow=3, pad_value=1.0)
    assert_close(torch.as_tensor(image.data).float(), want.permute(1, 2, 0))
    assert ax.get_title() == "features.conv1 [6, 3, 5, 5]"
    assert first_conv(net)[1] is net.features.conv1


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: show_filters(nn.Linear(3, 2)), ValueError, "no nn.Conv2d"),
        (lambda: show_filters("conv"), TypeError, "expected an nn.Conv2d"),
        (lambda: wavelet_likeness(torch.ones(3, 5, 5)), ValueError, r"\[O, I, kh, kw\]"),
        (lambda: wavelet_likeness(torch.ones(1, 1, 3, 3), frequencies=[0.7]), ValueError, "0.5"),
        (lambda: wavelet_likeness(torch.ones(1, 1, 3, 3), aspects=[0.0]), ValueError, "aspects"),
    ],
)
def test_bad_input_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
