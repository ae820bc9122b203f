"""torch_dlt: the theory of deep learning as drop-in PyTorch parts.

Initialisers, optimisers, probes and layers, each with the theory's prediction next to the
measurement on the user's own model.
"""

from torch_dlt import data, init, nn, ops, optim, probes, prune, report, robust, theory, utils, vis
from torch_dlt.utils import retain_freed_memory

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "data",
    "init",
    "nn",
    "ops",
    "optim",
    "probes",
    "prune",
    "report",
    "robust",
    "retain_freed_memory",
    "theory",
    "utils",
    "vis",
]
