#!/usr/bin/env bash
# Configure and build dip_fast._C with CMake (CPU variant unless
# DIP_FAST_WITH_CUDA=ON), then load it and call an op. Used by CI.
# DIP_FAST_SANITIZE=ON builds with AddressSanitizer and UBSan (the import
# check then runs under scripts/with_sanitizers.sh); BUILD_DIR and
# CMAKE_BUILD_TYPE choose the folder and the optimisation level.
#
# With a CUDA build of torch, Torch's CMake config probes CUDA even for a CPU
# module; it needs a recent cmake (pip's, for the CUDA20 dialect), an explicit
# TORCH_CUDA_ARCH_LIST (no GPU to detect), the toolkit root, nvrtc from pip,
# and the pip CUDA headers. Each hint below was needed on a GPU-less machine.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
BUILD_DIR=${BUILD_DIR:-cmake-build}
WITH_CUDA=${DIP_FAST_WITH_CUDA:-OFF}
SANITIZE=${DIP_FAST_SANITIZE:-OFF}
BUILD_TYPE=${CMAKE_BUILD_TYPE:-Release}
CMAKE=$(dirname "$PY")/cmake
[ -x "$CMAKE" ] || CMAKE=cmake

prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
args=(-S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="$BUILD_TYPE" -DCMAKE_PREFIX_PATH="$prefix"
      -DPython3_EXECUTABLE="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
      -DDIP_FAST_WITH_CUDA="$WITH_CUDA" -DDIP_FAST_SANITIZE="$SANITIZE")

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
  cuda_home=${CUDA_HOME:-/usr/local/cuda}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  incs=$(ls -d "$site"/nvidia/*/include 2>/dev/null | paste -sd';' -)
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_home" -DCMAKE_CUDA_COMPILER="$cuda_home/bin/nvcc"
         -DDIP_FAST_EXTRA_INCLUDE_DIRS="$incs")
  nvrtc=$(ls "$site"/nvidia/cu*/lib/libnvrtc.so.* 2>/dev/null | head -n1 || true)
  [ -n "$nvrtc" ] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
fi

"$CMAKE" "${args[@]}"
"$CMAKE" --build "$BUILD_DIR" -j "${MAX_JOBS:-2}"

so=$(ls "$BUILD_DIR"/_C*.so | head -n1)
run=()
[ "$SANITIZE" = ON ] && run=(bash scripts/with_sanitizers.sh)
"${run[@]}" "$PY" - "$so" <<'PYEOF'
import importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
ops = list(mod.registered_ops())
assert "leaky_relu" in ops, ops
x = torch.tensor([-1.0, 2.0])
y = torch.ops.dip_fast.leaky_relu(x, 0.2)
assert torch.allclose(y, torch.tensor([-0.2, 2.0])), y
print(f"CMake build OK: {sys.argv[1]} registers {len(ops)} ops, openmp={mod.openmp()}")
PYEOF
