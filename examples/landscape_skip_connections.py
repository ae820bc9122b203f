"""Skip connections and deep loss landscapes: plain vs residual CNNs, with/without BN.

Li, Xu, Taylor, Studer & Goldstein (2018), "Visualizing the loss landscape of neural nets",
Sec. 5 / Fig. 5: as a plain CNN gets deeper its loss surface, seen along two filter-normalised
random directions, turns from convex-looking to chaotic; the same network with the identity
shortcuts of He et al. (2016) keeps a wide, nearly convex basin. Here four nets of the same
depth (a stem convolution, residual-style blocks of two 3x3 convolutions, global pooling, a
linear head; 25 convolutions by default, 11 with --quick), on the real 8x8 digits:

    plain            x -> relu(conv(relu(conv(x))))
    residual         x -> relu(x + conv(relu(conv(x))))
    plain + BN       x -> relu(bn(conv(relu(bn(conv(x))))))
    residual + BN    x -> relu(x + bn(conv(relu(bn(conv(x))))))

are trained briefly with the same Adam schedule (SGD at one step size leaves the deep plain net
without BatchNorm at chance), then the training loss is evaluated on the plane
``w + alpha d1 + beta d2`` (surface_2d, eval mode so BatchNorm uses its running statistics;
BatchNorm parameters and biases are not moved, as in Li et al.) and drawn as contours on the same
levels. Without BatchNorm nothing undoes a filter-normalised step of size 1 in each of 25 layers,
so the plane spans [-0.25, 0.25] (``--span``) rather than Li et al.'s [-1, 1].

Non-convexity is measured as in Li et al.'s Sec. 6, on the surface itself: at every interior grid
point the principal curvatures ``lambda_min <= lambda_max`` (eigenvalues of the central-difference
Hessian of the 2-D surface) give the share of points where the surface is not convex
(``lambda_min < 0``) and the mean of ``|lambda_min / lambda_max|`` there (0 where convex), both
over the basin below the top contour level, where the saturating loss has not yet bent over.

    python examples/landscape_skip_connections.py --quick   # < 1 min
    python examples/landscape_skip_connections.py           # ~10 min on a busy 2-core machine
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_dlt.data import data_loader, digits
from torch_dlt.probes import plot_contour, random_direction, surface_2d

# Contour levels of every panel; the non-convexity measures look below the top one.
LEVELS = torch.linspace(0.25, 5.0, 20).tolist()


class Block(nn.Module):
    """Two 3x3 convolutions (each optionally followed by BatchNorm), with or without shortcut."""

    def __init__(self, width: int, *, residual: bool, batch_norm: bool) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=not batch_norm)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(width) if batch_norm else nn.Identity()
        self.bn2 = nn.BatchNorm2d(width) if batch_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(x + out if self.residual else out)


def make_net(width: int, blocks: int, *, residual: bool, batch_norm: bool) -> nn.Sequential:
    """1 + 2 * blocks convolutions of ``width`` channels on [B, 1, 8, 8], then pool and head."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        *[Block(width, residual=residual, batch_norm=batch_norm) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    )
    # He et al.'s (2015) ReLU initialisation, as in the ResNets Li et al. plot; PyTorch's default
    # convolution init shrinks the signal layer by layer and leaves the plain nets untrainable.
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return net


def train(net: nn.Module, x: Tensor, y: Tensor, epochs: int) -> float:
    """Adam with a cosine step decay; returns the final full training loss."""
    loader = data_loader(x, y, batch_size=64, seed=0)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    net.train()
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(net(xb), yb)
            loss.backward()
            # Plain deep nets can blow up in the first steps; the clip keeps all four trainable
            # with one schedule.
            nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            optimizer.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        return float(F.cross_entropy(net(x), y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shallower, coarser grid (~1 min)")
    parser.add_argument("--out", default="examples/out/landscape_skip_connections.png")
    parser.add_argument("--width", type=int, help="channels per convolution (default 8 / 16)")
    parser.add_argument("--blocks", type=int, help="residual-style blocks (default 5 / 12)")
    parser.add_argument("--span", type=float, default=0.25, help="alpha, beta in [-span, span]")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    start = time.time()

    width, blocks, epochs, steps, n_eval = (
        (8, 5, 8, 15, 256) if args.quick else (16, 12, 12, 25, 512)
    )
    width = args.width or width
    blocks = args.blocks or blocks
    x_train, y_train, x_test, y_test = digits(test_fraction=0.2)
    # A fixed subset of the training set: the surface costs steps**2 passes over it.
    eval_data = (x_train[:n_eval], y_train[:n_eval])
    surfaces, summary = {}, {}
    for batch_norm in (False, True):
        for residual in (False, True):
            name = ("residual" if residual else "plain") + (" + BN" if batch_norm else "")
            t0 = time.time()
            net = make_net(width, blocks, residual=residual, batch_norm=batch_norm)
            train_loss = train(net, x_train, y_train, epochs)
            with torch.no_grad():
                test_error = float((net(x_test).argmax(1) != y_test).double().mean())
            t1 = time.time()
            gen = torch.Generator().manual_seed(1)
            directions = [random_direction(net, generator=gen) for _ in range(2)]
            span = (-args.span, args.span)
            surface = surface_2d(
                net, F.cross_entropy, eval_data, directions, span=span, steps=steps
            )
            surfaces[name] = surface
            centre = float(surface.losses[steps // 2, steps // 2])
            summary[name] = (train_loss, test_error, centre, surface.losses)
            print(
                f"{name:<15} train loss {train_loss:.4f}, test error {test_error:.3f}; "
                f"train {t1 - t0:.0f} s, surface {time.time() - t1:.0f} s"
            )
    print(f"\n{'net':<15}{'centre':>9}{'median':>9}{'max':>10}{'nonconvex':>11}{'|lmin/lmax|':>13}")
    for name, (_, _, centre, losses) in summary.items():
        share, ratio = nonconvexity(losses, 2 * args.span / (steps - 1))
        print(
            f"{name:<15}{centre:>9.3f}{float(losses.median()):>9.3f}{float(losses.max()):>10.3g}"
            f"{share:>11.3f}{ratio:>13.3f}"
        )
    print(
        "Li et al. (2018): deep plain nets non-convex (large |lmin/lmax| over wide regions), "
        "residual nets convex (near 0 around the minimum)"
    )
    plot(surfaces, summary, Path(args.out), 1 + 2 * blocks, width)
    print(f"wrote {args.out} in {time.time() - start:.0f} s")


def principal_curvatures(losses: Tensor, spacing: float) -> tuple[Tensor, Tensor]:
    """Eigenvalues ``lambda_min <= lambda_max`` of the surface's central-difference Hessian at
    every interior grid point, each ``[steps - 2, steps - 2]``."""
    centre = losses[1:-1, 1:-1]
    f_aa = (losses[2:, 1:-1] - 2 * centre + losses[:-2, 1:-1]) / spacing**2
    f_bb = (losses[1:-1, 2:] - 2 * centre + losses[1:-1, :-2]) / spacing**2
    f_ab = (losses[2:, 2:] - losses[2:, :-2] - losses[:-2, 2:] + losses[:-2, :-2]) / (
        4 * spacing**2
    )
    mean = (f_aa + f_bb) / 2
    radius = torch.sqrt(((f_aa - f_bb) / 2) ** 2 + f_ab**2)
    return mean - radius, mean + radius


def nonconvexity(losses: Tensor, spacing: float, level: float = LEVELS[-1]) -> tuple[float, float]:
    """Share of basin points (loss below ``level``) where the surface is not convex, and the
    mean there of Li et al.'s ``|lambda_min / lambda_max|``, counted 0 at convex points."""
    low, high = principal_curvatures(losses, spacing)
    basin = losses[1:-1, 1:-1] < level
    if not bool(basin.any()):
        return float("nan"), float("nan")
    concave = low < 0
    ratio = torch.where(concave, (low.abs() / high.abs().clamp_min(1e-12)).clamp(max=1.0), 0.0)
    return float(concave[basin].double().mean()), float(ratio[basin].mean())


def plot(surfaces: dict, summary: dict, out: Path, depth: int, width: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(surfaces), figsize=(4.6 * len(surfaces), 4.6))
    for ax, (name, surface) in zip(axes, surfaces.items()):
        plot_contour(surface, ax=ax, levels=LEVELS)
        train_loss, test_error, _, losses = summary[name]
        spacing = float(surface.alphas[1] - surface.alphas[0])
        share, ratio = nonconvexity(losses, spacing)
        ax.plot(0, 0, "*", color="tab:red", markersize=10)
        ax.set_aspect("equal")
        ax.set_title(
            f"{name}\ntrain loss {train_loss:.3f}, test error {test_error:.3f}\n"
            f"non-convex share {share:.2f}, mean |lmin/lmax| {ratio:.3f}",
            fontsize=9,
        )
    fig.suptitle(
        f"Training loss on two filter-normalised random directions (Li et al. 2018), "
        f"{depth}-conv nets of width {width}, 8x8 digits",
        fontsize=11,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
