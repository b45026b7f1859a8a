"""At graph speed the log is read every 50 steps: max_time, the callback and early stopping must still act promptly.

On CUDA ``fit`` reads the device log every ``CUDA_SYNC_EVERY`` (50) steps;
these tests run that read interval on the CPU.
"""
from __future__ import annotations

import functools
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from dip_fast import api
from dip_fast.pipeline import job
from dip_fast.core import fit as fit_module
from dip_fast.core.fit import CUDA_SYNC_EVERY, fit

pytestmark = pytest.mark.usefixtures("one_thread")

EVERY = CUDA_SYNC_EVERY


class Scripted(nn.Module):
    """A 'network' whose t-th forward returns a fixed noisy image of amplitude ``amplitudes[t]``."""

    def __init__(self, amplitudes, shape=(1, 3, 8, 8)):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))  # fit needs a parameter; its gradient is zero
        g = torch.Generator().manual_seed(0)
        self.outs = [0.5 + a * torch.randn(shape, generator=g) for a in amplitudes]
        self.calls = 0

    def forward(self, z):
        out = self.outs[min(self.calls, len(self.outs) - 1)]
        self.calls += 1
        return out + self.w * 0 + 0 * z.sum()


def test_max_time_is_checked_every_step_not_every_read():
    def slow_loss(out):
        time.sleep(0.02)  # at least 20 ms a step: 50 steps would take a second
        return out.mean()

    res = fit(Scripted([0.1]), torch.zeros(1, 1, 8, 8), slow_loss, iterations=10 * EVERY, backtrack=False,
              sync_every=EVERY, max_time=0.2)
    assert res.stop_reason == "max_time" and res.interrupted
    assert 1 <= res.steps < EVERY, f"{res.steps} steps: max_time waited for a read of the log"
    assert len(res.loss_history) == res.steps  # the steps since the last read are still logged


def test_early_stop_decision_does_not_move_while_waiting_for_the_read():
    # The window variance falls for 20 steps, rises for 15 (the patience of 10 runs out at step 29),
    # then falls far below its old minimum. A run read every step stops at step 29 with the window
    # closed at step 19; a run read every 50 steps learns of it at step 49, when newer, steadier windows
    # exist: it must still return the window the rule chose at step 29.
    amplitudes = [1.0 - 0.045 * t for t in range(20)] + [0.5] * 15 + [0.01] * 300
    runs = {}
    for every in (1, EVERY):
        runs[every] = fit(Scripted(amplitudes), torch.zeros(1, 1, 8, 8), lambda o: o.mean(), iterations=300,
                          backtrack=False, stop="auto", stop_window=5, stop_patience=10, sync_every=every)
    each, batched = runs[1], runs[EVERY]
    assert each.stop_reason == batched.stop_reason == "early_stop"
    assert each.stop_step == 19 and each.steps == 30
    assert batched.stop_step == each.stop_step, "the decision moved between the rule firing and the read"
    assert batched.steps == EVERY  # stopped at the first read after the rule fired
    assert torch.equal(batched.stop_output, each.stop_output)
    torch.testing.assert_close(torch.tensor(batched.variance_history[:30]), torch.tensor(each.variance_history),
                               equal_nan=True, rtol=0, atol=0)


def test_restore_callback_stop_acts_at_the_first_read(monkeypatch):
    # restore() as it runs on CUDA: the log, the progress bar and the callback every 50 steps.
    monkeypatch.setattr(job, "fit", functools.partial(fit_module.fit, sync_every=EVERY))
    seen = []

    def callback(step, info):
        seen.append(step)
        return True  # stop

    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    _, info = api.restore(image, preset="quick", iterations=4 * EVERY, sigma=25, callback=callback,
                          return_info=True, backend="reference", progress=True)
    assert seen == [EVERY - 1]
    assert info.steps == EVERY and info.stop_reason == "callback" and info.interrupted
