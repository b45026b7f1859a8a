#!/usr/bin/env python
"""Does bf16 restore as well as fp32 on the CPU?  Paired runs through ``restore()``.

For every image, seed and task, ``dip_fast.restore()`` runs twice with its
defaults (preset ``fast``, its stopping rule), once with ``precision='fp32'``
and once with ``precision='bf16'``; everything else is equal: the seed (so the
initial weights and the input ``z``), the crop and the degraded observation.
The paired difference bf16 - fp32 of the returned images' PSNR, over all
pairs, decides ``precision='auto'`` on CPUs with native bf16
(:mod:`dip_fast.core.auto_step`): parity is a mean within 0.15 dB whose standard
error is small enough to tell (its 95% interval inside +-0.3 dB).

Tasks:

* ``denoise``: Gaussian noise of ``--sigma`` on the centre crop (seeded per
  image and seed), PSNR on RGB;
* ``sr``: x4 super-resolution, the low-resolution input made with PIL's
  Lanczos resize, PSNR on luma with a 4-pixel border removed (the protocol of
  ``bench/quality.py``, whose helpers this uses), bicubic as the baseline.

Runs are appended to ``--out`` as they finish, so an interrupted study resumes.

    python bench/bf16_parity.py --crop 128 --seeds 2 --out bench/results/bf16-parity-cpu.json IMAGES...
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (image loading, crops, metrics, environment record)

import dip_fast  # noqa: E402
from dip_fast.core import cpu_features  # noqa: E402
from dip_fast.tasks import degradations  # noqa: E402

PRECISIONS = ("fp32", "bf16")
SR_FACTOR = 4


def observation(path: Path, task: str, crop: int, sigma: float, seed: int):
    """``(ground truth HxWx3, observation HxWx3, baseline PSNR)`` as float arrays in [0, 1]."""
    gt_img = quality.prepare_gt(quality.load_rgb(path), crop)
    gt = quality.to_tensor(gt_img)
    if task == "denoise":
        noisy = degradations.add_gaussian_noise(gt, sigma, generator=torch.Generator().manual_seed(10_000 + seed))
        obs = quality.to_numpy(noisy)
        return quality.to_numpy(gt), obs, quality.metrics(obs, quality.to_numpy(gt), task, 0)["psnr"]
    lr = gt_img.resize((gt_img.width // SR_FACTOR, gt_img.height // SR_FACTOR), Image.LANCZOS)
    bicubic = quality.to_numpy(quality.to_tensor(lr.resize(gt_img.size, Image.BICUBIC)))
    gt_np = quality.to_numpy(gt)
    return gt_np, quality.to_numpy(quality.to_tensor(lr)), quality.metrics(bicubic, gt_np, task, SR_FACTOR)["psnr"]


def run_pair(path: Path, task: str, seed: int, args: argparse.Namespace) -> Dict[str, Any]:
    gt, obs, baseline = observation(path, task, args.crop, args.sigma, seed)
    kwargs: Dict[str, Any] = {"sigma": args.sigma} if task == "denoise" else {"scale": SR_FACTOR}
    rec: Dict[str, Any] = {"image": path.name, "task": task, "seed": seed, "crop": args.crop, "baseline": baseline}
    for precision in PRECISIONS:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the CPU run-time notices
            out, info = dip_fast.restore(obs.astype(np.float32), task=task, seed=seed, device="cpu",
                                         precision=precision, num_threads=args.threads, return_info=True, **kwargs)
        seconds = time.perf_counter() - t0
        est = np.asarray(out, dtype=np.float64)
        est = est / 255.0 if np.asarray(out).dtype == np.uint8 else est
        rec[precision] = {
            "psnr": quality.metrics(np.clip(est[..., :3], 0, 1), gt, task, SR_FACTOR if task == "sr" else 0)["psnr"],
            "steps": info.steps, "seconds": seconds, "ms_per_step": 1000.0 * seconds / max(info.steps, 1),
            "precision_ran": info.precision,
        }
    rec["diff"] = rec["bf16"]["psnr"] - rec["fp32"]["psnr"]
    return rec


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per task and over all pairs: the PSNR of each precision, the paired difference and the speed ratio."""
    groups = {"all": runs, **{t: [r for r in runs if r["task"] == t] for t in sorted({r["task"] for r in runs})}}
    out: Dict[str, Any] = {}
    for name, rs in groups.items():
        out[name] = {
            "fp32": quality.mean_se([r["fp32"]["psnr"] for r in rs]),
            "bf16": quality.mean_se([r["bf16"]["psnr"] for r in rs]),
            "baseline": quality.mean_se([r["baseline"] for r in rs]),
            "diff": quality.mean_se([r["diff"] for r in rs]),
            "speedup": quality.mean_se([r["fp32"]["ms_per_step"] / r["bf16"]["ms_per_step"] for r in rs]),
        }
    return out


def render(result: Dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"bf16 against fp32 through `restore()` on the CPU ({env['cpu']}, bf16 units: {env['bf16_units']}, "
        f"{env['torch_threads']} threads, commit {env['commit']}); crops of {result['config']['crop']} px, "
        f"denoise at sigma {result['config']['sigma']:g}, sr x{SR_FACTOR}; mean +- standard error.",
        "",
        "| task | pairs | baseline dB | fp32 dB | bf16 dB | bf16 - fp32 dB | step speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in result["summary"].items():
        lines.append(
            f"| {name} | {s['diff']['n']} | {s['baseline']['mean']:.2f} | {s['fp32']['mean']:.2f} +- {s['fp32']['se']:.2f} "
            f"| {s['bf16']['mean']:.2f} +- {s['bf16']['se']:.2f} | {s['diff']['mean']:+.3f} +- {s['diff']['se']:.3f} "
            f"| {s['speedup']['mean']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--tasks", nargs="+", choices=("denoise", "sr"), default=["denoise", "sr"])
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--sigma", type=float, default=25.0)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # so that the environment record names the threads the runs use
    result = quality.load_results(args.out)
    result["config"] = {"crop": args.crop, "sigma": args.sigma, "tasks": args.tasks, "seeds": args.seeds}
    result["environment"] = {**quality.environment(torch.device("cpu")), "cpu": cpu_features.cpu_name(),
                             "bf16_units": cpu_features.bf16_units()}
    done = {(r["image"], r["task"], r["seed"]) for r in result["runs"]}
    for seed in range(args.seeds):
        for path in quality.list_images(args.images):
            for task in args.tasks:
                if (path.name, task, seed) in done:
                    continue
                run = run_pair(path, task, seed, args)
                quality.add_run(result, run, summarise, args.out)
                print(f"{path.name} {task} seed {seed}: fp32 {run['fp32']['psnr']:.2f} ({run['fp32']['steps']} steps, "
                      f"{run['fp32']['ms_per_step']:.0f} ms), bf16 {run['bf16']['psnr']:.2f} ({run['bf16']['steps']} steps, "
                      f"{run['bf16']['ms_per_step']:.0f} ms), diff {run['diff']:+.2f} dB", flush=True)
    args.out.with_suffix(".md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
