"""A torch_dlt.robust.CertifiedTraining step against a normal training step and auto_LiRPA's.

The Wong & Kolter (2018) CNN-small on a batch of 256 28x28 inputs, Adam, one thread. One step is
zero_grad + loss + backward + optimiser step, for

- a normal step: cross-entropy of the clean logits;
- ours, IBP: ``CertifiedTraining(method="ibp")`` at eps = 0.1 (Gowal et al. 2018);
- ours, CROWN-IBP: ``CertifiedTraining(method="crown-ibp")`` in its ramp, beta = 0.5, so both the
  CROWN-IBP and the IBP bound enter the loss (Zhang et al. 2020);
- auto_LiRPA 0.7.1, CROWN-IBP: the same step written with BoundedModule / BoundedTensor the way
  its CROWN-IBP training example does it (IBP bound, then the backward bound with IBP
  intermediate bounds and ``bound_upper=False``, mixed by beta).

Before timing, both libraries' IBP and CROWN-IBP margin lower bounds on the batch are compared.
Steps are interleaved in rounds; the ratios are medians over rounds of the ratio within a round,
of CPU time (robust to other processes sharing the machine) and of wall time. Targets:
CROWN-IBP step <= 15x a normal step, IBP step <= 4x.

With ``--retain-freed-memory`` the process first calls ``torch_dlt.retain_freed_memory()``:
glibc then keeps the A-matrices' freed memory for the next step instead of mapping it afresh
(tens of megabytes of page faults per step otherwise; the normal step has none either way).

    OMP_NUM_THREADS=1 python benchmarks/certified_training.py [--quick] [--retain-freed-memory]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _common import write_json
from torch import nn
from torch.nn import functional as F

from torch_dlt import retain_freed_memory
from torch_dlt.nn import cnn_small
from torch_dlt.robust import CertifiedTraining, bounds

EPS = 0.1
BATCH = 256


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def normal_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.Adam(model.parameters(), lr=1e-9)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def ours_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str):
    opt = torch.optim.Adam(model.parameters(), lr=1e-9)
    trainer = CertifiedTraining(model, 2 * EPS, method=method, ramp_steps=2)
    trainer.step(1)  # eps = 0.1, beta = 0.5: mid-ramp, both bounds needed

    def step() -> None:
        opt.zero_grad()
        trainer.loss(x, y).backward()
        opt.step()

    return step


def _lirpa(model: nn.Module, x: torch.Tensor):
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    bounded = BoundedModule(model, torch.empty_like(x), device="cpu", verbose=0)
    low, high = (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1)
    ptb = PerturbationLpNorm(norm=float("inf"), eps=EPS, x_L=low, x_U=high)
    return bounded, BoundedTensor(x, ptb)


def lirpa_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    bounded, bx = _lirpa(model, x)
    opt = torch.optim.Adam(bounded.parameters(), lr=1e-9)
    C = bounds.margin_matrix(y, 10)
    beta, kappa = 0.5, 0.75

    def step() -> None:
        opt.zero_grad()
        logits = bounded(bx)
        ibp, _ = bounded.compute_bounds(IBP=True, C=C, method=None)
        crown_ibp, _ = bounded.compute_bounds(IBP=True, C=C, method="backward", bound_upper=False)
        lower = beta * crown_ibp + (1 - beta) * ibp
        worst = torch.cat([lower.new_zeros(len(y), 1), -lower], 1)
        robust = F.cross_entropy(worst, torch.zeros_like(y))
        (kappa * F.cross_entropy(logits, y) + (1 - kappa) * robust).backward()
        opt.step()

    return step


def check_values(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Largest |ours - auto_LiRPA| of the IBP and CROWN-IBP margin lower bounds."""
    bounded, bx = _lirpa(copy.deepcopy(model), x)
    C = bounds.margin_matrix(y, 10)
    low, high = (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1)
    with torch.no_grad():
        bounded(bx)
        peer_ibp, _ = bounded.compute_bounds(IBP=True, C=C, method=None)
        peer_crown, _ = bounded.compute_bounds(IBP=True, C=C, method="backward", bound_upper=False)
        ours_ibp = bounds.interval_bounds(model, low, high, C=C)[0]
        ours_crown = bounds.crown_bounds(model, low, high, C=C, method="crown-ibp")[0]
    return {
        "ibp_max_abs_diff": float((ours_ibp - peer_ibp).abs().max()),
        "crown_ibp_max_abs_diff": float((ours_crown - peer_crown).abs().max()),
        "crown_ibp_mean_lower": float(ours_crown.mean()),
    }


def _time(fn, loops: int) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.process_time() - cpu) / loops, (time.perf_counter() - wall) / loops


def run(quick: bool) -> dict:
    torch.manual_seed(0)
    base = cnn_small()
    x, y = _batch()
    steps = {"normal": normal_step(copy.deepcopy(base), x, y)}
    steps["ours_ibp"] = ours_step(copy.deepcopy(base), x, y, "ibp")
    steps["ours_crown_ibp"] = ours_step(copy.deepcopy(base), x, y, "crown-ibp")
    values = None
    try:
        steps["auto_lirpa_crown_ibp"] = lirpa_step(copy.deepcopy(base), x, y)
        values = check_values(base, x, y)
    except ImportError:
        print("auto_LiRPA is not installed: timing ours only")
    for fn in steps.values():  # tracing, first-call allocations
        fn()
    rounds, loops = (2, 1) if quick else (15, 2)
    cpu = {name: [] for name in steps}
    wall = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            c, w = _time(fn, loops if name == "normal" or name == "ours_ibp" else 1)
            cpu[name].append(c)
            wall[name].append(w)
    result = {
        "benchmark": "certified_training",
        "model": "CNN-small (Wong & Kolter 2018)",
        "batch": BATCH,
        "eps": EPS,
        "rounds": rounds,
        "values": values,
        "step_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "step_wall_s": {k: statistics.median(v) for k, v in wall.items()},
        "ratios_cpu": {},
        "ratios_wall": {},
        "targets": {"ours_crown_ibp_over_normal": 15.0, "ours_ibp_over_normal": 4.0},
    }
    for kind, table in (("cpu", cpu), ("wall", wall)):
        ratios = result[f"ratios_{kind}"]
        for name in steps:
            if name != "normal":
                ratios[f"{name}_over_normal"] = statistics.median(
                    a / b for a, b in zip(table[name], table["normal"])
                )
        if "auto_lirpa_crown_ibp" in steps:
            ratios["auto_lirpa_over_ours_crown_ibp"] = statistics.median(
                a / b for a, b in zip(table["auto_lirpa_crown_ibp"], table["ours_crown_ibp"])
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two rounds of one step each")
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="call torch_dlt.retain_freed_memory() first (glibc keeps freed memory for reuse)",
    )
    args = parser.parse_args()
    retained = args.retain_freed_memory and retain_freed_memory()
    result = run(args.quick)
    result["retain_freed_memory"] = bool(retained)
    name = f"certified_training_cpu_threads{torch.get_num_threads()}"
    path = write_json(name + ("_retain" if retained else ""), result)
    for kind in ("cpu", "wall"):
        print(kind, {k: round(v, 2) for k, v in result[f"ratios_{kind}"].items()})
    print("step seconds (cpu)", {k: round(v, 4) for k, v in result["step_cpu_s"].items()})
    print("values", result["values"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
