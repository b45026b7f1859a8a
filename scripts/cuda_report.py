#!/usr/bin/env python
"""Static resource report of the project's CUDA kernels: registers, shared memory, stack, spills.

Compiles every ``.cu`` source of the extension for one architecture (default
sm_90, the CI target) with ``-Xptxas -v`` and parses what ptxas prints for
each kernel. Nothing runs on a GPU, so this works on a machine without one.

The sources and the flags are taken from ``setup.py`` itself: it is executed
with ``setuptools.setup`` replaced by a stub that keeps its arguments, so the
include folders, defines and nvcc options here are the build's, whatever
setup.py decides to pass. torch's ``BuildExtension`` adds its own flags at
build time; the same ones are added below. Only the device side is compiled
(``--cubin``): it is what ptxas sees, and skipping the host compiler halves
the time.

Kernels are found by parsing the ptxas log, so new or renamed kernels need no
change here. Results are cached under ``.cache/cuda-report/`` (``--cache``
names another folder) keyed by the sources, headers, flags and nvcc version,
so a second run with nothing changed takes a second.

    python scripts/cuda_report.py                # table
    python scripts/cuda_report.py --check        # exit 1 if any kernel spills
    python scripts/cuda_report.py --json out.json --cache /tmp/cuda-report

Exit status: 0 fine, 1 a kernel spills or the log shows no kernel for a
source (with --check: the check would be blind), 2 a compile failed, 77 no
CUDA toolkit (nothing to report).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "cuda-report"
SKIP = 77

# sm_90 limits, for the register-limited occupancy column: 64K 32-bit registers
# per SM, at most 64 resident warps, registers allocated per warp in units of 256.
SM90_REGS_PER_SM = 65536
SM90_MAX_WARPS = 64
SM90_REG_UNIT = 256


def build_spec(arch: str) -> Dict[str, Any]:
    """The CUDA sources and the nvcc command line setup.py would use for ``arch`` (e.g. "9.0")."""
    import setuptools

    os.environ["FORCE_CUDA"] = "1"  # the CUDA extension even on a machine without a GPU
    os.environ.pop("FORCE_CPU", None)
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    captured: Dict[str, Any] = {}
    real_setup = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)  # setup.py imports it by name: patch before running
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    except SystemExit as exc:  # setup.py exits when FORCE_CUDA finds no toolkit
        raise LookupError(str(exc)) from None
    finally:
        setuptools.setup = real_setup
        os.chdir(cwd)
    from torch.utils import cpp_extension as ce

    ext = captured["ext_modules"][0]
    sources = [str(ROOT / s) for s in ext.sources if s.endswith(".cu")]
    if not sources or ce.CUDA_HOME is None:
        raise LookupError("setup.py builds no CUDA sources here (no CUDA toolkit found)")
    nvcc = os.path.join(ce.CUDA_HOME, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        raise LookupError(f"no nvcc in the CUDA home {ce.CUDA_HOME}")
    args = dict(ext.extra_compile_args).get("nvcc", [])
    defines = [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in ext.define_macros]
    # What torch's BuildExtension adds to every nvcc call of an extension named dip_fast._C.
    defines += ["-DTORCH_API_INCLUDE_EXTENSION_H", f"-DTORCH_EXTENSION_NAME={ext.name.split('.')[-1]}"]
    abi = getattr(ce, "_get_glibcxx_abi_build_flags", lambda: [])()
    std = [] if any(a.startswith("-std=") for a in args) else ["-std=c++20"]
    # setuptools puts Python's headers on every extension's include path too.
    includes = list(ext.include_dirs) + [sysconfig.get_paths()["include"]]
    flags = (
        list(ce.COMMON_NVCC_FLAGS) + list(args) + std + abi + defines
        + [f"-I{d}" for d in includes] + ce._get_cuda_arch_flags(list(args))
    )
    return {"nvcc": nvcc, "sources": sources, "flags": flags}


def _fingerprint(spec: Dict[str, Any], source: str) -> str:
    """Hash of everything that can change a kernel's code: the file, the project's headers, flags, nvcc."""
    h = hashlib.sha256()
    h.update(Path(source).read_bytes())
    for header in sorted((ROOT / "csrc").rglob("*")):
        if header.suffix in (".h", ".cuh", ".hpp"):
            h.update(str(header.relative_to(ROOT)).encode())
            h.update(header.read_bytes())
    h.update("\0".join(spec["flags"]).encode())
    h.update(subprocess.run([spec["nvcc"], "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:20]


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CMEM = re.compile(r"(\d+) bytes cmem\[0\]")
_PROPS = re.compile(r"Function properties for (\S+)")
_BARRIERS = re.compile(r"used (\d+) barriers")
_CUMULATIVE = re.compile(r"(\d+) bytes cumulative stack size")


def parse_ptxas(log: str) -> List[Dict[str, Any]]:
    """One record per kernel ("entry function") in a ``-Xptxas -v`` log.

    ptxas prints, per entry: "Compiling entry function NAME", "Function
    properties for NAME" with its stack frame and spill bytes, then the
    registers and shared/constant memory it uses. A device function that is
    not inlined gets a "Function properties" block of its own; it becomes a
    record with ``"entry": False`` (no registers of its own), so that its
    spills are caught too.
    """
    records: List[Dict[str, Any]] = []
    by_name: Dict[str, Dict[str, Any]] = {}
    cur: Optional[Dict[str, Any]] = None  # the entry whose "Used" line is still to come
    props: Optional[Dict[str, Any]] = None  # the function whose frame line comes next

    def record(name: str, entry: bool, arch: str = "") -> Dict[str, Any]:
        if name not in by_name:
            by_name[name] = {"mangled": name, "entry": entry, "arch": arch, "registers": None, "stack_bytes": 0,
                             "cumulative_stack_bytes": 0, "spill_store_bytes": 0, "spill_load_bytes": 0,
                             "smem_bytes": 0, "cmem0_bytes": 0, "barriers": 0}
            records.append(by_name[name])
        return by_name[name]

    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = record(m.group(1), True, m.group(2))
            continue
        m = _PROPS.search(line)
        if m:
            props = record(m.group(1), False)
            continue
        m = _FRAME.search(line)
        if m and props is not None:
            props["stack_bytes"], props["spill_store_bytes"], props["spill_load_bytes"] = map(int, m.groups())
            props = None
            continue
        m = _USED.search(line)
        if m and cur is not None:
            cur["registers"] = int(m.group(1))
            for key, rx in (("smem_bytes", _SMEM), ("cmem0_bytes", _CMEM), ("barriers", _BARRIERS),
                            ("cumulative_stack_bytes", _CUMULATIVE)):
                found = rx.search(line)
                if found:
                    cur[key] = int(found.group(1))
            cur = None
    return records


def register_occupancy(registers: int) -> float:
    """Share of an sm_90 SM's 64 warps that can be resident given the registers per thread alone."""
    per_warp = -(-max(registers, 1) * 32 // SM90_REG_UNIT) * SM90_REG_UNIT
    return min(SM90_MAX_WARPS, SM90_REGS_PER_SM // per_warp) / SM90_MAX_WARPS


def demangle(names: List[str]) -> Dict[str, str]:
    """Readable kernel names (c++filt when present), with the anonymous namespace's noise cut."""
    out = {n: n for n in names}
    cxxfilt = shutil.which("c++filt")
    if cxxfilt and names:
        res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
        if res.returncode == 0 and len(res.stdout.splitlines()) == len(names):
            out = dict(zip(names, res.stdout.splitlines()))
    for k, v in out.items():
        out[k] = _drop_parameters(v.replace("(anonymous namespace)::", "").replace("c10::", ""))
    return out


def _drop_parameters(name: str) -> str:
    """``f<T, (E)0>(T const*, int)`` -> ``f<T, (E)0>``: the template arguments say enough."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):  # the "(" that balances the final ")"
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[:i]
    return name


def compile_one(spec: Dict[str, Any], source: str, use_cache: bool = True, cache: Path = CACHE) -> Dict[str, Any]:
    """ptxas records of one source file (from the cache folder ``cache`` when nothing changed)."""
    key = _fingerprint(spec, source)
    cached = cache / f"{Path(source).stem}-{key}.json"
    if use_cache and cached.is_file():
        return json.loads(cached.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [spec["nvcc"], "--cubin", "-Xptxas", "-v", *spec["flags"], source, "-o", os.path.join(tmp, "k.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    log = res.stdout + res.stderr
    entry = {"source": os.path.relpath(source, ROOT), "returncode": res.returncode,
             "kernels": parse_ptxas(log) if res.returncode == 0 else [],
             "error": "" if res.returncode == 0 else log[-4000:]}
    if res.returncode == 0:
        cache.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(entry, indent=1))
    return entry


def report(arch: str = "9.0", jobs: int = 1, use_cache: bool = True, cache: Path = CACHE) -> Dict[str, Any]:
    spec = build_spec(arch)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        files = list(pool.map(lambda s: compile_one(spec, s, use_cache, cache), spec["sources"]))
    names = demangle([k["mangled"] for f in files for k in f["kernels"]])
    for f in files:
        for k in f["kernels"]:
            k["name"] = names[k["mangled"]]
            k["register_occupancy"] = register_occupancy(k["registers"]) if k["registers"] else None
    return {"arch": arch, "nvcc": spec["nvcc"], "files": files}


def kernels(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The entry functions (kernels) of every file."""
    return [k for f in result["files"] for k in f["kernels"] if k["entry"]]


def spilling(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Kernels and non-inlined device functions that spill registers to local memory."""
    return [k for f in result["files"] for k in f["kernels"] if k["spill_store_bytes"] or k["spill_load_bytes"]]


def blind_spots(result: Dict[str, Any]) -> List[str]:
    """Why the spill check could not see a compiled source: no kernel parsed from its log (every .cu
    file defines kernels, so the log's format changed), or a kernel without a register count."""
    found = []
    for f in result["files"]:
        if f["returncode"] != 0:
            continue
        entries = [k for k in f["kernels"] if k["entry"]]
        if not entries:
            found.append(f"{f['source']}: no kernel parsed from the ptxas log")
        found += [f"{f['source']}: no register count for {k['mangled']}" for k in entries if not k["registers"]]
    return found


def render(result: Dict[str, Any]) -> str:
    lines = [f"CUDA kernel resources for {result['arch'].replace('.', '')} (sm_{result['arch'].replace('.', '')}), "
             "from ptxas -v",
             "",
             "| source | kernel | regs | reg-limited occupancy | smem B | stack B | spill st/ld B |",
             "|---|---|---|---|---|---|---|"]
    for f in result["files"]:
        if f["returncode"] != 0:
            lines.append(f"| {f['source']} | COMPILE FAILED | | | | | |")
            continue
        for k in sorted((k for k in f["kernels"] if k["entry"]), key=lambda k: k["name"]):
            lines.append(f"| {f['source']} | `{k['name']}` | {k['registers']} | {k['register_occupancy']:.0%} | "
                         f"{k['smem_bytes']} | {k['stack_bytes']} | {k['spill_store_bytes']}/{k['spill_load_bytes']} |")
    ks = kernels(result)
    if ks:
        worst = max(ks, key=lambda k: k["registers"] or 0)
        lines += ["", f"{len(ks)} kernels; most registers: {worst['registers']} (`{worst['name']}`); "
                      f"with a stack frame (local arrays or spills, in local memory): "
                      f"{sum(1 for k in ks if k['cumulative_stack_bytes'] or k['stack_bytes'])}; "
                      f"spilling: {len(spilling(result))}."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="9.0", help="CUDA architecture, as in TORCH_CUDA_ARCH_LIST")
    p.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "1") or 1),
                   help="files compiled at once (default $MAX_JOBS or 1)")
    p.add_argument("--check", action="store_true", help="exit 1 when any kernel spills registers to local memory")
    p.add_argument("--json", type=Path, help="also write the records here")
    p.add_argument("--no-cache", action="store_true", help="recompile even when nothing changed")
    p.add_argument("--cache", type=Path, default=CACHE, help="folder of cached results (default .cache/cuda-report)")
    args = p.parse_args(argv)
    try:
        result = report(args.arch, args.jobs, not args.no_cache, args.cache)
    except LookupError as exc:
        print(f"cuda_report: nothing to report: {exc}", file=sys.stderr)
        return SKIP
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    failed = [f for f in result["files"] if f["returncode"] != 0]
    for f in failed:
        print(f"\n{f['source']}: nvcc failed:\n{f['error']}", file=sys.stderr)
    if failed:
        return 2
    if args.check and (spilling(result) or blind_spots(result)):
        for k in spilling(result):
            print(f"spills: {k['name']}: {k['spill_store_bytes']} B stored, {k['spill_load_bytes']} B loaded",
                  file=sys.stderr)
        for line in blind_spots(result):
            print(f"blind: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
