#!/usr/bin/env python
"""One ``dip_fast.restore()`` with its defaults, timed end to end, against the reference's time from its step time.

What a user gets from ``restore(noisy)``: the image is a photograph with
Gaussian noise (sigma 25, a fixed seed) added, ``restore()`` runs with every
default (preset, stopping rule, backend ``'auto'``: the step is tuned on
the device with an empty cache, so the tuning is part of the wall time), and
the result is scored against the clean photograph. The reference network is
not run: its time is its measured step time (``--steps-json``, written by
``bench/compare.py``) times the paper's step count, which is what running it
would take to within its per-step overheads. A graph step that failed its
first-replay check (it then runs eagerly) is reported from the warning.

Usage::

    python bench/restore_defaults.py IMAGE --size 512 --steps-json cuda-steps.json --out restore.json
    python bench/restore_defaults.py IMAGE --size 64 --iterations 20 --device cpu   # a dry run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import dip_fast  # noqa: E402

#: The paper's step count for denoising (the reference's time is its step time times this).
PAPER_STEPS = 3000
#: The reference rows of the steps JSON this run is compared with: PyTorch's defaults, then strict fp32.
REFERENCE_ROWS = ("reference_default", "reference")


def load_image(path: str, size: int) -> np.ndarray:
    """The centre ``size`` x ``size`` crop of an RGB image as float32 in [0, 1]; ``astronaut`` is scikit-image's."""
    if path == "astronaut":
        from skimage import data

        img = Image.fromarray(data.astronaut())
    else:
        img = Image.open(path).convert("RGB")
    if min(img.size) < size:
        raise ValueError(f"--size {size}: the image {path} is only {img.size[0]}x{img.size[1]}")
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images in [0, 1]."""
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


def reference_estimate(steps_json: Optional[Path], size: int) -> Dict[str, Any]:
    """The reference rows' step times at ``size`` from a compare.py JSON, and those times x :data:`PAPER_STEPS`."""
    if steps_json is None or not steps_json.is_file():
        return {}
    measured = json.loads(steps_json.read_text()).get("steps", {}).get(str(size), {}).get("median_s", {})
    return {name: {"ms_per_step": measured[name] * 1e3, "run_s": measured[name] * PAPER_STEPS}
            for name in REFERENCE_ROWS if name in measured}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("image", help="a photograph (or 'astronaut')")
    p.add_argument("--size", type=int, default=512, help="centre crop side")
    p.add_argument("--sigma", type=float, default=25.0, help="noise std in 8-bit units")
    p.add_argument("--seed", type=int, default=0, help="the noise's seed")
    p.add_argument("--device", default=None, help="cpu or cuda (default: restore()'s)")
    p.add_argument("--iterations", type=int, default=None, help="only for a dry run: fewer steps than the default")
    p.add_argument("--max-time", type=float, default=None,
                   help="a safety net (restore()'s max_time): a run that would overrun stops with what it has")
    p.add_argument("--steps-json", type=Path, default=None, help="compare.py's JSON with the reference's step times")
    p.add_argument("--out", type=Path, default=None, help="JSON path")
    args = p.parse_args(argv)

    # An empty tuning cache: the run times its candidates, as a user's first run does.
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="dip-fast-restore-")
    clean = load_image(args.image, args.size)
    rng = np.random.default_rng(args.seed)
    noisy = np.clip(clean + rng.normal(0, args.sigma / 255, clean.shape), 0, 1).astype(np.float32)
    kwargs: Dict[str, Any] = {"return_info": True}
    for name in ("device", "iterations", "max_time"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        out, info = dip_fast.restore(noisy, "denoise", **kwargs)
        wall = time.perf_counter() - t0
    for w in caught:
        print(f"warning: {w.message}", flush=True)
    execution = dict(info.execution)
    graph = execution.get("step_mode") == "graph"
    replay_warnings = [str(w.message) for w in caught if "first replay" in str(w.message)]
    result: Dict[str, Any] = {
        "schema": "dip_fast-restore-defaults/1",
        "image": Path(args.image).name, "size": args.size, "sigma": args.sigma, "noise_seed": args.seed,
        "call": "restore(noisy, 'denoise'" + "".join(f", {k}={v!r}" for k, v in kwargs.items()) + ")",
        "device": info.device,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and info.device.startswith("cuda") else None,
        "torch": torch.__version__,
        "wall_s": wall, "steps": info.steps, "iterations": info.iterations, "preset": info.preset,
        "stop": info.stop, "stop_reason": info.stop_reason, "stop_step": info.stop_step,
        "backend": info.backend, "step_mode": info.step_mode, "precision": info.precision,
        "execution": execution,
        "graph_verified": (not replay_warnings) if graph else None,
        "warnings": [str(w.message) for w in caught],
        "psnr_noisy": psnr(noisy, clean), "psnr": psnr(np.asarray(out, dtype=np.float32)[..., :3], clean),
        "ms_per_step": wall / max(info.steps, 1) * 1e3,
    }
    refs = reference_estimate(args.steps_json, args.size)
    result["reference_estimate"] = refs
    result["paper_steps"] = PAPER_STEPS
    for name, ref in refs.items():
        result[f"{name}_run_s_over_wall"] = ref["run_s"] / wall
    print(f"restore() defaults, {result['image']} {args.size}x{args.size} sigma {args.sigma:g} on {info.device}: "
          f"{wall:.1f} s, {info.steps} of {info.iterations} steps ({info.stop_reason}), "
          f"{execution.get('backend')}/{execution.get('layout')}/{info.step_mode}/{info.precision} "
          f"({execution.get('source')}, tuning {execution.get('tuning_s', 0.0):.1f} s), "
          f"PSNR {result['psnr']:.2f} dB (noisy {result['psnr_noisy']:.2f})", flush=True)
    for name, ref in refs.items():
        print(f"  {name}: {ref['ms_per_step']:.2f} ms x {PAPER_STEPS} steps = {ref['run_s']:.1f} s, "
              f"{ref['run_s'] / wall:.2f}x this run's wall time", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
