"""Shared timing helpers for the benchmarks: median of repeated runs, results as JSON."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(
    fn: Callable[[], object],
    *,
    device: str = "cpu",
    repeats: int = 7,
    warmup: int = 2,
    min_time: float = 0.05,
) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` runs, each looped to ``min_time``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    loops = max(1, int(min_time / once))
    samples = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / loops)
    return statistics.median(samples)


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path
