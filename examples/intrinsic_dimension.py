"""Intrinsic dimension of the digits and of LeNet-5's hidden representations.

Hein & Audibert (2005) estimate 8-13 dimensions per MNIST digit class although the images live in
R^784. This measures it per digit with three estimators (Levina & Bickel 2004 k-NN MLE with the
MacKay & Ghahramani 2005 correction; TwoNN, Facco et al. 2017; Hein & Audibert 2005), then trains
LeNet-5 briefly and measures the intrinsic dimension of each layer's representation (the "hunchback"
profile of Ansuini et al. 2019). Reads ../shared/data/mnist.npz relative to the repository root;
falls back to scikit-learn's 8x8 digits, upsampled to 28x28, when it is absent.

    python examples/intrinsic_dimension.py --quick   # ~1 minute on 2 cores
    python examples/intrinsic_dimension.py           # more samples per digit, 2 epochs
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from torch_dlt.data import data_loader, digits, mnist
from torch_dlt.nn import LeNet5
from torch_dlt.probes import representation_dimensions
from torch_dlt.theory import intrinsic_dimension

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"
METHODS = {
    "mle": "MLE (Levina-Bickel / MacKay-Ghahramani)",
    "twonn": "TwoNN",
    "hein": "Hein-Audibert",
}
LAYERS = [
    "features.pool1",
    "features.pool2",
    "classifier.act3",
    "classifier.act4",
    "classifier.fc3",
]


def load(quick: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    if MNIST.exists():
        split = mnist(MNIST, limit=6000 if quick else 20000)
        return split.x_train, split.y_train, f"MNIST ({split.x_train.shape[0]} training images)"
    x, y = digits(size=28)
    return x, y, "scikit-learn digits upsampled to 28x28 (MNIST not found)"


def train(x: torch.Tensor, y: torch.Tensor, epochs: int) -> LeNet5:
    torch.manual_seed(0)
    net = LeNet5()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for xb, yb in data_loader(x, y, batch_size=64, seed=0):
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
    net.eval()
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, one epoch")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "examples" / "out" / "intrinsic_dimension.png"
    )
    args = parser.parse_args()
    per_digit = 600 if args.quick else 2000
    x, y, source = load(args.quick)
    print(f"data: {source}")
    start = time.perf_counter()
    table = {m: [] for m in METHODS}
    for digit in range(10):
        points = x[y == digit][:per_digit].flatten(1).double()
        for method in METHODS:
            table[method].append(intrinsic_dimension(points, method=method))
        row = "  ".join(f"{m} {table[m][-1]:5.1f}" for m in METHODS)
        print(f"digit {digit} ({points.shape[0]} images): {row}")

    net = train(x, y, epochs=1 if args.quick else 2)
    with torch.no_grad():
        accuracy = (net(x[:2000]).argmax(1) == y[:2000]).double().mean().item()
    print(f"LeNet-5 training accuracy {accuracy:.3f}")
    layer_dims = {
        m: representation_dimensions(
            net, x, layers=LAYERS, method=m, max_samples=1000 if args.quick else 3000
        )
        for m in METHODS
    }
    for m, result in layer_dims.items():
        print(m, {k: round(v, 1) for k, v in result.dimensions.items()})
    print(f"{time.perf_counter() - start:.0f} s")

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.27
    for i, (m, label) in enumerate(METHODS.items()):
        left.bar(np.arange(10) + (i - 1) * width, table[m], width, label=label)
    left.axhspan(8, 13, color="grey", alpha=0.15, label="Hein & Audibert 2005: 8-13")
    left.set_xticks(range(10))
    left.set_xlabel("digit")
    left.set_ylabel("intrinsic dimension")
    left.set_title(f"per digit, {per_digit} images each (ambient 784)")
    left.legend(fontsize=7, loc="lower right", framealpha=0.9)
    names = list(next(iter(layer_dims.values())).dimensions)
    for m, label in METHODS.items():
        right.plot(names, list(layer_dims[m].dimensions.values()), "o-", label=label)
    ambient = next(iter(layer_dims.values())).ambient
    right.set_xticks(range(len(names)))
    right.set_xticklabels([f"{n}\n({ambient[n]})" for n in names], fontsize=8)
    right.set_ylabel("intrinsic dimension")
    right.set_title(f"LeNet-5 layers (ambient size), train acc {accuracy:.2f}")
    right.legend(fontsize=8)
    fig.suptitle(f"Intrinsic dimension — {source}", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
