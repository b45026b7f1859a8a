"""restore(time_budget=...): the step count fits the budget at the measured step time, and the budget bounds the fit."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dip_fast import restore
from dip_fast.core.tuning import Candidate, Decision
from dip_fast.pipeline import budget, job as stages
from dip_fast.pipeline.observation import prepare_observation
from dip_fast.pipeline.request import validate_request


@pytest.mark.parametrize("budget_s", [1.0, 5.0, 30.0, 300.0])
def test_the_plan_never_overruns_and_shrinks_with_the_budget(budget_s):
    steps, _ = budget.plan_steps(budget_s, spent_s=0.5, step_s=0.2, iterations=1000)
    assert 1 <= steps <= 1000
    assert 0.5 + steps * 0.2 <= budget_s or steps == 1
    smaller, _ = budget.plan_steps(budget_s / 2, spent_s=0.5, step_s=0.2, iterations=1000)
    assert smaller <= steps and (smaller < steps or steps == 1)


def test_a_budget_that_holds_the_preset_keeps_its_count():
    steps, reason = budget.plan_steps(1e6, spent_s=1.0, step_s=0.2, iterations=1000)
    assert steps == 1000 and "fit" in reason


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _planned(budget_s: float, spent_s: float):
    image = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    request = validate_request("denoise", preset="quick", device="cpu", time_budget=budget_s)
    observed = prepare_observation(request, image, None, None)
    job = stages.plan_job(request, observed, 0)
    choice = Candidate("reference", "nchw", "eager", "fp32")
    decision = Decision(choice, "measured", {choice.label: 100.0})  # 0.1 s a step, known from the timing
    run = stages.build_run(request, observed, job.preset, 0, decision)
    fitting = budget.plan_to_budget(request, job, decision, run, started=0.0, clock=FakeClock(spent_s))
    return request, job, run, fitting


def test_plan_to_budget_sets_the_steps_and_a_hard_stop_on_a_fake_clock():
    request, job, run, fitting = _planned(budget_s=3.0, spent_s=1.0)
    # 2 s left, 2% kept aside: 19 steps of 0.1 s
    assert run.fit_kwargs["iterations"] == job.info.iterations == 19
    assert fitting.max_time == pytest.approx(2.0) and request.max_time is None
    plan = job.info.time_plan
    assert plan["budget_s"] == 3.0 and plan["ms_per_step"] == 100.0 and plan["preset_iterations"] == job.preset.iterations
    assert plan["spent_s"] + plan["iterations"] * plan["ms_per_step"] / 1e3 <= plan["budget_s"]
    _, cheap_job, _, _ = _planned(budget_s=1.5, spent_s=1.0)
    assert cheap_job.info.iterations < job.info.iterations  # a smaller budget, a cheaper plan
    _, rich_job, _, _ = _planned(budget_s=1e4, spent_s=1.0)
    assert rich_job.info.iterations == rich_job.preset.iterations


def test_restore_reports_its_time_plan():
    image = np.random.default_rng(1).random((16, 16, 3)).astype(np.float32)
    # A short run (20 steps): its step time comes from two probe steps, and the whole count fits.
    _, info = restore(image, preset="quick", iterations=20, device="cpu", time_budget=3600, return_info=True)
    assert info.time_plan["iterations"] == 20
    assert info.time_plan["preset"] == info.preset and info.preset in info.time_plan["reason"]
    assert info.time_plan is not None and info.time_plan["budget_s"] == 3600
    assert info.steps <= info.time_plan["iterations"] <= info.time_plan["preset_iterations"]
    assert math.isfinite(info.time_plan["ms_per_step"]) and info.time_plan["ms_per_step"] > 0


@pytest.mark.parametrize("value", [0, -1, float("nan"), "60", True])
def test_time_budget_must_be_a_positive_number(value):
    with pytest.raises(ValueError, match="time_budget must be a positive number of seconds"):
        validate_request("denoise", time_budget=value, device="cpu")


def test_cli_takes_time_budget(tmp_path, capsys):
    from dip_fast.apps.cli import main

    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8) + 9).save(tmp_path / "in.png")
    assert main(["denoise", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png"), "--time-budget", "0"]) == 2
    assert not (tmp_path / "o.png").exists()
    assert "time_budget must be a positive number" in capsys.readouterr().err
