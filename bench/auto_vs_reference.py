"""restore()'s tuned step against the paper's step (the reference network, eager, NCHW), side by side.

For each case (denoising, ``restore()``'s defaults on the CPU), this runs the
tuning exactly as ``restore()`` does (a fresh cache, so it measures), then
times the chosen step and the reference eager step interleaved, one step of
each in turn, on throwaway copies of the run. It reports the medians, the
ratio reference / tuned (>= 1 means the tuned step is not slower) with the
quartiles of the per-round ratios as its spread, the choice and the time the
tuning took.

Usage::

    python bench/auto_vs_reference.py --out bench/results/auto-vs-reference-cpu.json
    python bench/auto_vs_reference.py --sizes 64 --rounds 5   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dip_fast.apps.tune import synthetic_image  # noqa: E402
from dip_fast.core import cpu_features  # noqa: E402
from dip_fast.core.tuning import Candidate, baseline  # noqa: E402
from dip_fast.pipeline import job as stages  # noqa: E402
from dip_fast.pipeline.observation import prepare_observation  # noqa: E402
from dip_fast.pipeline.request import validate_request  # noqa: E402


def _jobs(size: int, pack: int):
    request = validate_request("denoise", device="cpu", pack=pack, restarts=pack)
    jobs = []
    for k in range(pack):
        observed = prepare_observation(request, synthetic_image(size, seed=k), None, None)
        jobs.append(stages.plan_job(request, observed, k))
    return request, jobs


def measure_case(size: int, pack: int, rounds: int) -> dict:
    request, jobs = _jobs(size, pack)
    packed = pack > 1
    t0 = time.perf_counter()
    decision = stages.choose_execution(request, jobs, packed=packed)
    tuning_wall = time.perf_counter() - t0
    chosen = decision.choice
    reference = baseline(request.device)
    steps = {"tuned": stages.timing_step(request, jobs, chosen, packed),
             "reference": stages.timing_step(request, jobs, reference, packed)}
    for step in steps.values():  # first-call allocations and oneDNN plans
        step()
    times = {name: [] for name in steps}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            t = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - t) * 1e3)
    ratios = sorted(ref / tuned for ref, tuned in zip(times["reference"], times["tuned"], strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {
        "size": size, "pack": pack, "iterations": jobs[0].preset.iterations,
        "choice": chosen.label, "source": decision.source, "tuning_s": round(decision.tuning_s, 2),
        "tuning_wall_s": round(tuning_wall, 2),
        "tuning_share": round(decision.tuning_s / (statistics.median(times["tuned"]) / 1e3 * jobs[0].preset.iterations), 4),
        "candidates_ms": {k: round(v, 2) for k, v in decision.ms_per_step.items()},
        "tuned_ms": round(statistics.median(times["tuned"]), 2),
        "reference_ms": round(statistics.median(times["reference"]), 2),
        "ratio_median": round(statistics.median(ratios), 3), "ratio_q1": round(q[0], 3), "ratio_q3": round(q[2], 3),
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--pack-size", type=int, default=128, help="the image side of the pack-of-4 case (0: none)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # A fresh cache: every case is measured, as on a user's first run.
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="dip-fast-bench-")
    cases = [(s, 1) for s in args.sizes] + ([(args.pack_size, 4)] if args.pack_size else [])
    rows = []
    for size, pack in cases:
        row = measure_case(size, pack, args.rounds if size <= 128 else max(5, args.rounds // 2))
        rows.append(row)
        print(f"{size}² K={pack}: choice {row['choice']} ({row['source']}, tuning {row['tuning_s']} s = "
              f"{100 * row['tuning_share']:.1f}% of the run); tuned {row['tuned_ms']} ms, reference "
              f"{row['reference_ms']} ms, reference/tuned {row['ratio_median']} "
              f"[{row['ratio_q1']}, {row['ratio_q3']}]", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "cpu": cpu_features.cpu_name() or platform.processor(), "bf16_units": cpu_features.bf16_units(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit,
        "loadavg": os.getloadavg(), "cases": rows,
        "command": "python bench/auto_vs_reference.py " + " ".join(sys.argv[1:]),
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}))


if __name__ == "__main__":
    main()
