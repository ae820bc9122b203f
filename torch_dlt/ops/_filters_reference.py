"""Pure-PyTorch references of the filter-visualisation ops ``filter_grid`` and
``spectral_signature``, and the frequency tables both the references and the kernels read.

They run wherever torch runs, are used when the compiled library is missing or does not support
the device, and are the oracle of the op tests.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor


class SpectralSignature(NamedTuple):
    """Per-filter power spectrum binned by orientation x radial frequency, and its summary."""

    power: Tensor
    orientation: Tensor
    frequency: Tensor
    bandwidth: Tensor


def grid_layout(n_tiles: int, nrow: int, kh: int, kw: int, padding: int) -> tuple[int, int]:
    """Height and width of a grid of ``n_tiles`` tiles of ``kh x kw``, ``nrow`` per row."""
    cols = min(nrow, n_tiles)
    rows = -(-n_tiles // cols)
    return rows * (kh + padding) + padding, cols * (kw + padding) + padding


def _mapped_tiles(weight: Tensor, channels: str) -> Tensor:
    """[O, I, kh, kw] -> [O, T, C, kh, kw]: each filter's tiles (T) of C image channels."""
    o, i, kh, kw = weight.shape
    if channels == "rgb":
        return weight.reshape(o, 1, 3, kh, kw)
    if channels == "mean":
        return weight.mean(1, keepdim=True).reshape(o, 1, 1, kh, kw)
    return weight.reshape(o, i, 1, kh, kw)


def filter_grid(
    weight: Tensor,
    nrow: int,
    padding: int,
    pad_value: float,
    normalize: str,
    symmetric: bool,
    channels: str,
) -> Tensor:
    """Tile conv weights [O, I, kh, kw] into one image [C, H, W] (see ``torch_dlt.ops``)."""
    tiles = _mapped_tiles(weight, channels)
    o, t, c, kh, kw = tiles.shape
    if normalize != "none":
        dims = (1, 2, 3, 4) if normalize == "filter" else (0, 1, 2, 3, 4)
        if symmetric:
            m = tiles.abs().amax(dims, keepdim=True)
            scale = torch.where(m > 0, 0.5 / torch.where(m > 0, m, 1.0), 0.0)
            tiles = 0.5 + tiles * scale
        else:
            lo = tiles.amin(dims, keepdim=True)
            span = tiles.amax(dims, keepdim=True) - lo
            scale = torch.where(span > 0, 1.0 / torch.where(span > 0, span, 1.0), 0.0)
            tiles = torch.where(span > 0, (tiles - lo) * scale, 0.5)
    flat = tiles.reshape(o * t, c, kh, kw)
    n = o * t
    cols = min(nrow, n)
    rows = -(-n // cols)
    if rows * cols > n:
        filler = flat.new_full((rows * cols - n, c, kh, kw), pad_value)
        flat = torch.cat([flat, filler])
    # Each tile with its right and bottom padding, then the top and left border of the grid.
    padded = torch.nn.functional.pad(flat, (0, padding, 0, padding), value=pad_value)
    grid = padded.reshape(rows, cols, c, kh + padding, kw + padding).permute(2, 0, 3, 1, 4)
    grid = grid.reshape(c, rows * (kh + padding), cols * (kw + padding))
    return torch.nn.functional.pad(grid, (padding, 0, padding, 0), value=pad_value)


@lru_cache(maxsize=32)
def spectral_bins(fft_size: int, n_orient: int, n_freq: int) -> Tensor:
    """Bin of every frequency of an ``fft_size``-point 2-D DFT: ``orient * n_freq + radial``.

    The orientation of the wave vector ``(f_x, f_y)`` (``x`` along columns, ``y`` along rows,
    in cycles per pixel) is ``atan2(f_y, f_x) mod pi``; orientation bins are ``pi / n_orient``
    wide and centred on ``0, pi / n_orient, ...``. Radial bins split ``(0, 0.5]`` cycles per
    pixel evenly; the corners beyond 0.5 go to the last radial bin. The DC term has no
    orientation and gets -1 (left out). Boundaries are decided in exact integer arithmetic
    (radius) and on float64 angles nudged off the bin edges, so that a grid point on an edge
    always falls in the same bin.

    Returns:
        Tensor[fft_size, fft_size]: int64 bin of frequency ``(row k_y, column k_x)``.
    """
    n = fft_size
    k = torch.arange(n, dtype=torch.int64)
    k = torch.where(k < (n + 1) // 2, k, k - n)  # fftfreq's integer numerators
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    r2 = kx * kx + ky * ky
    # radial bin = floor(2 n_freq |k| / n) = floor(isqrt(4 n_freq^2 |k|^2) / n)
    m = 4 * n_freq * n_freq * r2
    root = torch.sqrt(m.double()).floor().long()
    root = root - (root * root > m).long() + ((root + 1) * (root + 1) <= m).long()
    radial = (root // n).clamp_max(n_freq - 1)
    angle = torch.remainder(torch.atan2(ky.double(), kx.double()), math.pi)
    width = math.pi / n_orient
    # Bin j covers [(j - 1/2) w, (j + 1/2) w); a tiny nudge keeps edge points in the upper bin.
    orient = torch.floor(angle / width + 0.5 + 1e-9).long() % n_orient
    bins = orient * n_freq + radial
    bins[0, 0] = -1
    return bins


def spectral_signature(
    weight: Tensor, bin_index: Tensor, n_orient: int, n_freq: int, fft_size: int
) -> SpectralSignature:
    """Binned power spectrum of each filter and its peak and spread (see ``torch_dlt.ops``)."""
    o = weight.shape[0]
    n = fft_size
    spectrum = torch.fft.fft2(weight, s=(n, n))
    power = (spectrum.real.square() + spectrum.imag.square()).sum(1).reshape(o, n * n)
    bins = bin_index.reshape(n * n).to(weight.device)
    keep = bins >= 0
    binned = power.new_zeros(o, n_orient * n_freq)
    binned = binned.index_add(1, bins[keep], power[:, keep])

    freqs = torch.fft.fftfreq(n, dtype=torch.float64, device=weight.device)
    fy, fx = torch.meshgrid(freqs, freqs, indexing="ij")
    radius = torch.sqrt(fx * fx + fy * fy).reshape(n * n)
    angle = torch.remainder(torch.atan2(fy, fx), math.pi).reshape(n * n)
    # P(k) = P(-k) for a real filter; symmetrised exactly, a peak and its mirror tie and the
    # first in row-major order wins, as in the kernels (on the Nyquist lines the two differ in
    # orientation).
    full = power.reshape(o, n, n)
    mirrored = torch.roll(torch.flip(full, (1, 2)), (1, 1), (1, 2)).reshape(o, n * n)
    masked = torch.where(keep, 0.5 * (power + mirrored), -1.0)  # DC left out of the peak
    peak = masked.argmax(1)
    p = power[:, keep].double()
    r = radius[keep]
    total = p.sum(1)
    safe = torch.where(total > 0, total, 1.0)
    mean = (p * r).sum(1) / safe
    var = ((p * (r - mean[:, None]).square()).sum(1) / safe).clamp_min(0.0)
    return SpectralSignature(
        binned.reshape(o, n_orient, n_freq),
        angle[peak].to(weight.dtype),
        radius[peak].to(weight.dtype),
        torch.where(total > 0, var.sqrt(), 0.0).to(weight.dtype),
    )
