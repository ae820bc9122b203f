"""Probes: measure a user's model (signal statistics, Jacobian spectra) without changing it."""

__all__: list = []

from torch_dlt.probes.signal import (
    CorrelationProfile,
    LayerSignal,
    SignalHistory,
    SignalMonitor,
    SignalReport,
    correlation_propagation,
    register_layer_type,
)

__all__ += [
    "CorrelationProfile",
    "LayerSignal",
    "SignalHistory",
    "SignalMonitor",
    "SignalReport",
    "correlation_propagation",
    "register_layer_type",
]

from torch_dlt.probes.jacobian import JacobianSpectrum, jacobian_spectrum  # noqa: E402

__all__ += ["JacobianSpectrum", "jacobian_spectrum"]
