"""Depth separation: a width-2 depth-k ReLU net is the k-fold sawtooth; shallow nets are not.

Telgarsky (2015, 2016): the k-fold tent map g_k has 2^k linear pieces and is computed exactly by
``torch_dlt.theory.sawtooth_net(k)`` with 6k + 1 parameters. A one-hidden-layer ReLU net of
width w has at most w + 1 pieces; g_k alternates 0, 1, 0, ... at the 2^k + 1 points j / 2^k and
an affine piece holding three consecutive ones errs by >= 1/2 there, so every shallow net with
w + 1 <= 2^(k-1) has sup error >= 1/2, however it is trained.

This fits shallow nets of growing width w to g_k (output layer by least squares on kinks at a
uniform grid j / w and at random points, then Adam on all parameters; the best restart is kept)
and plots their sup error on the dyadic grid against the parameter count, next to the exact
deep net (drawn at 1e-16), and the error at equal parameter count against k.

    python examples/depth_separation.py --quick   # k = 2, 4, 6: ~30 s on 2 cores
    python examples/depth_separation.py           # k = 2 .. 8: a few minutes
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from torch_dlt.theory import count_linear_regions, sawtooth_net  # noqa: E402

FLOOR = 1e-16  # where an exact (zero-error) net is drawn on the log axis


def tent_power(x: torch.Tensor, k: int) -> torch.Tensor:
    for _ in range(k):
        x = torch.where(x <= 0.5, 2 * x, 2 - 2 * x)
    return x


def train_shallow(k: int, width: int, restarts: int, steps: int, seed: int) -> float:
    """Best sup error on the dyadic grid over `restarts` width-`width` shallow nets fit to g_k.

    Restart 0 puts the kinks on the uniform grid j / width, the others at random points; each
    solves the output layer by least squares (the optimum for those kinks), then trains all
    parameters with Adam on the MSE."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.arange(2 ** (k + 3) + 1, dtype=torch.float64) / 2 ** (k + 3)
    y = tent_power(x, k)
    sign = torch.randint(0, 2, (restarts, width), generator=gen).double() * 2 - 1
    kinks = torch.rand(restarts, width, generator=gen, dtype=torch.float64)
    kinks[0] = torch.arange(width, dtype=torch.float64) / width
    sign[0] = 1.0
    w1, b1 = sign, -sign * kinks
    features = torch.relu(x[None, :, None] * w1[:, None, :] + b1[:, None, :])
    design = torch.cat([features, torch.ones_like(features[..., :1])], dim=-1)
    solution = torch.linalg.lstsq(design, y.expand(restarts, -1)[..., None]).solution[..., 0]
    params = [p.clone().requires_grad_() for p in (w1, b1, solution[:, :-1], solution[:, -1:])]
    w1, b1, w2, b2 = params

    def sup_error() -> torch.Tensor:
        hidden = torch.relu(x[None, :, None] * w1[:, None, :] + b1[:, None, :])
        return ((hidden * w2[:, None, :]).sum(-1) + b2 - y).abs().max(-1).values

    with torch.no_grad():
        best = float(sup_error().min())
    opt = torch.optim.Adam(params, lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        hidden = torch.relu(x[None, :, None] * w1[:, None, :] + b1[:, None, :])
        pred = (hidden * w2[:, None, :]).sum(-1) + b2
        ((pred - y) ** 2).mean(-1).sum().backward()
        opt.step()
    with torch.no_grad():
        return min(best, float(sup_error().min()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="k = 2, 4, 6, fewer steps (~30 s)")
    parser.add_argument("--out", type=Path, default=Path("examples/out/depth_separation.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    ks = [2, 4, 6] if args.quick else [2, 3, 4, 5, 6, 7, 8]
    steps, restarts = (200, 4) if args.quick else (1000, 8)
    start = time.time()

    fig, (ax_size, ax_k) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(ks)))
    equal_budget = []
    for k, color in zip(ks, colors):
        deep = sawtooth_net(k)
        x = torch.arange(2 ** (k + 3) + 1, dtype=torch.float64)[:, None] / 2 ** (k + 3)
        with torch.no_grad():
            deep_err = float((deep(x)[:, 0] - tent_power(x[:, 0], k)).abs().max())
        deep_params = sum(p.numel() for p in deep.parameters())
        assert count_linear_regions(deep, (0.0, 1.0)) == 2**k
        widths = sorted({2 * k} | {2**j for j in range(1, k + 2)})
        errors = [train_shallow(k, w, restarts, steps, args.seed) for w in widths]
        for w, e in zip(widths, errors):
            # Telgarsky's counting bound: no width this small can do better than 1/2.
            if w + 1 <= 2 ** (k - 1):
                assert e >= 0.5 - 1e-12, (k, w, e)
        equal_budget.append(errors[widths.index(2 * k)])
        params = [3 * w + 1 for w in widths]
        ax_size.plot(params, np.maximum(errors, FLOOR), "o-", color=color, label=f"shallow, k={k}")
        ax_size.plot(deep_params, max(deep_err, FLOOR), "*", ms=14, color=color, mec="k")
        ax_size.axvline(3 * (2 ** (k - 1) - 1) + 1, color=color, ls=":", lw=1)
        print(
            f"k={k}: deep {deep_params} params, sup error {deep_err:.1e}; shallow widths {widths}: "
            + ", ".join(f"{e:.2e}" for e in errors)
            + f"  [{time.time() - start:.0f} s]"
        )
    ax_size.axhline(0.5, color="grey", ls="--", lw=1)
    ax_size.set_xscale("log")
    ax_size.set_yscale("log")
    ax_size.set_xlabel("number of parameters")
    ax_size.set_ylabel("sup error on [0, 1]")
    ax_size.set_title(
        "k-fold sawtooth: shallow nets (o, trained) vs deep width-2 net (*, exact, at 1e-16)\n"
        "dotted: largest shallow size with proven sup error >= 1/2",
        fontsize=9,
    )
    ax_size.legend(fontsize=8)

    ax_k.semilogy(ks, np.maximum(equal_budget, FLOOR), "o-", label="shallow, width 2k (trained)")
    ax_k.semilogy(ks, [FLOOR] * len(ks), "*-", ms=12, label="deep sawtooth net (exact)")
    ax_k.axhline(0.5, color="grey", ls="--", lw=1, label="proven lower bound 1/2 (k >= 3)")
    ax_k.set_xlabel("k (depth of the deep net)")
    ax_k.set_ylabel("sup error")
    ax_k.set_title("equal parameter count 6k + 1 (shallow width 2k)", fontsize=9)
    ax_k.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
