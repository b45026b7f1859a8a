"""Lanczos downsampling: the fused op against the reference and a plain separable version.

Case: forward + backward (gradient with respect to the image) of the x4
``lanczos2`` downsampler, phase 0.5, ``preserve_size=True`` (the
super-resolution data term), on a 1x3x512x512 float32 image:

* ``fast``: ``dip_fast.ops.Downsample`` (``torch.ops.dip_fast.downsample``);
* ``reference``: ``dip_fast.reference.Downsampler`` (the paper's module:
  ReplicationPad2d, then one dense 3x3-channel conv2d with the 16x16 kernel);
* ``separable``: plain PyTorch doing what the op does, in separate steps:
  ``F.pad(mode="replicate")``, then a grouped (16, 1) conv with stride (4, 1),
  then a grouped (1, 16) conv with stride (1, 4).

Two ways to run it:

    pytest bench/bench_lanczos.py -m cpu --benchmark-json bench/results/cpu-lanczos.json
    python bench/bench_lanczos.py [--device cpu|cuda] [--repeats 30] [--json PATH]

The script interleaves the three variants call by call (so a busy machine
slows all of them alike), takes the median of every variant's repeats after a
warm-up, prints the ratios, and compares the fused op's traffic (bytes it must
move / time) with a measured copy rate.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dip_fast import _ops  # noqa: E402
from dip_fast.reference import Downsampler  # noqa: E402

SHAPE = (1, 3, 512, 512)
FACTOR = 4
KERNEL = dict(kernel_type="lanczos2", phase=0.5, preserve_size=True)
VARIANTS = ("fast", "separable", "reference")  # what the ratios compare
EXTRA = ("fast_kernels_only",)  # the script also times the two kernels without autograd


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Separable(torch.nn.Module):
    """Replicate pad, then the two strided 1-D passes as grouped convolutions (plain PyTorch)."""

    def __init__(self, n_planes: int, factor: int, kernel_1d, pad: int) -> None:
        super().__init__()
        k = torch.as_tensor(kernel_1d, dtype=torch.float32)
        self.factor, self.pad, self.n = factor, pad, n_planes
        self.register_buffer("wv", k.view(1, 1, -1, 1).repeat(n_planes, 1, 1, 1), persistent=False)
        self.register_buffer("wh", k.view(1, 1, 1, -1).repeat(n_planes, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad,) * 4, mode="replicate")
        x = F.conv2d(x, self.wv, stride=(self.factor, 1), groups=self.n)
        return F.conv2d(x, self.wh, stride=(1, self.factor), groups=self.n)


def build(device: torch.device, seed: int = 0) -> Dict[str, Callable[[], None]]:
    """One forward + backward step per variant, on the same input and output gradient."""
    from dip_fast.ops import Downsample

    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(SHAPE, generator=gen).to(device).requires_grad_(True)
    ref = Downsampler(SHAPE[1], FACTOR, **KERNEL).to(device)
    fast = Downsample(SHAPE[1], FACTOR, **KERNEL)
    sep = Separable(SHAPE[1], FACTOR, ref.kernel_1d, ref.pad).to(device)
    y_ref = ref(x)
    g = torch.rand(y_ref.shape, generator=gen).to(device)
    for name, mod in (("fast", fast), ("separable", sep)):  # same result, or the timing means nothing
        y = mod(x)
        err = (y - y_ref).abs().max().item()
        assert y.shape == y_ref.shape and err < 1e-5, f"{name} differs from the reference by {err}"

    def step(mod: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            torch.autograd.grad(mod(x), (x,), g)

        return run

    # The two compiled kernels alone, without the autograd machinery around them.
    taps = torch.tensor(fast.kernel_1d, dtype=torch.float32, device=device)
    xd = x.detach()

    def kernels_only() -> None:
        torch.ops.dip_fast.downsample(xd, taps, FACTOR, fast.pad)
        torch.ops.dip_fast._downsample_backward(g, taps, FACTOR, fast.pad, SHAPE[2], SHAPE[3])

    return {"fast": step(fast), "separable": step(sep), "reference": step(ref), "fast_kernels_only": kernels_only}


# ---------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------

_steps: Dict[str, Dict[str, Callable[[], None]]] = {}


def _params():
    for device in ("cpu", "cuda"):
        for variant in VARIANTS:
            yield pytest.param(device, variant, marks=getattr(pytest.mark, device), id=f"{device}-{variant}")


@pytest.mark.skipif(not _ops.has_ops("downsample"), reason="extension lacks downsample")
@pytest.mark.parametrize("device,variant", list(_params()))
def test_lanczos_x4_fwd_bwd(benchmark, device: str, variant: str) -> None:
    dev = torch.device(device)
    if device not in _steps:
        _steps[device] = build(dev)
    fn = _steps[device][variant]
    benchmark.group = f"lanczos x4 fwd+bwd {device}"
    benchmark.extra_info.update(shape=list(SHAPE), factor=FACTOR, variant=variant, **KERNEL)

    def run() -> None:
        fn()
        _sync(dev)

    rounds, iters = (20, 1) if variant == "reference" else (50, 5)
    benchmark.pedantic(run, rounds=rounds, iterations=iters, warmup_rounds=3)


# ---------------------------------------------------------------------------
# Script: interleaved timing, ratios and bandwidth
# ---------------------------------------------------------------------------


def _time(fn: Callable[[], None], device: torch.device, inner: int) -> float:
    _sync(device)
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / inner


def interleaved(
    fns: Dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int
) -> Dict[str, List[float]]:
    """Per-call seconds of every variant, the variants alternating (rotated order) call by call."""
    names = list(fns)
    inner = {}
    for name in names:  # warm-up, and enough calls per sample to last >= 2 ms
        for _ in range(warmup):
            fns[name]()
        once = _time(fns[name], device, 1)
        inner[name] = max(1, min(50, int(2e-3 / max(once, 1e-6))))
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            samples[name].append(_time(fns[name], device, inner[name]))
    return samples


def _cpu_ticks() -> tuple:
    """(busy, total) jiffies of the whole machine, from /proc/stat (Linux); (0, 0) elsewhere."""
    try:
        with open("/proc/stat") as fh:
            v = [int(t) for t in fh.readline().split()[1:]]
    except OSError:
        return 0, 0
    return sum(v) - v[3] - v[4], sum(v)


def other_load(run: Callable[[], object]):
    """Run ``run`` and return (its result, the CPUs' busy fraction spent outside this process).

    A shared machine: other processes' work during the measurement slows the
    multi-threaded variants most, so the number is reported with the timings.
    """
    busy0, total0 = _cpu_ticks()
    own0 = sum(os.times()[:2])
    result = run()
    busy1, total1 = _cpu_ticks()
    own1 = sum(os.times()[:2])
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    if total1 <= total0:
        return result, float("nan")
    others = (busy1 - busy0) / hz - (own1 - own0)
    return result, max(0.0, others / ((total1 - total0) / hz))


def copy_rate(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes per second of a tensor copy (each byte read once and written once)."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    t = statistics.median(_time(lambda: dst.copy_(src), device, 5) for _ in range(repeats))
    return 2 * nbytes / t


def environment(device: torch.device) -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
        info["cpu_model"] = model
        info["loadavg"] = os.getloadavg()
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=30, help="samples per variant (median reported), >= 5")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", type=Path, default=None, help="write the samples and summary here")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not _ops.has_ops("downsample"):
        print(f"dip_fast extension without downsample ({_ops.LOAD_ERROR})", file=sys.stderr)
        return 1

    fns = build(device)
    samples, others = other_load(lambda: interleaved(fns, device, args.repeats, args.warmup))
    med = {name: statistics.median(v) for name, v in samples.items()}

    numel = 1
    for n in SHAPE:
        numel *= n
    out_numel = SHAPE[0] * SHAPE[1] * (SHAPE[2] // FACTOR) * (SHAPE[3] // FACTOR)
    # What forward + backward must move at least: read x, write y, read grad_y, write grad_x.
    op_bytes = 4 * (2 * numel + 2 * out_numel)
    rate_same = copy_rate(device, 4 * numel, max(5, args.repeats // 2))  # a copy of the image's size
    rate_big = copy_rate(device, 256 << 20, 5)  # far past the caches
    fast_rate = op_bytes / med["fast"]
    # Multiply-adds of the separable formulation, forward and backward (the
    # transposes cost the same): per plane Ho * W * K down the columns and
    # Ho * Wo * K along the rows, each way.
    from dip_fast.ops import Downsample

    k = Downsample(SHAPE[1], FACTOR, **KERNEL).kernel_size
    ho, wo = SHAPE[2] // FACTOR, SHAPE[3] // FACTOR
    planes = SHAPE[0] * SHAPE[1]
    macs = 2 * planes * (ho * SHAPE[3] * k + ho * wo * k)

    env = environment(device)
    print(f"lanczos2 x{FACTOR}, phase 0.5, preserve_size, {'x'.join(map(str, SHAPE))} float32, forward + backward")
    print(f"{env['device']}: {env.get('gpu') or env.get('cpu_model')}, {env['threads']} threads, torch {env['torch']}")
    print(f"  other processes kept {others:.0%} of the CPUs busy during the timed loop")
    for name in VARIANTS + EXTRA:
        v = samples[name]
        print(f"  {name:10s} median {med[name] * 1e3:9.3f} ms   (min {min(v) * 1e3:.3f}, max {max(v) * 1e3:.3f}, n={len(v)})")
    print(f"  reference / fast = {med['reference'] / med['fast']:6.1f}x")
    print(f"  separable / fast = {med['separable'] / med['fast']:6.1f}x")
    print(
        f"  fast moves {op_bytes / 1e6:.2f} MB -> {fast_rate / 1e9:.2f} GB/s; copy rate {rate_same / 1e9:.2f} GB/s "
        f"at {4 * numel / 1e6:.1f} MB ({fast_rate / rate_same:.0%}), {rate_big / 1e9:.2f} GB/s at 268 MB "
        f"({fast_rate / rate_big:.0%})"
    )
    kern = med["fast_kernels_only"]
    print(
        f"  kernels alone {kern * 1e3:.3f} ms ({1 - kern / med['fast']:.0%} of the fast step is autograd and Python); "
        f"{macs / 1e6:.1f} M multiply-adds -> {macs / kern / 1e9:.1f} GMAC/s"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "case": {"shape": list(SHAPE), "factor": FACTOR, **KERNEL, "dtype": "float32", "pass": "forward+backward"},
            "environment": env,
            "other_processes_cpu_fraction": others,
            "median_s": med,
            "ratio_reference_over_fast": med["reference"] / med["fast"],
            "ratio_separable_over_fast": med["separable"] / med["fast"],
            "fast_bytes": op_bytes,
            "fast_multiply_adds": macs,
            "fast_bytes_per_s": fast_rate,
            "copy_bytes_per_s_same_size": rate_same,
            "copy_bytes_per_s_268MB": rate_big,
            "samples_s": samples,
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
