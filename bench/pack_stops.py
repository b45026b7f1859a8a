#!/usr/bin/env python
"""Images per hour of ``restore()`` on a list of photographs when the runs stop early, by pack handling.

``restore([...], pack=K)`` trains K images' networks in one step, and each
network stops on its own (the discrepancy rule).  This times, on the same
noisy crops, end to end through ``restore()``:

* ``k1``: ``pack=1``, the images one after another;
* ``frozen``: ``pack=K`` with the stopped networks kept in the step, frozen
  (``fit_packed(repack=False)``, what packs did before);
* ``dropped``: ``pack=K`` with the stopped networks dropped from the step
  (the default).

What to expect, written before measuring: a pack runs until its last
network stops, and a frozen network costs a running one's compute (a
grouped convolution computes every group).  On the 42 recorded 128x128
denoising runs of ``denoise_fast`` (bench/README.md, "Early stopping") the
rule stops between 736 and 2250 steps; for random packs of 4 photographs
22% of the network-steps then belong to networks that have stopped (13% for
packs of 2, 35% for packs of 16).  On the CPU, where a step's cost grows
about linearly with K, dropping them should save close to that share of the
wall time.  A GPU at small sizes is under-used, so it would gain less there.

The results of ``frozen`` and ``dropped`` are the same runs (to the rounding
of a grouped convolution with fewer groups): the PSNRs are recorded to show it.

    python bench/pack_stops.py ../shared/data/CBSD68 --first 8 --k 4 --modes dropped frozen --out bench/results/pack-stops-cpu.json
    python bench/pack_stops.py --step-check --k 4 --out bench/results/pack-stops-cpu.json
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import packed as packed_bench  # noqa: E402  (the synthetic packed runs of the per-step benchmark)
import quality  # noqa: E402  (image loading, crops, environment record)

from dip_fast.pipeline import many  # noqa: E402
from dip_fast import restore, tasks
from dip_fast.core.fit import fit, fit_packed  # noqa: E402
from dip_fast.tasks import degradations  # noqa: E402

MODES = ("k1", "frozen", "dropped")


def run_mode(mode: str, clean: List[torch.Tensor], noisy: List[torch.Tensor], args: argparse.Namespace
             ) -> Dict[str, Any]:
    """One mode over all the crops: wall time, and per image its steps and PSNR."""
    pack = 1 if mode == "k1" else args.k
    packed = functools.partial(fit_packed, repack=mode != "frozen")
    t0 = time.perf_counter()
    with mock.patch.object(many, "fit_packed", packed):
        done = restore([n[0] for n in noisy], "denoise", pack=pack, ground_truth=[c[0] for c in clean],
                       device="cpu", num_threads=args.threads, iterations=args.iterations, return_info=True)
    seconds = time.perf_counter() - t0
    return {"mode": mode, "pack": pack, "seconds": seconds, "images_per_hour": 3600 * len(clean) / seconds,
            "steps": [info.steps for _, info in done], "psnr": [info.psnr for _, info in done]}


def step_after_stops(k: int, size: int, steps: int = 40) -> Dict[str, float]:
    """Median ms per step once all but one of ``k`` packed networks have stopped (at their first step):
    dropped, kept frozen, and one network alone for scale (``denoise_fast``, ``packed.py``'s synthetic images)."""
    preset = tasks.get_preset("denoise_fast")

    def timed(n: int, repack: bool) -> float:
        net, z, term, kwargs, _ = packed_bench._setup(n, size, preset, torch.device("cpu"), "fast")
        stamps: Dict[int, float] = {}
        kwargs.update(iterations=steps, callback=lambda info: stamps.setdefault(info.step, time.perf_counter()))
        if n == 1:
            fit(net, z, term, **kwargs)
        else:
            fit_packed(net, z, term, networks=n, stop="discrepancy", stop_bound=[1e9] * (n - 1) + [float("nan")],
                       repack=repack, **kwargs)
        late = [stamps[t + 1] - stamps[t] for t in range(10, steps - 1)]  # well after the stops
        return 1000 * statistics.median(late)

    return {"dropped": timed(k, True), "frozen": timed(k, False), "alone": timed(1, True)}


def network_steps(steps: Sequence[int], k: int) -> Dict[str, int]:
    """Network-steps computed by packs of ``k`` in order, frozen networks included, against those needed.

    >>> network_steps([100, 300, 200, 200], 2)
    {'computed': 1000, 'needed': 800}
    """
    computed = sum(len(steps[i : i + k]) * max(steps[i : i + k]) for i in range(0, len(steps), k))
    return {"computed": computed, "needed": sum(steps)}


def report(result: Dict[str, Any]) -> str:
    rows = ["| mode | pack | seconds | images / hour | against k1 | network-steps computed / needed | mean PSNR dB |",
            "|---|---|---|---|---|---|---|"]
    base = next((r for r in result["runs"] if r["mode"] == "k1"), None)
    for r in result["runs"]:
        ns = network_steps(r["steps"], r["pack"] if r["mode"] == "frozen" else 1)
        ratio = f"{r['images_per_hour'] / base['images_per_hour']:.2f}x" if base else "n/a"
        rows.append(f"| {r['mode']} | {r['pack']} | {r['seconds']:.0f} | {r['images_per_hour']:.1f} | {ratio} "
                    f"| {ns['computed']} / {ns['needed']} | {statistics.fmean(r['psnr']):.3f} |")
    return "\n".join(rows) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="*", type=Path, help="clean images or folders")
    p.add_argument("--first", type=int, default=8, help="the first N images found (sorted)")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--sigma", type=float, default=25.0)
    p.add_argument("--k", type=int, default=4, help="the pack size of 'frozen' and 'dropped'")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iterations", type=int, default=None, help="step budget (default: restore()'s)")
    p.add_argument("--out", type=Path, required=True, help="JSON results, appended to")
    p.add_argument("--report", action="store_true", help="only print the table of --out")
    p.add_argument("--step-check", action="store_true",
                   help="only time a step once all but one network of a pack have stopped (a minute), into --out")
    args = p.parse_args(argv)
    result = quality.load_results(args.out)
    if args.report:
        print(report(result))
        return 0
    if args.step_check:
        torch.set_num_threads(args.threads)
        result["step_after_stops"] = {"k": args.k, "size": args.crop, **step_after_stops(args.k, args.crop)}
        result.update(environment=quality.environment(torch.device("cpu")))
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["step_after_stops"]))
        return 0
    if not args.images:
        p.error("give the clean images (or --report, or --step-check)")
    paths = quality.list_images(args.images)[: args.first]
    clean = [quality.to_tensor(quality.prepare_gt(quality.load_rgb(path), args.crop)) for path in paths]
    noisy = [degradations.add_gaussian_noise(c, args.sigma, generator=torch.Generator().manual_seed(10_000 + i))
             for i, c in enumerate(clean)]
    result.update(environment=quality.environment(torch.device("cpu")),
                  command=quality.command_line("bench/pack_stops.py", argv), images=[p.name for p in paths])
    for mode in args.modes:
        run = run_mode(mode, clean, noisy, args)
        result["runs"].append(run)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"{mode}: {run['seconds']:.0f} s, steps {run['steps']}", flush=True)
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
