"""Inputs at the edge of what restore() accepts: files Pillow refuses, and degenerate images.

Every file Pillow cannot or will not open must give a ValueError naming the
file and the reason (exit status 2 and one line in the command line); every
number a run derives from degenerate pixels must be finite, and no numpy or
scikit-image RuntimeWarning may reach the user (an error in this module).
"""
from __future__ import annotations

import math
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dip_fast.core import metrics
from dip_fast.pipeline import noise_level
from dip_fast.api import restore
from dip_fast.apps.cli import main

from .test_api import rgb8, tiny

pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:dip_fast. the fast backend falls back"),
              pytest.mark.usefixtures("one_thread")]


# ---------------------------------------------------------------- files Pillow refuses


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A greyscale PNG whose header claims ``width x height`` pixels, with no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b""))
                     + _png_chunk(b"IEND", b""))
    return path


def bad_files(folder: Path) -> dict:
    """Files that Pillow cannot or will not read, and the reason each message must give."""
    good = folder / "good.png"
    Image.fromarray(rgb8(64, 64)).save(good)
    data = good.read_bytes()
    files = {
        # About 9e8 pixels: beyond twice PIL.Image.MAX_IMAGE_PIXELS, Pillow raises DecompressionBombError.
        "bomb.png": (png_header_only(folder / "bomb.png", 30000, 30000), "MAX_IMAGE_PIXELS"),
        "empty.png": (folder / "empty.png", "not an image file"),
        "signature_only.png": (folder / "signature_only.png", "not an image file"),
        "cut.png": (folder / "cut.png", "truncated"),
        "no_pixels.png": (png_header_only(folder / "no_pixels.png", 16, 16), "truncated"),
    }
    files["empty.png"][0].write_bytes(b"")
    files["signature_only.png"][0].write_bytes(data[:8] + b"\x00" * 40)
    files["cut.png"][0].write_bytes(data[: len(data) // 2])
    return files


@pytest.fixture
def refused(tmp_path) -> dict:
    return bad_files(tmp_path)


@pytest.mark.parametrize("name", ["bomb.png", "empty.png", "signature_only.png", "cut.png", "no_pixels.png"])
def test_refused_file_is_a_value_error_naming_file_and_reason(refused, name):
    path, reason = refused[name]
    with pytest.raises(ValueError, match=f"image: .*'{re.escape(str(path))}'.*{reason}"):
        restore(str(path), preset=tiny())


def test_refused_mask_and_ground_truth_name_their_argument(refused):
    bomb, _ = refused["bomb.png"]
    with pytest.raises(ValueError, match=f"mask: .*'{re.escape(str(bomb))}'.*MAX_IMAGE_PIXELS"):
        restore(rgb8(), "inpaint", mask=str(bomb), preset=tiny("inpaint"))
    with pytest.raises(ValueError, match=f"ground_truth: .*'{re.escape(str(bomb))}'.*MAX_IMAGE_PIXELS"):
        restore(rgb8(), ground_truth=str(bomb), preset=tiny())


@pytest.mark.parametrize("name", ["bomb.png", "empty.png", "cut.png", "no_pixels.png"])
def test_cli_refused_file_exits_2_with_one_line(refused, tmp_path, capsys, name):
    path, reason = refused[name]
    out = tmp_path / "out.png"
    code = main(["denoise", str(path), "-o", str(out), "--preset", "quick", "--iterations", "1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("dip-fast denoise: error:") and str(path) in lines[0] and reason in lines[0]
    assert not out.exists()


def test_cli_writes_a_constant_image_as_it_is(tmp_path, capsys):
    src, out = tmp_path / "black.png", tmp_path / "out.png"
    Image.fromarray(CONSTANT_IMAGES["black-uint8"]).save(src)
    code = main(["denoise", str(src), "-o", str(out), "--ground-truth", str(src), "--plot", "--preset", "quick"])
    err = capsys.readouterr().err
    assert code == 0 and "one colour: returned as it is" in err and "PSNR inf dB" in err, err
    assert np.array_equal(np.asarray(Image.open(out)), CONSTANT_IMAGES["black-uint8"])
    assert (tmp_path / "out.curve.png").exists()


def test_cli_refused_mask_exits_2(refused, tmp_path, capsys):
    good = tmp_path / "good.png"
    bomb, _ = refused["bomb.png"]
    code = main(["inpaint", str(good), "--mask", str(bomb), "-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code == 2 and "--mask" in err and str(bomb) in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------- constant images


CONSTANT_IMAGES = {
    "black-uint8": np.zeros((20, 24, 3), np.uint8),
    "white-uint8-grey": np.full((20, 24), 255, np.uint8),
    "white-uint16": np.full((20, 24), 65535, np.uint16),
    "black-float": np.zeros((20, 24), np.float32),
    "white-float": np.ones((20, 24, 3), np.float64),
    "one-colour": np.broadcast_to(np.array([10, 200, 30], np.uint8), (20, 24, 3)).copy(),
}


@pytest.mark.parametrize("task", ["denoise", "jpeg", "deblur"])
@pytest.mark.parametrize("name", list(CONSTANT_IMAGES))
def test_constant_image_is_its_own_restoration(name, task):
    image = CONSTANT_IMAGES[name]
    extra = {"blur_kernel": "gaussian:1"} if task == "deblur" else {}
    out, info = restore(image, task, preset=tiny(task), return_info=True, **extra)
    assert out.dtype == image.dtype and np.array_equal(out, image)
    assert info.stop_reason == "constant" and info.steps == 0 and not info.interrupted
    assert math.isfinite(info.reg_noise_std)
    assert info.sigma == (0.0 if task == "denoise" else None)


def test_constant_tensor_and_pil_come_back_alike():
    t = torch.full((1, 3, 16, 16), 0.25, dtype=torch.float64)
    out = restore(t, preset=tiny())
    assert out.dtype == torch.float64 and out.shape == t.shape and torch.equal(out, t)
    img = Image.new("RGB", (16, 12), (0, 0, 0))
    out = restore(img, preset=tiny())
    assert isinstance(out, Image.Image) and out.size == (16, 12) and np.array_equal(np.asarray(out), np.asarray(img))


def test_constant_colour_keeps_varying_alpha():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 3] = np.arange(16, dtype=np.uint8)[:, None] * 16
    out = restore(rgba, preset=tiny())
    assert np.array_equal(out, rgba)


def test_constant_image_super_resolution_is_the_constant_upscaled():
    image = CONSTANT_IMAGES["one-colour"]
    out, info = restore(image, "sr", scale=2, preset=tiny("super_resolution"), return_info=True)
    assert out.shape == (40, 48, 3) and info.stop_reason == "constant"
    assert np.array_equal(np.unique(out.reshape(-1, 3), axis=0), [[10, 200, 30]])


def test_mask_with_a_single_known_pixel_fills_its_colour():
    image = rgb8(16, 16)
    mask = np.zeros((16, 16), bool)
    mask[3, 4] = True
    out, info = restore(image, "inpaint", mask=mask, preset=tiny("inpaint"), return_info=True)
    assert info.stop_reason == "constant"
    assert np.array_equal(out, np.broadcast_to(image[3, 4], image.shape))


def test_per_channel_mask_without_known_pixel_in_a_channel_is_fitted():
    """A channel with no known pixel has no value to spread: the image is fitted instead."""
    image = np.zeros((16, 16, 3), np.uint8)
    mask = np.zeros((16, 16, 3), bool)
    mask[..., :2] = True  # the blue channel has no known pixel
    _, info = restore(image, "inpaint", mask=mask, preset=tiny("inpaint"), return_info=True)
    assert info.stop_reason == "completed" and info.steps == 3


def test_known_pixels_of_one_colour_fill_everything():
    image = rgb8(16, 16)
    mask = np.zeros((16, 16), bool)
    mask[:8] = True
    image[:8] = (7, 8, 9)
    out = restore(image, "inpaint", mask=mask, preset=tiny("inpaint"))
    assert np.array_equal(out, np.broadcast_to(np.array([7, 8, 9], np.uint8), image.shape))


def test_psnr_of_perfect_and_constant_images():
    image = CONSTANT_IMAGES["black-uint8"]
    _, info = restore(image, preset=tiny(), ground_truth=image, return_info=True)
    assert info.psnr == math.inf  # a perfect restoration
    _, info = restore(image, preset=tiny(), ground_truth=np.full_like(image, 255), return_info=True)
    assert info.psnr == pytest.approx(0.0)  # the whole range wrong: MSE 1
    a, b = torch.zeros(1, 1, 8, 8), torch.full((1, 1, 8, 8), 0.5)
    assert float(metrics.psnr(a, b)) == pytest.approx(10 * math.log10(4))
    assert float(metrics.psnr(a, a)) == math.inf


def test_callable_task_on_a_constant_observation_is_still_fitted():
    def identity(x):
        return x

    obs = torch.zeros(1, 16, 16)
    out, info = restore(obs, identity, output_shape=(1, 16, 16), preset="callable_quick", iterations=2,
                        return_info=True)
    assert info.steps == 2 and torch.isfinite(out).all()


# ---------------------------------------------------------------- the noise estimate


def test_sigma_of_a_flat_image_falls_back_to_zero_with_a_warning():
    with pytest.warns(UserWarning, match="cannot estimate the noise level.*assuming sigma=0"):
        sigma = noise_level.estimate_sigma(torch.zeros(1, 3, 16, 16))
    assert sigma == 0.0


def test_sigma_ignores_channels_without_detail():
    rng = np.random.default_rng(1)
    red = np.clip(0.5 + rng.normal(0, 20 / 255, (48, 48)), 0, 1)
    image = np.zeros((48, 48, 3))
    image[..., 0] = red
    _, info = restore(image, preset=tiny(), return_info=True)
    alone = noise_level.estimate_sigma(torch.from_numpy(red)[None, None])
    assert info.sigma == pytest.approx(alone) and info.sigma == pytest.approx(20, rel=0.2)


@pytest.mark.parametrize("kind", ["vertical-line", "horizontal-line", "single-pixel", "stripes"])
def test_one_pixel_wide_structures_give_finite_settings(kind):
    image = np.zeros((32, 32), np.uint8)
    if kind == "vertical-line":
        image[:, 10] = 255
    elif kind == "horizontal-line":
        image[7] = 255
    elif kind == "single-pixel":
        image[5, 9] = 255
    else:
        image[:, ::2] = 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the flat-image fallback may say so; it is not under test
        out, info = restore(image, preset=tiny(), stop="never", return_info=True)
    assert math.isfinite(info.sigma) and info.sigma >= 0 and math.isfinite(info.reg_noise_std)
    assert out.shape == image.shape and info.steps == 3 and all(map(math.isfinite, info.loss_history))


@pytest.mark.parametrize("levels", [(0, 1, 2), (0, 32768, 65535)], ids=["dark", "spread"])
def test_sixteen_bit_image_with_three_levels(levels):
    image = np.random.default_rng(2).choice(np.array(levels, np.uint16), (32, 32))
    out, info = restore(image, preset=tiny(), stop="never", return_info=True)
    assert out.dtype == np.uint16 and out.shape == image.shape
    assert math.isfinite(info.sigma) and info.sigma >= 0 and math.isfinite(info.reg_noise_std)
    assert all(map(math.isfinite, info.loss_history))
