"""End to end: one ``dip_fast.restore()`` per task and backend, at a small size.

Everything a user pays for is inside: argument checks, image conversion,
network construction, the optimisation loop (with the preset's averaging
and backtracking) and the conversion back. Sizes are small so that the CPU
suite stays practical: a 64x64 image (a 16x16 low-resolution one for x4
super-resolution) for 30 iterations on the CPU, 256x256 for 200 on CUDA.
The whole file skips while ``restore()`` does not exist yet.

    pytest bench/bench_restore.py -m cpu
"""
from __future__ import annotations

from typing import Any, Dict, Iterator

import numpy as np
import pytest
import torch

import dip_fast

TASKS = ("denoise", "inpaint", "super_resolution")
BACKENDS = ("fast", "reference")
SETTINGS = {"cpu": {"size": 64, "iterations": 30}, "cuda": {"size": 256, "iterations": 200}}


def _inputs(task: str, size: int) -> Dict[str, Any]:
    """A smooth test image with noise (denoise), a half-known mask (inpaint) or a 4x smaller image (sr)."""
    rng = np.random.default_rng(0)
    side = size // 4 if task == "super_resolution" else size
    yy, xx = np.mgrid[0:side, 0:side] / max(side - 1, 1)
    img = np.stack([xx, yy, 0.5 * (xx + yy)], axis=-1)
    if task == "denoise":
        img = img + rng.normal(0, 25 / 255, img.shape)
    img = np.clip(img, 0, 1).astype(np.float32)
    kwargs: Dict[str, Any] = {}
    if task == "inpaint":
        kwargs["mask"] = (rng.random((side, side)) > 0.5).astype(np.float32)
    if task == "super_resolution":
        kwargs["scale"] = 4
    if task == "denoise":
        kwargs["sigma"] = 25.0
    return {"image": img, **kwargs}


def _params() -> Iterator[pytest.param]:
    for device in ("cpu", "cuda"):
        for task in TASKS:
            for backend in BACKENDS:
                yield pytest.param(device, task, backend, marks=getattr(pytest.mark, device), id=f"{device}-{task}-{backend}")


@pytest.mark.parametrize("device,task,backend", list(_params()))
def test_restore(benchmark, device: str, task: str, backend: str) -> None:
    cfg = SETTINGS[device]
    inputs = _inputs(task, cfg["size"])
    benchmark.group = f"restore {device} {task}"
    benchmark.extra_info.update(task=task, backend=backend, **cfg)

    def run() -> Any:
        out = dip_fast.restore(
            inputs["image"],
            task=task,
            iterations=cfg["iterations"],
            preset="paper",
            backend=backend,
            device=device,
            seed=0,
            **{k: v for k, v in inputs.items() if k != "image"},
        )
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(run, rounds=1 if device == "cpu" else 3, iterations=1, warmup_rounds=0 if device == "cpu" else 1)
    assert np.asarray(out).shape[:2] == (cfg["size"], cfg["size"])
