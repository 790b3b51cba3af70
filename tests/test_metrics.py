"""Tests for stemd.compute.metrics: PSNR/SSIM, scale fitting, the paper's per-pixel error, column fits."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import least_squares

from stemd.compute import metrics


def gaussians(shape, positions, amplitudes, sigma=1.5, background=0.0):
    """Sum of isotropic 2D Gaussians at sub-pixel (y, x) positions."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    img = np.full(shape, background, dtype=np.float64)
    for (y, x), a in zip(positions, amplitudes):
        img += a * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))
    return img


@pytest.fixture
def isolated():
    """Columns 12 px apart (no overlap within the fit radius) with random sub-pixel offsets."""
    rng = np.random.default_rng(3)
    grid = np.stack(np.meshgrid(np.arange(8, 96, 12.0), np.arange(8, 96, 12.0), indexing="ij"), -1).reshape(-1, 2)
    true = grid + rng.uniform(-0.5, 0.5, grid.shape)
    amps = rng.choice([1.0, 0.7], len(true))
    return gaussians((100, 100), true, amps, background=0.1), true, amps


def test_psnr_identical_is_inf_and_known_mse_gives_known_value():
    ref = np.linspace(0, 1, 100).reshape(10, 10)
    assert metrics.psnr(ref, ref) == float("inf")
    x = ref + np.where(np.arange(100).reshape(10, 10) % 2, 0.1, -0.1)  # MSE exactly 0.01
    assert metrics.psnr(x, ref) == pytest.approx(20.0)
    assert metrics.psnr(x, ref, data_range=2.0) == pytest.approx(20.0 + 20 * np.log10(2))


def test_psnr_rejects_mismatched_shapes_and_constant_reference():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="data_range"):
        metrics.psnr(np.ones((4, 4)), np.zeros((4, 4)))


def test_ssim_is_one_for_identical_and_lower_for_noisy():
    ref = gaussians((48, 48), [(20.3, 24.1)], [1.0])
    noisy = ref + np.random.default_rng(0).normal(0, 0.2, ref.shape)
    assert metrics.ssim(ref, ref) == pytest.approx(1.0)
    assert metrics.ssim(noisy, ref) < 0.9


def test_fit_scale_recovers_known_gain_and_offset():
    ref = np.random.default_rng(1).random((32, 32))
    counts = 37.5 * ref + 12.0
    gain, offset = metrics.fit_gain_offset(counts, ref)
    assert gain == pytest.approx(1 / 37.5)
    assert offset == pytest.approx(-12.0 / 37.5)
    np.testing.assert_allclose(metrics.fit_scale(counts, ref), ref, atol=1e-12)


def test_fit_scale_of_constant_input_is_the_reference_mean():
    ref = np.random.default_rng(2).random((8, 8))
    np.testing.assert_allclose(metrics.fit_scale(np.full((8, 8), 5.0), ref), ref.mean())


def test_mean_abs_error_percent_known_case():
    clean = np.zeros((10, 10))
    clean[0, 0] = 1.0  # range 1
    pred = clean + 0.1
    pred[:5] -= 0.2  # half the pixels off by -0.1, half by +0.1: mean |err| = 0.1
    assert metrics.mean_abs_error_percent(pred, clean) == pytest.approx(10.0)
    assert metrics.mean_abs_error_percent(pred * 2, clean * 2) == pytest.approx(10.0)  # scale-free
    assert metrics.mean_abs_error_percent(clean, clean) == 0.0


def test_fit_columns_recovers_subpixel_positions_without_noise(isolated):
    img, true, amps = isolated
    start = true + np.random.default_rng(4).uniform(-0.8, 0.8, true.shape)  # a poor starting guess
    fits = metrics.fit_columns(img, start, radius=3.5)
    assert fits.ok.all()
    assert metrics.column_rms_error(fits.centres, true) < 0.05
    np.testing.assert_allclose(fits.amplitudes, amps, atol=0.02)
    np.testing.assert_allclose(fits.widths, 1.5, atol=0.02)
    np.testing.assert_allclose(fits.background, 0.1, atol=0.02)


def test_fit_columns_matches_scipy_least_squares_on_noisy_columns(isolated):
    img, true, _ = isolated
    noisy = img + np.random.default_rng(5).normal(0, 0.05, img.shape)
    fits = metrics.fit_columns(noisy, true[:6], radius=3.5)
    oy, ox = np.mgrid[-4:5, -4:5]
    for (y, x), got in zip(true[:6], fits.centres):
        by, bx = round(y), round(x)
        disc = (oy - (y - by)) ** 2 + (ox - (x - bx)) ** 2 <= 3.5**2
        yy, xx = (by + oy)[disc], (bx + ox)[disc]
        v = noisy[yy, xx]

        def residual(p, yy=yy, xx=xx, v=v):
            return p[0] * np.exp(-((yy - p[1]) ** 2 + (xx - p[2]) ** 2) / (2 * p[3] ** 2)) + p[4] - v

        ref = least_squares(residual, [v.max() - v.min(), y, x, 1.5, v.min()], xtol=1e-12, ftol=1e-12)
        np.testing.assert_allclose(got, ref.x[1:3], atol=1e-4)


def test_fit_columns_degrades_gracefully_with_noise(isolated):
    img, true, _ = isolated
    rng = np.random.default_rng(6)
    errors = []
    for sigma in (0.02, 0.1, 0.3):
        fits = metrics.fit_columns(img + rng.normal(0, sigma, img.shape), true, radius=3.5)
        assert fits.ok.mean() > 0.7
        errors.append(metrics.column_rms_error(fits.centres, true, fits.ok))
    assert errors[0] < errors[1] < errors[2] < 1.5
    assert errors[0] < 0.1


def test_fit_columns_flags_columns_outside_the_image_and_pure_noise():
    img = np.random.default_rng(7).normal(0, 1, (40, 40))
    fits = metrics.fit_columns(img, np.array([[-10.0, -10.0], [20.0, 20.0], [39.5, 20.0]]), radius=3.5)
    assert not fits.ok[0]  # no pixels at all
    assert not fits.ok[2]  # half the disc is outside
    assert fits.centres.shape == (3, 2) and np.isfinite(fits.centres[1]).all()


def test_column_rms_error_uses_only_ok_rows():
    true = np.zeros((3, 2))
    fitted = np.array([[3.0, 4.0], [0.0, 1.0], [100.0, 0.0]])
    assert metrics.column_rms_error(fitted, true, np.array([True, True, False])) == pytest.approx(np.sqrt(13))
    assert np.isnan(metrics.column_rms_error(fitted, true, np.zeros(3, bool)))

