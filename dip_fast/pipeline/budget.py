"""Fitting a restoration into a time budget: ``restore(..., time_budget=SECONDS)``.

``max_time`` is a hard stop: the run ends where the clock says, whatever it
planned. ``time_budget`` plans instead: once the step is chosen
(:func:`dip_fast.pipeline.job.choose_execution`), its time per step at the
run's real size is known (timed with the candidates, read from the cache, or
timed now over :data:`PROBE_STEPS` steps), and the run gets as many steps as
fit in what is left of the budget, never more than its preset's count.
The budget also bounds the fit as ``max_time`` does, so a run whose steps
turn out slower than timed still ends within one step of the budget.

Limits: the plan scales the step count of the preset the run would get
anyway. On whole photographs (bench/README.md, "Time to quality on a whole
photograph"), other networks and dropping the input perturbation were not
ahead of the default on every image. Tiles cut short were ahead at equal
time on the three photographs measured (``tile=128`` with the budget as
their hard stop), but choosing them would need a plan made before the
whole image's step is timed (38 s of a 300 s budget at 512x512); not done.

Example (pure planning, no clock)::

    >>> plan_steps(budget_s=60.0, spent_s=5.0, step_s=0.5, iterations=2250)[0]  # 55 s left, 2% kept aside
    107
    >>> plan_steps(budget_s=6000.0, spent_s=5.0, step_s=0.5, iterations=2250)[0]
    2250
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from ..core.tuning import Decision
from . import job as stages
from .request import RestoreRequest

__all__ = ["PROBE_STEPS", "TimePlan", "plan_steps", "plan_to_budget"]

#: Steps timed when the chosen step's time is not known yet (after one untimed warm-up step).
PROBE_STEPS = 2
#: Share of the time left kept aside for what follows the last step (the final forward, cropping, writing).
RESERVE = 0.02


@dataclass
class TimePlan:
    """What ``time_budget`` chose (``info.time_plan``).

    Attributes:
        budget_s: the budget given.
        spent_s: seconds spent before the fit (reading, estimating the noise, choosing the step).
        ms_per_step: the chosen step's time at the run's size.
        iterations: the steps planned (at most the preset's count).
        preset_iterations: the preset's count.
        preset: the preset planned.
        reason: one line on the choice.
    """

    budget_s: float
    spent_s: float
    ms_per_step: float
    iterations: int
    preset_iterations: int
    preset: str
    reason: str

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def plan_steps(budget_s: float, spent_s: float, step_s: float, iterations: int) -> Tuple[int, str]:
    """Steps that fit into ``budget_s`` after ``spent_s``, at ``step_s`` each, capped at ``iterations``.

    At least one step runs, even when the budget is already spent (a
    restoration returns an image).
    """
    left = (budget_s - spent_s) * (1.0 - RESERVE)
    affordable = int(math.floor(left / step_s)) if step_s > 0 else iterations
    if affordable >= iterations:
        return iterations, (f"the preset's {iterations} steps fit: about {iterations * step_s:.0f} s of the "
                            f"{budget_s:g} s budget")
    steps = max(1, affordable)
    return steps, (f"{steps} of the preset's {iterations} steps fit into the {budget_s:g} s budget at "
                   f"{step_s * 1e3:.0f} ms/step ({spent_s:.1f} s went to preparing the run)")


def _step_seconds(request: RestoreRequest, job: "stages.Job", decision: Decision,
                  clock: Callable[[], float]) -> float:
    known = decision.ms_per_step.get(decision.choice.label)
    if known is not None and math.isfinite(known):
        return known / 1e3
    step = stages.timing_step(request, [job], decision.choice)
    step()  # first-call allocations and plans
    t0 = clock()
    for _ in range(PROBE_STEPS):
        step()
    return (clock() - t0) / PROBE_STEPS


def plan_to_budget(request: RestoreRequest, job: "stages.Job", decision: Decision, run: Any, started: float,
                   clock: Callable[[], float] = time.perf_counter) -> RestoreRequest:
    """Fit ``run`` into ``request.time_budget`` (seconds from ``started``); the request the fit runs under.

    Sets ``run``'s step count and ``job.info.time_plan``; the returned
    request's ``max_time`` is the time left, so the fit stops at the budget.
    """
    budget = request.time_budget
    step_s = _step_seconds(request, job, decision, clock)
    spent = clock() - started
    count = run.fit_kwargs["iterations"]
    steps, reason = plan_steps(budget, spent, step_s, count)
    run.fit_kwargs["iterations"] = steps
    job.info.iterations = steps
    reason = f"preset {job.preset.name!r}: {reason}"
    job.info.time_plan = TimePlan(budget, round(spent, 3), round(step_s * 1e3, 2), steps, count, job.preset.name,
                                  reason).as_dict()
    left = max(budget - (clock() - started), 1e-3)
    hard = left if request.max_time is None else min(left, request.max_time)
    return dataclasses.replace(request, max_time=hard)
