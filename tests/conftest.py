"""Shared test fixtures: extension and GPU skips, output poisoning, sample data, a clean workspace.

``DIP_FAST_REQUIRE_EXTENSION=1`` (set by CI) turns a missing, unloadable or
stale compiled extension into one error before any test runs, instead of
letting the op and network tests skip.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import pytest
import torch

import dip_fast.ops
from dip_fast import _ops

# The shared sample images live beside the repository, never inside it.
DATA_DIR = Path(os.environ.get("DIP_FAST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

#: Examples each op's property test (hypothesis, marked slow) draws in `make test-slow`.
FUZZ_EXAMPLES = int(os.environ.get("DIP_FAST_FUZZ_EXAMPLES", "1000"))

try:
    import hypothesis
except ImportError:  # the property tests skip
    hypothesis = None
else:
    # Repeatable: the same examples every run (derandomize), no example database kept between runs.
    # Loaded at import, before the test modules' @settings inherit from it.
    hypothesis.settings.register_profile("dip_fast_tests", database=None, derandomize=True)
    hypothesis.settings.load_profile("dip_fast_tests")


#: Set (to anything but 0) to fail the run when the extension cannot be used, instead of skipping its tests.
REQUIRE_EXTENSION_ENV = "DIP_FAST_REQUIRE_EXTENSION"

requires_extension = pytest.mark.skipif(not _ops.available(), reason=f"extension not built: {_ops.LOAD_ERROR}")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def extension_problem() -> Optional[str]:
    """Why the op tests would skip (the extension did not load, or lacks an op family's ops), or None."""
    if not _ops.available():
        return f"the compiled extension did not load ({_ops.LOAD_ERROR})"
    families = [importlib.import_module(f"dip_fast.ops.{m.name}") for m in pkgutil.iter_modules(dip_fast.ops.__path__)]
    missing = [name for family in families for name in getattr(family, "_OPS", ()) if not _ops.has_ops(name)]
    if missing:
        return f"the compiled extension lacks the ops {missing} (a stale build: rebuild it)"
    return None


def pytest_configure(config):
    """With DIP_FAST_REQUIRE_EXTENSION=1, stop before collecting anything if the extension cannot be used.
    Hypothesis's home (what it caches while collecting) goes to a temporary folder, removed at the end."""
    if hypothesis is not None:
        from hypothesis.configuration import set_hypothesis_home_dir

        config._dip_fast_hypothesis_home = tempfile.mkdtemp(prefix="dip-fast-hypothesis-")
        set_hypothesis_home_dir(config._dip_fast_hypothesis_home)
    if os.environ.get(REQUIRE_EXTENSION_ENV, "0") not in ("", "0"):
        problem = extension_problem()
        if problem is not None:
            where = os.environ.get(_ops.EXTENSION_ENV)
            where = f" ({_ops.EXTENSION_ENV}={where})" if where else ""
            raise pytest.UsageError(f"{REQUIRE_EXTENSION_ENV}=1 and {problem}{where}: the op and network tests "
                                    "would skip; build the extension (make setup) or unset the variable")


def pytest_unconfigure(config):
    home = getattr(config, "_dip_fast_hypothesis_home", None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


#: Folders the code under test writes to, by environment variable: each goes to the session's temporary
#: folder (torch's extension builds; restore()'s tuning cache under $XDG_CACHE_HOME, never the user's).
_SESSION_FOLDERS = {"TORCH_EXTENSIONS_DIR": "torch-extensions", "XDG_CACHE_HOME": "xdg-cache"}


@pytest.fixture(autouse=True, scope="session")
def _clean_workspace(tmp_path_factory):
    """Every folder of :data:`_SESSION_FOLDERS` in the session's temporary folder, restored afterwards."""
    saved = {name: os.environ.get(name) for name in _SESSION_FOLDERS}
    for name, folder in _SESSION_FOLDERS.items():
        os.environ[name] = str(tmp_path_factory.mktemp(folder))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip on machines without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every op output starts as NaN, so unwritten elements fail the comparisons."""
    if _ops.available():
        _ops._C.set_poison_outputs(True)
        yield
        _ops._C.set_poison_outputs(False)
    else:
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread.

    Their tensors are small: on a 2-core machine shared with other work,
    thread hand-offs dominate (measured about 8x slower than one thread).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data_dir() -> Path:
    """The shared sample images; tests using them skip when absent."""
    if not DATA_DIR.is_dir():
        pytest.skip("shared sample data not present")
    return DATA_DIR


@pytest.fixture(autouse=True, scope="session")
def _as_a_cpu_without_bf16_units():
    """The suite runs as on a CPU without bf16 units, whichever CPU runs it.

    On a CPU with AVX512-BF16 or AMX, restore()'s 'auto' precision runs bf16
    (dip_fast.core.auto_step.RECORDED_PARITY); tests that compare runs to
    float32 rounding would then test bf16 on some machines and fp32 on
    others. Tests of the bf16 path patch cpu_features.capabilities themselves.
    """
    from dip_fast.core import cpu_features

    real = cpu_features.capabilities

    def without_bf16():
        return {k: v for k, v in real().items() if k not in ("amx_bf16", "amx_tile", "avx512_bf16")}

    cpu_features.capabilities = without_bf16
    yield
    cpu_features.capabilities = real
