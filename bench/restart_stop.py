#!/usr/bin/env python
"""Where should ``restore(restarts=K)`` stop?  Paired trajectories of K runs on one observation.

``restore(restarts=K)`` returns the mean of K runs.  Averaging removes part
of what each run fitted of the noise, so the best stopping point of a run
that is averaged may lie later than that of a run returned alone.  This
script records, per crop, K fixed-count denoising runs (network seeds
``seed`` ... ``seed + K - 1``) on one noisy observation, and per step:

* per run, the residual ``||y - x||^2 / N`` and PSNR of its exponential
  average (what :mod:`bench.early_stop` logs as ``res_avg`` / ``psnr_avg``);
* for the mean of the K averages, the same two numbers.

It then scores two ways of stopping (the discrepancy rule of
:mod:`dip_fast.core.early_stop`, the noise level estimated from the observation,
the step budget ``--budget`` times the preset's count):

* ``each``: every run stops on its own residual (what ``restore`` did), and
  the K estimates returned are averaged;
* ``mean``: all runs stop at the first step where the *mean's* residual
  reaches the noise level, i.e. the rule judges the estimate that is
  returned.

Both are compared with the single runs (each run's own stop, the mean of
their PSNRs), which is the baseline of the ``restarts`` benchmark.

    python bench/restart_stop.py --sigma 25 --crop 128 --iterations 2250 --out bench/results/restart-stop-cpu.json IMAGES...
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import early_stop  # noqa: E402  (degradations, PSNR, the split)
import quality  # noqa: E402  (image loading, crops, environment record)

from dip_fast import tasks  # noqa: E402
from dip_fast.pipeline.job import estimate_sigma as _estimate_sigma, reg_noise_for_sigma  # noqa: E402
from dip_fast.pipeline.request import EARLY_STOP_BUDGET, EARLY_STOP_TOLERANCE  # noqa: E402
from dip_fast.core.early_stop import DiscrepancyRule, replay  # noqa: E402
from dip_fast.core.fit import fit  # noqa: E402


def record_runs(gt: torch.Tensor, obs: torch.Tensor, args: argparse.Namespace) -> Dict[str, Any]:
    """K fixed-count runs on ``obs``; the exponential average of every step is kept to score their means."""
    preset = tasks.get_preset(args.preset).with_overrides(reg_noise_std=reg_noise_for_sigma(args.sigma))
    term = tasks.make_data_term(preset, obs)
    kwargs = dict(preset.fit_kwargs())
    kwargs.update(term.fit_kwargs())
    preset_iterations = int(kwargs["iterations"])
    kwargs["iterations"] = args.iterations or preset_iterations
    averages: List[torch.Tensor] = []
    for k in range(args.runs):
        seed = args.seed + k
        steps: List[torch.Tensor] = []
        torch.manual_seed(seed)
        net = tasks.build_network(preset, 3, backend=quality.backend_factory(args.backend, True))
        gen = torch.Generator().manual_seed(seed)
        z = tasks.make_input(preset, (gt.shape[2], gt.shape[3]), generator=gen)
        fit(net, z, term, generator=gen, callback=lambda s: steps.append(s.out_avg.detach().float().clone()),
            **kwargs)
        averages.append(torch.cat(steps))  # (T, 3, H, W)
        print(f"  run {k} (seed {seed}) done", flush=True)
    mean = sum(averages) / len(averages)

    def per_step(x: torch.Tensor) -> Dict[str, List[float]]:
        return {"res": [early_stop._mse(x[t], obs[0]) for t in range(x.shape[0])],
                "psnr": [early_stop._psnr(x[t], gt[0]) for t in range(x.shape[0])]}

    runs = [per_step(a) for a in averages]
    sigma_est = _estimate_sigma(obs, clipped=False)  # the rule here holds one sigma^2 (no clipping model)
    cap = min(int(kwargs["iterations"]), int(round(preset_iterations * args.budget)))
    rule = DiscrepancyRule((sigma_est / 255.0) ** 2, EARLY_STOP_TOLERANCE)
    own_steps = [replay(r["res"], rule, cap).steps - 1 for r in runs]  # the step whose average is returned
    each = sum(averages[k][t] for k, t in enumerate(own_steps)) / args.runs
    return {
        "sigma_est": sigma_est, "preset_iterations": preset_iterations, "iterations": kwargs["iterations"],
        "runs": runs, "mean": per_step(mean), "own_steps": own_steps,
        "psnr_each_then_mean": early_stop._psnr(each, gt[0]), "input_psnr": early_stop._psnr(obs, gt),
    }


def score(case: Dict[str, Any], tolerance: float, budget: float) -> Dict[str, float]:
    """Single runs, 'each' and 'mean' (see the module docstring) for one recorded case."""
    cap = min(len(case["mean"]["res"]), int(round(case["preset_iterations"] * budget)))
    rule = DiscrepancyRule((case["sigma_est"] / 255.0) ** 2, tolerance)
    # The average returned is that of the last step taken (the stop, or the budget's last step).
    singles = [r["psnr"][replay(r["res"], rule, cap).steps - 1] for r in case["runs"]]
    t = replay(case["mean"]["res"], rule, cap).steps - 1
    return {"single": statistics.fmean(singles), "mean_rule": case["mean"]["psnr"][t], "mean_rule_steps": t + 1,
            "fixed_mean": case["mean"]["psnr"][min(case["preset_iterations"], len(case["mean"]["psnr"])) - 1]}


def mean_tolerance_table(cases: List[Dict[str, Any]], tolerances: Sequence[float], budget: float) -> str:
    """Markdown: the gain of the mean judged by the rule at other tolerances (the single runs keep restore()'s)."""
    rows = ["| tolerance for the mean | " + " | ".join(c["image"] for c in cases) + " | mean ± s.e. |",
            "|---" * (len(cases) + 2) + "|"]
    for tol in tolerances:
        gains = []
        for c in cases:
            single = score(c, EARLY_STOP_TOLERANCE, budget)["single"]
            gains.append(score(c, tol, budget)["mean_rule"] - single)
        ms = quality.mean_se(gains)
        rows.append(f"| {tol:g} | " + " | ".join(f"{g:+.2f}" for g in gains) + f" | {ms['mean']:+.2f} ± {ms['se']:.2f} |")
    return "\n".join(rows) + "\n"


def report(cases: List[Dict[str, Any]]) -> str:
    """Markdown: per crop and on average (mean and standard error of the paired gains), each way of
    stopping against the single runs, and the best any step of the mean reached (needs the clean image)."""
    rows = ["| crop | single runs dB | each stops, then mean | mean judged by the rule (steps) | fixed count, mean "
            "| best step of the mean (step) |", "|---|---|---|---|---|---|"]
    gains: Dict[str, List[float]] = {"each": [], "mean_rule": [], "fixed": [], "oracle": []}
    for c in cases:
        sc = c["scores"]
        peak = max(c["mean"]["psnr"])
        g = {"each": c["psnr_each_then_mean"] - sc["single"], "mean_rule": sc["mean_rule"] - sc["single"],
             "fixed": sc["fixed_mean"] - sc["single"], "oracle": peak - sc["single"]}
        for k, v in g.items():
            gains[k].append(v)
        rows.append(f"| {c['image']} | {sc['single']:.2f} | {g['each']:+.2f} | {g['mean_rule']:+.2f} "
                    f"({sc['mean_rule_steps']}) | {g['fixed']:+.2f} | {g['oracle']:+.2f} "
                    f"({c['mean']['psnr'].index(peak) + 1}) |")
    cells = []
    for k in ("each", "mean_rule", "fixed", "oracle"):
        ms = quality.mean_se(gains[k])
        cells.append(f"{ms['mean']:+.2f} ± {ms['se']:.2f}")
    rows.append(f"| mean ± s.e. ({len(cases)}) | | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    return "\n".join(rows) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="*", type=Path, help="clean images or folders")
    p.add_argument("--preset", default="denoise_fast")
    p.add_argument("--sigma", type=float, default=25.0, help="noise level, 0-255")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--runs", type=int, default=2, help="K: runs averaged")
    p.add_argument("--iterations", type=int, default=None, help="default: the preset's; more scores longer budgets")
    p.add_argument("--budget", type=float, default=EARLY_STOP_BUDGET, help="step budget, times the preset's count")
    p.add_argument("--seed", type=int, default=0, help="noise seed, and the first network seed")
    p.add_argument("--backend", choices=quality.BACKENDS, default="fast")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="JSON file of the per-crop scores; appended to")
    p.add_argument("--report", action="store_true", help="only print the table of the cases in --out")
    p.add_argument("--mean-tolerances", type=float, nargs="+", default=None, metavar="T",
                   help="with --report: also the gain of the mean judged by the rule at these tolerances")
    args = p.parse_args(argv)
    if args.report:
        cases = json.loads(args.out.read_text())["cases"]
        print(report(cases))
        if args.mean_tolerances:
            print(mean_tolerance_table(cases, args.mean_tolerances, args.budget))
        return 0
    if not args.paths:
        p.error("give the clean images to record (or --report)")
    torch.set_num_threads(args.threads)
    result: Dict[str, Any] = {"schema": "dip_fast-bench-restart-stop/1", "cases": []}
    if args.out.exists():
        result = json.loads(args.out.read_text())
    result.update(environment=quality.environment(torch.device("cpu")),
                  command=quality.command_line("bench/restart_stop.py", argv))
    done = {(c["image"], c["crop"], c["sigma"], c["seed"]) for c in result["cases"]}
    eargs = argparse.Namespace(task="denoise")
    for path in quality.list_images(args.paths):
        if (path.name, args.crop, args.sigma, args.seed) in done:
            continue
        gt, obs = early_stop.load_case(path, args.crop, eargs, args.sigma, args.seed)
        print(f"{path.name} sigma={args.sigma}", flush=True)
        case = record_runs(gt, obs, args)
        case.update(image=path.name, split=early_stop.split_of(path.name), crop=args.crop, sigma=args.sigma,
                    seed=args.seed, runs_averaged=args.runs, scores=score(case, EARLY_STOP_TOLERANCE, args.budget))
        print(f"  {json.dumps(case['scores'])}, each-then-mean {case['psnr_each_then_mean']:.2f}", flush=True)
        result["cases"].append(early_stop._rounded(case))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result) + "\n")
    print(report(result["cases"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
