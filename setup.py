"""Build dip_fast._C: C++ kernels always, CUDA kernels when possible or forced.

Switches (environment variables, after pytorch_scatter):
  FORCE_CUDA=1            build the CUDA kernels even with no GPU present (CI does)
  FORCE_CPU=1             never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST    CUDA architectures, e.g. "9.0" (torch's own variable)
  DIP_FAST_DEBUG=1        -O0 -g, for gdb and sanitizers
  DIP_FAST_NATIVE=1       -march=native for the C++ kernels (wider SIMD; the
                          build then only runs on CPUs like the build machine's)
  DIP_FAST_TEST_OPS=0     leave out the test-only emulation ops
                          (csrc/cpu/*_emulated.cpp, `_<op>_emulated`); on by default

Without a switch, CUDA is built when torch sees a GPU and a CUDA toolkit is found.
Install with `pip install --no-build-isolation .` after torch: build isolation
would pull a second torch into a throwaway environment.
"""
from __future__ import annotations

import glob
import os
import sys
import sysconfig

from setuptools import find_packages, setup

import shutil

import torch


def _locate_cuda_home() -> None:
    """Point torch's build tools at a complete CUDA toolkit.

    torch guesses the CUDA home from the `nvcc` on PATH (its grandparent
    folder). When that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc), the
    guess has no headers or cudart to link. We keep an explicit CUDA_HOME or
    CUDA_PATH, otherwise take the first candidate that has cuda_runtime.h.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


_locate_cuda_home()

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def want_cuda() -> bool:
    if env_flag("FORCE_CPU"):
        return False
    if env_flag("FORCE_CUDA"):
        if CUDA_HOME is None:
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def pip_cuda_include_dirs() -> list[str]:
    """Header folders of the pip CUDA packages (nvidia/*/include).

    A CUDA build of torch from pip ships cuBLAS, cuSPARSE, cuDNN ... headers in
    site-packages rather than in the CUDA home; ATen/cuda/CUDAContext.h needs
    them (it stops at cusparse.h otherwise).
    """
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    roots.add(os.path.dirname(os.path.dirname(torch.__file__)))
    found: list[str] = []
    for root in sorted(roots):
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if os.path.isdir(inc) and inc not in found:
                found.append(inc)
    return found


def extension_sources(kind: str, test_ops: bool = True) -> list[str]:
    """The sources of one kind ("cpp" or "cu"), by the layout of csrc/ (csrc/module.cpp explains it).

    C++: the module, every op family's schema file (csrc/ops/) and CPU
    kernels (csrc/cpu/), the test-only emulations (csrc/cpu/*_emulated.cpp,
    which also declare their ops) unless ``test_ops`` is False. CUDA:
    csrc/cuda/*.cu. A new op family needs no edit here.
    """
    if kind == "cu":
        return sorted(glob.glob("csrc/cuda/*.cu"))
    cpu = sorted(glob.glob("csrc/cpu/*.cpp"))
    if not test_ops:
        cpu = [s for s in cpu if not s.endswith("_emulated.cpp")]
    return ["csrc/module.cpp"] + sorted(glob.glob("csrc/ops/*.cpp")) + cpu


def make_extension():
    debug = env_flag("DIP_FAST_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-trapping-math lets the compiler vectorise the LeakyReLU select
    # (the kernels never rely on floating-point exception flags).
    cxx = opt + ["-fopenmp", "-fno-trapping-math"]
    if env_flag("DIP_FAST_NATIVE"):
        cxx.append("-march=native")
    sources = extension_sources("cpp", test_ops=os.environ.get("DIP_FAST_TEST_OPS", "1") != "0")
    define_macros: list[tuple[str, str | None]] = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra_link = ["-fopenmp"]

    if want_cuda():
        sources += extension_sources("cu")
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        if not archs and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            archs = f"{major}.{minor}"
        define_macros += [("DIP_FAST_WITH_CUDA", None), ("DIP_FAST_CUDA_ARCHS", f'"{archs}"')]
        include_dirs += pip_cuda_include_dirs()
        # -fmad=false: no multiply-add contraction, so the kernels round exactly
        # like their CPU emulation (csrc/cpu/*_emulated.cpp); free for these
        # memory-bound kernels.
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo", "-fmad=false"]
        return CUDAExtension(
            "dip_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=extra_link,
        )
    return CppExtension(
        "dip_fast._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=extra_link,
    )


setup(
    packages=find_packages(include=["dip_fast", "dip_fast.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
