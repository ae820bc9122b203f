"""Find the CUDA toolkit and torch's bundled CUDA pieces for building torch_dlt's kernels.

Used by setup.py, and run as a script to print the CMake arguments for CMakeLists.txt:

    cmake -S . -B build-cmake $(python tools/find_cuda.py --cmake-args)

The `nvcc` on PATH may be a wrapper script outside the toolkit, and a slim toolkit may lack the
cuBLAS / cuSPARSE headers and NVRTC that torch's own CUDA headers and CMake config ask for; torch's
`nvidia/cu*` wheels supply those.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path


def is_toolkit(path: Path) -> bool:
    """A CUDA toolkit root holds the real compiler and the runtime headers and libraries."""
    return (
        (path / "bin" / "nvcc").is_file()
        and (path / "include" / "cuda_runtime.h").is_file()
        and ((path / "lib64").is_dir() or (path / "lib").is_dir())
    )


def _wrapper_target(nvcc: Path) -> Path | None:
    """Follow a shell-script `nvcc` wrapper (``exec /opt/cuda/bin/nvcc "$@"``) to the real one."""
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for token in head.decode(errors="ignore").replace('"', " ").replace("'", " ").split():
        if token.endswith("/bin/nvcc") and Path(token).is_file():
            return Path(token).resolve()
    return None


def find_cuda_home() -> Path | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, the `nvcc` on PATH, /usr/local/cuda*."""
    candidates: list[Path] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]))
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        nvcc = Path(directory) / "nvcc"
        if nvcc.is_file():
            real = nvcc.resolve()
            candidates.append(real.parent.parent)
            target = _wrapper_target(real)
            if target is not None:
                candidates.append(target.parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    candidates.extend(Path(p) for p in sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    for candidate in candidates:
        if is_toolkit(candidate):
            return candidate.resolve()
    return None


def bundled_cuda_roots() -> list[str]:
    """Roots of torch's `nvidia/cu*` wheels (each with include/ and lib/), newest first."""
    found: set[str] = set()
    for entry in sys.path:
        found.update(glob.glob(os.path.join(entry, "nvidia", "cu[0-9]*")))
    return sorted((p for p in found if os.path.isdir(os.path.join(p, "include"))), reverse=True)


def bundled_cuda_includes() -> list[str]:
    """Header folders of torch's CUDA wheels, for a toolkit without cuBLAS / cuSPARSE headers."""
    return [os.path.join(root, "include") for root in bundled_cuda_roots()]


def cmake_args(cuda: bool = False) -> list[str]:
    """CMake cache arguments that let `find_package(Torch)` succeed with a CUDA build of torch."""
    import torch

    args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if cuda:
        args.append("-DTORCH_DLT_CUDA=ON")
    if torch.version.cuda is None:
        return args
    home = find_cuda_home()
    if home is None:
        raise SystemExit(
            "torch is a CUDA build, so its CMake config needs a CUDA toolkit: set CUDA_HOME to "
            "the folder that holds bin/nvcc, include/cuda_runtime.h and lib64"
        )
    args += [f"-DCUDA_TOOLKIT_ROOT_DIR={home}", f"-DCMAKE_CUDA_COMPILER={home / 'bin' / 'nvcc'}"]
    for root in bundled_cuda_roots():
        nvrtc = sorted(glob.glob(os.path.join(root, "lib", "libnvrtc.so*")))
        nvrtc = [p for p in nvrtc if "builtins" not in p and ".alt." not in p]
        if nvrtc and not glob.glob(str(home / "lib*" / "libnvrtc.so*")):
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
            break
    return args


if __name__ == "__main__":
    if "--cmake-args" in sys.argv:
        print(" ".join(cmake_args(cuda="--cuda" in sys.argv)))
    else:
        print(find_cuda_home() or "")
