"""One call to restore an image: :func:`restore`.

``restore`` wires the stages of :mod:`dip_fast.pipeline` together:

1. :func:`dip_fast.pipeline.request.validate_request` checks every argument and
   resolves task, preset, device and backend, before any pixel is read;
2. :func:`dip_fast.pipeline.observation.prepare_observation` reads the images once,
   checks the run fits in memory, and pads them for the network;
3. :func:`dip_fast.pipeline.job.plan_job` fixes what depends on the pixels,
   :func:`dip_fast.pipeline.job.build_run` builds network, input and data term,
   and :func:`dip_fast.pipeline.job.fit_job` fits;
4. :func:`dip_fast.pipeline.job.finish` crops the estimate, fills in the
   :class:`RestoreInfo` and gives the image back in the caller's kind.

Several images, restarts and tiles go through :mod:`dip_fast.pipeline.many`
and :mod:`dip_fast.pipeline.tiles`, which run the same stages.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from . import io, tasks
from .core.memory import estimate_memory
from .pipeline import many
from .pipeline.budget import plan_to_budget
from .pipeline.info import RestoreInfo
from .pipeline.job import build_run, choose_execution, constant_result, finish, fit_job, plan_job, run_settings
from .pipeline.observation import prepare_observation
from .pipeline.request import PRESET_LEVELS, validate_request
from .tasks import registry

__all__ = ["RestoreInfo", "estimate_memory", "restore", "PRESET_LEVELS", "TASK_ALIASES"]


def __getattr__(name: str) -> Any:
    """Read-only views of the task registry under the names this module once kept as tables."""
    if name == "TASK_ALIASES":  # accepted spellings of each task named by a string
        return registry.aliases()
    if name == "EARLY_STOP_TASKS":
        return tuple(spec.name for spec in registry.all_tasks() if spec.early_stop)
    if name == "AUTO_STOP":
        return {spec.name: spec.auto_stop for spec in registry.all_tasks() if spec.early_stop}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    backend: str = "auto",
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
    time_budget: Optional[float] = None,
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
            stopping that keeps the blocks out), a callable forward
            operator ``A`` (needs ``output_shape``; see below), or a
            ``deepinv.physics.Physics`` (with ``pip install
            'dip_fast[deepinv]'``; :mod:`dip_fast.tasks.physics`): then
            ``image`` is its measurement ``y`` (a tensor or array of any
            real values and channel count), ``physics.A`` the operator, the
            result has the shape of ``physics.A_adjoint(y)`` (or
            ``output_shape``) and ``y``'s dtype, a Gaussian noise model's
            ``sigma`` (times 255) is the ``sigma``, and ``stop='auto'``
            stops early when it is above 0; ``info.task`` is ``'physics'``.
            :class:`dip_fast.deepinv.DeepImagePrior` wraps this as a deepinv
            reconstructor.
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
        output_shape: callable task only, required (and a non-linear
            Physics): ``(C, H, W)`` of the image to recover, any C >= 1 (the
            network's output width; C other than 1 or 3 comes back as an
            array or tensor, not as a PIL image), H and W at least 8.

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
            :func:`dip_fast.tasks.preset_for`, and docs/guide/presets.md for
            their quality and speed), a name in :data:`dip_fast.tasks.PRESETS`, or
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
        backend: ``'auto'`` (default: the fastest of the fused kernels and
            PyTorch's own ops, timed on this device; see ``step_mode``),
            ``'fast'`` (fused kernels; falls back to the reference with a
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
            ``'early'`` and no ``iterations``,
            :data:`~dip_fast.pipeline.request.EARLY_STOP_BUDGET` times the
            preset's count); ``info`` says why the run ended.
        step_mode: ``'auto'`` (default), ``'eager'``, or ``'graph'`` (CUDA
            only: the whole step replayed as one CUDA graph, trusted once its
            first replay matched an eager step; see :mod:`dip_fast.core.step`).
        precision: ``'auto'`` (default), ``'fp32'``, ``'tf32'`` or ``'bf16'``
            (autocast and channels_last; weights and statistics stay fp32).
            ``'auto'`` is PyTorch's default (TF32 convolutions on CUDA, fp32
            on the CPU), or bf16 where it is faster and
            :data:`dip_fast.core.auto_step.RECORDED_PARITY` shows it restores
            as well on this kind of device.  With ``'auto'`` in ``backend``,
            ``step_mode`` or ``precision``, the first seconds of the run time
            the candidate steps at the run's shape on copies, and the fastest
            runs (the paper's step unless another is at least 5% faster;
            :mod:`dip_fast.core.tuning`); the choice is cached per device and
            shape.  A run too short to pay for timing, ``DIP_FAST_TUNING=off``
            and ``deterministic=True`` run a fixed choice.
            ``info.execution`` says what ran and how it was chosen.
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
        time_budget: seconds the call may take, all included.  Once the
            step is chosen and its time at this size known, the run gets as
            many of the preset's steps as fit, and stops at the budget
            (:mod:`dip_fast.pipeline.budget`; ``info.time_plan`` says what
            was planned and why).  Lists, restarts and tiles share it as a
            hard stop.  ``max_time`` stays a hard stop of the fit alone.

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
        time_budget=time_budget,
    )
    started = time.perf_counter()  # time_budget counts from here
    run_seed = random.SystemRandom().randrange(2**63) if request.seed is None else request.seed
    if request.time_budget is not None and (isinstance(image, (list, tuple)) or request.restarts > 1
                                            or request.tile is not None):
        # Several runs share the budget as a hard stop (planning their steps needs each one's time).
        request = dataclasses.replace(request, max_time=min(request.max_time or math.inf, request.time_budget))
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
        return constant_result(request, observed, run_seed)
    job = plan_job(request, observed, run_seed)
    with run_settings(request.num_threads, request.deterministic):
        execution = choose_execution(request, [job])
        run = build_run(request, observed, job.preset, run_seed, execution)
        fitting = request if request.time_budget is None else plan_to_budget(request, job, execution, run, started)
        result = fit_job(fitting, observed, run, job.info, job.rule)
    return finish(request, observed, run.term, result, job.info, job.rule)
