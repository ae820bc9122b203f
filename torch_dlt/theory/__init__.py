"""Pure mathematics of deep nets: closed forms and numerical predictions, no nn.Modules.

Nothing here imports any other part of torch_dlt.
"""

__all__: list = []

from torch_dlt.theory.activations import ACTIVATIONS, Activation
from torch_dlt.theory.meanfield import (
    PhaseDiagram,
    c_star,
    chi1,
    correlation_map,
    critical_sigma_w2,
    depth_scales,
    length_map,
    phase,
    phase_diagram,
    q_star,
)

__all__ += [
    "ACTIVATIONS",
    "Activation",
    "PhaseDiagram",
    "c_star",
    "chi1",
    "correlation_map",
    "critical_sigma_w2",
    "depth_scales",
    "length_map",
    "phase",
    "phase_diagram",
    "q_star",
]

from torch_dlt.theory.isometry import (  # noqa: E402
    JacobianSpectrumMoments,
    derivative_moments,
    fuss_catalan_density,
    jacobian_spectrum_moments,
)

__all__ += [
    "JacobianSpectrumMoments",
    "derivative_moments",
    "fuss_catalan_density",
    "jacobian_spectrum_moments",
]
