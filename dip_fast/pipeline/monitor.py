"""Per-step bookkeeping of a ``restore()`` run: progress bar, PSNR, the caller's callback, CPU time warning."""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

import torch
from tqdm.auto import tqdm

from .. import _caller, io
from ..core.fit import StepInfo

if TYPE_CHECKING:  # the api imports this module
    from .info import RestoreInfo

__all__ = ["ProgressMonitor", "format_seconds"]

# A CPU run whose measured estimate exceeds this many seconds is announced
# in a warning even when the caller picked the preset.
_LONG_RUN_S = 600.0


def format_seconds(s: float) -> str:
    """A duration as seconds, minutes or hours, whichever reads best."""
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


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
        self.bar = tqdm(total=info.iterations, desc=f"dip-fast {info.task} {info.precision}", unit="step",
                        disable=not progress, dynamic_ncols=True)

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
            warnings.warn(
                f"dip_fast: {why}this run of {self.info.iterations} steps will take about "
                f"{format_seconds(total)} on the CPU (measured {per_step * 1000:.0f} ms/step). "
                "Pass iterations=, max_time= or preset='quick' for a shorter run, or use a GPU.",
                UserWarning, stacklevel=_caller.stacklevel(),  # the caller of restore()
            )

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
