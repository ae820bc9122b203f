"""Builds torch_dlt._C, the compiled operator library, from csrc/.

CPU kernels are always built. CUDA kernels are built when FORCE_CUDA=1, or when torch is a CUDA
build and a CUDA toolkit is found (TORCH_DLT_CPU_ONLY=1 skips them). TORCH_DLT_NO_EXT=1 builds no
extension at all: the package then runs on its pure-PyTorch reference implementations.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# setuptools wants source paths relative to the project root.
os.chdir(ROOT)
sys.path.insert(0, str(ROOT / "tools"))
from find_cuda import bundled_cuda_includes, find_cuda_home  # noqa: E402

CSRC = Path("csrc")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def build_extensions():
    if _truthy("TORCH_DLT_NO_EXT"):
        print("torch_dlt: TORCH_DLT_NO_EXT=1, building no extension (pure-PyTorch reference path)")
        return [], {}

    cuda_home = None
    force_cuda = _truthy("FORCE_CUDA")
    if force_cuda or not _truthy("TORCH_DLT_CPU_ONLY"):
        cuda_home = find_cuda_home()
        if cuda_home is not None:
            # torch.utils.cpp_extension reads CUDA_HOME once, at import.
            os.environ["CUDA_HOME"] = str(cuda_home)
        elif force_cuda:
            raise RuntimeError(
                "FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the folder that "
                "holds bin/nvcc, include/cuda_runtime.h and lib64"
            )

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = cuda_home is not None and torch.version.cuda is not None
    if force_cuda and torch.version.cuda is None:
        raise RuntimeError("FORCE_CUDA=1 but this torch is a CPU-only build")

    sources = [str(CSRC / "ops.cpp"), str(CSRC / "python_module.cpp")]
    sources += sorted(str(p) for p in (CSRC / "cpu").glob("*.cpp"))
    extra_compile_args = {"cxx": ["-O3"]}
    include_dirs = [str(ROOT / "csrc")]
    define_macros: list = []
    if with_cuda:
        sources += sorted(str(p) for p in (CSRC / "cuda").glob("*.cu"))
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
        if not (Path(cuda_home) / "include" / "cublas_v2.h").is_file():
            include_dirs += bundled_cuda_includes()
        ext = CUDAExtension(
            "torch_dlt._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra_compile_args,
            define_macros=define_macros,
            py_limited_api=True,
        )
        print(f"torch_dlt: building CPU and CUDA kernels (CUDA toolkit: {cuda_home})")
    else:
        ext = CppExtension(
            "torch_dlt._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra_compile_args,
            define_macros=define_macros,
            py_limited_api=True,
        )
        print("torch_dlt: building CPU kernels only")
    cmdclass = {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}
    return [ext], cmdclass


ext_modules, cmdclass = build_extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
