"""Pruning against the Lipschitz upper bound and DeepFool's rho_adv (Gopalakrishnan et al. 2018).

Gopalakrishnan, Marzi, Madhow & Pedarsani (2018) explain why sparsity helps robustness by a
smaller upper bound on the Lipschitz constant. This script trains LeNet-5 (ReLU, max pooling),
prunes it by global weight magnitude in geometric steps with a short fine-tuning after each
(``torch_dlt.prune.iterative_prune``), and at every level measures

- the l2 Lipschitz interval: the product bound with merged linear maps and exact convolution
  operator norms, and the empirical lower bound (``torch_dlt.robust.lipschitz_interval``),
- DeepFool's rho_adv = mean |r|_2 / |x|_2 (Moosavi-Dezfooli et al. 2016; they report 0.2 for
  LeNet on MNIST) and the test accuracy.

MNIST (../shared/data/mnist.npz, or --mnist PATH) when present, else the digits at 28x28.

    python examples/pruning_lipschitz.py            # MNIST, a few minutes at 1 thread
    python examples/pruning_lipschitz.py --quick    # digits, under a minute
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from torch_dlt.data import digits, mnist
from torch_dlt.nn import LeNet5
from torch_dlt.prune import iterative_prune, sparsity
from torch_dlt.robust import lipschitz_interval
from torch_dlt.robust.attacks import robustness

HERE = Path(__file__).resolve().parent
DEFAULT_MNIST = HERE.parent.parent / "shared" / "data" / "mnist.npz"


def load(quick: bool, path: Path, limit: int):
    if not quick and path.exists():
        split = mnist(path, limit=limit)
        return "MNIST", split.x_train, split.y_train, split.x_test[:1000], split.y_test[:1000]
    split = digits(size=28, test_fraction=0.3, seed=0)
    return "digits 28x28", split.x_train, split.y_train, split.x_test, split.y_test


def train(model: nn.Module, opt, x, y, steps: int, g: torch.Generator) -> None:
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def accuracy(model: nn.Module, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits, under a minute")
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST)
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--amount", type=float, default=0.98, help="final pruned fraction")
    parser.add_argument("--rounds", type=int, default=8, help="pruning rounds")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "pruning_lipschitz.png")
    args = parser.parse_args()

    name, x_train, y_train, x_test, y_test = load(args.quick, args.mnist, args.train_limit)
    n_eval = 100 if args.quick else 500
    train_steps, finetune_steps = (300, 60) if args.quick else (1500, 300)
    rounds = 5 if args.quick else args.rounds
    print(f"{name}: {len(x_train)} train / {len(x_test)} test; LeNet-5 (ReLU, max pooling)")

    torch.manual_seed(0)
    model = LeNet5(activation="relu", pooling="max")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    train(model, opt, x_train, y_train, train_steps, g)
    x_eval, y_eval = x_test[:n_eval], y_test[:n_eval]
    rows = []

    def measure(net: nn.Module) -> None:
        interval = lipschitz_interval(net, x_eval[:8], steps=4 if args.quick else 30)
        deepfool = robustness(net, [(x_eval, y_eval)], "deepfool")
        row = dict(
            sparsity=sparsity(net).fraction,
            accuracy=accuracy(net, x_test, y_test),
            lipschitz_upper=interval.upper,
            lipschitz_lower=interval.lower,
            rho_adv=deepfool.rho_adv,
            deepfool_success=deepfool.success_rate,
        )
        rows.append(row)
        print(
            f"{row['sparsity']:>9.3f} {row['accuracy']:>9.3f} {row['lipschitz_upper']:>11.4g} "
            f"{row['lipschitz_lower']:>11.4g} {row['rho_adv']:>9.4f}"
        )

    print(f"{'sparsity':>9} {'accuracy':>9} {'L upper':>11} {'L lower':>11} {'rho_adv':>9}")
    measure(model)

    def finetune(net: nn.Module, step: int) -> None:
        # The masks stay in force: Adam updates weight_orig, the pruned entries stay zero.
        ft = torch.optim.Adam(net.parameters(), lr=5e-4)
        train(net, ft, x_train, y_train, finetune_steps, g)
        measure(net)

    iterative_prune(model, args.amount, rounds, finetune=finetune)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [r["sparsity"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 4))
    ax1.semilogy(s, [r["lipschitz_upper"] for r in rows], "o-", label="upper bound (product)")
    ax1.semilogy(s, [r["lipschitz_lower"] for r in rows], "s-", label="empirical lower bound")
    ax1.set_xlabel("fraction of weights pruned")
    ax1.set_ylabel("l2 Lipschitz constant of the logits")
    ax1.set_title(f"LeNet-5 on {name}, global magnitude pruning")
    ax1.legend(fontsize=8)
    ax2.plot(s, [r["rho_adv"] for r in rows], "o-", color="C2", label="DeepFool rho_adv")
    ax2.plot(s, [r["accuracy"] for r in rows], "k.--", label="test accuracy")
    if name == "MNIST":
        ax2.axhline(0.2, color="C2", ls=":", label="rho_adv of LeNet, Moosavi-Dezfooli et al.")
    ax2.set_xlabel("fraction of weights pruned")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    args.out.with_suffix(".json").write_text(json.dumps(dict(data=name, rows=rows), indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    if not args.quick:
        docs = HERE.parent / "docs" / "figures" / "pruning_lipschitz.png"
        shutil.copyfile(args.out, docs)
        print(f"copied to {docs}")
    first, last = rows[0], rows[-1]
    print(
        f"pruning {last['sparsity']:.0%} of the weights: Lipschitz upper bound x"
        f"{last['lipschitz_upper'] / first['lipschitz_upper']:.3g}, rho_adv x"
        f"{last['rho_adv'] / first['rho_adv']:.3g}, accuracy {first['accuracy']:.3f} -> "
        f"{last['accuracy']:.3f}; the theory: a smaller bound permits, but does not force, "
        "larger minimal perturbations (rho_adv also depends on the margins)"
    )


if __name__ == "__main__":
    main()
