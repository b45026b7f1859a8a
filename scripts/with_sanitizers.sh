#!/usr/bin/env bash
# Run a command (a Python) with the sanitizer runtimes preloaded, so that the
# ASan/UBSan build of dip_fast._C (DIP_FAST_SANITIZE=ON, see CMakeLists.txt)
# can be loaded into an uninstrumented interpreter:
#
#   bash scripts/with_sanitizers.sh .venv/bin/python -c 'import torch'
#
# ASan must be the first library in the process, hence LD_PRELOAD; libstdc++
# comes with it so that ASan's exception interceptors find the real
# __cxa_throw when it starts.
set -euo pipefail
CXX=${CXX:-c++}
asan=$("$CXX" -print-file-name=libasan.so)
stdcxx=$("$CXX" -print-file-name=libstdc++.so.6)
[ -f "$asan" ] || { echo "with_sanitizers.sh: $CXX has no libasan.so" >&2; exit 2; }
export LD_PRELOAD="$asan $stdcxx${LD_PRELOAD:+ $LD_PRELOAD}"
# detect_leaks=0: CPython and torch keep objects alive until exit by design,
# so leak reports would be all noise. protect_shadow_gap=0: the CUDA driver
# maps memory where ASan would otherwise reserve its shadow gap.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:protect_shadow_gap=0:abort_on_error=1:print_summary=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
exec "$@"
