"""What was built, and what runs: :func:`build_info`."""
from __future__ import annotations

from typing import Any

import torch

from . import _ops
from ._version import __version__


def build_info() -> dict[str, Any]:
    """Describe the compiled extension and the runtime.

    Keys:
      ``version``, ``torch``: package and torch versions;
      ``extension_loaded``: whether ``dip_fast._C`` imported; ``load_error``: why not;
      ``cuda_compiled``: whether CUDA kernels were built in; ``cuda_archs``: for which GPUs;
      ``openmp``: whether the CPU kernels were compiled with OpenMP;
      ``ops``: the ops registered under ``torch.ops.dip_fast``;
      ``cuda_available``: whether torch sees a GPU now;
      ``fast_backend``: what ``backend="fast"`` runs, honestly;
      ``fused_options``: the ``skip()`` options the fast network runs fused (empty when it falls back).

    Examples:
        >>> import dip_fast
        >>> info = dip_fast.build_info()
        >>> info["version"] == dip_fast.__version__, isinstance(info["ops"], list)
        (True, True)
    """
    info: dict[str, Any] = {
        "version": __version__,
        "torch": torch.__version__,
        "extension_loaded": _ops.available(),
        "load_error": _ops.LOAD_ERROR,
        "cuda_compiled": False,
        "cuda_archs": "",
        "openmp": False,
        "ops": [],
        "cuda_available": torch.cuda.is_available(),
    }
    if _ops._C is not None:
        info.update(
            cuda_compiled=bool(_ops._C.cuda_compiled()),
            cuda_archs=str(_ops._C.cuda_archs()),
            openmp=bool(_ops._C.openmp()),
            ops=list(_ops._C.registered_ops()),
            num_threads=torch.get_num_threads(),
        )
    info["fast_backend"] = _fast_backend_status()
    from .core.nets import fused_options  # late: nets imports the op modules

    info["fused_options"] = fused_options() if _ops.has_ops(*_ops.FAST_NETWORK_OPS) else {}
    return info


def _fast_backend_status() -> str:
    """What ``backend="fast"`` builds, by the same test that :func:`dip_fast.core.nets.skip` makes."""
    if not _ops.available():
        return f"falls back to the reference network (extension not loaded: {_ops.LOAD_ERROR})"
    if not _ops.has_ops(*_ops.FAST_NETWORK_OPS):
        return "falls back to the reference network (the extension lacks the fused network's ops; rebuild it)"
    status = (
        "fused network: vendor convolutions with fused BatchNorm + LeakyReLU + reflection pad and fused "
        "upsample + concatenation (dip_fast.core.nets.FastSkipNet; channels_last on the CPU)"
    )
    if _ops.has_ops("downsample", "_downsample_backward"):
        status += "; super-resolution uses the fused Lanczos downsampler (dip_fast.ops.Downsample)"
    return status
