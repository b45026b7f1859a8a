"""Restoring a large image in overlapping tiles: the plan, the cut and the blend.

Deep Image Prior fits one network to one image, and its memory and time
grow with the image; a large image can instead be restored as overlapping
tiles of one size, which a batched run can pack together, and the restored
tiles blended back:

1. :func:`plan_tiles` places tiles of exactly one size over the image, each
   overlapping its neighbours by at least a minimum (a :class:`TilePlan`);
2. :func:`split` cuts an image, or a per-pixel side input such as an
   inpainting mask, along the plan;
3. :func:`blend` puts the restored tiles back, each weighted by a
   :func:`window` that fades out across its overlaps, so no seam shows;
   :func:`blend_std` does the same for per-pixel standard deviations.

:func:`tile_request` does all three for a task of the registry: the task's
:class:`~dip_fast.tasks.registry.TileRule` says which inputs are cut with
the observation, how much larger the output is and how much overlap the
task needs.  Tasks without a rule (a caller's forward operator) are not
tiled.  Everything here is tensor code and runs on the tensors' device.

Examples:
    >>> import torch
    >>> from dip_fast.pipeline.tiles import blend, plan_tiles, split
    >>> plan = plan_tiles((40, 100), tile_size=32, min_overlap=8)
    >>> plan.tops, plan.lefts, plan.tile_size
    ((0, 8), (0, 23, 45, 68), (32, 32))
    >>> image = torch.rand(3, 40, 100)
    >>> tiles = split(image, plan)
    >>> len(tiles), tuple(tiles[0].shape)
    (8, (3, 32, 32))
    >>> torch.allclose(blend(tiles, plan), image)
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..tasks import registry
from ..tasks.inputs import check_inputs, check_int
from ..tasks.registry import INPUT_NAMES, TaskSpec

__all__ = ["TilePlan", "TiledRequest", "blend", "blend_std", "plan_tiles", "split", "tile_request", "window"]

#: A size or overlap: one int for both axes, or ``(rows, cols)``.
Size = Union[int, Tuple[int, int]]


def _pair(value: Any, name: str, minimum: int) -> Tuple[int, int]:
    """``value`` (an int, or two) as ``(rows, cols)``, each at least ``minimum``; errors name ``name``."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) != 2:
        raise TypeError(f"{name} must be an integer or a pair of integers (rows, cols), got {value!r}")
    rows, cols = (check_int(v, name, minimum) for v in value)
    return rows, cols


# --------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------


def _check_axis(origins: Tuple[int, ...], n: int, t: int, name: str) -> None:
    """Tiles of side ``t`` at ``origins`` cover ``0..n-1`` exactly: from 0 to ``n - t``, increasing, no gap."""
    if not origins or origins[0] != 0 or origins[-1] != n - t:
        raise ValueError(f"{name} must run from 0 to {n - t} (the image's side less the tile's), got {origins}")
    gaps = [b - a for a, b in zip(origins, origins[1:])]
    if any(g < 1 or g > t for g in gaps):
        raise ValueError(f"{name} must increase by 1 to {t} (the tile's side: no gap between tiles), got {origins}")


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles, all of one size, lie in an image.

    Tile ``k`` has its top-left corner at ``origins[k]``; the tiles are
    listed row by row, every top with every left.

    Attributes:
        image_size: ``(H, W)`` of the image.
        tile_size: ``(th, tw)`` of every tile: the requested size, cut
            down to the image's along a side where the image is smaller.
        tops: the tiles' top rows, increasing from 0 to ``H - th``.
        lefts: the tiles' left columns, increasing from 0 to ``W - tw``.

    Raises:
        ValueError: origins that leave a gap or run outside the image.
    """

    image_size: Tuple[int, int]
    tile_size: Tuple[int, int]
    tops: Tuple[int, ...]
    lefts: Tuple[int, ...]

    def __post_init__(self) -> None:
        (h, w), (th, tw) = self.image_size, self.tile_size
        if not (1 <= th <= h and 1 <= tw <= w):
            raise ValueError(f"tile_size {self.tile_size} must be between 1 and image_size {self.image_size}")
        _check_axis(self.tops, h, th, "tops")
        _check_axis(self.lefts, w, tw, "lefts")

    def __len__(self) -> int:
        return len(self.tops) * len(self.lefts)

    @property
    def origins(self) -> List[Tuple[int, int]]:
        """``(top, left)`` of each tile, row by row."""
        return [(top, left) for top in self.tops for left in self.lefts]

    def scaled(self, factor: int) -> "TilePlan":
        """The same tiling of an image ``factor`` times larger (a super-resolution's output).

        Examples:
            >>> from dip_fast.pipeline.tiles import plan_tiles
            >>> plan_tiles((20, 30), 16, 4).scaled(2)
            TilePlan(image_size=(40, 60), tile_size=(32, 32), tops=(0, 8), lefts=(0, 14, 28))
        """
        f = check_int(factor, "factor", 1)
        (h, w), (th, tw) = self.image_size, self.tile_size
        return TilePlan((h * f, w * f), (th * f, tw * f), tuple(o * f for o in self.tops),
                        tuple(o * f for o in self.lefts))


def _axis_origins(n: int, t: int, min_overlap: int, align: int) -> Tuple[int, ...]:
    """Origins of tiles of side ``t`` covering ``n`` pixels, overlapping by at least ``min_overlap``.

    As few tiles as the overlap (and the grid) allow, spread evenly, the first at 0 and the
    last ending at the border (at ``n - t``); the others on multiples of
    ``align`` when a tile's largest advance spans at least one grid step.
    """
    if n <= t:
        return (0,)
    span, step = n - t, t - min_overlap  # the last origin; the largest advance that keeps the overlap
    if step < align:
        align = 1  # the grid is coarser than the advance: keep the overlap, drop the grid
    cells, max_cells = -(-span // align), step // align  # the span in grid steps (rounded up); one advance's most
    count = -(-cells // max_cells)  # advances needed
    # Tile i at the grid step nearest i/count of the way.  Neighbours are then at most ceil(cells/count) <=
    # max_cells steps apart, so they overlap enough, and at least one step (count <= cells), so no two coincide.
    # The last tile moves back from the grid step at or past the border to end at it: that only shortens its advance.
    inner = tuple(align * ((2 * i * cells + count) // (2 * count)) for i in range(count))
    return inner + (span,)


def plan_tiles(image_size: Size, tile_size: Size, min_overlap: Size = 0, *, align: int = 1) -> TilePlan:
    """The tiles covering an image: all of ``tile_size``, neighbours overlapping by at least ``min_overlap``.

    Along each side the fewest tiles the overlap allows are spread evenly,
    the first at the image's edge and the last ending at the opposite edge
    (shifted back from the even spacing), so that every tile has one size
    and the tiles can be restored together in one batch.  A side not longer
    than the tile gets one tile of the image's side.

    Args:
        image_size: ``(H, W)`` of the image.
        tile_size: the tiles' side, or ``(th, tw)``.
        min_overlap: the least overlap of neighbouring tiles, or ``(rows,
            cols)``; smaller than the tile.  The length the tiles have to
            spare is shared out, so along a side the overlaps differ by at
            most a pixel (with ``align``, by a grid step, and the last one
            may be larger).
        align: put the tiles' origins on multiples of ``align`` (as the
            8x8 blocks of a JPEG), except the last of each row and column;
            ignored along a side where a tile advances less than ``align``.

    Raises:
        TypeError: a size that is not an integer or a pair of integers.
        ValueError: naming the argument: a side below 1, an overlap below 0
            or not smaller than the tile, ``align`` below 1.

    Examples:
        >>> from dip_fast.pipeline.tiles import plan_tiles
        >>> plan = plan_tiles((64, 100), tile_size=(64, 48), min_overlap=16)
        >>> plan.tile_size, plan.tops, plan.lefts, len(plan)
        ((64, 48), (0,), (0, 26, 52), 3)
        >>> plan_tiles((20, 20), tile_size=32).origins  # an image within one tile
        [(0, 0)]
        >>> plan_tiles((100, 100), tile_size=32, min_overlap=8, align=8).lefts
        (0, 24, 48, 68)
        >>> plan_tiles((100, 100), tile_size=32, min_overlap=32)
        Traceback (most recent call last):
        ...
        ValueError: min_overlap must be smaller than tile_size (tiles must advance to cover the image), got ...
    """
    h, w = _pair(image_size, "image_size", 1)
    th, tw = _pair(tile_size, "tile_size", 1)
    oy, ox = _pair(min_overlap, "min_overlap", 0)
    align = check_int(align, "align", 1)
    if oy >= th or ox >= tw:
        raise ValueError(f"min_overlap must be smaller than tile_size (tiles must advance to cover the image), "
                         f"got min_overlap={(oy, ox)} with tile_size={(th, tw)}")
    return TilePlan((h, w), (min(th, h), min(tw, w)), _axis_origins(h, th, oy, align), _axis_origins(w, tw, ox, align))


# --------------------------------------------------------------------------
# Split and blend
# --------------------------------------------------------------------------


def split(x: torch.Tensor, plan: TilePlan, name: str = "x") -> List[torch.Tensor]:
    """The tiles of ``x`` in the plan's order: views ``x[..., top:top + th, left:left + tw]``.

    Args:
        x: a ``(..., H, W)`` tensor of the plan's image size: an image
            ``(C, H, W)`` or ``(1, C, H, W)``, or a per-pixel side input
            such as a mask ``(H, W)``.
        plan: the tiling.
        name: how error messages name ``x``.

    Returns:
        One view per tile, sharing ``x``'s memory (clone one before writing
        into it); its leading dimensions are ``x``'s.

    Examples:
        >>> import torch
        >>> from dip_fast.pipeline.tiles import plan_tiles, split
        >>> mask = torch.ones(1, 1, 30, 20, dtype=torch.bool)
        >>> plan = plan_tiles((30, 20), 16, 4)
        >>> plan.tops, plan.lefts
        ((0, 7, 14), (0, 4))
        >>> tiles = split(mask, plan)
        >>> len(tiles), tuple(tiles[0].shape), tiles[0].data_ptr() == mask.data_ptr()
        (6, (1, 1, 16, 16), True)
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (..., H, W) to be cut into tiles, got {type(x).__name__}")
    if x.dim() < 2 or tuple(x.shape[-2:]) != plan.image_size:
        raise ValueError(f"{name} must be (..., H, W) with (H, W) = {plan.image_size} (the plan's image size), "
                         f"got shape {tuple(x.shape)}")
    th, tw = plan.tile_size
    return [x[..., top:top + th, left:left + tw] for top, left in plan.origins]


def _rise(n: int, device: Optional[torch.device], dtype: torch.dtype) -> torch.Tensor:
    """``sin^2`` rising over ``n`` pixels, sampled at pixel centres: from just above 0 to just below 1.

    The falling side of a neighbour, this reversed, is ``cos^2`` at the same
    pixels, so across an overlap met by two tiles their weights sum to 1;
    sampling at centres keeps every weight above 0, so every pixel of a
    tile counts and the blend's division is safe.
    """
    u = (torch.arange(n, device=device, dtype=torch.float64) + 0.5) / n
    return torch.sin(0.5 * math.pi * u).square().to(dtype)


def _profile(origins: Tuple[int, ...], i: int, t: int, device: Optional[torch.device],
             dtype: torch.dtype) -> torch.Tensor:
    """Tile ``i``'s weights along one axis: 1, tapered across its overlaps with the tiles before and after it.

    A side on the image's border is not tapered: no other tile covers it.
    """
    w = torch.ones(t, device=device, dtype=dtype)
    if i > 0:
        before = origins[i - 1] + t - origins[i]
        w[:before] *= _rise(before, device, dtype)
    if i + 1 < len(origins):
        after = origins[i] + t - origins[i + 1]
        w[t - after:] *= _rise(after, device, dtype).flip(0)
    return w


def window(plan: TilePlan, index: int, *, device: Union[str, torch.device, None] = None,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The blending weights of tile ``index``: a ``(th, tw)`` tensor in (0, 1].

    Separable: along each axis 1 in the tile's interior, rising as
    ``sin^2`` across the overlap with the tile before and falling as
    ``cos^2`` across the overlap with the tile after (a Hann taper as wide
    as the overlap, so the fade is as gentle as the overlap allows), and
    not tapered where the tile meets the image's border.

    Examples:
        >>> from dip_fast.pipeline.tiles import plan_tiles, window
        >>> plan = plan_tiles((8, 12), tile_size=8, min_overlap=4)
        >>> [round(float(v), 3) for v in window(plan, 0)[0]]
        [1.0, 1.0, 1.0, 1.0, 0.962, 0.691, 0.309, 0.038]
    """
    if isinstance(index, bool) or not isinstance(index, Integral) or not 0 <= index < len(plan):
        raise ValueError(f"index must be a tile of the plan, 0 to {len(plan) - 1}, got {index!r}")
    row, col = divmod(int(index), len(plan.lefts))
    (th, tw), dev = plan.tile_size, torch.device(device) if device is not None else None
    return torch.outer(_profile(plan.tops, row, th, dev, dtype), _profile(plan.lefts, col, tw, dev, dtype))


def _blend(tiles: Sequence[torch.Tensor], plan: TilePlan, name: str) -> torch.Tensor:
    """The windows' weighted mean of ``tiles`` at every pixel (see :func:`blend`)."""
    tiles = list(tiles)
    if len(tiles) != len(plan):
        raise ValueError(f"{name}: the plan has {len(plan)} tiles, got {len(tiles)}")
    if not all(isinstance(tile, torch.Tensor) and tile.is_floating_point() for tile in tiles):
        raise TypeError(f"{name} must be floating-point tensors")
    first, want = tiles[0], (*tiles[0].shape[:-2], *plan.tile_size)
    for k, tile in enumerate(tiles):
        if tuple(tile.shape) != want:
            raise ValueError(f"{name}[{k}] must have shape {want} (tiles[0]'s, with the plan's tile size), "
                             f"got {tuple(tile.shape)}")
    # Sum in at least float32: half-precision sums of many tiles would round visibly.
    acc = torch.promote_types(first.dtype, torch.float32)
    (h, w), (th, tw) = plan.image_size, plan.tile_size
    total = first.new_zeros((*want[:-2], h, w), dtype=acc)
    weight = first.new_zeros((h, w), dtype=acc)
    for k, ((top, left), tile) in enumerate(zip(plan.origins, tiles)):
        wk = window(plan, k, device=first.device, dtype=acc)
        total[..., top:top + th, left:left + tw] += tile.to(acc) * wk
        weight[top:top + th, left:left + tw] += wk
    # Dividing by the summed weights (not trusting them to sum to 1) makes
    # blend(split(x)) == x for any plan, corners and 3-tile overlaps included.
    return (total / weight).to(first.dtype)


def blend(tiles: Sequence[torch.Tensor], plan: TilePlan) -> torch.Tensor:
    """The full image from its tiles: each pixel the :func:`window`-weighted mean of the tiles covering it.

    Args:
        tiles: one floating-point tensor ``(..., th, tw)`` per tile of
            ``plan``, in its order, all of one shape (a stacked ``(K, C, th,
            tw)`` tensor is K tiles ``(C, th, tw)``).
        plan: the tiling, of the tiles' image (for a super-resolution, the
            input's plan scaled by the factor, see :meth:`TilePlan.scaled`).

    Returns:
        ``(..., H, W)``, the tiles' leading shape, dtype and device.
        ``blend(split(x, plan), plan)`` is ``x`` up to float rounding.

    Examples:
        >>> import torch
        >>> from dip_fast.pipeline.tiles import blend, plan_tiles
        >>> plan = plan_tiles((8, 12), tile_size=8, min_overlap=4)
        >>> left, right = torch.zeros(1, 8, 8), torch.ones(1, 8, 8)
        >>> [round(float(v), 3) for v in blend([left, right], plan)[0, 0]]
        [0.0, 0.0, 0.0, 0.0, 0.038, 0.309, 0.691, 0.962, 1.0, 1.0, 1.0, 1.0]
    """
    return _blend(tiles, plan, "tiles")


def blend_std(stds: Sequence[torch.Tensor], plan: TilePlan) -> torch.Tensor:
    """Per-pixel standard deviations of the tiles' restorations, blended: the root of the blended variances.

    The variances are blended with the image's weights, then the root is
    taken.  The blended image is a weighted mean of the tiles' estimates,
    but those are fitted to the same observed pixels, so they are far from
    independent: the rule for a mean of independent estimates (``sum w^2
    var / (sum w)^2``) would shrink the uncertainty wherever tiles overlap
    (by up to ``1/sqrt(2)`` where two meet), a seam that is an artefact of
    the tiling.  The blended variance equals a tile's where the tiles agree,
    changes smoothly across overlaps, and is never below the blended
    standard deviations (a root mean square is at least the mean).

    Args:
        stds: non-negative standard deviations, one tensor per tile, as for :func:`blend`.
        plan: the tiling.

    Examples:
        >>> import torch
        >>> from dip_fast.pipeline.tiles import blend_std, plan_tiles
        >>> plan = plan_tiles((8, 12), tile_size=8, min_overlap=4)
        >>> std = blend_std([torch.full((8, 8), 0.3), torch.full((8, 8), 0.4)], plan)
        >>> round(float(std[0, 0]), 3), round(float(std[0, 6]), 3), round(float(std[0, -1]), 3)
        (0.3, 0.372, 0.4)
    """
    return _blend([s.square() if isinstance(s, torch.Tensor) else s for s in stds], plan, "stds").sqrt()


# --------------------------------------------------------------------------
# A task's request in tiles
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TiledRequest:
    """A restoration cut into tiles: restore ``observations[k]`` with ``extras[k]``, blend with ``output_plan``.

    Attributes:
        observations: the observation's tiles (views of it), ``(..., th, tw)``.
        extras: per tile, the task inputs to restore it with: per-pixel
            inputs (the task rule's ``split_inputs``) cut like the
            observation, the others as given.
        input_plan: the observation's tiling.
        output_plan: the restored tiles' tiling, for :func:`blend`: the
            input plan scaled by the task's enlargement factor (the same
            plan for tasks whose output has the observation's size).
    """

    observations: List[torch.Tensor]
    extras: List[Dict[str, Any]]
    input_plan: TilePlan
    output_plan: TilePlan


def _refusal(spec: TaskSpec) -> str:
    """Why a task without a tiling rule is not tiled."""
    if spec.operator:
        why = ("its forward operator is arbitrary: it may mix every pixel of the image into each observed value, "
               "and its observation need not even have the image's shape, so a tile of the observation does not "
               "determine a tile of the image")
    else:
        why = ("its TaskSpec declares no tiling rule (TaskSpec.tiling), so nothing says how a tile of its "
               "observation relates to a tile of the image; register the task with a TileRule if it is local")
    return f"{spec.label} cannot be restored in tiles: {why}; restore the image whole"


def tile_request(task: Union[str, TaskSpec], observation: torch.Tensor, extras: Mapping[str, Any],
                 tile_size: Size, min_overlap: Size = 0) -> TiledRequest:
    """A task's observation and task inputs cut into tiles, with the plan that blends the restored tiles.

    The task's :class:`~dip_fast.tasks.registry.TileRule` decides: per-pixel
    inputs are cut with the observation (the inpainting mask), the output
    plan is the input plan scaled by the enlargement factor (super-resolution),
    the overlap is at least what the task's inputs demand (deblurring: the
    blur kernel's size) and tile origins follow its grid (JPEG's 8x8 blocks).
    The caller restores each tile and hands the outputs to :func:`blend`.

    Inputs that hold for the whole image go to every tile unchanged: pass
    one ``sigma`` for the whole image (estimated on all of it) rather than
    letting each tile estimate its own, so the tiles are restored alike.

    Args:
        task: the task's name (or alias) or its spec.
        observation: the degraded image, ``(C, H, W)`` or ``(1, C, H, W)``
            (the low-resolution one for super-resolution).
        extras: the ``restore()`` task inputs (``mask``, ``scale``,
            ``blur_kernel``, ``sigma``), as ``restore()`` takes them; a
            per-pixel one as a ``(..., H, W)`` tensor.
        tile_size: the observation's tile side, or ``(th, tw)``.
        min_overlap: the least overlap of neighbouring tiles (raised to the
            task's own minimum), or ``(rows, cols)``.

    Raises:
        ValueError: the task has no tiling rule (a caller's forward
            operator), an input it lacks or does not take, a tile not
            larger than the overlap the task needs, or a bad size (naming
            the argument).
        TypeError: an observation or per-pixel input that is not a tensor.

    Examples:
        >>> import torch
        >>> from dip_fast.pipeline.tiles import blend, tile_request
        >>> low = torch.rand(3, 24, 40)
        >>> tiled = tile_request("sr", low, {"scale": 4}, tile_size=16, min_overlap=4)
        >>> len(tiled.observations), tiled.extras[0], tiled.output_plan.tile_size
        (6, {'scale': 4}, (64, 64))
        >>> outputs = [torch.nn.functional.interpolate(t[None], scale_factor=4)[0] for t in tiled.observations]
        >>> tuple(blend(outputs, tiled.output_plan).shape)
        (3, 96, 160)
        >>> tile_request(lambda x: x, low, {}, tile_size=16)
        Traceback (most recent call last):
        ...
        TypeError: task must be a task name or a TaskSpec, got function
    """
    spec = registry.get_task(task) if isinstance(task, str) else task
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"task must be a task name or a TaskSpec, got {type(task).__name__}")
    rule = spec.tiling
    if rule is None:
        raise ValueError(_refusal(spec))
    unknown = sorted(set(extras) - set(INPUT_NAMES))
    if unknown:
        raise ValueError(f"extras: {unknown} are not task inputs; the task inputs are {INPUT_NAMES}")
    checked = check_inputs(spec, dict(extras))  # the messages restore() gives for a missing or misplaced input
    if not isinstance(observation, torch.Tensor) or observation.dim() < 2:
        got = tuple(observation.shape) if isinstance(observation, torch.Tensor) else type(observation).__name__
        raise TypeError(f"observation must be a torch.Tensor (C, H, W) or (1, C, H, W), got {got}")

    overlap = _pair(min_overlap, "min_overlap", 0)
    if rule.min_overlap is not None:
        need = _pair(rule.min_overlap(checked), "the tiling rule's min_overlap", 0)
        tile = _pair(tile_size, "tile_size", 1)
        if need[0] >= tile[0] or need[1] >= tile[1]:
            raise ValueError(f"tile_size={tile} is too small for {spec.label}: its inputs need tiles that overlap "
                             f"by at least {need} pixels, so tile_size must be larger than that")
        overlap = (max(overlap[0], need[0]), max(overlap[1], need[1]))
    plan = plan_tiles(tuple(observation.shape[-2:]), tile_size, overlap, align=rule.align)
    factor = checked[rule.scale_input] if rule.scale_input is not None else 1

    cut = {name: split(extras[name], plan, name) for name in rule.split_inputs if extras.get(name) is not None}
    per_tile = [{**extras, **{name: tiles[k] for name, tiles in cut.items()}} for k in range(len(plan))]
    return TiledRequest(split(observation, plan, "observation"), per_tile, plan, plan.scaled(factor))
