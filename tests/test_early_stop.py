"""The discrepancy rule on small synthetic cases (CPU, seconds).

Three behaviours the rule must have (issue "Early stopping that never hurts"):
an under-fitted estimate is refused however stable the outputs are, an
estimate that has come down to the noise level is accepted, and a
non-finite statistic or noise level falls back to the fixed-count result
without an error.  Each is checked on the host-side replay (what the
benchmark tunes), on the device tracker inside ``fit`` (what a run uses),
and the two are checked against each other.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from dip_fast import tasks
from dip_fast.pipeline import job, request as request_module
from dip_fast.api import restore
from dip_fast.core.early_stop import (ClippedBound, DiscrepancyRule, DiscrepancyTracker, clipped_mean_inverse,
                                     clipped_noise_moments, clipped_observation_variance, expected_clipped_residual,
                                     replay)
from dip_fast.pipeline.monitor import ProgressMonitor
from dip_fast.tasks import registry
from dip_fast.core.fit import fit

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMA2 = 0.01  # noise variance of the synthetic cases


def _residual_curve(n: int = 400) -> list:
    """The average's residual in a typical run: content fitted by step 150 (sigma^2), then the noise."""
    t = np.arange(n, dtype=float)
    return (SIGMA2 * np.where(t < 150, 3.0 - 2.0 * t / 150, 1.0 - 0.3 * (t - 150) / 250)).tolist()


def test_underfitted_estimates_are_refused_and_the_first_fitted_one_is_kept():
    residual = _residual_curve()
    d = replay(residual, DiscrepancyRule(SIGMA2, 1.0))
    # Steps 0-149 leave content in the residual (above sigma^2): none is returned.
    assert d.reason == "discrepancy" and d.stop_step == 150 and d.steps == 151
    assert all(r > SIGMA2 for r in residual[:150])
    # A looser tolerance accepts earlier, a stricter one later; both only where the bound holds.
    assert replay(residual, DiscrepancyRule(SIGMA2, 1.5)).stop_step == 113
    assert replay(residual, DiscrepancyRule(SIGMA2, 0.9)).stop_step == 234


def test_a_plateau_at_the_noise_level_is_accepted():
    # Flat at 0.98 sigma^2 from step 20 on, as when the content is fitted and the noise fitting is slow.
    residual = [None] * 3 + [SIGMA2 * (1 + 1 / (1 + t)) for t in range(17)] + [SIGMA2 * 0.98] * 80
    d = replay(residual, DiscrepancyRule(SIGMA2, 1.0))
    assert d.reason == "discrepancy" and d.stop_step == 20


def test_never_fitted_run_falls_back_to_the_fixed_count():
    d = replay([2 * SIGMA2] * 300, DiscrepancyRule(SIGMA2, 1.0))
    assert d.reason == "fallback" and d.stop_step is None and d.steps == 300
    # The budget caps the replay: a crossing after it does not count.
    assert replay(_residual_curve(), DiscrepancyRule(SIGMA2, 1.0), iterations=150).reason == "fallback"


@pytest.mark.parametrize("bad", [math.nan, math.inf, None])
def test_non_finite_statistics_fall_back(bad):
    d = replay([bad] * 300, DiscrepancyRule(SIGMA2, 1.0))
    assert d.reason == "fallback" and d.stop_step is None
    # A non-finite value in the middle is skipped, not taken for a crossing.
    residual = _residual_curve()
    residual[100:200] = [bad] * 100
    assert replay(residual, DiscrepancyRule(SIGMA2, 1.0)).stop_step == 200


@pytest.mark.parametrize("noise_var", [None, math.nan, math.inf, 0.0, -1.0])
def test_unknown_noise_level_falls_back(noise_var):
    rule = DiscrepancyRule(noise_var, 1.0)
    assert not rule.usable and math.isnan(rule.bound)
    assert replay(_residual_curve(), rule).reason == "fallback"


@pytest.mark.parametrize("tolerance", [0.0, -1.0, math.nan, math.inf, "1"])
def test_rule_rejects_bad_settings(tolerance):
    with pytest.raises(ValueError, match="tolerance"):
        DiscrepancyRule(SIGMA2, tolerance)


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


@pytest.mark.parametrize("bound", [math.inf, 0.002, 1e-4, 1e-9, math.nan])
def test_device_tracker_matches_the_replay(bound):
    """The tracker keeps the same step as the host replay of its own residuals, and that step's estimate."""
    target, outs = _stream()
    residual_fn = lambda m: (m - target).square().mean()  # noqa: E731
    tracker = DiscrepancyTracker(target, bound)
    residuals, averages = [], []
    average = outs[0].clone()
    for t, o in enumerate(outs):
        average = o.clone() if t == 0 else 0.9 * average + 0.1 * o
        tracker.update(o, average, residual_fn)
        residuals.append(float(tracker.residual))
        averages.append(average)
    state = tracker.read()
    d = replay(residuals, DiscrepancyRule(bound if math.isfinite(bound) else (1.0 if bound > 0 else math.nan), 1.0))
    assert state.best_step == d.stop_step and state.steps == len(outs)
    assert tracker.should_stop(state) == (d.stop_step is not None)
    if bound == math.inf:
        assert d.stop_step == 0
    if bound in (1e-9,) or math.isnan(bound):
        assert d.stop_step is None
    if bound == 0.002:  # the stable but unfitted start is refused
        assert d.stop_step is not None and d.stop_step >= 30
    if d.stop_step is not None:
        torch.testing.assert_close(tracker.best, averages[d.stop_step])
        assert residual_fn(tracker.best) <= bound
        # Later steps never replace the kept estimate, though they also qualify.
        assert any(r <= bound for r in residuals[d.stop_step + 1 :]) or d.stop_step == len(outs) - 1


def test_tracker_without_residual_fn_is_an_error():
    with pytest.raises(ValueError, match="residual_fn"):
        DiscrepancyTracker(torch.zeros(3), 1.0).update(torch.zeros(3))


class _Drift(nn.Module):
    """A 'network' whose output moves from 0.5 towards a target at a fixed pace: no noise is ever fitted."""

    def __init__(self, shape):
        super().__init__()
        self.x = nn.Parameter(torch.full(shape, 0.5))

    def forward(self, z):
        return self.x + 0 * z.sum()


def test_fit_with_an_unreachable_bound_completes_and_returns_no_stop_output():
    target = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    net = _Drift(target.shape)
    res = fit(net, torch.zeros(1, 1, 8, 8), lambda o: ((o - target) ** 2).mean(), iterations=40, lr=1e-4,
              backtrack=False, observation=target, stop="discrepancy", stop_bound=math.nan)
    assert res.stop_reason == "completed" and res.stop_output is None and res.stop_step is None
    assert len(res.residual_history) == 40 and all(math.isfinite(r) for r in res.residual_history)


@pytest.mark.parametrize("sync_every", [1, 7])
def test_fit_stops_at_the_first_step_within_the_bound(sync_every):
    target = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    net = _Drift(target.shape)
    res = fit(net, torch.zeros(1, 1, 8, 8), lambda o: ((o - target) ** 2).mean(), iterations=2000, lr=0.05,
              backtrack=False, observation=target, stop="discrepancy", stop_bound=1e-3, sync_every=sync_every)
    assert res.stop_reason == "early_stop" and res.stop_step is not None
    history = res.residual_history
    assert history[res.stop_step] <= 1e-3 and all(r > 1e-3 for r in history[: res.stop_step])
    assert res.stop_step < res.steps < res.stop_step + 1 + sync_every  # read late, but the estimate is the step's
    assert res.stop_residual == pytest.approx(float(((res.stop_output - target) ** 2).mean()), rel=1e-4)


def test_stop_discrepancy_needs_a_bound_and_an_observation():
    args = (_Drift((1, 3, 8, 8)), torch.zeros(1, 1, 8, 8), lambda o: o.mean())
    with pytest.raises(ValueError, match="stop_bound"):
        fit(*args, iterations=1, backtrack=False, stop="discrepancy", stop_bound=1.0)
    with pytest.raises(ValueError, match="stop_bound"):
        fit(*args, iterations=1, backtrack=False, stop="discrepancy", observation=torch.zeros(1, 3, 8, 8))


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
    out, info = restore(noisy, preset=_small_preset("denoise", 1500), sigma=0.15 * 255, stop="early",
                        ground_truth=clean, return_info=True)
    # The level held to is the observation's estimate, capped by the given sigma (clipping leaves less noise).
    assert info.stop == "early" and 0.1 * 255 < info.stop_noise_sigma <= 0.15 * 255 + 1e-9
    assert info.stop_reason == "early_stop" and info.stop_step is not None and not info.stop_fallback
    assert info.stop_residual_ratio <= request_module.EARLY_STOP_TOLERANCE + 1e-6 and "stopped" in info.stop_summary
    # At least 3 dB above the noisy input itself, as measured (clipping leaves it above the nominal 16.5 dB).
    noisy_psnr = -10 * math.log10(float(np.mean((noisy - clean) ** 2)))
    assert info.psnr > noisy_psnr + 3


def test_restore_early_without_a_noise_level_falls_back(monkeypatch):
    clean = _smooth()
    blurred = tasks.blur(torch.from_numpy(clean).permute(2, 0, 1)[None], tasks.make_blur_kernel("gaussian:1"))
    monkeypatch.setattr(job, "estimate_sigma", lambda color, **_: 0.0)  # an observation that shows no noise
    _, info = restore(blurred[0].permute(1, 2, 0).numpy(), task="deblur", blur_kernel="gaussian:1",
                      preset=_small_preset("deblur", 12), iterations=12, stop="early", return_info=True)
    assert info.steps == 12 and info.stop_reason == "completed" and info.stop_fallback
    assert info.stop_noise_sigma is None and info.stop_residual_ratio is None and "fallback" in info.stop_summary


def _noisy_smooth() -> np.ndarray:
    clean = _smooth()
    return np.clip(clean + np.random.default_rng(1).normal(0, 0.05, clean.shape), 0, 1).astype(np.float32)


def test_restore_stop_auto_follows_the_per_task_default(monkeypatch):
    noisy = _noisy_smooth()
    # The per-task default is the task spec's auto_stop (dip_fast.tasks.builtin).
    denoise = registry.get_task("denoise")
    monkeypatch.setitem(registry._TASKS, "denoise", dataclasses.replace(denoise, auto_stop="never"))
    _, info = restore(noisy, preset=_small_preset("denoise", 5), sigma=10, return_info=True)
    assert info.stop == "never" and info.stop_residual_ratio is None and info.stop_summary == ""
    monkeypatch.setitem(registry._TASKS, "denoise", dataclasses.replace(denoise, auto_stop="early"))
    _, info = restore(noisy, preset=_small_preset("denoise", 5), sigma=10, return_info=True)
    assert info.stop == "early" and info.stop_residual_ratio is not None


def test_stop_early_budget_extends_the_preset_only_without_iterations():
    noisy = _noisy_smooth()
    _, info = restore(noisy, preset=_small_preset("denoise", 8), sigma=1e-3, stop="early", return_info=True)
    assert info.iterations == round(8 * request_module.EARLY_STOP_BUDGET) and info.stop_fallback
    _, info = restore(noisy, preset=_small_preset("denoise", 8), sigma=1e-3, stop="never", return_info=True)
    assert info.iterations == 8


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
    _, info = restore(noisy, preset=_small_preset("denoise", 15), iterations=15, sigma=0.05 * 255, stop="early",
                      return_info=True)
    assert info.steps == 15 and info.stop_reason == "completed" and info.stop_step is None and info.stop_fallback
    assert info.stop_residual_ratio > request_module.EARLY_STOP_TOLERANCE and "more iterations" in info.stop_summary


def test_progress_bar_shows_the_stopping_signal():
    from dip_fast.core.fit import StepInfo

    s = StepInfo(step=5, loss=0.1, out=torch.zeros(1), out_avg=None, psnr=None, psnr_ref=None, backtracked=False,
                 elapsed=0.0, net=nn.Identity(), variance=math.nan, residual=0.012, stop_step=None)
    monitor = ProgressMonitor.__new__(ProgressMonitor)
    monitor.noise_var = 0.01
    assert monitor._stop_signal(s) == {"res/sigma2": "1.20"}
    s.residual = math.nan  # no residual measured: nothing to show
    assert monitor._stop_signal(s) == {}
    monitor.noise_var = None  # the rule is off
    s.residual = 0.012
    assert monitor._stop_signal(s) == {}


# ---------------------------------------------------------------- clipped noise


@pytest.mark.parametrize("std", [0.02, 0.1, 0.3])
def test_clipped_gaussian_moments_match_monte_carlo(std):
    """E[r], E[r^2] of r = clip(x + n, 0, 1) - x and Var[clip(x + n)]: closed forms against 400k draws."""
    x = torch.tensor([-0.05, 0.0, 0.01, 0.05, 0.2, 0.5, 0.9, 0.99, 1.0, 1.05], dtype=torch.float64)
    n = torch.randn(400_000, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * std
    y = (x + n).clamp(0, 1)
    r = y - x
    mean, second = clipped_noise_moments(x, std)
    count = n.shape[0]
    # Within 5 standard errors of the Monte Carlo means (the errors' own spread, from the draws).
    assert ((mean - r.mean(0)).abs() <= 5 * r.std(0) / count**0.5 + 1e-12).all()
    assert ((second - r.square().mean(0)).abs() <= 5 * r.square().std(0) / count**0.5 + 1e-12).all()
    torch.testing.assert_close(expected_clipped_residual(x, std), second)
    variance = clipped_observation_variance(x, std)
    assert ((variance - y.var(0)).abs() <= 5 * (y - y.mean(0)).square().std(0) / count**0.5 + 1e-12).all()
    # Far from the bounds nothing is clipped: sigma^2 exactly; at a bound half of it.
    assert float(second[5]) == pytest.approx(std**2, rel=1e-5 if std < 0.2 else 0.2)
    assert float(second[1]) == pytest.approx(std**2 / 2, rel=1e-9 if std < 0.2 else 0.01)  # the far bound clips too


def test_clipped_mean_is_read_back_as_its_true_value():
    x = torch.linspace(0, 1, 101, dtype=torch.float64)
    mean, _ = clipped_noise_moments(x, 0.1)
    torch.testing.assert_close(clipped_mean_inverse(x + mean, 0.1), x, atol=1e-5, rtol=0)
    # The bound reads an estimate as that clipped mean: the true image's expected residual.
    bound = ClippedBound(0.98, 0.1)
    torch.testing.assert_close(bound.per_pixel(x + mean), expected_clipped_residual(x, 0.1), atol=1e-7, rtol=1e-4)
    # Below the clipped mean of 0 (a value no clipped observation has on average) reads as 0.
    assert float(bound.per_pixel(torch.tensor([0.0]))) == pytest.approx(0.005, rel=1e-4)


def _clipped_scene(std: float = 0.1, seed: int = 0):
    """A 3x32x32 image half black (its noise clipped at 0: a dark area) and half mid-grey texture, its clipped
    noisy observation, a fitted estimate (the clipped mean where black, the texture) and an under-fitted one
    (the texture's amplitude partly missing)."""
    w = torch.arange(32, dtype=torch.float64)
    texture = 0.5 + 0.2 * torch.sin(w[:, None] / 2.0) * torch.cos(w[None, :] / 3.0)
    clean = texture.expand(3, 32, 32).clone()
    clean[:, :, :16] = 0.0
    clean = clean[None]
    g = torch.Generator().manual_seed(seed)
    noisy = (clean + std * torch.randn(clean.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    fitted = clean.clone()
    fitted[..., :16] = noisy[..., :16].mean()  # a smooth fit of a clipped area finds its clipped mean
    under = fitted.clone()
    under[..., 16:] = 0.5 + 0.55 * (texture[:, 16:] - 0.5)  # 45% of the texture's amplitude still missing
    return clean, noisy, fitted, under


def test_clip_aware_rule_refuses_an_underfitted_clipped_image_and_accepts_a_fitted_one():
    std = 0.1
    _, noisy, fitted, under = _clipped_scene(std)
    rule = DiscrepancyRule(std**2, 0.98, clip=(0.0, 1.0))
    flat = DiscrepancyRule(std**2, 0.98)  # one sigma^2 for every pixel

    def residual(x):
        return float((x - noisy).square().mean())

    def expected(x):
        return float(rule.bound.per_pixel(x).mean())

    assert rule.admissible(residual(fitted), expected(fitted))
    assert not rule.admissible(residual(under), expected(under))
    # One sigma^2 for every pixel accepts the under-fitted image: the clipped half's small residual pays for it.
    assert flat.admissible(residual(under))
    # The replay and the device tracker agree: the fitted estimate of a run is the first one kept.
    seq = [under, under, fitted, fitted]
    d = replay([residual(x) for x in seq], rule, expected=[expected(x) for x in seq])
    assert d.reason == "discrepancy" and d.stop_step == 2
    tracker = DiscrepancyTracker(noisy.float(), rule.bound)

    def residual_fn(estimate, per_pixel=None):
        r = (estimate - noisy.float()).square().reshape(1, -1).mean(1)
        return r if per_pixel is None else (r, per_pixel(estimate).reshape(1, -1).mean(1))

    for x in seq:
        tracker.update(x.float(), None, residual_fn)
    assert tracker.read().best_step == 2
    assert float(tracker.bound) == pytest.approx(0.98 * expected(fitted), rel=1e-4)


def test_clip_aware_rule_needs_the_expected_residual_and_valid_bounds():
    rule = DiscrepancyRule(0.01, 0.98, clip=(0.0, 1.0))
    assert not rule.admissible(0.001)  # no expectation: nothing is accepted
    with pytest.raises(ValueError, match="expected"):
        replay([0.001], rule)
    for bad in [(1.0, 0.0), (0.0, math.inf), (0.0,)]:
        with pytest.raises(ValueError, match="clip"):
            DiscrepancyRule(0.01, clip=bad)
    assert math.isnan(DiscrepancyRule(None, clip=(0.0, 1.0)).bound)  # unusable: falls back as before


def test_fit_with_a_clipped_bound_stops_where_the_replay_does():
    """Inside fit (the step's residual function): the clipped bound follows the average, as replayed."""
    clean, noisy, _, _ = _clipped_scene(0.1)
    noisy = noisy.float()
    rule = DiscrepancyRule(0.01, 0.98, clip=(0.0, 1.0))
    averages = []
    res = fit(_Drift(noisy.shape), torch.zeros(1, 1, 32, 32), lambda o: ((o - noisy) ** 2).mean(), iterations=400,
              lr=0.002, backtrack=False, observation=noisy, stop="discrepancy", stop_bound=rule.bound,
              exp_weight=0.9, callback=lambda s: averages.append(s.out_avg.detach().clone()))
    assert res.stop_reason == "early_stop" and res.stop_step is not None
    expected = [float(rule.bound.per_pixel(a).mean()) for a in averages]
    d = replay(res.residual_history, rule, expected=expected)
    assert d.stop_step == res.stop_step > 0
    # One sigma^2 for every pixel stops earlier on the same run.
    assert replay(res.residual_history, DiscrepancyRule(0.01, 0.98)).stop_step < res.stop_step


def test_restore_says_when_clipping_was_taken_into_account():
    clean = np.clip((_smooth() - 0.5) * 2.2 + 0.5, 0, 1)  # dark and bright areas: the noise is clipped there
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)
    share = float(np.mean((noisy <= 0) | (noisy >= 1)))
    assert share > 0.05
    _, info = restore(noisy, preset=_small_preset("denoise", 600), stop="early", return_info=True)
    assert f"{share:.1%} of the observation's values are clipped at 0 or 1" in info.stop_summary
    assert "expected residual of clipped noise" in info.stop_summary
    # The level is read before clipping: above the patch estimate of the noise present (a 32x32 image has
    # too few patches for either to come near the 25.5 added).
    observed = torch.from_numpy(noisy).permute(2, 0, 1)[None]
    assert info.stop_noise_sigma == pytest.approx(job.estimate_sigma(observed), rel=1e-9)
    assert info.stop_noise_sigma > 1.1 * job.estimate_sigma(observed, clipped=False)
    # Without clipped values nothing is said about clipping.
    inside = np.clip(0.25 + 0.5 * noisy, 0.01, 0.99).astype(np.float32)
    _, info = restore(inside, preset=_small_preset("denoise", 20), stop="early", return_info=True)
    assert "clipped" not in info.stop_summary and "sigma^2" in info.stop_summary
