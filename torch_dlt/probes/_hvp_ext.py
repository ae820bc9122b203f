"""The ``"ext"`` Hessian backend: sequential models as layer programs for the R-operator ops.

A model is flattened by ``torch.fx`` symbolic tracing into a chain of supported layers and run
by :func:`torch_dlt.ops.sequential_hvp`, which computes H V or the Gauss-Newton G V for a block
of k vectors in one forward and one backward sweep (Pearlmutter 1994; Schraudolph 2002).
"""

from __future__ import annotations

import copy
import functools
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from torch_dlt import ops
from torch_dlt.ops import ActivationKind, LossKind, Opcode, Reduction
from torch_dlt.ops._hvp_reference import program_outputs

__all__ = ["ExtProgram", "UnsupportedModelError", "ext_program"]

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946

# On the CPU a block of k directions is swept in chunks whose R-tensors (k times the largest
# layer output) stay near this size, within a shared cache. LeNet-5 at batch 256 (4.8 MB per
# direction) then sweeps 2 at a time: its block-of-10 products fell from 1.6-1.75x to
# 1.1-1.15x a gradient per vector (benchmarks/hessian.py, product_cost); an MLP's stay whole.
CPU_BLOCK_BYTES = 12 * 2**20


class UnsupportedModelError(ValueError):
    """The model or loss is outside what the ``"ext"`` R-operator engine runs; names the culprit."""


_SUPPORTED = (
    "Linear, Conv2d (zero padding), ReLU, LeakyReLU, Tanh, Sigmoid, GELU, ELU, SELU, CELU, "
    "Softplus, SiLU, Hardtanh/ReLU6, erf, MaxPool2d, AvgPool2d, AdaptiveAvg/MaxPool2d, Flatten, "
    "eval-mode BatchNorm1d/2d, Dropout (eval), Identity, in a chain without branches"
)


@dataclass
class _Record:
    """One layer of the program: its encoding, and where to read its tensors at call time."""

    name: str
    opcode: Opcode
    attrs: list[int]
    tensors: list[tuple[nn.Module, str]] = field(default_factory=list)
    constants: list[float] = field(default_factory=list)


def _pair(value: Any) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * 2


def _activation(name: str, kind: ActivationKind, a: float = 0.0, b: float = 0.0) -> _Record:
    return _Record(name, Opcode.ACTIVATION, [int(kind)], constants=[float(a), float(b)])


def _module_activation(name: str, m: nn.Module) -> _Record | None:
    if isinstance(m, nn.ReLU):
        return _activation(name, ActivationKind.RELU)
    if isinstance(m, nn.LeakyReLU):
        return _activation(name, ActivationKind.LEAKY_RELU, m.negative_slope)
    if isinstance(m, nn.Tanh):
        return _activation(name, ActivationKind.TANH)
    if isinstance(m, nn.Sigmoid):
        return _activation(name, ActivationKind.SIGMOID)
    if isinstance(m, nn.GELU):
        tanh = m.approximate == "tanh"
        return _activation(name, ActivationKind.GELU_TANH if tanh else ActivationKind.GELU)
    if isinstance(m, nn.ELU):
        return _activation(name, ActivationKind.ELU, m.alpha, 1.0)
    if isinstance(m, nn.SELU):
        return _activation(name, ActivationKind.ELU, _SELU_ALPHA, _SELU_SCALE)
    if isinstance(m, nn.CELU):
        return _activation(name, ActivationKind.CELU, m.alpha)
    if isinstance(m, nn.Softplus):
        return _activation(name, ActivationKind.SOFTPLUS, m.beta, m.threshold)
    if isinstance(m, nn.SiLU):
        return _activation(name, ActivationKind.SILU)
    if isinstance(m, nn.Hardtanh):
        return _activation(name, ActivationKind.HARDTANH, m.min_val, m.max_val)
    return None


def _conv_padding(name: str, m: nn.Conv2d) -> list[int]:
    if m.padding_mode != "zeros":
        raise UnsupportedModelError(
            f"ext backend: {name} ({m}) uses padding_mode={m.padding_mode!r}; only 'zeros' is "
            "supported"
        )
    if m.padding == "valid":
        return [0, 0]
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if any(t % 2 for t in total):
            raise UnsupportedModelError(
                f"ext backend: {name} ({m}) has padding='same' with uneven padding on two sides"
            )
        return [t // 2 for t in total]
    return _pair(m.padding)


def _module_record(name: str, m: nn.Module) -> _Record | None:
    """The record of a leaf module; ``None`` for identities (Identity, Dropout)."""
    if isinstance(m, nn.Linear):
        has_bias = m.bias is not None
        tensors = [(m, "weight")] + ([(m, "bias")] if has_bias else [])
        return _Record(name, Opcode.LINEAR, [int(has_bias)], tensors)
    if type(m) is nn.Conv2d:
        has_bias = m.bias is not None
        attrs = [int(has_bias), *_pair(m.stride), *_conv_padding(name, m), *_pair(m.dilation)]
        tensors = [(m, "weight")] + ([(m, "bias")] if has_bias else [])
        return _Record(name, Opcode.CONV2D, attrs + [m.groups], tensors)
    act = _module_activation(name, m)
    if act is not None:
        return act
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise UnsupportedModelError(f"ext backend: {name} ({m}) returns indices")
        stride = m.stride if m.stride is not None else m.kernel_size
        attrs = [*_pair(m.kernel_size), *_pair(stride), *_pair(m.padding), *_pair(m.dilation)]
        return _Record(name, Opcode.MAX_POOL2D, attrs + [int(m.ceil_mode)])
    if isinstance(m, nn.AvgPool2d):
        stride = m.stride if m.stride is not None else m.kernel_size
        attrs = [*_pair(m.kernel_size), *_pair(stride), *_pair(m.padding), int(m.ceil_mode)]
        attrs += [int(m.count_include_pad), int(m.divisor_override or 0)]
        return _Record(name, Opcode.AVG_POOL2D, attrs)
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = m.output_size
        if isinstance(size, (tuple, list)) and any(s is None for s in size):
            raise UnsupportedModelError(
                f"ext backend: {name} ({m}) keeps an input dimension (None in output_size)"
            )
        if isinstance(m, nn.AdaptiveMaxPool2d):
            if m.return_indices:
                raise UnsupportedModelError(f"ext backend: {name} ({m}) returns indices")
            return _Record(name, Opcode.ADAPTIVE_MAX_POOL2D, _pair(size))
        return _Record(name, Opcode.ADAPTIVE_AVG_POOL2D, _pair(size))
    if isinstance(m, nn.Flatten):
        return _flatten(name, m.start_dim, m.end_dim)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if not m.track_running_stats or m.running_mean is None:
            raise UnsupportedModelError(
                f"ext backend: {name} ({m}) has no running statistics, so it always normalises "
                "with batch statistics; only eval-mode BatchNorm with running statistics is "
                "supported"
            )
        affine = m.weight is not None
        tensors = [(m, "running_mean"), (m, "running_var")]
        tensors += [(m, "weight"), (m, "bias")] if affine else []
        return _Record(
            name, Opcode.BATCH_NORM, [int(affine), int(affine)], tensors, constants=[m.eps]
        )
    if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)):
        return None
    raise UnsupportedModelError(
        f"ext backend: layer {name!r} ({type(m).__name__}) is not supported; supported: "
        f"{_SUPPORTED}. Use backend='func' or 'autograd'."
    )


def _flatten(name: str, start: int, end: int) -> _Record:
    if start == 0:
        raise UnsupportedModelError(
            f"ext backend: {name} flattens the batch dimension (start_dim=0); only flattens that "
            "keep dim 0 are supported"
        )
    return _Record(name, Opcode.FLATTEN, [int(start), int(end)])


_FUNCTION_ACTIVATIONS: dict[Any, Callable[[str, tuple, dict], _Record]] = {
    F.relu: lambda n, a, k: _activation(n, ActivationKind.RELU),
    torch.relu: lambda n, a, k: _activation(n, ActivationKind.RELU),
    torch.tanh: lambda n, a, k: _activation(n, ActivationKind.TANH),
    F.tanh: lambda n, a, k: _activation(n, ActivationKind.TANH),
    torch.sigmoid: lambda n, a, k: _activation(n, ActivationKind.SIGMOID),
    F.sigmoid: lambda n, a, k: _activation(n, ActivationKind.SIGMOID),
    F.silu: lambda n, a, k: _activation(n, ActivationKind.SILU),
    torch.erf: lambda n, a, k: _activation(n, ActivationKind.ERF),
    F.selu: lambda n, a, k: _activation(n, ActivationKind.ELU, _SELU_ALPHA, _SELU_SCALE),
    F.gelu: lambda n, a, k: _activation(
        n,
        ActivationKind.GELU_TANH if k.get("approximate", "none") == "tanh" else ActivationKind.GELU,
    ),
    F.leaky_relu: lambda n, a, k: _activation(
        n, ActivationKind.LEAKY_RELU, a[0] if a else k.get("negative_slope", 0.01)
    ),
    F.elu: lambda n, a, k: _activation(
        n, ActivationKind.ELU, a[0] if a else k.get("alpha", 1.0), 1.0
    ),
    F.softplus: lambda n, a, k: _activation(
        n,
        ActivationKind.SOFTPLUS,
        a[0] if a else k.get("beta", 1.0),
        a[1] if len(a) > 1 else k.get("threshold", 20.0),
    ),
}
_METHOD_ACTIVATIONS = {"relu": ActivationKind.RELU, "tanh": ActivationKind.TANH,
                       "sigmoid": ActivationKind.SIGMOID}  # fmt: skip


class _ValueProxy(fx.Proxy):
    """A proxy whose ``len`` is known when the tracer knows its node's value."""

    def __len__(self) -> int:
        value = self.tracer.values.get(self.node)
        if value is None:
            return super().__len__()
        return len(value)


class _LayerTracer(fx.Tracer):
    """fx tracer that, given an example (meta) input, carries each node's meta value.

    With the values, shape checks in ``forward`` (``if x.dim() != 4: raise ...``) and
    ``tuple(x.shape[1:])`` resolve to concrete answers instead of stopping the trace.
    """

    def __init__(self, example: Tensor | None) -> None:
        super().__init__()
        self.example = example
        self.values: dict[fx.Node, Any] = {}
        self._placeholders = 0

    def _value(self, arg: Any) -> Any:
        return fx.node.map_aggregate(
            arg, lambda a: self.values.get(a.node) if isinstance(a, fx.Proxy) else a
        )

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            self._placeholders += 1
            return self.example if self._placeholders == 1 else None
        args, kwargs = self._value(args), self._value(kwargs)
        if kind == "get_attr":
            value = functools.reduce(getattr, target.split("."), self.root)
            return value.to("meta") if isinstance(value, Tensor) else value
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            # forward, not __call__: the tracer has patched Module.__call__ to record calls.
            return (
                copy.deepcopy(self.root.get_submodule(target)).to("meta").forward(*args, **kwargs)
            )
        return None

    def create_proxy(self, kind, target, args, kwargs, *rest, **kw):  # type: ignore[override]
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        if self.example is not None and kind != "output":
            try:
                self.values[proxy.node] = self._evaluate(kind, target, args, kwargs)
            except Exception:  # noqa: BLE001 - a value we cannot compute only blocks branching on it
                self.values[proxy.node] = None
        return proxy

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.values.get(obj.node)
        if value is None or isinstance(value, Tensor):
            return super().to_bool(obj)
        return bool(value)

    def iter(self, obj: fx.Proxy):
        value = self.values.get(obj.node)
        if value is None or isinstance(value, Tensor):
            return super().iter(obj)
        return iter(value)


def _node_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target!r} (node {node.name!r})"


def _is_batch_size(arg: Any, source: fx.Node) -> bool:
    """Whether ``arg`` is ``source.size(0)`` or ``source.shape[0]`` in the graph."""
    if not isinstance(arg, fx.Node) or source is None:
        return False
    if arg.op == "call_method" and arg.target == "size" and arg.args[:2] == (source, 0):
        return True
    if arg.op == "call_function" and arg.target is operator.getitem and arg.args[1] == 0:
        shape = arg.args[0]
        return (
            isinstance(shape, fx.Node)
            and shape.op == "call_function"
            and shape.target is getattr
            and shape.args == (source, "shape")
        )
    return False


def _node_record(node: fx.Node, modules: dict[str, nn.Module], values: dict) -> _Record | None:
    """The record of one node of the data path (``None``: an identity)."""
    name = _node_name(node)
    if node.op == "call_module":
        return _module_record(name, modules[node.target])
    args, kwargs = node.args[1:], node.kwargs
    if node.op == "call_function":
        if node.target in _FUNCTION_ACTIVATIONS:
            if kwargs.get("inplace") or (node.target in (F.relu,) and len(args) > 0 and args[0]):
                raise UnsupportedModelError(f"ext backend: {name} is in-place")
            return _FUNCTION_ACTIVATIONS[node.target](name, args, dict(kwargs))
        if node.target is torch.flatten:
            start = args[0] if args else kwargs.get("start_dim", 0)
            end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
            return _flatten(name, start, end)
        if node.target is F.dropout:
            training = args[1] if len(args) > 1 else kwargs.get("training", True)
            if training:
                raise UnsupportedModelError(
                    f"ext backend: {name} applies dropout in training mode; call model.eval()"
                )
            return None
    if node.op == "call_method":
        if node.target in _METHOD_ACTIVATIONS:
            return _activation(name, _METHOD_ACTIVATIONS[node.target])
        if node.target == "flatten":
            start = args[0] if args else kwargs.get("start_dim", 0)
            end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
            return _flatten(name, start, end)
        if node.target in ("view", "reshape") and not kwargs:
            sizes = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            source = node.args[0]
            out = values.get(node)
            known = out is not None and values.get(source) is not None
            if known and out.dim() == 2 and out.shape[0] == values[source].shape[0]:
                return _flatten(name, 1, -1)
            if len(sizes) == 2 and sizes[1] == -1 and _is_batch_size(sizes[0], source):
                return _flatten(name, 1, -1)
            raise UnsupportedModelError(
                f"ext backend: {name} reshapes to {sizes}; only x.view(x.size(0), -1) style "
                "flattening is supported"
            )
    raise UnsupportedModelError(
        f"ext backend: {name} is not supported; supported: {_SUPPORTED}. "
        "Use backend='func' or 'autograd'."
    )


def _chain(graph: fx.Graph, modules: dict[str, nn.Module], values: dict) -> list[_Record]:
    """Follow the data path from the output back to the input; it must be a single chain."""
    output = next(n for n in graph.nodes if n.op == "output")
    head = output.args[0]
    if not isinstance(head, fx.Node):
        raise UnsupportedModelError(
            f"ext backend: the model returns {type(head).__name__}, not a single tensor"
        )
    # Unsupported modules first: their names say more than the glue around them.
    for n in graph.nodes:
        if n.op == "call_module":
            _module_record(str(n.target), modules[n.target])
    records: list[_Record] = []
    node = head
    while node.op != "placeholder":
        if not node.args or not isinstance(node.args[0], fx.Node):
            raise UnsupportedModelError(
                f"ext backend: {_node_name(node)} does not take the previous layer's output as "
                f"its first positional argument; supported: {_SUPPORTED}"
            )
        tensor_args = [
            a for a in node.all_input_nodes if not (a is not node.args[0] and _shape_only(a))
        ]
        if node.op == "get_attr" or len(tensor_args) != 1 or tensor_args[0] is not node.args[0]:
            raise UnsupportedModelError(
                f"ext backend: {_node_name(node)} combines "
                f"{len(tensor_args)} tensors (a branch, residual connection or parameter used "
                f"outside a layer); only a chain of layers is supported: {_SUPPORTED}"
            )
        record = _node_record(node, modules, values)
        if record is not None:
            records.append(record)
        node = node.args[0]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if node is not placeholders[0]:
        raise UnsupportedModelError(
            f"ext backend: the model's output depends on its input {node.name!r}, not on its "
            "first input"
        )
    records.reverse()
    return records


def _shape_only(node: fx.Node) -> bool:
    """Nodes that read a tensor's shape (``x.size(0)``, ``x.shape[0]``) rather than its values."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim"):
        return True
    return (
        node.op == "call_function"
        and node.target is operator.getitem
        and isinstance(node.args[0], fx.Node)
        and _shape_only(node.args[0])
    )


def _trace(model: nn.Module, example: Tensor | None) -> list[_Record]:
    tracer = _LayerTracer(None if example is None else example.to("meta"))
    graph = tracer.trace(model)
    return _chain(graph, dict(model.named_modules()), tracer.values)


def _loss_encoding(loss_fn: Any) -> tuple[LossKind, Reduction]:
    reduction = "mean"
    target = loss_fn
    if isinstance(loss_fn, functools.partial):
        if loss_fn.args or set(loss_fn.keywords) - {"reduction"}:
            raise UnsupportedModelError(
                f"ext backend: loss_fn {loss_fn!r} fixes arguments other than reduction"
            )
        reduction = loss_fn.keywords.get("reduction", "mean")
        target = loss_fn.func
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
            raise UnsupportedModelError(
                "ext backend: CrossEntropyLoss with class weights or label smoothing is not "
                "supported"
            )
        kind, reduction = LossKind.CROSS_ENTROPY, loss_fn.reduction
    elif isinstance(loss_fn, nn.MSELoss):
        kind, reduction = LossKind.MSE, loss_fn.reduction
    elif target is F.cross_entropy:
        kind = LossKind.CROSS_ENTROPY
    elif target is F.mse_loss:
        kind = LossKind.MSE
    else:
        raise UnsupportedModelError(
            f"ext backend: loss_fn {loss_fn!r} is not supported; supported: nn.CrossEntropyLoss, "
            "nn.MSELoss, F.cross_entropy, F.mse_loss (reduction 'mean' or 'sum')"
        )
    if reduction not in ("mean", "sum"):
        raise UnsupportedModelError(
            f"ext backend: loss reduction {reduction!r} is not supported; use 'mean' or 'sum'"
        )
    return kind, Reduction.MEAN if reduction == "mean" else Reduction.SUM


def _check_leaf_modules(model: nn.Module) -> None:
    """Without a trace, at least every leaf module must be a supported layer."""
    for name, m in model.named_modules():
        if next(m.children(), None) is None and m is not model:
            _module_record(name, m)


class ExtProgram:
    """A model and loss compiled to a layer program for :func:`torch_dlt.ops.sequential_hvp`.

    Built by :func:`ext_program`. The model's tensors are read at each call, so the program
    follows the model's current parameters; it never writes to the model.
    """

    def __init__(self, model: nn.Module, loss_fn: Any, records: list[_Record] | None) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.loss, self.reduction = _loss_encoding(loss_fn)
        self._records = records
        self._by_shape: dict[tuple, list[_Record]] = {}
        self._largest: dict[tuple, int] = {}  # bytes of the largest layer output, per input shape
        trainable = [p for p in model.parameters() if p.requires_grad]
        offsets: dict[int, int] = {}
        offset = 0
        for p in trainable:
            offsets[id(p)] = offset
            offset += p.numel()
        self.num_params = offset
        # Where each module attribute's parameter sits in the flat vectors: by slot, so that a
        # parameter replaced later (``module.weight = nn.Parameter(...)``) keeps its place.
        self._slots: dict[tuple[int, str], int] = {
            (id(m), attr): offsets[id(p)]
            for m in model.modules()
            for attr, p in m.named_parameters(recurse=False)
            if id(p) in offsets
        }

    def records(self, inputs: Tensor | None = None) -> list[_Record]:
        """The layer program (traced with ``inputs``' shape where ``forward`` branches on it)."""
        if self._records is not None:
            return self._records
        if inputs is None:
            raise ValueError(
                "ExtProgram.records: this model is traced per input shape; pass inputs"
            )
        key = tuple(inputs.shape[1:])
        if key not in self._by_shape:
            try:
                self._by_shape[key] = _trace(self.model, inputs)
            except fx.proxy.TraceError as exc:
                raise UnsupportedModelError(
                    f"ext backend: {type(self.model).__name__}.forward branches on tensor values "
                    f"and cannot be flattened into a layer chain ({exc})"
                ) from exc
        return self._by_shape[key]

    def _check_modes(self) -> None:
        for name, m in self.model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                raise UnsupportedModelError(
                    f"ext backend: BatchNorm {name!r} is in training mode (batch statistics); "
                    "the ext backend supports eval-mode BatchNorm only: call model.eval() or use "
                    "backend='func'"
                )
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
                raise UnsupportedModelError(
                    f"ext backend: Dropout {name!r} is in training mode; call model.eval()"
                )

    def _check_batch(self, inputs: Tensor, targets: Tensor, caller: str) -> None:
        if not isinstance(inputs, Tensor) or inputs.dim() < 2:
            raise ValueError(f"ExtProgram.{caller}: inputs must be a Tensor [B, ...]")
        reference = next((p for p in self.model.parameters()), None)
        if reference is not None and (
            inputs.dtype != reference.dtype or inputs.device != reference.device
        ):
            raise ValueError(
                f"ExtProgram.{caller}: inputs ({inputs.dtype}, {inputs.device}) must have the "
                f"model's dtype {reference.dtype} and device {reference.device}"
            )
        if self.loss == LossKind.CROSS_ENTROPY and targets.dtype == torch.int64:
            if targets.dim() != 1 or targets.shape[0] != inputs.shape[0]:
                raise ValueError(
                    f"ExtProgram.{caller}: cross-entropy class indices must be "
                    f"[B={inputs.shape[0]}], got {tuple(targets.shape)}"
                )
            if targets.numel() and int(targets.min()) < 0:
                raise ValueError(
                    f"ExtProgram.{caller}: negative class indices (ignore_index) are not supported"
                )
        self._check_modes()

    def _encode(self, inputs: Tensor) -> tuple[list[_Record], list[int], list[float], list[Tensor]]:
        records = self.records(inputs)
        program: list[int] = []
        constants: list[float] = []
        for record in records:
            program += [int(record.opcode), *record.attrs]
            constants += record.constants
        params = [getattr(m, attr).detach() for record in records for m, attr in record.tensors]
        return records, program, constants, params

    def _chunk(self, inputs: Tensor, params, program, constants, k: int) -> int:
        """Directions per sweep: all of them on a GPU; on the CPU, ``CPU_BLOCK_BYTES`` worth."""
        if inputs.device.type != "cpu":
            return k
        key = (tuple(inputs.shape), inputs.dtype)  # the program is a function of the shape
        if key not in self._largest:
            # The layers' output shapes, from a pass over meta tensors (no data, no arithmetic).
            meta = [p.to("meta") for p in params]
            outputs = program_outputs(inputs.to("meta"), meta, program, constants)
            self._largest[key] = max(o.numel() for o in outputs) * inputs.element_size()
        return max(1, min(k, CPU_BLOCK_BYTES // max(self._largest[key], 1)))

    def primal(self, inputs: Tensor, targets: Tensor, *, ggn: bool = False) -> list[Tensor]:
        """The primal pass (layer outputs, and for H the loss gradients) of one batch.

        Pass it to :meth:`matmat` as ``primal`` for products on the same batch while the
        model's parameters stay the same: each product then skips the forward pass and the
        backward of the gradient.
        """
        self._check_batch(inputs, targets, "primal")
        _, program, constants, params = self._encode(inputs)
        with torch.no_grad():
            return ops.sequential_primal(
                inputs.detach(), targets.detach(), params, program, constants, int(self.loss),
                int(self.reduction), not ggn,
            )  # fmt: skip

    def matmat(
        self,
        inputs: Tensor,
        targets: Tensor,
        V: Tensor,
        *,
        ggn: bool = False,
        primal: list[Tensor] | None = None,
    ) -> Tensor:
        """H V (or G V) of ``loss_fn(model(inputs), targets)`` on this batch.

        Args:
            inputs (Tensor[B, \\*]): the batch, on the model's device and in its dtype.
            targets (Tensor[B] | Tensor[B, C]): class indices / probabilities, or MSE targets.
            V (Tensor[n, k]): k vectors flat over the trainable parameters, in
                ``model.parameters()`` order.
            ggn (bool): the generalised Gauss-Newton G V instead of H V.
            primal (list[Tensor] | None): :meth:`primal` of this batch at the current
                parameters (with the same ``ggn``), or ``None`` to compute it.

        Returns:
            Tensor[n, k]: the products.
        """
        if not isinstance(V, Tensor) or V.dim() != 2 or V.shape[0] != self.num_params:
            shape = tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__
            raise ValueError(
                f"ExtProgram.matmat: V must be a Tensor [n, k] with n = {self.num_params} "
                f"trainable parameters, got {shape}"
            )
        reference = next((p for p in self.model.parameters()), None)
        if reference is not None and (V.dtype != reference.dtype or V.device != reference.device):
            raise ValueError(
                f"ExtProgram.matmat: V ({V.dtype}, {V.device}) must have the model's dtype "
                f"{reference.dtype} and device {reference.device}"
            )
        if primal is None:
            self._check_batch(inputs, targets, "matmat")
        records, program, constants, params = self._encode(inputs)
        k = V.shape[1]
        directions: list[Tensor | None] = []
        refs = [ref for record in records for ref in record.tensors]
        offsets = [self._slots.get((id(module), attr)) for module, attr in refs]
        for (module, attr), offset in zip(refs, offsets):
            t = getattr(module, attr)
            if offset is None:
                directions.append(None)
            else:
                directions.append(V[offset : offset + t.numel()].t().reshape(k, *t.shape))
        if all(d is None for d in directions):
            return torch.zeros(self.num_params, k, dtype=V.dtype, device=V.device)
        chunk = self._chunk(inputs, params, program, constants, k)
        with torch.no_grad():
            parts = [
                ops.sequential_hvp(
                    inputs.detach(), targets.detach(), params,
                    [None if d is None else d[i : i + chunk] for d in directions], program,
                    constants, int(self.loss), int(self.reduction), ggn, primal=primal,
                )
                for i in range(0, k, chunk)
            ]  # fmt: skip
        blocks = parts[0] if len(parts) == 1 else [torch.cat(b) for b in zip(*parts)]
        # Laid out as [k, n] (each product contiguous), returned as its [n, k] view; a tensor
        # the program uses twice gets the sum of its blocks.
        out = torch.zeros(k, self.num_params, dtype=V.dtype, device=V.device)
        for offset, block in zip(offsets, blocks):
            if offset is not None:
                out[:, offset : offset + block[0].numel()] += block.reshape(k, -1)
        return out.t()

    def __repr__(self) -> str:
        layers = "?" if self._records is None else ", ".join(r.name for r in self._records)
        return f"ExtProgram(layers=[{layers}], loss={self.loss.name}, n={self.num_params})"


def ext_program(
    model: nn.Module, loss_fn: Any, *, example_inputs: Tensor | None = None
) -> ExtProgram:
    """Compile ``model`` and ``loss_fn`` for the R-operator engine, or say why not.

    The model is traced with ``torch.fx`` into a chain of supported layers. A ``forward`` that
    checks its input's shape (``torch_dlt.nn.LeNet5``) is traced with ``example_inputs``' shape
    when given, otherwise at the first :meth:`ExtProgram.matmat` for each input shape (only its
    leaf modules are checked here then).

    Args:
        model (nn.Module): the network; eval-mode requirements are checked at each call.
        loss_fn: ``nn.CrossEntropyLoss`` / ``nn.MSELoss`` (mean or sum) or ``F.cross_entropy`` /
            ``F.mse_loss`` (or a ``functools.partial`` of them fixing ``reduction``).
        example_inputs (Tensor[B, \\*] | None): a batch whose shape the trace may use.

    Returns:
        ExtProgram: call ``.matmat(inputs, targets, V, ggn=...)``.

    Raises:
        UnsupportedModelError: naming the unsupported layer, function or loss.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> prog = ext_program(net, nn.CrossEntropyLoss())
        >>> V = torch.eye(prog.num_params, 2, dtype=torch.float64)
        >>> prog.matmat(torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]),
        ...             V).shape
        torch.Size([26, 2])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ext_program: model must be an nn.Module, got {type(model).__name__}")
    _loss_encoding(loss_fn)
    try:
        records = _trace(model, example_inputs)
    except fx.proxy.TraceError:
        if example_inputs is not None:
            raise UnsupportedModelError(
                f"ext backend: {type(model).__name__}.forward has control flow on tensor values "
                "and cannot be flattened into a layer chain"
            ) from None
        _check_leaf_modules(model)
        records = None
    return ExtProgram(model, loss_fn, records)
