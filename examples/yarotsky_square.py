"""Yarotsky's x^2: the sup error of a depth-m ReLU net falls as 2^(-2m-2).

Yarotsky (2017, "Error bounds for approximations with deep ReLU networks", Prop. 2):
f_m(x) = x - sum_{s=1}^m g_s(x) / 2^(2s), g_s the s-fold tent map, is the piecewise-linear
interpolant of x^2 on the grid k / 2^m and is computed exactly by
``torch_dlt.theory.yarotsky_square_net(m)`` (m hidden layers of width 3). This measures
sup |f_m(x) - x^2| on a fine dyadic grid of [0, 1] and the product net's sup error on [-1, 1]^2,
and plots both against m (log2 axis) with the line 2^(-2m-2).

    python examples/yarotsky_square.py --quick   # m = 1 .. 8: a few seconds
    python examples/yarotsky_square.py           # m = 1 .. 14
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from torch_dlt.theory import (  # noqa: E402
    count_linear_regions,
    yarotsky_error_bound,
    yarotsky_product_net,
    yarotsky_square_net,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="m = 1 .. 8")
    parser.add_argument("--out", type=Path, default=Path("examples/out/yarotsky_square.png"))
    args = parser.parse_args()
    depths = list(range(1, 9 if args.quick else 15))
    square_err, product_err = [], []
    for m in depths:
        x = torch.arange(2 ** (m + 5) + 1, dtype=torch.float64)[:, None] / 2 ** (m + 5)
        with torch.no_grad():
            square_err.append(float((yarotsky_square_net(m)(x) - x**2).abs().max()))
            grid = torch.linspace(-1, 1, 201, dtype=torch.float64)
            xy = torch.cartesian_prod(grid, grid)
            # The bound is attained at x = y = 2^(-m-1); add it to the grid.
            xy = torch.cat([xy, torch.full((1, 2), 2.0 ** (-m - 1), dtype=torch.float64)])
            out = yarotsky_product_net(m)(xy)[:, 0]
            product_err.append(float((out - xy[:, 0] * xy[:, 1]).abs().max()))
        pieces = count_linear_regions(yarotsky_square_net(m), (0.0, 1.0))
        print(
            f"m={m:2d}: sup|f_m - x^2| = {square_err[-1]:.3e} (2^(-2m-2) = "
            f"{yarotsky_error_bound(m):.3e}), sup|xy error| = {product_err[-1]:.3e}, "
            f"{pieces} linear pieces"
        )
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(depths, np.log2(square_err), "o", ms=8, label="measured sup |f_m(x) - x^2|")
    ax.plot(depths, np.log2(product_err), "x", ms=8, label="measured sup |xy net - xy| on [-1,1]^2")
    ax.plot(depths, [-2 * m - 2 for m in depths], "k-", lw=1, label="theory: 2^(-2m-2)")
    ax.set_xlabel("depth m (hidden layers of the square net)")
    ax.set_ylabel("log2 sup error")
    ax.set_title("Yarotsky 2017: error 4^(-m) with depth m, width 3", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
