"""First-layer CNN filters become wavelet-like with training; deeper units prefer structured inputs.

Trains LeNet-5 (5x5 filters) and a small CNN with 7x7 first-layer filters on MNIST (from
../shared/data/mnist.npz when present, else the embedded digits resized to 28x28) within a time
budget, then measures, for the first layer at random initialisation and after training and for
the Morlet filters of Mallat's scattering transform: wavelet-likeness (best Gabor-atom
correlation, torch_dlt.vis.wavelet_likeness), spectral signatures (torch_dlt.ops), and for
deeper units activation-maximisation images (Olah et al. 2017) and their top dataset examples.

The claim (Krizhevsky, Sutskever & Hinton 2012; Zeiler & Fergus 2014): trained first-layer
filters are oriented, localised band-pass filters - close to the Gabor / Morlet wavelets that
the scattering transform fixes by hand (Mallat 2012; Bruna & Mallat 2013) - while random
filters are not.

    python examples/filters_are_wavelets.py [--quick] [--budget SECONDS] [--data auto|digits]

Writes examples/out/filters_are_wavelets.png.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from torch import nn

from torch_dlt.data import data_loader, digits, mnist
from torch_dlt.nn import LeNet5
from torch_dlt.ops import filter_grid, spectral_signature
from torch_dlt.ops.filters import default_fft_size, spectral_cell_sizes
from torch_dlt.vis import maximize_activation, top_examples, wavelet_likeness

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"
N_ORIENT, N_FREQ = 8, 6


def small_cnn() -> nn.Sequential:
    """16 7x7 filters, then 32 5x5 ones: large enough first-layer kernels to show structure."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 7, padding=3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def load_data(choice: str, quick: bool):
    if choice != "digits" and MNIST.is_file() and not quick:
        split = mnist(MNIST)
        return "MNIST", split
    return "digits (28x28)", digits(size=28, test_fraction=0.2)


def train(model: nn.Module, split, budget: float, seed: int) -> tuple[float, int]:
    """Adam until the time budget is spent; returns (test error, epochs run)."""
    x_train, y_train, x_test, y_test = split
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = data_loader(x_train, y_train, batch_size=128, shuffle=True, seed=seed)
    start, epochs = time.perf_counter(), 0
    while time.perf_counter() - start < budget:
        model.train()
        for xb, yb in loader:
            optimiser.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimiser.step()
            if time.perf_counter() - start > budget:
                break
        epochs += 1
    model.eval()
    with torch.no_grad():
        wrong = sum(
            int((model(xb).argmax(1) != yb).sum())
            for xb, yb in data_loader(x_test, y_test, batch_size=1000, shuffle=False)
        )
    return wrong / len(y_test), epochs


def scattering_filters(size: int) -> torch.Tensor | None:
    """Real and imaginary parts of the J=2, L=8 Morlet wavelets on a centred size x size grid."""
    try:
        from torch_dlt.nn.scattering import morlet_2d
    except ImportError:
        return None
    filters = []
    for j in range(2):
        for ell in range(8):
            psi = morlet_2d(
                (size, size),
                sigma=0.8 * 2**j,
                theta=math.pi * ell / 8,
                xi=3 * math.pi / 4 / 2**j,
                slant=4 / 8,
                offset=-(size // 2),
            )
            filters += [psi.real, psi.imag]
    return torch.stack(filters)[:, None]


def summarise(name: str, weight: torch.Tensor) -> dict:
    score = wavelet_likeness(weight).score
    sig = spectral_signature(weight.double(), n_orient=N_ORIENT, n_freq=N_FREQ)
    share = sig.power / sig.power.sum((1, 2), keepdim=True).clamp_min(1e-300)
    peak = share.flatten(1).max(1).values
    sizes = spectral_cell_sizes(default_fft_size(*weight.shape[2:]), N_ORIENT, N_FREQ)
    density = sig.power / sizes
    density = density / density.sum((1, 2), keepdim=True).clamp_min(1e-300)
    print(
        f"  {name:32s} wavelet-likeness median {float(score.median()):.3f} "
        f"(IQR {float(score.quantile(0.25)):.3f}-{float(score.quantile(0.75)):.3f}); "
        f"power in the strongest orientation x frequency cell {float(peak.median()):.2f}"
    )
    return {"name": name, "score": score, "density": density.mean(0), "weight": weight}


def show_grid(ax, weight: torch.Tensor, title: str, nrow: int | None = None) -> None:
    grid = filter_grid(weight.double(), nrow=nrow, pad_value=1.0)[0]
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, a few seconds per model")
    parser.add_argument("--budget", type=float, default=None, help="training seconds per model")
    parser.add_argument("--data", choices=["auto", "digits"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "out")
    args = parser.parse_args()
    budget = args.budget if args.budget is not None else (8.0 if args.quick else 150.0)
    torch.manual_seed(args.seed)
    data_name, split = load_data(args.data, args.quick)
    print(
        f"data: {data_name}, {len(split.y_train)} train / {len(split.y_test)} test; "
        f"{budget:.0f} s of training per model, {torch.get_num_threads()} thread(s)"
    )

    models = {
        "LeNet-5 (5x5)": LeNet5(activation="relu", pooling="max"),
        "small CNN (7x7)": small_cnn(),
    }
    initial = {name: copy.deepcopy(m) for name, m in models.items()}
    for name, model in models.items():
        error, epochs = train(model, split, budget, args.seed)
        print(
            f"{name}: test error {100 * error:.2f}% after {epochs} epoch(s) "
            "(LeCun et al. 1998 report 0.95% for LeNet-5 on MNIST after 20 epochs)"
        )

    def first(m: nn.Module) -> torch.Tensor:
        return next(c for c in m.modules() if isinstance(c, nn.Conv2d)).weight.detach()

    print("first-layer filters (1 = exactly one Gabor atom):")
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for name in models:
        k = first(models[name]).shape[-1]
        noise = torch.randn(64, 1, k, k, generator=g)
        rows.append(summarise(f"Gaussian noise {k}x{k}", noise))
        rows.append(summarise(f"{name}, random init", first(initial[name])))
        rows.append(summarise(f"{name}, trained", first(models[name])))
    morlets = scattering_filters(7)
    if morlets is not None:
        rows.append(summarise("scattering Morlets J=2 L=8 (7x7)", morlets))

    cnn = models["small CNN (7x7)"]
    steps = 24 if args.quick else 160
    units = list(range(8))
    images = maximize_activation(cnn, "3", units, steps=steps, seed=args.seed)
    x_test = split.x_test[:2000]
    with torch.no_grad():
        acts = cnn[:4](x_test).mean((2, 3))[:, units]
    pairs = zip(images.activations.tolist(), acts.max(0).values.tolist())
    print(
        f"activation maximisation of conv2 units {units} ({steps} steps), activation of the "
        "optimised image vs the best of 2000 test images: "
        + ", ".join(f"{a:.2f} vs {b:.2f}" for a, b in pairs)
    )
    tops = [top_examples(cnn, "3", u, x_test, k=6) for u in units[:4]]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 8))
    show_grid(axes[0, 0], first(initial["small CNN (7x7)"]), "small CNN conv1, random init", 4)
    show_grid(axes[0, 1], first(cnn), "small CNN conv1, trained", 4)
    if morlets is not None:
        show_grid(axes[0, 2], morlets, "scattering Morlets (real, imag)", 8)
    else:
        axes[0, 2].axis("off")
    bins = torch.linspace(0, 1, 26).numpy()
    for row in rows:
        axes[0, 3].hist(
            row["score"].numpy(),
            bins=bins,
            histtype="step",
            density=True,
            label=row["name"],
            lw=1.5,
        )
    axes[0, 3].set_xlabel("wavelet-likeness")
    axes[0, 3].legend(fontsize=6)
    for ax, row in zip(axes[1, :2], [rows[4], rows[5]]):
        ax.imshow(
            row["density"].numpy(),
            origin="lower",
            aspect="auto",
            cmap="magma",
            extent=(0, 0.5, -90 / N_ORIENT, 180 - 90 / N_ORIENT),
        )
        ax.set_title(f"{row['name']}: power density", fontsize=9)
        ax.set_xlabel("radial frequency (cycles / pixel)")
        ax.set_ylabel("orientation (degrees)")
    act_grid = filter_grid(images.images, nrow=4, padding=2, pad_value=1.0, normalize="none")
    axes[1, 2].imshow(act_grid[0].numpy(), cmap="gray", vmin=0, vmax=1)
    axes[1, 2].set_title(f"conv2 units {units}: activation maximisation", fontsize=9)
    top_grid = torch.cat([t.images for t in tops])
    axes[1, 3].imshow(
        filter_grid(top_grid, nrow=6, padding=2, pad_value=1.0, normalize="none")[0].numpy(),
        cmap="gray",
        vmin=0,
        vmax=1,
    )
    axes[1, 3].set_title("top-6 test images of conv2 units 0-3 (one per row)", fontsize=9)
    for ax in axes[1, 2:]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Filters are wavelets? ({data_name}, {budget:.0f} s of training per model)")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "filters_are_wavelets.png"
    fig.savefig(path, dpi=110)
    print(f"figure -> {path}")


if __name__ == "__main__":
    main()
