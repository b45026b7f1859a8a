"""The first stage of ``restore()``: every argument checked, before any pixel is read.

:func:`validate_request` is pure -- it reads no file, builds no network and
runs nothing -- and returns a :class:`RestoreRequest` holding the resolved
task, preset, device and backend.  ``dip-fast batch`` calls it once to
reject bad arguments before the first file.

Examples:
    >>> from dip_fast.pipeline.request import validate_request
    >>> request = validate_request("sr", scale=2, preset="quick", device="cpu")
    >>> request.task.name, request.preset.name, request.preset.sr_factor, request.factor
    ('super_resolution', 'sr_quick', 2, 2)
    >>> validate_request("sr", scale=3)
    Traceback (most recent call last):
    ...
    ValueError: scale must be even (2, 4, 8, ...): the paper's Lanczos-2 downsampler misaligns odd factors, got 3
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from .. import tasks
from ..core.networks import Builder, check_backend, fast_available, resolve_backend
from ..tasks import physics, registry
from ..tasks.inputs import check_inputs, check_int
from ..tasks.registry import TaskSpec
from ..tasks.terms import Operator

__all__ = ["PER_FILE", "PRESET_LEVELS", "RestoreRequest", "validate_request"]

#: What ``stop='auto'`` does per task is its spec's ``auto_stop`` (:mod:`dip_fast.tasks.builtin`): ``'early'``
#: (the discrepancy rule; denoise) where it beat the preset's fixed step count on the held-out validation runs of
#: ``bench/es_replay.py`` (bench/README.md, "Early stopping on photographs"), else ``'never'``, the fixed count.
#: The rule's tolerance (:class:`dip_fast.core.early_stop.DiscrepancyRule`), chosen on the tuning runs of the
#: same benchmark (0.9-1.1 tried), with the noise level of :mod:`dip_fast.pipeline.noise_level`.
EARLY_STOP_TOLERANCE = 0.98
#: The tolerance of the clip-aware rule (``DiscrepancyRule(clip=(0, 1))``: denoising observations with values at 0
#: or 1), chosen on the same tuning runs (0.9-1.1 tried): its threshold is the expected residual of the true image,
#: which a fit of a clipped area (its clipped mean) goes below, so it holds the residual a little tighter.
EARLY_STOP_CLIP_TOLERANCE = 0.95
#: With ``stop='early'`` and no ``iterations``, the step budget is this multiple of the preset's count:
#: a run that has not explained the observation by then falls back to the average at the budget.  Chosen
#: on the tuning runs with the tolerance (1, 1.25 and 1.5 tried): most photographs at 128x128 have not
#: reached the noise level by the fast presets' count, and going on while they have not gains there
#: (at sigma 15, 1-1.9 dB between 1500 and 2250 steps).
EARLY_STOP_BUDGET = 1.5

#: Values of ``preset`` that pick settings by task (see :func:`dip_fast.tasks.preset_for`).
PRESET_LEVELS = ("auto", "paper", "fast", "quick")
STOP_CHOICES = ("auto", "never", "early")
STEP_MODE_CHOICES = ("auto", "eager", "graph")
PRECISION_CHOICES = ("auto", "fp32", "tf32", "bf16")


class _PerFile:
    """Stands for a task input that arrives with each file (a batch's masks): present, checked later."""

    def __repr__(self) -> str:
        return "<per file>"


#: Pass as ``mask=`` (or another image input) to validate arguments whose images come later, per file.
PER_FILE: Any = _PerFile()


@dataclass(frozen=True)
class RestoreRequest:
    """A checked ``restore()`` call, less its images (see :func:`validate_request` for the fields' sources).

    Attributes:
        task: the task's spec.
        operator: the forward operator of a callable task, else None.
        preset: the settings to run (``iterations`` applied; adapted to ``scale``).
        level: the preset level it came from (``'paper'``, ``'fast'``,
            ``'quick'``), ``''`` for a preset given by name or object.
        auto_preset: ``preset='auto'`` chose it (the CPU warns about run time).
        device: the run's device.
        builder, backend: the network builder and the backend name reported, for a backend the
            caller fixed; with ``backend='auto'``, ``'auto'`` and the reference builder (the run's
            execution is chosen by :func:`dip_fast.pipeline.job.choose_execution`).
        fast_available: whether the fused network can run (its compiled ops are loaded).
        time_budget: seconds the whole call should take (:mod:`dip_fast.pipeline.budget`), or None.
        factor: the output's size over the observation's (``scale`` or 1).
        blur_kernel: the normalised kernel, for tasks that take one.
        output_shape: ``(C, H, W)`` of a callable task's result.
        sigma: the given noise level (0-255), or None.
        seed: the given seed (None: drawn when the run starts).
        stop: ``'early'`` or ``'never'`` (``'auto'`` resolved per task).
        step_mode, precision: as given (``'auto'`` is resolved on the device).
        max_time, num_threads, deterministic, progress, callback, return_info:
            as given, checked.
        restarts: independent runs per image (their mean is returned).
        pack: the most networks trained in one step (``'auto'``: as many as
            fit, see :func:`dip_fast.api.restore`).
        tile: the side of the tiles to restore the image in, or None (whole,
            unless it does not fit in memory).
    """

    task: TaskSpec
    operator: Optional[Operator]
    preset: tasks.Preset
    level: str
    auto_preset: bool
    device: torch.device
    builder: Builder
    backend: str
    factor: int
    blur_kernel: Optional[torch.Tensor]
    output_shape: Optional[Tuple[int, int, int]]
    sigma: Optional[float]
    seed: Optional[int]
    stop: str
    step_mode: str
    precision: str
    max_time: Optional[float]
    num_threads: Optional[int]
    deterministic: bool
    progress: bool
    callback: Optional[Callable[[int, Dict[str, Any]], Optional[bool]]]
    return_info: bool
    restarts: int = 1
    pack: Union[int, str] = "auto"
    tile: Optional[int] = None
    fast_available: bool = False
    time_budget: Optional[float] = None


def _check_choice(value: Any, name: str, choices: Tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def resolve_task(task: Any) -> Tuple[TaskSpec, Optional[Operator]]:
    """The task's spec and, for an operator task, the forward operator.

    A deepinv Physics is the measurement task (:mod:`dip_fast.tasks.physics`), its operator ``physics.A``;
    any other callable the callable task.

    Raises:
        ValueError: an unknown task.
        ImportError: a Physics-looking object without deepinv installed (the message names the extra).
    """
    measured = physics.as_operator(task) if registry.measurement_task() is not None else None
    if measured is not None:
        return registry.measurement_task(), measured
    if callable(task) and not isinstance(task, str) and registry.operator_task() is not None:
        return registry.operator_task(), task
    spec = registry.find_task(task) if isinstance(task, str) else None
    if spec is None or spec.operator:
        raise ValueError(f"task must be one of {registry.describe_choices()}, got {task!r}")
    return spec, None


def resolve_device(device: Any) -> torch.device:
    """The run's device: CUDA when available by default; a named GPU must exist."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} requested, but torch sees no CUDA GPU; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


def resolve_preset(preset: Any, spec: TaskSpec, scale: Optional[int], device: torch.device) -> Tuple[tasks.Preset, str]:
    """The settings to run and the level they came from (``'auto'`` resolves by device)."""
    level = ""
    if isinstance(preset, tasks.Preset):
        chosen = registry.check_preset(preset)
    elif isinstance(preset, str) and preset in PRESET_LEVELS:
        # The paper's settings take hours on a CPU; see tasks.preset_for.
        level = ("paper" if device.type == "cuda" else "fast") if preset == "auto" else preset
        chosen = tasks.preset_for(spec.name, level, scale)
    elif isinstance(preset, str) and preset in tasks.PRESETS:
        chosen = tasks.PRESETS[preset]
    else:
        raise ValueError(f"preset must be one of {PRESET_LEVELS}, a name in dip_fast.tasks.PRESETS or a Preset, got {preset!r}")
    if chosen.task != spec.name:
        raise ValueError(f"preset {chosen.name!r} is for task {chosen.task!r}, not {spec.name!r}")
    if not level and spec.adapt_preset is not None:
        chosen = spec.adapt_preset(chosen, level, scale)
    return chosen, level


def _early_stop_budget(preset: tasks.Preset) -> tasks.Preset:
    """The preset with early stopping's step budget (``EARLY_STOP_BUDGET`` times its count)."""
    return preset.with_overrides(iterations=int(round(preset.iterations * EARLY_STOP_BUDGET)))


#: restore()'s keyword arguments other than its images, and their defaults: the one list of them
#: (``tests/test_request.py`` checks that ``restore``'s signature agrees).
RESTORE_DEFAULTS: Dict[str, Any] = {
    "task": "denoise", "mask": None, "scale": None, "blur_kernel": None, "output_shape": None,
    "iterations": None, "preset": "auto", "sigma": None, "seed": 0, "device": None, "backend": "auto",
    "progress": False, "callback": None, "return_info": False, "max_time": None, "num_threads": None,
    "deterministic": False, "stop": "auto", "step_mode": "auto", "precision": "auto", "restarts": 1,
    "pack": "auto", "tile": None, "time_budget": None,
}


def validate_request(task: Union[str, Operator] = "denoise", **arguments: Any) -> RestoreRequest:
    """Check ``restore()``'s arguments other than its images (``mask`` only for presence) and resolve them.

    Takes ``restore()``'s keywords, with its defaults for those not given.

    Raises:
        ValueError, TypeError: as ``restore()`` does, naming the argument.
    """
    options = dict(RESTORE_DEFAULTS)
    unknown = sorted(set(arguments) - set(options))
    if unknown:
        raise TypeError(f"restore() got unexpected keyword argument(s) {', '.join(unknown)}")
    options.update(arguments, task=task)
    return _validate(**options)


def _validate(task: Any, mask: Any, scale: Any, blur_kernel: Any, output_shape: Any, iterations: Any, preset: Any,
              sigma: Any, seed: Any, device: Any, backend: Any, progress: Any, callback: Any, return_info: Any,
              max_time: Any, num_threads: Any, deterministic: Any, stop: Any, step_mode: Any,
              precision: Any, restarts: Any, pack: Any, tile: Any, time_budget: Any) -> RestoreRequest:
    """:func:`validate_request` once every argument has its value (the caller's, of any type until checked)."""
    spec, operator = resolve_task(task)
    if spec.measurement and sigma is None:
        sigma = getattr(operator, "sigma", None)  # a Physics's Gaussian noise level, unless one is given
    if iterations is not None:
        iterations = check_int(iterations, "iterations", 1)
    if max_time is not None:
        max_time = _check_positive(max_time, "max_time")
    if time_budget is not None:
        time_budget = _check_positive(time_budget, "time_budget")
    if num_threads is not None:
        num_threads = check_int(num_threads, "num_threads", 1)
    if seed is not None:
        seed = check_int(seed, "seed", 0)
    stop = _check_choice(stop, "stop", STOP_CHOICES)
    restarts = check_int(restarts, "restarts", 1)
    if tile is not None:
        tile = check_int(tile, "tile", 16)
    if isinstance(pack, str) and pack != "auto":
        raise ValueError(f"pack must be 'auto' or an integer >= 1, got {pack!r}")
    if not isinstance(pack, str):
        pack = check_int(pack, "pack", 1)
    if callback is not None and restarts > 1:
        raise ValueError("callback applies to a single run; restarts > 1 runs several (drop the callback or use "
                         "restarts=1)")
    if callback is not None and tile is not None:
        raise ValueError("callback applies to a single run; tile= restores the image in several (drop the callback "
                         "or the tile)")
    step_mode = _check_choice(step_mode, "step_mode", STEP_MODE_CHOICES)
    precision = _check_choice(precision, "precision", PRECISION_CHOICES)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(step, info), got {type(callback).__name__}")
    given = dict(mask=mask, scale=scale, blur_kernel=blur_kernel, output_shape=output_shape, sigma=sigma)
    inputs = check_inputs(spec, given)
    if stop == "early" and not spec.early_stop:
        early = tuple(s.name for s in registry.all_tasks() if s.early_stop)
        raise ValueError(f"stop='early' applies to tasks {early}, not {spec.name!r}; use 'auto' or 'never'")
    dev = resolve_device(device)
    check_backend(backend, allow_auto=True)
    chosen, level = resolve_preset(preset, spec, inputs["scale"], dev)
    if stop == "auto":
        # A measurement task with a known noise level (a deepinv Physics's Gaussian sigma) stops by the
        # discrepancy principle, as denoising does; without one the rule has nothing to hold the residual to.
        stop = "early" if spec.measurement and inputs["sigma"] else spec.auto_stop
    if iterations is not None:
        chosen = chosen.with_overrides(iterations=iterations)
    elif stop == "early":
        chosen = _early_stop_budget(chosen)
    builder, backend_name = resolve_backend("reference" if backend == "auto" else backend, dev, chosen.network.arch)
    if backend == "auto":
        backend_name = "auto"
    return RestoreRequest(
        task=spec, operator=operator, preset=chosen, level=level, auto_preset=isinstance(preset, str) and preset == "auto",
        device=dev, builder=builder, backend=backend_name, factor=inputs["scale"] or 1,
        blur_kernel=inputs["blur_kernel"], output_shape=inputs["output_shape"], sigma=inputs["sigma"], seed=seed,
        stop=stop, step_mode=step_mode, precision=precision,
        max_time=max_time, num_threads=num_threads, deterministic=bool(deterministic), progress=bool(progress),
        callback=callback, return_info=bool(return_info), restarts=restarts, pack=pack, tile=tile,
        fast_available=fast_available(chosen.network.arch), time_budget=time_budget,
    )
