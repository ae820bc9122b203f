"""Tests of torch_dlt.utils.retain_freed_memory: freed tensors' memory is reused without page
faults (counted by the kernel, in a fresh process each, since the setting is process-wide)."""

import subprocess
import sys
import textwrap

import pytest

from torch_dlt.utils import retain_freed_memory

GLIBC = sys.platform.startswith("linux")

_LOOP = textwrap.dedent(
    """
    import resource, sys, torch
    import torch_dlt
    if sys.argv[1] == "retain":
        assert torch_dlt.retain_freed_memory()
    def step():
        # two large temporaries alive at once, then freed: a training step's pattern
        a = torch.ones(12_000_000)
        b = a * 2
        return float(b[0])
    for _ in range(4):  # the heap settles at its peak over the first steps
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _LOOP, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="the setting applies to glibc's malloc (Linux)")
def test_freed_tensors_are_reused_without_page_faults():
    pages = 2 * 12_000_000 * 4 // 4096  # the two tensors of one step
    default = _faults("default")
    retained = _faults("retain")
    assert default >= 8 * pages  # glibc maps each 48 MB tensor afresh, step after step
    # glibc's heap still re-faults a block now and then (about one step in eight here)
    assert retained <= default // 4


def test_bad_threshold():
    with pytest.raises(TypeError, match="trim_threshold must be an int"):
        retain_freed_memory(1.5)
    with pytest.raises(ValueError, match=r"trim_threshold must be in \[1, 2\*\*31 - 1\]"):
        retain_freed_memory(0)
