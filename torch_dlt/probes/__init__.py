"""Probes: measure a user's model (signal statistics, Jacobian spectra) without changing it."""

from torch_dlt.probes.jacobian import JacobianSpectrum, jacobian_spectrum
from torch_dlt.probes.representations import (
    RepresentationDimensions,
    representation_dimensions,
)
from torch_dlt.probes.signal import (
    CorrelationProfile,
    LayerSignal,
    SignalHistory,
    SignalMonitor,
    SignalReport,
    correlation_propagation,
    register_layer_type,
)

__all__ = [
    "CorrelationProfile",
    "JacobianSpectrum",
    "LayerSignal",
    "RepresentationDimensions",
    "SignalHistory",
    "SignalMonitor",
    "SignalReport",
    "correlation_propagation",
    "jacobian_spectrum",
    "register_layer_type",
    "representation_dimensions",
]
