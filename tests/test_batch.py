"""Tests of ``dip-fast batch`` and :mod:`dip_fast.apps.batch`: folders, resuming, bad files, torchrun."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

from dip_fast.apps import batch
from dip_fast.apps.cli import main

# RuntimeWarning is an error here: no numpy or scikit-image warning may reach a user on valid input.
pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:dip_fast. the fast backend falls back")]

# The smallest real runs: the quick preset for 3 steps on one CPU thread.
FAST = ["--preset", "quick", "--iterations", "3", "--stop", "never", "--device", "cpu", "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def write_images(folder: Path, names: List[str], size: int = 16, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)


def read_rows(path: Path) -> Dict[str, Dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    names = [r["file"] for r in rows]
    assert len(names) == len(set(names)), f"a file listed twice in {path}"
    return {r["file"]: r for r in rows}


def run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def folder(tmp_path):
    """Three good images and one file of random bytes with a .png name."""
    src = tmp_path / "in"
    write_images(src, ["a.png", "b.png", "c.png"])
    (src / "broken.png").write_bytes(np.random.default_rng(1).bytes(500))
    return src


# ---------------------------------------------------------------- a batch, bad files, resuming


def test_bad_file_fails_its_row_and_the_batch_goes_on(capsys, folder, tmp_path):
    out = tmp_path / "out"
    code, _, err = run(capsys, "batch", folder, out, "--task", "denoise", *FAST)
    assert code == 1, err
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png", "c.png"]
    assert Image.open(out / "a.png").size == (16, 16)
    rows = read_rows(out / "summary.csv")
    assert list(rows) == ["a.png", "b.png", "broken.png", "c.png"]
    assert list(next(iter(rows.values()))) == list(batch.CSV_COLUMNS)
    assert {n: r["status"] for n, r in rows.items()} == {
        "a.png": "done", "b.png": "done", "c.png": "done", "broken.png": "failed"}
    assert rows["a.png"]["steps"] == "3" and float(rows["a.png"]["seconds"]) > 0 and rows["a.png"]["error"] == ""
    assert "not an image file" in rows["broken.png"]["error"]
    assert "broken.png: failed: " in err and "not an image file" in err
    assert "3 done, 0 skipped, 1 failed" in err
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary files left


def test_rerun_skips_what_is_done_and_keeps_the_outputs(capsys, folder, tmp_path):
    out = tmp_path / "out"
    assert run(capsys, "batch", folder, out, "--task", "denoise", *FAST)[0] == 1
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.png")}
    first = read_rows(out / "summary.csv")

    code, _, err = run(capsys, "batch", folder, out, "--task", "denoise", *FAST)
    assert code == 1  # the broken file is tried again, and fails again
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.png")} == before
    rows = read_rows(out / "summary.csv")
    assert {n: r["status"] for n, r in rows.items()} == {
        "a.png": "skipped", "b.png": "skipped", "c.png": "skipped", "broken.png": "failed"}
    # A skipped file keeps the numbers of the run that made its output.
    assert rows["a.png"]["steps"] == first["a.png"]["steps"] == "3"
    assert "a.png: skipped" in err and "0 done, 3 skipped, 1 failed" in err

    # Fixing the bad file finishes the batch: only it is restored.
    write_images(folder, ["broken.png"], seed=5)
    code, _, err = run(capsys, "batch", folder, out, "--task", "denoise", *FAST, "-q")
    assert code == 0 and err == ""
    assert read_rows(out / "summary.csv")["broken.png"]["status"] == "done"


def test_inpaint_masks_by_stem_and_lossy_inputs_give_png(capsys, tmp_path):
    src, masks, out = tmp_path / "in", tmp_path / "masks", tmp_path / "out"
    write_images(src, ["x.jpg", "y.png"])
    masks.mkdir()
    m = np.full((16, 16), 255, np.uint8)
    m[4:8, 4:10] = 0
    Image.fromarray(m).save(masks / "x.png")  # y has no mask
    code, _, err = run(capsys, "batch", src, out, "--task", "inpaint", "--masks", masks, *FAST)
    assert code == 1, err
    rows = read_rows(out / "summary.csv")
    assert rows["x.jpg"]["status"] == "done" and (out / "x.png").exists()  # JPEG in, PNG out
    assert rows["y.png"]["status"] == "failed" and "no mask named 'y.*'" in rows["y.png"]["error"]


def test_sr_with_ground_truth_reports_psnr(capsys, tmp_path):
    src, gt, out = tmp_path / "in", tmp_path / "gt", tmp_path / "out"
    write_images(src, ["p.png", "q.png"], size=12)
    write_images(gt, ["p.tif"], size=24)  # matched by stem, whatever the extension; q has none
    code, _, err = run(capsys, "batch", src, out, "--task", "sr", "--scale", "2", "--ground-truth", gt, *FAST)
    assert code == 0, err
    assert Image.open(out / "p.png").size == (24, 24)
    rows = read_rows(out / "summary.csv")
    assert float(rows["p.png"]["psnr"]) > 0 and rows["q.png"]["psnr"] == ""
    assert "PSNR" in err


@pytest.mark.parametrize("task, extra, key, value", [
    ("deblur", ["--blur-kernel", "gaussian:2"], "blur_kernel", "gaussian:2"),
    ("jpeg", [], "task", "jpeg"),
])
def test_other_tasks_pass_straight_to_restore(capsys, tmp_path, monkeypatch, task, extra, key, value):
    calls = []

    def fake_restore(image, task, **kwargs):
        calls.append(dict(kwargs, task=task))
        info = SimpleNamespace(steps=1, stop_step=None, psnr=None, stop_reason="completed", interrupted=False)
        return Image.new("RGB", (16, 16)), info

    monkeypatch.setattr(batch, "restore", fake_restore)
    write_images(tmp_path / "in", ["a.png"])
    code, _, err = run(capsys, "batch", tmp_path / "in", tmp_path / "out", "--task", task, *extra, *FAST)
    assert code == 0, err
    assert len(calls) == 1  # the file only: the arguments are checked without running anything
    assert all(c[key] == value for c in calls)
    assert read_rows(tmp_path / "out" / "summary.csv")["a.png"]["task"] == task


def test_ctrl_c_stops_the_batch_without_writing_the_image(capsys, tmp_path, monkeypatch):
    def fake_restore(image, task, **kwargs):
        name = Path(image).name if isinstance(image, str) else "probe"
        stop = "keyboard_interrupt" if name == "b.png" else "completed"  # restore() returns Ctrl-C's result
        info = SimpleNamespace(steps=1, stop_step=None, psnr=None, stop_reason=stop, interrupted=stop != "completed")
        return Image.new("RGB", (16, 16)), info

    monkeypatch.setattr(batch, "restore", fake_restore)
    write_images(tmp_path / "in", ["a.png", "b.png", "c.png"])
    code, _, err = run(capsys, "batch", tmp_path / "in", tmp_path / "out", "--task", "denoise", *FAST)
    assert code == 130 and "interrupted" in err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a.png"]
    assert list(read_rows(tmp_path / "out" / "summary.csv")) == ["a.png"]  # the files reached so far


# ---------------------------------------------------------------- user errors: one line, exit 2


@pytest.mark.parametrize("argv, message", [
    (["{in}", "{in}", "--task", "denoise"], "is IN_DIR; refusing"),
    (["{in}", "{in}/.", "--task", "denoise"], "is IN_DIR; refusing"),
    (["{in}", "{masks}", "--task", "inpaint", "--masks", "{masks}"], "is the masks folder; refusing"),
    (["{in}", "{out}", "--task", "inpaint", "--masks", "{tmp}/nomasks"], "masks folder: no such folder"),
    (["{in}", "{out}", "--task", "denoise", "--blur-kernel", "box:3"], "--blur-kernel only applies to --task deblur"),
    (["{tmp}/nope", "{out}", "--task", "denoise"], "IN_DIR: no such folder"),
    (["{empty}", "{out}", "--task", "denoise"], "holds no image files"),
    (["{in}", "{out}", "--task", "sr"], "--task sr needs --scale"),
    (["{in}", "{out}", "--task", "sr", "--scale", "3"], "scale must be even"),
    (["{in}", "{out}", "--task", "denoise", "--scale", "2"], "--scale only applies to --task sr"),
    (["{in}", "{out}", "--task", "inpaint"], "--task inpaint needs --masks"),
    (["{in}", "{out}", "--task", "denoise", "--iterations", "0"], "iterations must be >= 1"),
    (["{in}", "{out}", "--task", "denoise", "--preset", "huge"], "preset must be one of"),
    (["{in}", "{out}", "--task", "blur"], "invalid choice"),
])
def test_user_errors_exit_2_before_any_work(capsys, tmp_path, argv, message):
    write_images(tmp_path / "in", ["a.png"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "masks").mkdir()
    subs = {"{in}": tmp_path / "in", "{out}": tmp_path / "out", "{tmp}": tmp_path, "{empty}": tmp_path / "empty",
            "{masks}": tmp_path / "masks"}
    args = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, str(v))
        args.append(a)
    before = sorted(os.listdir(tmp_path / "in"))
    code, _, err = run(capsys, "batch", *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and message in lines[0], err
    assert sorted(os.listdir(tmp_path / "in")) == before  # nothing written among the inputs
    assert not (tmp_path / "out").exists()


def test_inputs_sharing_a_stem_are_refused(capsys, tmp_path):
    write_images(tmp_path / "in", ["a.png", "a.jpg"])
    code, _, err = run(capsys, "batch", tmp_path / "in", tmp_path / "out", "--task", "denoise", *FAST)
    assert code == 2 and "share the name 'a'" in err


def test_help_has_examples(capsys):
    code, out, _ = run(capsys, "batch", "--help")
    assert code == 0 and "examples:" in out and "torchrun --nproc_per_node=8 -m dip_fast batch" in out


# ---------------------------------------------------------------- files and shards


def test_list_images_and_output_names(tmp_path):
    write_images(tmp_path, ["b.PNG", "a.jpeg", "c.tif", ".hidden.png"])
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in batch.list_images(tmp_path)] == ["a.jpeg", "b.PNG", "c.tif"]
    out = tmp_path / "o"
    assert [batch.output_path(out, n).name for n in ("a.jpeg", "b.PNG", "c.tif", "d.webp", "e.JPG")] == [
        "a.png", "b.PNG", "c.tif", "d.png", "e.png"]


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 16, 33])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shards_cover_every_file_once(n, world_size):
    files = [f"f{i:03d}.png" for i in range(n)]
    shards = [batch.shard(files, r, world_size) for r in range(world_size)]
    merged = [f for s in shards for f in s]
    assert sorted(merged) == files  # none lost, none twice
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced


@pytest.mark.parametrize("rank, world_size", [(-1, 2), (2, 2), (0, 0)])
def test_shard_rejects_bad_ranks(rank, world_size):
    with pytest.raises(ValueError, match="rank must be"):
        batch.shard(["a"], rank, world_size)


# ---------------------------------------------------------------- torchrun


def test_torchrun_two_cpu_ranks_split_the_folder(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    names = [f"img{i}.png" for i in range(5)]
    write_images(src, names)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --standalone: torchrun binds a free port itself (a port probed here first could be taken meanwhile).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dip_fast", "batch", str(src), str(out), "--task", "denoise", *FAST]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    ranks = [read_rows(out / f"summary.rank{r}.csv") for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])  # no file restored by both
    assert sorted(set(ranks[0]) | set(ranks[1])) == names  # and none left out
    assert sorted(ranks[0]) == names[0::2] and sorted(ranks[1]) == names[1::2]
    merged = read_rows(out / "summary.csv")
    assert sorted(merged) == names and all(r["status"] == "done" for r in merged.values())
    assert sorted(p.name for p in out.glob("*.png")) == names
    assert "rank 1: " in res.stderr and "5 done, 0 skipped, 0 failed" in res.stderr
