#!/usr/bin/env python
"""PSNR against wall seconds, one image per task: dip_fast beside what a user would pick instead.

For one photograph (a centre crop, RGB) and each task (denoising at sigma 25,
inpainting with half the pixels kept, x4 super-resolution), the same
observation goes to:

* ``default``: ``dip_fast.restore()`` with its defaults (a curve, from its callback);
* ``reference_paper``: the reference network run as the paper's code runs it
  (the task's paper preset, fp32, NCHW, eager, no early stopping; a curve, cut at
  ``--reference-seconds`` because its full count takes far longer on a CPU);
* ``deepinv example`` and ``deepinv defaults``: ``deepinv.models.DeepImagePrior``
  with its documented example's settings (100 iterations) and with its
  defaults for as many iterations as fit in ``default``'s wall time (points;
  skipped without deepinv). Its physics is the same observation model:
  ``Denoising``, ``Inpainting`` with the same mask, and a ``LinearPhysics``
  around dip_fast's Lanczos downsampler for super-resolution;
* the classical baseline (a point): scikit-image's non-local means,
  biharmonic inpainting, bicubic upsampling (the demo's).

PSNR is over the RGB crop in [0, 1] for every method (``bench/quality.py``
reports super-resolution on luma with a border instead). Everything runs
one after another on the machine's threads; the load average is recorded.

Usage::

    python bench/task_time.py ../shared/data/CBSD68/102061.png --crop 128 \\
        --out bench/results/task-time-cpu.json

Writes the JSON, a Markdown table (``.md``) and the plot (``.png``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepinv_compare  # noqa: E402  (deepinv_dip, cpu_name, psnr)
import quality  # noqa: E402
import time_to_quality  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dip_fast.apps import demo  # noqa: E402  (the classical baselines)
from dip_fast.tasks import degradations  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TASKS = ("denoise25", "inpaint50", "sr4")
BASELINE_NAMES = {"denoise25": "non-local means", "denoise50": "non-local means", "inpaint50": "biharmonic",
                  "inpaint_text": "biharmonic", "sr4": "bicubic"}


def _timed(fn: Callable[[], np.ndarray]) -> "tuple[np.ndarray, float]":
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def classical_point(task: str, gt: torch.Tensor, inputs: Dict[str, Any]) -> Dict[str, Any]:
    """The classical baseline's PSNR and seconds on the task's observation (``time_to_quality.observation``)."""
    image = inputs["image"]
    if "sigma" in inputs:
        out, seconds = _timed(lambda: demo.classical_denoise(image, inputs["sigma"]))
    elif "mask" in inputs:
        out, seconds = _timed(lambda: demo.classical_inpaint(image, inputs["mask"]))
    else:
        out, seconds = _timed(lambda: degradations.bicubic_array(image, inputs["scale"]))
    clean = gt[0].permute(1, 2, 0).numpy()
    return {"method": BASELINE_NAMES[task], "psnr": quality.psnr_np(np.clip(out, 0, 1), clean, 1.0), "seconds": seconds}


def _physics(task: str, inputs: Dict[str, Any], shape: torch.Size) -> Any:
    """A deepinv Physics whose forward model is the one the observation was made with."""
    import deepinv

    if task == "denoise25":
        return deepinv.physics.Denoising(deepinv.physics.GaussianNoise(inputs["sigma"] / 255.0))
    if task == "inpaint50":
        mask = torch.from_numpy(inputs["mask"].astype(np.float32))[None]
        return deepinv.physics.Inpainting(img_size=tuple(shape[1:]), mask=mask)
    from dip_fast.reference.downsampler import Downsampler

    down = Downsampler(n_planes=shape[1], factor=inputs["scale"], kernel_type="lanczos2", phase=0.5,
                       preserve_size=True)
    return deepinv.physics.LinearPhysics(A=down, img_size=tuple(shape[1:]))


def deepinv_points(task: str, gt: torch.Tensor, inputs: Dict[str, Any], seed: int,
                   seconds: float) -> List[Dict[str, Any]]:
    """deepinv's DIP with its example's settings, and with its defaults for ``seconds`` of wall time."""
    y = torch.from_numpy(np.ascontiguousarray(inputs["image"])).permute(2, 0, 1)[None].float()
    physics = _physics(task, inputs, gt.shape)
    points = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        example = deepinv_compare.EXAMPLE
        out, took = _timed(lambda: deepinv_compare.deepinv_dip(y, physics, example, example["iterations"], seed))
        points.append({"method": f"deepinv example ({example['iterations']} it)",
                       "psnr": deepinv_compare.psnr(out, gt), "seconds": took})
        default, probe = deepinv_compare.DEFAULT, 2
        _, took = _timed(lambda: deepinv_compare.deepinv_dip(y, physics, default, probe, seed))
        steps = max(1, int(seconds / (took / probe)))
        out, took = _timed(lambda: deepinv_compare.deepinv_dip(y, physics, default, steps, seed))
        points.append({"method": f"deepinv defaults ({steps} of {default['iterations']} it)",
                       "psnr": deepinv_compare.psnr(out, gt), "seconds": took})
    return points


def measured(gt: torch.Tensor, inputs: Dict[str, Any]) -> float:
    """PSNR of the observation itself (denoising, inpainting) or NaN (super-resolution: another size)."""
    if "scale" in inputs:
        return float("nan")
    return quality.psnr_np(np.clip(inputs["image"], 0, 1), gt[0].permute(1, 2, 0).numpy(), 1.0)


def plot(result: Dict[str, Any], path: Path) -> None:
    """One panel per task: dip_fast's curves, the other methods' points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if t in result["tasks"]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 5.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        entry = result["tasks"][task]
        for i, run in enumerate(entry["curves"]):
            label = {"default": "dip_fast restore() defaults",
                     "reference_paper": "reference network, paper's settings"}[run["config"]]
            if run.get("cut"):
                label += f" (cut at {run['wall_s']:.0f} s, step {run['steps']} of {run['iterations']})"
            ax.plot([p[1] for p in run["curve"]], [p[2] for p in run["curve"]], color=f"C{i}", lw=1.2, label=label)
        for j, point in enumerate(entry["points"]):
            ax.scatter([point["seconds"]], [point["psnr"]], color=f"C{j + 2}", marker="osD^v"[j % 5], zorder=3,
                       label=point["method"])
        ax.set(title=f"{task} ({result['image']}, {result['crop']}x{result['crop']})", xlabel="wall seconds",
               ylabel="PSNR (dB, RGB)", xscale="symlog", xlim=(0, None))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(result: Dict[str, Any]) -> List[str]:
    """Per task: every method's final PSNR and wall seconds."""
    lines = [f"# PSNR against wall seconds: {result['image']}, {result['crop']}x{result['crop']} centre crop", "",
             f"CPU: {result['cpu']}, {result['threads']} threads; load average {result['load_start']:.1f} at the "
             f"start, {result['load_end']:.1f} at the end; torch {result['torch']}. PSNR over RGB in [0, 1].", "",
             "| task | method | PSNR (dB) | wall s |", "|---|---|---:|---:|"]
    for task, entry in result["tasks"].items():
        lines.append(f"| {task} | observation | {entry['observation_psnr']:.2f} | 0 |".replace("| nan |", "| - |"))
        for run in entry["curves"]:
            cut = f", cut at step {run['steps']} of {run['iterations']}" if run.get("cut") else ""
            lines.append(f"| {task} | {run['config']} ({run['preset']}{cut}) | {run['final_psnr']:.2f} | "
                         f"{run['wall_s']:.0f} |")
        for point in entry["points"]:
            lines.append(f"| {task} | {point['method']} | {point['psnr']:.2f} | {point['seconds']:.1f} |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("image", type=Path, help="a photograph")
    p.add_argument("--crop", type=int, default=128, help="centre crop side")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-seconds", type=float, default=300.0, help="cut the paper-settings run here")
    p.add_argument("--no-deepinv", action="store_true", help="skip deepinv's DIP")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "task-time-cpu.json")
    p.add_argument("--replot", action="store_true", help="only redraw the table and plot from --out's JSON")
    args = p.parse_args(argv)
    if args.replot:
        write_report(json.loads(args.out.read_text()), args.out)
        return 0
    gt = quality.to_tensor(quality.prepare_gt(quality.load_rgb(args.image), args.crop))
    result: Dict[str, Any] = {"command": " ".join(sys.argv), "image": args.image.name, "crop": args.crop,
                              "cpu": deepinv_compare.cpu_name(), "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "load_start": os.getloadavg()[0], "tasks": {}}
    for task in args.tasks:
        curves = []
        for config, cap in (("default", None), ("reference_paper", args.reference_seconds)):
            run = time_to_quality.run(args.image, task, config, args.seed, cap, crop=args.crop)
            run["cut"] = cap is not None and run["steps"] < (run["iterations"] or 0)  # the fixed count not reached
            curves.append(run)
            print(f"{task} {config}: {run['final_psnr']:.2f} dB in {run['wall_s']:.0f} s ({run['steps']} steps)",
                  flush=True)
        inputs = time_to_quality.observation(gt, time_to_quality.TASKS[task], args.seed)  # the one the runs saw
        points = [classical_point(task, gt, inputs)]
        if not args.no_deepinv:
            points += deepinv_points(task, gt, inputs, args.seed, curves[0]["wall_s"])
        for point in points:
            print(f"{task} {point['method']}: {point['psnr']:.2f} dB in {point['seconds']:.1f} s", flush=True)
        result["tasks"][task] = {"observation_psnr": measured(gt, inputs), "curves": curves, "points": points}
        result["load_end"] = os.getloadavg()[0]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    write_report(result, args.out)
    print("\n".join(table(result)))
    return 0


def write_report(result: Dict[str, Any], out: Path) -> None:
    """The table (``.md``) and the plot (``.png``) beside the results JSON ``out``."""
    out.with_suffix(".md").write_text("\n".join(table(result)) + "\n")
    plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
