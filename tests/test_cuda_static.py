"""Static check of the CUDA kernels, without a GPU: no kernel may spill registers to local memory.

scripts/cuda_report.py compiles the extension's .cu files for sm_90 with
``-Xptxas -v`` (the flags come from setup.py) and parses the resource usage
of every kernel it finds. A spill is a local-memory store and reload on a
kernel's hot path, which costs bandwidth the memory-bound ops cannot spare.

The parser's test runs in ``make test``; the nvcc pass itself (minutes on two
cores) is marked slow: ``make test-slow`` runs it, and CI runs it once, as
its own step, after the CUDA build.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dip_fast

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "cuda_report.py"


def load_report_module():
    spec = importlib.util.spec_from_file_location("cuda_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# A log in the shape ptxas 13 prints: two kernels (one with shared memory), one spilling, and a
# device function that was not inlined, with spills of its own.
PTXAS_LOG = """\
ptxas info    : 28 bytes gmem
ptxas info    : Function properties for _Z6helperPf
    16 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads
ptxas info    : Compiling entry function '_Z5firstPf' for 'sm_90'
ptxas info    : Function properties for _Z5firstPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 380 bytes cmem[0]
ptxas info    : Compile time = 12.1 ms
ptxas info    : Compiling entry function '_Z6secondPf' for 'sm_90'
ptxas info    : Function properties for _Z6secondPf
    24 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 40 bytes cumulative stack size
"""


def test_ptxas_log_parser_finds_kernels_and_spills():
    report = load_report_module()
    records = {r["mangled"]: r for r in report.parse_ptxas(PTXAS_LOG)}
    first, second, helper = records["_Z5firstPf"], records["_Z6secondPf"], records["_Z6helperPf"]
    assert first["entry"] and second["entry"] and not helper["entry"]
    assert (first["registers"], first["smem_bytes"], first["barriers"], first["cmem0_bytes"]) == (40, 2048, 1, 380)
    assert (first["spill_store_bytes"], first["spill_load_bytes"], first["stack_bytes"]) == (0, 0, 0)
    assert (second["registers"], second["stack_bytes"], second["cumulative_stack_bytes"]) == (255, 24, 40)
    assert (second["spill_store_bytes"], second["spill_load_bytes"]) == (8, 4)
    result = {"arch": "9.0", "files": [{"source": "x.cu", "returncode": 0, "kernels": list(records.values())}]}
    assert {k["mangled"] for k in report.spilling(result)} == {"_Z6secondPf", "_Z6helperPf"}
    assert [k["mangled"] for k in report.kernels(result)] == ["_Z5firstPf", "_Z6secondPf"]
    # Readable names keep template arguments, even parenthesised ones, and drop the parameter list.
    assert report._drop_parameters("void k<float, (L)0>(float const*, int)") == "void k<float, (L)0>"
    # sm_90: 64K registers per SM, at most 64 warps; 40 registers -> 51 warps, 255 -> 8.
    assert report.register_occupancy(32) == 1.0
    assert report.register_occupancy(40) == 51 / 64
    assert report.register_occupancy(255) == 8 / 64
    # --check refuses a blind report: a source whose log shows no kernel, or a kernel without registers.
    assert report.blind_spots(result) == []
    blind = {"files": [{"source": "y.cu", "returncode": 0, "kernels": [records["_Z6helperPf"]]},
                       {"source": "z.cu", "returncode": 0, "kernels": [{**first, "registers": None}]},
                       {"source": "w.cu", "returncode": 2, "kernels": []}]}
    assert report.blind_spots(blind) == ["y.cu: no kernel parsed from the ptxas log",
                                         "z.cu: no register count for _Z5firstPf"]


@pytest.mark.slow
@pytest.mark.skipif(not dip_fast.build_info()["cuda_compiled"], reason="extension built without CUDA kernels")
def test_no_cuda_kernel_spills_registers(tmp_path, capsys):
    out = tmp_path / "report.json"
    jobs = os.environ.get("MAX_JOBS", "1") or "1"
    res = subprocess.run([sys.executable, str(SCRIPT), "--check", "--jobs", jobs, "--json", str(out),
                          "--cache", str(tmp_path / "cache")],
                         capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if res.returncode == 77:
        pytest.skip(res.stderr.strip() or "no CUDA toolkit")
    with capsys.disabled():  # the register table belongs in the build log even when the check passes
        print("\n" + res.stdout)
    assert res.returncode != 2, f"a CUDA source failed to compile:\n{res.stderr[-3000:]}"
    result = json.loads(out.read_text())
    # Every .cu file defines kernels: none found means the log format changed and the check is blind.
    for f in result["files"]:
        assert any(k["entry"] for k in f["kernels"]), f"no kernels parsed from {f['source']}"
        assert all(k["registers"] for k in f["kernels"] if k["entry"]), f"kernel without a register count in {f['source']}"
    assert res.returncode == 0, f"kernels spill registers to local memory:\n{res.stderr}"
