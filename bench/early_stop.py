#!/usr/bin/env python
"""How good is automatic early stopping (ES-WMV)?  Detected step against the best step, and time saved.

For every image and seed, the denoising preset runs for its full fixed step
count (the paper's 3000 for ``denoise_f16_sigma25``) with the ES-WMV tracker
on but never stopping, recording per step the PSNR of the returned estimate
against the clean image and the tracker's window variance.  Afterwards
:func:`dip_fast.early_stop.detect_stop` (the rule the tracker applies on the
device) gives, for each patience, the step where ``stop='auto'`` would have
ended the run and the step whose estimate it would have returned.  Reported:

* the peak PSNR over the run (needs ground truth, so it is measured only) and
  the PSNR at the detected step, and their gap;
* the fraction of the fixed step count the early-stopped run would take; the
  wall time scales with it, since every step costs the same (the tracker's
  cost is inside every measured step).

One run per case replaces two (an early-stopped one and a full one) and
gives exactly the trajectory of both: on the CPU a run is deterministic, and
the tracker only observes.

    python bench/early_stop.py --crop 64 ../shared/data/dip/denoising/F16_GT.png ../shared/data/Set5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (shares the image loading and degradation protocol)

from dip_fast import tasks  # noqa: E402
from dip_fast.early_stop import detect_stop  # noqa: E402
from dip_fast.metrics import psnr  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_case(case: Dict[str, Any], args: argparse.Namespace, device: torch.device, seed: int) -> Dict[str, Any]:
    """One full-length run with the tracker recording; the ES decisions are derived from its history."""
    preset = tasks.get_preset(args.preset)
    obs, gt = case["observation"].to(device), case["gt"].to(device)
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    result, _ = tasks.solve(
        preset, obs, reference=gt, backend=quality.backend_factory(args.backend, False), generator=gen,
        iterations=args.iterations, stop="auto", stop_window=args.window,
        stop_patience=10**9,  # record to the end; where it would stop is derived below
    )
    wall = time.perf_counter() - t0
    # The returned estimate is the average when the preset averages, else the output.
    curve = result.psnr_ref_avg_history or result.psnr_ref_history
    peak_step = max(range(len(curve)), key=curve.__getitem__)
    rec: Dict[str, Any] = {
        "image": case["image"], "seed": seed, "steps": result.steps, "wall_s": wall,
        "noisy_psnr": float(psnr(obs, gt)), "peak_psnr": curve[peak_step], "peak_step": peak_step,
        "final_psnr": curve[-1], "detections": {},
    }
    for patience in args.patience:
        stop, best = detect_stop(result.variance_history, patience)
        rec["detections"][str(patience)] = {
            "stop_step": stop, "best_step": best,
            "psnr": curve[best] if best is not None and stop is not None else curve[-1],
            "steps_run": (stop + 1) if stop is not None else result.steps,
        }
    return rec


def summarise(runs: List[Dict[str, Any]], patiences: Sequence[int], fixed: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for p in patiences:
        gaps = [r["peak_psnr"] - r["detections"][str(p)]["psnr"] for r in runs]
        fracs = [r["detections"][str(p)]["steps_run"] / fixed for r in runs]
        out[str(p)] = {
            "gap_db_mean": statistics.fmean(gaps), "gap_db_max": max(gaps),
            "time_fraction_median": statistics.median(fracs), "time_fraction_max": max(fracs),
            "fired": sum(r["detections"][str(p)]["stop_step"] is not None for r in runs), "n": len(runs),
        }
    return out


def render(result: Dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"ES-WMV on `{cfg['preset']}` denoising (sigma {cfg['sigma']:g}), crop {cfg['crop']}, fixed count "
        f"{cfg['iterations']} steps, window {cfg['window']}, {result['environment']['device']}, backend "
        f"{cfg['backend']}, {result['environment']['date']}, commit {result['environment']['commit']}; "
        f"raw: `{result['json_name']}`.",
        "",
        "| image | seed | noisy dB | peak dB (step) | final dB | patience | stops at | returns step | dB there "
        "| gap to peak | share of fixed run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fixed = cfg["iterations"]
    for r in result["runs"]:
        for p, d in r["detections"].items():
            lines.append(
                f"| {r['image']} | {r['seed']} | {r['noisy_psnr']:.2f} | {r['peak_psnr']:.2f} ({r['peak_step']}) | "
                f"{r['final_psnr']:.2f} | {p} | {d['stop_step'] if d['stop_step'] is not None else 'never'} | "
                f"{d['best_step']} | {d['psnr']:.2f} | {r['peak_psnr'] - d['psnr']:.2f} | "
                f"{d['steps_run'] / fixed:.0%} |"
            )
    lines += ["", "| patience | fired | mean gap dB | max gap dB | median share of fixed run | max share |",
              "|---|---|---|---|---|---|"]
    for p, s in result["summary"].items():
        lines.append(f"| {p} | {s['fired']}/{s['n']} | {s['gap_db_mean']:.2f} | {s['gap_db_max']:.2f} | "
                     f"{s['time_fraction_median']:.0%} | {s['time_fraction_max']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="*", type=Path, help="clean images or folders (default: the shared DIP denoising images)")
    p.add_argument("--preset", default="denoise_f16_sigma25")
    p.add_argument("--sigma", type=float, default=25.0, help="noise std in 8-bit units")
    p.add_argument("--crop", type=int, default=None, help="centre crop, a multiple of 32")
    p.add_argument("--iterations", type=int, default=None, help="the fixed step count (default: the preset's)")
    p.add_argument("--window", type=int, default=100, help="ES-WMV window W")
    p.add_argument("--patience", type=int, nargs="+", default=[1000, 500], help="ES-WMV patience P (several allowed)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--backend", choices=quality.BACKENDS, default="fast")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/early-stop-<device>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.iterations = args.iterations or tasks.get_preset(args.preset).iterations
    # quality.make_case reads these protocol settings.
    args.task, args.factor, args.border = "denoise", 1, 0
    images = quality.list_images(args.paths or [quality.SHARED_DATA / "dip" / "denoising"])[: args.limit]
    if not images:
        print("no images found", file=sys.stderr)
        return 2
    out = args.out or REPO_ROOT / "bench" / "results" / f"early-stop-{device.type}.json"
    try:
        json_name = str(out.resolve().relative_to(REPO_ROOT))
    except ValueError:
        json_name = str(out)
    result: Dict[str, Any] = {
        "schema": "dip_fast-bench-early-stop/1",
        "json_name": json_name,
        "command": "bench/early_stop.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": {
            "date": time.strftime("%Y-%m-%d"), "commit": quality._git_commit(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch_threads": torch.get_num_threads(),
        },
        "config": {"preset": args.preset, "sigma": args.sigma, "crop": args.crop, "iterations": args.iterations,
                   "window": args.window, "patience": args.patience, "backend": args.backend,
                   "images": [i.name for i in images], "seeds": list(range(args.seeds))},
        "runs": [],
    }
    for path in images:
        for seed in range(args.seeds):
            case = quality.make_case(path, args, seed)
            rec = run_case(case, args, device, seed)
            result["runs"].append(rec)
            d = rec["detections"][str(args.patience[0])]
            print(f"  {path.name} seed {seed}: peak {rec['peak_psnr']:.2f} dB at {rec['peak_step']}, "
                  f"ES(P={args.patience[0]}) stops at {d['stop_step']} returning step {d['best_step']} "
                  f"({d['psnr']:.2f} dB), final {rec['final_psnr']:.2f} dB, {rec['wall_s']:.0f} s", flush=True)
            result["summary"] = summarise(result["runs"], args.patience, args.iterations)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")  # a cut-off run keeps what it measured
    md = render(result)
    out.with_suffix(".md").write_text(md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
