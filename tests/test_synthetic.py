"""Tests for stemd.sim.lattice: lattice geometry, noise models and their definitions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from stemd.config import NoiseSettings
from stemd.sim.lattice import (
    PAPER_INTENSITIES,
    PAPER_PERIOD_PX,
    PAPER_SIGMA_PX,
    PAPER_WINDOW,
    NoiseSpec,
    clean_windows,
    corrupt,
    lattice_std,
    simulate_frame,
    training_batches,
)

A = PAPER_PERIOD_PX
S = PAPER_SIGMA_PX


def _refine(img: np.ndarray, r: int, c: int) -> tuple[float, float]:
    """Sub-pixel maximum of a (possibly sheared) Gaussian: 2D quadratic fit of log on 3x3."""
    dr, dc = np.meshgrid([-1, 0, 1], [-1, 0, 1], indexing="ij")
    dr, dc = dr.ravel(), dc.ravel()
    z = np.log(np.clip(img[r - 1 : r + 2, c - 1 : c + 2].ravel(), 1e-12, None))
    m = np.stack([np.ones(9), dr, dc, dr * dr, dc * dc, dr * dc], axis=1)
    _, br, bc, arr, acc, arc = np.linalg.lstsq(m, z, rcond=None)[0]
    hess = np.array([[2 * arr, arc], [arc, 2 * acc]])
    off = np.linalg.solve(hess, [-br, -bc])
    return r + off[0], c + off[1]


def _sr_peaks(img: np.ndarray) -> np.ndarray:
    peaks = (img == ndimage.maximum_filter(img, size=5)) & (img > 0.85)
    peaks[:1] = peaks[-1:] = peaks[:, :1] = peaks[:, -1:] = False
    return np.array([_refine(img, r, c) for r, c in zip(*np.nonzero(peaks))]).reshape(-1, 2)


def _angle_deg(img: np.ndarray) -> float:
    """Lattice rotation from Sr-Sr bonds, modulo 90, mapped into [-22.5, 67.5)."""
    p = _sr_peaks(img)
    d = p[None] - p[:, None]
    dist = np.hypot(d[..., 0], d[..., 1])
    bonds = d[(dist > 0.8 * A) & (dist < 1.2 * A)]
    phase = np.angle(np.exp(4j * np.arctan2(bonds[:, 0], bonds[:, 1])).mean()) / 4
    deg = np.degrees(phase) % 90
    return deg - 90 if deg >= 67.5 else deg


# ---------------------------------------------------------------- clean windows


def test_clean_windows_shape_dtype_and_peak():
    w = clean_windows(500, np.random.default_rng(0))
    assert w.shape == (500, PAPER_WINDOW, PAPER_WINDOW)
    assert w.dtype == np.float32
    assert w.min() >= 0
    assert w.max() <= 1.0 + 1e-4
    assert w.max() > 0.99  # some window holds an Sr column close to a pixel centre
    assert clean_windows(3, np.random.default_rng(0), size=17).shape == (3, 17, 17)


def test_zero_rotation_windows_are_axis_aligned():
    # an axis-aligned lattice of separable Gaussians is a sum of two outer products: rank 2
    flat = clean_windows(50, np.random.default_rng(1), max_rotation_deg=0.0)
    s = np.linalg.svd(flat.astype(np.float64), compute_uv=False)
    assert np.all(s[:, 2] / s[:, 0] < 1e-4)
    turned = clean_windows(50, np.random.default_rng(1), max_rotation_deg=45.0)
    s = np.linalg.svd(turned.astype(np.float64), compute_uv=False)
    assert np.mean(s[:, 2] / s[:, 0] > 1e-2) > 0.8


def test_rotation_is_uniform_in_range():
    rng = np.random.default_rng(2)
    angles = np.array([_angle_deg(w) for w in clean_windows(120, rng, size=64)])
    assert angles.min() > -2 and angles.max() < 47
    assert abs(angles.mean() - 22.5) < 3.5  # uniform on [0, 45]: mean 22.5, std 13
    assert abs(angles.std() - 45 / np.sqrt(12)) < 2.5
    small = np.array([_angle_deg(w) for w in clean_windows(40, rng, size=64, max_rotation_deg=10)])
    assert small.min() > -2 and small.max() < 12


def test_windows_are_crops_of_the_frame_lattice():
    # locate each window's lattice from its Sr peaks, render that lattice as a frame: same image
    for w in clean_windows(6, np.random.default_rng(9), max_rotation_deg=40.0):
        peaks = _sr_peaks(w)
        assert len(peaks) >= 3
        theta = _angle_deg(w)
        origin = peaks[np.argmin(np.hypot(*(peaks - 13.5).T))]
        frame = simulate_frame(w.shape, np.random.default_rng(0), rotation_deg=theta, offset_px=tuple(origin))
        np.testing.assert_allclose(w, frame.clean, atol=1e-3)


def test_windows_reproducible_by_seed():
    a = clean_windows(20, np.random.default_rng(5))
    b = clean_windows(20, np.random.default_rng(5))
    c = clean_windows(20, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.1


def test_lattice_std_is_the_std_of_windows_and_frames():
    windows = clean_windows(4000, np.random.default_rng(3))
    assert windows.std() == pytest.approx(lattice_std(), rel=0.02)
    frame = simulate_frame((512, 512), np.random.default_rng(0), rotation_deg=13.0, offset_px=(0.3, 0.6))
    assert frame.clean.std() == pytest.approx(lattice_std(), rel=0.01)
    # sparse lattice: isolated Gaussians, mean and mean square per cell in closed form
    a, s = 40.0, 1.5
    mean = (1.0 + 0.7) * 2 * np.pi * s**2 / a**2
    mean_sq = (1.0 + 0.49) * np.pi * s**2 / a**2
    assert lattice_std(a, s) == pytest.approx(np.sqrt(mean_sq - mean**2), rel=1e-6)


# ---------------------------------------------------------------- noise


@pytest.mark.parametrize("kind, kurtosis", [("uniform", 1.8), ("gaussian", 3.0)])
def test_additive_noise_has_the_defined_snr(kind, kurtosis):
    clean = clean_windows(3000, np.random.default_rng(4))
    noisy = corrupt(clean, NoiseSpec(kind=kind, snr=0.33), np.random.default_rng(0))
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape
    noise = (noisy - clean).astype(np.float64)
    assert abs(noise.mean()) < 0.01
    assert clean.std() / noise.std() == pytest.approx(0.33, rel=0.03)
    assert noise.std() == pytest.approx(lattice_std() / 0.33, rel=0.01)
    assert np.mean(noise**4) / noise.var() ** 2 == pytest.approx(kurtosis, rel=0.05)
    if kind == "uniform":
        assert np.abs(noise).max() <= np.sqrt(3) * lattice_std() / 0.33 + 1e-5


@pytest.mark.parametrize("dose", [20.0, 200.0])
def test_poisson_mean_and_variance_follow_dose(dose):
    clean = np.full((200, 200), 0.5, dtype=np.float32)
    noisy = corrupt(clean, NoiseSpec(kind="poisson", dose=dose), np.random.default_rng(1))
    assert noisy.mean() == pytest.approx(0.5, rel=0.01)
    assert noisy.var() == pytest.approx(0.5 / dose, rel=0.05)
    np.testing.assert_allclose(noisy * dose, np.round(noisy * dose), atol=1e-3)  # whole counts
    with_bg = corrupt(clean, NoiseSpec(kind="poisson", dose=dose, background=0.3), np.random.default_rng(1))
    assert with_bg.mean() == pytest.approx(0.5, rel=0.01)
    assert with_bg.var() == pytest.approx(0.8 / dose, rel=0.05)


def test_none_with_read_noise():
    clean = clean_windows(200, np.random.default_rng(0))
    np.testing.assert_array_equal(corrupt(clean, NoiseSpec(kind="none"), np.random.default_rng(0)), clean)
    noisy = corrupt(clean, NoiseSpec(kind="none", read_sigma=0.05), np.random.default_rng(0))
    assert (noisy - clean).std() == pytest.approx(0.05, rel=0.03)


def test_line_jitter_shifts_whole_rows():
    ramp = np.tile(np.arange(64, dtype=np.float32), (400, 1))
    out = corrupt(ramp, NoiseSpec(kind="none", line_jitter_px=0.4), np.random.default_rng(0))
    shift = ramp[:, 5:-5] - out[:, 5:-5]  # a ramp shifted right by s reads c - s
    np.testing.assert_allclose(shift, shift[:, :1].repeat(shift.shape[1], axis=1), atol=1e-4)
    assert shift[:, 0].std() == pytest.approx(0.4, rel=0.15)
    assert np.abs(shift[:, 0]).max() > 0.2


def test_line_gain_and_offset_act_per_row():
    ones = np.ones((2, 300, 40), dtype=np.float32)
    gained = corrupt(ones, NoiseSpec(kind="none", line_gain=0.1), np.random.default_rng(0))
    assert np.all(gained.std(axis=-1) < 1e-6)
    assert gained[..., 0].std() == pytest.approx(0.1, rel=0.15)
    shifted = corrupt(0 * ones, NoiseSpec(kind="none", line_offset=0.05), np.random.default_rng(0))
    assert np.all(shifted.std(axis=-1) < 1e-6)
    assert shifted[..., 0].std() == pytest.approx(0.05, rel=0.15)


@pytest.mark.parametrize(
    "field, value",
    [("kind", "salt"), ("snr", 0.0), ("snr", -1.0), ("dose", 0.0), ("dose", float("nan")),
     ("read_sigma", -0.1), ("line_jitter_px", -1.0), ("line_gain", -0.1), ("line_offset", -0.1),
     ("background", -0.5)],
)
def test_noise_spec_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        NoiseSpec(**{field: value})


def test_noise_spec_from_settings():
    settings = NoiseSettings(kind="poisson", dose=12.0, line_jitter_px=0.3)
    spec = NoiseSpec.from_settings(settings)
    assert spec == NoiseSpec(kind="poisson", dose=12.0, line_jitter_px=0.3)
    assert NoiseSpec(**settings.model_dump()) == spec


# ---------------------------------------------------------------- training batches


def test_training_batches_count_shapes_and_reproducibility():
    spec = NoiseSpec(kind="uniform", snr=0.5)
    batches = list(training_batches(1030, 256, spec, seed=7))
    assert [len(n) for n, _ in batches] == [256, 256, 256, 256, 6]
    for noisy, clean in batches:
        assert noisy.shape == clean.shape == (len(noisy), 28, 28)
        assert noisy.dtype == clean.dtype == np.float32
        assert not np.array_equal(noisy, clean)
    again = list(training_batches(1030, 256, spec, seed=7))
    for (n1, c1), (n2, c2) in zip(batches, again):
        np.testing.assert_array_equal(n1, n2)
        np.testing.assert_array_equal(c1, c2)
    other = next(training_batches(1030, 256, spec, seed=8))
    assert not np.array_equal(other[1], batches[0][1])


def test_training_batches_use_their_lattice():
    spec = NoiseSpec(kind="gaussian", snr=1.0)
    noisy, clean = next(training_batches(2000, 2000, spec, seed=0, size=16, period_px=8.0))
    assert clean.shape == (2000, 16, 16)
    assert (noisy - clean).std() == pytest.approx(lattice_std(8.0, 1.5), rel=0.02)
    with pytest.raises(ValueError):
        next(training_batches(10, 0, spec, seed=0))


# ---------------------------------------------------------------- full frames


@pytest.mark.parametrize("shape", [(64, 48), (28, 100), (300, 301)])
def test_frame_shapes_and_columns_inside(shape):
    f = simulate_frame(shape, np.random.default_rng(0), rotation_deg=30.0, offset_px=(2.5, 1.25))
    h, w = shape
    assert f.clean.shape == shape and f.clean.dtype == np.float32
    n = len(f.columns)
    assert f.columns.shape == (n, 2) and f.intensities.shape == (n,) and f.near_defect.shape == (n,)
    assert np.all((f.columns >= -0.5) & (f.columns < np.array([h, w]) - 0.5))
    assert n == pytest.approx(2 * h * w / A**2, rel=0.2)
    assert set(np.unique(f.intensities)) == set(PAPER_INTENSITIES)
    assert not f.near_defect.any()


def test_frame_peaks_at_true_columns():
    f = simulate_frame((60, 80), np.random.default_rng(0), offset_px=(3.0, 4.0))
    r, c = np.round(f.columns).astype(int).T
    np.testing.assert_allclose(f.clean[r, c], f.intensities, atol=1e-3)
    assert f.clean.max() == pytest.approx(1.0, abs=1e-3)
    g = simulate_frame((90, 90), np.random.default_rng(0), rotation_deg=23.0, offset_px=(0.37, 5.81))
    r, c = np.round(g.columns).astype(int).T
    d2 = ((g.columns - np.stack([r, c], axis=1)) ** 2).sum(axis=1)
    np.testing.assert_allclose(g.clean[r, c], g.intensities * np.exp(-d2 / (2 * S**2)), atol=2e-3)


def test_frame_columns_match_the_image_after_drift():
    h, w, drift = 200, 160, (8.0, -6.0)
    kw = dict(rotation_deg=11.0, offset_px=(1.3, 2.7))
    still = simulate_frame((h, w), np.random.default_rng(0), **kw)
    moved = simulate_frame((h, w), np.random.default_rng(0), drift_px=drift, **kw)
    # every reported Sr column away from the border sits on an image maximum
    for (y, x), peak in zip(moved.columns, moved.intensities):
        if peak == 1.0 and 3 < y < h - 4 and 3 < x < w - 4:
            assert _refine(moved.clean, int(round(y)), int(round(x))) == pytest.approx((y, x), abs=0.02)
    # the first row is unmoved; the last row sees the lattice displaced by the whole drift
    np.testing.assert_allclose(moved.clean[0], still.clean[0], atol=1e-3)
    shifted = simulate_frame((h, w), np.random.default_rng(0), rotation_deg=11.0,
                             offset_px=(1.3 + drift[0], 2.7 + drift[1]))
    np.testing.assert_allclose(moved.clean[-1], shifted.clean[-1], atol=1e-3)
    # every reported column is an undrifted column, displaced by the drift of its own row
    ky, kx = drift[0] / (h - 1), drift[1] / (h - 1)
    y0 = moved.columns[:, 0] * (1 - ky)
    x0 = moved.columns[:, 1] - kx * moved.columns[:, 0]
    inner = (y0 > 1) & (y0 < h - 2) & (x0 > 1) & (x0 < w - 2)
    assert inner.sum() > 100
    gap = np.hypot(*(np.stack([y0, x0], 1)[inner][:, None] - still.columns[None]).T).min(axis=0)
    assert gap.max() < 1e-6
    low = moved.columns[moved.columns[:, 0] > h - 10]
    assert np.abs(low[:, None] - still.columns[None]).sum(-1).min() > 0.5  # bottom rows really moved


def test_rp_defect_moves_columns_off_the_perfect_lattice():
    shape = (120, 140)
    perfect = simulate_frame(shape, np.random.default_rng(0), offset_px=(2.0, 3.0))
    rp = simulate_frame(shape, np.random.default_rng(0), offset_px=(2.0, 3.0), defect="rp")
    # image peaks where the columns are said to be
    r, c = np.round(rp.columns).astype(int).T
    d2 = ((rp.columns - np.stack([r, c], axis=1)) ** 2).sum(axis=1)
    np.testing.assert_allclose(rp.clean[r, c], rp.intensities * np.exp(-d2 / (2 * S**2)), atol=2e-3)
    # Sr columns measured against the perfect Sr sublattice: on it on one side, off it on the other
    sr = rp.columns[rp.intensities == 1.0]
    frac = (sr - np.array([2.0, 3.0])) / A
    off = np.hypot(*(frac - np.round(frac)).T) * A
    assert np.mean(off < 1e-6) > 0.3
    assert np.mean(off > 3.0) > 0.3
    # the fault runs through the middle, and only columns near it are marked
    assert 0 < rp.near_defect.sum() < 0.3 * len(rp.columns)
    x_near = rp.columns[rp.near_defect, 1]
    assert np.all(np.abs(x_near - shape[1] / 2) < 2.5 * A)
    # left of the fault the frame is the perfect lattice
    np.testing.assert_allclose(rp.clean[:, :40], perfect.clean[:, :40], atol=1e-6)
    assert np.abs(rp.clean[:, 90:] - perfect.clean[:, 90:]).max() > 0.5


def test_frame_validation_and_position_jitter():
    with pytest.raises(ValueError, match="defect"):
        simulate_frame((40, 40), np.random.default_rng(0), defect="twin")  # type: ignore[arg-type]
    a = simulate_frame((80, 80), np.random.default_rng(0), position_jitter_px=0.3)
    b = simulate_frame((80, 80), np.random.default_rng(0), position_jitter_px=0.3)
    c = simulate_frame((80, 80), np.random.default_rng(1), position_jitter_px=0.3)
    np.testing.assert_array_equal(a.clean, b.clean)
    assert np.abs(a.columns - c.columns[: len(a.columns)]).max() > 0.05 or len(a.columns) != len(c.columns)
