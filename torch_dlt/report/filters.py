"""The diagnose report's filters section: the first conv layer's filters as a picture, their
spectral signatures and how wavelet-like they are (Krizhevsky et al. 2012; Mallat 2012)."""

from __future__ import annotations

import math

import torch

from torch_dlt.ops import filter_grid, spectral_signature
from torch_dlt.ops.filters import default_fft_size, spectral_cell_sizes
from torch_dlt.report._html import Figure, Section, Table, figure_png
from torch_dlt.report.diagnose import DiagnoseContext, register_section
from torch_dlt.vis.filters import first_conv, wavelet_likeness

__all__ = ["filters_section"]

_N_ORIENT, _N_FREQ = 8, 6


@register_section("filters")
def filters_section(ctx: DiagnoseContext) -> Section:
    """First-layer filter grid, spectral signatures and wavelet-likeness against random filters."""
    title = "First-layer filters: wavelet-likeness"
    found = first_conv(ctx.model)
    if found is None:
        return Section(
            title=title,
            summary=["the model has no nn.Conv2d layer, so there are no filters to look at"],
        )
    name, conv = found
    weight = conv.weight.detach().cpu().double()
    o, i, kh, kw = weight.shape
    likeness = wavelet_likeness(weight)
    signature = spectral_signature(weight, n_orient=_N_ORIENT, n_freq=_N_FREQ)
    # Baseline: Gaussian filters of the same shape, from a private generator (global RNG intact).
    n_random = 64 if ctx.quick else 256
    g = torch.Generator().manual_seed(ctx.seed)
    random = torch.randn(n_random, i, kh, kw, generator=g, dtype=torch.float64)
    baseline = wavelet_likeness(random).score
    threshold = float(baseline.quantile(0.95))
    score = likeness.score
    above = int((score > threshold).sum())
    summary = [
        f"layer {name!r}: {o} filters of {i} x {kh} x {kw}",
        f"wavelet-likeness (best Gabor-atom correlation, 1 = one Gabor atom): median "
        f"{float(score.median()):.3f} against {float(baseline.median()):.3f} for random Gaussian "
        f"filters of the same shape; {above} of {o} filters above the random 95th percentile "
        f"({threshold:.3f})",
    ]
    share = signature.power.sum((1, 2))
    peak_share = signature.power.flatten(1).max(1).values / share.clamp_min(1e-300)
    summary.append(
        f"median share of a filter's power in its strongest orientation x frequency cell: "
        f"{float(peak_share.median()):.2f} (evenly spread: {1 / (_N_ORIENT * _N_FREQ):.2f})"
    )
    rows = []
    for k in range(o):
        rows.append(
            [
                k,
                float(score[k]),
                float(likeness.sigma[k]),
                float(likeness.frequency[k]),
                math.degrees(float(likeness.orientation[k])),
                math.degrees(float(signature.orientation[k])),
                float(signature.frequency[k]),
                float(signature.bandwidth[k]),
            ]
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(12, 3.8))
    grid = filter_grid(weight, pad_value=1.0).permute(1, 2, 0).numpy()
    if grid.shape[2] == 1:
        ax1.imshow(grid[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax1.imshow(grid.clip(0, 1), interpolation="nearest")
    ax1.set_title(f"{name}, each filter min-max scaled", fontsize=9)
    ax1.set_xticks([])
    ax1.set_yticks([])
    density = signature.power / spectral_cell_sizes(default_fft_size(kh, kw), _N_ORIENT, _N_FREQ)
    density = density / density.sum((1, 2), keepdim=True).clamp_min(1e-300)
    ax2.imshow(
        density.mean(0).numpy(),
        aspect="auto",
        origin="lower",
        cmap="magma",
        extent=(0, 0.5, -90 / _N_ORIENT, 180 - 90 / _N_ORIENT),
    )
    ax2.set_xlabel("radial frequency (cycles / pixel)")
    ax2.set_ylabel("orientation (degrees)")
    ax2.set_title("power density per cell (share), mean over filters", fontsize=9)
    bins = torch.linspace(0, 1, 21).numpy()
    ax3.hist(baseline.numpy(), bins=bins, density=True, alpha=0.6, label="random Gaussian filters")
    ax3.hist(score.numpy(), bins=bins, density=True, alpha=0.6, label=f"{name}")
    ax3.set_xlabel("wavelet-likeness")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    return Section(
        title=title,
        summary=summary,
        tables=[
            Table(
                [
                    "filter",
                    "wavelet-likeness",
                    "atom sigma (px)",
                    "atom frequency",
                    "atom orientation (deg)",
                    "spectral peak orientation (deg)",
                    "spectral peak frequency",
                    "bandwidth",
                ],
                rows,
                flagged_rows=[k for k in range(o) if float(score[k]) <= threshold],
            )
        ],
        figures=[
            Figure(
                figure_png(fig),
                "left: the filters; middle: power spectral density by orientation x radial "
                "frequency (flat for white noise), averaged over filters; right: "
                "wavelet-likeness of the filters and of random Gaussian filters of the same shape",
            )
        ],
        notes=[
            "Trained first-layer filters of image models tend to be oriented, band-pass and "
            "localised - Gabor-like (Krizhevsky, Sutskever & Hinton 2012), the wavelets Mallat's "
            "scattering transform fixes by hand (Mallat 2012; Bruna & Mallat 2013). "
            "Wavelet-likeness is the best normalised correlation with a centred Gabor atom over "
            "scales, frequencies, orientations, phases and aspect ratios "
            "(torch_dlt.vis.wavelet_likeness); flagged rows are no more wavelet-like than noise. "
            "At initialisation the filters are random and should score like the baseline."
        ],
    )
