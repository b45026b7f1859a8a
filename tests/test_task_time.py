"""bench/task_time.py: one image per task, dip_fast's curves beside deepinv's DIP and the classical baselines."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import task_time  # noqa: E402
import time_to_quality  # noqa: E402


@pytest.fixture
def short_runs(monkeypatch):
    """Every method cut to a few steps: the benchmark's plumbing, not its numbers."""
    monkeypatch.setitem(time_to_quality.CONFIGS, "default", {"iterations": 4})
    monkeypatch.setitem(time_to_quality.CONFIGS, "reference_paper",
                        dict(time_to_quality.CONFIGS["reference_paper"], iterations=3))
    monkeypatch.setattr(task_time.deepinv_compare, "DEFAULT", dict(task_time.deepinv_compare.DEFAULT, channels=8))
    monkeypatch.setattr(task_time.deepinv_compare, "EXAMPLE", dict(task_time.deepinv_compare.EXAMPLE, iterations=2))


def test_every_task_gets_two_curves_and_its_points(tmp_path, short_runs):
    image = tmp_path / "face.png"
    Image.fromarray(data.astronaut()[40:104, 176:240]).save(image)
    try:
        import deepinv  # noqa: F401
        flags = []
    except ImportError:
        flags = ["--no-deepinv"]
    out = tmp_path / "tt.json"
    assert task_time.main([str(image), "--crop", "64", "--out", str(out), *flags]) == 0
    result = json.loads(out.read_text())
    assert list(result["tasks"]) == list(task_time.TASKS)
    for task, entry in result["tasks"].items():
        assert [c["config"] for c in entry["curves"]] == ["default", "reference_paper"]
        assert [c["steps"] for c in entry["curves"]] == [4, 3]
        assert all(np.isfinite(p[2]) for c in entry["curves"] for p in c["curve"])
        methods = [p["method"] for p in entry["points"]]
        assert methods[0] == task_time.BASELINE_NAMES[task]
        assert len(methods) == (1 if flags else 3)
        assert all(np.isfinite(p["psnr"]) and p["seconds"] >= 0 for p in entry["points"])
    assert out.with_suffix(".png").stat().st_size > 10_000
    table = out.with_suffix(".md").read_text()
    assert "| sr4 | bicubic |" in table and "| denoise25 | observation |" in table
