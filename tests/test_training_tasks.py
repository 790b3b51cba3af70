"""stemd.apps.training.tasks: the registry covers every model the settings allow; each task's data, inputs and
metadata."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch

from stemd.apps.training.scoring import predict
from stemd.apps.training.tasks import EVAL_FRAMES, TASKS, ConvTask, WindowAETask, task_for
from stemd.config import TrainSettings, load_train_settings
from stemd.errors import ConfigError
from stemd.models.conv_unet import MIN_SIZE, ConvDenoiser
from stemd.models.window_ae import WindowAE

CONV = {"model": "conv_unet", "batch_size": 4,
        "conv": {"channels": [4, 8], "patch": 32, "scene_size": 64, "val_scenes": 3, "dose": [5.0, 50.0]}}


def test_registry_names_every_model_the_settings_allow():
    assert set(TASKS) == set(typing.get_args(TrainSettings.model_fields["model"].annotation))
    assert isinstance(task_for(TrainSettings()), WindowAETask)
    assert isinstance(task_for(load_train_settings(None, CONV)), ConvTask)


def test_window_task_builds_streams_and_describes_the_window_model():
    settings = load_train_settings(None, {"hidden": [32, 8], "batch_size": 50, "val_samples": 101,
                                          "noise_mix": [{"kind": "poisson", "dose": 20.0}]})
    task = task_for(settings)
    model = task.build()
    assert isinstance(model, WindowAE) and model.arch()["hidden"] == [32, 8] and task.input_names == ()
    batches = list(task.batches(0, 300))
    assert [len(x) for x, _ in batches] == [50] * 6 and batches[0][0].shape == (50, 28, 28)
    assert not np.array_equal(batches[0][0], batches[1][0])  # the noise models take turns
    np.testing.assert_array_equal(list(task.batches(0, 300))[5][0], batches[5][0])  # seeded
    assert not np.array_equal(next(task.batches(100, 300))[0], batches[2][0])  # each start has its own stream
    val = task.validation()
    assert val.noisy.shape == (101, 784) and [p.stop - p.start for p in val.parts] == [51, 50]
    assert [label["noise"]["kind"] for label in val.labels] == ["uniform", "poisson"]
    meta = task.metadata()
    assert meta["window"] == 28 and meta["hidden"] == [32, 8] and meta["noise_mix"][0]["dose"] == 20.0


def test_conv_task_inputs_follow_the_settings():
    settings = load_train_settings(None, {**CONV, "conv": {**CONV["conv"], "noise_level": True}})
    task = task_for(settings)
    assert task.input_names == ("guide", "level")
    assert task_for(load_train_settings(None, {**CONV, "conv": {**CONV["conv"], "guide": "none"}})).input_names == ()
    model = task.build()
    assert isinstance(model, ConvDenoiser) and model.arch()["noise_level"] is True
    noisy, guide, level, clean = next(task.batches(0, 4))
    assert noisy.shape == guide.shape == clean.shape == (4, 1, 32, 32) and level.shape == (4,)
    meta = task.metadata()
    assert meta["window"] == MIN_SIZE and "hidden" not in meta and meta["conv"]["channels"] == (4, 8)
    assert meta["sampling"] == {"period_px": [6.0, 20.0]}


def test_conv_validation_is_whole_scenes_in_dose_thirds():
    val = task_for(load_train_settings(None, CONV)).validation()
    assert val.noisy.shape == val.clean.shape == (3, 1, 256, 256)
    np.testing.assert_allclose(
        [label["dose"] for label in val.labels], [[5.0, 5.0], [50**0.5 * 5**0.5] * 2, [50.0, 50.0]]
    )
    assert val.batch == EVAL_FRAMES  # whole scenes go through the model a few at a time


def test_conv_validation_feeds_the_model_the_inputs_the_pipeline_computes():
    """Each validation scene carries the guide and noise level that training (and inference) compute, cut whole
    from its prepared recording, and `predict` passes them to the model instead of letting it take a plain Bragg
    guide of its own."""
    task = task_for(load_train_settings(None, {**CONV, "conv": {**CONV["conv"], "noise_level": True}}))
    val = task.validation()
    assert set(val.inputs) == {"guide", "level"}
    assert val.inputs["guide"].shape == val.noisy.shape and val.inputs["level"].shape == (3,)
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, guide=None, level=None):
            seen.append((guide, level))
            return x

    pred = predict(Recorder(), val, torch.device("cpu"))
    torch.testing.assert_close(pred, val.noisy)
    torch.testing.assert_close(torch.cat([g for g, _ in seen]), val.inputs["guide"])
    torch.testing.assert_close(torch.cat([lv for _, lv in seen]), val.inputs["level"])


def test_edge_fraction_is_an_unknown_key():
    with pytest.raises(ConfigError, match=r"edge_fraction: unknown key"):
        load_train_settings(None, {"edge_fraction": 0.4})
