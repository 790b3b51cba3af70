"""The sampling plan (resample into the model's period range, or refuse) and the resampling round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stemd.compute import sampling as s
from stemd.compute.metrics import psnr
from stemd.config import SRTIO3_A_M
from stemd.errors import CheckpointError, ConfigError, InputError
from stemd.sim import scenes
from stemd.sim.lattice import simulate_frame

A = SRTIO3_A_M
CONV = (6.0, 20.0)


def px(period: float) -> float:
    """The pixel size that puts SrTiO3's lattice at `period` px."""
    return A / period


def test_period_range_from_metadata():
    assert s.period_range({"sampling": {"period_px": [6, 20]}}) == (6.0, 20.0)
    lo, hi = s.period_range({"lattice": {"period_px": 10.0, "sigma_px": 1.5}})
    assert lo < 10.0 < hi and math.isclose(lo * hi, 100.0) and hi == 10.0 * s.SINGLE_PERIOD_TOLERANCE
    assert s.period_range({"sampling": {"period_px": [8, 9]}, "lattice": {"period_px": 10.0}}) == (8.0, 9.0)
    assert s.period_range({"note": "no record"}) is None


@pytest.mark.parametrize("metadata", [
    {"sampling": {"period_px": 7}}, {"sampling": {"period_px": [20, 6]}}, {"sampling": {}},
    {"sampling": {"period_px": [0, 6]}}, {"sampling": {"period_px": ["a", "b"]}}, {"lattice": {"period_px": None}},
])
def test_period_range_malformed(metadata):
    with pytest.raises(CheckpointError, match="period"):
        s.period_range(metadata)


@pytest.mark.parametrize("period", [6.0, 10.0, 20.0, 12.3])
def test_inside_the_range_runs_as_is(period):
    assert s.plan(px(period), A, CONV, (512, 512)) == 1.0


@pytest.mark.parametrize("pixel, policy, rng", [
    (None, "resample", CONV),  # unknown pixel size
    (px(40.0), "off", CONV),  # policy off ignores it, even far out of range
    (-1.0, "off", CONV),
    (px(40.0), "resample", None),  # a checkpoint that records no range
])
def test_no_information_or_off_runs_as_is(pixel, policy, rng):
    assert s.plan(pixel, A, rng, (512, 512), policy) == 1.0


@pytest.mark.parametrize("period, target", [(30.0, 20.0), (40.0, 20.0), (4.0, 6.0), (5.0, 6.0)])
def test_outside_the_range_resamples_to_the_nearer_end(period, target):
    factor = s.plan(px(period), A, CONV, (512, 512))
    assert math.isclose(period * factor, target, rel_tol=1e-9)


def test_lattice_period_scales_the_implied_period():
    """A lattice of 2 x SrTiO3's a at the 10 px pixel size is 20 px: inside the range; 4 x is 40 px: halved."""
    assert s.plan(px(10.0), 2 * A, CONV, (512, 512)) == 1.0
    assert math.isclose(s.plan(px(10.0), 4 * A, CONV, (512, 512)), 0.5)


def test_refuse_policy_names_pixel_size_period_range_and_override():
    with pytest.raises(s.SamplingError) as err:
        s.plan(1.5e-11, A, CONV, (512, 512), "refuse")
    text = str(err.value)
    assert isinstance(err.value, InputError)
    for fragment in ("pixel size 1.5e-11 m", "26 px", "6-20 px", "model.sampling", "off"):
        assert fragment in text
    assert s.plan(px(12.0), A, CONV, (512, 512), "refuse") == 1.0  # in range: no refusal


@pytest.mark.parametrize("pixel, rng, shape, fragment", [
    (px(1.5), CONV, (512, 512), "not resolved"),  # below Nyquist
    (px(2.2), (10.0, 10.0), (512, 512), "more than 4x"),  # 4.5x upsampling
    (px(40.0), CONV, (40, 400), "below the model's 28 px"),  # 40 x 0.5 = 20 rows
    (px(5.0), CONV, (8000, 8000), "over 67108864 pixels"),  # 1.2x of 8000^2
    (0.0, CONV, (512, 512), "positive number of metres"),
    (float("nan"), CONV, (512, 512), "positive number of metres"),
    (float("inf"), CONV, (512, 512), "positive number of metres"),
    ("1e-11", CONV, (512, 512), "positive number of metres"),
])
def test_resampling_refused_with_a_reason(pixel, rng, shape, fragment):
    with pytest.raises(s.SamplingError, match=fragment):
        s.plan(pixel, A, rng, shape)


def test_bad_policy_and_lattice_period_name_the_key():
    with pytest.raises(ConfigError, match="model.sampling.*allowed: resample, refuse, off"):
        s.plan(px(10.0), A, CONV, (64, 64), "sometimes")
    for bad in (0.0, -A, float("nan"), 3.905, True):
        with pytest.raises(ConfigError, match="model.lattice_period_m"):
            s.plan(px(10.0), bad, CONV, (64, 64))


def _smooth(h: int = 90, w: int = 110) -> torch.Tensor:
    y, x = np.mgrid[:h, :w].astype(np.float64)
    img = np.exp(-((y - 40) ** 2 + (x - 60) ** 2) / (2 * 15.0**2)) + 0.3 * np.sin(x / 9.0) * np.cos(y / 13.0)
    return torch.from_numpy(img.astype(np.float32))[None, None]


@pytest.mark.parametrize("factor", [0.55, 0.8, 1.3, 2.5])
def test_resample_round_trip_keeps_shape_and_values(factor):
    img = _smooth()
    small = s.resample(img, factor)
    assert small.shape[-2:] == (round(90 * factor), round(110 * factor))
    back = s.restore(small, (90, 110))
    assert back.shape == img.shape and back.dtype == img.dtype
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))  # away from the border's padding
    assert float((back - img)[inner].abs().max()) < 0.02
    assert s.resample(img, 1.0) is img and s.restore(img, (90, 110)) is img


def test_shrinking_is_antialiased():
    """A pixel checkerboard (Nyquist) halved averages to grey; without antialiasing it would alias to 0 or 1."""
    board = torch.from_numpy((np.indices((64, 64)).sum(0) % 2).astype(np.float32))[None, None]
    half = s.resample(board, 0.5)
    assert float((half[..., 4:-4, 4:-4] - 0.5).abs().max()) < 0.05


def _dominant_period(img: np.ndarray) -> float:
    """Period (px) of the strongest Fourier peak of the row-averaged profile (lattice aligned with the axes)."""
    profile = img.mean(0) - img.mean()
    n = 8 * len(profile)
    spectrum = np.abs(np.fft.rfft(profile * np.hanning(len(profile)), n))
    k = int(np.argmax(spectrum[4:])) + 4
    return n / k


def test_lattice_at_30_px_is_resampled_into_range_and_back():
    rng = np.random.default_rng(0)
    clean = simulate_frame((300, 330), rng, period_px=30.0, sigma_px=4.5).clean
    factor = s.plan(px(30.0), A, CONV, clean.shape)
    x = torch.from_numpy(clean)[None, None]
    inside = s.resample(x, factor)
    assert inside.shape[-2:] == (200, 220)
    before, after = _dominant_period(clean), _dominant_period(inside[0, 0].numpy())
    assert (
        min(abs(before - 15.0), abs(before - 30.0)) < 0.3
    )  # the row profile's strongest component: the lattice or its half (B sites)
    assert abs(after - before * 20.0 / 30.0) < 0.3
    back = s.restore(inside, clean.shape)[0, 0].numpy()
    assert back.shape == clean.shape and psnr(back, clean, data_range=1.0) > 40.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resample_on_cuda_matches_cpu():
    img = _smooth()
    for factor in (0.6, 1.7):
        cpu = s.restore(s.resample(img, factor), (90, 110))
        gpu = s.restore(s.resample(img.cuda(), factor), (90, 110))
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("structure", "ratio"), sorted(s.SCALE_PER_PERIOD.items()))
def test_measure_scale_finds_each_structure_s_shortest_translation(structure, ratio):
    """The frame tells its own sampling: the shortest lattice translation, SCALE_PER_PERIOD x the period."""
    rng = np.random.default_rng(3)
    for period in (7.0, 16.0):
        scene = scenes.random_scene((192, 192), rng, period_px=period, structures=(structure,), layouts=("perfect",))
        noisy = scenes.apply_instrument(scene.clean, rng, scenes.draw_noise(rng, dose=5.0), dose=5.0)
        (scale,) = s.measure_scale(torch.from_numpy(noisy.astype(np.float32))[None, None])
        assert scale == pytest.approx(ratio * period, rel=0.03)


def test_measure_scale_finds_no_lattice_in_noise_or_amorphous_matter():
    rng = np.random.default_rng(4)
    noise = torch.from_numpy(rng.poisson(3.0, (2, 1, 160, 160)).astype(np.float32))
    amorphous = scenes.build_scene((160, 160), [scenes.Phase("amorphous", 9.0)], [], rng, sigma_px=1.2)
    counts = rng.poisson(20.0 * amorphous.clean + 1.0).astype(np.float32)
    assert s.measure_scale(noise) == [None, None]
    assert s.measure_scale(torch.from_numpy(counts)[None, None]) == [None]


def test_scale_range_is_where_every_trained_structure_was_seen():
    lo, hi = s.scale_range({"sampling": {"period_px": [6.0, 20.0]}})
    assert (lo, hi) == pytest.approx((6.0, 20.0 * math.sqrt(0.5)))
    assert s.scale_range({"lattice": {"period_px": 10.0}}) == pytest.approx(
        (10.0 / s.SINGLE_PERIOD_TOLERANCE * math.sqrt(0.5), 10.0 * s.SINGLE_PERIOD_TOLERANCE * math.sqrt(0.5)))
    assert s.scale_range({}) is None


def test_plan_from_scale_shrinks_coarse_lattices_and_never_upsamples():
    rng = (6.0, 14.0)
    assert s.plan_from_scale(10.0, rng, (512, 512)) == 1.0
    assert s.plan_from_scale(28.0, rng, (512, 512)) == pytest.approx(0.5)
    assert s.plan_from_scale(3.0, rng, (512, 512)) == 1.0  # finer than trained: run as is, not upsampled
    assert s.plan_from_scale(28.0, rng, (512, 512), "off") == 1.0
    with pytest.raises(s.SamplingError, match="measured.*refuse"):
        s.plan_from_scale(28.0, rng, (512, 512), "refuse")
