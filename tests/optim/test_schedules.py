"""Tests of torch_dlt/optim/schedules.py: the inverse-power LR schedulers against their closed
forms (warm-up, chaining, state_dict) and GrowingBatchSampler against exact batch-size sequences,
coverage of every index, determinism and DataLoader use."""

from __future__ import annotations

import copy
import math
import warnings
from fractions import Fraction

import pytest
import torch
from torch.optim.lr_scheduler import ChainedScheduler, ExponentialLR
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, TensorDataset

from torch_dlt.optim import GrowingBatchSampler, InversePowerLR, InverseSqrtLR, InverseTimeLR


def two_group_sgd(lrs=(0.5, 0.03)):
    params = [torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])


def closed_form(lr0, t, t0, power, warmup):
    if t < warmup:
        return lr0 * (t + 1) / warmup
    return lr0 / (1.0 + (t - warmup) / t0) ** power


def lrs_over(opt, scheduler, steps):
    seen = []
    for _ in range(steps):
        seen.append([group["lr"] for group in opt.param_groups])
        opt.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize(
    "make, t0, power, warmup",
    [
        (lambda opt: InverseTimeLR(opt, t0=7.0), 7.0, 1.0, 0),
        (lambda opt: InverseSqrtLR(opt, t0=3.0), 3.0, 0.5, 0),
        (lambda opt: InverseTimeLR(opt, t0=25.0, warmup_steps=10), 25.0, 1.0, 10),
        (lambda opt: InverseSqrtLR(opt, warmup_steps=1), 1.0, 0.5, 1),
        (lambda opt: InversePowerLR(opt, 4.0, 0.75, warmup_steps=5), 4.0, 0.75, 5),
    ],
)
def test_learning_rates_follow_the_closed_form(make, t0, power, warmup):
    opt = two_group_sgd()
    seen = lrs_over(opt, make(opt), 400)
    for t, lrs in enumerate(seen):
        for lr, lr0 in zip(lrs, (0.5, 0.03)):
            assert lr == pytest.approx(closed_form(lr0, t, t0, power, warmup), rel=1e-12)


def test_warm_up_climbs_linearly_to_the_peak_then_decays():
    opt = two_group_sgd((1.0, 1.0))
    seen = [lrs[0] for lrs in lrs_over(opt, InverseTimeLR(opt, t0=2.0, warmup_steps=4), 8)]
    assert seen[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0], rel=1e-15)
    assert seen[4:] == pytest.approx([1.0, 2 / 3, 0.5, 0.4], rel=1e-12)


def test_chains_with_another_scheduler_and_any_optimizer():
    param = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([param], lr=0.2)
    chained = ChainedScheduler(
        [InverseTimeLR(opt, t0=5.0, warmup_steps=3), ExponentialLR(opt, gamma=0.97)]
    )
    for t, (lr,) in enumerate(lrs_over(opt, chained, 60)):
        assert lr == pytest.approx(closed_form(0.2, t, 5.0, 1.0, 3) * 0.97**t, rel=1e-12)


def test_step_with_an_epoch_uses_the_closed_form():
    opt = two_group_sgd()
    scheduler = InverseSqrtLR(opt, t0=2.0, warmup_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch deprecates step(epoch)
        scheduler.step(41)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.03 / math.sqrt(1 + 38 / 2.0), rel=1e-14)


def test_state_dict_round_trip_continues_the_schedule():
    opt = two_group_sgd()
    scheduler = InversePowerLR(opt, t0=3.0, power=0.8, warmup_steps=2)
    lrs_over(opt, scheduler, 17)
    opt_state, scheduler_state = copy.deepcopy(opt.state_dict()), scheduler.state_dict()

    resumed_opt = two_group_sgd((9.0, 9.0))
    resumed = InversePowerLR(resumed_opt, t0=1.0, power=2.0)
    resumed.load_state_dict(scheduler_state)
    resumed_opt.load_state_dict(opt_state)
    assert resumed.t0 == 3.0 and resumed.power == 0.8 and resumed.last_epoch == 17
    assert lrs_over(resumed_opt, resumed, 20) == lrs_over(opt, scheduler, 20)


def test_resuming_with_last_epoch_keeps_the_loaded_learning_rate():
    opt = two_group_sgd()
    scheduler = InverseTimeLR(opt, t0=4.0, warmup_steps=3)
    lrs_over(opt, scheduler, 17)
    resumed_opt = two_group_sgd((9.0, 9.0))
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    # torch's convention: the constructor's initial step moves last_epoch to 17
    resumed = InverseTimeLR(resumed_opt, t0=4.0, warmup_steps=3, last_epoch=16)
    assert resumed.last_epoch == 17
    assert lrs_over(resumed_opt, resumed, 10) == lrs_over(opt, scheduler, 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"t0": 0.0}, "t0"),
        ({"t0": float("inf")}, "t0"),
        ({"power": -1.0}, "power"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.0}, "warmup_steps"),
    ],
)
def test_bad_schedule_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InversePowerLR(two_group_sgd(), **kwargs)


# GrowingBatchSampler


def exact_size(b0, factor, every, k, cap):
    """min(cap, round-half-up(b0 * factor ** (k // every))) in exact rational arithmetic."""
    value = b0 * Fraction(factor) ** (k // every)
    return min(cap, math.floor(value + Fraction(1, 2)))


def expected_epochs(n, b0, factor, every, unit, cap, drop_last, epochs):
    """Per epoch the batch sizes, by walking through the samples one batch at a time."""
    result, step = [], 0
    for epoch in range(epochs):
        sizes, left = [], n
        while left:
            size = exact_size(b0, factor, every, epoch if unit == "epoch" else step, cap)
            if size > left:
                if not drop_last:
                    sizes.append(left)
                    step += 1
                break
            sizes.append(size)
            left -= size
            step += 1
        result.append(sizes)
    return result


CASES = [
    # n, b0, growth factor, every, unit, max batch, drop_last
    (100, 4, 1.5, 1, "epoch", None, False),
    (100, 3, 2, 2, "epoch", 40, True),
    (97, 2, 1.25, 3, "step", 30, False),
    (64, 5, 3, 2, "step", None, True),
    (50, 7, 1, 1, "step", None, False),
]


@pytest.mark.parametrize("n, b0, factor, every, unit, cap, drop_last", CASES)
def test_batch_sizes_follow_the_closed_form(n, b0, factor, every, unit, cap, drop_last):
    sampler = GrowingBatchSampler(
        n,
        b0,
        growth_factor=factor,
        every=every,
        unit=unit,
        max_batch_size=cap,
        drop_last=drop_last,
    )
    expected = expected_epochs(n, b0, factor, every, unit, min(cap or n, n), drop_last, 12)
    for epoch, sizes in enumerate(expected):
        assert len(sampler) == len(sizes)
        assert [len(batch) for batch in sampler] == sizes, f"epoch {epoch}"
        assert sampler.batch_sizes(epoch) == sizes
        assert sampler.steps_before(epoch) == sum(len(s) for s in expected[:epoch])
    assert sampler.epoch == 12
    for k in range(40):
        assert sampler.batch_size_at(k) == exact_size(b0, factor, every, k, min(cap or n, n))


@pytest.mark.parametrize("n, b0, factor, every, unit, cap, drop_last", CASES)
def test_every_epoch_covers_every_index_once(n, b0, factor, every, unit, cap, drop_last):
    sampler = GrowingBatchSampler(
        n,
        b0,
        growth_factor=factor,
        every=every,
        unit=unit,
        max_batch_size=cap,
        drop_last=drop_last,
        seed=3,
    )
    for epoch in range(6):
        batches = list(sampler)
        seen = [i for batch in batches for i in batch]
        assert len(seen) == len(set(seen))
        if drop_last:
            # only a remainder shorter than the next batch would have been is dropped
            k = epoch if unit == "epoch" else sampler.steps_before(epoch) + len(batches)
            assert set(seen) <= set(range(n))
            assert n - len(seen) < sampler.batch_size_at(k)
        else:
            assert sorted(seen) == list(range(n))


def test_batches_are_deterministic_resumable_and_leave_the_global_rng_alone():
    def run(seed, start=0, epochs=5):
        sampler = GrowingBatchSampler(50, 3, growth_factor=2, every=2, unit="step", seed=seed)
        sampler.set_epoch(start)
        return [list(sampler) for _ in range(epochs)]

    rng = torch.get_rng_state()
    first = run(seed=7)
    assert torch.equal(torch.get_rng_state(), rng)
    assert run(seed=7) == first
    assert run(seed=8) != first
    assert run(seed=7, start=3, epochs=2) == first[3:]
    orders = [[i for batch in batches for i in batch] for batches in first]
    assert orders[0] != orders[1]  # a fresh permutation each epoch
    unshuffled = GrowingBatchSampler(10, 4, shuffle=False)
    assert list(unshuffled) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_an_epoch_left_early_is_not_counted():
    sampler = GrowingBatchSampler(20, 2)
    for _ in zip(range(3), sampler):
        pass
    assert sampler.epoch == 0 and len(sampler) == 10


def test_works_as_the_batch_sampler_of_a_data_loader():
    data = TensorDataset(torch.arange(30) * 10)
    sampler = GrowingBatchSampler(len(data), 4, growth_factor=2, max_batch_size=16, seed=1)
    expected = copy.deepcopy(sampler)
    loader = DataLoader(data, batch_sampler=sampler)
    for _ in range(4):
        batches = list(expected)
        assert len(loader) == len(batches)
        assert [xb.tolist() for (xb,) in loader] == [[10 * i for i in b] for b in batches]


def test_wraps_a_sampler_and_forwards_set_epoch():
    ordered = GrowingBatchSampler(SequentialSampler(range(9)), 2, growth_factor=2)
    assert list(ordered) == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    assert list(ordered) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    shard = DistributedSampler(range(40), num_replicas=2, rank=1, shuffle=True, seed=5)
    sampler = GrowingBatchSampler(shard, 4, growth_factor=2)
    assert sampler.num_samples == 20
    for epoch in range(3):
        batches = list(sampler)
        shard.set_epoch(epoch)
        assert [i for b in batches for i in b] == list(shard)
        assert len(batches[0]) == 4 * 2**epoch


def test_equivalent_lr_schedule_keeps_the_noise_scale():
    sampler = GrowingBatchSampler(1000, 16, growth_factor=3, every=2, max_batch_size=300)
    schedule = sampler.equivalent_lr_schedule(0.9, 10)
    for k, lr in enumerate(schedule):
        # Smith et al. 2018: lr / B constant
        assert lr / 16 == pytest.approx(0.9 / exact_size(16, 3, 2, k, 300), rel=1e-15)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((0, 2), {}, ValueError, "number of samples"),
        (([1, 2, 3].__iter__(), 2), {}, TypeError, "sampler"),
        ((10, 0), {}, ValueError, "initial_batch_size"),
        ((10, 2.0), {}, ValueError, "initial_batch_size"),
        ((10, 2), {"growth_factor": 0.5}, ValueError, "growth_factor"),
        ((10, 2), {"every": 0}, ValueError, "every"),
        ((10, 2), {"unit": "epochs"}, ValueError, "unit"),
        ((10, 4), {"max_batch_size": 3}, ValueError, "max_batch_size"),
        ((10, 2), {"drop_last": 1}, TypeError, "drop_last"),
        ((10, 2), {"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_bad_sampler_arguments_name_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        GrowingBatchSampler(*args, **kwargs)


def test_bad_method_arguments_are_rejected():
    sampler = GrowingBatchSampler(10, 2)
    with pytest.raises(ValueError, match="epoch"):
        sampler.set_epoch(-1)
    with pytest.raises(ValueError, match="k must"):
        sampler.batch_size_at(-2)
    with pytest.raises(ValueError, match="lr"):
        sampler.equivalent_lr_schedule(0.0, 3)
