"""Tests of the reference skip network and of the network inputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dip_fast.reference import SkipConfig, SkipNet, center_crop_cat, get_meshgrid, get_noise, skip
from dip_fast.reference.skip import ACT_FUNS, DOWNSAMPLE_MODES, PADS, UPSAMPLE_MODES

pytestmark = pytest.mark.usefixtures("one_thread")




def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def small(**kw):
    """A 3-scale, 8-channel net (fast on CPU)."""
    args = dict(
        num_input_channels=4,
        num_output_channels=3,
        num_channels_down=[8, 8, 8],
        num_channels_up=[8, 8, 8],
        num_channels_skip=[4, 4, 4],
    )
    args.update(kw)
    return skip(**args)


# ---------------------------------------------------------------- parameter counts


def test_param_count_default_denoising_sr_network():
    # denoising.ipynb / super-resolution.ipynb: get_net(32, 'skip', 'reflection', 128, 128, 4, 5 scales, bilinear)
    net = skip(
        32, 3,
        num_channels_down=[128] * 5, num_channels_up=[128] * 5, num_channels_skip=[4] * 5,
        filter_size_down=3, filter_size_up=3, upsample_mode="bilinear", pad="reflection",
        need_sigmoid=True, need_bias=True, downsample_mode="stride",
    )
    assert n_params(net) == 2_217_831


def test_param_count_kate_inpainting_network():
    net = skip(
        32, 3,
        num_channels_down=[128] * 5, num_channels_up=[128] * 5, num_channels_skip=[128] * 5,
        filter_size_down=3, filter_size_up=3, filter_skip_size=1, upsample_mode="nearest",
        pad="reflection", need_sigmoid=True, need_bias=True,
    )
    assert n_params(net) == 3_002_627


def test_param_count_formula_small():
    # Independent count for a 2-scale net: conv k*k*in*out + bias, BN 2*ch.
    def conv(i, o, k):
        return i * o * k * k + o

    def bn(c):
        return 2 * c

    cin, cout = 5, 2
    d, u, s = [6, 7], [3, 4], [2, 0]
    expected = 0
    # scale 0
    expected += conv(cin, s[0], 1) + bn(s[0])
    expected += conv(cin, d[0], 3) + bn(d[0]) + conv(d[0], d[0], 3) + bn(d[0])
    expected += bn(s[0] + u[1])
    expected += conv(s[0] + u[1], u[0], 3) + bn(u[0]) + conv(u[0], u[0], 1) + bn(u[0])
    # scale 1 (no skip; deeper channels = num_channels_down[1])
    expected += conv(d[0], d[1], 3) + bn(d[1]) + conv(d[1], d[1], 3) + bn(d[1])
    expected += bn(d[1])
    expected += conv(d[1], u[1], 3) + bn(u[1]) + conv(u[1], u[1], 1) + bn(u[1])
    expected += conv(u[0], cout, 1)
    net = skip(cin, cout, num_channels_down=d, num_channels_up=u, num_channels_skip=s)
    assert n_params(net) == expected


# ---------------------------------------------------------------- shapes


def expected_size(size: int, skips, mode: str) -> int:
    """Output size along one axis, from the paper's rules (crop to min at a concat)."""

    def down(s):
        return (s + 1) // 2 if mode == "stride" else s // 2  # 3x3 pad-1 stride 2 vs floor-pooling

    def level(i, s):
        d = down(s)
        if i < len(skips) - 1:
            d = level(i + 1, d)
        d = 2 * d
        return min(s, d) if skips[i] else d

    return level(0, size)


@pytest.mark.parametrize("hw", [(32, 32), (64, 96), (37, 45), (40, 51)])
@pytest.mark.parametrize("skips", [[4] * 4, [0] * 4, [0, 0, 4, 4], [4, 0, 4, 0]])
@pytest.mark.parametrize("mode", ["stride", "avg"])
def test_output_shape_follows_paper_cropping(hw, skips, mode):
    net = skip(
        2, 3, num_channels_down=[8] * 4, num_channels_up=[8] * 4, num_channels_skip=skips,
        downsample_mode=mode, pad="reflection",
    )
    with torch.no_grad():
        y = net(torch.rand(1, 2, *hw))
    assert tuple(y.shape) == (1, 3, expected_size(hw[0], skips, mode), expected_size(hw[1], skips, mode))


def test_output_shape_literal_cases():
    # Hand-computed for 4 scales: skips everywhere keep the size, no skips round up, pooling
    # floors and the crop then shrinks the output.
    x = torch.rand(1, 2, 37, 45)
    kw = dict(num_channels_down=[8] * 4, num_channels_up=[8] * 4)
    with torch.no_grad():
        assert skip(2, 3, num_channels_skip=[4] * 4, **kw)(x).shape[2:] == (37, 45)
        assert skip(2, 3, num_channels_skip=[0] * 4, **kw)(x).shape[2:] == (48, 48)
        assert skip(2, 3, num_channels_skip=[4] * 4, downsample_mode="avg", **kw)(x).shape[2:] == (32, 32)
        assert skip(2, 3, num_channels_skip=[4] * 4, downsample_mode="lanczos2", **kw)(x).shape[2:] == (32, 32)
        assert skip(2, 3, num_channels_skip=[4] * 4, **kw)(torch.rand(1, 2, 64, 96)).shape[2:] == (64, 96)
        # The paper's 5-scale default on 64x96 and 37x45 (5 halvings leave 2x3 and 2x2).
        kw5 = dict(num_channels_down=[8] * 5, num_channels_up=[8] * 5, num_channels_skip=[4] * 5)
        assert skip(2, 3, **kw5)(torch.rand(1, 2, 64, 96)).shape[2:] == (64, 96)
        assert skip(2, 3, **kw5)(x).shape[2:] == (37, 45)
        assert skip(2, 3, num_channels_down=[8] * 5, num_channels_up=[8] * 5,
                    num_channels_skip=[0] * 5)(x).shape[2:] == (64, 64)


def test_five_scales_on_32x32_fails_like_the_paper():
    # 32 / 2^5 = 1: training-mode BatchNorm sees one value per channel and refuses, exactly as
    # the paper's network does; the notebooks never use images that small.
    net = skip(2, 3, num_channels_down=[8] * 5, num_channels_up=[8] * 5, num_channels_skip=[4] * 5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        net(torch.rand(1, 2, 32, 32))


def test_center_crop_cat_offsets():
    a = torch.arange(35.0).reshape(1, 1, 5, 7)
    b = torch.zeros(1, 2, 4, 4)
    y = center_crop_cat([a, b])
    assert y.shape == (1, 3, 4, 4)
    # offsets (5-4)//2 = 0 rows, (7-4)//2 = 1 column
    assert torch.equal(y[0, 0], a[0, 0, 0:4, 1:5])
    # equal sizes: untouched
    c = torch.rand(1, 2, 4, 4)
    assert torch.equal(center_crop_cat([c, b])[:, :2], c)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("upsample_mode", UPSAMPLE_MODES)
@pytest.mark.parametrize("downsample_mode", DOWNSAMPLE_MODES)
@pytest.mark.parametrize("act_fun", list(ACT_FUNS) + [nn.ReLU])
def test_all_options_construct_run_and_backprop(pad, upsample_mode, downsample_mode, act_fun):
    torch.manual_seed(0)
    net = small(pad=pad, upsample_mode=upsample_mode, downsample_mode=downsample_mode, act_fun=act_fun,
                num_channels_skip=[4, 0, 4])
    x = torch.rand(1, 4, 16, 16)
    y = net(x)
    assert y.shape == (1, 3, 16, 16)
    assert torch.isfinite(y).all()
    assert ((y >= 0) & (y <= 1)).all()
    y.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads)
    assert net.down[0].conv.weight.grad.abs().sum() > 0


def test_per_scale_lists_and_no_1x1():
    net = small(
        filter_size_down=[3, 5, 3], filter_size_up=[1, 3, 5], filter_skip_size=[1, 3, 1],
        upsample_mode=["nearest", "bilinear", "nearest"], downsample_mode=["stride", "avg", "max"],
        need1x1_up=False,
    )
    assert net.down[1].conv.kernel_size == (5, 5)
    assert net.up[2].conv.kernel_size == (5, 5)
    assert net.skip["1"].conv.kernel_size == (3, 3)
    assert isinstance(net.down[1].downsample, nn.AvgPool2d)
    assert isinstance(net.down[2].downsample, nn.MaxPool2d)
    assert net.down[0].downsample is None and net.down[0].conv.stride == (2, 2)
    assert net.down[1].conv.stride == (1, 1)
    assert len(net.up1x1) == 0
    assert net(torch.rand(1, 4, 16, 16)).shape == (1, 3, 16, 16)


def test_padding_modes_structure():
    refl = small(pad="reflection", filter_size_down=5)
    assert isinstance(refl.down[0].pad, nn.ReflectionPad2d) and refl.down[0].pad.padding == (2, 2, 2, 2)
    assert refl.down[0].conv.padding == (0, 0)
    zero = small(pad="zero", filter_size_down=5)
    assert zero.down[0].pad is None and zero.down[0].conv.padding == (2, 2)


def test_need_sigmoid_and_bias():
    torch.manual_seed(1)
    with_sig = small()
    without = small(need_sigmoid=False)
    without.load_state_dict(with_sig.state_dict())
    x = torch.rand(1, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(with_sig(x), torch.sigmoid(without(x)))
    nobias = small(need_bias=False)
    assert not any(k.endswith("conv.bias") for k in nobias.state_dict())
    assert "out.bias" not in nobias.state_dict()
    # BatchNorm affine parameters stay.
    assert "down.0.bn.bias" in nobias.state_dict()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="same length"):
        skip(2, 3, num_channels_down=[8, 8], num_channels_up=[8], num_channels_skip=[4, 4])
    with pytest.raises(ValueError, match="pad"):
        small(pad="circular")
    with pytest.raises(ValueError, match="upsample_mode"):
        small(upsample_mode="bicubic")
    with pytest.raises(ValueError, match="downsample_mode"):
        small(downsample_mode="lanczos5")
    with pytest.raises(ValueError, match="act_fun"):
        small(act_fun="GELU")
    with pytest.raises(ValueError, match="filter_size_down"):
        small(filter_size_down=[3, 3])
    with pytest.raises(ValueError, match="num_channels_skip"):
        small(num_channels_skip=[4, -1, 4])
    with pytest.raises(ValueError, match="input"):
        small()(torch.rand(1, 3, 16, 16))


# ---------------------------------------------------------------- state dict layout


def test_state_dict_key_layout():
    net = skip(3, 2, num_channels_down=[8, 8], num_channels_up=[8, 8], num_channels_skip=[4, 0], pad="reflection")
    block = ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
             "bn.num_batches_tracked"]
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expected = set()
    for prefix in ["skip.0", "down.0", "inner.0", "up.0", "up1x1.0", "down.1", "inner.1", "up.1", "up1x1.1"]:
        expected |= {f"{prefix}.{k}" for k in block}
    for i in (0, 1):
        expected |= {f"concat_bn.{i}.{k}" for k in bn}
    expected |= {"out.weight", "out.bias"}
    assert set(net.state_dict()) == expected
    # Shapes that a fused implementation relies on.
    sd = net.state_dict()
    assert sd["skip.0.conv.weight"].shape == (4, 3, 1, 1)
    assert sd["down.0.conv.weight"].shape == (8, 3, 3, 3)
    assert sd["concat_bn.0.weight"].shape == (4 + 8,)
    assert sd["concat_bn.1.weight"].shape == (8,)
    assert sd["up.0.conv.weight"].shape == (8, 12, 3, 3)
    assert sd["out.weight"].shape == (2, 8, 1, 1)
    # Lanczos downsampling adds no state.
    lz = skip(3, 2, num_channels_down=[8, 8], num_channels_up=[8, 8], num_channels_skip=[4, 0],
              downsample_mode="lanczos3")
    assert set(lz.state_dict()) == expected
    assert n_params(lz) == n_params(net)


def test_config_normalised_and_rebuildable():
    net = small(filter_size_down=5, upsample_mode="bilinear", num_channels_skip=[4, 0, 2])
    c = net.config
    assert isinstance(net, SkipNet) and isinstance(c, SkipConfig)
    assert c.n_scales == 3
    assert c.filter_size_down == (5, 5, 5)
    assert c.upsample_mode == ("bilinear",) * 3
    assert c.in_channels(0) == 4 and c.in_channels(2) == 8
    assert c.concat_channels(0) == 4 + 8 and c.concat_channels(1) == 8 and c.concat_channels(2) == 2 + 8
    rebuilt = skip(**c.to_kwargs())
    assert rebuilt.config == c
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


def test_init_follows_paper_construction_order():
    # The paper creates, per scale: skip conv, down conv, inner conv, up conv, 1x1 conv; then the
    # next scale; then the output conv.  Replaying that with plain Conv2d from the same seed must
    # give the same initial weights.
    torch.manual_seed(123)
    net = skip(3, 2, num_channels_down=[6, 7], num_channels_up=[5, 4], num_channels_skip=[2, 3])
    torch.manual_seed(123)
    ref = [
        nn.Conv2d(3, 2, 1), nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3), nn.Conv2d(2 + 4, 5, 3), nn.Conv2d(5, 5, 1),
        nn.Conv2d(6, 3, 1), nn.Conv2d(6, 7, 3), nn.Conv2d(7, 7, 3), nn.Conv2d(3 + 7, 4, 3), nn.Conv2d(4, 4, 1),
        nn.Conv2d(5, 2, 1),
    ]
    mine = [net.skip["0"].conv, net.down[0].conv, net.inner[0].conv, net.up[0].conv, net.up1x1[0].conv,
            net.skip["1"].conv, net.down[1].conv, net.inner[1].conv, net.up[1].conv, net.up1x1[1].conv, net.out]
    for a, b in zip(ref, mine):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


# ---------------------------------------------------------------- independent functional forward


def functional_forward(net: SkipNet, x: torch.Tensor) -> torch.Tensor:
    """Recompute the network from its state dict with torch.nn.functional only."""
    c = net.config
    sd = net.state_dict()

    def block(prefix, x, k, stride=1, downsample=None):
        p = (k - 1) // 2
        if c.pad == "reflection":
            x = F.pad(x, (p, p, p, p), mode="reflect")
            p = 0
        x = F.conv2d(x, sd[f"{prefix}.conv.weight"], sd.get(f"{prefix}.conv.bias"),
                     stride=1 if downsample else stride, padding=p)
        if downsample == "avg":
            x = F.avg_pool2d(x, 2)
        elif downsample == "max":
            x = F.max_pool2d(x, 2)
        x = F.batch_norm(x, None, None, sd[f"{prefix}.bn.weight"], sd[f"{prefix}.bn.bias"], training=True)
        return F.leaky_relu(x, 0.2)

    def level(i, x):
        mode = c.downsample_mode[i]
        d = block(f"down.{i}", x, c.filter_size_down[i], 2, None if mode == "stride" else mode)
        d = block(f"inner.{i}", d, c.filter_size_down[i])
        if i < c.n_scales - 1:
            d = level(i + 1, d)
        if c.upsample_mode[i] == "nearest":
            d = d.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        else:
            d = F.interpolate(d, scale_factor=2, mode="bilinear", align_corners=False)
        if c.num_channels_skip[i]:
            s = block(f"skip.{i}", x, c.filter_skip_size[i])
            h, w = min(s.shape[2], d.shape[2]), min(s.shape[3], d.shape[3])
            s = s[:, :, (s.shape[2] - h) // 2:(s.shape[2] - h) // 2 + h, (s.shape[3] - w) // 2:(s.shape[3] - w) // 2 + w]
            d = d[:, :, (d.shape[2] - h) // 2:(d.shape[2] - h) // 2 + h, (d.shape[3] - w) // 2:(d.shape[3] - w) // 2 + w]
            y = torch.cat([s, d], 1)
        else:
            y = d
        y = F.batch_norm(y, None, None, sd[f"concat_bn.{i}.weight"], sd[f"concat_bn.{i}.bias"], training=True)
        y = block(f"up.{i}", y, c.filter_size_up[i])
        if c.need1x1_up:
            y = block(f"up1x1.{i}", y, 1)
        return y

    y = F.conv2d(level(0, x), sd["out.weight"], sd.get("out.bias"))
    return torch.sigmoid(y) if c.need_sigmoid else y


@pytest.mark.parametrize(
    "kw",
    [
        dict(pad="reflection", upsample_mode="bilinear"),
        dict(pad="zero", upsample_mode="nearest", num_channels_skip=[0, 4, 0], filter_size_up=5),
        dict(pad="reflection", downsample_mode="avg", num_channels_skip=[4, 0, 2], need1x1_up=False),
        dict(pad="zero", downsample_mode="max", filter_size_down=[3, 5, 3], need_bias=False),
    ],
)
@pytest.mark.parametrize("hw", [(16, 16), (19, 26)])
def test_matches_independent_functional_forward(kw, hw):
    torch.manual_seed(0)
    net = small(**kw).double()
    # Non-trivial BatchNorm affine parameters so that their placement matters.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.rand(1, 4, *hw, dtype=torch.float64)
    with torch.no_grad():
        ref = functional_forward(net, x)
        out = net(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- network inputs


def test_get_noise_uniform_and_normal():
    g = torch.Generator().manual_seed(0)
    z = get_noise(32, "noise", (20, 30), noise_type="u", var=0.1, generator=g)
    assert z.shape == (1, 32, 20, 30) and z.dtype == torch.float32
    assert z.min() >= 0 and z.max() < 0.1
    assert abs(z.mean().item() - 0.05) < 0.005
    n = get_noise(8, "noise", 64, noise_type="n", var=2.0, generator=torch.Generator().manual_seed(1))
    assert n.shape == (1, 8, 64, 64)
    assert abs(n.std().item() - 2.0) < 0.1 and n.min() < 0
    # generator makes it reproducible
    a = get_noise(4, "noise", 8, generator=torch.Generator().manual_seed(5))
    b = get_noise(4, "noise", 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_get_noise_meshgrid():
    z = get_noise(2, "meshgrid", (3, 5))
    assert z.shape == (1, 2, 3, 5)
    # channel 0: column coordinate, channel 1: row coordinate, both in [0, 1]
    torch.testing.assert_close(z[0, 0, 1], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(z[0, 1, :, 2], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(get_meshgrid((3, 5)), z[0])


def test_get_noise_bad_arguments():
    with pytest.raises(ValueError, match="input_depth"):
        get_noise(3, "meshgrid", 8)
    with pytest.raises(ValueError, match="method"):
        get_noise(3, "fourier", 8)
    with pytest.raises(ValueError, match="noise_type"):
        get_noise(3, "noise", 8, noise_type="x")
    with pytest.raises(ValueError, match="spatial_size"):
        get_noise(2, "meshgrid", (1, 8))
    assert math.isfinite(get_noise(2, "meshgrid", 2).sum().item())
