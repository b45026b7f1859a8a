#!/usr/bin/env python
"""Restoration quality of the fast backend against the reference, same seeds.

For every image of a folder (or the files given) and every seed, both
backends run the same preset from the same initial weights, the same input
``z``, the same noise draws and the same degraded observation; the table
gives PSNR and SSIM against the ground truth, as mean +- standard deviation
over the runs, the per-run spread, and the paired difference fast - reference.
The fused network computes the same function as the reference up to float
rounding, but DIP's optimisation amplifies rounding into a different
trajectory, so single runs differ; over several seeds the means should agree
within their spread.

Protocols:

* ``denoise`` (preset ``denoise_f16_sigma25`` by default): the image is
  centre-cropped to a multiple of 32 (the notebook's ``crop_image``), then to
  ``--crop``; Gaussian noise of ``--sigma``/255 is added and clipped (seeded);
  PSNR/SSIM on RGB in [0, 1] for the final output and the exponentially
  averaged output (the notebook shows both).
* ``sr`` (preset ``sr_x4`` or ``sr_x8``): HR is centre-cropped to a multiple
  of 32 (then to ``--crop``, also a multiple of 32); LR is made with PIL's
  antialiased resize, ``Image.LANCZOS`` (the paper's code called it
  ``Image.ANTIALIAS``, an alias of LANCZOS in the Pillow of the time); the
  bicubic baseline upsamples LR with ``Image.BICUBIC`` as the paper's
  ``get_baselines`` did. PSNR/SSIM on the luma channel Y of ITU-R BT.601
  (``16 + 65.481 R + 128.553 G + 24.966 B`` for RGB in [0, 1], data range
  255) with a border of ``--border`` pixels (default: the scale factor, 4 for
  x4) removed, the usual super-resolution benchmark protocol.

Examples::

    python bench/quality.py --task denoise --crop 64 --iterations 300 --seeds 3 ../shared/data/dip/denoising/F16_GT.png
    python bench/quality.py --task sr --factor 4 --crop 128 --iterations 500 ../shared/data/Set5
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}



from dip_fast import _ops, tasks  # noqa: E402
from dip_fast.core import nets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import rerun_if_extension_stale  # noqa: E402

BACKENDS = ("fast", "reference")


# ---------------------------------------------------------------------------
# Images and metrics
# ---------------------------------------------------------------------------


#: A path argument naming scikit-image's 512x512 astronaut, for machines without the shared images.
ASTRONAUT = Path("astronaut")


def list_images(paths: Sequence[Path]) -> List[Path]:
    """Image files among ``paths`` (folders are listed, sorted, not recursively; ``astronaut`` is built in)."""
    found: List[Path] = []
    for p in paths:
        if p == ASTRONAUT and not p.exists():
            found.append(p)
        elif p.is_dir():
            found += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(p)
    return found


def load_rgb(path: Path) -> Image.Image:
    """The image as 8-bit RGB (grayscale images are replicated to three channels)."""
    if path == ASTRONAUT and not path.exists():
        from skimage import data

        return Image.fromarray(data.astronaut())
    return Image.open(path).convert("RGB")


def center_crop_pil(img: Image.Image, w: int, h: int) -> Image.Image:
    """Centre crop to ``w`` x ``h`` (offsets rounded down, as the notebooks' ``crop_image``)."""
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return img.crop((left, top, left + w, top + h))


def prepare_gt(img: Image.Image, crop: Optional[int], multiple: int = 32) -> Image.Image:
    """Crop to a multiple of ``multiple``, then centre-crop to ``crop`` (rounded down to the multiple)."""
    w, h = img.width - img.width % multiple, img.height - img.height % multiple
    img = center_crop_pil(img, w, h)
    if crop:
        c = max(multiple, crop - crop % multiple)
        img = center_crop_pil(img, min(c, img.width), min(c, img.height))
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """``(1, 3, H, W)`` float32 in [0, 1]."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """``(H, W, 3)`` float64 in [0, 1] from a ``(1, 3, H, W)`` tensor."""
    return x.detach().double().cpu().clamp(0, 1)[0].permute(1, 2, 0).numpy()


def rgb_to_y(a: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma in [16, 235] for RGB in [0, 1] (MATLAB's rgb2ycbcr)."""
    return 16.0 + a @ np.array([65.481, 128.553, 24.966])


def psnr_np(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def metrics(out: np.ndarray, gt: np.ndarray, task: str, border: int) -> Dict[str, float]:
    """PSNR and SSIM by the task's protocol (see the module docstring)."""
    from skimage.metrics import structural_similarity

    if task == "sr":
        yo, yg = rgb_to_y(out), rgb_to_y(gt)
        if border:
            yo, yg = yo[border:-border, border:-border], yg[border:-border, border:-border]
        return {"psnr": psnr_np(yo, yg, 255.0), "ssim": float(structural_similarity(yo, yg, data_range=255.0))}
    return {
        "psnr": psnr_np(out, gt, 1.0),
        "ssim": float(structural_similarity(out, gt, data_range=1.0, channel_axis=-1)),
    }


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------


def backend_factory(name: str, channels_last: bool):
    """``skip``-compatible builder for a backend name."""
    if name == "reference":
        return None  # tasks.build_network's default: the reference skip()
    if name == "fast":
        if not _ops.has_ops("bn_act", "_bn_act_backward"):
            raise RuntimeError(f"the fast backend needs the compiled ops ({_ops.LOAD_ERROR or 'stale build'})")
        return partial(nets.skip, channels_last=channels_last)
    raise ValueError(f"unknown backend {name!r}")


def make_case(path: Path, args: argparse.Namespace, seed: int) -> Dict[str, Any]:
    """Ground truth, observation and baseline for one image and seed."""
    img = load_rgb(path)
    gt_img = prepare_gt(img, args.crop)
    gt = to_tensor(gt_img)
    case: Dict[str, Any] = {"image": path.name, "size": [gt_img.height, gt_img.width], "gt": gt}
    if args.task == "denoise":
        gen = torch.Generator().manual_seed(10_000 + seed)
        case["observation"] = tasks.degradations.add_gaussian_noise(gt, args.sigma, generator=gen)
        case["baseline"] = {"name": "noisy", **metrics(to_numpy(case["observation"]), to_numpy(gt), "denoise", 0)}
        case["classical"] = classical_denoisers(to_numpy(case["observation"]), to_numpy(gt), args.sigma)
    else:
        f = args.factor
        lr_img = gt_img.resize((gt_img.width // f, gt_img.height // f), Image.LANCZOS)
        bicubic = lr_img.resize(gt_img.size, Image.BICUBIC)
        case["observation"] = to_tensor(lr_img)
        case["baseline"] = {"name": "bicubic", **metrics(to_numpy(to_tensor(bicubic)), to_numpy(gt), "sr", args.border)}
    return case


def classical_denoisers(noisy: np.ndarray, gt: np.ndarray, sigma: float) -> List[Dict[str, Any]]:
    """The classical denoisers a user would pick instead of DIP, at the known sigma: scikit-image's non-local
    means (the demo's settings, :func:`dip_fast.apps.demo.classical_denoise`) and, when the ``bm3d`` package is
    installed (optional, for this benchmark only: its licence is not the project's), BM3D."""
    from dip_fast.apps.demo import classical_denoise

    found = []
    t0 = time.perf_counter()
    nlm = classical_denoise(noisy, sigma)
    found.append({"name": "non-local means", "wall_s": time.perf_counter() - t0, **metrics(nlm, gt, "denoise", 0)})
    try:
        import bm3d
    except ImportError:
        return found
    t0 = time.perf_counter()
    out = np.clip(bm3d.bm3d_rgb(noisy, sigma / 255.0), 0, 1).astype(np.float32)
    found.append({"name": "BM3D", "wall_s": time.perf_counter() - t0, **metrics(out, gt, "denoise", 0)})
    return found


def _restore(case: Dict[str, Any], backend: str, seed: int, args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """One run through the public ``dip_fast.restore()`` (what a user calls), output as ``(1, 3, H, W)``."""
    import dip_fast

    obs = case["observation"][0].permute(1, 2, 0).numpy()  # HxWx3 float32 in [0, 1]
    kwargs: Dict[str, Any] = {"sigma": args.sigma} if args.task == "denoise" else {"scale": args.factor}
    out = dip_fast.restore(
        obs,
        task="denoise" if args.task == "denoise" else "super_resolution",
        iterations=args.iterations,
        preset=args.preset,
        seed=seed,
        device=str(device),
        backend=backend,
        **kwargs,
    )
    a = np.asarray(out)
    a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(a[..., :3])).permute(2, 0, 1)[None]


def run_one(case: Dict[str, Any], backend: str, seed: int, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """One restoration; returns its metrics and wall time."""
    gt_np = to_numpy(case["gt"])
    if args.via == "restore":
        t0 = time.perf_counter()
        out = _restore(case, backend, seed, args, device)
        wall = time.perf_counter() - t0
        return {
            "image": case["image"],
            "seed": seed,
            "backend": backend,
            "wall_s": wall,
            "steps": args.iterations,
            **metrics(to_numpy(out), gt_np, args.task, args.border),
        }
    preset = tasks.get_preset(args.preset)
    obs = case["observation"].to(device)
    gt = case["gt"].to(device)
    torch.manual_seed(seed)  # the network's initial weights: identical for both backends
    gen = torch.Generator(device=device).manual_seed(seed)  # z and its perturbations
    t0 = time.perf_counter()
    result, _ = tasks.solve(
        preset,
        obs,
        reference=gt,
        backend=backend_factory(backend, args.channels_last),
        generator=gen,
        iterations=args.iterations,
        precision=args.precision,
        step_mode=args.step_mode,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    rec: Dict[str, Any] = {
        "image": case["image"],
        "seed": seed,
        "backend": backend,
        "wall_s": wall,
        "steps": result.steps,
        "backtracks": len(result.backtrack_steps),
        **metrics(to_numpy(result.output), gt_np, args.task, args.border),
    }
    if result.output_avg is not None:
        m = metrics(to_numpy(result.output_avg), gt_np, args.task, args.border)
        rec.update(psnr_avg=m["psnr"], ssim_avg=m["ssim"])
    return rec


def _portable(path: str) -> str:
    """One absolute path as :func:`command_line` writes it (the path as given, then with links resolved)."""
    for candidate in (Path(os.path.normpath(path)), Path(path).resolve()):
        for base, prefix in ((REPO_ROOT, ""), (REPO_ROOT.parent, "../")):
            if candidate.is_relative_to(base):
                return prefix + str(candidate.relative_to(base))
    return Path(path).name


def command_line(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """How a results file was made, with paths as a reader of the repository would type them.

    Paths inside the repository become relative to its root, paths next to it (the shared data) start
    with ``../``, and any other absolute path keeps only its file name: a results file names no folder
    of the machine that made it.
    """
    words = []
    for word in (sys.argv[1:] if argv is None else argv):
        if os.path.isabs(word):
            word = _portable(word)
        words.append(word)
    return " ".join([script] + words)


def mean_se(values: Sequence[float]) -> Dict[str, float]:
    """Mean, standard error (NaN for one value) and count: the summary of paired studies."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": statistics.fmean(values), "se": se, "n": len(values)}


def load_results(path: Path) -> Dict[str, Any]:
    """A resumable study's results file: what an earlier, perhaps interrupted, run wrote, or no runs yet."""
    return json.loads(path.read_text()) if path.exists() else {"runs": []}


def add_run(result: Dict[str, Any], run: Dict[str, Any], summarise, path: Path) -> None:
    """Append one finished run, update the summary and write the file, so an interrupted study resumes."""
    result["runs"].append(run)
    result["summary"] = summarise(result["runs"])
    path.write_text(json.dumps(result, indent=1))


def _mean_sd(v: List[float]) -> Tuple[float, float]:
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def summarise(runs: List[Dict[str, Any]], backends: Sequence[str]) -> Dict[str, Any]:
    """Per backend: mean, sd, min, max of each metric; paired differences fast - reference."""
    keys = [k for k in ("psnr", "ssim", "psnr_avg", "ssim_avg", "wall_s") if all(k in r for r in runs)]
    out: Dict[str, Any] = {"backends": {}, "paired": {}}
    for b in backends:
        rs = [r for r in runs if r["backend"] == b]
        out["backends"][b] = {}
        for k in keys:
            v = [r[k] for r in rs]
            m, sd = _mean_sd(v)
            out["backends"][b][k] = {"mean": m, "sd": sd, "min": min(v), "max": max(v), "n": len(v)}
    if set(backends) >= {"fast", "reference"}:
        ref = {(r["image"], r["seed"]): r for r in runs if r["backend"] == "reference"}
        for k in keys:
            diffs = [r[k] - ref[(r["image"], r["seed"])][k] for r in runs if r["backend"] == "fast"]
            m, sd = _mean_sd(diffs)
            out["paired"][k] = {"mean": m, "sd": sd, "min": min(diffs), "max": max(diffs), "n": len(diffs)}
    return out


def render(result: Dict[str, Any]) -> str:
    """Markdown: the per-backend summary, the paired differences, and every run."""
    s = result["summary"]
    cfg = result["config"]
    avg = "psnr_avg" in next(iter(s["backends"].values()))
    head = "| backend | PSNR dB | SSIM |" + (" PSNR avg dB | SSIM avg |" if avg else "") + " s / run |"
    lines = [
        f"Task `{cfg['task']}` (preset `{cfg['preset']}`), {cfg['iterations']} iterations, "
        f"precision {cfg.get('precision', 'fp32')}, {cfg.get('step_mode', 'eager')} steps, "
        f"{len(cfg['images'])} image(s) x {len(cfg['seeds'])} seed(s), crop {cfg['crop'] or 'none'}, "
        f"{result['environment']['device']}; mean +- sd over runs [min, max]; raw: `{result['json_name']}`.",
        "",
        head,
        "|---" * (head.count("|") - 1) + "|",
    ]

    def cell(d: Dict[str, float], nd: int) -> str:
        return f"{d['mean']:.{nd}f} +- {d['sd']:.{nd}f} [{d['min']:.{nd}f}, {d['max']:.{nd}f}]"

    for b, d in s["backends"].items():
        row = f"| {b} | {cell(d['psnr'], 2)} | {cell(d['ssim'], 4)} |"
        if avg:
            row += f" {cell(d['psnr_avg'], 2)} | {cell(d['ssim_avg'], 4)} |"
        row += f" {d['wall_s']['mean']:.1f} |"
        lines.append(row)
    if s["paired"]:
        p = s["paired"]
        row = f"| fast - reference (paired) | {cell(p['psnr'], 2)} | {cell(p['ssim'], 4)} |"
        if avg:
            row += f" {cell(p['psnr_avg'], 2)} | {cell(p['ssim_avg'], 4)} |"
        row += f" {p['wall_s']['mean']:+.1f} |"
        lines.append(row)
    base = result["baselines"]
    for bn in dict.fromkeys(b["name"] for b in base):  # the input itself, then the classical methods
        mine = [b for b in base if b["name"] == bn]
        bp = statistics.fmean(b["psnr"] for b in mine)
        bs = statistics.fmean(b["ssim"] for b in mine)
        took = f", {statistics.fmean(b['wall_s'] for b in mine):.1f} s" if "wall_s" in mine[0] else ""
        lines += ["", f"Baseline ({bn}): PSNR {bp:.2f} dB, SSIM {bs:.4f} (mean over cases{took})."]
    lines += ["", "| image | seed | backend | PSNR | SSIM | s |", "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['image']} | {r['seed']} | {r['backend']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def json_name(out: Path) -> str:
    """How a result file is named in its report: relative to the repository when inside it."""
    try:
        return str(out.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(out)


def environment(device: torch.device) -> Dict[str, Any]:
    """Date, commit, versions, device and threads of a run, for its result file."""
    return {
        "date": _dt.date.today().isoformat(),
        "commit": _git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
    }


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except Exception:
        return "unknown"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="*", type=Path, help="image files or folders (default: the shared DIP / Set5 images)")
    p.add_argument("--task", choices=("denoise", "sr"), default="denoise")
    p.add_argument("--factor", type=int, choices=(4, 8), default=4, help="super-resolution scale")
    p.add_argument("--preset", default=None, help="preset name (default denoise_f16_sigma25, or sr_x4 / sr_x8)")
    p.add_argument("--sigma", type=float, default=25.0, help="denoising noise std in 8-bit units")
    p.add_argument("--crop", type=int, default=None, help="centre crop (HR side for sr), rounded down to a multiple of 32")
    p.add_argument("--iterations", type=int, default=None, help="optimisation steps (default: the preset's)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...) per image")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--border", type=int, default=None, help="sr: pixels removed at each border (default: the factor)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--channels-last", action="store_true", help="fast backend in channels_last layout")
    p.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32", help="step precision (--via solve)")
    p.add_argument("--step-mode", choices=("eager", "graph"), default="eager",
                   help="graph: one CUDA graph per step (CUDA only; --via solve)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--via", choices=("solve", "restore"), default="solve",
                   help="solve: dip_fast.tasks.solve (this protocol, exactly); restore: the public dip_fast.restore()")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/quality-<device>-<task>.json)")
    p.add_argument("--no-markdown", action="store_true", help="write only the JSON (the table is still printed)")
    args = p.parse_args(argv)
    if args.via == "restore":
        import dip_fast

        if not hasattr(dip_fast, "restore"):
            p.error("--via restore: dip_fast.restore() does not exist in this checkout")

    if "fast" in args.backends and not rerun_if_extension_stale():
        print(f"the fast backend needs the compiled ops ({_ops.LOAD_ERROR or 'stale build'})", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.preset = args.preset or ("denoise_f16_sigma25" if args.task == "denoise" else f"sr_x{args.factor}")
    preset = tasks.get_preset(args.preset)
    args.iterations = args.iterations or preset.iterations
    if args.border is None:
        args.border = args.factor if args.task == "sr" else 0
    paths = args.paths or [SHARED_DATA / ("dip/denoising" if args.task == "denoise" else "Set5")]
    images = list_images(paths)[: args.limit]
    if not images:
        print("no images found", file=sys.stderr)
        return 2
    seeds = list(range(args.seeds))
    out = args.out or REPO_ROOT / "bench" / "results" / f"quality-{device.type}-{args.task}.json"
    result: Dict[str, Any] = {
        "schema": "dip_fast-bench-quality/1",
        "json_name": json_name(out),
        "command": command_line("bench/quality.py", argv),
        "environment": environment(device),
        "config": {
            "task": args.task,
            "preset": args.preset,
            "iterations": args.iterations,
            "crop": args.crop,
            "sigma": args.sigma if args.task == "denoise" else None,
            "factor": args.factor if args.task == "sr" else None,
            "border": args.border,
            "images": [str(i.name) for i in images],
            "seeds": seeds,
            "backends": args.backends,
            "channels_last": args.channels_last,
            "precision": args.precision,
            "step_mode": args.step_mode,
            "via": args.via,
            "protocol": "RGB PSNR/SSIM in [0,1]" if args.task == "denoise"
            else f"Y (BT.601) PSNR/SSIM, data range 255, border {args.border}; LR by PIL LANCZOS",
        },
        "runs": [],
        "baselines": [],
    }
    print(f"quality: {args.task} ({args.preset}), {len(images)} image(s) x {len(seeds)} seed(s), "
          f"{args.iterations} iterations, {device}", flush=True)
    for path in images:
        for seed in seeds:
            case = make_case(path, args, seed)
            result["baselines"].append({"image": path.name, "seed": seed, **case["baseline"]})
            result["baselines"] += [{"image": path.name, "seed": seed, **c} for c in case.get("classical", [])]
            for backend in args.backends:
                rec = run_one(case, backend, seed, args, device)
                result["runs"].append(rec)
                extra = f", avg {rec['psnr_avg']:.2f} dB" if "psnr_avg" in rec else ""
                print(f"  {path.name} {case['size'][0]}x{case['size'][1]} seed {seed} {backend:9s}: "
                      f"PSNR {rec['psnr']:.2f} dB{extra}, SSIM {rec['ssim']:.4f}, {rec['wall_s']:.1f} s", flush=True)
            result["summary"] = summarise(result["runs"], args.backends)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")  # after every case: a cut-off run keeps its data
    md = render(result)
    if not args.no_markdown:
        out.with_suffix(".md").write_text(md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
