"""Optimisers and schedules from the theory of SGD (Ward, Wu & Bottou 2019; Johnson & Zhang 2013;
Smith et al. 2018); torch's own SGD, Adagrad and Adam are reused, not rewritten."""

from torch_dlt.optim.adagrad_norm import AdaGradNorm, adagrad_norm
from torch_dlt.optim.schedules import (
    GrowingBatchSampler,
    InversePowerLR,
    InverseSqrtLR,
    InverseTimeLR,
)
from torch_dlt.optim.svrg import SVRG, full_gradient_closure, svrg

__all__ = [
    "SVRG",
    "AdaGradNorm",
    "GrowingBatchSampler",
    "InversePowerLR",
    "InverseSqrtLR",
    "InverseTimeLR",
    "adagrad_norm",
    "full_gradient_closure",
    "svrg",
]
