"""Edge of chaos: deep tanh nets train only to a depth of about 6 xi_c.

Schoenholz, Gilmer, Ganguli & Sohl-Dickstein (2017), "Deep information propagation":
random nets with weights N(0, sigma_w2 / fan_in) and biases N(0, sigma_b2) forget the
correlation between two inputs over xi_c layers (``torch_dlt.theory.depth_scales``), and xi_c
diverges on the order-to-chaos line (``torch_dlt.theory.critical_sigma_w2``). Nets deeper than
about 6 xi_c do not train.

This trains fully connected tanh nets on the real 8x8 digits (scikit-learn's 1797 images, 64
inputs, 10 classes) with plain SGD, across a grid of sigma_w2 at sigma_b2 = 0.05 and of depths,
and draws the training accuracy after a fixed number of steps as a heat map, with the curve
depth = 6 xi_c(sigma_w2) over it. All nets of one depth train at once as a batch of matrices.

    python examples/edge_of_chaos.py --quick    # 7 x 6 grid, width 64: ~1 minute on 2 cores
    python examples/edge_of_chaos.py            # 13 x 8 grid, width 96: ~3 minutes
    python examples/edge_of_chaos.py --full     # 25 x 15 grid, width 128: about an hour
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from torch_dlt.data import digits
from torch_dlt.theory import critical_sigma_w2, depth_scales

SIGMA_B2 = 0.05
PRESETS = {
    # name: (sigma_w2 grid, depths, width, SGD steps)
    "quick": (np.linspace(1.0, 4.0, 7), [10, 20, 35, 50, 70, 100], 64, 400),
    "default": (np.linspace(1.0, 4.0, 13), [10, 20, 30, 45, 60, 80, 100, 130], 96, 500),
    "full": (np.linspace(1.0, 4.0, 25), list(range(10, 151, 10)), 128, 800),
}


def random_nets(
    sigma_w2: Tensor, depth: int, width: int, generator: torch.Generator
) -> List[Tuple[Tensor, Tensor]]:
    """One tanh net per entry of sigma_w2 [G]: (weight [G, fan_in, fan_out], bias [G, 1, fan_out])
    per layer, the mean-field initialisation of Schoenholz et al. 2017."""
    nets = sigma_w2.numel()
    sizes = [64] + [width] * depth + [10]
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        std = (sigma_w2 / fan_in).sqrt().view(nets, 1, 1)
        weight = torch.randn(nets, fan_in, fan_out, generator=generator) * std
        bias = torch.randn(nets, 1, fan_out, generator=generator) * math.sqrt(SIGMA_B2)
        layers.append((weight.requires_grad_(), bias.requires_grad_()))
    return layers


def logits(layers: List[Tuple[Tensor, Tensor]], x: Tensor) -> Tensor:
    """x [B, 64] -> logits [G, B, 10] of all G nets."""
    h = x.expand(layers[0][0].shape[0], *x.shape)
    for weight, bias in layers[:-1]:
        h = torch.tanh(torch.baddbmm(bias, h, weight))
    weight, bias = layers[-1]
    return torch.baddbmm(bias, h, weight)


def accuracy(layers: List[Tuple[Tensor, Tensor]], x: Tensor, y: Tensor) -> Tensor:
    """[G] accuracies; a net whose signal blew up to inf / nan counts as wrong."""
    with torch.no_grad():
        out = logits(layers, x)
    correct = (out.argmax(-1) == y) & torch.isfinite(out).all(-1)
    return correct.double().mean(-1)


def train(
    sigma_w2: Tensor,
    depth: int,
    width: int,
    steps: int,
    data: Tuple[Tensor, Tensor, Tensor, Tensor],
    lr: float,
    batch: int,
    seed: int,
) -> Tuple[Tensor, Tensor]:
    """Train G nets of one depth by SGD; returns their (train, test) accuracies [G]."""
    x_train, y_train, x_test, y_test = data
    generator = torch.Generator().manual_seed(seed)
    layers = random_nets(sigma_w2, depth, width, generator)
    params = [p for layer in layers for p in layer]
    for _ in range(steps):
        index = torch.randint(len(x_train), (batch,), generator=generator)
        out = logits(layers, x_train[index])
        per_net = F.cross_entropy(
            out.reshape(-1, 10), y_train[index].repeat(out.shape[0]), reduction="none"
        )
        # each net's own mean loss; the nets share no parameter, so one backward trains all
        loss = per_net.view(out.shape[0], -1).mean(1)
        grads = torch.autograd.grad(torch.nan_to_num(loss).sum(), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * torch.nan_to_num(g)
    return accuracy(layers, x_train, y_train), accuracy(layers, x_test, y_test)


def load_digits() -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits flattened to 64 features, standardised with the training statistics so that
    |x|^2 / 64 ~ 1 (the input length the mean-field maps start from)."""
    x_train, y_train, x_test, y_test = digits(test_fraction=0.2, seed=0)
    x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    mean, std = x_train.mean(0), x_train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # the always-blank border pixels
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="7 x 6 grid, width 64, 400 steps")
    size.add_argument("--full", action="store_true", help="25 x 15 grid, width 128, 800 steps")
    parser.add_argument(
        "--lr-depth",
        type=float,
        default=0.5,
        help="SGD learning rate times depth: near criticality every layer adds O(1) to the "
        "squared gradient norm, so the stable step shrinks like 1 / depth",
    )
    parser.add_argument("--batch", type=int, default=64, help="SGD batch size")
    parser.add_argument("--steps", type=int, default=None, help="SGD steps (preset's default)")
    parser.add_argument("--out", type=Path, default=Path("examples/out/edge_of_chaos.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    preset = "quick" if args.quick else "full" if args.full else "default"
    sigma_w2_grid, depths, width, steps = PRESETS[preset]
    steps = args.steps or steps
    # the vanishing gradients of deep ordered nets are subnormal floats, ~10x slower on CPUs
    torch.set_flush_denormal(True)

    data = load_digits()
    sigma_w2 = torch.tensor(sigma_w2_grid, dtype=torch.float32)
    train_acc = np.zeros((len(depths), len(sigma_w2_grid)))
    test_acc = np.zeros_like(train_acc)
    start = time.perf_counter()
    for row, depth in enumerate(depths):
        lr = args.lr_depth / depth
        tr, te = train(sigma_w2, depth, width, steps, data, lr, args.batch, args.seed + row)
        train_acc[row], test_acc[row] = tr.numpy(), te.numpy()
        print(
            f"depth {depth:4d}: train accuracy "
            + " ".join(f"{a:.2f}" for a in train_acc[row])
            + f"   ({time.perf_counter() - start:.0f} s)"
        )

    critical = critical_sigma_w2("tanh", SIGMA_B2)
    fine = np.linspace(sigma_w2_grid[0], sigma_w2_grid[-1], 61)
    xi_c = np.array([depth_scales("tanh", s, SIGMA_B2)[1] for s in fine])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    mesh = ax.pcolormesh(
        sigma_w2_grid, depths, train_acc, shading="nearest", cmap="viridis", vmin=0.0, vmax=1.0
    )
    fig.colorbar(mesh, ax=ax, label=f"training accuracy after {steps} SGD steps")
    top = depths[-1] + 0.5 * (depths[-1] - depths[-2])
    ax.plot(fine, np.minimum(6 * xi_c, 10 * top), "w-", lw=2, label=r"$6\,\xi_c$")
    ax.axvline(critical, color="w", ls="--", lw=1, label=rf"critical $\sigma_w^2$ = {critical:.3f}")
    ax.set_ylim(depths[0] - 0.5 * (depths[1] - depths[0]), top)
    ax.set_xlabel(r"$\sigma_w^2$")
    ax.set_ylabel("depth (tanh layers)")
    ax.set_title(rf"tanh MLPs on digits, width {width}, $\sigma_b^2$ = {SIGMA_B2}")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.6)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)

    print(f"critical sigma_w2 (tanh, sigma_b2={SIGMA_B2}): {critical:.4f}")
    print("sigma_w2   6 xi_c   deepest net with training accuracy > 0.5")
    for column, s in enumerate(sigma_w2_grid):
        trained = [d for d, a in zip(depths, train_acc[:, column]) if a > 0.5]
        print(
            f"{s:8.2f} {6 * depth_scales('tanh', s, SIGMA_B2)[1]:8.1f}   {max(trained, default=0)}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
