"""What a probe must give back: the model's ``training`` flags (and, if asked, its buffers)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


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
