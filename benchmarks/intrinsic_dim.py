"""torch_dlt.theory intrinsic-dimension estimators against scikit-dimension (skdim).

Same data (a 5-dim cube embedded by a random orthogonal map in R^50), same estimators with the
same conventions: k-NN MLE with k neighbours (skdim.id.MLE(K=k)) and TwoNN with Facco et al.'s
linear fit discarding the top 10 % (skdim.id.TwoNN()). Reports both estimates, their difference
and the median time of each (ratio = skdim time / ours), as JSON. skdim is a peer for this
benchmark only (``pip install scikit-dimension``); without it ours are timed alone.

    python benchmarks/intrinsic_dim.py [--quick]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import median_time, write_json

from torch_dlt.theory import mle_dimension, twonn_dimension

K = 20


def cube(n: int, m: int = 5, ambient: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((ambient, m)))
    return rng.random((n, m)) @ q.T


def run(quick: bool) -> dict:
    try:
        import skdim
    except ImportError:
        skdim = None
        print("scikit-dimension (skdim) is not installed: timing torch_dlt alone")
    ours = {
        "mle": lambda X: mle_dimension(X, k=K),
        "twonn": lambda X: twonn_dimension(X),
    }
    peers = {
        "mle": lambda X: float(skdim.id.MLE(K=K).fit(X).dimension_),
        "twonn": lambda X: float(skdim.id.TwoNN().fit(X).dimension_),
    }
    rows = []
    for n in (5000,) if quick else (5000, 20000):
        X = cube(n)
        for name in ours:
            row = {"n": n, "estimator": name, "ours": ours[name](X)}
            row["ours_s"] = median_time(lambda f=ours[name], X=X: f(X), repeats=3, warmup=1)
            if skdim is not None:
                row["skdim"] = peers[name](X)
                row["difference"] = row["ours"] - row["skdim"]
                row["skdim_s"] = median_time(lambda f=peers[name], X=X: f(X), repeats=3, warmup=1)
                row["ratio"] = row["skdim_s"] / row["ours_s"]
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return {
        "benchmark": "intrinsic_dim",
        "data": "uniform [0,1]^5 embedded orthogonally in R^50 (true dimension 5)",
        "peer": f"scikit-dimension {skdim.__version__}" if skdim is not None else None,
        "k": K,
        "cases": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 5000 only")
    args = parser.parse_args()
    torch.manual_seed(0)
    path = write_json("intrinsic_dim_cpu", run(args.quick))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
