"""Kill-safety with real signals: ``dip-fast batch`` under SIGKILL, a single restore under SIGINT.

The batch runs in child processes forked from a multiprocessing fork server
that has imported dip_fast once, so that each run starts in milliseconds
instead of paying the torch import.  Each child kills itself with SIGKILL at
one known point of the batch, reached through the batch's checkpoint hook
(``dip_fast.apps.batch.checkpoint_hook``: after listing, between restoring a
file and writing it, after writing it) or inside a write, after the
temporary file is complete and before it is moved into place: every such
point is hit once, whatever the machine's speed.  After every kill the output
folder may hold only complete results, bit-identical to an uninterrupted
run's, exactly the files finished before that point; the rerun must restore
exactly the files that were missing and leave the finished ones untouched.

Marked slow (about 20 batch runs and two command-line runs): ``make
test-slow`` and CI run it.
"""
from __future__ import annotations

import csv
import multiprocessing
import os
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

pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"), pytest.mark.slow]

FILES = [f"img{i}.png" for i in range(4)]
BATCH_OPTIONS = ["--task", "denoise", "--preset", "quick", "--iterations", "10", "--device", "cpu",
                 "--threads", "1", "--seed", "0", "-q"]
#: Where a batch can be killed, in the order one run passes them: after listing the files; per file,
#: after restoring it, inside its write (the temporary file complete, not yet moved into place) and
#: after it; inside the summary's write.
KILL_POINTS = ([("listed", "")]
               + [(event, name) for name in FILES for event in ("restored", "replace", "written")]
               + [("replace", "summary.csv")])
#: Kills per output folder before a rerun finishes the batch.
KILLS_PER_ROUND = 4


def _cli(argv: List[str]) -> None:
    """A child's whole life: the command line, exiting with its status."""
    sys.exit(main(argv))


def _cli_killed_at(argv: List[str], point: Tuple[str, str]) -> None:
    """The command line, SIGKILLed at ``point`` (one of :data:`KILL_POINTS`)."""
    from dip_fast.apps import batch

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    batch.checkpoint_hook = lambda event, name: kill() if (event, name) == point else None
    if point[0] == "replace":  # inside dip_fast.io.atomic_path: the temporary file is written, not moved
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name == point[1]:
                kill()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace  # this child's only: it dies at the first matching write
    _cli(argv)


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


def _run(ctx, src: Path, out: Path, kill_at=None) -> int:
    """Run the batch (SIGKILLed at ``kill_at``, if given) and wait for it; its exit code."""
    argv = ["batch", str(src), str(out), *BATCH_OPTIONS]
    proc = ctx.Process(target=_cli, args=(argv,)) if kill_at is None else \
        ctx.Process(target=_cli_killed_at, args=(argv, kill_at))
    proc.start()
    proc.join(300)
    assert proc.exitcode is not None, "the batch did not finish in 300 s"
    return proc.exitcode


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()  # a truncated file fails here
        return np.asarray(img)


def _visible(folder: Path) -> List[str]:
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


def _hidden(folder: Path) -> List[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


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


def _finished_at(point: Tuple[str, str], done: List[str]) -> List[str]:
    """The results present after a kill at ``point`` in a rerun that found ``done`` finished."""
    event, name = point
    if event == "listed":
        return sorted(done)
    if name == "summary.csv":
        return list(FILES)
    upto = FILES.index(name) + (event == "written")
    return sorted(set(done) | set(FILES[:upto]))


@pytest.fixture
def inputs(tmp_path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in FILES:
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / name)
    return src


def test_batch_sigkill_at_every_point_leaves_no_partial_file(forkserver, inputs, tmp_path):
    assert _run(forkserver, inputs, tmp_path / "ref") == 0
    assert _run(forkserver, inputs, tmp_path / "ref2") == 0
    reference = {name: _pixels(tmp_path / "ref" / name) for name in FILES}
    assert all(np.array_equal(reference[n], _pixels(tmp_path / "ref2" / n)) for n in FILES), "runs differ"

    # The points in the order a run passes them, a few per folder: each rerun reaches the next point.
    rounds = [KILL_POINTS[i : i + KILLS_PER_ROUND] for i in range(0, len(KILL_POINTS), KILLS_PER_ROUND)]
    for number, points in enumerate(rounds):
        out = tmp_path / f"out{number}"
        done: Dict[str, Tuple[int, int]] = {}
        for point in points:
            code = _run(forkserver, inputs, out, kill_at=point)
            assert code == -signal.SIGKILL, f"the batch was not killed at {point} (exit code {code})"
            now = _check_nothing_partial(out, reference) if out.exists() else {}
            assert now.items() >= done.items(), f"a finished result was redone (killed at {point})"
            assert sorted(now) == _finished_at(point, list(done)), f"killed at {point}"
            if point[0] == "replace":  # the kill came inside the write: its temporary file is left
                assert [n for n in _hidden(out) if n.startswith(f".{point[1]}.")], f"no temporary file at {point}"
            done = now

        assert _run(forkserver, inputs, out) == 0
        assert _check_nothing_partial(out, reference).items() >= done.items(), "a finished result was redone"
        assert _rows(out / "summary.csv") == {n: "skipped" if n in done else "done" for n in FILES}
        assert _visible(out) == sorted(FILES + ["summary.csv"])
        assert not _hidden(out), "temporary files left behind"


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
