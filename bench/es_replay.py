#!/usr/bin/env python
"""Replay stopping rules on trajectories recorded by ``bench/early_stop.py``; tune on one split, report the other.

For every rule setting of the grid (window ``W``, tolerance, patience) and
every recorded run, :func:`dip_fast.early_stop.replay` decides on the
logged prefix where the run stops and which window it returns; the logged
ground-truth PSNRs then score that choice:

* gap to the oracle: the peak PSNR of the exponential average over the whole
  fixed-count run (what a hand-picked step would reach) minus the PSNR returned;
* against the fixed count: PSNR returned minus the fixed-count result's;
* against the input: PSNR returned minus the degraded input's;
* steps: the steps taken as a share of the fixed count.

A setting is chosen on the tuning split only (the smallest mean gap among
those meeting the issue's criteria there; if none does, the one with the
fewest criteria missed, then the smallest mean gap), and reported on the
validation split beside the fixed count and plain ES-WMV.

    python bench/es_replay.py bench/results/es-traj-*.json --out bench/results/es-replay.md
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from dip_fast.early_stop import DiscrepancyRule, replay

WINDOWS = (50, 100, 200)
TOLERANCES = (0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.3, 1.5)
PATIENCES = (50, 100, 200, 300, 500)
#: The issue's "done when" limits.
LIMITS = {"gap_mean": 0.5, "gap_p95": 1.5, "worst_vs_fixed": -0.5, "worst_vs_input": 0.0, "steps_median": 0.6}


def noise_var(run: Dict[str, Any], source: str) -> Optional[float]:
    """sigma^2 in [0, 1] units: the estimate restore() makes, or (denoising) the true level."""
    s = run["sigma"] if source == "true" and run["sigma"] is not None else run["sigma_est"]
    return None if s is None else (s / 255.0) ** 2


def score(run: Dict[str, Any], window: int, rule: Optional[DiscrepancyRule], gated: bool = True) -> Dict[str, float]:
    """Replay one setting on one run; ``rule=None`` is the fixed count, ``gated=False`` plain ES-WMV."""
    log, n = run["log"], run["iterations"]
    oracle = max(log["psnr_avg"])
    if rule is None:
        returned, steps = run["fixed_psnr"], n
    else:
        residual = log[f"res_win{window}"] if gated else [0.0] * n
        d = replay(log[f"var_win{window}"], residual, rule, n)
        returned = log[f"psnr_win{window}"][d.stop_step] if d.stop_step is not None else run["fixed_psnr"]
        steps = d.steps
    return {"gap": oracle - returned, "vs_fixed": returned - run["fixed_psnr"],
            "vs_input": returned - run["input_psnr"], "steps": steps / n, "psnr": returned, "oracle": oracle}


def p95(values: Sequence[float]) -> float:
    """95th percentile, linear interpolation between order statistics."""
    v = sorted(values)
    k = (len(v) - 1) * 0.95
    lo = math.floor(k)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (k - lo)


def summarise(scores: List[Dict[str, float]]) -> Dict[str, float]:
    return {
        "n": len(scores),
        "gap_mean": statistics.fmean(s["gap"] for s in scores),
        "gap_p95": p95([s["gap"] for s in scores]),
        "worst_vs_fixed": min(s["vs_fixed"] for s in scores),
        "worst_vs_input": min(s["vs_input"] for s in scores),
        "steps_median": statistics.median(s["steps"] for s in scores),
        "psnr_mean": statistics.fmean(s["psnr"] for s in scores),
    }


def missed(summary: Dict[str, float]) -> List[str]:
    """The criteria a summary fails."""
    out = []
    for key, limit in LIMITS.items():
        v = summary[key]
        if (key.startswith("worst") and v < limit) or (not key.startswith("worst") and v > limit):
            out.append(key)
    return out


def settings() -> Iterable[Tuple[int, float, int, str]]:
    return itertools.product(WINDOWS, TOLERANCES, PATIENCES, ("est", "true"))


def tune(runs: List[Dict[str, Any]]) -> Tuple[Tuple[int, float, int, str], Dict[str, float]]:
    """The best setting on ``runs`` (see the module docstring)."""
    best = None
    for w, tol, pat, src in settings():
        scores = [score(r, w, DiscrepancyRule(noise_var(r, src), tol, pat)) for r in runs]
        s = summarise(scores)
        key = (len(missed(s)), s["gap_mean"])
        if best is None or key < best[0]:
            best = (key, (w, tol, pat, src), s)
    return best[1], best[2]


def table_row(name: str, s: Dict[str, float]) -> str:
    fails = missed(s)
    return (f"| {name} | {s['n']} | {s['psnr_mean']:.2f} | {s['gap_mean']:.2f} | {s['gap_p95']:.2f} | "
            f"{s['worst_vs_fixed']:+.2f} | {s['worst_vs_input']:+.2f} | {s['steps_median']:.0%} | "
            f"{'all met' if not fails else 'misses ' + ', '.join(fails)} |")


HEADER = ["| rule | runs | mean PSNR dB | mean gap to oracle dB | p95 gap dB | worst vs fixed dB | worst vs input dB "
          "| median steps | criteria |", "|---|---|---|---|---|---|---|---|---|"]


def report(runs: List[Dict[str, Any]], group: str) -> Tuple[List[str], Dict[str, Any]]:
    """Markdown lines and the numbers for one group of runs (one task)."""
    tuning = [r for r in runs if r["split"] == "tuning"]
    validation = [r for r in runs if r["split"] == "validation"]
    lines = [f"### {group}: {len(tuning)} tuning and {len(validation)} validation runs", ""]
    out: Dict[str, Any] = {"group": group}
    if not tuning:
        lines.append("No tuning runs: nothing to tune.")
        return lines, out
    (w, tol, pat, src), tuned = tune(tuning)
    out["chosen"] = {"window": w, "tolerance": tol, "patience": pat, "noise": src, "tuning": tuned}
    lines += [f"Chosen on tuning: window {w}, tolerance {tol}, patience {pat}, noise level "
              f"{'estimated from the observation' if src == 'est' else 'the true sigma'}.", ""]
    for split, rs in (("tuning", tuning), ("validation", validation)):
        if not rs:
            continue
        fixed = summarise([score(r, w, None) for r in rs])
        wmv = summarise([score(r, 100, DiscrepancyRule(1.0, 1.0, 1000), gated=False) for r in rs])
        rule = summarise([score(r, w, DiscrepancyRule(noise_var(r, src), tol, pat)) for r in rs])
        est = summarise([score(r, w, DiscrepancyRule(noise_var(r, "est"), tol, pat)) for r in rs])
        out[split] = {"fixed": fixed, "es_wmv": wmv, "rule": rule, "rule_est": est}
        lines += [f"**{split}**", ""] + HEADER + [
            table_row("fixed count", fixed),
            table_row("ES-WMV (W 100, P 1000, no gate)", wmv),
            table_row(f"discrepancy-gated (W {w}, tol {tol}, P {pat}, sigma {src})", rule),
        ]
        if src != "est":
            lines.append(table_row("same, sigma estimated", est))
        lines.append("")
    lines += ["Per run (chosen rule):", "", "| image | split | task | sigma | input dB | fixed dB | oracle dB | "
              "returned dB | steps | decision |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        rule = DiscrepancyRule(noise_var(r, src), tol, pat)
        d = replay(r["log"][f"var_win{w}"], r["log"][f"res_win{w}"], rule, r["iterations"])
        s = score(r, w, rule)
        lines.append(f"| {r['image']} | {r['split']} | {r['task']} | {r['sigma'] or '-'} | {r['input_psnr']:.2f} | "
                     f"{r['fixed_psnr']:.2f} | {s['oracle']:.2f} | {s['psnr']:.2f} | {d.steps} | {d.reason} |")
    return lines + [""], out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="Markdown report (and a .json beside it)")
    args = p.parse_args(argv)
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for f in args.files:
        for r in json.loads(f.read_text())["runs"]:
            groups.setdefault(f"{r['task']} {r['crop']}x{r['crop']}", []).append(r)
    lines: List[str] = []
    numbers = []
    for g, runs in sorted(groups.items()):
        ls, nums = report(runs, g)
        lines += ls
        numbers.append(nums)
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        args.out.write_text(md)
        args.out.with_suffix(".json").write_text(json.dumps(numbers, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
