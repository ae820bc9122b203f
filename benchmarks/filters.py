"""torch_dlt.ops.filter_grid / spectral_signature (compiled) against their pure-torch references,
and filter_grid against torchvision.utils.make_grid, on 4096 filters.

Cases: [4096, 3, 5, 5] (RGB tiles) and [4096, 1, 11, 11] (grey tiles), per-filter min-max
normalisation, 64 tiles per row; spectral signatures with a 32-point (5x5) and 64-point (11x11)
DFT, 8 orientations x 8 frequencies. Outputs are checked equal before timing. Reports median
times and the speed-ups (other / ours) as JSON.

    python benchmarks/filters.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse

import torch
from _common import median_time, write_json

from torch_dlt import ops
from torch_dlt.ops import _filters_reference as ref
from torch_dlt.ops.filters import default_fft_size

SHAPES = [(4096, 3, 5, 5), (4096, 1, 11, 11)]


def run(quick: bool, device: str) -> dict:
    from torchvision.utils import make_grid

    if not ops.has_ops():
        raise SystemExit("torch_dlt._C is not built: nothing compiled to compare")
    repeats = 3 if quick else 7
    cases = []
    for shape in SHAPES:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        o, i, kh, kw = shape
        grid_args = (64, 1, 0.0, "filter", False, "rgb" if i == 3 else "tiles")
        ours = torch.ops.torch_dlt.filter_grid(w, *grid_args)
        peer = make_grid(w, nrow=64, padding=1, normalize=True, scale_each=True)
        diff_peer = float((ours - peer[: ours.shape[0]]).abs().max())
        diff_ref = float((ours - ref.filter_grid(w, *grid_args)).abs().max())
        t_ours = median_time(
            lambda w=w, a=grid_args: torch.ops.torch_dlt.filter_grid(w, *a),
            device=device,
            repeats=repeats,
        )
        t_ref = median_time(
            lambda w=w, a=grid_args: ref.filter_grid(w, *a), device=device, repeats=repeats
        )
        t_peer = median_time(
            lambda w=w: make_grid(w, nrow=64, padding=1, normalize=True, scale_each=True),
            device=device,
            repeats=repeats,
        )

        n = default_fft_size(kh, kw)
        bins = ref.spectral_bins(n, 8, 8).to(device)
        sig_args = (bins, 8, 8, n)
        got = torch.ops.torch_dlt.spectral_signature(w, *sig_args)
        want = ref.spectral_signature(w.double(), *sig_args)
        diff_sig = max(
            float(((g.double() - r).abs() / (r.abs() + 1e-3)).max()) for g, r in zip(got, want)
        )
        s_ours = median_time(
            lambda w=w, a=sig_args: torch.ops.torch_dlt.spectral_signature(w, *a),
            device=device,
            repeats=repeats,
        )
        s_ref = median_time(
            lambda w=w, a=sig_args: ref.spectral_signature(w, *a), device=device, repeats=repeats
        )
        case = {
            "weight": list(shape),
            "fft_size": n,
            "filter_grid_ours_s": t_ours,
            "filter_grid_reference_s": t_ref,
            "make_grid_s": t_peer,
            "filter_grid_speedup_vs_reference": t_ref / t_ours,
            "filter_grid_speedup_vs_make_grid": t_peer / t_ours,
            "filter_grid_max_abs_diff_make_grid": diff_peer,
            "filter_grid_max_abs_diff_reference": diff_ref,
            "spectral_ours_s": s_ours,
            "spectral_reference_s": s_ref,
            "spectral_speedup_vs_reference": s_ref / s_ours,
            "spectral_max_rel_diff_reference_float64": diff_sig,
        }
        cases.append(case)
        print(
            f"{shape}: filter_grid {t_ours * 1e3:.2f} ms (reference x{t_ref / t_ours:.1f}, "
            f"make_grid x{t_peer / t_ours:.1f}); spectral_signature n={n} {s_ours * 1e3:.2f} ms "
            f"(reference x{s_ref / s_ours:.1f}); max diffs {diff_peer:.1e} / {diff_sig:.1e}"
        )
    return {
        "benchmark": "filters",
        "device": device,
        "peer": "torchvision.utils.make_grid(normalize=True, scale_each=True); the ops' references",
        "cases": cases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    result = run(args.quick, args.device)
    path = write_json(f"filters_{args.device}_threads{torch.get_num_threads()}", result)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
