"""Intrinsic dimension of a network's hidden representations, layer by layer.

Forward hooks collect each chosen layer's output (flattened per sample); the estimators of
:mod:`torch_dlt.theory.intrinsic_dim` (Levina & Bickel 2004; Facco et al. 2017; Hein & Audibert
2005) measure its dimension, as Ansuini et al. (2019) do across the layers of trained nets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torch_dlt.probes._state import forked_rng, restored_mode
from torch_dlt.theory.intrinsic_dim import intrinsic_dimension

__all__ = ["RepresentationDimensions", "representation_dimensions"]


@dataclass(frozen=True)
class RepresentationDimensions:
    """Intrinsic dimension of the input and of each chosen layer's output.

    Attributes:
        method (str): the estimator, ``"mle"``, ``"twonn"`` or ``"hein"``.
        num_samples (int): samples the estimates use.
        dimensions (dict[str, float]): ``"input"`` then each layer's name, in
            ``named_modules`` order.
        ambient (dict[str, int]): features per sample of the same representations.
    """

    method: str
    num_samples: int
    dimensions: dict[str, float]
    ambient: dict[str, int]


def _batches(data: object) -> Iterable[Tensor]:
    if isinstance(data, Tensor):
        yield data
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"representation_dimensions: data must be a Tensor [N, ...] or an iterable of "
            f"batches (Tensor or (x, y) tuples), got {type(data).__name__}"
        )
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor):
            raise TypeError(
                f"representation_dimensions: each batch must be a Tensor or a tuple starting "
                f"with one, got {type(x).__name__}"
            )
        yield x


def representation_dimensions(
    model: nn.Module,
    data: Tensor | Iterable,
    *,
    layers: Iterable[str] | None = None,
    method: str = "twonn",
    k: int | None = None,
    max_samples: int = 2000,
    batch_size: int = 256,
) -> RepresentationDimensions:
    """Intrinsic dimension of the input and of each layer's output of ``model`` on ``data``.

    The model runs in eval mode under ``torch.no_grad`` on the first ``max_samples`` samples;
    forward hooks store each chosen layer's output flattened to ``[samples, features]``, then
    :func:`torch_dlt.theory.intrinsic_dimension` estimates its dimension. Parameters, buffers,
    ``training`` flags and the global RNG state are the same afterwards and every hook is removed,
    also when the forward pass raises.

    Args:
        model (nn.Module): the network; its outputs of the chosen layers must be Tensors.
        data (Tensor[N, ...] | Iterable): inputs, or batches (Tensors or ``(x, y)`` tuples).
        layers (Iterable[str] | None): names from ``model.named_modules()``; None for every
            leaf module (no children).
        method (str): ``"mle"``, ``"twonn"`` or ``"hein"``.
        k (int | None): the estimator's neighbourhood size (see ``intrinsic_dimension``).
        max_samples (int): samples used at most (the first ones), >= 3.
        batch_size (int): rows per forward pass when ``data`` is one Tensor.

    Returns:
        RepresentationDimensions: per representation, its intrinsic and ambient dimension.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 20), nn.Tanh(), nn.Linear(20, 5))
        >>> result = representation_dimensions(net, torch.rand(500, 3), method="mle")
        >>> list(result.dimensions), [round(v) for v in result.dimensions.values()]
        (['input', '0', '1', '2'], [3, 3, 3, 3])
    """
    fn = "representation_dimensions"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    for name, value in (("max_samples", max_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}")
    if max_samples < 3:
        raise ValueError(f"{fn}: max_samples must be >= 3, got {max_samples}")
    modules = dict(model.named_modules())
    if layers is None:
        names = [n for n, m in modules.items() if n and next(m.children(), None) is None]
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise ValueError(
                f"{fn}: unknown layers {unknown}; model has {[n for n in modules if n]}"
            )
    if not names:
        raise ValueError(f"{fn}: no layer to measure; pass layers=[names of submodules]")

    outputs: dict[str, list[Tensor]] = {name: [] for name in names}

    def make_hook(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"{fn}: layer {name!r} returns {type(output).__name__}, not a Tensor; "
                    f"choose layers whose output is a Tensor"
                )
            outputs[name].append(output.detach().flatten(1).cpu())

        return hook

    inputs: list[Tensor] = []
    seen = 0
    handles = []
    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        # fork_rng: a model's forward may draw random numbers even in eval mode (noise layers).
        with restored_mode(model), torch.no_grad(), forked_rng(model):
            source = data.split(batch_size) if isinstance(data, Tensor) else _batches(data)
            for x in source:
                if seen >= max_samples:
                    break
                x = x[: max_samples - seen]
                if x.dim() < 2:
                    raise ValueError(f"{fn}: a batch must be [B, ...], got shape {tuple(x.shape)}")
                model(x)
                inputs.append(x.detach().flatten(1).cpu())
                seen += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    if seen < 3:
        raise ValueError(f"{fn}: data gave {seen} samples; at least 3 are needed")
    representations = {"input": torch.cat(inputs)}
    for name in names:
        if not outputs[name]:
            raise ValueError(f"{fn}: layer {name!r} was not called in the forward pass")
        representations[name] = torch.cat(outputs[name])
        if representations[name].shape[0] != seen:
            raise ValueError(
                f"{fn}: layer {name!r} gave {representations[name].shape[0]} rows for {seen} "
                f"samples (called more than once per forward?); choose another layer"
            )
    dimensions, ambient = {}, {}
    for name, points in representations.items():
        dimensions[name] = intrinsic_dimension(points.to(torch.float64), method=method, k=k)
        ambient[name] = points.shape[1]
    return RepresentationDimensions(method, seen, dimensions, ambient)
