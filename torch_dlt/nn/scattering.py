r"""The 2D scattering transform (Mallat 2012; Bruna & Mallat 2013) as a layer, its Morlet filter
bank, and the hybrid "fixed scattering front + learned classifier" network.

The transform cascades Morlet wavelet convolutions and complex moduli, then averages with a
Gaussian low-pass :math:`\phi_J`:

.. math::
    S_J x = \bigl[\,x \star \phi_J,\ |x \star \psi_{\lambda_1}| \star \phi_J,\
    ||x \star \psi_{\lambda_1}| \star \psi_{\lambda_2}| \star \phi_J\,\bigr],
    \qquad \lambda = (j, \theta),\ 0 \le j_1 < j_2 < J.

Filters, padding, subsampling and the channel order are those of kymatio 0.3 (Andreux et al.
2020), so its outputs and ours agree to float rounding and a trained classifier carries over.
All wavelets of a scale, and all second-order paths leaving a scale, go through one batched GEMM
that also sums the aliases of the Fourier subsampling; the Gaussian average is two GEMMs (it is
separable), so no FFT follows a last modulus.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MorletFilterBank",
    "Scattering2D",
    "ScatteringFilters",
    "ScatteringNet",
    "gabor_2d",
    "morlet_2d",
    "morlet_filter_bank",
    "scattering2d",
    "scattering_channels",
    "scattering_padded_shape",
]

# kymatio 0.3 normalises its Gabor atoms by 2 * 3.1415 * sigma^2 / slant (pi rounded to four
# digits); the 3e-5 relative difference to 2 * pi would break the 1e-5 agreement we promise.
_KYMATIO_TWO_PI = 2 * 3.1415
# Periodic copies of an atom summed on each side of the grid (kymatio's 5 x 5 tiles).
_TILES = 2
# Working-set target of one chunk of images on the CPU (a few times a core's L2 cache).
_CPU_CHUNK_BYTES = 2**23


class ScatteringFilters(NamedTuple):
    """Filters of a 2D scattering transform, at every resolution it uses.

    Attributes:
        phi (tuple[Tensor[M / 2^r, N / 2^r], ...]): the Fourier low-pass
            :math:`\\hat\\phi_J`, periodised to resolutions ``r = 0 .. J-1``.
        psi (tuple[Tensor[J, L, M / 2^r, N / 2^r], ...]): the Fourier wavelets
            :math:`\\hat\\psi_{j,\\theta}`, periodised to resolutions ``r = 0 .. max(J-2, 0)``
            (a second-order path from scale ``j1`` filters at resolution ``j1 <= J-2``).
        phi_rows (tuple[Tensor[M / 2^J - 2, M / 2^r], ...]): :math:`\\phi_J` is separable
            (an isotropic Gaussian), so averaging a signal at resolution ``r``, subsampling it
            to resolution ``J`` and cropping the one-coefficient margin is
            ``phi_rows[r] @ U @ phi_cols[r].T``, the spatial form of the Fourier product.
        phi_cols (tuple[Tensor[N / 2^J - 2, N / 2^r], ...]): the same along columns.
    """

    phi: tuple[Tensor, ...]
    psi: tuple[Tensor, ...]
    phi_rows: tuple[Tensor, ...]
    phi_cols: tuple[Tensor, ...]


class MorletFilterBank(NamedTuple):
    """Spatial and Fourier Morlet filter bank of :func:`morlet_filter_bank`.

    Attributes:
        psi (Tensor[J, L, M, N], complex): spatial Morlet wavelets, centred at pixel ``(0, 0)``
            and periodic (``torch.fft.fftshift`` centres them for display).
        phi (Tensor[M, N]): spatial Gaussian low-pass (real), centred at ``(0, 0)``.
        fourier (ScatteringFilters): their Fourier transforms, as the scattering uses them.
        sigma (Tensor[J]): envelope widths ``0.8 * 2**j`` of the wavelets, in pixels.
        xi (Tensor[J]): centre frequencies ``3 pi / 4 / 2**j``, in radians per pixel.
        theta (Tensor[L]): orientations, in radians.
    """

    psi: Tensor
    phi: Tensor
    fourier: ScatteringFilters
    sigma: Tensor
    xi: Tensor
    theta: Tensor


def _check_int(value: object, name: str, owner: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_shape(shape: object, owner: str) -> tuple[int, int]:
    if (
        not isinstance(shape, (tuple, list, torch.Size))
        or len(shape) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    ):
        raise ValueError(f"{owner}: shape must be two positive ints (M, N), got {shape!r}")
    return int(shape[0]), int(shape[1])


def gabor_2d(
    shape: tuple[int, int],
    sigma: float,
    theta: float,
    xi: float,
    slant: float = 1.0,
    *,
    offset: int = 0,
    dtype: torch.dtype = torch.complex128,
) -> Tensor:
    r"""A periodic 2D Gabor atom on an ``M x N`` grid (Bruna & Mallat 2013, Sec. III.A).

    .. math::
        g(u) = \frac{\text{slant}}{2\pi\sigma^2}
        \exp\!\Bigl(-\frac{u^\top R_\theta \operatorname{diag}(1, \text{slant}^2)
        R_\theta^\top u}{2\sigma^2} + i\,\xi\,(u_1\cos\theta + u_2\sin\theta)\Bigr),

    summed over the 5 x 5 nearest periodic copies of the grid, with pixel ``(offset, offset)``
    at the origin. :math:`2\pi` is kymatio 0.3's ``2 * 3.1415``.

    Args:
        shape (tuple[int, int]): grid size ``(M, N)``.
        sigma (float): envelope width in pixels.
        theta (float): orientation in radians (the direction of the oscillation).
        xi (float): centre frequency in radians per pixel; 0 gives a Gaussian.
        slant (float): ratio of the envelope's widths along and across the oscillation.
        offset (int): index of the grid's first pixel.
        dtype (torch.dtype): complex dtype of the result.

    Returns:
        Tensor[M, N]: the complex atom.

    Example:
        >>> g = gabor_2d((32, 32), sigma=2.0, theta=0.0, xi=0.0)
        >>> round(g.real.sum().item(), 3)  # a Gaussian of unit mass (up to 3.1415 / pi)
        1.0
    """
    rows = _check_shape(shape, "gabor_2d")
    if not sigma > 0 or not slant > 0:
        raise ValueError(f"gabor_2d: sigma and slant must be > 0, got {sigma!r}, {slant!r}")
    m, n = rows
    tiles = torch.arange(-_TILES, _TILES + 1, dtype=torch.float64)
    u1 = (offset + torch.arange(m, dtype=torch.float64) + m * tiles[:, None]).reshape(-1, 1)
    u2 = (offset + torch.arange(n, dtype=torch.float64) + n * tiles[:, None]).reshape(1, -1)
    c, s, k = math.cos(theta), math.sin(theta), slant * slant
    scale = 2 * sigma * sigma
    quadratic = (
        (c * c + k * s * s) * u1 * u1
        + 2 * c * s * (1 - k) * u1 * u2
        + (s * s + k * c * c) * u2 * u2
    ) / scale
    phase = xi * (c * u1 + s * u2)
    atom = torch.polar(torch.exp(-quadratic), phase)
    periodic = atom.reshape(2 * _TILES + 1, m, 2 * _TILES + 1, n).sum(dim=(0, 2))
    return (periodic * (slant / (_KYMATIO_TWO_PI * sigma * sigma))).to(dtype)


def morlet_2d(
    shape: tuple[int, int],
    sigma: float,
    theta: float,
    xi: float,
    slant: float = 0.5,
    *,
    offset: int = 0,
    dtype: torch.dtype = torch.complex128,
) -> Tensor:
    r"""A periodic 2D Morlet wavelet: a Gabor atom minus the Gaussian that gives it zero mean.

    :math:`\psi(u) = g_{\sigma,\theta,\xi}(u) - \kappa\, g_{\sigma,\theta,0}(u)` with
    :math:`\kappa = \sum_u g_{\sigma,\theta,\xi}(u) / \sum_u g_{\sigma,\theta,0}(u)`, so
    :math:`\sum_u \psi(u) = 0` (Bruna & Mallat 2013, Sec. III.A; see :func:`gabor_2d`).

    Args:
        shape (tuple[int, int]): grid size ``(M, N)``.
        sigma (float): envelope width in pixels.
        theta (float): orientation in radians.
        xi (float): centre frequency in radians per pixel.
        slant (float): envelope aspect ratio (the scattering uses ``4 / L``).
        offset (int): index of the grid's first pixel; ``-(M // 2)`` centres the wavelet on a
            small odd grid, e.g. to compare it with 5x5 convolution filters.
        dtype (torch.dtype): complex dtype of the result.

    Returns:
        Tensor[M, N]: the complex wavelet.

    Example:
        >>> psi = morlet_2d((16, 16), sigma=0.8, theta=0.0, xi=3 * math.pi / 4)
        >>> bool(psi.sum().abs() < 1e-12)
        True
    """
    wave = gabor_2d(shape, sigma, theta, xi, slant, offset=offset, dtype=torch.complex128)
    envelope = gabor_2d(shape, sigma, theta, 0.0, slant, offset=offset, dtype=torch.complex128)
    return (wave - wave.sum() / envelope.sum() * envelope).to(dtype)


def _periodize_spectrum(spectrum: Tensor, resolution: int) -> Tensor:
    """The spectrum of the filter for signals subsampled by ``2**resolution``: frequencies
    beyond the coarse grid's Nyquist band are cut and the band is folded onto the coarse grid."""
    if resolution == 0:
        return spectrum
    k = 2**resolution
    *lead, m, n = spectrum.shape
    kept_m = torch.zeros(m, dtype=torch.bool)
    kept_n = torch.zeros(n, dtype=torch.bool)
    kept_m[: m // (2 * k)] = True
    kept_m[m - m // (2 * k) :] = True
    kept_n[: n // (2 * k)] = True
    kept_n[n - n // (2 * k) :] = True
    band = spectrum * (kept_m[:, None] & kept_n[None, :])
    return band.reshape(*lead, k, m // k, k, n // k).sum(dim=(-4, -2))


def morlet_filter_bank(
    shape: tuple[int, int], J: int, L: int = 8, *, dtype: torch.dtype = torch.float32
) -> MorletFilterBank:
    r"""The Morlet filter bank of the 2D scattering transform on an ``M x N`` (padded) grid.

    Wavelets :math:`\psi_{j,\theta}` for ``j < J`` and ``L`` orientations
    :math:`\theta_\ell = (\operatorname{trunc}(L/2 - 1) - \ell)\,\pi / L`, with
    :math:`\sigma_j = 0.8\cdot 2^j`, :math:`\xi_j = \tfrac{3\pi}{4} 2^{-j}`, slant ``4 / L``,
    and the Gaussian :math:`\phi` of width :math:`0.8\cdot 2^{J-1}` (Bruna & Mallat 2013,
    Sec. III.A; the constants are kymatio 0.3's, Andreux et al. 2020). The Fourier filters are
    the real parts of the DFTs (their imaginary parts vanish up to the periodisation's
    truncation) and are given at every resolution the scattering subsamples to.

    Args:
        shape (tuple[int, int]): grid size ``(M, N)``, both multiples of ``2**J``; for the
            scattering of an image, :func:`scattering_padded_shape` of its size.
        J (int): number of scales, >= 1.
        L (int): number of orientations, >= 1.
        dtype (torch.dtype): real dtype of the Fourier filters (the spatial ones are the
            matching complex dtype, ``phi`` real).

    Returns:
        MorletFilterBank: spatial ``psi [J, L, M, N]``, ``phi [M, N]``, the Fourier
        :class:`ScatteringFilters` and the parameters ``sigma``, ``xi``, ``theta``.

    Example:
        >>> bank = morlet_filter_bank((32, 32), J=2, L=4)
        >>> bank.psi.shape, [tuple(p.shape) for p in bank.fourier.phi]
        (torch.Size([2, 4, 32, 32]), [(32, 32), (16, 16)])
    """
    owner = "morlet_filter_bank"
    m, n = _check_shape(shape, owner)
    _check_int(J, "J", owner, 1)
    _check_int(L, "L", owner, 1)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{owner}: dtype must be torch.float32 or torch.float64, got {dtype}")
    if m % 2**J or n % 2**J:
        raise ValueError(
            f"{owner}: shape {(m, n)} must be multiples of 2**J = {2**J} (pad the image with "
            "scattering_padded_shape)"
        )
    sigma = [0.8 * 2**j for j in range(J)]
    xi = [3 * math.pi / 4 / 2**j for j in range(J)]
    # Truncation toward zero, as kymatio 0.3 orders its orientations (it matters for L = 1).
    theta = [(int(L / 2 - 1) - ell) * math.pi / L for ell in range(L)]
    psi = torch.stack(
        [
            torch.stack([morlet_2d((m, n), sigma[j], t, xi[j], 4.0 / L) for t in theta])
            for j in range(J)
        ]
    )
    phi = gabor_2d((m, n), 0.8 * 2 ** (J - 1), 0.0, 0.0, 1.0)
    psi_hat = torch.fft.fft2(psi).real
    phi_hat = torch.fft.fft2(phi).real
    phi_levels = [_periodize_spectrum(phi_hat, r) for r in range(J)]
    operators = [_averaging_operators(level, 2 ** (J - r)) for r, level in enumerate(phi_levels)]
    fourier = ScatteringFilters(
        phi=tuple(level.to(dtype) for level in phi_levels),
        psi=tuple(_periodize_spectrum(psi_hat, r).to(dtype) for r in range(max(J - 1, 1))),
        phi_rows=tuple(rows.to(dtype) for rows, _ in operators),
        phi_cols=tuple(cols.to(dtype) for _, cols in operators),
    )
    complex_dtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    return MorletFilterBank(
        psi=psi.to(complex_dtype),
        phi=phi.real.to(dtype),
        fourier=fourier,
        sigma=torch.tensor(sigma, dtype=dtype),
        xi=torch.tensor(xi, dtype=dtype),
        theta=torch.tensor(theta, dtype=dtype),
    )


def _averaging_operators(phi_hat: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Row and column matrices of ``U -> crop(subsample_k(U circularly convolved with phi))``.

    ``phi_hat`` is the outer product of its first column and first row (over its corner value),
    the DFT of the separable Gaussian; each factor's inverse DFT is the 1D periodic filter, and
    output ``p`` of the subsampled, cropped convolution reads filter taps ``(p k - u) mod M``.
    """
    rows_filter = torch.fft.ifft(phi_hat[:, 0]).real
    cols_filter = torch.fft.ifft(phi_hat[0, :] / phi_hat[0, 0]).real

    def operator(taps: Tensor) -> Tensor:
        size = taps.shape[0]
        outputs = torch.arange(1, size // k - 1)[:, None] * k
        return taps[(outputs - torch.arange(size)[None, :]) % size]

    return operator(rows_filter), operator(cols_filter)


def scattering_padded_shape(shape: tuple[int, int], J: int) -> tuple[int, int]:
    """Size of the reflection-padded grid the scattering of an ``M x N`` image works on.

    The next multiple of ``2**J`` above ``M + 2**J`` (and likewise for ``N``), so that the
    periodic convolutions' wrap-around stays in the padding and the output keeps one
    coefficient of margin on each side (kymatio 0.3's choice).

    Args:
        shape (tuple[int, int]): image size ``(M, N)``.
        J (int): number of scales.

    Returns:
        tuple[int, int]: the padded size.

    Example:
        >>> scattering_padded_shape((28, 28), J=2)
        (36, 36)
    """
    m, n = _check_shape(shape, "scattering_padded_shape")
    _check_int(J, "J", "scattering_padded_shape", 1)
    step = 2**J
    return ((m + step) // step + 1) * step, ((n + step) // step + 1) * step


def scattering_channels(J: int, L: int = 8, max_order: int = 2) -> int:
    r"""Number of scattering paths per input channel: :math:`1 + JL + L^2 J(J-1)/2` at order 2.

    Example:
        >>> scattering_channels(2, 8), scattering_channels(3, 8, max_order=1)
        (81, 25)
    """
    return 1 + J * L + (L * L * J * (J - 1) // 2 if max_order == 2 else 0)


@functools.lru_cache(maxsize=64)
def _reflection_indices(size: int, before: int, after: int) -> tuple[int, ...]:
    # Mirror about the edge pixels (no edge repeat), folding again for pads as wide as the image.
    period = 2 * (size - 1)
    if period == 0:
        return (0,) * (before + size + after)
    folded = [i % period for i in range(-before, size + after)]
    return tuple(i if i < size else period - i for i in folded)


def _reflect_pad(images: Tensor, padded: tuple[int, int]) -> Tensor:
    m, n = images.shape[-2:]
    rows = _reflection_indices(m, (padded[0] - m) // 2, (padded[0] - m + 1) // 2)
    cols = _reflection_indices(n, (padded[1] - n) // 2, (padded[1] - n + 1) // 2)
    rows_t = torch.tensor(rows, device=images.device)
    cols_t = torch.tensor(cols, device=images.device)
    return images[..., rows_t[:, None], cols_t[None, :]]


def _wavelet_products(spectrum: Tensor, psi: Tensor, k: int) -> Tensor:
    """Spectra of the signal convolved with each wavelet and subsampled by ``k`` in space.

    Subsampling averages the ``k x k`` aliases of the product (kymatio's Fourier subsampling),
    so at each coarse frequency the result is a ``[L, k*k] @ [k*k, batch]`` product: one batched
    GEMM over frequencies, with real and imaginary parts as two batch columns, never holding
    the ``L``-times larger full-resolution product. The spectra come batch-first (FFTs over the
    last dimensions are the fast ones) and gathering the aliases frequency-first is the one copy.

    Args:
        spectrum (Tensor[*batch, M, N], complex): spectra.
        psi (Tensor[L, M, N]): real Fourier wavelets.
        k (int): subsampling factor (divides ``M`` and ``N``).

    Returns:
        Tensor[M / k, N / k, L, *batch]: complex spectra at the coarse resolution.
    """
    *batch, m, n = spectrum.shape
    wavelets = psi.shape[0]
    mk, nk = m // k, n // k
    aliases = (
        torch.view_as_real(spectrum)
        .reshape(-1, k, mk, k, nk, 2)
        .permute(2, 4, 1, 3, 0, 5)
        .reshape(mk * nk, k * k, -1)
    )
    weights = psi.reshape(wavelets, k, mk, k, nk).permute(2, 4, 0, 1, 3)
    if k > 1:
        weights = weights / (k * k)
    # Contiguous: bmm falls back to one GEMM per frequency on operands with odd strides.
    weights = weights.contiguous().reshape(mk * nk, wavelets, k * k)
    # Without subsampling the "GEMM" is an outer product, which a broadcast multiply does better.
    products = weights * aliases if k == 1 else torch.bmm(weights, aliases)
    return torch.view_as_complex(products.reshape(mk, nk, wavelets, *batch, 2))


class _PairModulus(torch.autograd.Function):
    """Modulus of (real, imaginary) pairs, with the subgradient 0 at 0.

    On the CPU, complex ``abs`` writes a complex result and copies its real part out, a norm over
    the size-2 last dimension is a slow inner reduction, and ``hypot`` is a slow libm call whose
    gradient is NaN at 0 (as is that of ``sqrt``).
    """

    @staticmethod
    def forward(pairs: Tensor) -> Tensor:
        real, imag = pairs[..., 0], pairs[..., 1]
        return torch.addcmul(real * real, imag, imag).sqrt_()

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0], output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        pairs, modulus = ctx.saved_tensors
        # grad / |z| is infinite or NaN only where |z| = 0, where the subgradient is 0.
        scale = torch.nan_to_num_(grad / modulus, nan=0.0, posinf=0.0, neginf=0.0)
        return pairs * scale[..., None]


def _modulus(spectrum: Tensor) -> Tensor:
    """Complex modulus of the signal with the given spectrum (frequencies first)."""
    signal = torch.fft.ifft2(spectrum, dim=(0, 1))
    return _PairModulus.apply(torch.view_as_real(signal))


def scattering2d(
    x: Tensor, filters: ScatteringFilters, *, max_order: int = 2, pre_pad: bool = False
) -> Tensor:
    r"""The 2D scattering transform of ``x`` with the given filters (Bruna & Mallat 2013).

    ``J`` and ``L`` are read from ``filters`` (see :func:`morlet_filter_bank`). Unless
    ``pre_pad``, ``x`` is reflection-padded to the filters' grid, which must be
    :func:`scattering_padded_shape` of its size. Each wavelet convolution is a Fourier product
    subsampled to its scale by averaging the spectrum's aliases; each path is then averaged by
    :math:`\phi_J`, subsampled by ``2**J`` and cropped by one coefficient on every side.
    Channels are ordered as in kymatio 0.3: order 0, then ``(j1, theta1)``, then
    ``(j1, theta1, j2, theta2)`` with ``j2 > j1``, lexicographically.

    Args:
        x (Tensor[..., M, N]): real images (float32 or float64), any leading dimensions.
        filters (ScatteringFilters): the filters on the padded grid ``[Mp, Np]``
            (``morlet_filter_bank(...).fourier`` or :attr:`Scattering2D.filters`).
        max_order (int): 1 or 2.
        pre_pad (bool): ``x`` is already padded to ``[..., Mp, Np]``.

    Returns:
        Tensor[..., K, Mp / 2^J - 2, Np / 2^J - 2]: the scattering coefficients, ``K =``
        :func:`scattering_channels` ``(J, L, max_order)``; without ``pre_pad`` the spatial
        size is ``M / 2**J x N / 2**J`` when ``2**J`` divides ``M`` and ``N``.

    Example:
        >>> bank = morlet_filter_bank(scattering_padded_shape((16, 16), J=2), J=2, L=4)
        >>> scattering2d(torch.rand(5, 3, 16, 16), bank.fourier).shape
        torch.Size([5, 3, 25, 4, 4])
    """
    owner = "scattering2d"
    if not isinstance(filters, ScatteringFilters):
        raise TypeError(
            f"{owner}: filters must be ScatteringFilters (morlet_filter_bank(...).fourier), "
            f"got {type(filters).__name__}"
        )
    if max_order not in (1, 2):
        raise ValueError(f"{owner}: max_order must be 1 or 2, got {max_order!r}")
    J = len(filters.phi)
    padded = tuple(filters.phi[0].shape)
    _check_input(x, owner)
    if pre_pad:
        if tuple(x.shape[-2:]) != padded:
            raise ValueError(
                f"{owner}: with pre_pad=True x must be [..., {padded[0]}, {padded[1]}] (the "
                f"padded grid of the filters), got {list(x.shape)}"
            )
    elif scattering_padded_shape(tuple(x.shape[-2:]), J) != padded:
        raise ValueError(
            f"{owner}: x of shape {list(x.shape)} pads to "
            f"{scattering_padded_shape(tuple(x.shape[-2:]), J)} for J={J}, but the filters are "
            f"built for the padded grid {padded}; build them with "
            f"morlet_filter_bank(scattering_padded_shape((M, N), J), J, L)"
        )
    if filters.phi[0].device != x.device:
        raise ValueError(
            f"{owner}: x is on {x.device} but the filters are on {filters.phi[0].device}"
        )
    psi = [p.to(x.dtype) for p in filters.psi]
    rows_t = [a.to(x.dtype).T for a in filters.phi_rows]
    cols_t = [b.to(x.dtype).T for b in filters.phi_cols]

    def average(u: Tensor, resolution: int) -> Tensor:
        # phi_J is separable: [*batch, M_r, N_r] -> [*batch, out_m, out_n] by one GEMM along
        # columns and one along rows, each with the whole batch folded into its rows.
        along_cols = u @ cols_t[resolution]
        return (along_cols.transpose(-1, -2) @ rows_t[resolution]).transpose(-1, -2)

    def modulus(spectra: Tensor) -> Tensor:
        # [M, N, *batch] spectra -> [*batch, M, N] moduli; the inverse FFT over the leading
        # dimensions already lays its output out batch-first, so the move is free.
        return _modulus(spectra).movedim((0, 1), (-2, -1))

    def transform(images: Tensor) -> Tensor:
        batch = images.shape[0]
        coefficients = [average(images, 0)[:, None]]
        x_hat = torch.fft.fft2(images)
        u1_hat = []
        for j1 in range(J):
            u1 = modulus(_wavelet_products(x_hat, psi[0][j1], 2**j1))  # [L, B, M1, N1]
            coefficients.append(average(u1, j1).transpose(0, 1))
            if max_order == 2 and j1 < J - 1:
                u1_hat.append(torch.fft.fft2(u1))
        for j1, spectrum in enumerate(u1_hat):
            paths = [
                average(modulus(_wavelet_products(spectrum, psi[j1][j2], 2 ** (j2 - j1))), j2)
                for j2 in range(j1 + 1, J)
            ]
            # [j2, theta2, theta1, B, m, n] -> [B, (theta1, j2, theta2), m, n], kymatio's order.
            second = torch.stack(paths).permute(3, 2, 0, 1, 4, 5)
            coefficients.append(second.reshape(batch, -1, *second.shape[-2:]))
        return torch.cat(coefficients, dim=1)

    batch_shape = x.shape[:-2]
    images = x.reshape(-1, *x.shape[-2:])
    if not pre_pad:
        images = _reflect_pad(images, padded)
    # Wavelet products gather each spectrum's aliases frequency-first, so that one batched GEMM
    # per coarse frequency multiplies and subsamples them; FFTs, moduli and averages run
    # batch-first over the last two dimensions. On the CPU, images go through in chunks whose
    # largest intermediate (the second-order products) stays cache-sized.
    chunk = images.shape[0]
    if images.device.type == "cpu":
        wavelets = psi[0].shape[1]
        per_image = 2 * images.element_size() * wavelets * max(wavelets // 2, 1) * math.prod(padded)
        chunk = max(1, _CPU_CHUNK_BYTES // per_image)
    out = torch.cat([transform(part) for part in images.split(chunk)])
    return out.reshape(*batch_shape, *out.shape[1:])


def _check_input(x: object, owner: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{owner}: x must be a real float32 or float64 tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{owner}: x must be [..., M, N], got shape {list(x.shape)}")


class Scattering2D(nn.Module):
    r"""The 2D scattering transform as a fixed layer (Mallat 2012; Bruna & Mallat 2013).

    Same arguments, output layout and values (to float rounding) as kymatio 0.3's
    ``Scattering2D(J, shape, L, max_order, pre_pad, frontend="torch")`` (Andreux et al. 2020),
    computed with a few dozen large FFTs and batched GEMMs per call. The Fourier filters are
    buffers built once: they follow ``.to()``, ``.double()`` and ``state_dict``. The layer has
    no parameters and is differentiable with respect to its input.

    Args:
        J (int): number of scales; the output is subsampled by ``2**J`` (``2**J <= M, N``).
        shape (tuple[int, int]): image size ``(M, N)``.
        L (int): number of orientations.
        max_order (int): 1 or 2.
        pre_pad (bool): inputs come already padded to :attr:`padded_shape`.

    Shape:
        - Input: ``[..., M, N]`` (``[..., Mp, Np]`` with ``pre_pad``)
        - Output: ``[..., K, M', N']`` with ``K =`` :func:`scattering_channels` and
          ``M' = Mp / 2**J - 2`` (``= M / 2**J`` when ``2**J`` divides ``M``).

    Example:
        >>> layer = Scattering2D(J=2, shape=(28, 28), L=8)
        >>> layer(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 1, 81, 7, 7])
    """

    def __init__(
        self,
        J: int,
        shape: tuple[int, int],
        L: int = 8,
        max_order: int = 2,
        pre_pad: bool = False,
    ) -> None:
        super().__init__()
        owner = "Scattering2D"
        _check_int(J, "J", owner, 1)
        _check_int(L, "L", owner, 1)
        m, n = _check_shape(shape, owner)
        if max_order not in (1, 2):
            raise ValueError(f"{owner}: max_order must be 1 or 2, got {max_order!r}")
        if 2**J > min(m, n):
            raise ValueError(
                f"{owner}: J={J} averages over 2**J = {2**J} pixels, larger than the image "
                f"shape {(m, n)}; use J <= {int(math.log2(min(m, n)))}"
            )
        self.J, self.L, self.shape = J, L, (m, n)
        self.max_order, self.pre_pad = max_order, bool(pre_pad)
        self.padded_shape = scattering_padded_shape((m, n), J)
        bank = morlet_filter_bank(self.padded_shape, J, L)
        for r, phi in enumerate(bank.fourier.phi):
            self.register_buffer(f"phi_{r}", phi)
        for r, psi in enumerate(bank.fourier.psi):
            self.register_buffer(f"psi_{r}", psi)
        # Derived from phi: moved and cast with the module, kept out of the state_dict.
        for r, (rows, cols) in enumerate(zip(bank.fourier.phi_rows, bank.fourier.phi_cols)):
            self.register_buffer(f"phi_rows_{r}", rows, persistent=False)
            self.register_buffer(f"phi_cols_{r}", cols, persistent=False)

    @property
    def filters(self) -> ScatteringFilters:
        """The Fourier filters (the buffers), for :func:`scattering2d`."""
        levels = range(self.J)
        return ScatteringFilters(
            phi=tuple(getattr(self, f"phi_{r}") for r in levels),
            psi=tuple(getattr(self, f"psi_{r}") for r in range(max(self.J - 1, 1))),
            phi_rows=tuple(getattr(self, f"phi_rows_{r}") for r in levels),
            phi_cols=tuple(getattr(self, f"phi_cols_{r}") for r in levels),
        )

    @property
    def out_channels(self) -> int:
        """Scattering paths per input channel."""
        return scattering_channels(self.J, self.L, self.max_order)

    @property
    def out_shape(self) -> tuple[int, int]:
        """Spatial size of the output."""
        return (self.padded_shape[0] // 2**self.J - 2, self.padded_shape[1] // 2**self.J - 2)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, "Scattering2D")
        expected = self.padded_shape if self.pre_pad else self.shape
        if tuple(x.shape[-2:]) != expected:
            raise ValueError(
                f"Scattering2D(J={self.J}, shape={self.shape}"
                f"{', pre_pad=True' if self.pre_pad else ''}) expects input "
                f"[..., {expected[0]}, {expected[1]}], got {list(x.shape)}"
            )
        return scattering2d(x, self.filters, max_order=self.max_order, pre_pad=self.pre_pad)

    def extra_repr(self) -> str:
        return (
            f"J={self.J}, shape={self.shape}, L={self.L}, max_order={self.max_order}"
            f"{', pre_pad=True' if self.pre_pad else ''}"
        )


class ScatteringNet(nn.Module):
    r"""A fixed scattering front and a learned classifier: "learn only the final layers".

    ``Scattering2D -> [log(S + eps)] -> [BatchNorm2d] -> flatten -> Linear`` (or a one-hidden-
    layer ReLU MLP). Bruna & Mallat (2013) classify scattering coefficients with a linear
    (PCA-affine / SVM) classifier; Oyallon, Belilovsky & Zagoruyko (2017) normalise them with
    BatchNorm before a learned head. Only the head (and the BatchNorm affine) has parameters.

    Args:
        J (int): scattering scales.
        shape (tuple[int, int]): image size ``(M, N)``.
        in_channels (int): image channels.
        num_classes (int): classifier outputs.
        L (int): orientations.
        max_order (int): 1 or 2.
        hidden (int | None): width of the MLP's hidden layer; ``None`` for a linear head.
        normalization (str | None): ``"batchnorm"``, ``"log"``, ``"log+batchnorm"`` or ``None``.
        log_eps (float): the ``eps`` of the log normalisation.

    Shape:
        - Input: ``[B, in_channels, M, N]``
        - Output: ``[B, num_classes]``

    Example:
        >>> net = ScatteringNet(J=2, shape=(8, 8), L=4, hidden=16)
        >>> net(torch.rand(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    _NORMALIZATIONS = (None, "batchnorm", "log", "log+batchnorm")

    def __init__(
        self,
        J: int,
        shape: tuple[int, int],
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        L: int = 8,
        max_order: int = 2,
        hidden: int | None = None,
        normalization: str | None = "batchnorm",
        log_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        owner = "ScatteringNet"
        _check_int(in_channels, "in_channels", owner, 1)
        _check_int(num_classes, "num_classes", owner, 1)
        if hidden is not None:
            _check_int(hidden, "hidden", owner, 1)
        if normalization not in self._NORMALIZATIONS:
            raise ValueError(
                f"{owner}: normalization must be one of {self._NORMALIZATIONS}, "
                f"got {normalization!r}"
            )
        if not log_eps > 0:
            raise ValueError(f"{owner}: log_eps must be > 0, got {log_eps!r}")
        self.scattering = Scattering2D(J, shape, L=L, max_order=max_order)
        self.in_channels = in_channels
        self.normalization = normalization
        self.log_eps = log_eps
        channels = in_channels * self.scattering.out_channels
        self.norm = (
            nn.BatchNorm2d(channels)
            if normalization is not None and "batchnorm" in normalization
            else nn.Identity()
        )
        features = channels * math.prod(self.scattering.out_shape)
        self.classifier = (
            nn.Linear(features, num_classes)
            if hidden is None
            else nn.Sequential(
                nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
            )
        )

    def _check(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"ScatteringNet: x must be [B, {self.in_channels}, "
                f"{self.scattering.shape[0]}, {self.scattering.shape[1]}], got {got}"
            )
        return x

    def normalize(self, s: Tensor) -> Tensor:
        """Normalised features ``[B, in_channels * K, M', N']`` from scattering coefficients
        ``s [B, in_channels, K, M', N']`` (the output of :attr:`scattering`)."""
        s = s.flatten(1, 2)
        if self.normalization is not None and self.normalization.startswith("log"):
            # Scattering coefficients are non-negative averages of moduli, up to FFT rounding.
            s = torch.log(F.relu(s) + self.log_eps)
        return self.norm(s)

    def classify(self, s: Tensor) -> Tensor:
        """Logits from precomputed scattering coefficients ``s [B, in_channels, K, M', N']``:
        the learned part, so a training loop may compute the fixed front once per image."""
        return self.classifier(self.normalize(s).flatten(1))

    def features(self, x: Tensor) -> Tensor:
        """Normalised scattering features ``[B, in_channels * K, M', N']`` (before the head)."""
        return self.normalize(self.scattering(self._check(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.scattering(self._check(x)))
