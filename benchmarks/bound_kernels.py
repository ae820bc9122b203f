"""The compiled bound kernels (torch_dlt.ops.bounds) against their torch fallbacks.

Shapes of the CNN-small's first ReLU at batch 256 with the 9 margins of CROWN-IBP training:
A-matrices [256, 9, 16 * 14 * 14], interval boxes [256, 16, 14, 14], the stride-phase kernel
[4, 16, 2, 2]. Each op runs compiled and as the torch code that runs without the compiled
library (the same function with the kernels switched off), forward and forward + backward,
in interleaved rounds in one process; the JSON holds the median times and the median ratio
torch / compiled per op. The phase convolution's fallback is ``torch.nn.functional.conv2d``
(oneDNN on the CPU); the fused op's is its plain reference, which torch_dlt.robust.bounds never
runs (without the kernels it takes the unfused steps), so its row overstates. The fair whole is
the last row: the CROWN-IBP training step of benchmarks/certified_training.py with the kernels on
and off.

    OMP_NUM_THREADS=1 python benchmarks/bound_kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics

import torch
from _common import median_time, write_json
from certified_training import _batch, ours_step

import torch_dlt.ops
import torch_dlt.ops.bounds as bound_ops
from torch_dlt.nn import cnn_small
from torch_dlt.robust.bounds import _phase_taps


@contextlib.contextmanager
def kernels(on: bool):
    """The compiled kernels, or (``on=False``) the torch fallbacks of the same functions."""
    saved = bound_ops.has_bounds_ops
    off = lambda x=None: False  # noqa: E731
    for module in (bound_ops, torch_dlt.ops):
        module.has_bounds_ops = saved if on else off
    try:
        yield
    finally:
        for module in (bound_ops, torch_dlt.ops):
            module.has_bounds_ops = saved


def cases() -> dict:
    g = torch.Generator().manual_seed(0)
    B, m, C, h, w = 256, 9, 16, 14, 14
    K, R = h * w * C, (h + 1) * (w + 1) * 4

    def leaf(*shape, positive=False):
        t = (torch.rand if positive else torch.randn)(*shape, generator=g)
        return t.requires_grad_()

    A = leaf(B, m, K)
    lines = (leaf(B, K, positive=True), leaf(B, K, positive=True), leaf(B, K), leaf(B, K))
    lower, upper = leaf(B, C, h, w), leaf(B, C, h, w)
    maps = leaf(B * m, C, h, w).detach().contiguous(memory_format=torch.channels_last)
    maps.requires_grad_()
    taps = _phase_taps(torch.randn(16, 1, 4, 4, generator=g), (2, 2)).requires_grad_()
    frames = (torch.randn(B, R, generator=g), torch.rand(B, R, generator=g))
    centre, radius = torch.randn(B, C, h, w, generator=g), torch.rand(B, C, h, w, generator=g)
    return {
        "crown_lines": lambda: bound_ops.crown_lines(lower, upper, channels_last=True)[1:3],
        "relu_lines": lambda: bound_ops.relu_lines(A, *lines),
        "phase_conv": lambda: (bound_ops.phase_conv(maps, taps),),
        "relu_phase_lower": lambda: (bound_ops.relu_phase_lower(A, *lines, taps, *frames, h, w),),
        "ibp_relu_ (forward only)": lambda: bound_ops.ibp_relu_(centre.clone(), radius.clone()),
    }


def backward_of(fn):
    def run():
        outputs = [o for o in fn() if o.requires_grad]
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three rounds, no training step")
    args = parser.parse_args()
    if not bound_ops.has_bounds_ops():
        raise SystemExit("the compiled bound kernels are not built: nothing to compare")
    rounds = 3 if args.quick else 7
    result: dict = {"shapes": "CNN-small first ReLU, batch 256, 9 margins", "ops": {}}
    for name, fn in cases().items():
        timed = {"forward": fn}
        if "forward only" not in name:
            timed["forward+backward"] = backward_of(fn)
        for kind, run in timed.items():
            times = {"compiled": [], "torch": []}
            for _ in range(rounds):
                for label, on in (("compiled", True), ("torch", False)):
                    with kernels(on):
                        times[label].append(median_time(run, repeats=3))
            ratio = statistics.median(t / c for t, c in zip(times["torch"], times["compiled"]))
            result["ops"][f"{name} {kind}"] = {
                "compiled_s": statistics.median(times["compiled"]),
                "torch_s": statistics.median(times["torch"]),
                "torch_over_compiled": ratio,
            }
            print(f"{name:28s} {kind:17s} torch / compiled {ratio:5.2f}")
    if not args.quick:
        torch.manual_seed(0)
        x, y = _batch()
        steps = {on: ours_step(copy.deepcopy(cnn_small()), x, y, "crown-ibp") for on in (1, 0)}
        times = {1: [], 0: []}
        for _ in range(rounds):
            for on, step in steps.items():
                with kernels(bool(on)):
                    times[on].append(median_time(step, repeats=3))
        ratio = statistics.median(t / c for t, c in zip(times[0], times[1]))
        result["crown_ibp_training_step"] = {
            "compiled_s": statistics.median(times[1]),
            "torch_s": statistics.median(times[0]),
            "torch_over_compiled": ratio,
        }
        print(f"CROWN-IBP training step, torch / compiled {ratio:5.2f}")
    print(write_json("bound_kernels_quick" if args.quick else "bound_kernels_cpu", result))


if __name__ == "__main__":
    main()
