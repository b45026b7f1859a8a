"""Tests of the optimisation loop, the PSNR metric and the task presets."""
from __future__ import annotations

import math
import time
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from skimage.metrics import peak_signal_noise_ratio

from dip_fast import tasks
from dip_fast.tasks import degradations
from dip_fast.core.fit import FitResult, fit, is_check_step
from dip_fast.core.step import DeviceBacktracker, StepRunner
from dip_fast.core.metrics import psnr
from dip_fast.reference import get_noise, skip

SIZE = 32

pytestmark = pytest.mark.usefixtures("one_thread")




def small_net(input_depth: int = 8, out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return skip(
        input_depth, out,
        num_channels_down=[16, 16, 16], num_channels_up=[16, 16, 16], num_channels_skip=[4, 4, 4],
        upsample_mode="bilinear", pad="reflection",
    )


def smooth_image(size: int = SIZE) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([0.5 + 0.4 * torch.sin(6 * x), 0.5 + 0.4 * torch.cos(5 * y), 0.25 + 0.5 * x * y])
    return img[None]


def z(depth: int = 8, seed: int = 0) -> torch.Tensor:
    return get_noise(depth, "noise", SIZE, generator=torch.Generator().manual_seed(seed))


def params_of(net: nn.Module):
    return [p.detach().clone() for p in net.parameters()]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- metric


def test_psnr_matches_skimage():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 16, 16, generator=g)
    b = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    ref = peak_signal_noise_ratio(a.numpy(), b.numpy(), data_range=1.0)
    assert abs(float(psnr(b, a)) - ref) < 1e-4
    assert abs(float(psnr(2 * b, 2 * a, data_range=2.0)) - ref) < 1e-4
    assert math.isinf(float(psnr(a, a)))


def test_psnr_mask_counts_known_pixels_only():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 3, 16, 16, generator=g)
    b = torch.rand(1, 3, 16, 16, generator=g)
    mask = (torch.rand(1, 1, 16, 16, generator=g) > 0.5).float()
    known = mask.expand_as(a).bool()
    ref = peak_signal_noise_ratio(a[known].numpy(), b[known].numpy(), data_range=1.0)
    assert abs(float(psnr(b, a, mask=mask)) - ref) < 1e-4
    # changing unknown pixels does not matter
    b2 = torch.where(known, b, torch.zeros_like(b))
    assert float(psnr(b2, a, mask=mask)) == pytest.approx(float(psnr(b, a, mask=mask)))


# ---------------------------------------------------------------- step and schedule


def test_is_check_step_modes():
    # periodic: restoration.ipynb's `i % show_every == 0`
    assert [s for s in range(10) if is_check_step(s, 3, "periodic")] == [0, 3, 6, 9]
    # off_period: denoising.ipynb's `if i % show_every:` -- every step except multiples
    assert [s for s in range(10) if is_check_step(s, 3, "off_period")] == [1, 2, 4, 5, 7, 8]
    assert not is_check_step(200, 100, "off_period") and is_check_step(201, 100, "off_period")
    with pytest.raises(ValueError, match="check_mode"):
        is_check_step(1, 3, "sometimes")


def test_runner_reg_noise_uses_fresh_noise_and_keeps_input():
    net = small_net()
    x = z()
    x0 = x.clone()
    runner = StepRunner(net, x, lambda out: out.mean(), reg_noise_std=0.1, generator=torch.Generator().manual_seed(0))
    a, b = runner._perturbed_input().clone(), runner._perturbed_input().clone()
    assert not torch.equal(a, b)
    assert torch.equal(x, x0)
    assert 0.07 < (a - x).std().item() < 0.13
    plain = StepRunner(net, x, lambda out: out.mean())
    assert plain._perturbed_input() is plain.net_input


def test_runner_rejects_bad_arguments():
    with pytest.raises(ValueError, match="reg_noise_std"):
        StepRunner(small_net(), z(), lambda o: o.mean(), reg_noise_std=-1)
    with pytest.raises(ValueError, match="precision"):
        StepRunner(small_net(), z(), lambda o: o.mean(), precision="fp8")
    with pytest.raises(ValueError, match="CUDA"):
        StepRunner(small_net(), z(), lambda o: o.mean(), mode="graph")
    with pytest.raises(ValueError, match="scalar"):
        StepRunner(small_net(), z(), lambda o: o).step()


def test_device_backtracker_unit():
    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(2))
    bt = DeviceBacktracker([p, q], threshold_db=5.0)

    def check(value, active=True):
        bt.before_update(torch.tensor(value), active)
        with torch.no_grad():  # the optimizer's update
            p.add_(1.0)
            q.add_(2.0)
        bt.after_update(active)
        return bool(bt.dropped)

    assert check(20.0) is False  # first check: snapshot of p = 0, then the update
    assert check(16.0) is False  # -4 dB: accepted, snapshot at p = 1
    assert check(10.0) is True  # -6 dB from 16: the update is undone, back to the snapshot
    assert torch.equal(p.detach(), torch.ones(3)) and torch.equal(q.detach(), torch.full((2,), 2.0))
    with torch.no_grad():
        p.fill_(float("nan"))
    assert check(float("nan")) is True  # NaN counts as a drop and NaN weights are replaced
    assert torch.equal(p.detach(), torch.ones(3))
    assert float(bt.last_psnr) == 16.0
    # A device flag that is off leaves everything alone (the graph runs this every step).
    assert check(0.0, active=torch.tensor(False)) is False
    assert torch.equal(p.detach(), torch.full((3,), 2.0))
    # The parameters now share one flat buffer, with their shapes and identities kept.
    assert p.shape == (3,) and q.shape == (2,) and p.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()


# ---------------------------------------------------------------- fit


def test_loss_goes_down():
    net = small_net()
    target = smooth_image()
    res = fit(net, z(), lambda out: ((out - target) ** 2).mean(), iterations=80, backtrack=False)
    assert res.steps == 80 and len(res.loss_history) == 80
    assert np.mean(res.loss_history[-5:]) < 0.3 * res.loss_history[0]
    assert res.stop_reason == "completed" and not res.interrupted
    assert res.output.shape == target.shape and not res.output.requires_grad


def test_denoising_improves_psnr():
    torch.manual_seed(0)
    clean = smooth_image()
    noisy = degradations.add_gaussian_noise(clean, 25, torch.Generator().manual_seed(0))
    noisy_psnr = float(psnr(noisy, clean))
    net = small_net()
    res = fit(
        net, z(), tasks.DenoiseTerm(noisy), iterations=250, reg_noise_std=1 / 30, exp_weight=0.99,
        observation=noisy, reference=clean, backtrack=True, check_every=100, check_mode="off_period",
        generator=torch.Generator().manual_seed(0),
    )
    assert len(res.psnr_ref_history) == len(res.psnr_ref_avg_history) == len(res.psnr_history) == 250
    assert float(psnr(res.output_avg, clean)) > noisy_psnr + 3.0
    assert res.psnr_ref_avg_history[-1] == pytest.approx(float(psnr(res.output_avg, clean)), abs=1e-4)
    # and the fit did not reproduce the noise: the output is closer to clean than to noisy
    assert float(psnr(res.output_avg, clean)) > float(psnr(res.output_avg, noisy))


class DropAt:
    """Test double for ``degrade``: reports a wildly wrong image at chosen steps (PSNR ~ -20 dB)."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.calls = 0

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        step = self.calls
        self.calls += 1
        return out + 10.0 if step in self.steps else out


def run_with_drop(drop_steps, check_every, check_mode, iterations=9):
    net = small_net()
    target = smooth_image()
    after = []  # parameters after each step (= before the next one)
    res = fit(
        net, z(), lambda out: ((out - target) ** 2).mean(), iterations=iterations, observation=target,
        degrade=DropAt(drop_steps), backtrack=True, check_every=check_every, check_mode=check_mode,
        callback=lambda info: after.append(params_of(info.net)),
    )
    return res, after


def test_backtracking_restores_snapshot_periodic():
    res, after = run_with_drop({6}, check_every=3, check_mode="periodic")
    assert res.backtrack_steps == [6]
    # The snapshot was taken at check step 3, before its update: the parameters after step 2.
    assert same(after[6], after[2])
    assert not same(after[5], after[2])
    # Nothing else was restored: later steps update again.
    assert not same(after[7], after[6])


def test_backtracking_off_period_notebook_quirk():
    # Step 6 is a multiple of 3, so the denoising notebook's schedule does not check it...
    res, _ = run_with_drop({6}, check_every=3, check_mode="off_period")
    assert res.backtrack_steps == []
    # ...but step 7 is checked, against the snapshot of step 5 (no snapshot at 6).
    res, after = run_with_drop({7}, check_every=3, check_mode="off_period")
    assert res.backtrack_steps == [7]
    assert same(after[7], after[4])


def test_backtracking_not_triggered_without_drop():
    res, after = run_with_drop(set(), check_every=1, check_mode="periodic")
    assert res.backtrack_steps == []
    assert all(not same(after[i], after[i + 1]) for i in range(len(after) - 1))


def test_backtrack_needs_observation():
    with pytest.raises(ValueError, match="observation"):
        fit(small_net(), z(), lambda o: o.mean(), iterations=1, backtrack=True)


def test_exponential_average():
    outs = []
    net = small_net()
    res = fit(net, z(), lambda o: o.mean(), iterations=3, exp_weight=0.9, backtrack=False,
              callback=lambda info: outs.append(info.out.clone()))
    # Starts from the first output; 0.9 keeps the old average (not symmetric, so order matters).
    expected = (outs[0] * 0.9 + outs[1] * 0.1) * 0.9 + outs[2] * 0.1
    assert not torch.allclose(outs[0], outs[2])
    torch.testing.assert_close(res.output_avg, expected)
    res = fit(small_net(), z(), lambda o: o.mean(), iterations=2, exp_weight=None, backtrack=False)
    assert res.output_avg is None


def test_reproducible_with_generator():
    target = smooth_image()

    def run(seed):
        net = small_net(seed=3)
        return fit(net, z(), lambda o: ((o - target) ** 2).mean(), iterations=5, reg_noise_std=0.05,
                   backtrack=False, generator=torch.Generator().manual_seed(seed)).loss_history

    a, b, c = run(0), run(0), run(1)
    assert a == b
    assert a != c


def test_max_time_returns_early(monkeypatch):
    """max_time against a clock that the loss advances by one second per step: no wall clock involved."""
    from dip_fast.core import fit as fit_module

    now = [0.0]
    clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    clock.perf_counter = lambda: now[0]
    monkeypatch.setattr(fit_module, "time", clock)

    def one_second_a_step(out):
        now[0] += 1.0
        return out.mean()

    res = fit(small_net(), z(), one_second_a_step, iterations=10**6, max_time=3.5, backtrack=False)
    assert res.steps == 4  # begun at 0, 1, 2 and 3 s: the fifth would begin at 4 s, past the budget
    assert res.interrupted and res.stop_reason == "max_time" and res.wall_time == 4.0
    assert res.output.shape == (1, 3, SIZE, SIZE) and torch.isfinite(res.output).all()
    zero = fit(small_net(), z(), lambda o: o.mean(), iterations=10, max_time=0.0, backtrack=False)
    assert zero.steps == 0 and zero.loss_history == [] and zero.output.shape == (1, 3, SIZE, SIZE)


def test_keyboard_interrupt_from_callback_returns_result():
    def cb(info):
        if info.step == 4:
            raise KeyboardInterrupt

    net = small_net()
    res = fit(net, z(), lambda o: o.mean(), iterations=50, callback=cb, backtrack=False)
    assert isinstance(res, FitResult)
    assert res.interrupted and res.stop_reason == "keyboard_interrupt"
    assert res.steps == 5 and len(res.loss_history) == 5
    assert res.output.shape == (1, 3, SIZE, SIZE) and torch.isfinite(res.output).all()
    assert res.output_avg is not None


def test_keyboard_interrupt_during_update_returns_last_output():
    class Boom(torch.optim.Adam):
        def step(self, closure=None):
            raise KeyboardInterrupt

    net = small_net()
    res = fit(net, z(), lambda o: o.mean(), iterations=5, backtrack=False,
              optimizer=Boom(net.parameters(), lr=0.01))
    assert res.interrupted and res.steps == 0
    assert res.output.shape == (1, 3, SIZE, SIZE)


def test_should_stop_and_psnr_target():
    polls = []
    res = fit(small_net(), z(), lambda o: o.mean(), iterations=100, backtrack=False,
              should_stop=lambda: polls.append(1) or len(polls) > 3)
    assert res.steps == 3 and res.stop_reason == "should_stop" and res.interrupted
    target = smooth_image()
    res = fit(small_net(), z(), lambda o: ((o - target) ** 2).mean(), iterations=300, backtrack=False,
              reference=target, psnr_target=15.0)
    assert res.stop_reason == "psnr_target" and not res.interrupted
    assert res.psnr_ref_history[-1] >= 15.0 and all(v < 15.0 for v in res.psnr_ref_history[:-1])
    assert res.steps < 300


# ---------------------------------------------------------------- tasks


def test_data_terms():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 3, 16, 16, generator=g)
    x = torch.rand(1, 3, 16, 16, generator=g)
    assert float(tasks.DenoiseTerm(x0[0])(x)) == pytest.approx(float(((x - x0) ** 2).mean()))
    mask = (torch.rand(1, 1, 16, 16, generator=g) > 0.5).float()
    term = tasks.InpaintTerm(x0, mask)
    assert float(term(x)) == pytest.approx(float((((x - x0) * mask) ** 2).mean()))
    x_changed = torch.where(mask.bool().expand_as(x), x, torch.rand(x.shape, generator=g))
    assert float(term(x_changed)) == pytest.approx(float(term(x)))
    sr = tasks.SuperResolutionTerm(x0, 4)
    assert sr.output_size == (64, 64)
    hr = torch.rand(1, 3, 64, 64, generator=g)
    assert float(sr(hr)) == pytest.approx(float(((sr.degrade(hr) - x0) ** 2).mean()))
    # a constant HR image downsamples to the same constant (kernel sums to one)
    torch.testing.assert_close(sr.degrade(torch.full((1, 3, 64, 64), 0.3)), torch.full((1, 3, 16, 16), 0.3))
    with pytest.raises(ValueError, match="factor"):
        tasks.SuperResolutionTerm(x0, 3)


def test_preset_networks_build_with_expected_sizes():
    n = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert n(tasks.build_network(tasks.get_preset("denoise_f16_sigma25"))) == 2_217_831
    assert n(tasks.build_network(tasks.get_preset("sr_x4"))) == 2_217_831
    assert n(tasks.build_network(tasks.get_preset("inpaint_kate"))) == 3_002_627
    for name, preset in tasks.PRESETS.items():
        net = tasks.build_network(preset, 3)
        # Six 5x5-filter scales need 256 px for the deepest reflection pad; five need 64.
        size = 256 if net.config.n_scales == 6 else 64
        x = tasks.make_input(preset, (size, size), generator=torch.Generator().manual_seed(0))
        assert x.shape == (1, preset.input_depth, size, size)
        with torch.no_grad():
            assert net(x).shape == (1, 3, size, size), name


def test_build_network_uses_backend():
    calls = []

    def backend(**kwargs):
        calls.append(kwargs)
        return skip(**kwargs)

    preset = tasks.get_preset("inpaint_library")
    net = tasks.build_network(preset, 1, backend=backend)
    assert calls[0]["num_input_channels"] == 1 and calls[0]["num_output_channels"] == 1
    assert calls[0]["filter_size_down"] == 5 and calls[0]["need1x1_up"] is False
    assert net.config.n_scales == 6
    with pytest.raises(ValueError, match="unknown preset"):
        tasks.get_preset("nope")


def tiny(preset_name: str, **changes):
    return tasks.get_preset(preset_name).with_overrides(
        network=dict(num_channels_down=[8, 8], num_channels_up=[8, 8], num_channels_skip=[2, 2],
                     upsample_mode="bilinear", pad="reflection"),
        iterations=4, **changes,
    )


def test_solve_runs_each_task():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    clean = smooth_image(16)
    res, net = tasks.solve(tiny("denoise_f16_sigma25"), degradations.add_gaussian_noise(clean, 0.1 * 255, g),
                           reference=clean, generator=g)
    assert res.steps == 4 and res.output.shape == (1, 3, 16, 16) and len(res.psnr_ref_history) == 4
    mask = tasks.bernoulli_mask((1, 1, 16, 16), 0.5, g)
    res, _ = tasks.solve(tiny("inpaint_vase", input_depth=2), clean * mask, mask=mask, generator=g)
    assert res.steps == 4 and res.output.shape == (1, 3, 16, 16)
    res, _ = tasks.solve(tiny("sr_x4"), clean[:, :, :8, :8], generator=g, iterations=3)
    assert res.steps == 3 and res.output.shape == (1, 3, 32, 32) and len(res.psnr_history) == 3
    with pytest.raises(ValueError, match="mask"):
        tasks.solve(tiny("inpaint_kate"), clean)


def test_degradation_helpers():
    g = torch.Generator().manual_seed(0)
    m = tasks.bernoulli_mask((1, 1, 200, 200), 0.3, g)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert abs(m.mean().item() - 0.3) < 0.02
    noisy = degradations.add_gaussian_noise(torch.full((1, 3, 64, 64), 0.5), 25, g)
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert abs((noisy - 0.5).std().item() - 25 / 255) < 0.01
    img = torch.arange(70.0).view(1, 7, 10)
    c = tasks.crop_to_multiple(img, 4)
    assert c.shape == (1, 4, 8) and torch.equal(c, img[:, 1:5, 1:9])
