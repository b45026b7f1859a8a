"""From a user's request to a restored image, one stage a module.

:mod:`~dip_fast.pipeline.request` checks the arguments,
:mod:`~dip_fast.pipeline.observation` reads the images once,
:mod:`~dip_fast.pipeline.noise_level` estimates the noise,
:mod:`~dip_fast.pipeline.many` groups several runs into packs and
:mod:`~dip_fast.pipeline.tiles` cuts a large image into tiles; the fit itself
is :mod:`dip_fast.core`.
"""
