"""torch_dlt.robust.bounds against auto_LiRPA 0.7.1: IBP, CROWN-IBP and CROWN time per batch.

The Wong & Kolter (2018) "CNN-small" (conv 16 4x4/2 pad 1, conv 32 4x4/2 pad 1, fc 100, fc 10 on
1x28x28) at its initialisation (seed 0), a batch of 256 MNIST test images (the digits upsampled
to 28x28 when ../shared/data/mnist.npz is absent), eps = 0.1, margins specification C
(``margin_matrix``, 9 rows), both bounds, one CPU thread, the same process for both tools.
"CROWN-IBP lower" is the lower bound alone (``bound_upper=False`` in both tools), all that
certification and certified training use.
Before timing, the bounds of the two tools are compared (IBP and CROWN-IBP must agree; our CROWN
with ``interval_reference=False`` against auto_LiRPA without sparse intermediate bounds).
Reports the median time of a plain forward pass and of each bound, the ratio to the forward
pass and the speed-up over auto_LiRPA, as JSON.

Targets: IBP <= 2.5x a forward; CROWN-IBP >= 2x and CROWN >= 5x faster than auto_LiRPA.
The certified-training step is timed by benchmarks/certified_training.py.

With ``--retain-freed-memory`` the process first calls ``torch_dlt.retain_freed_memory()``, so
that glibc keeps freed memory for reuse (see benchmarks/certified_training.py).

    OMP_NUM_THREADS=1 python benchmarks/certified.py [--quick] [--retain-freed-memory]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import median_time, write_json
from torch import nn

from torch_dlt import retain_freed_memory
from torch_dlt.data import digits, mnist
from torch_dlt.nn import cnn_small
from torch_dlt.robust.bounds import crown_bounds, interval_bounds, margin_matrix

MNIST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist.npz"
EPS = 0.1


def seeded_cnn_small() -> nn.Module:
    torch.manual_seed(0)
    return cnn_small().eval()


def batch(size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    if MNIST.exists():
        split = mnist(MNIST, normalize=False, limit=size)
        return split.x_test[:size].reshape(-1, 1, 28, 28), split.y_test[:size], "mnist"
    x, y = digits()
    x = F.interpolate(x[:size], size=28, mode="bilinear", align_corners=False).clamp(0, 1)
    return x, y[:size], "digits upsampled to 28x28"


def _name(quick: bool, retained: bool) -> str:
    return ("certified_quick" if quick else "certified") + ("_retain" if retained else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 32, fewer repeats")
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="call torch_dlt.retain_freed_memory() first (glibc keeps freed memory for reuse)",
    )
    args = parser.parse_args()
    retained = args.retain_freed_memory and retain_freed_memory()
    torch.set_num_threads(1)
    size = 32 if args.quick else 256
    repeats = 3 if args.quick else 5
    net = seeded_cnn_small()
    x, y, data = batch(size)
    C = margin_matrix(y, 10)
    lower, upper = (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1)

    ours = {
        "IBP": lambda: interval_bounds(net, lower, upper, C=C),
        "CROWN-IBP": lambda: crown_bounds(net, lower, upper, C=C, method="crown-ibp"),
        "CROWN-IBP lower": lambda: crown_bounds(
            net, lower, upper, C=C, method="crown-ibp", bound_upper=False
        ),
        "CROWN": lambda: crown_bounds(net, lower, upper, C=C),
    }
    results: dict = {"model": "CNN-small (Wong & Kolter 2018)", "batch": size, "eps": EPS}
    results["retain_freed_memory"] = bool(retained)
    results["data"] = data
    with torch.no_grad():
        # glibc serves a freed size again from the heap only once a larger block has been freed
        # (its dynamic mmap threshold): until then every fresh activation-sized tensor costs a
        # pass of page faults, about half of a forward pass here. A running training or
        # certification loop is past that point, so the timings start from there.
        ours["CROWN-IBP"]()
        forwards, paired = [], []
        for _ in range(repeats):
            forwards.append(median_time(lambda: net(x), repeats=3))
            paired.append(median_time(ours["IBP"], repeats=3) / forwards[-1])
        forward = statistics.median(forwards)
        results["forward_s"] = forward
        results["ours_IBP_over_forward_paired"] = statistics.median(paired)
        print(f"forward {forward * 1e3:.1f} ms; IBP / forward {statistics.median(paired):.2f}")
    try:
        import auto_LiRPA
    except ImportError:
        results["auto_LiRPA"] = "not installed"
        with torch.no_grad():
            for name, fn in ours.items():
                results[f"ours_{name}_s"] = median_time(fn, repeats=1, warmup=0)
                results[f"ours_{name}_over_forward"] = results[f"ours_{name}_s"] / forward
        print(results)
        print(write_json(_name(args.quick, retained), results))
        return
    results["auto_LiRPA"] = getattr(auto_LiRPA, "__version__", "installed")
    # auto_LiRPA's method name and whether it computes the upper bound, per row of ``ours``
    peer_calls = {name: (name, True) for name in ours}
    peer_calls["CROWN-IBP lower"] = ("CROWN-IBP", False)
    ptb = auto_LiRPA.PerturbationLpNorm(norm=float("inf"), x_L=lower, x_U=upper)
    box = auto_LiRPA.BoundedTensor(x, ptb)
    peer = auto_LiRPA.BoundedModule(net, x, verbose=0)
    plain = auto_LiRPA.BoundedModule(
        net, x, verbose=0, bound_opts={"sparse_intermediate_bounds": False}
    )
    net.eval()
    with torch.no_grad():
        agreement = {}
        for name, method in (("IBP", "IBP"), ("CROWN-IBP", "CROWN-IBP")):
            theirs = peer.compute_bounds(x=(box,), method=method, C=C)
            mine = ours[name]()
            agreement[name] = max((a - b).abs().max().item() for a, b in zip(mine, theirs))
        theirs = peer.compute_bounds(x=(box,), method="CROWN-IBP", C=C, bound_upper=False)[0]
        agreement["CROWN-IBP lower"] = (ours["CROWN-IBP lower"]()[0] - theirs).abs().max().item()
        theirs = plain.compute_bounds(x=(box,), method="CROWN", C=C)
        mine = crown_bounds(net, lower, upper, C=C, interval_reference=False)
        agreement["CROWN"] = max((a - b).abs().max().item() for a, b in zip(mine, theirs))
        results["max_abs_difference"] = agreement
        print("max |ours - auto_LiRPA|:", agreement)
        # Rounds alternate ours and theirs, so that the load of a shared machine hits both;
        # the speed-up is the median over rounds of the ratio within a round.
        for name in ours:
            rounds = 1 if name == "CROWN" else repeats
            ratios, mine_s, theirs_s = [], [], []
            for _ in range(rounds):
                one = 1 if name == "CROWN" else None
                mine = median_time(ours[name], repeats=one or 3, warmup=0 if one else 1)
                method, upper_too = peer_calls[name]
                theirs = median_time(
                    lambda method=method, upper_too=upper_too: peer.compute_bounds(
                        x=(box,), method=method, C=C, bound_upper=upper_too
                    ),
                    repeats=one or 3,
                    warmup=0 if one else 1,
                    min_time=0.0,
                )
                mine_s.append(mine)
                theirs_s.append(theirs)
                ratios.append(theirs / mine)
            seconds = statistics.median(theirs_s)
            results[f"ours_{name}_s"] = statistics.median(mine_s)
            results[f"ours_{name}_over_forward"] = results[f"ours_{name}_s"] / forward
            results[f"auto_LiRPA_{name}_s"] = seconds
            results[f"auto_LiRPA_{name}_over_forward"] = seconds / forward
            results[f"speedup_{name}"] = statistics.median(ratios)
            print(
                f"{name:15s} ours {results[f'ours_{name}_s'] * 1e3:9.1f} ms"
                f" ({results[f'ours_{name}_over_forward']:.1f}x forward), auto_LiRPA"
                f" {seconds * 1e3:9.1f} ms ({seconds / forward:.1f}x forward):"
                f" ours {results[f'speedup_{name}']:.2f}x faster"
            )
    net.eval()
    print(write_json(_name(args.quick, retained), results))


if __name__ == "__main__":
    main()
