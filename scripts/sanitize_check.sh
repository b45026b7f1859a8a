#!/usr/bin/env bash
# Build dip_fast._C with AddressSanitizer and UBSan (CPU kernels, CMake, in
# cmake-build-sanitize/) and run the op tests against that build: every
# out-of-bounds access, use after free or undefined behaviour in the C++
# kernels aborts the run. `make test-sanitize` runs the whole op suite, the
# fuzz tests included (CI runs them all too); SANITIZE_MARKERS narrows it
# (default "not cuda") and SANITIZE_PYTEST_ARGS adds pytest options. The op
# tests must not skip here: DIP_FAST_REQUIRE_EXTENSION=1 makes a build that
# fails to load, or lacks ops, an error.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
export BUILD_DIR=${BUILD_DIR:-cmake-build-sanitize}
# Debug keeps assert() on (no NDEBUG); CMakeLists.txt sets -O1 -g for this build.
DIP_FAST_SANITIZE=ON DIP_FAST_WITH_CUDA=OFF CMAKE_BUILD_TYPE=Debug bash scripts/cmake_check.sh

so=$(cd "$BUILD_DIR" && ls "$PWD"/_C*.so | head -n1)
export DIP_FAST_EXTENSION=$so
export DIP_FAST_REQUIRE_EXTENSION=1
# The tests must exercise this build, not the installed module.
bash scripts/with_sanitizers.sh "$PY" -c '
import os, sys
from dip_fast import _ops
assert _ops._C is not None, _ops.LOAD_ERROR
assert os.path.samefile(_ops._C.__file__, sys.argv[1]), (_ops._C.__file__, sys.argv[1])
print(f"sanitizer build loaded: {_ops._C.__file__}")
' "$so"
markers=${SANITIZE_MARKERS:-not cuda}
read -r -a extra <<< "${SANITIZE_PYTEST_ARGS:-}"
start=$(date +%s)
bash scripts/with_sanitizers.sh "$PY" -m pytest -q -p no:cacheprovider -m "$markers" "${extra[@]}" tests/test_ops_*.py
echo "sanitized op tests: clean in $(( $(date +%s) - start )) s"
