"""Quality of ``restore(restarts=K)``: the mean of K runs against one run, denoising.

Per crop and seed set, one packed run of 4 networks (seeds ``4s`` ... ``4s + 3``)
goes through ``restore()``'s own path (settings, early stopping, packing),
and its four estimates give, against the clean crop:

* ``single``: the mean PSNR of the four runs alone;
* ``restarts=2``: the mean PSNR of the means of runs (0, 1) and (2, 3);
* ``restarts=4``: the PSNR of the mean of all four.

Paired differences (``restarts=K`` minus ``single``) over every (crop, seed
set) give the gain, reported as mean and standard error.  A packed run of K
networks equals K separate runs (``tests/test_packed.py``), so this is what
``restarts`` returns.

    python bench/restarts.py --crop 128 --sigma 25 --seed-sets 2 --out bench/results/restarts-cpu.json IMAGES...
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (image loading, crops, environment record)

from dip_fast.pipeline import job  # noqa: E402
from dip_fast.pipeline import many
from dip_fast.pipeline.observation import prepare_observation  # noqa: E402
from dip_fast.pipeline.request import validate_request  # noqa: E402
from dip_fast.tasks import degradations  # noqa: E402

RUNS = 4


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return -10.0 * math.log10(float((a.clamp(0, 1) - b).double().square().mean()))


def run_case(path: Path, args: argparse.Namespace, seed_set: int) -> Dict[str, Any]:
    gt = quality.to_tensor(quality.prepare_gt(quality.load_rgb(path), args.crop))
    noisy = degradations.add_gaussian_noise(gt, args.sigma, generator=torch.Generator().manual_seed(10_000 + seed_set))
    request = validate_request("denoise", preset=args.preset, device=args.device, restarts=RUNS, pack=RUNS,
                               num_threads=args.threads, iterations=args.iterations)
    observed = prepare_observation(request, noisy[0], None, gt[0])
    first = job.plan_job(request, observed, RUNS * seed_set)
    jobs = [many._restart(first, RUNS * seed_set + r) for r in range(RUNS)]
    t0 = time.perf_counter()
    with job.run_settings(request.num_threads, request.deterministic):
        done = many._run_pack(request, jobs)
    estimates = [estimate.cpu() for estimate, _ in done]
    single = [_psnr(e, gt) for e in estimates]
    pairs = [_psnr((estimates[0] + estimates[1]) / 2, gt), _psnr((estimates[2] + estimates[3]) / 2, gt)]
    return {
        "image": path.name, "crop": args.crop, "sigma": args.sigma, "seed_set": seed_set,
        "noisy": _psnr(noisy, gt), "single": single, "restarts2": pairs,
        "restarts4": _psnr(sum(estimates) / RUNS, gt),
        "steps": [info.steps for _, info in done], "stop_steps": [info.stop_step for _, info in done],
        "seconds": time.perf_counter() - t0,
    }


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    stat = quality.mean_se
    single = [statistics.fmean(r["single"]) for r in runs]
    r2 = [statistics.fmean(r["restarts2"]) for r in runs]
    r4 = [r["restarts4"] for r in runs]
    return {
        "single": stat(single), "restarts2": stat(r2), "restarts4": stat(r4),
        "gain2": stat([b - a for a, b in zip(single, r2)]), "gain4": stat([b - a for a, b in zip(single, r4)]),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--sigma", type=float, default=25.0)
    p.add_argument("--seed-sets", type=int, default=2)
    p.add_argument("--preset", default="fast")
    p.add_argument("--device", default="cpu")
    p.add_argument("--iterations", type=int, default=None, help="step budget (default: restore()'s)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    result = quality.load_results(args.out)
    result["environment"] = quality.environment(torch.device(args.device))
    done = {(r["image"], r["seed_set"]) for r in result["runs"]}
    for seed_set in range(args.seed_sets):
        for path in quality.list_images(args.images):
            if (path.name, seed_set) in done:
                continue
            run = run_case(path, args, seed_set)
            quality.add_run(result, run, summarise, args.out)
            print(f"{path.name} set {seed_set}: single {statistics.fmean(run['single']):.2f}, "
                  f"restarts=2 {statistics.fmean(run['restarts2']):.2f}, restarts=4 {run['restarts4']:.2f} dB "
                  f"({run['seconds']:.0f} s)", flush=True)
    s = result["summary"]
    print(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
