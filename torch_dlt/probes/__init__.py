"""Probes: measure a user's model (signal statistics, Jacobian spectra) without changing it."""

from torch_dlt.probes.connectivity import (
    Curve,
    LossProfile,
    curve_loss_profile,
    find_curve,
    linear_barrier,
)
from torch_dlt.probes.jacobian import JacobianSpectrum, jacobian_spectrum
from torch_dlt.probes.landscape import (
    LandscapeSlice,
    LandscapeSurface,
    PCADirections,
    pca_directions,
    plot_contour,
    plot_slice,
    plot_surface_3d,
    plot_trajectory,
    project_trajectory,
    random_bn_direction,
    random_direction,
    slice_1d,
    surface_2d,
)
from torch_dlt.probes.representations import (
    RepresentationDimensions,
    representation_dimensions,
)
from torch_dlt.probes.sharpness import (
    HessianEigen,
    Sharpness,
    epsilon_sharpness,
    top_hessian_eigenvalue,
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
    "Curve",
    "HessianEigen",
    "JacobianSpectrum",
    "LandscapeSlice",
    "LandscapeSurface",
    "LayerSignal",
    "LossProfile",
    "PCADirections",
    "RepresentationDimensions",
    "Sharpness",
    "SignalHistory",
    "SignalMonitor",
    "SignalReport",
    "correlation_propagation",
    "curve_loss_profile",
    "epsilon_sharpness",
    "find_curve",
    "jacobian_spectrum",
    "linear_barrier",
    "pca_directions",
    "plot_contour",
    "plot_slice",
    "plot_surface_3d",
    "plot_trajectory",
    "project_trajectory",
    "random_bn_direction",
    "random_direction",
    "register_layer_type",
    "representation_dimensions",
    "slice_1d",
    "surface_2d",
    "top_hessian_eigenvalue",
]
