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

Clipped noise.  Denoising runs are replayed with two rules: ``flat``, the
rule before the clipping model (the residual held to ``tolerance * sigma^2``
with sigma the noise present, ``estimate_sigma(clipped=False)``), and
``clip``, restore's rule now (the residual held to ``tolerance`` times the
mean expected residual of clipped noise of the true image read from the
average, with sigma read before clipping; see
:class:`dip_fast.core.early_stop.ClippedBound`).  Two variants that restore
does not run: ``clipavg`` takes the average itself as the true image, and
``clipvar`` holds the residual to the clipped observation's variance (the
residual of the clipped mean) instead.  The per-step expectation is exact
for runs recorded with it (``clip_inv_avg``, ``clip_res_avg``,
``clip_var_avg``: interpolated in sigma between the logged levels); older
runs get it from the clean crop
(``--reestimate`` rebuilds it), constant over the steps: the *clean-image
approximation*, whose effect is measured on the runs that have both.  As in
``restore``, the clipping model applies to denoising observations with
values at 0 or 1; other tasks keep the ``flat`` rule.

The step budget is a multiple of the preset's count (``restore``'s
``EARLY_STOP_BUDGET``): a run that has not reached the noise level by then
returns its average there.  Runs recorded only up to the preset's count
(the first trajectories) are capped there whatever the budget.

One setting for all tasks is chosen on the tuning split only (among the
settings missing the fewest of the issue's criteria there, the smallest
mean gap to 0.01 dB, then the fewest steps on average) and reported per
task on the validation split beside the fixed count.

    python bench/es_replay.py bench/results/es-traj-*.json.gz --out bench/results/es-replay-cpu.md \
        --reestimate ../shared/data/CBSD68 ../shared/data/Set5 ../shared/data/dip/restoration \
        ../shared/data/dip/denoising
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

import torch

from dip_fast.core.early_stop import DiscrepancyRule, clipped_mean_inverse, clipped_noise_moments, \
    clipped_observation_variance, expected_clipped_residual, replay
from dip_fast import tasks
from dip_fast.pipeline.noise_level import clipped_share, estimate_sigma

sys.path.insert(0, str(Path(__file__).resolve().parent))
import early_stop  # noqa: E402  (the trajectory files it records)

TOLERANCES = (0.9, 0.95, 0.98, 1.0, 1.02, 1.05, 1.1)
BUDGETS = (1.0, 1.25, 1.5)
MODELS = ("flat", "clip", "clipavg", "clipvar")
#: The per-step log of each clipping model's expectation (bench/early_stop.py).
MODEL_LOGS = {"clip": "clip_inv_avg", "clipavg": "clip_res_avg", "clipvar": "clip_var_avg"}
#: The "done when" limits (issue 33: mean gap at most 0.3 dB, no run more than 0.5 dB below the fixed count
#: or below its input; the p95 gap limit of the issue before it).  The earlier median-steps target (60% of
#: the preset's count) is retired: see clairvoyant_steps.
LIMITS = {"gap_mean": 0.3, "gap_p95": 1.5, "worst_vs_fixed": -0.5, "worst_vs_input": 0.0}
#: The clipped crops' own limit on the mean gap (issue 33).
CLIPPED_GAP_LIMIT = 0.5
#: A crop is "clipped" with at least this share of its observation's values at 0 or 1.
CLIPPED_SHARE = 0.05
RETIRED_STEPS_TARGET = 0.6
Setting = Tuple[float, float, str, str]  # tolerance, budget, noise source (see noise_var), model (MODELS)


def model_of(run: Dict[str, Any], model: str) -> str:
    """The model a setting uses on a run: restore's clipping model only for denoising observations with
    values at 0 or 1 (runs replayed without --reestimate have no share and keep ``flat``)."""
    if model != "flat" and run["task"] == "denoise" and run.get("clipped_share_obs", 0.0) > 0:
        return model
    return "flat"


def noise_var(run: Dict[str, Any], source: str, model: str = "flat") -> Optional[float]:
    """sigma^2 in [0, 1] units: the estimate restore() makes (``'est'``), or with the true level known
    (``'given'``): for denoising what restore() holds the residual to when the caller passes sigma (the
    smaller of the two), for jpeg the real compression error (which no caller knows: a bound on what any
    JPEG noise estimate could do).  ``flat`` uses the estimate of the noise present, the clipping models
    the estimate of sigma before clipping (``sigma_est_present`` and ``sigma_est`` after --reestimate)."""
    s = run["sigma_est"] if model_of(run, model) != "flat" else run.get("sigma_est_present", run["sigma_est"])
    if source == "given" and run["task"] == "jpeg":
        return run["input_mse"]
    if source == "given" and run["sigma"] is not None and s is not None:
        s = min(s, run["sigma"])
    return None if s is None else (s / 255.0) ** 2


def expected_residuals(run: Dict[str, Any], model: str, var: float) -> Tuple[List[Optional[float]], str]:
    """Per step, the mean expected residual of clipped noise at the average (``model`` ``'clip'``) or the
    clipped variance (``'clipvar'``) at noise variance ``var``, and where it came from: ``'exact'`` (logged
    per step, interpolated in sigma) or ``'clean'`` (the clean-image approximation, constant)."""
    sigma = 255.0 * math.sqrt(var)
    key = MODEL_LOGS[model]
    log = run["log"]
    if key in log and run.get("clip_sigmas"):
        grid = run["clip_sigmas"]
        j = min(max(next((i for i, g in enumerate(grid) if g >= sigma), len(grid) - 1), 1), len(grid) - 1)
        w = (sigma - grid[j - 1]) / (grid[j] - grid[j - 1])  # linear, extrapolated past the grid's ends
        return [None if row is None else row[j - 1] + w * (row[j] - row[j - 1]) for row in log[key]], "exact"
    cache = run.setdefault("_clean_expected", {})
    if (model, var) not in cache:
        if "_clean" not in run:
            raise ValueError(f"{run['image']}: no logged expectation and no clean crop (pass --reestimate)")
        x, std = run["_clean"], math.sqrt(var)
        if model in ("clip", "clipavg"):  # the average at the clean image's clipped mean, or at the clean image
            value = float(expected_clipped_residual(x, std).mean())
        else:  # the average stands for the clipped mean E[y | x] of the clean crop
            m = x + clipped_noise_moments(x, std)[0]
            value = float(clipped_observation_variance(clipped_mean_inverse(m, std), std).mean())
        cache[(model, var)] = value
    return [cache[(model, var)]] * len(log["res_avg"]), "clean"



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
    """Replay one setting on one run (``None``: the fixed count).

    ``gap``: to the oracle (the best average within the preset's count); ``gap_best``: to the best average
    of the steps the setting's budget allows (the best step a rule with that budget could return).
    """
    psnr, n = run["log"]["psnr_avg"], preset_steps(run)
    oracle = max(psnr[:n])
    source = None
    if setting is None:
        returned, steps, reason, stop, cap = fixed_psnr(run), n, "fixed", None, n
    else:
        tol, budget, src, model = setting
        cap = min(len(psnr), int(round(n * budget)))
        var, used = noise_var(run, src, model), model_of(run, model)
        expected = None
        if used != "flat" and var is not None and var > 0:
            expected, source = expected_residuals(run, used, var)
        rule = DiscrepancyRule(var, tol, clip=(0.0, 1.0) if used != "flat" else None)
        d = replay(run["log"]["res_avg"], rule, cap, expected=expected)
        stop = d.stop_step
        returned = psnr[d.steps - 1]  # the average of the last step taken: the stop, or the budget's last
        steps, reason = d.steps, d.reason
    return {"gap": oracle - returned, "gap_best": max(max(psnr[:cap]), oracle) - returned,
            "vs_fixed": returned - fixed_psnr(run), "vs_input": returned - run["input_psnr"],
            "steps": steps / n, "psnr": returned, "oracle": oracle, "reason": reason, "stop_step": stop,
            "n_steps": steps, "expected_from": source}


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
        "gap_best_mean": statistics.fmean(s["gap_best"] for s in scores),
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


def tune(runs: List[Dict[str, Any]], model: str = "clip") -> Setting:
    """The best setting of ``model`` on ``runs`` (see the module docstring); the noise level is the estimated
    one, which is what restore() holds the residual to."""
    best = None
    for tol, budget in itertools.product(TOLERANCES, BUDGETS):
        scores = [score(r, (tol, budget, "est", model)) for r in runs]
        s = summarise(scores)
        key = (len(missed(s)), round(s["gap_mean"], 2), s["steps_mean"])
        if best is None or key < best[0]:
            best = (key, (tol, budget, "est", model))
    return best[1]


def table_row(name: str, s: Dict[str, float], clipped: bool = False) -> str:
    fails = missed(s)
    if clipped and s["gap_best_mean"] > CLIPPED_GAP_LIMIT:
        fails.append("clipped gap_best_mean")
    return (f"| {name} | {s['n']} | {s['psnr_mean']:.2f} ± {s['psnr_se']:.2f} | {s['vs_fixed_mean']:+.2f} | "
            f"{s['gap_mean']:.2f} | {s['gap_best_mean']:.2f} | {s['gap_p95']:.2f} | {s['worst_vs_fixed']:+.2f} | "
            f"{s['worst_vs_input']:+.2f} | {s['steps_median']:.0%} | "
            f"{'all met' if not fails else 'misses ' + ', '.join(fails)} |")


HEADER = ["| rule | runs | mean PSNR dB ± s.e. | mean vs fixed dB | mean gap to oracle dB | mean gap to best step "
          "in budget dB | p95 gap dB | worst vs fixed dB | worst vs input dB | median steps | criteria |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]


def describe(setting: Setting) -> str:
    tol, budget, src, model = setting
    what = {"flat": "one sigma^2, noise present", "clip": "clipping model", "clipavg": "clipping model at the average",
            "clipvar": "clipped variance"}[model]
    return f"discrepancy rule, {what} (tol {tol}, budget {budget}x{', true level' if src == 'given' else ''})"


def split_tables(runs: List[Dict[str, Any]], chosen: Setting, before: Optional[Setting] = None,
                 clipped: bool = False) -> Tuple[List[str], Dict[str, Any]]:
    """Tuning and validation tables of one group of runs: the fixed count, the chosen rule, its neighbours,
    the rule before the clipping model (``before``) and the clipped-variance variant."""
    tol, budget, _, model = chosen
    variants = [chosen] + [(tol, b, "est", model) for b in BUDGETS if b != budget]
    if before is not None:
        variants.append(before)
    if model == "clip":
        variants += [(tol, budget, "est", "clipavg"), (tol, budget, "est", "clipvar")]
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
            given = (tol, budget, "given", model)
            rows[describe(given)] = summarise([score(r, given) for r in rs])
        out[split] = rows
        lines += [f"**{split}**", ""] + HEADER + [table_row(k, s, clipped) for k, s in rows.items()] + [""]
    return lines, out


def per_run_table(runs: List[Dict[str, Any]], chosen: Setting, before: Setting) -> List[str]:
    lines = ["| image | split | task | clipped | sigma (est.; noise present) | steps recorded | input dB | fixed dB "
             "| oracle dB (step) | before: returned dB (steps) | returned dB | steps | decision | expectation |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["task"], r["crop"], r["split"], r["image"], r["sigma"] or 0)):
        s = score(r, chosen)
        b = score(r, before)
        n = preset_steps(r)
        peak_step = r["log"]["psnr_avg"].index(s["oracle"], 0, n)
        est = f"{r['sigma_est']:.1f}" + (f"; {r['sigma_est_present']:.1f}" if "sigma_est_present" in r else "")
        sigma = f"{r['sigma']:g} ({est})" if r["sigma"] is not None else f"- ({est})"
        task = f"{r['task']} {r['crop']}" + ("" if default_preset(r) else f" ({r['preset']})")
        share = f"{r['clipped_share_obs']:.1%}" if "clipped_share_obs" in r else "?"
        lines.append(f"| {r['image']} | {r['split']} | {task} | {share} | {sigma} | {len(r['log']['psnr_avg'])} "
                     f"| {r['input_psnr']:.2f} | {fixed_psnr(r):.2f} | {s['oracle']:.2f} ({peak_step + 1}) | "
                     f"{b['psnr']:.2f} ({b['n_steps']}) | {s['psnr']:.2f} | {s['n_steps']} | {s['reason']} | "
                     f"{s['expected_from'] or '-'} |")
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
    the median steps of every rule that keeps ``worst_vs_fixed``.  A run whose average stays below its input
    through the preset's count (an under-fitted crop) meets them at no step: its share is infinite and its gap
    NaN."""
    out = []
    for r in runs:
        psnr, n = r["log"]["psnr_avg"], preset_steps(r)
        floor = max(fixed_psnr(r) + LIMITS["worst_vs_fixed"], r["input_psnr"] + LIMITS["worst_vs_input"])
        t = next((t for t in range(n) if psnr[t] >= floor), None)
        out.append((math.inf, math.nan) if t is None else ((t + 1) / n, max(psnr[:n]) - psnr[t]))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="Markdown report (and a .json beside it)")
    p.add_argument("--reestimate", type=Path, nargs="+", default=None, metavar="DIR",
                   help="estimate sigma again with restore()'s current estimator, from each run's observation "
                        "rebuilt from its image in these folders (the logged estimate is kept as sigma_est_logged)")
    p.add_argument("--model", choices=MODELS, default="clip",
                   help="the rule tuned and reported as restore()'s (clip: its rule now; see the docstring)")
    args = p.parse_args(argv)
    if args.model != "flat" and not args.reestimate:
        p.error("--model clip/clipvar needs --reestimate (sigma before clipping and the clean crops)")
    runs: List[Dict[str, Any]] = []
    for f in args.files:
        runs += early_stop.read_trajectories(f)["runs"]
    if args.reestimate:
        for r in runs:
            gt, obs = early_stop.observation_of(r, args.reestimate)
            # restore()'s estimate: before clipping for denoising (the clipping model), else the noise present.
            r["sigma_est_logged"] = r["sigma_est"]
            r["sigma_est"] = estimate_sigma(obs, clipped=r["task"] == "denoise")
            r["sigma_est_present"] = estimate_sigma(obs, clipped=False)
            r["clipped_share_obs"] = clipped_share(obs)
            if r["task"] == "denoise":
                r["_clean"] = gt.double()
    # Runs of another preset than the task's default (restore()'s CPU preset) are reported in groups of
    # their own, and neither tune the rule nor enter "all" and the step bounds, which describe the defaults.
    other = [r for r in runs if not default_preset(r)]
    runs = [r for r in runs if default_preset(r)]
    tuning = [r for r in runs if r["split"] == "tuning"]
    if not tuning:
        print("no tuning runs", file=sys.stderr)
        return 2
    # One setting for every task: the rule is the same test everywhere, and a few runs per task
    # would only let a per-task setting fit their noise.  The rule before the clipping model is tuned
    # the same way, for the comparison.
    chosen = tune(tuning, args.model)
    before = tune(tuning, "flat")
    longer = sum(len(r["log"]["psnr_avg"]) > preset_steps(r) for r in runs)
    numbers: Dict[str, Any] = {"chosen": {"tolerance": chosen[0], "budget": chosen[1], "noise": chosen[2],
                                          "model": chosen[3]},
                               "before": {"tolerance": before[0], "budget": before[1], "model": before[3]},
                               "groups": {}}
    lines = [f"Chosen on all {len(tuning)} tuning runs: {describe(chosen)}, noise level estimated from the "
             f"observation{' (estimated again with the current estimator)' if args.reestimate else ''}; "
             f"the rule before the clipping model tuned the same way: {describe(before)}; "
             f"{len(runs) - len(tuning)} validation runs; "
             f"{longer} of the {len(runs)} runs were recorded past the preset's count.", ""]
    groups: Dict[str, List[Dict[str, Any]]] = {"all": runs}
    if args.reestimate:
        for r in runs:
            if r["task"] == "denoise":
                clipped = r["clipped_share_obs"] >= CLIPPED_SHARE
                groups.setdefault(f"denoise, clipped >= {CLIPPED_SHARE:.0%}" if clipped
                                  else f"denoise, clipped < {CLIPPED_SHARE:.0%}", []).append(r)
    for r in runs + other:
        preset = "" if default_preset(r) else f", preset {r['preset']}"
        groups.setdefault(f"{r['task']} {r['crop']}x{r['crop']}{preset}", []).append(r)
    for g, rs in groups.items():
        ls, nums = split_tables(rs, chosen, before, clipped=g.startswith("denoise, clipped >="))
        lines += [f"### {g}", ""] + ls
        numbers["groups"][g] = nums
    exact = [r for r in runs + other if MODEL_LOGS.get(chosen[3], "-") in r["log"] and "_clean" in r]
    if exact and chosen[3] != "flat":
        lines += [f"### The clean-image approximation against the exact expectation ({len(exact)} runs logged "
                  "with it)", "", "| image | split | sigma | exact: returned dB (steps) | clean image: returned dB "
                  "(steps) |", "|---|---|---|---|---|"]
        diffs = []
        for r in exact:
            e = score(r, chosen)
            a = score({**r, "log": {k: v for k, v in r["log"].items() if not k.startswith("clip_")}}, chosen)
            diffs.append(a["psnr"] - e["psnr"])
            lines.append(f"| {r['image']} | {r['split']} | {r['sigma']:g} | {e['psnr']:.2f} ({e['n_steps']}) | "
                         f"{a['psnr']:.2f} ({a['n_steps']}) |")
        lines += ["", f"Mean difference (approximation minus exact): {statistics.fmean(diffs):+.3f} dB, "
                  f"largest {max(diffs, key=abs):+.3f} dB.", ""]
        numbers["clean_approximation_minus_exact_db"] = diffs
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
                  f"count, with a mean gap to the oracle of "
                  f"{statistics.fmean(b[1] for b in bound if math.isfinite(b[1])):.2f} dB there; "
                  f"{sum(b[0] <= RETIRED_STEPS_TARGET for b in bound)} of {len(bound)} runs could stop within "
                  f"{RETIRED_STEPS_TARGET:.0%}; {sum(math.isinf(b[0]) for b in bound)} never meet those limits "
                  "within the preset's count.", ""]
        numbers[f"clairvoyant_steps_median_{split}"] = median
    lines += ["### Per run (chosen rule; before: the rule before the clipping model)", ""]
    lines += per_run_table(runs + other, chosen, before) + [""]
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        args.out.write_text(md)
        args.out.with_suffix(".json").write_text(json.dumps(numbers, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
