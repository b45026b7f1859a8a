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
minimum early on, while the outputs are still smooth.  What ``restore``
uses instead is :class:`DiscrepancyRule`, the discrepancy principle
(Morozov) applied to the running average that a fixed-count run returns:
the run stops at the first step whose average explains the observation
down to its noise level, ``||y - A x||^2 / N <= tolerance * sigma^2``.
An estimate that still misses content leaves that content in the residual
on top of the noise, so it is refused however stable the outputs are.
:class:`DiscrepancyTracker` is its device-side tracker and :func:`replay`
its host-side mirror over recorded residuals, which is how
``bench/es_replay.py`` tunes and validates it.

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

import copy
from dataclasses import dataclass
import math
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["DiscrepancyRule", "DiscrepancyTracker", "EarlyStopState", "ReplayDecision", "WindowedVariance", "replay"]

#: ``residual_fn(estimate) -> tensor``: the data-term residual ``||y - A x||^2 / N`` (per network: ``(K,)``).
ResidualFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EarlyStopState:
    """Host copy of the tracker's state (see :meth:`WindowedVariance.read`)."""

    steps: int  # outputs seen so far
    best_step: Optional[int]  # 0-based step of the estimate kept so far (None: none yet)
    variance: float  # ES-WMV: variance of the current window (NaN before it fills, and for the discrepancy rule)


def _per_network(like: torch.Tensor, networks: int) -> Tuple[int, ...]:
    """The shape that broadcasts a per-network value ``(K,)`` against a tensor shaped like ``like``."""
    if isinstance(networks, bool) or not isinstance(networks, int) or networks < 1:
        raise ValueError(f"networks must be an integer >= 1, got {networks!r}")
    if networks == 1:
        return (1,) * max(like.dim(), 1)
    if like.dim() == 0 or like.shape[0] != networks:
        raise ValueError(f"with networks={networks} the outputs must have {networks} rows, got {tuple(like.shape)}")
    return (networks,) + (1,) * (like.dim() - 1)


def _select_networks(tracker: Any, keep: torch.Tensor, dims: Optional[dict] = None) -> Any:
    """A copy of ``tracker`` that follows networks ``keep`` (``(k,)`` indices) only, their state kept.

    Every per-network tensor is indexed along its network dimension (0, or
    ``dims[name]``); the step count is shared by all networks and copied.
    """
    new = copy.copy(tracker)
    new.networks = int(keep.numel())
    new._bshape = (new.networks,) + tuple(tracker._bshape[1:])
    for name, value in vars(tracker).items():
        if isinstance(value, torch.Tensor):
            dim = (dims or {}).get(name, 0)
            setattr(new, name, value.clone() if value.dim() == 0 else value.index_select(dim, keep))
    return new


class WindowedVariance:
    """Running variance of the last ``window`` outputs and the step where it was smallest.

    Args:
        like: a tensor shaped like one output (its shape and device are used).
        window: ``W``, the number of outputs in the window.
        patience: ``P``, how many steps without a new minimum end the run.
        networks: ``K`` networks trained in one step (:mod:`dip_fast.core.packed`):
            ``like`` then has ``K`` rows, one per network, and every
            statistic is per network (shape ``(K,)``; ``(1,)`` for one network).

    After every step call :meth:`update` with the step's raw output;
    :attr:`best` then holds the mean of the window with the smallest
    variance and :attr:`best_step` the step that closed that window.
    """

    def __init__(self, like: torch.Tensor, window: int = 100, patience: int = 1000, networks: int = 1) -> None:
        if isinstance(window, bool) or int(window) != window or window < 2:
            raise ValueError(f"window must be an integer >= 2, got {window!r}")
        if isinstance(patience, bool) or int(patience) != patience or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        self.window = int(window)
        self.patience = int(patience)
        self.networks = networks
        self._bshape = _per_network(like, networks)
        dev = like.device
        k = (networks,)
        self.ring = torch.zeros((self.window,) + tuple(like.shape), dtype=torch.float32, device=dev)
        self.total = torch.zeros(like.shape, dtype=torch.float64, device=dev)
        self.total_sq = torch.zeros(k, dtype=torch.float64, device=dev)
        self.count = torch.zeros((), dtype=torch.int64, device=dev)
        self.variance = torch.full(k, float("nan"), dtype=torch.float64, device=dev)
        self.min_variance = torch.full(k, float("inf"), dtype=torch.float64, device=dev)
        self.best_step = torch.full(k, -1, dtype=torch.int64, device=dev)
        self.best = torch.zeros(like.shape, dtype=torch.float32, device=dev)
        self.residual = torch.full(k, float("nan"), dtype=torch.float64, device=dev)  # not measured by ES-WMV
        self._elements = like.numel() // networks

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """Per-network sum: ``(K,)``."""
        return t.reshape(self.networks, -1).sum(1)

    @property
    def fired(self) -> torch.Tensor:
        """``(K,)`` bool: the patience has run out (the network's choice is final)."""
        return (self.best_step >= 0) & (self.count - 1 - self.best_step >= self.patience)

    @torch.no_grad()
    def update(self, out: torch.Tensor, average: Optional[torch.Tensor] = None,
               residual_fn: Optional[ResidualFn] = None) -> None:
        """Push one step's raw output; if the window's variance hit a new minimum, keep the window's mean.

        ``average`` and ``residual_fn`` are not used: ES-WMV looks at the raw
        outputs only (the signature is the one every stop tracker has).
        """
        x = out.detach().to(torch.float32)
        # Once the patience has run out the run is over, but the host learns it only at its next read
        # of the step log (up to sync_every steps later on a GPU): the choice is frozen so that those
        # extra steps cannot replace it, and every read interval returns what reading each step would.
        ended = self.fired
        pos = torch.remainder(self.count, self.window).reshape(1)
        old = self.ring.index_select(0, pos)[0]
        self.ring.index_copy_(0, pos, x.unsqueeze(0))
        # Before the window is full the slot held zeros, so subtracting it is a no-op.
        x64, old64 = x.double(), old.double()
        self.total.add_(x64).sub_(old64)
        self.total_sq.add_(self._sum(x64.square()) - self._sum(old64.square()))
        self.count.add_(1)
        # sum ||x_i - mean||^2 = sum ||x_i||^2 - ||sum x_i||^2 / W
        spread = (self.total_sq - self._sum(self.total.square()) / self.window).clamp_min(0.0)
        full = self.count >= self.window
        var = torch.where(full, spread / (self.window * self._elements), torch.full_like(spread, float("nan")))
        self.variance.copy_(var)
        improved = full & ~ended & (var < self.min_variance)
        mean = (self.total / self.window).to(torch.float32)
        self.min_variance.copy_(torch.where(improved, var, self.min_variance))
        self.best_step.copy_(torch.where(improved, self.count - 1, self.best_step))
        self.best.copy_(torch.where(improved.reshape(self._bshape), mean, self.best))

    def select(self, keep: torch.Tensor) -> "WindowedVariance":
        """This tracker for networks ``keep`` only (a packed run that dropped its stopped networks)."""
        return _select_networks(self, keep, {"ring": 1})

    def read_all(self) -> List[EarlyStopState]:
        """Copy the counters to the host (one synchronisation): one state per network."""
        count = self.count.double().expand(self.networks)
        rows = torch.stack([count, self.best_step.double(), self.variance], dim=1).tolist()
        return [EarlyStopState(steps=int(c), best_step=int(b) if b >= 0 else None, variance=v) for c, b, v in rows]

    def read(self) -> EarlyStopState:
        """:meth:`read_all` of the first (or only) network."""
        return self.read_all()[0]

    def should_stop(self, state: Optional[EarlyStopState] = None) -> bool:
        """True once ``patience`` steps have passed without a new minimum of the variance."""
        state = self.read() if state is None else state
        return state.best_step is not None and state.steps - 1 - state.best_step >= self.patience


# --------------------------------------------------------------------------
# The discrepancy principle: stop once the average explains the data
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscrepancyRule:
    """Stop at the first step whose running average explains the observation down to its noise level.

    Deep Image Prior fits the image content first and the noise later, so
    the residual ``||y - A x||^2 / N`` of its estimate falls towards the noise
    variance ``sigma^2`` while the content is being fitted, and below it once
    the noise is.  The discrepancy principle (Morozov) stops an iterative
    method at the first iterate whose residual reaches
    ``tolerance * sigma^2``: earlier, content is still missing; later, noise
    is being fitted.  The rule watches the exponential average (what a
    fixed-count run returns), whose residual falls smoothly, and returns
    that average at the stopping step.

    What it guarantees: the returned estimate explains the observation to
    ``tolerance * sigma^2``, so an under-fitted, smooth phase of the run can
    never be returned however stable it is.  What it does not: it relies on
    ``sigma``; an estimate of ``sigma`` that is too high (texture mistaken
    for noise) stops early, one too low runs to the step budget.  When no
    step qualifies (the budget ends first, or the noise level is unknown,
    zero or not finite) the rule *falls back*: the run completes and returns
    what ``stop='never'`` returns.

    Attributes:
        noise_var: ``sigma^2`` of the observation's noise, in ``[0, 1]``
            intensity units squared (``(sigma / 255) ** 2``).
        tolerance: stop once ``residual <= tolerance * noise_var``.

    Example:
        >>> rule = DiscrepancyRule(noise_var=(25 / 255) ** 2)
        >>> rule.admissible(0.9 * rule.noise_var), rule.admissible(1.2 * rule.noise_var)
        (True, False)
        >>> replay([0.03, 0.02, 0.009, 0.008], DiscrepancyRule(noise_var=0.01)).stop_step
        2
    """

    noise_var: Optional[float]
    tolerance: float = 1.0  # restore()'s setting, chosen on the benchmark's tuning runs

    def __post_init__(self) -> None:
        if not (isinstance(self.tolerance, (int, float)) and math.isfinite(self.tolerance) and self.tolerance > 0):
            raise ValueError(f"tolerance must be a positive finite number, got {self.tolerance!r}")

    @property
    def usable(self) -> bool:
        """False when the noise level cannot bound anything (unknown, zero or not finite): fall back."""
        return self.noise_var is not None and math.isfinite(self.noise_var) and self.noise_var > 0

    @property
    def bound(self) -> float:
        """The largest accepted residual (NaN when the rule is not usable, which accepts nothing)."""
        return self.tolerance * self.noise_var if self.usable else math.nan

    def admissible(self, residual: Optional[float]) -> bool:
        """Whether an estimate with this residual explains the observation (NaN or None: never)."""
        return residual is not None and residual <= self.bound  # False for NaN on either side


class DiscrepancyTracker:
    """The device side of :class:`DiscrepancyRule`: remembers the first estimate within ``bound``.

    Args:
        like: a tensor shaped like one output (its shape and device are used).
        bound: the largest accepted residual (:attr:`DiscrepancyRule.bound`;
            NaN accepts nothing); a sequence of ``K`` bounds for ``K`` networks.
        networks: ``K`` networks trained in one step, as for
            :class:`WindowedVariance`; ``residual_fn`` then returns ``(K,)``.

    After every step call :meth:`update`; once a step's estimate qualifies,
    :attr:`best_step` holds that step and :attr:`best` the estimate, and
    later steps change neither (the host may read a few steps late).
    """

    def __init__(self, like: torch.Tensor, bound: Union[float, Sequence[float]], networks: int = 1) -> None:
        self.networks = networks
        self._bshape = _per_network(like, networks)
        dev = like.device
        k = (networks,)
        bounds = [float(b) for b in bound] if isinstance(bound, (list, tuple)) else [float(bound)] * networks
        if len(bounds) != networks:
            raise ValueError(f"bound has {len(bounds)} entries for {networks} networks")
        self.bound = torch.tensor(bounds, dtype=torch.float64, device=dev)
        self.count = torch.zeros((), dtype=torch.int64, device=dev)
        self.best_step = torch.full(k, -1, dtype=torch.int64, device=dev)
        self.best = torch.zeros(like.shape, dtype=torch.float32, device=dev)
        self.residual = torch.full(k, float("nan"), dtype=torch.float64, device=dev)
        self.variance = torch.full(k, float("nan"), dtype=torch.float64, device=dev)  # not measured by this rule

    @property
    def fired(self) -> torch.Tensor:
        """``(K,)`` bool: the network's estimate has been accepted."""
        return self.best_step >= 0

    @torch.no_grad()
    def update(self, out: torch.Tensor, average: Optional[torch.Tensor] = None,
               residual_fn: Optional[ResidualFn] = None) -> None:
        """Measure the step's estimate (``average``, else ``out``) and keep it if it is the first within the bound."""
        if residual_fn is None:
            raise ValueError("the discrepancy rule needs residual_fn")
        estimate = (average if average is not None else out).detach().to(torch.float32)
        self.residual.copy_(residual_fn(estimate).double().reshape(self.networks))
        # A NaN residual compares False: a non-finite estimate never qualifies.
        first = (self.best_step < 0) & (self.residual <= self.bound)
        self.best_step.copy_(torch.where(first, self.count, self.best_step))
        self.best.copy_(torch.where(first.reshape(self._bshape), estimate, self.best))
        self.count.add_(1)

    def select(self, keep: torch.Tensor) -> "DiscrepancyTracker":
        """This tracker for networks ``keep`` only (a packed run that dropped its stopped networks)."""
        return _select_networks(self, keep)

    def read_all(self) -> List[EarlyStopState]:
        """Copy the counters to the host (one synchronisation): one state per network."""
        count = int(self.count)
        return [EarlyStopState(steps=count, best_step=int(b) if b >= 0 else None, variance=math.nan)
                for b in self.best_step.tolist()]

    def read(self) -> EarlyStopState:
        """:meth:`read_all` of the first (or only) network."""
        return self.read_all()[0]

    def should_stop(self, state: Optional[EarlyStopState] = None) -> bool:
        """True once some step's estimate explained the observation."""
        state = self.read() if state is None else state
        return state.best_step is not None


@dataclass
class ReplayDecision:
    """What :func:`replay` decided on a logged run."""

    steps: int  # steps the run would take
    stop_step: Optional[int]  # the step whose average is returned; None: the run's last average (fallback)
    reason: str  # 'discrepancy' or 'fallback'


def replay(residual: Sequence[Optional[float]], rule: DiscrepancyRule,
           iterations: Optional[int] = None) -> ReplayDecision:
    """Run ``rule`` over logged residuals of the running average, as a live run would.

    ``residual[t]`` is ``||y - A x_t||^2 / N`` of the average after step
    ``t`` (None or NaN where unknown).  This is the host-side mirror of
    :class:`DiscrepancyTracker` inside :func:`dip_fast.core.fit.fit`, for tests
    and for tuning the rule on recorded trajectories; ``iterations`` caps
    the steps (default: all of them).

    * ``'discrepancy'``: step ``stop_step`` explained the observation; the
      run stops there and returns that step's average.
    * ``'fallback'``: no step did; the run completes.
    """
    n = len(residual) if iterations is None else min(iterations, len(residual))
    for t in range(n):
        if rule.admissible(residual[t]):
            return ReplayDecision(steps=t + 1, stop_step=t, reason="discrepancy")
    return ReplayDecision(steps=n, stop_step=None, reason="fallback")
