"""Kill-safety with real signals: ``dip-fast batch`` under SIGKILL, a single restore under SIGINT.

The batch runs in child processes forked from a multiprocessing fork server
that has imported dip_fast once, so that each run starts in milliseconds
instead of paying the torch import, and the kills land inside the batch
itself (listing, restoring, writing images and the summary).  After every
kill the output folder may hold only complete results, bit-identical to an
uninterrupted run's; the rerun must restore exactly the files that were
missing and leave the finished ones untouched.
"""
from __future__ import annotations

import csv
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
from PIL import Image

from dip_fast.apps.cli import main

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

#: SIGKILLs in the batch test (DIP_FAST_KILLS overrides it for a longer soak).
KILLS = int(os.environ.get("DIP_FAST_KILLS", "20"))
KILLS_PER_ROUND = 4
FILES = [f"img{i}.png" for i in range(4)]
# 10 steps a file: long enough against the 2 ms polling that a kill aimed
# between two results lands there on a fast machine too (with 2 steps an idle
# CI machine finished the rest of the batch before most such kills).
BATCH_OPTIONS = ["--task", "denoise", "--preset", "quick", "--iterations", "10", "--device", "cpu",
                 "--threads", "1", "--seed", "0", "-q"]


def _cli(argv: List[str]) -> None:
    """A child's whole life: the command line, exiting with its status."""
    sys.exit(main(argv))


@pytest.fixture(scope="module")
def forkserver():
    """A multiprocessing context whose children fork from a process that has dip_fast imported.

    The fork server has imported torch but never run a parallel region, so
    forking from it is safe (unlike forking the test process itself).  The
    noise estimator's module is preloaded too: restore() imports it lazily,
    and with scipy.stats it takes seconds to import.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["dip_fast.apps.cli", "dip_fast.apps.batch", "skimage.restoration._denoise", __name__])
    return ctx


def _start(ctx, src: Path, out: Path):
    proc = ctx.Process(target=_cli, args=(["batch", str(src), str(out), *BATCH_OPTIONS],))
    proc.start()
    return proc


def _finish(ctx, src: Path, out: Path) -> float:
    """Run the batch to the end; the seconds it took."""
    t0 = time.perf_counter()
    proc = _start(ctx, src, out)
    proc.join(120)
    assert proc.exitcode == 0, f"batch exited with {proc.exitcode}"
    return time.perf_counter() - t0


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()  # a truncated file fails here
        return np.asarray(img)


def _visible(folder: Path) -> List[str]:
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


def _rows(path: Path) -> Dict[str, str]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len({r["file"] for r in rows}) == len(rows), "a file listed twice"
    return {r["file"]: r["status"] for r in rows}


def _check_nothing_partial(out: Path, reference: Dict[str, np.ndarray]) -> Dict[str, Tuple[int, int]]:
    """Every visible file in ``out`` is complete: images equal to the reference, a readable summary.

    Returns the identity (inode, mtime) of each result present, to check later that no rerun redid it.
    """
    seen = {}
    for name in _visible(out):
        path = out / name
        if name == "summary.csv":
            assert set(_rows(path)) <= set(FILES)
            continue
        assert name in reference, f"unexpected file {name}"
        assert np.array_equal(_pixels(path), reference[name]), f"{name} differs from an uninterrupted run"
        st = path.stat()
        seen[name] = (st.st_ino, st.st_mtime_ns)
    return seen


@pytest.fixture
def inputs(tmp_path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in FILES:
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / name)
    return src


def _results(out: Path) -> int:
    return len(set(FILES) & set(os.listdir(out))) if out.exists() else 0


def _timeline(ctx, src: Path, out: Path) -> Tuple[float, float]:
    """Run the batch to the end, watching it: seconds to its first result, and between results."""
    t0 = time.perf_counter()
    proc = _start(ctx, src, out)
    seen = [0.0] * len(FILES)
    while proc.is_alive() or _results(out) < len(FILES):
        n = _results(out)
        for i in range(n):
            seen[i] = seen[i] or time.perf_counter() - t0
        assert proc.is_alive() or n == len(FILES), f"batch exited with {proc.exitcode}"
        time.sleep(0.002)
    proc.join(30)
    assert proc.exitcode == 0, f"batch exited with {proc.exitcode}"
    return seen[0], (seen[-1] - seen[0]) / (len(FILES) - 1)


def test_batch_sigkill_at_random_moments_leaves_no_partial_file(forkserver, inputs, tmp_path):
    ref = tmp_path / "ref"
    _finish(forkserver, inputs, ref)  # the fork server's start-up is paid here
    first, between = _timeline(forkserver, inputs, tmp_path / "ref2")
    reference = {name: _pixels(ref / name) for name in FILES}
    assert all(np.array_equal(reference[n], _pixels(tmp_path / "ref2" / n)) for n in FILES), "runs differ"

    rng = random.Random(int(os.environ.get("DIP_FAST_KILL_SEED", "0")))
    kills, cut_mid_batch, folder = 0, 0, 0
    while kills < KILLS:
        # Each round kills reruns of one batch several times, then lets a rerun finish it.
        out, folder = tmp_path / f"out{folder}", folder + 1
        done: Dict[str, Tuple[int, int]] = {}
        for _ in range(KILLS_PER_ROUND):
            # A random moment: during the start (listing, the trial run) or
            # while the j-th remaining file is restored and written.
            j = rng.randrange(len(FILES) - len(done) + 1)
            proc = _start(forkserver, inputs, out)
            while j and _results(out) < len(done) + j and proc.is_alive():
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, between if j else first))
            proc.kill()
            proc.join(30)
            assert proc.exitcode in (-signal.SIGKILL, 0), proc.exitcode
            kills += 1
            now = _check_nothing_partial(out, reference) if out.exists() else {}
            assert now.items() >= done.items(), "a finished result was redone"
            cut_mid_batch += len(done) < len(now) < len(FILES)
            done = now

        _finish(forkserver, inputs, out)
        assert _check_nothing_partial(out, reference).items() >= done.items(), "a finished result was redone"
        assert _rows(out / "summary.csv") == {n: "skipped" if n in done else "done" for n in FILES}
        assert _visible(out) == sorted(FILES + ["summary.csv"])
        assert not [n for n in os.listdir(out) if n.startswith(".")], "temporary files left behind"
    # Some kill must have cut a batch between two results, not only before the
    # first or after the last. How many do is a matter of timing (KILLS // 5 held
    # on a loaded machine, 2 of 20 on an idle one with shorter files), so only
    # the existence of such a kill is required.
    assert cut_mid_batch >= 1, f"none of {kills} kills came mid-batch"


@pytest.mark.parametrize("delay", [0.0, 0.7])
def test_sigint_during_a_restore_exits_130_and_writes_nothing_partial(tmp_path, delay):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "out.png"
    # Snapshots every step: the signal may come while one is being written. `--stop never`: on this
    # random image early stopping ends the run by itself after about 200 steps (5 s), and a slow
    # start would then let it finish before the signal comes.
    argv = [sys.executable, "-m", "dip_fast", "denoise", str(src), "-o", str(out), "--preset", "quick",
            "--iterations", "100000", "--stop", "never", "--device", "cpu", "--threads", "1",
            "--save-every", "1", "-q"]
    # A shell's background job inherits SIGINT ignored, and Python then installs no Ctrl-C handler:
    # the child resets it, as an interactive terminal would have it.
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("out.step*.png")):  # the fit has started
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    for path in tmp_path.iterdir():
        assert not path.name.startswith("."), f"temporary file left: {path.name}"
        if path.suffix == ".png" and path != src:
            _pixels(path)  # complete: the result so far, or a snapshot
