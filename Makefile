# The project's commands. `make test` and `make demo` each set everything up from a fresh clone.
#   make test    ruff, pytest (with and without the compiled ops), the C++ test; compiles the CUDA
#                kernels too (FORCE_CUDA=1) so they cannot rot on a machine without a GPU
#   make demo    the diagnose report on LeNet-5 and the digits
#   make bench   benchmarks/ against the peer implementations, JSON in benchmarks/results/
#   make lint    ruff only
# On a machine with no CUDA toolkit: `make test FORCE_CUDA=0`.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FORCE_CUDA ?= 1
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2
# Tests and benchmarks run single-threaded: on shared cores torch's worker threads spinning
# against other processes make small models many times slower (override: OMP_NUM_THREADS=2).
export OMP_NUM_THREADS ?= 1
SOURCES := setup.py pyproject.toml tools/find_cuda.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)

.PHONY: all venv install test pytest pytest-noext cpptest lint demo bench clean

all: test

$(VENV)/.stamp-venv:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -U pip setuptools wheel
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	touch $@

# The package with its compiled ops and dev tools. --no-build-isolation: the build must use the
# torch above, not download a second one into an isolated build environment.
$(VENV)/.stamp-install: $(VENV)/.stamp-venv $(SOURCES)
	FORCE_CUDA=$(FORCE_CUDA) $(PY) -m pip install --no-build-isolation -e ".[dev]"
	$(PY) -c "import torch_dlt.ops as o; assert o.has_ops(), 'the compiled ops did not load'; print('compiled ops: CPU yes, CUDA', 'yes' if o.has_cuda_ops() else 'no')"
	touch $@

venv: $(VENV)/.stamp-venv
install: $(VENV)/.stamp-install

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

pytest: install
	$(PY) -m pytest -q tests torch_dlt

# Every test must also pass on the pure-PyTorch reference path (no compiler at install time).
pytest-noext: install
	TORCH_DLT_NO_EXT=1 $(PY) -m pytest -q -p no:cacheprovider tests torch_dlt

cpptest: install
	$(VENV)/bin/cmake -S . -B build-cmake $$($(PY) tools/find_cuda.py --cmake-args) > build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	$(VENV)/bin/cmake --build build-cmake -j $(MAX_JOBS)
	$(VENV)/bin/ctest --test-dir build-cmake --output-on-failure

test: lint pytest pytest-noext cpptest

demo: install
	$(PY) -m torch_dlt diagnose --out reports/diagnose.html

# The peer libraries of the `peers` extra, installed beside the pinned torch (not the package
# itself again). auto_LiRPA is not on PyPI for current torch: install it from its repository.
bench: install
	$(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['peers'])" | xargs $(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) benchmarks/run_all.py

clean:
	rm -rf build build-cmake build-cmake.log *.egg-info torch_dlt/_C*.so $(VENV)/.stamp-install
