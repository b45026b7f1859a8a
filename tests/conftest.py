"""Shared test fixtures: extension and GPU skips, output poisoning, sample data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dip_fast import _ops

# The shared sample images live beside the repository, never inside it.
DATA_DIR = Path(os.environ.get("DIP_FAST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

#: Examples each op's property test (hypothesis, marked slow) draws in `make test-slow`.
FUZZ_EXAMPLES = int(os.environ.get("DIP_FAST_FUZZ_EXAMPLES", "1000"))

requires_extension = pytest.mark.skipif(not _ops.available(), reason=f"extension not built: {_ops.LOAD_ERROR}")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


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
def _tuning_cache_in_a_temporary_folder(tmp_path_factory):
    """restore() keeps its timing choices under $XDG_CACHE_HOME: a folder of the session's, never the user's."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved
