"""``torch-dlt diagnose``: the theory's predictions next to measurements on one model, as HTML.

Each section is a function of a :class:`DiagnoseContext` returning a :class:`Section`; sections
register themselves in order with :func:`register_section`, so later parts of the library add
their own. The model, its data and the global RNG state are the same after the report as before.
"""

from __future__ import annotations

import datetime
import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from torch_dlt.probes._state import restored_mode
from torch_dlt.report._html import Section, render

__all__ = [
    "DiagnoseContext",
    "DiagnoseReport",
    "diagnose",
    "load_factory",
    "register_section",
    "section_names",
]


@dataclass
class DiagnoseContext:
    """What every section sees: the model, one batch of its data, and the report's settings."""

    model: nn.Module
    inputs: Tensor
    targets: Tensor | None
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    activation: str | None = None
    model_name: str = "model"
    data_name: str = "data"
    seed: int = 0
    quick: bool = False


SectionFn = Callable[[DiagnoseContext], Section]
_SECTIONS: dict[str, SectionFn] = {}


def register_section(name: str, fn: SectionFn | None = None):
    """Add a report section (usable as a decorator); sections run in registration order."""

    def add(f: SectionFn) -> SectionFn:
        _SECTIONS[name] = f
        return f

    return add if fn is None else add(fn)


def section_names() -> list[str]:
    """Names of the registered sections, in the order they run."""
    _load_builtin_sections()
    return list(_SECTIONS)


_BUILTIN_SECTION_MODULES = ("sections", "curvature", "filters", "robustness", "certification")


def _load_builtin_sections() -> None:
    import importlib

    for name in _BUILTIN_SECTION_MODULES:  # each registers its sections on import
        importlib.import_module(f"torch_dlt.report.{name}")


@dataclass
class DiagnoseReport:
    """The written report: where it is, its sections, and a short text summary."""

    path: Path
    sections: list[Section] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = []
        for s in self.sections:
            lines.append(f"{s.title}:" + (" FAILED - " + s.error if s.error else ""))
            lines.extend(f"  - {line}" for line in s.summary)
        return "\n".join(lines)


def load_factory(spec: str) -> Callable[[], object]:
    """Resolve ``"package.module:factory"`` to the callable it names.

    >>> load_factory("torch_dlt.nn.models:LeNet5")
    <class 'torch_dlt.nn.models.LeNet5'>
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(
            f"model must be given as 'package.module:factory' (e.g. "
            f"'torch_dlt.nn.models:LeNet5'), got {spec!r}"
        )
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} of {spec!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec!r} is not callable: a factory returning an nn.Module is needed")
    return obj


def _as_batch(data: object) -> tuple[Tensor, Tensor | None]:
    if isinstance(data, Tensor):
        return data, None
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return data[0], data[1]
    if isinstance(data, Iterator) or hasattr(data, "__iter__"):
        first = next(iter(data), None)
        if first is not None:
            return _as_batch(first)
    raise TypeError(
        "data must be an input Tensor, an (inputs, targets) pair of Tensors, or an iterable "
        f"(e.g. a DataLoader) of such pairs; got {type(data).__name__}"
    )


def _default_data(model: nn.Module, batch_size: int) -> tuple[Tensor, Tensor, str]:
    """The digits shaped for what the model accepts: [B, 1, 28, 28], [B, 1, 8, 8] or [B, 64]."""
    from torch_dlt.data import digits

    attempts = [(28, False), (8, False), (8, True)]
    errors = []
    for size, flat in attempts:
        x, y = digits(size=size)
        x, y = x[:batch_size], y[:batch_size]
        if flat:
            x = x.flatten(1)
        param = next(model.parameters(), None)
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype)
        try:
            with torch.no_grad(), restored_mode(model):
                model(x[:2])
        except Exception as exc:  # any failure means "not this input shape"
            errors.append(f"{tuple(x.shape[1:])}: {type(exc).__name__}: {exc}")
            continue
        return x, y.to(x.device), f"digits {tuple(x.shape[1:])} (scikit-learn, first {len(x)})"
    raise ValueError(
        "the model accepts none of the digits input shapes tried; give data explicitly "
        "(a factory returning (model, (inputs, targets)), or diagnose(model, data)). Tried:\n  "
        + "\n  ".join(errors)
    )


def _infer_loss(output: Tensor, targets: Tensor | None) -> Callable[[Tensor, Tensor], Tensor]:
    if targets is not None and not targets.is_floating_point() and output.dim() == 2:
        return nn.functional.cross_entropy
    return nn.functional.mse_loss


def diagnose(
    model: nn.Module | None = None,
    data: object = None,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    activation: str | None = None,
    out: str | os.PathLike = "reports/diagnose.html",
    sections: Sequence[str] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    model_name: str | None = None,
) -> DiagnoseReport:
    """Write the diagnose report of ``model`` on ``data`` to ``out`` (self-contained HTML).

    Args:
        model (nn.Module | None): the model to diagnose; ``None`` for LeNet-5 at PyTorch's
            default initialisation.
        data: an input batch ``Tensor[B, ...]``, an ``(inputs, targets)`` pair, or an iterable of
            pairs (its first batch is used); ``None`` for the scikit-learn digits, shaped for the
            model (28x28, 8x8 or flat 64).
        loss_fn: ``loss_fn(output, targets)``; default cross-entropy for integer targets and a
            2-D output, else mean squared error (against zeros when there are no targets).
        activation (str | None): the activation name for the mean-field sections; read from
            the model when ``None``.
        out (path): where to write the HTML.
        sections (list[str] | None): which registered sections to run (all by default; see
            :func:`section_names`).
        batch_size (int): samples used from ``data``.
        seed (int): seed of every random choice of the report (the caller's RNG is restored).
        quick (bool): smaller probes, for tests and smoke runs.
        progress (bool): show a progress bar over the sections.
        model_name (str | None): how the report names the model.

    Returns:
        DiagnoseReport: the path written, the sections and their summary.
    """
    _load_builtin_sections()
    if sections is None:
        chosen = list(_SECTIONS)
    else:
        unknown = [s for s in sections if s not in _SECTIONS]
        if unknown:
            raise ValueError(f"unknown sections {unknown}; available: {list(_SECTIONS)}")
        chosen = list(sections)
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model is None:
            from torch_dlt.nn.models import LeNet5

            model = LeNet5()
            model_name = model_name or "LeNet-5 (PyTorch default initialisation)"
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if data is None:
            inputs, targets, data_name = _default_data(model, batch_size)
        else:
            inputs, targets = _as_batch(data)
            inputs, targets = inputs[:batch_size], None if targets is None else targets[:batch_size]
            data_name = f"user data {tuple(inputs.shape)}"
        if loss_fn is None:
            with torch.no_grad(), restored_mode(model):
                loss_fn = _infer_loss(model(inputs[:2]), targets)
        ctx = DiagnoseContext(
            model=model,
            inputs=inputs,
            targets=targets,
            loss_fn=loss_fn,
            activation=activation,
            model_name=model_name or type(model).__name__,
            data_name=data_name,
            seed=seed,
            quick=quick,
        )
        done: list[Section] = []
        from tqdm.auto import tqdm

        bar = tqdm(chosen, desc="diagnose", unit="section", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            try:
                section = _SECTIONS[name](ctx)
            except Exception as exc:  # a failing section must not lose the others
                section = Section(title=name, error=f"{type(exc).__name__}: {exc}")
            done.append(section)

    seconds = time.perf_counter() - start
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    meta = [
        f"model: {ctx.model_name}, {n_params:,} parameters",
        f"data: {ctx.data_name}",
        f"torch {torch.__version__}; compiled ops: {_ops_status()}; "
        f"written {datetime.datetime.now().isoformat(timespec='seconds')} in {seconds:.1f} s",
    ]
    path.write_text(render("torch_dlt diagnose", meta, done), encoding="utf-8")
    return DiagnoseReport(path=path, sections=done, seconds=seconds)


def _ops_status() -> str:
    from torch_dlt import ops

    if not ops.has_ops():
        return "no (pure-PyTorch reference path)"
    return "CPU and CUDA" if ops.has_cuda_ops() else "CPU"
