"""The discrepancy-gated stopping rule on small synthetic cases (CPU, seconds).

Three behaviours the rule must have (issue "Early stopping that never hurts"):
an under-fitted window is refused however stable it is, a plateau that
explains the data is accepted, and a non-finite statistic or noise level
falls back to the fixed-count result without an error.  Each is checked on
the host-side replay (what the benchmark tunes), on the device tracker
(what a run uses), and the two are checked against each other.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from dip_fast import api, tasks
from dip_fast.api import restore
from dip_fast.early_stop import DiscrepancyRule, WindowedVariance, replay
from dip_fast.monitor import ProgressMonitor
from dip_fast.tasks import registry
from dip_fast.fit import fit

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMA2 = 0.01  # noise variance of the synthetic cases


def _curves(n: int = 400):
    """Variance and residual of a typical run: an early, stable but under-fitted phase, then a plateau.

    The variance has its global minimum at step 50, while the residual is
    still 3 sigma^2 (the content is not fitted yet); the residual reaches
    sigma^2 at step 150, where the variance has a local minimum at 200, and
    the variance rises afterwards as the noise is fitted.
    """
    t = np.arange(n, dtype=float)
    variance = np.where(t < 100, 1e-4 + 1e-6 * np.abs(t - 50), 1e-3 + 1e-6 * (t - 200) ** 2 / 100)
    residual = SIGMA2 * np.where(t < 150, 3.0 - 2.0 * t / 150, 1.0 - 0.3 * (t - 150) / 250)
    return variance.tolist(), residual.tolist()


def test_underfitted_window_is_refused():
    variance, residual = _curves()
    # Plain ES-WMV (a gate that accepts everything) stops at the under-fitted minimum...
    plain = replay(variance, [0.0] * len(variance), DiscrepancyRule(SIGMA2, 1.0, patience=100))
    assert plain.reason == "plateau" and plain.stop_step == 50
    # ...the gate refuses it and takes the stable window of the fitted phase.
    gated = replay(variance, residual, DiscrepancyRule(SIGMA2, 1.0, patience=100))
    assert gated.reason == "plateau" and gated.stop_step == 200 and gated.steps == 301
    assert residual[gated.stop_step] <= SIGMA2


def test_never_fitted_run_falls_back_to_the_fixed_count():
    variance, residual = _curves()
    # A residual that stays 2 sigma^2 above the noise: no window explains the data.
    d = replay(variance, [2 * SIGMA2] * len(variance), DiscrepancyRule(SIGMA2, 1.0, patience=100))
    assert d.reason == "fallback" and d.stop_step is None and d.steps == len(variance)


def test_plateau_is_accepted():
    n = 300
    variance = [None] * 9 + [1e-3 / (1 + t) for t in range(100)] + [1e-5] * (n - 109)  # flat from step 109
    residual = [None] * 9 + [SIGMA2 * 0.95] * (n - 9)
    d = replay(variance, residual, DiscrepancyRule(SIGMA2, 1.0, patience=50))
    assert d.reason == "plateau" and d.stop_step == 108 and d.steps == 159  # the first window of the flat part


def test_budget_end_keeps_an_accepted_window():
    variance, residual = _curves()
    d = replay(variance, residual, DiscrepancyRule(SIGMA2, 1.0, patience=1000))
    assert d.reason == "budget_accepted" and d.stop_step == 200 and d.steps == len(variance)


@pytest.mark.parametrize("bad", [math.nan, math.inf, None])
def test_non_finite_statistics_fall_back(bad):
    variance, residual = _curves()
    d = replay([bad] * len(variance), residual, DiscrepancyRule(SIGMA2, 1.0, patience=100))
    assert d.reason == "fallback" and d.stop_step is None
    d = replay(variance, [bad] * len(variance), DiscrepancyRule(SIGMA2, 1.0, patience=100))
    assert d.reason == "fallback" and d.stop_step is None


@pytest.mark.parametrize("noise_var", [None, math.nan, math.inf, 0.0, -1.0])
def test_unknown_noise_level_falls_back(noise_var):
    variance, residual = _curves()
    rule = DiscrepancyRule(noise_var, 1.0, patience=100)
    assert not rule.usable and math.isnan(rule.bound)
    assert replay(variance, residual, rule).reason == "fallback"


@pytest.mark.parametrize("kwargs, name", [(dict(tolerance=0.0), "tolerance"), (dict(tolerance=math.nan), "tolerance"),
                                          (dict(patience=0), "patience"), (dict(patience=2.5), "patience")])
def test_rule_rejects_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DiscrepancyRule(SIGMA2, **kwargs)


def _stream(n: int = 120, seed: int = 0):
    """Outputs that converge on ``target`` (stable but far from it at first), then pick up noise."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(1, 3, 8, 8, generator=g)
    start = torch.full_like(target, 0.5)
    outs = []
    for t in range(n):
        a = min(t / 60, 1.0)
        jitter = 0.002 + 0.02 * max(t - 80, 0) / 40  # quiet, then the noise is fitted
        outs.append((1 - a) * start + a * target + jitter * torch.randn(target.shape, generator=g))
    return target, outs


def test_device_tracker_matches_the_replay():
    """WindowedVariance with the gate picks the same window as the host replay of its own statistics."""
    target, outs = _stream()
    residual_fn = lambda m: (m - target).square().mean()  # noqa: E731
    for bound in (math.inf, 0.002, 1e-9, math.nan):
        es = WindowedVariance(target, window=10, patience=1000)
        variances, residuals, bests = [], [], []
        for o in outs:
            es.update(o, residual_fn, bound)
            state = es.read()
            variances.append(state.variance)
            residuals.append(float(es.residual))
            bests.append(state.best_step)
        rule = DiscrepancyRule(bound if math.isfinite(bound) else (1.0 if bound > 0 else math.nan), 1.0, 1000)
        d = replay(variances, residuals, rule)
        assert d.stop_step == bests[-1]
        if bound == 0.002:  # the gate moved the choice past the stable start
            assert bests[-1] is not None and bests[-1] >= 50
        if bound == 1e-9 or math.isnan(bound):
            assert bests[-1] is None
        if bests[-1] is not None:
            window = torch.stack(outs[bests[-1] - 9 : bests[-1] + 1]).mean(0)
            torch.testing.assert_close(es.best, window)
            assert residual_fn(window) <= bound


class _Drift(nn.Module):
    """A 'network' whose output moves from 0.5 towards a target at a fixed pace: no noise is ever fitted."""

    def __init__(self, shape):
        super().__init__()
        self.x = nn.Parameter(torch.full(shape, 0.5))

    def forward(self, z):
        return self.x + 0 * z.sum()


def test_fit_with_an_unreachable_gate_completes_and_returns_no_stop_output():
    target = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    net = _Drift(target.shape)
    res = fit(net, torch.zeros(1, 1, 8, 8), lambda o: ((o - target) ** 2).mean(), iterations=40, lr=1e-4,
              backtrack=False, observation=target, stop="auto", stop_window=5, stop_patience=5, stop_bound=math.nan)
    assert res.stop_reason == "completed" and res.stop_output is None and res.stop_step is None
    assert len(res.residual_history) == 40 and all(math.isnan(r) for r in res.residual_history[:4])
    assert all(math.isfinite(r) for r in res.residual_history[4:])


def test_fit_stops_on_an_accepted_plateau():
    target = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    net = _Drift(target.shape)
    res = fit(net, torch.zeros(1, 1, 8, 8), lambda o: ((o - target) ** 2).mean(), iterations=2000, lr=0.05,
              backtrack=False, observation=target, stop="auto", stop_window=5, stop_patience=20, stop_bound=1e-3)
    assert res.stop_reason == "early_stop" and res.stop_step is not None
    assert res.stop_residual is not None and res.stop_residual <= 1e-3
    assert res.stop_residual == pytest.approx(float(((res.stop_output - target) ** 2).mean()), rel=1e-4)


def test_stop_bound_needs_an_observation():
    with pytest.raises(ValueError, match="stop_bound"):
        fit(_Drift((1, 3, 8, 8)), torch.zeros(1, 1, 8, 8), lambda o: o.mean(), iterations=1, backtrack=False,
            stop="auto", stop_bound=1.0)


# ---------------------------------------------------------------- restore()


def _small_preset(task: str, iterations: int) -> tasks.Preset:
    return tasks.Preset(
        name=f"small_{task}", task=task, input_depth=8, iterations=iterations, exp_weight=0.99,
        network=tasks._net(num_channels_down=[16, 16, 16], num_channels_up=[16, 16, 16], num_channels_skip=[4, 4, 4]),
        reg_noise_std=1 / 30, backtrack=False,
    )


def _smooth(h: int = 32, w: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] / np.float32(max(h, w))
    return np.stack([0.5 + 0.3 * np.sin(5 * x), 0.5 + 0.3 * np.cos(4 * y), 0.3 + 0.4 * x * y], -1).astype(np.float32)


def test_restore_early_reports_its_confidence(monkeypatch):
    clean = _smooth()
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 0.15, clean.shape), 0, 1).astype(np.float32)
    monkeypatch.setattr(api, "EARLY_STOP_WINDOW", 10)
    monkeypatch.setattr(api, "EARLY_STOP_PATIENCE", 40)
    out, info = restore(noisy, preset=_small_preset("denoise", 1500), sigma=0.15 * 255, stop="early",
                        ground_truth=clean, return_info=True)
    assert info.stop == "early" and info.stop_noise_sigma == pytest.approx(0.15 * 255)
    assert info.stop_reason == "early_stop" and info.stop_step is not None and not info.stop_fallback
    assert info.stop_residual_ratio <= api.EARLY_STOP_TOLERANCE + 1e-6 and "stopped" in info.stop_summary
    assert info.psnr > 10 * math.log10(1 / 0.15**2)  # better than the noisy input


def test_restore_early_without_a_noise_level_falls_back(monkeypatch):
    clean = _smooth()
    blurred = tasks.blur(torch.from_numpy(clean).permute(2, 0, 1)[None], tasks.make_blur_kernel("gaussian:1"))
    monkeypatch.setattr(api, "_estimate_sigma", lambda color: None)  # e.g. PyWavelets missing
    _, info = restore(blurred[0].permute(1, 2, 0).numpy(), task="deblur", blur_kernel="gaussian:1",
                      preset=_small_preset("deblur", 12), stop="early", return_info=True)
    assert info.steps == 12 and info.stop_reason == "completed" and info.stop_fallback
    assert info.stop_noise_sigma is None and info.stop_residual_ratio is None and "fallback" in info.stop_summary


def test_restore_stop_auto_follows_the_per_task_default(monkeypatch):
    noisy = _smooth()
    # The per-task default is the task spec's auto_stop (dip_fast.tasks.builtin).
    denoise = registry.get_task("denoise")
    monkeypatch.setitem(registry._TASKS, "denoise", dataclasses.replace(denoise, auto_stop="never"))
    _, info = restore(noisy, preset=_small_preset("denoise", 5), sigma=10, return_info=True)
    assert info.stop == "never" and info.stop_residual_ratio is None and info.stop_summary == ""
    monkeypatch.setitem(registry._TASKS, "denoise", dataclasses.replace(denoise, auto_stop="early"))
    _, info = restore(noisy, preset=_small_preset("denoise", 5), sigma=10, return_info=True)
    assert info.stop == "early" and info.stop_residual_ratio is not None


def test_restore_rejects_early_stopping_where_it_does_not_apply():
    mask = np.ones((32, 32), dtype=bool)
    with pytest.raises(ValueError, match="stop='early'"):
        restore(_smooth(), task="inpaint", mask=mask, stop="early")
    with pytest.raises(ValueError, match="stop"):
        restore(_smooth(), stop="sometimes")


def test_restore_underfitted_run_falls_back_and_says_so():
    clean = _smooth()
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 0.05, clean.shape), 0, 1).astype(np.float32)
    # 15 steps: the estimate is nowhere near explaining the image, so nothing may be accepted.
    _, info = restore(noisy, preset=_small_preset("denoise", 15), sigma=0.05 * 255, stop="early", return_info=True)
    assert info.steps == 15 and info.stop_reason == "completed" and info.stop_step is None and info.stop_fallback
    assert info.stop_residual_ratio > api.EARLY_STOP_TOLERANCE and "more iterations" in info.stop_summary


def test_progress_bar_shows_the_stopping_signal():
    from dip_fast.fit import StepInfo

    s = StepInfo(step=5, loss=0.1, out=torch.zeros(1), out_avg=None, psnr=None, psnr_ref=None, backtracked=False,
                 elapsed=0.0, net=nn.Identity(), variance=2e-4, residual=0.012, stop_step=3)
    monitor = ProgressMonitor.__new__(ProgressMonitor)
    monitor.noise_var = 0.01
    assert monitor._stop_signal(s) == {"var": "2.0e-04", "res/sigma2": "1.20", "best": "4"}
    s.variance = math.nan  # before the window fills: nothing to show
    assert monitor._stop_signal(s) == {}
