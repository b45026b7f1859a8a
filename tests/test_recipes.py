"""The recipes of CONTRIBUTING.md, done with toy examples: add a task, add a network architecture.

Each test follows its recipe step by step; if a recipe needs another step,
the test fails and CONTRIBUTING.md must say so.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from dip_fast import restore, tasks
from dip_fast.pipeline import request as request_module
from dip_fast.core import memory, networks
from dip_fast.apps.cli import main
from dip_fast.core.networks import Architecture, NetworkSpec
from dip_fast.tasks import registry
from dip_fast.tasks.registry import CliFlag, TaskSpec

pytestmark = [pytest.mark.filterwarnings("ignore:dip_fast. the fast backend falls back"),
              pytest.mark.usefixtures("one_thread")]

TINY_NET = tasks._net(num_channels_down=[8, 8, 8], num_channels_up=[8, 8, 8], num_channels_skip=[4, 4, 4])


def _image(size: int = 20) -> np.ndarray:
    return np.random.default_rng(0).random((size, size + 4, 3), dtype=np.float32)


# ---------------------------------------------------------------- Add a task


class GainTerm(nn.Module):
    """Step 1, the data term: the camera halved the brightness, ``mse(x / 2, x0)``."""

    def __init__(self, observation: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("observation", observation if observation.dim() == 4 else observation[None])

    def degrade(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tasks.mse(self.degrade(x), self.observation)

    def fit_kwargs(self):
        return {"observation": self.observation, "mask": None, "degrade": self.degrade}


@pytest.fixture
def gain_task(monkeypatch):
    # Step 2, the spec, registered (before its presets: a Preset checks that its task exists).
    spec = registry.register_task(TaskSpec(
        name="gain", aliases=("brighten",),
        make_term=lambda ctx: GainTerm(ctx.observation), presets=dict.fromkeys(("paper", "fast", "quick"), "gain_tiny"),
        optional=("sigma",), early_stop=True,
        command="gain", summary="undo a halved brightness", description="Restore an image whose brightness was halved.",
        flags=(CliFlag("sigma", "--sigma", type=float, help="noise level in 0-255 units",
                       batch_help="gain: noise level in 0-255 units"),),
    ))
    # Step 3, presets per level (here one tiny preset for all three).
    preset = tasks.Preset(name="gain_tiny", task="gain", network=TINY_NET, input_depth=4, iterations=3)
    monkeypatch.setitem(tasks.PRESETS, preset.name, preset)
    yield spec
    registry.unregister_task("gain")


def test_recipe_add_a_task_restore(gain_task):
    image = _image() * 0.5
    out, info = restore(image, "brighten", preset="quick", device="cpu", sigma=5, stop="early", return_info=True)
    # stop='early' without iterations: the preset's 3 steps times the early-stopping budget.
    assert info.task == "gain" and info.preset == "gain_tiny" and info.steps == round(3 * request_module.EARLY_STOP_BUDGET)
    assert out.shape == image.shape and info.sigma == 5 and info.stop == "early"
    # The registry's messages cover the new task: it takes no mask.
    with pytest.raises(ValueError, match="mask only applies to task='inpaint', got a mask for task='gain'"):
        restore(image, "gain", mask=np.ones(image.shape[:2], bool), device="cpu")


def test_recipe_add_a_task_command_line(gain_task, tmp_path, capsys):
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray((_image() * 128).astype(np.uint8)).save(src)
    assert main(["gain", str(src), "-o", str(out), "--preset", "quick", "--device", "cpu", "--sigma", "5", "-q"]) == 0
    assert Image.open(out).size == (24, 20)
    folder = tmp_path / "batch_in"
    folder.mkdir()
    Image.fromarray((_image() * 128).astype(np.uint8)).save(folder / "a.png")
    code = main(["batch", str(folder), str(tmp_path / "batch_out"), "--task", "gain", "--preset", "quick",
                 "--device", "cpu", "-q"])
    assert code == 0 and (tmp_path / "batch_out" / "a.png").exists()
    code = main(["batch", str(folder), str(tmp_path / "x"), "--task", "gain", "--scale", "2", "--device", "cpu"])
    assert code == 2 and "--scale only applies to --task sr, not --task gain" in capsys.readouterr().err


# ---------------------------------------------------------------- Add a network architecture


def tiny_cnn(num_input_channels: int, num_output_channels: int, width: int = 8) -> nn.Module:
    """Step 1, the reference builder: two convolutions, any size (multiple 1)."""
    return nn.Sequential(
        nn.Conv2d(num_input_channels, width, 3, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, num_output_channels, 3, padding=1), nn.Sigmoid(),
    )


@pytest.fixture
def tiny_cnn_arch():
    # Step 2, the registry entry.
    arch = networks.register_architecture(Architecture(
        name="tiny_cnn", reference=tiny_cnn, size_multiple=lambda options: 1, min_size=lambda options: 1,
    ))
    yield arch
    networks.unregister_architecture("tiny_cnn")


def test_recipe_add_a_network_architecture(tiny_cnn_arch):
    # Step 3, a preset naming it.
    preset = tasks.get_preset("denoise_quick").with_overrides(
        name="denoise_tiny_cnn", network=NetworkSpec("tiny_cnn", {"width": 6}), input_depth=4, iterations=3)
    image = _image()
    out, info = restore(image, preset=preset, device="cpu", sigma=10, stop="never", return_info=True)
    assert out.shape == image.shape and info.steps == 3
    assert info.padded_size == image.shape[:2]  # multiple 1: no padding
    assert info.backend == "reference"  # backend='auto': it has no fused builder, so only the reference is a candidate
    _, fast_info = restore(image, preset=preset, device="cpu", sigma=10, stop="never", return_info=True,
                           backend="fast")
    assert fast_info.backend == "reference (fast fallback)"  # asked for the fused builder it does not have
    assert info.estimated_memory > 0  # traced on the meta device from the reference builder
    assert memory.estimate_memory(preset, 3, (64, 64)) > memory.estimate_memory(preset, 3, (32, 32))
    net = tasks.build_network(preset, 3)
    assert isinstance(net, nn.Sequential) and net[0].out_channels == 6


def test_unknown_architecture_is_a_clear_error():
    preset = tasks.get_preset("denoise_quick").with_overrides(network=NetworkSpec("no_such_net", {}))
    with pytest.raises(ValueError, match="unknown network architecture 'no_such_net'"):
        restore(_image(), preset=preset, device="cpu")


def test_recipe_every_input_is_wired_everywhere():
    # CONTRIBUTING.md, "Add a task", a new kind of input: the five places it names must agree.
    import inspect

    from dip_fast.pipeline import request as request_module
    from dip_fast.tasks import inputs

    names = set(registry.INPUT_NAMES)
    assert {spec.name for spec in inputs.INPUTS} == names
    assert names <= set(request_module.RESTORE_DEFAULTS)
    assert names <= set(inspect.signature(request_module._validate).parameters)
    restore_parameters = inspect.signature(restore).parameters
    assert names <= set(restore_parameters)
    assert all(f"        {name}:" in restore.__doc__ for name in names)  # documented in restore()'s Args
