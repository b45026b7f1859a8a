# Two commands for a newcomer: `make demo` and `make test`.
# Each creates .venv on a fresh machine, installs torch ($(TORCH_SPEC)), builds
# and installs dip_fast with its test extras, then does its job. Set-up is
# skipped when nothing changed; the stamp's name encodes TORCH_SPEC, FORCE_CUDA,
# FORCE_CPU and TORCH_CUDA_ARCH_LIST so that changing one rebuilds.

PYTHON      ?= python3
TORCH_SPEC  ?= torch
FORCE_CUDA  ?=
FORCE_CPU   ?=
TORCH_CUDA_ARCH_LIST ?=
MAX_JOBS    ?= 2
PYTEST_ARGS ?=
# Tests run against the sanitizer build: all op tests (fuzzing included) by default.
SANITIZE_MARKERS ?= not cuda

VENV    := .venv
PY      := $(VENV)/bin/python
SETTING := $(shell echo '$(TORCH_SPEC)|$(FORCE_CUDA)|$(FORCE_CPU)|$(TORCH_CUDA_ARCH_LIST)' | md5sum | cut -c1-10)
DEPS_STAMP  := $(VENV)/.deps-$(shell echo '$(TORCH_SPEC)' | md5sum | cut -c1-10)
BUILD_STAMP := $(VENV)/.build-$(SETTING)
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

export FORCE_CUDA FORCE_CPU TORCH_CUDA_ARCH_LIST MAX_JOBS

.PHONY: setup demo test test-slow test-sanitize bench cmake-check cuda-report sdist-check docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, then the build and test tools; installing the package itself
# with --no-build-isolation compiles against this torch, not a second copy.
# (PyWavelets only for bench/noise_level.py's comparison with the wavelet estimate.)
$(DEPS_STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q setuptools wheel numpy pillow scikit-image PyWavelets tqdm matplotlib \
		pytest pytest-benchmark hypothesis ninja pybind11 "cmake>=3.27"
	$(PY) -m pip install -q "deepinv>=0.5.0" torchvision "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')"  # the [deepinv] extra, torch kept
	$(PY) -m pip install -q mkdocs mkdocs-material "mkdocstrings[python]"
	rm -f $(VENV)/.deps-*
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e ".[test]"
	rm -f $(VENV)/.build-*
	touch $@

setup: $(BUILD_STAMP)

demo: setup
	$(VENV)/bin/dip-fast demo --out out

# Every test that needs no GPU, except those marked slow (below).
test: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The slow tests: fuzzing, quality, kill-safety (real SIGKILLs and SIGINTs), the
# toy op family of CONTRIBUTING.md's recipe (a C++ build) and the CUDA static
# check (an nvcc pass, when the extension has CUDA kernels); then every op test
# against the sanitizer build.
test-slow: setup
	$(PY) -m pytest -q -m "slow" $(PYTEST_ARGS)
	SANITIZE_MARKERS="not cuda" bash scripts/sanitize_check.sh

# The op tests (tests/test_ops_*.py) against dip_fast._C built with
# AddressSanitizer and UBSan (CPU kernels, in cmake-build-sanitize/).
test-sanitize: setup
	SANITIZE_MARKERS="$(SANITIZE_MARKERS)" bash scripts/sanitize_check.sh

bench: setup
	$(PY) bench/compare.py

# CMake build of the same sources (CPU variant by default), then an import check.
cmake-check: setup
	bash scripts/cmake_check.sh

# Registers, shared memory, stack and spills of every CUDA kernel, compiled for
# sm_90 with ptxas -v from setup.py's flags (needs nvcc, not a GPU; results are
# cached under .cache/cuda-report). tests/test_cuda_static.py fails on spills.
cuda-report: $(DEPS_STAMP)
	$(PY) scripts/cuda_report.py --arch 9.0 --jobs $(MAX_JOBS)

# The documentation site (docs/ and mkdocs.yml; the API reference from the
# docstrings, which it reads without importing the package), into build/site.
# --strict: a warning, such as a docstring naming an object that does not exist, fails it.
docs: $(DEPS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf build dist *.egg-info dip_fast/_C*.so cmake-build cmake-build-sanitize
