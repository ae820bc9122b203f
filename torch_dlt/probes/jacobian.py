"""Measure the spectrum of a model's input-output Jacobian, per input sample.

The measured counterpart of :mod:`torch_dlt.theory.isometry` (Pennington, Schoenholz & Ganguli,
2017, "Resurrecting the sigmoid in deep learning through dynamical isometry").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from torch_dlt.probes._state import forked_rng, restored_mode

__all__ = ["JacobianSpectrum", "jacobian_spectrum"]

_METHODS = ("auto", "exact", "lanczos")

# Beyond this many squared singular values "auto" switches from dense Jacobians to Lanczos: a
# dense J costs min(m, n) backward passes and an SVD per sample.
_AUTO_EXACT_MAX_RANK = 512

# Basis vectors pushed through the model at once when building dense Jacobians; bounds memory.
_EXACT_CHUNK = 64

_DEFAULT_LANCZOS_STEPS = 64
_DEFAULT_PROBE_SEED = 0


@dataclass(frozen=True)
class JacobianSpectrum:
    r"""Squared singular values of each sample's Jacobian :math:`J = \partial y_i / \partial x_i`.

    All values are the *squared* singular values :math:`\lambda = \sigma^2` of the
    ``out_features x in_features`` Jacobian, the eigenvalues of :math:`J J^\top` that dynamical
    isometry theory predicts (Pennington et al., 2017). Only the ``rank = min(m, n)`` values of the
    smaller side are counted, so an orthogonal ``J`` has mean 1 and variance 0.

    Attributes:
        method (str): ``"exact"`` (dense Jacobian + SVD) or ``"lanczos"`` (matrix-free).
        in_features (int): ``n``, the number of input entries per sample.
        out_features (int): ``m``, the number of output entries per sample.
        mean (Tensor[B], float64): mean of the squared singular values, ``tr(J^T J) / rank``;
            exact, or a Hutchinson estimate for ``"lanczos"``.
        second_moment (Tensor[B], float64): ``tr((J^T J)^2) / rank``, exact or estimated.
        top (Tensor[B], float64): largest squared singular value (for ``"lanczos"``, the top Ritz
            value, a lower bound).
        bottom (Tensor[B], float64): smallest squared singular value (for ``"lanczos"``, the
            bottom Ritz value, an upper bound).
        squared_singular_values (Tensor[B, rank] | None): all of them, descending; ``"exact"``.
        ritz_values (Tensor[B, steps] | None): Lanczos Ritz values, ascending; ``"lanczos"``.
        ritz_weights (Tensor[B, steps] | None): their stochastic Lanczos quadrature weights (sum
            to 1): ``sum(w * delta(lambda - ritz))`` estimates the spectral density (Ubaru, Chen &
            Saad, 2017); ``"lanczos"`` only.
        mean_stderr (Tensor[B] | None): standard error of the Hutchinson ``mean``.
        second_moment_stderr (Tensor[B] | None): standard error of ``second_moment``.
    """

    method: str
    in_features: int
    out_features: int
    mean: Tensor
    second_moment: Tensor
    top: Tensor
    bottom: Tensor
    squared_singular_values: Tensor | None = None
    ritz_values: Tensor | None = None
    ritz_weights: Tensor | None = None
    mean_stderr: Tensor | None = None
    second_moment_stderr: Tensor | None = None

    @property
    def rank(self) -> int:
        """``min(out_features, in_features)``: how many squared singular values are counted."""
        return min(self.in_features, self.out_features)

    @property
    def variance(self) -> Tensor:
        """Tensor[B]: variance of the squared singular values, ``second_moment - mean**2``."""
        return self.second_moment - self.mean**2

    @property
    def singular_values(self) -> Tensor | None:
        """Tensor[B, rank] | None: the singular values of ``J`` (``"exact"`` only)."""
        if self.squared_singular_values is None:
            return None
        return self.squared_singular_values.clamp_min(0).sqrt()

    def compare(self, predicted: object) -> str:
        """A text table of the predicted next to the measured spectrum moments.

        Args:
            predicted: anything with float attributes ``mean`` and ``variance`` of the squared
                singular values, e.g. :func:`torch_dlt.theory.jacobian_spectrum_moments`.

        Returns:
            str: one row per quantity; measured values are averaged over the batch, with the
            spread over samples (and the Hutchinson standard error for ``"lanczos"``).
        """
        for name in ("mean", "variance"):
            if not hasattr(predicted, name):
                raise TypeError(
                    f"compare: predicted must have attributes 'mean' and 'variance', "
                    f"{type(predicted).__name__} has no '{name}'"
                )
        rows = [f"{'':<20}{'predicted':>14}{'measured':>14}{'+/- (samples)':>16}"]
        for name, pred, meas in (
            ("mean sigma^2", float(predicted.mean), self.mean),
            ("variance sigma^2", float(predicted.variance), self.variance),
            ("max sigma^2", None, self.top),
            ("min sigma^2", None, self.bottom),
        ):
            spread = float(meas.std()) if meas.numel() > 1 else 0.0
            pred_text = f"{pred:>14.5g}" if pred is not None else f"{'-':>14}"
            rows.append(f"{name:<20}{pred_text}{float(meas.mean()):>14.5g}{spread:>16.3g}")
        rows.append(
            f"({self.method}, {self.mean.numel()} samples, J is "
            f"{self.out_features} x {self.in_features})"
        )
        return "\n".join(rows)


def jacobian_spectrum(
    model: Union[nn.Module, Callable[[Tensor], Tensor]],
    x: Tensor,
    *,
    method: str = "auto",
    lanczos_steps: int | None = None,
    num_probes: int = 32,
    generator: torch.Generator | None = None,
) -> JacobianSpectrum:
    r"""Squared singular values of each sample's input-output Jacobian ``d model(x)[i] / d x[i]``.

    Dynamical isometry (Pennington, Schoenholz & Ganguli, 2017) asks that all singular values of
    the input-output Jacobian :math:`J` be close to 1; this measures their distribution on the
    user's model so it can be set beside :func:`torch_dlt.theory.jacobian_spectrum_moments`.

    ``"exact"`` builds each :math:`J` (``m x n``) from ``min(m, n)`` vector-Jacobian or
    Jacobian-vector products and takes its SVD. ``"lanczos"`` never forms :math:`J`: it runs
    Lanczos with full reorthogonalisation on :math:`J^\top J` (or :math:`J J^\top`, whichever is
    smaller) for the extreme eigenvalues and a quadrature of the density (Ubaru, Chen & Saad,
    2017), and Hutchinson's (1989) estimator with Rademacher probes :math:`v` for the moments,
    :math:`\operatorname{tr}(J^\top J) = \mathbb E\|Jv\|^2` and
    :math:`\operatorname{tr}((J^\top J)^2) = \mathbb E\|J^\top J v\|^2`. Jacobian-vector products
    come from differentiating the vector-Jacobian product (the double-backward trick), so one
    forward pass serves the whole computation.

    The model is evaluated in eval mode (dropout off, BatchNorm on running statistics) and must
    treat the samples of a batch independently there, as standard layers do. Its parameters,
    ``.grad``, ``requires_grad`` flags, buffers, every submodule's ``training`` flag and the global
    torch RNG state are the same afterwards.

    Args:
        model (nn.Module | Callable[[Tensor[B, ...]], Tensor[B, ...]]): the network.
        x (Tensor[B, ...]): a batch of floating-point inputs; ``n = x[0].numel()``.
        method (str): ``"exact"``, ``"lanczos"`` or ``"auto"`` (exact when ``min(m, n) <= 512``).
        lanczos_steps (int | None): Lanczos iterations, at most ``min(m, n)``; default
            ``min(64, min(m, n))``. Extreme Ritz values converge first.
        num_probes (int): Hutchinson probe vectors per sample (``"lanczos"`` only).
        generator (torch.Generator | None): source of the random vectors, on ``x``'s device;
            ``None`` uses a private generator seeded with 0, so repeated calls agree.

    Returns:
        JacobianSpectrum: spectra and moments per sample (float64).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
        >>> x = torch.randn(3, 8)
        >>> spec = jacobian_spectrum(net, x)
        >>> spec.squared_singular_values.shape
        torch.Size([3, 4])
        >>> est = jacobian_spectrum(net, x, method="lanczos")
        >>> torch.allclose(est.top, spec.top)  # 4 Lanczos steps span the whole 4-dim space
        True
    """
    if not callable(model):
        raise TypeError(
            f"jacobian_spectrum: model must be an nn.Module or a callable, got "
            f"{type(model).__name__}"
        )
    if not isinstance(x, Tensor):
        raise TypeError(f"jacobian_spectrum: x must be a Tensor [B, ...], got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(
            f"jacobian_spectrum: x must be a non-empty batch [B, ...] with at least one feature "
            f"dimension, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"jacobian_spectrum: x must be floating point, got dtype {x.dtype}")
    if method not in _METHODS:
        raise ValueError(f"jacobian_spectrum: method must be one of {_METHODS}, got {method!r}")
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 2:
        raise ValueError(f"jacobian_spectrum: num_probes must be an int >= 2, got {num_probes!r}")
    if lanczos_steps is not None and (
        isinstance(lanczos_steps, bool) or not isinstance(lanczos_steps, int) or lanczos_steps < 1
    ):
        raise ValueError(
            f"jacobian_spectrum: lanczos_steps must be a positive int or None, got "
            f"{lanczos_steps!r}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"jacobian_spectrum: generator must be a torch.Generator or None, got "
            f"{type(generator).__name__}"
        )

    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(_DEFAULT_PROBE_SEED)
    # forked_rng: the model's own forward pass may draw random numbers (noise layers).
    with (
        restored_mode(model),
        forked_rng(model, x),
        torch.no_grad(),  # torch.func still differentiates w.r.t. x; parameters stay out
    ):
        return _measure(model, x.detach(), method, lanczos_steps, num_probes, generator)


def _measure(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    method: str,
    lanczos_steps: int | None,
    num_probes: int,
    generator: torch.Generator,
) -> JacobianSpectrum:
    batch = x.shape[0]
    in_features = x[0].numel()
    out, vjp_fn = vjp(model, x)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"jacobian_spectrum: model must return a Tensor [B, ...], got {type(out).__name__}"
        )
    if out.dim() < 1 or out.shape[0] != batch or out[0].numel() == 0:
        raise ValueError(
            f"jacobian_spectrum: model output must be a batch [{batch}, ...] matching x's batch "
            f"size with at least one entry per sample, got shape {tuple(out.shape)}"
        )
    if not out.is_floating_point():
        raise TypeError(
            f"jacobian_spectrum: model output must be floating point, got dtype {out.dtype}"
        )
    out_shape = out.shape[1:]
    out_features = out[0].numel()
    rank = min(in_features, out_features)

    def vjp_flat(u: Tensor) -> Tensor:
        """[B, m] -> [B, n]: J_i^T u_i for every sample at once."""
        return vjp_fn(u.reshape(batch, *out_shape).to(out.dtype))[0].reshape(batch, in_features)

    # vjp_flat is linear in u, so the VJP of vjp_flat is J itself (the double-backward trick).
    _, vjp_of_vjp = vjp(
        vjp_flat, torch.zeros(batch, out_features, dtype=out.dtype, device=x.device)
    )

    def jvp_flat(v: Tensor) -> Tensor:
        """[B, n] -> [B, m]: J_i v_i for every sample at once."""
        return vjp_of_vjp(v.to(x.dtype))[0]

    if method == "auto":
        method = "exact" if rank <= _AUTO_EXACT_MAX_RANK else "lanczos"
    if method == "exact":
        return _exact(vjp_flat, jvp_flat, batch, in_features, out_features, x)
    if lanczos_steps is not None and lanczos_steps > rank:
        raise ValueError(
            f"jacobian_spectrum: lanczos_steps={lanczos_steps} exceeds min(m, n) = {rank} "
            f"(J is {out_features} x {in_features}); pass at most {rank}"
        )
    steps = min(rank, _DEFAULT_LANCZOS_STEPS) if lanczos_steps is None else lanczos_steps
    # Work on the smaller Gram matrix (J^T J or J J^T) so that no structural zeros are counted;
    # it is first(v) pushed through second.
    if in_features <= out_features:
        first, second = jvp_flat, vjp_flat
    else:
        first, second = vjp_flat, jvp_flat
    mean, second_moment, mean_se, second_se = _hutchinson(
        first, second, batch, rank, num_probes, x, generator
    )
    ritz_values, ritz_weights = _lanczos(
        lambda v: second(first(v)), batch, rank, steps, x, generator
    )
    return JacobianSpectrum(
        method="lanczos",
        in_features=in_features,
        out_features=out_features,
        mean=mean,
        second_moment=second_moment,
        top=ritz_values[:, -1],
        bottom=ritz_values[:, 0],
        ritz_values=ritz_values,
        ritz_weights=ritz_weights,
        mean_stderr=mean_se,
        second_moment_stderr=second_se,
    )


def _exact(
    vjp_flat: Callable[[Tensor], Tensor],
    jvp_flat: Callable[[Tensor], Tensor],
    batch: int,
    in_features: int,
    out_features: int,
    x: Tensor,
) -> JacobianSpectrum:
    # Rows by reverse mode when the output is the smaller side, columns by forward mode otherwise.
    product, size = (
        (vjp_flat, out_features) if out_features <= in_features else (jvp_flat, in_features)
    )
    basis = torch.eye(size, dtype=x.dtype, device=x.device)[:, None, :].expand(size, batch, size)
    try:
        stacked = vmap(product, chunk_size=_EXACT_CHUNK)(basis)
    except RuntimeError as error:
        raise RuntimeError(
            f"jacobian_spectrum: the model's backward pass could not be batched with "
            f"torch.func.vmap to build dense Jacobians ({error}); method='lanczos' needs no vmap"
        ) from error
    # rows [m, B, n] -> [B, m, n], or columns [n, B, m] -> [B, m, n]
    jac = stacked.permute(1, 0, 2) if product is vjp_flat else stacked.permute(1, 2, 0)
    squared = torch.linalg.svdvals(jac.to(torch.float64)) ** 2  # [B, rank], descending
    return JacobianSpectrum(
        method="exact",
        in_features=in_features,
        out_features=out_features,
        mean=squared.mean(dim=1),
        second_moment=(squared**2).mean(dim=1),
        top=squared[:, 0],
        bottom=squared[:, -1],
        squared_singular_values=squared,
    )


def _hutchinson(
    first: Callable[[Tensor], Tensor],
    second: Callable[[Tensor], Tensor],
    batch: int,
    rank: int,
    num_probes: int,
    x: Tensor,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Estimates of tr(G) / rank and tr(G^2) / rank, G = second o first, with standard errors."""
    traces, squared_traces = [], []
    for _ in range(num_probes):
        v = torch.randint(0, 2, (batch, rank), generator=generator, device=x.device)
        half = first((2 * v - 1).to(x.dtype))
        traces.append(half.to(torch.float64).pow(2).sum(dim=1))  # v^T G v = |first(v)|^2
        squared_traces.append(second(half).to(torch.float64).pow(2).sum(dim=1))  # |G v|^2
    traces_t = torch.stack(traces) / rank  # [P, B]
    squared_t = torch.stack(squared_traces) / rank
    scale = 1.0 / math.sqrt(num_probes)
    return traces_t.mean(0), squared_t.mean(0), traces_t.std(0) * scale, squared_t.std(0) * scale


def _lanczos(
    gram: Callable[[Tensor], Tensor],
    batch: int,
    dim: int,
    steps: int,
    x: Tensor,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Batched Lanczos on the ``dim x dim`` PSD operator ``gram``; Ritz values and SLQ weights."""
    basis = torch.zeros(batch, steps, dim, dtype=torch.float64, device=x.device)
    alpha = torch.zeros(batch, steps, dtype=torch.float64, device=x.device)
    beta = torch.zeros(batch, steps, dtype=torch.float64, device=x.device)
    # A residual below the model's rounding noise means the Krylov space is exhausted: restart
    # from a fresh direction, decoupled from the start vector (beta = 0 keeps the weights right).
    breakdown = 10 * torch.finfo(x.dtype).eps
    q = _random_unit(batch, dim, x, generator)
    for j in range(steps):
        basis[:, j] = q
        w = gram(q.to(x.dtype)).to(torch.float64)
        scale = w.norm(dim=1)
        alpha[:, j] = (w * q).sum(dim=1)
        # Full reorthogonalisation: without it Ritz values repeat ("ghosts", Parlett, 1998).
        w = _orthogonalise(w, basis[:, : j + 1])
        if j + 1 == steps:
            break
        beta[:, j] = w.norm(dim=1)
        broken = beta[:, j] <= breakdown * scale.clamp_min(torch.finfo(torch.float64).tiny)
        if bool(broken.any()):
            beta[broken, j] = 0.0
            fresh = _orthogonalise(_random_unit(batch, dim, x, generator), basis[:, : j + 1])
            w = torch.where(broken[:, None], fresh, w)
        q = w / w.norm(dim=1, keepdim=True)
    tridiagonal = (
        torch.diag_embed(alpha)
        + torch.diag_embed(beta[:, :-1], offset=1)
        + torch.diag_embed(beta[:, :-1], offset=-1)
    )
    ritz_values, ritz_vectors = torch.linalg.eigh(tridiagonal)
    return ritz_values, ritz_vectors[:, 0, :] ** 2


def _random_unit(batch: int, dim: int, x: Tensor, generator: torch.Generator) -> Tensor:
    v = torch.randn(batch, dim, generator=generator, device=x.device, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


def _orthogonalise(w: Tensor, basis: Tensor) -> Tensor:
    """Project ``w`` [B, d] off the span of orthonormal ``basis`` [B, s, d]; twice is enough."""
    for _ in range(2):
        w = w - torch.einsum("bs,bsd->bd", torch.einsum("bsd,bd->bs", basis, w), basis)
    return w
