#!/usr/bin/env python
"""How well is sigma estimated from a noisy photograph?  ``dip_fast.pipeline.noise_level`` against the wavelet estimator.

Per image (centre ``--crop``) and noise level, clipped Gaussian noise is
added (seeded per image), and each estimator's sigma is compared with two
references: the sigma that was added (what the clip-aware stopping rule and
the input perturbation need) and the standard deviation of the noise
actually present, ``std(y - x)`` after clipping (what the rule before the
clipping model held the residual to).  The crops are grouped by the share
of their values clipped at 0 or 1 (at least 5%, under 5%, under 1%).
Reported per level and group: the mean relative error (bias), its root mean
square, and the largest over- and under-estimate.  An over-estimate is the
harmful side: it stops a run before the image is fitted.

* ``patch-pca``: :func:`dip_fast.pipeline.noise_level.estimate_sigma` (restore's), which reads the
  sigma before clipping from the clipped-Gaussian model;
* ``patch-pca, no clip model``: the same with ``clipped=False`` (restore's estimate before the model);
* ``wavelet``: ``skimage.restoration.estimate_sigma`` per channel, averaged
  (what restore used before that).

    python bench/noise_level.py --crop 128 --out bench/results/noise-level-cpu.md ../shared/data/CBSD68
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from skimage.restoration import estimate_sigma as wavelet_sigma

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (image loading, crops, environment record)

from dip_fast.pipeline.noise_level import clipped_share, estimate_sigma  # noqa: E402
from dip_fast.tasks import degradations  # noqa: E402


def wavelet(y: torch.Tensor) -> float:
    img = y[0].double().permute(1, 2, 0).numpy()
    return 255.0 * statistics.fmean(float(s) for s in wavelet_sigma(img, channel_axis=-1, average_sigmas=False))


ESTIMATORS = {"patch-pca": estimate_sigma,
              "patch-pca, no clip model": lambda y: estimate_sigma(y, clipped=False),
              "wavelet": wavelet}
REFERENCES = ("added", "present")
GROUPS = {"clipped >= 5%": lambda share: share >= 0.05, "clipped < 5%": lambda share: share < 0.05,
          "clipped < 1%": lambda share: share < 0.01}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--sigmas", type=float, nargs="+", default=[5.0, 15.0, 25.0, 50.0])
    p.add_argument("--out", type=Path, default=None, help="Markdown table (and a .json beside it)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    # estimates[name][sigma]: one entry per image; present/share likewise.
    estimates: Dict[str, Dict[float, List[float]]] = {name: {s: [] for s in args.sigmas} for name in ESTIMATORS}
    present: Dict[float, List[float]] = {s: [] for s in args.sigmas}
    share: Dict[float, List[float]] = {s: [] for s in args.sigmas}
    images = quality.list_images(args.paths)
    for i, path in enumerate(images):
        gt = quality.to_tensor(quality.prepare_gt(quality.load_rgb(path), args.crop))
        for sigma in args.sigmas:
            y = degradations.add_gaussian_noise(gt, sigma, generator=torch.Generator().manual_seed(10_000 + i))
            present[sigma].append(255.0 * float((y - gt).double().square().mean().sqrt()))
            share[sigma].append(clipped_share(y))
            for name, fn in ESTIMATORS.items():
                estimates[name][sigma].append(fn(y))
    lines = [f"{len(images)} images, {args.crop}x{args.crop} centre crops; relative error of sigma against the "
             "sigma added and against the clipped noise present, by the share of values clipped", "",
             "| sigma | crops | n | estimator | against | bias | rms | largest over | largest under |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for sigma in args.sigmas:
        for group, member in GROUPS.items():
            idx = [k for k, c in enumerate(share[sigma]) if member(c)]
            if not idx:
                continue
            for name in ESTIMATORS:
                for ref in REFERENCES:
                    e = [estimates[name][sigma][k] / (sigma if ref == "added" else present[sigma][k]) - 1.0
                         for k in idx]
                    row = {"n": len(e), "bias": statistics.fmean(e),
                           "rms": math.sqrt(statistics.fmean(v * v for v in e)), "max": max(e), "min": min(e)}
                    summary[f"{name} | sigma {sigma:g} | {group} | vs {ref}"] = row
                    lines.append(f"| {sigma:g} | {group} | {len(e)} | {name} | {ref} | {row['bias']:+.1%} "
                                 f"| {row['rms']:.1%} | {row['max']:+.1%} | {row['min']:+.1%} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        args.out.write_text(md)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"environment": quality.environment(torch.device("cpu")), "crop": args.crop, "images": len(images),
             "names": [p.name for p in images], "summary": summary, "estimates": estimates, "present": present,
             "clipped_share": share}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
