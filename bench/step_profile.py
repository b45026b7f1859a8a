#!/usr/bin/env python
"""Where the time of one DIP step goes, kernel by kernel, in six categories.

On CUDA this profiles the CUDA-graph step (``fast_graph_bf16`` and
``fast_graph_tf32`` by default) at 512² and 256² with ``torch.profiler``:
every kernel, memset and memcpy the replay runs, with its device time. On
the CPU there is no graph, so the eager step (``fast_cl``, the layout
``restore()`` uses there) is profiled by the self CPU time of its ops: that
exercises the same code on a machine without a GPU, it does not measure it.

Each kernel (or CPU op) goes to the first category whose pattern matches its
name (:data:`CATEGORIES`, case-insensitive). Casts and layout conversions
come first so that cuDNN's ``nchwToNhwc``-style transposes and the CPU's
``copy_`` and ``_to_copy`` land in ``casts_layout`` instead of hiding in
``convolution``. What no pattern claims is ``other``: the input
perturbation (``normal_``, ``add``), fills, and reductions launched by
generic PyTorch kernels whose names do not say which layer they serve (a
convolution's bias gradient, for one). The JSON keeps the largest kernels of
every category, so a misfiled one can be seen and the pattern fixed.
``step_ledger.py`` splits the convolutions by direction and puts every
category beside its bound.

Each size and variant is profiled for ``--rounds`` steps, one profiler
session per step, after warm-up (which also captures the graph); the step
with the median total is kept, so its kernels add up to its total.

Usage::

    python bench/step_profile.py --device cuda --out bench/results/cuda-profile.json
    python bench/step_profile.py --device cpu --sizes 64 --rounds 2   # a dry run

``--merge-into FILE`` adds the result to an existing JSON (for example the
steps stage's ``cuda-steps.json``) under ``kernel_profile`` instead of
writing a file of its own.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (sets Inductor's cache before torch is imported, loads dip_fast)

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402

from dip_fast.core.step import GRAPH_WARMUP_STEPS  # noqa: E402

#: Categories in the order they are tried; the first pattern that matches a kernel or op name wins.
CATEGORIES: Tuple[Tuple[str, str], ...] = (
    # Layout transposes (cuDNN's nchwToNhwc, PyTorch's contiguous copies) and dtype casts: not the
    # step's arithmetic, and a target for removal. The CPU's aten::copy_ and _to_copy are both.
    ("casts_layout", r"nchwtonhwc|nhwctonchw|transpose|permute|contiguous|_to_copy|aten::to\b|aten::copy_|"
                     r"memcpy|clone"),
    ("loss", r"mse|loss"),
    ("zero_grad", r"zero_grad|aten::zero_"),
    ("Adam", r"adam|multi_tensor_apply|foreach"),
    # BatchNorm with LeakyReLU and padding: the fused dip_fast ops (bn_stats, bn_normalize, bn_dx, ...,
    # and their autograd node BnActFunction),
    # cuDNN's and PyTorch's BatchNorm kernels, the reference's LeakyReLU, reflection padding and the
    # output's sigmoid.
    ("bn_act", r"bn_|bnact|batch_?norm|welford|leaky_?relu|reflection_?pad|sigmoid"),
    # The fused dip_fast op and the reference's bilinear upsampling and concatenation.
    ("upsample_cat", r"upsample|aten::cat\b|catarray|catbackward"),
    # cuDNN, cuBLAS and CUTLASS convolution kernels (forward, data and weight gradients) and PyTorch's
    # convolution ops on the CPU (mkldnn / oneDNN).
    ("convolution", r"conv|cudnn|xmma|implicit_?gemm|[wd]grad|fprop|gemm|cutlass|winograd|mkldnn|onednn"),
)
CATEGORY_NAMES = ("convolution", "bn_act", "upsample_cat", "loss", "Adam", "zero_grad", "casts_layout", "other")
_COMPILED = [(name, re.compile(pattern, re.I)) for name, pattern in CATEGORIES]
#: Kernels kept per category in the JSON and the "largest" table.
TOP = 6


def categorize(name: str) -> str:
    """The category of a kernel or op name (see :data:`CATEGORIES`)."""
    for label, pattern in _COMPILED:
        if pattern.search(name):
            return label
    return "other"


def _timed_names(prof: Any, device: torch.device) -> List[Tuple[str, float]]:
    """(name, ms) for every kernel, memset and memcpy on CUDA; for every op's self CPU time on the CPU."""
    if device.type == "cuda":
        return [(e.name, e.time_range.elapsed_us() / 1e3) for e in prof.events() if e.device_type == DeviceType.CUDA]
    # Self times partition the step: a parent op's time does not count its children's again.
    return [(e.name, e.self_cpu_time_total / 1e3) for e in prof.events()
            if e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0]


def _one_step(step: Any, device: torch.device) -> Tuple[float, List[Tuple[str, float]]]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        compare.sync(device)
    return time.perf_counter() - t0, _timed_names(prof, device)


def summarize(timed: Sequence[Tuple[str, float]], top: int = TOP) -> Dict[str, Any]:
    """Totals per category, and per category its largest kernels (same names summed, with their count)."""
    by_name: Dict[str, List[float]] = {}
    for name, ms in timed:
        by_name.setdefault(name, []).append(ms)
    cats: Dict[str, Dict[str, Any]] = {c: {"ms": 0.0, "kernels": 0, "largest": []} for c in CATEGORY_NAMES}
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        entry = cats[categorize(name)]
        entry["ms"] += sum(times)
        entry["kernels"] += len(times)
        if len(entry["largest"]) < top:
            # Template arguments make some kernel names kilobytes long; the start says what it is.
            entry["largest"].append({"name": name[:300], "ms": sum(times), "calls": len(times)})
    total = sum(c["ms"] for c in cats.values())
    for c in cats.values():
        c["share"] = c["ms"] / total if total > 0 else 0.0
    return {"total_ms": total, "kernels": sum(c["kernels"] for c in cats.values()), "categories": cats}


def profile_variant(name: str, size: int, device: torch.device, *, rounds: int, warmup: int,
                    seed: int = 0, step: Optional[Any] = None) -> Dict[str, Any]:
    """Profile ``rounds`` steps of one compare.py step variant; keep the step with the median total.

    ``step``: that variant's step, already built (``compare.build_steps``), for a caller that goes on
    with it; by default one is built here.
    """
    if step is None:
        step = compare.build_steps([name], size, device, seed=seed)[name]
    graph = compare.VARIANTS[name].mode == "graph"
    # A graph variant runs its warm-up steps eagerly, then captures on the next call: replay after that.
    for _ in range(max(warmup, GRAPH_WARMUP_STEPS + 2) if graph else warmup):
        step()
    compare.sync(device)
    runs = [_one_step(step, device) for _ in range(rounds)]
    totals = [sum(ms for _, ms in timed) for _, timed in runs]
    median_run = sorted(range(rounds), key=lambda i: totals[i])[rounds // 2]
    wall, timed = runs[median_run]
    out = summarize(timed)
    out.update({
        "variant": name,
        "label": compare.VARIANTS[name].label,
        "graphed": bool(step.runner.graphed),
        "timing": "device time of kernels, memsets and memcpys" if device.type == "cuda" else "self CPU time of ops",
        "rounds": rounds,
        "total_ms_each": totals,
        "wall_ms_under_profiler": wall * 1e3,
    })
    if graph and out["kernels"] == 0:
        out["note"] = "no kernel of the graph replay was traced (profiler or driver without graph kernel records)"
    return out


def render(prof: Dict[str, Any]) -> List[str]:
    """Markdown: one row per size and variant with each category's ms and share, then the largest kernels."""
    unit = "device" if prof.get("device") == "cuda" else "self CPU"
    lines = [f"Kernel-level profile of the step ({unit} ms; the median of {prof['rounds']} profiled steps):", "",
             "| size | variant | total ms | " + " | ".join(CATEGORY_NAMES) + " |",
             "|---|---|---|" + "---|" * len(CATEGORY_NAMES)]
    for size, variants in prof["sizes"].items():
        for name, v in variants.items():
            if "error" in v:
                lines.append(f"| {size} | {name} | failed: {v['error']} |" + " |" * len(CATEGORY_NAMES))
                continue
            cats = v["categories"]
            cells = [f"{cats[c]['ms']:.2f} ({100 * cats[c]['share']:.0f}%)" for c in CATEGORY_NAMES]
            mode = "" if v["graphed"] or not name.startswith("fast_graph") else " (not graphed)"
            lines.append(f"| {size} | {name}{mode} | {v['total_ms']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Largest kernels per category (first size and variant):", "", "| category | kernel | calls | ms |",
              "|---|---|---|---|"]
    first = next((v for vs in prof["sizes"].values() for v in vs.values() if "error" not in v), None)
    if first is not None:
        for c in CATEGORY_NAMES:
            for k in first["categories"][c]["largest"][:3]:
                lines.append(f"| {c} | `{k['name'][:90]}` | {k['calls']} | {k['ms']:.3f} |")
    return lines


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # a run cut off mid-write leaves the previous file whole


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default cuda: 512 256; cpu: 64)")
    p.add_argument("--variants", nargs="+", default=None, choices=sorted(compare.VARIANTS),
                   help="compare.py step variants (default cuda: fast_graph_bf16 fast_graph_tf32; cpu: fast_cl)")
    p.add_argument("--rounds", type=int, default=5, help="profiled steps per size and variant; the median is kept")
    p.add_argument("--warmup", type=int, default=3, help="steps before profiling (graph variants: at least "
                   "their eager warm-up and the capture)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (the .md table goes beside it)")
    p.add_argument("--merge-into", type=Path, default=None,
                   help="add the result to this JSON under 'kernel_profile' (created when missing) instead of --out")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
        return 2
    is_cuda = device.type == "cuda"
    if is_cuda:
        torch.backends.cudnn.benchmark = True  # as compare.py and the paper's code: cuDNN picks per shape
    sizes = args.sizes or ([512, 256] if is_cuda else [64])
    variants = args.variants or (["fast_graph_bf16", "fast_graph_tf32"] if is_cuda else ["fast_cl"])
    env = compare.environment(device)
    prof: Dict[str, Any] = {"schema": "dip_fast-step-profile/1", "device": device.type, "environment": env,
                            "rounds": args.rounds, "categories": dict(CATEGORIES), "sizes": {}}
    if args.merge_into is not None:
        target = args.merge_into
    else:
        target = args.out or compare.RESULTS_DIR / f"{device.type}-profile.json"
    target.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        if args.merge_into is not None:
            data = json.loads(target.read_text()) if target.is_file() else {}
            data["kernel_profile"] = prof
            _write_json(target, data)
        else:
            _write_json(target, prof)
            target.with_suffix(".md").write_text("\n".join(render(prof)) + "\n")

    print(f"step profile: {device.type} ({env.get('gpu') or env['cpu_model']}), commit {env['commit']}, "
          f"sizes {sizes}, variants {variants} -> {target}", flush=True)
    for size in sizes:
        prof["sizes"][str(size)] = {}
        for name in variants:
            try:
                entry = profile_variant(name, size, device, rounds=args.rounds, warmup=args.warmup, seed=args.seed)
            except (RuntimeError, ValueError) as exc:  # one variant failing (memory, capture) keeps the others
                entry = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            prof["sizes"][str(size)][name] = entry
            spread = entry.get("total_ms_each")
            note = f", totals {min(spread):.2f}-{max(spread):.2f} ms" if spread else ""
            print(f"  {size}x{size} {name}: {entry.get('total_ms', float('nan')):.2f} ms{note}", flush=True)
            save()
            if is_cuda:
                torch.cuda.empty_cache()
    print("\n".join(render(prof)))
    failed = [n for vs in prof["sizes"].values() for n, v in vs.items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
