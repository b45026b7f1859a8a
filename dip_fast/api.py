"""One call to restore an image: :func:`restore`.

``restore`` runs in four stages, each its own function:

1. :func:`dip_fast.pipeline.request.validate_request` checks every argument and
   resolves task, preset, device and backend, before any pixel is read;
2. :func:`dip_fast.pipeline.observation.prepare_observation` reads the images once,
   checks the run fits in memory, and pads them for the network;
3. :func:`dip_fast.tasks.build_run` (shared with :func:`dip_fast.tasks.solve`)
   builds network, input and data term, and :func:`dip_fast.core.fit.fit` fits;
4. :func:`_finish` crops the estimate, fills in the :class:`RestoreInfo`
   and gives the image back in the caller's kind.

What differs between tasks comes from the task registry
(:mod:`dip_fast.tasks.registry`); this module only wires the stages together
and holds the early-stopping settings.
"""
from __future__ import annotations

import contextlib
import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import _caller, _ops, io, tasks
from .core import auto_step
from .pipeline import noise_level
from .core.early_stop import DiscrepancyRule
from .core.fit import FitResult, fit
from .core.memory import estimate_memory
from .core.metrics import psnr as _psnr
from .pipeline.monitor import ProgressMonitor
from .pipeline.observation import Observation, prepare_observation
from .pipeline.request import PRECISION_CHOICES, PRESET_LEVELS, STEP_MODE_CHOICES, STOP_CHOICES  # noqa: F401  (kept here)
from .pipeline.request import RestoreRequest, validate_request
from .tasks import registry

__all__ = ["RestoreInfo", "estimate_memory", "restore", "PRESET_LEVELS", "TASK_ALIASES"]

#: What ``stop='auto'`` does per task is its spec's ``auto_stop`` (:mod:`dip_fast.tasks.builtin`): ``'early'``
#: (the discrepancy rule; denoise) where it beat the preset's fixed step count on the held-out validation runs of
#: ``bench/es_replay.py`` (bench/README.md, "Early stopping on photographs"), else ``'never'``, the fixed count.
#: The rule's tolerance (:class:`dip_fast.core.early_stop.DiscrepancyRule`), chosen on the tuning runs of the
#: same benchmark (0.9-1.1 tried), with the noise level of :mod:`dip_fast.pipeline.noise_level`.
EARLY_STOP_TOLERANCE = 0.98
#: With ``stop='early'`` and no ``iterations``, the step budget is this multiple of the preset's count:
#: a run that has not explained the observation by then falls back to the average at the budget.  Chosen
#: on the tuning runs with the tolerance (1, 1.25 and 1.5 tried): most photographs at 128x128 have not
#: reached the noise level by the fast presets' count, and going on while they have not gains there
#: (at sigma 15, 1-1.9 dB between 1500 and 2250 steps).
EARLY_STOP_BUDGET = 1.5


def __getattr__(name: str) -> Any:
    """Read-only views of the task registry under the names this module once kept as tables."""
    if name == "TASK_ALIASES":  # accepted spellings of each task named by a string
        return registry.aliases()
    if name == "EARLY_STOP_TASKS":
        return tuple(spec.name for spec in registry.all_tasks() if spec.early_stop)
    if name == "AUTO_STOP":
        return {spec.name: spec.auto_stop for spec in registry.all_tasks() if spec.early_stop}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    restarts: int = 1
    uncertainty: Optional[Any] = None
    packed: int = 1
    tiles: int = 1
    tile_size: Optional[Tuple[int, int]] = None


def reg_noise_for_sigma(sigma: float) -> float:
    """Input perturbation for a noise level (0-255): the notebook's 1/30 at sigma 25 and 1/20 at 50.

    Linear in between, clamped outside, since the paper gives only those two points.
    """
    t = min(max((sigma - 25.0) / 25.0, 0.0), 1.0)
    return (1.0 - t) / 30.0 + t / 20.0


def _estimate_sigma(color: torch.Tensor) -> float:
    """Noise level (0-255) of a ``(1, C, H, W)`` image, always finite.

    See :func:`dip_fast.pipeline.noise_level.estimate_sigma` (0, with a warning, for an image that shows no noise).
    """
    return noise_level.estimate_sigma(color, stacklevel=_caller.stacklevel())  # the caller of restore()


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
    if backend_name != "fast" or not _ops.has_ops("downsample", "_downsample_backward"):
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
    restarts: int = 1,
    pack: Union[int, str] = "auto",
    tile: Optional[int] = None,
) -> Any:
    """Restore an image (or a list of images) with Deep Image Prior (Ulyanov et al., CVPR 2018).

    A randomly initialised hourglass network is fitted to the degraded image
    alone; stopping early keeps the natural-image part before the network
    learns the noise or the holes.

    Args:
        image: a path, ``PIL.Image``, numpy array ``HxW``/``HxWxC`` (uint8,
            uint16, or float in [0, 1]) or torch tensor ``CxHxW``/``1xCxHxW``
            (float in [0, 1]).  Grey, grey+alpha, RGB and RGBA; alpha is
            passed through (resized for super-resolution).  Any size from
            8x8 up: the image is reflect-padded to the network's multiple
            and cropped back.  A list (or tuple) of images returns a list of
            results, each what ``restore`` of that image alone returns (same
            seed); images of one size are trained together, up to ``pack``
            networks in one step (:mod:`dip_fast.core.packed`).  ``mask`` and
            ``ground_truth`` are then lists of the same length (or None).
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
            estimated from the observation if omitted (:mod:`dip_fast.pipeline.noise_level`).
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
            True stops the run early, with its result so far.  One run
            only: a callback is refused with ``restarts > 1``, a list of
            images or tiles, where it could follow only one of the runs.
        ground_truth: a clean image of the output's size (and colour
            channels), used only to report PSNR; it never influences the result.
        return_info: return ``(image, RestoreInfo)`` instead of the image.
        max_time: wall-clock budget in seconds; when it runs out the result
            so far is returned.  Ctrl-C does the same.  It bounds the whole
            call: runs that go one after another (a list in several packs)
            share it, each an equal share of the time left when it starts.
            Ctrl-C ends the pack running and starts no other: the restarts
            that ran make the result, and a list with an image not started
            raises ``KeyboardInterrupt``.
        num_threads: CPU threads for the run (the previous setting is restored).
        deterministic: use deterministic algorithms (cuDNN included) during the run.
        stop: ``'auto'`` (default): per task, whichever of ``'early'`` and
            ``'never'`` won on the validation images of the benchmark
            (the task's ``auto_stop`` in :mod:`dip_fast.tasks.registry`;
            ``'never'`` for tasks without early stopping).
            ``'early'`` (``'denoise'``, ``'jpeg'``, ``'deblur'`` only): stop
            without ground truth at the first step whose running average
            explains the observation down to its noise level (the
            discrepancy principle, see
            :class:`dip_fast.core.early_stop.DiscrepancyRule`), and return that
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
            :mod:`dip_fast.core.step`).
        precision: ``'auto'`` (default), ``'fp32'``, ``'tf32'`` or ``'bf16'``
            (autocast and channels_last; weights and statistics stay fp32).
            On CUDA, ``'auto'`` runs the fastest step with recorded quality
            parity with eager fp32 (:data:`dip_fast.core.auto_step.RECORDED_PARITY`,
            empty until a GPU run records it); elsewhere, and until then,
            eager fp32.  ``info.step_mode`` and ``info.precision`` say what ran.
        restarts: ``K`` independent runs of the image (seeds ``seed`` to
            ``seed + K - 1``), trained together; their mean is returned
            (the paper averaged two runs for its best denoising result), with
            ``info.restarts`` and ``info.uncertainty``, the per-pixel standard
            deviation across the runs.  The first run is the one
            ``restarts=1`` makes.
        pack: the most networks trained in one step, for ``restarts`` and
            lists: ``'auto'`` (default) as many as the memory estimate lets
            fit (at most :data:`dip_fast.pipeline.many.MAX_PACK_CPU` on the CPU,
            where larger packs gain nothing, and
            :data:`dip_fast.pipeline.many.MAX_PACK_CUDA` on a GPU), or an integer
            (refused when the pack would not fit in memory).
        tile: restore the image in overlapping tiles of this side (in the
            observation's pixels; at least 16), trained as packs and
            blended with a smooth window (:mod:`dip_fast.pipeline.tiles`).  Without
            it, an image whose estimated run exceeds the device's memory is
            tiled automatically.  Either way a warning and ``info.tiles``
            say so.  Each task has a tiling rule: denoising, JPEG and
            inpainting (the mask with it) tile the image, super-resolution
            its low-resolution input, deblurring with overlaps at least the
            kernel's size; a callable task is refused.  Tiles share one
            noise level, estimated on the whole image.

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

    Examples:
        >>> import numpy as np
        >>> from dip_fast import restore
        >>> noisy = np.random.default_rng(0).random((16, 16, 3), dtype=np.float32)
        >>> out, info = restore(noisy, "denoise", preset="quick", iterations=2, device="cpu", return_info=True)
        >>> out.shape, out.dtype, info.task, info.steps
        ((16, 16, 3), dtype('float32'), 'denoise', 2)
    """
    request = validate_request(
        task, mask=mask, scale=scale, blur_kernel=blur_kernel, output_shape=output_shape, iterations=iterations,
        preset=preset, sigma=sigma, seed=seed, device=device, backend=backend, progress=progress, callback=callback,
        return_info=return_info, max_time=max_time, num_threads=num_threads, deterministic=deterministic,
        stop=stop, step_mode=step_mode, precision=precision, restarts=restarts, pack=pack, tile=tile,
    )
    run_seed = random.SystemRandom().randrange(2**63) if request.seed is None else request.seed
    from .pipeline import many  # several runs at once build on this module's stages

    if request.tile is not None:
        return many.restore_tiled(request, image, mask, ground_truth, run_seed, request.tile, "tile was given")
    if not isinstance(image, (list, tuple)):
        fitting = many.auto_tile(request, image)
        if fitting is not None:
            return many.restore_tiled(request, image, mask, ground_truth, run_seed, fitting,
                                      "the whole image would not fit in the device's memory")
    if isinstance(image, (list, tuple)) or request.restarts > 1:
        return many.restore_many(request, image, mask, ground_truth, run_seed)
    observed = prepare_observation(request, image, mask, ground_truth)
    if observed.constant is not None:
        return _constant_result(request, observed, run_seed)
    job = _plan_job(request, observed, run_seed)
    with _run_settings(request.num_threads, request.deterministic):
        run = _build_run(request, observed, job.preset, run_seed)
        result = _fit(request, observed, run, job.info, job.rule)
    return _finish(request, observed, run.term, result, job.info, job.rule)


# --------------------------------------------------------------------------
# The stages after validation and preparation
# --------------------------------------------------------------------------


@dataclass
class Job:
    """One run's settings once its pixels are known: preset, stopping rule and the info to fill."""

    observed: Observation
    seed: int
    preset: tasks.Preset
    rule: Optional[DiscrepancyRule]
    info: "RestoreInfo"


def _plan_job(request: RestoreRequest, observed: Observation, seed: int) -> Job:
    """The pixel-dependent settings of one run (:func:`_pixel_settings`) and its :class:`RestoreInfo`."""
    chosen, used_sigma, rule = _pixel_settings(request, observed.color)
    # 'auto' comes from the recorded GPU parity evidence, one table for every caller (dip_fast.core.auto_step).
    step_mode, precision = auto_step.choose(request.device, request.step_mode, request.precision)
    info = RestoreInfo(
        task=request.task.name, preset=chosen.name, backend=request.backend, device=str(request.device),
        seed=seed, iterations=chosen.iterations, sigma=used_sigma, reg_noise_std=chosen.reg_noise_std,
        padded_size=observed.padded_size, estimated_memory=observed.estimated_memory, stop=request.stop,
        step_mode=step_mode, precision=precision,
        stop_noise_sigma=math.sqrt(rule.noise_var) * 255.0 if rule is not None and rule.usable else None,
    )
    return Job(observed, seed, chosen, rule, info)


def _pixel_settings(request: RestoreRequest, color: torch.Tensor
                    ) -> Tuple[tasks.Preset, Optional[float], Optional[DiscrepancyRule]]:
    """The settings that depend on the pixels: the noise level, the preset's perturbation, the stopping rule."""
    chosen, used_sigma = request.preset, None
    takes_sigma = request.task.accepts("sigma")
    # The estimate of the observation's noise (dip_fast.pipeline.noise_level), made once for both of its uses below.
    wanted = (takes_sigma and request.sigma is None) or request.stop == "early"
    estimate = _estimate_sigma(color) if wanted else None
    if takes_sigma:
        used_sigma = request.sigma if request.sigma is not None else estimate
        if request.level:  # an explicit Preset or registry name keeps its own setting
            chosen = chosen.with_overrides(reg_noise_std=reg_noise_for_sigma(used_sigma))
    rule: Optional[DiscrepancyRule] = None
    if request.stop == "early":
        # The noise level the residual is held to: the observation's own estimate, which measures
        # the noise actually present (clipping at 0 and 1 leaves less than a nominal sigma); a given
        # sigma only lowers it, since a level set too high stops before the image is fitted.  An
        # image that shows no noise (0) makes the rule unusable, and the run falls back.
        level = estimate  # made above whenever stop is 'early'
        if takes_sigma and request.sigma is not None:
            level = min(level, request.sigma)
        rule = DiscrepancyRule((level / 255.0) ** 2, tolerance=EARLY_STOP_TOLERANCE)
    return chosen, used_sigma, rule


def _build_run(request: RestoreRequest, observed: Observation, chosen: tasks.Preset, seed: int) -> tasks.Run:
    """The data term, with the fast downsampler where it applies, then network and input from ``seed``."""
    box, factor = observed.box, request.factor
    term = tasks.make_data_term(chosen, observed.observation, observed.mask, blur_kernel=request.blur_kernel,
                                operator=request.operator, box=box if request.task.crop_in_term else None)
    if isinstance(term, tasks.SuperResolutionTerm):
        fast_ds = _sr_downsampler(request.backend, observed.color.shape[1], factor, chosen.sr_kernel)
        if fast_ds is not None:
            term.downsampler = fast_ds.to(request.device)
    generator = torch.Generator(device=request.device).manual_seed(seed)
    # Weights come from the global RNG: fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tasks.build_run(chosen, term, observed.shape[0], observed.padded_size, backend=request.builder,
                               generator=generator, reference=observed.ground_truth,
                               reference_view=lambda x: io.crop(x, box, factor))


def _monitor(request: RestoreRequest, observed: Observation, info: "RestoreInfo",
             rule: Optional[DiscrepancyRule]) -> ProgressMonitor:
    """The progress bar, the caller's callback and the CPU time warning of a run."""
    cpu = request.device.type == "cpu"
    return ProgressMonitor(
        info, observed.box, request.factor, observed.ground_truth, request.callback, request.progress,
        observed.alpha, observed.spec, warn_auto=request.auto_preset and cpu, cpu=cpu, max_time=request.max_time,
        noise_var=rule.noise_var if rule is not None and rule.usable else None,
    )


def _fit(request: RestoreRequest, observed: Observation, run: tasks.Run, info: "RestoreInfo",
         rule: Optional[DiscrepancyRule]) -> FitResult:
    """Fit the run under a progress monitor, with the early-stopping rule if any."""
    monitor = _monitor(request, observed, info, rule)
    try:
        return fit(
            run.net, run.net_input, run.term, max_time=request.max_time,
            callback=monitor.on_step, should_stop=monitor.should_stop,
            stop="discrepancy" if rule is not None else "never",
            stop_bound=rule.bound if rule is not None else None,
            step_mode=info.step_mode, precision=info.precision, **run.fit_kwargs,
        )
    finally:
        monitor.close()


def _finish(request: RestoreRequest, observed: Observation, term: nn.Module, result: FitResult,
            info: "RestoreInfo", rule: Optional[DiscrepancyRule]) -> Any:
    """The estimate cropped and given back in the caller's kind, and ``info`` completed from the fit."""
    restored = _complete(request, observed, term, result, info, rule)
    out = io.from_tensor(restored, observed.alpha, observed.spec)
    return (out, info) if request.return_info else out


def _complete(request: RestoreRequest, observed: Observation, term: nn.Module, result: FitResult,
              info: "RestoreInfo", rule: Optional[DiscrepancyRule]) -> torch.Tensor:
    """The run's estimate, cropped to the image (``(1, C, H, W)``), and ``info`` completed from the fit."""
    if result.stop_output is not None:  # early stopping: the average of the stopping step
        estimate = result.stop_output
    else:
        estimate = result.output_avg if result.output_avg is not None else result.output
    restored = io.crop(estimate, observed.box, request.factor)
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
    if observed.ground_truth is not None:
        info.psnr = float(_psnr(restored, observed.ground_truth))
    return restored


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


def _constant_result(request: RestoreRequest, observed: Observation, seed: int) -> Any:
    """A constant image's restoration: the constant, at the output's size (see ``stop_reason='constant'``)."""
    preset, spec, factor = request.preset, observed.spec, request.factor
    sigma = (request.sigma if request.sigma is not None else 0.0) if request.task.accepts("sigma") else None
    info = RestoreInfo(task=request.task.name, preset=preset.name, backend=request.backend,
                       device=str(request.device), seed=seed, iterations=preset.iterations, stop_reason="constant",
                       sigma=sigma, reg_noise_std=preset.reg_noise_std, padded_size=observed.padded_size,
                       estimated_memory=observed.estimated_memory)
    flat = observed.constant
    restored = flat.expand(1, flat.shape[1], spec.height * factor, spec.width * factor).contiguous()
    if observed.ground_truth is not None:
        info.psnr = float(_psnr(restored, observed.ground_truth))  # inf when the ground truth is the same constant
    out = io.from_tensor(restored, observed.alpha, spec)
    return (out, info) if request.return_info else out
