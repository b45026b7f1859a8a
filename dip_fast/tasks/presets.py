"""Presets: the settings of the paper's experiments, and the cheaper ones ``restore()`` uses on a CPU.

A :class:`Preset` holds the settings of one experiment of the paper's
notebooks; :data:`PRESETS` is the registry by name.  Which preset a task runs
at each level (``'paper'``, ``'fast'``, ``'quick'``) is part of the task's
spec (:mod:`dip_fast.tasks.registry`); :func:`preset_for` looks it up.

Examples:
    >>> from dip_fast.tasks import get_preset, preset_for
    >>> preset_for("denoise", "quick").name
    'denoise_quick'
    >>> preset_for("sr", "paper", scale=8).name, preset_for("sr", "fast", scale=2).sr_factor
    ('sr_x8', 2)
    >>> get_preset("denoise_f16_sigma25").with_overrides(iterations=10).iterations
    10
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Union

from ..core.networks import NetworkSpec, as_network_spec
from . import registry

__all__ = ["DEFAULT_NETWORK", "PRESETS", "Preset", "get_preset", "preset_for", "restore_presets"]

# The network most notebooks share (models/__init__.py get_net('skip') with
# skip_n33d=128, skip_n33u=128, skip_n11=4, num_scales=5): 2,217,831
# parameters for 32 input and 3 output channels.
DEFAULT_NETWORK: Mapping[str, Any] = {
    "num_channels_down": [128] * 5,
    "num_channels_up": [128] * 5,
    "num_channels_skip": [4] * 5,
    "filter_size_down": 3,
    "filter_size_up": 3,
    "filter_skip_size": 1,
    "upsample_mode": "bilinear",
    "downsample_mode": "stride",
    "pad": "reflection",
    "act_fun": "LeakyReLU",
    "need_sigmoid": True,
    "need_bias": True,
    "need1x1_up": True,
}


@dataclass(frozen=True)
class Preset:
    """Settings of one experiment from the paper's notebooks.

    Attributes:
        name: registry key.
        task: a registered task's name (``'callable'``: a caller's forward operator).
        network: the generator: a :class:`~dip_fast.core.networks.NetworkSpec`, or a
            mapping read as the keyword arguments of ``skip()`` other than the channel
            counts of input and output.
        input_depth: channels of the network input ``z``.
        input_method: ``'noise'`` or ``'meshgrid'`` (see ``get_noise``).
        input_noise_type, input_var: ``get_noise`` noise type and scale.
        iterations, lr, reg_noise_std, exp_weight: optimisation settings.
        backtrack, check_every, check_mode: backtracking (see :mod:`dip_fast.core.fit`).
        sr_factor, sr_kernel: super-resolution scale and downsampling kernel.
        noise_sigma: std of the synthetic Gaussian noise (denoising; 0-255 units).
        mask_keep_fraction: fraction of known pixels of a random mask.
        crop_multiple: the notebook centre-crops the image to multiples of this.
        source: notebook and figure the settings come from.
        notes: remarks on the notebook's settings.
    """

    name: str
    task: str
    network: Union[NetworkSpec, Mapping[str, Any]]
    input_depth: int
    iterations: int
    lr: float = 0.01
    reg_noise_std: float = 0.0
    exp_weight: Optional[float] = None
    backtrack: bool = False
    check_every: int = 100
    check_mode: str = "periodic"
    input_method: str = "noise"
    input_noise_type: str = "u"
    input_var: float = 1.0 / 10
    sr_factor: Optional[int] = None
    sr_kernel: str = "lanczos2"
    noise_sigma: Optional[float] = None
    mask_keep_fraction: Optional[float] = None
    crop_multiple: int = 32
    source: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        # Whether the task exists is the registry's question, asked where a preset is used
        # (registry.check_preset), so that presets and the tasks that name them import one way.
        # Typed from here on, whatever the caller passed.
        object.__setattr__(self, "network", as_network_spec(self.network))

    def fit_kwargs(self) -> Dict[str, Any]:
        """The optimisation settings as keyword arguments of :func:`~dip_fast.core.fit.fit`."""
        return {
            "iterations": self.iterations,
            "lr": self.lr,
            "reg_noise_std": self.reg_noise_std,
            "exp_weight": self.exp_weight,
            "backtrack": self.backtrack,
            "check_every": self.check_every,
            "check_mode": self.check_mode,
        }

    def with_overrides(self, **changes: Any) -> "Preset":
        """A copy with some fields replaced (e.g. fewer iterations for a test)."""
        return replace(self, **changes)


def _net(**changes: Any) -> Dict[str, Any]:
    """The paper's skip options (:data:`DEFAULT_NETWORK`) with some changed."""
    cfg = dict(DEFAULT_NETWORK)
    cfg.update(changes)
    return cfg


_DENOISE_COMMON = dict(
    task="denoise",
    input_depth=32,
    iterations=3000,
    lr=0.01,
    exp_weight=0.99,
    backtrack=True,
    check_every=100,
    # The notebook's `if i % show_every:` (see dip_fast.core.fit).
    check_mode="off_period",
    crop_multiple=32,
)

_PRESET_LIST = [
    # denoising.ipynb, fname = F16_GT.png: get_net(32, 'skip', 'reflection',
    # skip_n33d=128, skip_n33u=128, skip_n11=4, num_scales=5,
    # upsample_mode='bilinear'); reg_noise_std = 1/30 ("set to 1/20 for sigma=50").
    Preset(
        name="denoise_f16_sigma25",
        network=_net(),
        reg_noise_std=1.0 / 30.0,
        noise_sigma=25.0,
        source="denoising.ipynb (F16_GT.png, sigma=25; figure 'Blind image denoising')",
        **_DENOISE_COMMON,
    ),
    Preset(
        name="denoise_f16_sigma50",
        network=_net(),
        reg_noise_std=1.0 / 20.0,
        noise_sigma=50.0,
        source="denoising.ipynb (F16_GT.png with sigma=50, per its reg_noise_std comment)",
        **_DENOISE_COMMON,
    ),
    # denoising.ipynb, fname = snail.jpg (blind JPEG artefact removal): the
    # denoising data term on the compressed image; the fixed step budget is
    # the early stopping that keeps the blocks out.
    Preset(
        name="dejpeg_snail",
        network=_net(
            num_channels_down=[8, 16, 32, 64, 128],
            num_channels_up=[8, 16, 32, 64, 128],
            num_channels_skip=[0, 0, 0, 4, 4],
        ),
        reg_noise_std=1.0 / 30.0,
        source="denoising.ipynb (snail.jpg; figure 'Blind restoration of a JPEG-compressed image')",
        **dict(_DENOISE_COMMON, task="jpeg", input_depth=3, iterations=2400),
    ),
    # super-resolution.ipynb: input_depth 32, LR 0.01, KERNEL_TYPE 'lanczos2',
    # factor 4 -> 2000 iterations, reg_noise_std 0.03; factor 8 -> 4000, 0.05.
    # No averaging, no backtracking.
    Preset(
        name="sr_x4",
        task="super_resolution",
        network=_net(),
        input_depth=32,
        iterations=2000,
        lr=0.01,
        reg_noise_std=0.03,
        sr_factor=4,
        sr_kernel="lanczos2",
        crop_multiple=32,
        source="super-resolution.ipynb (factor = 4; main paper figures 1 and 5)",
    ),
    Preset(
        name="sr_x8",
        task="super_resolution",
        network=_net(),
        input_depth=32,
        iterations=4000,
        lr=0.01,
        reg_noise_std=0.05,
        sr_factor=8,
        sr_kernel="lanczos2",
        crop_multiple=32,
        source="super-resolution.ipynb (factor = 8; supmat figure 9)",
    ),
    # inpainting.ipynb, kate.png (text removal): skip with 128 channels and
    # 128 skip channels at all 5 scales, nearest upsampling; 3,002,627 params.
    Preset(
        name="inpaint_kate",
        task="inpaint",
        network=_net(num_channels_skip=[128] * 5, upsample_mode="nearest"),
        input_depth=32,
        iterations=6001,
        lr=0.01,
        reg_noise_std=0.03,
        crop_multiple=64,
        source="inpainting.ipynb (kate.png; main paper figure 7, top)",
    ),
    # inpainting.ipynb, vase.png: meshgrid input, no skip connections.
    Preset(
        name="inpaint_vase",
        task="inpaint",
        network=_net(num_channels_skip=[0] * 5, upsample_mode="nearest"),
        input_depth=2,
        input_method="meshgrid",
        iterations=5001,
        lr=0.01,
        reg_noise_std=0.03,
        crop_multiple=64,
        source="inpainting.ipynb (vase.png; main paper figure 6)",
    ),
    # inpainting.ipynb, library.png with NET_TYPE = 'skip_depth6'.
    Preset(
        name="inpaint_library",
        task="inpaint",
        network=_net(
            num_channels_down=[16, 32, 64, 128, 128, 128],
            num_channels_up=[16, 32, 64, 128, 128, 128],
            num_channels_skip=[0] * 6,
            filter_size_down=5,
            filter_size_up=3,
            upsample_mode="nearest",
            need1x1_up=False,
        ),
        input_depth=1,
        iterations=3001,
        lr=0.01,
        reg_noise_std=0.0,
        crop_multiple=64,
        source="inpainting.ipynb (library.png, NET_TYPE='skip_depth6'; main paper figure 8)",
        notes=(
            "The notebook sets param_noise=True, but its loop rebinds a local name "
            "(n = n + noise) and never changes the weights, so it has no effect and is omitted."
        ),
    ),
    # restoration.ipynb, barbara.png: 50 % of the pixels kept, grayscale.
    Preset(
        name="restore_barbara",
        task="inpaint",
        network=_net(),
        input_depth=32,
        iterations=11000,
        lr=0.001,
        reg_noise_std=0.03,
        backtrack=True,
        check_every=50,
        check_mode="periodic",
        mask_keep_fraction=0.5,
        crop_multiple=1,
        source="restoration.ipynb (barbara.png; main paper figure 7, bottom)",
        notes=(
            "The notebook reflection-pads barbara by 1 pixel instead of cropping, and "
            "builds the net with n_channels=1 (grayscale); backtracking runs at "
            "i % 50 == 0 against the masked PSNR."
        ),
    ),
    # restoration.ipynb, kate.png: 2 % of the pixels kept (same mask on all channels).
    Preset(
        name="restore_kate",
        task="inpaint",
        network=_net(
            num_channels_down=[16, 32, 64, 128, 128],
            num_channels_up=[16, 32, 64, 128, 128],
            num_channels_skip=[0] * 5,
            downsample_mode="avg",
        ),
        input_depth=32,
        iterations=1000,
        lr=0.01,
        reg_noise_std=0.0,
        backtrack=True,
        check_every=50,
        check_mode="periodic",
        mask_keep_fraction=0.02,
        crop_multiple=1,
        source="restoration.ipynb (kate.png; supmat figure 14)",
    ),
]

#: Registry of the notebooks' experiments, by name.
PRESETS: Dict[str, Preset] = {p.name: p for p in _PRESET_LIST}


def get_preset(name: str) -> Preset:
    """Look up a preset by name (see :data:`PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None


# --------------------------------------------------------------------------
# Cheaper presets for restore() on a CPU, and the lookup restore() uses
# --------------------------------------------------------------------------

# The paper's network spends most of its time in the 128-channel convolutions
# at full resolution.  A channel pyramid (few channels at full resolution,
# 128 only at the coarse scales, as restoration.ipynb's kate network) costs a
# fraction of that; "fast" is the CPU default of restore(preset="auto"),
# "quick" a preview.  Step counts and upsampling modes were chosen from PSNR
# curves on a 128x128 crop of scikit-image's astronaut (docs/guide/presets.md).
_FAST_NETWORK = _net(num_channels_down=[16, 32, 64, 128, 128], num_channels_up=[16, 32, 64, 128, 128])
_QUICK_NETWORK = _net(num_channels_down=[8, 16, 32, 64, 128], num_channels_up=[8, 16, 32, 64, 128])
# Nearest upsampling inpaints text holes better (as inpaint_kate's network).
_FAST_INPAINT_NETWORK = dict(_FAST_NETWORK, upsample_mode="nearest")

_CHEAP_PRESETS = [
    Preset(name="denoise_fast", network=_FAST_NETWORK, reg_noise_std=1.0 / 30.0,
           source="denoise_f16_sigma25 with a channel-pyramid network and fewer steps",
           **dict(_DENOISE_COMMON, iterations=1500)),
    Preset(name="denoise_quick", network=_QUICK_NETWORK, reg_noise_std=1.0 / 30.0,
           source="denoise_f16_sigma25 with a small network and few steps (preview)",
           **dict(_DENOISE_COMMON, iterations=800)),
    Preset(name="inpaint_fast", task="inpaint", network=_FAST_INPAINT_NETWORK, input_depth=32, iterations=2000,
           lr=0.01, reg_noise_std=0.03, source="inpaint_kate's settings with a channel-pyramid network"),
    Preset(name="inpaint_quick", task="inpaint", network=_FAST_INPAINT_NETWORK, input_depth=32, iterations=700,
           lr=0.01, reg_noise_std=0.03, source="inpaint_fast with few steps (preview)"),
    Preset(name="sr_fast", task="super_resolution", network=_FAST_NETWORK, input_depth=32, iterations=2000,
           lr=0.01, reg_noise_std=0.03, sr_factor=4, source="sr_x4 with a channel-pyramid network"),
    Preset(name="sr_quick", task="super_resolution", network=_QUICK_NETWORK, input_depth=32, iterations=600,
           lr=0.01, reg_noise_std=0.03, sr_factor=4, source="sr_x4 with a small network and few steps (preview)"),
]
PRESETS.update({p.name: p for p in _CHEAP_PRESETS})


def _variant(base: str, name: str, source: str, **changes: Any) -> Preset:
    """A copy of preset ``base`` under a new name (usually for another task)."""
    return PRESETS[base].with_overrides(name=name, source=source, notes="", **changes)


# Deblurring and a caller's forward operator: the paper has no notebook for
# them, so they take the denoising settings at every level (averaging,
# input noise 1/30, backtracking on the PSNR of the re-degraded estimate
# against the observation).  JPEG: the snail network is already a channel
# pyramid (8 channels at full resolution), so the cheaper levels only take
# fewer steps (PSNR at each level: docs/guide/presets.md).
_TASK_PRESETS = [
    _variant("denoise_f16_sigma25", "deblur_paper", "denoise_f16_sigma25's network and settings", task="deblur"),
    _variant("denoise_fast", "deblur_fast", "denoise_fast's network and settings", task="deblur"),
    _variant("denoise_quick", "deblur_quick", "denoise_quick's network and settings (preview)", task="deblur"),
    # 2000 steps, chosen on CBSD68 crops at quality 10 (bench/README.md, "Early stopping on photographs"):
    # after 1500 the estimate was still below the JPEG on one crop; 2400 gained no more on average.
    _variant("dejpeg_snail", "jpeg_fast", "dejpeg_snail with fewer steps", iterations=2000),
    _variant("dejpeg_snail", "jpeg_quick", "dejpeg_snail with few steps (preview)", iterations=800),
    _variant("denoise_f16_sigma25", "callable_paper", "denoise_f16_sigma25's network and settings", task="callable"),
    _variant("denoise_fast", "callable_fast", "denoise_fast's network and settings", task="callable"),
    _variant("denoise_quick", "callable_quick", "denoise_quick's network and settings (preview)", task="callable"),
    # A deepinv Physics (dip_fast.tasks.physics): the callable task's settings.
    _variant("denoise_f16_sigma25", "physics_paper", "denoise_f16_sigma25's network and settings", task="physics"),
    _variant("denoise_fast", "physics_fast", "denoise_fast's network and settings", task="physics"),
    _variant("denoise_quick", "physics_quick", "denoise_quick's network and settings (preview)", task="physics"),
]
PRESETS.update({p.name: p for p in _TASK_PRESETS})



def restore_presets() -> Dict[str, Dict[str, str]]:
    """The preset :func:`preset_for` picks, by task and level (read from the task registry)."""
    return {spec.name: dict(spec.presets) for spec in registry.all_tasks()}


def preset_for(task: str, level: str = "paper", scale: Optional[int] = None) -> Preset:
    """The preset ``dip_fast.restore`` runs for ``task`` (a name or alias) at ``level`` (``'paper'``, ``'fast'``, ``'quick'``).

    The task's spec may adapt it to the request: super-resolution sets the
    factor to ``scale``, and at the paper level a factor above 4 takes
    ``sr_x8``'s settings (4000 steps, more input noise).
    """
    spec = registry.find_task(task) if isinstance(task, str) else None
    if spec is None:
        raise ValueError(f"task must be one of {registry.task_names()}, got {task!r}")
    if level not in spec.presets:
        raise ValueError(f"level must be one of {sorted(spec.presets)}, got {level!r}")
    preset = get_preset(spec.presets[level])
    return spec.adapt_preset(preset, level, scale) if spec.adapt_preset is not None else preset
