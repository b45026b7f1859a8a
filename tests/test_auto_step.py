"""step_mode='auto' / precision='auto': read from the table of recorded parity (dip_fast.core.auto_step)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from dip_fast.core import auto_step
from dip_fast.api import restore
from dip_fast.core.auto_step import ParityRecord, choose
from dip_fast.core.fit import _resolve_step_mode

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = torch.device("cuda")  # only compared by type: no GPU is needed


def record(mode: str, precision: str, ms: float, diff: float, se: float = 0.03, device_type: str = "cuda") -> ParityRecord:
    return ParityRecord(step_mode=mode, precision=precision, ms_per_step=ms, psnr_diff_db=diff,
                        psnr_diff_se_db=se, runs=6, hardware="test card", commit="0000000", source="test",
                        device_type=device_type)


# The issue-17 H200 times at 512², with made-up parity results: bf16 is the fastest but fails parity.
TABLE = (
    record("graph", "fp32", 30.8, 0.01),
    record("graph", "tf32", 21.0, -0.08),
    record("graph", "bf16", 20.5, -0.31),
)


def test_auto_is_eager_fp32_without_a_record_with_parity():
    assert choose(CUDA, records=()) == ("eager", "tf32")
    assert choose("cpu", records=(), native_bf16=True) == ("eager", "fp32")
    assert not any(r.device_type == "cuda" for r in auto_step.RECORDED_PARITY)  # no GPU run has recorded parity yet
    assert choose(CUDA) == ("eager", "tf32")
    assert choose(CUDA, "graph", "auto") == ("graph", "tf32")
    assert choose(CUDA, "auto", "bf16") == ("eager", "bf16")


def test_auto_picks_the_fastest_variant_with_parity_on_cuda():
    assert choose(CUDA, records=TABLE) == ("graph", "tf32")  # bf16 is faster but has no parity
    with_bf16 = TABLE[:2] + (record("graph", "bf16", 20.5, -0.12),)
    assert choose(CUDA, records=with_bf16) == ("graph", "bf16")
    # A fixed half of the choice restricts the other half to the records that match it.
    assert choose(CUDA, "auto", "fp32", records=with_bf16) == ("graph", "fp32")
    assert choose(CUDA, "eager", "auto", records=with_bf16) == ("eager", "tf32")  # no eager record
    assert choose(CUDA, "eager", "bf16", records=with_bf16) == ("eager", "bf16")  # nothing to resolve
    # Never off CUDA: the graph needs it, and the CPU times say nothing about the GPU's.
    assert choose("cpu", records=with_bf16) == ("eager", "fp32")


def test_the_parity_tolerance_is_the_issues():
    assert record("graph", "bf16", 1.0, 0.15).has_parity and record("graph", "bf16", 1.0, -0.15).has_parity
    assert not record("graph", "bf16", 1.0, 0.151).has_parity
    assert not record("graph", "bf16", 1.0, float("nan")).has_parity
    # A small mean from too few pairs is not parity: the 95% interval must also lie within +-0.3 dB.
    assert record("graph", "bf16", 1.0, 0.0, se=0.15).has_parity
    assert not record("graph", "bf16", 1.0, 0.0, se=0.16).has_parity
    assert not record("graph", "bf16", 1.0, -0.1, se=0.11).has_parity
    assert not record("graph", "bf16", 1.0, 0.0, se=float("nan")).has_parity


CPU_TABLE = (record("eager", "bf16", 40.0, -0.05, device_type="cpu"),)


def test_cpu_runs_bf16_only_with_native_bf16_units_and_a_cpu_record():
    assert choose("cpu", records=CPU_TABLE, native_bf16=True) == ("eager", "bf16")
    assert choose("cpu", records=CPU_TABLE, native_bf16=False) == ("eager", "fp32")  # emulated: slower
    assert choose("cpu", "auto", "fp32", records=CPU_TABLE, native_bf16=True) == ("eager", "fp32")
    # A CPU record says nothing about CUDA, nor a CUDA record about the CPU.
    assert choose(CUDA, records=CPU_TABLE) == ("eager", "tf32")
    assert choose("cpu", records=(record("eager", "bf16", 40.0, 0.0),), native_bf16=True) == ("eager", "fp32")
    # No parity, no bf16; and no graph on the CPU.
    assert choose("cpu", records=(record("eager", "bf16", 40.0, -0.4, device_type="cpu"),),
                  native_bf16=True) == ("eager", "fp32")
    assert choose("cpu", records=(record("graph", "bf16", 40.0, 0.0, device_type="cpu"),),
                  native_bf16=True) == ("eager", "fp32")


def test_cpu_features_names_the_bf16_units(monkeypatch):
    from dip_fast.core import cpu_features

    for caps, units in [({"amx_bf16": True, "amx_tile": True, "avx512_bf16": True}, "AMX"),
                        ({"avx512_bf16": True}, "AVX512-BF16"), ({"avx2": True}, "none"), ({}, "none")]:
        monkeypatch.setattr(cpu_features, "capabilities", lambda caps=caps: caps)
        assert cpu_features.bf16_units() == units
        assert cpu_features.has_native_bf16() == (units != "none")
    # restore() asks the CPU: with no bf16 units, 'auto' is fp32 whatever the table holds.
    monkeypatch.setattr(auto_step, "RECORDED_PARITY", CPU_TABLE)
    assert choose("cpu") == ("eager", "fp32")
    monkeypatch.setattr(cpu_features, "capabilities", lambda: {"amx_bf16": True, "amx_tile": True})
    assert choose("cpu") == ("eager", "bf16")


def test_fit_and_restore_read_the_same_table(monkeypatch):
    monkeypatch.setattr(auto_step, "RECORDED_PARITY", TABLE)
    assert choose(CUDA) == ("graph", "tf32")
    assert _resolve_step_mode("auto", CUDA, "fp32") == "graph"
    assert _resolve_step_mode("auto", torch.device("cpu"), "fp32") == "eager"

    # restore() asks the table once, with the device and the caller's values, and runs what it says.
    asked = []

    def spy(device, step_mode="auto", precision="auto", records=None):
        asked.append((torch.device(device).type, step_mode, precision))
        return "eager", "tf32"  # TF32 changes nothing on the CPU: the run itself stays cheap

    monkeypatch.setattr(auto_step, "choose", spy)
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    _, info = restore(image, preset="quick", iterations=1, sigma=25, return_info=True, backend="reference")
    assert asked == [("cpu", "auto", "auto")]
    assert (info.step_mode, info.precision) == ("eager", "tf32")


def test_restore_default_runs_eager_fp32_on_a_cpu_without_bf16_units(monkeypatch):
    from dip_fast.core import cpu_features

    monkeypatch.setattr(cpu_features, "capabilities", lambda: {"avx2": True})
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    _, info = restore(image, preset="quick", iterations=1, sigma=25, return_info=True, backend="reference")
    assert (info.step_mode, info.precision) == ("eager", "fp32")
    defaults = inspect.signature(restore).parameters
    assert defaults["step_mode"].default == defaults["precision"].default == "auto"
