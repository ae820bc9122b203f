"""torch_dlt.robust.attacks against foolbox 3.3.4 and torchattacks 3.5.1 on one small CNN.

The CNN (two 5x5 convolutions, max pooling, a linear head) is trained briefly on MNIST
(../shared/data/mnist.npz; the digits upsampled to 28x28 when it is absent) and attacked on
256 test images, on the CPU:

- DeepFool L2 (overshoot 0.02, 50 steps, the [0, 1] box active): time, success rate and median
  perturbation of ours, foolbox's L2DeepFoolAttack and torchattacks' DeepFool;
- the spatial grid of Engstrom et al. (31 rotations in [-30, 30] degrees x 5 x 5 shifts in
  [-3, 3] pixels): time and success of ours and foolbox's SpatialAttack(grid_search=True), on
  that CNN and on the same CNN trained with random rotations and shifts (Engstrom et al.'s
  augmentation), on which many inputs survive the whole grid. Both search the grid in the same
  order and stop at the first fooling transform; foolbox evaluates the whole batch until every
  input is fooled, ours drops fooled inputs. Foolbox's shifts are not whole pixels (its
  align_corners=True grid moves by 3 * 27/28 pixels for "3"), ours are.

Reports the times and the speed-ups (fastest peer / ours) as JSON. Ours is timed as the median
of 3 runs (1 with --quick), the peers, which take up to minutes, once.

    OMP_NUM_THREADS=1 python benchmarks/attacks.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import median_time, write_json
from torch import nn

from torch_dlt.data import digits, mnist
from torch_dlt.robust.attacks import deepfool, spatial

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"
SAMPLES = 256


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    if MNIST.exists():
        x_train, y_train, x_test, y_test = mnist(MNIST, limit=12000)
        return x_train, y_train, x_test, y_test, "MNIST"
    x_train, y_train, x_test, y_test = digits(test_fraction=0.3)
    x_train = F.interpolate(x_train, size=28, mode="bilinear", align_corners=False)
    x_test = F.interpolate(x_test, size=28, mode="bilinear", align_corners=False)
    return x_train.clamp(0, 1), y_train, x_test.clamp(0, 1), y_test, "digits upsampled to 28x28"


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotations in [-30, 30] degrees and shifts in [-3, 3] pixels (Engstrom et al.'s
    data augmentation), by one bilinear resampling."""
    angle = torch.deg2rad(60 * torch.rand(len(x), generator=generator) - 30)
    shift = (6 * torch.rand(len(x), 2, generator=generator) - 3) * 2 / x.shape[-1]
    theta = torch.stack(
        (
            torch.stack((angle.cos(), -angle.sin(), shift[:, 0]), 1),
            torch.stack((angle.sin(), angle.cos(), shift[:, 1]), 1),
        ),
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def train(x: torch.Tensor, y: torch.Tensor, epochs: int, augmented: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = small_cnn()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(128):
            xb = augment(x[batch], generator) if augmented else x[batch]
            optimiser.zero_grad()
            F.cross_entropy(model(xb), y[batch]).backward()
            optimiser.step()
    return model.eval()


def _fooled(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) != y


def _summary(model, x, y, x_adv) -> dict:
    fooled = _fooled(model, x_adv, y)
    size = (x_adv - x).flatten(1).norm(dim=1)
    return {
        "success_rate": float(fooled.float().mean()),
        "median_l2": float(size[fooled].median()) if bool(fooled.any()) else float("nan"),
        "in_box": bool(((x_adv >= 0) & (x_adv <= 1)).all()),
    }


def spatial_case(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict:
    import foolbox

    fmodel = foolbox.PyTorchModel(model, bounds=(0.0, 1.0))
    outputs = {}

    def ours() -> None:
        outputs["ours"] = spatial(model, x, y, grid=(31, 5, 5)).x_adv

    def peer() -> None:
        attack = foolbox.attacks.SpatialAttack(
            max_translation=3, max_rotation=30, num_translations=5, num_rotations=31
        )
        outputs["foolbox"] = attack.run(fmodel, x, y)

    row = {}
    for name, fn in (("ours", ours), ("foolbox", peer)):
        seconds = median_time(fn, repeats=repeats if name == "ours" else 1, warmup=0, min_time=0.0)
        fooled = _fooled(model, outputs[name], y)
        row[name] = {"seconds": seconds, "success_rate": float(fooled.float().mean())}
    with torch.no_grad():
        row["clean_accuracy"] = float((model(x).argmax(1) == y).float().mean())
    row["speedup_vs_foolbox"] = row["foolbox"]["seconds"] / row["ours"]["seconds"]
    return row


def run(quick: bool) -> dict:
    import foolbox
    import torchattacks

    x_train, y_train, x_test, y_test, source = data()
    model = train(x_train, y_train, epochs=1 if quick else 2)
    x, y = x_test[:SAMPLES], y_test[:SAMPLES]
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    print(f"{source}: small CNN test accuracy on the {SAMPLES} inputs {accuracy:.3f}")
    fmodel = foolbox.PyTorchModel(model, bounds=(0.0, 1.0))
    repeats = 1 if quick else 3

    outputs = {}

    def ours_deepfool() -> None:
        outputs["ours"] = deepfool(model, x, y, norm=2, overshoot=0.02, max_iter=50).x_adv

    def foolbox_deepfool() -> None:
        attack = foolbox.attacks.L2DeepFoolAttack(steps=50, overshoot=0.02)
        outputs["foolbox"] = attack.run(fmodel, x, y)

    def torchattacks_deepfool() -> None:
        outputs["torchattacks"] = torchattacks.DeepFool(model, steps=50, overshoot=0.02)(x, y)

    deepfool_rows = {}
    for name, fn in (
        ("ours", ours_deepfool),
        ("foolbox", foolbox_deepfool),
        ("torchattacks", torchattacks_deepfool),
    ):
        seconds = median_time(fn, repeats=repeats if name == "ours" else 1, warmup=0, min_time=0.0)
        deepfool_rows[name] = {"seconds": seconds, **_summary(model, x, y, outputs[name])}
        print(f"DeepFool L2 {name:>12}: {deepfool_rows[name]}")
    fastest_peer = min(
        deepfool_rows["foolbox"]["seconds"], deepfool_rows["torchattacks"]["seconds"]
    )
    deepfool_speedup = fastest_peer / deepfool_rows["ours"]["seconds"]
    median_ratio = deepfool_rows["ours"]["median_l2"] / deepfool_rows["foolbox"]["median_l2"]

    # The spatial grid on the same CNN, and on the CNN trained with rotation and translation
    # augmentation (Engstrom et al.'s defence), where many inputs survive the whole grid.
    robust_model = train(x_train, y_train, epochs=1 if quick else 2, augmented=True)
    spatial_cases = {}
    for case, net in (("plain", model), ("augmented", robust_model)):
        spatial_cases[case] = spatial_case(net, x, y, repeats)
        print(f"spatial grid, {case} CNN: {spatial_cases[case]}")
    spatial_speedup = spatial_cases["plain"]["speedup_vs_foolbox"]
    print(
        f"DeepFool speed-up x{deepfool_speedup:.2f} (median L2 ours / foolbox "
        f"{median_ratio:.3f}); spatial speed-up x{spatial_speedup:.2f}"
    )
    return {
        "benchmark": "attacks",
        "device": "cpu",
        "peers": "foolbox 3.3.4, torchattacks 3.5.1",
        "case": f"small CNN (2 conv 5x5 + max pool + linear) trained on {source}, "
        f"{SAMPLES} test inputs, float32, [0, 1] box",
        "clean_accuracy": accuracy,
        "deepfool_l2": deepfool_rows,
        "deepfool_speedup_vs_fastest_peer": deepfool_speedup,
        "deepfool_median_l2_ratio_vs_foolbox": median_ratio,
        "spatial_grid_31x5x5": spatial_cases,
        "spatial_speedup_vs_foolbox": spatial_speedup,
        "spatial_speedup_vs_foolbox_augmented_cnn": spatial_cases["augmented"][
            "speedup_vs_foolbox"
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, one training epoch")
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(args.quick)
    path = write_json(f"attacks_cpu_threads{torch.get_num_threads()}", result)
    print(f"done in {time.perf_counter() - start:.0f} s -> {path}")


if __name__ == "__main__":
    main()
