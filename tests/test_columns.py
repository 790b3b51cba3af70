"""stemd.compute.columns: the guide steps aside at the columns a frame contradicts, and nowhere else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from stemd.compute import hostsync
from stemd.compute.columns import _fdr_threshold, blur, keep_columns, max_filter
from stemd.sim import scenes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PERIOD = 10.0
SCALE = PERIOD / np.sqrt(2)  # the perovskite's shortest column-to-column translation (A to B site)


def _scene(vacancy_frac: float, dopant_frac: float, seed: int = 3, adatom_frac: float = 0.0) -> scenes.Scene:
    rng = np.random.default_rng(seed)
    phase = scenes.Phase("perovskite", PERIOD, 15.0, (2.0, 5.0))
    return scenes.build_scene((192, 192), [phase], [], rng, sigma_px=1.3, blur_px=0.6, intensity_cv=0.03,
                              vacancy_frac=vacancy_frac, dopant_frac=dopant_frac, adatom_frac=adatom_frac)


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


def test_max_filter_is_max_pooling_over_the_square_inside_the_frame():
    x = torch.randn(2, 1, 37, 41)
    torch.testing.assert_close(max_filter(x, 3), F.max_pool2d(x, 7, stride=1, padding=3))


def test_the_threshold_drops_only_when_many_tests_are_far_out():
    """Benjamini-Hochberg: pure noise keeps the highest threshold; a tenth of the frame at z = 6 lowers it to
    where about a fifth of what passes is noise."""
    g = torch.Generator().manual_seed(0)
    null = torch.randn(1, 1, 200, 200, generator=g)
    assert float(_fdr_threshold(null, 0.2, 2.0, 3.5)) == 3.5
    signal = null.clone()
    signal[..., :20, :] += 6.0
    cut = float(_fdr_threshold(signal, 0.2, 2.0, 3.5))
    assert 2.0 < cut < 3.0
    passed = signal.abs() > cut
    false = float(passed[..., 20:, :].sum() / passed.sum())
    assert 0.05 < false < 0.25


@pytest.mark.parametrize("share", [0.0, 0.02, 0.1, 0.5])
def test_the_cpu_shortcut_counts_the_same_discoveries_as_the_full_sort(monkeypatch, share):
    """Where a read is free only the p-values up to q are sorted; the GPU's path sorts them all: the same cut,
    from no discovery to so many that the cut drops to its floor."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 1, 150, 150, generator=g)
    z[0, ..., : int(share * 150), :] += 4.0
    z[1, ..., : int(share * 75), :] -= 3.0
    shortcut = _fdr_threshold(z, 0.2, 1.0, 3.5)
    monkeypatch.setattr(hostsync, "free", lambda device: False)
    full = _fdr_threshold(z, 0.2, 1.0, 3.5)
    torch.testing.assert_close(shortcut, full, rtol=0, atol=0)
    assert share == 0 or float(full[0]) < 3.5


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


@pytest.mark.parametrize("dose", [20.0, 60.0])
def test_columns_where_the_guide_has_none_are_added(dose):
    """Adatoms (weak columns at interstitial sites) are absent from a lattice guide; the extra-column test
    adds them: their disc means move most of the way from the guide's to the truth's."""
    scene = _scene(vacancy_frac=0.0, dopant_frac=0.0, adatom_frac=0.1, seed=5)
    d = scene.params["defects"]
    adatoms = d["seen"][(d["kind"] == scenes.DEFECT_KINDS.index("adatom")) & _inside(d["seen"])]
    assert len(adatoms) >= 5
    frame, guide = _t(_noisy(scene.clean, dose)), _t(scenes.host_clean(scene))
    truth, was = _discs(_t(scene.clean), adatoms), _discs(guide, adatoms)
    without, added = (_discs(keep_columns(frame, guide, SCALE, extra=e), adatoms) for e in (False, True))
    assert np.abs(without - truth).sum() > 0.9 * np.abs(was - truth).sum()  # the column test alone: no help
    assert np.abs(added - truth).sum() < 0.5 * np.abs(was - truth).sum()
