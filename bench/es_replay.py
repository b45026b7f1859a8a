#!/usr/bin/env python
"""Replay the stopping rule on trajectories recorded by ``bench/early_stop.py``; tune on one split, report the other.

For every setting of the grid (tolerance, step budget) and every recorded
run, :func:`dip_fast.core.early_stop.replay` decides on the logged residuals of
the running average where the run stops; the logged ground-truth PSNRs
then score that choice:

* gap to the oracle: the peak PSNR of the exponential average over the
  preset's fixed-count run (what a hand-picked step would reach; needs the
  clean image) minus the PSNR returned; negative when continuing past the
  preset's count beat every step of the fixed run;
* against the fixed count: PSNR returned minus ``stop='never'``'s result;
* against the input: PSNR returned minus the degraded input's;
* steps: the steps taken as a share of the preset's count.

The step budget is a multiple of the preset's count (``restore``'s
``EARLY_STOP_BUDGET``): a run that has not reached the noise level by then
returns its average there.  Runs recorded only up to the preset's count
(the first trajectories) are capped there whatever the budget.

One setting for all tasks is chosen on the tuning split only (among the
settings missing the fewest of the issue's criteria there, the smallest
mean gap to 0.01 dB, then the fewest steps on average) and reported per
task on the validation split beside the fixed count.

    python bench/es_replay.py bench/results/es-traj-*.json.gz --out bench/results/es-replay-cpu.md
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dip_fast.core.early_stop import DiscrepancyRule, replay
from dip_fast import tasks
from dip_fast.pipeline.noise_level import estimate_sigma

sys.path.insert(0, str(Path(__file__).resolve().parent))
import early_stop  # noqa: E402  (the trajectory files it records)

TOLERANCES = (0.9, 0.95, 0.98, 1.0, 1.02, 1.05, 1.1)
BUDGETS = (1.0, 1.25, 1.5)
#: The issue's "done when" limits.
LIMITS = {"gap_mean": 0.5, "gap_p95": 1.5, "worst_vs_fixed": -0.5, "worst_vs_input": 0.0, "steps_median": 0.6}
Setting = Tuple[float, float, str]  # tolerance, budget, noise source (see noise_var)


def noise_var(run: Dict[str, Any], source: str) -> Optional[float]:
    """sigma^2 in [0, 1] units: the estimate restore() makes (``'est'``), or with the true level known
    (``'given'``): for denoising what restore() holds the residual to when the caller passes sigma (the
    smaller of the two), for jpeg the real compression error (which no caller knows: a bound on what any
    JPEG noise estimate could do)."""
    s = run["sigma_est"]
    if source == "given" and run["task"] == "jpeg":
        return run["input_mse"]
    if source == "given" and run["sigma"] is not None and s is not None:
        s = min(s, run["sigma"])
    return None if s is None else (s / 255.0) ** 2


def preset_steps(run: Dict[str, Any]) -> int:
    """The fixed count: the step count of the run's preset as the package defines it now (a preset whose
    count changed after the run was recorded is scored at its new count; a preset the package does not
    know keeps the recorded count), at most the steps recorded."""
    name = run.get("preset")
    count = (tasks.PRESETS[name].iterations if name in tasks.PRESETS
             else run.get("preset_iterations", run["iterations"]))
    return min(count, len(run["log"]["psnr_avg"]))


def default_preset(run: Dict[str, Any]) -> bool:
    """Whether the run used its task's ``'fast'`` preset, what ``restore()`` runs on a CPU (runs recorded
    before the preset was logged did)."""
    default = tasks.preset_for(run["task"], "fast").name
    return run.get("preset", default) == default


def fixed_psnr(run: Dict[str, Any]) -> float:
    """What ``stop='never'`` returns: the average after the fixed count (the fit has no schedule that
    depends on the total, so a run recorded for longer holds that run as its prefix)."""
    return run["log"]["psnr_avg"][preset_steps(run) - 1]


def score(run: Dict[str, Any], setting: Optional[Setting]) -> Dict[str, Any]:
    """Replay one setting on one run (``None``: the fixed count)."""
    psnr, n = run["log"]["psnr_avg"], preset_steps(run)
    oracle = max(psnr[:n])
    if setting is None:
        returned, steps, reason, stop = fixed_psnr(run), n, "fixed", None
    else:
        tol, budget, src = setting
        cap = min(len(psnr), int(round(n * budget)))
        d = replay(run["log"]["res_avg"], DiscrepancyRule(noise_var(run, src), tol), cap)
        stop = d.stop_step
        returned = psnr[d.steps - 1]  # the average of the last step taken: the stop, or the budget's last
        steps, reason = d.steps, d.reason
    return {"gap": oracle - returned, "vs_fixed": returned - fixed_psnr(run), "vs_input": returned - run["input_psnr"],
            "steps": steps / n, "psnr": returned, "oracle": oracle, "reason": reason, "stop_step": stop,
            "n_steps": steps}


def p95(values: Sequence[float]) -> float:
    """95th percentile, linear interpolation between order statistics."""
    v = sorted(values)
    k = (len(v) - 1) * 0.95
    lo = math.floor(k)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (k - lo)


def summarise(scores: List[Dict[str, Any]]) -> Dict[str, float]:
    psnrs = [s["psnr"] for s in scores]
    return {
        "n": len(scores),
        "gap_mean": statistics.fmean(s["gap"] for s in scores),
        "gap_p95": p95([s["gap"] for s in scores]),
        "worst_vs_fixed": min(s["vs_fixed"] for s in scores),
        "worst_vs_input": min(s["vs_input"] for s in scores),
        "steps_median": statistics.median(s["steps"] for s in scores),
        "steps_mean": statistics.fmean(s["steps"] for s in scores),
        "psnr_mean": statistics.fmean(psnrs),
        "psnr_se": statistics.stdev(psnrs) / math.sqrt(len(psnrs)) if len(psnrs) > 1 else math.nan,
        "vs_fixed_mean": statistics.fmean(s["vs_fixed"] for s in scores),
    }


def missed(summary: Dict[str, float]) -> List[str]:
    """The criteria a summary fails."""
    out = []
    for key, limit in LIMITS.items():
        v = summary[key]
        if (key.startswith("worst") and v < limit) or (not key.startswith("worst") and v > limit):
            out.append(key)
    return out


def tune(runs: List[Dict[str, Any]]) -> Setting:
    """The best setting on ``runs`` (see the module docstring); the noise level is the estimated one,
    which is what restore() holds the residual to."""
    best = None
    for tol, budget in itertools.product(TOLERANCES, BUDGETS):
        scores = [score(r, (tol, budget, "est")) for r in runs]
        s = summarise(scores)
        key = (len(missed(s)), round(s["gap_mean"], 2), s["steps_mean"])
        if best is None or key < best[0]:
            best = (key, (tol, budget, "est"))
    return best[1]


def table_row(name: str, s: Dict[str, float]) -> str:
    fails = missed(s)
    return (f"| {name} | {s['n']} | {s['psnr_mean']:.2f} ± {s['psnr_se']:.2f} | {s['vs_fixed_mean']:+.2f} | "
            f"{s['gap_mean']:.2f} | {s['gap_p95']:.2f} | {s['worst_vs_fixed']:+.2f} | {s['worst_vs_input']:+.2f} | "
            f"{s['steps_median']:.0%} | {'all met' if not fails else 'misses ' + ', '.join(fails)} |")


HEADER = ["| rule | runs | mean PSNR dB ± s.e. | mean vs fixed dB | mean gap to oracle dB | p95 gap dB "
          "| worst vs fixed dB | worst vs input dB | median steps | criteria |",
          "|---|---|---|---|---|---|---|---|---|---|"]


def describe(setting: Setting) -> str:
    tol, budget, src = setting
    return f"discrepancy rule (tol {tol}, budget {budget}x{', true level' if src == 'given' else ''})"


def split_tables(runs: List[Dict[str, Any]], chosen: Setting) -> Tuple[List[str], Dict[str, Any]]:
    """Tuning and validation tables of one group of runs: the fixed count, the chosen rule, its neighbours."""
    tol, budget, _ = chosen
    variants = [chosen] + [(tol, b, "est") for b in BUDGETS if b != budget]
    lines: List[str] = []
    out: Dict[str, Any] = {}
    for split in ("tuning", "validation"):
        rs = [r for r in runs if r["split"] == split]
        if not rs:
            continue
        rows = {"fixed count": summarise([score(r, None) for r in rs])}
        for v in variants:
            rows[describe(v)] = summarise([score(r, v) for r in rs])
        if all(r["sigma"] is not None or r["task"] == "jpeg" for r in rs):
            rows[describe((tol, budget, "given"))] = summarise([score(r, (tol, budget, "given")) for r in rs])
        out[split] = rows
        lines += [f"**{split}**", ""] + HEADER + [table_row(k, s) for k, s in rows.items()] + [""]
    return lines, out


def per_run_table(runs: List[Dict[str, Any]], chosen: Setting) -> List[str]:
    lines = ["| image | split | task | sigma (est.) | steps recorded | input dB | fixed dB | oracle dB (step) | "
             "returned dB | steps | decision |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["task"], r["crop"], r["split"], r["image"])):
        s = score(r, chosen)
        n = preset_steps(r)
        peak_step = r["log"]["psnr_avg"].index(s["oracle"], 0, n)
        est = f"{r['sigma_est']:.1f}" + (f", was {r['sigma_est_logged']:.1f}" if "sigma_est_logged" in r else "")
        sigma = f"{r['sigma']:g} ({est})" if r["sigma"] is not None else f"- ({est})"
        task = f"{r['task']} {r['crop']}" + ("" if default_preset(r) else f" ({r['preset']})")
        lines.append(f"| {r['image']} | {r['split']} | {task} | {sigma} | {len(r['log']['psnr_avg'])} "
                     f"| {r['input_psnr']:.2f} | {fixed_psnr(r):.2f} | {s['oracle']:.2f} ({peak_step + 1}) | "
                     f"{s['psnr']:.2f} | {s['n_steps']} | {s['reason']} |")
    return lines


def oracle_steps(runs: List[Dict[str, Any]], within_db: float = 0.5) -> List[float]:
    """Per run, the first step (share of the preset's count) whose average is within ``within_db`` of the oracle:
    the fewest steps any rule could take while keeping its gap under that."""
    out = []
    for r in runs:
        psnr, n = r["log"]["psnr_avg"], preset_steps(r)
        peak = max(psnr[:n])
        out.append(next(t for t in range(n) if psnr[t] >= peak - within_db) / n + 1 / n)
    return out


def clairvoyant_steps(runs: List[Dict[str, Any]]) -> List[Tuple[float, float]]:
    """Per run, the first step (share of the preset's count) that meets the issue's per-run limits, no more
    than 0.5 dB below the fixed count and not below the input, and the gap to the oracle there.

    A rule that knew the clean image could stop there and no earlier, so the median of these shares bounds
    the median steps of every rule that keeps ``worst_vs_fixed``."""
    out = []
    for r in runs:
        psnr, n = r["log"]["psnr_avg"], preset_steps(r)
        floor = max(fixed_psnr(r) + LIMITS["worst_vs_fixed"], r["input_psnr"] + LIMITS["worst_vs_input"])
        t = next(t for t in range(n) if psnr[t] >= floor)
        out.append(((t + 1) / n, max(psnr[:n]) - psnr[t]))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="Markdown report (and a .json beside it)")
    p.add_argument("--reestimate", type=Path, nargs="+", default=None, metavar="DIR",
                   help="estimate sigma again with restore()'s current estimator, from each run's observation "
                        "rebuilt from its image in these folders (the logged estimate is kept as sigma_est_logged)")
    args = p.parse_args(argv)
    runs: List[Dict[str, Any]] = []
    for f in args.files:
        runs += early_stop.read_trajectories(f)["runs"]
    if args.reestimate:
        for r in runs:
            _, obs = early_stop.observation_of(r, args.reestimate)
            r["sigma_est_logged"], r["sigma_est"] = r["sigma_est"], estimate_sigma(obs)
    # Runs of another preset than the task's default (restore()'s CPU preset) are reported in groups of
    # their own, and neither tune the rule nor enter "all" and the step bounds, which describe the defaults.
    other = [r for r in runs if not default_preset(r)]
    runs = [r for r in runs if default_preset(r)]
    tuning = [r for r in runs if r["split"] == "tuning"]
    if not tuning:
        print("no tuning runs", file=sys.stderr)
        return 2
    # One setting for every task: the rule is the same test everywhere, and a few runs per task
    # would only let a per-task setting fit their noise.
    chosen = tune(tuning)
    longer = sum(len(r["log"]["psnr_avg"]) > preset_steps(r) for r in runs)
    numbers: Dict[str, Any] = {"chosen": {"tolerance": chosen[0], "budget": chosen[1], "noise": chosen[2]},
                               "groups": {}}
    lines = [f"Chosen on all {len(tuning)} tuning runs: tolerance {chosen[0]}, budget {chosen[1]}x the preset's "
             f"steps, noise level estimated from the observation"
             f"{' (estimated again with the current estimator)' if args.reestimate else ''}; "
             f"{len(runs) - len(tuning)} validation runs; "
             f"{longer} of the {len(runs)} runs were recorded past the preset's count.", ""]
    groups: Dict[str, List[Dict[str, Any]]] = {"all": runs}
    for r in runs + other:
        preset = "" if default_preset(r) else f", preset {r['preset']}"
        groups.setdefault(f"{r['task']} {r['crop']}x{r['crop']}{preset}", []).append(r)
    for g, rs in groups.items():
        ls, nums = split_tables(rs, chosen)
        lines += [f"### {g}", ""] + ls
        numbers["groups"][g] = nums
    need = oracle_steps(runs)
    lines += [f"Fewest steps any rule could take and stay within 0.5 dB of the oracle, per run: median "
              f"{statistics.median(need):.0%} of the preset's count (from {min(need):.0%} to {max(need):.0%}).", ""]
    numbers["oracle_within_0.5dB_steps_median"] = statistics.median(need)
    for split in ("tuning", "validation"):
        bound = clairvoyant_steps([r for r in runs if r["split"] == split])
        if not bound:
            continue
        median = statistics.median(b[0] for b in bound)
        lines += [f"Fewest steps a rule that knew the clean image could take on the {split} runs and keep every run "
                  f"at most 0.5 dB below the fixed count and above its input: median {median:.0%} of the preset's "
                  f"count, with a mean gap to the oracle of {statistics.fmean(b[1] for b in bound):.2f} dB there; "
                  f"{sum(b[0] <= LIMITS['steps_median'] for b in bound)} of {len(bound)} runs could stop within "
                  f"{LIMITS['steps_median']:.0%}.", ""]
        numbers[f"clairvoyant_steps_median_{split}"] = median
    lines += ["### Per run (chosen rule)", ""] + per_run_table(runs + other, chosen) + [""]
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        args.out.write_text(md)
        args.out.with_suffix(".json").write_text(json.dumps(numbers, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
