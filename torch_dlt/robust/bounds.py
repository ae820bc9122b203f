"""Certified output bounds of ReLU networks over an input box: IBP, CROWN, CROWN-IBP, alpha-CROWN.

Interval bound propagation (Gowal et al. 2018), the backward linear relaxation CROWN (Zhang et
al. 2018) with the Wong & Kolter (2018) dual bound as its fixed-slope special case, CROWN-IBP
(Zhang et al. 2020) and alpha-CROWN (Xu et al. 2021).

Models are traced with torch.fx and may be built from ``Linear``, ``Conv2d`` (any stride,
numeric padding, dilation, groups), ``ReLU`` (module or ``torch.relu`` / ``F.relu``),
``Flatten`` / ``torch.flatten``, eval-mode ``BatchNorm1d`` / ``BatchNorm2d``, ``AvgPool2d``,
``Identity``, :class:`Normalize`, the sum of two traced branches (``x + block(x)``, as in
:class:`Residual`) and nested containers; anything else raises a ``TypeError`` naming the layer.
A (Distributed)DataParallel wrapper is unwrapped. The backward pass of a unit of a
convolutional feature map keeps only its receptive-field window ("patches"); specifications
over dense layers are batched matrices, kept channels-last on convolutional maps, pushed back by
transposed convolutions. Only the side of the final bound asked for is pushed back.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from torch_dlt import ops as _ops

__all__ = [
    "Normalize",
    "Residual",
    "crown_bounds",
    "interval_bounds",
    "margin_matrix",
]

METHODS = ("crown", "crown-ibp", "wong-kolter", "alpha-crown")

# Largest number of floats one chunk of identity-specification rows may occupy in an A-matrix.
_CHUNK_FLOATS = 1 << 24


class Normalize(nn.Module):
    """Input normalisation ``(x - mean) / std`` along the channel dimension (dim 1).

    A layer that bounds can see through, so that the perturbation box is stated in the data's
    own units (pixels in [0, 1]) while the network sees normalised inputs.

    Args:
        mean (float | Sequence[float] | Tensor[C]): per-channel mean (or one for all channels).
        std (float | Sequence[float] | Tensor[C]): per-channel standard deviation, non-zero.

    Example:
        >>> norm = Normalize([0.5, 0.25], [0.5, 2.0])
        >>> norm(torch.ones(1, 2, 1, 1)).flatten().tolist()
        [1.0, 0.375]
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self, mean: float | Sequence[float] | Tensor, std: float | Sequence[float] | Tensor
    ):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.get_default_dtype()).flatten()
        std_t = torch.as_tensor(std, dtype=torch.get_default_dtype()).flatten()
        if mean_t.numel() != std_t.numel() and 1 not in (mean_t.numel(), std_t.numel()):
            raise ValueError(
                f"Normalize: mean has {mean_t.numel()} entries and std {std_t.numel()}; "
                "give one per channel (or a single value) for each"
            )
        if not bool((std_t != 0).all()):
            raise ValueError(f"Normalize: std must be non-zero, got {std_t.tolist()}")
        size = max(mean_t.numel(), std_t.numel())
        self.register_buffer("mean", mean_t.expand(size).clone())
        self.register_buffer("std", std_t.expand(size).clone())

    def _channel_view(self, t: Tensor, x: Tensor) -> Tensor:
        return t.view(-1, *([1] * (x.dim() - 2))) if x.dim() > 1 else t

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x (Tensor[B, C, ...])`` channel-wise."""
        return (x - self._channel_view(self.mean, x)) / self._channel_view(self.std, x)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


class Residual(nn.Module):
    """Residual block ``block(x) + x``, or ``block(x) + projection(x)`` (He et al. 2016).

    Any module whose ``forward`` adds two traced branches is supported by the bounds; this class
    is the documented form.

    Args:
        block (nn.Module): the residual branch.
        projection (nn.Module | None): the shortcut branch (e.g. a strided 1x1 ``Conv2d``);
            ``None`` for the identity shortcut.

    Example:
        >>> block = Residual(nn.Linear(3, 3))
        >>> block(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(self, block: nn.Module, projection: nn.Module | None = None):
        super().__init__()
        self.block = block
        self.projection = projection

    def forward(self, x: Tensor) -> Tensor:
        """``block(x) + shortcut(x)`` for ``x (Tensor[B, ...])``."""
        shortcut = x if self.projection is None else self.projection(x)
        return self.block(x) + shortcut


def margin_matrix(y: Tensor, num_classes: int) -> Tensor:
    """Specification matrix of the margins ``logit_y - logit_j`` for every ``j != y``.

    Args:
        y (Tensor[B]): integer labels in ``[0, num_classes)``.
        num_classes (int): number of classes K >= 2.

    Returns:
        Tensor[B, K-1, K]: row ``r`` is ``e_y - e_j`` for the ``r``-th class ``j != y``; a lower
        bound > 0 on every row of ``C @ logits`` certifies the label (Wong & Kolter 2018).

    Example:
        >>> margin_matrix(torch.tensor([1]), 3)
        tensor([[[-1.,  1.,  0.],
                 [ 0.,  1., -1.]]])
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"margin_matrix: num_classes must be an int >= 2, got {num_classes!r}")
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(
            f"margin_matrix: y must be a 1-d integer tensor of labels, got {tuple(y.shape)} "
            f"of {y.dtype}"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"margin_matrix: labels must lie in [0, {num_classes}), got {y.tolist()}")
    eye = torch.eye(num_classes, device=y.device)
    spec = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # [B, K, K]: row j is e_y - e_j
    keep = ~F.one_hot(y, num_classes).bool()
    return spec[keep].view(y.numel(), num_classes - 1, num_classes)


# ------------------------------------------------------------------------------------------------
# The traced graph: one node per supported operation, in topological order.


@dataclass
class _Node:
    name: str
    kind: str  # input | linear | conv | channel_affine | avgpool | flatten | relu | add | identity
    inputs: tuple[int, ...] = ()
    module: nn.Module | None = None
    start_dim: int = 1
    shape: tuple[int, ...] = ()  # per-example output shape, filled by each forward pass
    exclusive_input: bool = False  # this node is the only reader of its input's box
    exact_interval: bool = False  # an affine map of the input with one mixing layer at most


@dataclass
class _Graph:
    nodes: list[_Node]
    output: int
    signature: tuple[int, ...]
    relus: list[int] = field(default_factory=list)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Normalize) or super().is_leaf_module(m, qualname)


_LEAF_KINDS: tuple[tuple[type, str], ...] = (
    (nn.Linear, "linear"),
    (nn.Conv2d, "conv"),
    (nn.BatchNorm1d, "channel_affine"),
    (nn.BatchNorm2d, "channel_affine"),
    (Normalize, "channel_affine"),
    (nn.AvgPool2d, "avgpool"),
    (nn.Flatten, "flatten"),
    (nn.ReLU, "relu"),
    (nn.Identity, "identity"),
)
_SUPPORTED = (
    "Linear, Conv2d, ReLU, Flatten, BatchNorm1d/2d (eval mode), AvgPool2d, Identity, "
    "torch_dlt.robust.bounds.Normalize, additions of two branches (Residual), nested Sequentials"
)
_RELU_FUNCTIONS = (torch.relu, F.relu)
_ADD_FUNCTIONS = (operator.add, torch.add)

_GRAPHS: weakref.WeakKeyDictionary[nn.Module, _Graph] = weakref.WeakKeyDictionary()


def _unwrap(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _unsupported(what: str) -> TypeError:
    return TypeError(f"bounds: unsupported layer {what}; supported: {_SUPPORTED}")


def _check_leaf(module: nn.Module, name: str) -> None:
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise _unsupported(f"'{name}' (Conv2d with padding_mode={module.padding_mode!r})")
        if isinstance(module.padding, str) and module.padding != "valid":
            raise _unsupported(f"'{name}' (Conv2d with padding='same'; give it as numbers)")
    if isinstance(module, nn.AvgPool2d):
        padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
        if (
            module.ceil_mode
            or module.divisor_override is not None
            or (any(padding) and not module.count_include_pad)
        ):
            raise _unsupported(
                f"'{name}' (AvgPool2d with ceil_mode, divisor_override or count_include_pad=False)"
            )
    if isinstance(module, nn.Flatten) and (module.start_dim == 0 or module.end_dim != -1):
        raise _unsupported(
            f"'{name}' (Flatten(start_dim={module.start_dim}, end_dim={module.end_dim}); "
            "it must keep the batch dimension and flatten to the end)"
        )
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.running_mean is None:
        raise _unsupported(f"'{name}' (BatchNorm without running statistics)")


def _trace(model: nn.Module) -> _Graph:
    signature = tuple(id(m) for m in model.modules())
    cached = _GRAPHS.get(model)
    if cached is not None and cached.signature == signature:
        return cached
    leaf = next((kind for cls, kind in _LEAF_KINDS if isinstance(model, cls)), None)
    if leaf is not None:
        _check_leaf(model, type(model).__name__)
        nodes = [_Node("input", "input"), _Node(type(model).__name__, leaf, (0,), model)]
        if isinstance(model, nn.Flatten):
            nodes[1].start_dim = model.start_dim
        graph = _Graph(nodes, 1, signature)
    else:
        graph = _graph_from_fx(model, signature)
    graph.relus = [i for i, n in enumerate(graph.nodes) if n.kind == "relu"]
    readers = [0] * len(graph.nodes)
    for node in graph.nodes:
        for source in node.inputs:
            readers[source] += 1
    mixing = []  # mixing (non-diagonal) affine layers between the input and each node
    for node in graph.nodes:
        before = mixing[node.inputs[0]] if node.inputs else 0
        if node.kind in ("relu", "add"):
            mixing.append(2)
        else:
            mixing.append(before + (node.kind in ("linear", "conv", "avgpool")))
        # |W D| = |W| |D| for a diagonal D: with one mixing layer the interval is the exact range
        node.exact_interval = mixing[-1] <= 1
    for node in graph.nodes:
        node.exclusive_input = (
            len(node.inputs) == 1
            and readers[node.inputs[0]] == 1
            and graph.nodes[node.inputs[0]].kind not in ("input", "flatten", "identity")
        )
    _GRAPHS[model] = graph
    return graph


def _graph_from_fx(model: nn.Module, signature: tuple[int, ...]) -> _Graph:
    try:
        fx_graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure gets the same explanation
        raise TypeError(
            f"bounds: cannot trace {type(model).__name__} with torch.fx ({err}); the model's "
            f"forward must be a fixed composition of {_SUPPORTED}"
        ) from err
    modules = dict(model.named_modules())
    index: dict[fx.Node, int] = {}
    nodes: list[_Node] = []
    output = -1

    def arg_index(arg: object, where: str) -> int:
        if not isinstance(arg, fx.Node) or arg not in index:
            raise _unsupported(f"{where} (an argument that is not a traced tensor: {arg!r})")
        return index[arg]

    for n in fx_graph.nodes:
        if n.op == "placeholder":
            if nodes:
                raise TypeError(f"bounds: the model must take one input tensor, found {n.name!r}")
            nodes.append(_Node("input", "input"))
        elif n.op == "call_module":
            module = modules[n.target]
            kind = next((k for cls, k in _LEAF_KINDS if isinstance(module, cls)), None)
            if kind is None:
                raise _unsupported(f"'{n.target}' ({type(module).__name__})")
            _check_leaf(module, n.target)
            node = _Node(n.target, kind, (arg_index(n.args[0], n.target),), module)
            if isinstance(module, nn.Flatten):
                node.start_dim = module.start_dim
            nodes.append(node)
        elif n.op in ("call_function", "call_method"):
            target = n.target
            label = f"'{n.name}' ({target if isinstance(target, str) else target.__name__})"
            if target in _RELU_FUNCTIONS or target == "relu":
                if n.kwargs.get("inplace") or len(n.args) > 1 and n.args[1]:
                    raise _unsupported(f"{label} with inplace=True")
                nodes.append(_Node(n.name, "relu", (arg_index(n.args[0], label),)))
            elif target in _ADD_FUNCTIONS or target == "add":
                if len(n.args) != 2 or n.kwargs:
                    raise _unsupported(f"{label} with arguments {n.args}, {dict(n.kwargs)}")
                pair = (arg_index(n.args[0], label), arg_index(n.args[1], label))
                nodes.append(_Node(n.name, "add", pair))
            elif target is torch.flatten or target == "flatten":
                start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
                end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
                if start == 0 or end != -1:
                    raise _unsupported(f"{label} with start_dim={start}, end_dim={end}")
                node = _Node(n.name, "flatten", (arg_index(n.args[0], label),), start_dim=start)
                nodes.append(node)
            else:
                raise _unsupported(label)
        elif n.op == "output":
            output = arg_index(n.args[0], "the model's output")
        else:
            raise _unsupported(f"'{n.name}' ({n.op} {n.target})")
        index[n] = len(nodes) - 1
    return _Graph(nodes, output, signature)


def _check_modes(graph: _Graph) -> None:
    for node in graph.nodes:
        if isinstance(node.module, (nn.BatchNorm1d, nn.BatchNorm2d)) and node.module.training:
            raise ValueError(
                f"bounds: BatchNorm layer '{node.name}' is in training mode; the bounds use its "
                "running statistics, call model.eval() first"
            )


# ------------------------------------------------------------------------------------------------
# Per-layer pieces shared by the forward (interval) and backward (linear relaxation) passes.


def _channel_affine(node: _Node) -> tuple[Tensor, Tensor]:
    """(scale, shift) of a per-channel affine map, each [C] viewed for broadcasting."""
    m = node.module
    if isinstance(m, Normalize):
        scale, shift = 1.0 / m.std, -m.mean / m.std
        channels = node.shape[0] if len(node.shape) else 1
        scale, shift = scale.expand(channels), shift.expand(channels)
    else:
        scale = m.running_var.add(m.eps).rsqrt()
        if m.weight is not None:
            scale = scale * m.weight
        shift = -m.running_mean * scale
        if m.bias is not None:
            shift = shift + m.bias
    view = (-1,) + (1,) * (len(node.shape) - 1)
    return scale.view(view), shift.view(view)


def _avgpool_weight(node: _Node, channels: int, like: Tensor) -> tuple[Tensor, tuple, tuple]:
    m = node.module
    k = nn.modules.utils._pair(m.kernel_size)
    stride = nn.modules.utils._pair(m.stride if m.stride is not None else m.kernel_size)
    weight = like.new_full((channels, 1, *k), 1.0 / (k[0] * k[1]))
    return weight, stride, nn.modules.utils._pair(m.padding)


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    return (0, 0) if m.padding == "valid" else tuple(m.padding)


def _interval_step(node: _Node, c: Tensor, r: Tensor, k: float) -> tuple[Tensor, Tensor, float]:
    """The node's output box ``(c', r', k')`` from its input box (Gowal et al. 2018).

    A box is stored as centre ``k c`` and radius ``k r``: a ReLU returns ``u + l`` and ``u - l``
    with ``k`` halved, and the next affine layer folds ``k`` into its (small) weight, which
    saves two passes over the activations per layer.
    """
    m = node.module
    if node.kind == "linear":
        weight = m.weight if k == 1 else k * m.weight
        return F.linear(c, weight, m.bias), F.linear(r, weight.abs()), 1.0
    if node.kind == "conv":
        args = (m.stride, _conv_padding(m), m.dilation, m.groups)
        weight = m.weight if k == 1 else k * m.weight
        return F.conv2d(c, weight, m.bias, *args), F.conv2d(r, weight.abs(), None, *args), 1.0
    if node.kind == "channel_affine":
        scale, shift = _channel_affine(node)
        return c * (k * scale) + shift, r * (k * scale.abs()), 1.0
    if node.kind == "avgpool":
        return m(c), m(r), k
    if node.kind == "flatten":
        return c.flatten(node.start_dim), r.flatten(node.start_dim), k
    if node.kind == "relu":
        # In place where nothing else reads the input box, and where autograd does not need
        # the ReLU's result: each fresh activation-sized tensor costs a pass of page faults.
        if node.exclusive_input and not torch.is_grad_enabled():
            return (*_ops.ibp_relu_(c, r), k / 2)
        upper = (c + r).relu_()
        lower = (c.sub_(r) if node.exclusive_input else c - r).relu_()
        if torch.is_grad_enabled():
            return upper + lower, upper - lower, k / 2
        return upper + lower, upper.sub_(lower), k / 2
    return c, r, k  # identity


def _forward_intervals(
    graph: _Graph,
    c0: Tensor,
    r0: Tensor,
    refine: Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """Interval (centre, radius) of the graph's output; records each node's per-example shape.

    ``refine(relu, c, r)`` may replace a ReLU's input box by a tighter one before it is used.
    """
    boxes: list[tuple[Tensor, Tensor, float]] = []
    for index, node in enumerate(graph.nodes):
        if node.kind == "input":
            box = (c0, r0, 1.0)
        elif node.kind == "add":
            (ca, ra, ka), (cb, rb, kb) = boxes[node.inputs[0]], boxes[node.inputs[1]]
            if ka == kb:
                box = (ca + cb, ra + rb, ka)
            else:
                box = (ka * ca + kb * cb, ka * ra + kb * rb, 1.0)
        else:
            c, r, k = boxes[node.inputs[0]]
            node.shape = tuple(c.shape[1:])
            if node.kind == "relu" and refine is not None:
                c, r = refine(index, k * c, k * r) if k != 1 else refine(index, c, r)
                k = 1.0
            box = _interval_step(node, c, r, k)
        node.shape = tuple(box[0].shape[1:])
        boxes.append(box)
    c, r, k = boxes[graph.output]
    return (k * c, k * r) if k != 1 else (c, r)


# ------------------------------------------------------------------------------------------------
# Backward linear relaxation: A-matrices [B or 1, m, *node shape] pushed from a node to the input.


@dataclass
class _Relaxation:
    """ReLU relaxations: lower line ``slope_l * z``, upper line ``slope_u * z + icpt_u``."""

    lower: dict[int, Tensor]  # pre-activation bounds by relu node index
    upper: dict[int, Tensor]
    rule: str  # crown | wong-kolter
    alpha: dict[int, Tensor] = field(default_factory=dict)  # relu index -> [B, m, *shape]
    _lines: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = field(default_factory=dict)

    def examples(self, block: slice) -> _Relaxation:
        """The relaxation of the examples ``block`` (lines, and alpha-CROWN's slopes)."""
        part = _Relaxation(
            {k: v[block] for k, v in self.lower.items()},
            {k: v[block] for k, v in self.upper.items()},
            self.rule,
            {k: v[block] for k, v in self.alpha.items()},
        )
        for relu, lines in self._lines.items():
            part._lines[relu] = tuple(t[block] for t in lines)
        return part

    def lines(self, relu: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if relu not in self._lines:
            self._lines[relu] = self._compute_lines(relu)
        return self._lines[relu]

    def _compute_lines(self, relu: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        lower, upper = self.lower[relu], self.upper[relu]
        # The compiled kernel lays maps out channels-last, the A-matrices' order, for free.
        channels_last = _ops.has_bounds_ops(lower) and lower.dim() == 4 and lower.shape[1] > 1
        slope_l, slope_u, icpt_u, unstable = _ops.crown_lines(lower, upper, channels_last)
        if self.rule == "wong-kolter":
            slope_l = slope_u
        return slope_l, slope_u, icpt_u, unstable


def _is_channels_last(A: Tensor) -> bool:
    """Whether A [B or 1, m, C, H, W] is laid out channels-last (see ``_affine_backward``)."""
    return A.dim() == 5 and A.shape[2] > 1 and A.stride(2) == 1


@dataclass
class _ReluOperands:
    """A ReLU step's operands in A's memory order: ``A_flat [B, m, K]``, lines ``[B or 1, K]``."""

    A: Tensor  # expanded to the batch
    A_flat: Tensor
    slope_l: Tensor
    slope_u: Tensor
    v_neg: Tensor
    v_all: Tensor | None
    channels_last: bool


def _relu_operands(A: Tensor, relax: _Relaxation, relu: int, shift: Tensor | None) -> _ReluOperands:
    slope_l, slope_u, icpt_u, _ = relax.lines(relu)
    channels_last = _is_channels_last(A)
    batch = slope_l.shape[0]
    lead = (max(A.shape[0], batch), A.shape[1])
    A = A.expand(*lead, *A.shape[2:])
    same = slope_l is slope_u

    def flat(t: Tensor) -> Tensor:
        # A-matrices on maps are kept channels-last: the lines go to the same memory order
        return (t.permute(0, 2, 3, 1) if channels_last else t).reshape(t.shape[0], -1)

    slope_u_flat = flat(slope_u)
    slope_l_flat = slope_u_flat if same else flat(slope_l)
    v_neg, v_all = flat(icpt_u), None
    if shift is not None:
        # A_in . shift = A . (slope_l shift) + A- . ((slope_u - slope_l) shift)
        shift = flat(shift.unsqueeze(0))
        v_all = slope_l_flat * shift
        if not same:
            v_neg = v_neg + (slope_u_flat - slope_l_flat) * shift
    A_flat = (A.permute(0, 1, 3, 4, 2) if channels_last else A).reshape(*lead, -1)
    return _ReluOperands(A, A_flat, slope_l_flat, slope_u_flat, v_neg, v_all, channels_last)


def _relu_backward(
    A: Tensor, relax: _Relaxation, relu: int, shift: Tensor | None = None, owned: bool = False
) -> tuple[Tensor, Tensor]:
    """A-matrix on the ReLU's input and the bias term [B or 1, m].

    ``shift`` (Tensor[*input shape] | None): a bias on the ReLU's input that the layer below
    adds; its term ``A_in . shift`` is then part of the returned bias. ``owned``: nothing else
    reads A, so without autograd A_in may overwrite it (a fresh A-sized tensor is a pass of
    page faults).
    """
    if relu in relax.alpha:
        A_in, bias = _relu_backward_alpha(A, relax, relu, _is_channels_last(A))
        if shift is not None:
            bias = bias + (A_in * shift).flatten(2).sum(-1)
        return A_in, bias
    batch = relax.lines(relu)[0].shape[0]
    owned = owned and A.shape[0] == batch and not torch.is_grad_enabled()
    operands = _relu_operands(A, relax, relu, shift)
    A, A_flat, v_neg, v_all = operands.A, operands.A_flat, operands.v_neg, operands.v_all
    lead = A.shape[:2]
    if owned:
        A_in = A_flat
        bias = _ops.relu_lines_(A_flat, operands.slope_l, operands.slope_u, v_neg, v_all)
    else:
        A_in, bias = _ops.relu_lines(A_flat, operands.slope_l, operands.slope_u, v_neg, v_all)
    if operands.channels_last:
        shape = A.shape
        return A_in.view(*lead, shape[3], shape[4], shape[2]).permute(0, 1, 4, 2, 3), bias
    return A_in.view(A.shape), bias


def _relu_onto_input_conv(
    graph: _Graph, relu: int, A: Tensor, relax: _Relaxation, c0: Tensor, r0: Tensor
) -> Tensor | None:
    """The rest of the backward pass from a ReLU on a strided input convolution, fused: the
    ReLU step, the convolution by its stride phases and the box's minimum in one compiled pass
    (``torch_dlt.operands.relu_phase_lower``). None where that does not apply."""
    node = graph.nodes[relu]
    conv = graph.nodes[node.inputs[0]]
    if (
        relu in relax.alpha
        or not node.exclusive_input
        or not _is_channels_last(A)
        or not _ops.has_bounds_ops(A)
    ):
        return None
    operands = _relu_operands(A, relax, relu, _layer_bias(graph, node.inputs[0]))
    m = conv.module
    taps = _phase_taps(m.weight, m.stride)
    h, w = operands.A.shape[3], operands.A.shape[4]
    c, r = _box_frames(m, c0, r0, h + taps.shape[2] - 1, w + taps.shape[3] - 1)
    return _ops.relu_phase_lower(
        operands.A_flat,
        operands.slope_l,
        operands.slope_u,
        operands.v_neg,
        operands.v_all,
        taps,
        c,
        r,
        h,
        w,
    )


def _relu_backward_alpha(
    A: Tensor, relax: _Relaxation, relu: int, channels_last: bool
) -> tuple[Tensor, Tensor]:
    """The ReLU step with alpha-CROWN's slopes, one per specification row and unit."""
    slope_l, slope_u, icpt_u, unstable = relax.lines(relu)
    if channels_last:
        # The relaxation's lines in A's own layout keep every elementwise pass contiguous.
        layout = torch.channels_last
        slope_l, slope_u = (
            slope_l.contiguous(memory_format=layout),
            slope_u.contiguous(memory_format=layout),
        )
        icpt_u = icpt_u.permute(0, 2, 3, 1)
    slope_l = torch.where(unstable.unsqueeze(1), relax.alpha[relu], slope_l.unsqueeze(1))
    # Positive coefficients take the lower line, negative ones the upper line.
    A_neg = A.clamp(max=0)
    # In place on a fresh product (autograd keeps the product's inputs, not its result): one
    # activation-sized allocation, and its page faults, fewer.
    A_in = (A * slope_l).addcmul_(A_neg, slope_u.unsqueeze(1) - slope_l)
    if channels_last:
        A_neg = A_neg.permute(0, 1, 3, 4, 2)  # a view: the memory order of A
    icpt = icpt_u.reshape(icpt_u.shape[0], -1)
    if A.shape[0] == 1:
        return A_in, icpt.matmul(A_neg[0].reshape(A.shape[1], -1).T)
    return A_in, torch.bmm(A_neg.reshape(*A.shape[:2], -1), icpt.unsqueeze(-1)).squeeze(-1)


def _affine_backward(
    node: _Node, A: Tensor, in_shape: tuple[int, ...], with_bias: bool = True
) -> tuple[Tensor, Tensor]:
    """A-matrix on the node's input and the bias term ``A . b`` [B or 1, m] (zero without
    ``with_bias``: a Linear's or Conv2d's bias is then accounted for by the ReLU above).

    A-matrices on convolutional maps are kept channels-last, the layout in which the CPU's
    transposed convolution is fastest, instead of converting them to and fro at every layer.
    """
    m = node.module
    lead = A.shape[:2]
    if node.kind == "linear":
        bias = A.matmul(m.bias) if m.bias is not None and with_bias else A.new_zeros(lead)
        return A.matmul(m.weight), bias
    if node.kind == "conv":
        A_in = _transposed_conv(
            A.reshape(-1, *node.shape),
            m.weight,
            m.stride,
            _conv_padding(m),
            in_shape[1:],
            m.groups,
            m.dilation,
            channels_last=True,
        ).view(*lead, *in_shape)
        with_bias = m.bias is not None and with_bias
        bias = A.sum((-2, -1)).matmul(m.bias) if with_bias else A.new_zeros(lead)
        return A_in, bias
    if node.kind == "channel_affine":
        scale, shift = _channel_affine(node)
        return A * scale, (A * shift).flatten(2).sum(-1)
    if node.kind == "avgpool":
        weight, stride, pad = _avgpool_weight(node, in_shape[0], A)
        A_in = _transposed_conv(
            A.reshape(-1, *node.shape),
            weight,
            stride,
            pad,
            in_shape[1:],
            in_shape[0],
            (1, 1),
            channels_last=True,
        ).view(*lead, *in_shape)
        return A_in, A.new_zeros(lead)
    if node.kind == "flatten":
        return A.reshape(*lead, *in_shape), A.new_zeros(lead)
    return A, A.new_zeros(lead)  # identity


def _transposed_conv(
    A: Tensor,
    weight: Tensor,
    stride,
    padding,
    out_hw: tuple[int, int],
    groups: int,
    dilation,
    channels_last: bool = False,
) -> Tensor:
    """``conv_transpose2d`` of A [N, C_out, h, w] to [N, C_in, *out_hw], the faster way on CPU.

    With few input channels (C_in k^2 <= C_out) a convolution by the stride's phases (without
    dilation) or one matrix product and ``fold`` beat the transposed convolution about 2x at one
    thread; otherwise channels-last input does, and with ``channels_last`` the result stays in
    that layout.
    """
    c_out, c_in = weight.shape[0], weight.shape[1]
    few_inputs = groups == 1 and c_in * weight.shape[2] * weight.shape[3] <= c_out
    if few_inputs and tuple(dilation) == (1, 1):
        return _transposed_conv_by_phases(A, weight, stride, padding, out_hw)
    if few_inputs:
        cols = torch.bmm(weight.reshape(c_out, -1).T.expand(A.shape[0], -1, -1), A.flatten(2))
        # fold loops over its batch: all samples go in as channels of one
        out = F.fold(
            cols.view(1, -1, cols.shape[-1]), out_hw, weight.shape[-2:], dilation, padding, stride
        )
        return out.view(A.shape[0], c_in, *out_hw)
    out_pad = tuple(
        out_hw[i]
        - (
            (A.shape[2 + i] - 1) * stride[i]
            - 2 * padding[i]
            + dilation[i] * (weight.shape[2 + i] - 1)
            + 1
        )
        for i in range(2)
    )
    out = F.conv_transpose2d(
        A.contiguous(memory_format=torch.channels_last),
        weight,
        None,
        stride,
        padding,
        out_pad,
        groups,
        dilation,
    )
    return out if channels_last else out.contiguous()


def _phase_taps(weight: Tensor, stride) -> Tensor:
    """The kernel [s_h s_w C_in, C_out, t_h, t_w] of a transposed convolution's stride phases.

    Output row ``y`` with ``y + pad = s P + a`` receives ``A[P - t] W[a + s t]``: for each phase
    ``a`` of the stride a correlation of A with a ``t = ceil(k / s)``-tap kernel, so all
    ``s^2`` phases are the output channels of one stride-1 convolution (padding ``t - 1``),
    which reads A in any layout, channels-last included.
    """
    c_out, c_in, kh, kw = weight.shape
    (sh, sw), th, tw = stride, -(-kh // stride[0]), -(-kw // stride[1])
    taps = F.pad(weight, (0, sw * tw - kw, 0, sh * th - kh))
    taps = taps.view(c_out, c_in, th, sh, tw, sw).flip(2, 4).permute(3, 5, 1, 0, 2, 4)
    return taps.reshape(sh * sw * c_in, c_out, th, tw)


def _phases(A: Tensor, weight: Tensor, stride) -> Tensor:
    """The stride phases [N, s_h s_w C_in, rows, cols] of ``conv_transpose2d`` of A, unpadded:
    output row ``y`` is row ``(y + pad) // s_h`` of phase ``(y + pad) % s_h``."""
    taps = _phase_taps(weight, stride)
    return _ops.phase_conv(A, taps)


def _phase_frame(x: Tensor, stride, padding, rows: int, cols: int) -> Tensor:
    """``x`` [B, C, H, W] in the phases' frame [B, rows, cols, s_h, s_w, C], zero elsewhere."""
    (sh, sw), (ph, pw) = stride, padding
    height = max(0, min(x.shape[2], rows * sh - ph))
    width = max(0, min(x.shape[3], cols * sw - pw))
    frame = x.new_zeros(x.shape[0], x.shape[1], rows * sh, cols * sw)
    frame[:, :, ph : ph + height, pw : pw + width] = x[:, :, :height, :width]
    frame = frame.view(x.shape[0], x.shape[1], rows, sh, cols, sw)
    return frame.permute(0, 2, 4, 3, 5, 1)


def _box_frames(
    m: nn.Conv2d, c0: Tensor, r0: Tensor, rows: int, cols: int
) -> tuple[Tensor, Tensor]:
    """The input box's centre and radius in the phases' frame of ``m``, flat [B, rows cols P]."""
    padding = _conv_padding(m)
    frames = (_phase_frame(t, m.stride, padding, rows, cols) for t in (c0, r0))
    return tuple(frame.reshape(c0.shape[0], -1) for frame in frames)


def _transposed_conv_by_phases(
    A: Tensor, weight: Tensor, stride, padding, out_hw: tuple[int, int]
) -> Tensor:
    """``conv_transpose2d`` of A [N, C_out, h, w] as one plain convolution and a pixel shuffle
    (see ``_phase_taps``)."""
    c_in = weight.shape[1]
    (sh, sw), (ph, pw) = stride, padding
    phases = _phases(A, weight, stride)
    n, _, rows, cols = phases.shape
    full = phases.view(n, sh, sw, c_in, rows, cols).permute(0, 3, 4, 1, 5, 2)
    full = full.reshape(n, c_in, rows * sh, cols * sw)
    short = (ph + out_hw[0] - rows * sh, pw + out_hw[1] - cols * sw)
    if max(short) > 0:  # an output padding beyond the last phase row: zeros
        full = F.pad(full, (0, max(short[1], 0), 0, max(short[0], 0)))
    return full[:, :, ph : ph + out_hw[0], pw : pw + out_hw[1]]


def _by_phases(m: nn.Module) -> bool:
    """Whether the transposed convolution of a Conv2d goes by its stride phases."""
    weight = m.weight
    return (
        m.groups == 1
        and tuple(m.dilation) == (1, 1)
        and weight.shape[1] * weight.shape[2] * weight.shape[3] <= weight.shape[0]
    )


class _Concretize(torch.autograd.Function):
    """min over the box of ``A x``: ``A c - |A| r`` [B, m] for A [B, m, n], c and r [B, n].

    The gradient ``g c - g r sign(A)`` is written in A's own layout, where autograd of the
    batched products would hand back the transpose and copy it.
    """

    @staticmethod
    def forward(ctx, A: Tensor, c: Tensor, r: Tensor) -> Tensor:
        ctx.save_for_backward(A, c, r)
        # [B, 1, n] @ [B, n, m]: the vector on the left is the fast orientation of bmm
        centre = torch.bmm(c.unsqueeze(1), A.transpose(1, 2))
        return centre.sub_(torch.bmm(r.unsqueeze(1), A.abs().transpose(1, 2))).squeeze(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        A, c, r = ctx.saved_tensors
        grad_A = grad_c = grad_r = None
        if ctx.needs_input_grad[0]:
            grad_A = torch.mul(grad.unsqueeze(-1), r.unsqueeze(1)).mul_(A.sign()).neg_()
            grad_A.addcmul_(grad.unsqueeze(-1), c.unsqueeze(1))
        if ctx.needs_input_grad[1]:
            grad_c = torch.bmm(grad.unsqueeze(1), A).squeeze(1)
        if ctx.needs_input_grad[2]:
            grad_r = torch.bmm(grad.unsqueeze(1), A.abs()).squeeze(1).neg_()
        return grad_A, grad_c, grad_r


def _concretize(A: Tensor, c0: Tensor, r0: Tensor) -> Tensor:
    """min over the box of ``A x``: ``A c - |A| r`` [B, m]."""
    A = A.reshape(*A.shape[:2], -1)
    c, r = c0.flatten(1), r0.flatten(1)
    if A.shape[0] == 1:
        return c.matmul(A[0].T) - r.matmul(A[0].abs().T)
    return _Concretize.apply(A, c, r)


def _concretize_conv(node: _Node, A: Tensor, c0: Tensor, r0: Tensor) -> Tensor:
    """min over the box of ``A . conv(x)`` without the bias, for a Conv2d on the input.

    The transposed convolution's stride phases are concretized where they lie, against the
    box laid out in the same frame: no pixel shuffle of the A-matrix either way.
    """
    m = node.module
    lead = A.shape[:2]
    phases = _phases(A.reshape(-1, *node.shape), m.weight, m.stride)
    rows, cols = phases.shape[-2:]
    A_in = phases.permute(0, 2, 3, 1).reshape(*lead, -1)  # a view when channels-last
    if A_in.shape[0] < c0.shape[0]:
        A_in = A_in.expand(c0.shape[0], -1, -1)
    c, r = _box_frames(m, c0, r0, rows, cols)
    if torch.is_grad_enabled() or A_in.stride(0) == 0:
        return _Concretize.apply(A_in, c, r)
    # without autograd the phases, a fresh tensor, take their magnitude in place
    centre = torch.bmm(c.unsqueeze(1), A_in.transpose(1, 2))
    return centre.sub_(torch.bmm(r.unsqueeze(1), A_in.abs_().transpose(1, 2))).squeeze(1)


# Floats of the widest A-matrix of one block of examples in a backward pass without autograd.
_PASS_FLOATS = 1 << 21


def _backward_lower(
    graph: _Graph, start: int, A: Tensor, c0: Tensor, r0: Tensor, relax: _Relaxation
) -> Tensor:
    """Lower bound [B, m] of ``A . h_start`` over the input box by backward relaxation.

    Without autograd the examples go through in blocks whose A-matrices the allocator recycles
    from block to block (and that stay in cache) instead of page-faulting fresh ones in.
    """
    batch = c0.shape[0]
    widest = A.shape[1] * max(math.prod(graph.nodes[i].shape) for i in range(start + 1))
    step = max(1, _PASS_FLOATS // max(1, widest))
    if torch.is_grad_enabled() or step >= batch:
        return _backward_pass(graph, start, A, c0, r0, relax)
    found = []
    for first in range(0, batch, step):
        block = slice(first, first + step)
        found.append(
            _backward_pass(
                graph,
                start,
                A if A.shape[0] == 1 else A[block],
                c0[block],
                r0[block],
                relax.examples(block),
            )
        )
    return torch.cat(found)


def _backward_pass(
    graph: _Graph, start: int, A: Tensor, c0: Tensor, r0: Tensor, relax: _Relaxation
) -> Tensor:
    """``_backward_lower`` of all examples at once."""
    pending: dict[int, Tensor] = {start: A}
    bias: Tensor | int = 0
    folded: set[int] = set()  # layers whose bias a ReLU above has taken into its own term
    owned: set[int] = set()  # nodes whose pending A-matrix nothing else reads
    for index in range(start, -1, -1):
        A = pending.pop(index, None)
        if A is None:
            continue
        node = graph.nodes[index]
        if node.kind == "input":
            return _concretize(A, c0, r0) + bias
        if node.kind == "add":
            for source in node.inputs:
                if source in pending:
                    pending[source] = pending[source] + A
                    owned.add(source)
                else:
                    pending[source] = A
            continue
        source = node.inputs[0]
        if not pending and _input_conv_by_phases(graph, index):
            with_bias = node.module.bias is not None and index not in folded
            b = A.sum((-2, -1)).matmul(node.module.bias) if with_bias else 0
            return _concretize_conv(node, A, c0, r0) + (bias + b)
        if not pending and node.kind == "relu" and _input_conv_by_phases(graph, source):
            found = _relu_onto_input_conv(graph, index, A, relax, c0, r0)
            if found is not None:
                return found + bias
        if node.kind == "relu":
            shift = _layer_bias(graph, source) if node.exclusive_input else None
            if shift is not None:
                folded.add(source)
            A_in, b = _relu_backward(A, relax, index, shift, index in owned)
        elif node.kind == "linear" and _flattens_map(graph, source):
            # Columns of the weight permuted to (H, W, C): A lands on the map channels-last,
            # and the flatten is passed over (it adds no bias).
            source = graph.nodes[source].inputs[0]
            A_in, b = _linear_onto_map(node, A, graph.nodes[source].shape, index not in folded)
        else:
            A_in, b = _affine_backward(node, A, graph.nodes[source].shape, index not in folded)
        bias = bias + b
        pending[source] = pending[source] + A_in if source in pending else A_in
        if node.kind not in ("identity", "flatten") or index in owned:
            owned.add(source)  # a fresh result, or a view of an owned one
    raise AssertionError("the backward pass never reached the input")  # pragma: no cover


def _input_conv_by_phases(graph: _Graph, index: int) -> bool:
    """Whether node ``index`` is a convolution of the input that CROWN passes by its phases."""
    node = graph.nodes[index]
    return (
        node.kind == "conv"
        and graph.nodes[node.inputs[0]].kind == "input"
        and _by_phases(node.module)
    )


def _layer_bias(graph: _Graph, index: int) -> Tensor | None:
    """The bias of a Linear or Conv2d node as a tensor of its output shape, else None."""
    node = graph.nodes[index]
    if node.kind not in ("linear", "conv") or node.module.bias is None:
        return None
    bias = node.module.bias
    return bias.view(-1, 1, 1).expand(node.shape) if node.kind == "conv" else bias


def _flattens_map(graph: _Graph, index: int) -> bool:
    """Whether node ``index`` flattens a [C, H, W] map with C > 1."""
    node = graph.nodes[index]
    if node.kind != "flatten" or node.start_dim != 1:
        return False
    shape = graph.nodes[node.inputs[0]].shape
    return len(shape) == 3 and shape[0] > 1


def _linear_onto_map(
    node: _Node, A: Tensor, map_shape: tuple[int, ...], with_bias: bool = True
) -> tuple[Tensor, Tensor]:
    """``_affine_backward`` of a Linear through the flatten of ``map_shape`` [C, H, W], with
    the A-matrix on the map [B or 1, m, C, H, W] laid out channels-last."""
    m = node.module
    lead = A.shape[:2]
    channels, height, width = map_shape
    weight = (
        m.weight.view(-1, channels, height, width)
        .permute(0, 2, 3, 1)
        .reshape(m.weight.shape[0], -1)
    )
    A_in = A.matmul(weight).view(*lead, height, width, channels).permute(0, 1, 4, 2, 3)
    bias = A.matmul(m.bias) if m.bias is not None and with_bias else A.new_zeros(lead)
    return A_in, bias


def _unit_bounds(
    graph: _Graph,
    node: int,
    units: Tensor,
    c0: Tensor,
    r0: Tensor,
    relax: _Relaxation,
    needed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """CROWN lower and upper bounds [B, len(units)] of the flat ``units`` of ``node``.

    ``needed`` (Tensor[B, len(units)], bool): the entries each example needs; the others may
    hold any value. Each example then pushes back only the rows of its own needed units (as
    many rows as the example that needs most), not those of every unit any example needs.
    """
    chain = _patch_chain(graph, node)
    if chain is not None:
        return _patch_unit_bounds(graph, chain, units, c0, r0, relax)
    shape = graph.nodes[node].shape
    n = math.prod(shape)
    widest = max(math.prod(graph.nodes[i].shape) for i in range(node + 1))
    chunk = max(1, _CHUNK_FLOATS // max(1, c0.shape[0] * widest * 2))
    if needed is not None:
        counts = needed.sum(1)
        most = int(counts.max()) if counts.numel() else 0
        if most < units.numel():
            return _own_unit_bounds(graph, node, units, needed, most, chunk, c0, r0, relax)
    lowers, uppers = [], []
    for start in range(0, units.numel(), chunk):
        part = units[start : start + chunk]
        rows = F.one_hot(part, n).to(c0.dtype)
        A = torch.cat([rows, -rows]).view(1, -1, *shape)
        both = _backward_lower(graph, node, A, c0, r0, relax)
        lowers.append(both[:, : part.numel()])
        uppers.append(-both[:, part.numel() :])
    return torch.cat(lowers, 1), torch.cat(uppers, 1)


def _own_unit_bounds(
    graph: _Graph,
    node: int,
    units: Tensor,
    needed: Tensor,
    most: int,
    chunk: int,
    c0: Tensor,
    r0: Tensor,
    relax: _Relaxation,
) -> tuple[Tensor, Tensor]:
    """``_unit_bounds`` by per-example rows: example b's first rows are its needed units."""
    batch, shape = c0.shape[0], graph.nodes[node].shape
    n = math.prod(shape)
    # needed columns first, in order: a stable sort of the not-needed flags
    order = torch.sort((~needed).to(torch.uint8), dim=1, stable=True).indices[:, :most]
    valid = torch.arange(most, device=c0.device) < needed.sum(1, keepdim=True)
    lower = c0.new_zeros(batch, units.numel())
    upper = c0.new_zeros(batch, units.numel())
    for start in range(0, most, chunk):
        picked = order[:, start : start + chunk]  # [B, k] columns of units
        rows = F.one_hot(units[picked], n).to(c0.dtype) * valid[:, start : start + chunk, None]
        k = picked.shape[1]
        A = torch.cat([rows, -rows], 1).view(batch, 2 * k, *shape)
        both = _backward_lower(graph, node, A, c0, r0, relax)
        lower = lower.scatter(1, picked, both[:, :k])
        upper = upper.scatter(1, picked, -both[:, k:])
    return lower, upper


# A unit of a convolutional feature map depends on a window of the input only: its A-matrix is
# kept as that window ("patches", as in auto_LiRPA), [B, units, C, kh, kw], instead of the whole
# map [B, units, C, H, W]; the backward pass through a convolution is a transposed convolution
# of the windows without padding, and the window of unit (i, j) starts at (i, j) * stride - pad.
_PATCH_KINDS = ("conv", "avgpool", "channel_affine", "relu", "identity")


def _patch_chain(graph: _Graph, node: int) -> list[int] | None:
    """The nodes from ``node`` back to the input when all are window-local on 2-d maps."""
    chain = []
    while graph.nodes[node].kind != "input":
        current = graph.nodes[node]
        if current.kind not in _PATCH_KINDS or len(current.shape) != 3:
            return None
        chain.append(node)
        node = current.inputs[0]
    return chain if chain and len(graph.nodes[0].shape) == 3 else None


def _layer_window(node: _Node, like: Tensor) -> tuple[Tensor, tuple, tuple, tuple, int] | None:
    """(weight, stride, padding, dilation, groups) of a convolution-like node, else None."""
    if node.kind == "conv":
        m = node.module
        return m.weight, m.stride, _conv_padding(m), m.dilation, m.groups
    if node.kind == "avgpool":
        weight, stride, pad = _avgpool_weight(node, node.shape[0], like)
        return weight, stride, pad, (1, 1), node.shape[0]
    return None


def _windows(maps: Tensor, size, stride, pad, positions: Tensor, cache=None) -> Tensor:
    """The windows of ``maps`` [B, C, H, W] at ``positions``: [B, 1, len, 1, C, kh, kw].

    ``cache`` (dict | None): unfolded maps kept across the chunks of one bound computation.
    """
    key = (id(maps), tuple(size), tuple(stride), tuple(pad))
    if cache is not None and key in cache:
        cols = cache[key][1]
    else:
        # [B, L, C*kh*kw], contiguous: index_select would copy the whole transpose at each call
        cols = F.unfold(maps, size, padding=pad, stride=stride).transpose(1, 2).contiguous()
        if cache is not None:
            cache[key] = (maps, cols)  # the map is kept so that its id is not reused
    picked = cols.index_select(1, positions)
    return picked.reshape(maps.shape[0], 1, -1, 1, maps.shape[1], *size)


def _patch_step(
    node: _Node,
    index: int,
    P: Tensor,
    clean: bool,
    window,
    positions: Tensor,
    relax,
    like,
    cache=None,
) -> tuple[Tensor, Tensor | int, bool]:
    """One node of the windowed backward pass: (P on the node's input, bias term, clean).

    ``clean`` says that P is zero wherever a window leaves the feature map.
    """
    size, stride, pad = window
    bias: Tensor | int = 0
    if node.kind in ("conv", "avgpool", "channel_affine") and not clean:
        ones = torch.ones(1, 1, *node.shape[1:], dtype=like.dtype, device=like.device)
        P = P * _windows(ones, size, stride, pad, positions)
        clean = True
    if node.kind == "relu":
        slope_l, slope_u, icpt_u, _ = relax.lines(index)
        slope_l = _windows(slope_l, size, stride, pad, positions, cache)
        slope_u = _windows(slope_u, size, stride, pad, positions, cache)
        icpt_u = _windows(icpt_u, size, stride, pad, positions, cache)
        A_neg = P.clamp(max=0)
        P = torch.addcmul(P * slope_l, A_neg, slope_u - slope_l)
        bias = (A_neg * icpt_u).sum((-3, -2, -1))
    elif node.kind == "channel_affine":
        scale, shift = _channel_affine(node)
        bias = torch.einsum("bsnocij,c->bsno", P, shift.flatten())
        P = P * scale
    elif node.kind in ("conv", "avgpool"):
        weight, s, _, d, groups = _layer_window(node, like)
        if node.kind == "conv" and node.module.bias is not None:
            bias = P.sum((-2, -1)).matmul(node.module.bias)
        lead = P.shape[:4]
        out_hw = tuple(
            (P.shape[-2 + i] - 1) * s[i] + d[i] * (weight.shape[2 + i] - 1) + 1 for i in range(2)
        )
        P = _transposed_conv(P.reshape(-1, *P.shape[-3:]), weight, s, (0, 0), out_hw, groups, d)
        P = P.view(*lead, *P.shape[-3:])
        clean = False
    return P, bias, clean


def _linear_tail(graph: _Graph, tail: list[int]) -> bool:
    """Whether the nodes below the first ReLU are affine and need no window masks."""
    windowed = False
    for index in tail:
        kind = graph.nodes[index].kind
        if kind == "relu" or (windowed and kind in ("conv", "avgpool", "channel_affine")):
            return False
        windowed = windowed or kind in ("conv", "avgpool")
    return True


def _patch_unit_bounds(
    graph: _Graph, chain: list[int], units: Tensor, c0: Tensor, r0: Tensor, relax: _Relaxation
) -> tuple[Tensor, Tensor]:
    """Bounds of ``units`` of a feature map [C, H, W] by windows: every channel is bounded at
    each position holding a requested unit, so that the windows of the ReLU relaxations are
    shared by the channels: A is [B, 2 (lower/upper), positions, C_start, C, kh, kw]."""
    start = graph.nodes[chain[0]]
    channels, height, width = start.shape
    geometry = []  # (window size, stride, padding) at each node's output, back to the input
    size, stride, pad = (1, 1), (1, 1), (0, 0)
    widest = 0
    for index in chain:
        node = graph.nodes[index]
        geometry.append((size, stride, pad))
        widest = max(widest, node.shape[0] * size[0] * size[1])
        layer = _layer_window(node, c0)
        if layer is not None:
            weight, s, p, d, _ = layer
            size = tuple(
                (size[i] - 1) * s[i] + d[i] * (weight.shape[2 + i] - 1) + 1 for i in range(2)
            )
            pad = tuple(pad[i] * s[i] + p[i] for i in range(2))
            stride = tuple(stride[i] * s[i] for i in range(2))
    geometry.append((size, stride, pad))
    widest = max(widest, graph.nodes[0].shape[0] * size[0] * size[1])
    all_positions, unit_position = torch.unique(units % (height * width), return_inverse=True)
    chunk = max(1, _CHUNK_FLOATS // max(1, c0.shape[0] * widest * 2 * channels))
    lowers, uppers = [], []
    eye = torch.eye(channels, dtype=c0.dtype, device=c0.device)
    cache: dict = {}  # maps unfolded once for all chunks of positions
    sign = torch.tensor([1.0, -1.0], dtype=c0.dtype, device=c0.device).view(1, 2, 1, 1, 1)
    # Above the first ReLU the windows are the same at every position (dimension 2 is 1).
    start_P = (sign * eye.view(1, 1, 1, channels, channels)).view(1, 2, 1, channels, channels, 1, 1)
    for first in range(0, all_positions.numel(), chunk):
        positions = all_positions[first : first + chunk]
        P, bias, clean = start_P, 0, True
        done = None
        for step, (index, window) in enumerate(zip(chain, geometry)):
            node = graph.nodes[index]
            shared = P.shape[0] == 1 and P.shape[2] == 1  # same for every example and position
            if node.kind == "relu" and shared and _linear_tail(graph, chain[step + 1 :]):
                done = _first_relu_by_products(
                    graph,
                    chain[step + 1 :],
                    geometry[step + 1 :],
                    index,
                    P,
                    window,
                    positions,
                    relax,
                    c0,
                    r0,
                    cache,
                )
                break
            P, b, clean = _patch_step(node, index, P, clean, window, positions, relax, c0, cache)
            bias = bias + b
        if done is None:
            size, stride, pad = geometry[-1]
            centre = _windows(c0, size, stride, pad, positions, cache)
            radius = _windows(r0, size, stride, pad, positions, cache)
            done = (P * centre).sum((-3, -2, -1)) - (P.abs() * radius).sum((-3, -2, -1))
        both = done + bias
        lowers.append(both[:, 0])
        uppers.append(-both[:, 1])
    lower = torch.cat(lowers, 1).flatten(1)  # [B, positions * C_start]
    upper = torch.cat(uppers, 1).flatten(1)
    rows = unit_position * channels + units // (height * width)
    return lower[:, rows], upper[:, rows]


def _first_relu_by_products(
    graph, tail, tail_geometry, relu, P, window, positions, relax, c0, r0, cache=None
) -> Tensor:
    """The bound [B, 2, positions, C_start] from the first ReLU down, by two matrix products.

    Below the first ReLU the map from its relaxed windows to the input windows is affine and
    the same for every example: it is computed once on the basis of the ReLU's window entries,
    and each example's slopes select from it (``slopes [B*n, K] @ G [K, ...]``).
    """
    _, signs, _, channels = P.shape[:4]
    entries = P.shape[-3:]
    K = math.prod(entries)
    basis = torch.eye(K, dtype=c0.dtype, device=c0.device).view(1, 1, 1, K, *entries)
    clean, tail_bias = True, torch.zeros(1, 1, 1, K, dtype=c0.dtype, device=c0.device)
    for index, step_window in zip(tail, tail_geometry):
        basis, b, clean = _patch_step(
            graph.nodes[index], index, basis, clean, step_window, positions, relax, c0, cache
        )
        tail_bias = tail_bias + b
    tail_map = torch.cat([basis.reshape(K, -1), tail_bias.reshape(K, 1)], 1)  # [K, K_in + 1]
    rows = P.reshape(signs * channels, K)
    positive = (rows.clamp(min=0).T.unsqueeze(-1) * tail_map.unsqueeze(1)).flatten(1)
    negative = (rows.clamp(max=0).T.unsqueeze(-1) * tail_map.unsqueeze(1)).flatten(1)
    size, stride, pad = window
    slope_l, slope_u, icpt_u, _ = relax.lines(relu)
    batch = c0.shape[0]
    slope_l = _windows(slope_l, size, stride, pad, positions, cache).reshape(-1, K)
    slope_u = _windows(slope_u, size, stride, pad, positions, cache).reshape(-1, K)
    icpt_u = _windows(icpt_u, size, stride, pad, positions, cache).reshape(-1, K)
    # [B n, 2 C_start (K_in + 1)]: the product in place of the first, not copied into a third
    out = slope_u.matmul(negative).addmm_(slope_l, positive)
    out = out.view(-1, signs * channels, tail_map.shape[1])  # [B n, 2 C_start, K_in + 1]
    relu_bias = icpt_u.matmul(rows.clamp(max=0).T).view(batch, -1, signs, channels)
    size, stride, pad = tail_geometry[-1]  # the input's windows
    # The window's centre and radius with a last entry 1 and 0, for the tail's bias column.
    centre = _windows(c0, size, stride, pad, positions, cache).reshape(out.shape[0], -1)
    radius = _windows(r0, size, stride, pad, positions, cache).reshape(out.shape[0], -1)
    centre = F.pad(centre, (0, 1), value=1.0).unsqueeze(1)
    radius = F.pad(radius, (0, 1), value=0.0).unsqueeze(1)
    # [B n, 1, K_in + 1] @ [B n, K_in + 1, 2 C_start]: the fast orientation of bmm
    value = torch.bmm(centre, out.transpose(1, 2))
    magnitude = out.abs_() if not torch.is_grad_enabled() else out.abs()
    value = value - torch.bmm(radius, magnitude.transpose(1, 2))
    return (value.view(batch, -1, signs, channels) + relu_bias).transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# Public functions.


def _prepare(
    model: nn.Module,
    x_lower: Tensor,
    x_upper: Tensor,
    C: Tensor | None,
    domain: tuple[float, float] | None,
    caller: str,
) -> tuple[_Graph, Tensor, Tensor, Tensor | None]:
    model = _unwrap(model)
    graph = _trace(model)
    _check_modes(graph)
    for name, t in (("x_lower", x_lower), ("x_upper", x_upper)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() < 2:
            raise ValueError(
                f"{caller}: {name} must be a floating tensor [B, ...input], got "
                f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}"
            )
    if x_lower.shape != x_upper.shape:
        raise ValueError(
            f"{caller}: x_lower {tuple(x_lower.shape)} and x_upper {tuple(x_upper.shape)} "
            "must have the same shape"
        )
    if bool((x_lower > x_upper).any()):
        raise ValueError(f"{caller}: x_lower must be <= x_upper everywhere")
    reference = next(iter(model.parameters()), None)
    if reference is None:
        reference = next(iter(model.buffers()), x_lower)
    x_lower = x_lower.to(reference.device, reference.dtype)
    x_upper = x_upper.to(reference.device, reference.dtype)
    if domain is not None:
        low, high = domain
        if not low < high:
            raise ValueError(f"{caller}: domain must be (low, high) with low < high, got {domain}")
        x_lower, x_upper = x_lower.clamp(low, high), x_upper.clamp(low, high)
    if C is not None:
        if not isinstance(C, Tensor) or C.dim() not in (2, 3):
            raise ValueError(
                f"{caller}: C must be a Tensor [B, m, out] or [m, out], got "
                f"{tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__}"
            )
        C = C.to(reference.device, reference.dtype)
        if C.dim() == 2:
            C = C.unsqueeze(0)
        if C.shape[0] not in (1, x_lower.shape[0]):
            raise ValueError(
                f"{caller}: C {tuple(C.shape)} has batch {C.shape[0]}, inputs {x_lower.shape[0]}"
            )
    return graph, (x_upper + x_lower) / 2, (x_upper - x_lower) / 2, C


def _check_spec(C: Tensor, graph: _Graph, caller: str) -> None:
    out_shape = graph.nodes[graph.output].shape
    if C.shape[-1] != math.prod(out_shape):
        raise ValueError(
            f"{caller}: C {tuple(C.shape)} must end in the model's output size "
            f"{math.prod(out_shape)} (per-example output shape {out_shape})"
        )


def interval_bounds(
    model: nn.Module,
    x_lower: Tensor,
    x_upper: Tensor,
    *,
    C: Tensor | None = None,
    domain: tuple[float, float] | None = (0.0, 1.0),
) -> tuple[Tensor, Tensor]:
    """Interval bound propagation (IBP) of the box ``[x_lower, x_upper]`` through ``model``.

    Each layer maps the box's centre ``c`` and radius ``r`` to ``W c + b`` and ``|W| r``;
    ReLU maps the bounds elementwise (Gowal et al. 2018, "On the effectiveness of interval
    bound propagation"). With a specification ``C`` ending on a ``Linear`` layer, ``C`` is
    folded into that layer ("elision of the last layer", Gowal et al. 2018, sec. 3).

    Args:
        model (nn.Module): a network of the supported layers (see module docstring); a
            (Distributed)DataParallel wrapper is unwrapped. Not modified.
        x_lower (Tensor[B, ...input]): lower corner of the input box.
        x_upper (Tensor[B, ...input]): upper corner, ``>= x_lower``.
        C (Tensor[B, m, out] | Tensor[m, out] | None): bound ``C @ logits`` instead of the logits.
        domain (tuple[float, float] | None): the box is first clamped into this data domain;
            ``None`` leaves it unbounded.

    Returns:
        tuple[Tensor, Tensor]: ``(lower, upper)``, each ``[B, out]`` (``[B, m]`` with ``C``),
        differentiable with respect to the model's parameters.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> x = torch.rand(5, 1, 2, 2)
        >>> lower, upper = interval_bounds(net, x - 0.1, x + 0.1)
        >>> bool((lower <= net(x)).all() and (net(x) <= upper).all())
        True
    """
    graph, c0, r0, C = _prepare(model, x_lower, x_upper, C, domain, "interval_bounds")
    return _interval_bounds(graph, c0, r0, C, "interval_bounds")


def _interval_bounds(
    graph: _Graph,
    c0: Tensor,
    r0: Tensor,
    C: Tensor | None,
    caller: str,
    refine: Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """IBP of the graph (or of ``C @ output``) from the box ``(c0, r0)``; see interval_bounds."""
    out = graph.nodes[graph.output]
    fold = C is not None and out.kind == "linear"
    stop = graph.output if not fold else out.inputs[0]
    c, r = _forward_intervals(_Graph(graph.nodes[: stop + 1], stop, ()), c0, r0, refine)
    if fold:
        out.shape = (out.module.out_features,)
        _check_spec(C, graph, caller)
        # The centre goes through the layer first ([B, out], then C); the radius needs |C W|
        # [B or 1, m, in], reduced elementwise: batched matrix-vector products of this size
        # cost more in call overhead than in arithmetic.
        logits = F.linear(c, out.module.weight, out.module.bias)
        c_out = (C * logits.unsqueeze(1)).sum(-1)
        r_out = (C.matmul(out.module.weight).abs() * r.unsqueeze(1)).sum(-1)
        return c_out - r_out, c_out + r_out
    if C is not None:
        _check_spec(C, graph, caller)
        c, r = c.flatten(1), r.flatten(1)
        c = torch.einsum("bmo,bo->bm", C.expand(c.shape[0], -1, -1), c)
        r = torch.einsum("bmo,bo->bm", C.abs().expand(r.shape[0], -1, -1), r)
    return c - r, c + r


def crown_bounds(
    model: nn.Module,
    x_lower: Tensor,
    x_upper: Tensor,
    *,
    C: Tensor | None = None,
    method: str = "crown",
    domain: tuple[float, float] | None = (0.0, 1.0),
    alpha_steps: int = 20,
    alpha_lr: float = 0.1,
    interval_reference: bool = True,
    bound_lower: bool = True,
    bound_upper: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Backward linear-relaxation bounds of ``model`` (or ``C @ model``) over an input box.

    Every ReLU with pre-activation bounds ``l < 0 < u`` is sandwiched between the lower line
    ``a z`` and the upper line ``u (z - l) / (u - l)``; the specification is pushed backward
    through the network as a linear function of the input and minimised over the box
    (Zhang et al. 2018, "Efficient neural network robustness certification with general
    activation functions"). ``method`` picks the pre-activation bounds and the lower slope ``a``:

    - ``"crown"``: pre-activation bounds by CROWN itself; ``a = 1 if u > -l else 0``.
    - ``"crown-ibp"``: pre-activation bounds by IBP, the final bound by CROWN (Zhang et al.
      2020, "Towards stable and efficient training of verifiably robust neural networks").
    - ``"wong-kolter"``: ``a = u / (u - l)`` everywhere; this is the dual-network bound of
      Wong & Kolter (2018), "Provable defenses against adversarial examples via the convex
      outer adversarial polytope".
    - ``"alpha-crown"``: CROWN pre-activation bounds, then the final bound's slopes ``a`` in
      ``[0, 1]`` (one per specification row and unit) optimised by projected Adam for
      ``alpha_steps`` steps from strictly inside ``(0, 1)`` (Xu et al. 2021, "Fast and complete");
      each row keeps its best slopes, so the result is never looser than CROWN's.

    Args:
        model (nn.Module): a network of the supported layers; a (Distributed)DataParallel
            wrapper is unwrapped. Not modified.
        x_lower (Tensor[B, ...input]): lower corner of the input box.
        x_upper (Tensor[B, ...input]): upper corner, ``>= x_lower``.
        C (Tensor[B, m, out] | Tensor[m, out] | None): bound ``C @ logits`` (e.g.
            :func:`margin_matrix`) instead of the logits.
        method (str): one of ``"crown"``, ``"crown-ibp"``, ``"wong-kolter"``, ``"alpha-crown"``.
        domain (tuple[float, float] | None): the box is first clamped into this data domain;
            ``None`` leaves it unbounded.
        alpha_steps (int): Adam steps of alpha-CROWN.
        alpha_lr (float): Adam learning rate of alpha-CROWN.
        interval_reference (bool): a pre-activation unit that interval propagation from the
            previous ReLU's bounds already proves stable keeps that interval, and only the
            other units are bounded by the backward pass (auto_LiRPA's default; faster, and
            never looser). ``False`` bounds every unit by the backward pass: the plain method.
        bound_lower (bool): compute the lower bound of the output (or of ``C @ logits``).
        bound_upper (bool): compute the upper bound. Each final bound is its own backward pass
            from the specification rows, so asking for one side only (certification and
            certified training need the margins' lower bound only) halves that pass; the side
            asked for is the same as with both.

    Returns:
        tuple[Tensor | None, Tensor | None]: ``(lower, upper)``, each ``[B, out]`` (``[B, m]``
        with ``C``) or ``None`` where not asked for, differentiable with respect to the model's
        parameters.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.rand(4, 3)
        >>> lo_ibp, up_ibp = interval_bounds(net, x - 0.05, x + 0.05)
        >>> lo, up = crown_bounds(net, x - 0.05, x + 0.05)
        >>> bool((lo >= lo_ibp - 1e-6).all() and (lo <= net(x)).all())
        True
    """
    if method not in METHODS:
        raise ValueError(f"crown_bounds: method must be one of {METHODS}, got {method!r}")
    if not isinstance(alpha_steps, int) or alpha_steps < 0:
        raise ValueError(f"crown_bounds: alpha_steps must be an int >= 0, got {alpha_steps!r}")
    if not alpha_lr > 0:
        raise ValueError(f"crown_bounds: alpha_lr must be > 0, got {alpha_lr!r}")
    if not (bound_lower or bound_upper):
        raise ValueError("crown_bounds: bound_lower and bound_upper are both False; ask for one")
    spec_given = C is not None
    graph, c0, r0, C = _prepare(model, x_lower, x_upper, C, domain, "crown_bounds")
    lower, upper, _ = _crown(
        graph,
        c0,
        r0,
        C,
        spec_given,
        method,
        alpha_steps,
        alpha_lr,
        interval_reference,
        bound_lower,
        bound_upper,
    )
    return lower, upper


def _crown_ibp_and_interval(
    model: nn.Module,
    x_lower: Tensor,
    x_upper: Tensor,
    C: Tensor,
    domain: tuple[float, float] | None,
) -> tuple[Tensor, Tensor]:
    """Lower bounds [B, m] of ``C @ model`` by CROWN-IBP and by IBP, from one interval pass.

    CROWN-IBP's pre-activation bounds are the IBP boxes, so the IBP bound of the output comes
    from the same forward pass (what CROWN-IBP training mixes, Zhang et al. 2020).
    """
    graph, c0, r0, C = _prepare(model, x_lower, x_upper, C, domain, "crown_bounds")
    lower, _, interval = _crown(
        graph, c0, r0, C, True, "crown-ibp", 0, 1.0, True, True, False, interval=True
    )
    return lower, interval


def _crown(
    graph: _Graph,
    c0: Tensor,
    r0: Tensor,
    C: Tensor | None,
    spec_given: bool,
    method: str,
    alpha_steps: int,
    alpha_lr: float,
    interval_reference: bool,
    bound_lower: bool,
    bound_upper: bool,
    interval: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """crown_bounds on a prepared graph and box; with ``interval``, also the IBP lower bound."""
    relax = _Relaxation({}, {}, "wong-kolter" if method == "wong-kolter" else "crown")

    def refine(relu: int, c: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper = (c - r).flatten(1), (c + r).flatten(1)
        if method == "crown-ibp":
            relax.lower[relu], relax.upper[relu] = lower.view_as(c), upper.view_as(c)
            return c, r
        if not graph.nodes[graph.nodes[relu].inputs[0]].exact_interval:
            # Where the interval reference already shows a unit stable (as auto_LiRPA does), its
            # relaxation is exact whatever the bounds: CROWN bounds only the other units.
            unstable = (lower < 0) & (upper > 0)
            if not interval_reference:
                unstable = torch.ones_like(unstable)
            units = unstable.any(0).nonzero().flatten()
            if units.numel():
                source = graph.nodes[relu].inputs[0]
                unit_lower, unit_upper = _unit_bounds(
                    graph, source, units, c0, r0, relax, unstable[:, units]
                )
                keep = ~unstable[:, units]
                unit_lower = torch.where(keep, lower[:, units], unit_lower)
                unit_upper = torch.where(keep, upper[:, units], unit_upper)
                lower = lower.index_copy(1, units, unit_lower)
                upper = upper.index_copy(1, units, unit_upper)
        relax.lower[relu], relax.upper[relu] = lower.view_as(c), upper.view_as(c)
        return (relax.upper[relu] + relax.lower[relu]) / 2, (
            relax.upper[relu] - relax.lower[relu]
        ) / 2

    if interval:
        interval_lower = _interval_bounds(graph, c0, r0, C, "crown_bounds", refine)[0]
    else:
        interval_lower = None
        _forward_intervals(graph, c0, r0, refine)
    out_shape = graph.nodes[graph.output].shape
    if C is None:
        n = math.prod(out_shape)
        C = torch.eye(n, dtype=c0.dtype, device=c0.device).unsqueeze(0)
    _check_spec(C, graph, "crown_bounds")
    m = C.shape[1]
    sides = [C] * bound_lower + [-C] * bound_upper
    spec = torch.cat(sides, 1) if len(sides) == 2 else sides[0]
    spec = spec.view(C.shape[0], len(sides) * m, *out_shape)
    if method == "alpha-crown" and graph.relus:
        _optimise_slopes(graph, spec, c0, r0, relax, alpha_steps, alpha_lr)
    found = _backward_lower(graph, graph.output, spec, c0, r0, relax)
    if m == math.prod(out_shape) and C.shape[0] == 1 and not spec_given:
        found = found.view(found.shape[0], len(sides), *out_shape)
    else:
        found = found.view(found.shape[0], len(sides), m)
    lower = found[:, 0] if bound_lower else None
    upper = -found[:, -1] if bound_upper else None
    return lower, upper, interval_lower


def _optimise_slopes(
    graph: _Graph,
    spec: Tensor,
    c0: Tensor,
    r0: Tensor,
    relax: _Relaxation,
    steps: int,
    lr: float,
) -> None:
    """Fill ``relax.alpha`` with each specification row's best slopes found by projected Adam.

    Every row's bound depends on its own slopes only, so the best slopes of each row, CROWN's
    included, reassemble into a bound that is the row-wise best seen. The search starts from
    CROWN's slopes pulled into ``(0, 1)`` and projects after each step, never through a clamp
    inside the graph: at exactly 0 or 1 a clamp's gradient is zero and the search would stall.
    """
    batch, rows = c0.shape[0], spec.shape[1]
    fixed = _Relaxation(
        {k: v.detach() for k, v in relax.lower.items()},
        {k: v.detach() for k, v in relax.upper.items()},
        relax.rule,
    )
    best = {}
    for relu in graph.relus:
        slope_l = fixed.lines(relu)[0]
        best[relu] = slope_l.unsqueeze(1).expand(batch, rows, *slope_l.shape[1:])
    with torch.no_grad():
        best_bound = _backward_lower(graph, graph.output, spec, c0, r0, fixed)
    fixed.alpha = {k: v.clamp(0.05, 0.95).requires_grad_(True) for k, v in best.items()}
    optimiser = torch.optim.Adam(list(fixed.alpha.values()), lr=lr)
    with torch.enable_grad():
        for step in range(steps + 1):
            bound = _backward_lower(graph, graph.output, spec, c0, r0, fixed)
            improved = bound.detach() > best_bound
            best_bound = torch.where(improved, bound.detach(), best_bound)
            for relu, alpha in fixed.alpha.items():
                mask = improved.view(batch, rows, *([1] * (alpha.dim() - 2)))
                best[relu] = torch.where(mask, alpha.detach(), best[relu])
            if step == steps:
                break
            optimiser.zero_grad()
            (-bound.sum()).backward(inputs=list(fixed.alpha.values()))
            optimiser.step()
            with torch.no_grad():
                for alpha in fixed.alpha.values():
                    alpha.clamp_(0.0, 1.0)
    relax.alpha = best
