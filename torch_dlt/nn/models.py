"""Reference models: LeNet-5 (LeCun et al. 1998), Wong & Kolter's (2018) small CNN, and deep
same-width MLPs / CNNs.

The deep nets are the objects of mean-field signal-propagation theory (Poole et al. 2016;
Schoenholz et al. 2017); each model exposes its activation's name so initialisers can read it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "DeepCNN", "DeepMLP", "Erf", "LeNet5", "activation_layer", "cnn_small"]


class Erf(nn.Module):
    """The error function as a layer, the activation of closed-form mean-field maps (Williams 1997).

    Example:
        >>> Erf()(torch.zeros(2))
        tensor([0., 0.])
    """

    def forward(self, x: Tensor) -> Tensor:
        return torch.erf(x)


# The same names as torch_dlt.theory.ACTIVATIONS, so a model's .activation feeds the theory.
_ACTIVATION_LAYERS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "erf": Erf,
    "hardtanh": nn.Hardtanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "selu": nn.SELU,
    "linear": nn.Identity,
}

ACTIVATIONS: tuple = tuple(_ACTIVATION_LAYERS)
"""Names accepted by ``activation=`` in this module's models."""

_POOLINGS = ("avg", "max")


def _input_check_hook(module: nn.Module, args: tuple) -> None:
    module._check_input(args)


def activation_layer(name: str) -> nn.Module:
    """A fresh activation module for ``name`` (one of :data:`ACTIVATIONS`).

    Modules rather than functional calls so that forward hooks see each activation.

    Args:
        name (str): ``"tanh"``, ``"relu"``, ``"erf"``, ``"hardtanh"`` (clip to [-1, 1]),
            ``"sigmoid"``, ``"gelu"`` (exact, erf-based), ``"silu"``, ``"selu"`` or
            ``"linear"`` (identity).

    Returns:
        nn.Module: e.g. ``nn.Tanh()`` for ``"tanh"``.

    Example:
        >>> activation_layer("relu")
        ReLU()
    """
    if not isinstance(name, str) or name not in _ACTIVATION_LAYERS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return _ACTIVATION_LAYERS[name]()


def _check_positive_int(value: object, argument: str, owner: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {argument} must be a positive int, got {value!r}")


def _check_pooling(pooling: object, owner: str) -> None:
    if pooling not in _POOLINGS:
        raise ValueError(f"{owner}: pooling must be one of {_POOLINGS}, got {pooling!r}")


def cnn_small(in_channels: int = 1, input_size: int = 28, num_classes: int = 10) -> nn.Sequential:
    """Wong & Kolter's (2018) "small" MNIST network: conv 16 4x4/2, conv 32 4x4/2, fc 100, fc 10.

    The benchmark network of certified training (Wong & Kolter 2018, "Provable defenses against
    adversarial examples via the convex outer adversarial polytope"; Gowal et al. 2018; Zhang et
    al. 2020): ReLU after each layer but the last, padding 1, so each convolution halves the
    image. A plain ``nn.Sequential`` of the layers the bound engine supports.

    Args:
        in_channels (int): channels of the input image.
        input_size (int): side of the square input, a multiple of 4.
        num_classes (int): outputs.

    Returns:
        nn.Sequential: the network for inputs ``[B, in_channels, input_size, input_size]``.

    Example:
        >>> cnn_small()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    if input_size < 4 or input_size % 4:
        raise ValueError(f"cnn_small: input_size must be a multiple of 4, got {input_size}")
    side = input_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * side * side, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


class LeNet5(nn.Module):
    r"""LeNet-5 as it is usually presented today (LeCun, Bottou, Bengio & Haffner 1998).

    ``conv 6@5x5 -> act -> pool 2x2 -> conv 16@5x5 -> act -> pool 2x2 -> fc 120 -> act ->
    fc 84 -> act -> fc num_classes``. The first convolution pads by 2 for 28x28 input (MNIST)
    and not at all for the paper's 32x32 input, so both reach the 16x5x5 feature map and have
    the same parameters: 61,706 for one input channel and 10 classes. Unlike the paper, C3 is
    fully connected to S2, the subsampling layers have no trainable coefficients, the tanh is
    not scaled by 1.7159 and the output is linear rather than Gaussian (RBF) units.

    Args:
        num_classes (int): size of the output.
        in_channels (int): channels of the input images.
        input_size (int): side of the square input, 28 or 32.
        activation (str): one of :data:`ACTIVATIONS`; ``"tanh"`` as in the paper.
        pooling (str): ``"avg"`` (the paper's subsampling) or ``"max"``.

    Shape:
        - Input: ``[B, in_channels, input_size, input_size]``
        - Output: ``[B, num_classes]``

    Example:
        >>> import torch
        >>> net = LeNet5()
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> sum(p.numel() for p in net.parameters())
        61706
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 1,
        input_size: int = 28,
        activation: str = "tanh",
        pooling: str = "avg",
    ) -> None:
        super().__init__()
        _check_positive_int(num_classes, "num_classes", "LeNet5")
        _check_positive_int(in_channels, "in_channels", "LeNet5")
        if input_size not in (28, 32):
            raise ValueError(f"LeNet5: input_size must be 28 or 32, got {input_size!r}")
        activation_layer(activation)
        _check_pooling(pooling, "LeNet5")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_size = input_size
        self.activation = activation
        self.pooling = pooling
        pool = nn.AvgPool2d if pooling == "avg" else nn.MaxPool2d
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, 6, 5, padding=(32 - input_size) // 2),
                act1=activation_layer(activation),
                pool1=pool(2),
                conv2=nn.Conv2d(6, 16, 5),
                act2=activation_layer(activation),
                pool2=pool(2),
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(16 * 5 * 5, 120),
                act3=activation_layer(activation),
                fc2=nn.Linear(120, 84),
                act4=activation_layer(activation),
                fc3=nn.Linear(84, num_classes),
            )
        )
        # The input check runs as a pre-hook, outside forward, so that torch.fx traces the
        # forward as the plain chain of layers it is (the curvature and bound engines read it).
        self.register_forward_pre_hook(_input_check_hook)

    def _check_input(self, args: tuple) -> None:
        x = args[0]
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"LeNet5: expected input of shape [B, {', '.join(map(str, expected))}], "
                f"got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, activation={self.activation!r}, "
            f"pooling={self.pooling!r}"
        )


class DeepMLP(nn.Module):
    r"""A fully connected net of ``depth`` hidden layers of equal ``width`` and a linear readout.

    :math:`h^1 = W^1 x + b^1`, :math:`h^{l+1} = W^{l+1}\phi(h^l) + b^{l+1}`, the random deep
    net whose pre-activations :math:`h^l` mean-field theory follows (Poole et al. 2016;
    Schoenholz et al. 2017). Modules are named ``layers.fc1, layers.act1, ...,
    layers.fc{depth}, layers.act{depth}, layers.readout``; inputs are flattened from dim 1, so
    images ``[B, C, H, W]`` with ``C * H * W == in_features`` are accepted.

    Args:
        in_features (int): size of the (flattened) input.
        width (int): units in every hidden layer.
        depth (int): number of hidden layers (affine map + activation); ``depth + 1`` Linear
            layers in all.
        out_features (int): size of the output.
        activation (str): one of :data:`ACTIVATIONS`, kept as ``self.activation``.
        bias (bool): whether the Linear layers have biases.

    Shape:
        - Input: ``[B, in_features]`` or ``[B, *]`` flattening to it
        - Output: ``[B, out_features]``

    Example:
        >>> import torch
        >>> net = DeepMLP(64, width=32, depth=3, out_features=10, activation="relu")
        >>> net(torch.zeros(5, 1, 8, 8)).shape
        torch.Size([5, 10])
        >>> net.activation
        'relu'
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        depth: int,
        out_features: int,
        activation: str = "tanh",
        bias: bool = True,
    ) -> None:
        super().__init__()
        for value, argument in (
            (in_features, "in_features"),
            (width, "width"),
            (depth, "depth"),
            (out_features, "out_features"),
        ):
            _check_positive_int(value, argument, "DeepMLP")
        activation_layer(activation)
        self.in_features = in_features
        self.width = width
        self.depth = depth
        self.out_features = out_features
        self.activation = activation
        stack: OrderedDict = OrderedDict()
        fan_in = in_features
        for layer in range(1, depth + 1):
            stack[f"fc{layer}"] = nn.Linear(fan_in, width, bias=bias)
            stack[f"act{layer}"] = activation_layer(activation)
            fan_in = width
        stack["readout"] = nn.Linear(width, out_features, bias=bias)
        self.layers = nn.Sequential(stack)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.flatten(1))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, width={self.width}, depth={self.depth}, "
            f"out_features={self.out_features}, activation={self.activation!r}"
        )


class DeepCNN(nn.Module):
    r"""``depth`` same-width 2-d convolutions with an activation, global pooling, a linear head.

    The convolutional counterpart of :class:`DeepMLP` studied by Xiao et al. (2018): every
    convolution keeps the spatial size (odd ``kernel_size``, zero padding
    ``kernel_size // 2``). Modules are named ``layers.conv1, layers.act1, ...,
    layers.conv{depth}, layers.act{depth}, layers.pool, layers.flatten, layers.readout``.

    Args:
        in_channels (int): channels of the input images.
        width (int): channels of every convolution.
        depth (int): number of convolution + activation layers.
        out_features (int): size of the output.
        activation (str): one of :data:`ACTIVATIONS`, kept as ``self.activation``.
        kernel_size (int): odd side of the square kernels.
        bias (bool): whether convolutions and head have biases.
        pooling (str): global ``"avg"`` or ``"max"`` pooling before the head.

    Shape:
        - Input: ``[B, in_channels, H, W]``
        - Output: ``[B, out_features]``

    Example:
        >>> import torch
        >>> net = DeepCNN(1, width=8, depth=4, out_features=10)
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        depth: int,
        out_features: int,
        activation: str = "tanh",
        kernel_size: int = 3,
        bias: bool = True,
        pooling: str = "avg",
    ) -> None:
        super().__init__()
        for value, argument in (
            (in_channels, "in_channels"),
            (width, "width"),
            (depth, "depth"),
            (out_features, "out_features"),
            (kernel_size, "kernel_size"),
        ):
            _check_positive_int(value, argument, "DeepCNN")
        if kernel_size % 2 == 0:
            raise ValueError(
                f"DeepCNN: kernel_size must be odd to keep the spatial size, got {kernel_size}"
            )
        activation_layer(activation)
        _check_pooling(pooling, "DeepCNN")
        self.in_channels = in_channels
        self.width = width
        self.depth = depth
        self.out_features = out_features
        self.activation = activation
        self.kernel_size = kernel_size
        self.pooling = pooling
        stack: OrderedDict = OrderedDict()
        channels = in_channels
        for layer in range(1, depth + 1):
            stack[f"conv{layer}"] = nn.Conv2d(
                channels, width, kernel_size, padding=kernel_size // 2, bias=bias
            )
            stack[f"act{layer}"] = activation_layer(activation)
            channels = width
        stack["pool"] = nn.AdaptiveAvgPool2d(1) if pooling == "avg" else nn.AdaptiveMaxPool2d(1)
        stack["flatten"] = nn.Flatten()
        stack["readout"] = nn.Linear(width, out_features, bias=bias)
        self.layers = nn.Sequential(stack)
        # The input check runs as a pre-hook, outside forward, so that torch.fx traces the
        # forward as the plain chain of layers it is (the curvature and bound engines read it).
        self.register_forward_pre_hook(_input_check_hook)

    def _check_input(self, args: tuple) -> None:
        x = args[0]
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DeepCNN: expected input of shape [B, {self.in_channels}, H, W], "
                f"got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, width={self.width}, depth={self.depth}, "
            f"out_features={self.out_features}, activation={self.activation!r}, "
            f"kernel_size={self.kernel_size}, pooling={self.pooling!r}"
        )
