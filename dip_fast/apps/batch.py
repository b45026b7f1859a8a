"""Restore every image of a folder: :func:`run_batch` (the ``dip-fast batch`` command).

* Inputs are the files of ``in_dir`` (not its subfolders) with an image
  extension (:data:`IMAGE_EXTENSIONS`, any case), sorted by name; names
  starting with ``.`` are ignored.  Masks (inpainting) and ground-truth
  images are matched by stem: ``photo.png`` takes ``masks/photo.*``.
* Each result is written to ``out_dir`` under its input's name, except that
  lossy formats (:data:`LOSSY_EXTENSIONS`) give a ``.png``: saving a
  restoration as JPEG would add new compression artefacts.
* Resuming: a file whose output already exists is not restored again but
  reported as ``skipped``, so a stopped batch is simply run again.  Outputs
  and summaries are written atomically, so a killed run leaves no partial
  file; the hidden temporary file of a write cut short by SIGKILL is
  removed by the next run.
* A file that cannot be restored (unreadable, corrupt, mis-sized mask, ...)
  is reported and recorded as ``failed``; the batch goes on.
* ``out_dir/summary.csv`` lists every input once (:data:`CSV_COLUMNS`).  A
  skipped file keeps the numbers that the previous ``summary.csv`` recorded
  for it.
* Several processes (``torchrun``) split the files: rank ``r`` of ``n`` takes
  ``files[r::n]`` (:func:`shard`), writes ``summary.rank{r}.csv``, and rank 0
  merges those into ``summary.csv`` once every rank is done.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import torch

from .. import io
from ..api import restore
from ..pipeline.request import PER_FILE, resolve_device, resolve_task, validate_request
from ..tasks import registry

__all__ = [
    "CSV_COLUMNS",
    "IMAGE_EXTENSIONS",
    "LOSSY_EXTENSIONS",
    "BatchRow",
    "BatchSummary",
    "distributed",
    "launched_by_torchrun",
    "list_images",
    "output_path",
    "run_batch",
    "shard",
]

log = logging.getLogger(__name__)

#: Extensions (lower case) of the files a batch picks up.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Input extensions whose results are written as PNG.
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")
#: Columns of the summary CSV files.
CSV_COLUMNS = ("file", "task", "status", "steps", "stop_step", "seconds", "psnr", "error")
SUMMARY_NAME = "summary.csv"
# Keyword arguments of restore() that the batch sets itself, per file.
_MANAGED = ("image", "mask", "ground_truth", "return_info", "progress", "callback")

PathLike = Union[str, "os.PathLike[str]"]
T = TypeVar("T")

#: Test seam, None in normal use: called as ``checkpoint_hook(event, name)`` at fixed points of
#: :func:`run_batch`: ``("listed", "")`` before the first file, ``("restored", NAME)`` between restoring
#: the input ``NAME`` and writing its result, ``("written", NAME)`` after. The kill-safety tests stop
#: the process there (tests/test_kill_safety.py), at a known point instead of after a guessed delay.
checkpoint_hook: Optional[Callable[[str, str], None]] = None


def _checkpoint(event: str, name: str = "") -> None:
    if checkpoint_hook is not None:
        checkpoint_hook(event, name)


@dataclass
class BatchRow:
    """One input file's line in the summary (empty fields are None)."""

    file: str
    task: str
    status: str  # 'done', 'skipped' or 'failed'
    steps: Optional[int] = None
    stop_step: Optional[int] = None
    seconds: Optional[float] = None
    psnr: Optional[float] = None
    error: str = ""

    def to_csv(self) -> Dict[str, str]:
        """The row as CSV fields."""
        def fmt(v: Any, digits: int = 0) -> str:
            if v is None:
                return ""
            return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

        return {"file": self.file, "task": self.task, "status": self.status, "steps": fmt(self.steps),
                "stop_step": fmt(self.stop_step), "seconds": fmt(self.seconds, 2), "psnr": fmt(self.psnr, 4),
                "error": self.error}


@dataclass
class BatchSummary:
    """What :func:`run_batch` did.

    Attributes:
        rows: this process's files, in order.
        counts: ``done``/``skipped``/``failed`` counts over the whole batch
            (all ranks, once merged; otherwise this process's).
        csv_path: the CSV this process wrote (``summary.csv`` or ``summary.rank{r}.csv``).
        summary_path: ``summary.csv`` when it was written for the whole batch, else None.
    """

    rows: List[BatchRow]
    counts: Dict[str, int]
    csv_path: Path
    summary_path: Optional[Path] = None

    @property
    def done(self) -> int:
        return self.counts.get("done", 0)

    @property
    def skipped(self) -> int:
        return self.counts.get("skipped", 0)

    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def _check_dir(path: PathLike, name: str) -> Path:
    d = Path(os.fspath(path))
    if not d.exists():
        raise FileNotFoundError(f"{name}: no such folder: '{d}'")
    if not d.is_dir():
        raise ValueError(f"{name}: expected a folder, got a file: '{d}'")
    return d


def list_images(folder: PathLike, name: str = "IN_DIR") -> List[Path]:
    """The image files directly inside ``folder`` (see :data:`IMAGE_EXTENSIONS`), sorted by name.

    Hidden names (``.x``) are left out: they are temporary files of an
    interrupted write or resource forks of other systems, not images.
    """
    d = _check_dir(folder, name)
    return sorted(p for p in d.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())


def shard(files: Sequence[T], rank: int, world_size: int) -> List[T]:
    """The files process ``rank`` of ``world_size`` restores: every ``world_size``-th, from ``rank``.

    The shards of ranks ``0 .. world_size-1`` cover ``files`` exactly once,
    and interleaving balances them when file sizes vary along the list.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1 with world_size >= 1, "
                         f"got rank={rank}, world_size={world_size}")
    return list(files[rank::world_size])


def output_path(out_dir: PathLike, src: PathLike) -> Path:
    """Where the result for input ``src`` goes: its name in ``out_dir``, ``.png`` for lossy formats."""
    src = Path(os.fspath(src))
    name = src.stem + ".png" if src.suffix.lower() in LOSSY_EXTENSIONS else src.name
    return Path(os.fspath(out_dir)) / name


def _index_by_stem(files: Sequence[Path]) -> Dict[str, List[Path]]:
    index: Dict[str, List[Path]] = {}
    for p in files:
        index.setdefault(p.stem, []).append(p)
    return index


def _match(index: Dict[str, List[Path]], stem: str, what: str, folder: Path) -> Optional[Path]:
    found = index.get(stem, [])
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(f"several {what} files for '{stem}' in '{folder}': {names}")
    return found[0] if found else None


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


# --------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------


def _write_csv(path: Path, rows: Sequence[Dict[str, str]]) -> None:
    """Write the rows atomically, so that a reader never sees half a summary."""
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _read_csv(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: row.get(k) or "" for k in CSV_COLUMNS} for row in csv.DictReader(f)]


def _previous_rows(path: Path) -> Dict[str, Dict[str, str]]:
    """The last summary's rows by file name; nothing if it is missing or unreadable (it is only a report)."""
    try:
        return {row["file"]: row for row in _read_csv(path)}
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}


def _skipped_row(name: str, task: str, previous: Optional[Dict[str, str]]) -> BatchRow:
    """A skipped file's row, with the numbers of the run that made its output when the last summary has them."""
    row = BatchRow(name, task, "skipped")
    if previous is not None and previous.get("task") == task and previous.get("status") in ("done", "skipped"):
        def num(key: str, kind: type) -> Any:
            try:
                return kind(previous[key]) if previous.get(key) else None
            except ValueError:
                return None

        row.steps, row.stop_step = num("steps", int), num("stop_step", int)
        row.seconds, row.psnr = num("seconds", float), num("psnr", float)
    return row


def _count(statuses: Sequence[str]) -> Dict[str, int]:
    return {s: sum(1 for x in statuses if x == s) for s in ("done", "skipped", "failed")}


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun`` (which sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def distributed(device: Optional[str] = None) -> Iterator[Tuple[int, int, Optional[str]]]:
    """Join ``torchrun``'s process group, if launched by it; yield ``(rank, world_size, device)``.

    Without ``torchrun`` this yields ``(0, 1, device)`` and does nothing.
    Under it, the group is initialised from the environment with the NCCL
    backend when the processes use CUDA and Gloo otherwise, and destroyed on
    exit.  With CUDA each process takes ``cuda:LOCAL_RANK`` unless ``device``
    names a GPU index (or the CPU) explicitly.
    """
    if not launched_by_torchrun():
        yield 0, 1, device
        return
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not str(device or "").startswith("cpu")
    if use_cuda and device in (None, "cuda"):
        if local_rank >= torch.cuda.device_count():
            # NCCL cannot put two ranks on one GPU.
            raise ValueError(f"torchrun started more processes per node than the {torch.cuda.device_count()} "
                             "GPU(s) present; lower --nproc_per_node, or pass --device cpu")
        device = f"cuda:{local_rank}"
    created = not dist.is_initialized()
    if created:
        if use_cuda:
            # NCCL's collectives run on the current device: make it this rank's.
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        if created:
            dist.destroy_process_group()


# --------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------


class _Packer:
    """With ``pack`` other than 1, restores the batch's files a pack at a time (one packed step per pack).

    A pack whose ``restore()`` fails (one bad file fails the list) is
    restored file by file instead, so a bad file still fails only its row.
    """

    def __init__(self, pack: Any, restore_one: Callable[[Path], Any], inputs: Callable[[Path], Any], task: str,
                 restore_kwargs: Dict[str, Any], todo: List[Path]) -> None:
        from ..pipeline.many import MAX_PACK_CPU, MAX_PACK_CUDA

        self.restore_one, self.inputs, self.task, self.kwargs = restore_one, inputs, task, restore_kwargs
        if pack == "auto":  # restore() trims a pack to the memory estimate
            cuda = resolve_device(restore_kwargs.get("device")).type == "cuda"
            pack = MAX_PACK_CUDA if cuda else MAX_PACK_CPU
        self.size = int(pack)
        self.todo = todo
        self.done: Dict[Path, Any] = {}

    def result(self, src: Path) -> Any:
        if self.size == 1:
            return self.restore_one(src)
        if src not in self.done:
            self._run_pack(self.todo[self.todo.index(src):][: self.size])
        found = self.done.pop(src)
        return found if found is not None else self.restore_one(src)

    def _run_pack(self, files: List[Path]) -> None:
        kwargs = dict(self.kwargs)
        if kwargs.get("max_time") is not None:  # --max-time is per image, and restore()'s bounds the whole list
            kwargs["max_time"] *= len(files)
        try:
            pairs = [self.inputs(src) for src in files]
            results = restore([str(src) for src in files], self.task, mask=_listed([m for m, _ in pairs]),
                              ground_truth=_listed([g for _, g in pairs]), return_info=True, progress=False,
                              **kwargs)
        except KeyboardInterrupt:
            raise
        except Exception:  # noqa: BLE001 - retried file by file, where each failure names its file
            results = [None] * len(files)
        self.done.update(zip(files, results))


def _listed(values: List[Optional[str]]) -> Optional[List[Optional[str]]]:
    """Per-file inputs as restore()'s list argument: None when no file has one."""
    return None if all(v is None for v in values) else values


def run_batch(
    in_dir: PathLike,
    out_dir: PathLike,
    *,
    task: str,
    rank: int = 0,
    world_size: int = 1,
    ground_truth_dir: Optional[PathLike] = None,
    masks_dir: Optional[PathLike] = None,
    scale: Optional[int] = None,
    **restore_kwargs: Any,
) -> BatchSummary:
    """Restore the images of ``in_dir`` into ``out_dir`` (see the module docstring for the rules).

    Args:
        in_dir: folder of inputs (not searched recursively).
        out_dir: folder of results and summaries; created if missing; must
            differ from ``in_dir``, ``masks_dir`` and ``ground_truth_dir``.
        task: as for :func:`dip_fast.restore` (``'denoise'``, ``'inpaint'``, ``'sr'``, ...).
        rank, world_size: this process's share, ``files[rank::world_size]``.
            With ``world_size > 1`` and ``torch.distributed`` initialised, rank
            0 merges every rank's CSV into ``summary.csv`` after a barrier.
        ground_truth_dir: clean images matched by stem; adds PSNR to the summary.
        masks_dir: inpainting, required: masks matched by stem.
        scale: super-resolution factor.
        **restore_kwargs: passed to every :func:`dip_fast.restore` call
            (``iterations``, ``preset``, ``device``, ``seed``, ``max_time``, ...).

    Returns:
        A :class:`BatchSummary`.

    Raises:
        ValueError, TypeError, FileNotFoundError: bad folders or arguments,
            before any file is restored (a failing file only fails its row).
        KeyboardInterrupt: Ctrl-C; the file in progress is not written and
            this process's summary lists the files handled so far.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import numpy as np
        >>> from PIL import Image
        >>> from dip_fast.apps.batch import run_batch
        >>> tmp = tempfile.TemporaryDirectory()
        >>> src = Path(tmp.name) / "in"
        >>> src.mkdir()
        >>> pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        >>> Image.fromarray(pixels).save(src / "a.jpg")
        >>> summary = run_batch(src, Path(tmp.name) / "out", task="denoise", preset="quick", iterations=2,
        ...                     device="cpu")
        >>> summary.done, summary.failed, sorted(p.name for p in (Path(tmp.name) / "out").iterdir())
        (1, 0, ['a.png', 'summary.csv'])
        >>> run_batch(src, Path(tmp.name) / "out2", task="sr", scale=3)  # checked before any file
        Traceback (most recent call last):
        ...
        ValueError: scale must be even (2, 4, 8, ...): the paper's Lanczos-2 downsampler misaligns odd factors, got 3
        >>> tmp.cleanup()
    """
    folders = _check_folders(in_dir, out_dir, task, masks_dir, ground_truth_dir, scale, restore_kwargs)
    out, spec = folders.out, folders.spec
    use_dist = world_size > 1 and _dist_ready()
    csv_path = out / (SUMMARY_NAME if world_size == 1 else f"summary.rank{rank}.csv")
    previous = _previous_rows(out / SUMMARY_NAME)  # read before rank 0 replaces it (after the barrier)
    mine = shard(folders.files, rank, world_size)
    # A run killed outright (SIGKILL) leaves the hidden temporary file of the
    # write it was in; this process is the only writer of these names.
    own = [output_path(out, src).name for src in mine] + [csv_path.name] + ([SUMMARY_NAME] if rank == 0 else [])
    io.remove_stale_temporaries(out, own)
    _checkpoint("listed")
    rows: List[BatchRow] = []
    try:
        _restore_files(folders, mine, previous, task, spec.name, f"rank {rank}: " if world_size > 1 else "",
                       restore_kwargs, rows)
    finally:
        # Also on Ctrl-C or a crash: the files handled so far are reported.
        _write_csv(csv_path, [r.to_csv() for r in rows])
    counts = _count([r.status for r in rows])
    summary_path = out / SUMMARY_NAME if world_size == 1 else None
    if use_dist:
        counts, summary_path = _merge_ranks(out, world_size, rank, counts)
    return BatchSummary(rows=rows, counts=counts, csv_path=csv_path, summary_path=summary_path)


@dataclass
class _Folders:
    """A batch's checked folders: the inputs, the output folder, the masks and ground truth found by stem."""

    spec: Any
    files: List[Path]
    out: Path
    masks: Optional[Path]
    gts: Optional[Path]
    mask_index: Dict[str, List[Path]]
    gt_index: Dict[str, List[Path]]

    def inputs(self, src: Path) -> Tuple[Optional[str], Optional[str]]:
        """The mask and ground truth of ``src`` (by stem), as paths, or None."""
        mask = _match(self.mask_index, src.stem, "mask", self.masks) if self.masks is not None else None
        if self.masks is not None and mask is None:
            raise FileNotFoundError(f"no mask named '{src.stem}.*' in '{self.masks}'")
        gt = _match(self.gt_index, src.stem, "ground-truth", self.gts) if self.gts is not None else None
        return (None if mask is None else str(mask)), (None if gt is None else str(gt))


def _check_folders(in_dir: PathLike, out_dir: PathLike, task: str, masks_dir: Optional[PathLike],
                   ground_truth_dir: Optional[PathLike], scale: Optional[int],
                   restore_kwargs: Dict[str, Any]) -> _Folders:
    """Every check of a batch's folders and arguments, before any file is restored; creates OUT_DIR."""
    src_dir = _check_dir(in_dir, "IN_DIR")
    out = Path(os.fspath(out_dir))
    spec, _ = resolve_task(task)
    extra = sorted(set(_MANAGED) & set(restore_kwargs))
    if extra:
        raise TypeError(f"run_batch sets {', '.join(extra)} itself, per file")
    if "mask" in spec.required and masks_dir is None:
        raise ValueError(f"{spec.label} needs a folder of masks (masks_dir), matched to the images by stem")
    if not spec.accepts("mask") and masks_dir is not None:
        raise ValueError(f"masks only apply to {registry.owners('mask')}, got a masks folder for task {task!r}")
    others = {"IN_DIR": src_dir}
    masks = gts = None
    if masks_dir is not None:
        others["the masks folder"] = masks = _check_dir(masks_dir, "masks folder")
    if ground_truth_dir is not None:
        others["the ground-truth folder"] = gts = _check_dir(ground_truth_dir, "ground-truth folder")
    for label, d in others.items():
        if _same_dir(out, d):
            raise ValueError(f"OUT_DIR '{out}' is {label}; refusing to write results among the inputs")
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT_DIR: expected a folder, got a file: '{out}'")
    files = list_images(src_dir)
    if not files:
        raise ValueError(f"IN_DIR '{src_dir}' holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    # Masks, ground truth and outputs are found by stem: two inputs sharing
    # one would be given the same mask and the same output file.
    for stem, same in _index_by_stem(files).items():
        if len(same) > 1:
            raise ValueError(f"inputs {', '.join(p.name for p in same)} share the name '{stem}'; rename all but one")
    mask_index = _index_by_stem(list_images(masks, "masks folder")) if masks is not None else {}
    gt_index = _index_by_stem(list_images(gts, "ground-truth folder")) if gts is not None else {}
    if scale is not None:
        restore_kwargs["scale"] = scale
    # Every file would fail alike on a bad argument (an odd scale, an unknown
    # preset, a missing GPU): check them all once, before any file, running nothing.
    validate_request(task, mask=PER_FILE if masks is not None else None, **restore_kwargs)
    out.mkdir(parents=True, exist_ok=True)
    return _Folders(spec, files, out, masks, gts, mask_index, gt_index)


def _restore_files(folders: _Folders, mine: List[Path], previous: Dict[str, Any], task: str, canon: str,
                   who: str, restore_kwargs: Dict[str, Any], rows: List[BatchRow]) -> None:
    """Restore this process's files in turn, appending a row for each (skipped, done or failed) to ``rows``."""
    out = folders.out

    def restore_one(src: Path) -> Any:
        mask, gt = folders.inputs(src)
        return restore(str(src), task, mask=mask, ground_truth=gt, return_info=True, progress=False, **restore_kwargs)

    packed = _Packer(restore_kwargs.get("pack", 1), restore_one, folders.inputs, task, restore_kwargs,
                     [src for src in mine if not output_path(out, src).exists()])
    for i, src in enumerate(mine, 1):
        where = f"{who}[{i}/{len(mine)}] {src.name}"
        dest = output_path(out, src)
        if dest.exists():
            rows.append(_skipped_row(src.name, canon, previous.get(src.name)))
            log.info("%s: skipped (%s exists)", where, dest.name)
            continue
        t0 = time.perf_counter()
        try:
            result, info = packed.result(src)
            if info.stop_reason == "keyboard_interrupt":
                raise KeyboardInterrupt  # restore() keeps Ctrl-C's result; a batch stops instead
            _checkpoint("restored", src.name)
            io.save_image(result, dest)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
            reason = " ".join(str(exc).split()) or type(exc).__name__
            if not isinstance(exc, (ValueError, TypeError, OSError)):
                reason = f"{type(exc).__name__}: {reason}"
            rows.append(BatchRow(src.name, canon, "failed", seconds=time.perf_counter() - t0, error=reason))
            log.warning("%s: failed: %s", where, reason)
            continue
        seconds = time.perf_counter() - t0
        rows.append(BatchRow(src.name, canon, "done", steps=info.steps, stop_step=info.stop_step,
                             seconds=seconds, psnr=info.psnr))
        psnr = f", PSNR {info.psnr:.2f} dB" if info.psnr is not None else ""
        stopped = f", stopped early: {info.stop_reason}" if info.interrupted else ""
        log.info("%s -> %s: done (%d steps, %.1f s%s%s)", where, dest.name, info.steps, seconds, psnr, stopped)
        _checkpoint("written", src.name)


def _merge_ranks(out: Path, world_size: int, rank: int, counts: Dict[str, int]) -> Tuple[Dict[str, int], Path]:
    """After every rank wrote its CSV, rank 0 merges them into summary.csv; every rank gets the totals."""
    import torch.distributed as dist

    dist.barrier()  # every rank's CSV is written
    if rank == 0:
        merged = [row for r in range(world_size) for row in _read_csv(out / f"summary.rank{r}.csv")]
        merged.sort(key=lambda row: row["file"])
        _write_csv(out / SUMMARY_NAME, merged)
        counts = _count([row["status"] for row in merged])
    # Every rank learns the totals, and none exits (which would make
    # torchrun stop the others) before rank 0 has written the summary.
    shared: List[Any] = [counts]
    dist.broadcast_object_list(shared, src=0)
    return shared[0], out / SUMMARY_NAME
