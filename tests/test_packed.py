"""Packed networks: K networks in one module and one step equal K separate runs.

The exactness tests run in float64 on the CPU (and on CUDA when there is a
GPU): a packed run of three networks -- different seeds, images and
inpainting masks -- against three separate runs; also with two of them
stopping early, dropped from the step or kept in it frozen.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dip_fast import restore, tasks
from dip_fast.core.fit import fit, fit_packed
from dip_fast.core.nets import skip as fast_skip
from dip_fast.core.packed import pack, pack_state_dicts, unpack
from dip_fast.reference import skip as reference_skip

from .conftest import requires_extension

NET = dict(num_channels_down=[8, 8, 8], num_channels_up=[8, 8, 8], num_channels_skip=[4, 4, 4],
           upsample_mode="bilinear", pad="reflection")
SIZE = 24
K = 3


def _problem(device: str, builder, channels_last: bool = False):
    """Three inpainting runs (seed, image and mask differ), float64: their nets, inputs, terms, generators."""
    runs = []
    for k in range(K):
        torch.manual_seed(100 + k)
        kwargs = {"channels_last": channels_last} if builder is fast_skip else {}
        net = builder(2, 3, **NET, **kwargs).double().to(device)
        g = torch.Generator(device).manual_seed(7 + k)
        z = torch.rand(1, 2, SIZE, SIZE, generator=g, device=device, dtype=torch.float64) * 0.1
        img = torch.rand(1, 3, SIZE, SIZE, generator=g, device=device, dtype=torch.float64)
        mask = (torch.rand(1, 1, SIZE, SIZE, generator=g, device=device) > 0.3 + 0.1 * k).double()
        runs.append((net, z, tasks.InpaintTerm(img, mask), g))
    return runs


# A large learning rate and a zero threshold, so that backtracking fires too.
SETTINGS = dict(iterations=10, lr=0.1, reg_noise_std=0.03, exp_weight=0.99, check_every=2,
                backtrack_threshold_db=0.0)


def _separate(runs, device, stop_bounds=None):
    """The runs one by one; with ``stop_bounds``, each stopped by the discrepancy rule at its bound."""
    results = []
    for k, (net, z, term, _) in enumerate(runs):
        g = torch.Generator(device).manual_seed(1234 + k)
        stop = dict(stop="discrepancy", stop_bound=stop_bounds[k]) if stop_bounds is not None else {}
        results.append(fit(net, z, term, generator=g, **stop, **term.fit_kwargs(), **SETTINGS))
    return results


def _packed(runs, device, net=None, **settings):
    """The runs packed (into ``net`` when given), with the separate runs' generators; ``settings`` add to SETTINGS."""
    net = pack([r[0] for r in runs]) if net is None else net
    term = tasks.PackedTerm([r[2] for r in runs])
    gens = [torch.Generator(device).manual_seed(1234 + k) for k in range(K)]
    z = torch.cat([r[1] for r in runs], dim=1)
    return fit_packed(net, z, term, networks=K, generator=gens, **term.fit_kwargs(), **{**SETTINGS, **settings})


def _check_equal(separate, packed):
    assert len(packed) == K
    for one, many in zip(separate, packed, strict=True):
        assert one.steps == many.steps == 10
        np.testing.assert_allclose(many.loss_history, one.loss_history, rtol=1e-10, atol=0)
        assert many.backtrack_steps == one.backtrack_steps
        torch.testing.assert_close(many.output, one.output, rtol=0, atol=1e-9)
        torch.testing.assert_close(many.output_avg, one.output_avg, rtol=0, atol=1e-9)
    assert any(r.backtrack_steps for r in separate), "the settings should exercise backtracking"


def _exactness(device: str, builder, channels_last: bool = False):
    separate = _separate(_problem(device, builder, channels_last), device)
    packed = _packed(_problem(device, builder, channels_last), device)
    _check_equal(separate, packed)


def _stop_bounds(device, builder, channels_last):
    """Per network, a discrepancy bound that its run alone first meets at a different step (0 never stops)."""
    never = [float("nan")] * K
    alone = [r.residual_history for r in _separate(_problem(device, builder, channels_last), device, never)]
    # The running minimum, so that the first step within the bound is the chosen one (the log holds float32:
    # a hair above it).
    return [float("nan")] + [float(np.minimum.accumulate(alone[k])[t]) * (1 + 1e-6) for k, t in ((1, 2), (2, 6))]


def _repack_exactness(device, builder, channels_last=False):
    """Networks 1 and 2 stop at steps 2 and 6; the step then trains the others only, as their runs alone would."""
    bounds = _stop_bounds(device, builder, channels_last)
    separate = _separate(_problem(device, builder, channels_last), device, bounds)
    assert [r.stop_step for r in separate] == [None, 2, 6]
    trained = []  # the packed module given to each fit: trained in place either way
    for repack in (True, False):
        runs = _problem(device, builder, channels_last)
        sizes = []  # the networks in the step, seen by the callback at each read
        trained.append(pack([r[0] for r in runs]))
        packed = _packed(runs, device, trained[-1], stop="discrepancy", stop_bound=bounds, repack=repack,
                         callback=lambda info: sizes.append(info.net.networks))
        # One call per running network at each read (every step on the CPU); the step is narrowed after the
        # reads that saw networks 1 and 2 stop (steps 2 and 6).
        assert sizes == ([3] * 9 + [2] * 8 + [1] * 3 if repack else [3] * 20)
        for one, many in zip(separate, packed, strict=True):
            assert (many.steps, many.stop_step, many.stop_reason) == (one.steps, one.stop_step, one.stop_reason)
            np.testing.assert_allclose(many.loss_history, one.loss_history, rtol=1e-10, atol=0)
            np.testing.assert_allclose(many.residual_history, one.residual_history, rtol=1e-10, atol=0)
            assert many.backtrack_steps == one.backtrack_steps
            for name in ("output", "output_avg", "stop_output"):
                if getattr(one, name) is None:  # e.g. no stop_output for the network that never stops
                    assert getattr(many, name) is None, f"{name}: the packed run has one, the separate run none"
                else:
                    torch.testing.assert_close(getattr(many, name), getattr(one, name), rtol=0, atol=1e-9)
        assert any(r.backtrack_steps for r in separate), "the settings should exercise backtracking"
    # Weights only: BatchNorm's running statistics (unused in training mode, where DIP runs) of a frozen
    # network kept in the step still move with each forward; a dropped network's do not.
    for (name, a), b in zip(trained[0].named_parameters(), trained[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)


# Every run to the end, and two of three stopping early (dropped from the step, or kept in it frozen).
EXACTNESS = pytest.mark.parametrize("check", [_exactness, _repack_exactness], ids=["all-run", "two-stop"])


@EXACTNESS
def test_packed_reference_run_equals_separate_runs_float64(check):
    check("cpu", reference_skip)


@requires_extension
@EXACTNESS
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_packed_fast_run_equals_separate_runs_float64(check, channels_last):
    check("cpu", fast_skip, channels_last)


@pytest.mark.cuda
@requires_extension
@EXACTNESS
def test_packed_fast_run_equals_separate_runs_float64_cuda(check):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    check("cuda", fast_skip)


def test_pack_round_trip_and_refusals():
    nets = [reference_skip(2, 3, **NET) for _ in range(2)]
    packed = pack(nets)
    for a, b in zip(unpack(packed), nets, strict=True):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb)
    with pytest.raises(ValueError, match="network 1"):
        pack([nets[0], reference_skip(2, 3, num_channels_down=[4], num_channels_up=[4], num_channels_skip=[2])])
    with pytest.raises(ValueError, match="at least one"):
        pack([])
    with pytest.raises(ValueError, match="cannot be packed"):
        pack([packed])
    with pytest.raises(ValueError, match="only equal networks"):
        pack_state_dicts([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])


def test_a_stopped_network_is_frozen_while_the_others_go_on():
    """Network 1's discrepancy bound is reached at once; networks 0 and 2 never stop."""
    runs = _problem("cpu", reference_skip)
    net = pack([r[0] for r in runs])
    term = tasks.PackedTerm([r[2] for r in runs])
    z = torch.cat([r[1] for r in runs], dim=1)
    frozen = {}

    def watch(info):
        if info.network == 0 and info.step in (2, 7):  # network 1 has stopped: no calls for it
            frozen[info.step] = [p.detach()[p.shape[0] // K : 2 * p.shape[0] // K].clone() for p in net.parameters()]

    results = fit_packed(net, z, term, networks=K, iterations=8, stop="discrepancy", repack=False,
                         stop_bound=[float("nan"), 1e9, float("nan")], callback=watch, **term.fit_kwargs())
    assert results[1].stop_reason == "early_stop" and results[1].stop_step == 0
    assert results[1].steps == 1 and len(results[1].loss_history) == 1  # its record ends as a run alone ends
    assert results[0].stop_step is None and results[0].steps == 8 and results[2].steps == 8
    for a, b in zip(frozen[2], frozen[7], strict=True):
        assert torch.equal(a, b)
    # Its average stopped too: what early stopping returned is its average now.
    torch.testing.assert_close(results[1].output_avg, results[1].stop_output)


def test_dropping_networks_stopped_by_es_wmv_changes_no_result():
    """ES-WMV's window of outputs is narrowed too: with and without dropping, every result is the same."""
    results = [_packed(_problem("cpu", reference_skip), "cpu", stop="auto", stop_window=3, stop_patience=2,
                       repack=repack, iterations=30) for repack in (True, False)]
    assert len({r.steps for r in results[0]}) == K, "the networks should stop at different steps"
    for a, b in zip(*results, strict=True):
        assert (a.steps, a.stop_step, a.stop_reason) == (b.steps, b.stop_step, "early_stop")
        np.testing.assert_allclose(a.loss_history, b.loss_history, rtol=1e-10, atol=0)
        np.testing.assert_allclose(a.variance_history, b.variance_history, rtol=1e-6, atol=0)
        for name in ("output", "output_avg", "stop_output"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-9)


@pytest.mark.parametrize("case, narrowed", [
    ("opaque loss", False),  # a data term without select() could mix the networks
    ("shared generator", False),  # the kept networks would draw other perturbations than alone
    ("shared generator, no perturbation", True),
])
def test_a_run_is_narrowed_only_where_that_is_exact(case, narrowed):
    """Where the step cannot be narrowed exactly, the stopped network stays in it, frozen."""
    runs = _problem("cpu", reference_skip)
    term = tasks.PackedTerm([r[2] for r in runs])
    loss = (lambda out: term(out)) if case == "opaque loss" else term
    kwargs = dict(generator=[torch.Generator().manual_seed(k) for k in range(K)], reg_noise_std=0.03)
    if case.startswith("shared generator"):
        kwargs.update(generator=torch.Generator().manual_seed(0), reg_noise_std=0.0 if "no" in case else 0.03)
    sizes = []
    results = fit_packed(pack([r[0] for r in runs]), torch.cat([r[1] for r in runs], dim=1), loss, networks=K,
                         iterations=4, stop="discrepancy", stop_bound=[float("nan"), 1e9, float("nan")],
                         callback=lambda info: sizes.append(info.net.networks), **kwargs, **term.fit_kwargs())
    assert results[1].stop_step == 0 and results[0].steps == 4 and results[1].steps == 1
    assert set(sizes) == ({K, K - 1} if narrowed else {K})
    torch.testing.assert_close(results[1].output_avg, results[1].stop_output)


def test_narrowing_settings():
    from dip_fast.core.step import _CANNOT, _narrow
    rows = torch.arange(6.0).reshape(3, 2)
    assert _narrow(rows, [0, 2], 3).tolist() == [[0.0, 1.0], [4.0, 5.0]]
    assert _narrow(rows[:1], [2], 3) is not None and _narrow(0.5, [1], 3) == 0.5 and _narrow(None, [1], 3) is None
    assert _narrow([1, 2, 3], [1], 3) == [2] and _narrow([1, 2], [1], 3) is _CANNOT
    assert _narrow(lambda x: x, [1], 3) is _CANNOT
    shared = torch.Generator()
    assert _narrow(shared, [1], 3) is shared
    term = tasks.PackedTerm([tasks.DenoiseTerm(torch.full((1, 3, 4, 4), float(v))) for v in range(3)])
    narrowed = _narrow(term.fit_kwargs()["observation"], [2], 3)
    assert narrowed.shape[0] == 1 and float(narrowed.mean()) == 2.0
    assert _narrow(term, [0, 2], 3)(torch.zeros(2, 3, 4, 4)).tolist() == [0.0, 4.0]


def test_packed_loss_must_be_per_network():
    runs = _problem("cpu", reference_skip)
    net = pack([r[0] for r in runs])
    z = torch.cat([r[1] for r in runs], dim=1)
    with pytest.raises(ValueError, match="one data term per network"):
        fit_packed(net, z, lambda out: out.mean(), networks=K, iterations=1, backtrack=False)
    with pytest.raises(ValueError, match="net_input"):
        fit_packed(net, z[:, :5], lambda out: out.mean((1, 2, 3)), networks=K, iterations=1, backtrack=False)


# ----------------------------------------------------------------------------- restore()

QUICK = dict(preset="quick", iterations=6, device="cpu", stop="never", return_info=True)


def _images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((size, size, 3), dtype=np.float32) for _ in range(n)]


def test_restore_of_a_list_equals_restore_of_each_image():
    """pack=1 runs the images one by one: bit for bit each image's own restore().  Packed, the runs agree
    to float32 rounding (grouped against plain convolutions; the float64 tests above show the packed step
    is otherwise exact), which Adam's first, sign-like steps amplify: losses agree loosely, not bitwise."""
    images = _images(2) + [np.random.default_rng(5).random((20, 44, 3), dtype=np.float32)]
    one_by_one = restore(images, "denoise", backend="reference", pack=1, **QUICK)
    together = restore(images, "denoise", backend="reference", **QUICK)
    for image, (out, info), (packed, packed_info) in zip(images, one_by_one, together, strict=True):
        alone, alone_info = restore(image, "denoise", backend="reference", **QUICK)
        assert info.packed == 1 and packed_info.packed == 3  # all three pad to one working size
        assert out.shape == packed.shape == image.shape
        np.testing.assert_array_equal(out, alone)
        assert info.loss_history == alone_info.loss_history
        assert packed_info.loss_history[0] == pytest.approx(alone_info.loss_history[0], rel=1e-6)  # same nets, inputs
        np.testing.assert_allclose(packed_info.loss_history, alone_info.loss_history, rtol=2e-2)


def test_restarts_return_the_mean_with_its_spread():
    image = _images(1)[0]
    truth = np.clip(image + 0.05, 0, 1)
    out, info = restore(image, "denoise", restarts=3, pack=1, ground_truth=truth, backend="reference", **QUICK)
    assert info.restarts == 3 and info.packed == 1 and info.seed == 0
    assert info.uncertainty.shape == image.shape and info.uncertainty.dtype == np.float32
    runs = [restore(image, "denoise", seed=s, backend="reference", **QUICK)[0] for s in range(3)]
    np.testing.assert_allclose(out, np.mean(runs, axis=0), atol=1e-6)
    np.testing.assert_allclose(info.uncertainty, np.std(runs, axis=0), atol=1e-6)
    assert info.uncertainty.max() > 0
    assert info.psnr == pytest.approx(10 * np.log10(1 / np.mean((np.mean(runs, axis=0) - truth) ** 2)), abs=1e-3)
    # Packed: the same three runs in one step (to float32 rounding, see above).
    packed, packed_info = restore(image, "denoise", restarts=3, backend="reference", **QUICK)
    assert packed_info.packed == 3 and packed_info.restarts == 3
    assert np.abs(packed - out).mean() < 0.01


@pytest.mark.parametrize("kwargs, kind, match", [
    (dict(restarts=0), ValueError, "restarts must be >= 1"),
    (dict(restarts=1.5), TypeError, "restarts must be an integer"),
    (dict(pack=0), ValueError, "pack must be >= 1"),
    (dict(pack="most"), ValueError, "pack must be 'auto' or an integer"),
    (dict(pack=2, restarts=2, num_threads=1, max_time=1e-9), None, None),
])
def test_restore_many_bad_arguments(kwargs, kind, match):
    image = _images(1)[0]
    if kind is None:  # a valid call, for contrast
        restore(image, "denoise", backend="reference", **{**QUICK, **kwargs})
        return
    with pytest.raises(kind, match=match):
        restore(image, "denoise", **{**QUICK, **kwargs})


def test_a_bad_image_in_a_list_is_named_by_its_index():
    images = _images(2)
    with pytest.raises(ValueError, match="image 1"):
        restore([images[0], np.zeros((3, 3, 3), np.float32)], "denoise", **QUICK)
    with pytest.raises(ValueError, match="empty list"):
        restore([], "denoise", **QUICK)
    with pytest.raises(ValueError, match="mask must be a list of 2"):
        restore(images, "inpaint", mask=np.ones((32, 32), bool), **QUICK)


def test_a_pack_that_does_not_fit_is_refused(monkeypatch):
    from dip_fast.pipeline import many

    monkeypatch.setattr(many, "device_memory", lambda device: 1)
    with pytest.raises(ValueError, match="pack=2: 2 networks need about"):
        restore(_images(1)[0], "denoise", restarts=2, pack=2, **QUICK)


def test_callback_is_refused_where_it_could_follow_only_one_of_several_runs(monkeypatch):
    """restarts, a list of images and tiles run several networks; a callback would see one of them only."""
    watch = lambda step, info: None  # noqa: E731
    with pytest.raises(ValueError, match="callback applies to a single run; restarts > 1"):
        restore(_images(1)[0], "denoise", restarts=2, callback=watch, **QUICK)
    with pytest.raises(ValueError, match="callback applies to a single run; a list of 2 images"):
        restore(_images(2), "denoise", callback=watch, **QUICK)
    with pytest.raises(ValueError, match="callback applies to a single run; tile="):
        restore(_images(1, size=64)[0], "denoise", tile=32, callback=watch, **QUICK)
    calls = []  # a list of one image is one run: its callback is kept
    restore(_images(1), "denoise", callback=lambda step, info: calls.append(step), **QUICK)
    assert calls == list(range(QUICK["iterations"]))
    from dip_fast.pipeline import many

    monkeypatch.setattr(many, "auto_tile", lambda request, image: 32)  # as for an image too large to fit whole
    with pytest.raises(ValueError, match=r"restored in tiles \(the whole image would not fit"):
        restore(_images(1, size=64)[0], "denoise", callback=watch, **QUICK)


def test_max_time_bounds_the_whole_call(monkeypatch):
    """Runs that go one after another (packs, or the jobs of a pack that does not pack) share max_time."""
    from dip_fast.pipeline import many
    from dip_fast.pipeline.request import validate_request

    request = validate_request("denoise", max_time=9.0)
    now = [0.0]
    monkeypatch.setattr(many.time, "perf_counter", lambda: now[0])
    shares = []
    for share, item in many._time_shares(request, ["a", "b", "c"]):
        shares.append(share.max_time)
        now[0] += {"a": 1.0, "b": 6.0, "c": 0.0}[item]  # a stops early, b runs over its share
    # a: 9 s left for 3; b: 8 s left for 2; c: 2 s left, but never less than an equal share of the whole.
    assert shares == [3.0, 4.0, 3.0]


def test_ctrl_c_ends_the_pack_running_and_starts_no_other(monkeypatch):
    """Ctrl-C in the first of several packs: the restarts that ran make the result; a list with an image not
    started raises KeyboardInterrupt (there is no result so far for it) instead of running the other packs."""
    from dip_fast.core import step as step_module

    calls = {"steps": 0, "runners": 0}
    real_step, real_init = step_module.StepRunner.step, step_module.StepRunner.__init__

    def init(self, *args, **kwargs):
        calls["runners"] += 1
        real_init(self, *args, **kwargs)

    def step(self, check=False):
        calls["steps"] += 1
        if calls["steps"] == 3:
            raise KeyboardInterrupt
        real_step(self, check)

    monkeypatch.setattr(step_module.StepRunner, "__init__", init)
    monkeypatch.setattr(step_module.StepRunner, "step", step)
    out, info = restore(_images(1)[0], "denoise", restarts=3, pack=2, backend="reference", **QUICK)
    assert calls["runners"] == 1 and info.restarts == 2 and info.stop_reason == "keyboard_interrupt"
    assert out.shape == (32, 32, 3) and np.isfinite(out).all()
    calls.update(steps=0, runners=0)
    with pytest.raises(KeyboardInterrupt):
        restore(_images(2), "denoise", pack=1, backend="reference", **QUICK)
    assert calls["runners"] == 1


def test_a_packs_progress_follows_the_networks_still_running():
    """The bar of a pack whose first network stops early goes on with the others to the last step."""
    from dip_fast.pipeline import many

    torch.manual_seed(0)
    nets = [reference_skip(2, 3, [4, 4], [4, 4], [2, 2]) for _ in range(2)]
    z = torch.rand(1, 4, 16, 16)
    obs = torch.rand(2, 3, 16, 16)
    seen = []
    # Network 0's bound accepts its first estimate; network 1's (NaN) none, so it runs all 12 steps.
    fit_packed(pack(nets), z, lambda out: (out - obs).square().flatten(1).mean(1), networks=2, iterations=12,
               observation=obs, stop="discrepancy", stop_bound=[1e9, float("nan")],
               callback=many.follow_pack(lambda s: seen.append((s.step, s.network))))
    assert [step for step, _ in seen] == list(range(12))
    assert seen[0] == (0, 0) and seen[-1] == (11, 1)


# ----------------------------------------------------------------------------- tiles


def test_a_run_over_an_imposed_memory_cap_completes_in_tiles(monkeypatch):
    from dip_fast.core import memory
    from dip_fast.pipeline import many
    from dip_fast.pipeline.observation import Padding
    from dip_fast.pipeline.request import validate_request

    image = np.random.default_rng(1).random((128, 96, 3), dtype=np.float32)
    request = validate_request("denoise", **{k: v for k, v in QUICK.items() if k != "return_info"})
    padding = Padding.for_request(request)
    whole = memory.estimate_memory(request.preset, 3, padding.working_size(128, 96))
    half = memory.estimate_memory(request.preset, 3, padding.working_size(64, 64))
    assert half < whole
    cap = int((whole + half / 0.8) / 2)  # the whole run does not fit, a 64-pixel tile does
    for module in (memory, many):
        monkeypatch.setattr(module, "device_memory", lambda device: cap)
    with pytest.warns(RuntimeWarning, match=r"in \d+ overlapping tiles of 64x64 \(the whole image would not fit"):
        out, info = restore(image, "denoise", backend="reference", **QUICK)
    assert out.shape == image.shape and info.tiles > 1 and info.tile_size == (64, 64)
    assert np.isfinite(out).all()


def test_tiles_blend_what_each_tile_restores():
    """The tiled result is the windowed blend of the tiles' own restorations, for every task rule kind."""
    from dip_fast.pipeline import tiles

    rng = np.random.default_rng(2)
    image = rng.random((3, 56, 40), dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="tile was given"):
        out, info = restore(torch.from_numpy(image), "denoise", tile=32, sigma=20, backend="reference", **QUICK)
    tiled = tiles.tile_request("denoise", torch.from_numpy(image), {"sigma": 20}, 32, 16)
    assert info.tiles == len(tiled.observations) and out.shape == (3, 56, 40)
    alone = [restore(t.clone(), "denoise", sigma=20, backend="reference", pack=1, **QUICK)[0] for t in
             tiled.observations]
    # Packed tiles against tiles restored one by one: float32 rounding of the grouped convolutions only.
    assert (out - tiles.blend(alone, tiled.output_plan)).abs().mean() < 0.01


@pytest.mark.parametrize("task, kwargs", [("sr", dict(scale=2)), ("inpaint", "mask")])
def test_tiles_for_super_resolution_and_inpainting(task, kwargs):
    rng = np.random.default_rng(3)
    image = rng.random((40, 48, 3), dtype=np.float32)
    if kwargs == "mask":
        kwargs = dict(mask=rng.random((40, 48)) > 0.4)
    with pytest.warns(RuntimeWarning, match="overlapping tiles"):
        out, info = restore(image, task, tile=24, restarts=2, backend="reference", **{**QUICK, **kwargs})
    factor = kwargs.get("scale", 1)
    assert out.shape == (40 * factor, 48 * factor, 3) and info.tiles > 1
    assert info.uncertainty.shape == out.shape and (info.uncertainty >= 0).all()


def test_tile_refusals():
    image = np.random.default_rng(4).random((40, 48, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="tile must be >= 16"):
        restore(image, "denoise", tile=8, **QUICK)
    with pytest.raises(ValueError, match="cannot be restored in tiles"):
        restore(image, lambda x: x, output_shape=(3, 40, 48), tile=24, **QUICK)
    with pytest.raises(ValueError, match="tile applies to one image"):
        restore([image, image], "denoise", tile=24, **QUICK)


# ----------------------------------------------------------------------------- command line


def _write_images(folder, n, size=32):
    from PIL import Image

    folder.mkdir()
    for i, pixels in enumerate(_images(n, size)):
        Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"im{i}.png")


def test_batch_pack_restores_every_file_and_a_bad_file_fails_only_its_row(tmp_path, capsys):
    from dip_fast.apps.cli import main

    _write_images(tmp_path / "in", 3)
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    args = ["batch", str(tmp_path / "in"), str(tmp_path / "out"), "--task", "denoise", "--preset", "quick",
            "--iterations", "2", "--device", "cpu", "--pack", "2", "-q"]
    assert main(args) == 1  # the broken file failed
    done = sorted(p.name for p in (tmp_path / "out").glob("im*.png"))
    assert done == ["im0.png", "im1.png", "im2.png"]
    summary = (tmp_path / "out" / "summary.csv").read_text()
    assert summary.count(",done,") == 3 and summary.count(",failed,") == 1
    assert main(args[:-3] + ["--pack", "some", "-q"]) == 2
    assert "--pack must be an integer" in capsys.readouterr().err


def test_batch_max_time_is_per_image_in_packs_too(tmp_path, monkeypatch):
    """restore() bounds a whole list by max_time; the batch's --max-time is per image, so a pack gets K times it."""
    from dip_fast.apps import batch
    from dip_fast.apps.cli import main

    seen = []
    real = batch.restore

    def watch(image, *args, **kwargs):
        seen.append((len(image) if isinstance(image, list) else 1, kwargs.get("max_time")))
        return real(image, *args, **kwargs)

    monkeypatch.setattr(batch, "restore", watch)
    _write_images(tmp_path / "in", 3)
    assert main(["batch", str(tmp_path / "in"), str(tmp_path / "out"), "--task", "denoise", "--preset", "quick",
                 "--iterations", "2", "--device", "cpu", "--pack", "2", "--max-time", "50", "-q"]) == 0
    assert seen == [(2, 100.0), (1, 50.0)]


def test_cli_restarts_write_the_uncertainty(tmp_path, capsys):
    from PIL import Image

    from dip_fast.apps.cli import main

    _write_images(tmp_path / "in", 1)
    src = str(tmp_path / "in" / "im0.png")
    base = ["denoise", src, "-o", str(tmp_path / "out.png"), "--preset", "quick", "--iterations", "2",
            "--device", "cpu", "-q"]
    assert main(base + ["--uncertainty", str(tmp_path / "std.png")]) == 2
    assert "--uncertainty needs --restarts" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()
    assert main(base + ["--restarts", "2", "--uncertainty", str(tmp_path / "std.png")]) == 0
    std = np.asarray(Image.open(tmp_path / "std.png"))
    assert std.shape == (32, 32) and std.max() == 255
    assert main(base + ["--restarts", "0", "--force"]) == 2
    assert "restarts must be >= 1" in capsys.readouterr().err


def test_warnings_point_at_the_callers_line_whatever_the_path():
    """Run-time and tiling notices name the caller's file, for single, packed and tiled runs alike."""
    image = _images(1, size=64)[0]
    calls = [dict(), dict(restarts=2), dict(tile=32, preset="quick")]
    for extra in calls:
        with pytest.warns(Warning) as record:
            restore(image, "denoise", iterations=2, device="cpu", stop="never", **extra)
        assert record and all(w.filename == __file__ for w in record), [(w.filename, str(w.message)) for w in record]
