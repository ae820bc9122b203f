"""What a probe must give back (``training`` flags, buffers, the global RNG states), and the
checks probes that take two models share."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def restored_mode(
    model: object, *, eval_mode: bool = True, restore_buffers: bool = False
) -> Iterator[None]:
    """Run the body (in eval mode by default) and restore every submodule's ``training`` flag.

    With ``restore_buffers`` the buffers (BatchNorm running statistics) are copied back too, for
    probes that run the model in train mode. A non-Module callable passes through untouched.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> with restored_mode(net):
        ...     net[1].training
        False
        >>> net[1].training
        True
    """
    if not isinstance(model, nn.Module):
        yield
        return
    training = {module: module.training for module in model.modules()}
    saved = [(b, b.clone()) for b in model.buffers()] if restore_buffers else []
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for module, flag in training.items():
            module.training = flag
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)


def _tensors(source: object) -> Iterator[Tensor]:
    if isinstance(source, nn.Module):
        yield from source.parameters()
        yield from source.buffers()
    elif isinstance(source, Tensor):
        yield source
    elif isinstance(source, (list, tuple)):
        for item in source:
            yield from _tensors(item)


def cuda_devices(*sources: object) -> list[int]:
    """Indices of the CUDA devices holding any tensor of ``sources`` (modules, tensors, lists).

    >>> cuda_devices(nn.Linear(2, 2), torch.zeros(1))
    []
    """
    return sorted(
        {
            t.device.index if t.device.index is not None else torch.cuda.current_device()
            for source in sources
            for t in _tensors(source)
            if t.device.type == "cuda"
        }
    )


@contextlib.contextmanager
def forked_rng(*sources: object) -> Iterator[None]:
    """Restore the CPU RNG and that of every CUDA device ``sources`` live on, after the body.

    Dropout, noise layers and an unseeded DataLoader draw from these global generators, which a
    probe must leave as it found them.

    >>> layer = nn.Linear(2, 2)
    >>> before = torch.get_rng_state()
    >>> with forked_rng(layer):
    ...     _ = torch.rand(3)
    >>> torch.equal(before, torch.get_rng_state())
    True
    """
    with torch.random.fork_rng(devices=cuda_devices(*sources)):
        yield


def check_same_architecture(
    model_a: nn.Module,
    model_b: nn.Module,
    caller: str,
    names: tuple[str, str] = ("model_a", "model_b"),
) -> None:
    """Raise unless the two models have the same module types, parameters and buffers (names,
    shapes, dtypes), naming the first difference."""
    first, second = names
    for name, model in ((first, model_a), (second, model_b)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{caller}: {name} must be an nn.Module, got {type(model).__name__}")
    same = f"{first} and {second} must have the same architecture"
    modules_a = {n: type(m) for n, m in model_a.named_modules()}
    modules_b = {n: type(m) for n, m in model_b.named_modules()}
    for name in [*modules_a, *(n for n in modules_b if n not in modules_a)]:
        kind_a, kind_b = modules_a.get(name), modules_b.get(name)
        if kind_a is not kind_b:
            raise ValueError(
                f"{caller}: {same}; module {name or '<root>'!r} is "
                f"{getattr(kind_a, '__name__', 'missing')} in {first} and "
                f"{getattr(kind_b, '__name__', 'missing')} in {second}"
            )
    for kind, a, b in (
        ("parameter", dict(model_a.named_parameters()), dict(model_b.named_parameters())),
        ("buffer", dict(model_a.named_buffers()), dict(model_b.named_buffers())),
    ):
        for name in [*a, *(n for n in b if n not in a)]:
            if name not in a or name not in b:
                owner = second if name in a else first
                raise ValueError(f"{caller}: {same}; {owner} has no {kind} {name!r}")
            if a[name].shape != b[name].shape or a[name].dtype != b[name].dtype:
                raise ValueError(
                    f"{caller}: {kind} {name!r} is {tuple(a[name].shape)} {a[name].dtype} in "
                    f"{first} but {tuple(b[name].shape)} {b[name].dtype} in {second} ({same})"
                )
    if not dict(model_a.named_parameters()):
        raise ValueError(f"{caller}: the models have no parameters")
