"""The training engine: networks, the fused step, the fit loop and its stopping rules.

Nothing here reads a file or knows a task by name. :mod:`dip_fast.core.networks`
builds a network (:mod:`dip_fast.core.nets` is the fused twin of the paper's,
:mod:`dip_fast.core.packed` packs several into one), :mod:`dip_fast.core.step`
runs one training step, :mod:`dip_fast.core.fit` loops over steps with the
stopping rules of :mod:`dip_fast.core.early_stop`, and
:mod:`dip_fast.core.auto_step` chooses how a step runs on this device.
"""
