"""Tiling: the plan covers the image with equal tiles, split and blend are inverse, the window fades smoothly,
and each task's rule cuts its request as its forward model needs (or refuses)."""
from __future__ import annotations

import math
import random

import pytest
import torch

from dip_fast import restore
from dip_fast.tasks import registry
from dip_fast.tasks.degradations import make_blur_kernel
from dip_fast.tasks.registry import TaskSpec, TileRule
from dip_fast.tasks.terms import DenoiseTerm
from dip_fast.pipeline.tiles import TilePlan, blend, blend_std, plan_tiles, split, tile_request, window

pytestmark = pytest.mark.usefixtures("one_thread")


def random_plans(count: int, seed: int, max_side: int = 160):
    """``count`` random ``(plan, min_overlap, align)``: any image/tile ratio, overlaps up to tile - 1."""
    rng = random.Random(seed)
    for _ in range(count):
        h, w = rng.randint(1, max_side), rng.randint(1, max_side)
        th, tw = rng.randint(1, 64), rng.randint(1, 64)
        oy, ox = rng.randint(0, th - 1), rng.randint(0, tw - 1)
        align = rng.choice([1, 1, 8, 5])
        yield plan_tiles((h, w), (th, tw), (oy, ox), align=align), (oy, ox), (th, tw), align


def gaps(origins):
    return [b - a for a, b in zip(origins, origins[1:])]


# --------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------


def test_plan_covers_every_pixel_with_equal_tiles_and_enough_overlap():
    for plan, (oy, ox), (th, tw), _ in random_plans(600, seed=1):
        (h, w), tile = plan.image_size, plan.tile_size
        assert tile == (min(th, h), min(tw, w))
        coverage = torch.zeros(h, w, dtype=torch.int64)
        for top, left in plan.origins:
            assert 0 <= top and top + tile[0] <= h and 0 <= left and left + tile[1] <= w
            coverage[top:top + tile[0], left:left + tile[1]] += 1
        assert int(coverage.min()) >= 1, plan
        # Neighbouring tiles overlap by the tile side less their advance.
        assert all(tile[0] - g >= oy for g in gaps(plan.tops)), plan
        assert all(tile[1] - g >= ox for g in gaps(plan.lefts)), plan
        assert len(plan) == len(set(plan.origins))


def test_plan_uses_the_fewest_tiles_the_overlap_allows():
    for plan, (oy, ox), (th, tw), align in random_plans(600, seed=2):
        if align != 1:
            continue
        for n, t, o, origins in ((plan.image_size[0], th, oy, plan.tops), (plan.image_size[1], tw, ox, plan.lefts)):
            fewest = 1 if n <= t else math.ceil((n - t) / (t - o)) + 1
            assert len(origins) == fewest, (n, t, o, origins)


def test_plan_spreads_the_tiles_evenly():
    """With align=1 the advances differ by at most one pixel (no sliver of a last tile)."""
    for plan, _, _, align in random_plans(400, seed=3):
        for origins in (plan.tops, plan.lefts):
            if align == 1 and len(origins) > 1:
                assert max(gaps(origins)) - min(gaps(origins)) <= 1, origins


def test_plan_puts_origins_on_the_grid_where_the_advance_allows():
    for plan, (oy, ox), (th, tw), align in random_plans(600, seed=4):
        for origins, t, o in ((plan.tops, th, oy), (plan.lefts, tw, ox)):
            if t - o >= align:  # a grid step fits in one advance
                assert all(origin % align == 0 for origin in origins[:-1]), (origins, align)


def test_a_side_within_one_tile_gets_one_tile_of_its_size():
    for size in [(5, 5), (32, 32), (20, 32), (32, 7)]:
        plan = plan_tiles(size, 32, 8)
        assert plan.origins == [(0, 0)] and plan.tile_size == size and len(plan) == 1
    plan = plan_tiles((10, 100), 32, 8)
    assert plan.tops == (0,) and plan.tile_size == (10, 32) and len(plan.lefts) > 1


def test_scaled_plan_is_the_plan_times_the_factor():
    for plan, *_ in random_plans(100, seed=5):
        for f in (2, 4):
            big = plan.scaled(f)
            assert big.image_size == tuple(n * f for n in plan.image_size)
            assert big.tile_size == tuple(n * f for n in plan.tile_size)
            assert big.origins == [(t * f, l * f) for t, l in plan.origins]


def test_a_plan_with_a_gap_or_outside_the_image_is_refused():
    with pytest.raises(ValueError, match="lefts"):
        TilePlan((10, 40), (10, 16), (0,), (0, 17, 24))  # 16..16 uncovered
    with pytest.raises(ValueError, match="tops"):
        TilePlan((20, 16), (10, 16), (0, 5), (0,))  # ends before the border
    with pytest.raises(ValueError, match="tile_size"):
        TilePlan((10, 10), (12, 10), (0,), (0,))


# --------------------------------------------------------------------------
# Split and blend
# --------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(), (3,), (1, 3)])
def test_blend_of_split_is_the_image(lead):
    gen = torch.Generator().manual_seed(0)
    for plan, *_ in random_plans(150, seed=6, max_side=96):
        x = torch.rand(*lead, *plan.image_size, generator=gen)
        parts = split(x, plan)
        assert all(tuple(p.shape) == (*lead, *plan.tile_size) for p in parts)
        torch.testing.assert_close(blend(parts, plan), x, rtol=0, atol=2e-6)


@pytest.mark.parametrize("size, tile", [((24, 40), 16), ((40, 24), (16, 8)), ((12, 12), 32), ((16, 16), 16),
                                        ((16, 48), 16), ((9, 33), (4, 32))])
def test_blend_of_split_through_a_scaled_plan(size, tile):
    """The super-resolution path: a low-resolution plan, outputs blended with its scaled plan."""
    for factor in (1, 2, 4):
        plan = plan_tiles(size, tile, 3).scaled(factor)
        big = torch.rand(1, 3, *plan.image_size, generator=torch.Generator().manual_seed(factor), dtype=torch.float64)
        torch.testing.assert_close(blend(split(big, plan), plan), big, rtol=0, atol=1e-12)


def test_split_gives_views_in_row_order():
    x = torch.arange(30 * 50, dtype=torch.float32).reshape(30, 50)
    plan = plan_tiles((30, 50), (16, 20), 4)
    for (top, left), part in zip(plan.origins, split(x, plan)):
        assert part.data_ptr() == x[top, left].data_ptr()
        assert torch.equal(part, x[top:top + 16, left:left + 20])
    assert plan.origins == sorted(plan.origins)


def test_blend_keeps_dtype_and_takes_a_stacked_batch():
    plan = plan_tiles((20, 30), 16, 4)
    x = torch.rand(3, 20, 30).half()
    stacked = torch.stack(split(x, plan))  # (K, C, th, tw), as a packed run returns them
    out = blend(stacked, plan)
    assert out.dtype == torch.float16 and out.shape == x.shape
    torch.testing.assert_close(out, x, rtol=0, atol=1e-3)


def test_blend_is_a_weighted_mean_that_keeps_each_tile_alone_where_it_is_alone():
    """Tiles that disagree: each pixel lies between the values of the tiles covering it, and equals a tile's
    value where no other tile covers it."""
    plan = plan_tiles((40, 50), 16, 6)
    values = torch.arange(len(plan), dtype=torch.float64) + 1
    out = blend([torch.full(plan.tile_size, float(v), dtype=torch.float64) for v in values], plan)
    (th, tw) = plan.tile_size
    lo = torch.full(plan.image_size, math.inf, dtype=torch.float64)
    hi, count = torch.full_like(lo, -math.inf), torch.zeros(plan.image_size, dtype=torch.int64)
    for (top, left), v in zip(plan.origins, values):
        box = (slice(top, top + th), slice(left, left + tw))
        lo[box], hi[box] = lo[box].clamp(max=float(v)), hi[box].clamp(min=float(v))
        count[box] += 1
    assert bool(((out >= lo - 1e-12) & (out <= hi + 1e-12)).all())
    alone = count == 1
    assert bool(alone.any()) and torch.equal(out[alone], lo[alone])
    assert bool(((out > lo) & (out < hi))[count > 1].all())  # overlaps are mixtures, not copies of one tile


def test_blend_std_blends_variances():
    plan = plan_tiles((20, 36), (20, 16), 6)
    stds = [torch.full((2, 20, 16), 0.1 * (k + 1)) for k in range(len(plan))]
    out = blend_std(stds, plan)
    variances = blend([s.square() for s in stds], plan)
    torch.testing.assert_close(out, variances.sqrt())
    # A map split and blended comes back; the root of the blended variance is at least the blended std.
    std_map = torch.rand(2, 20, 36)
    torch.testing.assert_close(blend_std(split(std_map, plan), plan), std_map, rtol=0, atol=2e-6)
    assert bool((out >= blend(stds, plan) - 1e-6).all())


def test_split_and_blend_name_bad_arguments():
    plan = plan_tiles((20, 30), 16, 4)
    with pytest.raises(ValueError, match=r"mask must be \(\.\.\., H, W\) with \(H, W\) = \(20, 30\)"):
        split(torch.zeros(20, 31), plan, "mask")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        split([[0.0]], plan)
    parts = split(torch.rand(3, 20, 30), plan)
    assert len(parts) == 6
    with pytest.raises(ValueError, match="tiles: the plan has 6 tiles, got 3"):
        blend(parts[:3], plan)
    with pytest.raises(ValueError, match=r"tiles\[2\] must have shape \(3, 16, 16\)"):
        blend(parts[:2] + [torch.zeros(3, 16, 15)] + parts[3:], plan)
    with pytest.raises(TypeError, match="tiles must be floating-point"):
        blend([p.to(torch.int64) for p in parts], plan)
    with pytest.raises(ValueError, match="stds: the plan has 6 tiles"):
        blend_std(parts[:1], plan)


@pytest.mark.cuda
def test_split_and_blend_on_cuda():
    plan = plan_tiles((70, 90), 32, 8)
    x = torch.rand(1, 3, 70, 90, device="cuda")
    out = blend(split(x, plan), plan)
    assert out.device == x.device
    torch.testing.assert_close(out.cpu(), x.cpu(), rtol=0, atol=2e-6)


# --------------------------------------------------------------------------
# The window
# --------------------------------------------------------------------------


def test_window_is_positive_flat_inside_and_untapered_at_the_border():
    for plan, *_ in random_plans(150, seed=7, max_side=96):
        (h, w), (th, tw) = plan.image_size, plan.tile_size
        count = torch.zeros(h, w, dtype=torch.int64)
        for top, left in plan.origins:
            count[top:top + th, left:left + tw] += 1
        for k, (top, left) in enumerate(plan.origins):
            wk = window(plan, k, dtype=torch.float64)
            assert wk.shape == (th, tw)
            assert bool((wk > 0).all()) and bool((wk <= 1).all())
            # 1 wherever the tile is alone: its interior, and the image's border outside the overlaps.
            alone = count[top:top + th, left:left + tw] == 1
            assert torch.equal(wk[alone], torch.ones_like(wk[alone])), (plan, k)


def test_window_fades_smoothly_across_each_overlap():
    """Across an overlap of n pixels met by two tiles only, one tile's weight rises monotonically, by at most
    pi/(2n) a pixel (the largest slope of sin^2 over n pixels), while the other's falls: they sum to 1."""
    checked = 0
    for plan, *_ in random_plans(300, seed=8, max_side=96):
        th = plan.tile_size[0]
        overlaps = [0] + [th - g for g in gaps(plan.tops)] + [0]  # overlaps[i]: tile i-1 with tile i
        for i in range(1, len(plan.tops)):
            n = overlaps[i]
            if overlaps[i - 1] + n > th or n + overlaps[i + 1] > th:
                continue  # a tile's two tapers meet: three tiles share some pixels
            before = window(plan, (i - 1) * len(plan.lefts), dtype=torch.float64)[th - n:, 0]
            after = window(plan, i * len(plan.lefts), dtype=torch.float64)[:n, 0]
            torch.testing.assert_close(before + after, torch.ones_like(before))
            assert all(0 < step <= math.pi / (2 * n) + 1e-12 for step in after.diff().tolist()), (plan, i)
            if n >= 4:
                # No kink where the fade meets the flat part or the tile's edge: the steps from 0 (beyond the
                # edge) into the fade and from the fade to 1 are smaller than a step in its middle (a linear
                # ramp's are not).
                steps = torch.diff(torch.cat([after.new_zeros(1), after, after.new_ones(1)]))
                middle = float(steps[(n + 1) // 2])
                assert float(steps[0]) < middle / 2 and float(steps[1]) < middle and float(steps[-1]) < middle / 2
            checked += 1
    assert checked > 50


def test_window_of_a_plan_without_overlap_is_flat():
    plan = plan_tiles((32, 48), 16, 0)
    assert len(plan) == 6
    for k in range(len(plan)):
        assert torch.equal(window(plan, k), torch.ones(16, 16))
    with pytest.raises(ValueError, match="index must be a tile of the plan, 0 to 5"):
        window(plan, 6)


# --------------------------------------------------------------------------
# Bad sizes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(image_size=(0, 10), tile_size=8), ValueError, "image_size must be >= 1"),
    (dict(image_size=(10, 10), tile_size=0), ValueError, "tile_size must be >= 1"),
    (dict(image_size=(10, 10), tile_size=(8, -1)), ValueError, "tile_size must be >= 1"),
    (dict(image_size=(10, 10), tile_size=8, min_overlap=-1), ValueError, "min_overlap must be >= 0"),
    (dict(image_size=(10, 10), tile_size=8, min_overlap=8), ValueError, "min_overlap must be smaller than tile_size"),
    (dict(image_size=(10, 10), tile_size=(8, 16), min_overlap=(2, 16)), ValueError, "min_overlap must be smaller"),
    (dict(image_size=(10, 10), tile_size=8, align=0), ValueError, "align must be >= 1"),
    (dict(image_size=(10, 10), tile_size=8.0), TypeError, "tile_size must be an integer"),
    (dict(image_size=10.5, tile_size=8), TypeError, "image_size must be an integer or a pair"),
    (dict(image_size=(10, 10, 3), tile_size=8), TypeError, "image_size must be an integer or a pair"),
    (dict(image_size=(10, 10), tile_size=True), TypeError, "tile_size must be an integer"),
])
def test_bad_sizes_name_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        plan_tiles(**kwargs)


# --------------------------------------------------------------------------
# The tasks' rules
# --------------------------------------------------------------------------


def test_every_named_task_with_a_local_forward_model_has_a_rule():
    for spec in registry.all_tasks():
        assert (spec.tiling is None) == spec.operator, spec.name


def test_denoise_tiles_the_observation_and_passes_the_inputs_on():
    obs = torch.rand(1, 3, 40, 56)
    tiled = tile_request("denoise", obs, {"sigma": 25.0}, tile_size=24, min_overlap=6)
    assert tiled.output_plan == tiled.input_plan == plan_tiles((40, 56), 24, 6)
    assert tiled.extras == [{"sigma": 25.0}] * len(tiled.input_plan)
    assert all(torch.equal(a, b) for a, b in zip(tiled.observations, split(obs, tiled.input_plan)))
    torch.testing.assert_close(blend(tiled.observations, tiled.output_plan), obs)


def test_inpaint_cuts_the_mask_with_the_image():
    obs = torch.rand(3, 30, 45)
    mask = torch.rand(1, 30, 45) > 0.5
    tiled = tile_request(registry.get_task("inpaint"), obs, {"mask": mask}, tile_size=(16, 20), min_overlap=4)
    plan = tiled.input_plan
    for (top, left), o, extra in zip(plan.origins, tiled.observations, tiled.extras):
        assert torch.equal(o, obs[:, top:top + 16, left:left + 20])
        assert torch.equal(extra["mask"], mask[:, top:top + 16, left:left + 20])
    with pytest.raises(ValueError, match="mask is required"):
        tile_request("inpaint", obs, {}, tile_size=16)
    with pytest.raises(ValueError, match=r"mask must be \(\.\.\., H, W\)"):
        tile_request("inpaint", obs, {"mask": mask[..., :40]}, tile_size=16)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        tile_request("inpaint", obs, {"mask": mask.numpy()}, tile_size=16)


def test_inpaint_refuses_a_tile_without_a_known_pixel_before_any_run():
    image = torch.rand(1, 3, 96, 96)
    mask = torch.zeros(1, 1, 96, 96)
    mask[..., :20] = 1  # only the left strip is known: the tiles right of it have nothing to go on
    with pytest.raises(ValueError, match=r"tile=32: the tile at rows 0-31, columns 32-63 holds no known pixel"):
        restore(image, task="inpaint", mask=mask, tile=32, iterations=1, preset="inpaint_quick")


@pytest.mark.parametrize("scale", [2, 4])
def test_sr_tiles_the_low_resolution_input_and_scales_the_output_plan(scale):
    low = torch.rand(3, 20, 36)
    tiled = tile_request("sr", low, {"scale": scale}, tile_size=12, min_overlap=4)
    assert tiled.input_plan == plan_tiles((20, 36), 12, 4)
    assert tiled.output_plan == tiled.input_plan.scaled(scale)
    assert tiled.output_plan.image_size == (20 * scale, 36 * scale)
    high = torch.rand(3, 20 * scale, 36 * scale, dtype=torch.float64)
    torch.testing.assert_close(blend(split(high, tiled.output_plan), tiled.output_plan), high)
    with pytest.raises(ValueError, match="scale is required"):
        tile_request("sr", low, {}, tile_size=12)
    with pytest.raises(ValueError, match="scale must be even"):
        tile_request("sr", low, {"scale": 3}, tile_size=12)


@pytest.mark.parametrize("kernel", ["gaussian:2", "box:7", [[1.0] * 9] * 3])
def test_deblur_overlaps_by_the_kernel_size(kernel):
    kh, kw = make_blur_kernel(kernel).shape
    obs = torch.rand(1, 1, 90, 120)
    tiled = tile_request("deblur", obs, {"blur_kernel": kernel}, tile_size=32, min_overlap=1)
    plan = tiled.input_plan
    assert len(plan.tops) > 1 and len(plan.lefts) > 1
    assert min(32 - g for g in gaps(plan.tops)) >= kh
    assert min(32 - g for g in gaps(plan.lefts)) >= kw
    assert all(extra["blur_kernel"] is kernel for extra in tiled.extras)
    # The caller's larger overlap wins over the kernel's.
    wider = tile_request("deblur", obs, {"blur_kernel": kernel}, tile_size=32, min_overlap=20).input_plan
    assert min(32 - g for g in gaps(wider.lefts)) >= 20


def test_deblur_refuses_tiles_not_larger_than_the_kernel():
    with pytest.raises(ValueError, match=r"tile_size=\(13, 13\) is too small for task='deblur'.*\(13, 13\) pixels"):
        tile_request("deblur", torch.rand(3, 40, 40), {"blur_kernel": "gaussian:2"}, tile_size=13)
    with pytest.raises(ValueError, match="blur_kernel is required"):
        tile_request("deblur", torch.rand(3, 40, 40), {}, tile_size=32)


def test_jpeg_origins_lie_on_the_block_grid():
    obs = torch.rand(3, 100, 203)
    plan = tile_request("jpeg", obs, {}, tile_size=48, min_overlap=12).input_plan
    assert len(plan.lefts) > 2
    assert all(o % 8 == 0 for o in plan.tops[:-1] + plan.lefts[:-1])
    assert plan.lefts[-1] == 203 - 48 and min(48 - g for g in gaps(plan.lefts)) >= 12


def test_a_forward_operator_is_not_tiled():
    spec = registry.operator_task()
    assert spec is not None and spec.tiling is None
    with pytest.raises(ValueError, match="a callable task cannot be restored in tiles: its forward operator is "
                                         "arbitrary: it may mix every pixel"):
        tile_request(spec, torch.rand(3, 64, 64), {"output_shape": (3, 64, 64)}, tile_size=32)
    with pytest.raises(TypeError, match="task must be a task name or a TaskSpec, got function"):
        tile_request(lambda x: x, torch.rand(3, 64, 64), {}, tile_size=32)


@pytest.fixture
def toy_task():
    spec = registry.register_task(TaskSpec(name="toy_tiles", make_term=lambda ctx: DenoiseTerm(ctx.observation),
                                           presets={"paper": "denoise_quick", "fast": "denoise_quick",
                                                    "quick": "denoise_quick"}))
    yield spec
    registry.unregister_task(spec.name)


def test_a_task_without_a_rule_is_not_tiled(toy_task):
    with pytest.raises(ValueError, match=r"task='toy_tiles' cannot be restored in tiles: its TaskSpec declares no "
                                         r"tiling rule \(TaskSpec.tiling\)"):
        tile_request("toy_tiles", torch.rand(3, 64, 64), {}, tile_size=32)


def test_rules_are_checked():
    with pytest.raises(ValueError, match="align must be an integer >= 1"):
        TileRule(align=0)
    with pytest.raises(ValueError, match=r"unknown inputs \['weights'\]"):
        TileRule(split_inputs=("weights",))
    with pytest.raises(ValueError, match=r"its tiling rule names inputs it does not take: \['mask'\]"):
        TaskSpec(name="toy_rule", make_term=lambda ctx: DenoiseTerm(ctx.observation),
                 presets={"paper": "p", "fast": "p", "quick": "p"}, tiling=TileRule(split_inputs=("mask",)))


def test_tile_request_names_bad_arguments():
    obs = torch.rand(3, 40, 40)
    with pytest.raises(ValueError, match=r"extras: \['iterations'\] are not task inputs"):
        tile_request("denoise", obs, {"iterations": 3}, tile_size=16)
    with pytest.raises(ValueError, match=r"mask only applies to task='inpaint'"):
        tile_request("denoise", obs, {"mask": torch.ones(40, 40)}, tile_size=16)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tile_request("nope", obs, {}, tile_size=16)
    with pytest.raises(TypeError, match="observation must be a torch.Tensor"):
        tile_request("denoise", obs.numpy(), {}, tile_size=16)
    with pytest.raises(ValueError, match="min_overlap must be smaller than tile_size"):
        tile_request("denoise", obs, {}, tile_size=16, min_overlap=16)


# --------------------------------------------------------------------------
# With restore()
# --------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:dip_fast")
@pytest.mark.parametrize("task, extras, factor", [
    ("inpaint", {"mask": (torch.rand(1, 20, 28, generator=torch.Generator().manual_seed(0)) > 0.3)}, 1),
    ("sr", {"scale": 2}, 2),
])
def test_restored_tiles_blend_into_the_output(task, extras, factor):
    """The per-tile observations and inputs are what restore() takes, and its outputs blend to the image."""
    obs = torch.rand(3, 20, 28, generator=torch.Generator().manual_seed(1))
    tiled = tile_request(task, obs, extras, tile_size=16, min_overlap=4)
    outputs = [restore(o, task, **extra, preset="quick", iterations=1, device="cpu", stop="never")
               for o, extra in zip(tiled.observations, tiled.extras)]
    out = blend(outputs, tiled.output_plan)
    assert out.shape == (3, 20 * factor, 28 * factor) and bool(torch.isfinite(out).all())
