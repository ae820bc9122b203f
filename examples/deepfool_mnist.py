"""DeepFool's robustness measure rho_adv of LeNet-5 on MNIST, beside the paper's.

Moosavi-Dezfooli, Fawzi & Frossard (2016), Table 1, report rho_adv = mean ||r(x)||_2 / ||x||_2
= 2.0e-1 for LeNet on MNIST (1% test error), where r(x) is DeepFool's perturbation. This trains
LeNet-5 (ReLU, max pooling, as in Caffe's LeNet the paper used) on MNIST, runs DeepFool (L2,
overshoot 0.02) on the model's own predictions over test images and reports rho_adv with the
[0, 1] pixel box kept (with and without the final refinement along the perturbation, see
torch_dlt.robust.attacks.deepfool) and without the box, plus the Linf version. Reads
../shared/data/mnist.npz relative to the repository root; falls back to scikit-learn's digits
upsampled to 28x28.

    python examples/deepfool_mnist.py --quick   # ~1 minute on 2 cores
    python examples/deepfool_mnist.py           # 3 epochs on 60000 images, 2000 test images
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from torch_dlt.data import data_loader, digits, mnist
from torch_dlt.nn import LeNet5
from torch_dlt.robust.attacks import deepfool, robustness

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"
PAPER_RHO = 0.20  # Moosavi-Dezfooli et al. 2016, Table 1, LeNet on MNIST


def load(quick: bool) -> tuple[torch.Tensor, ...]:
    if MNIST.exists():
        split = mnist(MNIST, limit=10000 if quick else None)
        return (*split, "MNIST")
    split = digits(size=28, test_fraction=0.25)
    return (*split, "scikit-learn digits upsampled to 28x28 (MNIST not found)")


def train(x: torch.Tensor, y: torch.Tensor, epochs: int) -> LeNet5:
    torch.manual_seed(0)
    net = LeNet5(activation="relu", pooling="max")
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = 0.05 * 0.3**epoch
        for xb, yb in data_loader(x, y, batch_size=64, seed=epoch):
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch on 10000 images, 200 tests")
    parser.add_argument("--out", default=str(ROOT / "examples" / "out"), help="figure folder")
    args = parser.parse_args()
    start = time.perf_counter()
    x_train, y_train, x_test, y_test, source = load(args.quick)
    net = train(x_train, y_train, epochs=1 if args.quick else 3)
    n_test = 200 if args.quick else 2000
    x, y = x_test[:n_test], y_test[:n_test]
    with torch.no_grad():
        error = float((net(x).argmax(1) != y).float().mean())
    print(f"{source}: LeNet-5 trained, test error {100 * error:.2f}% on {n_test} test images")

    loader = data_loader(x, y, batch_size=500, shuffle=False)
    rows = {}
    for name, kwargs in (
        ("L2, [0, 1] box", dict(norm=2)),
        ("L2, box, unrefined", dict(norm=2, refine=False)),
        ("L2, no box", dict(norm=2, domain=None)),
        ("Linf, [0, 1] box", dict(norm="linf")),
    ):
        t0 = time.perf_counter()
        report = robustness(net, loader, "deepfool", **kwargs)
        seconds = time.perf_counter() - t0
        rows[name] = report
        print(
            f"DeepFool {name:>18}: rho_adv = {report.rho_adv:.3f}, success "
            f"{100 * report.success_rate:.1f}%, median ||r|| {report.median_norm:.3f}, "
            f"{1000 * seconds / n_test:.1f} ms per image"
        )
    print(
        f"paper (Moosavi-Dezfooli et al. 2016, Table 1, LeNet / MNIST, L2): rho_adv = "
        f"{PAPER_RHO:.1e}; measured here (L2, [0, 1] box): {rows['L2, [0, 1] box'].rho_adv:.2e}"
    )

    shown = deepfool(net, x[:6])
    with torch.no_grad():
        before, after = net(x[:6]).argmax(1), net(shown.x_adv).argmax(1)
    ratios = deepfool(net, x).norms / x.flatten(1).norm(dim=1)
    fig = plt.figure(figsize=(11, 4.6))
    grid = fig.add_gridspec(3, 9)
    for i in range(6):
        for row, (image, title) in enumerate(
            (
                (x[i, 0], f"predicted {int(before[i])}"),
                (shown.x_adv[i, 0] - x[i, 0], f"r, ||r||={float(shown.norms[i]):.2f}"),
                (shown.x_adv[i, 0], f"predicted {int(after[i])}"),
            )
        ):
            ax = fig.add_subplot(grid[row, i])
            size = float(image.abs().max()) if row == 1 else 1.0
            kw = (
                dict(cmap="RdBu_r", vmin=-size, vmax=size)
                if row == 1
                else dict(cmap="gray", vmin=0, vmax=1)
            )
            ax.imshow(image.numpy(), **kw)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    ax = fig.add_subplot(grid[:, 6:])
    ax.hist(ratios.numpy(), bins=40, color="tab:blue", alpha=0.8)
    ax.axvline(float(ratios.mean()), color="tab:blue", ls="--", label=f"ours {ratios.mean():.3f}")
    ax.axvline(PAPER_RHO, color="tab:red", ls=":", label=f"paper {PAPER_RHO:.2f}")
    ax.set_xlabel(r"$\|r(x)\|_2 / \|x\|_2$ (DeepFool, [0, 1] box)")
    ax.set_ylabel("test images")
    ax.set_title(r"LeNet-5 on MNIST: $\hat\rho_{adv}$")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "deepfool_mnist.png"
    fig.savefig(path, dpi=120)
    print(f"figure -> {path} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
