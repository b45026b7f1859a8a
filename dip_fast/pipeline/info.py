"""What a :func:`dip_fast.restore` run did: :class:`RestoreInfo`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["RestoreInfo"]


@dataclass
class RestoreInfo:
    """What a :func:`restore` run did (returned with ``return_info=True``).

    Attributes:
        task: the task that ran (``'callable'`` for a forward operator).
        preset: name of the preset whose settings were used.
        backend: what built the network: ``'fast'``, ``'reference'``, or
            ``'reference (fast fallback)'`` when the extension lacks the fused ops.
        device: the device the run used.
        seed: the seed of the run (drawn at random when ``seed=None``).
        iterations: the step budget.
        steps: steps completed.
        stop_reason: ``'completed'``, ``'early_stop'``, ``'max_time'``, ``'keyboard_interrupt'``,
            ``'callback'``, or ``'constant'``: the image holds one colour (over
            its known pixels, for inpainting), which is its own restoration;
            it was returned without fitting (``steps`` 0).
        interrupted: the run stopped before ``iterations`` steps.
        wall_time: seconds spent in the optimisation loop.
        loss_history: data-term value of every step.
        psnr_history: PSNR (dB) of every step's estimate against ``ground_truth``;
            empty without one.
        psnr: PSNR of the returned image against ``ground_truth`` (None without one).
        sigma: denoising only: the noise level (0-255) given or estimated.
        reg_noise_std: the input perturbation used.
        padded_size: the network's (high-resolution) working size ``(H, W)``.
        estimated_memory: estimated peak memory of the run in bytes.
        backtrack_steps: steps at which backtracking restored the weights.
        stop_step: the step chosen by early stopping (0-based), whose running
            average is returned; None when it did not trigger or was off.
        stop: the stopping mode that ran: ``'early'`` or ``'never'`` (what
            ``stop='auto'`` resolved to for the task).
        stop_fallback: early stopping ran but accepted no estimate (none
            explained the observation down to the noise level, or the level
            was unknown), so the fixed-count result was returned.
        stop_noise_sigma: the noise level (0-255) the stopping rule compared
            the residual with (before clipping, where the rule modelled the
            observation's clipping at 0 and 1); None when the rule was off.
        stop_residual_ratio: ``||y - A x||^2 / N`` of the returned image
            divided by ``stop_noise_sigma`` squared (with clipping modelled:
            by the mean expected residual of clipped noise at the returned
            image): at most the tolerance for an early-stopped image, near 1
            when the image explains the observation down to its noise; None
            when the rule was off.
        stop_summary: one plain sentence on why the run ended and how sure
            the rule is.
        time_plan: with ``time_budget``, the plan
            (:class:`dip_fast.pipeline.budget.TimePlan`): ``budget_s``,
            ``spent_s``, ``ms_per_step``, ``iterations``, ``preset_iterations``,
            ``preset``, ``reason``; None without a budget.
        execution: how the step ran and how that was chosen
            (:class:`dip_fast.core.tuning.Decision`): ``backend``, ``layout``,
            ``step_mode``, ``precision``, ``source`` (``'measured'``,
            ``'cache'`` or ``'fixed'``), ``ms_per_step`` (candidate label ->
            median ms per step, when timed), ``tuning_s`` and ``reason``.
        step_mode: how the steps ran: ``'eager'`` or ``'graph'`` (eager when
            a graph capture failed).
        precision: the step's precision: ``'fp32'``, ``'tf32'`` or ``'bf16'``.
        restarts: the number of independent runs whose mean was returned.
        uncertainty: with ``restarts > 1``, the per-pixel standard deviation
            of the runs' estimates, an ``H x W x C`` float32 numpy array in
            the image's [0, 1] units (colour channels only); else None.  The
            other fields describe the first run (``psnr``: of the mean).
        packed: how many networks were trained in the step that ran this
            image (1: alone).
        tiles: how many tiles the image was restored in (1: whole); the
            other fields then describe the first tile.
        tile_size: the tiles' size ``(H, W)`` in observation pixels, or None.
    """

    task: str
    preset: str
    backend: str
    device: str
    seed: int
    iterations: int
    steps: int = 0
    stop_reason: str = "completed"
    interrupted: bool = False
    wall_time: float = 0.0
    loss_history: List[float] = field(default_factory=list)
    psnr_history: List[float] = field(default_factory=list)
    psnr: Optional[float] = None
    sigma: Optional[float] = None
    reg_noise_std: float = 0.0
    padded_size: Tuple[int, int] = (0, 0)
    estimated_memory: int = 0
    backtrack_steps: List[int] = field(default_factory=list)
    stop_step: Optional[int] = None
    stop: str = "never"
    stop_fallback: bool = False
    stop_noise_sigma: Optional[float] = None
    stop_residual_ratio: Optional[float] = None
    stop_summary: str = ""
    step_mode: str = "eager"
    precision: str = "fp32"
    execution: Dict[str, Any] = field(default_factory=dict)
    time_plan: Optional[Dict[str, Any]] = None
    restarts: int = 1
    uncertainty: Optional[Any] = None
    packed: int = 1
    tiles: int = 1
    tile_size: Optional[Tuple[int, int]] = None
