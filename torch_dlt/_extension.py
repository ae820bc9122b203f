"""Loads the compiled operator library ``torch_dlt._C`` and says whether it is there.

Importing ``_C`` runs its static initialisers, which register the ``torch.ops.torch_dlt`` schemas
and kernels. Without it (no compiler at install time, or ``TORCH_DLT_NO_EXT=1``) every op falls back
to its pure-PyTorch reference in :mod:`torch_dlt.ops._reference`.
"""

from __future__ import annotations

import os
import warnings

_LOADED: bool | None = None
_ERROR: str | None = None


def _disabled() -> bool:
    return os.environ.get("TORCH_DLT_NO_EXT", "").strip().lower() in {"1", "true", "yes", "on"}


def load() -> bool:
    """Import ``torch_dlt._C`` once; return whether the compiled ops are registered."""
    global _LOADED, _ERROR
    if _LOADED is not None:
        return _LOADED
    if _disabled():
        _LOADED, _ERROR = False, "disabled by TORCH_DLT_NO_EXT=1"
        return _LOADED
    try:
        from torch_dlt import _C  # noqa: F401
    except ImportError as exc:
        _LOADED, _ERROR = False, f"torch_dlt._C could not be imported ({exc})"
        if "undefined symbol" in str(exc):
            warnings.warn(
                "torch_dlt._C was built against another torch and cannot load; using the "
                "pure-PyTorch reference ops. Rebuild with `pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=2,
            )
    else:
        _LOADED = True
    return _LOADED


def load_error() -> str | None:
    """Why the compiled library is not in use, or ``None`` when it is."""
    load()
    return _ERROR


def cuda_kernels_built() -> bool:
    """Whether ``_C`` was compiled with its CUDA kernels."""
    if not load():
        return False
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("torch_dlt::moments", "CUDA")
