"""Filter-visualisation ops: conv weights as one picture (``filter_grid``) and their binned power
spectra (``spectral_signature``), the measurements behind "early CNN filters look like wavelets"
(Krizhevsky, Sutskever & Hinton 2012; Zeiler & Fergus 2014)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torch_dlt.ops import _filters_reference, _use_compiled
from torch_dlt.ops._filters_fake import has_filter_ops
from torch_dlt.ops._filters_reference import SpectralSignature, spectral_bins

__all__ = [
    "SpectralSignature",
    "default_fft_size",
    "filter_grid",
    "spectral_cell_sizes",
    "spectral_signature",
]

_NORMALIZE = ("filter", "global", "none")
_CHANNELS = ("auto", "rgb", "tiles", "mean")


def _compiled(weight: Tensor) -> bool:
    return _use_compiled(weight) and has_filter_ops()


def _check_weight(weight: object, caller: str) -> Tensor:
    if not isinstance(weight, Tensor):
        raise TypeError(
            f"{caller}: weight must be a Tensor [O, I, kh, kw] (e.g. conv.weight), "
            f"got {type(weight).__name__}"
        )
    if weight.dim() != 4 or weight.numel() == 0:
        raise ValueError(
            f"{caller}: weight must be a non-empty conv weight [O, I, kh, kw], "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype in (torch.float16, torch.bfloat16):
        return weight.float()
    if weight.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"{caller}: weight has dtype {weight.dtype}; accepted are float32, float64 "
            "(and float16/bfloat16, computed in float32)"
        )
    return weight


def _check_int(value: object, name: str, caller: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{caller}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def filter_grid(
    weight: Tensor,
    *,
    nrow: int | None = None,
    padding: int = 1,
    pad_value: float = 0.0,
    normalize: str = "filter",
    symmetric: bool = False,
    channels: str = "auto",
) -> Tensor:
    """Tile the filters of a conv layer into one image, each filter scaled to [0, 1].

    Input channels become image channels as follows (``channels``):

    - ``"rgb"`` (the default when ``I == 3``): filter ``o`` is one colour tile, input channel
      ``c`` drawn as colour ``c``; the image has 3 channels.
    - ``"tiles"`` (the default otherwise): every ``(o, i)`` slice is its own grey tile, in the
      order ``o`` then ``i``; the image has 1 channel. With ``nrow=None`` and ``I > 1`` each
      filter fills one row.
    - ``"mean"``: filter ``o`` is one grey tile, the mean over its input channels.

    Normalisation (``normalize``) maps values to [0, 1] by min-max over each filter's pixels
    after the channel mapping (``"filter"``; in ``"tiles"`` mode over all of the filter's
    tiles, so their relative strength shows), over all filters (``"global"``) or not at all
    (``"none"``). With ``symmetric=True`` the map is ``0.5 + w / (2 max|w|)`` instead, so that
    0 is mid-grey and the sign of the weights reads off the picture. A constant filter is drawn
    at 0.5. Tiles are laid out row by row, ``nrow`` per row, with ``padding`` pixels of
    ``pad_value`` around and between them: the layout of ``torchvision.utils.make_grid``.

    Args:
        weight (Tensor[O, I, kh, kw]): conv weights; float16 / bfloat16 are computed in float32.
        nrow (int | None): tiles per row; ``None`` for ``I`` in ``"tiles"`` mode with ``I > 1``,
            else the smallest number giving a near-square grid.
        padding (int): pixels between and around tiles.
        pad_value (float): value of the padding pixels.
        normalize (str): ``"filter"``, ``"global"`` or ``"none"``.
        symmetric (bool): zero-centred max-abs scaling instead of min-max.
        channels (str): ``"auto"``, ``"rgb"`` (needs ``I == 3``), ``"tiles"`` or ``"mean"``.

    Returns:
        Tensor[C, H, W]: ``C`` is 3 for ``"rgb"``, else 1;
        ``H = rows (kh + padding) + padding`` and ``W = cols (kw + padding) + padding``.

    Example:
        >>> w = torch.randn(6, 1, 5, 5)
        >>> filter_grid(w, nrow=3).shape
        torch.Size([1, 13, 19])
        >>> filter_grid(torch.randn(4, 3, 3, 3)).shape  # RGB filters, 2 x 2 tiles
        torch.Size([3, 9, 9])
    """
    caller = "filter_grid"
    weight = _check_weight(weight, caller)
    o, i = weight.shape[:2]
    if normalize not in _NORMALIZE:
        raise ValueError(f"{caller}: normalize must be one of {_NORMALIZE}, got {normalize!r}")
    if channels not in _CHANNELS:
        raise ValueError(f"{caller}: channels must be one of {_CHANNELS}, got {channels!r}")
    if channels == "auto":
        channels = "rgb" if i == 3 else "tiles"
    if channels == "rgb" and i != 3:
        raise ValueError(
            f"{caller}: channels='rgb' needs 3 input channels, weight has shape "
            f"{tuple(weight.shape)}; use 'tiles' or 'mean'"
        )
    tiles = o * i if channels == "tiles" else o
    if nrow is None:
        nrow = i if channels == "tiles" and i > 1 else math.ceil(math.sqrt(tiles))
    nrow = _check_int(nrow, "nrow", caller, 1)
    padding = _check_int(padding, "padding", caller, 0)
    if not isinstance(pad_value, (int, float)) or isinstance(pad_value, bool):
        raise TypeError(f"{caller}: pad_value must be a float, got {type(pad_value).__name__}")
    args = (nrow, padding, float(pad_value), normalize, bool(symmetric), channels)
    if _compiled(weight):
        return torch.ops.torch_dlt.filter_grid(weight, *args)
    return _filters_reference.filter_grid(weight, *args)


@torch.compiler.assume_constant_result
def _bin_table(fft_size: int, n_orient: int, n_freq: int) -> Tensor:
    # A constant of the arguments: torch.compile embeds it instead of tracing its construction.
    return spectral_bins(fft_size, n_orient, n_freq)


def spectral_cell_sizes(fft_size: int, n_orient: int = 8, n_freq: int = 8) -> Tensor:
    """DFT points per (orientation, radial frequency) cell of :func:`spectral_signature`.

    Dividing ``power`` by it gives the mean power density per cell, flat for white noise.

    >>> sizes = spectral_cell_sizes(32, 4, 2)
    >>> sizes.shape, int(sizes.sum())  # every point but the DC term
    (torch.Size([4, 2]), 1023)
    """
    bins = spectral_bins(fft_size, n_orient, n_freq).flatten()
    return torch.bincount(bins[bins >= 0], minlength=n_orient * n_freq).reshape(n_orient, n_freq)


def default_fft_size(kh: int, kw: int) -> int:
    """The zero-padded DFT size: a power of two >= 32 and >= 4 max(kh, kw).

    >>> default_fft_size(5, 5), default_fft_size(11, 11)
    (32, 64)
    """
    return max(32, 1 << math.ceil(math.log2(4 * max(kh, kw))))


def spectral_signature(
    weight: Tensor,
    *,
    n_orient: int = 8,
    n_freq: int = 8,
    fft_size: int | None = None,
) -> SpectralSignature:
    r"""Each filter's power spectrum by orientation x radial frequency, its peak and spread.

    The power spectrum :math:`P_o(k) = \sum_i |\hat w_{o,i}(k)|^2` is the ``fft_size``-point
    DFT of the filter zero-padded (the spectrum sampled finely), summed over input channels.
    A frequency :math:`f = (f_x, f_y)` in cycles per pixel (``x`` along columns, ``y`` along
    rows, downwards) has orientation :math:`\theta = \operatorname{atan2}(f_y, f_x) \bmod \pi`,
    the direction in which the filter oscillates (its stripes run perpendicular to it), and
    radial frequency :math:`|f|`. Orientation bins are :math:`\pi / n_\text{orient}` wide,
    centred on :math:`0, \pi / n_\text{orient}, \dots`; radial bins split (0, 0.5] evenly and
    the corners beyond 0.5 fall in the last one; the DC term is left out everywhere. A Gabor or
    Morlet filter concentrates its power in one (orientation, frequency) cell, which is what
    "first-layer filters are wavelet-like" predicts (Mallat 2012; Bruna & Mallat 2013); a
    random filter spreads it out.

    Args:
        weight (Tensor[O, I, kh, kw]): conv weights; float16 / bfloat16 are computed in float32.
        n_orient (int): orientation bins over [0, pi).
        n_freq (int): radial frequency bins over (0, 0.5] cycles per pixel.
        fft_size (int | None): DFT size (>= kh, kw); ``None`` for :func:`default_fft_size`.

    Returns:
        SpectralSignature: ``power (Tensor[O, n_orient, n_freq])`` summed power per bin;
        ``orientation (Tensor[O])`` in radians in [0, pi) and ``frequency (Tensor[O])`` in
        cycles per pixel of the spectrum's peak (DC excluded); ``bandwidth (Tensor[O])`` the
        power-weighted standard deviation of :math:`|f|` in cycles per pixel. ``power`` and
        ``bandwidth`` are differentiable; the peak's coordinates are piecewise constant.

    Example:
        >>> y, x = torch.meshgrid(torch.arange(9.0), torch.arange(9.0), indexing="ij")
        >>> grating = torch.cos(2 * math.pi * 0.25 * y)  # oscillates down the rows
        >>> sig = spectral_signature(grating.reshape(1, 1, 9, 9), fft_size=32)
        >>> round(float(sig.orientation[0]) / math.pi, 3), float(sig.frequency[0])
        (0.5, 0.25)
    """
    caller = "spectral_signature"
    weight = _check_weight(weight, caller)
    n_orient = _check_int(n_orient, "n_orient", caller, 1)
    n_freq = _check_int(n_freq, "n_freq", caller, 1)
    kh, kw = weight.shape[2:]
    if fft_size is None:
        fft_size = default_fft_size(kh, kw)
    fft_size = _check_int(fft_size, "fft_size", caller, 2)
    if fft_size < max(kh, kw):
        raise ValueError(
            f"{caller}: fft_size={fft_size} is smaller than the kernel {kh}x{kw}; "
            f"accepted: fft_size >= {max(kh, kw)}"
        )
    bins = _bin_table(fft_size, n_orient, n_freq).to(weight.device)
    args = (bins, n_orient, n_freq, fft_size)
    if _compiled(weight):
        return SpectralSignature(*torch.ops.torch_dlt.spectral_signature(weight, *args))
    return _filters_reference.spectral_signature(weight, *args)
