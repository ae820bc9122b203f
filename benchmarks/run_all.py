"""Run every benchmark in benchmarks/ (each writes its JSON to benchmarks/results/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    failed = []
    # Every script here but the private helpers (_*.py) and this runner.
    scripts = [
        p for p in HERE.glob("*.py") if not p.name.startswith("_") and p.name != "run_all.py"
    ]
    for script in sorted(scripts):
        print(f"== {script.name}", flush=True)
        if subprocess.call([sys.executable, str(script), *sys.argv[1:]], cwd=HERE) != 0:
            failed.append(script.name)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
