"""The README's quick start runs as written."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert (tmp_path / "reports" / "my_model.html").is_file()
    # critical_init_ put the net at the edge of chaos, so 50 steps leave no layer flagged
    assert namespace["monitor"].report().flagged == []


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[1:]


@pytest.mark.parametrize("index", range(len(_examples())))
def test_every_other_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng(devices=[]):
        exec(compile(_examples()[index], f"README.md example {index + 1}", "exec"), {})
