"""The layer-wise linear-probe transfer curve: how linearly separable the classes are in the
features after each of a frozen model's first k layers (Yosinski et al. 2014; Alain & Bengio 2016).
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_dlt.probes._state import forked_rng, restored_mode

__all__ = ["TransferCurve", "transfer_curve"]

_OWNER = "transfer_curve"


class TransferCurve(NamedTuple):
    """Linear-probe accuracy per depth, from :func:`transfer_curve`.

    Attributes:
        depths (list[int]): ``0`` for the input itself, ``k`` for the output of ``layers[k-1]``.
        layers (list[str]): the probed layer at each depth (``"input"`` at depth 0).
        features (list[int]): feature dimension the linear head sees at each depth.
        train_accuracy (Tensor[D]): accuracy of each head on the data it was fitted on.
        test_accuracy (Tensor[D]): accuracy of each head on the test loader.
    """

    depths: list[int]
    layers: list[str]
    features: list[int]
    train_accuracy: Tensor
    test_accuracy: Tensor


class _EnoughLayers(Exception):
    """Raised by the deepest probed layer's hook: the rest of the forward pass is not needed."""


def _resolve_layers(
    model: nn.Module, layers: Sequence[Union[str, nn.Module]]
) -> list[tuple[str, nn.Module]]:
    if isinstance(layers, (str, nn.Module)) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(
            f"{_OWNER}: layers must be a non-empty sequence of module names or modules of the "
            f"model, in forward order; got {layers!r}"
        )
    named = dict(model.named_modules())
    names_of = {id(module): name for name, module in named.items()}
    resolved = []
    for layer in layers:
        if isinstance(layer, str):
            if layer not in named or layer == "":
                available = [n for n in named if n][:12]
                raise ValueError(
                    f"{_OWNER}: the model has no submodule {layer!r}; its submodules include "
                    f"{available}"
                )
            resolved.append((layer, named[layer]))
        elif isinstance(layer, nn.Module) and id(layer) in names_of and names_of[id(layer)]:
            resolved.append((names_of[id(layer)], layer))
        else:
            raise ValueError(
                f"{_OWNER}: layers must name submodules of the model (str) or be them; got "
                f"{type(layer).__name__} that is not one"
            )
    return resolved


def _batches(loader: Iterable, which: str) -> Iterable[tuple[Tensor, Tensor]]:
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(
                f"{_OWNER}: {which} must yield (inputs, labels) pairs, got {type(batch).__name__}"
            )
        x, y = batch[0], batch[1]
        if not isinstance(x, Tensor) or not isinstance(y, Tensor) or y.dim() != 1:
            raise TypeError(
                f"{_OWNER}: {which} must yield (Tensor[B, ...], Tensor[B] of class indices)"
            )
        yield x, y


def _collect(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    loader: Iterable,
    which: str,
    pool: int | None,
    include_input: bool,
) -> tuple[list[Tensor], Tensor]:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    captured: dict[int, Tensor] = {}

    def summarize(out: Tensor) -> Tensor:
        if pool is not None and out.dim() == 4:
            out = F.adaptive_avg_pool2d(out, pool)
        return out.detach().flatten(1).to("cpu", torch.float64)

    def hook_for(index: int, last: bool):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"{_OWNER}: layer {layers[index][0]!r} returns {type(out).__name__}, "
                    "not a Tensor"
                )
            captured[index] = summarize(out)
            if last:
                raise _EnoughLayers

        return hook

    per_depth: list[list[Tensor]] = [[] for _ in range(len(layers) + include_input)]
    labels = []
    handles = [
        module.register_forward_hook(hook_for(i, i == len(layers) - 1))
        for i, (_, module) in enumerate(layers)
    ]
    try:
        for x, y in _batches(loader, which):
            captured.clear()
            try:
                model(x.to(device))
            except _EnoughLayers:
                pass
            missing = [layers[i][0] for i in range(len(layers)) if i not in captured]
            if missing:
                raise ValueError(f"{_OWNER}: layers {missing} did not run in the forward pass")
            if include_input:
                per_depth[0].append(summarize(x))
            for i in range(len(layers)):
                per_depth[i + include_input].append(captured[i])
            labels.append(y.to("cpu", torch.int64))
    finally:
        for handle in handles:
            handle.remove()
    if not labels:
        raise ValueError(f"{_OWNER}: {which} yielded no batches")
    return [torch.cat(chunks) for chunks in per_depth], torch.cat(labels)


def _fit_linear_head(
    features: Tensor, labels: Tensor, num_classes: int, l2: float, max_iter: int
) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression: argmin mean cross-entropy + l2 / 2 ||W||^2 (bias free of
    the penalty), by full-batch L-BFGS; the objective is strictly convex, so the head is unique."""
    weight = torch.zeros(features.shape[1], num_classes, dtype=features.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=features.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight + bias, labels) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def transfer_curve(
    model: nn.Module,
    layers: Sequence[Union[str, nn.Module]],
    train_loader: Iterable,
    test_loader: Iterable,
    *,
    include_input: bool = True,
    pool: int | None = None,
    l2: float = 1e-3,
    standardize: bool = True,
    max_iter: int = 500,
) -> TransferCurve:
    r"""Linear-probe accuracy of a frozen model's features after each of its first k layers.

    For each depth the model's features (flattened; average-pooled to ``pool x pool`` first
    for 4D feature maps if ``pool`` is given) are collected on both loaders with the model in
    eval mode and no gradient; a multinomial logistic regression minimising
    :math:`\tfrac1n\sum_i \mathrm{CE}(W^\top z_i + b, y_i) + \tfrac{l_2}{2}\|W\|^2` is fitted on
    the (standardised) training features, and its accuracy is reported on both sets. Where
    accuracy falls with depth the features have specialised to the training task; where it
    rises they have become more linearly separable (Yosinski et al. 2014, "How transferable are
    features in deep neural networks?"; Alain & Bengio 2016, "Understanding intermediate
    layers using linear classifier probes"). With ``standardize`` it equals scikit-learn's
    ``LogisticRegression(C=1 / (n l2))`` on ``StandardScaler`` features.

    The forward pass stops after the deepest probed layer. The model is left as it was:
    parameters, ``training`` flags, buffers, ``requires_grad`` and the global RNG states.

    Args:
        model (nn.Module): the frozen network.
        layers (Sequence[str | nn.Module]): submodules (or their names), in forward order.
        train_loader (Iterable): yields ``(x Tensor[B, ...], y Tensor[B])``; the heads are fit
            on it.
        test_loader (Iterable): the same, for the reported test accuracy.
        include_input (bool): probe the raw input as depth 0.
        pool (int | None): adaptive average pooling size for 4D feature maps.
        l2 (float): weight penalty of the heads.
        standardize (bool): centre and scale each feature by its training mean and standard
            deviation (constant features are only centred).
        max_iter (int): L-BFGS iterations per head.

    Returns:
        TransferCurve: depths, layer names, feature sizes, train and test accuracies.

    Example:
        >>> from torch_dlt.data import data_loader
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(60, 4), torch.arange(60) % 3
        >>> x[:, 0] += 3 * y  # class information in the first input coordinate
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> loader = data_loader(x, y, batch_size=30, shuffle=False)
        >>> curve = transfer_curve(net, ["0", "1"], loader, loader)
        >>> curve.layers, curve.features
        (['input', '0', '1'], [4, 8, 8])
        >>> bool(curve.test_accuracy[0] > 0.9)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OWNER}: model must be an nn.Module, got {type(model).__name__}")
    resolved = _resolve_layers(model, layers)
    if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int) or pool < 1):
        raise ValueError(f"{_OWNER}: pool must be None or an int >= 1, got {pool!r}")
    if not (isinstance(l2, (int, float)) and l2 > 0 and math.isfinite(l2)):
        raise ValueError(f"{_OWNER}: l2 must be a finite float > 0, got {l2!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{_OWNER}: max_iter must be an int >= 1, got {max_iter!r}")

    with forked_rng(model), restored_mode(model), torch.no_grad():
        train_features, train_labels = _collect(
            model, resolved, train_loader, "train_loader", pool, include_input
        )
        test_features, test_labels = _collect(
            model, resolved, test_loader, "test_loader", pool, include_input
        )
    if train_labels.min() < 0:
        raise ValueError(f"{_OWNER}: labels must be class indices >= 0")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1

    train_accuracy, test_accuracy = [], []
    for z_train, z_test in zip(train_features, test_features):
        if standardize:
            mean = z_train.mean(dim=0)
            std = z_train.std(dim=0, correction=0)
            scale = torch.where(std > 0, std, torch.ones_like(std))
            z_train, z_test = (z_train - mean) / scale, (z_test - mean) / scale
        weight, bias = _fit_linear_head(z_train, train_labels, num_classes, l2, max_iter)
        for z, y, out in (
            (z_train, train_labels, train_accuracy),
            (z_test, test_labels, test_accuracy),
        ):
            out.append(((z @ weight + bias).argmax(dim=1) == y).double().mean())
    names = ["input"] * include_input + [name for name, _ in resolved]
    return TransferCurve(
        depths=list(range(1 - include_input, len(resolved) + 1)),
        layers=names,
        features=[z.shape[1] for z in train_features],
        train_accuracy=torch.stack(train_accuracy),
        test_accuracy=torch.stack(test_accuracy),
    )
