"""The ``dip-fast`` command: restore image files or folders of them, or run the demo.

The task commands (``denoise``, ``inpaint``, ``sr``, ...) and ``batch``'s
``--task`` choices and task options are generated from the task registry
(:mod:`dip_fast.tasks.registry`): a registered task with a ``command``
appears here without an edit to this module.

Every user error (a bad argument, a missing or unreadable file, an output
that exists) ends with one line on stderr and exit status 2, never a
traceback; in a batch a bad image only fails its own row (exit status 1).
Outputs are written atomically (a temporary file in the same folder, then
``os.replace``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, NoReturn, Optional, Sequence, Tuple

from PIL import Image

from .. import __version__, io
from ..pipeline.monitor import RunTimeEstimate, format_seconds
from ..tasks import registry
from ..tasks.registry import CliFlag, TaskSpec

__all__ = ["main", "build_parser"]

PROG = "dip-fast"
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError, PermissionError)


class _UserError(Exception):
    """A mistake in the command line, reported in one line."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit status 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_COMMON_EPILOG = """
Common options: --iterations N caps the steps; --preset auto|paper|fast|quick
(auto = paper on a GPU, fast on the CPU); --max-time SECONDS and Ctrl-C stop
early and still write the best result so far; --ground-truth CLEAN adds PSNR to
the progress bar; --save-every N writes snapshots OUT.stepNNNNN.EXT; --plot
writes the loss/PSNR curve (OUT.curve.png unless a path is given).
"""

_EPILOGS = {
    "batch": """examples:
  dip-fast batch noisy/ clean/ --task denoise
  dip-fast batch photos/ filled/ --task inpaint --masks masks/
  dip-fast batch small/ large/ --task sr --scale 4 --ground-truth originals/
  torchrun --nproc_per_node=8 -m dip_fast batch in/ out/ --task denoise

Each result gets its input's name in OUT_DIR (JPEG and WebP inputs give a
.png). Results that already exist are skipped, so running the same command
again resumes a stopped batch. A file that cannot be restored is reported and
the batch goes on. OUT_DIR/summary.csv lists every file: done, skipped or
failed. Exit status: 0 if no file failed, 1 if some did, 2 on bad arguments.
""",
    "tune": """examples:
  dip-fast tune --size 512                  # the default denoising network at 512x512
  dip-fast tune --size 256 --task sr --device cpu --threads 2

restore() times its candidates itself in its first seconds (at most 3% of a
run) or reads this cache; tuning ahead of time only saves that.
""",
    "demo": """examples:
  dip-fast demo                 # writes into ./out
  dip-fast demo --out results --device cpu

On a GPU the demo runs the paper's settings on the full 512x512 image; on a
CPU a 128x128 crop with the 'fast' presets (about 5 minutes on 2 cores).
""",
}


def _add_run_options(p: argparse.ArgumentParser, max_time_help: str) -> None:
    """Options of a restoration run, shared by the single-file commands and batch."""
    p.add_argument("--iterations", type=int, metavar="N", help="optimisation steps (default: the preset's)")
    p.add_argument("--preset", default="auto", metavar="NAME",
                   help="auto (default), paper, fast, quick, or a preset name from dip_fast.tasks.PRESETS")
    p.add_argument("--device", metavar="DEV", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--backend", choices=("auto", "fast", "reference"), default="auto",
                   help="network implementation (auto: the fastest on this device, timed or cached)")
    p.add_argument("--max-time", type=float, metavar="SECONDS", help=max_time_help)
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="plan the run to take about this long: as many of the preset's steps as fit at the "
                        "step time measured on this device")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for the run")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (for repeatable CUDA runs)")
    p.add_argument("--stop", choices=("auto", "never", "early"), default="auto",
                   help="auto (default): per task, whichever of early and never won on the benchmark's "
                        "validation images; early (denoise, jpeg, deblur): stop at the most stable estimate "
                        "that explains the image down to its noise level, else run all iterations; "
                        "never: run all iterations")
    p.add_argument("--step-mode", choices=("auto", "eager", "graph"), default="auto",
                   help="graph: replay each step as one CUDA graph (CUDA only); auto: the fastest, timed")
    p.add_argument("--restarts", type=int, default=1, metavar="K",
                   help="average K independent runs, trained together (default 1)")
    p.add_argument("--tile", type=int, metavar="N",
                   help="restore in overlapping N x N tiles (automatic when the image does not fit in memory)")
    p.add_argument("--precision", choices=("auto", "fp32", "tf32", "bf16"), default="auto",
                   help="arithmetic of the network (auto: PyTorch's default, or bf16 where it is faster and "
                        "recorded to restore as well)")


def _run_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """restore() keywords of the options added by _add_run_options."""
    return dict(iterations=args.iterations, preset=args.preset, device=args.device, seed=args.seed,
                backend=args.backend, max_time=args.max_time, time_budget=args.time_budget,
                num_threads=args.threads,
                deterministic=args.deterministic, stop=args.stop, step_mode=args.step_mode,
                precision=args.precision, restarts=args.restarts, tile=args.tile)


def _add_restore_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", help="image file to restore")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="where to write the result")
    _add_run_options(p, "stop after this long; the result so far is written")
    p.add_argument("--ground-truth", metavar="CLEAN", help="clean image: PSNR in the progress bar and summary only")
    p.add_argument("--save-every", type=int, metavar="N", help="also write a snapshot every N steps")
    p.add_argument("--plot", nargs="?", const="", metavar="PNG",
                   help="write the loss (and PSNR) curve as a PNG (default OUT.curve.png)")
    p.add_argument("--uncertainty", metavar="PNG",
                   help="with --restarts K > 1: write the per-pixel spread of the runs as a grey image")
    p.add_argument("-f", "--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")


def _cli_tasks() -> Tuple[TaskSpec, ...]:
    """The registered tasks that have a command."""
    return tuple(spec for spec in registry.all_tasks() if spec.command)


def _add_task_command(sub: Any, spec: TaskSpec) -> None:
    """The subcommand of one task: the common options, then the task's own."""
    p = sub.add_parser(spec.command, help=spec.summary, description=spec.description,
                       epilog=spec.epilog + _COMMON_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_restore_options(p)
    for flag in spec.flags:
        p.add_argument(flag.flag, dest=flag.input, type=flag.type, metavar=flag.metavar, required=flag.required,
                       help=flag.help)


def _batch_flags() -> Dict[str, Tuple[CliFlag, Tuple[str, ...], Tuple[str, ...]]]:
    """Every task option of ``dip-fast batch``, by option: its first spec's flag, the commands of the
    tasks that take it, and of those that need it (tasks may share an option, such as --sigma)."""
    flags: Dict[str, Tuple[CliFlag, Tuple[str, ...], Tuple[str, ...]]] = {}
    for spec in _cli_tasks():
        for flag in spec.flags:
            first, takes, needs = flags.get(flag.batch_option, (flag, (), ()))
            needed = (spec.command,) if flag.required else ()
            flags[flag.batch_option] = (first, takes + (spec.command,), needs + needed)
    return flags


def _batch_dest(flag: CliFlag) -> str:
    return flag.batch_option.lstrip("-").replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dip-fast``: a command per registered task, then batch and demo."""
    parser = _Parser(
        prog=PROG,
        description="Deep Image Prior restoration (Ulyanov et al., CVPR 2018) with fused C++/CUDA kernels.",
        epilog="Run 'dip-fast COMMAND --help' for each command's options and examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter
    for spec in _cli_tasks():
        _add_task_command(sub, spec)

    bat = sub.add_parser("batch", help="restore every image in a folder",
                         description="Restore every image file in IN_DIR into OUT_DIR; resumable, and split "
                                     "across processes when launched with torchrun.",
                         epilog=_EPILOGS["batch"], formatter_class=fmt)
    bat.add_argument("in_dir", metavar="IN_DIR", help="folder of images (subfolders are not searched)")
    bat.add_argument("out_dir", metavar="OUT_DIR", help="folder for the results and summary.csv (created if missing)")
    bat.add_argument("--task", required=True, choices=[spec.command for spec in _cli_tasks()],
                     help="what to do to every image")
    _add_run_options(bat, "per image: stop after this long (a pack of K images shares K times this); the result "
                          "so far is written")
    for option, (flag, _, _) in _batch_flags().items():
        bat.add_argument(option, dest=_batch_dest(flag), type=flag.type, metavar=flag.batch_metavar or flag.metavar,
                         help=flag.batch_help)
    bat.add_argument("--ground-truth", metavar="DIR",
                     help="folder of clean images named like the inputs: PSNR in the summary")
    bat.add_argument("--pack", default="1", metavar="K",
                     help="restore K images (of one size) per training step, or 'auto': as many as fit (default 1)")
    bat.add_argument("-q", "--quiet", action="store_true", help="report only failures")

    tune = sub.add_parser("tune", help="time the step candidates for a size on this device and cache the choice",
                          description="Time the ways a step can run (fused or PyTorch ops, layouts, CUDA graphs, "
                                      "precisions) at one image size, print them fastest first with the choice "
                                      "restore() will make, and store it in the tuning cache.",
                          epilog=_EPILOGS["tune"], formatter_class=fmt)
    tune.add_argument("--size", type=int, required=True, metavar="N", help="side of the restored image, in pixels")
    tune.add_argument("--task", default="denoise", choices=[spec.command for spec in _cli_tasks()],
                      help="the task whose network and data term to time (default denoise)")
    tune.add_argument("--device", metavar="DEV", help="cpu, cuda or cuda:N (default: cuda if available)")
    tune.add_argument("--preset", default="auto", metavar="NAME", help="auto (default), paper, fast or quick")
    tune.add_argument("--pack", type=int, default=1, metavar="K", help="networks trained in one step (default 1)")
    tune.add_argument("--seconds", type=float, default=20.0, help="time spent timing (default 20)")
    tune.add_argument("--threads", type=int, metavar="N", help="CPU threads (the choice is kept per thread count)")

    demo = sub.add_parser("demo", help="restore scikit-image's astronaut three ways",
                          description="Denoise, inpaint and x4 super-resolve scikit-image's astronaut; "
                                      "write images, comparisons and a PSNR/SSIM table.",
                          epilog=_EPILOGS["demo"], formatter_class=fmt)
    demo.add_argument("--out", default="out", metavar="DIR", help="output folder (default: out)")
    demo.add_argument("--device", metavar="DEV", help="cpu, cuda or cuda:N (default: cuda if available)")
    demo.add_argument("--preset", choices=("paper", "fast", "quick"),
                      help="default: paper on a GPU, fast with shortened step counts on the CPU")
    demo.add_argument("--full", action="store_true", help="restore the full 512x512 image on the CPU too")
    demo.add_argument("--backend", choices=("auto", "fast", "reference"), default="auto",
                      help="network implementation (auto: the fastest on this device)")
    demo.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: 1 on a busy machine)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


# --------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_output(out: Path, inputs: Sequence[Optional[str]], force: bool, in_path: Path) -> None:
    """Refuse, before any work, an output that would clobber an input or an existing file, or cannot be written."""
    for src in inputs:
        if src is not None and (_same_file(out, Path(src)) or out.resolve() == Path(src).resolve()):
            raise _UserError(f"output '{out}' is the input file '{src}'; refusing to overwrite an input")
    if out.is_dir():
        raise _UserError(f"output '{out}' is a directory; give a file name such as {out / 'result.png'}")
    if out.exists() and not force:
        raise _UserError(f"output '{out}' already exists; use --force to overwrite it")
    if not out.parent.is_dir():
        raise _UserError(f"output folder '{out.parent}' does not exist")
    ext = out.suffix.lower()
    if ext not in Image.registered_extensions():
        raise _UserError(f"output '{out}': unknown image extension {out.suffix!r} (use .png, .tif, .jpg, ...)")
    # The input's kind decides what the result can be stored in.
    img = io.open_image_file(in_path, "IN")
    if io._is_16bit_color(img) and img.format == "TIFF" and ext not in (".tif", ".tiff"):
        raise _UserError(f"output '{out}': a 16-bit colour result can only be written as .tif/.tiff")
    if ext in (".jpg", ".jpeg") and ("A" in img.mode or "transparency" in img.info):
        raise _UserError(f"output '{out}': JPEG cannot store the input's alpha channel; use .png")


def _snapshot_path(out: Path, step: int) -> Path:
    return out.with_name(f"{out.stem}.step{step:05d}{out.suffix}")


def _write_uncertainty(std: Any, path: Path, force: bool) -> None:
    """The runs' per-pixel spread (mean over colour channels) as an 8-bit grey image, scaled to its maximum.

    Scaled, so that where the runs disagree shows whatever the level; the
    maximum (the value of white) is printed on stderr.
    """
    import numpy as np

    grey = std.mean(axis=2)
    peak = float(grey.max())
    scaled = grey / peak if peak > 0 else grey
    io.save_image(np.round(scaled * 255).astype(np.uint8), path, overwrite=force)
    print(f"wrote {path} (per-pixel std of the runs, white = {peak * 255:.1f} of 255)", file=sys.stderr)


def _write_plot(info: Any, path: Path) -> None:
    """Loss (and PSNR) against step, as a PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if info.psnr_history else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
    ax = axes[0][0]
    ax.semilogy(range(1, len(info.loss_history) + 1), info.loss_history, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("data term (MSE)")
    ax.set_title(f"{info.task}: loss")
    if info.psnr_history:
        ax = axes[0][1]
        ax.plot(range(1, len(info.psnr_history) + 1), info.psnr_history, lw=1, color="tab:green")
        ax.set_xlabel("step")
        ax.set_ylabel("PSNR vs ground truth (dB)")
        ax.set_title(f"{info.task}: PSNR")
    fig.tight_layout()
    io.save_figure(fig, path, dpi=100)


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _run_time_in_words(prog: str, quiet: bool, stream: Optional[IO[str]] = None) -> Iterator[None]:
    """A long run's expected time as one line of the command's own (not a Python warning with its source line).

    The line goes to ``stream`` (standard error by default); other warnings show as usual.

    >>> with _run_time_in_words("dip-fast denoise", quiet=False, stream=sys.stdout):
    ...     warnings.warn(RunTimeEstimate("long", 2250, 3240.0, 1440.0))
    dip-fast denoise: this run of 2250 steps will take about 54 min (1440 ms/step); --time-budget 300 would run about 208 steps in 5 min
    """
    def show(message: Any, category: Any, *rest: Any, **kwargs: Any) -> None:
        if not isinstance(message, RunTimeEstimate):
            shown(message, category, *rest, **kwargs)
        elif not quiet:
            in_5_min = min(message.steps, max(1, int(300 / (message.ms_per_step / 1e3))))
            print(f"{prog}: this run of {message.steps} steps will take about {format_seconds(message.seconds)} "
                  f"({message.ms_per_step:.0f} ms/step); --time-budget 300 would run about {in_5_min} steps "
                  "in 5 min", file=stream or sys.stderr)

    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always", RunTimeEstimate)
        warnings.showwarning = show
        yield


def _run_restore(args: argparse.Namespace) -> int:
    from ..api import restore

    spec = registry.by_command(args.command)
    out = Path(args.output)
    in_path = Path(args.input)
    task_inputs = {flag.input: getattr(args, flag.input) for flag in spec.flags}
    files = [(flag.flag, task_inputs[flag.input]) for flag in spec.flags if flag.is_file]
    if args.save_every is not None and args.save_every < 1:
        raise _UserError(f"--save-every must be >= 1, got {args.save_every}")
    if args.save_every and (args.restarts > 1 or args.tile is not None):
        several = "--restarts K runs" if args.restarts > 1 else "--tile restores the image in"
        raise _UserError(f"--save-every follows a single run; {several} several (drop one of the two)")
    # Check every input exists before judging the output against them.
    for label, src in [("IN", args.input), *files, ("--ground-truth", args.ground_truth)]:
        if src is not None:
            io.open_image_file(src, label)
    _check_output(out, [args.input, *(src for _, src in files), args.ground_truth], args.force, in_path)
    uncertainty_path = Path(args.uncertainty) if args.uncertainty is not None else None
    if uncertainty_path is not None:
        if args.restarts < 2:
            raise _UserError("--uncertainty needs --restarts K with K >= 2 (the spread of one run is not defined)")
        _check_output(uncertainty_path, [args.input, *(src for _, src in files), args.ground_truth], args.force,
                      in_path)
    plot_path = None
    if args.plot is not None:
        plot_path = Path(args.plot) if args.plot else out.with_name(f"{out.stem}.curve.png")
        if plot_path.exists() and not args.force:
            raise _UserError(f"plot '{plot_path}' already exists; use --force to overwrite it")

    callback = None
    if args.save_every:
        every = args.save_every
        saved = [0]  # snapshots written so far

        def callback(step: int, info: Dict[str, Any]) -> None:
            # On a GPU the callback comes every few steps: write when a multiple of N was passed.
            if (step + 1) // every > saved[0]:
                saved[0] = (step + 1) // every
                # Snapshots belong to this output: rewritten on every run.
                io.save_image(info["render"](), _snapshot_path(out, step + 1), overwrite=True)

    kwargs = _run_kwargs(args)
    kwargs.update(ground_truth=args.ground_truth, progress=not args.quiet, callback=callback, return_info=True)
    kwargs.update(task_inputs)
    with _run_time_in_words(f"{PROG} {args.command}", quiet=args.quiet):
        result, info = restore(str(in_path), spec.name, **kwargs)
    io.save_image(result, out, overwrite=args.force)
    if uncertainty_path is not None:
        _write_uncertainty(info.uncertainty, uncertainty_path, args.force)
    if plot_path is not None:
        _write_plot(info, plot_path)
    if not args.quiet:
        psnr = f", PSNR {info.psnr:.2f} dB" if info.psnr is not None else ""
        stopped = f", stopped early: {info.stop_reason}" if info.interrupted else ""
        if info.stop_step is not None:
            stopped = f", stopped by itself: the estimate of step {info.stop_step + 1}"
        if info.stop_summary:
            stopped += f"; early stopping: {info.stop_summary}"
        if info.stop_reason == "constant":
            stopped = ", the image is one colour: returned as it is"
        print(f"wrote {out} ({info.steps} steps, {info.wall_time:.1f} s, preset {info.preset}, "
              f"{info.backend} on {info.device}{psnr}{stopped})", file=sys.stderr)
    # Ctrl-C during the fit: the result so far was written whole (atomically),
    # but a script must still learn that the run was cut short.
    return 130 if info.stop_reason == "keyboard_interrupt" else 0


def _run_batch(args: argparse.Namespace) -> int:
    import logging

    from . import batch

    batch_kwargs: Dict[str, Any] = {}
    for option, (flag, takes, needs) in _batch_flags().items():
        value = getattr(args, _batch_dest(flag))
        if value is not None and args.task not in takes:
            raise _UserError(f"{option} only applies to --task {' or '.join(takes)}, not --task {args.task}")
        if value is None and args.task in needs:
            raise _UserError(f"--task {args.task} needs {option} {flag.batch_needs}".rstrip())
        if value is not None:  # a per-file input comes as a folder, matched to the images by name
            batch_kwargs["masks_dir" if flag.per_file else flag.input] = value
    kwargs = _run_kwargs(args)
    if args.pack != "auto":
        try:
            kwargs["pack"] = int(args.pack)
        except ValueError:
            raise _UserError(f"--pack must be an integer >= 1 or 'auto', got {args.pack!r}") from None
    else:
        kwargs["pack"] = "auto"
    scale = batch_kwargs.pop("scale", None)
    masks_dir = batch_kwargs.pop("masks_dir", None)
    kwargs.update(batch_kwargs)

    # One line per image on stderr; failures are warnings, shown even with -q.
    logger = logging.getLogger(batch.__name__)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        with batch.distributed(args.device) as (rank, world_size, device):
            kwargs["device"] = device
            summary = batch.run_batch(args.in_dir, args.out_dir, task=args.task, rank=rank, world_size=world_size,
                                      ground_truth_dir=args.ground_truth, masks_dir=masks_dir, scale=scale,
                                      **kwargs)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    if rank == 0 and not args.quiet:
        where = summary.summary_path or summary.csv_path
        print(f"{summary.done} done, {summary.skipped} skipped, {summary.failed} failed; summary in {where}",
              file=sys.stderr)
    return 1 if summary.failed else 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.threads is not None and args.threads < 1:
        raise _UserError(f"--threads must be >= 1, got {args.threads}")
    run_demo(args.out, device=args.device, preset=args.preset, full_size=True if args.full else None,
             backend=args.backend, seed=args.seed, num_threads=args.threads, progress=not args.quiet)
    return 0


def _run_tune(args: argparse.Namespace) -> int:
    from .tune import format_table, tune_size

    task = next(spec.name for spec in _cli_tasks() if spec.command == args.task)
    if args.threads is not None and args.threads < 1:
        raise _UserError(f"--threads must be >= 1, got {args.threads}")
    result = tune_size(args.size, task=task, device=args.device, pack=args.pack, seconds=args.seconds,
                       preset=args.preset, num_threads=args.threads)
    print(format_table(result))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``dip-fast``; returns the exit status.

    0 ok, 1 some files of a batch failed, 2 user error, 130 interrupted.

    Examples:
        >>> from dip_fast.apps.cli import main
        >>> main(["sr", "no-such-file.png", "-o", "big.png", "--scale", "2"])  # one line on stderr
        2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{PROG} {args.command}"
    try:
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "batch":
            return _run_batch(args)
        if args.command == "tune":
            return _run_tune(args)
        return _run_restore(args)
    except (_UserError,) + USER_ERRORS as exc:
        message = " ".join(str(exc).split())  # one line, whatever the exception held
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C inside the optimisation returns the result so far; here it
        # came while loading or writing, so there is nothing to keep.
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{prog}: error: out of memory; try a smaller image or --preset quick", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
