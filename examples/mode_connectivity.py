"""Mode connectivity: two independently trained nets are joined by a curve of low loss.

Two copies of the same BatchNorm MLP, trained from different seeds on the real 8x8 digits, are
different minima: the straight segment between their weights crosses a ridge of high loss and
error. A quadratic Bezier curve with one trained bend (Garipov, Izmailov, Podoprikhin, Vetrov &
Wilson 2018, "Loss surfaces, mode connectivity, and fast ensembling of DNNs"; Draxler et al.
2018) joins the same two endpoints with train and test loss nearly as low as at the endpoints
all along, as Venturi, Bandeira & Bruna (2016) predict for over-parameterised nets. At every
point of both paths the BatchNorm statistics are recomputed on the training set, as Garipov et
al. do.

    OMP_NUM_THREADS=1 python examples/mode_connectivity.py --quick   # ~10 s
    OMP_NUM_THREADS=1 python examples/mode_connectivity.py           # ~15 s

(Thousands of tiny matrix products: one thread is as fast, and avoids spinning threads on a
shared machine.)
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_dlt.data import data_loader, digits
from torch_dlt.probes import curve_loss_profile, find_curve, linear_barrier


def make_net(seed: int, width: int) -> nn.Sequential:
    """64 -> width -> width -> 10, each hidden layer Linear -> BatchNorm -> ReLU."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def train(net: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int) -> nn.Module:
    """Plain SGD with momentum and a cosine step decay, to a near-zero training loss."""
    loader = data_loader(x, y, batch_size=64, seed=seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    net.train()
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            optimizer.step()
            schedule.step()
    return net


def flat(weights: dict[str, Tensor]) -> Tensor:
    return torch.cat([w.flatten() for w in weights.values()]).double()


def plane_losses(
    net: nn.Module, curve, x: Tensor, y: Tensor, size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Train loss on the plane through w1, w2 and the bend (Garipov et al. 2018, Fig. 1).

    Coordinates (in units of |w2 - w1|) in the orthonormal basis u = (w2 - w1)/|w2 - w1|, v =
    the bend's part orthogonal to u; the grid spans the curve; the BatchNorm statistics are
    recomputed at every grid point (full batch). Returns the u and v grids [G], the losses
    [G, G] (rows: v) and the curve's (u, v) points.
    """
    w1, w2, bend = flat(curve.start), flat(curve.end), flat(curve.bend)
    u = (w2 - w1) / (w2 - w1).norm()
    v = (bend - w1) - ((bend - w1) @ u) * u
    v = v / v.norm()
    scale = (w2 - w1).norm()
    ts = torch.linspace(0, 1, 41)
    points = torch.stack([flat(curve.weights(float(t))) - w1 for t in ts])
    cu, cv = (points @ u) / scale, (points @ v) / scale
    grid_u = torch.linspace(-0.2, 1.2, size)
    grid_v = torch.linspace(-1.0, 2.0, size) * float(cv.max())
    model = copy.deepcopy(net)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    losses = torch.empty(size, size)
    with torch.no_grad():
        for i, b in enumerate(grid_v):
            for j, a in enumerate(grid_u):
                torch.nn.utils.vector_to_parameters(
                    (w1 + scale * (a * u + b * v)).float(), model.parameters()
                )
                for m in norms:
                    m.reset_running_stats()
                    m.momentum = None
                model.train()
                model(x)
                model.eval()
                losses[i, j] = F.cross_entropy(model(x), y)
    return grid_u, grid_v, losses, cu, cv


def error_rate(outputs: Tensor, targets: Tensor) -> Tensor:
    """The 0-1 loss of a batch, a valid ``loss_fn`` for the profiles."""
    return (outputs.argmax(1) != targets).double().mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and points (~1 min)")
    parser.add_argument("--out", default="examples/out/mode_connectivity.png")
    args = parser.parse_args()
    start = time.time()

    width = 64
    net_epochs, curve_epochs, points = (40, 40, 11) if args.quick else (80, 120, 21)
    x_train, y_train, x_test, y_test = digits(test_fraction=0.2)
    nets = [train(make_net(seed, width), x_train, y_train, net_epochs, seed) for seed in (0, 1)]
    loader = data_loader(x_train, y_train, batch_size=64, seed=2)
    # BatchNorm statistics: one pass in big batches, as the endpoints' would be estimated.
    bn_data = data_loader(x_train, y_train, batch_size=256, shuffle=False)

    curve = find_curve(
        *nets, F.cross_entropy, loader, curve="bezier", epochs=curve_epochs, lr=0.02, seed=3
    )
    plane = plane_losses(nets[0], curve, x_train, y_train, 21 if args.quick else 41)
    profiles = {}
    for path in ("line", "bezier"):
        for split, data in (("train", (x_train, y_train)), ("test", (x_test, y_test))):
            for measure, loss_fn in (("loss", F.cross_entropy), ("error", error_rate)):
                if path == "line":
                    profile = linear_barrier(
                        *nets, loss_fn, data, steps=points, recompute_bn=bn_data, progress=False
                    )
                else:
                    profile = curve_loss_profile(
                        curve, loss_fn, data, steps=points, recompute_bn=bn_data, progress=False
                    )
                profiles[path, split, measure] = profile

    print(
        f"{'path':<8}{'split':<7}{'measure':<8}{'endpoints':>20}{'max on path':>13}{'barrier':>10}"
    )
    for (path, split, measure), p in profiles.items():
        ends = f"{float(p.losses[0]):.4f} / {float(p.losses[-1]):.4f}"
        print(
            f"{path:<8}{split:<7}{measure:<8}{ends:>20}{float(p.losses.max()):>13.4f}"
            f"{p.barrier:>10.4f}"
        )
    plot(profiles, plane, Path(args.out))
    print(f"wrote {args.out} in {time.time() - start:.0f} s")


def plot(profiles: dict, plane: tuple, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colours = {"line": "tab:red", "bezier": "tab:blue"}
    labels = {"line": "straight segment", "bezier": "trained Bezier curve"}
    for ax, measure in zip(axes[:2], ("loss", "error")):
        for path in ("line", "bezier"):
            for split, style in (("train", "-"), ("test", "--")):
                p = profiles[path, split, measure]
                ax.plot(
                    p.ts,
                    p.losses,
                    style,
                    color=colours[path],
                    marker="o",
                    markersize=3,
                    label=f"{labels[path]}, {split} (barrier {p.barrier:.3f})",
                )
        ax.set_xlabel("t (0: net A, 1: net B)")
        ax.set_ylabel("cross-entropy" if measure == "loss" else "error rate")
        ax.set_title(f"{measure} along the two paths (BN statistics recomputed)")
        ax.legend(fontsize=7)
    grid_u, grid_v, losses, cu, cv = plane
    levels = torch.logspace(-3, 0.5, 22).numpy()
    contour = axes[2].contourf(
        grid_u,
        grid_v,
        losses.clamp(levels[0], levels[-1]),
        levels=levels,
        norm=matplotlib.colors.LogNorm(),
        cmap="viridis",
    )
    fig.colorbar(contour, ax=axes[2], label="train cross-entropy")
    axes[2].plot(cu, cv, color="white", lw=2, label="trained Bezier curve")
    axes[2].plot([0, 1], [0, 0], color="tab:red", lw=2, label="straight segment")
    axes[2].plot([0, 1], [0, 0], "o", color="white", markeredgecolor="black")
    axes[2].set_xlabel("u: along w_B - w_A (units of |w_B - w_A|)")
    axes[2].set_ylabel("v: towards the bend")
    axes[2].set_title("train loss on the plane of w_A, w_B and the bend")
    axes[2].legend(fontsize=7, loc="upper right")
    fig.suptitle(
        "Mode connectivity (Garipov et al. 2018) of two BatchNorm MLPs on the 8x8 digits",
        fontsize=11,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
