"""Pictures and measures of convolution filters: a filter grid, and how well each filter is one
Gabor / Morlet wavelet atom - the claim that first-layer CNN filters are wavelet-like
(Krizhevsky et al. 2012; Mallat 2012), made a number."""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from torch_dlt.ops import filter_grid

__all__ = ["WaveletLikeness", "first_conv", "gabor_atom", "show_filters", "wavelet_likeness"]


def first_conv(module: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first ``nn.Conv2d`` of ``module`` (itself included) in ``named_modules`` order.

    >>> from torch_dlt.nn import LeNet5
    >>> first_conv(LeNet5())[0]
    'features.conv1'
    """
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d):
            return name, sub
    return None


def _as_weight(layer_or_weight: object, caller: str) -> tuple[Tensor, str]:
    if isinstance(layer_or_weight, Tensor):
        return layer_or_weight.detach(), "weight"
    if isinstance(layer_or_weight, nn.Module):
        found = first_conv(layer_or_weight)
        if found is None:
            raise ValueError(
                f"{caller}: {type(layer_or_weight).__name__} has no nn.Conv2d; pass a conv layer, "
                "a model containing one, or a weight Tensor [O, I, kh, kw]"
            )
        name, conv = found
        return conv.weight.detach(), name or type(conv).__name__
    raise TypeError(
        f"{caller}: expected an nn.Conv2d, a model containing one, or a weight Tensor "
        f"[O, I, kh, kw]; got {type(layer_or_weight).__name__}"
    )


def show_filters(
    layer_or_weight: nn.Module | Tensor,
    *,
    ax=None,
    nrow: int | None = None,
    padding: int = 1,
    normalize: str = "filter",
    symmetric: bool = False,
    channels: str = "auto",
    title: str | None = None,
):
    """Draw a conv layer's filters as one grid (:func:`torch_dlt.ops.filter_grid`) with matplotlib.

    Args:
        layer_or_weight (nn.Module | Tensor[O, I, kh, kw]): a conv layer, a model (its first
            ``nn.Conv2d`` is drawn) or the weights.
        ax (matplotlib.axes.Axes | None): where to draw; a new figure when ``None``.
        nrow, padding, normalize, symmetric, channels: as in :func:`~torch_dlt.ops.filter_grid`;
            padding is drawn white-ish (1.0) so that dark filters stand out.
        title (str | None): axes title; defaults to the layer's name and weight shape.

    Returns:
        matplotlib.axes.Axes: the axes drawn on.

    Example:
        >>> from matplotlib.figure import Figure
        >>> from torch_dlt.nn import LeNet5
        >>> ax = show_filters(LeNet5(), ax=Figure().subplots())
        >>> ax.get_title()
        'features.conv1 [6, 1, 5, 5]'
    """
    weight, name = _as_weight(layer_or_weight, "show_filters")
    grid = filter_grid(
        weight.cpu(),
        nrow=nrow,
        padding=padding,
        pad_value=1.0,
        normalize=normalize,
        symmetric=symmetric,
        channels=channels,
    )
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(4, 4))
    image = grid.permute(1, 2, 0).float().numpy()
    if image.shape[2] == 1:
        ax.imshow(image[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(image.clip(0.0, 1.0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else f"{name} [{', '.join(map(str, weight.shape))}]")
    return ax


def gabor_atom(
    size: int | tuple[int, int],
    sigma: float,
    frequency: float,
    orientation: float,
    phase: float = 0.0,
    aspect: float = 1.0,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""A Gabor atom centred on a ``size`` grid (Gabor 1946; Daugman 1985).

    :math:`g(x, y) = \exp\!\big(-(u^2 + \gamma^2 v^2) / 2\sigma^2\big)\cos(2\pi f u + \psi)`,
    with :math:`u = x\cos\theta + y\sin\theta` along the wave vector and
    :math:`v = -x\sin\theta + y\cos\theta` along the stripes, ``x`` the column and ``y`` the
    row (downwards) measured from the centre - the conventions of
    :func:`torch_dlt.ops.spectral_signature`, so its spectrum peaks near orientation
    :math:`\theta` and frequency :math:`f`. :math:`\gamma < 1` elongates the envelope along the
    stripes; with :math:`f = 0` it is a Gaussian blob (the low-pass atom).

    Args:
        size (int | tuple[int, int]): ``kh`` (square) or ``(kh, kw)``.
        sigma (float): envelope width in pixels (> 0).
        frequency (float): cycles per pixel, in [0, 0.5].
        orientation (float): wave-vector angle :math:`\theta` in radians.
        phase (float): :math:`\psi` in radians.
        aspect (float): :math:`\gamma` in (0, 1].
        dtype (torch.dtype): floating dtype of the result.

    Returns:
        Tensor[kh, kw]: the atom (not normalised).

    Example:
        >>> g = gabor_atom(7, sigma=2.0, frequency=0.25, orientation=0.0)
        >>> g.shape, bool(g[3, 3] == 1.0)
        (torch.Size([7, 7]), True)
    """
    kh, kw = (size, size) if isinstance(size, int) else size
    y = torch.arange(kh, dtype=dtype) - (kh - 1) / 2
    x = torch.arange(kw, dtype=dtype) - (kw - 1) / 2
    y, x = torch.meshgrid(y, x, indexing="ij")
    u = x * math.cos(orientation) + y * math.sin(orientation)
    v = -x * math.sin(orientation) + y * math.cos(orientation)
    envelope = torch.exp(-(u * u + aspect * aspect * v * v) / (2 * sigma * sigma))
    return envelope * torch.cos(2 * math.pi * frequency * u + phase)


class WaveletLikeness(NamedTuple):
    """Per-filter best-atom correlation and that atom's parameters (each ``Tensor[O]``)."""

    score: Tensor
    sigma: Tensor
    frequency: Tensor
    orientation: Tensor
    phase: Tensor
    aspect: Tensor


def _atom_grid(
    kh: int,
    kw: int,
    scales: Sequence[float],
    frequencies: Sequence[float],
    n_orient: int,
    n_phase: int,
    aspects: Sequence[float],
) -> tuple[Tensor, Tensor]:
    """Unit-norm atoms [A, kh kw] and their parameters [A, 5]: sigma, f, theta, psi, aspect."""
    rows = []
    for f in frequencies:
        # Orientation, phase and aspect of a Gaussian blob (f = 0) do not matter: one atom.
        orients = [0.0] if f == 0 else [math.pi * k / n_orient for k in range(n_orient)]
        phases = [0.0] if f == 0 else [math.pi * k / n_phase for k in range(n_phase)]
        shapes = [1.0] if f == 0 else list(aspects)
        grid = torch.cartesian_prod(
            torch.tensor(list(scales), dtype=torch.float64),
            torch.tensor([float(f)], dtype=torch.float64),
            torch.tensor(orients, dtype=torch.float64),
            torch.tensor(phases, dtype=torch.float64),
            torch.tensor(shapes, dtype=torch.float64),
        )
        rows.append(grid.reshape(-1, 5))
    params = torch.cat(rows)
    sigma, f, theta, psi, aspect = (params[:, k, None, None] for k in range(5))
    y = (torch.arange(kh, dtype=torch.float64) - (kh - 1) / 2)[:, None]
    x = (torch.arange(kw, dtype=torch.float64) - (kw - 1) / 2)[None, :]
    u = x * theta.cos() + y * theta.sin()
    v = -x * theta.sin() + y * theta.cos()
    atoms = torch.exp(-(u * u + aspect * aspect * v * v) / (2 * sigma * sigma))
    atoms = (atoms * torch.cos(2 * math.pi * f * u + psi)).reshape(len(params), kh * kw)
    norms = atoms.norm(dim=1)
    usable = norms > 1e-12 * norms.max()  # a high frequency on a tiny envelope can vanish
    return atoms[usable] / norms[usable, None], params[usable]


def wavelet_likeness(
    weight: Tensor | nn.Module,
    *,
    scales: Sequence[float] | None = None,
    frequencies: Sequence[float] | None = None,
    n_orient: int = 16,
    n_phase: int = 8,
    aspects: Sequence[float] = (1.0, 0.5),
) -> WaveletLikeness:
    r"""How well each filter is one Gabor / Morlet atom: the best normalised correlation.

    For a filter :math:`w_o` with input channels :math:`w_{o,i}` and a centred atom :math:`g`
    (:func:`gabor_atom`) the score is the fraction of the filter's norm that the atom explains
    when each channel may scale it freely,

    .. math:: s_o = \max_g \Big(\sum_i \langle w_{o,i}, g\rangle^2 /
              (\lVert g\rVert^2 \sum_i \lVert w_{o,i}\rVert^2)\Big)^{1/2} \in [0, 1],

    which for one channel is the largest absolute normalised correlation. The maximum runs over
    envelope widths (``scales``), frequencies (0 gives the Gaussian low-pass atom), orientations
    in [0, pi), phases in [0, pi) (the sign of the correlation covers the rest) and envelope
    aspect ratios: the dictionary of Gabor wavelets that Mallat's scattering transform and V1
    models use (Daugman 1985; Mallat 2012). A Gabor filter scores about 1; a random Gaussian
    filter, whose energy is spread over all ``kh kw`` directions, scores far lower.

    Args:
        weight (Tensor[O, I, kh, kw] | nn.Module): conv weights, or a model / conv layer
            whose first ``nn.Conv2d`` is measured.
        scales (Sequence[float] | None): envelope widths in pixels; ``None`` for 6 values
            geometrically spaced from 0.5 to ``max(kh, kw) / 2``.
        frequencies (Sequence[float] | None): cycles per pixel; ``None`` for 0 and 8 values
            evenly spaced up to 0.5.
        n_orient (int): orientations in [0, pi).
        n_phase (int): phases in [0, pi).
        aspects (Sequence[float]): envelope aspect ratios in (0, 1].

    Returns:
        WaveletLikeness: ``score`` and the best atom's ``sigma``, ``frequency``,
        ``orientation``, ``phase`` and ``aspect`` per filter (``Tensor[O]`` each, float64);
        an all-zero filter scores 0.

    Example:
        >>> atom = gabor_atom(7, sigma=1.5, frequency=0.25, orientation=math.pi / 4)
        >>> noise = torch.randn(1, 1, 7, 7, generator=torch.Generator().manual_seed(0))
        >>> w = torch.stack([atom[None], noise[0]])
        >>> s = wavelet_likeness(w).score
        >>> bool(s[0] > 0.99), bool(s[1] < 0.8)
        (True, True)
    """
    caller = "wavelet_likeness"
    w, _ = _as_weight(weight, caller)
    if w.dim() != 4 or w.numel() == 0:
        raise ValueError(f"{caller}: weight must be [O, I, kh, kw], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"{caller}: weight must be floating point, got {w.dtype}")
    if not isinstance(n_orient, int) or n_orient < 1 or not isinstance(n_phase, int) or n_phase < 1:
        raise ValueError(
            f"{caller}: n_orient and n_phase must be positive ints, got {n_orient!r}, {n_phase!r}"
        )
    o, i, kh, kw = w.shape
    if scales is None:
        scales = torch.logspace(math.log10(0.5), math.log10(max(kh, kw) / 2), 6).tolist()
    if frequencies is None:
        frequencies = [0.5 * k / 8 for k in range(9)]
    if any(s <= 0 for s in scales) or any(not 0 <= f <= 0.5 for f in frequencies):
        raise ValueError(
            f"{caller}: scales must be > 0 and frequencies in [0, 0.5], got {list(scales)} and "
            f"{list(frequencies)}"
        )
    if any(not 0 < a <= 1 for a in aspects):
        raise ValueError(f"{caller}: aspects must be in (0, 1], got {list(aspects)}")
    atoms, params = _atom_grid(kh, kw, scales, frequencies, n_orient, n_phase, aspects)
    filters = w.detach().double().cpu().reshape(o, i, kh * kw)
    best = torch.empty(o, dtype=torch.float64)
    index = torch.empty(o, dtype=torch.int64)
    chunk = max(1, 2**22 // (i * len(atoms)))  # bounds the [chunk, I, A] correlations
    for start in range(0, o, chunk):
        part = filters[start : start + chunk]
        explained = torch.einsum("oip,ap->oia", part, atoms).square().sum(1)
        best[start : start + chunk], index[start : start + chunk] = explained.max(1)
    energy = filters.square().sum((1, 2))
    score = torch.where(energy > 0, (best / torch.where(energy > 0, energy, 1.0)).sqrt(), 0.0)
    p = params[index]
    return WaveletLikeness(score.clamp_max(1.0), p[:, 0], p[:, 1], p[:, 2], p[:, 3], p[:, 4])
