"""Elementwise activations as numpy functions with their derivatives, for the mean-field maps.

The registry holds the activations of Poole et al. (2016) and Schoenholz et al. (2017) and the
ones used in practice since; any other scalar function can be wrapped with
`Activation.from_callable`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["ACTIVATIONS", "Activation", "ActivationLike", "resolve_activation"]

ArrayFunction = Callable[[np.ndarray], np.ndarray]

# Klambauer et al. 2017, "Self-normalizing neural networks": the constants that make
# (mean 0, variance 1) a fixed point of the SELU moment map.
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _erf(u: np.ndarray) -> np.ndarray:
    # numpy has no vectorised erf; torch's float64 kernel is exact to double precision.
    return torch.special.erf(torch.from_numpy(np.ascontiguousarray(u, dtype=np.float64))).numpy()


def _sigmoid(u: np.ndarray) -> np.ndarray:
    # the tanh form neither overflows nor loses the tail for large |u|
    return 0.5 * (1.0 + np.tanh(0.5 * u))


def _normal_cdf(u: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(u / math.sqrt(2.0)))


def _normal_pdf(u: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)


def _selu(u: np.ndarray) -> np.ndarray:
    return _SELU_SCALE * np.where(u > 0, u, _SELU_ALPHA * np.expm1(np.minimum(u, 0.0)))


def _selu_derivative(u: np.ndarray) -> np.ndarray:
    return _SELU_SCALE * np.where(u > 0, 1.0, _SELU_ALPHA * np.exp(np.minimum(u, 0.0)))


def _five_point_derivative(function: ArrayFunction) -> ArrayFunction:
    """Central 5-point finite difference, step relative to |u|: truncation O(h^4) ~ 1e-12."""

    def derivative(u: np.ndarray) -> np.ndarray:
        u = np.asarray(u, dtype=np.float64)
        h = 1e-3 * np.maximum(1.0, np.abs(u))
        return (
            function(u - 2 * h) - 8 * function(u - h) + 8 * function(u + h) - function(u + 2 * h)
        ) / (12 * h)

    return derivative


@dataclass(frozen=True)
class Activation:
    """An elementwise activation phi for the mean-field maps.

    Attributes:
        name: how errors and plots call it.
        function: phi, mapping a float64 ndarray elementwise to one of the same shape.
        derivative: phi', same convention (its value on the kinks themselves is never used).
        kinks: points where phi or phi' jumps; the quadrature splits its panels there.
        positively_homogeneous: phi(a u) = a phi(u) for all a > 0 (relu, linear), which makes
            the length map affine in q: q -> sigma_w2 * E[phi(z)^2] * q + sigma_b2.

    Example:
        >>> import numpy as np
        >>> softplus = Activation.from_callable(lambda u: np.logaddexp(0.0, u), name="softplus")
        >>> round(float(softplus.derivative(np.array([0.0]))[0]), 9)
        0.5
    """

    name: str
    function: ArrayFunction
    derivative: ArrayFunction
    kinks: Tuple[float, ...] = ()
    positively_homogeneous: bool = False

    @classmethod
    def from_callable(
        cls,
        function: ArrayFunction,
        derivative: ArrayFunction | None = None,
        *,
        name: str | None = None,
        kinks: Sequence[float] = (),
    ) -> Activation:
        """Wrap a numpy-vectorised scalar function.

        Args:
            function: phi, elementwise on float64 ndarrays (e.g. ``np.tanh``).
            derivative: phi'; without it a central 5-point finite difference is used
                (relative accuracy ~1e-10 away from kinks).
            name: a label; defaults to the function's ``__name__``.
            kinks: points where phi or phi' is not smooth.

        Returns:
            The activation.
        """
        if not callable(function):
            raise TypeError(f"function must be callable, got {type(function).__name__}")
        if derivative is not None and not callable(derivative):
            raise TypeError(f"derivative must be callable or None, got {type(derivative).__name__}")
        return cls(
            name=name or getattr(function, "__name__", "callable"),
            function=function,
            derivative=derivative or _five_point_derivative(function),
            kinks=tuple(float(k) for k in kinks),
        )


ACTIVATIONS: Dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("tanh", np.tanh, lambda u: 1.0 - np.tanh(u) ** 2),
        Activation(
            "relu",
            lambda u: np.maximum(u, 0.0),
            lambda u: (u > 0).astype(np.float64),
            kinks=(0.0,),
            positively_homogeneous=True,
        ),
        Activation("erf", _erf, lambda u: (2.0 / math.sqrt(math.pi)) * np.exp(-u * u)),
        Activation(
            "hardtanh",
            lambda u: np.clip(u, -1.0, 1.0),
            lambda u: (np.abs(u) < 1).astype(np.float64),
            kinks=(-1.0, 1.0),
        ),
        Activation("sigmoid", _sigmoid, lambda u: _sigmoid(u) * _sigmoid(-u)),
        Activation(
            "gelu",
            lambda u: u * _normal_cdf(u),
            lambda u: _normal_cdf(u) + u * _normal_pdf(u),
        ),
        Activation(
            "silu",
            lambda u: u * _sigmoid(u),
            lambda u: _sigmoid(u) * (1.0 + u * _sigmoid(-u)),
        ),
        Activation("selu", _selu, _selu_derivative, kinks=(0.0,)),
        Activation(
            "linear",
            lambda u: np.asarray(u, dtype=np.float64),
            np.ones_like,
            positively_homogeneous=True,
        ),
    )
}

ActivationLike = Union[str, Activation, ArrayFunction]


def resolve_activation(activation: ActivationLike) -> Activation:
    """The `Activation` for a registry name, an `Activation`, or a numpy-vectorised callable.

    Args:
        activation: one of ``ACTIVATIONS`` (case-insensitive), an `Activation`, or a callable
            phi (its derivative then by finite differences, see `Activation.from_callable`).

    Returns:
        The activation.

    Raises:
        ValueError: an unknown name (the message lists the accepted ones).
        TypeError: anything else.

    Example:
        >>> resolve_activation("ReLU").kinks
        (0.0,)
    """
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        try:
            return ACTIVATIONS[activation.lower()]
        except KeyError:
            raise ValueError(
                f"unknown activation {activation!r}; accepted names: {', '.join(ACTIVATIONS)}, "
                "or a callable / torch_dlt.theory.Activation"
            ) from None
    if callable(activation):
        return Activation.from_callable(activation)
    raise TypeError(
        "activation must be a name, a callable or a torch_dlt.theory.Activation, "
        f"got {type(activation).__name__}"
    )
