"""Tests of torch_dlt/prune/magnitude.py against brute-force rankings of the weights."""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from torch_dlt.prune import iterative_prune, magnitude_prune, make_permanent, sparsity


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 12),
        nn.ReLU(),
        nn.Linear(12, 3),
    )


def _layers(net):
    return [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _originals(net):
    return [m.weight.detach().clone() for m in _layers(net)]


def test_global_unstructured_prunes_the_globally_smallest_weights():
    net = _net()
    before = _originals(net)
    magnitude_prune(net, 0.7)
    assert prune.is_pruned(net)
    mags = torch.cat([w.abs().flatten() for w in before])
    pruned = torch.cat([m.weight.detach().eq(0).flatten() for m in _layers(net)])
    assert int(pruned.sum()) == round(0.7 * mags.numel())
    assert mags[pruned].max() <= mags[~pruned].min()  # brute force: a threshold separates them
    for m, w in zip(_layers(net), before):  # kept weights are untouched
        kept = m.weight.detach().ne(0)
        assert torch.equal(m.weight.detach()[kept], w[kept])


def test_per_layer_unstructured_prunes_each_layer_to_the_amount():
    net = _net(1)
    before = _originals(net)
    magnitude_prune(net, 0.45, scope="layer")
    for m, w in zip(_layers(net), before):
        pruned = m.weight.detach().eq(0)
        assert int(pruned.sum()) == round(0.45 * w.numel())
        assert w.abs()[pruned].max() <= w.abs()[~pruned].min()


def test_per_layer_channel_pruning_drops_the_smallest_l2_channels():
    net = _net(2)
    before = _originals(net)
    magnitude_prune(net, 0.5, scope="layer", structure="channel")
    for m, w in zip(_layers(net), before):
        norms = w.flatten(1).norm(dim=1)
        dead = m.weight.detach().flatten(1).eq(0).all(dim=1)
        assert int(dead.sum()) == round(0.5 * w.shape[0])
        assert norms[dead].max() <= norms[~dead].min()
        assert m.weight.detach().flatten(1)[~dead].ne(0).all()  # whole channels, nothing else
    report = sparsity(net)
    assert [lay.channels_pruned for lay in report.layers] == [3, 2, 6, 2]


def test_global_channel_pruning_ranks_normalised_norms():
    net = _net(3)
    before = _originals(net)
    magnitude_prune(net, 0.4, structure="channel")
    scores = torch.cat([w.flatten(1).norm(dim=1) / w[0].numel() ** 0.5 for w in before])
    dead = torch.cat([m.weight.detach().flatten(1).eq(0).all(dim=1) for m in _layers(net)])
    assert int(dead.sum()) == round(0.4 * dead.numel())
    assert scores[dead].max() <= scores[~dead].min()


def test_global_channel_pruning_keeps_a_channel_in_every_layer():
    net = _net(3)
    magnitude_prune(net, 0.95, structure="channel")
    report = sparsity(net)
    assert [lay.channels - lay.channels_pruned for lay in report.layers] == [1, 1, 1, 1]


def test_iterative_prune_follows_the_geometric_schedule_and_masks_survive_finetuning():
    net = _net(4)
    total = sum(m.weight.numel() for m in _layers(net))
    seen, masks = [], []
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y = torch.randn(16, 2, 8, 8), torch.randint(0, 3, (16,))

    def finetune(model, step):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        seen.append(sparsity(model).zeros)
        masks.append(torch.cat([m.weight.detach().eq(0).flatten() for m in _layers(model)]))

    iterative_prune(net, 0.9, 4, finetune=finetune)
    expected = [round(total * (1 - 0.1 ** ((t + 1) / 4))) for t in range(4)]
    assert seen == expected
    for earlier, later in zip(masks, masks[1:]):
        assert (earlier & ~later).sum() == 0  # once pruned, always pruned


def test_iterative_channel_pruning_reaches_the_amount():
    net = _net(5)
    iterative_prune(net, 0.5, 3, scope="layer", structure="channel")
    for lay in sparsity(net).layers:
        assert lay.channels_pruned == round(0.5 * lay.channels)


def test_make_permanent_folds_masks_and_keeps_the_function():
    net = _net(6)
    magnitude_prune(net, 0.5)
    x = torch.randn(4, 2, 8, 8)
    out = net(x).detach()
    zeros = sparsity(net).zeros
    make_permanent(net)
    assert not prune.is_pruned(net)
    assert not any(name.endswith("_orig") for name, _ in net.named_parameters())
    assert all(not m._forward_pre_hooks for m in net.modules())
    assert torch.equal(net(x), out)
    assert sparsity(net).zeros == zeros


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(amount=1.0), "amount"),
        (dict(amount=-0.1), "amount"),
        (dict(amount=0.5, scope="net"), "scope"),
        (dict(amount=0.5, structure="filter"), "structure"),
        (dict(amount=0.5, layers=["9"]), r"\['9'\]"),
        (dict(amount=0.5, layers=["1"]), "ReLU"),
        (dict(amount=0.5, n=0), "n "),
    ],
)
def test_bad_arguments_raise_and_leave_the_model_untouched(kwargs, match):
    net = _net(7)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        magnitude_prune(net, **kwargs)
    assert not prune.is_pruned(net)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_iterative_prune_rejects_bad_steps():
    with pytest.raises(ValueError, match="steps"):
        iterative_prune(_net(), 0.5, 0)
