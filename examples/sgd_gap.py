"""SGD on a strongly convex problem: the gap f(x_t) - f* for four step / batch strategies.

L2-regularised multinomial logistic regression on the real 8x8 digits (1797 samples, 64 pixels
with each image scaled to unit length, 10 classes) is smooth and lambda-strongly convex, so its
optimum f* is unique; Newton's method finds it to machine precision and strong convexity
certifies it. Against it, every method pays one unit per per-sample gradient it evaluates (the
fair x-axis), all with the same step and first batch size:

(a) SGD, constant step: fast at first, then stalls at a noise floor proportional to the step
    (Bottou, Curtis & Nocedal 2018, "Optimization methods for large-scale machine learning",
    Theorem 4.6);
(b) SGD with the step eta_0 / (1 + t / t0), t0 = 2 / (mu eta_0): O(1/t) (their Theorem 4.7),
    torch_dlt.optim.InverseTimeLR;
(c) SGD with the constant step and batches growing by 1 + mu eta / 2 per step: linear in steps,
    O(1/t) in gradient evaluations (their Theorem 5.3; Smith, Kindermans, Ying & Le 2018, "Don't
    decay the learning rate, increase the batch size"), torch_dlt.optim.GrowingBatchSampler;
(d) SVRG (Johnson & Zhang 2013), torch_dlt.optim.SVRG: linear in gradient evaluations.

The curves are means over a few seeded runs. For (a)-(c) the dashed lines are no fit: they are
E f - f* of the same SGD on the quadratic model of f at x* (Hessian H and per-sample gradient
covariance Sigma at the optimum, i.i.d. mini-batches), iterated exactly in H's eigenbasis.

    python examples/sgd_gap.py --quick    # 15 passes, 2 runs: ~20 s on 2 cores
    python examples/sgd_gap.py            # 40 passes, 3 runs: ~30 s
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from torch_dlt.data import digits
from torch_dlt.optim import SVRG, GrowingBatchSampler, InverseTimeLR, full_gradient_closure

CLASSES = 10
Curve = Tuple[np.ndarray, np.ndarray]  # (gradient evaluations / n, gap)


def load_problem() -> Tuple[Tensor, Tensor]:
    """Digits as float64 [1797, 64] rows of unit length: every per-sample loss is then smooth
    with the same constant (<= 1), the setting of the variance-reduction theorems."""
    x, y = digits(dtype=torch.float64)
    x = x.flatten(1)
    return x / x.norm(dim=1, keepdim=True), y


def flat_parameters(model: nn.Linear) -> Tensor:
    """theta [10 * 64 + 10] = (weight row by row, bias)."""
    return torch.cat([model.weight.detach().flatten(), model.bias.detach()])


def objective(theta: Tensor, x: Tensor, y: Tensor, lam: float) -> Tensor:
    """f(theta) = mean cross-entropy + lam / 2 |theta|^2 (the bias regularised too, so that f is
    lam-strongly convex: softmax is blind to a shift shared by all classes)."""
    features = x.shape[1]
    weight = theta[: CLASSES * features].view(CLASSES, features)
    return F.cross_entropy(x @ weight.T + theta[CLASSES * features :], y) + 0.5 * lam * (
        theta.square().sum()
    )


def newton_optimum(f: Callable[[Tensor], Tensor], size: int) -> Tuple[Tensor, Tensor]:
    """theta* by damped Newton in float64 until |grad f| < 1e-12; returns (theta*, Hessian)."""

    def gradient(theta: Tensor) -> Tensor:
        return torch.autograd.functional.jacobian(f, theta)

    def hessian(theta: Tensor) -> Tensor:
        return torch.autograd.functional.hessian(f, theta, vectorize=True)

    theta = torch.zeros(size, dtype=torch.float64)
    for _ in range(30):
        grad = gradient(theta)
        if grad.norm() < 1e-12:
            break
        direction = torch.linalg.solve(hessian(theta), grad)
        step, value = 1.0, f(theta)
        # Armijo backtracking, for far from the optimum the full Newton step can overshoot;
        # the slack is f's rounding error, which near the optimum exceeds the decrease
        slack = 4 * torch.finfo(torch.float64).eps * abs(float(value))
        while f(theta - step * direction) > value - 0.25 * step * (grad @ direction) + slack:
            step /= 2
        theta = theta - step * direction
    return theta, hessian(theta)


def per_sample_gradients(theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """[n, 650] gradients of the per-sample cross-entropy: (p - e_y) x^T and p - e_y."""
    features = x.shape[1]
    weight = theta[: CLASSES * features].view(CLASSES, features)
    residual = torch.softmax(x @ weight.T + theta[CLASSES * features :], 1)
    residual = residual - F.one_hot(y, CLASSES)
    return torch.cat([(residual[:, :, None] * x[:, None, :]).flatten(1), residual], 1)


class QuadraticModel:
    """SGD on f(x* + e) ~ f* + e^T H e / 2 with i.i.d. gradient noise of covariance Sigma / B.

    In H's eigenbasis (curvatures h_i) the mean error m and the error variance v of each
    direction follow m <- (1 - lr h) m, v <- (1 - lr h)^2 v + lr^2 s / B, with s_i = (U^T Sigma
    U)_ii, and E f - f* = sum_i h_i (m_i^2 + v_i) / 2 exactly; the stationary value at a
    constant step is the noise floor lr / (2B) sum_i s_i / (2 - lr h_i) (the discrete-time form
    of Mandt, Hoffman & Blei 2017, "Stochastic gradient descent as approximate Bayesian
    inference")."""

    def __init__(self, hessian: Tensor, sample_grads: Tensor, start_error: Tensor):
        h, u = torch.linalg.eigh(hessian)
        self.h = h.numpy()
        self.s = ((sample_grads - sample_grads.mean(0)) @ u).square().mean(0).numpy()
        self.m0 = (u.T @ start_error).numpy()

    def floor(self, lr: float, batch: int) -> float:
        return float(lr / (2 * batch) * (self.s / (2 - lr * self.h)).sum())

    def expected_gaps(self, lrs: Sequence[float], batches: Sequence[int]) -> np.ndarray:
        """E f - f* before the first step and after each step."""
        m, v = self.m0.copy(), np.zeros_like(self.m0)
        gaps = [0.5 * float(self.h @ (m * m + v))]
        for lr, batch in zip(lrs, batches):
            contraction = 1.0 - lr * self.h
            m = contraction * m
            v = contraction**2 * v + lr**2 * self.s / batch
            gaps.append(0.5 * float(self.h @ (m * m + v)))
        return np.array(gaps)


class GapRecorder:
    """Counts per-sample gradient evaluations and records the gap at log-spaced counts."""

    def __init__(self, model: nn.Linear, f: Callable[[Tensor], Tensor], f_star: float, n: int):
        self.model, self.f, self.f_star, self.n = model, f, f_star, n
        self.evaluations, self.next_record = 0, 1
        self.curve: List[Tuple[float, float]] = []
        self.record()

    def record(self) -> None:
        with torch.no_grad():
            gap = float(self.f(flat_parameters(self.model))) - self.f_star
        self.curve.append((self.evaluations / self.n, gap))

    def add(self, count: int) -> None:
        self.evaluations += count
        if self.evaluations >= self.next_record:
            self.record()
            self.next_record = max(self.evaluations + 1, int(self.next_record * 1.08))

    def result(self) -> Curve:
        self.record()
        points = np.array(self.curve)
        return points[:, 0], points[:, 1]


def closure_for(opt: torch.optim.Optimizer, model: nn.Module, xb: Tensor, yb: Tensor):
    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return loss

    return closure


def fresh_model(features: int) -> nn.Linear:
    model = nn.Linear(features, CLASSES).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    return model


def iid_sampler(data: TensorDataset, draws: int, seed: int) -> RandomSampler:
    """Samples drawn with replacement: the i.i.d. noise of the SGD theorems."""
    generator = torch.Generator().manual_seed(seed)
    return RandomSampler(data, replacement=True, num_samples=draws, generator=generator)


def run_sgd(data, f, f_star, *, lr, lam, batch, epochs, seed, t0=None) -> Curve:
    """(a) constant step, or (b) lr / (1 + t / t0) with ``t0``."""
    n = len(data)
    model = fresh_model(data.tensors[0].shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=lam)
    scheduler = InverseTimeLR(opt, t0=t0) if t0 is not None else None
    recorder = GapRecorder(model, f, f_star, n)
    for xb, yb in DataLoader(data, batch_size=batch, sampler=iid_sampler(data, epochs * n, seed)):
        opt.step(closure_for(opt, model, xb, yb))
        recorder.add(len(yb))
        if scheduler is not None:
            scheduler.step()
    return recorder.result()


def growing_batch_sampler(data, batch, growth, seed) -> GrowingBatchSampler:
    """Each pass is n i.i.d. draws cut into batches growing by ``growth`` per step; the last,
    shorter batch of a pass is dropped (a small batch would take a full, noisy step)."""
    draws = iid_sampler(data, len(data), seed)
    return GrowingBatchSampler(draws, batch, growth_factor=growth, unit="step", drop_last=True)


def run_growing_batch(data, f, f_star, *, lr, lam, batch, growth, epochs, seed) -> Curve:
    """(c) constant step, growing batches."""
    n = len(data)
    model = fresh_model(data.tensors[0].shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=lam)
    loader = DataLoader(data, batch_sampler=growing_batch_sampler(data, batch, growth, seed))
    recorder = GapRecorder(model, f, f_star, n)
    for _ in range(epochs):
        for xb, yb in loader:
            opt.step(closure_for(opt, model, xb, yb))
            recorder.add(len(yb))
    return recorder.result()


def run_svrg(data, f, f_star, *, lr, lam, batch, epochs, seed) -> Curve:
    """(d) SVRG with a snapshot every n / B steps (Johnson & Zhang take 2n single-sample steps;
    one pass between snapshots converges faster here)."""
    n = len(data)
    model = fresh_model(data.tensors[0].shape[1])
    recorder = GapRecorder(model, f, f_star, n)
    full = full_gradient_closure(model, F.cross_entropy, [data.tensors])

    def counted_full_closure() -> Tensor:
        recorder.add(n)
        return full()

    steps_per_snapshot = max(1, n // batch)
    opt = SVRG(
        model.parameters(),
        lr=lr,
        snapshot_every=steps_per_snapshot,
        full_closure=counted_full_closure,
        weight_decay=lam,
    )
    # each step costs 2B (the mini-batch at x and at the snapshot), each snapshot n
    steps = epochs * n // (2 * batch + n // steps_per_snapshot)
    for xb, yb in DataLoader(
        data, batch_size=batch, sampler=iid_sampler(data, steps * batch, seed)
    ):
        opt.step(closure_for(opt, model, xb, yb))
        recorder.add(2 * len(yb))
    return recorder.result()


def mean_curve(curves: List[Curve]) -> Curve:
    """The runs record at the same evaluation counts (deterministic batch sizes): average."""
    length = min(len(t) for t, _ in curves)
    return curves[0][0][:length], np.mean([gap[:length] for _, gap in curves], axis=0)


def log_slope(curve: Curve, start: float) -> float:
    """Least-squares slope of log gap against log evaluations beyond ``start`` passes."""
    t, gap = curve
    keep = (t >= start) & (gap > 0)
    return float(np.polyfit(np.log(t[keep]), np.log(gap[keep]), 1)[0])


def geometric_fit(curve: Curve, start: float, floor: float = 1e-13) -> Tuple[float, float]:
    """(gap at 0, ratio per pass) of log gap ~ linear in passes, beyond ``start``, above
    ``floor`` (float64 rounding of f)."""
    t, gap = curve
    keep = (t >= start) & (gap > floor)
    slope, intercept = np.polyfit(t[keep], np.log(gap[keep]), 1)
    return float(np.exp(intercept)), float(np.exp(slope))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="15 passes, 2 runs")
    parser.add_argument("--lam", type=float, default=1e-2, help="L2 coefficient (= mu)")
    parser.add_argument("--lr", type=float, default=1.0, help="the (initial) step of all four")
    parser.add_argument("--batch", type=int, default=8, help="the (initial) mini-batch size")
    parser.add_argument("--out", type=Path, default=Path("examples/out/sgd_gap.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    epochs, runs = (15, 2) if args.quick else (40, 3)
    start = time.perf_counter()

    x, y = load_problem()
    n, features = x.shape

    def f(theta: Tensor) -> Tensor:
        return objective(theta, x, y, args.lam)

    theta_star, hessian = newton_optimum(f, CLASSES * (features + 1))
    curvatures = torch.linalg.eigvalsh(hessian)
    mu, smoothness = float(curvatures[0]), float(curvatures[-1])
    grad_norm = float(torch.autograd.functional.jacobian(f, theta_star).norm())
    f_star = float(f(theta_star))
    print(f"optimum by Newton in float64: f* = {f_star:.15f}, |grad f(x*)| = {grad_norm:.1e}")
    print(
        f"  certified: f* is within |grad|^2 / (2 lam) = {grad_norm**2 / (2 * args.lam):.1e} of "
        f"min f (lam-strong convexity); Hessian spectrum [{mu:.4f}, {smoothness:.3f}]"
    )

    data = TensorDataset(x, y)
    # Theorem 4.7: steps beta / (gamma + t) with beta > 1 / mu; here beta = lr t0 = 2 / mu
    t0 = 2.0 / (mu * args.lr)
    # Theorem 5.3: the rate is max(1 - mu lr / 2, 1 / growth) per step, so batches may grow by
    # 1 + mu lr / 2 per step; their cost grows as fast, hence O(1/t) in gradient evaluations
    growth = 1.0 + mu * args.lr / 2
    common = {"lr": args.lr, "lam": args.lam, "batch": args.batch, "epochs": epochs}
    runners = {
        "a": lambda seed: run_sgd(data, f, f_star, seed=seed, **common),
        "b": lambda seed: run_sgd(data, f, f_star, seed=seed, t0=t0, **common),
        "c": lambda seed: run_growing_batch(data, f, f_star, seed=seed, growth=growth, **common),
        "d": lambda seed: run_svrg(data, f, f_star, seed=seed, **common),
    }
    curves: Dict[str, Curve] = {}
    for key, runner in runners.items():
        curves[key] = mean_curve([runner(args.seed + run) for run in range(runs)])
        print(f"({key}) done, {runs} runs ({time.perf_counter() - start:.0f} s)")

    model = QuadraticModel(hessian, per_sample_gradients(theta_star, x, y), -theta_star)
    steps = epochs * n // args.batch
    constant = [args.lr] * steps
    decaying = [args.lr / (1 + t / t0) for t in range(steps)]
    sampler = growing_batch_sampler(data, args.batch, growth, args.seed)
    grown = [size for epoch in range(epochs) for size in sampler.batch_sizes(epoch)]
    predicted: Dict[str, Curve] = {
        "a": (
            np.arange(steps + 1) * args.batch / n,
            model.expected_gaps(constant, [args.batch] * steps),
        ),
        "b": (
            np.arange(steps + 1) * args.batch / n,
            model.expected_gaps(decaying, [args.batch] * steps),
        ),
        "c": (
            np.concatenate([[0], np.cumsum(grown)]) / n,
            model.expected_gaps([args.lr] * len(grown), grown),
        ),
    }
    floor = model.floor(args.lr, args.batch)
    tail = epochs / 2
    gap0_d, rate_d = geometric_fit(curves["d"], 1.0)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "a": f"(a) SGD, constant step {args.lr}",
        "b": rf"(b) SGD, step $\eta_0/(1+t/t_0)$, $t_0$ = {t0:.0f} steps",
        "c": rf"(c) SGD, step {args.lr}, batch $\times${growth:.3f} per step",
        "d": f"(d) SVRG, step {args.lr}, snapshot every pass",
    }
    colours = {"a": "tab:red", "b": "tab:blue", "c": "tab:green", "d": "tab:purple"}
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5))
    for ax, log_x in zip(axes, (True, False)):
        for key, (t, gap) in curves.items():
            shown = (t > 0) & (gap > 0)
            ax.plot(t[shown], gap[shown], color=colours[key], lw=1.5, label=labels[key])
        for key, (t, gap) in predicted.items():
            ax.plot(t[1:], gap[1:], color=colours[key], lw=1.0, ls="--", alpha=0.9)
        if log_x:
            t_ref = np.geomspace(tail / 4, epochs, 20)
            anchor = float(np.interp(tail, *predicted["b"])) * tail
            ax.plot(t_ref, 0.3 * anchor / t_ref, "k:", lw=1.5, label=r"slope $-1$: $\propto 1/t$")
            ax.set_xscale("log")
            ax.set_xlim(1e-2, epochs * 1.05)
            ax.set_title("log-log: the sublinear rates are straight lines")
        else:
            t_geo = np.linspace(1.0, epochs, 50)
            ax.plot(
                t_geo,
                gap0_d * rate_d**t_geo,
                "k-.",
                lw=1,
                label=rf"geometric fit to (d): $\times${rate_d:.2f} per pass",
            )
            ax.set_xlim(0, epochs)
            ax.set_title("semi-log: the linear (geometric) rate is a straight line")
        ax.plot([], [], "k--", lw=1, label="quadratic model at $x^*$, i.i.d. noise (no fit)")
        ax.set_yscale("log")
        ax.set_ylim(1e-14, 3.0)
        ax.set_xlabel("per-sample gradient evaluations / n   (passes over the data)")
        ax.set_ylabel(r"$f(x_t) - f^\star$" + f"   (mean of {runs} runs)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower left")
    fig.suptitle(
        rf"L2 logistic regression on the digits ($n$ = {n}, $\lambda$ = {args.lam}, "
        f"first batch {args.batch}): the gap to the optimum",
        fontsize=11,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)

    print(f"after {epochs} passes over the data ({time.perf_counter() - start:.0f} s):")
    print(f"  {'':50s} measured   quadratic model")
    for key, (_, gap) in curves.items():
        model_gap = f"{predicted[key][1][-1]:.2e}" if key in predicted else "-"
        shown = f"{gap[-1]:.2e}" if gap[-1] > 1e-14 else "< 1e-14"  # f's float64 resolution
        plain = labels[key].replace("$", "").replace("\\eta_0", "eta0").replace("\\times", "x")
        print(f"  {plain:50s} {shown:10s} {model_gap}")
    measured_floor = float(np.mean(curves["a"][1][curves["a"][0] >= tail]))
    print(f"(a) noise floor (second half): measured {measured_floor:.2e}, model {floor:.2e}")
    for key in "bc":
        t, gap = curves[key]
        keep = t >= tail
        ratio = np.exp(np.mean(np.log(gap[keep] / np.interp(t[keep], *predicted[key]))))
        print(
            f"({key}) second half: model log-log slope {log_slope(predicted[key], tail):+.2f} "
            f"(theory: -1 asymptotically), measured / model {ratio:.2f} (geometric mean)"
        )
    below = curves["d"][0][curves["d"][1] < 1e-12]
    reached = f"; below 1e-12 after {below[0]:.1f} passes" if len(below) else ""
    print(f"(d) gap x{rate_d:.3f} per pass: linear convergence{reached}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
