"""``dip-fast tune``: time the step candidates for a size on this device, print them, fill the cache.

A restoration times its own candidates in its first seconds (or reads the
cache); this command does it ahead of time, for a synthetic image of the
given size, so that the runs after it start at full speed and so that a user
can see what runs where.

Example::

    >>> from dip_fast.apps.tune import tune_size
    >>> table = tune_size(16, task="denoise", device="cpu", seconds=0.5, preset="quick")  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from ..core import tuning
from ..pipeline import job as stages
from ..pipeline.observation import prepare_observation
from ..pipeline.request import validate_request
from ..tasks import registry

__all__ = ["format_table", "synthetic_image", "tune_size"]


def synthetic_image(size: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A smooth image with noise: timing depends on the shape, not on the pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size, 1)
    clean = np.stack([0.5 + 0.3 * np.sin(5 * xx + c) * np.cos(3 * yy - c) for c in range(channels)], axis=-1)
    return np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)


def tune_size(size: int, *, task: str = "denoise", device: Optional[str] = None, pack: int = 1,
              seconds: float = 20.0, preset: str = "auto", num_threads: Optional[int] = None) -> Dict[str, Any]:
    """Time the candidate steps of ``task`` at ``size`` x ``size`` for ``seconds`` and store the choice.

    ``size`` is the restored image's side (the observation of
    super-resolution is ``size / 4``); ``pack`` networks train in one step
    as ``restore()`` packs them. Returns ``info.execution``'s record plus
    ``size``, ``pack``, ``task`` and ``candidates`` (every open candidate).

    Raises:
        ValueError: a size, pack or time that is not positive, or an unknown task.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    if isinstance(pack, bool) or not isinstance(pack, int) or pack < 1:
        raise ValueError(f"pack must be an integer >= 1, got {pack!r}")
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds!r}")
    spec = registry.find_task(task)
    if spec is None or spec.operator:
        raise ValueError(f"task must be one of {registry.task_names()}, got {task!r}")
    scale = 4 if "scale" in spec.required else None
    side = size // scale if scale else size
    mask = (np.random.default_rng(1).random((side, side)) < 0.5) if "mask" in spec.required else None
    request = validate_request(spec.name, device=device, pack=pack, restarts=pack, preset=preset, scale=scale,
                               mask=mask, num_threads=num_threads, blur_kernel="gaussian:1"
                               if "blur_kernel" in spec.required else None)
    jobs = []
    for k in range(pack):
        observed = prepare_observation(request, synthetic_image(side, seed=k), mask, None)
        jobs.append(stages.plan_job(request, observed, k))
    with stages.run_settings(request.num_threads, request.deterministic):
        decision = stages.choose_execution(request, jobs, packed=pack > 1, budget_s=seconds)
    options, _ = stages.execution_options(request)
    return {**decision.as_dict(), "size": size, "pack": pack, "task": spec.name, "device": str(request.device),
            "candidates": [c.label for c in options], "cache": str(tuning.cache_path())}


def format_table(result: Dict[str, Any]) -> str:
    """The candidates' medians, fastest first, and the choice, as lines of text."""
    ms = result["ms_per_step"]
    chosen = "/".join(result[k] for k in ("backend", "layout", "step_mode", "precision"))
    width = max(len(label) for label in result["candidates"])
    base = ms.get(result["candidates"][0])
    lines: List[str] = [f"{result['task']} {result['size']}x{result['size']}, pack {result['pack']}, "
                        f"on {result['device']} (tuning {result['tuning_s']:.1f} s)",
                        f"{'candidate':<{width}}  ms/step  vs baseline"]
    for label in sorted(result["candidates"], key=lambda c: ms.get(c, float("inf"))):
        t = ms.get(label)
        speed = f"{base / t:.2f}x" if t and base else "-"
        mark = "  <- chosen" if label == chosen else ""
        lines.append(f"{label:<{width}}  {t:7.1f}  {speed:>11}{mark}" if t else f"{label:<{width}}  failed")
    lines.append(f"choice: {chosen} (the baseline, {result['candidates'][0]}, unless another is at least "
                 f"{100 * tuning.MARGIN:.0f}% faster); cached in {result['cache']}")
    return "\n".join(lines)
