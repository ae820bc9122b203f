"""Initialisers from signal-propagation theory: the edge of chaos (Poole et al. 2016; Schoenholz
et al. 2017), scaled orthogonal weights (Saxe et al. 2014; Pennington et al. 2017) and
delta-orthogonal convolutions (Xiao et al. 2018).

Glorot / Xavier initialisation is PyTorch's own ``torch.nn.init.xavier_normal_``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_dlt.theory.activations import ActivationLike
from torch_dlt.theory.meanfield import critical_sigma_w2

__all__ = ["activation_of", "critical_init_", "delta_orthogonal_", "edge_of_chaos_"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DISTRIBUTIONS = ("gaussian", "orthogonal")
# exact types: ReLU6 subclasses Hardtanh but is not hardtanh
_ACTIVATION_MODULES: Dict[type, str] = {
    nn.Tanh: "tanh",
    nn.ReLU: "relu",
    nn.Hardtanh: "hardtanh",
    nn.Sigmoid: "sigmoid",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.SELU: "selu",
}
_ACTIVATION_FUNCTIONS = {
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.relu: "relu",
    F.relu: "relu",
    F.hardtanh: "hardtanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    F.gelu: "gelu",
    F.silu: "silu",
    F.selu: "selu",
}
# elementwise activations the mean-field registry has no entry for
_OTHER_ACTIVATION_MODULES = (
    nn.CELU,
    nn.ELU,
    nn.Hardshrink,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.LogSigmoid,
    nn.Mish,
    nn.PReLU,
    nn.RReLU,
    nn.Softplus,
    nn.Softshrink,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
)


def _check_distribution(distribution: str) -> None:
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(
            f"distribution must be one of {', '.join(map(repr, _DISTRIBUTIONS))}, "
            f"got {distribution!r}"
        )


def _check_weight(tensor: Tensor, argument: str) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{argument} must be a Tensor, got {type(tensor).__name__}")
    if isinstance(tensor, nn.parameter.UninitializedParameter):
        raise ValueError(f"{argument} is an uninitialised lazy parameter; run a forward pass first")
    if not tensor.is_floating_point():
        raise TypeError(f"{argument} must be floating point, got {tensor.dtype}")


def _orthonormal(rows: int, cols: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """A Haar-random matrix [rows, cols] with orthonormal columns (rows >= cols) or rows.

    QR of a Gaussian matrix with R's diagonal signs folded into Q, which makes Q Haar-distributed
    (Mezzadri 2007, "How to generate random matrices from the classical compact groups").
    """
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    tall = torch.empty(max(rows, cols), min(rows, cols), dtype=dtype, device=like.device)
    tall.normal_(generator=generator)
    q, r = torch.linalg.qr(tall)
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(dtype)
    return q if rows >= cols else q.T


def _edge_of_chaos_weight_(
    weight: Tensor, sigma_w2: float, distribution: str, generator: torch.Generator | None
) -> None:
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    if distribution == "gaussian":
        weight.normal_(0.0, math.sqrt(sigma_w2 / fan_in), generator=generator)
    else:
        # entries of variance sigma_w2 / fan_in, as in the gaussian case
        scale = math.sqrt(sigma_w2 * max(fan_out, fan_in) / fan_in)
        matrix = _orthonormal(fan_out, fan_in, weight, generator)
        weight.copy_((scale * matrix).reshape(weight.shape))


def _edge_of_chaos_layer_(
    layer: nn.Module,
    sigma_w2: float,
    sigma_b2: float,
    distribution: str,
    generator: torch.Generator | None,
) -> None:
    _edge_of_chaos_weight_(layer.weight, sigma_w2, distribution, generator)
    if layer.bias is not None:
        layer.bias.normal_(0.0, math.sqrt(sigma_b2), generator=generator)


def _check_layer(name: str, layer: nn.Module) -> None:
    label = f"layer {name!r} ({type(layer).__name__})" if name else type(layer).__name__
    if layer.weight is None:
        raise ValueError(f"{label} has no weight to initialise")
    _check_weight(layer.weight, f"{label}.weight")


def edge_of_chaos_(
    tensor_or_module: Union[Tensor, nn.Module],
    activation: ActivationLike = "tanh",
    sigma_b2: float = 0.05,
    *,
    distribution: str = "gaussian",
    generator: torch.Generator | None = None,
) -> Union[Tensor, nn.Module]:
    r"""Initialise weights on the order-to-chaos line of mean-field theory, in place.

    Poole et al. (2016), "Exponential expressivity in deep neural networks through transient
    chaos"; Schoenholz et al. (2017), "Deep information propagation". With
    :math:`W_{ij} \sim \mathcal{N}(0, \sigma_w^2 / \text{fan\_in})` and biases
    :math:`\mathcal{N}(0, \sigma_b^2)`, choosing :math:`\sigma_w^2` so that

    .. math::
        \chi_1 = \sigma_w^2\, \mathbb{E}_{z}\big[\phi'(\sqrt{q^*} z)^2\big] = 1

    makes the correlation depth scale :math:`\xi_c` infinite: signals and gradients neither
    vanish nor explode with depth. ``distribution="orthogonal"`` draws a Haar-random
    (semi-)orthogonal matrix with entries of the same variance
    :math:`\sigma_w^2 / \text{fan\_in}` (Saxe et al. 2014; Pennington et al. 2017), so
    :math:`W^\top W = \sigma_w^2 \frac{\text{fan\_out}}{\text{fan\_in}} I` when
    fan_out >= fan_in and :math:`W W^\top = \sigma_w^2 I` otherwise. Convolution weights
    ``[out, in, *kernel]`` are treated as the matrix ``[out, in * prod(kernel)]``.

    Args:
        tensor_or_module: a weight (Tensor[out, in, \*kernel], at least 2-D) or a
            ``Linear`` / ``Conv1d`` / ``Conv2d`` / ``Conv3d`` layer, whose bias is then drawn from
            :math:`\mathcal{N}(0, \sigma_b^2)`.
        activation: the non-linearity after the layer: a name (see
            ``torch_dlt.theory.ACTIVATIONS``), a ``torch_dlt.theory.Activation`` or a
            numpy-vectorised callable.
        sigma_b2: bias variance :math:`\sigma_b^2 \ge 0`.
        distribution: ``"gaussian"`` or ``"orthogonal"``.
        generator: the torch.Generator to sample from.

    Returns:
        ``tensor_or_module``, initialised.

    Raises:
        ValueError: no edge of chaos for this activation and sigma_b2, a bad distribution,
            or a weight with fewer than 2 dimensions.
        TypeError: neither a Tensor nor a supported layer.

    Example:
        >>> layer = torch.nn.Linear(400, 300)
        >>> g = torch.Generator().manual_seed(0)
        >>> _ = edge_of_chaos_(layer, "tanh", sigma_b2=0.05, generator=g)
        >>> round(400 * layer.weight.var().item(), 2)  # critical sigma_w2 of tanh at 0.05: 1.761
        1.76
    """
    _check_distribution(distribution)
    if isinstance(tensor_or_module, Tensor):
        _check_weight(tensor_or_module, "tensor")
        if tensor_or_module.dim() < 2:
            raise ValueError(
                "edge_of_chaos_ needs a weight with at least 2 dimensions [out, in, *kernel], "
                f"got shape {tuple(tensor_or_module.shape)}"
            )
        sigma_w2 = critical_sigma_w2(activation, sigma_b2)
        with torch.no_grad():
            _edge_of_chaos_weight_(tensor_or_module, sigma_w2, distribution, generator)
        return tensor_or_module
    if not isinstance(tensor_or_module, _LAYERS):
        raise TypeError(
            "edge_of_chaos_ takes a weight Tensor or an nn.Linear / Conv1d / Conv2d / Conv3d, "
            f"got {type(tensor_or_module).__name__}; for a whole model use critical_init_"
        )
    _check_layer("", tensor_or_module)
    sigma_w2 = critical_sigma_w2(activation, sigma_b2)
    with torch.no_grad():
        _edge_of_chaos_layer_(tensor_or_module, sigma_w2, sigma_b2, distribution, generator)
    return tensor_or_module


def activation_of(model: nn.Module) -> str:
    """The name of the activation a model declares or uses, for the mean-field maps.

    Read from ``model.activation`` if set (a name, an activation module, or one of
    ``torch.tanh`` / ``F.relu`` / ...), else from the model's activation modules when exactly one
    kind of ``Tanh``, ``ReLU``, ``Hardtanh`` (bounds -1, 1), ``Sigmoid``, ``GELU``, ``SiLU``,
    ``SELU`` occurs and no other elementwise activation module does.

    Args:
        model: the network.

    Returns:
        A key of ``torch_dlt.theory.ACTIVATIONS`` (or ``model.activation`` if it is a string).

    Raises:
        ValueError: the activation cannot be told; the message says what was found.

    Example:
        >>> activation_of(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.SiLU()))
        'silu'
    """
    declared = getattr(model, "activation", None)
    # a function stored as a class attribute comes back bound to the model
    declared = getattr(declared, "__func__", declared)
    if isinstance(declared, str):
        return declared
    if type(declared) in _ACTIVATION_MODULES:
        return _ACTIVATION_MODULES[type(declared)]
    if callable(declared) and declared in _ACTIVATION_FUNCTIONS:
        return _ACTIVATION_FUNCTIONS[declared]
    if declared is not None:
        raise ValueError(
            f"model.activation is {declared!r}, which names no known activation; pass "
            "activation= (a name, a torch_dlt.theory.Activation or a numpy callable)"
        )
    known: Dict[str, str] = {}  # module class name -> activation name
    unsupported = set()
    for module in model.modules():
        name = _ACTIVATION_MODULES.get(type(module))
        bounds = (getattr(module, "min_val", -1.0), getattr(module, "max_val", 1.0))
        if name is not None and bounds == (-1.0, 1.0):
            known[type(module).__name__] = name
        elif isinstance(module, _OTHER_ACTIVATION_MODULES):
            unsupported.add(type(module).__name__)
    if unsupported:
        raise ValueError(
            f"the model uses {', '.join(sorted(unsupported))}, which the mean-field registry "
            "does not know; pass activation= (a name, a torch_dlt.theory.Activation or a numpy "
            "callable)"
        )
    if len(known) != 1:
        found = ", ".join(sorted(known)) or "no activation module (functional calls are invisible)"
        raise ValueError(
            f"cannot tell the model's activation: found {found}; pass activation= "
            f"(one of {', '.join(sorted(set(_ACTIVATION_MODULES.values())))}, or a callable)"
        )
    return next(iter(known.values()))


def critical_init_(
    model: nn.Module,
    activation: ActivationLike | None = None,
    sigma_b2: float = 0.05,
    *,
    distribution: str = "gaussian",
    generator: torch.Generator | None = None,
) -> nn.Module:
    r"""Initialise every Linear and Conv layer of a model at the edge of chaos, in place.

    Each ``Linear`` / ``Conv1d`` / ``Conv2d`` / ``Conv3d`` gets weights of variance
    :math:`\sigma_w^{2*} / \text{fan\_in}` (or scaled orthogonal ones) and biases of variance
    :math:`\sigma_b^2`, with :math:`\sigma_w^{2*}` the critical weight variance where
    :math:`\chi_1 = 1` (Poole et al. 2016; Schoenholz et al. 2017); see `edge_of_chaos_`.

    Args:
        model: the network.
        activation: its non-linearity (name, ``torch_dlt.theory.Activation`` or numpy callable).
            If omitted it is read from ``model.activation`` (a name, an activation module, or
            one of ``torch.tanh`` / ``F.relu`` / ...), else from the model's activation modules
            when exactly one kind of ``Tanh``, ``ReLU``, ``Hardtanh`` (bounds -1, 1),
            ``Sigmoid``, ``GELU``, ``SiLU``, ``SELU`` occurs (``GELU(approximate="tanh")``
            counts as gelu, whose maps it matches to ~1e-4).
        sigma_b2: bias variance, >= 0.
        distribution: ``"gaussian"`` or ``"orthogonal"``.
        generator: the torch.Generator to sample from.

    Returns:
        ``model``, initialised.

    Raises:
        ValueError: the activation cannot be told (the message says what was found), no
            Linear / Conv layer, a layer without weight, or no edge of chaos for this
            activation and sigma_b2. The model is left untouched.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(),
        ...                           torch.nn.Linear(256, 10))
        >>> _ = critical_init_(net, sigma_b2=0.05, generator=torch.Generator().manual_seed(0))
        >>> round(256 * net[2].weight.var().item(), 1)
        1.8
    """
    _check_distribution(distribution)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers: List[Tuple[str, nn.Module]] = [
        (name, module) for name, module in model.named_modules() if isinstance(module, _LAYERS)
    ]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear / Conv1d / Conv2d / Conv3d layer to "
            "initialise"
        )
    for name, layer in layers:
        _check_layer(name, layer)
    sigma_w2 = critical_sigma_w2(
        activation_of(model) if activation is None else activation, sigma_b2
    )
    with torch.no_grad():
        for _, layer in layers:
            _edge_of_chaos_layer_(layer, sigma_w2, sigma_b2, distribution, generator)
    return model


def delta_orthogonal_(
    conv_weight: Tensor, gain: float = 1.0, *, generator: torch.Generator | None = None
) -> Tensor:
    r"""Delta-orthogonal initialisation of a convolution weight, in place.

    Xiao et al. (2018), "Dynamical isometry and a mean field theory of CNNs": every tap is zero
    except the spatial centre (index ``k // 2`` along each kernel axis), which is
    ``gain`` times a Haar-random matrix :math:`H \in \mathbb{R}^{\text{out} \times \text{in}}`
    with orthonormal columns, :math:`H^\top H = I`. The convolution then maps each pixel's
    channel vector by :math:`\text{gain}\, H`, so :math:`\lVert \text{conv}(x) \rVert =
    \text{gain} \lVert x \rVert` and every singular value of its input-output Jacobian is
    ``gain``: dynamical isometry at any depth for ``gain`` on the critical line.

    Args:
        conv_weight (Tensor[out, in, \*kernel]): a Conv1d/2d/3d weight with out >= in.
        gain: the scale of the centre tap (the mean-field :math:`\sigma_w`).
        generator: the torch.Generator to sample from.

    Returns:
        ``conv_weight``, initialised.

    Raises:
        ValueError: not 3- to 5-dimensional, or out < in (no orthonormal columns).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> w = delta_orthogonal_(torch.empty(16, 8, 3, 3), gain=2.0, generator=g)
        >>> centre = w[:, :, 1, 1]
        >>> torch.allclose(centre.T @ centre, 4 * torch.eye(8), atol=1e-5)
        True
        >>> w[:, :, 0, 0].abs().max().item()
        0.0
    """
    _check_weight(conv_weight, "conv_weight")
    if not 3 <= conv_weight.dim() <= 5:
        raise ValueError(
            "delta_orthogonal_ needs a Conv1d/2d/3d weight [out, in, *kernel] (3 to 5 dims), "
            f"got shape {tuple(conv_weight.shape)}"
        )
    out_channels, in_channels = conv_weight.shape[:2]
    if out_channels < in_channels:
        raise ValueError(
            "delta_orthogonal_ needs out_channels >= in_channels (per group) for an orthogonal "
            f"centre tap, got shape {tuple(conv_weight.shape)}"
        )
    gain = float(gain)
    if not math.isfinite(gain):
        raise ValueError(f"gain must be finite, got {gain}")
    centre = (slice(None), slice(None), *(k // 2 for k in conv_weight.shape[2:]))
    with torch.no_grad():
        conv_weight.zero_()
        conv_weight[centre] = gain * _orthonormal(out_channels, in_channels, conv_weight, generator)
    return conv_weight
