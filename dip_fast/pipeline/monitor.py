"""Per-step bookkeeping of a ``restore()`` run: progress bar, PSNR, the caller's callback, CPU time warning."""
from __future__ import annotations

import math
import sys
import warnings
from typing import IO, TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

import torch
from tqdm.auto import tqdm

from .. import _caller, io
from ..core.fit import StepInfo

if TYPE_CHECKING:  # the api imports this module
    from .info import RestoreInfo

__all__ = ["LOG_INTERVAL_S", "ProgressMonitor", "RunTimeEstimate", "format_seconds", "progress_bar"]

# A CPU run whose measured estimate exceeds this many seconds is announced
# in a warning even when the caller picked the preset.
_LONG_RUN_S = 600.0

#: Seconds between two updates of a progress bar that writes to a file or a
#: pipe (a log) rather than a terminal: each update there is a new line of
#: the log, where a terminal overwrites one line.
LOG_INTERVAL_S = 10.0


def format_seconds(s: float) -> str:
    """A duration as seconds, minutes or hours, whichever reads best."""
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (False for files, pipes and closed or unusual streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _is_notebook_bar() -> bool:
    """Whether ``tqdm.auto`` chose the notebook widget, which draws in place whatever ``sys.stderr`` is."""
    return any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__)


def progress_bar(total: int, desc: str, *, disable: bool = False, file: Optional[IO[str]] = None) -> Any:
    """A tqdm bar of ``total`` steps, which updates at most every :data:`LOG_INTERVAL_S` s outside a terminal.

    On a terminal the bar redraws one line up to ten times a second (tqdm's
    default). Written to a file or a pipe, each redraw is kept, and a long
    run filled logs with megabytes of bar updates; there the bar updates at
    most every :data:`LOG_INTERVAL_S` seconds (and when it closes).

    Args:
        total: the number of steps.
        desc: the text before the bar.
        disable: no bar at all.
        file: where the bar writes (default ``sys.stderr``).

    Returns:
        The ``tqdm.auto.tqdm`` bar.

    Examples:
        >>> import io
        >>> log = io.StringIO()  # not a terminal
        >>> bar = progress_bar(100, "demo", file=log)
        >>> bar.mininterval
        10.0
        >>> bar.close()
    """
    stream = sys.stderr if file is None else file
    # miniters=1: the clock is read at every update, so tqdm's monitor thread,
    # which redraws a bar whose adaptive miniters lags, never adds a line
    interval = ({} if _is_terminal(stream) or _is_notebook_bar()
                else {"mininterval": LOG_INTERVAL_S, "miniters": 1})
    return tqdm(total=total, desc=desc, unit="step", disable=disable, dynamic_ncols=True, file=stream, **interval)


class RunTimeEstimate(UserWarning):
    """The warning that a CPU run will be long: its message, plus the numbers a front end may word itself.

    Attributes:
        steps: the run's step count.
        seconds: the expected wall time of the run.
        ms_per_step: the measured time per step.
    """

    def __init__(self, message: str, steps: int, seconds: float, ms_per_step: float) -> None:
        super().__init__(message)
        self.steps, self.seconds, self.ms_per_step = steps, seconds, ms_per_step


class ProgressMonitor:
    """Per-step bookkeeping of a run: progress bar, PSNR, user callback, CPU time estimate."""

    def __init__(self, info: "RestoreInfo", box: Tuple[int, int, int, int], factor: int,
                 gt: Optional[torch.Tensor], callback: Optional[Callable[..., Any]], progress: bool,
                 alpha: Optional[torch.Tensor], spec: io.ImageSpec, *, warn_auto: bool, cpu: bool,
                 max_time: Optional[float], noise_var: Optional[float] = None) -> None:
        self.info, self.box, self.factor, self.gt = info, box, factor, gt
        self.callback, self.alpha, self.spec = callback, alpha, spec
        self.warn_auto, self.cpu, self.max_time = warn_auto, cpu, max_time
        self.noise_var = noise_var  # early stopping's sigma^2: the bar shows the residual against it
        self.stop = False
        self._t_first: Optional[float] = None
        # The bar names what runs: backend, layout, step mode and precision, as chosen for this device.
        ex = info.execution
        how = "/".join(str(ex[k]) for k in ("backend", "layout", "step_mode", "precision")) if ex else info.precision
        self.bar = progress_bar(info.iterations, f"dip-fast {info.task} {how}", disable=not progress)

    def should_stop(self) -> bool:
        return self.stop

    def _time_warning(self, s: StepInfo) -> None:
        # Step 0 pays one-off set-up costs; the second step alone gives the pace.
        if s.step == 0:
            self._t_first = s.elapsed
            return
        if s.step != 1 or self._t_first is None:
            return
        per_step = s.elapsed - self._t_first
        total = self._t_first + per_step * (self.info.iterations - 1)
        if self.max_time is not None and self.max_time < total:
            return  # the caller already bounded the run
        if self.warn_auto or total > _LONG_RUN_S:
            why = ("preset='auto' on the CPU uses the cheaper preset "
                   f"{self.info.preset!r} (the paper's settings would take hours); " if self.warn_auto else "")
            message = (f"dip_fast: {why}this run of {self.info.iterations} steps will take about "
                       f"{format_seconds(total)} on the CPU (measured {per_step * 1000:.0f} ms/step). "
                       "Pass time_budget= or iterations= for a shorter run, or use a GPU.")
            warnings.warn(RunTimeEstimate(message, self.info.iterations, total, per_step * 1000),
                          stacklevel=_caller.stacklevel())  # the caller of restore()

    def on_step(self, s: StepInfo) -> None:
        est = s.out_avg if s.out_avg is not None else s.out
        est = io.crop(est, self.box, self.factor)
        value = s.psnr_ref_avg if s.out_avg is not None else s.psnr_ref
        if self.cpu:
            self._time_warning(s)
        if self.bar is not None and not self.bar.disable:
            post = {"loss": f"{s.loss:.2e}"}
            if value is not None:
                post["psnr"] = f"{value:.2f}"
            post.update(self._stop_signal(s))
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(s.step + 1 - self.bar.n)  # the log is read every few steps on a GPU
        if self.callback is not None:
            alpha, spec = self.alpha, self.spec
            payload = {
                "loss": s.loss,
                "psnr": value,
                "elapsed": s.elapsed,
                "backtracked": s.backtracked,
                "output": est,
                "render": lambda est=est: io.from_tensor(est, alpha, spec),
            }
            if self.callback(s.step, payload) is True:
                self.stop = True

    def _stop_signal(self, s: StepInfo) -> Dict[str, str]:
        """The early-stopping signal for the bar: the average's residual / sigma^2 (the rule stops at its tolerance)."""
        if self.noise_var is None or s.residual is None or not math.isfinite(s.residual):
            return {}
        return {"res/sigma2": f"{s.residual / self.noise_var:.2f}"}

    def close(self) -> None:
        self.bar.close()
