"""Shared helpers of torch_dlt's tests: devices, seeded samples, tiny models, model snapshots.

One place for what tests across the package need, so that every test draws its samples and
builds its models the same way and checks that probes leave the model as they found it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from torch_dlt.nn.models import DeepCNN, DeepMLP

__all__ = [
    "ModelSnapshot",
    "devices",
    "gloo_available",
    "input_pair",
    "randn",
    "run_gloo_workers",
    "seeded",
    "tiny_bn_dropout_net",
    "tiny_cnn",
    "tiny_mlp",
]


def devices() -> list[str]:
    """``["cpu"]``, plus ``"cuda"`` when a GPU is available.

    Example:
        >>> "cpu" in devices()
        True
    """
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def seeded(seed: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``; the global RNG is not touched.

    Example:
        >>> bool(torch.rand(2, generator=seeded(3)).equal(torch.rand(2, generator=seeded(3))))
        True
    """
    return torch.Generator(device=device).manual_seed(seed)


def randn(
    *shape: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Standard normal samples of ``shape``, reproducible from ``seed``.

    Example:
        >>> randn(2, 3, seed=1).shape
        torch.Size([2, 3])
    """
    return torch.randn(*shape, generator=seeded(seed, device), dtype=dtype, device=device)


def input_pair(
    n_pairs: int,
    features: int,
    *,
    q: float = 1.0,
    c: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    r"""Pairs of inputs with exactly :math:`\frac1N\lVert x_a\rVert^2 = q` and cosine ``c``.

    The input of a mean-field correlation experiment (Poole et al. 2016): random directions,
    Gram-Schmidt within each pair, then scaled.

    Args:
        n_pairs (int): number of pairs B.
        features (int): input size N (at least 2).
        q (float): mean square of every input.
        c (float): cosine between ``x1[b]`` and ``x2[b]``, in [-1, 1].

    Returns:
        tuple[Tensor[B, N], Tensor[B, N]]: ``(x1, x2)``.

    Example:
        >>> x1, x2 = input_pair(4, 10, q=2.0, c=0.3)
        >>> bool(torch.allclose((x1 * x2).sum(1) / (x1.norm(dim=1) * x2.norm(dim=1)),
        ...                     torch.full((4,), 0.3, dtype=torch.float64)))
        True
    """
    z = randn(2, n_pairs, features, seed=seed, dtype=dtype)
    u = z[0] / z[0].norm(dim=1, keepdim=True)
    v = z[1] - (z[1] * u).sum(1, keepdim=True) * u
    v = v / v.norm(dim=1, keepdim=True)
    scale = (q * features) ** 0.5
    return scale * u, scale * (c * u + (1.0 - c * c) ** 0.5 * v)


def _build(seed: int, dtype: torch.dtype, make: Callable[[], nn.Module]) -> nn.Module:
    # PyTorch's default initialisers draw from the global RNG: fork it so tests stay independent.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().to(dtype)


def tiny_mlp(
    in_features: int = 6,
    width: int = 8,
    depth: int = 2,
    out_features: int = 3,
    *,
    activation: str = "tanh",
    bias: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> DeepMLP:
    """A small :class:`~torch_dlt.nn.DeepMLP`, initialised reproducibly from ``seed``.

    Example:
        >>> tiny_mlp()(randn(5, 6)).shape
        torch.Size([5, 3])
    """
    return _build(
        seed, dtype, lambda: DeepMLP(in_features, width, depth, out_features, activation, bias)
    )


def tiny_cnn(
    in_channels: int = 2,
    width: int = 4,
    depth: int = 2,
    out_features: int = 3,
    *,
    activation: str = "tanh",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> DeepCNN:
    """A small :class:`~torch_dlt.nn.DeepCNN`, initialised reproducibly from ``seed``.

    Example:
        >>> tiny_cnn()(randn(5, 2, 6, 6)).shape
        torch.Size([5, 3])
    """
    return _build(seed, dtype, lambda: DeepCNN(in_channels, width, depth, out_features, activation))


def tiny_bn_dropout_net(
    in_features: int = 6, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> nn.Sequential:
    """``Linear -> BatchNorm1d -> Tanh -> Dropout(0.5) -> Linear`` in train mode.

    Everything a probe could wrongly change: running statistics, a training flag, RNG use.

    Example:
        >>> net = tiny_bn_dropout_net()
        >>> net.training, net[1].running_mean.shape
        (True, torch.Size([8]))
    """
    return _build(
        seed,
        dtype,
        lambda: nn.Sequential(
            nn.Linear(in_features, 8),
            nn.BatchNorm1d(8),
            nn.Tanh(),
            nn.Dropout(0.5),
            nn.Linear(8, 3),
        ),
    )


@dataclass(frozen=True)
class ModelSnapshot:
    """What a probe must leave unchanged: a model's tensors and flags and the global RNGs.

    Example:
        >>> net = tiny_bn_dropout_net()
        >>> snapshot = ModelSnapshot.take(net)
        >>> with torch.no_grad():
        ...     _ = net(randn(4, 6))  # a train-mode forward updates the running statistics
        >>> snapshot.differences(net)[0]
        'buffer 1.running_mean'
        >>> "torch RNG state" in snapshot.differences(net)
        True
    """

    parameters: dict
    buffers: dict
    training: dict
    requires_grad: dict
    torch_rng: Tensor
    cuda_rng: list
    numpy_rng: tuple

    @classmethod
    def take(cls, model: nn.Module) -> ModelSnapshot:
        """Copy everything :meth:`differences` compares."""
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        return cls(
            parameters={n: p.detach().clone() for n, p in model.named_parameters()},
            buffers={n: b.detach().clone() for n, b in model.named_buffers()},
            training={n: m.training for n, m in model.named_modules()},
            requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if cuda else [],
            numpy_rng=np.random.get_state(),  # noqa: NPY002 (the global state is what we guard)
        )

    def differences(self, model: nn.Module) -> list[str]:
        """What changed since :meth:`take` (bitwise), as readable items; empty when nothing did."""
        now = ModelSnapshot.take(model)
        changed = []
        for kind in ("parameters", "buffers"):
            before, after = getattr(self, kind), getattr(now, kind)
            changed += [f"{kind[:-1]} {n}" for n in before if n not in after]
            changed += [
                f"{kind[:-1]} {n}"
                for n in after
                if n not in before or not _same(before[n], after[n])
            ]
        changed += [
            f"training flag of {n!r}"
            for n in now.training
            if self.training.get(n) != now.training[n]
        ]
        changed += [
            f"requires_grad of {n}"
            for n in now.requires_grad
            if self.requires_grad.get(n) != now.requires_grad[n]
        ]
        if not self.torch_rng.equal(now.torch_rng):
            changed.append("torch RNG state")
        if len(self.cuda_rng) != len(now.cuda_rng) or any(
            not a.equal(b) for a, b in zip(self.cuda_rng, now.cuda_rng)
        ):
            changed.append("CUDA RNG state")
        if not _same_numpy_state(self.numpy_rng, now.numpy_rng):
            changed.append("numpy RNG state")
        return changed

    def assert_unchanged(self, model: nn.Module) -> None:
        """Raise ``AssertionError`` listing what changed since :meth:`take`."""
        changed = self.differences(model)
        if changed:
            raise AssertionError(f"the model or the RNG changed: {changed}")


def _same(a: Tensor, b: Tensor) -> bool:
    # Bitwise, so that NaN equals the same NaN and -0.0 differs from 0.0.
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _same_numpy_state(a: tuple, b: tuple) -> bool:
    return all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(a, b))


def gloo_available() -> bool:
    """Whether this torch can run ``torch.distributed`` on the gloo backend."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def run_gloo_workers(worker: Callable[..., None], args: tuple, nprocs: int = 2) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` local processes and wait for all of them.

    The workers start by fork where the platform has it (they inherit the imported modules,
    torch._dynamo included, which DistributedDataParallel would otherwise import for seconds in
    each) and by spawn elsewhere, with the worker's package root on their path. Both processes
    live on this machine, so gloo uses the loopback interface: no hostname lookup, which
    sandboxes without DNS can make hang. The caller's environment and path are restored.
    """
    import multiprocessing
    import os
    import sys
    from pathlib import Path

    saved_env, saved_path = os.environ.get("GLOO_SOCKET_IFNAME"), list(sys.path)
    try:
        if Path("/sys/class/net/lo").exists():
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        if "fork" in multiprocessing.get_all_start_methods():
            import torch._dynamo  # noqa: F401

            start_method = "fork"
        else:
            module = sys.modules[worker.__module__]
            sys.path.insert(
                0, str(Path(module.__file__).resolve().parents[module.__name__.count(".")])
            )
            start_method = "spawn"
        torch.multiprocessing.start_processes(
            worker, args=args, nprocs=nprocs, join=True, start_method=start_method
        )
    finally:
        sys.path[:] = saved_path
        if saved_env is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = saved_env
