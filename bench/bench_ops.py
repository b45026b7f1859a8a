"""Each custom op against the plain PyTorch sequence it replaces.

* ``bn_act`` (:func:`dip_fast.ops.bn_act.batch_norm_act`) vs
  ``F.pad(F.leaky_relu(F.batch_norm(x, None, None, w, b, training=True), slope), [pad] * 4, mode="reflect")``,
  forward alone and backward alone, at the three kinds of call the paper
  network makes (after ``down[0]``, after the level-0 concatenation, after
  ``up[0]``) for a 128x128 image on the CPU and 512x512 on CUDA, NCHW and channels_last.
* ``upsample_cat`` (:func:`dip_fast.ops.upsample_cat.upsample_cat`) vs
  ``torch.cat([skip, F.interpolate(deep, scale_factor=2, mode="bilinear")], 1)``
  at the network's top level, forward alone and forward + backward, both layouts.
* Lanczos downsampling (the fast ``Downsample`` module, if this checkout has
  it) vs the reference ``Downsampler``, forward + backward, x4 and x8.

The cases come from ``bench/compare.py`` (``op_cases``), so both tools time
the same code. Fused and PyTorch variants of a case share a benchmark group.

    pytest bench/bench_ops.py -m cpu
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import pytest
import torch

import compare as harness

OP_IMAGE_SIZE = {"cpu": 128, "cuda": 512}

# (case name, variants) known ahead of collection; a case missing at run time skips with the reason.
_LAYOUT_SUFFIXES = ("", " (channels_last)")
_BN_ACT = [f"bn_act/{k}{sfx}" for sfx in _LAYOUT_SUFFIXES for k in ("down0", "concat0", "up0")]
_UPSAMPLE_CAT = [f"upsample_cat/level0{sfx}" for sfx in _LAYOUT_SUFFIXES]
_LANCZOS = ["lanczos/x4", "lanczos/x8"]
_CASE_VARIANTS = {name: ("fused_fwd", "torch_fwd", "fused_bwd", "torch_bwd") for name in _BN_ACT}
_CASE_VARIANTS.update({name: ("fused_fwd", "torch_fwd", "fused_fwd_bwd", "torch_fwd_bwd") for name in _UPSAMPLE_CAT})
_CASE_VARIANTS.update({name: ("fused_fwd_bwd", "torch_fwd_bwd") for name in _LANCZOS})

_cache: Dict[str, Tuple[Dict[str, harness.OpCase], List[str]]] = {}


def _cases_for(device: str) -> Tuple[Dict[str, harness.OpCase], List[str]]:
    """Build the op cases once per device (inputs and saved graphs are reused by every benchmark)."""
    if device not in _cache:
        cases, notes = harness.op_cases(torch.device(device), OP_IMAGE_SIZE[device])
        _cache[device] = ({c.name: c for c in cases}, notes)
    return _cache[device]


def _params() -> Iterator[pytest.param]:
    for device in ("cpu", "cuda"):
        for name, variants in _CASE_VARIANTS.items():
            for variant in variants:
                yield pytest.param(device, name, variant, marks=getattr(pytest.mark, device), id=f"{device}-{name}-{variant}")


@pytest.mark.parametrize("device,name,variant", list(_params()))
def test_op(benchmark, device: str, name: str, variant: str) -> None:
    cases, notes = _cases_for(device)
    if name not in cases:
        family = name.split("/")[0]
        reason = next((n for n in notes if n.startswith(family)), f"{name} not available")
        pytest.skip(reason)
    case = cases[name]
    fn = case.variants[variant]
    dev = torch.device(device)
    pass_ = variant.split("_", 1)[1]
    benchmark.group = f"op {device} {name} {pass_}"
    benchmark.extra_info.update(shape=case.shape, variant=variant, image_size=OP_IMAGE_SIZE[device])

    def run() -> None:
        fn()
        harness.sync(dev)

    benchmark.pedantic(run, rounds=30, iterations=5, warmup_rounds=3)
