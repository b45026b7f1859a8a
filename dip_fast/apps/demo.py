"""The demo behind ``dip-fast demo`` (and ``make demo``): three restorations of one photo.

scikit-image's ``data.astronaut()`` (bundled, so no download) is degraded
three ways and restored with :func:`dip_fast.restore`:

* denoising of additive Gaussian noise, sigma = 25 (of 255), compared with
  scikit-image's non-local means at the known sigma (:func:`classical_denoise`);
* inpainting of a text overlay (a generated, text-like mask), compared with
  scikit-image's biharmonic inpainting;
* x4 super-resolution of a Lanczos-downscaled copy, compared with bicubic
  upsampling of the same low-resolution image.

For each task the output folder receives the degraded input, the restored
image and a side-by-side comparison, and a table of PSNR/SSIM
(``skimage.metrics``) and wall time is printed and saved as ``results.md``.

On a GPU the demo runs the paper's settings on the full 512x512 image.  On
a CPU it restores a 128x128 crop (the face) with the ``'fast'`` presets and
the step counts of :data:`CPU_ITERATIONS`, chosen so that every task clearly
beats its degraded input and all three finish in about five minutes on two cores
(README.md, "The demo").  Against the classical baselines (measured
2026-12-07 on the same inputs, seed 0): non-local means gives 27.83 dB on
the CPU crop and 29.27 dB on the full image, below DIP's 29.05 and 30.0 dB;
biharmonic inpainting fills the thin text strokes better than DIP (38.76
against 32.3 dB on the CPU crop, 33.28 against 32.9 dB on the full image);
super-resolution beats bicubic by 0.4 to 0.7 dB.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from .. import io
from ..api import restore
from ..tasks import degradations

__all__ = ["DemoRow", "CPU_CROP", "CPU_ITERATIONS", "classical_denoise", "classical_inpaint", "degrade_noise",
           "downscale", "run_demo", "text_mask"]

#: Rows and columns of the 128x128 crop restored on a CPU (the astronaut's face).
CPU_CROP: Tuple[slice, slice] = (slice(40, 168), slice(176, 304))
#: Steps per task on a CPU, with the 'fast' presets; None: restore()'s own (denoising: the preset's
#: 1500-step budget, which early stopping usually ends sooner). Measured on the face crop, seed 0:
#: denoising reached 28.9 dB, inpainting passed 30 dB after about 900 steps (32.0 at 1200), and
#: super-resolution passed bicubic + 0.3 dB after about 2000 steps (+0.7 dB at 3000).
CPU_ITERATIONS: Dict[str, Optional[int]] = {"denoise": None, "inpaint": 1200, "super_resolution": 3000}
NOISE_SIGMA = 25.0
SR_SCALE = 4


@dataclass
class DemoRow:
    """One task's result: PSNR (dB) and SSIM of the degraded input and of the restoration."""

    task: str
    degraded_psnr: float
    degraded_ssim: float
    restored_psnr: float
    restored_ssim: float
    seconds: float
    steps: int
    baseline: str = ""
    baseline_psnr: Optional[float] = None
    baseline_ssim: Optional[float] = None


# --------------------------------------------------------------------------
# Degradations
# --------------------------------------------------------------------------


#: The demo's degradations are the shared ones (sigma in 0-255 units), under the names it has always exported.
degrade_noise = degradations.add_gaussian_noise_array
text_mask = degradations.text_mask
downscale = degradations.downscale_array
bicubic = degradations.bicubic_array

_to_uint8 = degradations.to_uint8


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _metrics(image: np.ndarray, reference: np.ndarray) -> Tuple[float, float]:
    p = peak_signal_noise_ratio(reference, image, data_range=1.0)
    s = structural_similarity(reference, image, data_range=1.0, channel_axis=-1)
    return float(p), float(s)


def _save_png(image: np.ndarray, path: Path) -> None:
    io.save_image(Image.fromarray(_to_uint8(image)), path, overwrite=True)


def _save_comparison(panels: Sequence[Tuple[str, np.ndarray]], path: Path, title: str) -> None:
    """Side-by-side figure (matplotlib, Agg), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (label, img) in zip(axes[0], panels):
        ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    io.save_figure(fig, path, dpi=110)


def _line(r: DemoRow) -> str:
    base = f", {r.baseline} {r.baseline_psnr:.2f} dB" if r.baseline_psnr is not None else ""
    return f"  {r.task}: degraded {r.degraded_psnr:.2f} dB{base}, restored {r.restored_psnr:.2f} dB ({r.seconds:.0f} s)"


def format_table(rows: Sequence[DemoRow], setting: str) -> str:
    """The results as a Markdown table."""
    lines = [
        f"Setting: {setting}",
        "",
        "| task | degraded PSNR / SSIM | baseline PSNR / SSIM | restored PSNR / SSIM | steps | time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        base = f"{r.baseline}: {r.baseline_psnr:.2f} dB / {r.baseline_ssim:.3f}" if r.baseline_psnr is not None else "-"
        lines.append(
            f"| {r.task} | {r.degraded_psnr:.2f} dB / {r.degraded_ssim:.3f} | {base} | "
            f"{r.restored_psnr:.2f} dB / {r.restored_ssim:.3f} | {r.steps} | {r.seconds:.0f} s |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------


def run_demo(
    out_dir: os.PathLike | str = "out",
    *,
    device: Optional[str] = None,
    preset: Optional[str] = None,
    full_size: Optional[bool] = None,
    backend: str = "auto",
    seed: int = 0,
    num_threads: Optional[int] = None,
    progress: bool = True,
    echo: Any = print,
) -> List[DemoRow]:
    """Degrade and restore the astronaut three ways; write images, figures and ``results.md`` to ``out_dir``.

    Args:
        out_dir: output folder (created if missing).
        device: default CUDA if available, else CPU.
        preset: default ``'paper'`` on a GPU, ``'fast'`` (with the demo's
            shortened step counts) on the CPU.
        full_size: restore the whole 512x512 image (default: on a GPU only).
        backend: ``'auto'`` (the fastest on this device), ``'fast'`` or ``'reference'``.
        seed: seed of the degradations and of the runs.
        num_threads: CPU threads (default: torch's, but 1 when the machine is
            busy: see :func:`cpu_threads`).
        progress: show progress bars.
        echo: where to print the setting and the table.

    Returns:
        One :class:`DemoRow` per task.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = dev.type == "cuda"
    full = on_gpu if full_size is None else full_size
    level = preset or ("paper" if on_gpu else "fast")
    # The shortened CPU step counts belong to the CPU setting; elsewhere the preset decides.
    cpu_budget = not on_gpu and preset is None

    gt = data.astronaut().astype(np.float32) / 255.0
    if not full:
        gt = np.ascontiguousarray(gt[CPU_CROP])
    h, w = gt.shape[:2]
    setting = (
        f"{h}x{w} {'image' if full else 'crop (the face)'}, preset '{level}'"
        f"{' with the demo step counts ' + _budget_text() if cpu_budget else ''}, "
        f"device {dev}, backend '{backend}'"
    )
    echo(f"dip-fast demo: {setting}")
    if cpu_budget:
        echo("(CPU: a crop and the cheaper presets, so that the three tasks take about 5 minutes on 2 cores; "
             "on a GPU the demo runs the paper's settings on the full image)")

    if not on_gpu and num_threads is None:
        busy = busy_cores()
        num_threads = cpu_threads(busy)
        echo(f"(CPU threads: {num_threads}; {busy:.1f} of {os.cpu_count()} cores busy with other work)")
    common = dict(preset=level, device=str(dev), backend=backend, seed=seed, progress=progress, return_info=True,
                  num_threads=num_threads)
    rows: List[DemoRow] = []

    iterations = CPU_ITERATIONS if cpu_budget else {}
    for case in _cases(gt, seed):
        rows.append(_run_case(case, out, echo, iterations=iterations.get(case.task), **common))

    table = format_table(rows, setting)
    total = sum(r.seconds for r in rows)
    echo("")
    echo(table)
    echo(f"\nTotal restoration time: {total:.0f} s. Images and comparisons are in {out}/")
    with io.atomic_path(out / "results.md") as tmp:
        tmp.write_text(table + f"\n\nTotal restoration time: {total:.0f} s\n")
    return rows


@dataclass
class _Case:
    """One of the demo's restorations: what to degrade, how to restore it, what to write."""

    key: str  # prefix of the files written
    task: str  # restore()'s task
    label: str  # its row in the table
    title: str  # its comparison figure's title
    degraded: np.ndarray  # restore()'s input
    gt: np.ndarray  # the clean image of the result's size
    degraded_label: str  # the input's panel in the figure
    inputs: Dict[str, Any] = field(default_factory=dict)  # restore()'s task inputs
    shown: Optional[np.ndarray] = None  # the input as measured and shown, when it differs from `degraded`
    baseline: Optional[Tuple[str, np.ndarray]] = None  # a classical method's result, for comparison
    files: Dict[str, np.ndarray] = field(default_factory=dict)  # more images to write, by file name


def classical_denoise(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """scikit-image's non-local means of an ``H x W x 3`` image in [0, 1] at the known ``sigma`` (0-255 units).

    The settings of scikit-image's gallery example for the fast algorithm with a known sigma (5x5 patches
    searched within 6 pixels, ``h = 0.6 sigma``).
    """
    from skimage.restoration import denoise_nl_means

    s = sigma / 255.0
    return denoise_nl_means(noisy, h=0.6 * s, sigma=s, fast_mode=True, patch_size=5, patch_distance=6,
                            channel_axis=-1).astype(np.float32).clip(0, 1)


def classical_inpaint(image: np.ndarray, known: np.ndarray) -> np.ndarray:
    """scikit-image's biharmonic inpainting of the pixels where ``known`` is False (``H x W x 3`` in [0, 1])."""
    from skimage.restoration import inpaint_biharmonic

    return inpaint_biharmonic(image, ~known, channel_axis=-1).astype(np.float32).clip(0, 1)


def _cases(gt: np.ndarray, seed: int) -> List[_Case]:
    """Denoising (sigma = 25) against non-local means, inpainting of a text overlay against biharmonic
    inpainting, and x4 super-resolution against bicubic."""
    h, w = gt.shape[:2]
    noisy = degrade_noise(gt, NOISE_SIGMA, seed)
    known = text_mask(h, w)
    nlm = classical_denoise(noisy, NOISE_SIGMA)
    biharmonic = classical_inpaint(gt * known[:, :, None], known)
    low = downscale(gt, SR_SCALE)
    up = bicubic(low, SR_SCALE)
    return [
        _Case("denoise", "denoise", "denoise (sigma=25)", "Denoising, sigma = 25", noisy, gt, "noisy",
              inputs=dict(sigma=NOISE_SIGMA), baseline=("non-local means", nlm), files={"denoise_nlm.png": nlm}),
        _Case("inpaint", "inpaint", "inpaint (text)", "Inpainting of a text overlay", gt * known[:, :, None], gt,
              "masked", inputs=dict(mask=known), baseline=("biharmonic", biharmonic),
              files={"inpaint_mask.png": known.astype(np.float32)[:, :, None].repeat(3, axis=2),
                     "inpaint_biharmonic.png": biharmonic}),
        # The low-resolution input is measured and shown after nearest-neighbour enlargement;
        # bicubic upsampling of the same image is the real baseline.
        _Case("sr", "super_resolution", f"super-resolution x{SR_SCALE}", f"Super-resolution x{SR_SCALE}", low,
              gt[: low.shape[0] * SR_SCALE, : low.shape[1] * SR_SCALE], f"input x{SR_SCALE} (nearest)",
              inputs=dict(scale=SR_SCALE), shown=np.kron(low, np.ones((SR_SCALE, SR_SCALE, 1), dtype=np.float32)),
              baseline=("bicubic", up), files={"sr_bicubic.png": up}),
    ]


def _run_case(case: _Case, out: Path, echo: Any, **restore_kwargs: Any) -> DemoRow:
    """Restore one case, print its row, and write its input, output, extra images and comparison."""
    t = time.perf_counter()
    restored, info = restore(case.degraded, case.task, ground_truth=case.gt, **case.inputs, **restore_kwargs)
    shown = case.degraded if case.shown is None else case.shown
    row = _row(case.label, shown, restored, case.gt, time.perf_counter() - t, info.steps)
    panels = [("ground truth", case.gt), (f"{case.degraded_label} {row.degraded_psnr:.2f} dB", shown)]
    if case.baseline is not None:
        row.baseline, (row.baseline_psnr, row.baseline_ssim) = case.baseline[0], _metrics(case.baseline[1], case.gt)
        panels.append((f"{row.baseline} {row.baseline_psnr:.2f} dB", case.baseline[1]))
    panels.append((f"restored {row.restored_psnr:.2f} dB", restored))
    echo(_line(row))
    _save_png(case.degraded, out / f"{case.key}_input.png")
    _save_png(restored, out / f"{case.key}_output.png")
    for name, image in case.files.items():
        _save_png(image, out / name)
    _save_comparison(panels, out / f"{case.key}_comparison.png", case.title)
    return row


def _budget_text() -> str:
    return ", ".join(f"{task} {n if n is not None else 'default'}" for task, n in CPU_ITERATIONS.items())


def busy_cores(window: float = 0.3) -> float:
    """How many cores other processes keep busy now.

    Read from two samples of ``/proc/stat`` ``window`` seconds apart (Linux),
    not from the load average: that is a one-minute mean, still high for a
    minute after ``make setup``'s compile, which would make the demo that
    follows it run on one thread.  Elsewhere, the load average.
    """
    def sample() -> Optional[Tuple[int, int]]:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    first = sample()
    if first is not None:
        time.sleep(window)
        second = sample()
        if second is not None:
            total, idle = second[0] - first[0], second[1] - first[1]
            return (os.cpu_count() or 1) * (total - idle) / total if total > 0 else 0.0
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return 0.0


def cpu_threads(busy: Optional[float] = None) -> int:
    """torch's thread count, or 1 when other processes already keep half the cores busy.

    Measured on 2 shared cores: with the load average above 4, two intra-op
    threads made a step 8x slower than one thread (each thread waits for the
    other at every barrier), while on idle cores two threads are faster
    (the demo: 295 s of restoration with 2 threads, 457 s with 1).
    """
    if busy is None:
        busy = busy_cores()
    return 1 if busy >= 0.5 * (os.cpu_count() or 1) else torch.get_num_threads()


def _row(task: str, degraded: np.ndarray, restored: np.ndarray, gt: np.ndarray, seconds: float, steps: int) -> DemoRow:
    dp, ds = _metrics(degraded, gt)
    rp, rs = _metrics(restored, gt)
    return DemoRow(task, dp, ds, rp, rs, seconds, steps)
