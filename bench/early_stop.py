#!/usr/bin/env python
"""Record DIP trajectories on photographs, then judge stopping rules on them offline.

One run per (crop, degradation) for the preset's fixed step count serves
every stopping rule: per step it logs what a rule may look at (the windowed
variance of the outputs, the data-term residual ``||y - A x_hat||^2 / N`` of
each candidate estimate) and, for scoring only, the PSNR of those estimates
against the clean image.  :mod:`dip_fast.core.early_stop`'s rule is then replayed
on the logged prefix (``bench/es_replay.py``), so trying a rule costs
nothing.

Candidate estimates logged per step ``t``:

* ``avg``: the exponential average (what a fixed-count run returns);
* ``win<W>``: the mean of the last ``W`` raw outputs, for ``W`` in
  :data:`WINDOWS` (ES-WMV's variance is the spread of that same window).

For denoising, the clip-aware rule's threshold is logged too: per step, the
mean over the pixels of the expected residual under clipping evaluated at
the average (``clip_res_avg``, :func:`dip_fast.core.early_stop.expected_clipped_residual`)
and of the clipped observation's variance at the true value whose clipped
mean is the average (``clip_var_avg``) and the expected residual at that
value (``clip_inv_avg``), each at the noise levels
``clip_sigmas`` (the true sigma times :data:`CLIP_SIGMA_FACTORS`), so that a
replay can interpolate them at any estimate of sigma in that range.

Degradations (``--task``): ``denoise`` (clipped Gaussian noise, ``--sigmas``),
``jpeg`` (PIL JPEG at ``--jpeg-quality``) and ``deblur`` (Gaussian blur
``--blur`` plus Gaussian noise ``--blur-noise``).  Settings follow
``restore(preset='auto')`` on a CPU: the ``*_fast`` presets, and for
denoising the input perturbation that ``restore`` derives from sigma.
The noise level a rule may use is the one ``restore`` would estimate from
the observation (``sigma_est``); the true one is logged beside it.

Crops: the centre ``--crop`` square of each image (images smaller than the
crop are skipped).  Each image belongs to the tuning or the validation split
by a hash of its file name (:func:`split_of`), fixed before any result was
seen.

    python bench/early_stop.py --task denoise --sigmas 25 --crop 128 --out bench/results/es-traj-x.json.gz IMAGES...
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io as _io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (image loading, crops, environment record)

from dip_fast import tasks  # noqa: E402
from dip_fast.tasks import degradations  # noqa: E402
from dip_fast.pipeline.job import estimate_sigma as _estimate_sigma, reg_noise_for_sigma  # noqa: E402
from dip_fast.core.fit import StepInfo, fit  # noqa: E402
from dip_fast.core.early_stop import clipped_noise_moments, expected_clipped_residual  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def read_trajectories(path: Path) -> Dict[str, Any]:
    """A trajectory file, gzip-compressed when its name ends in .gz (per-step logs are large)."""
    data = path.read_bytes()
    return json.loads(gzip.decompress(data) if path.suffix == ".gz" else data)


def write_trajectories(path: Path, result: Dict[str, Any]) -> None:
    text = (json.dumps(result) + "\n").encode()
    path.write_bytes(gzip.compress(text, mtime=0) if path.suffix == ".gz" else text)
#: Window lengths whose mean and variance are logged.
WINDOWS = (50, 100, 200)
#: Noise levels (multiples of the true one) at which the clip-aware thresholds are logged per step.
CLIP_SIGMA_FACTORS = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1)


class ClipThresholds:
    """Per step: the mean expected residual under clipping at an estimate, at several noise levels (0-255).

    ``residual``: ``E[(clip(x + n) - x)^2]`` at ``x`` = the estimate;
    ``variance``: ``Var[clip(x' + n)]`` at the ``x'`` in [0, 1] whose clipped
    mean ``E[clip(x' + n)]`` is the estimate (the residual left by an estimate
    that found the clipped observation's mean), read off a fine table;
    ``inverse``: ``E[(clip(x' + n) - x')^2]`` at that ``x'`` (the expected
    residual of the true image, read from the estimate as the clipped mean).
    """

    def __init__(self, sigmas: Sequence[float]) -> None:
        self.sigmas = [float(s) for s in sigmas]
        grid = torch.linspace(0.0, 1.0, 4097, dtype=torch.float64)
        self.tables = []
        for s in self.sigmas:
            m, m2 = clipped_noise_moments(grid, s / 255.0)
            self.tables.append(((grid + m).contiguous(), (m2 - m * m).contiguous(), m2.contiguous()))

    def __call__(self, x: torch.Tensor) -> Tuple[List[float], List[float], List[float]]:
        x = x.detach().double().reshape(-1).clamp(0.0, 1.0)
        res, var, inv = [], [], []
        for s, (mean_y, var_y, res_y) in zip(self.sigmas, self.tables):
            res.append(float(expected_clipped_residual(x, s / 255.0).mean()))
            i = torch.searchsorted(mean_y, x).clamp(1, mean_y.numel() - 1)
            lo, hi = mean_y[i - 1], mean_y[i]
            w = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
            var.append(float((var_y[i - 1] + w * (var_y[i] - var_y[i - 1])).mean()))
            inv.append(float((res_y[i - 1] + w * (res_y[i] - res_y[i - 1])).mean()))
        return res, var, inv


#: Share of images held out for validation (by name hash).
VALIDATION_SHARE = 1 / 3


def split_of(name: str) -> str:
    """``'validation'`` or ``'tuning'``: a fixed function of the file name, independent of any result."""
    h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16**8
    return "validation" if h < VALIDATION_SHARE else "tuning"


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().square().mean())


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    m = _mse(a.clamp(0, 1), b)
    return float("inf") if m == 0 else -10.0 * math.log10(m)


def degrade(gt: torch.Tensor, args: argparse.Namespace, sigma: float, seed: int) -> torch.Tensor:
    """The observation for a clean ``(1, 3, H, W)`` crop (sigma in 0-255 units; denoise and deblur)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    if args.task == "denoise":
        return degradations.add_gaussian_noise(gt, sigma, generator=gen)
    if args.task == "jpeg":
        img = Image.fromarray((gt[0].permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8))
        buf = _io.BytesIO()
        img.save(buf, format="JPEG", quality=args.jpeg_quality)
        return quality.to_tensor(Image.open(buf).convert("RGB"))
    blurred = tasks.blur(gt, tasks.make_blur_kernel(args.blur, "blur"))
    return degradations.add_gaussian_noise(blurred, args.blur_noise, generator=gen)


def load_case(path: Path, crop: int, how: argparse.Namespace, sigma: Optional[float],
              seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The clean centre crop of an image and its seeded observation (``how``: the degradation's settings)."""
    gt = quality.to_tensor(quality.prepare_gt(quality.load_rgb(path), crop))
    return gt, degrade(gt, how, sigma or 0.0, seed)


def observation_of(run: Dict[str, Any], image_dirs: Sequence[Path]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The clean crop and the observation of a recorded run, rebuilt from its image (found in ``image_dirs``).

    Degradations are seeded, so this is the run's own observation; the logged input PSNR checks it.
    """
    path = next((d / run["image"] for d in image_dirs if (d / run["image"]).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{run['image']} is in none of {[str(d) for d in image_dirs]}")
    how = argparse.Namespace(task=run["task"], jpeg_quality=run.get("jpeg_quality", 10),
                             blur=run.get("blur", "gaussian:2"), blur_noise=run.get("blur_noise", 5.0))
    gt, obs = load_case(path, run["crop"], how, run["sigma"], run["seed"])
    if abs(_psnr(obs, gt) - run["input_psnr"]) > 1e-3:
        raise ValueError(f"{run['image']}: the rebuilt observation is not the recorded one "
                         f"(input PSNR {_psnr(obs, gt):.4f} against {run['input_psnr']:.4f})")
    return gt, obs


class Recorder:
    """Fit callback: logs per step the variance, residuals and PSNRs of the candidate estimates."""

    def __init__(self, observation: torch.Tensor, gt: torch.Tensor, forward_model,
                 clip: Optional[ClipThresholds] = None) -> None:
        self.y, self.gt, self.A, self.clip = observation, gt, forward_model, clip
        self.ring: Optional[torch.Tensor] = None
        self.sums: Dict[int, torch.Tensor] = {}
        self.sq: Dict[int, float] = {}
        self.log: Dict[str, List[Optional[float]]] = {"elapsed": [], "res_raw": [], "psnr_raw": [],
                                                      "res_avg": [], "psnr_avg": []}
        if clip is not None:
            self.log.update(clip_res_avg=[], clip_var_avg=[], clip_inv_avg=[])
        for w in WINDOWS:
            for k in ("var", "res", "psnr"):
                self.log[f"{k}_win{w}"] = []
        self.t = 0

    @torch.no_grad()
    def __call__(self, s: StepInfo) -> None:
        x = s.out.detach().double()
        if self.ring is None:
            self.ring = torch.zeros((max(WINDOWS),) + tuple(x.shape), dtype=torch.float64)
            self.sums = {w: torch.zeros_like(x) for w in WINDOWS}
            self.sq = {w: 0.0 for w in WINDOWS}
        n_max = self.ring.shape[0]
        xsq = float(x.square().sum())
        for w in WINDOWS:
            # Drop the output that leaves this window (t - w), add the new one.
            if self.t >= w:
                old = self.ring[(self.t - w) % n_max]
                self.sums[w] -= old
                self.sq[w] -= float(old.square().sum())
            self.sums[w] += x
            self.sq[w] += xsq
        self.ring[self.t % n_max] = x
        self.t += 1
        lg = self.log
        lg["elapsed"].append(s.elapsed)
        lg["res_raw"].append(_mse(self.A(s.out), self.y))
        lg["psnr_raw"].append(_psnr(s.out, self.gt))
        avg = s.out_avg if s.out_avg is not None else s.out
        lg["res_avg"].append(_mse(self.A(avg), self.y))
        lg["psnr_avg"].append(_psnr(avg, self.gt))
        if self.clip is not None:
            res, var, inv = self.clip(self.A(avg))
            lg["clip_res_avg"].append(res)
            lg["clip_var_avg"].append(var)
            lg["clip_inv_avg"].append(inv)
        for w in WINDOWS:
            if self.t < w:
                for k in ("var", "res", "psnr"):
                    lg[f"{k}_win{w}"].append(None)
                continue
            mean = self.sums[w] / w
            spread = max(self.sq[w] - float(self.sums[w].square().sum()) / w, 0.0)
            lg[f"var_win{w}"].append(spread / (w * x.numel()))
            m32 = mean.float()
            lg[f"res_win{w}"].append(_mse(self.A(m32), self.y))
            lg[f"psnr_win{w}"].append(_psnr(m32, self.gt))


def run_case(path: Path, args: argparse.Namespace, sigma: Optional[float], seed: int) -> Dict[str, Any]:
    """One fixed-count run of one crop and degradation, with its per-step log."""
    gt, obs = load_case(path, args.crop, args, sigma, seed)
    preset = tasks.get_preset(args.preset)
    if args.task == "denoise":
        preset = preset.with_overrides(reg_noise_std=reg_noise_for_sigma(sigma))
    if args.lr is not None:
        preset = preset.with_overrides(lr=args.lr)
    kernel = tasks.make_blur_kernel(args.blur, "blur") if args.task == "deblur" else None
    term = tasks.make_data_term(preset, obs, blur_kernel=kernel)
    forward_model = term.degrade if args.task == "deblur" else (lambda x: x)
    clip = ClipThresholds([sigma * f for f in CLIP_SIGMA_FACTORS]) if args.task == "denoise" else None
    rec = Recorder(obs, gt, forward_model, clip)
    torch.manual_seed(seed)
    net = tasks.build_network(preset, 3, backend=quality.backend_factory(args.backend, True))
    gen = torch.Generator().manual_seed(seed)
    z = tasks.make_input(preset, (gt.shape[2], gt.shape[3]), generator=gen)
    kwargs = dict(preset.fit_kwargs())
    kwargs.update(term.fit_kwargs())
    preset_iterations = int(kwargs["iterations"])
    if args.iterations:
        kwargs["iterations"] = args.iterations
    t0 = time.process_time()
    result = fit(net, z, term, generator=gen, callback=rec, **kwargs)
    cpu_s = time.process_time() - t0
    sigma_est = _estimate_sigma(obs)
    return {
        "image": path.name, "split": split_of(path.name), "task": args.task, "crop": args.crop, "seed": seed,
        "sigma": sigma, "sigma_est": sigma_est,
        **({"clip_sigmas": clip.sigmas, "clipped_share": float(((obs <= 0) | (obs >= 1)).double().mean())}
           if clip is not None else {}), "preset": preset.name, "lr": preset.lr, "backend": args.backend,
        "iterations": kwargs["iterations"], "preset_iterations": preset_iterations,
        "input_psnr": _psnr(obs, gt), "input_mse": _mse(obs, gt),
        # What stop="never" returns: the average after the preset's count, read from the log when the
        # run went on past it (the fit has no schedule that depends on the total, so the prefix is that run).
        "fixed_psnr": (_psnr(result.output_avg if result.output_avg is not None else result.output, gt)
                       if kwargs["iterations"] <= preset_iterations else rec.log["psnr_avg"][preset_iterations - 1]),
        "cpu_s": cpu_s, "backtrack_steps": list(result.backtrack_steps), "log": rec.log,
        **({"jpeg_quality": args.jpeg_quality} if args.task == "jpeg" else {}),
        **({"blur": args.blur, "blur_noise": args.blur_noise} if args.task == "deblur" else {}),
    }


def _rounded(obj: Any) -> Any:
    """Floats to 6 significant digits: halves the trajectory files, far below any difference that matters."""
    if isinstance(obj, float):
        return float(f"{obj:.6g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="clean images or folders")
    p.add_argument("--task", choices=("denoise", "jpeg", "deblur"), default="denoise")
    p.add_argument("--preset", default=None, help="default: the task's 'fast' preset (restore's CPU default)")
    p.add_argument("--sigmas", type=float, nargs="+", default=[25.0], help="denoise: noise levels, 0-255")
    p.add_argument("--jpeg-quality", type=int, default=10)
    p.add_argument("--blur", default="gaussian:2", help="deblur: the kernel")
    p.add_argument("--blur-noise", type=float, default=5.0, help="deblur: Gaussian noise after the blur, 0-255")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--iterations", type=int, default=None,
                   help="default: the preset's; more records what continuing past it would give")
    p.add_argument("--lr", type=float, default=None, help="default: the preset's learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=quality.BACKENDS, default="fast")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="JSON file; runs are appended to it")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.preset = args.preset or tasks.preset_for(args.task, "fast").name
    images = quality.list_images(args.paths)
    result: Dict[str, Any] = {"schema": "dip_fast-bench-es-trajectories/1", "runs": []}
    if args.out.exists():
        result = read_trajectories(args.out)
    result.update(environment=quality.environment(torch.device("cpu")),
                  command=quality.command_line("bench/early_stop.py", argv))
    done = {(r["image"], r["crop"], r["sigma"], r["task"]) for r in result["runs"]}
    for path in images:
        w, h = Image.open(path).size
        if min(w, h) < args.crop:
            continue
        for sigma in (args.sigmas if args.task == "denoise" else [None]):
            if (path.name, args.crop, sigma, args.task) in done:
                continue
            rec = run_case(path, args, sigma, args.seed)
            result["runs"].append(rec)
            peak = max(rec["log"]["psnr_avg"])
            print(f"{path.name} {args.task} sigma={sigma} [{rec['split']}]: input {rec['input_psnr']:.2f}, "
                  f"fixed {rec['fixed_psnr']:.2f}, peak {peak:.2f} at {rec['log']['psnr_avg'].index(peak)}, "
                  f"{rec['cpu_s']:.0f} s", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_trajectories(args.out, _rounded(result))  # a cut-off run keeps what it measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
