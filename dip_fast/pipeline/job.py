"""The stages of one restoration after its request is checked and its images are read.

:func:`plan_job` fixes what depends on the pixels (noise level, preset,
stopping rule) and starts the :class:`~dip_fast.pipeline.info.RestoreInfo`;
:func:`build_run` builds the data term, network and input; :func:`fit_job`
fits under the progress monitor; :func:`finish` crops the estimate and gives
it back in the caller's kind. :func:`dip_fast.api.restore` runs them for one
image, :mod:`dip_fast.pipeline.many` for several.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import _caller, _ops, io, tasks
from ..core import tuning
from ..core.networks import FAST_FALLBACK, execution_builder
from ..core.packed import pack as pack_networks
from ..core.tuning import Candidate, Decision
from ..core.early_stop import ClippedBound, DiscrepancyRule
from ..core.fit import FitResult, fit, timing_runner
from ..core.metrics import psnr
from . import noise_level
from .info import RestoreInfo
from .monitor import ProgressMonitor
from .observation import Observation
from .request import EARLY_STOP_CLIP_TOLERANCE, EARLY_STOP_TOLERANCE, RestoreRequest

__all__ = ["CropEach", "Job", "assemble", "build_run", "choose_execution", "complete", "constant_result", "estimate_sigma", "finish", "fit_job",
           "make_monitor", "plan_job", "reg_noise_for_sigma", "run_settings", "timing_step"]

def reg_noise_for_sigma(sigma: float) -> float:
    """Input perturbation for a noise level (0-255): the notebook's 1/30 at sigma 25 and 1/20 at 50.

    Linear in between, clamped outside, since the paper gives only those two points.
    """
    t = min(max((sigma - 25.0) / 25.0, 0.0), 1.0)
    return (1.0 - t) / 30.0 + t / 20.0


def estimate_sigma(color: torch.Tensor, clipped: bool = True) -> float:
    """Noise level (0-255) of a ``(1, C, H, W)`` image, always finite; before clipping at 0 and 1 when ``clipped``.

    See :func:`dip_fast.pipeline.noise_level.estimate_sigma` (0, with a warning, for an image that shows no noise).
    """
    return noise_level.estimate_sigma(color, stacklevel=_caller.stacklevel(), clipped=clipped)  # restore()'s caller


# --------------------------------------------------------------------------
# Run-time settings
# --------------------------------------------------------------------------


@contextlib.contextmanager
def run_settings(num_threads: Optional[int], deterministic: bool) -> Iterator[None]:
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


def sr_downsampler(backend_name: str, channels: int, factor: int, kernel_type: str) -> Optional[nn.Module]:
    """The fast backend's Lanczos downsampler for the super-resolution data term, if the op is available.

    This is the single place where ``dip_fast.ops.Downsample`` plugs into
    restoration: it takes the reference ``Downsampler``'s arguments and
    replaces it inside :class:`dip_fast.tasks.SuperResolutionTerm`.  None
    keeps the reference downsampler.
    """
    if backend_name != "fast" or not _ops.has_ops("downsample", "_downsample_backward"):
        return None
    try:
        from ..ops import Downsample
    except ImportError:  # a tree without the op's Python wrapper
        return None
    try:
        return Downsample(channels, factor, kernel_type, phase=0.5, preserve_size=True)
    except Exception as exc:  # an op that does not support these options
        warnings.warn(f"dip_fast: fast Downsample unavailable ({exc}); using the reference", RuntimeWarning, stacklevel=3)
        return None


@dataclass
class Job:
    """One run's settings once its pixels are known: preset, stopping rule and the info to fill."""

    observed: Observation
    seed: int
    preset: tasks.Preset
    rule: Optional[DiscrepancyRule]
    info: RestoreInfo


def plan_job(request: RestoreRequest, observed: Observation, seed: int) -> Job:
    """The pixel-dependent settings of one run (:func:`pixel_settings`) and its :class:`RestoreInfo`."""
    chosen, used_sigma, rule = pixel_settings(request, observed.color)
    # What runs is set by choose_execution; until then, the caller's fixed choices or the baseline's.
    base = tuning.baseline(request.device, "auto", request.step_mode, request.precision)
    step_mode, precision = base.step_mode, base.precision
    info = RestoreInfo(
        task=request.task.name, preset=chosen.name, backend=request.backend, device=str(request.device),
        seed=seed, iterations=chosen.iterations, sigma=used_sigma, reg_noise_std=chosen.reg_noise_std,
        padded_size=observed.padded_size, estimated_memory=observed.estimated_memory, stop=request.stop,
        step_mode=step_mode, precision=precision,
        stop_noise_sigma=math.sqrt(rule.noise_var) * 255.0 if rule is not None and rule.usable else None,
    )
    return Job(observed, seed, chosen, rule, info)


def pixel_settings(request: RestoreRequest, color: torch.Tensor
                    ) -> Tuple[tasks.Preset, Optional[float], Optional[DiscrepancyRule]]:
    """The settings that depend on the pixels: the noise level, the preset's perturbation, the stopping rule."""
    chosen, used_sigma = request.preset, None
    takes_sigma = request.task.accepts("sigma")
    # A measurement (a deepinv Physics's y) is not an image: its noise cannot be estimated from it, and
    # only a given sigma (the Physics's own) sets the perturbation and the stopping level.
    measured = request.task.measurement
    # The estimate of the observation's noise (dip_fast.pipeline.noise_level), made once for both of its uses below.
    wanted = not measured and ((takes_sigma and request.sigma is None) or request.stop == "early")
    # Gaussian noise (a task that takes sigma) is read before its clipping at 0 and 1, which the stopping
    # rule then models; other observations (JPEG's error, a deblurring's) as the noise present.
    estimate = estimate_sigma(color, clipped=takes_sigma) if wanted else None
    if takes_sigma:
        used_sigma = request.sigma if request.sigma is not None else estimate
        if request.level and used_sigma is not None:  # an explicit Preset or registry name keeps its own setting
            chosen = chosen.with_overrides(reg_noise_std=reg_noise_for_sigma(used_sigma))
    rule: Optional[DiscrepancyRule] = None
    if request.stop == "early":
        # The noise level the residual is held to: the observation's own estimate; a given sigma only
        # lowers it, since a level set too high stops before the image is fitted.  Where the Gaussian
        # noise was clipped at 0 and 1 (values sit there), the rule holds the residual to the expected
        # residual under clipping at the current average instead of one sigma^2 per pixel.  An
        # image that shows no noise (0) makes the rule unusable, and the run falls back.  A
        # measurement's level is its given sigma (none: unusable, the run falls back).
        if measured:
            level = request.sigma or 0.0
        else:
            level = estimate  # made above whenever stop is 'early'
            if takes_sigma and request.sigma is not None:
                level = min(level, request.sigma)
        clip = (0.0, 1.0) if takes_sigma and not measured and noise_level.clipped_share(color) > 0 else None
        tolerance = EARLY_STOP_CLIP_TOLERANCE if clip is not None else EARLY_STOP_TOLERANCE
        rule = DiscrepancyRule((level / 255.0) ** 2, tolerance=tolerance, clip=clip)
    return chosen, used_sigma, rule


def build_run(request: RestoreRequest, observed: Observation, chosen: tasks.Preset, seed: int,
              execution: Optional[Decision] = None) -> tasks.Run:
    """The data term, with the fast downsampler where it applies, then network and input from ``seed``.

    ``execution`` (from :func:`choose_execution`) sets the backend and the
    layout; without it, the request's builder runs as it is.
    """
    box, factor = observed.box, request.factor
    backend_name, builder = request.backend, request.builder
    if execution is not None:
        builder, backend_name = execution_builder(execution.choice.backend, execution.choice.layout, request.device,
                                                  chosen.network.arch)
    term = tasks.make_data_term(chosen, observed.observation, observed.mask, blur_kernel=request.blur_kernel,
                                operator=request.operator, box=box if request.task.crop_in_term else None)
    if isinstance(term, tasks.SuperResolutionTerm):
        fast_ds = sr_downsampler(backend_name, observed.color.shape[1], factor, chosen.sr_kernel)
        if fast_ds is not None:
            term.downsampler = fast_ds.to(request.device)
    generator = torch.Generator(device=request.device).manual_seed(seed)
    # Weights come from the global RNG: fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tasks.build_run(chosen, term, observed.shape[0], observed.padded_size, backend=builder,
                               generator=generator, reference=observed.ground_truth,
                               reference_view=lambda x: io.crop(x, box, factor))


#: The seed of the throwaway runs that time the candidates (never the run's own: timing must not touch it).
TIMING_SEED = 0x7153


def execution_options(request: RestoreRequest) -> Tuple[List[Candidate], Candidate]:
    """The candidates open to ``request`` (the baseline first) and the choice when nothing is timed."""
    # 'fast' without its compiled ops stays 'fast': its builder warns once and builds the reference,
    # and the info reports the fallback (request.backend).
    backend = "fast" if request.backend == FAST_FALLBACK else request.backend
    fast = request.fast_available
    options = tuning.candidates(request.device, backend, request.step_mode, request.precision, fast_available=fast)
    fallback = tuning.fixed(request.device, backend, request.step_mode, request.precision, fast_available=fast)
    return options, fallback


def choose_execution(request: RestoreRequest, jobs: Sequence[Job], packed: bool = False,
                     budget_s: Optional[float] = None) -> Decision:
    """How the runs of ``jobs`` (one, or a pack of them when ``packed``) execute their steps.

    Times the candidates of :func:`execution_options` on throwaway copies
    of the run at its real shape and pack size (:func:`dip_fast.core.tuning.tune`),
    or reads the cache, and records the decision in every job's info.
    ``budget_s`` times for that long, whatever the cache holds (``dip-fast tune``).
    """
    options, fallback = execution_options(request)
    first = jobs[0]
    networks = len(jobs) if packed else 1
    key = tuning.cache_key(request.device, first.preset.network,
                           (first.observed.shape[0], *first.observed.padded_size), networks, torch.float32, options)

    def make_step(candidate: Candidate) -> Callable[[], None]:
        return timing_step(request, jobs, candidate, packed)

    decision = tuning.tune(options, make_step, iterations=first.preset.iterations, device=request.device, key=key,
                           fallback=fallback, deterministic=request.deterministic, max_time=request.max_time,
                           budget_s=budget_s)
    for job in jobs:
        record_execution(job.info, decision, request)
    return decision


def timing_step(request: RestoreRequest, jobs: Sequence[Job], candidate: Candidate,
                packed: bool = False) -> Callable[[], None]:
    """One step of a throwaway copy of the run of ``jobs`` executed as ``candidate``, as a function.

    The copy has the run's shape, pack size, data term and settings, and
    weights and input from :data:`TIMING_SEED`, never the run's own seed.
    """
    networks = len(jobs) if packed else 1
    timed = list(jobs[:networks])
    decision = Decision(candidate, "fixed")
    runs = [build_run(request, job.observed, job.preset, TIMING_SEED + i, decision) for i, job in enumerate(timed)]
    if packed:
        net, net_input, term, settings = assemble(runs, timed, request.factor)
    else:
        net, net_input, term, settings = runs[0].net, runs[0].net_input, runs[0].term, dict(runs[0].fit_kwargs)
    if timed[0].rule is not None:
        bounds = [job.rule.bound for job in timed]
        settings.update(stop="discrepancy", stop_bound=bounds if packed else bounds[0])
    return timing_runner(net, net_input, term, step_mode=candidate.step_mode, precision=candidate.precision,
                         networks=networks, **settings)


def record_execution(info: RestoreInfo, decision: Decision, request: RestoreRequest) -> None:
    """``info``'s backend, step mode, precision and ``execution`` from ``decision``."""
    choice = decision.choice
    fell_back = request.backend == FAST_FALLBACK
    info.backend = FAST_FALLBACK if fell_back else choice.backend
    info.step_mode, info.precision = choice.step_mode, choice.precision
    info.execution = {**decision.as_dict(), "backend": info.backend}


def assemble(runs: Sequence[tasks.Run], jobs: Sequence[Job], factor: int
             ) -> Tuple[nn.Module, torch.Tensor, nn.Module, Dict[str, Any]]:
    """The runs of a pack as one: the packed network, the inputs side by side, the packed term, the fit settings."""
    term = tasks.PackedTerm([run.term for run in runs])
    settings = dict(runs[0].fit_kwargs)
    settings.update(term.fit_kwargs())
    settings["generator"] = [run.fit_kwargs["generator"] for run in runs]
    settings["reg_noise_std"] = [job.preset.reg_noise_std for job in jobs]
    references = [run.fit_kwargs.get("reference") for run in runs]
    settings.pop("reference_view", None)
    settings.pop("reference", None)
    if all(r is not None for r in references):
        settings["reference"] = torch.cat(references)
        settings["reference_view"] = CropEach([job.observed.box for job in jobs], factor)
    return (pack_networks([run.net for run in runs]), torch.cat([run.net_input for run in runs], dim=1), term,
            settings)


class CropEach:
    """A pack's outputs ``(K, C, H, W)``, each cropped to its own image's box (the view its reference needs).

    ``select`` narrows it to some of the networks, as a packed fit does when
    it drops those that have stopped.

    >>> crop = CropEach([(0, 0, 2, 2), (1, 1, 2, 2)], 1)
    >>> x = torch.arange(32.0).reshape(2, 1, 4, 4)
    >>> crop(x)[:, 0, 0, 0].tolist(), crop.select([1])(x[1:])[:, 0, 0, 0].tolist()
    ([0.0, 21.0], [21.0])
    """

    def __init__(self, boxes: Sequence[Tuple[int, int, int, int]], factor: int) -> None:
        self.boxes, self.factor = list(boxes), factor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([io.crop(x[k : k + 1], box, self.factor) for k, box in enumerate(self.boxes)])

    def select(self, keep: Sequence[int]) -> "CropEach":
        return CropEach([self.boxes[i] for i in keep], self.factor)


def make_monitor(request: RestoreRequest, observed: Observation, info: RestoreInfo,
             rule: Optional[DiscrepancyRule]) -> ProgressMonitor:
    """The progress bar, the caller's callback and the CPU time warning of a run."""
    cpu = request.device.type == "cpu"
    return ProgressMonitor(
        info, observed.box, request.factor, observed.ground_truth, request.callback, request.progress,
        observed.alpha, observed.spec, warn_auto=request.auto_preset and cpu, cpu=cpu, max_time=request.max_time,
        noise_var=rule.noise_var if rule is not None and rule.usable else None,
    )


def fit_job(request: RestoreRequest, observed: Observation, run: tasks.Run, info: RestoreInfo,
         rule: Optional[DiscrepancyRule]) -> FitResult:
    """Fit the run under a progress monitor, with the early-stopping rule if any."""
    monitor = make_monitor(request, observed, info, rule)
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


def finish(request: RestoreRequest, observed: Observation, term: nn.Module, result: FitResult,
            info: RestoreInfo, rule: Optional[DiscrepancyRule]) -> Any:
    """The estimate cropped and given back in the caller's kind, and ``info`` completed from the fit."""
    restored = complete(request, observed, term, result, info, rule)
    out = io.from_tensor(restored, observed.alpha, observed.spec)
    return (out, info) if request.return_info else out


def complete(request: RestoreRequest, observed: Observation, term: nn.Module, result: FitResult,
              info: RestoreInfo, rule: Optional[DiscrepancyRule]) -> torch.Tensor:
    """The run's estimate, cropped to the image (``(1, C, H, W)``), and ``info`` completed from the fit."""
    if result.stop_output is not None:  # early stopping: the average of the stopping step
        estimate = result.stop_output
    else:
        estimate = result.output_avg if result.output_avg is not None else result.output
    restored = io.crop(estimate, observed.box, request.factor)
    info.stop_step = result.stop_step
    if rule is not None:
        explain_stop(info, rule, result, term, estimate)
    info.psnr_history = list(result.psnr_ref_avg_history or result.psnr_ref_history)
    info.steps = result.steps
    info.step_mode = result.step_mode
    info.stop_reason = "callback" if result.stop_reason == "should_stop" else result.stop_reason
    info.interrupted = result.interrupted
    info.wall_time = result.wall_time
    info.loss_history = list(result.loss_history)
    info.backtrack_steps = list(result.backtrack_steps)
    if observed.ground_truth is not None:
        info.psnr = float(psnr(restored, observed.ground_truth))
    return restored


def explain_stop(info: RestoreInfo, rule: DiscrepancyRule, result: Any, term: nn.Module,
                  estimate: torch.Tensor) -> None:
    """Fill the early-stopping fields of ``info``: the fallback flag, the residual ratio and a summary."""
    info.stop_fallback = result.stop_step is None and result.stop_reason == "completed"
    # With clipping modelled, the residual is compared with the expected residual of clipped noise at the
    # estimate (the rule's threshold), not with sigma^2: the ratio keeps its meaning (accepted up to the tolerance).
    level, clipped = "sigma^2", ""
    if rule.usable:
        with torch.no_grad():
            seen = term.degrade(estimate) if hasattr(term, "degrade") else estimate
            residual = float((seen - term.observation).square().mean())
            expected = rule.noise_var
            if isinstance(rule.bound, ClippedBound):
                expected = float(rule.bound.per_pixel(seen).double().mean())
                level = "the expected residual of clipped noise"
                clipped = (f"; {noise_level.clipped_share(term.observation):.1%} of the observation's values are "
                           f"clipped at 0 or 1, where the noise is smaller, and the threshold accounts for it")
        info.stop_residual_ratio = residual / expected
    ratio = f"{info.stop_residual_ratio:.2f}" if info.stop_residual_ratio is not None else "n/a"
    if result.stop_step is not None:
        info.stop_summary = (
            f"stopped: at step {result.stop_step + 1} the average explained the observation down to its noise "
            f"level (residual {ratio} x {level}, accepted up to {rule.tolerance:g}; sigma "
            f"{info.stop_noise_sigma:.1f}{clipped}); going on would fit the noise, so that average is returned")
    elif not rule.usable:
        info.stop_summary = ("fallback: the noise level could not be estimated, so early stopping cannot tell an "
                             "under-fitted estimate; the run's last average is returned")
    elif info.stop_fallback:
        info.stop_summary = (
            f"fallback: no step's average explained the observation down to {rule.tolerance:g} x {level} "
            f"(sigma {info.stop_noise_sigma:.1f}{clipped}); the returned last average still leaves {ratio} x "
            f"{level}, so it has not fitted the image to the noise level yet and more iterations may improve it")
    else:
        info.stop_summary = f"ended before the rule decided ({info.stop_reason}); the result so far is returned"


def constant_result(request: RestoreRequest, observed: Observation, seed: int) -> Any:
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
        info.psnr = float(psnr(restored, observed.ground_truth))  # inf when the ground truth is the same constant
    out = io.from_tensor(restored, observed.alpha, spec)
    return (out, info) if request.return_info else out
