"""Pure mathematics of deep nets: closed forms and numerical predictions, no nn.Modules.

Nothing here imports any other part of torch_dlt.
"""

from torch_dlt.theory.activations import ACTIVATIONS, Activation
from torch_dlt.theory.isometry import (
    JacobianSpectrumMoments,
    derivative_moments,
    fuss_catalan_density,
    jacobian_spectrum_moments,
)
from torch_dlt.theory.meanfield import (
    PhaseDiagram,
    c_star,
    chi1,
    correlation_map,
    critical_sigma_w2,
    depth_scales,
    gaussian_expectation,
    length_map,
    phase,
    phase_diagram,
    q_star,
)

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "JacobianSpectrumMoments",
    "PhaseDiagram",
    "c_star",
    "chi1",
    "correlation_map",
    "critical_sigma_w2",
    "depth_scales",
    "derivative_moments",
    "fuss_catalan_density",
    "gaussian_expectation",
    "jacobian_spectrum_moments",
    "length_map",
    "phase",
    "phase_diagram",
    "q_star",
]
