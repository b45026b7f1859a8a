"""The first stage of restore(): validate_request checks and resolves arguments without running anything."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from dip_fast import _ops, api
from dip_fast.pipeline import job
from dip_fast.apps import batch
from dip_fast.pipeline.request import PER_FILE, RESTORE_DEFAULTS, validate_request


def test_resolves_task_preset_device_and_stop():
    request = validate_request("sr", scale=8, preset="paper", device="cpu", iterations=5)
    assert request.task.name == "super_resolution" and request.factor == 8
    assert request.preset.name == "sr_x8" and request.preset.iterations == 5 and request.level == "paper"
    assert request.device == torch.device("cpu") and request.stop == "never" and request.seed == 0


def test_defaults_are_restores():
    request = validate_request(device="cpu")
    assert request.task.name == "denoise" and request.auto_preset and request.preset.name == "denoise_fast"
    # backend='auto': the run's execution is chosen (timed or fixed) once its pixels are known.
    assert request.backend == "auto" and request.fast_available == _ops.available() and not request.return_info


def test_images_are_only_checked_for_presence():
    request = validate_request("inpaint", mask=PER_FILE, device="cpu")
    assert request.task.name == "inpaint"
    with pytest.raises(ValueError, match="mask is required for task='inpaint'"):
        validate_request("inpaint", device="cpu")


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument.*scal"):
        validate_request("sr", scal=2)


def test_batch_checks_arguments_without_fitting(tmp_path, monkeypatch):
    def no_fit(*args, **kwargs):
        raise AssertionError("the argument check ran an optimisation")

    monkeypatch.setattr(job, "fit", no_fit)
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8) + 7).save(tmp_path / "in" / "a.png")
    with pytest.raises(ValueError, match="scale must be even"):
        batch.run_batch(tmp_path / "in", tmp_path / "out", task="sr", scale=3, device="cpu")
    with pytest.raises(ValueError, match="preset must be one of"):
        batch.run_batch(tmp_path / "in", tmp_path / "out", task="denoise", preset="huge", device="cpu")
    assert not (tmp_path / "out").exists()  # nothing written before the arguments passed


def test_request_owns_restore_defaults():
    # The request stage keeps restore()'s defaults; the signature a user reads must say the same.
    signature = inspect.signature(api.restore).parameters
    from_signature = {name: p.default for name, p in signature.items() if name not in ("image", "ground_truth")}
    assert from_signature == RESTORE_DEFAULTS
