#!/usr/bin/env python
"""Preset variants side by side on photograph crops: PSNR (mean and standard error) and seconds per run.

Each variant is a task preset with some fields changed (:data:`VARIANTS`);
every variant restores the same crops (same observation, same seeds) through
``dip_fast.restore()`` with the preset given explicitly, and the task's
classical baseline (``task_time.classical_point``) is scored on the same
observations. PSNR is over the RGB crop in [0, 1]. Runs go one after another
on the machine's threads, so the seconds compare.

    python bench/preset_compare.py ../shared/data/CBSD68 --split tuning --count 4 --task inpaint50 \\
        --variants inpaint_fast fast_bilinear --out bench/results/preset-compare-inpaint50.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepinv_compare  # noqa: E402  (cpu_name)
import early_stop  # noqa: E402  (split_of)
import quality  # noqa: E402
import task_time  # noqa: E402
import time_to_quality  # noqa: E402
from deepinv_compare import mean_se  # noqa: E402  ("mean +- standard error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dip_fast  # noqa: E402
from dip_fast.tasks import presets  # noqa: E402

#: name: (base preset, fields changed).
VARIANTS: Dict[str, "tuple[str, Dict[str, Any]]"] = {
    "inpaint_fast": ("inpaint_fast", {}),
    "inpaint_fast_avg": ("inpaint_fast", {"exp_weight": 0.99}),
    "fast_bilinear": ("inpaint_fast", {"network": presets.PRESETS["denoise_fast"].network}),
    "fast_bilinear_avg": ("inpaint_fast", {"network": presets.PRESETS["denoise_fast"].network, "exp_weight": 0.99}),
    "wide_bilinear_avg": ("inpaint_fast", {"network": dict(presets.DEFAULT_NETWORK,
                          num_channels_down=[32, 64, 128, 128, 128], num_channels_up=[32, 64, 128, 128, 128]),
                          "exp_weight": 0.99}),
    "paper_net_avg": ("inpaint_fast", {"network": presets.PRESETS["denoise_f16_sigma25"].network,
                      "exp_weight": 0.99}),
    # Denoising without the input perturbation (issue 34: it slows the fit of whole photographs).
    "denoise_fast": ("denoise_fast", {}),
    **{name: ("denoise_fast", changes) for name, changes in time_to_quality.DENOISE_SEARCH.items()},
}


def variant(name: str, iterations: Optional[int]) -> presets.Preset:
    base, changes = VARIANTS[name]
    preset = presets.PRESETS[base].with_overrides(name=name, **changes)
    return preset.with_overrides(iterations=iterations) if iterations else preset


def run(path: Path, task: str, name: str, seed: int, crop: int, iterations: Optional[int]) -> Dict[str, Any]:
    gt = quality.to_tensor(quality.prepare_gt(quality.load_rgb(path), crop))
    inputs = time_to_quality.observation(gt, time_to_quality.TASKS[task], seed)
    keywords = {k: v for k, v in inputs.items() if k != "image"}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, info = dip_fast.restore(inputs["image"], task=time_to_quality.TASKS[task]["task"],
                                     preset=variant(name, iterations), seed=seed, return_info=True, progress=False,
                                     **keywords)
    seconds = time.perf_counter() - start
    clean = gt[0].permute(1, 2, 0).numpy()
    return {"image": path.name, "seed": seed, "variant": name, "steps": info.steps, "seconds": seconds,
            "psnr": quality.psnr_np(np.clip(np.asarray(out, dtype=np.float32)[..., :3], 0, 1), clean, 1.0),
            "baseline": task_time.classical_point(task, gt, inputs)["psnr"]}


def table(result: Dict[str, Any]) -> List[str]:
    runs = result["runs"]
    lines = [f"# Preset variants, {result['task']}, {result['crop']}x{result['crop']} crops "
             f"({result['split']} split: {', '.join(sorted({r['image'] for r in runs}))})", "",
             f"CPU: {result['cpu']}, {result['threads']} threads. PSNR over RGB; differences paired per crop.", "",
             "| variant | PSNR | minus baseline | minus first variant | s per run | steps |", "|---|---|---|---|---:|---:|"]
    first = result["variants"][0]
    ref = {(r["image"], r["seed"]): r["psnr"] for r in runs if r["variant"] == first}
    for name in result["variants"]:
        rs = [r for r in runs if r["variant"] == name]
        if not rs:
            continue
        paired = [r["psnr"] - ref[(r["image"], r["seed"])] for r in rs if (r["image"], r["seed"]) in ref]
        lines.append(f"| {name} | {mean_se([r['psnr'] for r in rs])} | {mean_se([r['psnr'] - r['baseline'] for r in rs])} | "
                     f"{mean_se(paired)} | {statistics.fmean(r['seconds'] for r in rs):.0f} | "
                     f"{statistics.fmean(r['steps'] for r in rs):.0f} |")
    base = [r["baseline"] for r in runs if r["variant"] == first]
    lines.append(f"| {task_time.BASELINE_NAMES[result['task']]} | {mean_se(base)} | 0 | | | |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--task", default="inpaint50", choices=sorted(time_to_quality.TASKS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(VARIANTS))
    p.add_argument("--split", choices=("tuning", "validation", "all"), default="tuning")
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--iterations", type=int, default=None, help="override every variant's step count")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    paths = [q for q in quality.list_images(args.images)
             if args.split == "all" or early_stop.split_of(q.name) == args.split][: args.count]
    result = json.loads(args.out.read_text()) if args.out.is_file() else {
        "command": " ".join(sys.argv), "task": args.task, "crop": args.crop, "split": args.split,
        "cpu": deepinv_compare.cpu_name(), "threads": torch.get_num_threads(), "runs": []}
    result["variants"] = list(dict.fromkeys(result.get("variants", []) + args.variants))
    have = {(r["image"], r["seed"], r["variant"]) for r in result["runs"]}
    for name in args.variants:
        for path in paths:
            for seed in args.seeds:
                if (path.name, seed, name) in have:
                    continue
                r = run(path, args.task, name, seed, args.crop, args.iterations)
                result["runs"].append(r)
                print(f"{name} {path.name} seed {seed}: {r['psnr']:.2f} dB (baseline {r['baseline']:.2f}) "
                      f"in {r['seconds']:.0f} s", flush=True)
                args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(table(result)) + "\n")
    print("\n".join(table(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
