"""Tests of the dip-fast command line (in-process through main(), plus one real subprocess)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dip_fast.apps import demo
from dip_fast import tasks
from dip_fast.apps.cli import main

# RuntimeWarning is an error here: no numpy or scikit-image warning may reach a user on valid input.
pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:dip_fast. the fast backend falls back")]

TINY_NET = tasks._net(num_channels_down=[8, 8, 8], num_channels_up=[8, 8, 8], num_channels_skip=[4, 4, 4])


@pytest.fixture(autouse=True)
def tiny_presets(monkeypatch):
    """Register 3-step presets under names the command line can select."""
    for task, extra in (("denoise", {}), ("inpaint", {}), ("super_resolution", {"sr_factor": 2}), ("deblur", {}),
                        ("jpeg", {})):
        monkeypatch.setitem(tasks.PRESETS, f"tiny_{task}", tasks.Preset(
            name=f"tiny_{task}", task=task, network=TINY_NET, input_depth=4, iterations=3, **extra))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- commands


def test_denoise_writes_output(capsys, image, tmp_path):
    out = tmp_path / "out.png"
    code, _, err = run(capsys, "denoise", image, "-o", out, "--preset", "tiny_denoise", "--sigma", "25", "--stop", "never")
    assert code == 0, err
    assert Image.open(out).size == (24, 20)
    assert f"wrote {out}" in err and "3 steps" in err
    assert sorted(os.listdir(tmp_path)) == ["in.png", "out.png"]  # no temporary files left


def test_inpaint_with_mask(capsys, image, tmp_path):
    mask = np.full((20, 24), 255, np.uint8)
    mask[5:10, 5:12] = 0
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "filled.png"
    code, _, err = run(capsys, "inpaint", image, "--mask", tmp_path / "mask.png", "-o", out, "--preset", "tiny_inpaint")
    assert code == 0, err
    assert Image.open(out).size == (24, 20)


def test_sr_scales_output(capsys, image, tmp_path):
    out = tmp_path / "big.png"
    code, _, err = run(capsys, "sr", image, "--scale", 2, "-o", out, "--preset", "tiny_super_resolution", "-q")
    assert code == 0, err
    assert Image.open(out).size == (48, 40)
    assert err == ""  # --quiet


def test_deblur_and_jpeg_write_outputs(capsys, image, tmp_path):
    out = tmp_path / "sharp.png"
    code, _, err = run(capsys, "deblur", image, "--blur-kernel", "gaussian:1", "-o", out, "--preset", "tiny_deblur",
                       "--precision", "bf16", "--stop", "never")
    assert code == 0, err
    assert Image.open(out).size == (24, 20) and "3 steps" in err
    out = tmp_path / "restored.png"
    code, _, err = run(capsys, "jpeg", image, "-o", out, "--preset", "tiny_jpeg", "--step-mode", "eager", "-q")
    assert code == 0, err
    assert Image.open(out).size == (24, 20)


def test_sixteen_bit_file_stays_sixteen_bit(capsys, tmp_path):
    src = tmp_path / "g16.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 65536, (20, 24)).astype(np.uint16)).save(src)
    out = tmp_path / "o16.png"
    code, _, err = run(capsys, "denoise", src, "-o", out, "--preset", "tiny_denoise", "-q")
    assert code == 0, err
    assert Image.open(out).mode == "I;16"


def test_progress_ground_truth_snapshots_and_plot(capsys, image, tmp_path):
    out = tmp_path / "out.png"
    code, _, err = run(capsys, "denoise", image, "-o", out, "--preset", "tiny_denoise", "--iterations", 4,
                       "--ground-truth", image, "--save-every", 2, "--plot", "--stop", "never")
    assert code == 0, err
    assert "loss=" in err and "psnr=" in err and "PSNR" in err
    assert (tmp_path / "out.step00002.png").exists() and (tmp_path / "out.step00004.png").exists()
    assert Image.open(tmp_path / "out.curve.png").format == "PNG"


def test_max_time_writes_result_so_far(capsys, image, tmp_path):
    out = tmp_path / "out.png"
    code, _, err = run(capsys, "denoise", image, "-o", out, "--preset", "tiny_denoise",
                       "--iterations", 100000, "--max-time", 0.2, "--stop", "never")
    assert code == 0, err
    assert out.exists() and "stopped early: max_time" in err


# ---------------------------------------------------------------- outputs: overwrite, atomicity


def test_refuses_existing_output_without_force(capsys, image, tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"keep me")
    code, _, err = run(capsys, "denoise", image, "-o", out, "--preset", "tiny_denoise")
    assert code == 2 and "already exists; use --force" in one_line_error(err)
    assert out.read_bytes() == b"keep me"
    code, _, err = run(capsys, "denoise", image, "-o", out, "--preset", "tiny_denoise", "--force", "-q")
    assert code == 0, err
    assert Image.open(out).size == (24, 20)


def test_refuses_to_overwrite_input(capsys, image):
    before = image.read_bytes()
    code, _, err = run(capsys, "denoise", image, "-o", image, "--force", "--preset", "tiny_denoise")
    assert code == 2 and "is the input file" in one_line_error(err)
    assert image.read_bytes() == before


def test_failed_run_leaves_no_file(capsys, image, tmp_path):
    out = tmp_path / "out.png"
    code, _, err = run(capsys, "denoise", image, "-o", out, "--preset", "tiny_denoise", "--iterations", 0)
    assert code == 2 and "iterations must be >= 1" in one_line_error(err)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["in.png"]


# ---------------------------------------------------------------- user errors: one line, exit 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["denoise", "missing.png", "-o", "{tmp}/o.png"], "IN: no such file"),
        (["denoise", "{img}", "-o", "{tmp}/o.xyz"], "unknown image extension"),
        (["denoise", "{img}", "-o", "{tmp}/no/such/dir/o.png"], "does not exist"),
        (["denoise", "{img}", "-o", "{tmp}/o.png", "--preset", "huge"], "preset must be one of"),
        (["denoise", "{img}", "-o", "{tmp}/o.png", "--sigma", "-3"], "sigma must be"),
        (["inpaint", "{img}", "--mask", "{tmp}/nomask.png", "-o", "{tmp}/o.png"], "--mask: no such file"),
        (["inpaint", "{img}", "--mask", "{text}", "-o", "{tmp}/o.png"], "is not an image file"),
        (["inpaint", "{img}", "--mask", "{small}", "-o", "{tmp}/o.png"], "mask must have the image's size"),
        (["sr", "{img}", "--scale", "1", "-o", "{tmp}/o.png"], "scale must be >= 2"),
        (["sr", "{img}", "--scale", "3", "-o", "{tmp}/o.png"], "scale must be even"),
        (["sr", "{img}", "--scale", "two", "-o", "{tmp}/o.png"], "invalid int value"),
        (["sr", "{img}", "-o", "{tmp}/o.png"], "the following arguments are required: --scale"),
        (["denoise", "{img}"], "the following arguments are required: -o/--output"),
        (["deblur", "{img}", "-o", "{tmp}/o.png"], "the following arguments are required: --blur-kernel"),
        (["deblur", "{img}", "-o", "{tmp}/o.png", "--blur-kernel", "box:2"], "blur_kernel"),
        (["jpeg", "{img}", "-o", "{tmp}/o.png", "--stop", "soon"], "invalid choice"),
        (["denoise", "{img}", "-o", "{tmp}/o.png", "--precision", "fp8"], "invalid choice"),
        (["blur", "{img}"], "invalid choice"),
        (["denoise", "{img}", "-o", "{tmp}/o.png", "--save-every", "0"], "--save-every must be >= 1"),
        (["denoise", "{img}", "-o", "{tmp}/o.png", "--save-every", "5", "--restarts", "2"],
         "--save-every follows a single run; --restarts K runs several"),
        (["denoise", "{img}", "-o", "{tmp}/o.png", "--save-every", "5", "--tile", "32"],
         "--save-every follows a single run; --tile"),
        (["denoise", "{text}", "-o", "{tmp}/o.png"], "is not an image file"),
        (["denoise", "{img}", "-o", "{tmp}/o.png", "--device", "cuda:7"], "cuda"),
    ],
)
def test_user_errors_are_one_line_exit_2(capsys, image, tmp_path, argv, message):
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "small.png")
    subs = {"{img}": str(image), "{tmp}": str(tmp_path), "{text}": str(tmp_path / "text.png"),
            "{small}": str(tmp_path / "small.png")}
    args = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        args.append(a)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in one_line_error(err)


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["denoise", "inpaint", "deblur", "jpeg", "sr", "batch", "demo"])
def test_help_has_examples(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"dip-fast {command}" in out


def test_help_in_a_real_process():
    res = subprocess.run([sys.executable, "-m", "dip_fast", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for command in ("denoise", "inpaint", "sr", "demo"):
        assert command in res.stdout


# ---------------------------------------------------------------- demo


def test_demo_runs_and_writes_everything(capsys, tmp_path, monkeypatch):
    # Two steps per task keep this quick; the real step counts are measured in the README.
    monkeypatch.setattr(demo, "CPU_ITERATIONS", {"denoise": 2, "inpaint": 2, "super_resolution": 2})
    code, out, err = run(capsys, "demo", "--out", tmp_path / "demo", "--device", "cpu", "--threads", 1, "-q")
    assert code == 0, err
    names = set(os.listdir(tmp_path / "demo"))
    for task in ("denoise", "inpaint", "sr"):
        assert {f"{task}_input.png", f"{task}_output.png", f"{task}_comparison.png"} <= names
    assert {"sr_bicubic.png", "results.md"} <= names
    assert "| task |" in out and "bicubic" in out and "128x128 crop" in out


def test_demo_threads_follow_the_cores_busy_now(monkeypatch):
    import torch

    cores = os.cpu_count() or 1
    assert 0.0 <= demo.busy_cores(window=0.05) <= cores + 1e-6
    assert demo.cpu_threads(busy=float(cores)) == 1  # every core taken: one thread waits least
    assert demo.cpu_threads(busy=0.0) == torch.get_num_threads()
    # The load average lags a minute behind (after `make setup`'s compile, say): it is not what decides.
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert demo.cpu_threads(busy=0.0) == torch.get_num_threads()
