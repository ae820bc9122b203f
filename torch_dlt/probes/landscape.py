"""Loss-landscape probes: filter-normalised random directions, 1-D slices, 2-D surfaces, PCA paths.

Implements Li, Xu, Taylor, Studer & Goldstein (2018), "Visualizing the loss landscape of neural
nets": the loss is evaluated at ``weights + alpha * d1 + beta * d2`` on the user's own model.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Iterable, NamedTuple, Sequence, Union

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from torch_dlt.nn.models import Erf
from torch_dlt.probes._state import check_same_architecture, forked_rng, restored_mode

__all__ = [
    "LandscapeSlice",
    "LandscapeSurface",
    "PCADirections",
    "pca_directions",
    "plot_contour",
    "plot_slice",
    "plot_surface_3d",
    "plot_trajectory",
    "project_trajectory",
    "random_bn_direction",
    "random_direction",
    "slice_1d",
    "surface_2d",
]

_NORMALIZATIONS = ("filter", "layer", "model", "none")
_IGNORES = ("biasbn", None)

# Grid points evaluated in one vmapped call are bounded so that the stacked perturbed parameters
# stay under this many scalars; activations grow with the chunk too, so it stays modest.
_CHUNK_SCALARS = 2**23
_MAX_CHUNK = 64

Direction = list[Tensor]
Batch = tuple[Any, Tensor]
Data = Union[Batch, Iterable[Batch]]
LossFn = Callable[[Tensor, Tensor], Tensor]


class LandscapeSlice(NamedTuple):
    """The loss along one line through weight space.

    Attributes:
        alphas (Tensor[steps], float64): step along the direction (or interpolation weight).
        losses (Tensor[steps], float64): the loss at each alpha.
    """

    alphas: Tensor
    losses: Tensor


class LandscapeSurface(NamedTuple):
    """The loss on a 2-D plane through weight space.

    Attributes:
        alphas (Tensor[steps], float64): coordinates along the first direction.
        betas (Tensor[steps], float64): coordinates along the second direction.
        losses (Tensor[steps, steps], float64): ``losses[i, j]`` is the loss at
            ``weights + alphas[i] * d1 + betas[j] * d2``.
    """

    alphas: Tensor
    betas: Tensor
    losses: Tensor


class PCADirections(NamedTuple):
    """Principal directions of a training trajectory (Li et al., 2018, Sec. 7).

    Attributes:
        directions (list[list[Tensor]]): ``n_components`` unit-norm directions, each a list shaped
            like ``model.parameters()``.
        explained_variance_ratio (Tensor[n_components], float64): share of the trajectory's
            variance along each direction.
        coordinates (Tensor[T, n_components], float64): each checkpoint's offset from the final
            weights projected onto the directions, for a trajectory overlay.
    """

    directions: list[Direction]
    explained_variance_ratio: Tensor
    coordinates: Tensor


# ---------------------------------------------------------------------------------------------
# directions


def _fresh_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    if generator is not None:
        return generator
    # A nondeterministic seed of a private generator: the global RNG is never drawn from.
    fresh = torch.Generator(device=device)
    fresh.seed()
    return fresh


def _gaussian_like(t: Tensor, generator: torch.Generator) -> Tensor:
    if generator.device.type == t.device.type:
        return torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device)
    return torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)


def random_direction(
    model: nn.Module,
    *,
    normalization: str = "filter",
    ignore: str | None = "biasbn",
    generator: torch.Generator | None = None,
) -> Direction:
    r"""A Gaussian direction in weight space, normalised to the scale of the weights.

    Li et al. (2018) draw :math:`d \sim \mathcal N(0, I)` and rescale each *filter* of it to the
    norm of the corresponding filter of the weights, :math:`d_{i,j} \leftarrow
    \frac{d_{i,j}}{\lVert d_{i,j}\rVert}\lVert\theta_{i,j}\rVert`, which removes the scale
    invariance of ReLU/BatchNorm nets and makes plots of different nets comparable. A filter is
    a slice along dim 0 (an output channel of a convolution, an output row of a linear layer).

    Args:
        model (nn.Module): the model; its weights set the scale.
        normalization (str): ``"filter"`` (Li et al.), ``"layer"`` (each tensor rescaled to the
            norm of the parameter), ``"model"`` (the whole direction rescaled to the norm of all
            included weights) or ``"none"`` (the raw Gaussian).
        ignore (str | None): ``"biasbn"`` gives the 1-D parameters (biases, BatchNorm weight and
            bias) a zero direction, as Li et al. do by default. With ``None`` they move too and,
            following Li et al.'s choice, their direction under ``"filter"`` is the parameter
            itself (each entry is its own filter, so its norm is fixed to :math:`|\theta_i|`;
            they keep its sign); other normalisations treat them like any tensor.
        generator (torch.Generator | None): source of the Gaussian; ``None`` uses a fresh,
            nondeterministically seeded generator (the global RNG is not touched).

    Returns:
        list[Tensor]: one tensor per entry of ``model.parameters()``, same shapes and order.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> d = random_direction(net, generator=torch.Generator().manual_seed(0))
        >>> bool(torch.allclose(d[0].norm(dim=1), net[0].weight.norm(dim=1)))
        True
        >>> float(d[1].abs().sum())
        0.0
    """
    if normalization not in _NORMALIZATIONS:
        raise ValueError(
            f"random_direction: normalization must be one of {_NORMALIZATIONS}, "
            f"got {normalization!r}"
        )
    if ignore not in _IGNORES:
        raise ValueError(f"random_direction: ignore must be 'biasbn' or None, got {ignore!r}")
    params = [p.detach() for p in model.parameters()]
    if not params:
        raise ValueError("random_direction: the model has no parameters")
    gen = _fresh_generator(generator, params[0].device)
    direction = []
    for w in params:
        d = _gaussian_like(w, gen)
        if w.dim() <= 1 and ignore == "biasbn":
            d = torch.zeros_like(w)
        elif normalization == "filter":
            if w.dim() <= 1:
                d = w.clone()
            else:
                w_norm = w.flatten(1).norm(dim=1)
                d_norm = d.flatten(1).norm(dim=1)
                scale = w_norm / (d_norm + 1e-10)
                d = d * scale.view(-1, *([1] * (w.dim() - 1)))
        elif normalization == "layer":
            d = d * (w.norm() / (d.norm() + 1e-10))
        direction.append(d)
    if normalization == "model":
        moving = [(w, d) for w, d in zip(params, direction) if d.abs().sum() > 0]
        w_norm = math.sqrt(sum(float(w.square().sum()) for w, _ in moving))
        d_norm = math.sqrt(sum(float(d.square().sum()) for _, d in moving))
        direction = [d * (w_norm / (d_norm + 1e-10)) for d in direction]
    return direction


def random_bn_direction(
    model: nn.Module, *, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """A Gaussian direction for the BatchNorm running statistics, each scaled to its buffer's norm.

    Pass it as ``buffer_directions`` to :func:`slice_1d` / :func:`surface_2d` to move the running
    mean and variance along with the weights (in eval mode they, not the batch, normalise). The
    perturbed running variance is clamped at 0 so that the layer stays defined.

    Args:
        model (nn.Module): the model.
        generator (torch.Generator | None): source of the Gaussian (``None``: a fresh one).

    Returns:
        dict[str, Tensor]: buffer name -> direction, for every ``running_mean`` / ``running_var``
        of a BatchNorm layer.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> sorted(random_bn_direction(net, generator=torch.Generator().manual_seed(0)))
        ['1.running_mean', '1.running_var']
    """
    out = {}
    gen = None
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        for stat in ("running_mean", "running_var"):
            buffer = getattr(module, stat, None)
            if buffer is None:
                continue
            gen = gen or _fresh_generator(generator, buffer.device)
            d = _gaussian_like(buffer.detach(), gen)
            name = f"{module_name}.{stat}" if module_name else stat
            out[name] = d * (buffer.detach().norm() / (d.norm() + 1e-10))
    return out


# ---------------------------------------------------------------------------------------------
# data and evaluation


def _batches(data: Data, owner: str) -> list[Batch]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor):
        if isinstance(data[0], Tensor):
            return [(data[0], data[1])]
    if isinstance(data, Tensor) or not hasattr(data, "__iter__"):
        raise TypeError(
            f"{owner}: data must be one (inputs, targets) batch or an iterable of them (e.g. a "
            f"DataLoader), got {type(data).__name__}"
        )
    batches = []
    # A DataLoader draws its base seed (and any shuffle) from the global RNG: give it back.
    with torch.random.fork_rng(devices=[]):
        for i, batch in enumerate(data):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"{owner}: batch {i} of data is not an (inputs, targets) pair")
            batches.append((batch[0], batch[1]))
    if not batches:
        raise ValueError(f"{owner}: data yielded no batches (an empty loader?)")
    return batches


def _batch_size(batch: Batch) -> int:
    inputs, targets = batch
    if isinstance(targets, Tensor) and targets.dim() > 0:
        return targets.shape[0]
    first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    return first.shape[0]


def _forward_loss(
    model: nn.Module, loss_fn: LossFn, tensors: dict[str, Tensor], batch: Batch
) -> Tensor:
    inputs, targets = batch
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return loss_fn(functional_call(model, tensors, args), targets)


def _check_direction(model: nn.Module, direction: object, argument: str, owner: str) -> Direction:
    params = list(model.parameters())
    if isinstance(direction, Tensor) or not isinstance(direction, (list, tuple)):
        raise TypeError(
            f"{owner}: {argument} must be a list of tensors shaped like model.parameters(), "
            f"got {type(direction).__name__}"
        )
    if len(direction) != len(params):
        raise ValueError(
            f"{owner}: {argument} has {len(direction)} tensors, the model has {len(params)} "
            "parameters"
        )
    names = [n for n, _ in model.named_parameters()]
    for name, p, d in zip(names, params, direction):
        if not isinstance(d, Tensor) or d.shape != p.shape:
            shape = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
            raise ValueError(
                f"{owner}: {argument} entry for parameter {name!r} has shape {shape}, "
                f"expected {tuple(p.shape)}"
            )
    return [d.detach().to(device=p.device, dtype=p.dtype) for p, d in zip(params, direction)]


def _check_buffer_direction(
    model: nn.Module, direction: dict[str, Tensor], owner: str
) -> dict[str, Tensor]:
    buffers = dict(model.named_buffers())
    checked = {}
    for name, d in direction.items():
        if name not in buffers or buffers[name].shape != d.shape:
            raise ValueError(
                f"{owner}: buffer_directions entry {name!r} matches no buffer of that shape "
                "in the model"
            )
        checked[name] = d.detach().to(buffers[name])
    return checked


def _grid(span: object, steps: object, owner: str) -> Tensor:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{owner}: steps must be an int >= 1, got {steps!r}")
    if not isinstance(span, (tuple, list)) or len(span) != 2:
        raise ValueError(f"{owner}: span must be a (low, high) pair, got {span!r}")
    low, high = (float(s) for s in span)
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"{owner}: span must be finite with low <= high, got {span!r}")
    return torch.linspace(low, high, steps, dtype=torch.float64)


# Modules applied entry by entry (Dropout is the identity in eval mode, the only mode stacked).
_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.SELU,
    nn.ELU,
    nn.LeakyReLU,
    nn.Hardtanh,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    Erf,
)
_ELEMENTWISE_FUNCTIONS = (torch.relu, torch.tanh, torch.sigmoid, torch.erf, F.relu, F.gelu)
_ELEMENTWISE_METHODS = ("relu", "tanh", "sigmoid")
_POOLING_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)

# Grid points per stacked forward on accelerators when chunk_size is None: at most _MAX_CHUNK,
# and few enough that the stacked first activation stays under this many scalars.
_STACK_SCALARS = 2**24
_ALIGN = 64


class _Layer(NamedTuple):
    """One step of a stacked chain: what it does and where its parameters sit in the stack."""

    kind: str  # "conv", "linear", "batchnorm", "apply", "flatten"
    module: Any  # the nn.Module, or the callable applied entry by entry
    weight: int | None  # index of the weight in the stacked parameters, None if absent
    bias: int | None


class _StackedChain:
    """A chain-structured model evaluated at many grid points in one forward pass.

    Grid points are stacked along the channels (images: ``[B, G*C, H, W]``, channels-last when
    ``G > 1``, so each convolution is one grouped convolution) or along a leading dimension
    (features: ``[G, B, F]``, so each linear layer is one batched matmul); every group sees its
    own point's weights and nothing else. The first parametrised layer (a convolution or linear
    layer) sees the same input at every point and is linear in its weights, so
    ``layer(x; w + a d1 + b d2) = layer(x; w) + a layer(x; d1) + b layer(x; d2)`` (bias
    included): its three outputs are computed once per batch and each point costs an axpy.
    """

    def __init__(
        self,
        prefix: list[Callable[[Tensor], Tensor]],
        first: nn.Module,
        first_params: tuple[int, int | None],
        layers: list[_Layer],
        stacked_params: list[int],
    ) -> None:
        self.prefix = prefix
        self.first = first
        self.first_params = first_params
        self.layers = layers
        self.stacked_params = stacked_params

    @classmethod
    def build(cls, model: nn.Module) -> _StackedChain | None:
        """The stacked form of ``model``, or None when it is not a chain of supported layers."""
        if _has_hooks(model):
            return None
        try:
            graph = fx.symbolic_trace(model).graph
        except Exception:
            # Tracing is only an optimisation: whatever stops it, the model runs point by point.
            return None
        index = {id(p): i for i, p in enumerate(model.parameters())}
        modules = dict(model.named_modules())
        nodes = list(graph.nodes)
        if len(nodes) < 3 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
            return None
        previous = nodes[0]
        prefix: list[Callable[[Tensor], Tensor]] = []
        first = None
        first_params: tuple[int, int | None] = (0, None)
        layers: list[_Layer] = []
        for node in nodes[1:-1]:
            if not node.args or node.args[0] is not previous or _has_node(node, skip_first=True):
                return None
            previous = node
            module = modules.get(node.target) if node.op == "call_module" else None
            if first is None:
                if module is not None and type(module) in (nn.Conv2d, nn.Linear):
                    if getattr(module, "padding_mode", "zeros") != "zeros":
                        return None
                    first = module
                    first_params = _param_indices(module, index)
                elif module is not None and next(module.parameters(), None) is not None:
                    return None
                else:
                    prefix.append(_node_call(node, modules))
                continue
            layer = _stacked_layer(node, module, index, flat=_is_flat(first, layers))
            if layer is None:
                return None
            layers.append(layer)
        output = nodes[-1].args[0]
        if first is None or output is not previous:
            return None
        used = sorted({i for layer in layers for i in (layer.weight, layer.bias) if i is not None})
        return cls(prefix, first, first_params, layers, used)

    def first_outputs(self, inputs: Tensor, directions: list[Direction]) -> Tensor | None:
        """``layer(x; w)``, ``layer(x; d1)``, ..., ``layer(x; dk)`` of the first layer stacked
        as ``[1 + k, B, C, H, W]`` (convolution) or ``[1 + k, B, F]`` (linear), or None if the
        input does not fit the stacked form."""
        x = inputs
        for call in self.prefix:
            x = call(x)
        module = self.first
        w, b = self.first_params
        if isinstance(module, nn.Conv2d):
            if x.dim() != 4:
                return None
            run = partial(
                F.conv2d,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=module.groups,
            )
        elif x.dim() == 2:
            run = F.linear
        else:
            return None
        outputs = [run(x, module.weight, module.bias)]
        for d in directions:
            outputs.append(run(x, d[w], None if b is None else d[b]))
        return torch.stack(outputs)

    def losses(
        self,
        first: Tensor,
        weights: list[Tensor | None],
        coefficients: Tensor,
        loss_fn: LossFn,
        targets: Tensor,
    ) -> Tensor:
        """Loss at each of ``coefficients`` ``[G, k]`` given ``first`` (from
        :meth:`first_outputs`) and the stacked ``weights`` (one ``[G, *shape]`` tensor per
        parameter of the model, None where unused)."""
        n_points = coefficients.shape[0]
        ones = coefficients.new_ones(n_points, 1)
        mixing = torch.cat([ones, coefficients], dim=1).to(first.dtype)
        # One [G, 1 + k] x [1 + k, N] matmul, a single pass over the first layer's outputs,
        # gives every point's pre-activation of that layer.
        h = torch.mm(mixing, first.flatten(1)).view(n_points, *first.shape[1:])
        if h.dim() == 5:
            # Images go as [B, G*C, H, W]: point g's channels are the g-th group of the next
            # convolution, and grouped convolutions run much faster channels-last on a CPU.
            batch, channels, height, width = first.shape[1:]
            if n_points == 1:
                h = h[0]
            else:
                packed = h.new_empty(batch, height, width, n_points, channels)
                packed.copy_(h.permute(1, 3, 4, 0, 2))
                h = packed.view(batch, height, width, n_points * channels).permute(0, 3, 1, 2)
        for layer in self.layers:
            h = _apply_stacked(layer, h, weights, n_points)
        if h.dim() == 4:
            batch, channels, height, width = h.shape
            outputs = h.view(batch, n_points, channels // n_points, height, width).unbind(1)
        else:
            outputs = h.unbind(0)
        return torch.stack([loss_fn(out, targets) for out in outputs])


def _has_hooks(model: nn.Module) -> bool:
    """Hooks that a traced forward would skip (the root's forward pre-hooks are run by hand)."""
    from torch.nn.modules import module as module_globals

    if any(
        getattr(module_globals, name, None)
        for name in ("_global_forward_hooks", "_global_forward_pre_hooks")
    ):
        return True
    for name, module in model.named_modules():
        hooks = [module._forward_hooks, module._forward_hooks_with_kwargs]
        hooks += [module._forward_pre_hooks_with_kwargs]
        if name:
            hooks.append(module._forward_pre_hooks)
        if any(hooks) or getattr(module, "parametrizations", None):
            return True
    return False


def _has_node(node: fx.Node, *, skip_first: bool) -> bool:
    found: list[fx.Node] = []
    args = node.args[1:] if skip_first else node.args
    fx.node.map_arg((args, node.kwargs), found.append)
    return bool(found)


def _node_call(node: fx.Node, modules: dict[str, nn.Module]) -> Callable[[Tensor], Tensor]:
    rest, kwargs = node.args[1:], node.kwargs
    if node.op == "call_module":
        module = modules[node.target]
        return lambda x: module(x, *rest, **kwargs)
    if node.op == "call_method":
        return lambda x: getattr(x, node.target)(*rest, **kwargs)
    return lambda x: node.target(x, *rest, **kwargs)


def _param_indices(module: nn.Module, index: dict[int, int]) -> tuple[int, int | None]:
    bias = getattr(module, "bias", None)
    return index[id(module.weight)], (None if bias is None else index[id(bias)])


def _is_flat(first: nn.Module, layers: list[_Layer]) -> bool:
    return isinstance(first, nn.Linear) or any(layer.kind == "flatten" for layer in layers)


def _flatten_start(node: fx.Node, module: nn.Module | None) -> bool:
    """Whether the node flattens every dimension after the batch one."""
    if isinstance(module, nn.Flatten):
        return type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1
    if node.op == "call_method" and node.target == "flatten":
        args = (*node.args[1:], *node.kwargs.values())
        return args in ((1,), (1, -1))
    if node.op == "call_function" and node.target is torch.flatten:
        args = (*node.args[1:], *node.kwargs.values())
        return args in ((1,), (1, -1))
    return False


def _stacked_layer(
    node: fx.Node, module: nn.Module | None, index: dict[int, int], *, flat: bool
) -> _Layer | None:
    """The stacked counterpart of one traced node, None when there is none."""
    # F.relu and friends trace with their default inplace=False spelled out.
    kwargs = {k: v for k, v in node.kwargs.items() if (k, v) != ("inplace", False)}
    rest = node.args[1:] or kwargs
    if _flatten_start(node, module):
        return _Layer("flatten", None, None, None)
    if module is None:
        if rest:
            return None
        if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
            return _Layer("apply", node.target, None, None)
        if node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
            return _Layer("apply", getattr(torch, node.target), None, None)
        return None
    if rest:
        return None
    kind = type(module)
    if kind in _ELEMENTWISE_MODULES or (kind in _POOLING_MODULES and not flat):
        if getattr(module, "return_indices", False):
            return None
        return _Layer("apply", module, None, None)
    if kind is nn.Conv2d and not flat and module.padding_mode == "zeros":
        return _Layer("conv", module, *_param_indices(module, index))
    if kind is nn.Linear and flat:
        return _Layer("linear", module, *_param_indices(module, index))
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d) and (kind is nn.BatchNorm1d) == flat:
        if module.running_mean is None or module.running_var is None:
            return None
        if module.affine:
            return _Layer("batchnorm", module, *_param_indices(module, index))
        return _Layer("batchnorm", module, None, None)
    return None


def _apply_stacked(layer: _Layer, h: Tensor, weights: list[Tensor], n_points: int) -> Tensor:
    module = layer.module
    weight = None if layer.weight is None else weights[layer.weight]
    bias = None if layer.bias is None else weights[layer.bias]
    if layer.kind == "apply":
        # Every h here is an intermediate of this function's own, free to overwrite.
        return h.relu_() if type(module) is nn.ReLU else module(h)
    if layer.kind == "conv":
        return F.conv2d(
            h,
            weight.flatten(0, 1),
            None if bias is None else bias.flatten(),
            module.stride,
            module.padding,
            module.dilation,
            module.groups * n_points,
        )
    if layer.kind == "linear":
        out = torch.bmm(h, weight.transpose(1, 2))
        return out if bias is None else out.add_(bias.unsqueeze(1))
    if layer.kind == "flatten":
        if h.dim() == 3:
            return h
        batch, channels, height, width = h.shape
        per_point = h.view(batch, n_points, channels // n_points, height, width)
        return per_point.transpose(0, 1).reshape(n_points, batch, -1)
    # Eval-mode BatchNorm: (h - running_mean) / sqrt(running_var + eps) * weight + bias.
    channels = module.running_mean.shape[0]
    shape = (1, n_points * channels, 1, 1) if h.dim() == 4 else (n_points, 1, channels)
    scale = (module.running_var + module.eps).rsqrt().expand(n_points, channels)
    if weight is not None:
        scale = scale * weight
    out = (h - module.running_mean.repeat(n_points).view(shape)) * scale.reshape(shape)
    return out if bias is None else out.add_(bias.reshape(shape))


def _evaluate(
    model: nn.Module,
    loss_fn: LossFn,
    batches: list[Batch],
    directions: list[Direction],
    coefficients: Tensor,
    buffer_directions: list[dict[str, Tensor]] | None,
    *,
    train: bool,
    chunk_size: int | None,
    progress: bool,
    desc: str,
) -> Tensor:
    """Mean loss (weighted by batch size) at ``weights + coefficients[p] @ directions``."""
    from tqdm.auto import tqdm

    names = [n for n, _ in model.named_parameters()]
    base = [p.detach() for p in model.parameters()]
    stacked = [torch.stack([d[j] for d in directions]) for j in range(len(base))]
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    bn_stacked = {}
    if buffer_directions:
        bn_stacked = {
            n: torch.stack([bd[n] for bd in buffer_directions]) for n in buffer_directions[0]
        }
    n_points = coefficients.shape[0]
    n_scalars = sum(p.numel() for p in base) or 1
    if chunk_size is None and all(p.device.type == "cpu" for p in base):
        # On the CPU a vmapped convolution becomes a slow grouped convolution and vmap's
        # per-call cost outweighs batching (benchmarks/landscape.py): evaluate point by point.
        chunk = 1
    else:
        chunk = chunk_size or max(1, min(_MAX_CHUNK, _CHUNK_SCALARS // n_scalars))
    starts = list(range(0, n_points, chunk))
    totals = torch.zeros(n_points, dtype=torch.float64)
    n_samples = 0
    vectorize = not train and chunk > 1
    # Eval mode with fixed buffers: chain-structured models stack grid points in one forward.
    chain = None if train or bn_stacked else _StackedChain.build(model)

    def tensors_at(c: Tensor) -> dict[str, Tensor]:
        # c is [k] (single point) or [chunk, k] (vmapped): the same contraction serves both.
        out = {
            n: w + torch.tensordot(c.to(w.dtype), d, dims=1)
            for n, w, d in zip(names, base, stacked)
        }
        for n, b in buffers.items():
            if n in bn_stacked:
                moved = b + torch.tensordot(c.to(b.dtype), bn_stacked[n], dims=1)
                out[n] = moved.clamp_min(0) if n.endswith("running_var") else moved
            elif c.dim() == 1:
                out[n] = b
        return out

    bar = tqdm(total=len(batches) * n_points, desc=desc, disable=not progress, leave=False)
    with torch.no_grad(), restored_mode(model, eval_mode=not train, restore_buffers=True):
        with forked_rng(model):
            if train:
                model.train()
            for batch in batches:
                weight = _batch_size(batch)
                n_samples += weight
                if chain is not None:
                    losses = _stacked_losses(
                        chain, model, loss_fn, batch, base, directions, coefficients, chunk_size
                    )
                    if losses is not None:
                        totals += losses * weight
                        bar.update(n_points)
                        continue
                for s in starts:
                    c = coefficients[s : s + chunk]
                    losses = None
                    if vectorize:
                        try:
                            losses = _vmapped_losses(model, loss_fn, tensors_at(c), buffers, batch)
                        except (RuntimeError, NotImplementedError):
                            # Models vmap cannot batch (data-dependent control flow, in-place
                            # buffer updates) are evaluated point by point instead.
                            vectorize = False
                    if losses is None:
                        losses = torch.stack(
                            [_forward_loss(model, loss_fn, tensors_at(ci), batch) for ci in c]
                        )
                    totals[s : s + chunk] += losses.detach().to("cpu", torch.float64) * weight
                    bar.update(len(c))
    bar.close()
    return totals / n_samples


def _stacked_losses(
    chain: _StackedChain,
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    base: list[Tensor],
    directions: list[Direction],
    coefficients: Tensor,
    chunk_size: int | None,
) -> Tensor | None:
    """Losses at every point of ``coefficients`` on one batch through ``chain``, or None when the
    batch does not fit the stacked form (several inputs, a root pre-hook that edits them)."""
    inputs, targets = batch
    if not isinstance(inputs, Tensor):
        return None
    for hook in model._forward_pre_hooks.values():
        if hook(model, (inputs,)) is not None:
            return None
    first = chain.first_outputs(inputs, directions)
    if first is None:
        return None
    if chunk_size is None and inputs.device.type == "cpu":
        # Two points per forward: oneDNN's grouped channels-last convolution of two narrow
        # groups runs faster per point than a single one, and more points only grow the
        # working set beyond the caches (benchmarks/landscape.py).
        points = 2
    else:
        per_point = max(1, first[0].numel())
        points = chunk_size or max(1, min(_MAX_CHUNK, _STACK_SCALARS // per_point))
    # One [chunk, P] matmul moves every parameter the stacked layers use. Each parameter starts
    # at a multiple of _ALIGN entries, as a tensor of its own would: oneDNN convolutions run
    # markedly slower on weights that are not 64-byte aligned.
    used = chain.stacked_params
    if len({(base[i].dtype, base[i].device) for i in used}) > 1:
        return None
    offsets = [0]
    for i in used:
        offsets.append(offsets[-1] + -(-base[i].numel() // _ALIGN) * _ALIGN)
    if used:
        origin = base[used[0]].new_zeros(offsets[-1])
        steps = base[used[0]].new_zeros(len(directions), offsets[-1])
        for i, start in zip(used, offsets):
            size = base[i].numel()
            origin[start : start + size] = base[i].reshape(-1)
            for k, d in enumerate(directions):
                steps[k, start : start + size] = d[i].reshape(-1)
    losses = []
    for s in range(0, coefficients.shape[0], points):
        c = coefficients[s : s + points]
        weights: list[Tensor | None] = [None] * len(base)
        if used:
            moved = torch.addmm(origin, c.to(origin.dtype), steps)
            for i, start in zip(used, offsets):
                size = base[i].numel()
                weights[i] = moved[:, start : start + size].view(len(c), *base[i].shape)
        losses.append(chain.losses(first, weights, c, loss_fn, targets))
    return torch.cat(losses).to("cpu", torch.float64)


def _vmapped_losses(
    model: nn.Module,
    loss_fn: LossFn,
    batched: dict[str, Tensor],
    buffers: dict[str, Tensor],
    batch: Batch,
) -> Tensor:
    fixed = {n: b for n, b in buffers.items() if n not in batched}

    def point(tensors: dict[str, Tensor]) -> Tensor:
        return _forward_loss(model, loss_fn, {**tensors, **fixed}, batch)

    return vmap(point)(batched)


# ---------------------------------------------------------------------------------------------
# slices and surfaces


def slice_1d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    direction_or_other_model: Union[Sequence[Tensor], nn.Module],
    *,
    span: tuple[float, float] = (-1.0, 1.0),
    steps: int = 51,
    buffer_direction: dict[str, Tensor] | None = None,
    train: bool = False,
    chunk_size: int | None = None,
    progress: bool = False,
) -> LandscapeSlice:
    r"""The loss along a line: ``weights + alpha * d``, or between two models.

    With a direction ``d`` (e.g. from :func:`random_direction`) this is Li et al.'s (2018) 1-D
    filter-normalised plot. With a second model of the same architecture it is the linear
    interpolation of Goodfellow, Vinyals & Saxe (2015): ``alpha = 0`` is ``model``, ``alpha = 1``
    is the other model (pass ``span=(0, 1)`` or wider); floating-point buffers (BatchNorm
    running statistics) are interpolated as well.

    The model runs in eval mode by default (BatchNorm uses its running statistics, dropout is
    off); ``train=True`` uses batch statistics. Either way the model's parameters, buffers,
    ``training`` flags, ``requires_grad`` flags and the global RNG are restored afterwards.

    Args:
        model (nn.Module): the model at ``alpha = 0``.
        loss_fn (Callable[[Tensor, Tensor], Tensor]): ``loss_fn(model(inputs), targets)``, a
            scalar mean over the batch.
        data: one ``(inputs, targets)`` batch or an iterable of them (a DataLoader); the loss is
            averaged over batches weighted by batch size.
        direction_or_other_model (list[Tensor] | nn.Module): a direction shaped like
            ``model.parameters()``, or the model at ``alpha = 1``.
        span (tuple[float, float]): range of alpha.
        steps (int): number of alphas (>= 1).
        buffer_direction (dict[str, Tensor] | None): also move buffers along this direction
            (see :func:`random_bn_direction`); only with a direction.
        train (bool): evaluate in train mode.
        chunk_size (int | None): grid points per forward pass, as in :func:`surface_2d`
            (which describes the stacked evaluation that chain-structured models get).
        progress (bool): show a tqdm bar.

    Returns:
        LandscapeSlice: ``(alphas Tensor[steps], losses Tensor[steps])``, float64.

    Example:
        >>> net = nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> d = random_direction(net, generator=torch.Generator().manual_seed(0))
        >>> alphas, losses = slice_1d(net, nn.functional.mse_loss, (x, y), d, steps=5)
        >>> bool(torch.isclose(losses[2], nn.functional.mse_loss(net(x), y).double()))
        True
    """
    owner = "slice_1d"
    alphas = _grid(span, steps, owner)
    batches = _batches(data, owner)
    if isinstance(direction_or_other_model, nn.Module):
        other = direction_or_other_model
        if buffer_direction is not None:
            raise ValueError(f"{owner}: buffer_direction applies to a direction, not to two models")
        check_same_architecture(model, other, owner, ("the model", "the other model"))
        direction = [
            (q.detach().to(p) - p.detach()) for p, q in zip(model.parameters(), other.parameters())
        ]
        theirs = dict(other.named_buffers())
        buffer_direction = {
            n: theirs[n].detach().to(b) - b.detach()
            for n, b in model.named_buffers()
            if b.is_floating_point()
        }
    else:
        direction = _check_direction(model, direction_or_other_model, "direction", owner)
        if buffer_direction is not None:
            buffer_direction = _check_buffer_direction(model, buffer_direction, owner)
    losses = _evaluate(
        model,
        loss_fn,
        batches,
        [direction],
        alphas[:, None],
        [buffer_direction] if buffer_direction else None,
        train=train,
        chunk_size=chunk_size,
        progress=progress,
        desc=owner,
    )
    return LandscapeSlice(alphas, losses)


def surface_2d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    directions: Sequence[Sequence[Tensor]],
    *,
    span: tuple[float, float] = (-1.0, 1.0),
    steps: int = 51,
    buffer_directions: Sequence[dict[str, Tensor]] | None = None,
    train: bool = False,
    chunk_size: int | None = None,
    progress: bool = False,
) -> LandscapeSurface:
    r"""The loss on the plane ``weights + alpha * d1 + beta * d2`` (Li et al., 2018).

    One loop over the data serves the whole grid. In eval mode, a model that :mod:`torch.fx`
    traces to a chain of ``Conv2d`` / ``Linear`` / BatchNorm / pooling / flatten / elementwise
    activation layers is evaluated *stacked*: its first parametrised layer sees the same input at
    every grid point and is linear in its weights, so its outputs for the weights and for
    ``d1``, ``d2`` are computed once per batch and each grid point costs one axpy there; the
    grid points then run through the rest of the net together (grouped convolutions, batched
    matmuls). The values equal those of the point-by-point evaluation up to float rounding.
    Other models (branches, hooks), ``train=True`` and ``buffer_directions`` use
    :func:`torch.func.functional_call`, vmapped over chunks of points where vmap can batch the
    model. The model runs in eval mode by default (BatchNorm uses its running statistics;
    ``train=True`` uses batch statistics); its parameters, buffers, ``training`` and
    ``requires_grad`` flags and the global RNG are restored.

    Args:
        model (nn.Module): the model at the origin.
        loss_fn (Callable[[Tensor, Tensor], Tensor]): ``loss_fn(model(inputs), targets)``, a
            scalar mean over the batch.
        data: one ``(inputs, targets)`` batch or an iterable of them (a DataLoader); the loss is
            averaged over batches weighted by batch size.
        directions (Sequence[list[Tensor]]): ``(d1, d2)``, each shaped like
            ``model.parameters()`` (e.g. from :func:`random_direction` or :func:`pca_directions`).
        span (tuple[float, float]): range of both alpha and beta.
        steps (int): grid points per axis (>= 1).
        buffer_directions (Sequence[dict[str, Tensor]] | None): ``(b1, b2)`` moving buffers too
            (see :func:`random_bn_direction`).
        train (bool): evaluate in train mode.
        chunk_size (int | None): grid points per forward pass. ``None``: two per stacked pass
            and one per ``functional_call`` on the CPU (a vmapped convolution becomes a grouped
            one, slower there), by memory on accelerators.
        progress (bool): show a tqdm bar.

    Returns:
        LandscapeSurface: ``(alphas Tensor[steps], betas Tensor[steps],
        losses Tensor[steps, steps])``, float64, ``losses[i, j]`` at ``(alphas[i], betas[j])``.

    Example:
        >>> net = nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> g = torch.Generator().manual_seed(0)
        >>> ds = [random_direction(net, generator=g) for _ in range(2)]
        >>> alphas, betas, losses = surface_2d(net, nn.functional.mse_loss, (x, y), ds, steps=5)
        >>> losses.shape
        torch.Size([5, 5])
    """
    owner = "surface_2d"
    alphas = _grid(span, steps, owner)
    if isinstance(directions, Tensor) or not isinstance(directions, (list, tuple)):
        raise TypeError(f"{owner}: directions must be a pair (d1, d2) of parameter-shaped lists")
    if len(directions) != 2:
        raise ValueError(f"{owner}: directions must be a pair (d1, d2), got {len(directions)}")
    checked = [
        _check_direction(model, d, f"directions[{k}]", owner) for k, d in enumerate(directions)
    ]
    bn = None
    if buffer_directions is not None:
        if len(buffer_directions) != 2:
            raise ValueError(f"{owner}: buffer_directions must be a pair of dicts")
        bn = [_check_buffer_direction(model, b, owner) for b in buffer_directions]
        if bn[0].keys() != bn[1].keys():
            raise ValueError(f"{owner}: the two buffer_directions must name the same buffers")
    batches = _batches(data, owner)
    grid_a, grid_b = torch.meshgrid(alphas, alphas, indexing="ij")
    coefficients = torch.stack([grid_a.reshape(-1), grid_b.reshape(-1)], dim=1)
    losses = _evaluate(
        model,
        loss_fn,
        batches,
        checked,
        coefficients,
        bn,
        train=train,
        chunk_size=chunk_size,
        progress=progress,
        desc=owner,
    )
    return LandscapeSurface(alphas, alphas.clone(), losses.reshape(steps, steps))


# ---------------------------------------------------------------------------------------------
# trajectories


def _flat_parameters(point: object, reference: list[tuple[str, Tensor]], owner: str) -> Tensor:
    names = [n for n, _ in reference]
    if isinstance(point, nn.Module):
        tensors = [p.detach() for p in point.parameters()]
    elif isinstance(point, dict):
        missing = [n for n in names if n not in point]
        if missing:
            raise ValueError(f"{owner}: a state_dict lacks parameter {missing[0]!r}")
        tensors = [point[n] for n in names]
    elif isinstance(point, (list, tuple)):
        tensors = list(point)
    else:
        raise TypeError(
            f"{owner}: checkpoints must be nn.Modules, state_dicts or parameter lists, "
            f"got {type(point).__name__}"
        )
    if len(tensors) != len(reference) or any(
        not isinstance(t, Tensor) or t.shape != r.shape for t, (_, r) in zip(tensors, reference)
    ):
        raise ValueError(f"{owner}: a checkpoint does not match the parameters' shapes")
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])


def _reference_parameters(point: object, model: nn.Module | None) -> list[tuple[str, Tensor]]:
    if model is not None:
        return [(n, p.detach()) for n, p in model.named_parameters()]
    if isinstance(point, nn.Module):
        return [(n, p.detach()) for n, p in point.named_parameters()]
    if isinstance(point, dict):
        raise ValueError(
            "pca_directions: state_dicts hold buffers too; pass model= to say which entries "
            "are parameters"
        )
    return [(str(i), t) for i, t in enumerate(point)]


def _unflatten(vector: Tensor, reference: list[tuple[str, Tensor]]) -> Direction:
    out, start = [], 0
    for _, r in reference:
        out.append(vector[start : start + r.numel()].view(r.shape).to(r.device, r.dtype))
        start += r.numel()
    return out


def project_trajectory(
    trajectory: Sequence[object],
    directions: Sequence[Sequence[Tensor]],
    final: object | None = None,
    *,
    model: nn.Module | None = None,
) -> Tensor:
    r"""Coordinates of each checkpoint's offset from ``final`` in the span of ``directions``.

    Least squares, :math:`\arg\min_c \lVert \theta_t - \theta_{final} - \sum_k c_k d_k\rVert`,
    which is the dot product for the orthonormal directions of :func:`pca_directions`.

    Args:
        trajectory (Sequence): checkpoints (nn.Modules, state_dicts or parameter lists).
        directions (Sequence[list[Tensor]]): the directions.
        final: the origin; ``None`` takes the last checkpoint.
        model (nn.Module | None): names the parameters inside state_dicts.

    Returns:
        Tensor[T, k], float64: one row per checkpoint.

    Example:
        >>> path = [[torch.tensor([float(t), 0.0])] for t in range(3)]
        >>> project_trajectory(path, [[torch.tensor([1.0, 0.0])]])[:, 0].tolist()
        [-2.0, -1.0, 0.0]
    """
    owner = "project_trajectory"
    if len(trajectory) == 0:
        raise ValueError(f"{owner}: trajectory is empty")
    reference = _reference_parameters(trajectory[0], model)
    origin = _flat_parameters(trajectory[-1] if final is None else final, reference, owner)
    offsets = torch.stack([_flat_parameters(p, reference, owner) - origin for p in trajectory])
    basis = torch.stack([_flat_parameters(d, reference, owner) for d in directions], dim=1)
    return torch.linalg.lstsq(basis, offsets.T).solution.T


def pca_directions(
    trajectory: Sequence[object],
    final: object | None = None,
    n_components: int = 2,
    *,
    model: nn.Module | None = None,
) -> PCADirections:
    r"""The principal directions of a training trajectory (Li et al., 2018, Sec. 7).

    Random directions are nearly orthogonal to an optimisation path in high dimension, so Li et
    al. plot it in the plane of the top principal components of
    :math:`M = [\theta_0 - \theta_n; \dots; \theta_{n-1} - \theta_n]` (rows centred, as in their
    PCA). Use the directions in :func:`surface_2d` around the final model and overlay
    ``coordinates`` with :func:`plot_trajectory`.

    Args:
        trajectory (Sequence): checkpoints: nn.Modules, state_dicts (with ``model=``) or lists of
            parameter tensors, in training order.
        final: the end point; ``None`` takes the last checkpoint (then left out of ``M``).
        n_components (int): number of directions.
        model (nn.Module | None): names the parameters inside state_dicts.

    Returns:
        PCADirections: unit-norm directions (sign: largest entry positive), explained variance
        ratios, and the projected trajectory (every checkpoint, ``final`` at the origin).

    Example:
        >>> path = [[torch.tensor([float(t), 0.1 * t * t])] for t in range(5)]
        >>> pca = pca_directions(path, n_components=1)
        >>> float(pca.explained_variance_ratio[0]) > 0.9
        True
    """
    owner = "pca_directions"
    if not isinstance(n_components, int) or n_components < 1:
        raise ValueError(f"{owner}: n_components must be an int >= 1, got {n_components!r}")
    if len(trajectory) == 0:
        raise ValueError(f"{owner}: trajectory is empty")
    reference = _reference_parameters(trajectory[0], model)
    points = list(trajectory[:-1]) if final is None else list(trajectory)
    origin = _flat_parameters(trajectory[-1] if final is None else final, reference, owner)
    if len(points) < n_components + 1:
        raise ValueError(
            f"{owner}: {n_components} components need at least {n_components + 1} checkpoints "
            f"besides the final one, got {len(points)}"
        )
    rows = torch.stack([_flat_parameters(p, reference, owner) - origin for p in points])
    centred = rows - rows.mean(dim=0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:n_components]
    flip = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    components = components * flip
    ratio = singular.square() / singular.square().sum()
    directions = [_unflatten(c, reference) for c in components]
    offsets = torch.stack([_flat_parameters(p, reference, owner) - origin for p in trajectory])
    return PCADirections(directions, ratio[:n_components], offsets @ components.T)


# ---------------------------------------------------------------------------------------------
# plots


def _axes(ax: Any, projection: str | None = None) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    fig = plt.figure()
    return fig.add_subplot(projection=projection)


def plot_contour(
    surface: LandscapeSurface,
    *,
    ax: Any = None,
    levels: int | Sequence[float] = 30,
    filled: bool = False,
    log: bool = False,
    trajectory: Tensor | None = None,
) -> Any:
    """Contour (or filled contour) plot of a :class:`LandscapeSurface`, as in Li et al. (2018).

    Args:
        surface (LandscapeSurface): from :func:`surface_2d`.
        ax: matplotlib axes (``None``: a new figure).
        levels (int | Sequence[float]): contour levels.
        filled (bool): filled contours with a colour bar.
        log (bool): contour ``log10(loss)``, which shows sharp and flat regions together.
        trajectory (Tensor[T, 2] | None): coordinates to overlay (:func:`pca_directions`).

    Returns:
        the matplotlib axes.
    """
    ax = _axes(ax)
    values = surface.losses.clamp_min(1e-12).log10() if log else surface.losses
    a, b = torch.meshgrid(surface.alphas, surface.betas, indexing="ij")
    draw = ax.contourf if filled else ax.contour
    artist = draw(a.numpy(), b.numpy(), values.numpy(), levels=levels, cmap="viridis")
    if filled:
        ax.figure.colorbar(artist, ax=ax, label="log10 loss" if log else "loss")
    else:
        ax.clabel(artist, inline=True, fontsize=6)
    if trajectory is not None:
        plot_trajectory(trajectory, ax=ax)
    ax.set_xlabel("alpha")
    ax.set_ylabel("beta")
    return ax


def plot_surface_3d(surface: LandscapeSurface, *, ax: Any = None, log: bool = False) -> Any:
    """3-D surface plot of a :class:`LandscapeSurface` (``ax`` must be a 3-D axes if given).

    Returns:
        the matplotlib axes.
    """
    ax = _axes(ax, projection="3d")
    values = surface.losses.clamp_min(1e-12).log10() if log else surface.losses
    a, b = torch.meshgrid(surface.alphas, surface.betas, indexing="ij")
    ax.plot_surface(a.numpy(), b.numpy(), values.numpy(), cmap="viridis", linewidth=0)
    ax.set_xlabel("alpha")
    ax.set_ylabel("beta")
    ax.set_zlabel("log10 loss" if log else "loss")
    return ax


def plot_slice(landscape: LandscapeSlice, *, ax: Any = None, label: str | None = None) -> Any:
    """The loss along a :class:`LandscapeSlice` as a curve.

    Returns:
        the matplotlib axes.
    """
    ax = _axes(ax)
    ax.plot(landscape.alphas.numpy(), landscape.losses.numpy(), label=label)
    ax.set_xlabel("alpha")
    ax.set_ylabel("loss")
    if label is not None:
        ax.legend()
    return ax


def plot_trajectory(coordinates: Tensor, *, ax: Any = None) -> Any:
    """Overlay a projected trajectory ``Tensor[T, 2]`` (from :func:`pca_directions`).

    Returns:
        the matplotlib axes.
    """
    ax = _axes(ax)
    xy = coordinates.detach().cpu().numpy()
    ax.plot(xy[:, 0], xy[:, 1], "-o", color="tab:red", markersize=3, linewidth=1)
    ax.plot(xy[-1:, 0], xy[-1:, 1], "*", color="tab:red", markersize=10)
    return ax
