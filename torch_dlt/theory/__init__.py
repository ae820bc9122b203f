"""The mathematics of deep nets: closed forms, numerical predictions, estimators, and the exact
constructive ReLU networks of the depth-separation results (theory.depth).

Nothing here imports any other part of torch_dlt.
"""

from torch_dlt.theory.activations import ACTIVATIONS, Activation
from torch_dlt.theory.depth import (
    PolynomialNet,
    ShallowNet,
    TreeNet,
    binary_tree_function,
    count_linear_regions,
    count_linear_regions_along,
    linear_region_breakpoints,
    polynomial_net,
    sawtooth_net,
    smooth_bivariate_node,
    yarotsky_error_bound,
    yarotsky_product_net,
    yarotsky_square_net,
)
from torch_dlt.theory.intrinsic_dim import (
    hein_audibert_dimension,
    intrinsic_dimension,
    mle_dimension,
    nearest_neighbor_distances,
    pointwise_mle_dimension,
    twonn_dimension,
)
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
    "PolynomialNet",
    "ShallowNet",
    "TreeNet",
    "binary_tree_function",
    "c_star",
    "chi1",
    "correlation_map",
    "count_linear_regions",
    "count_linear_regions_along",
    "critical_sigma_w2",
    "depth_scales",
    "derivative_moments",
    "fuss_catalan_density",
    "gaussian_expectation",
    "hein_audibert_dimension",
    "intrinsic_dimension",
    "jacobian_spectrum_moments",
    "length_map",
    "linear_region_breakpoints",
    "mle_dimension",
    "nearest_neighbor_distances",
    "phase",
    "phase_diagram",
    "pointwise_mle_dimension",
    "polynomial_net",
    "q_star",
    "sawtooth_net",
    "smooth_bivariate_node",
    "twonn_dimension",
    "yarotsky_error_bound",
    "yarotsky_product_net",
    "yarotsky_square_net",
]
