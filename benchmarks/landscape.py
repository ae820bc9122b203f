"""torch_dlt.probes.surface_2d against loss-landscapes 3.0.6's random_plane, 51 x 51 grid.

Two cases: a small deep CNN on 512 embedded 8x8 digits (the convolutions after the first
dominate), and an MLP 784-512-512-10 on 512 MNIST images (the first layer dominates; digits
upsampled to 28x28 stand in when ../shared/data/mnist.npz is absent). The peer moves the model's
weights in place and runs one forward pass per grid point; ours computes the first layer's
outputs for the weights and both directions once and stacks the grid points through the rest of
the net. Before timing, the values are checked on the same plane: the peer's directions are
rebuilt from the same seed (its rand_u_like / orthogonal_to / filter_normalize_) and passed to
surface_2d on the peer's grid. Ours and the peer run alternately; the median time of each and
the speed-up (peer / ours) per case go to JSON.

    python benchmarks/landscape.py [--quick] [--cases deep_cnn mlp]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from _common import write_json
from torch import nn

from torch_dlt.data import digits, mnist
from torch_dlt.nn import DeepCNN, DeepMLP
from torch_dlt.probes import random_direction, surface_2d

STEPS = 51
MNIST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist.npz"


def _deep_cnn_case() -> tuple[str, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = DeepCNN(1, width=8, depth=3, out_features=10, activation="relu").eval()
    x, y = digits()
    return "DeepCNN(1, width=8, depth=3, relu), 512 digits 8x8", model, x[:512], y[:512]


def _mlp_case() -> tuple[str, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = DeepMLP(784, width=512, depth=2, out_features=10, activation="relu").eval()
    if MNIST.exists():
        split = mnist(str(MNIST))
        x, y, data = split.x_train[:512], split.y_train[:512], "512 MNIST images 28x28"
    else:
        x, y = digits(size=28)
        x, y, data = x[:512], y[:512], "512 digits upsampled to 28x28"
    return f"DeepMLP 784-512-512-10 (relu), {data}", model, x, y


CASES = {"deep_cnn": _deep_cnn_case, "mlp": _mlp_case}


def _peer_plane_directions(model: nn.Module, seed: int) -> list[list[torch.Tensor]]:
    """The two step vectors random_plane draws after torch.manual_seed(seed)."""
    from loss_landscapes.model_interface.model_parameters import (
        ModelParameters,
        orthogonal_to,
        rand_u_like,
    )

    torch.manual_seed(seed)
    start = ModelParameters([p.detach().clone() for p in model.parameters()])
    one = rand_u_like(start)
    two = orthogonal_to(one)
    out = []
    for d in (one, two):
        d.filter_normalize_(start)
        d.mul_(((start.model_norm() / 1) / STEPS) / d.model_norm())
        out.append([t.clone() for t in d.parameters])
    return out


def check_values(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest |ours - peer| on the peer's own plane and grid."""
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    loss_fn = nn.functional.cross_entropy
    peer = torch.from_numpy(
        _seeded(
            1,
            lambda: loss_landscapes.random_plane(
                model, Loss(loss_fn, x, y), distance=1, steps=STEPS, deepcopy_model=True
            ),
        )
    ).double()
    directions = _peer_plane_directions(model, 1)
    # The peer's point (i, j) is start + i d1 + k d2 with start = w - STEPS/2 (d1 + d2) and
    # k = j + 1 on even columns i, k = j on odd ones (its serpentine walk).
    half = STEPS / 2
    ours = surface_2d(model, loss_fn, (x, y), directions, span=(-half, half), steps=STEPS + 1)
    ours = ours.losses[:STEPS]
    diff = 0.0
    for i in range(STEPS):
        shift = 1 if i % 2 == 0 else 0
        diff = max(diff, float((ours[i, shift : shift + STEPS] - peer[i]).abs().max()))
    return diff


def _seeded(seed: int, fn):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions run in turn in every repeat so
    that a busy machine slows them alike."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(times) for name, times in samples.items()}


def run_case(name: str, quick: bool) -> dict:
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    case, model, x, y = CASES[name]()
    loss_fn = nn.functional.cross_entropy
    max_abs_diff = check_values(model, x, y)
    print(f"[{name}] values on the same plane: max |ours - loss-landscapes| = {max_abs_diff:.2e}")

    def ours() -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        ds = [random_direction(model, generator=gen) for _ in range(2)]
        return surface_2d(model, loss_fn, (x, y), ds, steps=STEPS).losses

    def peer() -> object:
        return loss_landscapes.random_plane(
            copy.deepcopy(model), Loss(loss_fn, x, y), steps=STEPS, normalization="filter"
        )

    times = interleaved_medians({"ours": ours, "peer": peer}, repeats=2 if quick else 5)
    ours_s, peer_s = times["ours"], times["peer"]
    print(
        f"[{name}] 51x51 plane: ours {ours_s:.3f} s, loss-landscapes {peer_s:.3f} s, "
        f"speed-up x{peer_s / ours_s:.2f}"
    )
    return {
        "case": f"{case}, 51x51 grid, float32",
        "max_abs_value_diff_same_plane": max_abs_diff,
        "ours_s": ours_s,
        "loss_landscapes_s": peer_s,
        "speedup": peer_s / ours_s,
    }


def run(quick: bool, cases: list[str]) -> dict:
    results = {name: run_case(name, quick) for name in cases}
    first = results[cases[0]]
    return {
        "benchmark": "landscape",
        "device": "cpu",
        "peer": "loss-landscapes 3.0.6 random_plane(normalization='filter')",
        # The first case's figures stay at the top level, where earlier results kept them.
        **first,
        "cases": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument(
        "--cases", nargs="+", choices=sorted(CASES), default=list(CASES), help="cases to run"
    )
    args = parser.parse_args()
    result = run(args.quick, args.cases)
    path = write_json(f"landscape_cpu_threads{torch.get_num_threads()}", result)
    for name, case in result["cases"].items():
        print(f"{name}: speed-up x{case['speedup']:.2f}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
