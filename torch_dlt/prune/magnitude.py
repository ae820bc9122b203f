"""Magnitude pruning on top of ``torch.nn.utils.prune``: global or per layer, by weight or by
channel, one-shot or iterative with fine-tuning (Han et al. 2015; Li et al. 2017; Zhu & Gupta 2017).

The masks are ``torch.nn.utils.prune`` masks (``weight = weight_orig * weight_mask`` in a forward
pre-hook), so everything that understands that module understands these models, and
:func:`make_permanent` turns them into plain weights with ``prune.remove``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

__all__ = [
    "LayerSparsity",
    "SparsityReport",
    "iterative_prune",
    "make_permanent",
    "prunable_layers",
    "magnitude_prune",
    "sparsity",
]

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SCOPES = ("global", "layer")
_STRUCTURES = ("unstructured", "channel")


@dataclass(frozen=True)
class LayerSparsity:
    """Zeros of one layer's effective weight (``module.weight``, mask applied)."""

    name: str
    zeros: int
    total: int
    channels_pruned: int
    channels: int

    @property
    def fraction(self) -> float:
        return self.zeros / self.total


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer and overall fraction of zero weights."""

    layers: list[LayerSparsity]

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def total(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def fraction(self) -> float:
        return self.zeros / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [f"{'layer':<24}{'zeros':>10}{'total':>10}{'sparsity':>10}{'channels':>12}"]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<24}{layer.zeros:>10}{layer.total:>10}{layer.fraction:>10.3f}"
                f"{f'{layer.channels_pruned}/{layer.channels}':>12}"
            )
        lines.append(f"{'all':<24}{self.zeros:>10}{self.total:>10}{self.fraction:>10.3f}")
        return "\n".join(lines)


def prunable_layers(
    model: nn.Module, layers: Iterable[str] | None = None
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs to prune: every Linear / Conv layer, or those named.

    Args:
        model (nn.Module): the model.
        layers (Iterable[str] | None): module names (as in ``model.named_modules()``); ``None``
            for every ``Linear``, ``Conv1d``, ``Conv2d`` and ``Conv3d``.

    Returns:
        list[tuple[str, nn.Module]]: in the model's module order.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> [name for name, _ in prunable_layers(net)]
        ['0', '2']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    if layers is None:
        chosen = [(n, m) for n, m in modules.items() if isinstance(m, _WEIGHT_LAYERS)]
        if not chosen:
            raise ValueError("the model has no Linear or Conv layer to prune")
        return chosen
    if isinstance(layers, str):
        layers = [layers]
    names = list(layers)
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(
            f"layers {missing} are not modules of the model; available weight layers: "
            f"{[n for n, m in modules.items() if isinstance(m, _WEIGHT_LAYERS)]}"
        )
    wrong = [n for n in names if not isinstance(modules[n], _WEIGHT_LAYERS)]
    if wrong:
        raise ValueError(
            f"layers {wrong} are {[type(modules[n]).__name__ for n in wrong]}; only Linear and "
            "Conv1d/2d/3d layers can be pruned"
        )
    if not names:
        raise ValueError("layers is empty: name at least one Linear or Conv layer")
    return [(n, modules[n]) for n in modules if n in names]


def _check_options(amount: object, scope: object, structure: object, n: object) -> None:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < 1:
        raise ValueError(f"amount must be a float in [0, 1) (fraction to prune), got {amount!r}")
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
    if structure not in _STRUCTURES:
        raise ValueError(f"structure must be one of {_STRUCTURES}, got {structure!r}")
    if isinstance(n, bool) or not (n == math.inf or (isinstance(n, (int, float)) and n > 0)):
        raise ValueError(f"n (the L_n norm of a channel) must be > 0 or math.inf, got {n!r}")


def _weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach()


def _channel_counts(layers: Sequence[tuple[str, nn.Module]]) -> list[tuple[int, int]]:
    """(pruned, total) output channels of each layer: a channel is pruned when all its weights
    are zero."""
    counts = []
    for _, module in layers:
        w = _weight(module)
        alive = w.flatten(1).ne(0).any(dim=1)
        counts.append((int((~alive).sum()), w.shape[0]))
    return counts


def _prune_to(
    layers: Sequence[tuple[str, nn.Module]],
    target: float,
    scope: str,
    structure: str,
    n: float,
) -> None:
    """Prune (on top of the existing masks) until the fraction ``target`` of the weights (or of
    the output channels) is pruned, per layer or over all layers together."""
    if structure == "unstructured":
        if scope == "global":
            total = sum(_weight(m).numel() for _, m in layers)
            done = sum(int(_weight(m).eq(0).sum()) for _, m in layers)
            more = max(0, round(target * total) - done)
            # global_unstructured takes an int amount from the weights still unpruned.
            prune.global_unstructured(
                [(m, "weight") for _, m in layers],
                pruning_method=prune.L1Unstructured,
                amount=more,
            )
            return
        for _, module in layers:
            w = _weight(module)
            more = max(0, round(target * w.numel()) - int(w.eq(0).sum()))
            prune.l1_unstructured(module, "weight", amount=more)
        return

    counts = _channel_counts(layers)
    if scope == "layer":
        for (_, module), (pruned, total) in zip(layers, counts):
            more = max(0, min(round(target * total), total - 1) - pruned)
            prune.ln_structured(module, "weight", amount=more, n=n, dim=0)
        return
    # Global channel ranking: a channel's L_n norm divided by its number of weights ** (1/n),
    # so that layers of different fan-in compare; every layer keeps at least one channel.
    scores = []
    for i, (_, module) in enumerate(layers):
        w = _weight(module).flatten(1)
        norms = torch.linalg.vector_norm(w.double(), ord=n, dim=1)
        norms = norms / (w.shape[1] ** (1.0 / n) if n != math.inf else 1.0)
        alive = w.ne(0).any(dim=1)
        scores += [(float(s), i) for s, a in zip(norms, alive) if a]
    all_channels = sum(total for _, total in counts)
    already = sum(pruned for pruned, _ in counts)
    more = max(0, round(target * all_channels) - already)
    per_layer = [0] * len(layers)
    alive_left = [total - pruned for pruned, total in counts]
    for _, i in sorted(scores):
        if more == 0:
            break
        if alive_left[i] > 1:
            per_layer[i] += 1
            alive_left[i] -= 1
            more -= 1
    for (_, module), k in zip(layers, per_layer):
        prune.ln_structured(module, "weight", amount=k, n=n, dim=0)


def magnitude_prune(
    model: nn.Module,
    amount: float,
    *,
    scope: str = "global",
    structure: str = "unstructured",
    n: float = 2,
    layers: Iterable[str] | None = None,
) -> nn.Module:
    r"""Prune the smallest-magnitude weights (or output channels) of ``model`` in place, once.

    ``structure="unstructured"`` zeroes the ``amount`` fraction of weights of smallest
    :math:`|w|` (Han et al. 2015), over all chosen layers together (``scope="global"``, via
    ``prune.global_unstructured``) or in each layer (``prune.l1_unstructured``).
    ``structure="channel"`` zeroes whole output channels of smallest :math:`L_n` norm (Li et al.
    2017, ``prune.ln_structured`` along dim 0); with ``scope="global"`` channels are ranked by
    their norm over (their number of weights)^(1/n) so that layers compare. Channel pruning
    leaves every layer at least one channel. The fraction counts weights (channels) already
    zero, so calling it again with a larger amount prunes further.

    Args:
        model (nn.Module): pruned in place (``torch.nn.utils.prune`` masks).
        amount (float): target fraction in [0, 1) of weights (or of channels) pruned.
        scope (str): ``"global"`` or ``"layer"``.
        structure (str): ``"unstructured"`` or ``"channel"``.
        n (float): the norm ranking channels (``structure="channel"``).
        layers (Iterable[str] | None): names of the layers to prune; all Linear / Conv by default.

    Returns:
        nn.Module: ``model``.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 2))
        >>> round(sparsity(magnitude_prune(net, 0.8)).fraction, 3)
        0.8
    """
    _check_options(amount, scope, structure, n)
    chosen = prunable_layers(model, layers)
    _prune_to(chosen, float(amount), scope, structure, n)
    return model


def iterative_prune(
    model: nn.Module,
    amount: float,
    steps: int,
    *,
    finetune: Callable[[nn.Module, int], object] | None = None,
    scope: str = "global",
    structure: str = "unstructured",
    n: float = 2,
    layers: Iterable[str] | None = None,
) -> nn.Module:
    r"""Prune ``model`` to ``amount`` in ``steps`` rounds, fine-tuning after each.

    The kept fraction decays geometrically: after round :math:`t` the pruned fraction is
    :math:`1 - (1 - \text{amount})^{t / \text{steps}}`, so each round removes the same share of
    the weights still alive (the schedule of Han et al. 2015; Zhu & Gupta 2017 use a cubic one).
    During fine-tuning the masks stay in force: ``torch.nn.utils.prune`` multiplies
    ``weight_orig`` by the mask in every forward pass, so pruned weights stay zero and get no
    gradient.

    Args:
        model (nn.Module): pruned in place.
        amount (float): final fraction in [0, 1) of weights (or of channels) pruned.
        steps (int): number of pruning rounds (>= 1).
        finetune (Callable[[nn.Module, int], object] | None): called as
            ``finetune(model, round)`` after each round (0-based), e.g. a few epochs of training.
        scope, structure, n, layers: as in :func:`magnitude_prune`.

    Returns:
        nn.Module: ``model``.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 2))
        >>> seen = []
        >>> def finetune(model, step):  # train a few epochs here
        ...     seen.append(round(sparsity(model).fraction, 2))
        >>> _ = iterative_prune(net, 0.9, 3, finetune=finetune)
        >>> seen
        [0.54, 0.79, 0.9]
    """
    _check_options(amount, scope, structure, n)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if finetune is not None and not callable(finetune):
        raise TypeError(f"finetune must be callable as finetune(model, round), got {finetune!r}")
    chosen = prunable_layers(model, layers)
    for t in range(steps):
        target = 1.0 - (1.0 - float(amount)) ** ((t + 1) / steps)
        _prune_to(chosen, target, scope, structure, n)
        if finetune is not None:
            finetune(model, t)
    return model


def sparsity(model: nn.Module, layers: Iterable[str] | None = None) -> SparsityReport:
    """Fraction of zero weights of each Linear / Conv layer (mask applied) and overall.

    Args:
        model (nn.Module): pruned or not.
        layers (Iterable[str] | None): which layers; all Linear / Conv by default.

    Returns:
        SparsityReport: ``.layers`` (name, zeros, total, channels pruned) and ``.fraction``.

    Example:
        >>> net = nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     net.weight[0] = 0.0
        >>> report = sparsity(net)
        >>> report.fraction, report.layers[0].channels_pruned
        (0.5, 1)
    """
    chosen = prunable_layers(model, layers)
    counts = _channel_counts(chosen)
    return SparsityReport(
        [
            LayerSparsity(name, int(_weight(m).eq(0).sum()), _weight(m).numel(), pruned, total)
            for (name, m), (pruned, total) in zip(chosen, counts)
        ]
    )


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every ``torch.nn.utils.prune`` mask into its parameter (``prune.remove``).

    Afterwards ``weight`` is a plain parameter holding the pruned values and the masks, the
    ``*_orig`` parameters and the forward pre-hooks are gone.

    Args:
        model (nn.Module): modified in place.

    Returns:
        nn.Module: ``model``.

    Example:
        >>> net = magnitude_prune(nn.Linear(8, 4), 0.5)
        >>> sorted(name for name, _ in make_permanent(net).named_parameters())
        ['bias', 'weight']
        >>> sparsity(net).fraction
        0.5
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model
