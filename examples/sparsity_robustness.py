"""A sparsifying front end against l_inf attacks (Gopalakrishnan, Marzi, Madhow & Pedarsani 2018).

Keep the K largest coefficients of each image in an orthonormal wavelet basis
(``torch_dlt.prune.SparsifyingFrontEnd``) and classify the projection with a linear classifier
(softmax regression trained on the sparsified images). For each K this prints and plots

- the accuracy under PGD (l_inf, white box: the gradient goes through the front end), and
- the output distortion of the attack e = eps sign(d) on the margin direction d = w_y - w_j,
  with the front end over without it: d^T (F(x + e) - F(x)) / d^T e. The paper predicts about
  K / N; the derivation takes d generic with respect to the images' K-sparse support
  (E[d^T P_K sign(d)] = K/N |d|_1), which this script checks with random d, beside the trained
  classifier's d, which lines up with the images' support.

MNIST (../shared/data/mnist.npz, or --mnist PATH) when present, else the scikit-learn digits.

    python examples/sparsity_robustness.py            # MNIST, about 2 min at 1 thread
    python examples/sparsity_robustness.py --quick    # digits 8x8, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from torch import nn

from torch_dlt.data import digits, mnist
from torch_dlt.prune import SparsifyingFrontEnd
from torch_dlt.robust.attacks import pgd

HERE = Path(__file__).resolve().parent
DEFAULT_MNIST = HERE.parent.parent / "shared" / "data" / "mnist.npz"


def load(quick: bool, path: Path, limit: int):
    if not quick and path.exists():
        split = mnist(path, limit=limit)
        return "MNIST", split.x_train, split.y_train, split.x_test[:1000], split.y_test[:1000]
    split = digits(size=8, test_fraction=0.3, seed=0)
    return "digits 8x8", split.x_train, split.y_train, split.x_test, split.y_test


def train_linear(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> nn.Linear:
    """Softmax regression on the flattened images (Adam, mini-batches of 256)."""
    torch.manual_seed(seed)
    lin = nn.Linear(x[0].numel(), 10)
    opt = torch.optim.Adam(lin.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (256,), generator=g)
        loss = nn.functional.cross_entropy(lin(x[idx].flatten(1)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return lin


def distortion_ratio(
    front: nn.Module, x: torch.Tensor, d: torch.Tensor, eps: float | None
) -> float:
    """Mean over inputs of d_i^T (F(x + e) - F(x)) / d_i^T e with e = eps sign(d_i): the margin
    change the attack causes through the front end over the change without it. ``eps=None``
    takes the limit eps -> 0, where the kept support does not move and F(x + e) - F(x) = P_x e
    (the paper's setting), by a Jacobian-vector product. ``d`` is ``Tensor[B, N]``."""
    sign = d.sign().view_as(x)
    without = (d * sign.flatten(1)).sum(1)
    if eps is None:
        _, change = torch.func.jvp(front, (x,), (sign,))
    else:
        with torch.no_grad():
            change = (front(x + eps * sign) - front(x)) / eps
    return float(((d * change.flatten(1)).sum(1) / without).mean())


def margin_directions(front: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w_y - w_j for the predicted class y and the runner-up j of the scores w F(x)."""
    with torch.no_grad():
        top2 = (front(x).flatten(1) @ w.T).topk(2, dim=1).indices
    return w[top2[:, 0]] - w[top2[:, 1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits 8x8, seconds")
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST)
    parser.add_argument("--basis", default="db4", choices=["dct", "haar", "db4"])
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "sparsity_robustness.png")
    args = parser.parse_args()

    name, x_train, y_train, x_test, y_test = load(args.quick, args.mnist, args.train_limit)
    side = x_train.shape[-1]
    n = side * side
    ks = [4, 8, 16, 32, 64] if side == 8 else [10, 25, 50, 100, 200, 400, 784]
    eps_list = [0.05, 0.1]
    steps = 300 if args.quick else 600
    print(f"{name}: N = {n} pixels, {len(x_train)} train / {len(x_test)} test, basis {args.basis}")
    header = (
        f"{'K':>5} {'K/N':>7} {'clean':>7} "
        + " ".join(f"{f'PGD {e}':>9}" for e in eps_list)
        + f" {'ratio trained w':>16} {f'at eps {eps_list[-1]}':>12} {'ratio random w':>15}"
        + f" {'(paper: K/N)':>13}"
    )
    print(header)
    rows = []
    g = torch.Generator().manual_seed(1)
    # generic classifier directions, one per input, independent of the images
    random_d = torch.randn(len(x_test), n, generator=g)
    for k in ks:
        front = SparsifyingFrontEnd(k, args.basis, size=side).float()
        with torch.no_grad():
            sparse_train = front(x_train)
        lin = train_linear(sparse_train, y_train, steps, seed=0)
        model = nn.Sequential(front, nn.Flatten(), lin).eval()
        with torch.no_grad():
            clean = float((model(x_test).argmax(1) == y_test).float().mean())
        robust = []
        for eps in eps_list:
            result = pgd(model, x_test, y_test, eps=eps, steps=20,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
            robust.append(float((~result.success).float().mean()))
        trained_d = margin_directions(front, x_test, lin.weight.detach())
        trained = distortion_ratio(front, x_test, trained_d, None)
        generic = distortion_ratio(front, x_test, random_d, None)
        at_eps = distortion_ratio(front, x_test, trained_d, eps_list[-1])
        rows.append(dict(k=k, k_over_n=k / n, clean=clean, robust=robust, ratio_trained=trained,
                         ratio_random=generic, ratio_trained_at_eps=at_eps))  # fmt: skip
        print(
            f"{k:>5} {k / n:>7.4f} {clean:>7.3f} "
            + " ".join(f"{a:>9.3f}" for a in robust)
            + f" {trained:>16.4f} {at_eps:>12.4f} {generic:>15.4f} {k / n:>13.4f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 4))
    kk = [r["k"] for r in rows]
    ax1.semilogx(kk, [r["clean"] for r in rows], "k.-", label="clean")
    for i, eps in enumerate(eps_list):
        ax1.semilogx(kk, [r["robust"][i] for r in rows], "o-", label=f"PGD l_inf eps={eps}")
    ax1.set_xlabel("K (coefficients kept)")
    ax1.set_ylabel("accuracy")
    ax1.set_title(f"{name}: linear classifier behind the {args.basis} front end")
    ax1.legend(fontsize=8)
    ratios = [r["k_over_n"] for r in rows]
    ax2.loglog(ratios, ratios, "k--", label="K/N (Gopalakrishnan et al.)")
    ax2.loglog(ratios, [r["ratio_random"] for r in rows], "s-", label="measured, random w")
    ax2.loglog(ratios, [r["ratio_trained"] for r in rows], "o-", label="measured, trained w")
    ax2.loglog(ratios, [r["ratio_trained_at_eps"] for r in rows], "^:",
               label=f"trained w at eps={eps_list[-1]} (support moves)")  # fmt: skip
    ax2.set_xlabel("K / N")
    ax2.set_ylabel("attack's output distortion, with / without front end")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    args.out.with_suffix(".json").write_text(
        json.dumps(dict(data=name, basis=args.basis, eps=eps_list, rows=rows), indent=1)
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    if not args.quick:
        docs = HERE.parent / "docs" / "figures" / "sparsity_robustness.png"
        shutil.copyfile(args.out, docs)
        print(f"copied to {docs}")
    spread = max(abs(math.log(r["ratio_random"] / r["k_over_n"])) for r in rows)
    print(f"generic d: measured distortion within x{math.exp(spread):.2f} of K/N for every K")


if __name__ == "__main__":
    main()
