"""AdaGrad-Norm trains over a wide range of initial step sizes (Ward, Wu & Bottou 2019, Fig. 1-2).

LeNet-5 on the scikit-learn digits (resized to 28x28), and on MNIST when
../shared/data/mnist.npz (or --mnist PATH) is there: the training loss after a fixed budget of
mini-batch steps, against b0 swept over 10 orders of magnitude, for

- AdaGrad-Norm with lr = 1 and initial accumulator b0 (``torch_dlt.optim.AdaGradNorm``),
- SGD with the constant step 1/b0 (``torch.optim.SGD``),
- coordinate-wise AdaGrad with lr = 1 and every accumulator starting at b0^2
  (``torch.optim.Adagrad(initial_accumulator_value=b0**2)``), the paper's AdaGrad-Coordinate,
- Adam with step 1/b0 (``torch.optim.Adam``).

A run "trains" when its final training loss is below --trained-below (default 0.5, against
ln 10 = 2.30 at chance). Writes a PNG and a JSON of every number, and prints the b0 range over
which each optimiser trains.

    python examples/adagrad_norm_robustness.py            # digits (+ MNIST if present), ~5 min
    python examples/adagrad_norm_robustness.py --quick    # digits only, fewer steps, ~1 min
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torch_dlt.data import digits, mnist
from torch_dlt.nn import LeNet5
from torch_dlt.optim import AdaGradNorm

HERE = Path(__file__).resolve().parent
DEFAULT_MNIST = HERE.parent.parent / "shared" / "data" / "mnist.npz"

OPTIMISERS = {
    "AdaGrad-Norm": lambda p, b0: AdaGradNorm(p, lr=1.0, b0=b0),
    "SGD": lambda p, b0: torch.optim.SGD(p, lr=1.0 / b0),
    "AdaGrad-Coordinate": lambda p, b0: torch.optim.Adagrad(
        p, lr=1.0, initial_accumulator_value=b0**2, eps=0.0
    ),
    "Adam": lambda p, b0: torch.optim.Adam(p, lr=1.0 / b0),
}


def full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        losses = [
            nn.functional.cross_entropy(model(xb), yb, reduction="sum")
            for xb, yb in zip(x.split(1024), y.split(1024))
        ]
    value = float(sum(losses)) / len(x)
    return value if math.isfinite(value) else math.inf


def train(
    name: str, b0: float, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, seed: int
) -> float:
    """Final training loss of LeNet-5 after ``steps`` mini-batch steps (inf if it diverged)."""
    torch.manual_seed(seed)
    model = LeNet5(activation="relu", pooling="max")
    opt = OPTIMISERS[name](model.parameters(), b0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        if not torch.isfinite(loss):
            return math.inf
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return full_loss(model, x, y)


def sweep(x, y, b0s, steps, batch, seeds) -> dict[str, list[float]]:
    results = {}
    for name in OPTIMISERS:
        t0 = time.perf_counter()
        finals = []
        for b0 in b0s:
            runs = [train(name, float(b0), x, y, steps, batch, seed) for seed in range(seeds)]
            finals.append(float(np.median(runs)))
        results[name] = finals
        print(
            f"  {name:<19} {time.perf_counter() - t0:6.1f} s  "
            + " ".join(f"{v:8.3g}" for v in finals),
            flush=True,
        )
    return results


def trained_range(b0s, finals, threshold) -> tuple[float, float, float] | None:
    """(smallest b0, largest b0, orders of magnitude) of the contiguous run of trained b0s
    around the best one."""
    ok = [math.isfinite(v) and v < threshold for v in finals]
    if not any(ok):
        return None
    best = int(np.argmin([v if math.isfinite(v) else math.inf for v in finals]))
    lo = hi = best
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(ok) - 1 and ok[hi + 1]:
        hi += 1
    if not ok[best]:
        return None
    return float(b0s[lo]), float(b0s[hi]), math.log10(b0s[hi] / b0s[lo])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits only, 150 steps")
    parser.add_argument("--steps", type=int, default=None, help="mini-batch steps per run")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=1, help="runs per point (median)")
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST, help="MNIST .npz file")
    parser.add_argument("--mnist-samples", type=int, default=10_000)
    parser.add_argument("--trained-below", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "adagrad_norm_robustness.png")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    steps = args.steps or (150 if args.quick else 400)
    b0s = np.logspace(-6, 4, 11)  # 10 orders of magnitude: the initial step 1/b0 from 1e6 to 1e-4

    datasets = {}
    x, y = digits(size=28)
    datasets["digits (1797 x 28x28)"] = (x, y)
    if not args.quick and args.mnist.is_file():
        split = mnist(args.mnist, limit=args.mnist_samples)
        datasets[f"MNIST ({args.mnist_samples} training images)"] = (split.x_train, split.y_train)
    elif not args.quick:
        print(f"no MNIST at {args.mnist}: digits only")

    results = {}
    for title, (x, y) in datasets.items():
        print(f"{title}: final training loss after {steps} steps, batch {args.batch}")
        print("  " + " " * 28 + " ".join(f"{b:8.0e}" for b in b0s))
        results[title] = sweep(x, y, b0s, steps, args.batch, args.seeds)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.4 * len(results), 4.4), squeeze=False)
    summary = {}
    for ax, (title, finals) in zip(axes[0], results.items()):
        summary[title] = {}
        for name, values in finals.items():
            shown = [min(v, 1e3) if math.isfinite(v) else np.nan for v in values]
            ax.loglog(b0s, shown, "o-", label=name)
            span = trained_range(b0s, values, args.trained_below)
            summary[title][name] = span
            text = (
                f"b0 in [{span[0]:.0e}, {span[1]:.0e}], {span[2]:.0f} orders of magnitude"
                if span
                else "trains for no b0"
            )
            print(f"{title} | {name:<19}: {text}")
        ax.axhline(args.trained_below, color="gray", ls=":", label="'trained' threshold")
        ax.axhline(math.log(10), color="gray", ls="--", lw=0.8, label="chance (ln 10)")
        ax.set_xlabel("b0 (initial step size 1/b0)")
        ax.set_ylabel(f"training loss after {steps} steps")
        ax.set_title(f"LeNet-5, {title}")
        ax.legend(fontsize=8)
    fig.suptitle(
        "Robustness to the initial step size (Ward, Wu & Bottou 2019); missing points "
        "diverged, losses above 1e3 are drawn at 1e3"
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    record = {
        "b0": b0s.tolist(),
        "steps": steps,
        "batch": args.batch,
        "seeds": args.seeds,
        "trained_below": args.trained_below,
        "final_loss": {
            t: {n: [v if math.isfinite(v) else None for v in vs] for n, vs in r.items()}
            for t, r in results.items()
        },
        "trained_range": summary,
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
