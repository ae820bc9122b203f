"""Scattering + a learned linear classifier or small MLP: "learn only the final layers".

Bruna & Mallat (2013), "Invariant scattering convolution networks" (IEEE TPAMI 35(8)), classify
MNIST digits from a fixed second-order wavelet scattering (Morlet wavelets, L = 8 orientations)
with a Gaussian-kernel SVM or an affine PCA classifier; their best MNIST test error with all
60,000 training digits is 0.43% (their Table 4, which also reports smaller training sets). Here
the same fixed front (torch_dlt.nn.Scattering2D, J = 2 and 3, L = 8, order 2; the coefficients
computed once per image) feeds a learned head, log-normalised and batch-normalised (Oyallon,
Belilovsky & Zagoruyko 2017): a linear layer, or an MLP with one hidden layer of 256 ReLUs,
trained with Adam. Nothing before the head is trained.

Data: the 8x8 scikit-learn digits resized to 16x16 (1438 train / 359 test), and MNIST from
../shared/data/mnist.npz when present (the full run trains on the first 20,000 training digits
to stay within ~10 minutes on one thread; --n-train 60000 for all of them; the 10,000 test
digits are all used). Our heads are not the paper's classifiers, and with fewer training digits
and no SVM the errors are expected above 0.43%: the figure is printed beside ours, not as a
target we claim to meet.

    python examples/scattering_mnist.py --quick   # ~25 s of CPU: digits, 2,000 MNIST digits
    python examples/scattering_mnist.py           # 5-10 min at 1 thread on an idle core
                                                  # (25 min wall on a loaded shared machine)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from torch_dlt.data import digits, mnist  # noqa: E402
from torch_dlt.nn import ScatteringNet  # noqa: E402

MNIST_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"
FIGURE = Path(__file__).resolve().parent / "out" / "scattering_mnist.png"
BRUNA_MALLAT_2013_MNIST_ERROR = 0.43  # percent, 60,000 training digits, their Table 4


def scattering_coefficients(net: ScatteringNet, x: Tensor, batch: int = 256) -> Tensor:
    with torch.no_grad():
        return torch.cat([net.scattering(x[i : i + batch]) for i in range(0, len(x), batch)])


def train_head(
    net: ScatteringNet, s_train: Tensor, y_train: Tensor, *, epochs: int, seed: int
) -> None:
    """Adam on the head only (BatchNorm + classifier), minibatches of 128, cosine step decay."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(
        [p for p in net.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4
    )
    steps = epochs * ((len(s_train) + 127) // 128)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(s_train), generator=generator)
        for i in range(0, len(order), 128):
            index = order[i : i + 128]
            optimizer.zero_grad()
            F.cross_entropy(net.classify(s_train[index]), y_train[index]).backward()
            optimizer.step()
            schedule.step()
    net.eval()


def test_error(net: ScatteringNet, s: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        predictions = torch.cat(
            [net.classify(s[i : i + 1024]).argmax(1) for i in range(0, len(s), 1024)]
        )
    return 100.0 * (predictions != y).double().mean().item()


def run(name: str, split, js: tuple[int, ...], epochs: int) -> list[dict]:
    x_train, y_train, x_test, y_test = split
    shape = tuple(x_train.shape[-2:])
    rows = []
    for J in js:
        front = ScatteringNet(J, shape)
        t0 = time.perf_counter()
        s_train = scattering_coefficients(front, x_train)
        s_test = scattering_coefficients(front, x_test)
        seconds = time.perf_counter() - t0
        for head, hidden in (("linear", None), ("MLP-256", 256)):
            torch.manual_seed(0)
            net = ScatteringNet(J, shape, hidden=hidden, normalization="log+batchnorm")
            train_head(net, s_train, y_train, epochs=epochs, seed=0)
            error = test_error(net, s_test, y_test)
            rows.append(
                {
                    "data": name,
                    "J": J,
                    "head": head,
                    "features": s_train[0].numel(),
                    "n_train": len(x_train),
                    "error": error,
                }
            )
            print(
                f"{name:>14}  J={J}  {head:>8}: test error {error:5.2f}%  "
                f"({s_train[0].numel()} features, {len(x_train)} training images, "
                f"scattering of {len(x_train) + len(x_test)} images in {seconds:.1f} s)"
            )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    names = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["data"] == name]
        labels = [f"J={r['J']}\n{r['head']}" for r in mine]
        ax.bar(labels, [r["error"] for r in mine], color=["C0", "C1"] * (len(mine) // 2))
        for i, r in enumerate(mine):
            ax.text(i, r["error"], f"{r['error']:.2f}", ha="center", va="bottom", fontsize=8)
        if name.startswith("MNIST"):
            ax.axhline(
                BRUNA_MALLAT_2013_MNIST_ERROR,
                color="k",
                ls="--",
                lw=1,
                label="Bruna & Mallat 2013, 60k train: 0.43%",
            )
            ax.legend(fontsize=8, loc="upper right")
        ax.set_title(f"{name} ({mine[0]['n_train']} training images)")
        ax.set_ylabel("test error (%)")
    fig.suptitle("Fixed scattering (L=8, order 2) + learned head")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"figure -> {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a < 1 min smoke run")
    parser.add_argument("--n-train", type=int, default=20000, help="MNIST training digits")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=FIGURE)
    args = parser.parse_args()
    n_train = 2000 if args.quick else args.n_train
    epochs = 5 if args.quick else args.epochs
    rows = run("digits 16x16", digits(size=16, test_fraction=0.2, seed=0), (2, 3), epochs * 4)
    if MNIST_PATH.exists():
        split = mnist(MNIST_PATH, limit=max(n_train, 1000 if args.quick else 10000))
        split = type(split)(
            split.x_train[:n_train], split.y_train[:n_train], split.x_test, split.y_test
        )
        rows += run("MNIST", split, (2, 3), epochs)
        print(
            f"Bruna & Mallat (2013, Table 4): {BRUNA_MALLAT_2013_MNIST_ERROR}% with 60,000 "
            "training digits (Gaussian SVM / PCA classifier)"
        )
    else:
        print(f"no MNIST at {MNIST_PATH}: digits only")
    plot(rows, args.out)


if __name__ == "__main__":
    main()
