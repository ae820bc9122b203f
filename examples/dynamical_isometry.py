"""Dynamical isometry: measured vs predicted Jacobian spectra of deep random nets.

Pennington, Schoenholz & Ganguli (2017), "Resurrecting the sigmoid in deep learning through
dynamical isometry": at the edge of chaos every net keeps the *mean* squared singular value of
its input-output Jacobian at 1, but of the nonlinear nets only tanh with orthogonal weights and a
small fixed-point length q* keeps the whole spectrum near 1 as depth grows. Gaussian weights
spread it (variance >= L), and relu spreads it for any weights.

For tanh, linear and relu nets at criticality, Gaussian and orthogonal weights, depths 10 / 50 /
200, this draws random nets, measures the singular values of J with
``torch_dlt.probes.jacobian_spectrum`` and sets them beside the free-probability prediction
``torch_dlt.theory.jacobian_spectrum_moments`` (and, for the linear Gaussian net, the exact
Fuss-Catalan density).

    python examples/dynamical_isometry.py --quick      # width 128, seconds
    python examples/dynamical_isometry.py              # width 300, under a minute on 2 idle cores
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torch_dlt.probes import jacobian_spectrum
from torch_dlt.theory import critical_sigma_w2, fuss_catalan_density, jacobian_spectrum_moments

# (activation, sigma_b2): tanh needs a tiny bias variance so that q* is small (phi' ~ 1 on the
# bulk of the pre-activations); relu and linear are critical at sigma_b2 = 0.
CONFIGS = (("tanh", 1e-6), ("linear", 0.0), ("relu", 0.0))
MODULES = {"tanh": nn.Tanh, "linear": nn.Identity, "relu": nn.ReLU}
WEIGHTS = (("orthogonal", "tab:blue"), ("gaussian", "tab:orange"))
# Histogram range in log10(sigma); smaller values (deep Gaussian and relu nets have many, down to
# the float64 floor of the SVD) are piled into the first bin and counted in the panel's text.
LOG_SV_MIN = -4.0
BINS = np.linspace(LOG_SV_MIN, 1.5, 56)


def random_net(
    activation: str, sigma_w2: float, sigma_b2: float, depth: int, width: int, weights: str
) -> nn.Module:
    """x -> phi(W^L ... phi(W^1 x + b^1) ... + b^L), float64, the paper's initialisation."""
    layers = []
    for _ in range(depth):
        linear = nn.Linear(width, width, dtype=torch.float64)
        if weights == "orthogonal":
            nn.init.orthogonal_(linear.weight, gain=math.sqrt(sigma_w2))
        else:
            nn.init.normal_(linear.weight, std=math.sqrt(sigma_w2 / width))
        nn.init.normal_(linear.bias, std=math.sqrt(sigma_b2))
        layers += [linear, MODULES[activation]()]
    return nn.Sequential(*layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 128, one input per net")
    parser.add_argument("--width", type=int, default=None, help="layer width (default 300)")
    parser.add_argument("--depths", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--out", type=Path, default=Path("examples/out/dynamical_isometry.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    width = args.width or (128 if args.quick else 300)
    samples = 1 if args.quick else 2

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(args.seed)
    fig, axes = plt.subplots(
        len(CONFIGS),
        len(args.depths),
        figsize=(4.6 * len(args.depths), 3.4 * len(CONFIGS)),
        squeeze=False,
    )
    start = time.time()
    for row, (activation, sigma_b2) in enumerate(CONFIGS):
        sigma_w2 = critical_sigma_w2(activation, sigma_b2)
        for col, depth in enumerate(args.depths):
            ax = axes[row, col]
            lines = []
            for weights, color in WEIGHTS:
                predicted = jacobian_spectrum_moments(
                    activation, sigma_w2, sigma_b2, depth, weights=weights
                )
                net = random_net(activation, sigma_w2, sigma_b2, depth, width, weights)
                # inputs on the fixed point: x = phi(h) with h ~ N(0, q*) gives layer 1 length q*
                h = torch.randn(samples, width, dtype=torch.float64) * math.sqrt(predicted.q_star)
                x = MODULES[activation]()(h)
                measured = jacobian_spectrum(net, x, method="exact")
                print(f"{activation} {weights} L={depth} (width {width}):")
                print(measured.compare(predicted))
                squared = measured.squared_singular_values.clamp_min(
                    torch.finfo(torch.float64).tiny
                )
                log_sv = 0.5 * np.log10(squared.numpy().ravel())
                below = float(np.mean(log_sv < LOG_SV_MIN))
                ax.hist(
                    np.clip(log_sv, LOG_SV_MIN, None), bins=BINS, density=True, color=color,
                    alpha=0.55, label=weights,
                )  # fmt: skip
                lines.append(
                    f"{weights[:5]}: var(sigma^2) {predicted.variance:.3g} theory, "
                    f"{float(measured.variance.mean()):.3g} measured; "
                    f"{100 * below:.0f}% < 1e{LOG_SV_MIN:.0f}"
                )
            if activation == "linear":
                # orthogonal: every singular value is exactly 1; Gaussian: Fuss-Catalan law,
                # as a density of log10(sigma): rho(lambda) d lambda / d log10(sigma)
                grid = np.linspace(LOG_SV_MIN, BINS[-1], 600)
                lam = 10.0 ** (2 * grid)
                density = fuss_catalan_density(lam, depth) * 2 * lam * math.log(10)
                ax.plot(grid, density, "k--", lw=1.2, label="Fuss-Catalan (theory, gaussian)")
            ax.axvline(0.0, color="grey", lw=0.6)
            variances = f"$\\sigma_w^2$={sigma_w2:.3g}, $\\sigma_b^2$={sigma_b2:g}"
            ax.set_title(f"{activation}, {variances}, L={depth}", fontsize=9)
            ax.text(
                0.02, 0.97, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=6.5,
                family="monospace", bbox={"facecolor": "white", "alpha": 0.8, "lw": 0},
            )  # fmt: skip
            ax.set_xlabel(r"$\log_{10}$ singular value of $J$")
            ax.set_ylabel(r"density of $\log_{10}\sigma$")
            ax.set_yscale("log")
            ax.set_ylim(1e-3, 1e3)
            ax.set_xlim(BINS[0], BINS[-1])
            if col == 0:
                ax.legend(loc="lower left", fontsize=7)
    fig.suptitle(
        f"Jacobian singular values of random nets at criticality, width {width}: measured "
        "(histograms) vs the free-probability prediction (Pennington et al. 2017), which is exact "
        "for width >> depth",
        fontsize=10,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
