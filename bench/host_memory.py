#!/usr/bin/env python
"""What keeping freed host memory (``dip_fast.core.host_memory``) gains a CPU step, side by side in one process.

Every repetition runs each variant's step once with glibc's defaults and
once with freed memory kept for reuse (the order alternating), one settling
step before each timed one, and counts the step's minor page faults
(``getrusage``). The ratio is taken within a repetition, so a neighbour's
load hits both sides alike.

Usage::

    python bench/host_memory.py --sizes 128 256 --out bench/results/host-memory-cpu.json
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402

import torch  # noqa: E402



def _timed(step: Callable[[], None]) -> Dict[str, float]:
    step()  # settles the heap in this mode
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    step()
    return {"s": time.perf_counter() - t0, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}


def measure(size: int, variants: Sequence[str], repeats: int) -> Dict[str, Any]:
    """Per variant: median ms and page faults per step in each mode, and the per-repetition ratio system / reuse."""
    steps = compare.build_steps(variants, size, torch.device("cpu"))
    for step in steps.values():
        step()
    samples: Dict[str, Dict[str, List[Dict[str, float]]]] = {v: {"system": [], "reuse": []} for v in variants}
    for rep in range(repeats):
        for mode in (("system", "reuse") if rep % 2 == 0 else ("reuse", "system")):
            with compare.host_memory(mode):
                for name, step in steps.items():
                    samples[name][mode].append(_timed(step))
    out: Dict[str, Any] = {}
    for name, by_mode in samples.items():
        ratios = [a["s"] / b["s"] for a, b in zip(by_mode["system"], by_mode["reuse"], strict=True)]
        out[name] = {mode: {"ms": 1e3 * statistics.median(x["s"] for x in runs),
                            "faults": statistics.median(x["faults"] for x in runs)} for mode, runs in by_mode.items()}
        out[name]["system_over_reuse"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


def render(result: Dict[str, Any]) -> List[str]:
    lines = ["| size | variant | system ms | faults / step | reuse ms | faults / step | system / reuse |",
             "|---|---|---:|---:|---:|---:|---|"]
    for size, variants in result["sizes"].items():
        for name, v in variants.items():
            r = v["system_over_reuse"]
            lines.append(f"| {size}² | {name} | {v['system']['ms']:.1f} | {v['system']['faults']:.0f} | "
                         f"{v['reuse']['ms']:.1f} | {v['reuse']['faults']:.0f} | "
                         f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--variants", nargs="+", default=["fast_cl", "fast_cl_bf16", "reference"],
                   choices=sorted(compare.VARIANTS))
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--out", type=Path, default=compare.RESULTS_DIR / "host-memory-cpu.json")
    args = p.parse_args(argv)
    result: Dict[str, Any] = {"command": "bench/host_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
                              "environment": compare.environment(torch.device("cpu")), "sizes": {}}
    for size in args.sizes:
        result["sizes"][str(size)] = measure(size, args.variants, args.repeats)
        args.out.write_text(json.dumps(result, indent=1))
    lines = render(result)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
