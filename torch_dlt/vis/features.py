"""What a unit responds to: images optimised to excite it (feature visualisation, Olah, Mordvintsev
& Schubert 2017) and the dataset images that excite it most (Zeiler & Fergus 2014)."""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_dlt.probes._state import forked_rng, restored_mode

__all__ = [
    "MaximizedActivation",
    "TopExamples",
    "infer_image_shape",
    "maximize_activation",
    "top_examples",
]


class MaximizedActivation(NamedTuple):
    """Optimised images (one per unit) and each unit's activation on its own image."""

    images: Tensor
    activations: Tensor


class TopExamples(NamedTuple):
    """The k inputs a unit likes best, their positions in the data and the activations."""

    images: Tensor
    indices: Tensor
    activations: Tensor


def _resolve_layer(model: nn.Module, layer: str | nn.Module, caller: str) -> tuple[str, nn.Module]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    if isinstance(layer, str):
        if layer not in modules:
            names = [n for n in modules if n]
            raise ValueError(
                f"{caller}: the model has no layer {layer!r}; its layers are {names[:20]}"
                + (" ..." if len(names) > 20 else "")
            )
        return layer, modules[layer]
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer:
                return name, module
        raise ValueError(f"{caller}: layer {type(layer).__name__} is not a submodule of the model")
    raise TypeError(f"{caller}: layer must be a module name or an nn.Module, got {type(layer)}")


class _Capture:
    """Forward hook keeping the layer's output; stops the forward there when ``stop`` is set."""

    class Stop(Exception):
        pass

    def __init__(self, module: nn.Module, stop: bool) -> None:
        self.output: Tensor | None = None
        self.stop = stop
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"the layer's output must be a Tensor to pick units from, got {type(output)}"
            )
        self.output = output
        if self.stop:
            raise _Capture.Stop

    def run(self, model: nn.Module, x: Tensor) -> Tensor:
        try:
            model(x)
        except _Capture.Stop:
            pass
        assert self.output is not None
        return self.output


def _unit_activations(output: Tensor, channels: Tensor) -> Tensor:
    """Row b's activation of unit ``channels[b]``: its mean over positions for [B, C, ...]."""
    picked = output[torch.arange(len(channels), device=output.device), channels.to(output.device)]
    return picked.flatten(1).mean(1) if picked.dim() > 1 else picked


def _first_parameter(model: nn.Module) -> Tensor | None:
    return next(model.parameters(), None)


def infer_image_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` that ``model`` accepts: C from its first conv layer, H = W tried in turn.

    The model's own ``input_size`` / ``in_channels`` attributes win when present; otherwise
    the side lengths 28, 32, 64, 224, 16, 8 are tried (32 first for 3 channels) with a forward
    pass in eval mode under ``no_grad``.

    Example:
        >>> from torch_dlt.nn import LeNet5
        >>> infer_image_shape(LeNet5(in_channels=3, input_size=32))
        (3, 32, 32)
    """
    channels = getattr(model, "in_channels", None)
    if not isinstance(channels, int):
        conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
        if conv is None:
            raise ValueError(
                "infer_image_shape: the model has no convolution to read the channel count "
                "from; pass image_shape=(C, H, W)"
            )
        channels = conv.in_channels
    sides = [28, 32, 64, 224, 16, 8] if channels != 3 else [32, 224, 64, 28, 16, 8]
    own = getattr(model, "input_size", None)
    if isinstance(own, int):
        sides.insert(0, own)
    param = _first_parameter(model)
    kwargs = {} if param is None else {"device": param.device, "dtype": param.dtype}
    with torch.no_grad(), restored_mode(model), forked_rng(model):
        for side in sides:
            try:
                model(torch.zeros(1, channels, side, side, **kwargs))
            except (RuntimeError, ValueError):
                continue
            return channels, side, side
    raise ValueError(
        f"infer_image_shape: the model accepted none of the {channels}-channel side lengths "
        f"{sides}; pass image_shape=(C, H, W)"
    )


def _fourier_scale(h: int, w: int, decay: float) -> Tensor:
    """1/|f|^decay spectrum weights of an rfft2 grid, RMS 1: pixels start decorrelated."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    f = torch.sqrt(fx * fx + fy * fy).clamp_min(1.0 / max(h, w))
    scale = f.pow(-decay)
    return scale / scale.square().mean().sqrt()


def _robustness_transform(
    x: Tensor, g: Tensor, jitter: int, scales: Sequence[float], degrees: float
) -> Tensor:
    """Jitter (roll), random rescale (interpolate + crop / pad) and rotation (affine_grid)."""
    h, w = x.shape[-2:]
    if jitter > 0:
        dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=g).tolist()
        x = torch.roll(x, (dy, dx), (2, 3))
    if scales:
        s = float(scales[int(torch.randint(len(scales), (1,), generator=g))])
        if s != 1.0:
            sh, sw = max(1, round(h * s)), max(1, round(w * s))
            x = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False)
            if s > 1.0:
                top, left = (sh - h) // 2, (sw - w) // 2
                x = x[..., top : top + h, left : left + w]
            else:
                top, left = (h - sh) // 2, (w - sw) // 2
                x = F.pad(x, (left, w - sw - left, top, h - sh - top), mode="replicate")
    if degrees > 0:
        angle = math.radians(degrees) * (2 * float(torch.rand((), generator=g)) - 1)
        c, s_ = math.cos(angle), math.sin(angle)
        theta = x.new_tensor([[c, -s_, 0.0], [s_, c, 0.0]]).expand(len(x), 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    if jitter > 0:
        small = max(1, jitter // 2)
        dy, dx = torch.randint(-small, small + 1, (2,), generator=g).tolist()
        x = torch.roll(x, (dy, dx), (2, 3))
    return x


def _total_variation(x: Tensor) -> Tensor:
    """Mean absolute difference of neighbouring pixels, per image ([B])."""
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    return dy + dx


def maximize_activation(
    model: nn.Module,
    layer: str | nn.Module,
    channels: int | Sequence[int],
    *,
    steps: int = 256,
    image_shape: tuple[int, int, int] | None = None,
    lr: float = 0.05,
    value_range: tuple[float, float] = (0.0, 1.0),
    decay: float = 1.0,
    color_correlation: Tensor | None = None,
    jitter: int | None = None,
    scales: Sequence[float] = (1.0, 0.975, 1.025, 0.95, 1.05),
    degrees: float = 5.0,
    tv_weight: float = 0.05,
    seed: int = 0,
) -> MaximizedActivation:
    r"""Images that maximise units' activations, after Olah, Mordvintsev & Schubert (2017).

    One image per requested unit, optimised together in one batch with Adam. Following the
    paper's recipe for images that look natural rather than adversarial:

    - **decorrelated parameterisation**: each image is the inverse real FFT of free Fourier
      coefficients scaled by :math:`1/|f|^{\text{decay}}`, so gradient steps move natural-image
      (1/f) statistics; channels are mixed by ``color_correlation`` (e.g. the square root of
      the data's channel covariance; identity by default) and squashed by a sigmoid into
      ``value_range``;
    - **transformation robustness**: every step sees the image jittered (``torch.roll``),
      rescaled (``F.interpolate``) and rotated (``F.affine_grid``) at random;
    - a **total-variation** penalty ``tv_weight * scale * TV(image)``, where ``scale`` is the
      units' activation spread over 8 uniform-noise images, so the weight means the same for
      every model.

    The objective of unit ``c`` is its output channel's mean over positions for a conv layer,
    or output ``c`` of a linear layer. The model's parameters, ``requires_grad`` flags,
    ``training`` flags, buffers and the global RNG states are the same afterwards.

    Args:
        model (nn.Module): the network; run in eval mode.
        layer (str | nn.Module): the layer (name in ``named_modules`` or the module).
        channels (int | Sequence[int]): unit(s) of that layer's output dimension 1.
        steps (int): optimisation steps.
        image_shape (tuple[int, int, int] | None): ``(C, H, W)``; ``None`` infers it
            (:func:`infer_image_shape`).
        lr (float): Adam step size on the Fourier coefficients.
        value_range (tuple[float, float]): pixel range of the model's inputs.
        decay (float): spectrum decay exponent of the parameterisation (0: plain pixels' FFT).
        color_correlation (Tensor[C, C] | None): channel mixing matrix.
        jitter (int | None): largest shift in pixels; ``None`` for ``max(1, H // 16)``.
        scales (Sequence[float]): rescaling factors drawn from.
        degrees (float): largest rotation.
        tv_weight (float): total-variation weight (relative, see above); 0 disables it.
        seed (int): seed of the initial coefficients and the random transforms.

    Returns:
        MaximizedActivation: ``images (Tensor[N, C, H, W])`` and ``activations (Tensor[N])``,
        each unit's activation on its own (untransformed) image.

    Example:
        >>> from torch_dlt.nn import LeNet5
        >>> net = LeNet5()
        >>> out = maximize_activation(net, "features.conv2", [0, 3], steps=5)
        >>> out.images.shape
        torch.Size([2, 1, 28, 28])
    """
    caller = "maximize_activation"
    name, module = _resolve_layer(model, layer, caller)
    units = [channels] if isinstance(channels, int) else channels
    if (
        not isinstance(units, (list, tuple, range))
        or not units
        or not all(isinstance(c, int) and not isinstance(c, bool) for c in units)
    ):
        raise TypeError(f"{caller}: channels must be an int or a non-empty sequence of ints")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{caller}: steps must be an int >= 0, got {steps!r}")
    if image_shape is None:
        image_shape = infer_image_shape(model)
    if len(image_shape) != 3 or not all(isinstance(s, int) and s > 0 for s in image_shape):
        raise ValueError(
            f"{caller}: image_shape must be (C, H, W) of positive ints, got {image_shape!r}"
        )
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(
            f"{caller}: value_range must be (low, high) with high > low, got {value_range!r}"
        )
    c, h, w = image_shape
    if color_correlation is not None and tuple(color_correlation.shape) != (c, c):
        raise ValueError(
            f"{caller}: color_correlation must be [{c}, {c}], got {tuple(color_correlation.shape)}"
        )
    param = _first_parameter(model)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    jitter = max(1, h // 16) if jitter is None else jitter
    units = list(units)
    n = len(units)
    g = torch.Generator().manual_seed(seed)
    scale = _fourier_scale(h, w, decay).to(device=device, dtype=dtype)
    mix = None if color_correlation is None else color_correlation.to(device=device, dtype=dtype)
    coeffs = (0.01 * torch.randn(n, c, h, w // 2 + 1, 2, generator=g, dtype=dtype)).to(device)
    coeffs.requires_grad_()
    unit_index = torch.tensor(units, device=device)

    def render(z: Tensor) -> Tensor:
        spectrum = torch.view_as_complex(z) * scale
        x = torch.fft.irfft2(spectrum, s=(h, w), norm="ortho")
        if mix is not None:
            x = torch.einsum("dc,nchw->ndhw", mix, x)
        return lo + (hi - lo) * torch.sigmoid(4.0 * x)

    capture = _Capture(module, stop=True)
    try:
        with restored_mode(model), forked_rng(model):
            with torch.no_grad():
                out = capture.run(model, render(coeffs))
                if out.dim() < 2 or max(units) >= out.shape[1] or min(units) < 0:
                    raise ValueError(
                        f"{caller}: layer {name!r} outputs {tuple(out.shape)}; channels must be "
                        f"in [0, {out.shape[1] - 1 if out.dim() >= 2 else 0}], got {units}"
                    )
                # The activations' spread over noise images sets the TV term's units.
                noise = lo + (hi - lo) * torch.rand(8, c, h, w, generator=g, dtype=dtype)
                noise_out = capture.run(model, noise.to(device))
                per_unit = noise_out.flatten(2).mean(2) if noise_out.dim() > 2 else noise_out
                spread = per_unit.std(0)
                tv_scale = spread[unit_index].clamp_min(1e-6)
            optimiser = torch.optim.Adam([coeffs], lr=lr)
            for _ in range(steps):
                image = render(coeffs)
                seen = _robustness_transform(image, g, jitter, scales, degrees)
                act = _unit_activations(capture.run(model, seen), unit_index)
                loss = (-act + tv_weight * tv_scale * _total_variation(image)).sum()
                (grad,) = torch.autograd.grad(loss, [coeffs])
                coeffs.grad = grad
                optimiser.step()
                coeffs.grad = None
            with torch.no_grad():
                images = render(coeffs)
                final = _unit_activations(capture.run(model, images), unit_index)
    finally:
        capture.handle.remove()
    return MaximizedActivation(images.detach(), final.detach())


def _batches(data: Tensor | Iterable, batch_size: int, caller: str) -> Iterable[Tensor]:
    if isinstance(data, Tensor):
        yield from data.split(batch_size)
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"{caller}: loader must be a Tensor [N, ...] or an iterable of batches "
            f"(Tensors or (x, y) pairs), got {type(data).__name__}"
        )
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{caller}: each batch must be a Tensor or start with one, got {type(x).__name__}"
            )
        yield x


def top_examples(
    model: nn.Module,
    layer: str | nn.Module,
    channel: int,
    loader: Tensor | Iterable,
    k: int = 9,
    *,
    batch_size: int = 256,
) -> TopExamples:
    """The ``k`` inputs that excite one unit most (Zeiler & Fergus 2014), best first.

    The unit's activation is its channel's mean over positions for a conv layer, or output
    ``channel`` of a linear layer, computed in eval mode without gradients; the model and the
    global RNG states are left as they were (an unseeded shuffling loader draws from them).

    Args:
        model (nn.Module): the network.
        layer (str | nn.Module): the layer (name in ``named_modules`` or the module).
        channel (int): the unit.
        loader (Tensor | Iterable): inputs ``Tensor[N, ...]`` or batches (Tensors or
            ``(x, y)`` pairs), e.g. a DataLoader.
        k (int): how many to keep.
        batch_size (int): batch size when ``loader`` is a Tensor.

    Returns:
        TopExamples: ``images (Tensor[k, ...])``, ``indices (Tensor[k])`` the positions in the
        order the data is visited (the dataset indices for an unshuffled loader) and
        ``activations (Tensor[k])``, sorted by decreasing activation.

    Example:
        >>> from torch_dlt.nn import LeNet5
        >>> x = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        >>> top = top_examples(LeNet5(), "features.conv1", 2, x, k=3)
        >>> top.images.shape, bool(top.activations[0] >= top.activations[-1])
        (torch.Size([3, 1, 28, 28]), True)
    """
    caller = "top_examples"
    name, module = _resolve_layer(model, layer, caller)
    if not isinstance(channel, int) or isinstance(channel, bool) or channel < 0:
        raise ValueError(f"{caller}: channel must be an int >= 0, got {channel!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"{caller}: k must be an int >= 1, got {k!r}")
    param = _first_parameter(model)
    best_x: Tensor | None = None
    best_a = best_i = None
    seen = 0
    capture = _Capture(module, stop=True)
    try:
        with torch.no_grad(), restored_mode(model), forked_rng(model):
            for x in _batches(loader, batch_size, caller):
                xin = x if param is None else x.to(device=param.device, dtype=param.dtype)
                out = capture.run(model, xin)
                if out.dim() < 2 or channel >= out.shape[1]:
                    raise ValueError(
                        f"{caller}: layer {name!r} outputs {tuple(out.shape)}; "
                        f"channel {channel} is out of range"
                    )
                act = out[:, channel].flatten(1).mean(1) if out.dim() > 2 else out[:, channel]
                act = act.detach().cpu()
                idx = torch.arange(seen, seen + len(x))
                seen += len(x)
                pool_x = x.detach().cpu() if best_x is None else torch.cat([best_x, x.cpu()])
                pool_a = act if best_a is None else torch.cat([best_a, act])
                pool_i = idx if best_i is None else torch.cat([best_i, idx])
                # Stable sort by decreasing activation: ties keep the earlier sample first.
                order = torch.sort(pool_a, descending=True, stable=True).indices[:k]
                best_x, best_a, best_i = pool_x[order], pool_a[order], pool_i[order]
    finally:
        capture.handle.remove()
    if best_x is None:
        raise ValueError(f"{caller}: the loader yielded no data")
    return TopExamples(best_x, best_i, best_a)
