"""The self-tuning step: candidates, the choice on a fake clock, the cache, the switches and graph trust."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from dip_fast import restore, tasks
from dip_fast.core import tuning
from dip_fast.core.step import StepRunner
from dip_fast.core.tuning import Candidate, Decision, TuningCache

CPU = torch.device("cpu")
BASE = Candidate("reference", "nchw", "eager", "fp32")
FAST_CL = Candidate("fast", "channels_last", "eager", "fp32")
FAST_NCHW = Candidate("fast", "nchw", "eager", "fp32")
REF_CL = Candidate("reference", "channels_last", "eager", "fp32")


class FakeClock:
    """A clock that moves only when a step runs: each candidate's step costs its own fixed time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def stepper(self, cost_s: float):
        def step() -> None:
            self.now += cost_s
        return step


def _tune(costs, tmp_path, iterations=100_000, **kwargs):
    clock = FakeClock()
    built = []

    def make_step(candidate):
        built.append(candidate)
        return clock.stepper(costs[candidate])

    decision = tuning.tune(list(costs), make_step, iterations=iterations, device=CPU, key="k", fallback=FAST_CL,
                           cache=TuningCache(tmp_path / "tuning.json"), clock=clock, **kwargs)
    return decision, built, clock


def test_candidates_put_the_baseline_first_and_respect_fixed_choices():
    labels = [c.label for c in tuning.candidates(CPU, native_bf16=False)]
    assert labels[0] == BASE.label and len(labels) == 4 and len(set(labels)) == 4
    assert all(c.backend == "fast" for c in tuning.candidates(CPU, "fast", native_bf16=False))
    assert [c.backend for c in tuning.candidates(CPU, fast_available=False, native_bf16=False)] == ["reference"] * 2
    # no graph on the CPU; no bf16 without a parity record (the table is empty here) or without bf16 units
    assert {c.step_mode for c in tuning.candidates(CPU)} == {"eager"}
    assert {c.precision for c in tuning.candidates(CPU, native_bf16=False)} == {"fp32"}


def test_bf16_is_a_candidate_only_with_a_parity_record_and_native_units():
    from dip_fast.core.auto_step import ParityRecord

    record = ParityRecord("eager", "bf16", 1.0, -0.03, 0.03, 24, "cpu", "x", "f", device_type="cpu")
    with_bf16 = tuning.candidates(CPU, native_bf16=True, records=[record])
    assert {c.precision for c in with_bf16} == {"fp32", "bf16"} and with_bf16[0] == BASE
    assert {c.precision for c in tuning.candidates(CPU, native_bf16=False, records=[record])} == {"fp32"}
    failed = ParityRecord("eager", "bf16", 1.0, -0.5, 0.03, 24, "cpu", "x", "f", device_type="cpu")
    assert {c.precision for c in tuning.candidates(CPU, native_bf16=True, records=[failed])} == {"fp32"}


def test_cuda_candidates_include_graphs_and_tf32_as_the_default_precision():
    cuda = torch.device("cuda")
    found = tuning.candidates(cuda, native_bf16=False)
    assert found[0] == Candidate("reference", "nchw", "eager", "tf32")
    assert {c.step_mode for c in found} == {"eager", "graph"} and {c.precision for c in found} == {"tf32"}
    assert {c.precision for c in tuning.candidates(cuda, precision="fp32")} == {"fp32"}


def test_fake_clock_keeps_the_baseline_within_the_margin(tmp_path):
    decision, _, _ = _tune({BASE: 0.100, FAST_CL: 0.097, FAST_NCHW: 0.120, REF_CL: 0.110}, tmp_path)
    assert decision.source == "measured" and decision.choice == BASE
    assert decision.ms_per_step[FAST_CL.label] == pytest.approx(97.0)
    assert decision.ms_per_step[BASE.label] == pytest.approx(100.0)


def test_fake_clock_takes_a_clearly_faster_candidate(tmp_path):
    decision, _, _ = _tune({BASE: 0.100, FAST_CL: 0.080, FAST_NCHW: 0.120, REF_CL: 0.094}, tmp_path)
    assert decision.choice == FAST_CL
    decision, _, _ = _tune({BASE: 0.100, FAST_CL: 0.096, FAST_NCHW: 0.120, REF_CL: 0.094}, tmp_path / "b")
    assert decision.choice == REF_CL  # 6% faster: past the margin


def test_tuning_stays_within_its_share_of_the_run(tmp_path):
    iterations = 2000
    decision, _, clock = _tune({BASE: 0.1, FAST_CL: 0.08, FAST_NCHW: 0.12, REF_CL: 0.11}, tmp_path,
                               iterations=iterations)
    assert decision.source == "measured"
    # the budget, plus at most one round over it (a round started before the budget ran out)
    assert decision.tuning_s <= tuning.BUDGET_SHARE * 0.1 * iterations + (0.1 + 0.08 + 0.12 + 0.11) + 1e-9


def test_a_short_run_builds_nothing_and_runs_the_fixed_choice(tmp_path):
    decision, built, _ = _tune({BASE: 0.1, FAST_CL: 0.05}, tmp_path, iterations=50)
    assert decision.source == "fixed" and decision.choice == FAST_CL and built == []


def test_a_run_whose_time_is_short_times_nothing_more(tmp_path):
    # Enough steps by count, but max_time caps the run at 2 s: 3% of it cannot pay for the candidates.
    decision, built, _ = _tune({BASE: 0.1, FAST_CL: 0.05}, tmp_path, iterations=100_000, max_time=2.0)
    assert decision.source == "fixed" and built == [BASE]


def test_switches_run_the_fixed_choice_untimed(tmp_path, monkeypatch):
    decision, built, _ = _tune({BASE: 0.1, FAST_CL: 0.05}, tmp_path, deterministic=True)
    assert (decision.source, decision.choice, built) == ("fixed", FAST_CL, [])
    monkeypatch.setenv("DIP_FAST_TUNING", "off")
    decision, built, _ = _tune({BASE: 0.1, FAST_CL: 0.05}, tmp_path)
    assert (decision.source, decision.choice, built) == ("fixed", FAST_CL, [])
    assert "DIP_FAST_TUNING" in decision.reason


def test_cache_round_trip_and_version_change(tmp_path, monkeypatch):
    costs = {BASE: 0.100, FAST_CL: 0.080}
    first, _, _ = _tune(costs, tmp_path)
    again, built, _ = _tune(costs, tmp_path)
    assert first.source == "measured" and again.source == "cache" and built == []
    assert again.choice == first.choice and again.ms_per_step == first.ms_per_step
    # The key carries the versions: another dip_fast version (or torch) times again.
    options = list(costs)
    key = tuning.cache_key(CPU, "net", (3, 64, 64), 1, torch.float32, options)
    from dip_fast import _version

    monkeypatch.setattr(_version, "__version__", "99.0")
    assert tuning.cache_key(CPU, "net", (3, 64, 64), 1, torch.float32, options) != key
    assert tuning.cache_key(CPU, "net", (3, 64, 64), 2, torch.float32, options) != key


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "something-else", "entries": {}}),
                                     json.dumps([1, 2])])
def test_a_corrupt_or_foreign_cache_is_ignored_once_and_rewritten(tmp_path, content):
    path = tmp_path / "tuning.json"
    path.write_text(content)
    cache = TuningCache(path)
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache") as seen:
        assert cache.get("k") is None
        cache.put("k", FAST_CL, {FAST_CL.label: 1.0})
    assert len([w for w in seen if "ignoring" in str(w.message)]) == 1
    data = json.loads(path.read_text())
    assert data["format"] == tuning.CACHE_FORMAT and TuningCache(path).get("k")[0] == FAST_CL


def test_the_cache_lives_under_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.cache_path() == tmp_path / "dip_fast" / "tuning.json"


def test_a_candidate_that_fails_is_never_chosen(tmp_path):
    clock = FakeClock()

    def make_step(candidate):
        if candidate == FAST_CL:
            def broken():
                raise RuntimeError("no kernel")
            return broken
        return clock.stepper(0.1)

    with pytest.warns(RuntimeWarning, match="failed while timing"):
        decision = tuning.tune([BASE, FAST_CL, REF_CL], make_step, iterations=100_000, device=CPU, key="k",
                               fallback=BASE, cache=TuningCache(tmp_path / "t.json"), clock=clock)
    assert decision.choice == BASE and FAST_CL.label not in decision.ms_per_step


# ---------------------------------------------------------------- graphs must prove themselves


def _runner():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                              torch.nn.Conv2d(4, 3, 1), torch.nn.Sigmoid())
    target = torch.rand(1, 3, 8, 8)
    runner = StepRunner(net, torch.rand(1, 2, 8, 8), lambda out: (out - target).square().mean(), exp_weight=0.9,
                        observation=target, backtrack_threshold_db=5.0, reg_noise_std=0.05,
                        generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        runner.step()
    return runner


def test_a_replay_that_matches_the_eager_step_is_trusted():
    runner, twin = _runner(), _runner()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # A faithful "replay": the same step, run the eager way.
        assert runner._verify_replay(lambda: runner._eager_step(False), False)
    twin.step()
    for a, b in zip(runner.params, twin.params, strict=True):
        assert torch.equal(a, b)  # the state after verification is the eager step's


def test_a_replay_that_disagrees_falls_back_with_one_warning():
    runner, twin = _runner(), _runner()

    def wrong_replay():  # a graph that replays a stale step: the update happens twice
        runner._eager_step(False)
        runner._eager_step(False)

    with pytest.warns(RuntimeWarning, match="differs from the eager step") as seen:
        assert not runner._verify_replay(wrong_replay, False)
    assert len(seen) == 1
    twin.step()
    for a, b in zip(runner.params, twin.params, strict=True):
        assert torch.equal(a, b)  # the wrong replay left no trace


# ---------------------------------------------------------------- restore()


#: A small network, so that a run long enough to time its candidates stays quick.
TINY = tasks.get_preset("denoise_quick").with_overrides(
    name="tuning_tiny", network=tasks.NetworkSpec("skip", {**tasks.get_preset("denoise_quick").network.options,
                                                           "num_channels_down": [8, 8], "num_channels_up": [8, 8],
                                                           "num_channels_skip": [4, 4]}))


def _image():
    return np.random.default_rng(3).random((16, 16, 3)).astype(np.float32)


def test_restore_reports_its_execution():
    _, info = restore(_image(), preset="quick", iterations=3, device="cpu", return_info=True)
    ex = info.execution
    assert {"backend", "layout", "step_mode", "precision", "source", "ms_per_step", "tuning_s"} <= set(ex)
    assert ex["source"] == "fixed" and ex["backend"] == info.backend and ex["step_mode"] == info.step_mode
    assert ex["layout"] in tuning.LAYOUTS


def test_restore_gives_the_same_image_whether_measured_or_cached(monkeypatch):
    monkeypatch.setattr(tuning, "BUDGET_SHARE", 1.0)  # let a short run pay for timing
    image = _image()
    first, a = restore(image, preset=TINY, iterations=200, device="cpu", return_info=True, seed=5)
    second, b = restore(image, preset=TINY, iterations=200, device="cpu", return_info=True, seed=5)
    assert a.execution["source"] == "measured" and b.execution["source"] == "cache"
    assert a.execution["backend"] == b.execution["backend"] and a.execution["layout"] == b.execution["layout"]
    np.testing.assert_array_equal(first, second)
    # ... and the same as running that choice directly, untimed.
    monkeypatch.setenv("DIP_FAST_TUNING", "off")
    choice = Candidate(*(a.execution[k] for k in ("backend", "layout", "step_mode", "precision")))
    monkeypatch.setattr(tuning, "fixed", lambda *args, **kwargs: choice)
    third, c = restore(image, preset=TINY, iterations=200, device="cpu", return_info=True, seed=5)
    assert c.execution["source"] == "fixed"
    np.testing.assert_array_equal(first, third)


def test_decision_record_is_plain_data():
    record = Decision(FAST_CL, "cache", {FAST_CL.label: 2.0}, 0.5, "why").as_dict()
    assert json.loads(json.dumps(record)) == record and record["layout"] == "channels_last"


# ---------------------------------------------------------------- dip-fast tune


def test_cli_tune_prints_the_table_and_fills_the_cache(capsys, tmp_path, monkeypatch):
    from dip_fast.apps.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["tune", "--size", "16", "--device", "cpu", "--seconds", "0.1", "--preset", "quick"]) == 0
    out = capsys.readouterr().out
    assert "<- chosen" in out and "reference/nchw/eager/fp32" in out
    entries = json.loads((tmp_path / "dip_fast" / "tuning.json").read_text())["entries"]
    assert len(entries) == 1
    chosen = next(iter(entries.values()))["choice"]
    assert f"{chosen}" in out.split("choice: ")[1]
    # The next restore() of that kind reads it (same shape, task, preset and thread count).
    _, info = restore(tuning_image(16), preset="quick", iterations=1000, max_time=0.01, device="cpu",
                      return_info=True)
    assert info.execution["source"] == "cache" and info.execution["backend"] + "/" in chosen + "/"


def tuning_image(size):
    from dip_fast.apps.tune import synthetic_image

    return synthetic_image(size)


@pytest.mark.parametrize("argv, message", [
    (["tune", "--size", "4"], "size must be an integer >= 8"),
    (["tune", "--size", "64", "--pack", "0"], "pack must be an integer >= 1"),
    (["tune", "--size", "64", "--seconds", "0"], "seconds must be positive"),
])
def test_cli_tune_refuses_bad_arguments_in_one_line(capsys, argv, message):
    from dip_fast.apps.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_on_a_cpu_with_bf16_units_the_fixed_choice_runs_bf16(monkeypatch):
    # The suite runs as on a CPU without bf16 units (conftest); here the processor has them, and the CPU
    # parity record (auto_step.RECORDED_PARITY) allows bf16: a short run's fixed choice is bf16.
    from dip_fast.core import auto_step, cpu_features

    assert any(r.device_type == "cpu" and r.precision == "bf16" and r.has_parity for r in auto_step.RECORDED_PARITY)
    monkeypatch.setattr(cpu_features, "capabilities", lambda: {"avx512_bf16": True})
    assert tuning.fixed(CPU).precision == "bf16"
    assert "bf16" in {c.precision for c in tuning.candidates(CPU)}
    _, info = restore(_image(), preset="quick", iterations=2, device="cpu", return_info=True)
    assert (info.execution["source"], info.precision) == ("fixed", "bf16")
    monkeypatch.setattr(cpu_features, "capabilities", lambda: {"avx2": True})
    assert tuning.fixed(CPU).precision == "fp32"


def test_a_machine_slower_than_its_first_steps_still_keeps_the_budget(tmp_path):
    # The baseline's first steps take 0.1 s, then every step takes 2 s: the plan thought timing would fit,
    # the deadline stops it, and with fewer than MIN_ROUNDS times the run gets the fixed choice.
    clock = FakeClock()
    calls = {"n": 0}

    def make_step(candidate):
        def step():
            calls["n"] += 1
            clock.now += 0.1 if calls["n"] <= 2 else 2.0
        return step

    iterations = 2000
    decision = tuning.tune([BASE, FAST_CL, REF_CL], make_step, iterations=iterations, device=CPU, key="k",
                           fallback=FAST_CL, cache=TuningCache(tmp_path / "t.json"), clock=clock)
    budget = tuning.BUDGET_SHARE * 0.1 * iterations
    assert decision.tuning_s <= budget + 2.0 + 1e-9  # at most one step past the deadline
    assert decision.source == "fixed" and decision.choice == FAST_CL and "ran out" in decision.reason
