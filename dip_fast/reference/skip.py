"""The encoder-decoder "skip" generator of Deep Image Prior, in plain PyTorch.

``skip(...)`` takes the paper's arguments and builds the same network (same
layers, same order of operations, same parameter count and, for
stride/avg/max downsampling, the same initial weights from the same seed),
but as a :class:`SkipNet` with named submodules instead of nested
``nn.Sequential`` containers, so that a fused implementation can mirror its
``state_dict`` one to one.

Network
-------
With ``n`` scales, scale ``i`` (0 = full resolution) computes::

    level(i, x):
        d = inner[i](down[i](x))          # two conv blocks, the first one halves H, W
        if i < n - 1:
            d = level(i + 1, d)
        d = upsample(d, 2, mode[i])        # nearest | bilinear (align_corners=False)
        if skip channels at i:
            y = cat([skip[i](x), d], dim=1) # after centre-cropping both to the smaller H, W
        else:
            y = d                           # no concatenation, no crop
        y = up1x1[i](up[i](concat_bn[i](y)))
        return y

    net(x) = sigmoid(out(level(0, x)))     # sigmoid only when need_sigmoid

A *conv block* is ``[pad] -> conv -> [downsample] -> bn -> act``: reflection
padding ``(k - 1) // 2`` before an unpadded conv (``pad='reflection'``), or the
conv's own zero padding (``pad='zero'``); the downsampler (``avg``/``max``
pooling or a Lanczos :class:`Downsampler`) only exists in ``down[i]`` when the
downsample mode is not ``'stride'``, and then the conv runs at stride 1.

State-dict layout (the contract a fused implementation mirrors)
--------------------------------------------------------------
``B`` marks a conv block and expands to ``B.conv.weight``, ``B.conv.bias``
(if ``need_bias``), ``B.bn.weight``, ``B.bn.bias``, ``B.bn.running_mean``,
``B.bn.running_var``, ``B.bn.num_batches_tracked``::

    skip.{i}      B   1 conv (filter_skip_size) input -> num_channels_skip[i];
                      absent for scales with num_channels_skip[i] == 0
    down.{i}      B   input -> num_channels_down[i], stride 2 (or stride 1 + downsample)
    inner.{i}     B   num_channels_down[i] -> num_channels_down[i]
    concat_bn.{i}     BatchNorm2d(num_channels_skip[i] + deeper channels), present
                      even without skip channels (as in the paper):
                      concat_bn.{i}.weight / .bias / .running_mean / .running_var /
                      .num_batches_tracked
    up.{i}        B   concat channels -> num_channels_up[i] (filter_size_up)
    up1x1.{i}     B   num_channels_up[i] -> num_channels_up[i], 1x1; only if need1x1_up
    out               Conv2d 1x1 num_channels_up[0] -> num_output_channels:
                      out.weight, out.bias (if need_bias)

The *deeper channels* of scale ``i`` are ``num_channels_up[i + 1]`` below the
last scale and ``num_channels_down[i]`` at the last one.  Input of scale 0 is
``num_input_channels``; input of scale ``i > 0`` is ``num_channels_down[i - 1]``.
Padding, pooling, Lanczos downsampler and activations hold no state.

Shapes
------
The paper never pads the image to a multiple of ``2^n``; odd sizes are handled
by the centre crop inside the concatenation.  With stride downsampling and
skip channels at every scale the output has the input's size; a scale without
skip channels does not crop, so its output is ``2 * ceil(h / 2)`` rows of
whatever the deeper scale returned (e.g. a 5-scale net without skips maps a
37-pixel side to 64).  ``avg``/``max``/Lanczos downsampling floor the size and
the crop then shrinks the output (37 -> 32 for 5 scales).

Deviations from the paper
-------------------------
* ``Swish`` uses ``nn.SiLU`` (same function, fused kernel).
* Activations are not in-place (no numeric difference).
* A Lanczos downsampler inside the network has a fixed weight (see
  :mod:`.downsampler`); in the paper it was a trainable parameter.
* Invalid options raise ``ValueError`` instead of ``assert``/silent fallback.
* ``filter_skip_size`` may also be a per-scale list.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .downsampler import Downsampler

__all__ = [
    "ACT_FUNS",
    "DOWNSAMPLE_MODES",
    "PADS",
    "UPSAMPLE_MODES",
    "ConvBlock",
    "SkipConfig",
    "SkipNet",
    "center_crop_cat",
    "upsample2x",
    "make_act",
    "skip",
]

PADS = ("zero", "reflection")
UPSAMPLE_MODES = ("nearest", "bilinear")
DOWNSAMPLE_MODES = ("stride", "avg", "max", "lanczos2", "lanczos3")
ACT_FUNS = ("LeakyReLU", "Swish", "ELU", "none")

ActFun = Union[str, Callable[[], nn.Module]]


def make_act(act_fun: ActFun) -> nn.Module:
    """Return a fresh activation module.

    ``act_fun`` is ``'LeakyReLU'`` (slope 0.2), ``'Swish'``, ``'ELU'``,
    ``'none'`` (identity), or a zero-argument callable returning a module
    (e.g. ``nn.ReLU``), as in the paper.
    """
    if isinstance(act_fun, str):
        if act_fun == "LeakyReLU":
            return nn.LeakyReLU(0.2)
        if act_fun == "Swish":
            return nn.SiLU()
        if act_fun == "ELU":
            return nn.ELU()
        if act_fun == "none":
            return nn.Identity()
        raise ValueError(f"act_fun must be one of {ACT_FUNS} or a module factory, got {act_fun!r}")
    if callable(act_fun):
        module = act_fun()
        if not isinstance(module, nn.Module):
            raise ValueError(f"act_fun callable must return an nn.Module, got {type(module).__name__}")
        return module
    raise ValueError(f"act_fun must be one of {ACT_FUNS} or a module factory, got {act_fun!r}")


def _make_downsampler(mode: str, channels: int, factor: int) -> Optional[nn.Module]:
    if mode == "stride":
        return None
    if mode == "avg":
        return nn.AvgPool2d(factor, factor)
    if mode == "max":
        return nn.MaxPool2d(factor, factor)
    if mode in ("lanczos2", "lanczos3"):
        return Downsampler(n_planes=channels, factor=factor, kernel_type=mode, phase=0.5, preserve_size=True)
    raise ValueError(f"downsample_mode must be one of {DOWNSAMPLE_MODES}, got {mode!r}")


class ConvBlock(nn.Module):
    """``[pad] -> conv -> [downsample] -> bn -> act``: one ``conv(); bn(); act()`` triple of the paper.

    Args:
        in_channels, out_channels: conv channels.
        kernel_size: square kernel size ``k``; padding is ``(k - 1) // 2``.
        stride: 1 or 2; with a non-``'stride'`` ``downsample_mode`` the conv
            runs at stride 1 and ``downsample`` reduces by ``stride`` afterwards.
        bias: whether the conv has a bias.
        pad: ``'zero'`` (conv padding) or ``'reflection'`` (``nn.ReflectionPad2d``).
        downsample_mode: see :data:`DOWNSAMPLE_MODES`.
        act_fun: see :func:`make_act`.
        groups: ``G`` independent blocks side by side (a packed network,
            :mod:`dip_fast.core.packed`): the convolution is grouped, ``G x`` the
            channels, and BatchNorm, per channel, is per block anyway.

    Attributes ``pad`` and ``downsample`` are ``None`` when unused.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        bias: bool = True,
        pad: str = "zero",
        downsample_mode: str = "stride",
        act_fun: ActFun = "LeakyReLU",
        groups: int = 1,
    ) -> None:
        super().__init__()
        if pad not in PADS:
            raise ValueError(f"pad must be one of {PADS}, got {pad!r}")
        if downsample_mode not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample_mode must be one of {DOWNSAMPLE_MODES}, got {downsample_mode!r}")
        downsample = None
        if stride != 1 and downsample_mode != "stride":
            downsample = _make_downsampler(downsample_mode, groups * out_channels, stride)
            stride = 1
        to_pad = (kernel_size - 1) // 2
        self.pad: Optional[nn.Module] = None
        if pad == "reflection" and to_pad > 0:
            # A zero-width reflection pad (1x1 convs) is a no-op; omit it.
            self.pad = nn.ReflectionPad2d(to_pad)
        conv_padding = 0 if pad == "reflection" else to_pad
        self.conv = nn.Conv2d(groups * in_channels, groups * out_channels, kernel_size, stride,
                              padding=conv_padding, bias=bias, groups=groups)
        self.downsample: Optional[nn.Module] = downsample
        self.bn = nn.BatchNorm2d(groups * out_channels)
        self.act = make_act(act_fun)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``(N, in_channels, H, W)``."""
        if self.pad is not None:
            x = self.pad(x)
        x = self.conv(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return self.act(self.bn(x))


def upsample2x(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The paper's ``nn.Upsample(scale_factor=2, mode)``: nearest, or bilinear with align_corners=False."""
    if mode == "bilinear":
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    return F.interpolate(x, scale_factor=2, mode="nearest")


def center_crop_cat(tensors: Sequence[torch.Tensor], groups: int = 1) -> torch.Tensor:
    """Concatenate along channels after centre-cropping to the smallest H and W.

    The crop offset is ``(size - target) // 2`` in each dimension, as in the
    paper's ``Concat``; tensors already at the target size are untouched.
    With ``groups=G`` every tensor holds ``G`` groups of channels (a packed
    network) and the concatenation is per group: group ``g`` of the result
    is the concatenation of the inputs' groups ``g``.
    """
    th = min(t.shape[2] for t in tensors)
    tw = min(t.shape[3] for t in tensors)
    cropped = []
    for t in tensors:
        dh = (t.shape[2] - th) // 2
        dw = (t.shape[3] - tw) // 2
        cropped.append(t[:, :, dh : dh + th, dw : dw + tw])
    if groups == 1:
        return torch.cat(cropped, dim=1)
    n = cropped[0].shape[0]
    grouped = [t.reshape(n, groups, t.shape[1] // groups, th, tw) for t in cropped]
    return torch.cat(grouped, dim=2).reshape(n, -1, th, tw)


def _per_scale(name: str, value: Any, n: int, kind: type) -> Tuple[Any, ...]:
    """Broadcast a scalar option to ``n`` scales or validate a per-scale list."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} scales")
        values = tuple(value)
    else:
        values = (value,) * n
    for v in values:
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise ValueError(f"{name} entries must be {kind.__name__}, got {v!r}")
    return values


@dataclass(frozen=True)
class SkipConfig:
    """Normalised ``skip()`` arguments: every per-scale option is a tuple of length ``n_scales``."""

    num_input_channels: int
    num_output_channels: int
    num_channels_down: Tuple[int, ...]
    num_channels_up: Tuple[int, ...]
    num_channels_skip: Tuple[int, ...]
    filter_size_down: Tuple[int, ...]
    filter_size_up: Tuple[int, ...]
    filter_skip_size: Tuple[int, ...]
    upsample_mode: Tuple[str, ...]
    downsample_mode: Tuple[str, ...]
    need_sigmoid: bool
    need_bias: bool
    pad: str
    act_fun: ActFun
    need1x1_up: bool

    @property
    def n_scales(self) -> int:
        """Number of scales (levels of the recursion)."""
        return len(self.num_channels_down)

    def in_channels(self, i: int) -> int:
        """Channels entering scale ``i``."""
        return self.num_input_channels if i == 0 else self.num_channels_down[i - 1]

    def deeper_channels(self, i: int) -> int:
        """Channels of the upsampled deeper branch at scale ``i``."""
        return self.num_channels_up[i + 1] if i < self.n_scales - 1 else self.num_channels_down[i]

    def concat_channels(self, i: int) -> int:
        """Channels after the concatenation at scale ``i`` (input of ``concat_bn.i``)."""
        return self.num_channels_skip[i] + self.deeper_channels(i)

    def to_kwargs(self) -> dict:
        """Arguments that rebuild this configuration with :func:`skip`."""
        kwargs = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kwargs[f.name] = list(value) if isinstance(value, tuple) else value
        return kwargs


class SkipNet(nn.Module):
    """The paper's skip network; build it with :func:`skip`.

    Args:
        config: the normalised :class:`SkipConfig` (of one network).
        networks: ``K`` independent networks of this configuration packed
            into one module (:mod:`dip_fast.core.packed`): every convolution is
            grouped ``K`` ways, the input is ``(N, K * C_in, H, W)`` (network
            ``k``'s input in channels ``[k C_in, (k + 1) C_in)``) and so is
            the output.  Use :func:`dip_fast.core.packed.pack` to build one from
            ``K`` networks.

    Attributes:
        config: the normalised :class:`SkipConfig`.
        networks: ``K``.
        skip, down, inner, concat_bn, up, up1x1, out: see the module docstring.
    """

    def __init__(self, config: SkipConfig, networks: int = 1) -> None:
        super().__init__()
        if isinstance(networks, bool) or not isinstance(networks, int) or networks < 1:
            raise ValueError(f"networks must be an integer >= 1, got {networks!r}")
        self.config = config
        self.networks = networks
        c = config
        k = networks
        n = c.n_scales
        self.skip = nn.ModuleDict()
        self.down = nn.ModuleList()
        self.inner = nn.ModuleList()
        self.concat_bn = nn.ModuleList()
        self.up = nn.ModuleList()
        self.up1x1 = nn.ModuleList()
        # Modules are created in the paper's order so that, from the same RNG
        # state, the default initialisation draws the same weights as the
        # paper's network (BatchNorm init draws nothing).  This holds for
        # stride/avg/max downsampling; the paper's Lanczos downsampler also
        # drew (and then overwrote) a conv init, which is not replayed here.
        for i in range(n):
            self.concat_bn.append(nn.BatchNorm2d(k * c.concat_channels(i)))
            if c.num_channels_skip[i] != 0:
                self.skip[str(i)] = ConvBlock(
                    c.in_channels(i), c.num_channels_skip[i], c.filter_skip_size[i],
                    bias=c.need_bias, pad=c.pad, act_fun=c.act_fun, groups=k,
                )
            self.down.append(ConvBlock(
                c.in_channels(i), c.num_channels_down[i], c.filter_size_down[i], stride=2,
                bias=c.need_bias, pad=c.pad, downsample_mode=c.downsample_mode[i], act_fun=c.act_fun,
                groups=k,
            ))
            self.inner.append(ConvBlock(
                c.num_channels_down[i], c.num_channels_down[i], c.filter_size_down[i],
                bias=c.need_bias, pad=c.pad, act_fun=c.act_fun, groups=k,
            ))
            self.up.append(ConvBlock(
                c.concat_channels(i), c.num_channels_up[i], c.filter_size_up[i],
                bias=c.need_bias, pad=c.pad, act_fun=c.act_fun, groups=k,
            ))
            if c.need1x1_up:
                self.up1x1.append(ConvBlock(
                    c.num_channels_up[i], c.num_channels_up[i], 1,
                    bias=c.need_bias, pad=c.pad, act_fun=c.act_fun, groups=k,
                ))
        self.out = nn.Conv2d(k * c.num_channels_up[0], k * c.num_output_channels, 1, bias=c.need_bias, groups=k)

    def _level(self, i: int, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        key = str(i)
        s = self.skip[key](x) if key in self.skip else None
        d = self.inner[i](self.down[i](x))
        if i < c.n_scales - 1:
            d = self._level(i + 1, d)
        d = upsample2x(d, c.upsample_mode[i])
        y = center_crop_cat([s, d], self.networks) if s is not None else d
        y = self.up[i](self.concat_bn[i](y))
        if c.need1x1_up:
            y = self.up1x1[i](y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map the input ``z`` of shape ``(N, num_input_channels, H, W)`` to an image."""
        channels = self.networks * self.config.num_input_channels
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"expected input of shape (N, {channels}, H, W), got {tuple(x.shape)}")
        y = self.out(self._level(0, x))
        return torch.sigmoid(y) if self.config.need_sigmoid else y


def skip(
    num_input_channels: int = 2,
    num_output_channels: int = 3,
    num_channels_down: Sequence[int] = (16, 32, 64, 128, 128),
    num_channels_up: Sequence[int] = (16, 32, 64, 128, 128),
    num_channels_skip: Sequence[int] = (4, 4, 4, 4, 4),
    filter_size_down: Union[int, Sequence[int]] = 3,
    filter_size_up: Union[int, Sequence[int]] = 3,
    filter_skip_size: Union[int, Sequence[int]] = 1,
    need_sigmoid: bool = True,
    need_bias: bool = True,
    pad: str = "zero",
    upsample_mode: Union[str, Sequence[str]] = "nearest",
    downsample_mode: Union[str, Sequence[str]] = "stride",
    act_fun: ActFun = "LeakyReLU",
    need1x1_up: bool = True,
) -> SkipNet:
    """Assemble the paper's encoder-decoder with skip connections.

    Args:
        num_input_channels: channels of the input ``z``.
        num_output_channels: channels of the produced image.
        num_channels_down, num_channels_up, num_channels_skip: per-scale
            channel counts (equal lengths = number of scales); a skip count of
            0 removes the skip branch (and the concatenation) at that scale.
        filter_size_down, filter_size_up, filter_skip_size: kernel size, or a
            per-scale list.
        need_sigmoid: end with a sigmoid.
        need_bias: convolutions have biases.
        pad: ``'zero'`` or ``'reflection'``.
        upsample_mode: ``'nearest'`` or ``'bilinear'`` (or per-scale list).
        downsample_mode: ``'stride'``, ``'avg'``, ``'max'``, ``'lanczos2'``,
            ``'lanczos3'`` (or per-scale list).
        act_fun: ``'LeakyReLU'``, ``'Swish'``, ``'ELU'``, ``'none'`` or a module factory.
        need1x1_up: add a 1x1 conv block after each decoder conv block.

    Returns:
        A :class:`SkipNet` (BatchNorm in training mode, as the paper uses it).

    Raises:
        ValueError: on inconsistent list lengths or unknown options.
    """
    down = tuple(num_channels_down)
    n = len(down)
    if n == 0:
        raise ValueError("num_channels_down must have at least one scale")
    if len(num_channels_up) != n or len(num_channels_skip) != n:
        raise ValueError(
            "num_channels_down, num_channels_up and num_channels_skip must have the same length, got "
            f"{len(down)}, {len(num_channels_up)}, {len(num_channels_skip)}"
        )
    if pad not in PADS:
        raise ValueError(f"pad must be one of {PADS}, got {pad!r}")
    if isinstance(act_fun, str) and act_fun not in ACT_FUNS:
        raise ValueError(f"act_fun must be one of {ACT_FUNS} or a module factory, got {act_fun!r}")
    ups = _per_scale("upsample_mode", upsample_mode, n, str)
    for m in ups:
        if m not in UPSAMPLE_MODES:
            raise ValueError(f"upsample_mode must be one of {UPSAMPLE_MODES}, got {m!r}")
    downs = _per_scale("downsample_mode", downsample_mode, n, str)
    for m in downs:
        if m not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample_mode must be one of {DOWNSAMPLE_MODES}, got {m!r}")
    fsd = _per_scale("filter_size_down", filter_size_down, n, int)
    fsu = _per_scale("filter_size_up", filter_size_up, n, int)
    fss = _per_scale("filter_skip_size", filter_skip_size, n, int)
    for name, sizes in (("filter_size_down", fsd), ("filter_size_up", fsu), ("filter_skip_size", fss)):
        if any(k < 1 for k in sizes):
            raise ValueError(f"{name} entries must be >= 1, got {sizes}")
    for name, chans, minimum in (
        ("num_channels_down", down, 1),
        ("num_channels_up", tuple(num_channels_up), 1),
        ("num_channels_skip", tuple(num_channels_skip), 0),
    ):
        if any(isinstance(ch, bool) or not isinstance(ch, int) or ch < minimum for ch in chans):
            raise ValueError(f"{name} entries must be integers >= {minimum}, got {list(chans)}")
    config = SkipConfig(
        num_input_channels=int(num_input_channels),
        num_output_channels=int(num_output_channels),
        num_channels_down=down,
        num_channels_up=tuple(num_channels_up),
        num_channels_skip=tuple(num_channels_skip),
        filter_size_down=fsd,
        filter_size_up=fsu,
        filter_skip_size=fss,
        upsample_mode=ups,
        downsample_mode=downs,
        need_sigmoid=bool(need_sigmoid),
        need_bias=bool(need_bias),
        pad=pad,
        act_fun=act_fun,
        need1x1_up=bool(need1x1_up),
    )
    return SkipNet(config)
