"""Small- vs large-batch minima: sharpness, and what filter normalisation does to it.

Keskar, Mudigere, Nocedal, Smelyanskiy & Tang (2017), "On large-batch training for deep
learning: generalization gap and sharp minima", find that large-batch SGD ends in sharper minima
that generalise worse. Li, Xu, Taylor, Studer & Goldstein (2018), "Visualizing the loss
landscape of neural nets", point out that sharpness seen along raw directions depends on the
scale of the weights (which batch size and weight decay change), and plot along filter-normalised
random directions instead, so that widths of different minima can be compared.

The same ReLU MLP, from the same initialisation, is trained with SGD (momentum 0.9, the same step,
no weight decay) with a small batch and with the full batch until the training loss falls below
the same target. Per data set (the 8x8 digits, and a subset of MNIST when
../shared/data/mnist.npz is there) the figure shows: the linear interpolation between the two
minima (Keskar et al. Fig. 3, Li et al. Fig. 2), both minima along one raw (unnormalised, unit
length) random direction, and along filter-normalised random directions drawn with the same
seed, with train (solid) and test (dashed) loss. It prints Keskar et al.'s epsilon-sharpness and
the top Hessian eigenvalue of each minimum.

    python examples/landscape_batch_size.py --quick   # ~1 min on 2 cores
    python examples/landscape_batch_size.py           # a few minutes
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_dlt.data import data_loader, digits, mnist
from torch_dlt.probes import (
    epsilon_sharpness,
    random_direction,
    slice_1d,
    top_hessian_eigenvalue,
)

MNIST_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"
DIRECTION_SEED = 1


def make_net(in_features: int, width: int, seed: int) -> nn.Sequential:
    """in_features -> width -> width -> 10, ReLU."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def full_loss(net: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(net(x), y))


def error_rate(net: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) != y).double().mean())


def train_to_loss(
    net: nn.Module, x: Tensor, y: Tensor, batch_size: int, target: float, max_epochs: int
) -> int:
    """SGD until the full training loss is below ``target``; returns the epochs used."""
    loader = data_loader(x, y, batch_size=batch_size, seed=0)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(1, max_epochs + 1):
        net.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            optimizer.step()
        net.eval()
        if full_loss(net, x, y) < target:
            return epoch
    return max_epochs


def weight_norm(net: nn.Module) -> float:
    return float(torch.sqrt(sum(p.detach().square().sum() for p in net.parameters())))


def unit_direction(net: nn.Module) -> list[Tensor]:
    """The raw Gaussian direction of ``DIRECTION_SEED`` scaled to unit length (the same vector
    for every net of this architecture)."""
    d = random_direction(
        net, normalization="none", generator=torch.Generator().manual_seed(DIRECTION_SEED)
    )
    norm = torch.sqrt(sum(t.square().sum() for t in d))
    return [t / norm for t in d]


def study(name: str, split: tuple, *, width: int, small: int, target: float, quick: bool) -> dict:
    x_train, y_train, x_test, y_test = split
    nets, epochs = {}, {}
    for label, batch in (("small", small), ("large", len(x_train))):
        net = make_net(x_train[0].numel(), width, seed=0)
        t0 = time.time()
        epochs[label] = train_to_loss(net, x_train, y_train, batch, target, 4000)
        nets[label] = net
        print(
            f"[{name}] batch {batch:>5}: {epochs[label]} epochs to train loss < {target} "
            f"({time.time() - t0:.0f} s)"
        )
    steps = 31 if quick else 61
    train_data, test_data = (x_train, y_train), (x_test, y_test)
    result = {"name": name, "nets": nets, "epochs": epochs, "batch": {"small": small}}
    result["batch"]["large"] = len(x_train)
    result["interp"] = {
        split_name: slice_1d(
            nets["small"], F.cross_entropy, data, nets["large"], span=(-0.5, 1.5), steps=steps
        )
        for split_name, data in (("train", train_data), ("test", test_data))
    }
    # The raw direction spans the same absolute distance for both nets.
    radius = 2.0 * min(weight_norm(n) for n in nets.values())
    result["radius"] = radius
    result["raw"], result["filter"], result["numbers"] = {}, {}, {}
    hessian_data = (x_train[:2000], y_train[:2000])
    for label, net in nets.items():
        raw = unit_direction(net)
        filt = random_direction(net, generator=torch.Generator().manual_seed(DIRECTION_SEED))
        for split_name, data in (("train", train_data), ("test", test_data)):
            result["raw"][label, split_name] = slice_1d(
                net, F.cross_entropy, data, raw, span=(-radius, radius), steps=steps
            )
            result["filter"][label, split_name] = slice_1d(
                net, F.cross_entropy, data, filt, span=(-1.0, 1.0), steps=steps
            )
        sharp = epsilon_sharpness(
            net,
            F.cross_entropy,
            train_data,
            epsilon=1e-3,
            steps=10 if quick else 20,
            generator=torch.Generator().manual_seed(2),
        )
        top = top_hessian_eigenvalue(
            net,
            F.cross_entropy,
            hessian_data,
            iters=30 if quick else 100,
            tol=1e-4,
            generator=torch.Generator().manual_seed(3),
        )
        result["numbers"][label] = {
            "train loss": full_loss(net, x_train, y_train),
            "test loss": full_loss(net, x_test, y_test),
            "test error": error_rate(net, x_test, y_test),
            "|w|": weight_norm(net),
            "eps-sharpness": sharp.sharpness,
            "top Hessian eig": top.eigenvalue,
        }
    return result


def print_summary(result: dict) -> None:
    numbers = result["numbers"]
    print(f"\n[{result['name']}]")
    print(f"{'':<18}" + "".join(f"{'batch ' + str(result['batch'][k]):>14}" for k in numbers))
    print(f"{'epochs':<18}" + "".join(f"{result['epochs'][k]:>14}" for k in numbers))
    for key in next(iter(numbers.values())):
        print(f"{key:<18}" + "".join(f"{numbers[k][key]:>14.4g}" for k in numbers))
    for kind in ("raw", "filter"):
        for label in numbers:
            curve = result[kind][label, "train"]
            print(
                f"{kind} direction, batch {result['batch'][label]}: train loss at the ends of "
                f"the slice {float(curve.losses[0]):.3g} / {float(curve.losses[-1]):.3g}, "
                f"width where train loss < 0.1: {width_below(curve, 0.1):.3g}"
            )


def width_below(curve, level: float) -> float:
    """Length of the connected interval around alpha = 0 where the loss stays below ``level``."""
    alphas, losses = curve.alphas, curve.losses
    centre = int(alphas.abs().argmin())
    lo = hi = centre
    while lo > 0 and losses[lo - 1] < level:
        lo -= 1
    while hi < len(losses) - 1 and losses[hi + 1] < level:
        hi += 1
    return float(alphas[hi] - alphas[lo])


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 3, figsize=(16, 4.4 * len(results)), squeeze=False)
    colours = {"small": "tab:blue", "large": "tab:red"}
    for row, result in zip(axes, results):
        name, numbers, batch = result["name"], result["numbers"], result["batch"]
        ax = row[0]
        for split_name, style in (("train", "-"), ("test", "--")):
            curve = result["interp"][split_name]
            ax.semilogy(curve.alphas, curve.losses, style, color="black", label=split_name)
        ax.axvline(0, color=colours["small"], lw=0.8)
        ax.axvline(1, color=colours["large"], lw=0.8)
        ax.set_xlabel(f"alpha (0: batch {batch['small']}, 1: batch {batch['large']})")
        ax.set_ylabel("cross-entropy")
        ax.set_title(f"{name}\nlinear interpolation between the two minima", fontsize=10)
        ax.legend(fontsize=8)
        for ax, kind, xlabel in (
            (row[1], "raw", "distance along one raw unit direction"),
            (row[2], "filter", "alpha along filter-normalised direction"),
        ):
            for label in ("small", "large"):
                for split_name, style in (("train", "-"), ("test", "--")):
                    curve = result[kind][label, split_name]
                    n = numbers[label]
                    text = f"batch {batch[label]}, {split_name}"
                    if split_name == "train":
                        text += (
                            f" (eps-sharpness {n['eps-sharpness']:.3g}, "
                            f"top eig {n['top Hessian eig']:.3g}, |w| {n['|w|']:.1f})"
                        )
                    else:
                        text += f" (test error {n['test error']:.3f})"
                    ax.semilogy(curve.alphas, curve.losses, style, color=colours[label], label=text)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("cross-entropy")
            ax.set_title(f"{name}\n{kind} random direction (same seed for both)", fontsize=10)
            ax.legend(fontsize=6.5, loc="upper center")
            ax.set_ylim(top=ax.get_ylim()[1] * 20)
    fig.suptitle(
        "Small- vs large-batch minima (Keskar et al. 2017) seen along raw and filter-normalised "
        "directions (Li et al. 2018)",
        fontsize=11,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer points, smaller MNIST subset (~1 min)"
    )
    parser.add_argument("--out", default="examples/out/landscape_batch_size.png")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    start = time.time()

    target = 0.01
    results = [
        study(
            "8x8 digits",
            digits(test_fraction=0.2),
            width=128,
            small=32,
            target=target,
            quick=args.quick,
        )
    ]
    if MNIST_PATH.exists():
        limit = 2000 if args.quick else 5000
        split = mnist(MNIST_PATH, limit=limit)
        results.append(
            study(
                f"MNIST (first {limit} train / test)",
                split,
                width=256,
                small=32,
                target=target,
                quick=args.quick,
            )
        )
    else:
        print(f"{MNIST_PATH} not found: the MNIST row is left out")
    for result in results:
        print_summary(result)
    plot(results, Path(args.out))
    print(f"wrote {args.out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
