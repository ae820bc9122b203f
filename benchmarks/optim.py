"""torch_dlt.optim.AdaGradNorm.step() against torch.optim.SGD and torch.optim.Adagrad (foreach).

One ResNet-18-sized parameter list (torchvision.models.resnet18(): 62 tensors, 11.7M values),
gradients filled with random values once, every optimiser stepping the same tensors in the same
process. Reports the median time of one step() of each, the ratios ours / SGD and ours / Adagrad
(median over rounds of the ratio within a round) and the ratio of the best rounds, as JSON.

SGD is the floor: one read of x and G and one write of x per value. AdaGrad-Norm (Ward, Wu &
Bottou 2019) must finish the norm of the whole gradient before it may move any parameter, so it
reads G once more: 4 memory streams against SGD's 3, a ratio of 4/3 when memory bandwidth bounds
both. The thread count is recorded; run it with OMP_NUM_THREADS=1 and without to compare.

    python benchmarks/optim.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import median_time, write_json

from torch_dlt.optim import AdaGradNorm


def resnet18_parameters(device: str) -> list[torch.Tensor]:
    try:
        from torchvision.models import resnet18
    except ImportError as error:
        raise SystemExit("this benchmark needs torchvision for the ResNet-18 shapes") from error
    generator = torch.Generator().manual_seed(0)
    params = []
    for p in resnet18().parameters():
        x = p.detach().to(device).requires_grad_(True)
        x.grad = torch.randn(p.shape, generator=generator).to(device)
        params.append(x)
    return params


def contenders(params: list[torch.Tensor]) -> dict[str, torch.optim.Optimizer]:
    # Small steps so that thousands of timed steps leave the parameters at the same scale.
    return {
        "sgd_foreach": torch.optim.SGD(params, lr=1e-6, foreach=True),
        "adagrad_foreach": torch.optim.Adagrad(params, lr=1e-6, foreach=True),
        "adagrad_norm_global_foreach": AdaGradNorm(params, lr=1e-3, foreach=True),
        "adagrad_norm_global_loop": AdaGradNorm(params, lr=1e-3, foreach=False),
        "adagrad_norm_layer_foreach": AdaGradNorm(params, lr=1e-3, scope="layer", foreach=True),
    }


def run(device: str, quick: bool) -> dict:
    params = resnet18_parameters(device)
    optimisers = contenders(params)
    rounds = 2 if quick else 7
    samples: dict[str, list[float]] = {name: [] for name in optimisers}
    # Rounds interleave the contenders, and the ratios are taken within a round, so that a noisy
    # neighbour on a shared machine slows both sides of a ratio alike.
    with torch.no_grad():
        for _ in range(rounds):
            for name, opt in optimisers.items():
                samples[name].append(median_time(opt.step, device=device))
    seconds = {name: statistics.median(times) for name, times in samples.items()}

    def ratio(name: str, peer: str) -> float:
        return statistics.median(a / b for a, b in zip(samples[name], samples[peer]))

    best = {name: min(times) for name, times in samples.items()}
    ours = {
        name: {
            "step_s": seconds[name],
            "over_sgd": ratio(name, "sgd_foreach"),
            "over_adagrad": ratio(name, "adagrad_foreach"),
            "best_over_best_sgd": best[name] / best["sgd_foreach"],
        }
        for name in optimisers
        if name.startswith("adagrad_norm")
    }
    for name, t in seconds.items():
        line = f"{name:>28}: {t * 1e3:8.3f} ms"
        if name in ours:
            line += (
                f"   x{ours[name]['over_sgd']:.2f} SGD   x{ours[name]['over_adagrad']:.2f} Adagrad"
            )
        print(line)
    return {
        "benchmark": "optim",
        "device": device,
        "parameters": "torchvision.models.resnet18()",
        "tensors": len(params),
        "numel": sum(p.numel() for p in params),
        "dtype": "float32",
        "peers": {
            "sgd_foreach_s": seconds["sgd_foreach"],
            "adagrad_foreach_s": seconds["adagrad_foreach"],
        },
        "ours": ours,
        "ratio_global_foreach_over_sgd": ours["adagrad_norm_global_foreach"]["over_sgd"],
        "ratio_global_foreach_over_adagrad": ours["adagrad_norm_global_foreach"]["over_adagrad"],
        "bandwidth_bound_ratio_over_sgd": 4 / 3,
        "rounds": rounds,
        "samples_s": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="two rounds instead of seven")
    args = parser.parse_args()
    result = run(args.device, args.quick)
    path = write_json(f"optim_{args.device}_threads{torch.get_num_threads()}", result)
    print(
        f"AdaGradNorm(scope='global', foreach=True).step(): "
        f"x{result['ratio_global_foreach_over_sgd']:.2f} SGD, "
        f"x{result['ratio_global_foreach_over_adagrad']:.2f} Adagrad -> {path}"
    )


if __name__ == "__main__":
    main()
