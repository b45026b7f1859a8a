"""The built-in tasks: the paper's four, JPEG artefact removal and a caller's forward operator.

Each is one :class:`~dip_fast.tasks.registry.TaskSpec`, registered on import.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch.nn as nn

from .presets import Preset, get_preset
from .registry import LEVELS, CliFlag, TaskSpec, TermContext, TileRule, register_task
from .terms import DeblurTerm, DenoiseTerm, InpaintTerm, OperatorTerm, SuperResolutionTerm

__all__ = ["DEBLUR", "DENOISE", "INPAINT", "JPEG", "OPERATOR", "SUPER_RESOLUTION"]


def _denoise_term(ctx: TermContext) -> nn.Module:
    return DenoiseTerm(ctx.observation)


def _inpaint_term(ctx: TermContext) -> nn.Module:
    if ctx.mask is None:
        raise ValueError("task 'inpaint' needs a mask")
    return InpaintTerm(ctx.observation, ctx.mask)


def _sr_term(ctx: TermContext) -> nn.Module:
    return SuperResolutionTerm(ctx.observation, ctx.preset.sr_factor, ctx.preset.sr_kernel)


def _deblur_term(ctx: TermContext) -> nn.Module:
    if ctx.blur_kernel is None:
        raise ValueError("task 'deblur' needs a blur_kernel")
    return DeblurTerm(ctx.observation, ctx.blur_kernel, ctx.box)


def _operator_term(ctx: TermContext) -> nn.Module:
    if ctx.operator is None:
        raise ValueError("task 'callable' needs an operator")
    return OperatorTerm(ctx.observation, ctx.operator, ctx.box)


def _kernel_overlap(inputs: Mapping[str, Any]) -> Tuple[int, int]:
    """Deblurring tiles overlap by at least the blur kernel's size ``(rows, cols)``.

    A blurred pixel within a kernel radius of a tile's inner edge mixes in
    sharp pixels from beyond that edge, which the tile's data term replaces
    by their reflection, so each tile is unreliable in a band one radius wide
    along its inner edges.  With an overlap of the kernel's size the two
    bands of neighbouring tiles are disjoint: every pixel of the overlap is
    reliable in one of them, and where two tiles meet the blending window
    (:func:`dip_fast.pipeline.tiles.window`) gives the unreliable one under half the
    weight.
    """
    kernel = inputs["blur_kernel"]  # checked: a 2-D tensor with odd sides
    return int(kernel.shape[0]), int(kernel.shape[1])


def _by_level(prefix: str) -> Dict[str, str]:
    """Presets named ``PREFIX_paper``, ``PREFIX_fast`` and ``PREFIX_quick``."""
    return {level: f"{prefix}_{level}" for level in LEVELS}


def _sr_preset(preset: Preset, level: str, scale: Optional[int]) -> Preset:
    """Super-resolution runs at the requested factor; the paper's settings above x4 are sr_x8's."""
    if level == "paper" and scale is not None and scale > 4:
        preset = get_preset("sr_x8")
    if scale is not None and scale != preset.sr_factor:
        preset = preset.with_overrides(sr_factor=scale)
    return preset


DENOISE = register_task(TaskSpec(
    name="denoise",
    make_term=_denoise_term,
    presets={"paper": "denoise_f16_sigma25", "fast": "denoise_fast", "quick": "denoise_quick"},
    optional=("sigma",),
    early_stop=True,
    # The rule beat the fixed count on the validation photographs (bench/README.md, "Early stopping
    # on photographs"): +0.63 dB on average at 128x128 (23 runs), never more than 0.11 dB below it.
    auto_stop="early",
    command="denoise",
    summary="remove noise",
    description="Remove noise from an image.",
    epilog="""examples:
  dip-fast denoise noisy.png -o clean.png
  dip-fast denoise noisy.png -o clean.png --sigma 50 --preset paper --device cuda
  dip-fast denoise noisy.png -o clean.png --ground-truth original.png --plot
""",
    flags=(CliFlag("sigma", "--sigma", type=float,
                   help="noise level in 0-255 units (default: estimated from the image)",
                   batch_help="denoise: noise level in 0-255 units (default: estimated per image)"),),
    tiling=TileRule(),  # the forward model is the identity: a tile of the observation is all a tile needs
))

INPAINT = register_task(TaskSpec(
    name="inpaint",
    make_term=_inpaint_term,
    presets={"paper": "inpaint_kate", "fast": "inpaint_fast", "quick": "inpaint_quick"},
    required=("mask",),
    command="inpaint",
    summary="fill in missing pixels",
    description="Fill in the unknown pixels of an image.",
    epilog="""examples:
  dip-fast inpaint photo.png --mask mask.png -o filled.png
  dip-fast inpaint photo.png --mask mask.png -o filled.png --iterations 3000 --save-every 500

The mask is an image of the same size: white (or 1) marks known pixels,
black (0) the pixels to fill in.
""",
    flags=(CliFlag("mask", "--mask", metavar="M", required=True, is_file=True, per_file=True,
                   help="mask image: white/1 = known pixel, black/0 = fill in",
                   batch_flag="--masks", batch_metavar="DIR",
                   batch_help="inpaint, required: folder of masks named like the images",
                   batch_needs="DIR (masks named like the images; white = known pixel)"),),
    tiling=TileRule(split_inputs=("mask",)),  # pixel by pixel: the mask is cut with the image
))

SUPER_RESOLUTION = register_task(TaskSpec(
    name="super_resolution",
    aliases=("sr",),
    make_term=_sr_term,
    presets={"paper": "sr_x4", "fast": "sr_fast", "quick": "sr_quick"},
    required=("scale",),
    adapt_preset=_sr_preset,
    command="sr",
    summary="super-resolution",
    description="Enlarge an image by an even integer factor.",
    epilog="""examples:
  dip-fast sr small.png --scale 4 -o large.png
  dip-fast sr small.png --scale 8 -o large.png --preset paper --device cuda
""",
    flags=(CliFlag("scale", "--scale", type=int, required=True, help="enlargement factor: 2, 4, 8, ...",
                   batch_help="sr, required: enlargement factor 2, 4, 8, ...", batch_needs="(2, 4, 8, ...)"),),
    # The low-resolution input is tiled; each tile comes back `scale` times larger.
    tiling=TileRule(scale_input="scale"),
))

DEBLUR = register_task(TaskSpec(
    name="deblur",
    make_term=_deblur_term,
    # The paper has no deblurring notebook: the denoising settings at every level (preset names say so).
    presets=_by_level("deblur"),
    required=("blur_kernel",),
    early_stop=True,
    crop_in_term=True,
    command="deblur",
    summary="remove a known blur",
    description="Remove a known blur from an image.",
    epilog="""examples:
  dip-fast deblur blurry.png --blur-kernel gaussian:2 -o sharp.png
  dip-fast deblur blurry.png --blur-kernel box:5 -o sharp.png --stop never --iterations 3000

The blur is assumed known: gaussian:SIGMA (in pixels) or box:N (N odd). The
image is modelled as the sharp image blurred with reflect-padded borders.
""",
    flags=(CliFlag("blur_kernel", "--blur-kernel", metavar="SPEC", required=True,
                   help="the blur: gaussian:SIGMA or box:N (N odd)",
                   batch_help="deblur, required: the blur kernel, gaussian:SIGMA or box:N (N odd)",
                   batch_needs="SPEC (gaussian:SIGMA or box:N, N odd)"),),
    tiling=TileRule(min_overlap=_kernel_overlap),
))

JPEG = register_task(TaskSpec(
    name="jpeg",
    # The denoising data term on the compressed image (the notebook's snail); only the presets differ.
    make_term=_denoise_term,
    presets={"paper": "dejpeg_snail", "fast": "jpeg_fast", "quick": "jpeg_quick"},
    early_stop=True,
    command="jpeg",
    summary="remove JPEG artefacts",
    description="Remove JPEG compression artefacts from an image.",
    epilog="""examples:
  dip-fast jpeg compressed.jpg -o restored.png
  dip-fast jpeg compressed.jpg -o restored.png --preset paper --device cuda

Removes JPEG blocking and ringing: the network is fitted to the compressed
image itself and stopped before it learns the artefacts (write a .png: saving
the result as JPEG would add new ones).
""",
    # Tile origins on the 8x8 block grid, so each tile sees whole blocks, placed as in the image.
    tiling=TileRule(align=8),
))

OPERATOR = register_task(TaskSpec(
    name="callable",
    make_term=_operator_term,
    presets=_by_level("callable"),
    required=("output_shape",),
    crop_in_term=True,
    operator=True,
    label="a callable task",
    # No tiling rule: an arbitrary operator may mix every pixel into each observed value.
))
