"""torch_dlt.ops.moments (one fused pass) against the unfused torch ops a user would write.

The peer is the pure-torch two-pass computation in torch_dlt.ops._reference (x.mean, the centred
powers, two more means): what the signal hooks would cost without the kernel. Reports per case
the median time of each and the speed-up ratio (peer time / ours), as JSON.

    python benchmarks/bench_moments.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import median_time, write_json

from torch_dlt import ops
from torch_dlt.ops import _reference

# (shape, dim): activations as the signal hooks see them, [samples, features] and conv maps.
CASES = [
    ((4096, 512), 0),
    ((256, 4096), 0),
    ((65536, 64), 0),
    ((128 * 14 * 14, 64), 0),
    ((64, 1_000_000), 1),
    ((1_000_000, 8), 0),
]


def run(device: str, quick: bool) -> dict:
    if not ops.has_ops():
        raise SystemExit("torch_dlt._C is not built: there is no compiled kernel to benchmark")
    rows = []
    cases = CASES[:3] if quick else CASES
    for dtype in (torch.float32, torch.float64):
        for shape, dim in cases:
            x = torch.randn(shape, dtype=dtype, device=device, generator=None) * 2 + 1
            ours = median_time(lambda x=x, dim=dim: ops.moments(x, dim), device=device)
            peer = median_time(lambda x=x, dim=dim: _reference.moments(x, dim), device=device)
            rows.append(
                {
                    "shape": list(shape),
                    "dim": dim,
                    "dtype": str(dtype).split(".")[-1],
                    "ours_s": ours,
                    "unfused_torch_s": peer,
                    "speedup": peer / ours,
                }
            )
            print(
                f"{str(shape):>22} dim={dim} {rows[-1]['dtype']:>8}: "
                f"speed-up x{rows[-1]['speedup']:.2f}"
            )
    return {
        "benchmark": "moments",
        "device": device,
        "peer": "unfused torch ops (two-pass)",
        "cases": rows,
        "median_speedup": statistics.median(r["speedup"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="three shapes only")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = run(args.device, args.quick)
    path = write_json(f"moments_{args.device}", result)
    print(f"median speed-up x{result['median_speedup']:.2f} -> {path}")


if __name__ == "__main__":
    main()
