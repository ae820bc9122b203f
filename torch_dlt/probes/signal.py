"""Forward and backward signal statistics of a model's layers, next to mean-field theory.

Pre-activation moments and gradient norms per layer (Glorot & Bengio 2010; Poole et al. 2016;
Schoenholz et al. 2017) and the layer-by-layer correlation of two inputs (Poole et al. 2016).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from torch_dlt.ops import moments
from torch_dlt.probes._state import forked_rng, restored_mode

__all__ = [
    "CorrelationProfile",
    "LayerSignal",
    "SignalHistory",
    "SignalMonitor",
    "SignalReport",
    "correlation_propagation",
    "register_layer_type",
]

FeatureLayout = Callable[[nn.Module, Tensor], Tensor]
"""Maps a layer and its output ``[...]`` to its pre-activations as ``[samples, features]``."""

LayerSelection = Union[str, type, Iterable[Union[str, type]], None]
"""``None`` (every registered layer type), or layer names and/or ``nn.Module`` types."""


def _last_dim_features(module: nn.Module, output: Tensor) -> Tensor:
    # nn.Linear acts on the last dim; every leading dim (batch, sequence) indexes samples.
    if output.dim() == 0:
        return output.reshape(1, 1)
    return output.reshape(-1, output.shape[-1])


def _channel_features(module: nn.Module, output: Tensor) -> Tensor:
    if output.dim() <= 1:
        return output.reshape(-1, 1)
    return output.movedim(1, -1).reshape(-1, output.shape[1])


def _conv_features(module: nn.Module, output: Tensor) -> Tensor:
    # An unbatched convolution returns [C, *spatial], one dim fewer than its batched output.
    if output.dim() == len(module.kernel_size) + 1:
        output = output.unsqueeze(0)
    return _channel_features(module, output)


_FEATURE_LAYOUTS: dict[type, FeatureLayout] = {
    nn.Linear: _last_dim_features,
    nn.Conv1d: _conv_features,
    nn.Conv2d: _conv_features,
    nn.Conv3d: _conv_features,
}


def register_layer_type(layer_type: type, layout: FeatureLayout) -> None:
    """Make ``layer_type`` (and its subclasses) a default monitored layer type.

    Args:
        layer_type (type): an ``nn.Module`` subclass.
        layout (Callable[[nn.Module, Tensor], Tensor]): maps ``(layer, output)`` to the
            pre-activations as ``Tensor[samples, features]``.

    Example:
        >>> import torch
        >>> class Scale(torch.nn.Module):
        ...     def forward(self, x):
        ...         return 2 * x
        >>> register_layer_type(Scale, lambda layer, h: h.reshape(-1, h.shape[-1]))
        >>> SignalMonitor(torch.nn.Sequential(Scale(), torch.nn.Tanh())).layer_names
        ['0']
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(
            f"register_layer_type: layer_type must be an nn.Module subclass, got {layer_type!r}"
        )
    if not callable(layout):
        raise TypeError(f"register_layer_type: layout must be callable, got {layout!r}")
    _FEATURE_LAYOUTS[layer_type] = layout


def _registered_layout(module: nn.Module) -> FeatureLayout | None:
    for cls in type(module).__mro__:
        if cls in _FEATURE_LAYOUTS:
            return _FEATURE_LAYOUTS[cls]
    return None


def _layout(module: nn.Module) -> FeatureLayout:
    # Generic fallback: dim 1 holds the features (channels), every other dim counts as samples.
    return _registered_layout(module) or _channel_features


def _supported_types() -> str:
    return ", ".join(sorted(cls.__name__ for cls in _FEATURE_LAYOUTS))


def _name_listing(names: list[str], limit: int = 40) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _select_layers(
    model: nn.Module, layers: LayerSelection, owner: str
) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    named = dict(model.named_modules())
    if layers is None:
        chosen = [(n, m) for n, m in named.items() if _registered_layout(m) is not None]
        if not chosen:
            raise ValueError(
                f"{owner}: {type(model).__name__} has no layer of a supported type "
                f"({_supported_types()}); pass layers= with layer types or names, or add a type "
                "with register_layer_type"
            )
        return chosen
    specs = [layers] if isinstance(layers, (str, type)) else list(layers)
    if not specs:
        raise ValueError(f"{owner}: layers is empty; pass None, layer names or layer types")
    names, types = set(), []
    for spec in specs:
        if isinstance(spec, str):
            names.add(spec)
        elif isinstance(spec, type) and issubclass(spec, nn.Module):
            types.append(spec)
        else:
            raise TypeError(
                f"{owner}: layers must hold layer names (str) or nn.Module types, got {spec!r}"
            )
    unknown = sorted(names.difference(named))
    if unknown:
        raise ValueError(
            f"{owner}: unknown layer name(s) {unknown}; available: "
            f"{_name_listing([n for n in named if n])}"
        )
    chosen = [(n, m) for n, m in named.items() if n in names or isinstance(m, tuple(types))]
    if not chosen:
        present = sorted({type(m).__name__ for m in named.values()})
        raise ValueError(
            f"{owner}: {type(model).__name__} has no layer of type "
            f"{[t.__name__ for t in types]}; its layer types are {present}"
        )
    return chosen


def _preactivation_statistics(h: Tensor) -> Tensor:
    """``[mean, var, kurtosis, q]`` of ``h[samples, features]``, averaged over features."""
    m = moments(h, dim=0)
    return torch.stack(
        [m.mean.mean(), m.var.mean(), m.kurtosis.nanmean(), (m.mean.square() + m.var).mean()]
    )


def _stack(records: list[Tensor]) -> Tensor:
    if not records:
        return torch.empty(0, dtype=torch.float64)
    return torch.stack(records).to(device="cpu", dtype=torch.float64)


@dataclass(frozen=True)
class SignalHistory:
    r"""One layer's records, one entry per forward (or backward) call, oldest first.

    Attributes:
        mean (Tensor[T]): pre-activation mean, averaged over features.
        var (Tensor[T]): per-feature variance over samples, averaged over features.
        kurtosis (Tensor[T]): per-feature excess kurtosis over samples, averaged over features
            (``nan`` features, of zero variance, left out).
        q (Tensor[T]): mean square pre-activation :math:`q^l` (Poole et al. 2016).
        grad_norm (Tensor[T_b]): Frobenius norm of :math:`\partial L / \partial h^l`.
        weight_grad_norm (Tensor[T_w]): Frobenius norm of the gradient of the layer's weight.
    """

    mean: Tensor
    var: Tensor
    kurtosis: Tensor
    q: Tensor
    grad_norm: Tensor
    weight_grad_norm: Tensor


@dataclass(frozen=True)
class LayerSignal:
    """Summary of one layer: every statistic averaged over its recorded calls (``nan``: none).

    Attributes:
        name (str): the layer's name in ``model.named_modules()``.
        layer_type (str): its class name.
        forward_calls (int): forward calls recorded.
        backward_calls (int): gradients w.r.t. its output recorded.
        mean (float): see :class:`SignalHistory`; likewise ``var``, ``kurtosis``, ``q``,
            ``grad_norm`` and ``weight_grad_norm``.
        flags (tuple[str, ...]): ``"signal collapse"``, ``"signal explosion"``,
            ``"vanishing gradient"``, ``"exploding gradient"``, ``"non-finite"``
            (see :meth:`SignalMonitor.report`).
    """

    name: str
    layer_type: str
    forward_calls: int
    backward_calls: int
    mean: float
    var: float
    kurtosis: float
    q: float
    grad_norm: float
    weight_grad_norm: float
    flags: tuple[str, ...]

    def to_dict(self) -> dict:
        """Plain Python values; ``nan`` and ``inf`` become ``None`` so that it is strict JSON."""
        out = {}
        for key, value in self.__dict__.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


_COLUMNS = ("mean", "var", "kurtosis", "q", "grad_norm", "weight_grad_norm")


@dataclass(frozen=True)
class SignalReport:
    """Per-layer signal summary, in the order the layers first ran, and the flagging rule.

    ``str(report)`` is a text table; :meth:`to_dict` feeds the HTML report.

    Attributes:
        layers (list[LayerSignal]): one entry per monitored layer.
        signal_ratio (float): threshold on the signal amplitude ratio.
        grad_ratio (float): threshold on the gradient norm ratio.
    """

    layers: list[LayerSignal]
    signal_ratio: float
    grad_ratio: float

    @property
    def flagged(self) -> list[str]:
        """Names of the layers with at least one flag."""
        return [layer.name for layer in self.layers if layer.flags]

    def to_dict(self) -> dict:
        """``{"signal_ratio", "grad_ratio", "rule", "layers": [LayerSignal.to_dict(), ...]}``."""
        return {
            "signal_ratio": self.signal_ratio,
            "grad_ratio": self.grad_ratio,
            "rule": self.rule,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @property
    def rule(self) -> str:
        """The flagging rule in words."""
        return (
            f"signal collapse/explosion: sqrt(q^l / q^first) outside [1/{self.signal_ratio:g}, "
            f"{self.signal_ratio:g}]; vanishing/exploding gradient: |dL/dh^l| / |dL/dh^last| "
            f"outside [1/{self.grad_ratio:g}, {self.grad_ratio:g}]"
        )

    def __str__(self) -> str:
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        type_width = max([len("type")] + [len(layer.layer_type) for layer in self.layers])
        header = (
            f"{'layer':<{width}}  {'type':<{type_width}}  {'fwd':>5} {'bwd':>5} "
            + " ".join(f"{c:>10}" for c in ("mean", "var", "kurtosis", "q", "|dL/dh|", "|dL/dW|"))
            + "  flags"
        )
        rows = [header, "-" * len(header)]
        for layer in self.layers:
            values = " ".join(f"{getattr(layer, c):>10.3g}" for c in _COLUMNS)
            rows.append(
                f"{layer.name:<{width}}  {layer.layer_type:<{type_width}}  "
                f"{layer.forward_calls:>5} {layer.backward_calls:>5} {values}  "
                + ", ".join(layer.flags)
            )
        rows.append(f"flags: {self.rule}")
        return "\n".join(rows)


def _mean_or_nan(values: Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan


def _first_positive(values: Iterable[float]) -> float:
    return next((v for v in values if 0 < v < math.inf), math.nan)


def _ratio_flag(ratio: float, threshold: float, low: str, high: str) -> list[str]:
    if math.isnan(ratio):
        return []
    if ratio < 1.0 / threshold:
        return [low]
    return [high] if ratio > threshold else []


class SignalMonitor:
    r"""Records pre-activation statistics and gradient norms of a model's layers while it runs.

    A context manager around the user's own forward / backward passes: on entry it adds one
    forward hook per monitored layer and a gradient hook on each layer's weight; every forward
    call of a layer records, from its output :math:`h` (the pre-activation, before the
    nonlinearity) laid out as ``[samples, features]`` (Linear: every leading dim is a sample;
    ConvNd: batch x spatial positions are samples, channels are features), the per-feature
    mean, variance and excess kurtosis averaged over features and the mean square
    :math:`q^l = \langle h^2 \rangle` that mean-field theory predicts (Poole et al. 2016).
    When the output requires grad, a hook on that tensor records the Frobenius norm of
    :math:`\partial L / \partial h^l` at backward time; its square is the width-independent
    quantity whose layer-to-layer ratio is :math:`\chi_1` (Schoenholz et al. 2017). A tensor
    hook is used rather than a full module backward hook, which would break in-place
    activations such as ``nn.ReLU(inplace=True)`` after the layer. Weight gradient norms follow
    Glorot & Bengio (2010).

    Every call is kept (:meth:`history`); :meth:`report` averages over all calls since the
    last :meth:`reset`, so wrap only the passes you mean to measure (e.g. not the validation
    loop). On exit, also through an exception, every hook is removed. Only detached tensors are
    stored and the hooks return nothing, so outputs and gradients are those without the monitor.

    Layers are chosen through a small registry of layer types (``Linear``, ``Conv1d/2d/3d`` by
    default, extended with :func:`register_layer_type`); a layer of any other type named in
    ``layers`` is laid out generically, with dim 1 as features and every other dim as samples.

    Args:
        model (nn.Module): the model to watch; it is not modified.
        layers (None | str | type | Iterable[str | type]): ``None`` for every layer of a
            registered type, else layer names (as in ``model.named_modules()``) and/or layer
            types (all instances, subclasses included).
        weight_grads (bool): also record weight gradient norms.

    Raises:
        ValueError: the model has no layer of a supported type, or a name is unknown.

    Example:
        >>> import torch
        >>> from torch_dlt.nn import DeepMLP
        >>> net = DeepMLP(8, width=16, depth=3, out_features=2)
        >>> with SignalMonitor(net) as monitor:
        ...     net(torch.randn(32, 8)).square().mean().backward()
        >>> monitor.layer_names
        ['layers.fc1', 'layers.fc2', 'layers.fc3', 'layers.readout']
        >>> report = monitor.report()
        >>> [layer.forward_calls for layer in report.layers]
        [1, 1, 1, 1]
        >>> len(net.layers.fc1._forward_hooks)
        0
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: LayerSelection = None,
        weight_grads: bool = True,
    ) -> None:
        self.model = model
        self.weight_grads = weight_grads
        self._layers = _select_layers(model, layers, "SignalMonitor")
        self._handles: list[RemovableHandle] = []
        self._output_handles: list[RemovableHandle] = []
        self._prune_at = 64
        self.reset()

    @property
    def layer_names(self) -> list[str]:
        """Names of the monitored layers, in the model's module order."""
        return [name for name, _ in self._layers]

    @property
    def active(self) -> bool:
        """Whether the hooks are attached (inside the ``with`` block)."""
        return bool(self._handles)

    def reset(self) -> None:
        """Forget every record (the hooks stay as they are)."""
        self._forward: dict[str, list[Tensor]] = {name: [] for name, _ in self._layers}
        self._grad: dict[str, list[Tensor]] = {name: [] for name, _ in self._layers}
        self._weight_grad: dict[str, list[Tensor]] = {name: [] for name, _ in self._layers}
        self._run_order: list[str] = []

    def __enter__(self) -> SignalMonitor:
        if self.active:
            raise RuntimeError("SignalMonitor: already active; exit it before entering again")
        try:
            for name, module in self._layers:
                self._handles.append(
                    module.register_forward_hook(self._forward_hook(name, _layout(module)))
                )
                weight = getattr(module, "weight", None)
                if self.weight_grads and isinstance(weight, Tensor) and weight.requires_grad:
                    self._handles.append(weight.register_hook(self._weight_hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this monitor added; the records stay."""
        for handle in self._handles + self._output_handles:
            handle.remove()
        self._handles.clear()
        self._output_handles.clear()

    def _forward_hook(self, name: str, layout: FeatureLayout) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"SignalMonitor: layer {name!r} ({type(module).__name__}) returned "
                    f"{type(output).__name__}; only layers returning one Tensor can be monitored"
                )
            if not self._forward[name]:
                self._run_order.append(name)
            self._forward[name].append(_preactivation_statistics(layout(module, output.detach())))
            if output.requires_grad:
                self._keep_output_handle(output.register_hook(self._grad_hook(name)))

        return hook

    def _keep_output_handle(self, handle: RemovableHandle) -> None:
        # One handle per forward call: drop those whose graph autograd has already freed,
        # so that a long training run does not accumulate them.
        self._output_handles.append(handle)
        if len(self._output_handles) >= self._prune_at:
            self._output_handles = [h for h in self._output_handles if h.hooks_dict_ref()]
            self._prune_at = max(64, 2 * len(self._output_handles))

    def _grad_hook(self, name: str) -> Callable:
        def hook(grad: Tensor) -> None:
            self._grad[name].append(torch.linalg.vector_norm(grad.detach()))

        return hook

    def _weight_hook(self, name: str) -> Callable:
        def hook(grad: Tensor) -> None:
            self._weight_grad[name].append(torch.linalg.vector_norm(grad.detach()))

        return hook

    def history(self) -> dict[str, SignalHistory]:
        """Every record per layer name, as float64 CPU tensors (see :class:`SignalHistory`)."""
        out = {}
        for name, _ in self._layers:
            forward = _stack(self._forward[name]).reshape(-1, 4)
            out[name] = SignalHistory(
                mean=forward[:, 0],
                var=forward[:, 1],
                kurtosis=forward[:, 2],
                q=forward[:, 3],
                grad_norm=_stack(self._grad[name]),
                weight_grad_norm=_stack(self._weight_grad[name]),
            )
        return out

    def report(self, *, signal_ratio: float = 10.0, grad_ratio: float = 10.0) -> SignalReport:
        r"""Average every statistic over the recorded calls and flag unstable layers.

        Layers are ordered as they first ran (never-run layers last, with ``nan`` statistics).
        The rule, after Glorot & Bengio (2010) and Schoenholz et al. (2017), who show signal
        and gradient scales changing geometrically with depth away from criticality:

        - ``"signal collapse"`` / ``"signal explosion"``: the amplitude ratio
          :math:`\sqrt{q^l / q^{\mathrm{first}}}` to the first layer that ran (with
          :math:`q > 0`) is below
          ``1 / signal_ratio`` / above ``signal_ratio``;
        - ``"vanishing gradient"`` / ``"exploding gradient"``: the ratio
          :math:`\lVert\partial L/\partial h^l\rVert / \lVert\partial L/\partial h^{\mathrm{last}}
          \rVert` to the last layer with a recorded gradient (the one nearest the loss) is
          below ``1 / grad_ratio`` / above ``grad_ratio``;
        - ``"non-finite"``: :math:`q^l` or the gradient norm is ``inf`` or ``nan``.

        Args:
            signal_ratio (float): amplitude factor (> 1) beyond which the signal is flagged.
            grad_ratio (float): gradient norm factor (> 1) beyond which it is flagged.

        Returns:
            SignalReport: one :class:`LayerSignal` per layer.
        """
        for value, argument in ((signal_ratio, "signal_ratio"), (grad_ratio, "grad_ratio")):
            if not isinstance(value, (int, float)) or not value > 1:
                raise ValueError(f"SignalMonitor.report: {argument} must be > 1, got {value!r}")
        history = self.history()
        types = dict(self._layers)
        order = self._run_order + [n for n in self.layer_names if n not in self._run_order]
        summary = {
            name: {field: _mean_or_nan(getattr(history[name], field)) for field in _COLUMNS}
            for name in order
        }
        q_first = _first_positive(summary[n]["q"] for n in order)
        grad_last = _first_positive(summary[n]["grad_norm"] for n in reversed(order))
        layers = []
        for name in order:
            stats = summary[name]
            forward_calls = history[name].q.numel()
            backward_calls = history[name].grad_norm.numel()
            flags = []
            if (forward_calls and not math.isfinite(stats["q"])) or (
                backward_calls and not math.isfinite(stats["grad_norm"])
            ):
                flags.append("non-finite")
            flags += _ratio_flag(
                math.sqrt(stats["q"] / q_first),
                signal_ratio,
                "signal collapse",
                "signal explosion",
            )
            flags += _ratio_flag(
                stats["grad_norm"] / grad_last,
                grad_ratio,
                "vanishing gradient",
                "exploding gradient",
            )
            layers.append(
                LayerSignal(
                    name=name,
                    layer_type=type(types[name]).__name__,
                    forward_calls=forward_calls,
                    backward_calls=backward_calls,
                    flags=tuple(flags),
                    **stats,
                )
            )
        return SignalReport(
            layers=layers, signal_ratio=float(signal_ratio), grad_ratio=float(grad_ratio)
        )


@dataclass(frozen=True)
class CorrelationProfile:
    r"""Layer-by-layer overlaps of two inputs' pre-activations (Poole et al. 2016).

    Attributes:
        names (list[str]): the layers, in the order they ran.
        q11 (Tensor[L, B]): :math:`q_{11}^l = \frac1{N_l}\sum_i (h_{1,i}^l)^2` per pair.
        q22 (Tensor[L, B]): the same for the second inputs.
        q12 (Tensor[L, B]): :math:`q_{12}^l = \frac1{N_l}\sum_i h_{1,i}^l h_{2,i}^l`.
        c (Tensor[L, B]): :math:`c^l = q_{12}^l / \sqrt{q_{11}^l q_{22}^l}`.
    """

    names: list[str]
    q11: Tensor
    q22: Tensor
    q12: Tensor
    c: Tensor

    @property
    def c_mean(self) -> Tensor:
        """``Tensor[L]``: :math:`c^l` averaged over the pairs."""
        return self.c.mean(dim=1)

    def to_dict(self) -> dict:
        """Per layer, the pair averages of ``q11``, ``q22``, ``q12`` and ``c`` as floats."""
        return {
            "layers": [
                {
                    "name": name,
                    "q11": float(self.q11[i].mean()),
                    "q22": float(self.q22[i].mean()),
                    "q12": float(self.q12[i].mean()),
                    "c": float(self.c[i].mean()),
                }
                for i, name in enumerate(self.names)
            ]
        }


def correlation_propagation(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor,
    *,
    layers: LayerSelection = None,
    eval_mode: bool = True,
) -> CorrelationProfile:
    r"""Measure how the correlation of two inputs evolves through the layers of ``model``.

    For each pair ``(x1[b], x2[b])`` and each monitored layer with pre-activations
    :math:`h_a^l` (the layer's output flattened per sample, :math:`N_l` units), returns
    :math:`q_{ab}^l = \frac1{N_l}\sum_i h_{a,i}^l h_{b,i}^l` and
    :math:`c^l = q_{12}^l / \sqrt{q_{11}^l q_{22}^l}`, the quantities whose depth evolution
    mean-field theory predicts through the correlation map (Poole et al. 2016, eqs. 3-5).
    Values are per pair; average them (``c_mean``) over pairs of equal input overlap.

    One forward pass of ``torch.cat([x1, x2])`` runs under ``torch.no_grad()``; the model's
    ``training`` flags, buffers (BatchNorm running statistics) and the RNG state are restored
    afterwards, also on error. With ``eval_mode=False`` the model runs in its own mode, so
    dropout draws masks and train-mode BatchNorm normalises ``x1`` and ``x2`` together.

    Args:
        model (nn.Module): the model; its outputs' dim 0 must be the batch.
        x1 (Tensor[B, ...]): first inputs.
        x2 (Tensor[B, ...]): second inputs, same shape.
        layers (None | str | type | Iterable[str | type]): as in :class:`SignalMonitor`.
        eval_mode (bool): measure in eval mode (default) or in the model's current mode.

    Returns:
        CorrelationProfile: float64 CPU tensors ``[L, B]``, layers in the order they ran.

    Example:
        >>> import torch
        >>> from torch_dlt.nn import DeepMLP
        >>> net = DeepMLP(16, width=64, depth=4, out_features=1)
        >>> x = torch.randn(3, 16)
        >>> profile = correlation_propagation(net, x, x)
        >>> profile.c.shape
        torch.Size([5, 3])
        >>> bool((profile.c - 1).abs().max() < 1e-6)
        True
    """
    chosen = _select_layers(model, layers, "correlation_propagation")
    for x, argument in ((x1, "x1"), (x2, "x2")):
        if not isinstance(x, Tensor):
            raise TypeError(
                f"correlation_propagation: {argument} must be a Tensor, got {type(x).__name__}"
            )
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(
                f"correlation_propagation: {argument} must be a non-empty batch [B, ...], "
                f"got shape {tuple(x.shape)}"
            )
    if x1.shape != x2.shape:
        raise ValueError(
            "correlation_propagation: x1 and x2 must have the same shape [B, ...], got "
            f"{tuple(x1.shape)} and {tuple(x2.shape)}"
        )
    outputs: dict[str, Tensor] = {}

    def recorder(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"correlation_propagation: layer {name!r} ({type(module).__name__}) "
                    f"returned {type(output).__name__}; only layers returning one Tensor work"
                )
            if name in outputs:
                raise ValueError(
                    f"correlation_propagation: layer {name!r} ran more than once in one "
                    "forward pass; choose layers that run once with layers="
                )
            outputs[name] = output.detach()

        return hook

    handles: list[RemovableHandle] = []
    try:
        with (
            restored_mode(model, eval_mode=eval_mode, restore_buffers=True),
            forked_rng(model, x1),
            torch.no_grad(),
        ):
            for name, module in chosen:
                handles.append(module.register_forward_hook(recorder(name)))
            model(torch.cat([x1, x2]))
    finally:
        for handle in handles:
            handle.remove()
    if not outputs:
        raise ValueError(
            "correlation_propagation: none of the chosen layers ran during the forward pass: "
            f"{[name for name, _ in chosen]}"
        )
    batch = x1.shape[0]
    overlaps = {"q11": [], "q22": [], "q12": []}
    for name, h in outputs.items():
        if h.dim() == 0 or h.shape[0] != 2 * batch:
            raise ValueError(
                f"correlation_propagation: layer {name!r} returned shape {tuple(h.shape)}, "
                f"expected the batch of {2 * batch} (x1 and x2) in dim 0"
            )
        h = h.to(torch.float64).reshape(2 * batch, -1)
        h1, h2 = h[:batch], h[batch:]
        overlaps["q11"].append((h1 * h1).mean(dim=1))
        overlaps["q22"].append((h2 * h2).mean(dim=1))
        overlaps["q12"].append((h1 * h2).mean(dim=1))
    q11, q22, q12 = (torch.stack(overlaps[k]).cpu() for k in ("q11", "q22", "q12"))
    return CorrelationProfile(
        names=list(outputs), q11=q11, q22=q22, q12=q12, c=q12 / torch.sqrt(q11 * q22)
    )
