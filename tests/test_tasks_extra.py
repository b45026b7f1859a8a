"""Tests of the deblurring, JPEG and callable-operator tasks of dip_fast.restore()."""
from __future__ import annotations

import io as pyio

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from dip_fast import tasks
from dip_fast.api import restore

pytestmark = [pytest.mark.filterwarnings("ignore:dip_fast. the fast backend falls back"), pytest.mark.usefixtures("one_thread")]

# The quick presets' 5-scale network pads a 32x32 image to 64x64; a 3-scale
# network of 16 channels works at 32x32 and fits a few times faster, so the
# quality tests take the quick presets' settings with this network.
SMALL_NET = tasks._net(num_channels_down=[16, 16, 16], num_channels_up=[16, 16, 16], num_channels_skip=[4, 4, 4])


def small(name: str, iterations: int) -> tasks.Preset:
    return tasks.PRESETS[name].with_overrides(network=SMALL_NET, input_depth=8, iterations=iterations)


def shapes(n: int = 32) -> np.ndarray:
    """A gradient with a rectangle and a disc: edges for a blur to destroy, smooth areas for the prior."""
    y, x = np.mgrid[0:n, 0:n] / n
    img = np.stack([0.2 + 0.5 * x, 0.3 + 0.4 * y, 0.5 - 0.3 * x * y], -1)
    img[6:18, 5:15] = [0.9, 0.2, 0.1]
    img[((y - 0.65) ** 2 + (x - 0.65) ** 2) < 0.04] = [0.1, 0.8, 0.3]
    return img.astype(np.float32)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t[0].permute(1, 2, 0).numpy()


# ---------------------------------------------------------------- kernels and blur


def test_gaussian_kernel():
    k = tasks.make_blur_kernel("gaussian:1.5")
    assert k.shape == (11, 11) and k.dtype == torch.float32  # 2 * ceil(4.5) + 1
    assert k.sum().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(k, k.T)
    torch.testing.assert_close(k, k.flip(0))
    assert k[5, 5] == k.max()
    assert tasks.make_blur_kernel("gaussian:1").shape == (7, 7)


def test_box_and_array_kernels():
    torch.testing.assert_close(tasks.make_blur_kernel("box:3"), torch.full((3, 3), 1 / 9))
    assert tasks.make_blur_kernel("box:1").tolist() == [[1.0]]
    k = tasks.make_blur_kernel(np.array([[0, 2, 0], [0, 2, 0], [0, 0, 0]]))
    assert k.tolist() == [[0, 0.5, 0], [0, 0.5, 0], [0, 0, 0]]
    torch.testing.assert_close(tasks.make_blur_kernel(torch.ones(1, 3, dtype=torch.float64)), torch.full((1, 3), 1 / 3))


def test_blur_keeps_constants_up_to_the_border():
    flat = torch.full((1, 3, 9, 12), 0.3)
    for spec in ("gaussian:1.5", "box:5", "gaussian:4"):  # gaussian:4 is 25 wide: replicate padding
        torch.testing.assert_close(tasks.blur(flat, tasks.make_blur_kernel(spec)), flat)


def test_blur_is_a_reflect_padded_convolution():
    x = torch.rand(1, 2, 8, 10)
    k = tasks.make_blur_kernel(torch.rand(3, 5))
    padded = F.pad(x, (2, 2, 1, 1), mode="reflect")
    # A true convolution: the correlation with the flipped kernel, channel by channel.
    want = torch.stack([F.conv2d(padded[:, i : i + 1], k.flip(0, 1)[None, None])[:, 0] for i in range(2)], 1)
    torch.testing.assert_close(tasks.blur(x, k), want)
    # An impulse spreads into the (unflipped) kernel.
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[..., 4, 4] = 1
    torch.testing.assert_close(tasks.blur(impulse, k)[0, 0, 3:6, 2:7], k)


def test_deblur_term_crops_before_blurring():
    obs = torch.rand(1, 3, 10, 12)
    term = tasks.DeblurTerm(obs, "box:3", box=(2, 3, 10, 12))
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(term.degrade(x), tasks.blur(x[..., 2:12, 3:15], term.kernel))
    assert term.fit_kwargs()["degrade"] == term.degrade


# ---------------------------------------------------------------- restoration


def test_deblur_improves_psnr():
    clean = shapes()
    blurred = to_numpy(tasks.blur(to_tensor(clean), tasks.make_blur_kernel("gaussian:1.5")))
    out, info = restore(blurred, "deblur", blur_kernel="gaussian:1.5", preset=small("deblur_quick", 300),
                        device="cpu", ground_truth=clean, return_info=True)
    before = peak_signal_noise_ratio(clean, blurred, data_range=1)
    after = peak_signal_noise_ratio(clean, out, data_range=1)
    assert out.shape == clean.shape and info.task == "deblur"
    assert after > before + 1.0, (before, after)
    assert info.psnr == pytest.approx(after, abs=0.05)


def test_callable_operator_improves_on_nearest_upsampling():
    clean = shapes()

    def halve(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2)

    y = halve(to_tensor(clean))[0]  # a CxHxW tensor: the result is one too
    out, info = restore(y, halve, output_shape=(3, 32, 32), preset=small("callable_quick", 300), device="cpu",
                        ground_truth=clean, return_info=True)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 32, 32)
    assert info.task == "callable" and info.preset == "callable_quick" and info.padded_size == (32, 32)
    nearest = F.interpolate(y[None], scale_factor=2, mode="nearest")[0]
    before = peak_signal_noise_ratio(clean, nearest.permute(1, 2, 0).numpy(), data_range=1)
    assert info.psnr > before + 1.0, (before, info.psnr)


def test_callable_pads_and_crops_around_the_operator():
    seen = []

    def grey_mean(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return x.mean(1, keepdim=True)[..., ::2, ::2]

    y = np.full((10, 11), 128, np.uint8)  # grey uint8 HxW observation of an RGB 20x21 image
    out, info = restore(y, grey_mean, output_shape=(3, 20, 21), preset="quick", iterations=2, return_info=True)
    assert out.dtype == np.uint8 and out.shape == (20, 21, 3)
    assert set(seen) == {(1, 3, 20, 21)} and info.padded_size == (64, 64)
    pil = restore(Image.fromarray(np.dstack([y, y]), "LA"), grey_mean, output_shape=(1, 20, 21),
                  preset="quick", iterations=1)
    assert isinstance(pil, Image.Image) and pil.mode == "L" and pil.size == (21, 20)  # alpha dropped


def test_jpeg_keeps_kind_and_fits():
    buf = pyio.BytesIO()
    Image.fromarray((shapes() * 255).astype(np.uint8)).save(buf, "JPEG", quality=10)
    jpeg = Image.open(buf)
    out, info = restore(jpeg, "jpeg", preset="quick", iterations=120, device="cpu", return_info=True)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == jpeg.size
    assert info.task == "jpeg" and info.preset == "jpeg_quick" and info.sigma is None
    assert info.reg_noise_std == pytest.approx(1 / 30)
    assert np.mean(info.loss_history[-10:]) < 0.5 * np.mean(info.loss_history[:10])


def test_new_presets():
    assert tasks.preset_for("jpeg", "paper").name == "dejpeg_snail"
    for task in ("deblur", "jpeg", "callable"):
        for level in ("paper", "fast", "quick"):
            p = tasks.preset_for(task, level)
            assert p.task == task and p.reg_noise_std == pytest.approx(1 / 30) and p.exp_weight == 0.99 and p.backtrack
    assert tasks.PRESETS["deblur_paper"].network == tasks.PRESETS["denoise_f16_sigma25"].network


def test_solve_runs_the_new_tasks():
    g = torch.Generator().manual_seed(0)
    clean = to_tensor(shapes(16))
    res, _ = tasks.solve(small("deblur_quick", 3), clean, blur_kernel="box:3", generator=g)
    assert res.output.shape == (1, 3, 16, 16) and len(res.psnr_history) == 3
    res, _ = tasks.solve(small("callable_quick", 3), clean[:, :1, ::2, ::2], operator=lambda x: x[:, :1, ::2, ::2],
                         image_shape=(3, 16, 16), generator=g)
    assert res.output.shape == (1, 3, 16, 16)
    res, _ = tasks.solve(small("jpeg_quick", 3), clean, generator=g)
    assert res.output.shape == (1, 3, 16, 16)


# ---------------------------------------------------------------- bad arguments

GOOD = (shapes(24) * 255).astype(np.uint8)


def halve(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(task="deblur"), ValueError, "blur_kernel is required"),
        (dict(task="deblur", blur_kernel="gaussian:-1"), ValueError, "blur_kernel: 'gaussian:SIGMA' needs a positive"),
        (dict(task="deblur", blur_kernel="gaussian:0"), ValueError, "blur_kernel: 'gaussian:SIGMA'"),
        (dict(task="deblur", blur_kernel="box:2"), ValueError, "blur_kernel: 'box:N' needs an odd integer"),
        (dict(task="deblur", blur_kernel="box:257"), ValueError, "blur_kernel: 'box:N' needs an odd integer"),
        (dict(task="deblur", blur_kernel="gaussian:10000"), ValueError, "must have SIGMA <= 42"),
        (dict(task="deblur", blur_kernel=np.ones((257, 1))), ValueError, "at most 255 wide"),
        (dict(task="deblur", blur_kernel="foo:3"), ValueError, "blur_kernel must be 'gaussian:SIGMA'"),
        (dict(task="deblur", blur_kernel=np.array([[0.5, -0.1, 0.5]])), ValueError, "blur_kernel must be non-negative"),
        (dict(task="deblur", blur_kernel=np.zeros((3, 3))), ValueError, "blur_kernel sums to 0"),
        (dict(task="deblur", blur_kernel=np.full((3, 3), np.nan)), ValueError, "blur_kernel contains NaN"),
        (dict(task="deblur", blur_kernel=np.ones((2, 3))), ValueError, "blur_kernel must be a 2-D kernel with odd sides"),
        (dict(task="deblur", blur_kernel=np.ones(3)), ValueError, "blur_kernel must be a 2-D kernel"),
        (dict(task="deblur", blur_kernel=3), ValueError, "blur_kernel must be a 2-D kernel"),
        (dict(task="deblur", blur_kernel=object()), TypeError, "blur_kernel must be"),
        (dict(blur_kernel="box:3"), ValueError, "blur_kernel only applies to task='deblur'"),
        (dict(task="jpeg", blur_kernel="box:3"), ValueError, "blur_kernel only applies"),
        (dict(task="jpeg", sigma=25), ValueError, "sigma only applies"),
        (dict(task="deblock"), ValueError, "task must be one of .*'deblur', 'jpeg'"),
        (dict(task=halve), ValueError, "output_shape=.* is required for a callable task"),
        (dict(task=halve, output_shape=(3, 48)), TypeError, "output_shape must be a tuple of three integers"),
        (dict(task=halve, output_shape=(3, 48.0, 48)), TypeError, "output_shape must be a tuple of three integers"),
        (dict(task=halve, output_shape=(0, 48, 48)), ValueError, "output_shape: C must be at least 1"),
        (dict(task=halve, output_shape=(3, 4, 48)), ValueError, "output_shape: H and W must be at least 8"),
        (dict(output_shape=(3, 48, 48)), ValueError, "output_shape only applies to a callable task"),
        (dict(task="deblur", blur_kernel="box:3", output_shape=(3, 24, 24)), ValueError, "output_shape only applies"),
        (dict(task=halve, output_shape=(3, 24, 24)), ValueError, r"task maps .* to \(1, 3, 12, 12\), .*observation has shape \(1, 3, 24, 24\)"),
        (dict(task=lambda x: x.detach().numpy(), output_shape=(3, 24, 24)), TypeError, "task must return a torch.Tensor, got ndarray"),
        (dict(task=lambda x: x.detach(), output_shape=(3, 24, 24)), ValueError, "task must be differentiable"),
        (dict(task=halve, output_shape=(3, 48, 48), ground_truth=GOOD), ValueError, "ground_truth must be .* 48x48"),
        (dict(task="deblur", blur_kernel="box:3", mask=np.ones((24, 24), bool)), ValueError, "mask only applies"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        restore(GOOD, preset="quick", iterations=1, device="cpu", **kwargs)


def test_preset_for_another_task_is_refused():
    with pytest.raises(ValueError, match="is for task 'denoise', not 'jpeg'"):
        restore(GOOD, "jpeg", preset="denoise_quick")
    with pytest.raises(ValueError, match="is for task 'denoise', not 'callable'"):
        restore(GOOD, halve, output_shape=(3, 48, 48), preset="denoise_quick")


def test_exif_rotated_file_pads_the_rotated_size(tmp_path):
    # The working size must follow the size after the EXIF rotation, not the stored one.
    img = Image.fromarray(np.tile(GOOD, (1, 3, 1))[:20])  # 20x72 stored, 72x20 shown
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    out, info = restore(str(path), "jpeg", preset="quick", iterations=1, return_info=True)
    assert out.size == (20, 72) and info.padded_size == (96, 64)
