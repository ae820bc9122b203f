"""torch_dlt.nn.Scattering2D against kymatio 0.3.0's Scattering2D (torch frontend), same inputs.

Three workloads from the issue: (64, 1, 28, 28) J=2, (16, 3, 32, 32) J=2, (8, 3, 64, 64) J=3,
L=8, order 2, float32 on the CPU. Before timing, both outputs are compared (max relative error
over the output's scale must be below 1e-5). Each round times the forward and the
forward+backward (gradient with respect to the input) of both, interleaved; the speed-up is the
median over rounds of kymatio / ours within a round, so that a noisy neighbour on a shared
machine slows both sides of a ratio alike; the ratio of the best rounds is recorded too.
Besides wall-clock time it records the process's CPU time per call (all threads), which a
loaded machine disturbs less. Also counts the ATen ops one forward launches. The thread count
is recorded in the JSON's name; run with OMP_NUM_THREADS=1 and =2 (or --threads 1 / 2).

    python benchmarks/scattering.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from _common import median_time, write_json

from torch_dlt.nn import Scattering2D

WORKLOADS = (((64, 1, 28, 28), 2), ((16, 3, 32, 32), 2), ((8, 3, 64, 64), 3))


def _kymatio(J: int, shape: tuple[int, int]) -> torch.nn.Module:
    try:
        import kymatio
    except ImportError as error:
        raise SystemExit("this benchmark needs kymatio==0.3.0 (pip install kymatio)") from error
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kymatio.Scattering2D(J, shape, L=8, max_order=2, frontend="torch")


def cpu_time(fn, *, loops: int = 3) -> float:
    """Process CPU seconds (all threads) per call of ``fn``, after one warm-up call."""
    fn()
    start = time.process_time()
    for _ in range(loops):
        fn()
    return (time.process_time() - start) / loops


def _aten_ops(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))


def _forward_backward(layer: torch.nn.Module, x: torch.Tensor):
    def step() -> None:
        x.grad = None
        layer(x).sum().backward()

    return step


def run_workload(shape: tuple[int, ...], J: int, rounds: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=generator)
    peer, ours = _kymatio(J, shape[-2:]), Scattering2D(J, shape[-2:], L=8, max_order=2)
    with torch.no_grad():
        expected, got = peer(x), ours(x)
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    if got.shape != expected.shape or not error < 1e-5:
        raise SystemExit(
            f"outputs differ on {shape} J={J}: {got.shape} vs {expected.shape}, {error}"
        )
    x_grad = x.clone().requires_grad_(True)
    cases = {
        "forward": {name: (lambda m=m: m(x)) for name, m in (("kymatio", peer), ("ours", ours))},
        "forward_backward": {
            name: _forward_backward(m, x_grad) for name, m in (("kymatio", peer), ("ours", ours))
        },
    }
    result: dict = {
        "input": list(shape),
        "J": J,
        "L": 8,
        "max_order": 2,
        "max_relative_error": error,
    }
    for mode, fns in cases.items():
        samples: dict[str, list[float]] = {name: [] for name in fns}
        cpu: dict[str, list[float]] = {name: [] for name in fns}
        with torch.no_grad() if mode == "forward" else torch.enable_grad():
            for _ in range(rounds):
                for name, fn in fns.items():
                    samples[name].append(median_time(fn, repeats=3, min_time=0.1))
                    cpu[name].append(cpu_time(fn))
        result[mode] = {
            "kymatio_s": statistics.median(samples["kymatio"]),
            "ours_s": statistics.median(samples["ours"]),
            "speedup": statistics.median(
                k / o for k, o in zip(samples["kymatio"], samples["ours"])
            ),
            "kymatio_cpu_s": statistics.median(cpu["kymatio"]),
            "ours_cpu_s": statistics.median(cpu["ours"]),
            "cpu_speedup": statistics.median(k / o for k, o in zip(cpu["kymatio"], cpu["ours"])),
            "best_speedup": min(samples["kymatio"]) / min(samples["ours"]),
            "best_cpu_speedup": min(cpu["kymatio"]) / min(cpu["ours"]),
            "samples_s": samples,
            "cpu_samples_s": cpu,
        }
    with torch.no_grad():
        result["aten_ops_per_forward"] = {"kymatio": _aten_ops(cases["forward"]["kymatio"])}
        result["aten_ops_per_forward"]["ours"] = _aten_ops(cases["forward"]["ours"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round instead of five")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: as set)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rounds = 1 if args.quick else 5
    results = []
    for shape, J in WORKLOADS:
        r = run_workload(shape, J, rounds)
        results.append(r)
        print(
            f"{str(tuple(shape)):>16} J={J}: forward {r['forward']['ours_s'] * 1e3:7.1f} ms "
            f"(kymatio {r['forward']['kymatio_s'] * 1e3:7.1f}, x{r['forward']['speedup']:.2f})  "
            f"forward+backward {r['forward_backward']['ours_s'] * 1e3:7.1f} ms "
            f"(kymatio {r['forward_backward']['kymatio_s'] * 1e3:7.1f}, "
            f"x{r['forward_backward']['speedup']:.2f})  CPU-time speed-up "
            f"x{r['forward']['cpu_speedup']:.2f} / x{r['forward_backward']['cpu_speedup']:.2f}  "
            f"best/best x{r['forward']['best_speedup']:.2f} / "
            f"x{r['forward_backward']['best_speedup']:.2f}  "
            "ATen ops "
            f"{r['aten_ops_per_forward']['ours']} vs {r['aten_ops_per_forward']['kymatio']}"
        )
    threads = torch.get_num_threads()
    path = write_json(
        f"scattering_cpu_threads{threads}",
        {
            "benchmark": "scattering",
            "device": "cpu",
            "peer": "kymatio 0.3.0 Scattering2D(frontend='torch')",
            "dtype": "float32",
            "rounds": rounds,
            "workloads": results,
            "min_speedup": min(
                r[mode]["speedup"] for r in results for mode in ("forward", "forward_backward")
            ),
            "min_cpu_speedup": min(
                r[mode]["cpu_speedup"] for r in results for mode in ("forward", "forward_backward")
            ),
        },
    )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
