"""bench/time_to_quality.py: times to a target, re-timing from a clean pace, the table and the plot."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import time_to_quality as ttq  # noqa: E402


def _run(config, curve, final, wall, setup=1.0):
    return {"image": "a.png", "task": "denoise25", "config": config, "seed": 0, "curve": curve,
            "final_psnr": final, "wall_s": wall, "setup_s": setup}


def test_time_to_reaches_the_first_point_at_or_above_the_target():
    curve = [[0, 1.0, 20.0], [1, 2.0, 25.0], [2, 3.0, 24.0], [3, 4.0, 27.0]]
    assert ttq.time_to(curve, 25.0) == 2.0
    assert ttq.time_to(curve, 26.5) == 4.0
    assert ttq.time_to(curve, 30.0) == math.inf


def test_retime_uses_steps_times_pace_plus_setup_and_leaves_unpaced_configs():
    runs = [_run("quick", [[0, 50.0, 20.0], [9, 900.0, 25.0]], 25.0, 901.0, setup=2.0),
            _run("default", [[0, 5.0, 21.0]], 21.0, 6.0)]
    other = dict(_run("quick", [[0, 7.0, 20.0]], 20.0, 8.0), image="b.png")
    runs.append(other)
    ttq.retime(runs, {"quick@a.png": 100.0})
    assert runs[0]["curve"] == [[0, pytest.approx(2.1), 20.0], [9, pytest.approx(3.0), 25.0]]
    assert runs[0]["wall_s"] == pytest.approx(3.0) and runs[0]["curve_seconds"] == "steps x pace + set-up"
    assert runs[1]["curve"] == [[0, 5.0, 21.0]] and "curve_seconds" not in runs[1]
    assert other["curve"] == [[0, 7.0, 20.0]]  # the same configuration on another image ran alone


def test_table_times_each_config_to_the_baselines_final_less_a_tenth(tmp_path):
    base = _run("default", [[0, 10.0, 20.0], [99, 100.0, 28.0]], 28.0, 100.0)
    fast = _run("quick", [[0, 5.0, 22.0], [49, 20.0, 27.95], [99, 40.0, 28.3]], 28.3, 40.0)
    slow = _run("other", [[0, 5.0, 22.0], [99, 40.0, 26.0]], 26.0, 40.0)
    near = _run("near", [[0, 5.0, 22.0], [99, 30.0, 27.85]], 27.85, 30.0)  # within 0.2 dB, not 0.1
    lines = ttq.table([fast, base, slow, near], "default")
    row = {line.split("|")[3].strip(): line for line in lines[2:]}
    assert "| 20 | 20% | 20 | 20% |" in row["quick"]  # 27.95 >= 28.0 - 0.1 (and - 0.2) at 20 s of the baseline's 100
    assert "| never | - | never | - |" in row["other"]
    assert "| never | - | 30 | 30% |" in row["near"]
    assert lines[2].split("|")[3].strip() == "default"  # the baseline first
    ttq.plot([base, fast, _run("tiles128", [[99, 30.0, 28.5]], 28.5, 30.0)], tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
