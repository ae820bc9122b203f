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
All wavelets of a scale, and all second-order paths leaving a scale, are multiplied at once and
subsampled by summing the aliases of the Fourier subsampling (a few broadcast multiply-adds, or a
batched GEMM for large factors); real signals use the real-to-complex FFT; the Gaussian average
is two GEMMs (it is separable), so no FFT follows a last modulus.
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
# Working-set target of one chunk of images on the CPU (a few times a core's L2 cache), and the
# fewest images in a chunk, below which the per-op overhead of a chunk outweighs the cache.
_CPU_CHUNK_BYTES = 2**22
_CPU_CHUNK_MIN_IMAGES = 4
# The real-to-complex FFT with a two-sided output (see _real_fft2).
_HAS_R2C = hasattr(torch, "_fft_r2c")


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


class _AliasedProducts(torch.autograd.Function):
    """Wavelet products of spectra, subsampled by summing their ``k x k`` aliases.

    ``[B, M, N, 2]`` (real, imaginary) spectra and ``[L, k, M / k, k, N / k, 2]`` scaled
    wavelets (real, repeated for both parts) -> ``[L, B, M / k, N / k, 2]``. One broadcast
    multiply-add per alias, batch-first throughout: no gather of the aliases and no copy to
    the layout of the inverse FFT that follows.
    """

    @staticmethod
    def forward(pairs: Tensor, weights: Tensor, k: int) -> Tensor:
        signals = pairs.reshape(1, pairs.shape[0], k, pairs.shape[1] // k, k, -1, 2)
        aliases = [(a, b) for a in range(k) for b in range(k)]
        products = weights[:, None, 0, :, 0] * signals[:, :, 0, :, 0]
        for a, b in aliases[1:]:
            products.addcmul_(weights[:, None, a, :, b], signals[:, :, a, :, b])
        return products

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor, int], output: Tensor) -> None:
        pairs, weights, k = inputs
        ctx.save_for_backward(weights)
        ctx.k, ctx.shape = k, pairs.shape

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (weights,) = ctx.saved_tensors
        k, (batch, m, n, _) = ctx.k, ctx.shape
        if torch.is_grad_enabled():
            # Differentiable (a second derivative is being built): plain ops.
            per_alias = grad[:, :, None, :, None] * weights[:, None]
            return per_alias.sum(0).reshape(batch, m, n, 2), None, None
        grad_pairs = grad.new_empty(batch, k, m // k, k, n // k, 2)
        # Accumulated wavelet by wavelet into each alias: no L-times larger temporary.
        for a in range(k):
            for b in range(k):
                alias = grad_pairs[:, a, :, b]
                torch.mul(grad[0], weights[0, a, :, b], out=alias)
                for wavelet in range(1, grad.shape[0]):
                    alias.addcmul_(grad[wavelet], weights[wavelet, a, :, b])
        return grad_pairs.reshape(batch, m, n, 2), None, None


def _wavelet_products(spectrum: Tensor, psi: Tensor, k: int) -> Tensor:
    """Spectra of the signal convolved with each wavelet and subsampled by ``k`` in space.

    Subsampling averages the ``k x k`` aliases of the product (kymatio's Fourier subsampling).
    Up to ``k = 2`` the aliases are summed by broadcast multiply-adds (:class:`_AliasedProducts`);
    beyond, at each coarse frequency the sum is a ``[L, k*k] @ [k*k, batch]`` product: one
    batched GEMM over frequencies, with real and imaginary parts as two batch columns, the
    aliases gathered frequency-first and the products moved back batch-first. Either way the
    ``L``-times larger full-resolution product is never held.

    Args:
        spectrum (Tensor[*batch, M, N], complex): spectra.
        psi (Tensor[L, M, N]): real Fourier wavelets.
        k (int): subsampling factor (divides ``M`` and ``N``).

    Returns:
        Tensor[L, *batch, M / k, N / k], complex: spectra at the coarse resolution, scaled by
        ``k^2 / (M N)`` for the unnormalised inverse DFT of :func:`_modulus`.
    """
    *batch, m, n = spectrum.shape
    wavelets = psi.shape[0]
    mk, nk = m // k, n // k
    # Averaging the aliases divides by k * k, and the unnormalised inverse DFT that follows
    # leaves its 1 / (M N / k^2) here too.
    psi = psi / (m * n)
    pairs = torch.view_as_real(spectrum)
    # _AliasedProducts gives no gradient to the wavelets; wavelets that need one (filters
    # being learned) take the batched-GEMM path, which autograd differentiates fully.
    if k <= 2 and not psi.requires_grad:
        weights = psi.reshape(wavelets, k, mk, k, nk, 1).expand(-1, -1, -1, -1, -1, 2)
        products = _AliasedProducts.apply(pairs.reshape(-1, m, n, 2), weights.contiguous(), k)
        return torch.view_as_complex(products).reshape(wavelets, *batch, mk, nk)
    aliases = pairs.reshape(-1, k, mk, k, nk, 2).permute(2, 4, 1, 3, 0, 5)
    # Contiguous: bmm falls back to one GEMM per frequency on operands with odd strides.
    weights = psi.reshape(wavelets, k, mk, k, nk).permute(2, 4, 0, 1, 3).contiguous()
    products = torch.bmm(
        weights.reshape(mk * nk, wavelets, k * k), aliases.reshape(mk * nk, k * k, -1)
    )
    spectra = torch.view_as_complex(products.reshape(mk, nk, wavelets, *batch, 2))
    return spectra.movedim((0, 1), (-2, -1)).contiguous()


class _SpectrumModulus(torch.autograd.Function):
    """Modulus of the inverse DFT over the last two dimensions: ``[*batch, M, N]`` complex
    spectra -> ``[*batch, M, N]`` moduli.

    The inverse DFT is unnormalised (:func:`_wavelet_products` folds the ``1 / (M N)`` into the
    wavelets, saving a pass). The gradient is written out: the subgradient of the modulus is 0
    at 0 (``torch.abs`` would give NaN there through ``sqrt``), the adjoint of the unnormalised
    inverse DFT is the unnormalised forward DFT, and no autograd view leaves a copy behind. The
    complex signal is a second output, saved for the backward; its gradient only arises when
    differentiating the backward itself (second derivatives), which it then makes exact.
    """

    @staticmethod
    def forward(spectrum: Tensor) -> tuple[Tensor, Tensor]:
        signal = torch.fft.ifft2(spectrum, norm="forward")
        # In place after the first square: every fresh large buffer costs page faults.
        pairs = torch.view_as_real(signal)
        modulus = pairs[..., 0].square()
        return modulus.addcmul_(pairs[..., 1], pairs[..., 1]).sqrt_(), signal

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: tuple[Tensor, Tensor]) -> None:
        modulus, signal = output
        # No zero gradient is built for the signal when nothing uses it.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(signal, modulus)

    @staticmethod
    def backward(ctx, grad: Tensor | None, grad_signal: Tensor | None) -> Tensor | None:
        if grad is None and grad_signal is None:
            return None
        signal, modulus = ctx.saved_tensors
        if grad is not None:
            # grad / |z| is infinite or NaN only where |z| = 0, where the subgradient is 0.
            scale = torch.nan_to_num(grad / modulus, nan=0.0, posinf=0.0, neginf=0.0)
            if torch.is_grad_enabled():
                # Differentiable (a second derivative is being built): plain ops.
                from_modulus = signal * scale
            else:
                # Real and imaginary parts scaled into a new complex tensor: complex * real
                # would first copy the real factor to complex.
                from_modulus = torch.empty_like(signal)
                pairs, out = torch.view_as_real(signal), torch.view_as_real(from_modulus)
                torch.mul(pairs[..., 0], scale, out=out[..., 0])
                torch.mul(pairs[..., 1], scale, out=out[..., 1])
            grad_signal = from_modulus if grad_signal is None else from_modulus + grad_signal
        return torch.fft.fft2(grad_signal)


def _real_fft2(signal: Tensor) -> Tensor:
    """Full 2D DFT over the last two dimensions of a real signal.

    ``torch.fft.fft2`` copies a real input to complex and runs a complex transform; the
    real-to-complex transform with the full (two-sided) output is several times faster and
    differentiable. It is an ATen op without a public Python wrapper, so a torch without it
    gets the public transform.
    """
    if _HAS_R2C:
        return torch._fft_r2c(signal, [signal.dim() - 2, signal.dim() - 1], 0, False)
    return torch.fft.fft2(signal)


def _modulus(spectrum: Tensor) -> Tensor:
    """``[*batch, M, N]`` unnormalised spectra -> ``[*batch, M, N]`` moduli of their signals."""
    return _SpectrumModulus.apply(spectrum)[0]


def scattering2d(
    x: Tensor,
    filters: ScatteringFilters,
    *,
    max_order: int = 2,
    pre_pad: bool = False,
    out_type: str = "array",
) -> Tensor | list[dict]:
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
        out_type (str): ``"array"`` for one tensor, ``"list"`` for one entry per path (see
            Returns).

    Returns:
        Tensor[..., K, Mp / 2^J - 2, Np / 2^J - 2] | list[dict]: the scattering coefficients,
        ``K =`` :func:`scattering_channels` ``(J, L, max_order)``; without ``pre_pad`` the
        spatial size is ``M / 2**J x N / 2**J`` when ``2**J`` divides ``M`` and ``N``. With
        ``out_type="list"``, the ``K`` paths in the same order, each a dict as kymatio 0.3's:
        ``"coef"`` (Tensor[..., Mp / 2^J - 2, Np / 2^J - 2], a view of the array) and the
        tuples ``"j"`` (scales), ``"theta"`` (orientation indices) and ``"n"`` (wavelet
        indices ``j * L + theta``), empty for order 0, one entry for order 1, two for order 2.

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
    _check_out_type(out_type, owner)
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
        # columns and one along rows, each with the whole batch folded into its rows. Both are
        # plain 2D GEMMs: a batched product with a broadcast operand has a backward that loops
        # over the batch one small matrix at a time.
        *batch, m, n = u.shape
        rows, cols = rows_t[resolution], cols_t[resolution]
        along_cols = (u.reshape(-1, n) @ cols).reshape(-1, m, cols.shape[1])
        along_rows = along_cols.transpose(1, 2).reshape(-1, m) @ rows
        return along_rows.reshape(*batch, cols.shape[1], rows.shape[1]).transpose(-1, -2)

    def transform(images: Tensor) -> Tensor:
        batch = images.shape[0]
        coefficients = [average(images, 0)[:, None]]
        x_hat = _real_fft2(images)
        u1_hat = []
        for j1 in range(J):
            u1 = _modulus(_wavelet_products(x_hat, psi[0][j1], 2**j1))  # [L, B, M1, N1]
            coefficients.append(average(u1, j1).transpose(0, 1))
            if max_order == 2 and j1 < J - 1:
                u1_hat.append(_real_fft2(u1))
        for j1, spectrum in enumerate(u1_hat):
            paths = [
                average(_modulus(_wavelet_products(spectrum, psi[j1][j2], 2 ** (j2 - j1))), j2)
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
    # Wavelet products, FFTs, moduli and averages all run batch-first over the last two
    # dimensions. On the CPU, images go through in chunks whose largest intermediate (the
    # second-order products) stays cache-sized.
    chunk = images.shape[0]
    if images.device.type == "cpu":
        wavelets = psi[0].shape[1]
        per_image = 2 * images.element_size() * wavelets * max(wavelets // 2, 1) * math.prod(padded)
        chunk = max(_CPU_CHUNK_MIN_IMAGES, _CPU_CHUNK_BYTES // per_image)
    out = torch.cat([transform(part) for part in images.split(chunk)])
    out = out.reshape(*batch_shape, *out.shape[1:])
    if out_type == "list":
        return _path_list(out, J, psi[0].shape[1], max_order)
    return out


_OUT_TYPES = ("array", "list")


def _check_out_type(out_type: object, owner: str) -> None:
    if not isinstance(out_type, str) or out_type not in _OUT_TYPES:
        raise ValueError(f"{owner}: out_type must be one of {_OUT_TYPES}, got {out_type!r}")


def _path_list(out: Tensor, J: int, L: int, max_order: int) -> list[dict]:
    """The channels of ``out [..., K, m, n]`` as kymatio 0.3's list of per-path dicts."""
    paths: list[tuple[tuple[int, ...], tuple[int, ...]]] = [((), ())]
    paths += [((j1,), (t1,)) for j1 in range(J) for t1 in range(L)]
    if max_order == 2:
        paths += [
            ((j1, j2), (t1, t2))
            for j1 in range(J)
            for t1 in range(L)
            for j2 in range(j1 + 1, J)
            for t2 in range(L)
        ]
    return [
        {"coef": coef, "j": j, "n": tuple(s * L + t for s, t in zip(j, theta)), "theta": theta}
        for coef, (j, theta) in zip(out.unbind(-3), paths)
    ]


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
        out_type (str): ``"array"`` (the output below) or ``"list"``: one dict per path,
            ``{"coef": Tensor[..., M', N'], "j": ..., "theta": ..., "n": ...}`` as kymatio 0.3
            (see :func:`scattering2d`).

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
        out_type: str = "array",
    ) -> None:
        super().__init__()
        owner = "Scattering2D"
        _check_out_type(out_type, owner)
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
        self.out_type = out_type
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

    def forward(self, x: Tensor) -> Tensor | list[dict]:
        _check_input(x, "Scattering2D")
        expected = self.padded_shape if self.pre_pad else self.shape
        if tuple(x.shape[-2:]) != expected:
            raise ValueError(
                f"Scattering2D(J={self.J}, shape={self.shape}"
                f"{', pre_pad=True' if self.pre_pad else ''}) expects input "
                f"[..., {expected[0]}, {expected[1]}], got {list(x.shape)}"
            )
        return scattering2d(
            x,
            self.filters,
            max_order=self.max_order,
            pre_pad=self.pre_pad,
            out_type=self.out_type,
        )

    def extra_repr(self) -> str:
        return (
            f"J={self.J}, shape={self.shape}, L={self.L}, max_order={self.max_order}"
            f"{', pre_pad=True' if self.pre_pad else ''}"
            f"{', out_type=' + repr(self.out_type) if self.out_type != 'array' else ''}"
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
