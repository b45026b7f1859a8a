"""What ``step_mode='auto'`` and ``precision='auto'`` run, and the evidence behind it.

A faster step (the CUDA graph, TF32 or bf16) becomes the CUDA default only
once a GPU run has shown that it restores images as well as the eager fp32
step. That evidence lives in :data:`RECORDED_PARITY`, the one place the
choice is read from (:func:`choose`, used by ``restore`` and ``fit``):

* one :class:`ParityRecord` per step variant, copied from a GPU run of
  ``scripts/gpu_check.sh`` (its ``parity`` stage gives the paired PSNR
  difference to eager fp32 and its standard error; its ``steps`` stage the
  time per step at 512²);
* ``auto`` picks, among the records with parity (mean difference within
  :data:`PARITY_TOLERANCE_DB`), the one with the least time per step,
  restricted to the mode or precision the caller fixed, if any;
* without such a record, and on every device but CUDA, ``auto`` is eager
  fp32, as before any GPU run.

The table is empty: no GPU run has recorded parity yet (bench/README.md,
"The default CUDA step").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["BASELINE", "PARITY_TOLERANCE_DB", "RECORDED_PARITY", "ParityRecord", "choose"]

#: The step every variant is compared with, and what ``auto`` runs without evidence.
BASELINE = ("eager", "fp32")
#: Parity: the mean paired PSNR difference of the returned images to the baseline, in dB (issue 17).
PARITY_TOLERANCE_DB = 0.15


@dataclass(frozen=True)
class ParityRecord:
    """One step variant's recorded evidence from a GPU run.

    Attributes:
        step_mode: ``'eager'`` or ``'graph'``.
        precision: ``'fp32'``, ``'tf32'`` or ``'bf16'``.
        ms_per_step: median time per step at 512² (the steps stage of ``gpu_check.sh``).
        psnr_diff_db: mean paired PSNR difference of the returned images to eager fp32
            (same images and seeds; the parity stage's ``psnr_avg`` or ``psnr``).
        psnr_diff_se_db: its standard error.
        runs: the number of image and seed pairs.
        gpu: the card the run used.
        commit: the commit measured.
        source: the results file in ``bench/results/`` the numbers come from.
    """

    step_mode: str
    precision: str
    ms_per_step: float
    psnr_diff_db: float
    psnr_diff_se_db: float
    runs: int
    gpu: str
    commit: str
    source: str

    @property
    def has_parity(self) -> bool:
        return abs(self.psnr_diff_db) <= PARITY_TOLERANCE_DB


#: The recorded GPU evidence (see the module docstring). Empty until a GPU run records parity.
RECORDED_PARITY: Tuple[ParityRecord, ...] = ()


def choose(device: Union[str, torch.device], step_mode: str = "auto", precision: str = "auto",
           records: Optional[Sequence[ParityRecord]] = None) -> Tuple[str, str]:
    """The ``(step_mode, precision)`` to run: the caller's values, with each ``'auto'`` resolved.

    ``records`` defaults to :data:`RECORDED_PARITY` (read at call time, so a
    test can replace the table).
    """
    if step_mode != "auto" and precision != "auto":
        return step_mode, precision
    pick = BASELINE
    if torch.device(device).type == "cuda":
        candidates = [
            r for r in (RECORDED_PARITY if records is None else records)
            if r.has_parity and step_mode in ("auto", r.step_mode) and precision in ("auto", r.precision)
        ]
        if candidates:
            best = min(candidates, key=lambda r: r.ms_per_step)
            pick = (best.step_mode, best.precision)
    return (pick[0] if step_mode == "auto" else step_mode, pick[1] if precision == "auto" else precision)
