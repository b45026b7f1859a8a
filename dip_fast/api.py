"""One call to restore an image: :func:`restore`.

The data flow is ``restore`` -> :mod:`dip_fast.io` (caller's image to a
tensor) -> :mod:`dip_fast.tasks` (preset, network, input, data term) ->
:func:`dip_fast.fit.fit` (the optimisation loop) -> :mod:`dip_fast.io`
(back to the caller's kind of image).  This module only checks arguments,
picks settings and wires those steps together.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import warnings
from dataclasses import dataclass, field
from functools import partial
from numbers import Integral, Real
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import _ops, auto_step, degenerate, io, tasks
from .early_stop import DiscrepancyRule
from .fit import StepInfo, fit
from .metrics import psnr as _psnr
from .reference import skip as reference_skip

__all__ = ["RestoreInfo", "estimate_memory", "restore", "PRESET_LEVELS", "TASK_ALIASES"]

#: Values of ``preset`` that pick settings by task (see :func:`dip_fast.tasks.preset_for`).
PRESET_LEVELS = ("auto", "paper", "fast", "quick")
#: Accepted spellings of each task named by a string (a callable task is a forward operator).
TASK_ALIASES = {
    "denoise": "denoise",
    "inpaint": "inpaint",
    "super_resolution": "super_resolution",
    "sr": "super_resolution",
    "deblur": "deblur",
    "jpeg": "jpeg",
}

#: Tasks where a long run fits the noise, so that ``stop='early'`` may end it (see :data:`AUTO_STOP`).
EARLY_STOP_TASKS = ("denoise", "jpeg", "deblur")
STOP_CHOICES = ("auto", "never", "early")
#: What ``stop='auto'`` does per task: ``'early'`` (the discrepancy rule) where it beat the preset's
#: fixed step count on the held-out validation runs of ``bench/es_replay.py`` (bench/README.md, "Early
#: stopping on photographs"), else ``'never'``, the fixed count.
AUTO_STOP = {"denoise": "never", "jpeg": "never", "deblur": "never"}
#: The rule's tolerance (:class:`dip_fast.early_stop.DiscrepancyRule`), chosen on the tuning runs of the
#: same benchmark (0.9-1.05 tried).
EARLY_STOP_TOLERANCE = 1.0
#: With ``stop='early'`` and no ``iterations``, the step budget is this multiple of the preset's count:
#: a run that has not explained the observation by then falls back to the average at the budget.
EARLY_STOP_BUDGET = 1.0
STEP_MODE_CHOICES = ("auto", "eager", "graph")
PRECISION_CHOICES = ("auto", "fp32", "tf32", "bf16")

# A CPU run whose measured estimate exceeds this many seconds is announced
# in a warning even when the caller picked the preset.
_LONG_RUN_S = 600.0
# Margin on the estimated peak memory: autograd's transient gradient buffers
# and the allocator's rounding come on top of the saved activations.
_MEMORY_MARGIN = 1.5
# estimate_memory's results by network settings, channels and size: tracing
# takes about a second on the CPU, which a batch of same-sized images would
# otherwise pay for every file.
_MEMORY_ESTIMATES: Dict[str, Optional[int]] = {}


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
            the residual with; None when the rule was off.
        stop_residual_ratio: ``||y - A x||^2 / N`` of the returned image
            divided by ``stop_noise_sigma`` squared: at most the tolerance
            for an early-stopped image, near 1 when the image explains the
            observation down to its noise; None when the rule was off.
        stop_summary: one plain sentence on why the run ended and how sure
            the rule is.
        step_mode: how the steps ran: ``'eager'`` or ``'graph'`` (eager when
            a graph capture failed).
        precision: the step's precision: ``'fp32'``, ``'tf32'`` or ``'bf16'``.
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


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------


def _check_choice(value: Any, name: str, choices: Tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _resolve_task(task: Any) -> Tuple[str, Optional[tasks.Operator]]:
    """The task's name and, for a callable task, the forward operator."""
    if callable(task) and not isinstance(task, str):
        return "callable", task
    if not isinstance(task, str) or task not in TASK_ALIASES:
        raise ValueError(
            "task must be one of 'denoise', 'inpaint', 'super_resolution' (or 'sr'), 'deblur', 'jpeg', "
            f"or a callable forward operator, got {task!r}"
        )
    return TASK_ALIASES[task], None


def _check_output_shape(value: Any) -> Tuple[int, int, int]:
    """``output_shape`` of a callable task: ``(C, H, W)`` with C 1 or 3 and sides of at least ``io.MIN_SIZE``."""
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (tuple, list)) or len(value) != 3 or not all(
        isinstance(v, Integral) and not isinstance(v, bool) for v in value
    ):
        raise TypeError(f"output_shape must be a tuple of three integers (C, H, W), got {value!r}")
    c, h, w = (int(v) for v in value)
    if c not in (1, 3):
        raise ValueError(f"output_shape: C must be 1 (grey) or 3 (RGB), got {c}")
    if min(h, w) < io.MIN_SIZE:
        raise ValueError(f"output_shape: H and W must be at least {io.MIN_SIZE}, got {h}x{w}")
    return c, h, w


def _output_spec(spec: io.ImageSpec, c: int, h: int, w: int) -> io.ImageSpec:
    """The observation's spec for an image of another shape, without alpha (a callable task's result)."""
    layout = spec.layout
    if spec.kind == "numpy" and c == 3:
        layout = "HWC"
    changes: Dict[str, Any] = dict(height=h, width=w, channels=c, has_alpha=False, layout=layout)
    if spec.kind in ("pil", "path") and c == 3 and spec.bit_depth != 8:
        # Pillow has no 16-bit or float colour mode: such colour results come back as arrays, as for files.
        changes.update(kind="numpy", layout="HWC")
    return dataclasses.replace(spec, **changes)


def _resolve_device(device: Any) -> torch.device:
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


def _resolve_backend(backend: Any, device: torch.device) -> Tuple[Callable[..., nn.Module], str]:
    if backend == "reference":
        return reference_skip, "reference"
    if backend == "fast":
        from .nets import skip as fast_skip

        # channels_last on the CPU, where oneDNN's convolutions run faster in it (bench/README.md,
        # "Latest results: CPU"); NCHW on CUDA until a GPU run says otherwise.
        make = partial(fast_skip, channels_last=device.type == "cpu")
        if _ops.has_ops(*_ops.FAST_NETWORK_OPS):
            return make, "fast"
        return make, "reference (fast fallback)"
    raise ValueError(f"backend must be 'fast' or 'reference', got {backend!r}")


def _resolve_preset(preset: Any, task: str, scale: Optional[int], device: torch.device) -> Tuple[tasks.Preset, str]:
    """The settings to run and the level they came from (``'auto'`` resolves by device)."""
    level = ""
    if isinstance(preset, tasks.Preset):
        chosen = preset
    elif isinstance(preset, str) and preset in PRESET_LEVELS:
        level = preset
        if preset == "auto":
            # The paper's settings take hours on a CPU; see tasks.preset_for.
            level = "paper" if device.type == "cuda" else "fast"
        chosen = tasks.preset_for(task, level, scale)
    elif isinstance(preset, str) and preset in tasks.PRESETS:
        chosen = tasks.PRESETS[preset]
    else:
        raise ValueError(f"preset must be one of {PRESET_LEVELS}, a name in dip_fast.tasks.PRESETS or a Preset, got {preset!r}")
    if chosen.task != task:
        raise ValueError(f"preset {chosen.name!r} is for task {chosen.task!r}, not {task!r}")
    if task == "super_resolution" and chosen.sr_factor != scale:
        chosen = chosen.with_overrides(sr_factor=scale)
    return chosen, level


def reg_noise_for_sigma(sigma: float) -> float:
    """Input perturbation for a noise level (0-255): the notebook's 1/30 at sigma 25 and 1/20 at 50.

    Linear in between, clamped outside, since the paper gives only those two points.
    """
    t = min(max((sigma - 25.0) / 25.0, 0.0), 1.0)
    return (1.0 - t) / 30.0 + t / 20.0


def _estimate_sigma(color: torch.Tensor) -> Optional[float]:
    """Noise level (0-255) of a ``(1, C, H, W)`` image, always finite, or None if the estimator is unavailable.

    See :func:`dip_fast.degenerate.estimate_sigma` (0, with a warning, for an image without fine detail).
    """
    # stacklevel 3: the warning points at the caller of restore().
    return degenerate.estimate_sigma(color, stacklevel=3)


def estimate_memory(preset: tasks.Preset, channels: int, size: Tuple[int, int]) -> Optional[int]:
    """Estimated peak memory in bytes of fitting ``preset``'s network at ``size`` (high-resolution ``H, W``).

    Runs the reference network on the ``meta`` device (shapes only, nothing
    allocated) and adds up the activations autograd keeps for the backward
    pass, plus weights, gradients and Adam's two moments, with a margin for
    transient buffers.  Returns None when the network cannot be traced.
    """
    key = repr((preset.input_depth, dict(preset.network), channels, tuple(size)))
    if key not in _MEMORY_ESTIMATES:
        _MEMORY_ESTIMATES[key] = _trace_memory(preset, channels, size)
    return _MEMORY_ESTIMATES[key]


def _trace_memory(preset: tasks.Preset, channels: int, size: Tuple[int, int]) -> Optional[int]:
    """:func:`estimate_memory`, uncached."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    try:
        with torch.device("meta"):
            net = reference_skip(preset.input_depth, channels, **dict(preset.network))
            z = torch.empty(1, preset.input_depth, *size)
        net.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(z)
    except Exception:  # an option without meta support: no estimate rather than a false alarm
        return None
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    inputs = 2 * z.numel() * z.element_size() + 4 * out.numel() * out.element_size()
    return int(_MEMORY_MARGIN * saved + 4 * params + inputs)


def _device_memory(device: torch.device) -> Optional[int]:
    """Total memory of the device in bytes (physical RAM for the CPU), or None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TiB"


def _fmt_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


# --------------------------------------------------------------------------
# Run-time settings
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _run_settings(num_threads: Optional[int], deterministic: bool) -> Iterator[None]:
    """Apply the CPU thread count and determinism flags for the run, then restore the caller's."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if deterministic:
            # warn_only: ops without a deterministic CUDA kernel (bilinear
            # upsampling's backward) warn instead of failing the run.
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old_cudnn


def _sr_downsampler(backend_name: str, channels: int, factor: int, kernel_type: str) -> Optional[nn.Module]:
    """The fast backend's Lanczos downsampler for the super-resolution data term, if the op is available.

    This is the single place where ``dip_fast.ops.Downsample`` plugs into
    restoration: it takes the reference ``Downsampler``'s arguments and
    replaces it inside :class:`dip_fast.tasks.SuperResolutionTerm`.  None
    keeps the reference downsampler.
    """
    if backend_name != "fast" or not _ops.has_ops("lanczos_downsample", "lanczos_downsample_backward"):
        return None
    try:
        from .ops import Downsample
    except ImportError:  # a tree without the op's Python wrapper
        return None
    try:
        return Downsample(channels, factor, kernel_type, phase=0.5, preserve_size=True)
    except Exception as exc:  # an op that does not support these options
        warnings.warn(f"dip_fast: fast Downsample unavailable ({exc}); using the reference", RuntimeWarning, stacklevel=3)
        return None


# --------------------------------------------------------------------------
# restore()
# --------------------------------------------------------------------------


def restore(
    image: io.ImageLike,
    task: Union[str, tasks.Operator] = "denoise",
    *,
    mask: Optional[io.ImageLike] = None,
    scale: Optional[int] = None,
    blur_kernel: Optional[tasks.KernelLike] = None,
    output_shape: Optional[Tuple[int, int, int]] = None,
    iterations: Optional[int] = None,
    preset: Union[str, tasks.Preset] = "auto",
    sigma: Optional[float] = None,
    seed: Optional[int] = 0,
    device: Union[str, torch.device, None] = None,
    backend: str = "fast",
    progress: bool = False,
    callback: Optional[Callable[[int, Dict[str, Any]], Optional[bool]]] = None,
    ground_truth: Optional[io.ImageLike] = None,
    return_info: bool = False,
    max_time: Optional[float] = None,
    num_threads: Optional[int] = None,
    deterministic: bool = False,
    stop: str = "auto",
    step_mode: str = "auto",
    precision: str = "auto",
) -> Any:
    """Restore one image with Deep Image Prior (Ulyanov et al., CVPR 2018).

    A randomly initialised hourglass network is fitted to the degraded image
    alone; stopping early keeps the natural-image part before the network
    learns the noise or the holes.

    Args:
        image: a path, ``PIL.Image``, numpy array ``HxW``/``HxWxC`` (uint8,
            uint16, or float in [0, 1]) or torch tensor ``CxHxW``/``1xCxHxW``
            (float in [0, 1]).  Grey, grey+alpha, RGB and RGBA; alpha is
            passed through (resized for super-resolution).  Any size from
            8x8 up: the image is reflect-padded to the network's multiple
            and cropped back.
        task: ``'denoise'``, ``'inpaint'``, ``'super_resolution'`` (``'sr'``),
            ``'deblur'`` (needs ``blur_kernel``), ``'jpeg'`` (JPEG artefact
            removal: the denoising data term on the compressed image with the
            snail settings of the paper; the fixed step budget is the early
            stopping that keeps the blocks out), or a callable forward
            operator ``A`` (needs ``output_shape``; see below).
        mask: inpainting only, required: known pixels are 1/True (0/255 for
            uint8 images); same size as the image; any image kind.
        scale: super-resolution only, required: the even integer factor
            (2, 4, 8, ...); the result is ``scale`` times larger.
        blur_kernel: deblurring only, required: ``'gaussian:SIGMA'`` (SIGMA in
            pixels, ``2 * ceil(3 SIGMA) + 1`` wide), ``'box:N'`` (N odd), or a
            2-D array/tensor with odd sides and non-negative entries
            (normalised to sum 1).  The data term is ``mse(k * x, image)``
            with ``k * x`` the convolution of the estimate, reflect-padded at
            the borders (edge-replicated when the kernel's half-width reaches
            the image's size), see :func:`dip_fast.tasks.blur`.
        output_shape: callable task only, required: ``(C, H, W)`` of the
            image to recover, C 1 or 3, H and W at least 8.

            A callable ``task`` is called as ``A(x)`` with ``x`` a
            ``(1, C, H, W)`` float32 tensor in [0, 1] on the run's device and
            must return a tensor of the observation's shape
            ``(1, C_y, H_y, W_y)`` (``image`` converted like any image:
            colour channels only, in [0, 1]), computed with differentiable
            torch operations; the data term is ``mse(A(x), image)``.  ``A``'s
            own parameters, if it is a module, are not fitted (freeze them
            with ``requires_grad_(False)`` to save their gradients).  The
            network works at a size padded to its multiple and the estimate
            is cropped to ``(H, W)`` before ``A`` sees it.  ``A`` is called
            once on a grey image before the run to check its output.  The
            result has ``output_shape`` and the kind of ``image`` (an alpha
            channel of ``image`` is dropped); ``info.task`` is ``'callable'``.
        iterations: number of optimisation steps (default: the preset's).
        preset: ``'auto'`` (default: ``'paper'`` on a GPU, ``'fast'`` on the
            CPU, with a warning giving the estimated run time), ``'paper'``
            (the paper's settings), ``'fast'``, ``'quick'`` (see
            :func:`dip_fast.tasks.preset_for` and the README for their
            quality and speed), a name in :data:`dip_fast.tasks.PRESETS`, or
            a :class:`dip_fast.tasks.Preset`.
        sigma: denoising only: the noise standard deviation in 0-255 units.
            It picks the input perturbation (1/30 at 25, 1/20 at 50) and
            the noise level that ``stop='early'`` compares the residual with;
            estimated with ``skimage.restoration.estimate_sigma`` if omitted.
            The other tasks keep their preset's perturbation (``'jpeg'``:
            1/30, the snail notebook's; compression artefacts are not
            Gaussian noise, so no level picks it); with ``stop='early'``
            jpeg and deblur estimate a level for the rule's check only.
        seed: seeds the network weights, the input and the perturbations.
            On the CPU the same seed gives the same result bit for bit; on
            CUDA only with ``deterministic=True`` (and still not bit for bit
            through torch ops that lack a deterministic CUDA kernel, such as
            bilinear upsampling's backward, of which torch warns).
            ``None`` draws a fresh seed (reported in the info).
        device: ``'cpu'``, ``'cuda'``, ``'cuda:N'`` (default: CUDA if available).
        backend: ``'fast'`` (fused kernels; falls back to the reference with a
            warning when the extension lacks them) or ``'reference'``.
        progress: show a tqdm progress bar (loss, and PSNR with ``ground_truth``).
        callback: ``callback(step, info)`` every ``sync_every`` steps (every
            step on the CPU, every 50 on CUDA, where reading values back
            from the GPU each step would stall it); ``step`` is the latest
            step and ``info`` holds
            ``loss``, ``psnr`` (against ``ground_truth`` or None),
            ``elapsed`` (s), ``backtracked``, ``output`` (the current
            estimate as a ``(1, C, H, W)`` tensor in [0, 1], colour only,
            cropped to the image) and ``render`` (a function returning the
            estimate in the caller's format, alpha included).  Returning
            True stops the run early, with its result so far.
        ground_truth: a clean image of the output's size (and colour
            channels), used only to report PSNR; it never influences the result.
        return_info: return ``(image, RestoreInfo)`` instead of the image.
        max_time: wall-clock budget in seconds; when it runs out the result
            so far is returned.  Ctrl-C does the same.
        num_threads: CPU threads for the run (the previous setting is restored).
        deterministic: use deterministic algorithms (cuDNN included) during the run.
        stop: ``'auto'`` (default): per task, whichever of ``'early'`` and
            ``'never'`` won on the validation images of the benchmark
            (:data:`AUTO_STOP`; ``'never'`` for tasks without early stopping).
            ``'early'`` (``'denoise'``, ``'jpeg'``, ``'deblur'`` only): stop
            without ground truth at the first step whose running average
            explains the observation down to its noise level (the
            discrepancy principle, see
            :class:`dip_fast.early_stop.DiscrepancyRule`), and return that
            average; when no step qualifies the run completes and returns
            the average of its last step (``info.stop_fallback``).  The noise
            level is the one estimated from the observation (for denoising
            the smaller of it and ``sigma``: a level set too high would stop
            before the image is fitted).  ``'never'``: run all
            ``iterations``.  ``iterations`` is the maximum either way (with
            ``'early'`` and no ``iterations``, :data:`EARLY_STOP_BUDGET` times
            the preset's count); ``info`` says why the run ended.
        step_mode: ``'auto'`` (default), ``'eager'``, or ``'graph'`` (CUDA
            only: the whole step replayed as one CUDA graph; see
            :mod:`dip_fast.step`).
        precision: ``'auto'`` (default), ``'fp32'``, ``'tf32'`` or ``'bf16'``
            (autocast and channels_last; weights and statistics stay fp32).
            On CUDA, ``'auto'`` runs the fastest step with recorded quality
            parity with eager fp32 (:data:`dip_fast.auto_step.RECORDED_PARITY`,
            empty until a GPU run records it); elsewhere, and until then,
            eager fp32.  ``info.step_mode`` and ``info.precision`` say what ran.

    Returns:
        The restored image, of the same kind as ``image``: uint8 in gives
        uint8 out, a tensor comes back on its device with its dtype and
        layout; a path gives a ``PIL.Image`` for 8-bit files and a numpy
        array (uint16) for 16-bit ones (and for a callable task's 16-bit or
        float colour result from a ``PIL.Image``).  With ``return_info`` a
        pair ``(image, RestoreInfo)``.

    Raises:
        ValueError, TypeError, FileNotFoundError: on bad arguments, naming
            the argument and what was expected; ValueError also when the
            estimated memory of the run exceeds the device's.
    """
    # ---- arguments (cheap checks first, before any pixel is touched)
    task, operator = _resolve_task(task)
    if iterations is not None:
        iterations = _check_int(iterations, "iterations", 1)
    if max_time is not None:
        max_time = _check_positive(max_time, "max_time")
    if num_threads is not None:
        num_threads = _check_int(num_threads, "num_threads", 1)
    if seed is not None:
        seed = _check_int(seed, "seed", 0)
    stop = _check_choice(stop, "stop", STOP_CHOICES)
    step_mode = _check_choice(step_mode, "step_mode", STEP_MODE_CHOICES)
    precision = _check_choice(precision, "precision", PRECISION_CHOICES)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(step, info), got {type(callback).__name__}")
    if task == "super_resolution":
        if scale is None:
            raise ValueError("scale is required for task='super_resolution' (an even integer such as 4)")
        scale = _check_int(scale, "scale", 2)
        if scale % 2:
            raise ValueError(f"scale must be even (2, 4, 8, ...): the paper's Lanczos-2 downsampler misaligns odd factors, got {scale}")
    elif scale is not None:
        raise ValueError(f"scale only applies to task='super_resolution', got scale={scale!r} for task={task!r}")
    if task == "inpaint" and mask is None:
        raise ValueError("mask is required for task='inpaint' (1/True = known pixel, same size as the image)")
    if task != "inpaint" and mask is not None:
        raise ValueError(f"mask only applies to task='inpaint', got a mask for task={task!r}")
    kernel = None
    if task == "deblur":
        if blur_kernel is None:
            raise ValueError("blur_kernel is required for task='deblur' ('gaussian:SIGMA', 'box:N' or a 2-D array)")
        kernel = tasks.make_blur_kernel(blur_kernel, "blur_kernel")
    elif blur_kernel is not None:
        raise ValueError(f"blur_kernel only applies to task='deblur', got a blur_kernel for task={task!r}")
    if task == "callable":
        if output_shape is None:
            raise ValueError("output_shape=(C, H, W) is required for a callable task: the shape of the image to recover")
        output_shape = _check_output_shape(output_shape)
    elif output_shape is not None:
        raise ValueError(f"output_shape only applies to a callable task, got output_shape={output_shape!r} for task={task!r}")
    if sigma is not None:
        if task != "denoise":
            raise ValueError(f"sigma only applies to task='denoise', got sigma={sigma!r} for task={task!r}")
        if isinstance(sigma, bool) or not isinstance(sigma, Real) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma must be a noise level >= 0 in 0-255 units, got {sigma!r}")
    if stop == "early" and task not in EARLY_STOP_TASKS:
        raise ValueError(f"stop='early' applies to tasks {EARLY_STOP_TASKS}, not {task!r}; use 'auto' or 'never'")
    stop = AUTO_STOP.get(task, "never") if stop == "auto" else stop
    dev = _resolve_device(device)
    make_net, backend_name = _resolve_backend(backend, dev)
    chosen, level = _resolve_preset(preset, task, scale, dev)
    if iterations is not None:
        chosen = chosen.with_overrides(iterations=iterations)
    elif stop == "early" and EARLY_STOP_BUDGET != 1.0:
        chosen = chosen.with_overrides(iterations=int(round(chosen.iterations * EARLY_STOP_BUDGET)))
    factor = scale or 1

    # ---- image size and memory, before the pixels are converted
    # A callable's observation may be smaller than an image (its operator sets the sizes).
    source = io.inspect_image(image, "image", min_size=1 if operator is not None else io.MIN_SIZE)
    spec = source.spec
    # The generated image before padding, in low-resolution pixels (times `factor`).
    out_c, out_h, out_w = output_shape or (spec.color_channels, spec.height, spec.width)
    n_scales = len(chosen.network["num_channels_down"])
    hr_multiple = 2**n_scales
    lr_multiple = hr_multiple // math.gcd(hr_multiple, factor)
    lr_min = -(-2 * hr_multiple // factor)  # the deepest level needs 2x2 pixels for BatchNorm

    def padded_size(h: int, w: int) -> Tuple[int, int]:
        """The network's working size for an image of ``h x w`` low-resolution pixels."""
        return tuple(-(-max(n, lr_min) // lr_multiple) * lr_multiple * factor for n in (h, w))

    padded_hw = padded_size(out_h, out_w)
    need = estimate_memory(chosen, out_c, padded_hw)
    have = _device_memory(dev)
    if need is not None and have is not None and need > have:
        raise ValueError(
            f"image of {out_h}x{out_w} is too large for {dev}: the run needs about "
            f"{_fmt_bytes(need)} but the device has {_fmt_bytes(have)}; crop or downscale it, or use a smaller preset"
        )

    # ---- pixels
    loaded = io.load_image(image, "image", source=source)
    spec = loaded.spec  # a file's orientation may have changed the size
    color = loaded.color
    c = color.shape[1]
    if operator is None:
        out_c, out_h, out_w = c, spec.height, spec.width
        padded_hw = padded_size(out_h, out_w)
    m = io.load_mask(mask, spec.height, spec.width, c) if task == "inpaint" else None
    gt = None
    if ground_truth is not None:
        gt = io.load_image(ground_truth, "ground_truth").color
        want = (out_c, out_h * factor, out_w * factor)
        if tuple(gt.shape[1:]) != want:
            raise ValueError(
                f"ground_truth must be a clean image of the output's shape {want[1]}x{want[2]} with {out_c} "
                f"colour channel(s), got {gt.shape[2]}x{gt.shape[3]} with {gt.shape[1]}"
            )

    if seed is None:
        seed = random.SystemRandom().randrange(2**63)
    flat = degenerate.constant_value(color, m) if operator is None else None
    if flat is not None:
        return _constant_result(
            flat, loaded.alpha, spec, factor, gt,
            RestoreInfo(task=task, preset=chosen.name, backend=backend_name, device=str(dev), seed=seed,
                        iterations=chosen.iterations, stop_reason="constant",
                        sigma=(float(sigma) if sigma is not None else 0.0) if task == "denoise" else None,
                        reg_noise_std=chosen.reg_noise_std, padded_size=padded_hw, estimated_memory=need or 0),
            return_info,
        )

    # ---- settings that depend on the pixels
    used_sigma = None
    if task == "denoise":
        used_sigma = float(sigma) if sigma is not None else _estimate_sigma(color)
        if used_sigma is None:
            warnings.warn("dip_fast: cannot estimate the noise level (PyWavelets missing); assuming sigma=25",
                          RuntimeWarning, stacklevel=2)
            used_sigma = 25.0
        if level:  # an explicit Preset or registry name keeps its own setting
            chosen = chosen.with_overrides(reg_noise_std=reg_noise_for_sigma(used_sigma))
    rule: Optional[DiscrepancyRule] = None
    if stop == "early":
        # The noise level the residual is held to: the observation's own (wavelet) estimate, which
        # measures the noise actually present (clipping at 0 and 1 leaves less than a nominal sigma);
        # a given sigma only lowers it, since a level set too high stops before the image is fitted.
        # None if it cannot be estimated: the rule then falls back.
        noise_level = _estimate_sigma(color)
        if noise_level is not None and task == "denoise" and sigma is not None:
            noise_level = min(noise_level, float(sigma))
        rule = DiscrepancyRule(None if noise_level is None else (noise_level / 255.0) ** 2,
                               tolerance=EARLY_STOP_TOLERANCE)

    # 'auto' comes from the recorded GPU parity evidence, one table for every caller (dip_fast.auto_step).
    step_mode, precision = auto_step.choose(dev, step_mode, precision)
    info = RestoreInfo(
        task=task, preset=chosen.name, backend=backend_name, device=str(dev), seed=seed,
        iterations=chosen.iterations, sigma=used_sigma, reg_noise_std=chosen.reg_noise_std,
        padded_size=padded_hw, estimated_memory=need or 0, stop=stop, step_mode=step_mode, precision=precision,
        stop_noise_sigma=math.sqrt(rule.noise_var) * 255.0 if rule is not None and rule.usable else None,
    )

    # ---- pad, build, fit
    # Deblurring and a callable crop the generated image to `box` inside the
    # data term, so their forward models see exactly the image (their
    # observation is not padded); the other tasks fit the padded observation.
    crop_in_term = task in ("deblur", "callable")
    generated = color if operator is None else color.new_zeros(1, 1, out_h, out_w)  # only its size matters
    padded, box = io.pad_to_multiple(generated, lr_multiple, lr_min)
    obs = (color if crop_in_term else padded).to(dev)
    m_pad = io.pad_to_multiple(m, lr_multiple, lr_min)[0].to(dev) if m is not None else None
    gt_dev = gt.to(dev) if gt is not None else None
    alpha = loaded.alpha
    if operator is not None:
        tasks.check_operator(operator, (out_c, out_h, out_w), obs, name="task")
        spec, alpha = _output_spec(spec, out_c, out_h, out_w), None
    if alpha is not None and factor > 1:
        alpha = io.resize_alpha(alpha, factor)

    with _run_settings(num_threads, deterministic):
        term = tasks.make_data_term(
            chosen, obs, m_pad, blur_kernel=kernel, operator=operator, box=box if crop_in_term else None
        )
        if isinstance(term, tasks.SuperResolutionTerm):
            fast_ds = _sr_downsampler(backend_name, c, factor, chosen.sr_kernel)
            if fast_ds is not None:
                term.downsampler = fast_ds.to(dev)
        # Weights come from the global RNG: fork it so the caller's stream is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = tasks.build_network(chosen, out_c, backend=make_net, device=dev)
        generator = torch.Generator(device=dev).manual_seed(seed)
        net_input = tasks.make_input(chosen, padded_hw, generator=generator, device=dev)

        stopper = _Monitor(
            info, box, factor, gt_dev, callback, progress, alpha, spec,
            warn_auto=(preset == "auto" and dev.type == "cpu"), cpu=dev.type == "cpu", max_time=max_time,
            noise_var=rule.noise_var if rule is not None and rule.usable else None,
        )
        kwargs = dict(chosen.fit_kwargs())
        kwargs.update(term.fit_kwargs())
        if gt_dev is not None:  # PSNR against the ground truth, on the device, every step
            kwargs.update(reference=gt_dev, reference_view=lambda x: io.crop(x, box, factor))
        try:
            result = fit(
                net, net_input, term, generator=generator, max_time=max_time,
                callback=stopper.on_step, should_stop=stopper.should_stop,
                stop="discrepancy" if rule is not None else "never",
                stop_bound=rule.bound if rule is not None else None,
                step_mode=info.step_mode, precision=info.precision, **kwargs,
            )
        finally:
            stopper.close()

    if result.stop_output is not None:  # early stopping: the average of the stopping step
        estimate = result.stop_output
    else:
        estimate = result.output_avg if result.output_avg is not None else result.output
    restored = io.crop(estimate, box, factor)
    info.stop_step = result.stop_step
    if rule is not None:
        _explain_stop(info, rule, result, term, estimate)
    info.psnr_history = list(result.psnr_ref_avg_history or result.psnr_ref_history)
    info.steps = result.steps
    info.step_mode = result.step_mode
    info.stop_reason = "callback" if result.stop_reason == "should_stop" else result.stop_reason
    info.interrupted = result.interrupted
    info.wall_time = result.wall_time
    info.loss_history = list(result.loss_history)
    info.backtrack_steps = list(result.backtrack_steps)
    if gt_dev is not None:
        info.psnr = float(_psnr(restored, gt_dev))
    out = io.from_tensor(restored, alpha, spec)
    return (out, info) if return_info else out


def _explain_stop(info: RestoreInfo, rule: DiscrepancyRule, result: Any, term: nn.Module,
                  estimate: torch.Tensor) -> None:
    """Fill the early-stopping fields of ``info``: the fallback flag, the residual ratio and a summary."""
    info.stop_fallback = result.stop_step is None and result.stop_reason == "completed"
    if rule.usable:
        with torch.no_grad():
            seen = term.degrade(estimate) if hasattr(term, "degrade") else estimate
            residual = float((seen - term.observation).square().mean())
        info.stop_residual_ratio = residual / rule.noise_var
    ratio = f"{info.stop_residual_ratio:.2f}" if info.stop_residual_ratio is not None else "n/a"
    if result.stop_step is not None:
        info.stop_summary = (
            f"stopped: at step {result.stop_step + 1} the average explained the observation down to its noise "
            f"level (residual {ratio} x sigma^2, accepted up to {rule.tolerance:g}; sigma "
            f"{info.stop_noise_sigma:.1f}); going on would fit the noise, so that average is returned")
    elif not rule.usable:
        info.stop_summary = ("fallback: the noise level could not be estimated, so early stopping cannot tell an "
                             "under-fitted estimate; the run's last average is returned")
    elif info.stop_fallback:
        info.stop_summary = (
            f"fallback: no step's average explained the observation down to {rule.tolerance:g} x sigma^2 "
            f"(sigma {info.stop_noise_sigma:.1f}); the returned last average still leaves {ratio} x sigma^2, "
            f"so it has not fitted the image to the noise level yet and more iterations may improve it")
    else:
        info.stop_summary = f"ended before the rule decided ({info.stop_reason}); the result so far is returned"


def _constant_result(flat: torch.Tensor, alpha: Optional[torch.Tensor], spec: io.ImageSpec, factor: int,
                     gt: Optional[torch.Tensor], info: RestoreInfo, return_info: bool) -> Any:
    """A constant image's restoration: the constant, at the output's size (see ``stop_reason='constant'``)."""
    _, c, _, _ = flat.shape
    restored = flat.expand(1, c, spec.height * factor, spec.width * factor).contiguous()
    if alpha is not None and factor > 1:
        alpha = io.resize_alpha(alpha, factor)
    if gt is not None:
        info.psnr = float(_psnr(restored, gt))  # inf when the ground truth is the same constant
    out = io.from_tensor(restored, alpha, spec)
    return (out, info) if return_info else out


class _Monitor:
    """Per-step bookkeeping of a run: progress bar, PSNR, user callback, CPU time estimate."""

    def __init__(self, info: RestoreInfo, box: Tuple[int, int, int, int], factor: int,
                 gt: Optional[torch.Tensor], callback: Optional[Callable[..., Any]], progress: bool,
                 alpha: Optional[torch.Tensor], spec: io.ImageSpec, *, warn_auto: bool, cpu: bool,
                 max_time: Optional[float], noise_var: Optional[float] = None) -> None:
        self.info, self.box, self.factor, self.gt = info, box, factor, gt
        self.callback, self.alpha, self.spec = callback, alpha, spec
        self.warn_auto, self.cpu, self.max_time = warn_auto, cpu, max_time
        self.noise_var = noise_var  # early stopping's sigma^2: the bar shows the residual against it
        self.stop = False
        self._t_first: Optional[float] = None
        self.bar = tqdm(total=info.iterations, desc=f"dip-fast {info.task}", unit="step",
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
                f"{_fmt_seconds(total)} on the CPU (measured {per_step * 1000:.0f} ms/step). "
                "Pass iterations=, max_time= or preset='quick' for a shorter run, or use a GPU.",
                # Point at the caller of restore(): this runs inside fit()'s callback.
                UserWarning, stacklevel=5,
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
