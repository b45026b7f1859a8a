"""Tests of image input/output: kinds, dtypes, masks, padding, atomic writes."""
from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from dip_fast import io


def rgb(h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def roundtrip(image):
    """Load an image and give it straight back, as restore() would with a perfect restoration."""
    loaded = io.load_image(image)
    return loaded, io.from_tensor(loaded.color, loaded.alpha, loaded.spec)


# ---------------------------------------------------------------- kinds and dtypes


@pytest.mark.parametrize("shape", [(12, 10), (12, 10, 1), (12, 10, 2), (12, 10, 3), (12, 10, 4)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_numpy_roundtrip_is_exact(shape, dtype):
    rng = np.random.default_rng(1)
    if np.issubdtype(dtype, np.integer):
        arr = rng.integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)
    else:
        arr = rng.random(shape).astype(dtype)
    loaded, back = roundtrip(arr)
    assert loaded.color.shape == (1, 3 if shape[-1] in (3, 4) and len(shape) == 3 else 1, 12, 10)
    assert (loaded.alpha is not None) == (len(shape) == 3 and shape[2] in (2, 4))
    assert back.dtype == arr.dtype and back.shape == arr.shape
    if np.issubdtype(dtype, np.integer):
        np.testing.assert_array_equal(back, arr)
    else:
        np.testing.assert_allclose(back, arr, atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_pil_roundtrip_keeps_mode(mode):
    img = Image.fromarray(rgb()).convert(mode)
    _, back = roundtrip(img)
    assert isinstance(back, Image.Image) and back.mode == mode and back.size == img.size
    np.testing.assert_array_equal(np.asarray(back), np.asarray(img))


def test_pil_other_modes_are_converted():
    p = Image.fromarray(rgb()).convert("P")
    assert roundtrip(p)[1].mode == "RGB"
    bilevel = Image.fromarray(rgb()[:, :, 0] > 127)
    assert bilevel.mode == "1" and roundtrip(bilevel)[1].mode == "L"
    assert roundtrip(Image.fromarray(rgb()).convert("CMYK"))[1].mode == "RGB"


def test_pil_16bit_and_float_modes():
    arr16 = np.random.default_rng(2).integers(0, 65536, (12, 10)).astype(np.uint16)
    img = Image.fromarray(arr16)
    assert img.mode == "I;16"
    loaded, back = roundtrip(img)
    assert loaded.spec.bit_depth == 16 and back.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(back), arr16)
    f = Image.fromarray(np.random.default_rng(3).random((12, 10)).astype(np.float32))
    assert roundtrip(f)[1].mode == "F"


@pytest.mark.parametrize("shape", [(3, 12, 10), (1, 3, 12, 10), (4, 12, 10), (1, 12, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_tensor_roundtrip(shape, dtype):
    t = torch.rand(shape, dtype=dtype)
    _, back = roundtrip(t)
    assert back.dtype == dtype and back.shape == t.shape and back.device == t.device
    assert torch.allclose(back.float(), t.float(), atol=1e-3)


def test_path_8bit_gives_pil(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(rgb()).save(path)
    loaded, back = roundtrip(str(path))
    assert isinstance(back, Image.Image) and back.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(back), rgb())
    assert isinstance(roundtrip(path)[1], Image.Image)  # PathLike too


def test_path_16bit_grey_png_gives_uint16(tmp_path):
    arr = np.random.default_rng(4).integers(0, 65536, (12, 10)).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    _, back = roundtrip(path)
    assert isinstance(back, np.ndarray) and back.dtype == np.uint16
    np.testing.assert_array_equal(back, arr)


def test_path_16bit_colour_tiff_keeps_16_bits(tmp_path):
    arr = np.random.default_rng(5).integers(0, 65536, (12, 10, 3)).astype(np.uint16)
    path = tmp_path / "c16.tif"
    tifffile.imwrite(path, arr, photometric="rgb")
    _, back = roundtrip(path)
    assert back.dtype == np.uint16 and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_exif_orientation_is_applied(tmp_path):
    arr = rgb(12, 20)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree turn
    path = tmp_path / "rot.png"
    img.save(path, exif=exif)
    back = roundtrip(path)[1]
    assert back.size == (12, 20)  # width and height swapped
    np.testing.assert_array_equal(np.asarray(back), np.rot90(arr, -1))


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize(
    "mask",
    [
        np.array([[True, False]] * 6).repeat(5, axis=1),
        (np.array([[1, 0]] * 6).repeat(5, axis=1) * 255).astype(np.uint8),
        np.array([[1, 0]] * 6).repeat(5, axis=1).astype(np.uint8),
        np.array([[1.0, 0.0]] * 6).repeat(5, axis=1).astype(np.float32),
        torch.tensor([[True, False]] * 6).repeat_interleave(5, dim=1),
        torch.tensor([[[1.0, 0.0]] * 6]).repeat_interleave(5, dim=2),
        Image.fromarray((np.array([[1, 0]] * 6).repeat(5, axis=1) * 255).astype(np.uint8)),
    ],
)
def test_mask_kinds(mask):
    m = io.load_mask(mask, 6, 10, 3)
    assert m.shape == (1, 1, 6, 10) and m.dtype == torch.float32
    assert m[0, 0, 0, :5].eq(1).all() and m[0, 0, 0, 5:].eq(0).all()


def test_mask_per_channel_and_identical_channels():
    m = np.ones((6, 10, 3), dtype=bool)
    m[0, 0, 1] = False
    assert io.load_mask(m, 6, 10, 3).shape == (1, 3, 6, 10)
    assert io.load_mask(np.ones((6, 10, 3), bool), 6, 10, 3).shape == (1, 1, 6, 10)
    with pytest.raises(ValueError, match="mask must have 1 channel"):
        io.load_mask(m, 6, 10, 1)


def test_mask_from_file(tmp_path):
    arr = np.full((6, 10), 255, np.uint8)
    arr[2:4] = 0
    Image.fromarray(arr).save(tmp_path / "m.png")
    m = io.load_mask(str(tmp_path / "m.png"), 6, 10, 3)
    assert m.sum() == 40


@pytest.mark.parametrize(
    "mask, exc, match",
    [
        (np.ones((5, 10), bool), ValueError, "mask must have the image's size"),
        (np.full((6, 10), 0.5), ValueError, "mask must be binary"),
        (np.zeros((6, 10), bool), ValueError, "no known pixel"),
        (np.ones((6, 10), complex), TypeError, "mask"),
        ("no/such/mask.png", FileNotFoundError, "mask"),
        (3.0, TypeError, "mask"),
    ],
)
def test_bad_masks(mask, exc, match):
    with pytest.raises(exc, match=match):
        io.load_mask(mask, 6, 10, 3)


# ---------------------------------------------------------------- padding


@pytest.mark.parametrize("size", [(8, 9), (13, 40), (2, 5), (64, 64), (33, 70)])
def test_pad_matches_numpy_reflection_and_crops_back(size):
    x = torch.rand(1, 3, *size, dtype=torch.float64)
    padded, box = io.pad_to_multiple(x, 32, min_size=64)
    h, w = padded.shape[-2:]
    assert h % 32 == 0 and w % 32 == 0 and h >= 64 and w >= 64
    top, left, hh, ww = box
    assert (hh, ww) == size
    expected = np.pad(x.numpy(), ((0, 0), (0, 0), (top, h - hh - top), (left, w - ww - left)), mode="reflect")
    np.testing.assert_array_equal(padded.numpy(), expected)
    assert torch.equal(io.crop(padded, box), x)


def test_pad_one_pixel_axis_replicates():
    x = torch.arange(5.0).reshape(1, 1, 1, 5)
    padded, box = io.pad_to_multiple(x, 8)
    assert padded.shape[-2:] == (8, 8)
    assert torch.equal(padded[0, 0], padded[0, 0, :1].expand(8, 8))
    assert torch.equal(io.crop(padded, box), x)


def test_crop_scaled_box():
    x = torch.rand(1, 1, 40, 40)
    assert io.crop(x, (1, 2, 3, 4), scale=4).shape[-2:] == (12, 16)


def test_resize_alpha():
    a = torch.ones(1, 1, 5, 6)
    out = io.resize_alpha(a, 4)
    assert out.shape == (1, 1, 20, 24) and torch.allclose(out, torch.ones_like(out))


# ---------------------------------------------------------------- writing


def _no_temp_files(folder) -> bool:
    return not [p for p in os.listdir(folder) if p.startswith(".")]


def test_save_is_atomic_and_refuses_existing(tmp_path):
    out = tmp_path / "o.png"
    io.save_image(Image.fromarray(rgb()), out)
    assert _no_temp_files(tmp_path)
    with pytest.raises(FileExistsError, match="already exists"):
        io.save_image(Image.fromarray(rgb(seed=1)), out)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), rgb())
    io.save_image(Image.fromarray(rgb(seed=1)), out, overwrite=True)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), rgb(seed=1))
    assert _no_temp_files(tmp_path)


def test_save_failure_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="JPEG cannot store an alpha"):
        io.save_image(Image.fromarray(rgb()).convert("RGBA"), tmp_path / "o.jpg")
    assert os.listdir(tmp_path) == []


def test_save_16bit(tmp_path):
    grey = np.random.default_rng(6).integers(0, 65536, (12, 10)).astype(np.uint16)
    io.save_image(grey, tmp_path / "g.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g.png")), grey)
    colour = np.random.default_rng(7).integers(0, 65536, (12, 10, 3)).astype(np.uint16)
    with pytest.raises(ValueError, match="only be written as .tif"):
        io.save_image(colour, tmp_path / "c.png")
    io.save_image(colour, tmp_path / "c.tif")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "c.tif"), colour)


def test_save_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="unknown image extension"):
        io.save_image(Image.fromarray(rgb()), tmp_path / "o.xyz")


def test_atomic_path_replaces_on_success_only_and_keeps_normal_permissions(tmp_path):
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert dest.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    before = os.umask(0o022)
    try:
        with io.atomic_path(dest) as tmp:
            tmp.write_text("new")
    finally:
        os.umask(before)
    assert dest.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    assert dest.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600


def test_remove_stale_temporaries_only_touches_atomic_path_names(tmp_path):
    with pytest.raises(RuntimeError):
        with io.atomic_path(tmp_path / "a.png") as tmp:
            tmp.write_bytes(b"half")
            stale = tmp.with_name(tmp.name)  # the name a SIGKILLed run would have left
            os.link(tmp, tmp_path / "kept")
            raise RuntimeError
    (tmp_path / "kept").rename(stale)
    keep = [".a.png.notrandom!.png", ".b.png.abcdefgh.png", "a.png.abcdefgh.png", ".a.png.abcdefgh.jpg"]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    assert io.remove_stale_temporaries(tmp_path, ["a.png"]) == 1
    assert not stale.exists() and sorted(os.listdir(tmp_path)) == sorted(keep)
