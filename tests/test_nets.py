"""The fast skip network against the reference, from identical weights.

Training is chaotic, so these tests compare what is deterministic: one
forward and backward from the same weights and input, and the first few
optimisation steps in float64.
"""
from __future__ import annotations

import pytest
import torch

from dip_fast.core import nets
from dip_fast.reference import skip as reference_skip

from .conftest import requires_extension

pytestmark = [requires_extension, pytest.mark.usefixtures("one_thread")]

PAPER_DENOISE = dict(
    num_input_channels=32, num_output_channels=3, num_channels_down=[128] * 5, num_channels_up=[128] * 5,
    num_channels_skip=[4] * 5, upsample_mode="bilinear", need_sigmoid=True, need_bias=True, pad="reflection",
    act_fun="LeakyReLU",
)
PAPER_KATE = dict(PAPER_DENOISE, num_channels_skip=[128] * 5, upsample_mode="nearest")
SMALL = dict(num_input_channels=8, num_channels_down=[16, 16, 16], num_channels_up=[16, 16, 16],
             num_channels_skip=[4, 4, 4], upsample_mode="bilinear", pad="reflection")




def pair(kwargs, dtype=torch.float64, channels_last=False, seed=0):
    torch.manual_seed(seed)
    ref = reference_skip(**kwargs).to(dtype)
    fast = nets.skip(**kwargs, channels_last=channels_last).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def forward_backward(net, z):
    net.zero_grad(set_to_none=True)
    out = net(z)
    (out.square().mean() + out.mean()).backward()
    # Copies, not the .grad tensors themselves: module.cuda() / .to() move a parameter's .grad in place,
    # so a list of the originals taken before the move would silently hold device tensors afterwards.
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]
    return out.detach(), grads


def assert_grads_close(ref_grads, fast_grads, rel):
    """Each gradient error <= rel * max(own norm, 1e-6 * global norm).

    Conv biases that feed straight into training-mode BatchNorm have a true
    gradient of zero, so their computed values are pure rounding: the global
    floor keeps the comparison meaningful for them.
    """
    global_norm = torch.sqrt(sum(g.double().square().sum() for g in ref_grads))
    for i, (a, b) in enumerate(zip(ref_grads, fast_grads)):
        scale = max(a.double().norm(), 1e-6 * global_norm)
        err = (a.double() - b.double()).norm()
        assert err <= rel * scale, f"parameter {i}: error {err:.3e} vs scale {scale:.3e}"


def test_same_state_dict_keys_and_shapes():
    ref, fast = pair(PAPER_DENOISE, torch.float32)
    assert isinstance(fast, nets.FastSkipNet)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in fast.state_dict().items()}
    assert sum(p.numel() for p in fast.parameters()) == 2_217_831


@pytest.mark.parametrize(
    "kwargs",
    [
        SMALL,
        dict(SMALL, pad="zero", upsample_mode="nearest"),
        dict(SMALL, num_channels_skip=[4, 0, 4]),
        dict(SMALL, need1x1_up=False, filter_size_down=5, filter_skip_size=3),
        dict(SMALL, act_fun="Swish"),  # an unfused activation: PyTorch modules inside the fast net
        dict(SMALL, downsample_mode="avg"),
    ],
    ids=["reflect-bilinear", "zero-nearest", "missing-skip", "no1x1-k5-skip3", "swish", "avg-down"],
)
@pytest.mark.parametrize("size", [(32, 32), (37, 45), (24, 40)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_float64_matches_reference(kwargs, size, channels_last):
    ref, fast = pair(kwargs, channels_last=channels_last)
    z = torch.rand(1, kwargs["num_input_channels"], *size, dtype=torch.float64)
    out_r, grads_r = forward_backward(ref, z)
    out_f, grads_f = forward_backward(fast, z)
    assert out_f.shape == out_r.shape
    assert ((out_f - out_r).norm() / out_r.norm()) <= 1e-10
    assert_grads_close(grads_r, grads_f, 1e-7)
    for (name, a), b in zip(ref.named_buffers(), fast.buffers()):
        torch.testing.assert_close(a, b, msg=name)  # running statistics follow the reference


@pytest.mark.parametrize("kwargs,size", [(PAPER_DENOISE, (64, 64)), (PAPER_KATE, (64, 64)), (PAPER_DENOISE, (67, 75))],
                         ids=["denoise-64", "kate-64", "denoise-odd"])
def test_paper_networks_float64(kwargs, size):
    ref, fast = pair(kwargs)
    z = torch.rand(1, 32, *size, dtype=torch.float64)
    out_r, grads_r = forward_backward(ref, z)
    out_f, grads_f = forward_backward(fast, z)
    assert ((out_f - out_r).norm() / out_r.norm()) <= 1e-10
    assert_grads_close(grads_r, grads_f, 1e-7)


def kink_margin(net: torch.nn.Module, z: torch.Tensor) -> float:
    """Smallest |input| of any LeakyReLU in the network for input z.

    A pre-activation within float32 rounding of the kink can take either side
    in either implementation, which switches its derivative between 1 and the
    slope: a legitimate rounding-level divergence that says nothing about
    accuracy, yet moves the gradients by ~1e-3. Inputs used for the float32
    comparison keep every pre-activation clear of it.
    """
    margins = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: margins.append(inp[0].abs().min().item()))
             for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)]
    with torch.no_grad():
        net(z)
    for h in hooks:
        h.remove()
    return min(margins)


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_error_within_twice_the_references_own(channels_last):
    """fp32 fast vs float64 truth is at most 2x the reference's own fp32 error."""
    kwargs = dict(SMALL, num_channels_down=[32] * 4, num_channels_up=[32] * 4, num_channels_skip=[4] * 4)
    ref64, _ = pair(kwargs, torch.float64)
    ref32, fast32 = pair(kwargs, torch.float32, channels_last=channels_last)
    ref32.load_state_dict(ref64.state_dict())
    fast32.load_state_dict(ref64.state_dict())
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):  # the first input whose pre-activations all clear the kink by 1e-5
        z = torch.rand(1, 8, 64, 64, dtype=torch.float64, generator=gen)
        if kink_margin(ref64, z) > 1e-5:
            break
    else:
        pytest.fail("no input clear of the LeakyReLU kink")
    ref64.load_state_dict(ref32.state_dict())  # undo the running-statistics updates of the search
    out64, g64 = forward_backward(ref64, z)
    out_r, g_r = forward_backward(ref32, z.float())
    out_f, g_f = forward_backward(fast32, z.float())
    assert ((out_f.double() - out_r.double()).norm() / out_r.double().norm()) <= 1e-5
    flat = lambda gs: torch.cat([g.double().flatten() for g in gs])  # noqa: E731
    ref_err = (flat(g_r) - flat(g64)).norm()
    fast_err = (flat(g_f) - flat(g64)).norm()
    assert fast_err <= 2 * ref_err, f"fast fp32 gradient error {fast_err:.3e} vs reference's {ref_err:.3e}"


def test_first_ten_training_steps_match():
    """Same seed, same noise: the first 10 losses agree to 1e-8 in float64."""
    losses = {}
    for name in ("reference", "fast"):
        ref, fast = pair(SMALL)
        net = ref if name == "reference" else fast
        gen = torch.Generator().manual_seed(5)
        z = torch.rand(1, 8, 32, 32, dtype=torch.float64, generator=gen) * 0.1
        target = torch.rand(1, 3, 32, 32, dtype=torch.float64, generator=gen)
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
        run = []
        for _ in range(10):
            opt.zero_grad()
            noisy = z + torch.randn(z.shape, dtype=z.dtype, generator=gen) / 30
            loss = torch.nn.functional.mse_loss(net(noisy), target)
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses[name] = torch.tensor(run, dtype=torch.float64)
    rel = ((losses["fast"] - losses["reference"]).abs() / losses["reference"].abs()).max()
    assert rel <= 1e-8, rel
    assert losses["fast"][-1] < losses["fast"][0]


def test_fused_options_reported():
    opts = nets.fused_options()
    assert "LeakyReLU" in opts["act_fun"] and "reflection" in opts["pad"]


def test_eval_mode_uses_running_statistics_like_the_reference():
    ref, fast = pair(SMALL)
    z = torch.rand(1, 8, 32, 32, dtype=torch.float64)
    ref(z), fast(z)  # one training pass updates the running statistics
    ref.eval(), fast.eval()
    torch.testing.assert_close(fast(z), ref(z))


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_matches_cpu(channels_last):
    kwargs = dict(PAPER_DENOISE)
    ref, fast = pair(kwargs, torch.float64, channels_last=channels_last)
    z = torch.rand(1, 32, 64, 96, dtype=torch.float64)
    out_c, grads_c = forward_backward(fast, z)
    fast_cuda = fast.cuda()
    out_g, grads_g = forward_backward(fast_cuda, z.cuda())
    assert all(g.device.type == "cpu" for g in grads_c) and all(g.is_cuda for g in grads_g)
    assert ((out_g.cpu() - out_c).norm() / out_c.norm()) <= 1e-10
    assert_grads_close(grads_c, [g.cpu() for g in grads_g], 1e-7)
