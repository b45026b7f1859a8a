"""Image input and output for :func:`dip_fast.restore` and the command line.

Everything the restoration code sees is a float32 tensor of shape
``(1, C, H, W)`` with values in [0, 1] and ``C`` = 1 (grey) or 3 (RGB).  This
module turns whatever the caller passed into that form, remembers how to
turn the result back (:class:`ImageSpec`), and owns the image-shaped chores
around a run: checking inputs, masks, padding to the network's size
multiple, alpha channels and writing files atomically.

Accepted images
---------------
* a path (``str`` or ``os.PathLike``), read with Pillow; the EXIF orientation
  is applied.  16-bit greyscale PNG/TIFF keep 16 bits; 16-bit colour TIFF is
  read with ``tifffile`` (Pillow would reduce it to 8 bits); 16-bit colour PNG
  can only be read at 8 bits by Pillow, which is said in a warning.
* a ``PIL.Image.Image`` (modes 1, L, LA, P, PA, RGB, RGBA, I;16*, I, F, and
  anything Pillow converts to RGB, such as CMYK or YCbCr);
* a numpy array ``H x W`` or ``H x W x C`` of dtype uint8, uint16 or float
  (values in [0, 1]);
* a torch tensor ``C x H x W`` or ``1 x C x H x W``, floating point in [0, 1].

``C`` is 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA).  Alpha is never
restored: it is passed through unchanged (and resized for super-resolution).

Examples:
    >>> import numpy as np
    >>> from dip_fast import io
    >>> rgba = np.zeros((10, 12, 4), np.uint8)
    >>> loaded = io.load_image(rgba)
    >>> tuple(loaded.color.shape), tuple(loaded.alpha.shape), loaded.spec.kind
    ((1, 3, 10, 12), (1, 1, 10, 12), 'numpy')
    >>> padded, box = io.pad_to_multiple(loaded.color, 8)
    >>> tuple(padded.shape[2:]), box
    ((16, 16), (3, 2, 10, 12))
    >>> back = io.from_tensor(io.crop(padded, box), loaded.alpha, loaded.spec)
    >>> back.shape, back.dtype
    ((10, 12, 4), dtype('uint8'))
"""
from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "atomic_path",
    "save_figure",
    "MIN_SIZE",
    "ImageLike",
    "ImageSpec",
    "LoadedImage",
    "crop",
    "from_tensor",
    "inspect_image",
    "load_image",
    "load_mask",
    "open_image_file",
    "pad_to_multiple",
    "remove_stale_temporaries",
    "resize_alpha",
    "save_image",
]

#: Smallest accepted side, in pixels.
MIN_SIZE = 8

ImageLike = Union[str, "os.PathLike[str]", Image.Image, np.ndarray, torch.Tensor]

_FLOAT_NP = (np.float16, np.float32, np.float64)
_MAX_VALUE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
# Pillow modes whose pixels are greyscale 16-bit integers.
_I16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


@dataclass
class ImageSpec:
    """How the caller's image looked, so that the result can be given back alike.

    Attributes:
        kind: ``'path'``, ``'pil'``, ``'numpy'`` or ``'tensor'``.
        height, width: spatial size.
        channels: channels including alpha (1 to 4).
        has_alpha: whether the last channel is alpha (``channels`` 2 or 4).
        dtype: the numpy dtype (path, pil, numpy) or torch dtype (tensor) of the values.
        layout: ``'HW'`` or ``'HWC'`` (numpy), ``'CHW'`` or ``'NCHW'`` (tensor), ``''`` otherwise.
        device: the tensor's device (tensor only).
        pil_mode: the mode to return for PIL input.
    """

    kind: str
    height: int
    width: int
    channels: int
    has_alpha: bool
    dtype: Any
    layout: str = ""
    device: Optional[torch.device] = None
    pil_mode: str = ""

    @property
    def color_channels(self) -> int:
        """Channels that are restored (1 or 3)."""
        return self.channels - 1 if self.has_alpha else self.channels

    @property
    def bit_depth(self) -> Optional[int]:
        """8 or 16 for integer images, None for floating point."""
        if self.kind == "tensor":
            return None
        return {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(np.dtype(self.dtype))


@dataclass
class LoadedImage:
    """An image converted for restoration.

    Attributes:
        color: ``(1, C, H, W)`` float32 in [0, 1] on the CPU, ``C`` 1 or 3.
        alpha: ``(1, 1, H, W)`` float32 alpha channel, or None.
        spec: how to give a result back in the caller's format.
    """

    color: torch.Tensor
    alpha: Optional[torch.Tensor]
    spec: ImageSpec


# --------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------


def _check_path(path: Union[str, "os.PathLike[str]"], name: str) -> Path:
    p = Path(os.fspath(path))
    if not p.exists():
        raise FileNotFoundError(f"{name}: no such file: '{p}'")
    if p.is_dir():
        raise ValueError(f"{name}: expected an image file, got a directory: '{p}'")
    return p


# What Pillow (and tifffile) raise for a file they cannot or will not read.
# Besides OSError, a malformed header or chunk surfaces from the format
# plugins as SyntaxError, struct.error, EOFError, IndexError, KeyError,
# TypeError or ZeroDivisionError, and the decompression-bomb guard raises
# DecompressionBombError, which derives from Exception only.
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError,
               ZeroDivisionError, Image.DecompressionBombError)


def _unreadable_reason(exc: BaseException) -> str:
    """Why Pillow refused a file, in words for a one-line message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, Image.DecompressionBombError):
        # Pillow's guard against files whose header promises a huge image.
        return f"{text} (Pillow's size limit PIL.Image.MAX_IMAGE_PIXELS; raise it only for a file you trust)"
    return text


def open_image_file(path: Union[str, "os.PathLike[str]"], name: str = "image") -> Image.Image:
    """Open an image file lazily (header only); the pixels are decoded by :func:`read_image_file`.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not an image Pillow can read, or one it refuses
            to open (such as a header claiming more pixels than
            ``PIL.Image.MAX_IMAGE_PIXELS`` allows); the message names the file and the reason.
    """
    p = _check_path(path, name)
    try:
        return Image.open(p)
    except UnidentifiedImageError:
        raise ValueError(f"{name}: '{p}' is not an image file Pillow can read") from None
    except _UNREADABLE as exc:
        raise ValueError(f"{name}: cannot open '{p}' as an image: {_unreadable_reason(exc)}") from None


# Orientation tag values and the numpy operation that undoes each (the same
# table as ImageOps.exif_transpose), for arrays that Pillow does not decode.
_ORIENT_OPS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(np.swapaxes(a, 0, 1), 2),
    8: lambda a: np.rot90(a, 1),
}


def _is_16bit_color(img: Image.Image) -> bool:
    """Whether Pillow would reduce this file's 16-bit colour samples to 8 bits on decoding."""
    tile = getattr(img, "tile", None) or []
    if img.mode not in ("RGB", "RGBA") or not tile or len(tile[0]) < 4:
        return False
    args = tile[0][3]
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return ";16" in str(rawmode)


def read_image_file(img: Image.Image, name: str = "image") -> Union[Image.Image, np.ndarray]:
    """Decode an image opened by :func:`open_image_file`, with its EXIF orientation applied.

    Returns a PIL image, or a numpy array for 16-bit colour TIFF files (read
    with ``tifffile`` because Pillow keeps only 8 bits of them).

    Raises:
        ValueError: the file is truncated or otherwise cannot be decoded.
    """
    path = getattr(img, "filename", "")
    try:
        if _is_16bit_color(img):
            if img.format == "TIFF":
                import tifffile  # a scikit-image dependency

                orientation = img.getexif().get(0x0112, 1)
                arr = np.asarray(tifffile.imread(path))
                if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
                    arr = np.moveaxis(arr, 0, -1)  # planar TIFF
                return np.ascontiguousarray(_ORIENT_OPS.get(orientation, lambda a: a)(arr))
            warnings.warn(
                f"{name}: Pillow reads 16-bit colour {img.format} files at 8 bits; "
                "save the image as a 16-bit TIFF to keep 16 bits",
                UserWarning,
                stacklevel=3,
            )
        img.load()
        return ImageOps.exif_transpose(img)
    except _UNREADABLE as exc:
        # Pillow raises OSError("image file is truncated ...") and friends.
        raise ValueError(
            f"{name}: cannot decode '{path}': {_unreadable_reason(exc)}; is the file truncated or corrupt?"
        ) from None


def _pil_to_array(img: Image.Image, name: str) -> Tuple[np.ndarray, str]:
    """Pixels of a PIL image as an ``H x W [x C]`` array, and the mode to give back."""
    mode = img.mode
    if mode in _I16_MODES:
        return np.asarray(img).astype(np.uint16), "I;16"
    if mode == "I":
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"{name}: 32-bit integer image with values outside 0..65535 is not supported")
        return arr.astype(np.uint16), "I;16"
    if mode == "F":
        return np.asarray(img, dtype=np.float32), "F"
    if mode == "1":
        img, mode = img.convert("L"), "L"
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        mode = "RGBA" if has_alpha else "RGB"
        img = img.convert(mode)
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        mode = "RGBA" if "A" in mode else "RGB"
        img = img.convert(mode)
    return np.asarray(img), mode


# --------------------------------------------------------------------------
# Checking and converting images
# --------------------------------------------------------------------------


def _check_shape(h: int, w: int, c: int, name: str, min_size: int) -> None:
    if h == 0 or w == 0:
        raise ValueError(f"{name} is empty (size {h}x{w})")
    if h < min_size or w < min_size:
        raise ValueError(f"{name} must be at least {min_size}x{min_size} pixels, got {h}x{w}")
    if not 1 <= c <= 4:
        raise ValueError(
            f"{name} must have 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA) channels, got {c}"
        )


def _check_numpy_dtype(arr: np.ndarray, name: str) -> None:
    dt = arr.dtype
    if dt == np.bool_:
        raise TypeError(f"{name} must be uint8, uint16 or float in [0, 1], got a bool array")
    if np.issubdtype(dt, np.complexfloating):
        raise TypeError(f"{name} must be uint8, uint16 or float in [0, 1], got complex dtype {dt}")
    if dt not in (np.uint8, np.uint16) and dt.type not in _FLOAT_NP:
        raise TypeError(f"{name} must be uint8, uint16 or float in [0, 1], got dtype {dt}")


def _check_float_values(x: Union[np.ndarray, torch.Tensor], name: str) -> None:
    """ValueError unless all values are finite and within [0, 1]."""
    if isinstance(x, torch.Tensor):
        finite = bool(torch.isfinite(x).all())
        lo, hi = (float(x.min()), float(x.max())) if finite else (0.0, 0.0)
    else:
        finite = bool(np.isfinite(x).all())
        lo, hi = (float(x.min()), float(x.max())) if finite else (0.0, 0.0)
    if not finite:
        raise ValueError(f"{name} contains NaN or infinite values")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} values must be in [0, 1] for a float image, got range [{lo:g}, {hi:g}]")


@dataclass
class _Source:
    """A checked image whose pixels are not converted yet (see :func:`inspect_image`)."""

    spec: ImageSpec
    pixels: Union[np.ndarray, torch.Tensor, Image.Image, None]
    file: Optional[Image.Image] = None


def inspect_image(image: Any, name: str = "image", min_size: int = MIN_SIZE) -> _Source:
    """Check an image's type, dtype and shape without touching its pixels.

    Paths are opened but not decoded, so the size of a huge file (or a huge
    broadcast array) can be judged before any memory is spent on it.  Value
    checks (NaN, range) happen in :func:`load_image`.

    Raises:
        TypeError: unsupported type or dtype.
        ValueError: bad shape, too small, too many channels, unreadable file.
        FileNotFoundError: the path does not exist.
    """
    if isinstance(image, (str, os.PathLike)):
        img = open_image_file(image, name)
        w, h = img.size
        bands = len(img.getbands())
        if img.mode in ("P", "PA"):
            bands = 4 if (img.mode == "PA" or "transparency" in img.info) else 3
        elif img.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "F") + _I16_MODES:
            bands = 4 if "A" in img.mode else 3
        _check_shape(h, w, bands, name, min_size)
        has_alpha = bands in (2, 4)
        spec = ImageSpec("path", h, w, bands, has_alpha, np.dtype(np.uint8))
        return _Source(spec, None, file=img)
    if isinstance(image, Image.Image):
        arr, mode = _pil_to_array(image, name)
        c = 1 if arr.ndim == 2 else arr.shape[2]
        _check_shape(arr.shape[0], arr.shape[1], c, name, min_size)
        spec = ImageSpec("pil", arr.shape[0], arr.shape[1], c, c in (2, 4), arr.dtype, pil_mode=mode)
        return _Source(spec, arr)
    if isinstance(image, np.ndarray):
        _check_numpy_dtype(image, name)
        if image.ndim not in (2, 3):
            raise ValueError(f"{name} must be a numpy array of shape HxW or HxWxC, got shape {image.shape}")
        c = 1 if image.ndim == 2 else image.shape[2]
        _check_shape(image.shape[0], image.shape[1], c, name, min_size)
        layout = "HW" if image.ndim == 2 else "HWC"
        spec = ImageSpec("numpy", image.shape[0], image.shape[1], c, c in (2, 4), image.dtype, layout=layout)
        return _Source(spec, image)
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.bool or image.is_complex() or not image.is_floating_point():
            raise TypeError(f"{name} tensor must be floating point with values in [0, 1], got dtype {image.dtype}")
        if image.dim() == 4 and image.shape[0] != 1:
            raise ValueError(f"{name} tensor must have batch size 1 (1xCxHxW), got shape {tuple(image.shape)}")
        if image.dim() not in (3, 4):
            raise ValueError(f"{name} tensor must have shape CxHxW or 1xCxHxW, got shape {tuple(image.shape)}")
        c, h, w = image.shape[-3:]
        _check_shape(h, w, c, name, min_size)
        layout = "CHW" if image.dim() == 3 else "NCHW"
        spec = ImageSpec("tensor", h, w, c, c in (2, 4), image.dtype, layout=layout, device=image.device)
        return _Source(spec, image)
    raise TypeError(
        f"{name} must be a path, PIL.Image, numpy array or torch tensor, got {type(image).__name__}"
    )


def _array_to_float(arr: np.ndarray, name: str) -> np.ndarray:
    """uint8/uint16 scaled to [0, 1]; float arrays checked for NaN and range."""
    if arr.dtype in _MAX_VALUE:
        return arr.astype(np.float32) / np.float32(_MAX_VALUE[arr.dtype])
    out = arr.astype(np.float32)
    _check_float_values(out, name)
    return out


def load_image(image: Any, name: str = "image", source: Optional[_Source] = None) -> LoadedImage:
    """Convert any accepted image (see the module docstring) for restoration.

    Args:
        image: the caller's image.
        name: argument name used in error messages.
        source: the result of :func:`inspect_image` on ``image``, if already taken.

    Raises:
        TypeError, ValueError, FileNotFoundError: with a message naming ``name``.
    """
    src = source if source is not None else inspect_image(image, name)
    spec = src.spec
    if spec.kind == "tensor":
        t = src.pixels.detach()
        t = t if t.dim() == 3 else t[0]
        _check_float_values(t, name)
        chw = t.to(device="cpu", dtype=torch.float32)
    else:
        if spec.kind == "path":
            decoded = read_image_file(src.file, name)
            if isinstance(decoded, Image.Image):
                arr, mode = _pil_to_array(decoded, name)
            else:
                arr, mode = decoded, ""
            if arr.dtype not in _MAX_VALUE and arr.dtype.type not in _FLOAT_NP:
                raise ValueError(f"{name}: unsupported sample type {arr.dtype} in '{src.file.filename}'")
            c = 1 if arr.ndim == 2 else arr.shape[2]
            # The orientation may have swapped height and width.
            _check_shape(arr.shape[0], arr.shape[1], c, name, MIN_SIZE)
            spec.height, spec.width, spec.channels, spec.has_alpha = arr.shape[0], arr.shape[1], c, c in (2, 4)
            spec.dtype, spec.pil_mode = arr.dtype, mode
            spec.layout = "HW" if arr.ndim == 2 else "HWC"
        else:
            arr = src.pixels
        f = _array_to_float(arr, name)
        hwc = f[:, :, None] if f.ndim == 2 else f
        chw = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
    chw = chw.contiguous()
    if spec.has_alpha:
        color, alpha = chw[:-1][None].contiguous(), chw[-1:][None].contiguous()
    else:
        color, alpha = chw[None], None
    return LoadedImage(color=color, alpha=alpha, spec=spec)


def load_mask(mask: Any, height: int, width: int, channels: int, name: str = "mask") -> torch.Tensor:
    """Convert a known-pixel mask to a ``(1, M, H, W)`` float32 tensor of 0 and 1, ``M`` 1 or ``channels``.

    Accepts the image kinds, plus bool arrays and tensors.  Integer masks
    may be 0/1 or 0/max (255 for uint8, 65535 for uint16); PIL and file masks
    are read as greyscale.  1 (True) marks a known pixel.

    Raises:
        TypeError: unsupported type or dtype.
        ValueError: wrong size, not binary, or no known pixel.
        FileNotFoundError: the path does not exist.
    """
    if isinstance(mask, (str, os.PathLike)):
        mask = read_image_file(open_image_file(mask, name), name)
    if isinstance(mask, Image.Image):
        if mask.mode not in ("1", "L", "I", "F") + _I16_MODES:
            mask = mask.convert("L")
        mask = np.asarray(mask.convert("L") if mask.mode == "1" else mask)
    if isinstance(mask, torch.Tensor):
        if mask.is_complex():
            raise TypeError(f"{name} must be binary (0/1 or bool), got complex dtype {mask.dtype}")
        m = mask.detach().to("cpu")
        if m.dim() == 4:
            if m.shape[0] != 1:
                raise ValueError(f"{name} tensor must have batch size 1, got shape {tuple(m.shape)}")
            m = m[0]
        if m.dim() == 2:
            m = m[None]
        if m.dim() != 3:
            raise ValueError(f"{name} tensor must have shape HxW, CxHxW or 1xCxHxW, got {tuple(mask.shape)}")
        m = m.numpy().transpose(1, 2, 0)
    elif isinstance(mask, np.ndarray):
        if mask.dtype == object or np.issubdtype(mask.dtype, np.complexfloating):
            raise TypeError(f"{name} must be a bool, integer or float array, got dtype {mask.dtype}")
        if mask.ndim not in (2, 3):
            raise ValueError(f"{name} must have shape HxW or HxWxC, got shape {mask.shape}")
        m = mask if mask.ndim == 3 else mask[:, :, None]
    else:
        raise TypeError(f"{name} must be a path, PIL.Image, numpy array or torch tensor, got {type(mask).__name__}")

    if m.shape[:2] != (height, width):
        raise ValueError(f"{name} must have the image's size {height}x{width}, got {m.shape[0]}x{m.shape[1]}")
    if m.dtype == np.bool_:
        binary = m.astype(np.float32)
    else:
        values = np.unique(m)
        top = _MAX_VALUE.get(m.dtype, 1.0)
        if np.all(np.isin(values, (0, 1))):
            binary = m.astype(np.float32)
        elif np.all(np.isin(values, (0, top))):
            binary = (m == top).astype(np.float32)
        else:
            shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if values.size > 5 else "")
            raise ValueError(f"{name} must be binary (0/1, True/False or 0/{top:g}), got values {shown}")
    if binary.shape[2] > 1 and np.all(binary == binary[:, :, :1]):
        binary = binary[:, :, :1]
    if binary.shape[2] not in (1, channels):
        raise ValueError(f"{name} must have 1 channel or the image's {channels}, got {binary.shape[2]}")
    if not binary.any():
        raise ValueError(f"{name} marks no known pixel (1/True = known); nothing to inpaint from")
    return torch.from_numpy(np.ascontiguousarray(binary.transpose(2, 0, 1)))[None]


# --------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------


def _reflect_pad_axis(x: torch.Tensor, before: int, after: int, dim: int) -> torch.Tensor:
    """Reflect-pad one spatial axis by any amount.

    ``F.pad(mode='reflect')`` needs the pad to be smaller than the axis, which
    fails for tiny images; reflecting repeatedly (each time by at most the
    current size minus one) continues the mirror pattern instead.  A
    one-pixel axis cannot be mirrored and is replicated.
    """
    def spec(b: int, a: int) -> list:
        # F.pad lists the last dimension first: (left, right, top, bottom).
        return [b, a, 0, 0] if dim == 3 else [0, 0, b, a]

    while before > 0 or after > 0:
        n = x.shape[dim]
        if n == 1:
            return F.pad(x, spec(before, after), mode="replicate")
        b, a = min(before, n - 1), min(after, n - 1)
        x = F.pad(x, spec(b, a), mode="reflect")
        before, after = before - b, after - a
    return x


def pad_to_multiple(
    x: torch.Tensor, multiple: int, min_size: int = 1
) -> Tuple[torch.Tensor, Tuple[int, int, int, int]]:
    """Reflect-pad ``(N, C, H, W)`` so that H and W are multiples of ``multiple`` and at least ``min_size``.

    The padding is split between both sides so that the image stays centred.

    Returns:
        ``(padded, box)`` with ``box = (top, left, H, W)``: where the original lies in ``padded``.
    """
    h, w = x.shape[-2:]

    def target(n: int) -> int:
        n = max(n, min_size)
        return -(-n // multiple) * multiple

    th, tw = target(h), target(w)
    top, left = (th - h) // 2, (tw - w) // 2
    x = _reflect_pad_axis(x, top, th - h - top, 2)
    x = _reflect_pad_axis(x, left, tw - w - left, 3)
    return x, (top, left, h, w)


def crop(x: torch.Tensor, box: Tuple[int, int, int, int], scale: int = 1) -> torch.Tensor:
    """Cut the region ``box`` (from :func:`pad_to_multiple`), scaled by ``scale``, out of ``x``."""
    top, left, h, w = (v * scale for v in box)
    return x[..., top : top + h, left : left + w]


def resize_alpha(alpha: torch.Tensor, scale: int) -> torch.Tensor:
    """Upscale an alpha channel ``scale`` times (bicubic, clamped to [0, 1])."""
    if scale == 1:
        return alpha
    return F.interpolate(alpha, scale_factor=scale, mode="bicubic", align_corners=False).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------
# Giving results back
# --------------------------------------------------------------------------


def _quantize(hwc: np.ndarray, dtype: np.dtype) -> np.ndarray:
    top = _MAX_VALUE[np.dtype(dtype)]
    return np.clip(np.rint(hwc * top), 0, top).astype(dtype)


def from_tensor(color: torch.Tensor, alpha: Optional[torch.Tensor], spec: ImageSpec) -> Any:
    """Convert a restored ``(1, C, H, W)`` image in [0, 1] (and alpha) back to the caller's format.

    Path input gives a PIL image for 8-bit files and a numpy array otherwise
    (uint16 for 16-bit files, float32 for floating-point TIFFs).
    """
    full = color if alpha is None else torch.cat([color, alpha.to(color.device, color.dtype)], dim=1)
    full = full.clamp(0.0, 1.0)
    if spec.kind == "tensor":
        out = full.to(device=spec.device, dtype=spec.dtype)
        return out[0] if spec.layout == "CHW" else out
    hwc = full[0].detach().to("cpu", torch.float32).numpy().transpose(1, 2, 0)
    dtype = np.dtype(spec.dtype)
    arr = _quantize(hwc, dtype) if dtype in _MAX_VALUE else hwc.astype(dtype)
    if spec.kind == "numpy":
        return arr[:, :, 0] if spec.layout == "HW" else np.ascontiguousarray(arr)
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if spec.kind == "pil" or (spec.kind == "path" and spec.bit_depth == 8):
        # uint16 greyscale becomes mode I;16 and float32 mode F, as given.
        return Image.fromarray(np.ascontiguousarray(arr))
    return np.ascontiguousarray(arr)


@contextlib.contextmanager
def atomic_path(dest: Union[str, "os.PathLike[str]"]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it over ``dest`` when the block succeeds.

    A crash or Ctrl-C inside the block leaves ``dest`` untouched and removes
    the temporary file.  The file gets the permissions a plain ``open()``
    would give it (``0o666`` minus the umask), not ``mkstemp``'s private 0600.
    """
    dest = Path(os.fspath(dest))
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=dest.suffix, dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


# mkstemp's random part of a temporary name: 8 characters of this alphabet.
_TEMP_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
_TEMP_RANDOM = 8


def remove_stale_temporaries(folder: Union[str, "os.PathLike[str]"], names: Iterable[str]) -> int:
    """Delete the temporary files that :func:`atomic_path` left for ``folder/NAME`` when killed.

    A process killed outright (SIGKILL, a power cut) cannot run the clean-up
    of :func:`atomic_path`, so its hidden ``.NAME.XXXXXXXX.EXT`` file stays
    beside the destination.  Only names of that exact form, for the given
    destination names, are removed: the caller must be the only writer of
    those destinations.  Returns how many files were removed.
    """
    wanted = {f".{name}.": Path(name).suffix for name in names}
    removed = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            suffix = Path(entry.name).suffix
            cut = len(entry.name) - len(suffix) - _TEMP_RANDOM
            prefix, random_part = entry.name[:cut], entry.name[cut : cut + _TEMP_RANDOM]
            if wanted.get(prefix) == suffix and set(random_part) <= _TEMP_CHARS and entry.is_file():
                os.unlink(entry.path)
                removed += 1
    return removed


def save_figure(fig: Any, path: Union[str, "os.PathLike[str]"], dpi: int = 100) -> None:
    """Write a matplotlib figure to ``path`` as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def save_image(image: Any, path: Union[str, "os.PathLike[str]"], *, overwrite: bool = False) -> Path:
    """Write a result of :func:`dip_fast.restore` to ``path`` atomically.

    The image is written to a temporary file in the destination folder and
    then moved over ``path`` with ``os.replace``, so a crash or Ctrl-C never
    leaves a half-written file.  PIL images and uint8 arrays are saved with
    Pillow in the format of the extension; uint16 greyscale as 16-bit PNG or
    TIFF; uint16 colour only as TIFF (with ``tifffile``; Pillow cannot write
    16-bit colour); float arrays as 32-bit float TIFF.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: the extension cannot store this image.
    """
    dest = Path(os.fspath(path))
    if dest.exists() and not overwrite:
        raise FileExistsError(f"output '{dest}' already exists (use --force / overwrite=True to replace it)")
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"output folder '{dest.parent}' does not exist")
    ext = dest.suffix.lower()
    if isinstance(image, torch.Tensor):
        t = image.detach()
        t = t[0] if t.dim() == 4 else t
        image = t.to("cpu", torch.float32).numpy().transpose(1, 2, 0)
        image = image[:, :, 0] if image.shape[2] == 1 else image
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype.type in _FLOAT_NP and ext not in (".tif", ".tiff"):
            # Float results are written at 8 bits except to TIFF.
            arr = _quantize(np.clip(arr, 0, 1), np.dtype(np.uint8))
        if arr.dtype == np.uint16 and arr.ndim == 3 and ext not in (".tif", ".tiff"):
            raise ValueError(f"output '{dest}': 16-bit colour images can only be written as .tif/.tiff")
    else:
        arr = None
    if ext not in Image.registered_extensions():
        raise ValueError(f"output '{dest}': unknown image extension {dest.suffix!r} (use .png, .tif, .jpg, ...)")

    with atomic_path(dest) as tmp:
        if arr is not None and ext in (".tif", ".tiff") and (arr.dtype != np.uint8):
            import tifffile

            photometric = "rgb" if arr.ndim == 3 and arr.shape[2] >= 3 else "minisblack"
            extra = {"extrasamples": ["unassalpha"]} if arr.ndim == 3 and arr.shape[2] in (2, 4) else {}
            tifffile.imwrite(tmp, np.ascontiguousarray(arr), photometric=photometric, **extra)
        else:
            pil = Image.fromarray(np.ascontiguousarray(arr)) if arr is not None else image
            if ext in (".jpg", ".jpeg") and pil.mode in ("RGBA", "LA"):
                raise ValueError(f"output '{dest}': JPEG cannot store an alpha channel; use .png")
            pil.save(tmp, format=Image.registered_extensions()[ext])
    return dest
