"""Early stopping without ground truth: the windowed moving variance (ES-WMV).

Deep Image Prior first fits the image content and only later the noise, so
the PSNR against the clean image rises to a peak and then falls.  Wang et
al. ("Early Stopping for Deep Image Prior", arXiv 2112.06074) observed that
the *variance* of the recent outputs follows the same U shape: it falls
while the network converges on the content and rises again once it starts
fitting the noise.  ES-WMV keeps the last ``W`` outputs and their variance

    VAR(t) = 1/W * sum_{i in window} ||x_i - mean(window)||^2

and stops once VAR has not reached a new minimum for ``P`` steps.  The paper
uses ``W = 100`` and ``P = 1000``.

What is returned: the *mean of the W outputs in the window of smallest
variance*, not the single output of the step that ended it.  The outputs are
most stable there, and averaging them removes the jitter of the input
perturbation as the notebooks' exponential average does, but without its
lag: the exponential average at the detected step still carries the outputs
of ~1/(1 - 0.99) = 100 steps before, and lagged the peak by several dB in
our measurements (``bench/README.md``, "Early stopping"), while the window
mean came within 0.11 dB of the best any window reached (barbara).

ES-WMV alone can return an under-fitted image: the variance also has a
minimum early on, while the outputs are still smooth.  :class:`DiscrepancyRule`
therefore admits only windows whose mean explains the observation down to
its noise level (the discrepancy principle), and falls back to the fixed
step count when none does; :func:`replay` runs that rule over recorded
statistics, which is how ``bench/es_replay.py`` tunes and validates it.

Everything here is tensor arithmetic on the output's device with no host
synchronisation, so :meth:`WindowedVariance.update` can run inside a CUDA
graph; only :meth:`WindowedVariance.read` copies three numbers to the host,
and the caller decides how often to do that.

The variance is computed incrementally from a running sum and sum of
squares (two reads and writes of the image per step instead of ``W``); the
running sums are kept in float64 so that thousands of additions and
subtractions do not drift.  The reported value is the variance per pixel
(the formula above divided by the number of elements), which does not
change where the minimum is.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Callable, List, Optional, Sequence

import torch

__all__ = ["DiscrepancyRule", "EarlyStopState", "ReplayDecision", "WindowedVariance", "replay"]

#: ``residual_fn(window_mean) -> scalar tensor``: the data-term residual ``||y - A x||^2 / N``.
ResidualFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EarlyStopState:
    """Host copy of the tracker's state (see :meth:`WindowedVariance.read`)."""

    steps: int  # outputs seen so far
    best_step: Optional[int]  # 0-based step of the smallest variance so far (None before the window fills)
    variance: float  # variance of the current window (NaN before it fills)


class WindowedVariance:
    """Running variance of the last ``window`` outputs and the step where it was smallest.

    Args:
        like: a tensor shaped like one output (its shape and device are used).
        window: ``W``, the number of outputs in the window.
        patience: ``P``, how many steps without a new minimum end the run.

    After every step call :meth:`update` with the step's raw output;
    :attr:`best` then holds the mean of the window with the smallest
    variance and :attr:`best_step` the step that closed that window.
    """

    def __init__(self, like: torch.Tensor, window: int = 100, patience: int = 1000) -> None:
        if isinstance(window, bool) or int(window) != window or window < 2:
            raise ValueError(f"window must be an integer >= 2, got {window!r}")
        if isinstance(patience, bool) or int(patience) != patience or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        self.window = int(window)
        self.patience = int(patience)
        dev = like.device
        self.ring = torch.zeros((self.window,) + tuple(like.shape), dtype=torch.float32, device=dev)
        self.total = torch.zeros(like.shape, dtype=torch.float64, device=dev)
        self.total_sq = torch.zeros((), dtype=torch.float64, device=dev)
        self.count = torch.zeros((), dtype=torch.int64, device=dev)
        self.variance = torch.full((), float("nan"), dtype=torch.float64, device=dev)
        self.min_variance = torch.full((), float("inf"), dtype=torch.float64, device=dev)
        self.best_step = torch.full((), -1, dtype=torch.int64, device=dev)
        self.best = torch.zeros(like.shape, dtype=torch.float32, device=dev)
        self.residual = torch.full((), float("nan"), dtype=torch.float64, device=dev)
        self._elements = like.numel()

    @torch.no_grad()
    def update(self, out: torch.Tensor, residual_fn: Optional[ResidualFn] = None,
               bound: Optional[float] = None) -> None:
        """Push one step's output; if the window's variance hit a new minimum, keep the window's mean.

        With ``residual_fn`` and ``bound`` (the discrepancy gate, see
        :class:`DiscrepancyRule`), only windows whose mean explains the
        observation, ``residual_fn(mean) <= bound``, may become the best;
        :attr:`residual` holds the current window mean's residual.
        """
        x = out.detach().to(torch.float32)
        # Once the patience has run out the run is over, but the host learns it only at its next read
        # of the step log (up to sync_every steps later on a GPU): the choice is frozen so that those
        # extra steps cannot replace it, and every read interval returns what reading each step would.
        ended = (self.best_step >= 0) & (self.count - 1 - self.best_step >= self.patience)
        pos = torch.remainder(self.count, self.window).reshape(1)
        old = self.ring.index_select(0, pos)[0]
        self.ring.index_copy_(0, pos, x.unsqueeze(0))
        # Before the window is full the slot held zeros, so subtracting it is a no-op.
        x64, old64 = x.double(), old.double()
        self.total.add_(x64).sub_(old64)
        self.total_sq.add_(x64.square().sum() - old64.square().sum())
        self.count.add_(1)
        # sum ||x_i - mean||^2 = sum ||x_i||^2 - ||sum x_i||^2 / W
        spread = (self.total_sq - self.total.square().sum() / self.window).clamp_min(0.0)
        full = self.count >= self.window
        var = torch.where(full, spread / (self.window * self._elements), torch.full_like(spread, float("nan")))
        self.variance.copy_(var)
        improved = full & ~ended & (var < self.min_variance)
        mean = (self.total / self.window).to(torch.float32)
        if residual_fn is not None:
            res = residual_fn(mean).double()
            self.residual.copy_(torch.where(full, res, torch.full_like(res, float("nan"))))
            # A NaN residual compares False: a non-finite window is never admissible.
            improved = improved & (self.residual <= (math.inf if bound is None else bound))
        self.min_variance.copy_(torch.where(improved, var, self.min_variance))
        self.best_step.copy_(torch.where(improved, self.count - 1, self.best_step))
        self.best.copy_(torch.where(improved, mean, self.best))

    def read(self) -> EarlyStopState:
        """Copy the counters to the host (one synchronisation)."""
        count, best, var = torch.stack([self.count.double(), self.best_step.double(), self.variance]).tolist()
        return EarlyStopState(steps=int(count), best_step=int(best) if best >= 0 else None, variance=var)

    def should_stop(self, state: Optional[EarlyStopState] = None) -> bool:
        """True once ``patience`` steps have passed without a new minimum of the variance."""
        state = self.read() if state is None else state
        return state.best_step is not None and state.steps - 1 - state.best_step >= self.patience



# --------------------------------------------------------------------------
# The discrepancy gate: a window is accepted only once it explains the data
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscrepancyRule:
    """ES-WMV restricted to estimates that explain the observation down to its noise level.

    The variance of the outputs also has a minimum in the under-fitted early
    phase, when the outputs are still smooth and change slowly; ES-WMV alone
    then returns a blurred image, sometimes worse than its input.  The
    discrepancy principle (Morozov) rules that phase out: an estimate ``x``
    that has fitted the content leaves a residual ``||y - A x||^2 / N`` close
    to the noise variance ``sigma^2``, while an under-fitted one leaves the
    missing content on top of it.  So a window counts only once the residual
    of its mean is at most ``tolerance * sigma^2``; among such windows the
    one of smallest variance is kept, and the run stops ``patience`` steps
    after the last new minimum.  If no window is ever accepted (or the noise
    level is unknown or not finite), the rule *falls back*: the run goes on to
    its fixed step count and returns what a run without early stopping returns.

    Attributes:
        noise_var: ``sigma^2`` of the observation's noise, in ``[0, 1]``
            intensity units squared (``(sigma / 255) ** 2``).
        tolerance: the gate is ``residual <= tolerance * noise_var``.
        patience: steps without a new accepted minimum that end the run.
    """

    noise_var: Optional[float]
    tolerance: float = 1.05  # restore()'s setting, chosen on the benchmark's tuning runs
    patience: int = 500

    def __post_init__(self) -> None:
        if not (isinstance(self.tolerance, (int, float)) and math.isfinite(self.tolerance) and self.tolerance > 0):
            raise ValueError(f"tolerance must be a positive finite number, got {self.tolerance!r}")
        if isinstance(self.patience, bool) or int(self.patience) != self.patience or self.patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {self.patience!r}")

    @property
    def usable(self) -> bool:
        """False when the noise level cannot bound anything (unknown, zero or not finite): fall back."""
        return self.noise_var is not None and math.isfinite(self.noise_var) and self.noise_var > 0

    @property
    def bound(self) -> float:
        """The largest accepted residual (NaN when the rule is not usable, which accepts nothing)."""
        return self.tolerance * self.noise_var if self.usable else math.nan

    def admissible(self, residual: float) -> bool:
        """Whether a window mean with this residual explains the observation (NaN: never)."""
        return residual <= self.bound  # False for NaN on either side


@dataclass
class ReplayDecision:
    """What :func:`replay` decided on a logged run."""

    steps: int  # steps the run would take
    stop_step: Optional[int]  # step closing the returned window; None: the fixed-count result is returned
    reason: str  # 'plateau', 'budget_accepted', 'fallback'


def replay(variance: Sequence[Optional[float]], residual: Sequence[Optional[float]], rule: DiscrepancyRule,
           iterations: Optional[int] = None) -> ReplayDecision:
    """Run ``rule`` step by step over logged statistics, seeing only each step's prefix.

    ``variance[t]`` and ``residual[t]`` are the window variance and the
    residual of the window mean after step ``t`` (None or NaN before the
    window fills).  This is the host-side mirror of what :class:`WindowedVariance`
    and :func:`dip_fast.fit.fit` do on a live run, for tests and for tuning
    the rule on recorded trajectories.

    * ``'plateau'``: ``patience`` steps passed without a new accepted minimum;
      the run stops and returns the window closed at ``stop_step``.
    * ``'budget_accepted'``: the step budget ran out with an accepted window
      still the best: that window is returned.
    * ``'fallback'``: no window was ever accepted; the fixed-count result.
    """
    n = len(variance) if iterations is None else min(iterations, len(variance))
    if len(residual) < n:
        raise ValueError(f"residual has {len(residual)} entries, fewer than the {n} steps to replay")
    best: Optional[int] = None
    best_var = math.inf
    for t in range(n):
        v, r = variance[t], residual[t]
        v = math.nan if v is None else float(v)
        r = math.nan if r is None else float(r)
        if v < best_var and rule.admissible(r):  # NaN compares False
            best, best_var = t, v
        if best is not None and t - best >= rule.patience:
            return ReplayDecision(steps=t + 1, stop_step=best, reason="plateau")
    if best is None:
        return ReplayDecision(steps=n, stop_step=None, reason="fallback")
    return ReplayDecision(steps=n, stop_step=best, reason="budget_accepted")
