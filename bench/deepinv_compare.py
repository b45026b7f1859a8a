#!/usr/bin/env python
"""deepinv's own ``DeepImagePrior`` against dip_fast's reconstructor, on the same physics and images.

For each task (denoising at sigma 25/255, inpainting with 50 % of the pixels
kept, noiseless) and each image (a centre crop, RGB), the same measurement
``y = physics(x)`` goes to:

* ``dip_fast``: :class:`dip_fast.deepinv.DeepImagePrior` with its defaults
  (``preset='auto'``: ``'fast'`` on the CPU; early stopping at the Physics's
  sigma for denoising, the fixed count for inpainting), given the whole batch
  of images at once (one network per image, packed in one step); its wall
  time per image is the call's over the batch size;
* ``deepinv_example``: ``deepinv.models.DeepImagePrior`` with the settings of
  deepinv's documented example (``demo_dip.py``: ConvDecoder with 64 channels
  and a 2x2 input, 100 iterations, learning rate 0.01), one image at a time
  (deepinv fits one network to a whole batch);
* ``deepinv_default``: ``deepinv.models.DeepImagePrior`` with its defaults
  (ConvDecoder's defaults: 256 channels, 7 layers, 4x4 input; 2500
  iterations, learning rate 0.01).  A full run takes hours per 128x128 image
  on a CPU, so it runs for as many iterations as fit in dip_fast's wall time
  per image (timed from a 2-iteration probe just before), which is the
  comparison "at most the same wall time" asks for; the projected time of
  the full 2500 iterations is reported beside it.

PSNR is against the clean crop, clamped to [0, 1], per image; the report gives
means with standard errors over the images and the per-image differences.
The runs go one after another, on ``--threads`` threads each; the load of
the machine (``os.getloadavg``) is recorded at the start and the end.

Usage::

    python bench/deepinv_compare.py --crop 128 --limit 4 ../shared/data/CBSD68

Writes ``bench/results/deepinv-compare-<crop>.json`` and ``.md``; ``--merge A.json B.json`` writes one
report of runs made separately (one task each, run side by side).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

#: deepinv's documented example (examples/basics/demo_dip.py).
EXAMPLE = dict(iterations=100, lr=1e-2, channels=64, in_size=(2, 2))
#: deepinv's defaults: DeepImagePrior(iterations=2500, learning_rate=1e-2), ConvDecoder(channels=256, in_size=(4, 4)).
DEFAULT = dict(iterations=2500, lr=1e-2, channels=256, in_size=(4, 4))


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - a report field only
        return platform.processor() or "unknown"


def load_crops(folder: Path, crop: int, limit: int) -> Tuple[List[torch.Tensor], List[str]]:
    """Centre crops ``(1, 3, crop, crop)`` in [0, 1] of the first ``limit`` images (sorted by name)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".bmp", ".tif"))[:limit]
    crops = []
    for path in files:
        arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        top, left = (arr.shape[0] - crop) // 2, (arr.shape[1] - crop) // 2
        crops.append(torch.from_numpy(arr[top : top + crop, left : left + crop].transpose(2, 0, 1).copy())[None])
    return crops, [p.name for p in files]


def psnr(estimate: torch.Tensor, clean: torch.Tensor) -> float:
    mse = float((estimate.clamp(0, 1) - clean).square().mean())
    return 10 * math.log10(1.0 / mse)


def deepinv_dip(y: torch.Tensor, physics: Any, settings: Dict[str, Any], iterations: int, seed: int) -> torch.Tensor:
    """deepinv's DeepImagePrior on one image, with the ConvDecoder ``settings`` and ``iterations`` steps."""
    import deepinv

    torch.manual_seed(seed)
    shape = physics.A_adjoint(y).shape[1:]
    net = deepinv.models.ConvDecoder(img_size=tuple(shape), in_size=settings["in_size"],
                                     channels=settings["channels"])
    model = deepinv.models.DeepImagePrior(net, img_size=[settings["channels"], *settings["in_size"]],
                                          iterations=iterations, learning_rate=settings["lr"])
    return model(y, physics).detach()


def make_physics(task: str, shape: torch.Size, seed: int) -> Any:
    import deepinv

    if task == "denoise":
        return deepinv.physics.Denoising(deepinv.physics.GaussianNoise(25 / 255))
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(1, *shape[-2:], generator=g) < 0.5).float()  # one mask for all channels
    return deepinv.physics.Inpainting(img_size=tuple(shape[1:]), mask=mask)


def run_task(task: str, crops: List[torch.Tensor], names: List[str], args: argparse.Namespace) -> Dict[str, Any]:
    from dip_fast.deepinv import DeepImagePrior

    physics = make_physics(task, crops[0].shape, args.seed)
    torch.manual_seed(args.seed)
    x = torch.cat(crops)
    y = physics(x)  # noise drawn once for the batch, from the seed
    rows: List[Dict[str, Any]] = [dict(image=n, measurement=psnr(y[i : i + 1], crops[i])) for i, n in enumerate(names)]

    model = DeepImagePrior(seed=args.seed, num_threads=args.threads, device="cpu", iterations=args.iterations)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x_hat = model(y, physics)
    per_image = (time.perf_counter() - start) / len(crops)
    for i, row in enumerate(rows):
        info = model.last_info[i]
        row.update(dip_fast=psnr(x_hat[i : i + 1], crops[i]), dip_fast_s=per_image, dip_fast_steps=info.steps,
                   dip_fast_stop_step=info.stop_step, dip_fast_preset=info.preset, dip_fast_packed=info.packed)
    print(f"{task}: dip_fast {per_image:.1f} s/image, {[round(r['dip_fast'], 2) for r in rows]}", flush=True)

    old = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for i, row in enumerate(rows):
            yi = y[i : i + 1]
            t = time.perf_counter()
            out = deepinv_dip(yi, physics, EXAMPLE, EXAMPLE["iterations"], args.seed)
            row.update(deepinv_example=psnr(out, crops[i]), deepinv_example_s=time.perf_counter() - t)
            probe = 2
            t = time.perf_counter()
            deepinv_dip(yi, physics, DEFAULT, probe, args.seed)
            per_step = (time.perf_counter() - t) / probe
            steps = max(1, int(per_image / per_step))
            t = time.perf_counter()
            out = deepinv_dip(yi, physics, DEFAULT, steps, args.seed)
            row.update(deepinv_default=psnr(out, crops[i]), deepinv_default_s=time.perf_counter() - t,
                       deepinv_default_steps=steps, deepinv_default_full_s=per_step * DEFAULT["iterations"])
            print(f"{task} {row['image']}: example {row['deepinv_example']:.2f} dB in {row['deepinv_example_s']:.1f} s;"
                  f" default {row['deepinv_default']:.2f} dB after {steps} steps in {row['deepinv_default_s']:.1f} s"
                  f" (full run ~{row['deepinv_default_full_s']:.0f} s)", flush=True)
    finally:
        torch.set_num_threads(old)
    return dict(task=task, rows=rows)


def mean_se(values: List[float]) -> str:
    a = np.asarray(values, dtype=np.float64)
    se = a.std(ddof=1) / math.sqrt(len(a)) if len(a) > 1 else float("nan")
    return f"{a.mean():.2f} +- {se:.2f}"


def report(results: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = [f"# deepinv's DeepImagePrior vs dip_fast's reconstructor ({meta['crop']}x{meta['crop']}, RGB)", "",
             f"CPU: {meta['cpu']}, {meta['threads']} thread(s) per run; load average {meta['load_start']:.1f} at the "
             f"start, {meta['load_end']:.1f} at the end; torch {meta['torch']}, deepinv {meta['deepinv']}; "
             f"images: {', '.join(meta['images'])}.", "",
             "| task | measurement | deepinv example (100 it) | deepinv defaults at dip_fast's time | dip_fast | "
             "dip_fast - defaults | dip_fast - example | s/image: example / defaults (run) / dip_fast | "
             "defaults' full run, projected |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for res in results:
        rows = res["rows"]
        col = lambda key: [r[key] for r in rows]  # noqa: E731
        diff_d = [r["dip_fast"] - r["deepinv_default"] for r in rows]
        diff_e = [r["dip_fast"] - r["deepinv_example"] for r in rows]
        lines.append(
            f"| {res['task']} | {mean_se(col('measurement'))} | {mean_se(col('deepinv_example'))} | "
            f"{mean_se(col('deepinv_default'))} | {mean_se(col('dip_fast'))} | {mean_se(diff_d)} | {mean_se(diff_e)} | "
            f"{np.mean(col('deepinv_example_s')):.0f} / {np.mean(col('deepinv_default_s')):.0f} / "
            f"{np.mean(col('dip_fast_s')):.0f} | {np.mean(col('deepinv_default_full_s')):.0f} s |")
    lines += ["", "PSNR in dB (mean +- standard error over the images); per-image values in the JSON."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", nargs="?", type=Path, default=SHARED_DATA / "CBSD68", help="folder of images")
    p.add_argument("--crop", type=int, default=128, help="centre crop side")
    p.add_argument("--limit", type=int, default=4, help="number of images (first by name)")
    p.add_argument("--tasks", nargs="+", default=["denoise", "inpaint"], choices=["denoise", "inpaint"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=None, help="dip_fast's most steps (default: its own; for smoke runs)")
    p.add_argument("--out", type=Path, default=None, help="output stem (default bench/results/deepinv-compare-CROP)")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                   help="only write the report of these results files (runs of one task each) to --out")
    args = p.parse_args()
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        meta = dict(parts[0]["meta"], load_start=max(m["meta"]["load_start"] for m in parts),
                    load_end=max(m["meta"]["load_end"] for m in parts))
        results = [r for part in parts for r in part["results"]]
        stem = args.out or RESULTS_DIR / f"deepinv-compare-{meta['crop']}"
        stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results, merged_from=[
            path.name for path in args.merge]), indent=1))
        stem.with_suffix(".md").write_text(report(results, meta))
        print(report(results, meta))
        return
    import deepinv

    crops, names = load_crops(args.folder, args.crop, args.limit)
    meta = dict(cpu=cpu_name(), threads=args.threads, dip_fast_iterations=args.iterations, crop=args.crop, torch=torch.__version__,
                deepinv=deepinv.__version__, images=names, load_start=os.getloadavg()[0], example=EXAMPLE,
                default={k: list(v) if isinstance(v, tuple) else v for k, v in DEFAULT.items()})
    stem = args.out or RESULTS_DIR / f"deepinv-compare-{args.crop}"
    results = []
    for task in args.tasks:
        results.append(run_task(task, crops, names, args))
        meta["load_end"] = os.getloadavg()[0]
        stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
        stem.with_suffix(".md").write_text(report(results, meta))
    print(report(results, meta))


if __name__ == "__main__":
    main()
