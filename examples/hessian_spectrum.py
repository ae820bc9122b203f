"""Hessian spectra of small nets at several parameter/data ratios (Pennington & Bahri 2017).

Pennington & Bahri (2017), "Geometry of neural network loss surfaces via random matrix theory",
model the Hessian at a point of loss epsilon as H = H0 + H1: a positive semi-definite Wishart
part (the Gauss-Newton matrix, whose shape is set by the ratio phi of parameters to data) plus
a Wigner part whose scale grows with the loss (the residual term). Their predictions,
qualitatively:

* the spectrum is a bulk near zero plus outliers (the Wishart part's rank is limited by the
  data: with phi < 1 part of it is exactly zero);
* the index alpha (fraction of negative eigenvalues) shrinks as the loss falls, vanishing below
  a critical loss epsilon_c(phi) = (1 - 20 phi - 8 phi^2 + (1 + 8 phi)^(3/2)) / 16 (their
  normalisation), which decreases to 0 at phi = 1: more parameters, lower critical loss;
* near epsilon_c, alpha grows like |epsilon - epsilon_c|^(3/2).

Here one-hidden-layer tanh MLPs 64-h-10 learn 64 of the 8x8 digits with the MSE loss (the loss
of their analysis), for several widths h, i.e. several phi = parameters / (samples x outputs)
(the rank bound of the Gauss-Newton part). Along full-batch gradient descent the script measures
the loss, the density by stochastic Lanczos quadrature (torch_dlt.probes.spectral_density) and
the index, both from SLQ and exactly (the nets are small enough for the dense Hessian, built
from H @ I), counting eigenvalues below -1e-3 lambda_max (the bulk at 0, whose sign SLQ cannot
read, counts as zero). The figure shows the final densities (log scale: bulk and outliers) and
the exact alpha against the loss.

    python examples/hessian_spectrum.py --quick   # < 1 min
    python examples/hessian_spectrum.py           # a few minutes
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from torch_dlt.data import digits
from torch_dlt.probes import (
    HessianOperator,
    hessian_index,
    plot_spectral_density,
    spectral_density,
)

FIGURES = Path(__file__).resolve().parent / "out"


def critical_loss(phi: float) -> float:
    """Pennington & Bahri's epsilon_c(phi) (their eq. for the Wishart + Wigner model)."""
    if phi >= 1:
        return 0.0
    return (1 - 20 * phi - 8 * phi**2 + (1 + 8 * phi) ** 1.5) / 16


def make_net(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 10))


def run(width: int, x, y, steps: int, checkpoints: int, probes: int, lanczos: int) -> dict:
    net = make_net(width, seed=width)
    loss_fn = nn.MSELoss()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    n_params = sum(p.numel() for p in net.parameters())
    phi = n_params / (len(x) * 10)
    record = {"width": width, "phi": phi, "params": n_params, "loss": [], "index": []}
    record["slq_index"] = []
    # checkpoints spaced evenly in log(step): the loss falls fastest early
    spaced = torch.logspace(0, torch.log10(torch.tensor(float(steps))), checkpoints)
    marks = {0, steps, *(int(v) for v in spaced)}
    gen = torch.Generator().manual_seed(0)
    for step in range(steps + 1):
        if step in marks:
            H = HessianOperator(net, loss_fn, (x, y), backend="func", chunk_size=256)
            density = spectral_density(
                H, num_probes=probes, lanczos_steps=min(lanczos, n_params), generator=gen
            )
            dense = H @ torch.eye(n_params)
            exact = torch.linalg.eigvalsh((dense + dense.T).double() / 2)
            loss, _ = H.loss_and_gradient()
            record["loss"].append(loss)
            # eigenvalues within 1e-3 lambda_max of 0 count as zero, as in hessian_index
            floor = 1e-3 * float(exact.abs().max())
            record["index"].append(float((exact < -floor).double().mean()))
            record["slq_index"].append(hessian_index(density))
            record["density"] = density
            record["exact"] = exact
        if step < steps:
            opt.zero_grad()
            loss_fn(net(x), y).backward()
            opt.step()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer nets and checkpoints")
    parser.add_argument("--out", type=Path, default=FIGURES / "hessian_spectrum.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    images, labels = digits()
    x = images[:64].reshape(64, -1)
    y = nn.functional.one_hot(labels[:64], 10).float()
    widths = [2, 8, 16] if args.quick else [2, 4, 8, 16]
    steps = 300 if args.quick else 3000
    checkpoints = 6 if args.quick else 14
    probes, lanczos = (3, 40) if args.quick else (8, 80)
    records = [run(w, x, y, steps, checkpoints, probes, lanczos) for w in widths]

    print(f"{'h':>4} {'params':>7} {'phi':>6} {'eps_c(phi) P&B':>15} {'index at start':>15} "
          f"{'final loss':>11} {'final index':>12} {'loss where index first 0':>25}")  # fmt: skip
    for r in records:
        zero = next((loss for loss, a in zip(r["loss"], r["index"]) if a == 0.0), float("nan"))
        print(
            f"{r['width']:>4} {r['params']:>7} {r['phi']:>6.2f} {critical_loss(r['phi']):>15.4f} "
            f"{r['index'][0]:>15.4f} {r['loss'][-1]:>11.4f} {r['index'][-1]:>12.4f} {zero:>25.4f}"
        )
    for r in records:
        gap = max(abs(a - b) for a, b in zip(r["slq_index"], r["index"]))
        print(
            f"h={r['width']}: SLQ index vs exact, largest difference {gap:.3f}; top eigenvalue "
            f"exact {float(r['exact'][-1]):.4g}, SLQ's largest node "
            f"{float(r['density'].nodes.max()):.4g}"
        )
    print(
        "Pennington & Bahri: alpha falls with the loss and reaches 0 at a critical loss that "
        "decreases as phi grows; the spectrum is a bulk near 0 plus outliers."
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in records:
        label = f"h={r['width']}, phi={r['phi']:.2f}"
        plot_spectral_density(r["density"], ax=ax1, label=label)
        ax2.plot(r["loss"], r["index"], "o-", ms=3, label=label)
    ax1.set_title("Hessian spectral density at the end of training (SLQ)")
    ax1.legend(fontsize=7)
    ax2.set_xscale("log")
    ax2.set_xlabel("training loss epsilon (MSE)")
    ax2.set_ylabel("index alpha (exact fraction of negative eigenvalues)")
    ax2.set_title("index against loss along training")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
