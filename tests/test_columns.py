"""stemd.compute.columns: the guide steps aside at the columns a frame contradicts, and nowhere else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stemd.compute.columns import blur, keep_columns
from stemd.sim import scenes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PERIOD = 10.0
SCALE = PERIOD / np.sqrt(2)  # the perovskite's shortest column-to-column translation (A to B site)


def _scene(vacancy_frac: float, dopant_frac: float, seed: int = 3) -> scenes.Scene:
    rng = np.random.default_rng(seed)
    phase = scenes.Phase("perovskite", PERIOD, 15.0, (2.0, 5.0))
    return scenes.build_scene((192, 192), [phase], [], rng, sigma_px=1.3, blur_px=0.6, intensity_cv=0.03,
                              vacancy_frac=vacancy_frac, dopant_frac=dopant_frac)


def _noisy(clean: np.ndarray, dose: float, seed: int = 4) -> np.ndarray:
    return (np.random.default_rng(seed).poisson(clean * dose) / dose).astype(np.float32)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None]


def _discs(image: torch.Tensor, points: np.ndarray, radius: float = 0.3 * PERIOD) -> np.ndarray:
    img = image[0, 0].numpy()
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    return np.array([img[np.hypot(yy - y, xx - x) <= radius].mean() for y, x in points])


def _inside(points: np.ndarray, size: int = 192, margin: float = 12) -> np.ndarray:
    return ((points >= margin) & (points <= size - 1 - margin)).all(1)


def test_blur_keeps_the_mean_and_matches_a_gaussians_spread():
    x = torch.zeros(1, 1, 65, 65)
    x[0, 0, 32, 32] = 1.0
    y = blur(x, 2.0)[0, 0]
    assert float(y.sum()) == pytest.approx(1.0, abs=1e-5)
    rows = torch.arange(65, dtype=torch.float32) - 32
    variance = float((y.sum(1) * rows.square()).sum())
    assert variance == pytest.approx(4.0, rel=0.05)


@pytest.mark.parametrize("dose", [5.0, 20.0])
def test_a_lattice_guide_takes_the_frames_defects_and_keeps_its_host_columns(dose):
    scene = _scene(vacancy_frac=0.05, dopant_frac=0.08)
    host = scenes.host_clean(scene)
    frame, guide = _t(_noisy(scene.clean, dose)), _t(host)
    kept = keep_columns(frame, guide, SCALE)
    d = scene.params["defects"]
    defects = d["seen"][_inside(d["seen"])]
    truth, was, now = (_discs(a, defects) for a in (_t(scene.clean), guide, kept))
    assert np.abs(now - truth).sum() < 0.5 * np.abs(was - truth).sum()  # more than half the way to the truth
    intact = scene.columns[_inside(scene.columns) & ~scene.near_defect]
    moved = _discs(kept, intact) - _discs(guide, intact)
    column = np.median(_discs(guide, intact))
    assert np.sqrt(np.mean(moved**2)) < 0.05 * column  # intact columns: the guide's own


@pytest.mark.parametrize("dose", [2.0, 5.0, 50.0])
def test_a_fault_free_frame_leaves_the_guide_almost_untouched(dose):
    scene = _scene(vacancy_frac=0.0, dopant_frac=0.0)
    guide = _t(scene.clean)
    kept = keep_columns(_t(_noisy(scene.clean, dose)), guide, SCALE)
    change = (kept - guide).abs()
    assert float((change > 0.05).float().mean()) < 0.01
    assert float(change.mean()) < 0.02 * float(guide.mean())
