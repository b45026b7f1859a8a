"""Tiled against whole-image restoration: what ``restore(tile=N)`` costs in quality.

Per crop and seed, ``restore()`` denoises the same noisy crop twice with
its default settings: whole, and in overlapping ``--tile`` tiles (packed,
blended).  The paired difference (tiled minus whole PSNR against the clean
crop) is reported as mean and standard error over every (crop, seed).

    python bench/tiles.py --crop 256 --tile 128 --seeds 2 --out bench/results/tiles-cpu.json IMAGES...
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (image loading, crops, environment record)

from dip_fast import restore  # noqa: E402
from dip_fast.tasks import degradations  # noqa: E402


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return -10.0 * math.log10(float((a.clamp(0, 1) - b).double().square().mean()))


def run_case(path: Path, args: argparse.Namespace, seed: int) -> Dict[str, Any]:
    gt = quality.to_tensor(quality.prepare_gt(quality.load_rgb(path), args.crop))[0]
    noisy = degradations.add_gaussian_noise(gt[None], args.sigma, generator=torch.Generator().manual_seed(10_000 + seed))[0]
    common = dict(preset=args.preset, device=args.device, seed=seed, num_threads=args.threads,
                  iterations=args.iterations, return_info=True)
    row: Dict[str, Any] = {"image": path.name, "crop": args.crop, "tile": args.tile, "sigma": args.sigma, "seed": seed,
                           "noisy": _psnr(noisy, gt)}
    for name, extra in (("whole", {}), ("tiled", {"tile": args.tile})):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the CPU run-time and tiling notices
            out, info = restore(noisy, "denoise", **common, **extra)
        row[name] = _psnr(out, gt)
        row[f"{name}_seconds"] = time.perf_counter() - t0
        row[f"{name}_tiles"] = info.tiles
    return row


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    stat = quality.mean_se
    return {"whole": stat([r["whole"] for r in runs]), "tiled": stat([r["tiled"] for r in runs]),
            "tiled_minus_whole": stat([r["tiled"] - r["whole"] for r in runs])}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--sigma", type=float, default=25.0)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--preset", default="fast")
    p.add_argument("--device", default="cpu")
    p.add_argument("--iterations", type=int, default=None, help="step budget (default: restore()'s)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    result = quality.load_results(args.out)
    result["environment"] = quality.environment(torch.device(args.device))
    done = {(r["image"], r["seed"]) for r in result["runs"]}
    for seed in range(args.seeds):
        for path in quality.list_images(args.images):
            if (path.name, seed) in done:
                continue
            row = run_case(path, args, seed)
            quality.add_run(result, row, summarise, args.out)
            print(f"{path.name} seed {seed}: whole {row['whole']:.2f}, tiled {row['tiled']:.2f} dB "
                  f"({row['tiled_tiles']} tiles; {row['whole_seconds']:.0f} s and {row['tiled_seconds']:.0f} s)",
                  flush=True)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
