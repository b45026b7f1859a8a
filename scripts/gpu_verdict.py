#!/usr/bin/env python
"""The verdict table of a ``scripts/gpu_check.sh`` call: one row per planned stage, as JSON and markdown.

Reads the stage records (``stages.tsv``: stage, status, exit code, seconds,
budget, note) and the files the stages wrote, and gives each planned stage
its status -- ``pass``, ``fail``, ``timeout`` (stopped at its budget) or
``not run`` (the budget was spent before it, or it needs what this call
lacks) -- with the figure that matters from its results. A planned stage
with no record did not run. Writes ``verdict.json`` and ``verdict.md`` to
the output folder and prints the markdown.

    python scripts/gpu_verdict.py --out OUT --work WORK --mode default --plan env:10,build:90,...
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional


def _load(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _junit(path: Path) -> str:
    """``N passed, F failed, S skipped`` from a pytest JUnit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return ""
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    failed = [c.get("classname", "") + "::" + c.get("name", "") for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    text = f"{passed} passed, {total['failures'] + total['errors']} failed, {total['skipped']} skipped"
    return text + (f" (failed: {', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''})" if failed else "")


def _geomean(values: List[float]) -> Optional[float]:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(statistics.mean(math.log(v) for v in values)) if values else None


class Results:
    """What the stages wrote, read lazily: ``OUT`` holds the returned files, ``WORK`` the side files."""

    def __init__(self, out: Path, work: Path, device: str) -> None:
        self.out, self.work, self.device = out, work, device

    def env(self) -> str:
        e = _load(self.work / "env.json")
        if not e:
            return ""
        device = e.get("gpu") or f"no GPU ({e.get('cpu')}, {e.get('cores')} cores)"
        return device + ", " + ", ".join(f"{k} {e[k]}" for k in ("torch", "cuda", "commit") if e.get(k))

    def build(self) -> str:
        b = _load(self.out / "build_info.json")
        if b is None:
            return ""
        return "extension loaded" if b.get("extension_loaded") else f"extension NOT loaded: {b.get('load_error')}"

    def optests(self) -> str:
        return _junit(self.work / "optests.xml")

    def tests(self) -> str:
        return _junit(self.work / "tests.xml")

    def optable(self) -> str:
        ops = (_load(self.out / f"{self.device}-ops.json") or {}).get("ops") or {}
        cases = ops.get("cases") or []
        if not cases:
            return ""
        parts = []
        for dtype in ("fp32", "bf16"):
            for label in ("forward", "backward"):
                g = _geomean([(c["speedup"].get(label) or {}).get("median") for c in cases
                              if c.get("dtype", "fp32") == dtype and c["name"].split("/")[0] != "lanczos"])
                if g:
                    parts.append(f"{dtype} {label} {g:.2f}x")
        worst = min(((r["median"], c["name"], label) for c in cases for label, r in c["speedup"].items() if r),
                    default=None)
        text = f"{len(cases)} cases; PyTorch / fused, geometric mean: " + ", ".join(parts)
        return text + (f"; slowest {worst[1]} {worst[2]} {worst[0]:.2f}x" if worst else "")

    def _steps(self) -> Dict[str, Any]:
        return _load(self.out / f"{self.device}-steps.json") or {}

    def steps(self) -> str:
        res = self._steps()
        parts = []
        for size, s in (res.get("steps") or {}).items():
            m = {k: v * 1e3 for k, v in s.get("median_s", {}).items()}
            cells = [f"{k} {m[k]:.2f}" for k in ("reference", "reference_default", "tuned", "fast_graph_tf32",
                                                 "fast_graph_bf16") if k in m]
            text = f"{size}² ms: " + ", ".join(cells)
            t = s.get("tuned")
            if t:
                text += f"; tuned = {t['choice']} ({t['source']}, tuning {t['tuning_s']:.1f} s)"
            r = s.get("speedup", {}).get("reference_default/tuned")
            if r:
                text += f"; reference_default / tuned {r['median']:.2f}x"
            verified = s.get("graph_verified") or {}
            if verified:
                text += "; graph verified: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in verified.items())
            parts.append(text)
        not_run = (res.get("config") or {}).get("not_run") or {}
        if not_run:
            parts.append("not run: " + ", ".join(f"{k} ({v})" for k, v in not_run.items()))
        return ". ".join(parts)

    def restore(self) -> str:
        r = _load(self.out / f"{self.device}-restore.json")
        if not r:
            return ""
        e = r.get("execution", {})
        text = (f"{r['wall_s']:.1f} s for {r['steps']} of {r['iterations']} steps ({r['stop_reason']}), "
                f"PSNR {r['psnr']:.2f} dB; {e.get('backend')}/{e.get('layout')}/{e.get('step_mode')}/"
                f"{e.get('precision')} ({e.get('source')}, tuning {e.get('tuning_s', 0.0):.1f} s)")
        if r.get("graph_verified") is not None:
            text += f", graph verified {'yes' if r['graph_verified'] else 'NO'}"
        for name, ref in (r.get("reference_estimate") or {}).items():
            text += (f"; {name} {ref['ms_per_step']:.2f} ms x {r['paper_steps']} = {ref['run_s']:.0f} s "
                     f"({ref['run_s'] / r['wall_s']:.2f}x)")
        return text

    def profile(self) -> str:
        prof = self._steps().get("kernel_profile") or {}
        parts = []
        for size, variants in (prof.get("sizes") or {}).items():
            for name, v in variants.items():
                if "error" in v:
                    parts.append(f"{size}² {name}: {v['error']}")
                    continue
                cats = sorted(((k, c["ms"]) for k, c in (v.get("categories") or {}).items()), key=lambda kv: -kv[1])
                top = ", ".join(f"{k} {ms:.2f}" for k, ms in cats[:2])
                parts.append(f"{size}² {name} {v.get('total_ms', float('nan')):.2f} ms" + (f" ({top})" if top else ""))
        return "; ".join(parts)

    def sanitizer(self, tool: str) -> str:
        try:
            text = (self.work / f"{tool}.log").read_text(errors="replace")
        except OSError:
            return ""
        found = re.findall(r"ERROR SUMMARY: (\d+) error", text)
        if found:
            return f"{found[-1]} errors"
        done = re.search(r"cuda_op_driver: .*", text)
        return done.group(0) if done else ""

    def parity(self) -> str:
        p = _load(self.out / "parity.json") or {}
        return "; ".join(f"{e['precision']} {e['step_mode']}: {'parity' if e.get('parity') else 'NO parity'}"
                         for e in p.get("paired", []))

    def figure(self, stage: str) -> str:
        readers: Dict[str, Callable[[], str]] = {
            "env": self.env, "build": self.build, "optests": self.optests, "tests": self.tests,
            "optable": self.optable, "steps": self.steps, "restore": self.restore, "profile": self.profile,
            "memcheck": lambda: self.sanitizer("memcheck"), "racecheck": lambda: self.sanitizer("racecheck"),
            "initcheck": lambda: self.sanitizer("initcheck"), "parity": self.parity,
        }
        try:
            return readers[stage]() if stage in readers else ""
        except Exception as exc:  # noqa: BLE001 - a verdict must come out even from a malformed file
            return f"(results unreadable: {type(exc).__name__}: {exc})"


def read_records(path: Path) -> Dict[str, Dict[str, str]]:
    """The last record of each stage in ``stages.tsv``."""
    if not path.is_file():
        return {}
    with path.open() as fh:
        return {row["stage"]: row for row in csv.DictReader(fh, delimiter="\t")}


def verdict(plan: List[tuple], records: Dict[str, Dict[str, str]], results: Results, mode: str,
            budget: int, elapsed: Optional[int]) -> Dict[str, Any]:
    """The verdict record: every planned stage in order, its status and figure, and the call's outcome."""
    rows = []
    for stage, planned in plan:
        if stage == "verdict":
            continue
        rec = records.get(stage)
        status = rec["status"] if rec else "not run"
        note = rec.get("note", "") if rec else "no record: the call ended before it"
        rows.append({"stage": stage, "status": status, "seconds": int(rec["seconds"]) if rec else None,
                     "budget_s": int(rec["budget"]) if rec and rec["budget"].isdigit() else planned,
                     "planned_s": planned, "note": note,
                     "result": results.figure(stage) if status != "not run" else ""})
    bad = [r["stage"] for r in rows if r["status"] in ("fail", "timeout")]
    missing = [r["stage"] for r in rows if r["status"] == "not run" and not r["note"].startswith("needs")]
    outcome = "fail" if bad else ("incomplete" if missing else "pass")
    env = _load(results.work / "env.json") or {}
    return {"schema": "dip_fast-gpu-verdict/1", "mode": mode, "device": env.get("gpu") or env.get("cpu"),
            "commit": env.get("commit"), "torch": env.get("torch"), "date": env.get("date"),
            "budget_s": budget, "planned_s": sum(p for _, p in plan), "elapsed_s": elapsed,
            "verdict": outcome, "failed": bad, "not_run": missing, "stages": rows}


def render(v: Dict[str, Any]) -> str:
    """The verdict as a markdown table."""
    lines = [f"## gpu_check verdict: {v['verdict'].upper()} ({v['mode']} call; {v['device']}, commit {v['commit']}, "
             f"torch {v['torch']}, {v['date']})", "",
             f"Planned {v['planned_s']} s of a {v['budget_s']} s budget; took {v['elapsed_s']} s.", "",
             "| stage | status | s / budget | result |", "|---|---|---|---|"]
    for r in v["stages"]:
        secs = "-" if r["seconds"] is None else str(r["seconds"])
        result = r["result"] or r["note"]
        if r["result"] and r["note"]:
            result += f" ({r['note']})"
        lines.append(f"| {r['stage']} | {r['status']} | {secs} / {r['budget_s']} | {result.replace('|', '/')} |")
    if v["failed"]:
        lines += ["", "Failed or stopped at the budget: " + ", ".join(v["failed"]) + "."]
    if v["not_run"]:
        lines += ["", "Not run: " + ", ".join(v["not_run"]) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the folder the stages wrote their results to")
    p.add_argument("--work", type=Path, required=True, help="the folder of side files (test XML, sanitizer logs)")
    p.add_argument("--plan", required=True, help="stage:budget,... in order")
    p.add_argument("--mode", default="default")
    p.add_argument("--device", default="cuda", help="the result files' prefix (cuda or cpu)")
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--elapsed", type=int, default=None)
    args = p.parse_args()
    plan = [(s.split(":")[0], int(s.split(":")[1])) for s in args.plan.split(",") if s]
    v = verdict(plan, read_records(args.out / "stages.tsv"), Results(args.out, args.work, args.device),
                args.mode, args.budget, args.elapsed)
    (args.out / "verdict.json").write_text(json.dumps(v, indent=1) + "\n")
    text = render(v)
    (args.out / "verdict.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
