#!/usr/bin/env python
"""Do restarts on mirrored copies of the observation average better than restarts on the observation itself?

``restore(restarts=2)`` gains what the two runs do not share.  Runs differ
by their seeds only; the hourglass's stride-2 levels sample the image on a
fixed grid, and a mirrored image meets that grid the other way round, so
runs on mirrored copies (mirrored back afterwards) might share less.

Per crop, one packed run of 4 networks through ``restore()``'s own path
(settings, stopping rule and packing; the rule and noise level of the
unmirrored observation for all four): networks 0 and 1 (seeds 0, 1) see
the noisy crop, network 2 (seed 2) the crop mirrored left to right, network
3 (seed 3) mirrored top to bottom.  The gain of a pair is the PSNR of its
mean minus the mean PSNR of its two runs; pair (0, 1) is the plain restart,
pairs (0, 2), (0, 3), (1, 2), (1, 3) mix a plain and a mirrored run.

What to expect, written before measuring: if the grid's alignment made the
runs' errors alike, the mixed pairs would gain more than +0.35 dB (the
plain pair's gain at these settings); if the seeds already decorrelate
whatever the grid does, both gain the same.

    python bench/restart_flips.py IMAGES... --out bench/results/restart-flips-cpu.json
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
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

#: Per network, the dimensions of a (C, H, W) crop it sees mirrored: none, none, width, height.
MIRRORS = ((), (), (2,), (1,))
PLAIN_PAIR = (0, 1)
MIXED_PAIRS = ((0, 2), (0, 3), (1, 2), (1, 3))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return -10.0 * math.log10(float((a.clamp(0, 1) - b).double().square().mean()))


def _mirror(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    return x.flip(list(dims)) if dims else x


def run_case(path: Path, args: argparse.Namespace) -> Dict[str, Any]:
    gt = quality.to_tensor(quality.prepare_gt(quality.load_rgb(path), args.crop))[0]
    noisy = degradations.add_gaussian_noise(gt[None], args.sigma, generator=torch.Generator().manual_seed(10_000))[0]
    request = validate_request("denoise", device="cpu", restarts=len(MIRRORS), pack=len(MIRRORS),
                               num_threads=args.threads)
    plain = job.plan_job(request, prepare_observation(request, noisy, None, gt), 0)
    jobs = []
    for seed, dims in enumerate(MIRRORS):
        observed = prepare_observation(request, _mirror(noisy, dims), None, _mirror(gt, dims))
        jobs.append(dataclasses.replace(plain, observed=observed, seed=seed,
                                        info=dataclasses.replace(plain.info, seed=seed)))
    t0 = time.perf_counter()
    with job.run_settings(request.num_threads, request.deterministic):
        done = many._run_pack(request, jobs)
    estimates = [_mirror(estimate.cpu()[0], dims) for (estimate, _), dims in zip(done, MIRRORS)]
    single = [_psnr(e, gt) for e in estimates]
    gains = {f"{a}{b}": _psnr((estimates[a] + estimates[b]) / 2, gt) - (single[a] + single[b]) / 2
             for a, b in itertools.combinations(range(len(MIRRORS)), 2)}
    return {"image": path.name, "crop": args.crop, "sigma": args.sigma, "single": single, "pair_gain": gains,
            "mean4": _psnr(sum(estimates) / len(estimates), gt), "steps": [info.steps for _, info in done],
            "seconds": time.perf_counter() - t0}


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    plain = [r["pair_gain"]["%d%d" % PLAIN_PAIR] for r in runs]
    mixed = [statistics.fmean(r["pair_gain"]["%d%d" % p] for p in MIXED_PAIRS) for r in runs]
    return {"plain_pair_gain": quality.mean_se(plain), "mirrored_pair_gain": quality.mean_se(mixed),
            "mirrored_minus_plain": quality.mean_se([m - p for m, p in zip(mixed, plain)])}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--sigma", type=float, default=25.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    result = quality.load_results(args.out)
    result.update(environment=quality.environment(torch.device("cpu")),
                  command=quality.command_line("bench/restart_flips.py", argv))
    done = {r["image"] for r in result["runs"]}
    for path in quality.list_images(args.images):
        if path.name not in done:
            run = run_case(path, args)
            quality.add_run(result, run, summarise, args.out)
            print(f"{path.name}: plain pair {run['pair_gain']['01']:+.3f} dB, steps {run['steps']}", flush=True)
    print(json.dumps(result.get("summary"), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
