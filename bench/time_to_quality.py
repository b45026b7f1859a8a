#!/usr/bin/env python
"""PSNR against wall seconds for whole photographs: how soon a restoration reaches its quality.

Each run goes through the public ``dip_fast.restore()`` with a callback that
records, every step, the PSNR of the estimate ``restore`` would return
(the running average, against the clean image) and the seconds since the
call began. Runs are the same for every configuration: same image, same
observation (seeded), same run seed; only ``restore``'s keywords differ
(:data:`CONFIGS`).

Images are used whole (cropped to a multiple of 32, as ``bench/quality.py``
does: CBSD68's 481x321 photographs become 480x320), and split into tuning
and validation by a hash of the file name (``early_stop.split_of``), as the
stopping work does: choose on ``--split tuning``, report on ``validation``.

Wall seconds on a shared machine measure its load as well as the code. So
the step each curve point was taken at is stored beside its seconds, and
``--pace`` (ms per step, per configuration, measured alone on the idle
machine with ``dip-fast tune`` or ``bench/compare.py``) re-times the curves
as steps x pace + the run's set-up time, when the runs had to share the
machine. The JSON says which was used.

Usage::

    python bench/time_to_quality.py ../shared/data/CBSD68 --count 4 --split tuning \\
        --tasks denoise25 --configs default quick --out bench/results/time-to-quality-cpu.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import early_stop  # noqa: E402  (split_of)
import quality  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dip_fast  # noqa: E402
from dip_fast import tasks  # noqa: E402
from dip_fast.tasks import presets  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Issue 34's search (bench/README.md): denoise_fast's fields changed, by name (``preset_compare`` runs the
#: same at 128x128). Without the input perturbation, and the same with denoise_quick's smaller network:
#: fast to fit, but worse than the default on smooth photographs.
DENOISE_SEARCH: Dict[str, Dict[str, Any]] = {
    "denoise_fast_reg0": {"reg_noise_std": 0.0},
    "denoise_small_reg0": {"network": presets.PRESETS["denoise_quick"].network, "reg_noise_std": 0.0},
}
#: restore() keywords of each configuration compared.
CONFIGS: Dict[str, Dict[str, Any]] = {
    "default": {},  # today's defaults: preset="auto" (the CPU's "fast" level), stop="auto", backend="auto"
    **{config: {"preset": presets.PRESETS["denoise_fast"].with_overrides(name=name, **DENOISE_SEARCH[name])}
       for config, name in (("fast_reg0", "denoise_fast_reg0"), ("small_reg0", "denoise_small_reg0"))},
    "budget300": {"time_budget": 300.0},  # today's defaults, planned into 300 s
    "tiles128_budget300": {"tile": 128, "time_budget": 300.0},  # 128x128 tiles, the budget as their hard stop
    "quick": {"preset": "quick"},
    "tiles128": {"tile": 128},  # the default preset on 128x128 tiles, packed into one step
    "tiles128_400": {"tile": 128, "iterations": 400},  # the same cut at 400 steps: an early point of its curve
    "tiles128_800": {"tile": 128, "iterations": 800},  # ... and at 800
    "paper": {"preset": "paper"},
    # The reference network run as the paper's code runs it: its preset, fp32, NCHW, eager, the fixed count.
    "reference_paper": {"preset": "paper", "backend": "reference", "stop": "never", "step_mode": "eager",
                        "precision": "fp32"},
}
#: Each task: restore()'s task, and how its observation is made from the clean image.
TASKS: Dict[str, Dict[str, Any]] = {
    "denoise25": {"task": "denoise", "sigma": 25.0},
    "denoise50": {"task": "denoise", "sigma": 50.0},
    "sr4": {"task": "super_resolution", "scale": 4},
    "inpaint50": {"task": "inpaint", "keep": 0.5},
    "inpaint_text": {"task": "inpaint", "keep": "text"},  # the demo's text overlay
}


def observation(gt: torch.Tensor, spec: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """restore()'s inputs for a clean ``(1, 3, H, W)`` image: the degraded image and its keywords."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    image = gt[0].permute(1, 2, 0).numpy()
    if spec["task"] == "denoise":
        noisy = tasks.degradations.add_gaussian_noise(gt, spec["sigma"], generator=gen)
        return {"image": noisy[0].permute(1, 2, 0).numpy(), "sigma": spec["sigma"]}
    if spec["task"] == "super_resolution":
        return {"image": tasks.degradations.downscale_array(image, spec["scale"]), "scale": spec["scale"]}
    if spec["keep"] == "text":
        mask = tasks.degradations.text_mask(*gt.shape[2:])
    else:
        mask = tasks.degradations.bernoulli_mask(gt.shape[2:], spec["keep"], generator=gen).numpy().astype(bool)
    return {"image": image * mask[..., None], "mask": mask}


def run(path: Path, task: str, config: str, seed: int, max_time: Optional[float],
        crop: Optional[int] = None) -> Dict[str, Any]:
    """One restoration, with its PSNR curve (every step) and its final figures (of a centre ``crop``, if given)."""
    gt = quality.to_tensor(quality.prepare_gt(quality.load_rgb(path), crop))
    inputs = observation(gt, TASKS[task], seed)
    image = inputs.pop("image")
    curve: List[List[float]] = []

    def record(step: int, info: Dict[str, Any]) -> None:
        curve.append([step, info["elapsed"], info["psnr"]])

    # restore() follows one run with a callback; tiles are several, so a tiled run is one point (its end).
    tiled = "tile" in CONFIGS[config]
    t0 = time.perf_counter()
    out, info = dip_fast.restore(image, task=TASKS[task]["task"], ground_truth=gt[0].permute(1, 2, 0).numpy(),
                                 seed=seed, callback=None if tiled else record, return_info=True, progress=False,
                                 max_time=max_time, **inputs, **CONFIGS[config])
    wall = time.perf_counter() - t0
    result = torch.from_numpy(np.ascontiguousarray(np.asarray(out, dtype=np.float32)[..., :3])).permute(2, 0, 1)[None]
    final = quality.psnr_np(quality.to_numpy(result), quality.to_numpy(gt), 1.0)
    if tiled:
        curve.append([info.steps - 1, wall, final])
    setup = wall - (curve[-1][1] if curve else 0.0)
    return {"image": path.name, "task": task, "config": config, "seed": seed, "size": list(gt.shape[2:]),
            "split": early_stop.split_of(path.name), "preset": info.preset, "steps": info.steps,
            "iterations": info.iterations, "stop": info.stop_summary, "execution": info.execution,
            "final_psnr": final, "wall_s": wall, "setup_s": setup, "curve": _thinned(curve)}


def _thinned(curve: List[List[float]], points: int = 400) -> List[List[float]]:
    """About ``points`` points of the curve, its last one always kept."""
    kept = curve[:: max(1, len(curve) // points)]
    return kept + curve[-1:] if curve and kept[-1] is not curve[-1] else kept


def retime(runs: List[Dict[str, Any]], pace: Dict[str, float]) -> None:
    """Seconds of each curve point from its step and a clean pace (ms per step).

    ``pace`` maps ``CONFIG@IMAGE`` (one run) or ``CONFIG`` (every run of it) to the pace; a run with
    neither keeps the seconds it recorded (it ran alone).
    """
    for r in runs:
        ms = pace.get(f"{r['config']}@{r['image']}", pace.get(r["config"]))
        if ms is None:
            continue
        r["curve_seconds"] = "steps x pace + set-up"
        r["curve"] = [[s, r["setup_s"] + (s + 1) * ms / 1e3, p] for s, _, p in r["curve"]]
        r["wall_s"] = r["curve"][-1][1] if r["curve"] else r["setup_s"]


def time_to(curve: Sequence[Sequence[float]], target: float) -> float:
    """Seconds at which the curve first reaches ``target`` dB (inf if never)."""
    return next((t for _, t, p in curve if p is not None and p >= target), math.inf)


def table(runs: List[Dict[str, Any]], baseline: str, margins: Sequence[float] = (0.1, 0.2)) -> List[str]:
    """Per image and task: each configuration's final PSNR and wall time, and its time to the baseline's final
    less each margin (dB), in seconds and as a share of the baseline's wall time."""
    head = "".join(f" s to baseline - {m:g} dB | share |" for m in margins)
    lines = [f"| image | task | config | final PSNR | wall s |{head}", "|---|---|---|---:|---:|" + "---:|---:|" * len(margins)]
    for r in sorted(runs, key=lambda r: (r["task"], r["image"], r["config"] != baseline, r["config"])):
        base = next((b for b in runs if b["image"] == r["image"] and b["task"] == r["task"]
                     and b["config"] == baseline and b["seed"] == r["seed"]), None)
        cells = ""
        for margin in margins:
            reach = time_to(r["curve"], base["final_psnr"] - margin) if base else math.nan
            share = reach / base["wall_s"] if base and math.isfinite(reach) else math.nan
            cells += f" {reach:.0f} | {share:.0%} |"
        lines.append(f"| {r['image']} | {r['task']} | {r['config']} | {r['final_psnr']:.2f} | {r['wall_s']:.0f} |"
                     + cells.replace("nan%", "-").replace(" inf |", " never |"))
    return lines


def plot(runs: List[Dict[str, Any]], path: Path) -> None:
    """PSNR against seconds, one panel per image and task, one colour per configuration (a tiled run is a point)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["task"], r["image"]) for r in runs})
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    colours = {c: f"C{i}" for i, c in enumerate(sorted({r["config"] for r in runs}))}
    for ax, (task, image) in zip(axes.flat, panels):
        for r in (r for r in runs if (r["task"], r["image"]) == (task, image)):
            t = [p[1] for p in r["curve"]]
            point = len(set(t)) == 1  # a tiled run: its end only
            ax.plot(t, [p[2] for p in r["curve"]], color=colours[r["config"]], lw=1.2, marker="o" if point else None,
                    label=r["config"])
        ax.set(title=f"{image.rsplit('.', 1)[0]}, {task}", xlabel="wall seconds", ylabel="PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--count", type=int, default=8, help="images per split taken (sorted by name)")
    p.add_argument("--split", choices=("tuning", "validation", "all"), default="tuning")
    p.add_argument("--tasks", nargs="+", default=["denoise25"], choices=sorted(TASKS))
    p.add_argument("--configs", nargs="+", default=["default", "quick"], choices=sorted(CONFIGS))
    p.add_argument("--baseline", default="default", help="configuration the others are timed against")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-time", type=float, default=None, help="hard stop per run (s)")
    p.add_argument("--pace", nargs="*", default=[], metavar="CONFIG[@IMAGE]=MS",
                   help="clean ms per step of a configuration (or of one of its runs), to re-time the curves of "
                        "runs that shared the machine (see the module docstring)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "time-to-quality-cpu.json")
    args = p.parse_args(argv)
    paths = [q for q in quality.list_images(args.images) if args.split == "all" or early_stop.split_of(q.name) == args.split]
    paths = paths[: args.count]
    # "runs" holds the curves as recorded (re-timing is redone from them on every call).
    done: List[Dict[str, Any]] = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
    have = {(r["image"], r["task"], r["config"], r["seed"]) for r in done}
    for path in paths:
        for task in args.tasks:
            for config in args.configs:
                if (path.name, task, config, args.seed) in have:
                    continue
                r = run(path, task, config, args.seed, args.max_time)
                done.append(r)
                print(f"{path.name} {task} {config}: {r['final_psnr']:.2f} dB in {r['wall_s']:.0f} s "
                      f"({r['steps']} steps, preset {r['preset']})", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"command": " ".join(sys.argv), "runs": done}, indent=1))
    pace = {k: float(v) for k, v in (s.split("=", 1) for s in args.pace)}
    raw = json.loads(json.dumps(done))  # the curves as recorded, kept beside the re-timed ones
    retime(done, pace)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "pace_ms_per_step": pace,
                                    "runs": raw, "runs_retimed": done}, indent=1))
    lines = table(done, args.baseline)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(done, args.out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
