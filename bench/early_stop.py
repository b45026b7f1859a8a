#!/usr/bin/env python
"""How good is automatic early stopping (ES-WMV)?  Detected estimate against the best step, and time saved.

For every image and seed, the denoising preset runs twice from the same
weights, input and noise:

* for its full fixed step count (the paper's 3000 for ``denoise_f16_sigma25``),
  recording per step the PSNR against the clean image of the estimate the
  run would return there (the exponential average) and of the raw output:
  their peaks are what a hand-picked stopping step could reach (measured
  only: they need ground truth);
* with ``stop='auto'`` (window ``--window``, patience ``--patience``): where
  it stops, the PSNR of what it returns (the mean of the most stable window)
  and its wall time.

Reported: the gap between the early-stopped estimate and the peak, the PSNR
of the fixed-count result, and the wall time of the early-stopped run as a
share of the fixed-count one, both timed in the same process (CPU time of
the process on the CPU, so that other jobs on a shared machine do not
count; wall time on CUDA).

    python bench/early_stop.py --crop 64 ../shared/data/dip/denoising/F16_GT.png ../shared/data/dip/restoration
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
from dip_fast.metrics import psnr  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def _solve(case: Dict[str, Any], args: argparse.Namespace, device: torch.device, seed: int, **fit_kwargs: Any):
    preset = tasks.get_preset(args.preset)
    obs, gt = case["observation"].to(device), case["gt"].to(device)
    torch.manual_seed(seed)  # the same initial weights for both runs
    gen = torch.Generator(device=device).manual_seed(seed)  # the same z and perturbations
    # CPU time of this process: on a shared machine it does not count other jobs' load, and with one
    # thread it is the wall time of a quiet machine (on CUDA the wall time is what counts).
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    t0 = clock()
    result, _ = tasks.solve(preset, obs, reference=gt, backend=quality.backend_factory(args.backend, False),
                            generator=gen, iterations=args.iterations, **fit_kwargs)
    return result, clock() - t0


def run_case(case: Dict[str, Any], args: argparse.Namespace, device: torch.device, seed: int) -> Dict[str, Any]:
    """The fixed-count run and the early-stopped run of one image and seed."""
    gt = case["gt"].to(device)
    fixed, fixed_s = _solve(case, args, device, seed)
    auto, auto_s = _solve(case, args, device, seed, stop="auto", stop_window=args.window,
                          stop_patience=args.patience)
    curve = fixed.psnr_ref_avg_history or fixed.psnr_ref_history
    raw = fixed.psnr_ref_history
    returned = auto.stop_output if auto.stop_output is not None else (
        auto.output_avg if auto.output_avg is not None else auto.output)
    return {
        "image": case["image"], "seed": seed,
        "noisy_psnr": float(psnr(case["observation"].to(device), gt)),
        "peak_psnr": max(curve), "peak_step": curve.index(max(curve)),
        "peak_raw_psnr": max(raw), "peak_raw_step": raw.index(max(raw)),
        "fixed_psnr": curve[-1], "fixed_steps": fixed.steps, "fixed_s": fixed_s,
        "stop_reason": auto.stop_reason, "stop_step": auto.stop_step, "auto_steps": auto.steps,
        "auto_psnr": float(psnr(returned, gt)), "auto_s": auto_s,
    }


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    gaps = [r["peak_psnr"] - r["auto_psnr"] for r in runs]
    shares = [r["auto_s"] / r["fixed_s"] for r in runs]
    return {
        "gap_db_mean": statistics.fmean(gaps), "gap_db_max": max(gaps),
        "gain_over_fixed_db_mean": statistics.fmean(r["auto_psnr"] - r["fixed_psnr"] for r in runs),
        "time_share_median": statistics.median(shares), "time_share_max": max(shares),
        "fired": sum(r["stop_step"] is not None for r in runs), "n": len(runs),
    }


def render(result: Dict[str, Any]) -> str:
    cfg, env = result["config"], result["environment"]
    lines = [
        f"ES-WMV on `{cfg['preset']}` denoising (sigma {cfg['sigma']:g}), crop {cfg['crop']}, fixed count "
        f"{cfg['iterations']} steps, window {cfg['window']}, patience {cfg['patience']}, {env['device']} "
        f"({env['torch_threads']} thread(s)), backend {cfg['backend']}, {env['date']}, commit {env['commit']}; "
        f"raw: `{result['json_name']}`.",
        "",
        "| image | seed | noisy dB | peak dB (step) | raw-output peak dB (step) | fixed-count dB | stopped at "
        "| early-stopped dB | gap to peak | time vs fixed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['image']} | {r['seed']} | {r['noisy_psnr']:.2f} | {r['peak_psnr']:.2f} ({r['peak_step']}) | "
            f"{r['peak_raw_psnr']:.2f} ({r['peak_raw_step']}) | {r['fixed_psnr']:.2f} | "
            f"{r['auto_steps'] if r['stop_step'] is not None else 'never'} | {r['auto_psnr']:.2f} | "
            f"{r['peak_psnr'] - r['auto_psnr']:+.2f} | {r['auto_s'] / r['fixed_s']:.0%} |"
        )
    s = result["summary"]
    lines += ["", f"Fired {s['fired']}/{s['n']}; gap to the peak: mean {s['gap_db_mean']:+.2f} dB, "
                  f"worst {s['gap_db_max']:+.2f} dB; gain over the fixed count: mean "
                  f"{s['gain_over_fixed_db_mean']:+.2f} dB; wall time vs the fixed count: median "
                  f"{s['time_share_median']:.0%}, worst {s['time_share_max']:.0%}."]
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
    p.add_argument("--patience", type=int, default=1000, help="ES-WMV patience P")
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
    result: Dict[str, Any] = {
        "schema": "dip_fast-bench-early-stop/1",
        "json_name": quality.json_name(out),
        "command": "bench/early_stop.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": quality.environment(device),
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
            print(f"  {path.name} seed {seed}: peak {rec['peak_psnr']:.2f} dB at {rec['peak_step']}, fixed count "
                  f"{rec['fixed_psnr']:.2f} dB in {rec['fixed_s']:.0f} s; stop='auto' ended after "
                  f"{rec['auto_steps']} steps with {rec['auto_psnr']:.2f} dB in {rec['auto_s']:.0f} s", flush=True)
            result["summary"] = summarise(result["runs"])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")  # a cut-off run keeps what it measured
    md = render(result)
    out.with_suffix(".md").write_text(md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
