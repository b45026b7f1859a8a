"""The Deep Image Prior optimisation loop, independent of task and backend.

Deep Image Prior fits a randomly initialised generator ``f_theta`` to one
degraded image: ``min_theta E(f_theta(z); x0)`` by Adam, where ``E`` is the
task's data term (``loss_fn``) and ``z`` a fixed input.  This module
reproduces the loop of the paper's notebooks:

* **Input-noise regularisation**: every step feeds
  ``z + reg_noise_std * N(0, 1)`` with fresh noise (the notebooks'
  ``reg_noise_std``).
* **Exponential averaging** of the outputs,
  ``avg <- exp_weight * avg + (1 - exp_weight) * out`` (denoising notebook,
  0.99), starting from the first output.
* **Backtracking** (denoising and restoration notebooks): at *check steps*
  the PSNR of the step's output against the degraded observation is
  compared with the PSNR at the last accepted check; if it fell by more than
  ``backtrack_threshold_db`` (5 dB) the parameters are restored from the
  snapshot taken at that check and this step's update is skipped; otherwise
  the current parameters (the ones that produced this output) are
  snapshotted.

Which steps are check steps (``check_mode``)
-------------------------------------------
The two notebooks disagree.  ``restoration.ipynb`` checks when
``i % show_every == 0`` (every 50 steps).  ``denoising.ipynb`` writes
``if i % show_every:``, which is true for every ``i`` that is *not* a
multiple of ``show_every``: it compares consecutive steps almost every
step and skips exactly the multiples of 100 (clearly unintended, but that
is what produced the published denoising results).  Both are available:

* ``check_mode='periodic'`` (default): check when ``step % check_every == 0``
  -- the intended meaning of "check every N steps", and the restoration
  notebook's behaviour;
* ``check_mode='off_period'``: check when ``step % check_every != 0`` -- the
  denoising notebook's literal behaviour (the denoising presets in
  :mod:`dip_fast.tasks` use it to stay faithful).

Further choices, where the notebooks are accidental rather than deliberate:

* After a restore the notebooks still call ``optimizer.step()`` with the
  gradient of the diverged weights (``return total_loss * 0`` does not clear
  ``.grad``); here the update is undone, so a backtracked step leaves the
  parameters exactly at the snapshot.  Adam's moment estimates keep that
  step's gradient (the notebooks do not restore them either).
* The notebooks do not advance their counter ``i`` on a backtracked step but
  still spend an iteration of the budget; here ``step`` counts loop
  iterations, so check steps stay on a fixed grid.
* The averaged output includes the output of a backtracked step (the
  notebook updates the average before the check).
* A NaN PSNR counts as a drop (and is never snapshotted).
* PSNR under a ``mask`` is averaged over known pixels; the restoration
  notebook averaged over all pixels after zeroing unknown ones, which
  shifts every value by the same constant and so triggers identically.
* BatchNorm runs in training mode throughout, as in the paper (``net.train()``
  is called); the returned ``output`` is a final no-grad forward of the
  final weights on the *unperturbed* input.

Host synchronisation
--------------------
The step itself (:class:`dip_fast.core.step.StepRunner`) keeps the average, the
backtracking decision and the early-stopping tracker on the device and
writes each step's numbers into a log there.  ``fit`` reads that log every
``sync_every`` steps (default: every step on the CPU, where reading costs
nothing, and every 50 steps on CUDA), fills the histories, calls
``callback`` and decides whether to stop.  ``max_time`` and ``should_stop``
are polled every step (they need no device value); ``psnr_target`` and
early stopping act at the next read, so a run may go up to
``sync_every - 1`` steps past the point where they fired (the early-stopped
estimate is the one of the detected step regardless: the device tracker
stops accepting new windows once its patience has run out).

Early stopping (``stop='auto'`` or ``'discrepancy'``)
---------------------------------------------------
``'auto'`` is ES-WMV (:mod:`dip_fast.core.early_stop`), the rule of Wang et al.:
the run ends once the variance of the last ``stop_window`` outputs has not
reached a new minimum for ``stop_patience`` steps; ``stop_output`` holds
the mean of the outputs in the window of smallest variance, and
``stop_step`` the step that closed it.

``'discrepancy'`` is :class:`~dip_fast.core.early_stop.DiscrepancyRule`, what
``restore(stop='early')`` runs: the run ends at the first step whose running
average (the output when ``exp_weight`` is None) leaves a data-term residual
of at most ``stop_bound``; ``stop_output`` is that average.  If no step
qualifies, the run completes as with ``stop='never'``.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch
import torch.nn as nn

from . import auto_step
from .early_stop import EarlyStopState
from .host_memory import reuse_on
from .packed import write_networks
from .step import STAT_FIELDS, STEP_MODES, StepRunner, StepSettings, precision_settings

__all__ = [
    "CHECK_MODES",
    "STOP_MODES",
    "FitResult",
    "FitSettings",
    "StepInfo",
    "fit",
    "fit_packed",
    "is_check_step",
]

CHECK_MODES = ("periodic", "off_period")
STOP_MODES = ("never", "auto", "discrepancy")
#: Steps between host reads of the step log on CUDA (``sync_every``'s default there).
CUDA_SYNC_EVERY = 50

LossFn = Callable[[torch.Tensor], torch.Tensor]

_COL = {name: i for i, name in enumerate(STAT_FIELDS)}


def is_check_step(step: int, check_every: int, check_mode: str = "periodic") -> bool:
    """Whether ``step`` (0-based) is a backtracking check step; see the module docstring."""
    if check_mode == "periodic":
        return step % check_every == 0
    if check_mode == "off_period":
        return step % check_every != 0
    raise ValueError(f"check_mode must be one of {CHECK_MODES}, got {check_mode!r}")


@dataclass
class StepInfo:
    """Passed to ``fit``'s ``callback`` each time the step log is read (every ``sync_every`` steps).

    ``out`` and ``out_avg`` are copies of the latest step's output and
    average; the other values belong to that step too.
    """

    step: int
    loss: float
    out: torch.Tensor
    out_avg: Optional[torch.Tensor]
    psnr: Optional[float]
    psnr_ref: Optional[float]
    backtracked: bool
    elapsed: float
    net: nn.Module
    psnr_ref_avg: Optional[float] = None
    variance: Optional[float] = None  # early stopping: the window's variance (NaN until it fills)
    residual: Optional[float] = None  # early stopping: ||y - A mean||^2 / N of the window's mean
    stop_step: Optional[int] = None  # early stopping: the best accepted window so far
    network: int = 0  # which network of a packed run (fit_packed calls back once per network)


@dataclass
class FitResult:
    """Outcome of :func:`fit`.

    Attributes:
        output: final image (no-grad forward of the final weights on the
            unperturbed input), detached.
        output_avg: exponentially averaged step outputs, or None when
            ``exp_weight`` is None or no step ran.
        loss_history: data-term value of every step.
        psnr_history: PSNR of every step's (degraded) output against the
            observation; empty without an observation.
        psnr_ref_history: PSNR of every step's output against ``reference``.
        psnr_ref_avg_history: same for the averaged output.
        variance_history: ES-WMV window variance of every step (NaN until
            the window is full, and for ``stop='discrepancy'``); empty when
            ``stop='never'``.
        residual_history: residual ``mse(degrade(average), observation)``
            of every step's average for ``stop='discrepancy'``; NaN for
            ``'auto'``, empty for ``'never'``.
        backtrack_steps: steps at which the parameters were restored.
        steps: number of completed steps.
        wall_time: seconds spent in :func:`fit`.
        interrupted: the loop stopped early because of Ctrl-C, ``max_time``
            or ``should_stop``.
        stop_reason: ``'completed'``, ``'early_stop'``, ``'psnr_target'``,
            ``'max_time'``, ``'should_stop'`` or ``'keyboard_interrupt'``.
        stop_step: the step detected by early stopping, or None when it did
            not fire.
        stop_output: what early stopping returns: ES-WMV's window mean, or
            the discrepancy rule's average at ``stop_step`` (None when it did
            not fire).
        stop_residual: the residual of ``stop_output`` (None when it did not fire).
        step_mode: ``'eager'`` or ``'graph'``: how the steps actually ran.
    """

    output: torch.Tensor
    output_avg: Optional[torch.Tensor]
    loss_history: List[float] = field(default_factory=list)
    psnr_history: List[float] = field(default_factory=list)
    psnr_ref_history: List[float] = field(default_factory=list)
    psnr_ref_avg_history: List[float] = field(default_factory=list)
    variance_history: List[float] = field(default_factory=list)
    residual_history: List[float] = field(default_factory=list)
    backtrack_steps: List[int] = field(default_factory=list)
    steps: int = 0
    wall_time: float = 0.0
    interrupted: bool = False
    stop_reason: str = "completed"
    stop_step: Optional[int] = None
    stop_output: Optional[torch.Tensor] = None
    stop_residual: Optional[float] = None
    step_mode: str = "eager"


def _resolve_step_mode(step_mode: str, device: torch.device, precision: str) -> str:
    if step_mode not in STEP_MODES + ("auto",):
        raise ValueError(f"step_mode must be one of {STEP_MODES + ('auto',)}, got {step_mode!r}")
    # 'graph' becomes the CUDA default only once a GPU run has recorded its parity with eager.
    if step_mode == "auto":
        return auto_step.choose(device, "auto", precision)[0]
    if step_mode == "graph" and device.type != "cuda":
        warnings.warn(
            f"dip_fast: step_mode='graph' needs a CUDA device, the run is on {device}; running the step eagerly",
            RuntimeWarning,
            stacklevel=3,
        )
        return "eager"
    return step_mode


@dataclass(frozen=True)
class FitSettings:
    """Everything :func:`fit` and :func:`fit_packed` take besides the network, its input and the data term.

    ``fit(net, z, loss, **settings)`` builds one from its keywords, so a
    caller passes them as before; a settings object can also be built once,
    checked, and reused with ``dataclasses.replace``.

    Attributes:
        iterations: maximum number of steps.
        lr: Adam learning rate.
        reg_noise_std: std of the fresh input perturbation each step.
        exp_weight: weight of the running average of outputs (None: off).
        observation: the degraded image, for PSNR logging and backtracking.
        mask: known-pixel mask (broadcastable to the observation); PSNR is
            then over known pixels only.
        degrade: maps the output to observation space before the PSNR (e.g.
            the super-resolution downsampler); identity when None.
        reference: optional clean image; PSNR against it is logged.
        reference_view: maps an output to ``reference``'s frame (e.g. a crop)
            before that PSNR; identity when None.
        backtrack: enable backtracking (needs ``observation``).
        check_every, check_mode: which steps are check steps (see the module
            docstring).
        backtrack_threshold_db: PSNR drop that triggers a restore.
        psnr_target: stop (``stop_reason='psnr_target'``) once a step's PSNR
            against ``reference`` -- or against the observation when there
            is no reference -- reaches this value.
        stop: ``'never'``, ``'auto'`` (ES-WMV) or ``'discrepancy'`` (see the
            module docstring).
        stop_window, stop_patience: ES-WMV's window ``W`` and patience ``P``.
        stop_bound: the discrepancy rule's bound
            (:attr:`dip_fast.core.early_stop.DiscrepancyRule.bound`): the run stops
            at the first step whose average leaves a residual
            ``mse(degrade(average), observation) <= stop_bound``; NaN accepts
            none, so the run completes (the rule's fallback).  Required by,
            and only used with, ``stop='discrepancy'``; needs ``observation``.
        callback: called with a :class:`StepInfo` each time the step log is
            read; raising ``KeyboardInterrupt`` there stops the loop like Ctrl-C.
        should_stop: polled before every step; True stops the loop.
        generator: ``torch.Generator`` for the input perturbation.
        max_time: wall-clock budget in seconds, checked before every step.
        optimizer: custom optimizer over ``net``'s parameters (default Adam).
        step_mode: ``'eager'``, ``'graph'`` (one CUDA graph per step, CUDA
            only; elsewhere a warning and eager) or ``'auto'`` (the fastest mode
            recorded with parity at this precision in
            :data:`dip_fast.core.auto_step.RECORDED_PARITY`; eager until then).
        precision: ``'fp32'``, ``'tf32'`` or ``'bf16'`` (see :mod:`dip_fast.core.step`).
        sync_every: steps between reads of the step log (default 1 on the
            CPU, 50 on CUDA).
        networks: the number of networks ``net`` packs (see :func:`fit_packed`).
        repack: drop the networks of a packed run that have stopped from its
            step (see :func:`fit_packed`); False keeps them in it, frozen.

    Raises:
        ValueError: a setting out of its range (checked when the object is built).

    Example::

        >>> FitSettings(iterations=100, lr=0.02, backtrack=False).check_every
        100
        >>> FitSettings(iterations=-1)
        Traceback (most recent call last):
        ...
        ValueError: iterations must be >= 0, got -1
    """

    iterations: int
    lr: float = 0.01
    reg_noise_std: float = 0.0
    exp_weight: Optional[float] = 0.99
    observation: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    degrade: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    reference: Optional[torch.Tensor] = None
    reference_view: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    backtrack: bool = True
    check_every: int = 100
    check_mode: str = "periodic"
    backtrack_threshold_db: float = 5.0
    psnr_target: Optional[float] = None
    stop: str = "never"
    stop_window: int = 100
    stop_patience: int = 1000
    stop_bound: Optional[float] = None
    callback: Optional[Callable[[StepInfo], None]] = None
    should_stop: Optional[Callable[[], bool]] = None
    generator: Optional[torch.Generator] = None
    max_time: Optional[float] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    step_mode: str = "eager"
    precision: str = "fp32"
    sync_every: Optional[int] = None
    networks: int = 1
    repack: bool = True

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations!r}")
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {self.check_every!r}")
        if self.check_mode not in CHECK_MODES:
            raise ValueError(f"check_mode must be one of {CHECK_MODES}, got {self.check_mode!r}")
        if self.exp_weight is not None and not 0.0 <= self.exp_weight <= 1.0:
            raise ValueError(f"exp_weight must be in [0, 1] or None, got {self.exp_weight!r}")
        if self.backtrack and self.observation is None:
            raise ValueError("backtrack=True needs an observation to measure the PSNR against")
        if self.psnr_target is not None and self.observation is None and self.reference is None:
            raise ValueError("psnr_target needs a reference or an observation")
        if self.stop not in STOP_MODES:
            raise ValueError(f"stop must be one of {STOP_MODES}, got {self.stop!r}")
        if self.stop == "discrepancy" and (self.stop_bound is None or self.observation is None):
            raise ValueError("stop='discrepancy' needs stop_bound and an observation to measure the residual against")
        if self.sync_every is not None and self.sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {self.sync_every!r}")


def _fit(net: nn.Module, net_input: torch.Tensor, loss_fn: LossFn, s: FitSettings) -> List[FitResult]:
    """The DIP loop of :func:`fit` and :func:`fit_packed`: one :class:`FitResult` per network."""
    device = net_input.device
    sync_every = s.sync_every if s.sync_every is not None else (CUDA_SYNC_EVERY if device.type == "cuda" else 1)
    mode = _resolve_step_mode(s.step_mode, device, s.precision)

    t0 = time.perf_counter()
    net.train()
    with precision_settings(s.precision), reuse_on(device):  # the CPU's freed buffers serve the next step
        loop = _Loop(_step_runner(net, net_input, loss_fn, s, mode, verify_graph=True), s.iterations, sync_every,
                     t0, repack=s.repack)
        # Not held here: a pack that drops stopped networks frees the larger runner it replaces.
        results = loop.run(
            check=(lambda i: is_check_step(i, s.check_every, s.check_mode)) if s.backtrack else (lambda i: False),
            psnr_target=s.psnr_target, callback=s.callback, should_stop=s.should_stop, max_time=s.max_time,
        )
    if results[0].output.is_cuda:
        # Asynchronous kernels must finish for the wall time to mean anything.
        torch.cuda.synchronize(results[0].output.device)
    for result in results:
        result.wall_time = time.perf_counter() - t0
    return results


def _step_runner(net: nn.Module, net_input: torch.Tensor, loss_fn: LossFn, s: FitSettings, mode: str,
                 verify_graph: bool) -> StepRunner:
    """The step of a fit with settings ``s`` and step mode ``mode``."""
    return StepRunner(net, net_input, loss_fn, StepSettings(
        lr=s.lr, reg_noise_std=s.reg_noise_std, generator=s.generator, optimizer=s.optimizer,
        exp_weight=s.exp_weight, observation=s.observation, degrade=s.degrade, mask=s.mask, reference=s.reference,
        reference_view=s.reference_view, backtrack_threshold_db=s.backtrack_threshold_db if s.backtrack else None,
        early_stop=(s.stop_window, s.stop_patience) if s.stop == "auto" else None,
        stop_bound=s.stop_bound if s.stop == "discrepancy" else None, precision=s.precision, mode=mode,
        networks=s.networks, verify_graph=verify_graph,
    ))


def timing_runner(net: nn.Module, net_input: torch.Tensor, loss_fn: LossFn, *, step_mode: str = "eager",
                  precision: str = "fp32", networks: int = 1, **settings: Any) -> Callable[[], None]:
    """One step of the run :func:`fit` would make of these arguments, as a function (for timing candidates).

    Takes :class:`FitSettings`' fields; those of the loop (``iterations``,
    ``callback``, ``max_time``, ...) do not matter. The step mode is taken
    as given (no fallback warning): a graph on a device without CUDA raises.
    """
    s = FitSettings(**{"iterations": 0, **settings, "step_mode": step_mode, "precision": precision,
                       "networks": networks})
    runner = _step_runner(net, net_input, loss_fn, s, step_mode, verify_graph=False)
    net.train()

    def step() -> None:
        with precision_settings(precision):
            runner.step(False)

    return step


def fit(net: nn.Module, net_input: torch.Tensor, loss_fn: LossFn, **settings: Any) -> FitResult:
    """Fit ``net`` so that ``loss_fn(net(net_input))`` is small: the DIP loop (see the module docstring).

    Args:
        net: generator network (put in training mode; its parameters are
            optimised in place).
        net_input: fixed input ``z``, shape ``(1, C, H, W)``.
        loss_fn: data term, ``loss_fn(out) -> scalar tensor``.
        **settings: the fields of :class:`FitSettings` (``iterations`` is
            required), less ``networks`` and ``repack``, which are
            :func:`fit_packed`'s.

    Returns:
        A :class:`FitResult`. Ctrl-C (``KeyboardInterrupt``) during the loop
        does not propagate: the result so far comes back with ``interrupted=True``.

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Sigmoid())
        >>> result = fit(net, torch.rand(1, 2, 8, 8), lambda out: out.square().mean(), iterations=3, backtrack=False)
        >>> result.steps, len(result.loss_history)
        (3, 3)
    """
    for name in _PACKED_ONLY:
        if name in settings:
            raise TypeError(f"fit() runs one network; {name}= is fit_packed()'s")
    return _fit(net, net_input, loss_fn, FitSettings(**settings))[0]


#: FitSettings' fields that only a packed run uses (fit() refuses them).
_PACKED_ONLY = ("networks", "repack")


def fit_packed(net: nn.Module, net_input: torch.Tensor, loss_fn: LossFn, *, networks: int,
               **settings: Any) -> List[FitResult]:
    """:func:`fit` for ``K = networks`` networks packed in ``net`` (:mod:`dip_fast.core.packed`), trained in one step.

    ``net_input`` is ``(1, K * C, H, W)`` (the networks' inputs concatenated
    along channels); ``loss_fn`` gets the ``K`` outputs ``(K, C, H, W)`` and
    returns the ``(K,)`` data terms.  ``observation``, ``mask`` and
    ``reference`` have ``K`` rows; ``generator`` may be ``K`` generators
    (one per network, for runs that equal separate ones); ``stop_bound``
    may be ``K`` bounds.  Everything else is :func:`fit`'s, applied per
    network: averaging, backtracking (a drop restores only that network's
    weights), early stopping (a network that stops is frozen while the
    others go on, and with ``repack=True``, the default, dropped from the
    step so that it no longer costs compute; the loop ends when all have
    stopped), ``psnr_target``
    (the loop ends when all have reached it) and the histories, which end
    where the network stopped, as a run alone would.  ``callback`` is called
    once per running network at each read, with ``StepInfo.network`` set.

    Returns:
        ``K`` :class:`FitResult` objects, network ``k``'s at index ``k``.
    """
    return _fit(net, net_input, loss_fn, FitSettings(networks=networks, **settings))


class _Loop:
    """The host side of :func:`fit`: runs steps, logs their stats on the device, reads them back in batches.

    One :class:`FitResult` per network of the runner (one, unless the
    network is packed); the loop ends when ``iterations`` are done, when
    every network's early stopping (or ``psnr_target``) has fired, or on an
    interruption.  With ``repack``, networks whose early stopping fired are
    dropped from the runner at the read that learns it
    (:meth:`StepRunner.select`): their results are final then.
    """

    def __init__(self, runner: StepRunner, iterations: int, sync_every: int, t0: float, repack: bool) -> None:
        self.runner, self.iterations, self.sync_every, self.t0 = runner, iterations, sync_every, t0
        self.repack = repack and runner.networks > 1
        k = runner.networks
        self.rows = list(range(k))  # the network of each of the runner's rows
        self.home = runner.net  # the caller's module, trained in place (written back after a narrowing)
        self.log = torch.empty((min(sync_every, max(iterations, 1)), k, len(STAT_FIELDS)), device=runner.device)
        self.pending = 0  # rows of the log not read yet
        self.results = [FitResult(output=runner.net_input.new_empty(0), output_avg=None) for _ in range(k)]
        self.done = [False] * k  # early stopping or the PSNR target fired for this network
        self.track_observation = runner.observation is not None
        self.track_reference = runner.reference is not None

    def run(self, *, check: Callable[[int], bool], psnr_target: Optional[float],
            callback: Optional[Callable[[StepInfo], None]], should_stop: Optional[Callable[[], bool]],
            max_time: Optional[float]) -> List[FitResult]:
        results = self.results
        reason = None
        # True while parameters are being written (update or restore): an
        # interrupt then may leave them half-written, so the final forward is
        # not trusted and the output of the step being applied is returned.
        writing = False
        try:
            for step in range(self.iterations):
                if max_time is not None and time.perf_counter() - self.t0 >= max_time:
                    reason = "max_time"
                    break
                if should_stop is not None and should_stop():
                    reason = "should_stop"
                    break
                writing = True
                self.runner.step(check(step))
                writing = False
                self.log[self.pending].copy_(self.runner.stats)
                self.pending += 1
                if self.pending == self.log.shape[0] or step == self.iterations - 1:
                    if self._read(callback, psnr_target):
                        break
        except KeyboardInterrupt:
            reason = "keyboard_interrupt"
        if self.pending:  # steps since the last read (an early break)
            self._read(None, None, drop=False)
        runner = self.runner
        if writing and runner.out is not None:
            outputs = runner.out.clone()
        else:
            with torch.no_grad():
                outputs = runner.forward().detach()
        self._finish(range(len(self.rows)), outputs)  # the networks dropped earlier were finished then
        self._write_home()
        for k, result in enumerate(results):
            if reason is not None and not self.done[k]:
                result.stop_reason = reason
            result.interrupted = result.stop_reason in ("keyboard_interrupt", "max_time", "should_stop")
            result.step_mode = "graph" if runner.graphed else "eager"
        return results

    def _finish(self, rows: Any, outputs: torch.Tensor) -> None:
        """The final output and average of the networks in runner ``rows``, ``outputs`` being the runner's."""
        for j in rows:
            result = self.results[self.rows[j]]
            if self.runner.average is not None and result.steps:
                result.output_avg = self.runner.average[j : j + 1].clone()
            result.output = outputs[j : j + 1].clone()

    def _write_home(self) -> None:
        """Copy the runner's weights into the caller's module, once the runner trains a narrowed copy of it."""
        if self.runner.net is not self.home:
            write_networks(self.home, self.runner.net, self.rows)

    def _drop_stopped(self) -> None:
        """Go on without the networks whose early stopping fired (they are frozen: their results are final)."""
        stopped = [j for j, k in enumerate(self.rows) if self.results[k].stop_reason == "early_stop"]
        if not stopped or len(stopped) == len(self.rows):
            return
        keep = [j for j in range(len(self.rows)) if j not in stopped]
        narrowed = self.runner.select(keep)
        if narrowed is None:  # this run cannot be narrowed: its stopped networks stay in the step, frozen
            self.repack = False
            return
        with torch.no_grad():
            self._finish(stopped, self.runner.forward().detach())
        self._write_home()  # the stopped networks' final weights, into the caller's module
        self.runner.optimizer.zero_grad(set_to_none=True)  # the gradients of a module no longer trained
        self.runner, self.rows = narrowed, [self.rows[j] for j in keep]
        self.log = torch.empty((self.log.shape[0], len(keep), self.log.shape[2]), device=narrowed.device)

    def _read(self, callback: Optional[Callable[[StepInfo], None]], psnr_target: Optional[float],
              drop: bool = True) -> bool:
        """Read the pending log rows into the results; return True when the loop should stop."""
        log = self.log[: self.pending].tolist()  # the one host synchronisation
        self.pending = 0
        runner = self.runner
        es = runner.early_stop
        for j, k in enumerate(self.rows):  # runner row j holds network k
            result = self.results[k]
            if self.done[k]:  # a stopped network of a packed run: frozen, its record ends where a run alone would
                continue
            rows = [entry[j] for entry in log]
            for row in rows:
                step = result.steps
                result.steps += 1
                result.loss_history.append(row[_COL["loss"]])
                if self.track_observation:
                    result.psnr_history.append(row[_COL["psnr"]])
                if self.track_reference:
                    result.psnr_ref_history.append(row[_COL["psnr_ref"]])
                    if runner.average is not None:
                        result.psnr_ref_avg_history.append(row[_COL["psnr_ref_avg"]])
                if row[_COL["backtracked"]] == 1.0:
                    result.backtrack_steps.append(step)
                if es is not None:
                    result.variance_history.append(row[_COL["variance"]])
                    result.residual_history.append(row[_COL["residual"]])
                if psnr_target is not None and not self.done[k]:
                    measured = row[_COL["psnr_ref"]] if self.track_reference else row[_COL["psnr"]]
                    if measured >= psnr_target:
                        result.stop_reason, self.done[k] = "psnr_target", True
            last = rows[-1]
            if es is not None and not self.done[k]:
                best = last[_COL["stop_step"]]
                state = EarlyStopState(steps=result.steps, best_step=int(best) if best >= 0 else None,
                                       variance=last[_COL["variance"]])
                if es.should_stop(state):
                    result.stop_reason, self.done[k] = "early_stop", True
                    result.stop_step = state.best_step
                    result.stop_output = es.best[j : j + 1].clone()
                    result.stop_residual = result.residual_history[state.best_step]
            if callback is not None:
                callback(StepInfo(
                    step=result.steps - 1, loss=last[_COL["loss"]], out=runner.out[j : j + 1].clone(),
                    out_avg=runner.average[j : j + 1].clone() if runner.average is not None else None,
                    psnr=last[_COL["psnr"]] if self.track_observation else None,
                    psnr_ref=last[_COL["psnr_ref"]] if self.track_reference else None,
                    psnr_ref_avg=last[_COL["psnr_ref_avg"]] if self.track_reference and runner.average is not None
                    else None,
                    backtracked=last[_COL["backtracked"]] == 1.0, elapsed=time.perf_counter() - self.t0,
                    net=runner.net,
                    variance=last[_COL["variance"]] if es is not None else None,
                    residual=last[_COL["residual"]] if es is not None else None,
                    stop_step=int(last[_COL["stop_step"]]) if es is not None and last[_COL["stop_step"]] >= 0
                    else None,
                    network=k,
                ))
        if drop and self.repack and not all(self.done):
            self._drop_stopped()
        return all(self.done)
