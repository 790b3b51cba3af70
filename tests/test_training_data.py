"""stemd.apps.training.data: scene patches are normalised whole, reproducible and follow the conv settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stemd.apps.training import data
from stemd.apps.training.data import (
    hot_pixels,
    prepare_recording,
    recording_guide,
    reference_levels,
    scene_patches,
    stream_seed,
)
from stemd.compute.fourier import bragg_filter
from stemd.compute.normalize import denormalize
from stemd.config import ConvSettings
from stemd.models.checkpoint import load_checkpoint
from stemd.models.conv_unet import ConvDenoiser
from stemd.pipeline import Denoiser
from stemd.sim import scenes

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


@pytest.mark.parametrize("layout", ["perfect", "amorphous_only"])
def test_recordings_are_prepared_as_the_pipeline_prepares_a_frame(layout):
    rng = np.random.default_rng(21)
    if layout == "perfect":
        scene = scenes.random_scene((192, 192), rng, layouts="perfect", period_px=9.0)
    else:
        scene = scenes.build_scene((192, 192), [scenes.Phase("amorphous", 9.0)], [], rng, sigma_px=1.1)
    noise = scenes.draw_noise(rng, dose=100.0, line_offset=0.06, line_jitter_px=0.4)
    raw = scenes.apply_instrument(scene.clean, rng, noise)
    raw[40, 50] = raw[120, 17] = 8 * raw.max()  # hot pixels
    denoiser = Denoiser(ConvDenoiser((4, 4), guide="bragg"), {"normalization": {"mean": REF[0], "signal_std": REF[1]}},
                        device="cpu", dejitter=2, planar=False, keep_defects=True)
    plan = denoiser.plan(raw.shape, None, raw)
    assert plan.stripes and plan.lattice == (layout == "perfect")
    rec = prepare_recording(raw, REF, 2)
    frame, lo, hi = rec.frame, rec.lo, rec.hi
    assert frame.shape == (1, 1, 192, 192) and (rec.scale_px is None) == (plan.scale_px is None)
    with torch.inference_mode():
        expected = denoiser.prepared(torch.from_numpy(raw)[None], plan)
    got = denormalize(frame[:, 0], torch.tensor([lo], dtype=torch.float64), torch.tensor([hi], dtype=torch.float64))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5 * float(raw.max()))
    with torch.inference_mode():
        guide = denoiser._aux_inputs(frame, 1.0, plan)["guide"]  # what the model gets beside the frame
    torch.testing.assert_close(recording_guide(rec), guide)
    if layout == "perfect":  # the defect-keeping step changed the guide somewhere
        assert float((guide - bragg_filter(frame)).abs().max()) > 0.05
    plain = prepare_recording(raw, REF, 0).frame
    assert (float((plain - frame).abs().max()) > 0.05) == (layout == "perfect")  # de-jittered only with a lattice
    assert float(frame[0, 0, 40, 50]) < 3.0  # the hot pixel was repaired (normalised column peaks are ~1)


def test_hot_pixels_are_rare_bright_and_repaired_before_the_model(monkeypatch):
    monkeypatch.setattr(data, "HOT_CHANCE", 1.0)
    rng = np.random.default_rng(3)
    raw = rng.poisson(20.0, (200, 200)).astype(np.float32)
    hot = hot_pixels(raw, rng)
    changed = hot != raw
    assert 0 < changed.sum() <= data.HOT_FRAC[1] * raw.size and np.all(hot[changed] > np.quantile(raw, 0.999))
    monkeypatch.setattr(data, "HOT_FRAC", (1e-3, 1e-3))
    monkeypatch.setattr(data, "HOT_OVER_TOP", (50.0, 50.0))  # every one far beyond any column: all repaired
    conv = ConvSettings(patch=96, scene_size=96, guide="none")
    noisy, clean = scene_patches(2, np.random.default_rng(1), REF, conv, doses_per_scene=2, per_dose=1)
    assert float(noisy.max()) < 3.0 < 50 * float(clean.max())


def test_reference_levels_stay_those_the_shipped_conv_model_was_trained_at():
    _, metadata = load_checkpoint(Path(__file__).resolve().parents[1] / "stemd" / "models" / "conv.pt")
    ref = metadata["normalization"]
    np.testing.assert_allclose(reference_levels((6.0, 20.0)), (ref["mean"], ref["signal_std"]), rtol=1e-4)
