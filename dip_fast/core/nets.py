"""The fast hourglass ("skip") network, built from the fused ops.

:func:`skip` takes exactly the arguments of :func:`dip_fast.reference.skip`
and returns a :class:`FastSkipNet`: the same modules, hence the same
``state_dict`` keys, shapes and initialisation, so that
``fast.load_state_dict(ref.state_dict())`` holds and every comparison with the
reference starts from identical weights. Only ``forward`` differs.

Per conv block the fast forward runs the vendor convolution (oneDNN / cuDNN)
and then one fused op, ``batch_norm_act``: training-mode BatchNorm, LeakyReLU
and, for ``pad='reflection'``, the reflection padding that the *next*
convolution needs, written by the same pass. PyTorch's sequence makes a
separate pass (and buffer) for each of BatchNorm, LeakyReLU and the pad.
The BatchNorm after each concatenation (no activation) uses the same op with
slope 1.

At each scale the two branches meet in ``upsample_cat``: the deeper
branch is upsampled (nearest or bilinear) straight into the concatenation
buffer next to the skip branch, one pass instead of an upsample and a
``torch.cat`` copy (sizes that need the reference's centre crop, from odd
input sizes, fall back to those two ops).

Fused: LeakyReLU or no activation, ``stride`` downsampling, zero or
reflection padding, nearest or bilinear upsampling with the concatenation. Other options (Swish, ELU, avg / max /
Lanczos downsampling) run that block's own PyTorch modules inside the same
network; :func:`fused_options` lists what is fused.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _ops
from .conv import conv2d
from ..ops.bn_act import batch_norm_act
from ..ops.upsample_cat import UPSAMPLE_MODES, upsample_cat
from ..reference import skip as reference_skip
from ..reference.skip import ConvBlock, SkipConfig, SkipNet, center_crop_cat, upsample2x

__all__ = ["FastSkipNet", "skip", "fused_options"]


def fused_options() -> dict[str, tuple[str, ...]]:
    """The ``skip()`` options whose blocks run fused; the others fall back to PyTorch modules."""
    return {
        "act_fun": ("LeakyReLU", "none"),
        "downsample_mode": ("stride",),
        "pad": ("zero", "reflection"),
        "upsample_mode": ("nearest", "bilinear"),
    }


def _block_slope(block: ConvBlock) -> Optional[float]:
    """LeakyReLU slope of a block the fused op can run, or None for a PyTorch fallback."""
    if block.downsample is not None:
        return None
    if isinstance(block.act, nn.LeakyReLU):
        return float(block.act.negative_slope)
    if isinstance(block.act, nn.Identity):
        return 1.0
    return None


def _conv_pad(block: ConvBlock) -> int:
    """The reflection pad the block's convolution expects on its input (0 for zero padding)."""
    return block.pad.padding[0] if block.pad is not None else 0


def _bn_act(bn: nn.BatchNorm2d, x: torch.Tensor, slope: float, pad: int) -> torch.Tensor:
    """Run the fused BatchNorm + activation + reflection pad, updating running stats like nn.BatchNorm2d."""
    momentum = bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            momentum = 1.0 / float(bn.num_batches_tracked)
    track = bn.training and bn.track_running_stats
    return batch_norm_act(
        x,
        bn.weight,
        bn.bias,
        eps=bn.eps,
        slope=slope,
        pad=pad,
        pad_mode="reflect",
        running_mean=bn.running_mean if track else None,
        running_var=bn.running_var if track else None,
        momentum=momentum if momentum is not None else 0.1,
    )


class FastSkipNet(SkipNet):
    """:class:`~dip_fast.reference.skip.SkipNet` with a fused forward (see the module docstring).

    Args:
        config: the normalised network configuration (of one network).
        channels_last: run the network in channels_last layout (the output is returned contiguous).
        networks: ``K`` networks packed in one module, as for
            :class:`~dip_fast.reference.skip.SkipNet` (:mod:`dip_fast.core.packed`).
    """

    def __init__(self, config: SkipConfig, channels_last: bool = False, networks: int = 1) -> None:
        super().__init__(config, networks)
        self.channels_last = False
        if channels_last:
            self.set_channels_last()

    def set_channels_last(self) -> None:
        """Run in channels_last from now on: activations, and the convolution weights too.

        Weights in the activations' layout matter: otherwise oneDNN reorders
        every 4-D weight on every call, forward and backward (measured ~4 ms of
        a 128² step on 2 cores). Call it before an optimizer holds the weights'
        state (the weights keep their identity, their storage changes).
        """
        self.channels_last = True
        self.to(memory_format=torch.channels_last)

    # Blocks take an input already padded for their convolution and return an
    # output padded by `out_pad` for the consumer's convolution.
    def _block(self, block: ConvBlock, x: torch.Tensor, out_pad: int, crop: int = 0) -> torch.Tensor:
        conv = block.conv
        y = conv2d(x, conv.weight, conv.bias, conv.stride[0], conv.padding[0], conv.groups)
        if crop:
            y = y[:, :, crop : y.shape[2] - crop, crop : y.shape[3] - crop]
        slope = _block_slope(block)
        if slope is not None and block.bn.training:
            return _bn_act(block.bn, y, slope, out_pad)
        if block.downsample is not None:
            y = block.downsample(y)
        y = block.act(block.bn(y))
        return F.pad(y, (out_pad,) * 4, mode="reflect") if out_pad else y

    def _input_pad(self, i: int) -> int:
        """Pad the input of scale i needs: the larger of its skip and down convolutions' pads."""
        pads = [_conv_pad(self.down[i])]
        if str(i) in self.skip:
            pads.append(_conv_pad(self.skip[str(i)]))
        return max(pads)

    def _join(self, s: Optional[torch.Tensor], d: torch.Tensor, mode: str) -> torch.Tensor:
        """cat([s, upsample2x(d)]) (per network when packed): one fused pass when the sizes match, the reference's crop-and-cat otherwise."""
        n, _, h, w = d.shape
        if mode in UPSAMPLE_MODES and (s is None or tuple(s.shape[2:]) == (2 * h, 2 * w)):
            skip = s if s is not None else d.new_empty((n, 0, 2 * h, 2 * w))
            return upsample_cat(skip, d, mode, groups=self.networks)
        d = upsample2x(d, mode)
        return center_crop_cat([s, d], self.networks) if s is not None else d

    def _level(self, i: int, x: torch.Tensor) -> torch.Tensor:  # x is padded by _input_pad(i)
        c = self.config
        key = str(i)
        p_in = self._input_pad(i)
        s = None
        if key in self.skip:
            # The skip convolution (stride 1) runs on the whole input, padded
            # for the larger down convolution, and its output is cropped: the
            # same numbers as convolving a cropped input, but the convolution
            # reads a contiguous tensor (a cropped view makes oneDNN fall back
            # to a slow path) and the gradient needs no zero-filled scatter.
            block = self.skip[key]
            s = self._block(block, x, 0, crop=p_in - _conv_pad(block))
        d = self._block(self.down[i], x, _conv_pad(self.inner[i]))
        last = i == c.n_scales - 1
        d = self._block(self.inner[i], d, 0 if last else self._input_pad(i + 1))
        if not last:
            d = self._level(i + 1, d)
        y = self._join(s, d, c.upsample_mode[i])
        bn = self.concat_bn[i]
        up_pad = _conv_pad(self.up[i])
        if bn.training:
            y = _bn_act(bn, y, 1.0, up_pad)
        else:
            y = bn(y)
            y = F.pad(y, (up_pad,) * 4, mode="reflect") if up_pad else y
        y = self._block(self.up[i], y, 0)
        if c.need1x1_up:
            y = self._block(self.up1x1[i], y, 0)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map the input ``z`` of shape ``(N, num_input_channels, H, W)`` to an image."""
        channels = self.networks * self.config.num_input_channels
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"expected input of shape (N, {channels}, H, W), got {tuple(x.shape)}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        p = self._input_pad(0)
        if p:
            x = F.pad(x, (p,) * 4, mode="reflect")
        y = self.out(self._level(0, x))
        y = torch.sigmoid(y) if self.config.need_sigmoid else y
        return y.contiguous()


_warned_fallback = False


def skip(*args, channels_last: bool = False, **kwargs) -> nn.Module:
    """Build the fast skip network; same arguments as :func:`dip_fast.reference.skip`.

    Falls back to the reference network, with one warning naming the reason,
    when the compiled extension is not available.
    """
    global _warned_fallback
    reference = reference_skip(*args, **kwargs)
    if not _ops.has_ops(*_ops.FAST_NETWORK_OPS):
        if not _warned_fallback:
            reason = _ops.LOAD_ERROR or "the extension lacks the fused ops; rebuild it"
            warnings.warn(
                f"dip_fast: the fast backend falls back to the reference network ({reason})",
                RuntimeWarning,
                stacklevel=2,
            )
            _warned_fallback = True
        return reference
    fast = FastSkipNet(reference.config, channels_last=channels_last)
    fast.load_state_dict(reference.state_dict())  # the reference's initialisation, bit for bit
    return fast
