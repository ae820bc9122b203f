"""Sparsifying models and inputs: magnitude pruning on ``torch.nn.utils.prune`` and the
sparsifying front end of Gopalakrishnan et al. (2018)."""

__all__: list[str] = []

from torch_dlt.prune.frontend import BASES, SparsifyingFrontEnd, orthonormal_basis, sparsify
from torch_dlt.prune.magnitude import (
    LayerSparsity,
    SparsityReport,
    iterative_prune,
    magnitude_prune,
    make_permanent,
    prunable_layers,
    sparsity,
)

__all__ += [
    "BASES",
    "LayerSparsity",
    "SparsifyingFrontEnd",
    "SparsityReport",
    "iterative_prune",
    "magnitude_prune",
    "make_permanent",
    "orthonormal_basis",
    "prunable_layers",
    "sparsify",
    "sparsity",
]
