"""Saturated and hot pixels are missing data: found without touching signal, filled from their neighbours."""

import numpy as np
import pytest
import torch

from stemd.compute.outliers import outlier_mask, repair
from stemd.pipeline import Denoiser
from stemd.sim import scenes


def _frame(period: float, dose: float, seed: int = 0, size: int = 192) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scene = scenes.random_scene((size, size), rng, period_px=period, structures=("perovskite",), layouts=("perfect",))
    return scenes.apply_instrument(scene.clean, rng, scenes.draw_noise(rng, dose=dose), dose=dose).astype(np.float32)


@pytest.mark.parametrize(("period", "dose"), [(4.0, 2000.0), (6.0, 200.0), (12.0, 2.0)])
def test_no_signal_pixel_is_an_outlier(period, dose):
    """Sharp atom columns at high dose (one of many) and low-dose counts are all kept."""
    assert not outlier_mask(torch.from_numpy(_frame(period, dose))[None], 65535.0).any()
    low = np.random.default_rng(1).poisson(0.3, (1, 256, 256)).astype(np.float32)
    assert not outlier_mask(torch.from_numpy(low), 65535.0).any()


def test_saturated_and_hot_pixels_are_found_and_filled_from_their_neighbours():
    x = torch.full((1, 40, 40), 3.0)
    x[0, 5, 5] = 65535.0  # saturated
    x[0, 20:23, 20:23] = 65535.0  # a saturated block: filled from the ring around it
    x[0, 30, 12] = 400.0  # hot
    mask = outlier_mask(x, 65535.0)
    assert mask.sum() == 11 and mask[0, 30, 12] and mask[0, 5, 5]
    fixed = repair(x, mask)
    torch.testing.assert_close(fixed, torch.full_like(fixed, 3.0))
    hot_only = torch.full((1, 40, 40), 3.0)
    hot_only[0, 30, 12] = 400.0
    assert outlier_mask(hot_only, None).nonzero().tolist() == [[0, 30, 12]]  # float data: no saturation level


@pytest.mark.parametrize("at", [(0, 17), (39, 5), (12, 0), (25, 39), (0, 0), (39, 39)])
def test_hot_pixels_on_the_border_are_found(at):
    x = torch.full((1, 40, 40), 3.0)
    x[(0, *at)] = 400.0
    assert outlier_mask(x, None).nonzero().tolist() == [[0, *at]]
    torch.testing.assert_close(repair(x, outlier_mask(x, None)), torch.full_like(x, 3.0))


def test_a_frame_with_saturated_pixels_denoises_like_one_without():
    """A few 65535s dominated normalisation and wrecked the output; treated as missing data they change little."""
    raw = _frame(10.0, 20.0, seed=3)
    clean_run = Denoiser.load(device="cpu")(raw.astype(np.uint16))
    hit = raw.astype(np.uint16)
    rng = np.random.default_rng(4)
    rows, cols = rng.integers(0, 192, 20), rng.integers(0, 192, 20)
    hit[rows, cols] = 65535
    out = Denoiser.load(device="cpu")(hit)
    keep = np.ones(hit.shape, bool)
    keep[rows, cols] = False
    err = np.abs(out - clean_run)[keep].mean() / np.ptp(clean_run)
    assert err < 0.01
    off = Denoiser.load(device="cpu", outliers=False)(hit)
    assert np.abs(off - clean_run)[keep].mean() / np.ptp(clean_run) > 5 * err
