"""Tests of torch_dlt/optim/adagrad_norm.py: AdaGrad-Norm (Ward, Wu & Bottou 2019)."""

from __future__ import annotations

import io
import math
from typing import Callable

import pytest
import torch
from torch import nn

from torch_dlt.optim import AdaGradNorm, adagrad_norm
from torch_dlt.testing import gloo_available, randn, run_gloo_workers

SCOPES = ("global", "param_group", "layer")
FOREACH = (False, True)


def _groups_spec() -> list[dict]:
    """Two param groups, four tensors, float64: lr and weight decay differ between groups."""
    return [
        {"shapes": [(3, 4), (4,)], "lr": 0.7, "weight_decay": 0.0},
        {"shapes": [(2, 3, 2), (5,)], "lr": 0.2, "weight_decay": 0.3},
    ]


def _make_tensors(spec: list[dict], seed: int = 0) -> list[torch.Tensor]:
    shapes = [s for group in spec for s in group["shapes"]]
    return [randn(*s, seed=seed + i).requires_grad_(True) for i, s in enumerate(shapes)]


def _param_groups(tensors: list[torch.Tensor], spec: list[dict]) -> list[dict]:
    groups, start = [], 0
    for group in spec:
        n = len(group["shapes"])
        params = tensors[start : start + n]
        groups.append({"params": params, "lr": group["lr"], "weight_decay": group["weight_decay"]})
        start += n
    return groups


def _gradient_sequence(tensors: list[torch.Tensor], steps: int) -> list[list]:
    """Random gradients per step; tensor 1 has none at step 1 (``grad is None``: not updated)."""
    sequence = []
    for step in range(steps):
        grads = [randn(*t.shape, seed=100 * step + i) * (i + 1) for i, t in enumerate(tensors)]
        if step == 1:
            grads[1] = None
        sequence.append(grads)
    return sequence


def _run(opt: AdaGradNorm, tensors: list[torch.Tensor], grads_sequence: list[list]) -> None:
    for grads in grads_sequence:
        for t, g in zip(tensors, grads):
            t.grad = None if g is None else g.clone()
        opt.step()


def _reference(
    tensors: list[torch.Tensor],
    spec: list[dict],
    grads_sequence: list[list],
    *,
    scope: str,
    b0: float,
    maximize: bool = False,
    lr_at: Callable[[int], float] | None = None,
) -> list[torch.Tensor]:
    """AdaGrad-Norm written out on Python floats: which tensors share b, then the two lines."""
    group_of = [gi for gi, group in enumerate(spec) for _ in group["shapes"]]
    n = len(tensors)
    if scope == "global":
        unit_of = [0] * n
    elif scope == "param_group":
        unit_of = group_of
    else:
        unit_of = list(range(n))
    b_squared = {u: b0 * b0 for u in unit_of}
    xs = [t.detach().clone() for t in tensors]
    for step, grads in enumerate(grads_sequence):
        effective = {}
        for i, g in enumerate(grads):
            if g is None:
                continue
            group = spec[group_of[i]]
            effective[i] = (-g if maximize else g) + group["weight_decay"] * xs[i]
        for i, g in effective.items():
            b_squared[unit_of[i]] += sum(v * v for v in g.flatten().tolist())
        for i, g in effective.items():
            lr = spec[group_of[i]]["lr"] * (1.0 if lr_at is None else lr_at(step))
            xs[i] = xs[i] - lr * g / math.sqrt(b_squared[unit_of[i]])
    return xs


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("foreach", FOREACH)
def test_exact_update_two_steps_by_hand(scope, foreach):
    # loss 0.5 ||x||^2, so G = x. Step 1: b1^2 = 0 + 25, x1 = (3, 4) - (3, 4) / 5 = (2.4, 3.2).
    # Step 2: b2^2 = 25 + 2.4^2 + 3.2^2 = 41, x2 = x1 (1 - 1 / sqrt(41)).
    x = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    opt = AdaGradNorm([x], lr=1.0, b0=0.0, scope=scope, foreach=foreach)
    expected = [
        (25.0, torch.tensor([2.4, 3.2], dtype=torch.float64)),
        (41.0, torch.tensor([2.4, 3.2], dtype=torch.float64) * (1 - 1 / math.sqrt(41.0))),
    ]
    for b_squared, x_next in expected:
        opt.zero_grad()
        (0.5 * x.pow(2).sum()).backward()
        opt.step()
        torch.testing.assert_close(opt.state[x]["sum_sq"].item(), b_squared, rtol=1e-15, atol=0)
        torch.testing.assert_close(x.detach(), x_next, rtol=1e-15, atol=1e-15)


def test_converges_on_ill_conditioned_quadratic_for_every_b0_where_gd_diverges():
    # f(x) = 0.5 sum_k lam_k x_k^2, L = 1000, condition number 100. Gradient descent with the
    # fixed step 1/b0 diverges iff 1/b0 > 2/L (closed form: |1 - lam_max / b0| > 1); the paper's
    # claim is that AdaGrad-Norm with lr = 1 converges for every b0 > 0, its b_j settling.
    lam = torch.logspace(1, 3, 12, dtype=torch.float64)
    big_l = lam.max().item()
    x0 = randn(12, seed=0)

    def loss(x):
        return 0.5 * (lam * x * x).sum().item()

    steps = 2000
    for b0 in torch.logspace(-3, 3, 7, dtype=torch.float64).tolist():
        y = x0.clone()
        for _ in range(steps):
            y = y - lam * y / b0
        gd_diverges = not (torch.isfinite(y).all() and loss(y) < loss(x0))
        assert gd_diverges == (b0 < big_l / 2), b0

        x = x0.clone().requires_grad_(True)
        opt = AdaGradNorm([x], lr=1.0, b0=b0)
        for step in range(steps):
            x.grad = lam * x.detach()
            opt.step()
            if step == steps // 2:
                b_half = opt.state[x]["sum_sq"].sqrt().item()
        assert loss(x) < 1e-12 * loss(x0), b0
        b_end = opt.state[x]["sum_sq"].sqrt().item()
        assert b_end == pytest.approx(b_half, rel=1e-9), b0


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("maximize", (False, True))
def test_scopes_match_brute_force_reference(scope, foreach, maximize):
    spec = _groups_spec()
    tensors = _make_tensors(spec)
    start = [t.detach().clone() for t in tensors]
    grads_sequence = _gradient_sequence(tensors, steps=4)
    opt = AdaGradNorm(
        _param_groups(tensors, spec), b0=0.5, scope=scope, maximize=maximize, foreach=foreach
    )
    _run(opt, tensors, grads_sequence)
    expected = _reference(start, spec, grads_sequence, scope=scope, b0=0.5, maximize=maximize)
    for got, want in zip(tensors, expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-13)
    # The scopes really differ: the global b is not the per-layer b.
    layer = _reference(start, spec, grads_sequence, scope="layer", b0=0.5, maximize=maximize)
    if scope != "layer":
        assert not torch.allclose(tensors[0].detach(), layer[0])


@pytest.mark.parametrize("scope", SCOPES)
def test_foreach_equals_for_loop_in_float64(scope):
    spec = _groups_spec()
    grads_sequence = _gradient_sequence(_make_tensors(spec), steps=4)
    results = []
    for foreach in FOREACH:
        tensors = _make_tensors(spec)
        groups = _param_groups(tensors, spec)
        groups[1]["maximize"] = True
        opt = AdaGradNorm(groups, b0=0.3, scope=scope, foreach=foreach)
        _run(opt, tensors, grads_sequence)
        results.append(([t.detach() for t in tensors], [s["sum_sq"] for s in opt.state.values()]))
    (loop_x, loop_b), (foreach_x, foreach_b) = results
    assert len(loop_b) == {"global": 1, "param_group": 2, "layer": 4}[scope]
    for a, b in zip(loop_x + loop_b, foreach_x + foreach_b):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


def test_functional_form_shared_and_per_tensor_accumulators():
    xs = [randn(3, seed=1), randn(2, 2, seed=2)]
    grads = [randn(3, seed=3), randn(2, 2, seed=4)]
    per_tensor = [torch.tensor(0.25, dtype=torch.float64) for _ in xs]
    shared = [torch.tensor(0.25, dtype=torch.float64)]
    x_layer = [x.clone() for x in xs]
    x_global = [x.clone() for x in xs]
    adagrad_norm(x_layer, grads, per_tensor, lr=0.5)
    adagrad_norm(x_global, grads, shared, lr=0.5)
    total = sum(float((g * g).sum()) for g in grads)
    assert shared[0].item() == pytest.approx(0.25 + total, rel=1e-15)
    for x, g, x_new, acc in zip(xs, grads, x_layer, per_tensor):
        b = math.sqrt(0.25 + float((g * g).sum()))
        assert acc.item() == pytest.approx(b * b, rel=1e-15)
        torch.testing.assert_close(x_new, x - 0.5 * g / b)
    for x, g, x_new in zip(xs, grads, x_global):
        torch.testing.assert_close(x_new, x - 0.5 * g / math.sqrt(0.25 + total))
    with pytest.raises(ValueError, match="sum_sq"):
        adagrad_norm(xs, grads, shared * 3, lr=0.5)


@pytest.mark.parametrize("scope", SCOPES)
def test_state_dict_resume_is_bit_for_bit(scope):
    spec = _groups_spec()
    grads_sequence = _gradient_sequence(_make_tensors(spec), steps=6)
    straight = _make_tensors(spec)
    _run(AdaGradNorm(_param_groups(straight, spec), scope=scope), straight, grads_sequence)

    first = _make_tensors(spec)
    opt = AdaGradNorm(_param_groups(first, spec), scope=scope)
    _run(opt, first, grads_sequence[:3])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)

    resumed = [t.detach().clone().requires_grad_(True) for t in first]
    opt_resumed = AdaGradNorm(_param_groups(resumed, spec), scope=scope)
    opt_resumed.load_state_dict(torch.load(buffer))
    _run(opt_resumed, resumed, grads_sequence[3:])
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)

    # Loading a live state_dict copies the accumulators: the two optimisers stay independent.
    live = AdaGradNorm(_param_groups([t.detach().clone() for t in first], spec), scope=scope)
    live.load_state_dict(opt.state_dict())
    before = [s["sum_sq"].clone() for s in live.state.values()]
    _run(opt, first, grads_sequence[3:])
    for b, s in zip(before, live.state.values()):
        assert torch.equal(b, s["sum_sq"])


def test_load_state_dict_refuses_another_scope():
    x = randn(3, seed=0).requires_grad_(True)
    saved = AdaGradNorm([x], scope="layer").state_dict()
    opt = AdaGradNorm([x], scope="global")
    with pytest.raises(ValueError, match="scope"):
        opt.load_state_dict(saved)
    with pytest.raises(ValueError, match="scope"):
        opt.load_state_dict(torch.optim.Adagrad([x]).state_dict())


@pytest.mark.parametrize("foreach", FOREACH)
def test_float16_parameter_keeps_a_float32_accumulator_through_load(foreach):
    # ||G|| = 80000 and ||G||^2 = 6.4e9 overflow float16 (max 65504); both are exact in float32,
    # and the step takes x = 1 to 1 - 40000 / 80000 = 0.5.
    x = torch.ones(4, dtype=torch.float16, requires_grad=True)
    opt = AdaGradNorm([x], b0=0.0, foreach=foreach)
    x.grad = torch.full((4,), 40000.0, dtype=torch.float16)
    opt.step()
    assert opt.state[x]["sum_sq"].dtype == torch.float32
    assert opt.state[x]["sum_sq"].item() == 6.4e9
    # torch's float16 CPU kernels round the step size 1/80000 itself to float16.
    torch.testing.assert_close(x.detach(), torch.full_like(x, 0.5), rtol=0, atol=1e-3)
    fresh = AdaGradNorm([x.detach().clone().requires_grad_(True)], b0=0.0)
    fresh.load_state_dict(opt.state_dict())
    (state,) = fresh.state.values()
    assert state["sum_sq"].dtype == torch.float32 and state["sum_sq"].item() == 6.4e9


@pytest.mark.parametrize("foreach", FOREACH)
def test_compiled_float16_step_is_scaled_in_float32(foreach):
    # Under torch.compile the step 1/80000 stays a float32 tensor, below float16's normal range
    # (6.1e-5): the float16 gradient is scaled in float32 and x lands on 0.5 exactly.
    torch._dynamo.reset()
    x = torch.ones(4, dtype=torch.float16, requires_grad=True)
    opt = AdaGradNorm([x], b0=0.0, foreach=foreach)
    x.grad = torch.full((4,), 40000.0, dtype=torch.float16)
    torch.compile(opt.step, backend="eager", fullgraph=True)()
    assert torch.equal(x.detach(), torch.full_like(x, 0.5))


def test_complex_parameter_equals_its_real_view():
    # ||z||^2 = ||view_as_real(z)||^2, so AdaGrad-Norm on z is AdaGrad-Norm on its real view.
    z = torch.complex(randn(5, seed=0), randn(5, seed=1)).requires_grad_(True)
    r = torch.view_as_real(z.detach()).clone().requires_grad_(True)
    results = []
    for foreach in FOREACH:
        zc = z.detach().clone().requires_grad_(True)
        opt_z = AdaGradNorm([zc], lr=0.5, weight_decay=0.1, foreach=foreach)
        rc = r.detach().clone().requires_grad_(True)
        opt_r = AdaGradNorm([rc], lr=0.5, weight_decay=0.1, foreach=foreach)
        for step in range(3):
            g = torch.complex(randn(5, seed=10 + step), randn(5, seed=20 + step))
            zc.grad, rc.grad = g, torch.view_as_real(g).clone()
            opt_z.step()
            opt_r.step()
        torch.testing.assert_close(torch.view_as_real(zc.detach()), rc.detach())
        results.append(zc.detach())
    torch.testing.assert_close(results[0], results[1])


def test_lr_scheduler_scales_the_step():
    spec = _groups_spec()
    tensors = _make_tensors(spec)
    start = [t.detach().clone() for t in tensors]
    grads_sequence = _gradient_sequence(tensors, steps=5)
    opt = AdaGradNorm(_param_groups(tensors, spec), b0=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for grads in grads_sequence:
        _run(opt, tensors, [grads])
        scheduler.step()
    expected = _reference(
        start, spec, grads_sequence, scope="global", b0=0.5, lr_at=lambda j: 0.5 ** (j // 2)
    )
    for got, want in zip(tensors, expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-13)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.7 / 4, 0.2 / 4])


@pytest.mark.parametrize(
    ("foreach", "weight_decay", "scope"),
    [
        (False, 0.01, "global"),
        (True, 0.0, "global"),
        (True, 0.01, "global"),
        (False, 0.0, "layer"),
        (True, 0.0, "layer"),
    ],
)
def test_compiled_step_matches_eager(foreach, weight_decay, scope):
    # Under torch.compile the step size stays a tensor (no .item()), the path accelerators take:
    # with weight decay the effective gradient is a fresh tensor scaled in place, without it a
    # scaled copy; under scope="layer" one step size per tensor.
    torch._dynamo.reset()
    models = []
    for compiled in (False, True):
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        model.load_state_dict(
            {k: randn(*v.shape, seed=i) for i, (k, v) in enumerate(model.state_dict().items())}
        )
        opt = AdaGradNorm(
            model.parameters(), lr=0.3, weight_decay=weight_decay, scope=scope, foreach=foreach
        )
        step = torch.compile(opt.step, backend="eager", fullgraph=True) if compiled else opt.step
        for i in range(3):
            opt.zero_grad()
            model(randn(6, 4, seed=i)).pow(2).mean().backward()
            step()
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": torch.ones(2)}, "lr"),
        ({"b0": -0.1}, "b0"),
        ({"b0": float("inf")}, "b0"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"scope": "tensor"}, "scope"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, name):
    x = randn(3, seed=0).requires_grad_(True)
    with pytest.raises(ValueError, match=name):
        AdaGradNorm([x], **kwargs)


@pytest.mark.parametrize(
    ("group", "name"),
    [
        ({"lr": -0.5}, "lr of param group 1"),
        ({"weight_decay": -1.0}, "weight_decay of param group 1"),
        ({"scope": "layer"}, "scope of param group 1"),
        ({"b0": 2.0}, "b0 of param group 1"),
    ],
)
def test_bad_param_group_is_refused(group, name):
    x, y = randn(3, seed=0).requires_grad_(True), randn(2, seed=1).requires_grad_(True)
    opt = AdaGradNorm([x])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": [y], **group})
    assert len(opt.param_groups) == 1 and y not in opt.state


def test_param_group_scope_allows_its_own_b0():
    x, y = randn(3, seed=0).requires_grad_(True), randn(2, seed=1).requires_grad_(True)
    opt = AdaGradNorm([{"params": [x]}, {"params": [y], "b0": 2.0}], b0=1.0, scope="param_group")
    assert opt.state[x]["sum_sq"].item() == 1.0 and opt.state[y]["sum_sq"].item() == 4.0


@pytest.mark.parametrize("foreach", FOREACH)
def test_sparse_gradient_is_refused_and_nothing_moves(foreach):
    model = nn.ModuleDict({"emb": nn.Embedding(10, 3, sparse=True), "lin": nn.Linear(3, 1)})
    opt = AdaGradNorm(model.named_parameters(), foreach=foreach)
    model["lin"](model["emb"](torch.tensor([1, 2]))).sum().backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"sparse.*'emb.weight'.*SparseAdam"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(s["sum_sq"].item() == pytest.approx(0.01) for s in opt.state.values())


def test_foreach_refuses_parameters_on_several_devices():
    x = randn(3, seed=0).requires_grad_(True)
    y = torch.zeros(2, device="meta", requires_grad=True)
    opt = AdaGradNorm([x, y], foreach=True)
    x.grad, y.grad = torch.ones(3, dtype=torch.float64), torch.ones(2, device="meta")
    before = x.detach().clone()
    with pytest.raises(ValueError, match="foreach=True"):
        opt.step()
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("weight_decay", (0.0, 0.2))
def test_maximize_of_minus_f_is_minimize_of_f(weight_decay):
    runs = []
    for maximize in (False, True):
        x = randn(4, seed=0).requires_grad_(True)
        opt = AdaGradNorm([x], lr=0.4, weight_decay=weight_decay, maximize=maximize)
        for _ in range(4):
            opt.zero_grad()
            f = (x.sin() * torch.arange(1.0, 5.0, dtype=torch.float64)).sum()
            (-f if maximize else f).backward()
            opt.step()
        runs.append(x.detach())
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("scope", SCOPES)
def test_weight_decay_is_the_gradient_of_an_l2_penalty(scope):
    spec = [{"shapes": [(3, 2), (2,)], "lr": 0.5, "weight_decay": 0.3}]
    runs = []
    for decoupled in (True, False):
        tensors = _make_tensors(spec)
        wd = 0.3 if decoupled else 0.0
        opt = AdaGradNorm(tensors, lr=0.5, weight_decay=wd, scope=scope)
        for step in range(4):
            opt.zero_grad()
            loss = sum((t.cos() * randn(*t.shape, seed=step)).sum() for t in tensors)
            if not decoupled:
                loss = loss + 0.5 * 0.3 * sum(t.pow(2).sum() for t in tensors)
            loss.backward()
            opt.step()
        runs.append(tensors)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("foreach", FOREACH)
def test_zero_gradient_with_b0_zero_is_a_zero_step(scope, foreach):
    x = randn(3, seed=0).requires_grad_(True)
    y = randn(2, seed=1).requires_grad_(True)
    opt = AdaGradNorm([x, y], b0=0.0, scope=scope, foreach=foreach)
    x.grad, y.grad = torch.zeros_like(x), torch.zeros_like(y)
    start = [x.detach().clone(), y.detach().clone()]
    opt.step()
    assert torch.equal(x.detach(), start[0]) and torch.equal(y.detach(), start[1])
    assert all(s["sum_sq"].item() == 0.0 for s in opt.state.values())
    # The next non-zero gradient takes a step of length exactly lr along -G / ||G||.
    x.grad = torch.tensor([0.0, 3.0, 4.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(x.detach(), start[0] - x.grad / 5.0)
    assert torch.equal(y.detach(), start[1])


def test_closure_is_evaluated_and_its_loss_returned():
    x = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    opt = AdaGradNorm([x], b0=0.0)

    def closure():
        opt.zero_grad()
        loss = 0.5 * x.pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 12.5
    torch.testing.assert_close(x.detach(), torch.tensor([2.4, 3.2], dtype=torch.float64))


# --- DistributedDataParallel: the norm is that of the all-reduced (averaged) gradient. ---


def _ddp_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).double()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(randn(*p.shape, seed=50 + i))
    return model


def _ddp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return randn(16, 5, seed=7), randn(16, 2, seed=8)


_DDP_STEPS = 4


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        model = DistributedDataParallel(_ddp_model())
        opt = AdaGradNorm(model.parameters(), lr=0.5, b0=0.1)
        x, y = _ddp_batch()
        part = x.shape[0] // world_size
        xs, ys = x[rank * part : (rank + 1) * part], y[rank * part : (rank + 1) * part]
        for _ in range(_DDP_STEPS):
            opt.zero_grad()
            nn.functional.mse_loss(model(xs), ys).backward()
            opt.step()
        torch.save([p.detach() for p in model.module.parameters()], f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is not available")
def test_ddp_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    world_size = 2
    run_gloo_workers(
        _ddp_worker, (world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size
    )
    model = _ddp_model()
    opt = AdaGradNorm(model.parameters(), lr=0.5, b0=0.1)
    x, y = _ddp_batch()
    for _ in range(_DDP_STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    start = list(_ddp_model().parameters())
    for rank in range(world_size):
        ranked = torch.load(tmp_path / f"rank{rank}.pt")
        for got, want, first in zip(ranked, model.parameters(), start):
            assert not torch.allclose(want, first)
            torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-13)
