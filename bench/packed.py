"""Throughput of packed networks: images per hour against K, the networks trained in one step.

For each K the same work is timed: K denoising runs of the given preset's
network (its own seed, image and noise each) trained together by
:func:`dip_fast.core.fit.fit_packed`, ``--steps`` steps, after a warm-up.  K's
are interleaved over ``--rounds`` rounds (the machine's load drifts), and
the median seconds per step gives images per hour at the preset's step count.

What to expect, written before measuring: on 2 CPU cores one 128x128 step
already keeps both cores busy in oneDNN's convolutions, and a K-way grouped
convolution costs about K times one convolution (measured per convolution:
5.3 ms per network at K=4 against 4.9 ms at K=1, channels_last, 128 channels
at 32x32), so the per-image cost should stay flat -- K=4 no dearer per image
than K=1 -- with a small gain from the per-step overheads (Adam, Python,
the small deep levels) that packing shares.  On a GPU, where one 256x256 step
fills about 2% of the device, K=16 should approach 16x the images per hour.

    python bench/packed.py --device cpu --size 128 --ks 1 2 4 --json bench/results/packed-cpu.json
    python bench/packed.py --device cuda --size 256 --ks 1 4 16
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Dict, List

import torch

from dip_fast import tasks
from dip_fast.core.fit import fit_packed
from dip_fast.core.networks import resolve_backend
from dip_fast.core.packed import pack


def _setup(k: int, size: int, preset: tasks.Preset, device: torch.device, backend: str):
    builder, name = resolve_backend(backend, device)
    runs = []
    for i in range(k):
        torch.manual_seed(i)
        clean = torch.rand(1, 3, size, size, device=device)
        noisy = (clean + 25 / 255 * torch.randn_like(clean)).clamp(0, 1)
        term = tasks.DenoiseTerm(noisy)
        g = torch.Generator(device).manual_seed(i)
        runs.append(tasks.build_run(preset, term, 3, (size, size), backend=builder, generator=g))
    net = pack([r.net for r in runs]) if k > 1 else runs[0].net
    z = torch.cat([r.net_input for r in runs], dim=1)
    term = tasks.PackedTerm([r.term for r in runs]) if k > 1 else runs[0].term
    kwargs = dict(runs[0].fit_kwargs)
    kwargs.update(term.fit_kwargs())
    kwargs["generator"] = [r.fit_kwargs["generator"] for r in runs] if k > 1 else runs[0].fit_kwargs["generator"]
    return net, z, term, kwargs, name


def _seconds_per_step(k: int, steps: int, setup) -> float:
    net, z, term, kwargs, _ = setup
    kwargs = {**kwargs, "iterations": steps}
    if z.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fit_packed(net, z, term, networks=k, **kwargs) if k > 1 else _fit_one(net, z, term, kwargs)
    if z.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def _fit_one(net, z, term, kwargs):
    from dip_fast.core.fit import fit

    return fit(net, z, term, **kwargs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--preset", default="denoise_fast")
    ap.add_argument("--backend", default="fast", choices=("fast", "reference"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = tasks.get_preset(args.preset)
    setups = {k: _setup(k, args.size, preset, device, args.backend) for k in args.ks}
    for k in args.ks:  # warm-up: allocator, oneDNN / cuDNN primitive caches
        _seconds_per_step(k, 2, setups[k])
    times: Dict[int, List[float]] = {k: [] for k in args.ks}
    for _ in range(args.rounds):
        for k in args.ks:
            times[k].append(_seconds_per_step(k, args.steps, setups[k]))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    rows = []
    base = statistics.median(times[args.ks[0]])
    print(f"{args.device} ({torch.cuda.get_device_name() if device.type == 'cuda' else cpu}), "
          f"{torch.get_num_threads()} threads, {args.size}x{args.size}, preset {args.preset} "
          f"({preset.iterations} steps), backend {setups[args.ks[0]][4]}")
    print("| K | ms / step | ms / step / image | images / hour | per-image speed vs K=1 |")
    print("|---|---|---|---|---|")
    for k in args.ks:
        med = statistics.median(times[k])
        per_image = med / k
        per_hour = 3600 / (per_image * preset.iterations)
        speed = base / args.ks[0] / per_image
        rows.append(dict(k=k, seconds_per_step=med, all=times[k], images_per_hour=per_hour, speedup=speed))
        print(f"| {k} | {med * 1e3:.1f} | {per_image * 1e3:.1f} | {per_hour:.1f} | {speed:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=args.device, cpu=cpu, threads=torch.get_num_threads(), size=args.size,
                           preset=args.preset, iterations=preset.iterations, backend=setups[args.ks[0]][4],
                           steps=args.steps, rounds=args.rounds, torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
