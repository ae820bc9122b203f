"""torch_dlt.probes.surface_2d against loss-landscapes 3.0.6's random_plane, 51 x 51 grid.

Both evaluate a small CNN on 512 embedded digits on a filter-normalised random plane. The peer
moves the model's weights in place and runs one forward pass per grid point; ours vmaps
functional_call over chunks of grid points. Before timing, the values are checked on the same
plane: the peer's directions are rebuilt from the same seed (its rand_u_like / orthogonal_to /
filter_normalize_) and passed to surface_2d on the peer's grid. Reports the median time of each
and the speed-up (peer / ours) as JSON.

    python benchmarks/landscape.py [--quick]
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import median_time, write_json
from torch import nn

from torch_dlt.data import digits
from torch_dlt.nn import DeepCNN
from torch_dlt.probes import random_direction, surface_2d

STEPS = 51


def _model() -> nn.Module:
    torch.manual_seed(0)
    return DeepCNN(1, width=8, depth=3, out_features=10, activation="relu").eval()


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


def run(quick: bool) -> dict:
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    x, y = digits()
    x, y = x[:512], y[:512]
    model = _model()
    loss_fn = nn.functional.cross_entropy
    max_abs_diff = check_values(model, x, y)
    print(f"values on the same plane: max |ours - loss-landscapes| = {max_abs_diff:.2e}")

    chunk = 1  # point by point: vmapped convolutions are grouped ones, slower on a CPU

    def ours() -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        ds = [random_direction(model, generator=gen) for _ in range(2)]
        return surface_2d(model, loss_fn, (x, y), ds, steps=STEPS, chunk_size=chunk).losses

    def peer() -> object:
        return loss_landscapes.random_plane(
            copy.deepcopy(model), Loss(loss_fn, x, y), steps=STEPS, normalization="filter"
        )

    repeats = 3 if quick else 5
    ours_s = median_time(ours, repeats=repeats, warmup=1, min_time=0.0)
    peer_s = median_time(peer, repeats=repeats, warmup=1, min_time=0.0)
    print(
        f"51x51 plane: ours {ours_s:.3f} s, loss-landscapes {peer_s:.3f} s, "
        f"speed-up x{peer_s / ours_s:.2f}"
    )
    return {
        "benchmark": "landscape",
        "device": "cpu",
        "peer": "loss-landscapes 3.0.6 random_plane(normalization='filter')",
        "case": "DeepCNN(1, width=8, depth=3, relu), 512 digits 8x8, 51x51 grid, float32",
        "max_abs_value_diff_same_plane": max_abs_diff,
        "ours_s": ours_s,
        "loss_landscapes_s": peer_s,
        "speedup": peer_s / ours_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    result = run(args.quick)
    path = write_json(f"landscape_cpu_threads{torch.get_num_threads()}", result)
    print(f"speed-up x{result['speedup']:.2f} -> {path}")


if __name__ == "__main__":
    main()
