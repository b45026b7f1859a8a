"""bench/es_replay.py and bench/early_stop.py: the stopping rule replayed and scored on synthetic trajectories.

A short real recording (a tiny crop, a few steps) checks that the recorder
still runs against the package, and two synthetic runs with known curves
check the scores the replay reports.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import early_stop  # noqa: E402
import es_replay  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(name: str, split: str, cross: int, n: int = 300, preset: int = 200) -> dict:
    """A run whose average's residual reaches sigma^2 at ``cross`` and whose PSNR peaks there."""
    sigma = 25.0
    s2 = (sigma / 255) ** 2
    t = np.arange(n)
    residual = s2 * np.where(t < cross, 2.0 - t / cross, 1.0 - 0.2 * (t - cross) / n)
    psnr = 30.0 - 3e-4 * (t - cross) ** 2
    return {"image": name, "split": split, "task": "denoise", "crop": 16, "seed": 0, "sigma": sigma,
            "sigma_est": sigma, "iterations": n, "preset_iterations": preset, "input_psnr": 20.0,
            "fixed_psnr": float(psnr[preset - 1]), "log": {"res_avg": residual.tolist(), "psnr_avg": psnr.tolist()}}


def test_scores_of_a_known_run():
    early = _run("a.png", "tuning", cross=100)
    s = es_replay.score(early, (1.0, 1.0, "est", "flat"))
    assert s["reason"] == "discrepancy" and s["stop_step"] == 100 and s["steps"] == pytest.approx(101 / 200)
    assert s["gap"] == pytest.approx(0.0) and s["vs_fixed"] == pytest.approx(3e-4 * 99**2)
    fixed = es_replay.score(early, None)
    assert fixed["steps"] == 1.0 and fixed["vs_fixed"] == 0.0
    late = _run("b.png", "validation", cross=250)  # fits only after the preset's 200 steps
    assert es_replay.score(late, (1.0, 1.0, "est", "flat"))["reason"] == "fallback"
    longer = es_replay.score(late, (1.0, 1.5, "est", "flat"))
    assert longer["reason"] == "discrepancy" and longer["stop_step"] == 250 and longer["gap"] < 0  # beats the oracle
    # Within 0.5 dB of the peak from step 60 on (3e-4 * 41^2 > 0.5 >= 3e-4 * 40^2): 61 steps of 200.
    assert es_replay.oracle_steps([early]) == [pytest.approx(61 / 200)]


def test_the_clipping_model_replays_the_logged_expectation():
    run = _run("a.png", "tuning", cross=100)
    s2 = (25.0 / 255) ** 2
    n = len(run["log"]["res_avg"])
    # Logged at sigma 20, 25, 30: the expected residual is 0.8 sigma^2 at 25 (and scales with sigma^2).
    run["clip_sigmas"] = [20.0, 25.0, 30.0]
    run["log"]["clip_inv_avg"] = [[0.8 * (g / 255) ** 2 for g in run["clip_sigmas"]]] * n
    run["sigma_est_present"] = 25.0
    flat = es_replay.score(run, (1.0, 1.0, "est", "clip"))  # no clipped values recorded: the flat rule
    assert flat["stop_step"] == 100 and flat["expected_from"] is None
    run["clipped_share_obs"] = 0.1
    s = es_replay.score(run, (1.0, 1.0, "est", "clip"))
    # Residual 2 - t / 100 (in sigma^2) reaches 0.8 only after the crossing: 1 - 0.2 (t - 100) / 300 <= 0.8 at t = 400.
    assert s["expected_from"] == "exact" and s["reason"] == "fallback"
    run["sigma_est"] = 27.5  # between the logged levels: linear in sigma, 0.8 * (27.5 / 255)^2 ~ 0.968 sigma_25^2
    s = es_replay.score(run, (1.0, 1.0, "est", "clip"))
    expected = 0.8 * (0.5 * (25.0 / 255) ** 2 + 0.5 * (30.0 / 255) ** 2)
    assert s["stop_step"] == next(t for t, r in enumerate(run["log"]["res_avg"]) if r <= expected)
    assert expected / s2 == pytest.approx(0.976, abs=1e-3)


def test_the_clairvoyant_bound_on_steps():
    # Fixed count: 30 - 3e-4 * 99^2 = 27.06 dB; every step from 0 on is within 0.5 dB of it.
    early = _run("a.png", "tuning", cross=100)
    # Fixed count: 30 - 3e-4 * 51^2; within 0.5 dB of it from step 185 on (3e-4 * 65^2 <= 3e-4 * 51^2 + 0.5 < 3e-4 * 66^2).
    late = _run("b.png", "validation", cross=250)
    (s0, g0), (s1, g1) = es_replay.clairvoyant_steps([early, late])
    assert s0 == pytest.approx(1 / 200) and g0 == pytest.approx(3.0)
    assert s1 == pytest.approx(186 / 200) and g1 == pytest.approx(3e-4 * (65**2 - 51**2))
    early["input_psnr"] = 28.0  # the input is now the higher floor: PSNR >= 28 from step 19 on (81^2 * 3e-4 <= 2)
    assert es_replay.clairvoyant_steps([early])[0][0] == pytest.approx(20 / 200)
    # An under-fitted run whose average stays below its input through the preset's count meets no step.
    late["input_psnr"] = 31.0
    (share, gap), = es_replay.clairvoyant_steps([late])
    assert share == float("inf") and np.isnan(gap)


def test_the_fixed_count_follows_the_preset_as_defined_now():
    from dip_fast import tasks

    run = _run("c.png", "tuning", cross=100, n=5000, preset=1500)
    run["preset"] = "jpeg_fast"  # recorded when its count was 1500
    n = tasks.get_preset("jpeg_fast").iterations
    assert es_replay.preset_steps(run) == n and es_replay.fixed_psnr(run) == run["log"]["psnr_avg"][n - 1]
    run["log"]["psnr_avg"] = run["log"]["psnr_avg"][:1000]  # recorded for fewer steps: capped there
    assert es_replay.preset_steps(run) == 1000


def test_report_from_files(tmp_path):
    path = tmp_path / "traj.json.gz"
    early_stop.write_trajectories(path, {"schema": "x", "runs": [_run("a.png", "tuning", 100),
                                                                    _run("b.png", "validation", 250)]})
    out = tmp_path / "report.md"
    with pytest.raises(SystemExit):  # the clipping model needs the clean crops and the estimate before clipping
        es_replay.main([str(path), "--out", str(out)])
    assert es_replay.main([str(path), "--out", str(out), "--model", "flat"]) == 0
    text = out.read_text()
    assert "Chosen on all 1 tuning runs" in text and "| b.png | validation |" in text
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert numbers["chosen"]["noise"] == "est" and "validation" in numbers["groups"]["all"]


def test_recorder_runs_on_a_tiny_crop(tmp_path):
    img = tmp_path / "img.png"
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray((rng.random((70, 70, 3)) * 255).astype(np.uint8)).save(img)
    out = tmp_path / "t.json.gz"
    assert early_stop.main([str(img), "--crop", "64", "--iterations", "12", "--preset", "denoise_quick",
                            "--backend", "reference", "--out", str(out)]) == 0
    (run,) = early_stop.read_trajectories(out)["runs"]
    assert run["iterations"] == 12 and run["preset_iterations"] > 12 and len(run["log"]["res_avg"]) == 12
    assert run["fixed_psnr"] is not None
    # The observation is rebuilt from the image and the seed (the replay estimates sigma again on it).
    _, obs = early_stop.observation_of(run, [tmp_path])
    assert obs.shape == (1, 3, 64, 64)
    assert es_replay.main([str(out), "--reestimate", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 2  # no tuning
    run["input_psnr"] += 1.0
    with pytest.raises(ValueError, match="not the recorded one"):
        early_stop.observation_of(run, [tmp_path])


def test_results_name_no_folder_of_the_machine_that_made_them():
    import quality  # noqa: E402  (bench/, on the path above)

    root = quality.REPO_ROOT
    argv = ["--out", str(root / "bench" / "results" / "x.json"), str(root.parent / "shared" / "data" / "a.png"),
            "/somewhere/else/b.png", "relative/c.png"]
    assert quality.command_line("bench/x.py", argv) == ("bench/x.py --out bench/results/x.json "
                                                         "../shared/data/a.png b.png relative/c.png")
