"""build_info(), the missing-extension fallback, and the source distribution."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import dip_fast
from dip_fast import _ops

from .conftest import requires_extension

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_keys():
    info = dip_fast.build_info()
    for key in ("version", "torch", "cuda_compiled", "cuda_archs", "openmp", "ops", "cuda_available"):
        assert key in info, key
    assert info["version"] == dip_fast.__version__
    assert info["torch"] == torch.__version__
    assert info["cuda_available"] == torch.cuda.is_available()


@requires_extension
def test_build_info_lists_registered_ops():
    info = dip_fast.build_info()
    assert info["openmp"], "the CPU kernels should be compiled with OpenMP"
    assert {"leaky_relu", "_leaky_relu_backward"} <= set(info["ops"])
    for name in info["ops"]:
        assert hasattr(torch.ops.dip_fast, name.split(".")[0])
    if info["cuda_compiled"]:
        assert info["cuda_archs"]
    assert "LeakyReLU" in info["fused_options"]["act_fun"]


@requires_extension
def test_kernels_registered_per_device():
    from dip_fast import _ops

    assert _ops._C.has_kernel("leaky_relu", "CPU")
    assert _ops._C.has_kernel("leaky_relu", "CUDA") == dip_fast.build_info()["cuda_compiled"]


BLOCK_EXTENSION = """
import importlib.abc, sys, warnings
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "dip_fast._C":
            raise ImportError("simulated broken build")
sys.meta_path.insert(0, Block())
import dip_fast
info = dip_fast.build_info()
assert not info["extension_loaded"], info
assert "simulated broken build" in info["load_error"], info
assert info["ops"] == [] and info["cuda_compiled"] is False and info["fused_options"] == {}
assert "falls back to the reference" in info["fast_backend"]
import torch
from dip_fast.reference import skip
net = skip(num_input_channels=2, num_channels_down=[8, 8], num_channels_up=[8, 8], num_channels_skip=[2, 2])
assert net(torch.rand(1, 2, 16, 16)).shape == (1, 3, 16, 16)
try:
    dip_fast.ops.leaky_relu(torch.zeros(2))
except RuntimeError as exc:
    assert "simulated broken build" in str(exc)
else:
    raise AssertionError("expected a RuntimeError naming the load error")
print("OK")
"""


def test_import_survives_a_missing_extension():
    """With _C unloadable, import works, build_info says why, the reference still runs."""
    result = subprocess.run([sys.executable, "-c", BLOCK_EXTENSION], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


def test_sdist_contains_every_kernel_source(tmp_path):
    """`setup.py sdist` must ship every file under csrc/ (sources and headers)."""
    pytest.importorskip("setuptools")
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "FORCE_CPU": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {"/".join(Path(m.name).parts[1:]) for m in tar.getmembers() if m.isfile()}
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert expected, "no csrc files found"
    missing = sorted(expected - shipped)
    assert not missing, f"sdist lacks {missing}"
    for top in ("setup.py", "pyproject.toml", "CMakeLists.txt"):
        assert top in shipped


@requires_extension
def test_extension_file_chosen_by_environment(tmp_path):
    """DIP_FAST_EXTENSION loads another build of the module (the sanitizer build) instead of the installed one."""
    copy = tmp_path / Path(_ops._C.__file__).name
    shutil.copy(_ops._C.__file__, copy)
    code = ("from dip_fast import _ops; import torch; "
            "print(_ops._C.__file__ if _ops._C else _ops.LOAD_ERROR, hasattr(torch.ops.dip_fast, 'leaky_relu'))")

    def load(path: Path) -> str:
        env = {**os.environ, _ops.EXTENSION_ENV: str(path)}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert load(copy) == f"{copy} True"
    assert load(tmp_path / "missing.so").startswith(f"ImportError: {_ops.EXTENSION_ENV}=")
