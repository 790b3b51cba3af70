"""stemd.apps.training.data: scene patches are normalised whole, reproducible and follow the conv settings."""

from __future__ import annotations

import numpy as np
import pytest

from stemd.apps.training.data import scene_patches, stream_seed
from stemd.config import ConvSettings

REF = (0.16, 0.16)


def test_scene_patches_are_normalised_whole_and_reproducible():
    conv = ConvSettings(patch=48, scene_size=96)
    noisy, guide, clean = scene_patches(6, np.random.default_rng(3), REF, conv, doses_per_scene=2, per_dose=3)
    again = scene_patches(6, np.random.default_rng(3), REF, conv.model_copy(update={"guide": "none"}),
                          doses_per_scene=2, per_dose=3)
    assert noisy.shape == guide.shape == clean.shape == (6, 1, 48, 48)
    np.testing.assert_array_equal(again[0], noisy)
    np.testing.assert_array_equal(again[1], clean)
    assert abs(float((noisy - clean).mean())) < 0.05  # same lo/hi: the noise is centred on the target
    assert np.mean((guide - clean) ** 2) < np.mean((noisy - clean) ** 2)
    *first, level, clean2 = scene_patches(
        6, np.random.default_rng(3), REF, conv.model_copy(update={"noise_level": True}), doses_per_scene=2, per_dose=3
    )
    np.testing.assert_array_equal(first[0], noisy)
    np.testing.assert_array_equal(clean2, clean)
    assert level.shape == (6,) and level[0] == level[2] != level[3]  # one level per recording (3 patches each)
    assert (level > 0).all()


def test_scene_patches_dejitter_each_recording():
    conv = ConvSettings(patch=48, scene_size=256, dose=(100.0, 100.0))
    kw = {"doses_per_scene": 1, "per_dose": 2}
    plain, _, clean3 = scene_patches(2, np.random.default_rng(5), REF, conv, **kw)  # (seed 4: nothing to undo)
    fixed, _, clean4 = scene_patches(2, np.random.default_rng(5), REF, conv.model_copy(update={"dejitter": 2}), **kw)
    np.testing.assert_array_equal(clean3, clean4)
    assert np.abs(fixed - plain).max() > 0.05  # the recording was de-jittered (rows moved) before the cut


def test_scene_patches_take_sizes_from_the_settings():
    conv = ConvSettings(patch=32, scene_size=64)
    noisy, *_ = scene_patches(3, np.random.default_rng(0), REF, conv)
    assert noisy.shape == (3, 1, 32, 32)
    whole = scene_patches(1, np.random.default_rng(0), REF, conv.model_copy(update={"patch": 64, "guide": "none"}),
                          per_dose=1)
    assert len(whole) == 2 and whole[0].shape == (1, 1, 64, 64)
    with pytest.raises(TypeError):
        scene_patches(3, np.random.default_rng(0), REF, conv, scene_size=128)  # one source of sizes: the settings


def test_stream_seeds_differ_by_every_key():
    seeds = {
        stream_seed(0, 0, 0),
        stream_seed(1, 0, 0),
        stream_seed(0, 1, 0),
        stream_seed(0, 0, 64),
        stream_seed(0, 0, 0, 1),
    }
    assert len(seeds) == 5 and stream_seed(0, 0, 0) == stream_seed(0, 0, 0)
