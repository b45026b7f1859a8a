#!/usr/bin/env python
"""Every millisecond of the CPU step beside what it should cost at its bound.

``step_profile.py`` sorts a step's self CPU time into categories. This file
adds what the profiler cannot say:

* **The convolutions split by direction.** On the CPU one
  ``aten::convolution_backward`` call computes both the input and the weight
  gradient, so the profile cannot separate them. Here every convolution call
  of one step is recorded (shapes, strides, dtype, which gradients it
  computes) and replayed in isolation, direction by direction: forward, input
  gradient, weight gradient. The step's profiled convolution time is then
  split in the replay's proportions.
* **A bound for each category.**

  - Convolutions: their FLOPs (2 per multiply-add) at the rate of a forward
    3x3 128->128 convolution at 128² in the same dtype and layout (the
    "probe"; the rate oneDNN reaches on a large, well-shaped convolution).
  - Everything else: the bytes each op must read and write once (its tensor
    inputs and outputs; views move nothing) at the machine's copy bandwidth
    (a 256 MiB ``copy_``, read + write). Data that stays in cache can beat
    this bound, so it is a yardstick, not a floor.

Usage::

    python bench/step_ledger.py --sizes 128 256 --variants fast_cl fast_cl_bf16 reference \\
        --out bench/results/cpu-ledger.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (loads dip_fast, sets the caches)
import step_profile  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


aten = torch.ops.aten
DIRECTIONS = ("forward", "input_grad", "weight_grad")
TensorSpec = Tuple[Tuple[int, ...], Tuple[int, ...], torch.dtype]


def _spec(t: Any) -> Any:
    return (tuple(t.shape), tuple(t.stride()), t.dtype) if isinstance(t, torch.Tensor) else t


def _nbytes(values: Any) -> int:
    if isinstance(values, torch.Tensor):
        return values.numel() * values.element_size()
    if isinstance(values, (list, tuple)):
        return sum(_nbytes(v) for v in values)
    return 0


class StepRecorder(TorchDispatchMode):
    """Records a step's convolution calls (for replay) and every other op's compulsory bytes.

    Sits below autograd and autocast, so it sees the ops that run: the
    backward's ``convolution_backward`` with its output mask, the casts
    autocast inserts, dip_fast's own ops.
    """

    def __init__(self) -> None:
        super().__init__()
        self.convs: List[Tuple[str, tuple]] = []
        self.bytes: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (aten.convolution.default, aten.convolution_backward.default):
            # All arguments positionally (autograd passes some by keyword), for the replay.
            rest = [kwargs[a.name] for a in func._schema.arguments[len(args):] if a.name in kwargs]
            self.convs.append(("forward" if func is aten.convolution.default else "backward", tuple(_spec(a) for a in list(args) + rest)))
            return out
        schema = func._schema
        is_view = any(r.alias_info is not None for r in schema.returns) and not schema.is_mutable
        if not is_view:
            category = step_profile.categorize(func.name())
            self.bytes[category] = self.bytes.get(category, 0) + _nbytes(list(args)) + _nbytes(out)
        return out


def _make(spec: Any, gen: torch.Generator) -> Any:
    if isinstance(spec, tuple) and len(spec) == 3 and isinstance(spec[2], torch.dtype):
        shape, stride, dtype = spec
        t = torch.empty_strided(shape, stride, dtype=dtype)
        return t.copy_(torch.randn(shape, generator=gen))  # copy_ casts and follows t's strides
    return spec


def _conv_flops(weight: TensorSpec, out_shape: Tuple[int, ...]) -> float:
    """2 * N * C_out * H_out * W_out * (C_in / groups) * k_h * k_w."""
    w = weight[0]
    return 2.0 * out_shape[0] * out_shape[1] * out_shape[2] * out_shape[3] * w[1] * w[2] * w[3]


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def replay_convolutions(convs: Sequence[Tuple[str, tuple]], repeats: int = 5) -> Dict[str, Dict[str, float]]:
    """Time each recorded convolution call in isolation, by direction: ``{direction: {ms, gflop}}``."""
    gen = torch.Generator().manual_seed(0)
    out: Dict[str, Dict[str, float]] = {d: {"ms": 0.0, "gflop": 0.0, "calls": 0} for d in DIRECTIONS}
    with torch.no_grad():
        for name, specs in convs:
            args = [_make(s, gen) for s in specs]
            if name == "forward":
                x, w = args[0], args[1]
                y = aten.convolution(*args)
                ms = _median_ms(lambda a=args: aten.convolution(*a), repeats)
                parts = [("forward", ms, _conv_flops(specs[1], tuple(y.shape)))]
            else:
                grad_out, mask = args[0], list(args[-1])
                flops = _conv_flops(specs[2], tuple(grad_out.shape))
                parts = []
                if mask[0]:
                    a = args[:-1] + [[True, False, False]]
                    parts.append(("input_grad", _median_ms(lambda a=a: aten.convolution_backward(*a), repeats), flops))
                if mask[1] or mask[2]:
                    a = args[:-1] + [[False, mask[1], mask[2]]]
                    parts.append(("weight_grad", _median_ms(lambda a=a: aten.convolution_backward(*a), repeats),
                                  flops if mask[1] else 0.0))
            for direction, ms, flops in parts:
                out[direction]["ms"] += ms
                out[direction]["gflop"] += flops / 1e9
                out[direction]["calls"] += 1
    return out


def probe_rate(dtype: torch.dtype, repeats: int = 7) -> float:
    """GFLOP/s of ``compare.py``'s probe (a forward 3x3 128->128 convolution at 128²), channels_last, in ``dtype``."""
    run, flops = compare.conv_probe(torch.device("cpu"), True, dtype=dtype)
    return flops / (_median_ms(run, repeats) * 1e-3) / 1e9


def copy_bandwidth(mib: int = 256, repeats: int = 7) -> float:
    """GB/s of a large ``copy_`` (bytes read + bytes written)."""
    a = torch.ones(mib * 2**18)
    b = torch.empty_like(a)
    ms = _median_ms(lambda: b.copy_(a), repeats)
    return 2 * a.numel() * 4 / (ms * 1e-3) / 1e9


def ledger(name: str, size: int, *, rounds: int, warmup: int, repeats: int) -> Dict[str, Any]:
    """Profile one compare.py variant's step and put each category beside its bound."""
    device = torch.device("cpu")
    step = compare.build_steps([name], size, device)[name]
    prof = step_profile.profile_variant(name, size, device, rounds=rounds, warmup=warmup, step=step)
    recorder = StepRecorder()  # the profiled step, warm: what it records is what was profiled
    with recorder:
        step()
    precision = compare.VARIANTS[name].precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rate = probe_rate(dtype)
    bandwidth = copy_bandwidth()
    replay = replay_convolutions(recorder.convs, repeats)
    replay_total = sum(d["ms"] for d in replay.values())
    cats = prof["categories"]
    rows: Dict[str, Dict[str, Any]] = {}
    for direction in DIRECTIONS:
        share = replay[direction]["ms"] / replay_total if replay_total else 0.0
        rows[f"conv_{direction}"] = {
            "ms": cats["convolution"]["ms"] * share, "isolated_ms": replay[direction]["ms"],
            "gflop": replay[direction]["gflop"], "calls": replay[direction]["calls"],
            "bound_ms": replay[direction]["gflop"] / rate * 1e3, "bound": "FLOPs at the probe's rate"}
    for cat in step_profile.CATEGORY_NAMES:
        if cat == "convolution":
            continue
        moved = recorder.bytes.get(cat, 0)
        rows[cat] = {"ms": cats[cat]["ms"], "bytes": moved, "bound_ms": moved / (bandwidth * 1e9) * 1e3,
                     "bound": "bytes at the copy bandwidth"}
    return {"variant": name, "label": compare.VARIANTS[name].label, "size": size, "dtype": str(dtype),
            "total_ms": prof["total_ms"], "wall_ms_under_profiler": prof["wall_ms_under_profiler"],
            "probe_gflops": rate, "copy_gbps": bandwidth, "rows": rows, "profile": prof}


def render(result: Dict[str, Any]) -> List[str]:
    """Markdown: per size and variant, each row's ms in the step, share, and bound."""
    lines: List[str] = []
    for size, variants in result["sizes"].items():
        for name, v in variants.items():
            lines += [f"**{size}², {name}** ({v['label']}): {v['total_ms']:.1f} ms of self CPU time; "
                      f"probe {v['probe_gflops']:.0f} GFLOP/s ({v['dtype'].replace('torch.', '')}), "
                      f"copy {v['copy_gbps']:.1f} GB/s", "",
                      "| part | ms in the step | share | bound ms | measure |", "|---|---:|---:|---:|---|"]
            for part, row in v["rows"].items():
                extra = (f"{row['gflop']:.2f} GFLOP, {row['calls']} calls, {row['isolated_ms']:.1f} ms alone"
                         if "gflop" in row else f"{row['bytes'] / 2**20:.1f} MiB")
                lines.append(f"| {part} | {row['ms']:.1f} | {100 * row['ms'] / v['total_ms']:.0f}% | "
                             f"{row['bound_ms']:.1f} | {extra} |")
            conv = sum(r["ms"] for p, r in v["rows"].items() if p.startswith("conv_"))
            bound = sum(r["bound_ms"] for r in v["rows"].values())
            lines += ["", f"Convolutions: {conv:.1f} ms ({100 * conv / v['total_ms']:.0f}% of the step); "
                      f"all bounds together: {bound:.1f} ms.", ""]
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128])
    p.add_argument("--variants", nargs="+", default=["fast_cl", "fast_cl_bf16", "reference"],
                   choices=sorted(compare.VARIANTS))
    p.add_argument("--rounds", type=int, default=5, help="profiled steps per variant; the median is kept")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="isolated timings per convolution call (median)")
    compare.add_host_memory_option(p, "reuse")
    p.add_argument("--out", type=Path, default=compare.RESULTS_DIR / "cpu-ledger.json")
    args = p.parse_args(argv)
    with compare.host_memory(args.host_memory):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    result: Dict[str, Any] = {"schema": "dip_fast-step-ledger/1", "host_memory": args.host_memory,
                              "environment": compare.environment(torch.device("cpu")), "sizes": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        result["sizes"][str(size)] = {}
        for name in args.variants:
            entry = ledger(name, size, rounds=args.rounds, warmup=args.warmup, repeats=args.repeats)
            result["sizes"][str(size)][name] = entry
            print(f"  {size}x{size} {name}: {entry['total_ms']:.1f} ms", flush=True)
            step_profile._write_json(args.out, result)
            args.out.with_suffix(".md").write_text("\n".join(render(result)) + "\n")
    print("\n".join(render(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
