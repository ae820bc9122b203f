"""Seeing what CNN filters and units do: filter grids, spectral signatures, wavelet-likeness,
activation maximisation (Olah et al. 2017) and top examples."""

__all__: list[str] = []

from torch_dlt.vis.features import (  # noqa: E402
    MaximizedActivation,
    TopExamples,
    infer_image_shape,
    maximize_activation,
    top_examples,
)
from torch_dlt.vis.filters import (  # noqa: E402
    WaveletLikeness,
    first_conv,
    gabor_atom,
    show_filters,
    wavelet_likeness,
)

__all__ += [
    "MaximizedActivation",
    "TopExamples",
    "WaveletLikeness",
    "first_conv",
    "gabor_atom",
    "infer_image_shape",
    "maximize_activation",
    "show_filters",
    "top_examples",
    "wavelet_likeness",
]

from torch_dlt.vis.transfer import TransferCurve, transfer_curve  # noqa: E402

__all__ += ["TransferCurve", "transfer_curve"]
