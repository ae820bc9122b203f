"""Loss-landscape probes: filter-normalised random directions, 1-D slices, 2-D surfaces, PCA paths.

Implements Li, Xu, Taylor, Studer & Goldstein (2018), "Visualizing the loss landscape of neural
nets": the loss is evaluated at ``weights + alpha * d1 + beta * d2`` on the user's own model.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

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

    bar = tqdm(total=len(batches) * len(starts), desc=desc, disable=not progress, leave=False)
    with torch.no_grad(), restored_mode(model, eval_mode=not train, restore_buffers=True):
        with forked_rng(model):
            if train:
                model.train()
            for batch in batches:
                weight = _batch_size(batch)
                n_samples += weight
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
                    bar.update(1)
    bar.close()
    return totals / n_samples


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
        chunk_size (int | None): grid points per vmapped call (``None``: one at a time on the
            CPU, by parameter count on accelerators).
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

    Grid points are evaluated with :func:`torch.func.functional_call`, vmapped over chunks of
    points (one loop over the data serves the whole grid); models vmap cannot batch, and every
    model in train mode, are evaluated point by point. The model runs in eval mode by default
    (BatchNorm uses its running statistics; ``train=True`` uses batch statistics); its
    parameters, buffers, ``training`` and ``requires_grad`` flags and the global RNG are restored.

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
        chunk_size (int | None): grid points per vmapped call (``None``: one at a time on the
            CPU, by parameter count on accelerators);
            1 evaluates point by point, which is faster for convolutional nets on a CPU, where
            vmap turns convolutions into grouped ones.
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
