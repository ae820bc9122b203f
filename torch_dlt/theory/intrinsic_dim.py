"""Intrinsic-dimension estimators for point clouds ``[n, d]``: k-NN MLE, TwoNN, Hein-Audibert.

Levina & Bickel (2004) with the MacKay & Ghahramani (2005) correction; Facco, d'Errico, Rodriguez
& Laio (2017); Hein & Audibert (2005). Batched torch: k-NN by memory-bounded chunks of cdist.
"""

from __future__ import annotations

import math
import warnings
from typing import Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "hein_audibert_dimension",
    "intrinsic_dimension",
    "mle_dimension",
    "nearest_neighbor_distances",
    "pointwise_mle_dimension",
    "twonn_dimension",
]

Points = Union[Tensor, np.ndarray]

_METHODS = ("mle", "twonn", "hein")
_TWONN_FITS = ("linear", "mle")
_MLE_AVERAGES = ("inverse", "estimate")

# Entries of one block of the distance matrix; 2**24 float64 entries = 128 MiB.
_CHUNK_ENTRIES = 2**24

_DEFAULT_MLE_K = (10, 20)
_DEFAULT_HEIN_K = 20


def _as_points(X: object, fn: str) -> Tensor:
    """Check ``X`` is a finite 2-D point cloud; return it as a floating tensor, duplicates kept."""
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(np.ascontiguousarray(X))
    if not isinstance(X, Tensor):
        raise TypeError(
            f"{fn}: X must be a torch Tensor or numpy array [n, d], got {type(X).__name__}"
        )
    if X.dim() != 2:
        raise ValueError(
            f"{fn}: X must be 2-D [n, d] (n points in R^d), got shape {tuple(X.shape)}"
        )
    if X.shape[1] == 0:
        raise ValueError(f"{fn}: X must have at least one coordinate, got shape {tuple(X.shape)}")
    if X.is_complex() or X.dtype == torch.bool:
        raise TypeError(f"{fn}: X must be real-valued, got dtype {X.dtype}")
    if not X.is_floating_point() or X.dtype in (torch.float16, torch.bfloat16):
        X = X.to(torch.float64)
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"{fn}: X contains NaN or infinite values; remove those points first")
    return X


def _distinct_points(X: Tensor, fn: str) -> Tensor:
    # A repeated point has distance 0 to its copy, so log(r_k / r_1) and r2 / r1 are infinite and
    # the U-statistic gets an atom at 0: the copies say nothing about the dimension, drop them.
    unique = torch.unique(X, dim=0)
    if unique.shape[0] < X.shape[0]:
        warnings.warn(
            f"{fn}: dropped {X.shape[0] - unique.shape[0]} duplicate points of X "
            f"({unique.shape[0]} distinct of {X.shape[0]})",
            stacklevel=3,
        )
    return unique


def _check_k(k: object, n: int, fn: str, *, least: int = 1) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{fn}: k must be an int, got {type(k).__name__}")
    if k < least:
        raise ValueError(f"{fn}: k must be >= {least}, got {k}")
    if k >= n:
        raise ValueError(
            f"{fn}: k must be < the number of distinct points n = {n} (each point needs k "
            f"other points as neighbours), got k = {k}; pass more points or a smaller k"
        )
    return k


def _check_chunk_size(chunk_size: int | None, n: int, fn: str) -> int:
    if chunk_size is None:
        return max(1, min(n, _CHUNK_ENTRIES // max(n, 1)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def _knn(X: Tensor, k: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    n = X.shape[0]
    dist_blocks, index_blocks = [], []
    X64 = X.to(torch.float64)
    # The search runs in float32 (twice the speed of float64 cdist and topk) over a few spare
    # candidates; the candidates' distances are then recomputed directly in float64 (cdist's
    # matrix-product form also loses digits for near points) and the k nearest kept, so ratios
    # of small distances stay accurate.
    search = X.float() if X.dtype == torch.float64 else X
    candidates = min(n - 1, k + 4)
    for start in range(0, n, chunk_size):
        rows = search[start : start + chunk_size]
        block = torch.cdist(rows, search)
        own = torch.arange(start, start + rows.shape[0], device=X.device)
        block[torch.arange(rows.shape[0], device=X.device), own] = math.inf
        _, index = torch.topk(block, candidates, dim=1, largest=False)
        exact = (X64[start : start + rows.shape[0], None, :] - X64[index]).norm(dim=2)
        exact, order = exact.sort(dim=1)
        dist_blocks.append(exact[:, :k])
        index_blocks.append(index.gather(1, order)[:, :k])
    return torch.cat(dist_blocks), torch.cat(index_blocks)


def nearest_neighbor_distances(
    X: Points, k: int, *, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Euclidean distances to, and indices of, each point's ``k`` nearest other points.

    Computed by blocks of ``chunk_size`` rows of ``torch.cdist`` (memory ``chunk_size * n``), the
    point itself excluded, searched in float32 with four spare candidates whose distances are
    recomputed in float64. Duplicates are kept
    here (a copy is a neighbour at distance 0); the estimators drop them first.

    Args:
        X (Tensor[n, d] | ndarray[n, d]): the points.
        k (int): neighbours per point, ``1 <= k < n``.
        chunk_size (int | None): rows per cdist block; default keeps a block at 2**24 entries.

    Returns:
        tuple[Tensor[n, k] float64, Tensor[n, k] int64]: ascending distances and their indices.

    Example:
        >>> d, i = nearest_neighbor_distances(torch.tensor([[0.0], [1.0], [3.0]]), 1)
        >>> d.flatten().tolist(), i.flatten().tolist()
        ([1.0, 1.0, 2.0], [1, 0, 1])
    """
    fn = "nearest_neighbor_distances"
    X = _as_points(X, fn)
    k = _check_k(k, X.shape[0], fn)
    return _knn(X, k, _check_chunk_size(chunk_size, X.shape[0], fn))


def _mle_ks(k: object, fn: str) -> tuple[int, int]:
    if isinstance(k, tuple):
        if len(k) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in k):
            raise TypeError(f"{fn}: k must be an int or a pair of ints (k1, k2), got {k!r}")
        if k[0] > k[1]:
            raise ValueError(f"{fn}: k = (k1, k2) needs k1 <= k2, got {k!r}")
        return k
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{fn}: k must be an int or a pair of ints (k1, k2), got {k!r}")
    return k, k


def _pointwise_inverse_mle(distances: Tensor, k: int, unbiased: bool) -> Tensor:
    # 1 / m_k(x) = (1 / (k - 1)) sum_{j<k} log(T_k(x) / T_j(x))  (Levina & Bickel 2004, eq. 8).
    logs = distances[:, :k].log()
    total = (logs[:, k - 1 : k] - logs[:, : k - 1]).sum(dim=1)
    return total / (k - 2 if unbiased else k - 1)


def pointwise_mle_dimension(
    X: Points, *, k: int = 20, unbiased: bool = False, chunk_size: int | None = None
) -> Tensor:
    r"""Levina & Bickel's (2004) local maximum-likelihood dimension at every point.

    With :math:`T_j(x)` the distance from :math:`x` to its :math:`j`-th nearest neighbour,

    .. math:: \hat m_k(x) = \Big[\frac{1}{k-1}\sum_{j=1}^{k-1}\log\frac{T_k(x)}{T_j(x)}\Big]^{-1},

    the MLE of the exponent of a Poisson process whose rate grows as :math:`t^m` around
    :math:`x`. The sum is a Gamma(k-1, m) variable, so :math:`1/\hat m_k` is unbiased and
    :math:`\hat m_k` has mean :math:`m (k-1)/(k-2)`; ``unbiased=True`` divides by ``k - 2``
    instead (their remark after eq. 8). Duplicate points are dropped first (with a warning).

    Args:
        X (Tensor[n, d] | ndarray[n, d]): the points.
        k (int): neighbours per point, ``2 <= k < n`` (``3 <=`` with ``unbiased``).
        unbiased (bool): normalise by ``k - 2`` rather than ``k - 1``.
        chunk_size (int | None): rows per cdist block (see :func:`nearest_neighbor_distances`).

    Returns:
        Tensor[n_distinct] (float64): the local estimates, one per distinct point, in the
        order of ``torch.unique(X, dim=0)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> line = torch.rand(500, 1, generator=g, dtype=torch.float64) * torch.ones(1, 5)
        >>> round(float(pointwise_mle_dimension(line, k=10).median()), 1)
        1.0
    """
    fn = "pointwise_mle_dimension"
    X = _distinct_points(_as_points(X, fn), fn)
    k = _check_k(k, X.shape[0], fn, least=3 if unbiased else 2)
    distances, _ = _knn(X, k, _check_chunk_size(chunk_size, X.shape[0], fn))
    return 1.0 / _pointwise_inverse_mle(distances, k, unbiased)


def mle_dimension(
    X: Points,
    *,
    k: int | tuple[int, int] = _DEFAULT_MLE_K,
    average: str = "inverse",
    unbiased: bool = False,
    chunk_size: int | None = None,
) -> float:
    r"""Global k-NN maximum-likelihood dimension (Levina & Bickel 2004; MacKay & Ghahramani 2005).

    Per point, :func:`pointwise_mle_dimension`. Levina & Bickel average the local estimates,
    :math:`\hat m_k = \frac1n\sum_i \hat m_k(x_i)`; MacKay & Ghahramani (2005) point out that the
    likelihood combines the *inverses*, :math:`\hat m_k = [\frac1n\sum_i \hat m_k(x_i)^{-1}]^{-1}`,
    which removes the upward bias of averaging :math:`\hat m_k(x_i)` (``average="inverse"``, the
    default). With ``k = (k1, k2)`` the estimate is averaged over ``k = k1..k2`` as in Levina &
    Bickel (they use 10..20). Duplicate points are dropped first (with a warning).

    Args:
        X (Tensor[n, d] | ndarray[n, d]): the points.
        k (int | tuple[int, int]): neighbours, or the inclusive range ``(k1, k2)``; ``2 <= k < n``.
        average (str): ``"inverse"`` (MacKay-Ghahramani) or ``"estimate"`` (Levina-Bickel).
        unbiased (bool): normalise each local estimate by ``k - 2`` rather than ``k - 1``.
        chunk_size (int | None): rows per cdist block (see :func:`nearest_neighbor_distances`).

    Returns:
        float: the intrinsic dimension.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> plane = torch.rand(2000, 2, generator=g, dtype=torch.float64) @ torch.randn(
        ...     2, 10, generator=g, dtype=torch.float64)
        >>> abs(mle_dimension(plane) - 2) < 0.2
        True
    """
    fn = "mle_dimension"
    k1, k2 = _mle_ks(k, fn)
    if average not in _MLE_AVERAGES:
        raise ValueError(f"{fn}: average must be one of {_MLE_AVERAGES}, got {average!r}")
    X = _distinct_points(_as_points(X, fn), fn)
    least = 3 if unbiased else 2
    _check_k(k1, X.shape[0], fn, least=least)
    _check_k(k2, X.shape[0], fn, least=least)
    distances, _ = _knn(X, k2, _check_chunk_size(chunk_size, X.shape[0], fn))
    estimates = []
    for kk in range(k1, k2 + 1):
        inverse = _pointwise_inverse_mle(distances, kk, unbiased)
        if average == "inverse":
            estimates.append(1.0 / inverse.mean())
        else:
            estimates.append((1.0 / inverse).mean())
    return float(torch.stack(estimates).mean())


def twonn_dimension(
    X: Points, *, fit: str = "linear", discard_fraction: float = 0.1, chunk_size: int | None = None
) -> float:
    r"""TwoNN dimension from the ratio of the two nearest-neighbour distances (Facco et al. 2017).

    For locally uniform data :math:`\mu = r_2/r_1` is Pareto: :math:`F(\mu) = 1 - \mu^{-d}`.
    ``fit="linear"`` is the paper's estimator: sort the :math:`\mu_i`, set the empirical
    :math:`F(\mu_{(i)}) = i/n`, discard the largest ``discard_fraction`` of them and fit
    :math:`-\log(1 - F) = d\,\log\mu` by least squares through the origin. ``fit="mle"`` is the
    maximum-likelihood form :math:`d = n / \sum_i \log \mu_i` (all points, ``discard_fraction``
    unused). Duplicate points are dropped first (with a warning).

    Args:
        X (Tensor[n, d] | ndarray[n, d]): the points, ``n >= 3``.
        fit (str): ``"linear"`` (Facco et al.'s fit) or ``"mle"``.
        discard_fraction (float): share of the largest ratios left out of the linear fit, in [0, 1).
        chunk_size (int | None): rows per cdist block (see :func:`nearest_neighbor_distances`).

    Returns:
        float: the intrinsic dimension.

    Example:
        >>> X = torch.tensor([[0.0], [1.0], [3.0], [7.0]])  # mu = 3, 2, 1.5, 1.5
        >>> round(twonn_dimension(X, fit="mle"), 4)
        1.5369
    """
    fn = "twonn_dimension"
    if fit not in _TWONN_FITS:
        raise ValueError(f"{fn}: fit must be one of {_TWONN_FITS}, got {fit!r}")
    if not isinstance(discard_fraction, (int, float)) or not 0.0 <= discard_fraction < 1.0:
        raise ValueError(f"{fn}: discard_fraction must be in [0, 1), got {discard_fraction!r}")
    X = _distinct_points(_as_points(X, fn), fn)
    if X.shape[0] < 3:
        raise ValueError(f"{fn}: needs at least 3 distinct points, got {X.shape[0]}")
    distances, _ = _knn(X, 2, _check_chunk_size(chunk_size, X.shape[0], fn))
    log_mu = (distances[:, 1] / distances[:, 0]).log()
    n = log_mu.shape[0]
    if fit == "mle":
        total = float(log_mu.sum())
        if total <= 0.0:
            raise ValueError(f"{fn}: every point has r2 == r1, the ratio carries no information")
        return n / total
    log_mu = log_mu.sort().values
    keep = max(1, int(math.floor(n * (1.0 - discard_fraction))))
    keep = min(keep, n - 1)  # F = n/n = 1 would give -log(0)
    empirical_cdf = torch.arange(1, keep + 1, dtype=torch.float64, device=log_mu.device) / n
    x, y = log_mu[:keep], -torch.log1p(-empirical_cdf)
    denominator = float((x * x).sum())
    if denominator <= 0.0:
        raise ValueError(f"{fn}: every kept point has r2 == r1, the ratio carries no information")
    return float((x * y).sum()) / denominator


def _triweight(squared_ratio: Tensor) -> Tensor:
    # K(u) = (1 - u^2)^3 on [0, 1]: compactly supported and C^2, as Hein & Audibert's K requires.
    return (1.0 - squared_ratio).clamp_min(0.0) ** 3


def hein_audibert_dimension(
    X: Points,
    *,
    h: float | None = None,
    k: int = _DEFAULT_HEIN_K,
    chunk_size: int | None = None,
) -> float:
    r"""Hein & Audibert's (2005) dimension from a kernel U-statistic at two scales.

    .. math:: U_n(h) = \frac{2}{n(n-1)}\sum_{i<j} K\big(\lVert X_i - X_j\rVert^2 / h^2\big)
              \;\approx\; C\,h^m \quad (h \to 0),

    so :math:`\hat m = \log_2\big(U_n(h) / U_n(h/2)\big)`. :math:`K(t) = (1 - t)^3_+` on
    :math:`t = r^2/h^2` (the triweight in :math:`r/h`, smooth and compactly supported, as their
    theorem asks). Scale rule when ``h`` is None (ours; Hein & Audibert pick the scale from the
    sample's neighbourhood sizes): ``h`` is the median over points of the distance to the
    ``k``-th nearest neighbour, so the large scale sees about ``k`` neighbours per point and the
    small one ``k / 2^m``; a scale that small keeps the boundary and curvature bias low (a larger
    one underestimates the dimension of a cube). Duplicate points are dropped first (warning).

    Args:
        X (Tensor[n, d] | ndarray[n, d]): the points.
        h (float | None): the larger kernel bandwidth, > 0; None for the rule above.
        k (int): neighbourhood size of the scale rule, ``1 <= k < n``.
        chunk_size (int | None): rows per cdist block (see :func:`nearest_neighbor_distances`).

    Returns:
        float: the intrinsic dimension.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> plane = torch.rand(2000, 2, generator=g, dtype=torch.float64) @ torch.randn(
        ...     2, 10, generator=g, dtype=torch.float64)
        >>> abs(hein_audibert_dimension(plane) - 2) < 0.2
        True
    """
    fn = "hein_audibert_dimension"
    if h is not None and (
        isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or h <= 0
    ):
        raise ValueError(f"{fn}: h must be a finite float > 0 or None, got {h!r}")
    X = _distinct_points(_as_points(X, fn), fn)
    n = X.shape[0]
    chunk = _check_chunk_size(chunk_size, n, fn)
    if h is None:
        k = _check_k(k, n, fn)
        distances, _ = _knn(X, k, chunk)
        h = float(distances[:, k - 1].median())
    u_large = u_small = 0.0
    for start in range(0, n, chunk):
        rows = X[start : start + chunk]
        squared = torch.cdist(rows, X).to(torch.float64).square()
        own = torch.arange(rows.shape[0], device=X.device)
        squared[own, own + start] = math.inf
        u_large += float(_triweight(squared / h**2).sum())
        u_small += float(_triweight(squared / (h / 2) ** 2).sum())
    if u_small <= 0.0:
        raise ValueError(
            f"{fn}: no pair of points is closer than h/2 = {h / 2:.4g}; pass a larger h or k"
        )
    return math.log2(u_large / u_small)


def intrinsic_dimension(X: Points, *, method: str = "mle", k: int | None = None) -> float:
    """Intrinsic dimension of the points ``X`` by one of three estimators.

    ``"mle"``: :func:`mle_dimension` (Levina & Bickel 2004 with MacKay & Ghahramani's 2005
    inverse averaging), ``k`` neighbours, default the range 10..20. ``"twonn"``:
    :func:`twonn_dimension` (Facco et al. 2017, linear fit discarding the top 10 %), which uses the
    two nearest neighbours by definition, so ``k`` must be None or 2. ``"hein"``:
    :func:`hein_audibert_dimension` (Hein & Audibert 2005), ``k`` sets the kernel scale
    (default 20). Use those functions for their other parameters.

    Args:
        X (Tensor[n, d] | ndarray[n, d]): n points in R^d.
        method (str): ``"mle"``, ``"twonn"`` or ``"hein"``.
        k (int | None): neighbourhood size (see above); None for each method's default.

    Returns:
        float: the estimated dimension.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> circle = torch.randn(1000, 2, generator=g, dtype=torch.float64)
        >>> circle = circle / circle.norm(dim=1, keepdim=True)
        >>> [round(intrinsic_dimension(circle, method=m)) for m in ("mle", "twonn", "hein")]
        [1, 1, 1]
    """
    fn = "intrinsic_dimension"
    if method not in _METHODS:
        raise ValueError(f"{fn}: method must be one of {_METHODS}, got {method!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise TypeError(f"{fn}: k must be an int or None, got {type(k).__name__}")
    if k is not None and k < 1:
        raise ValueError(f"{fn}: k must be >= 1, got {k}")
    if method == "mle":
        return mle_dimension(X) if k is None else mle_dimension(X, k=k)
    if method == "twonn":
        if k not in (None, 2):
            raise ValueError(
                f"{fn}: TwoNN uses the 2 nearest neighbours by definition; k must be None or 2, "
                f"got {k}"
            )
        return twonn_dimension(X)
    return hein_audibert_dimension(X) if k is None else hein_audibert_dimension(X, k=k)
