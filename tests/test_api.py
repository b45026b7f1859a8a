"""Tests of dip_fast.restore(): input kinds, sizes, seeding, stopping, info, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

import dip_fast
from dip_fast import _ops, api, tasks
from dip_fast.pipeline import job
from dip_fast.core import networks
from dip_fast.api import restore

from .conftest import requires_extension

# RuntimeWarning is an error here: no numpy or scikit-image warning may reach a user on valid input.
# The fast backend's fallback warning is expected only where the extension did not load: with it loaded, a
# fallback to the reference (a build lacking the fused ops) is a RuntimeWarning, and so an error here.
_FALLBACK = "ignore:dip_fast. the fast backend falls back"
_FALLBACK_IGNORED = [] if _ops.available() else [pytest.mark.filterwarnings(_FALLBACK)]
pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"), *_FALLBACK_IGNORED,
              pytest.mark.usefixtures("one_thread")]




TINY_NET = tasks._net(num_channels_down=[8, 8, 8], num_channels_up=[8, 8, 8], num_channels_skip=[4, 4, 4])


def tiny(task: str = "denoise", iterations: int = 3, **changes) -> tasks.Preset:
    """A 3-scale, 8-channel preset: milliseconds per step, so every test stays fast."""
    fields = dict(name=f"tiny_{task}", task=task, network=TINY_NET, input_depth=4, iterations=iterations,
                  reg_noise_std=0.03)
    if task == "denoise":
        fields.update(exp_weight=0.99, backtrack=True, check_mode="off_period")
    if task == "super_resolution":
        fields["sr_factor"] = 2
    fields.update(changes)
    return tasks.Preset(**fields)


def rgb8(h: int = 20, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth(h: int = 32, w: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] / np.float32(max(h, w))
    return np.stack([0.5 + 0.3 * np.sin(5 * x), 0.5 + 0.3 * np.cos(4 * y), 0.3 + 0.4 * x * y], -1).astype(np.float32)


# ---------------------------------------------------------------- input kinds


def test_exported():
    assert dip_fast.restore is restore


@pytest.mark.parametrize(
    "image",
    [
        rgb8(),
        rgb8()[:, :, 0],
        rgb8().astype(np.uint16) * 257,
        rgb8().astype(np.float32) / 255,
        (rgb8()[:, :, :1].astype(np.float64) / 255),
    ],
    ids=["uint8-rgb", "uint8-grey", "uint16", "float32", "float64-hw1"],
)
def test_numpy_kinds(image):
    out = restore(image, preset=tiny())
    assert isinstance(out, np.ndarray) and out.dtype == image.dtype and out.shape == image.shape
    if image.dtype.kind == "f":
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_pil_kinds(mode):
    img = Image.fromarray(rgb8()).convert(mode)
    out = restore(img, preset=tiny())
    assert isinstance(out, Image.Image) and out.mode == mode and out.size == img.size


@pytest.mark.parametrize("shape", [(3, 20, 24), (1, 3, 20, 24), (1, 20, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_kinds(shape, dtype):
    t = torch.rand(shape, dtype=dtype)
    out = restore(t, preset=tiny())
    assert isinstance(out, torch.Tensor) and out.shape == t.shape and out.dtype == dtype and out.device == t.device


def test_path_kinds(tmp_path):
    p8 = tmp_path / "a.png"
    Image.fromarray(rgb8()).save(p8)
    out = restore(str(p8), preset=tiny())
    assert isinstance(out, Image.Image) and out.size == (24, 20)
    p16 = tmp_path / "b.png"
    Image.fromarray(rgb8()[:, :, 0].astype(np.uint16) * 257).save(p16)
    out16 = restore(p16, preset=tiny())
    assert isinstance(out16, np.ndarray) and out16.dtype == np.uint16 and out16.shape == (20, 24)


def test_rgba_alpha_passes_through():
    img = np.dstack([rgb8(), np.random.default_rng(1).integers(0, 256, (20, 24), dtype=np.uint8)])
    out = restore(img, preset=tiny())
    assert out.shape == img.shape
    np.testing.assert_array_equal(out[:, :, 3], img[:, :, 3])
    pil = Image.fromarray(img, "RGBA")
    out_pil = restore(pil, preset=tiny())
    assert out_pil.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(out_pil)[:, :, 3], img[:, :, 3])


def test_sixteen_bit_keeps_precision():
    # Values 1 apart in 16 bits are one 8-bit level apart only every 257: a
    # result quantised to 8 bits would have all values multiples of 257.
    img = (np.random.default_rng(2).integers(0, 65536, (20, 24))).astype(np.uint16)
    out = restore(img, preset=tiny())
    assert out.dtype == np.uint16 and np.any(out % 257 != 0)


# ---------------------------------------------------------------- tasks and sizes


@pytest.mark.parametrize("size", [(8, 9), (13, 40), (20, 24)])
@pytest.mark.parametrize("task", ["denoise", "inpaint", "super_resolution"])
def test_tiny_and_odd_sizes(task, size):
    img = np.random.default_rng(3).random(size + (3,)).astype(np.float32)
    kw = {}
    if task == "inpaint":
        kw["mask"] = np.random.default_rng(4).random(size) > 0.3
    if task == "super_resolution":
        kw["scale"] = 2
    out = restore(img, task, preset=tiny(task), **kw)
    factor = kw.get("scale", 1)
    assert out.shape == (size[0] * factor, size[1] * factor, 3)


def test_paper_sized_network_pads_small_images():
    # 5 scales need a multiple of 32 and at least 64 pixels; an 8x9 image still works.
    preset = tasks.PRESETS["denoise_quick"].with_overrides(iterations=1)
    out, info = restore(np.random.default_rng(0).random((8, 9)), preset=preset, return_info=True)
    assert out.shape == (8, 9) and info.padded_size == (64, 64)


def test_super_resolution_size_and_alpha():
    img = np.dstack([rgb8(10, 12), np.full((10, 12), 200, np.uint8)])
    out = restore(img, "super_resolution", scale=4, preset=tiny("super_resolution"))
    assert out.shape == (40, 48, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, 3], 200)
    pil = restore(Image.fromarray(rgb8(10, 12)), "sr", scale=2, preset=tiny("super_resolution"))
    assert pil.size == (24, 20)
    t = restore(torch.rand(3, 10, 12), "super_resolution", scale=2, preset=tiny("super_resolution"))
    assert t.shape == (3, 20, 24)


def test_inpaint_mask_kinds_and_known_pixels_kept_roughly():
    img = rgb8()
    mask = np.ones((20, 24), bool)
    mask[5:10, 5:10] = False
    for m in (mask, mask.astype(np.uint8) * 255, torch.from_numpy(mask), Image.fromarray(mask.astype(np.uint8) * 255)):
        assert restore(img, "inpaint", mask=m, preset=tiny("inpaint")).shape == img.shape


def test_denoising_improves_psnr():
    clean = smooth()
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)
    preset = tasks.Preset(
        name="small_denoise", task="denoise", input_depth=8, iterations=150, exp_weight=0.99,
        network=tasks._net(num_channels_down=[16, 16, 16], num_channels_up=[16, 16, 16], num_channels_skip=[4, 4, 4]),
        reg_noise_std=1 / 30, backtrack=True, check_mode="off_period",
    )
    out, info = restore(noisy, preset=preset, ground_truth=clean, return_info=True)
    before = peak_signal_noise_ratio(clean, noisy, data_range=1)
    after = peak_signal_noise_ratio(clean, out, data_range=1)
    assert after > before + 2.0, (before, after)
    assert info.psnr == pytest.approx(after, abs=0.05)


# ---------------------------------------------------------------- seeding and settings


def test_same_seed_same_result_on_cpu():
    img = rgb8()
    a = restore(img, preset=tiny(iterations=5), seed=7, device="cpu")
    b = restore(img, preset=tiny(iterations=5), seed=7, device="cpu")
    c = restore(img, preset=tiny(iterations=5), seed=8, device="cpu")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_caller_rng_and_threads_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    restore(rgb8(), preset=tiny(iterations=1), num_threads=2)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == 1


def test_seed_none_is_reported():
    _, info = restore(rgb8(), preset=tiny(), seed=None, return_info=True)
    assert isinstance(info.seed, int)


def test_sigma_picks_reg_noise():
    assert job.reg_noise_for_sigma(25) == pytest.approx(1 / 30)
    assert job.reg_noise_for_sigma(50) == pytest.approx(1 / 20)
    assert job.reg_noise_for_sigma(5) == pytest.approx(1 / 30)
    preset = tasks.PRESETS["denoise_quick"].with_overrides(iterations=1)
    _, info = restore(rgb8(), preset="quick", iterations=1, sigma=50, return_info=True)
    assert info.reg_noise_std == pytest.approx(1 / 20) and info.sigma == 50
    # An explicit preset keeps its own setting.
    _, info = restore(rgb8(), preset=preset, sigma=50, return_info=True)
    assert info.reg_noise_std == preset.reg_noise_std


def test_sigma_is_estimated():
    clean = np.full((48, 48), 0.5, np.float32)
    noisy = clean + np.random.default_rng(0).normal(0, 20 / 255, clean.shape).astype(np.float32)
    _, info = restore(np.clip(noisy, 0, 1), preset=tiny(), return_info=True)
    assert info.sigma == pytest.approx(20, rel=0.2)


def test_auto_preset_on_cpu_warns_with_estimate():
    with pytest.warns(UserWarning, match=r"preset='auto' on the CPU.*will take about"):
        _, info = restore(rgb8(16, 16), iterations=3, device="cpu", sigma=25, return_info=True)
    assert info.preset == "denoise_fast"


def test_preset_levels():
    assert tasks.preset_for("denoise", "paper").name == "denoise_f16_sigma25"
    assert tasks.preset_for("super_resolution", "paper", 8).name == "sr_x8"
    assert tasks.preset_for("super_resolution", "fast", 2).sr_factor == 2
    _, info = restore(rgb8(), preset="denoise_f16_sigma50", iterations=1, return_info=True)
    assert info.preset == "denoise_f16_sigma50"


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_backends(backend):
    # The exact name: with the extension loaded, 'fast' runs the fused network and says so.
    expected = {"reference": "reference", "fast": "fast" if _ops.available() else networks.FAST_FALLBACK}[backend]
    _, info = restore(rgb8(), preset=tiny(), backend=backend, return_info=True)
    assert info.backend == expected


def test_fast_backend_without_the_fused_ops_warns_and_says_so(monkeypatch):
    from dip_fast.core import nets

    monkeypatch.setattr(_ops, "has_ops", lambda *names: False)
    monkeypatch.setattr(nets, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="the fast backend falls back to the reference network"):
        _, info = restore(rgb8(), preset=tiny(), backend="fast", return_info=True)
    assert info.backend == networks.FAST_FALLBACK


def test_fast_backend_uses_the_fused_downsampler():
    from dip_fast import _ops
    from dip_fast.reference import Downsampler

    fast = job.sr_downsampler("fast", 3, 4, "lanczos2")
    assert job.sr_downsampler("reference", 3, 4, "lanczos2") is None
    if not _ops.has_ops("downsample", "_downsample_backward"):
        assert fast is None
        pytest.skip("extension lacks the Lanczos downsampling op")
    x = torch.rand(1, 3, 32, 40)
    ref = Downsampler(3, 4, "lanczos2", phase=0.5, preserve_size=True)(x)
    torch.testing.assert_close(fast(x), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- stopping, info, callback


def test_return_info_contents():
    clean = rgb8()
    out, info = restore(clean, preset=tiny(iterations=6), ground_truth=clean, stop="never", return_info=True)
    assert isinstance(info, api.RestoreInfo)
    assert info.steps == info.iterations == 6 and info.stop_reason == "completed" and not info.interrupted
    assert len(info.loss_history) == 6 and len(info.psnr_history) == 6
    assert info.wall_time > 0 and info.task == "denoise" and info.device == "cpu"
    assert info.psnr is not None and info.estimated_memory > 0
    assert info.padded_size == (24, 24)


def test_ground_truth_never_changes_the_result():
    img = rgb8()
    a = restore(img, preset=tiny(iterations=5))
    b = restore(img, preset=tiny(iterations=5), ground_truth=rgb8(seed=9))
    np.testing.assert_array_equal(a, b)


def test_max_time_returns_result_so_far():
    out, info = restore(rgb8(), preset=tiny(iterations=10_000), max_time=0.3, stop="never", return_info=True)
    assert out.shape == (20, 24, 3)
    assert info.stop_reason == "max_time" and info.interrupted and 0 <= info.steps < 10_000


def test_ctrl_c_returns_result_so_far():
    def interrupt(step, info):
        if step == 2:
            raise KeyboardInterrupt

    out, info = restore(rgb8(), preset=tiny(iterations=50), callback=interrupt, stop="never", return_info=True)
    assert out.shape == (20, 24, 3) and info.stop_reason == "keyboard_interrupt" and info.steps == 3


def test_callback_sees_every_step_and_can_stop():
    seen = []

    def cb(step, info):
        seen.append((step, sorted(info)))
        assert info["output"].shape == (1, 3, 20, 24)
        assert isinstance(info["render"](), np.ndarray)
        return step == 3

    _, info = restore(rgb8(), preset=tiny(iterations=20), callback=cb, ground_truth=rgb8(), stop="never",
                      return_info=True)
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    assert seen[0][1] == ["backtracked", "elapsed", "loss", "output", "psnr", "render"]
    assert info.stop_reason == "callback" and info.steps == 4


def test_progress_bar_shows_loss_and_psnr(capsys):
    restore(rgb8(), preset=tiny(iterations=3), progress=True, ground_truth=rgb8())
    err = capsys.readouterr().err
    assert "loss=" in err and "psnr=" in err


# ---------------------------------------------------------------- memory


def test_memory_estimate_scales_with_size():
    p = tasks.PRESETS["denoise_f16_sigma25"]
    # Activations grow with the pixels; weights and Adam's state do not.
    small, large = api.estimate_memory(p, 3, (256, 256)), api.estimate_memory(p, 3, (512, 512))
    assert 3.5 < large / small < 4.0


def test_image_too_large_for_memory():
    # A broadcast view: 60 GB of pixels that take no memory; the check must
    # reject it before converting anything.
    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (150_000, 150_000, 3))
    with pytest.raises(ValueError, match=r"image of 150000x150000 is too large for cpu"):
        restore(huge, device="cpu")


# ---------------------------------------------------------------- bad input

GOOD = rgb8()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(task="deblock"), ValueError, "task must be one of"),
        (dict(task="inpaint"), ValueError, "mask is required"),
        (dict(task="inpaint", mask=np.ones((5, 5), bool)), ValueError, "mask must have the image's size"),
        (dict(task="inpaint", mask=np.full((20, 24), 0.5)), ValueError, "mask must be binary"),
        (dict(task="super_resolution"), ValueError, "scale is required"),
        (dict(task="super_resolution", scale=2.5), TypeError, "scale must be an integer"),
        (dict(task="super_resolution", scale=1), ValueError, "scale must be >= 2"),
        (dict(task="super_resolution", scale=3), ValueError, "scale must be even"),
        (dict(scale=4), ValueError, "scale only applies"),
        (dict(mask=np.ones((20, 24), bool)), ValueError, "mask only applies"),
        (dict(iterations=0), ValueError, "iterations must be >= 1"),
        (dict(iterations=-5), ValueError, "iterations must be >= 1"),
        (dict(iterations=2.5), TypeError, "iterations must be an integer"),
        (dict(max_time=0), ValueError, "max_time must be a positive"),
        (dict(sigma=-1), ValueError, "sigma must be"),
        (dict(backend="turbo"), ValueError, "backend must be"),
        (dict(preset="slow"), ValueError, "preset must be one of"),
        (dict(preset="sr_x4"), ValueError, "is for task 'super_resolution'"),
        (dict(device="tpu"), ValueError, "device must be"),
        (dict(ground_truth=rgb8(10, 10)), ValueError, "ground_truth must be"),
        (dict(callback=3), TypeError, "callback must be callable"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        restore(GOOD, preset=kwargs.pop("preset", "quick"), **kwargs)


@pytest.mark.parametrize(
    "image, exc, match",
    [
        (np.zeros((0, 10, 3), np.uint8), ValueError, "image is empty"),
        (np.zeros((7, 20), np.uint8), ValueError, "image must be at least 8x8"),
        (np.zeros((20, 5, 3), np.uint8), ValueError, "image must be at least 8x8"),
        (np.full((10, 10), np.nan, np.float32), ValueError, "image contains NaN or infinite"),
        (np.full((10, 10), np.inf), ValueError, "image contains NaN or infinite"),
        (np.full((10, 10), 1.5, np.float32), ValueError, r"image values must be in \[0, 1\]"),
        (np.full((10, 10), -0.1), ValueError, r"image values must be in \[0, 1\]"),
        (np.zeros((10, 10), bool), TypeError, "image must be uint8, uint16 or float.*bool"),
        (np.zeros((10, 10), complex), TypeError, "image must be .*complex"),
        (np.zeros((10, 10), object), TypeError, "image must be .*object"),
        (np.zeros((10, 10), np.int32), TypeError, "image must be .*int32"),
        (np.zeros((10, 10, 5), np.uint8), ValueError, "image must have 1 .* channels, got 5"),
        (np.zeros((2, 10, 10, 3), np.uint8), ValueError, "image must be a numpy array of shape HxW"),
        (torch.zeros(6, 10, 10), ValueError, "image must have 1 .* channels, got 6"),
        (torch.zeros(2, 3, 10, 10), ValueError, "batch size 1"),
        (torch.zeros(10, 10), ValueError, "CxHxW or 1xCxHxW"),
        (torch.zeros(3, 10, 10, dtype=torch.uint8), TypeError, "image tensor must be floating point"),
        (torch.full((3, 10, 10), float("nan")), ValueError, "NaN"),
        ([[0.5] * 10] * 10, TypeError, "image must be a path, PIL.Image, numpy array or torch tensor"),
        ("does/not/exist.png", FileNotFoundError, "image: no such file"),
    ],
)
def test_bad_images(image, exc, match):
    with pytest.raises(exc, match=match):
        restore(image, preset="quick")


def test_not_an_image_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image")
    with pytest.raises(ValueError, match="image: .* is not an image file"):
        restore(str(path), preset="quick")
    with pytest.raises(ValueError, match="expected an image file, got a directory"):
        restore(str(tmp_path), preset="quick")


def test_truncated_image_file(tmp_path):
    full = tmp_path / "full.png"
    Image.fromarray(rgb8(64, 64)).save(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="image: cannot decode .* truncated"):
        restore(str(cut), preset="quick")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_requested_without_gpu():
    with pytest.raises(ValueError, match="device='cuda' requested, but torch sees no CUDA GPU"):
        restore(GOOD, device="cuda")


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_tensor_comes_back_on_its_device():
    t = torch.rand(3, 20, 24, device="cuda")
    out = restore(t, preset=tiny())
    assert out.device == t.device and out.shape == t.shape


@pytest.mark.cuda
def test_cuda_deterministic_runs_repeat():
    img = rgb8()
    a = restore(img, preset=tiny(iterations=10, network=dict(TINY_NET, upsample_mode="nearest")),
                device="cuda", deterministic=True)
    b = restore(img, preset=tiny(iterations=10, network=dict(TINY_NET, upsample_mode="nearest")),
                device="cuda", deterministic=True)
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- early stopping, step modes, precision


def _small_denoise_preset(iterations: int) -> tasks.Preset:
    return tasks.Preset(
        name="small_denoise", task="denoise", input_depth=8, iterations=iterations, exp_weight=0.99,
        network=tasks._net(num_channels_down=[16, 16, 16], num_channels_up=[16, 16, 16], num_channels_skip=[4, 4, 4]),
        reg_noise_std=1 / 30, backtrack=False,
    )


def test_stop_early_returns_the_detected_estimate():
    clean = smooth()
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 0.15, clean.shape), 0, 1).astype(np.float32)
    seen = []
    out, info = restore(noisy, preset=_small_denoise_preset(2000), ground_truth=clean, return_info=True,
                        stop="early", sigma=0.15 * 255, callback=lambda step, d: seen.append(d["psnr"]) and None)
    assert info.stop_reason == "early_stop" and not info.interrupted
    # On the CPU the log is read every step, so the run ends at the step the rule chose.
    assert info.stop_step is not None and info.steps == info.stop_step + 1 < 2000
    # The image returned is the average of that step, and it is far better than the noisy input.
    noisy_psnr = -10 * math.log10(float(np.mean((noisy - clean) ** 2)))
    assert info.psnr == pytest.approx(info.psnr_history[-1], abs=0.05) and info.psnr > noisy_psnr + 3
    assert len(info.psnr_history) == info.steps and seen == pytest.approx(info.psnr_history)
    never, ninfo = restore(noisy, preset=_small_denoise_preset(60), stop="never", return_info=True)
    assert ninfo.stop_step is None and ninfo.steps == 60 and ninfo.stop_reason == "completed"


def test_stop_auto_leaves_inpainting_to_its_budget():
    mask = np.ones((32, 32), dtype=bool)
    mask[10:20, 10:20] = False
    _, info = restore(smooth(), task="inpaint", mask=mask, preset="quick", iterations=12, return_info=True)
    assert info.steps == 12 and info.stop_step is None and info.stop == "never"


def test_step_mode_and_precision_on_cpu():
    img = smooth()
    with pytest.warns(RuntimeWarning, match="needs a CUDA device"):
        restore(img, preset=_small_denoise_preset(3), step_mode="graph", sigma=25)
    out, info = restore(img, preset=_small_denoise_preset(20), precision="bf16", sigma=25, return_info=True)
    assert out.shape == img.shape and out.dtype == img.dtype and np.isfinite(out).all()
    assert info.loss_history[-1] < info.loss_history[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(stop="sometimes"), "stop must be one of"),
    (dict(step_mode="fast"), "step_mode must be one of"),
    (dict(precision="fp8"), "precision must be one of"),
    (dict(precision=16), "precision must be one of"),
])
def test_bad_run_modes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        restore(smooth(), **kwargs)


@requires_extension
def test_fast_backend_runs_channels_last_on_the_cpu():
    """The CPU's faster layout (bench/README.md): activations and convolution weights channels_last."""
    from dip_fast.core import nets

    make, name = networks.resolve_backend("fast", torch.device("cpu"))
    net = make(num_input_channels=8, num_output_channels=3, num_channels_down=[8], num_channels_up=[8],
               num_channels_skip=[2])
    assert name == "fast" and isinstance(net, nets.FastSkipNet) and net.channels_last
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in net.parameters() if p.dim() == 4)
    out = net(torch.rand(1, 8, 16, 16))
    assert out.is_contiguous() and out.shape == (1, 3, 16, 16)
