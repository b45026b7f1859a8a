"""One DIP training step of the paper's denoising network, per implementation and size.

A step is what :class:`dip_fast.core.step.StepRunner` runs: perturb ``z``, forward,
MSE loss, backward, Adam update (the same builders as ``bench/compare.py``).

CPU variants: ``fast`` (fused network, NCHW), ``fast_cl`` (fused,
channels_last), ``reference`` (plain PyTorch) and ``compile``
(``torch.compile(reference)``), at 64, 128 and 256 (``compile`` at 64 and
128 only: its compile alone takes minutes there).  CUDA variants add the
CUDA-graph steps in fp32, TF32 and bf16 (``compare.CUDA_STEP_VARIANTS``), at
256, 512 and 1024.
Benchmarks of one size share a pytest-benchmark group, so the comparison
table lists them together; the ratio between rows is only as good as the
machine's load was steady (use ``bench/compare.py`` for interleaved ratios).

    pytest bench/bench_step.py -m cpu
    pytest bench/bench_step.py -m cuda
"""
from __future__ import annotations

from typing import Iterator, Tuple

import pytest
import torch

import compare as harness

CPU_SIZES = (64, 128, 256)
CUDA_SIZES = (256, 512, 1024)
CPU_COMPILE_SIZES = (64, 128)


def _rounds(device: str, size: int) -> Tuple[int, int]:
    """(rounds, warm-up rounds): enough for a median, few enough that the CPU suite stays within minutes."""
    if device == "cuda":
        return 20, 3
    return (5, 1) if size <= 128 else (3, 1)


def _cases() -> Iterator[pytest.param]:
    for device, sizes, variants in (("cpu", CPU_SIZES, harness.STEP_VARIANTS),
                                    ("cuda", CUDA_SIZES, harness.CUDA_STEP_VARIANTS)):
        for size in sizes:
            for variant in variants:
                if device == "cpu" and variant == "compile" and size not in CPU_COMPILE_SIZES:
                    continue
                yield pytest.param(device, size, variant, marks=getattr(pytest.mark, device), id=f"{device}-{size}-{variant}")


@pytest.mark.parametrize("device,size,variant", list(_cases()))
def test_step(benchmark, device: str, size: int, variant: str) -> None:
    dev = torch.device(device)
    step = harness.build_steps([variant], size, dev)[variant]
    rounds, warmup = _rounds(device, size)
    benchmark.group = f"step {device} {size}x{size}"
    benchmark.extra_info.update(size=size, variant=variant, network="paper denoising skip (2.2M params)")

    def run() -> None:
        step()
        harness.sync(dev)  # the round ends when the GPU has finished, not when the launches return

    # On CUDA a step is milliseconds: several per round keep the timer's resolution out of it.
    iterations = 5 if device == "cuda" else 1
    benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=warmup)
