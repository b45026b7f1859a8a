"""Several runs at once: ``restore()`` of a list of images, and ``restarts``.

Each image (each restart of an image) is one *job*: its own observation,
seed, preset and stopping rule, as ``restore()`` of that image alone would
plan it.  Jobs whose networks work at one size are trained together,
``pack`` at a time, as one packed network (:mod:`dip_fast.core.packed`) through
:func:`dip_fast.core.fit.fit_packed`: every network keeps its own averaging,
backtracking and early stopping, and a packed run equals the separate runs
(to the rounding of a grouped convolution).

Images of different sizes are grouped by working size rather than padded to
a common one: padding would change each image's result (the network would
fit a larger, mostly mirrored image) and spend steps on the padding, while
grouping keeps every result what its own ``restore()`` returns.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .. import _caller, io, tasks
from . import job as stages
from .info import RestoreInfo
from . import tiles
from ..core.fit import FitResult, StepInfo, fit_packed
from ..core.memory import device_memory, format_bytes
from .observation import Observation, _load_ground_truth, inspect_run, prepare_observation, run_memory
from ..core.networks import get_architecture
from .request import RestoreRequest

__all__ = ["MAX_PACK_CPU", "MAX_PACK_CUDA", "TILE_OVERLAP", "auto_tile", "follow_pack", "pack_size", "restore_many",
           "restore_tiled"]

#: ``pack='auto'``'s limit on the CPU: the per-image cost of a step is flat from 1 to 4 networks there
#: (bench/README.md, "Packed networks"), so larger packs only delay the first results.
MAX_PACK_CPU = 4
#: ``pack='auto'``'s limit on a GPU.
MAX_PACK_CUDA = 16


def pack_size(request: RestoreRequest, need: int, jobs: int) -> int:
    """How many of ``jobs`` networks, each needing ``need`` bytes, to train in one step.

    Raises:
        ValueError: an explicit ``pack`` whose networks would not fit in the device's memory.
    """
    have = device_memory(request.device)
    if request.pack != "auto":
        k = min(request.pack, jobs)
        if have is not None and need and k * need > have:
            raise ValueError(
                f"pack={request.pack}: {k} networks need about {format_bytes(k * need)} but {request.device} has "
                f"{format_bytes(have)}; use a smaller pack or pack='auto'")
        return k
    limit = MAX_PACK_CUDA if request.device.type == "cuda" else MAX_PACK_CPU
    if have is not None and need:
        limit = min(limit, max(1, int(0.8 * have) // need))
    return max(1, min(limit, jobs))


def restore_many(request: RestoreRequest, images: Any, masks: Any, truths: Any, seed: int) -> Any:
    """``restore()`` of a list of images and/or with ``restarts > 1`` (see :func:`dip_fast.api.restore`)."""
    single = not isinstance(images, (list, tuple))
    images = [images] if single else list(images)
    if not images:
        raise ValueError("image: got an empty list; pass at least one image")
    if request.callback is not None and len(images) > 1:
        # A pack reports one network per step (follow_pack): the callback would see some images and not others.
        raise ValueError(f"callback applies to a single run; a list of {len(images)} images runs several (drop the "
                         "callback, or restore the images one by one)")
    masks = _per_image(masks, "mask", len(images), single)
    truths = _per_image(truths, "ground_truth", len(images), single)
    observed = []
    for i, (image, mask, truth) in enumerate(zip(images, masks, truths)):
        try:
            observed.append(prepare_observation(request, image, mask, truth))
        except (ValueError, TypeError, FileNotFoundError) as exc:
            if single:
                raise
            raise type(exc)(f"image {i}: {exc}") from exc
    outputs: List[Any] = [None] * len(images)
    jobs: List[Tuple[int, stages.Job]] = []
    for i, obs in enumerate(observed):
        if obs.constant is not None:
            outputs[i] = stages.constant_result(request, obs, seed)
            continue
        job = stages.plan_job(request, obs, seed)  # the pixel settings (a noise estimate) once per image
        jobs.extend((i, _restart(job, seed + r)) for r in range(request.restarts))
    finished: Dict[int, List[Tuple[torch.Tensor, RestoreInfo]]] = {}
    with stages.run_settings(request.num_threads, request.deterministic):
        packs = []
        for group in _groups(jobs):
            k = pack_size(request, group[0][1].observed.estimated_memory, len(group))
            packs += [group[start : start + k] for start in range(0, len(group), k)]
        for share, chunk in _time_shares(request, packs):
            results = _run_pack(share, [job for _, job in chunk])
            for (i, _), done in zip(chunk, results):
                finished.setdefault(i, []).append(done)
            if any(info.stop_reason == "keyboard_interrupt" for _, info in results):
                break  # Ctrl-C: no further packs
    if any(outputs[i] is None and i not in finished for i in range(len(images))):
        # Ctrl-C returns the results so far, but some images have none: stop the call instead.
        raise KeyboardInterrupt
    for i, runs in finished.items():
        outputs[i] = _combine(request, observed[i], runs)  # after Ctrl-C, the restarts that ran
    return outputs[0] if single else outputs


def _time_shares(request: RestoreRequest, items: List[Any]) -> Iterator[Tuple[RestoreRequest, Any]]:
    """Each item (a pack, or a job of a pack that runs its jobs in turn) with the request it runs under.

    ``max_time`` bounds the whole call, not each of its runs: an item gets an
    equal share of the time left when it starts (so one that stops early leaves
    its time to the others), and never less than an equal share of the whole,
    so that none is left without a step when another ran over.

    >>> from types import SimpleNamespace as S
    >>> [r.max_time for r, _ in _time_shares(S(max_time=None), ["a", "b"])]
    [None, None]
    """
    if request.max_time is None:
        yield from ((request, item) for item in items)
        return
    start = time.perf_counter()
    for n, item in enumerate(items):
        left = request.max_time - (time.perf_counter() - start)
        share = max(left / (len(items) - n), request.max_time / len(items))
        yield dataclasses.replace(request, max_time=share), item


def _restart(job: "stages.Job", seed: int) -> "stages.Job":
    """``job`` with another seed and an info of its own (the first restart is ``job`` itself)."""
    if seed == job.seed:
        return job
    return dataclasses.replace(job, seed=seed, info=dataclasses.replace(job.info, seed=seed))


def _per_image(value: Any, name: str, n: int, single: bool) -> List[Any]:
    if single or value is None:
        return [value] * n
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"{name} must be a list of {n} entries (one per image) or None, got {type(value).__name__}")
    return list(value)


def _groups(jobs: List[Tuple[int, "stages.Job"]]) -> List[List[Tuple[int, "stages.Job"]]]:
    """Jobs that can share a step: one working size and observation shape, in order of first appearance."""
    groups: Dict[Any, List[Tuple[int, stages.Job]]] = {}
    for entry in jobs:
        obs = entry[1].observed
        groups.setdefault((obs.padded_size, tuple(obs.observation.shape), obs.shape[0]), []).append(entry)
    return list(groups.values())


def _run_pack(request: RestoreRequest, jobs: List["stages.Job"]) -> List[Tuple[torch.Tensor, RestoreInfo]]:
    """Fit ``jobs`` together (alone when one, or when the architecture does not pack); their estimates and infos."""
    packed = len(jobs) > 1 and get_architecture(jobs[0].preset.network.arch).packs
    execution = stages.choose_execution(request, jobs, packed=packed)
    runs = [stages.build_run(request, job.observed, job.preset, job.seed, execution) for job in jobs]
    if packed:
        results = _fit_packed(request, jobs, runs)
    else:
        results = [stages.fit_job(share, job.observed, run, job.info, job.rule)
                   for share, (job, run) in _time_shares(request, list(zip(jobs, runs)))]
    done = []
    for job, run, result in zip(jobs, runs, results):
        job.info.packed = len(jobs) if packed else 1
        done.append((stages.complete(request, job.observed, run.term, result, job.info, job.rule), job.info))
    return done


def follow_pack(on_step: Callable[[StepInfo], None]) -> Callable[[StepInfo], None]:
    """A pack's step callback that passes ``on_step`` one network per step: the first still running.

    The fit reports every running network at each read, in network order,
    and a stopped network no longer reports.  Following network 0 alone would
    freeze the progress bar when it stops first while the others go on.

    >>> from types import SimpleNamespace as S
    >>> seen = []
    >>> f = follow_pack(lambda s: seen.append((s.step, s.network)))
    >>> for step, network in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1), (3, 1)]:  # network 0 stops after step 1
    ...     f(S(step=step, network=network))
    >>> seen
    [(0, 0), (1, 0), (2, 1), (3, 1)]
    """
    shown = [-1]  # the last step passed on

    def follow(step: StepInfo) -> None:
        if step.step > shown[0]:
            shown[0] = step.step
            on_step(step)

    return follow


def _fit_packed(request: RestoreRequest, jobs: List["stages.Job"], runs: List[tasks.Run]) -> List[FitResult]:
    """One packed network for the runs, fitted with per-network settings."""
    net, net_input, term, kwargs = stages.assemble(runs, jobs, request.factor)
    rules = [job.rule for job in jobs]
    first = jobs[0]
    monitor = stages.make_monitor(request, first.observed, first.info, first.rule)
    on_step = follow_pack(monitor.on_step)
    try:
        return fit_packed(
            net, net_input, term,
            networks=len(runs), max_time=request.max_time, callback=on_step, should_stop=monitor.should_stop,
            stop="discrepancy" if rules[0] is not None else "never",
            stop_bound=[rule.bound for rule in rules] if rules[0] is not None else None,
            step_mode=first.info.step_mode, precision=first.info.precision, **kwargs,
        )
    finally:
        monitor.close()


def _combine(request: RestoreRequest, observed: Observation,
             runs: Sequence[Tuple[torch.Tensor, RestoreInfo]]) -> Any:
    """One image's result: its run's estimate, or the mean of its restarts with their spread."""
    estimates = torch.cat([estimate for estimate, _ in runs])
    info = runs[0][1]
    info.restarts = len(runs)
    mean = estimates.mean(0, keepdim=True)
    if len(runs) > 1:
        # unbiased=False: the spread of these runs, not an estimate for a population.
        info.uncertainty = estimates.std(0, unbiased=False).permute(1, 2, 0).cpu().numpy()
        if observed.ground_truth is not None:
            info.psnr = float(stages.psnr(mean, observed.ground_truth))
    out = io.from_tensor(mean, observed.alpha, observed.spec)
    return (out, info) if request.return_info else out


# --------------------------------------------------------------------------
# Large images in tiles
# --------------------------------------------------------------------------

#: The least overlap of neighbouring tiles, as a fraction of the tile's side (and at least 16 pixels):
#: the blend window fades across it, and the network's border effects stay inside it.
TILE_OVERLAP = 1 / 8


def auto_tile(request: RestoreRequest, image: Any) -> Optional[int]:
    """The tile side for an image whose whole run would not fit in memory; None when it fits (or is unknown)."""
    if request.operator is not None or request.task.tiling is None:
        return None  # prepare_observation refuses it with the memory message
    _, (c, h, w), need = inspect_run(request, image)
    have = device_memory(request.device)
    if need is None or have is None or need <= have:
        return None
    # Tiles need the whole image in memory (as float32, with copies for the tiles and the blend): an image
    # that alone would not fit is refused instead, by prepare_observation's memory check.
    if 8 * 4 * c * h * w * request.factor ** 2 > have:
        return None
    side = max(h, w)
    while side > 32:
        side //= 2
        tile_need = run_memory(request, c, side, side)
        if tile_need is not None and tile_need <= 0.8 * have:
            return side
    return None


def restore_tiled(request: RestoreRequest, image: Any, mask: Any, truth: Any, seed: int, tile: int,
                  why: str) -> Any:
    """``restore()`` of one image in overlapping tiles of side ``tile``, blended (see :mod:`dip_fast.pipeline.tiles`)."""
    if isinstance(image, (list, tuple)):
        raise ValueError("tile applies to one image; restore the images of a list one by one to tile them")
    if request.callback is not None:
        # The callback would see one tile's estimate, not the image's (a snapshot of a tile saved as the image).
        # A given tile= is refused up front by validate_request; this is the case where restore() chose to tile.
        raise ValueError(f"callback applies to a single run, and this image is restored in tiles ({why}); drop the "
                         "callback")
    loaded = io.load_image(image, "image")
    color, spec = loaded.color, loaded.spec
    extras: Dict[str, Any] = {}
    if mask is not None:
        extras["mask"] = io.load_mask(mask, spec.height, spec.width, color.shape[1])[0]
    if request.task.accepts("scale"):
        extras["scale"] = request.factor
    if request.task.accepts("blur_kernel"):
        extras["blur_kernel"] = request.blur_kernel
    sigma = request.sigma
    if request.task.accepts("sigma"):
        # One noise level for the whole image, so that every tile is restored alike.
        sigma = sigma if sigma is not None else stages.estimate_sigma(color)
        if sigma is not None:
            extras["sigma"] = sigma
    overlap = max(16, int(tile * TILE_OVERLAP))
    tiled = tiles.tile_request(request.task, color[0], extras, min(tile, max(color.shape[2:])), overlap)
    warnings.warn(f"dip_fast: restoring the {spec.height}x{spec.width} image in {len(tiled.observations)} "
                  f"overlapping tiles of {tiled.input_plan.tile_size[0]}x{tiled.input_plan.tile_size[1]} "
                  f"({why}); info.tiles says so too", RuntimeWarning, stacklevel=_caller.stacklevel())
    sub = dataclasses.replace(request, return_info=True, sigma=sigma)
    masks = [e.get("mask") for e in tiled.extras] if mask is not None else None
    if masks is not None:
        # A tile restored from its own pixels alone needs some of them known; say which, before any run.
        th, tw = tiled.input_plan.tile_size
        for (top, left), m in zip(tiled.input_plan.origins, masks):
            if not bool((m > 0).any()):
                raise ValueError(f"tile={tile}: the tile at rows {top}-{top + th - 1}, columns {left}-{left + tw - 1} "
                                 "holds no known pixel of the mask, so it has nothing to inpaint from; use larger "
                                 "tiles (or none)")
    results = restore_many(sub, list(tiled.observations), masks, None, seed)
    restored = tiles.blend([out for out, _ in results], tiled.output_plan)[None]
    info = results[0][1]
    info.tiles = len(results)
    info.tile_size = tiled.input_plan.tile_size
    info.padded_size = tuple(d * request.factor for d in (spec.height, spec.width))
    info.wall_time = sum(i.wall_time for _, i in results)
    if info.restarts > 1:
        stds = [torch.from_numpy(i.uncertainty).permute(2, 0, 1) for _, i in results]
        info.uncertainty = tiles.blend_std(stds, tiled.output_plan).permute(1, 2, 0).numpy()
    info.psnr = None
    if truth is not None:
        gt = _load_ground_truth(truth, (color.shape[1], spec.height * request.factor, spec.width * request.factor))
        info.psnr = float(stages.psnr(restored.to(gt.device), gt))
    alpha = io.resize_alpha(loaded.alpha, request.factor) if loaded.alpha is not None and request.factor > 1 \
        else loaded.alpha
    out = io.from_tensor(restored.cpu(), alpha, spec)
    return (out, info) if request.return_info else out
