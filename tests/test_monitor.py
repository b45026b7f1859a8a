"""The progress bar: outside a terminal (a log file, a pipe) it updates at most every ``LOG_INTERVAL_S`` seconds."""
from __future__ import annotations

import doctest
import io

import numpy as np
import pytest
import tqdm.std

import dip_fast
from dip_fast.pipeline import monitor


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    """A fake clock for tqdm: every reading moves it on by ``tick`` seconds."""

    def __init__(self, tick: float) -> None:
        self.t, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t


@pytest.fixture
def clock(monkeypatch):
    """tqdm's bars read this clock (0.5 s per reading)."""
    fake = _Clock(0.5)
    monkeypatch.setattr(tqdm.std, "time", fake)
    return fake


def _updates(text: str) -> int:
    """How many times a bar was drawn: each drawing starts with a carriage return."""
    return text.count("\r")


def _run_bar(stream, clock, steps: int = 200) -> float:
    bar = monitor.progress_bar(steps, "test", file=stream)
    start = clock.t
    for _ in range(steps):
        clock()  # half a second per step, between tqdm's own readings
        bar.update(1)
    elapsed = clock.t - start
    bar.close()
    return elapsed


def test_bar_in_a_log_updates_at_most_every_interval(clock):
    log = io.StringIO()
    elapsed = _run_bar(log, clock)
    assert elapsed > 100  # long enough for a bar at tqdm's default of 0.1 s to draw hundreds of times
    # the first drawing, one per interval, and the last one at close
    assert _updates(log.getvalue()) <= 2 + elapsed / monitor.LOG_INTERVAL_S
    assert "200/200" in log.getvalue()  # the last drawing, at close, shows the end


def test_bar_on_a_terminal_keeps_tqdm_default(clock):
    terminal = _Terminal()
    _run_bar(terminal, clock)
    # every step is more than 0.1 s after the last drawing, so each one draws
    assert _updates(terminal.getvalue()) >= 200
    assert monitor.progress_bar(1, "t", file=_Terminal()).mininterval == pytest.approx(0.1)


def test_bar_in_a_log_is_not_redrawn_by_tqdms_monitor():
    """tqdm's monitor thread redraws a bar whose adaptive ``miniters`` is above 1: a log's bar keeps 1."""
    bar = monitor.progress_bar(10, "test", file=io.StringIO())
    for _ in range(10):
        bar.update(1)
    assert bar.miniters == 1 and not bar.dynamic_miniters
    bar.close()


def test_bar_of_a_closed_or_odd_stream_counts_as_a_log():
    closed = io.StringIO()
    closed.close()
    assert not monitor._is_terminal(closed)
    assert not monitor._is_terminal(object())


def test_restore_progress_to_a_pipe_is_throttled(clock, capsys):
    """restore(progress=True) with stderr captured (not a terminal): the bar draws a few times, not every step."""
    image = np.random.default_rng(0).random((16, 16, 3), dtype=np.float32)
    steps = 60
    capsys.readouterr()
    start = clock.t
    dip_fast.restore(image, preset="quick", iterations=steps, stop="never", device="cpu", progress=True,
                     num_threads=1)
    elapsed = clock.t - start
    err = capsys.readouterr().err
    assert f"{steps}/{steps}" in err
    assert elapsed >= 20  # the bar read the clock often enough to draw every few steps at tqdm's default
    assert _updates(err) <= 2 + elapsed / monitor.LOG_INTERVAL_S


def test_docstring_examples():
    result = doctest.testmod(monitor, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
