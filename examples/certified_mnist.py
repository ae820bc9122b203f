"""CROWN-IBP certified training of the Wong & Kolter "CNN-small" on MNIST at eps = 0.1, on a CPU.

The network of Wong & Kolter (2018) (conv 16 4x4/2, conv 32 4x4/2, fc 100, fc 10, ReLU) is
trained with ``torch_dlt.robust.CertifiedTraining`` (Zhang et al. 2020): eps stays 0 for a
warm-up, then ramps to eps while kappa goes 1 -> 0.5 and beta (CROWN-IBP against IBP) 1 -> 0,
then trains at the full eps. The schedule is fitted to a CPU-time budget (--minutes of process
time at one thread: the wall time on an idle core; on a shared machine the wall time is longer,
and --max-wall-minutes caps it): a step of each phase is timed first and the number of epochs
chosen so that training and certification fit. The
clean and verified test errors (verified: IBP or CROWN-IBP proves every margin positive at
eps = 0.1) are printed beside the published figures, with the wall time, and the training
curves go to examples/out/certified_mnist.png.

Reads MNIST from ../shared/data/mnist.npz (or --mnist PATH); without it, the scikit-learn
digits resized to 28x28.

    OMP_NUM_THREADS=1 python examples/certified_mnist.py                # 30 CPU-minutes
    OMP_NUM_THREADS=1 python examples/certified_mnist.py --minutes 90   # longer schedule
    python examples/certified_mnist.py --quick                          # < 1 min smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from torch_dlt import retain_freed_memory
from torch_dlt.data import digits, mnist
from torch_dlt.nn import cnn_small
from torch_dlt.robust import CertifiedTraining, certify

HERE = Path(__file__).resolve().parent
DEFAULT_MNIST = HERE.parent.parent / "shared" / "data" / "mnist.npz"

# MNIST, eps = 0.1 unless stated: (verified error %, clean error %), None where not published.
PUBLISHED = {
    "Wong & Kolter 2018 (LP dual, CNN-small), eps 0.1": (5.82, 1.8),
    "Gowal et al. 2018 (IBP), eps 0.1": (2.23, None),
    "Zhang et al. 2020 (CROWN-IBP), eps 0.1": (2.25, 0.97),
    "Gowal et al. 2018 (IBP), eps 0.3": (8.05, None),
    "Zhang et al. 2020 (CROWN-IBP), eps 0.3": (6.68, 1.62),
}


def load_data(path: Path, quick: bool) -> tuple[str, torch.Tensor, ...]:
    if path.exists():
        limit = 1000 if quick else None
        x_train, y_train, x_test, y_test = mnist(path, limit=limit)
        return "MNIST", x_train, y_train, x_test, y_test
    x_train, y_train, x_test, y_test = digits(size=28, test_fraction=0.2, seed=0)
    return "digits (28x28; MNIST not found)", x_train, y_train, x_test, y_test


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, methods: tuple[str, ...]
) -> tuple[float, float, dict[str, float]]:
    """Clean error, verified error (any method verifies) and each method's verified error, %."""
    verified_any = torch.zeros(len(y), dtype=torch.bool)
    per_method = {}
    correct = torch.zeros(len(y), dtype=torch.bool)
    for method in methods:
        verified = torch.cat(
            [
                certify(model, xb, yb, eps, method=method).verified
                for xb, yb in zip(x.split(500), y.split(500))
            ]
        )
        per_method[method] = 100.0 * (1.0 - verified.double().mean().item())
        verified_any |= verified
    with torch.no_grad():
        correct = torch.cat(
            [model(xb).argmax(1) == yb for xb, yb in zip(x.split(1000), y.split(1000))]
        )
    clean = 100.0 * (1.0 - correct.double().mean().item())
    return clean, 100.0 * (1.0 - verified_any.double().mean().item()), per_method


# Zhang et al. (2020): a short warm-up at eps = 0, a ramp of eps, kappa and beta, then the full
# eps with beta = 0 (IBP alone, a few times cheaper than CROWN-IBP).
WARMUP_FRACTION, RAMP_FRACTION = 0.03, 0.15


def phase_seconds(model: nn.Module, x, y, batch: int, eps: float, method: str) -> dict:
    """CPU seconds of one training step in each phase of the schedule; the model is restored."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ramp = CertifiedTraining(model, eps, method=method, ramp_steps=2)
    ramp.step(1)
    phases = {
        "warm-up": CertifiedTraining(model, eps, method=method, warmup_steps=10),
        "ramp": ramp,
        "final": CertifiedTraining(model, eps, method=method),
    }
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seconds = {}
    for name, trainer in phases.items():
        for i in range(3):  # the first step traces the network: not timed
            if i == 1:
                t0 = time.process_time()
            opt.zero_grad()
            trainer.loss(x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]).backward()
            opt.step()
        seconds[name] = (time.process_time() - t0) / 2
    model.load_state_dict(state)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run in under a minute")
    parser.add_argument("--minutes", type=float, default=30.0, help="CPU-time budget")
    parser.add_argument("--max-wall-minutes", type=float, default=None, help="wall-clock cap")
    parser.add_argument("--epochs", type=int, default=None, help="fix the epochs (no fitting)")
    parser.add_argument("--eps", type=float, default=0.1, help="test radius")
    parser.add_argument("--train-eps", type=float, default=None, help="training radius (= eps)")
    parser.add_argument("--method", default="crown-ibp", choices=["crown-ibp", "ibp"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kappa-end", type=float, default=0.5)
    parser.add_argument("--test-samples", type=int, default=None, help="certify only the first N")
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "certified_mnist.png")
    args = parser.parse_args()
    # Each step allocates the same large A-matrices: keep their memory instead of faulting it in
    # again every step (glibc only; no effect on the results).
    retain_freed_memory()
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(args.seed)
    if args.quick:
        args.minutes = min(args.minutes, 0.5)
    train_eps = args.eps if args.train_eps is None else args.train_eps

    name, x_train, y_train, x_test, y_test = load_data(args.mnist, args.quick)
    test_samples = args.test_samples or (200 if args.quick else len(x_test))
    x_test, y_test = x_test[:test_samples], y_test[:test_samples]
    batch = 128 if args.quick else args.batch_size
    steps_per_epoch = math.ceil(len(x_train) / batch)
    model = cnn_small()
    eval_methods = ("ibp", "crown-ibp")

    # Fit the number of epochs to the budget from the measured cost of each phase's steps;
    # certifying the test set costs about one CROWN-IBP bound (no backward) per sample.
    if args.epochs is not None or args.quick:
        epochs = args.epochs or 2
        seconds = None
    else:
        seconds = phase_seconds(model, x_train, y_train, batch, train_eps, args.method)
        per_step = (
            WARMUP_FRACTION * seconds["warm-up"]
            + RAMP_FRACTION * seconds["ramp"]
            + (1 - WARMUP_FRACTION - RAMP_FRACTION) * seconds["final"]
        )
        eval_seconds = 0.5 * seconds["ramp"] * (len(x_test) + 5 * 1000) / batch
        usable = 0.9 * (args.minutes * 60 - (time.process_time() - cpu_start)) - eval_seconds
        epochs = max(1, int(usable / (per_step * steps_per_epoch)))
    total_steps = epochs * steps_per_epoch
    warmup = max(1, round(WARMUP_FRACTION * total_steps))
    ramp = max(1, round(RAMP_FRACTION * total_steps))
    trainer = CertifiedTraining(
        model,
        train_eps,
        method=args.method,
        warmup_steps=warmup,
        ramp_steps=ramp,
        eps_shape="smooth",
        kappa_end=args.kappa_end,
    )
    timing = (
        ", ".join(f"{k} step {v:.2f} s" for k, v in seconds.items()) if seconds else "not timed"
    )
    print(
        f"{name}: {len(x_train)} train / {len(x_test)} test; {timing}; {epochs} epochs = "
        f"{total_steps} steps (warm-up {warmup}, ramp {ramp}), train eps {train_eps}, "
        f"test eps {args.eps}"
    )

    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[int(0.8 * total_steps), int(0.9 * total_steps)], gamma=0.2
    )
    g = torch.Generator().manual_seed(args.seed)
    history = {"step": [], "eps": [], "kappa": [], "beta": [], "loss": [], "train_verified_err": []}
    checkpoints = {"step": [], "clean_err": [], "verified_err": []}
    checkpoint_every = max(1, total_steps // 5)
    x_check, y_check = x_test[:1000], y_test[:1000]
    # Stop training in time to certify the test set.
    cpu_deadline = (
        cpu_start
        + (0.9 if args.quick else 0.95) * args.minutes * 60
        - (0.5 * seconds["ramp"] * len(x_test) / batch if seconds else 0.0)
    )
    wall_deadline = start + 60 * (args.max_wall_minutes or math.inf) * 0.95
    log_every = max(1, total_steps // 40)
    step = 0
    stopped_early = False
    model.train()
    while step < total_steps and not stopped_early:
        order = torch.randperm(len(x_train), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            parts = trainer.losses(x_train[idx], y_train[idx])
            opt.zero_grad(set_to_none=True)
            parts.loss.backward()
            opt.step()
            scheduler.step()
            history["step"].append(step)
            history["eps"].append(trainer.eps)
            history["kappa"].append(trainer.kappa)
            history["beta"].append(trainer.beta)
            history["loss"].append(parts.loss.item())
            history["train_verified_err"].append(100.0 * parts.verified_error.item())
            trainer.step()
            step += 1
            if step % checkpoint_every == 0 or step == total_steps:
                clean, verified, _ = evaluate(model, x_check, y_check, args.eps, ("ibp",))
                checkpoints["step"].append(step)
                checkpoints["clean_err"].append(clean)
                checkpoints["verified_err"].append(verified)
                print(
                    f"step {step}/{total_steps}  eps {trainer.eps:.4f}  "
                    f"loss {parts.loss.item():.4f}"
                    f"  test clean err {clean:.2f}%  IBP-verified err {verified:.2f}%  "
                    f"({(time.perf_counter() - start) / 60:.1f} min)",
                    flush=True,
                )
            elif step % log_every == 0:
                print(
                    f"step {step}/{total_steps}  eps {trainer.eps:.4f}  "
                    f"loss {parts.loss.item():.4f}  ({(time.perf_counter() - start) / 60:.1f} min "
                    f"wall, {(time.process_time() - cpu_start) / 60:.1f} min CPU)",
                    flush=True,
                )
            if step >= total_steps:
                break
            if time.process_time() > cpu_deadline or time.perf_counter() > wall_deadline:
                stopped_early = True
                break
    train_minutes = (time.perf_counter() - start) / 60

    model.eval()
    clean, verified, per_method = evaluate(model, x_test, y_test, args.eps, eval_methods)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(
        f"\n{name}, CNN-small, {args.method} training, {step} steps ({step / steps_per_epoch:.1f} "
        f"epochs){', stopped by the budget' if stopped_early else ''}, final train eps "
        f"{trainer.eps:.4f}"
    )
    print(f"{'':52s} verified err %   clean err %")
    print(f"{'torch_dlt (this run), eps ' + str(args.eps):52s} {verified:13.2f}   {clean:11.2f}")
    for method, err in per_method.items():
        print(f"{'  verified by ' + method + ' alone':52s} {err:13.2f}")
    for paper, (ver, cl) in PUBLISHED.items():
        cl_text = f"{cl:11.2f}" if cl is not None else f"{'-':>11s}"
        print(f"{paper:52s} {ver:13.2f}   {cl_text}")
    print(
        f"wall time {wall / 60:.1f} min (training {train_minutes:.1f} min), CPU time "
        f"{cpu / 60:.1f} min, {torch.get_num_threads()} thread(s)"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = history["step"]
    axes[0].plot(
        steps, [e / max(train_eps, 1e-12) for e in history["eps"]], label="eps / eps_train"
    )
    axes[0].plot(steps, history["kappa"], label="kappa")
    axes[0].plot(steps, history["beta"], label="beta")
    axes[0].set(xlabel="step", title="schedules (Zhang et al. 2020)")
    axes[0].legend(loc="center right")
    axes[1].plot(steps, history["loss"], lw=0.6, label="robust loss")
    axes[1].set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    twin = axes[1].twinx()
    twin.plot(steps, history["train_verified_err"], color="C3", lw=0.6, alpha=0.6)
    twin.set_ylabel("batch verified error at current eps (%)", color="C3")
    axes[2].plot(checkpoints["step"], checkpoints["clean_err"], "o-", label="clean")
    axes[2].plot(
        checkpoints["step"],
        checkpoints["verified_err"],
        "s-",
        label=f"IBP-verified, eps {args.eps}",
    )
    axes[2].axhline(2.25, color="grey", ls="--", lw=0.8, label="CROWN-IBP paper, verified")
    axes[2].axhline(5.82, color="grey", ls=":", lw=0.8, label="Wong & Kolter 2018, verified")
    axes[2].set(
        xlabel="step",
        ylabel="test error (%)",
        yscale="log",
        title=f"test error ({len(x_check)} samples)",
    )
    axes[2].legend(fontsize=8)
    fig.suptitle(
        f"CNN-small, {args.method} on {name}: clean {clean:.2f}%, verified {verified:.2f}% at eps "
        f"{args.eps} after {step / steps_per_epoch:.1f} epochs, {cpu / 60:.1f} min CPU "
        f"({wall / 60:.0f} min wall, {torch.get_num_threads()} thread(s))"
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    summary = {
        "data": name,
        "method": args.method,
        "eps": args.eps,
        "train_eps": train_eps,
        "epochs": step / steps_per_epoch,
        "steps": step,
        "stopped_by_budget": stopped_early,
        "clean_error_percent": clean,
        "verified_error_percent": verified,
        "verified_error_percent_by_method": per_method,
        "test_samples": len(x_test),
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "threads": torch.get_num_threads(),
        "published": {k: {"verified": v[0], "clean": v[1]} for k, v in PUBLISHED.items()},
    }
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
