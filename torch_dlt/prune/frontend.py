"""The sparsifying front end of Gopalakrishnan, Marzi, Madhow & Pedarsani (2018): keep the K
largest coefficients of each input in an orthonormal basis (DCT, Haar, Daubechies-4) and project
back, which shrinks an l_inf attack's effect on a linear classifier by about K / N.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["BASES", "SparsifyingFrontEnd", "orthonormal_basis", "sparsify"]

BASES = ("dct", "haar", "db4")

_SQRT3 = math.sqrt(3.0)
# Daubechies (1988) orthonormal scaling filter with two vanishing moments (4 taps).
_DB4_LOWPASS = tuple(
    c / (4.0 * math.sqrt(2.0)) for c in (1 + _SQRT3, 3 + _SQRT3, 3 - _SQRT3, 1 - _SQRT3)
)
_HAAR_LOWPASS = (1.0 / math.sqrt(2.0), 1.0 / math.sqrt(2.0))


def _dct_matrix(n: int) -> Tensor:
    """Orthonormal DCT-II: C[k, j] = a_k cos(pi (2j + 1) k / (2n)), a_0 = sqrt(1/n), else
    sqrt(2/n)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * j + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


def _wavelet_level(n: int, lowpass: tuple[float, ...]) -> Tensor:
    """One level of the periodised orthonormal wavelet transform of length ``n`` (rows: n/2
    scaling then n/2 wavelet coefficients), with the quadrature-mirror high-pass
    g[j] = (-1)^j h[L - 1 - j]."""
    taps = len(lowpass)
    highpass = [(-1) ** j * lowpass[taps - 1 - j] for j in range(taps)]
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n // 2):
        for j in range(taps):
            w[i, (2 * i + j) % n] += lowpass[j]
            w[n // 2 + i, (2 * i + j) % n] += highpass[j]
    return w


def _max_levels(basis: str, n: int) -> int:
    """Levels for which every level's input length is even and (db4) at least the filter
    length."""
    min_length = 2 if basis == "haar" else 4
    levels = 0
    while n % 2 == 0 and n >= min_length:
        levels += 1
        n //= 2
    return levels


def orthonormal_basis(
    basis: str, n: int, *, levels: int | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    r"""The analysis matrix ``B`` (``Tensor[n, n]``, ``B @ B.T = I``) of an orthonormal basis.

    ``"dct"`` is the orthonormal DCT-II. ``"haar"`` and ``"db4"`` are the periodised orthonormal
    wavelet transforms with Haar and Daubechies-4 filters (Daubechies 1988; Mallat 1989),
    ``levels`` times applied to the scaling coefficients; coefficients come ordered coarse to
    fine. Wavelets need ``n`` divisible by ``2 ** levels`` (and, for db4, every level's input at
    least 4 long); ``levels=None`` takes as many as ``n`` allows.

    Args:
        basis (str): ``"dct"``, ``"haar"`` or ``"db4"``.
        n (int): the dimension.
        levels (int | None): wavelet levels (ignored by ``"dct"``).
        dtype (torch.dtype): of the result (built in float64).

    Returns:
        Tensor[n, n]: ``coefficients = B @ x``, ``x = B.T @ coefficients``.

    Example:
        >>> b = orthonormal_basis("haar", 4)
        >>> b * 2
        tensor([[ 1.0000,  1.0000,  1.0000,  1.0000],
                [ 1.0000,  1.0000, -1.0000, -1.0000],
                [ 1.4142, -1.4142,  0.0000,  0.0000],
                [ 0.0000,  0.0000,  1.4142, -1.4142]], dtype=torch.float64)
    """
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the basis size n must be a positive int, got {n!r}")
    if basis == "dct":
        return _dct_matrix(n).to(dtype)
    most = _max_levels(basis, n)
    if levels is None:
        levels = most
        if levels == 0:
            raise ValueError(
                f"a {basis} wavelet basis needs an even size"
                + (" of at least 4" if basis == "db4" else "")
                + f", got {n}"
            )
    elif isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be a positive int or None, got {levels!r}")
    elif levels > most:
        need = "divisible by 2**levels" + (
            " with every level's input at least 4 long (db4 has 4 taps)" if basis == "db4" else ""
        )
        raise ValueError(
            f"a {levels}-level {basis} basis needs a size {need}; size {n} allows at most "
            f"{most} levels"
        )
    lowpass = _HAAR_LOWPASS if basis == "haar" else _DB4_LOWPASS
    transform = torch.eye(n, dtype=torch.float64)
    length = n
    for _ in range(levels):
        step = torch.eye(n, dtype=torch.float64)
        step[:length, :length] = _wavelet_level(length, lowpass)
        transform = step @ transform
        length //= 2
    return transform.to(dtype)


def sparsify(x: Tensor, k: int, basis_h: Tensor, basis_w: Tensor) -> Tensor:
    """Keep the ``k`` largest-magnitude coefficients of each ``[H, W]`` slice of ``x`` in the
    separable basis ``basis_h (x) basis_w`` and map back (Gopalakrishnan et al. 2018).

    Args:
        x (Tensor[..., H, W]): inputs.
        k (int): coefficients kept per slice, 1 <= k <= H * W.
        basis_h (Tensor[H, H]): orthonormal analysis matrix of the rows.
        basis_w (Tensor[W, W]): orthonormal analysis matrix of the columns.

    Returns:
        Tensor[..., H, W]: the projection of each slice onto its own top-k coefficients.

    Example:
        >>> b = orthonormal_basis("dct", 4)
        >>> x = torch.outer(b[1], b[2]) * 3 + torch.outer(b[0], b[0]) * 0.1
        >>> torch.allclose(sparsify(x, 1, b, b), torch.outer(b[1], b[2]) * 3)
        True
    """
    h, w = x.shape[-2:]
    coefficients = basis_h @ x @ basis_w.T
    flat = coefficients.flatten(-2)
    if k < h * w:
        kept = flat.abs().topk(k, dim=-1).indices
        mask = torch.zeros_like(flat).scatter_(-1, kept, 1.0)
        flat = flat * mask
    return basis_h.T @ flat.unflatten(-1, (h, w)) @ basis_w


class SparsifyingFrontEnd(nn.Module):
    r"""Sparsify each input in an orthonormal basis: keep its K largest coefficients, project back.

    Gopalakrishnan, Marzi, Madhow & Pedarsani (2018), "Combating adversarial attacks using sparse
    representations": natural images are nearly K-sparse in a wavelet / DCT basis while an
    l_inf-bounded perturbation spreads over all N coefficients, so projecting onto the input's
    K-dimensional support keeps the signal and removes most of the attack; for a linear
    classifier the output distortion shrinks by roughly K / N. Put it before any model:
    ``nn.Sequential(SparsifyingFrontEnd(50, size=28), model)``.

    The map is the 2-D separable transform ``C = B_H X B_W^T`` of each ``[H, W]`` slice
    (per sample and channel), hard thresholding to the K largest :math:`|C_{ij}|`, and
    ``B_H^T C_K B_W``. It is a projection (applying it twice changes nothing), exact at
    K = H W, and differentiable almost everywhere (the support is locally constant), so
    gradient attacks see it. It has no finite Lipschitz constant for K < H W: where two
    coefficients tie in magnitude the kept support, and so the output, jumps.

    Args:
        k (int): coefficients kept per slice, 1 <= k <= H * W.
        basis (str): ``"dct"``, ``"haar"`` or ``"db4"``.
        size (int | tuple[int, int]): ``(H, W)`` of the inputs.
        levels (int | None): wavelet levels (see :func:`orthonormal_basis`).

    Shape:
        - Input: ``[..., H, W]``
        - Output: same shape

    Example:
        >>> front = SparsifyingFrontEnd(10, "haar", size=8)
        >>> x = torch.rand(2, 1, 8, 8)
        >>> y = front(x)
        >>> torch.allclose(front(y), y, atol=1e-6)
        True
    """

    basis_h: Tensor
    basis_w: Tensor

    def __init__(
        self,
        k: int,
        basis: str = "dct",
        *,
        size: int | tuple[int, int],
        levels: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
        ):
            raise ValueError(
                f"SparsifyingFrontEnd: size must be a positive int or an (H, W) pair, got {size!r}"
            )
        h, w = size
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= h * w:
            raise ValueError(
                f"SparsifyingFrontEnd: k must be an int in [1, H*W] = [1, {h * w}] for size "
                f"{(h, w)}, got {k!r}"
            )
        try:
            basis_h = orthonormal_basis(basis, h, levels=levels)
            basis_w = orthonormal_basis(basis, w, levels=levels)
        except ValueError as exc:
            raise ValueError(f"SparsifyingFrontEnd(size={(h, w)}): {exc}") from None
        self.k = k
        self.basis = basis
        self.size = (h, w)
        self.levels = levels
        self.register_buffer("basis_h", basis_h)
        self.register_buffer("basis_w", basis_w)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or tuple(x.shape[-2:]) != self.size:
            raise ValueError(
                f"SparsifyingFrontEnd: expected input of shape [..., {self.size[0]}, "
                f"{self.size[1]}], got {tuple(x.shape)}"
            )
        basis_h = self.basis_h.to(x.dtype)
        basis_w = self.basis_w.to(x.dtype)
        return sparsify(x, self.k, basis_h, basis_w)

    def extra_repr(self) -> str:
        levels = "" if self.levels is None else f", levels={self.levels}"
        return f"k={self.k}, basis={self.basis!r}, size={self.size}{levels}"
