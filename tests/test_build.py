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
    """`setup.py sdist` must ship every file under csrc/ (sources and headers).

    It runs on a copy of the source tree (without what git ignores at the top: the environment, builds,
    caches), since sdist writes its staging folder and the egg-info beside setup.py."""
    pytest.importorskip("setuptools")
    tree, dist = tmp_path / "tree", tmp_path / "dist"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "cmake-build*", ".cache", "out", "__pycache__", "*.so",
        ".hypothesis", ".benchmarks", ".pytest_cache"))
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(dist)],
        cwd=tree,
        capture_output=True,
        text=True,
        env={**os.environ, "FORCE_CPU": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (archive,) = dist.glob("*.tar.gz")
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


CSRC = ROOT / "csrc"


def op_families() -> list[str]:
    """The op families: one schema file each, csrc/ops/<family>.cpp."""
    return sorted(p.stem for p in (CSRC / "ops").glob("*.cpp"))


def test_every_op_family_has_one_name_across_its_files():
    """csrc/ops/<f>.cpp, csrc/cpu/<f>.cpp, csrc/cuda/<f>.cu, dip_fast/ops/<f>.py, tests/test_ops_<f>.py."""
    families = op_families()
    assert families, "no op family schema files"
    for family in families:
        for path in (CSRC / "cpu" / f"{family}.cpp", CSRC / "cuda" / f"{family}.cu",
                     ROOT / "dip_fast" / "ops" / f"{family}.py", ROOT / "tests" / f"test_ops_{family}.py"):
            assert path.is_file(), f"op family {family!r} lacks {path.relative_to(ROOT)}"
    tests = sorted(p.stem[len("test_ops_"):] for p in (ROOT / "tests").glob("test_ops_*.py"))
    assert tests == families, "every test_ops_<f>.py names an op family"


def test_schemas_are_declared_per_family_in_fragments():
    """No central TORCH_LIBRARY: each family's schemas in its own fragment; emulation ops only in *_emulated.cpp."""
    sources = [p for p in CSRC.rglob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh")]
    for path in sources:
        text = path.read_text()
        assert "TORCH_LIBRARY(" not in text, f"{path.relative_to(ROOT)}: use TORCH_LIBRARY_FRAGMENT"
        defines = "m.def(" in text
        if path.parent.name == "ops":
            assert "TORCH_LIBRARY_FRAGMENT(dip_fast, m)" in text and defines, path.name
        elif path.name.endswith("_emulated.cpp"):
            assert "TORCH_LIBRARY_FRAGMENT(dip_fast, m)" in text and "TEST ONLY" in text, path.name
        else:
            assert "TORCH_LIBRARY_FRAGMENT(" not in text, (
                f"{path.relative_to(ROOT)} declares ops outside csrc/ops/ and the emulations"
            )


@requires_extension
def test_op_names_follow_their_family():
    """Every op is named after its family; backward and emulation ops are private (leading underscore)."""
    families = op_families()
    names = [name.split(".")[0] for name in dip_fast.build_info()["ops"]]
    for family in families:
        assert family in names, f"op family {family!r} has no op of its own name"
    for name in names:
        public = name.lstrip("_")
        assert any(public.startswith(family) for family in families), f"{name} belongs to no op family"
        if "backward" in name or name.endswith("_emulated"):
            assert name.startswith("_"), f"{name} must be private"
