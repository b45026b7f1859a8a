"""pytest configuration of the benchmark suite (``bench/bench_*.py``, pytest-benchmark).

Run it with ``pytest bench`` (all), ``pytest bench -m cpu`` or ``pytest bench -m cuda``,
or name one file. CI runs ``make test`` (``tests/``) only, never this suite.

* Collection: the project's pytest settings collect ``test_*.py``; this
  conftest also collects ``bench_*.py`` in this folder, so ``pytest bench``
  finds them (files named on the command line are collected anyway).
* Markers: every benchmark is marked ``cpu`` or ``cuda``; ``cuda`` ones skip
  without a GPU.
* Results: unless ``--benchmark-json`` is given, pytest-benchmark's JSON goes
  to ``bench/results/pytest-<cpu|cuda>.json``, with the commit, the CPU/GPU
  model and the load average added under ``dip_fast``.
* torch.compile: Inductor's cache persists under ``.cache/inductor`` (set
  before torch is imported), so a second run loads instead of compiling.

These timings are *not* interleaved (pytest-benchmark runs one benchmark
after another); on a shared machine compare variants with
``bench/compare.py``, which alternates them step by step.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO_ROOT / ".cache" / "inductor"))
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")

# The benchmark files share the harness's builders; make `import compare` work
# whatever the rootdir and import mode.
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    """Collect ``bench_*.py`` of this folder (the project's ``python_files`` only matches ``test_*.py``)."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_") or file_path.parent != BENCH_DIR:
        return None
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest's own collector already takes it
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Benchmarks marked ``cuda`` skip on machines without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Default the pytest-benchmark JSON to bench/results/pytest-<device>.json."""
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is None or getattr(bs, "json", None) or getattr(bs, "disabled", False):
        return
    RESULTS = BENCH_DIR / "results"
    RESULTS.mkdir(exist_ok=True)
    bs.json = RESULTS / f"pytest-{'cuda' if torch.cuda.is_available() else 'cpu'}.json"


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict) -> None:
    """Record what the numbers were measured on next to pytest-benchmark's own machine info."""
    import compare

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    output_json["dip_fast"] = compare.environment(device)
