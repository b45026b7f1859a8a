"""What ``step_mode='auto'`` and ``precision='auto'`` run, and the evidence behind it.

A faster step (the CUDA graph, TF32 or bf16) becomes a default only once a
run has shown that it restores images as well as the eager fp32 step. That
evidence lives in :data:`RECORDED_PARITY`, the one place the choice is read
from (:func:`choose`, used by ``restore`` and ``fit``):

* one :class:`ParityRecord` per step variant and device type: on CUDA copied
  from a GPU run of ``scripts/gpu_check.sh`` (its ``parity`` stage gives the
  paired PSNR difference to eager fp32 and its standard error; its ``steps``
  stage the time per step at 512²), on the CPU from ``bench/bf16_parity.py``;
* a record has parity when its mean difference is within
  :data:`PARITY_TOLERANCE_DB` and its 95% interval within
  :data:`PARITY_INTERVAL_DB` (so that a mean near zero from too few pairs
  does not count);
* ``auto`` picks, among the records of the device's type with parity, the
  one with the least time per step, restricted to the mode or precision the
  caller fixed, if any;
* on the CPU, bf16 is a candidate only where the processor has native bf16
  units (AMX or AVX512-BF16, :mod:`dip_fast.core.cpu_features`); elsewhere it is
  emulated and slower than fp32;
* without such a record, ``auto`` is eager fp32 (on CUDA, eager with
  TF32 convolutions, PyTorch's default).

No GPU run has recorded parity yet (bench/README.md, "The default CUDA
step"). On the CPU, bf16 has parity on an AMD EPYC Zen 4 with AVX512-BF16
(bench/results/bf16-parity-cpu-zen4.json): it is a candidate of the
self-tuning step (:mod:`dip_fast.core.tuning`) on processors with native bf16
units, and runs where it times at least 5% faster than fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from . import cpu_features

__all__ = ["BASELINE", "PARITY_INTERVAL_DB", "PARITY_TOLERANCE_DB", "RECORDED_PARITY", "ParityRecord", "choose"]

#: The step every variant is compared with, and what ``auto`` runs without evidence (on CUDA with TF32
#: convolutions, PyTorch's default and what the paper's code gets on Ampere and later: :data:`CUDA_BASELINE`).
BASELINE = ("eager", "fp32")
CUDA_BASELINE = ("eager", "tf32")
#: Parity: the mean paired PSNR difference of the returned images to the baseline, in dB (issue 17).
PARITY_TOLERANCE_DB = 0.15
#: ... and the mean's 95% interval (1.96 standard errors) must lie within this, in dB.
PARITY_INTERVAL_DB = 0.30


@dataclass(frozen=True)
class ParityRecord:
    """One step variant's recorded evidence on one device type.

    Attributes:
        step_mode: ``'eager'`` or ``'graph'``.
        precision: ``'fp32'``, ``'tf32'`` or ``'bf16'``.
        ms_per_step: time per step (CUDA: the median at 512², the steps stage of
            ``gpu_check.sh``; CPU: at 128² on the named processor).
        psnr_diff_db: mean paired PSNR difference of the returned images to eager fp32
            (same images and seeds).
        psnr_diff_se_db: its standard error.
        runs: the number of image and seed pairs.
        hardware: the card or processor the run used.
        commit: the commit measured.
        source: the results file in ``bench/results/`` the numbers come from.
        device_type: ``'cuda'`` or ``'cpu'``: where the record applies.
    """

    step_mode: str
    precision: str
    ms_per_step: float
    psnr_diff_db: float
    psnr_diff_se_db: float
    runs: int
    hardware: str
    commit: str
    source: str
    device_type: str = "cuda"

    @property
    def has_parity(self) -> bool:
        """Mean within the tolerance, and its 95% interval within :data:`PARITY_INTERVAL_DB` (NaN fails)."""
        mean, half = abs(self.psnr_diff_db), 1.96 * self.psnr_diff_se_db
        return mean <= PARITY_TOLERANCE_DB and mean + half <= PARITY_INTERVAL_DB


#: The recorded evidence (see the module docstring).
RECORDED_PARITY: Tuple[ParityRecord, ...] = (
    # 24 paired runs of restore()'s defaults at 128x128 on CBSD68 crops, 2 seeds each: denoising sigma 25
    # (16 pairs, 8 crops) and x4 super-resolution (8 pairs, 4 crops); bf16 - fp32 = -0.036 +- 0.035 dB
    # (paired differences from -0.49 to +0.22 dB); median 49.7 against 61.0 ms per step at one thread.
    ParityRecord(step_mode="eager", precision="bf16", ms_per_step=49.7, psnr_diff_db=-0.036, psnr_diff_se_db=0.035,
                 runs=24, hardware="AMD EPYC (Zen 4, AVX512-BF16)", commit="5b1220f",
                 source="bench/results/bf16-parity-cpu-zen4.json", device_type="cpu"),
)


def _runnable(record: ParityRecord, device_type: str, native_bf16: bool) -> bool:
    """Whether ``record``'s variant applies to (and is worth running on) this device."""
    if record.device_type != device_type:
        return False
    if device_type == "cpu":  # no CUDA graph on the CPU, and emulated bf16 is slower than fp32
        return record.step_mode == "eager" and (record.precision != "bf16" or native_bf16)
    return True


def choose(device: Union[str, torch.device], step_mode: str = "auto", precision: str = "auto",
           records: Optional[Sequence[ParityRecord]] = None,
           native_bf16: Optional[bool] = None) -> Tuple[str, str]:
    """The ``(step_mode, precision)`` to run: the caller's values, with each ``'auto'`` resolved.

    ``records`` defaults to :data:`RECORDED_PARITY` (read at call time, so a
    test can replace the table); ``native_bf16`` to what the CPU reports
    (:func:`dip_fast.core.cpu_features.has_native_bf16`).

    Example::

        >>> choose("cpu", "eager", "fp32")  # nothing to resolve
        ('eager', 'fp32')
        >>> choose("cpu", native_bf16=False)  # no bf16 units: fp32, whatever the table says
        ('eager', 'fp32')
    """
    if step_mode != "auto" and precision != "auto":
        return step_mode, precision
    kind = torch.device(device).type
    pick = CUDA_BASELINE if kind == "cuda" else BASELINE
    if kind in ("cuda", "cpu"):
        if native_bf16 is None:
            native_bf16 = kind == "cpu" and cpu_features.has_native_bf16()
        candidates = [
            r for r in (RECORDED_PARITY if records is None else records)
            if r.has_parity and _runnable(r, kind, native_bf16)
            and step_mode in ("auto", r.step_mode) and precision in ("auto", r.precision)
        ]
        if candidates:
            best = min(candidates, key=lambda r: r.ms_per_step)
            pick = (best.step_mode, best.precision)
    return (pick[0] if step_mode == "auto" else step_mode, pick[1] if precision == "auto" else precision)
