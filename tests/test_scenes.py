"""Tests for stemd.sim.scenes: structures, defects, regions, the instrument and the training stream."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from stemd.sim import scenes
from stemd.sim.lattice import _basis
from stemd.sim.scenes import (
    DEFECT_KINDS,
    Cut,
    Phase,
    build_scene,
    corrupt_scene,
    host_clean,
    named_frame,
    random_scene,
)


def _maxima(img: np.ndarray, threshold: float, size: int = 3) -> np.ndarray:
    """Sub-pixel local maxima: quadratic fit of log(img) on each 3x3 maximum (exact for a Gaussian)."""
    peaks = (img == ndimage.maximum_filter(img, size=size)) & (img > threshold)
    peaks[:2] = peaks[-2:] = peaks[:, :2] = peaks[:, -2:] = False
    dr, dc = (g.ravel() for g in np.meshgrid([-1, 0, 1], [-1, 0, 1], indexing="ij"))
    m = np.stack([np.ones(9), dr, dc, dr * dr, dc * dc, dr * dc], axis=1)
    out = []
    for r, c in zip(*np.nonzero(peaks)):
        z = np.log(np.clip(img[r - 1:r + 2, c - 1:c + 2].ravel(), 1e-12, None))
        _, br, bc, arr, acc, arc = np.linalg.lstsq(m, z, rcond=None)[0]
        off = np.linalg.solve([[2 * arr, arc], [arc, 2 * acc]], [-br, -bc])
        out.append((r + off[0], c + off[1]))
    return np.array(out).reshape(-1, 2)


def _peakiness(img: np.ndarray) -> float:
    """Largest (max / mean) of the Hann-windowed power spectrum over rings |k| >= 4: Bragg peaks stand out."""
    n = img.shape[0]
    win = np.hanning(n)[:, None] * np.hanning(n)[None, :]
    power = np.abs(np.fft.fft2((img - img.mean()) * win)) ** 2
    k = np.fft.fftfreq(n) * n
    radius = np.rint(np.hypot(k[:, None], k[None, :])).astype(int)
    return max(float(power[radius == r].max() / power[radius == r].mean()) for r in range(4, n // 2))


def _off_lattice(points: np.ndarray, phase: Phase, sublattice: np.ndarray | None = None) -> np.ndarray:
    """Distance (in periods) of each point from the nearest site of `phase`'s perfect lattice
    (of the point's own `sublattice`, 0 or 1, when given)."""
    e = np.stack(_basis(phase.rotation_deg))
    c = (points - np.asarray(phase.offset_px)) @ e.T / phase.period_px
    cell = scenes.CELLS[phase.kind]
    best = np.full(len(points), np.inf)
    for c1, c2, sub in scenes._MOTIFS[phase.kind]:
        f = (c - np.array([c1, c2])) @ np.linalg.inv(cell)
        d = (f - np.round(f)) @ cell
        dist = np.hypot(d[:, 0], d[:, 1])
        best = np.minimum(best, dist if sublattice is None else np.where(sublattice == sub, dist, np.inf))
    return best


# ---------------------------------------------------------------- scenes


def test_random_scene_shapes_dtypes_and_seeding():
    a = random_scene((96, 128), np.random.default_rng(5))
    b = random_scene((96, 128), np.random.default_rng(5))
    c = random_scene((96, 128), np.random.default_rng(6))
    assert a.clean.shape == a.amorphous.shape == a.vacuum.shape == a.region.shape == (96, 128)
    assert a.clean.dtype == np.float32 and a.amorphous.dtype == a.vacuum.dtype == bool
    n = len(a.columns)
    assert a.columns.shape == (n, 2) and a.intensities.shape == a.near_defect.shape == (n,)
    assert a.near_defect.dtype == bool
    np.testing.assert_array_equal(a.clean, b.clean)
    np.testing.assert_array_equal(a.columns, b.columns)
    assert not np.array_equal(a.clean, c.clean)


@pytest.mark.parametrize("kind", scenes.STRUCTURES)
def test_columns_are_the_image_maxima(kind):
    # no noise, no blur, but a drifting scan: every column is a maximum where `columns` says
    # (period 20 px so that the dumbbell's pair, 7 px apart, do not pull each other's maxima)
    phase = Phase(kind, 20.0, 17.0, (3.3, 7.1))
    s = build_scene((160, 150), [phase], [], np.random.default_rng(0), sigma_px=1.8, drift_px=(4.0, -3.0),
                    intensity_cv=0.05)
    found = _maxima(s.clean, 0.2)
    inner = np.all((s.columns > 3) & (s.columns < np.array([157, 147])), axis=1)
    dist = np.hypot(*(found[:, None, :] - s.columns[None, inner, :]).transpose(2, 0, 1))
    assert dist.min(axis=0).max() < 0.1  # every column has a maximum within 0.1 px
    assert np.sum(dist.min(axis=1) < 0.1) == inner.sum()  # and no extra maxima among them
    found_inner = np.all((found > 3.5) & (found < np.array([156.5, 146.5])), axis=1)
    assert dist.min(axis=1)[found_inner].max() < 0.1
    assert 0.9 < s.clean.max() < 1.25


@pytest.mark.parametrize("kind,ratio", [("perovskite", 1.0), ("dumbbell", math.sqrt(0.75)), ("hexagonal", 1.0)])
def test_random_periods_in_range(kind, ratio):
    # the shortest distance between columns of the bright sublattice is `ratio` x the period
    rng = np.random.default_rng(1)
    periods = []
    for _ in range(6):
        s = random_scene((128, 128), rng, layouts="perfect", structures=kind, intensity_cv=0.0, vacancy_frac=0.0)
        bright = s.columns[s.intensities == 1.0]
        d = np.hypot(*(bright[:, None] - bright[None]).transpose(2, 0, 1))
        d[d == 0] = np.inf
        period = np.median(d.min(axis=1)) / ratio
        assert period == pytest.approx(s.params["phases"][0]["period_px"], rel=0.03)  # drift shears a little
        periods.append(period)
    assert 6 * 0.97 <= min(periods) and max(periods) <= 20 * 1.03
    assert max(periods) - min(periods) > 2  # really drawn from a range


def test_ruddlesden_popper_columns_are_off_lattice_beyond_the_fault():
    phase = Phase("perovskite", 10.0, 20.0, (2.0, 3.0), rp_fault_at=(70.0, 90.0))
    s = build_scene((160, 180), [phase], [], np.random.default_rng(0), sigma_px=1.3)
    off = _off_lattice(s.columns, phase, np.where(s.intensities == 1.0, 0, 1))
    e1 = np.array(_basis(20.0)[0])
    side = (s.columns - np.array([70.0, 90.0])) @ e1 / 10.0  # signed distance from the requested point, periods
    assert np.all(off[side < -1.0] < 1e-6)  # the perfect lattice on one side
    assert np.all(off[side > 1.5] > 0.5)  # shifted by (0.67, 0.5) cells on the other
    assert np.all(np.abs(side[s.near_defect]) < 2.0) and s.near_defect.sum() > 20
    assert np.all(~s.near_defect[np.abs(side) > 2.0])


def test_vacancies_are_missing_or_weakened_and_flagged():
    phase = Phase("perovskite", 12.0, 0.0, (5.0, 5.0))
    s = build_scene((200, 200), [phase], [], np.random.default_rng(3), sigma_px=1.5, vacancy_frac=0.05)
    gone, weak = s.params["vacancies"], s.params["weakened"]
    assert len(gone) > 5 and len(weak) > 5
    full = build_scene((200, 200), [phase], [], np.random.default_rng(3), sigma_px=1.5)
    assert len(full.columns) - len(s.columns) == len(gone)
    inside = np.all((gone > 1) & (gone < 198), axis=1)
    at = np.round(gone[inside]).astype(int)
    assert np.all(s.clean[at[:, 0], at[:, 1]] < 0.05)  # nothing left where a column was removed
    assert np.all(full.clean[at[:, 0], at[:, 1]] > 0.5)
    d = np.hypot(*(s.columns[:, None] - np.concatenate([gone, weak])[None]).transpose(2, 0, 1)).min(axis=1)
    well_inside = np.all((s.columns > 24) & (s.columns < 176), axis=1)  # no unlisted vacancy in reach
    assert np.all(s.near_defect[well_inside & (d <= 12.0)])
    assert not np.any(s.near_defect[well_inside & (d > 13.0)])
    weak_cols = d == 0
    assert weak_cols.sum() == len(weak) and np.all(s.intensities[weak_cols] < 0.61)


@pytest.mark.parametrize("layout", ["interface", "grain_boundary"])
def test_second_phase_is_off_the_first_lattice(layout):
    first = Phase("perovskite", 10.0, 5.0, (1.0, 2.0))
    second = Phase("hexagonal", 11.0, 0.0) if layout == "interface" else Phase("perovskite", 10.0, 30.0)
    cut = Cut((80.0, 80.0), 10.0)
    s = build_scene((160, 160), [first, second], [cut], np.random.default_rng(0), sigma_px=1.3)
    n = np.array([math.sin(math.radians(10.0)), math.cos(math.radians(10.0))])
    side = (s.columns - np.array(cut.point)) @ n
    off = _off_lattice(s.columns, first)
    assert np.all(off[side < 0] < 1e-6)
    assert np.mean(off[side > 0] > 0.1) > 0.8
    # near_defect: every column within 0.9 period of the boundary, none beyond 1.1 periods
    assert np.all(s.near_defect[np.abs(side) < 0.9 * 10.0])
    assert not np.any(s.near_defect[np.abs(side) > 1.1 * 11.0])
    assert np.all(s.region[tuple(np.round(s.columns[side > 5]).clip(0, 159).astype(int).T)] == 1)
    pair = np.hypot(*(s.columns[:, None] - s.columns[None]).transpose(2, 0, 1))
    np.fill_diagonal(pair, np.inf)
    assert pair.min() >= scenes.MIN_SEPARATION * 10.0 - 1e-9  # no overlapping columns at the boundary


def test_amorphous_has_no_lattice_peaks_and_vacuum_is_empty():
    for seed in (0, 1):
        noisy, s, _ = named_frame("amorphous", seed=seed, dose=200.0)
        assert s.amorphous[:128, 384:].all() and not s.amorphous[:128, :128].any()
        assert _peakiness(s.clean[:128, 384:]) < 20  # a ring, no Bragg peaks
        assert _peakiness(s.clean[:128, :128]) > 50
        assert s.clean[:128, 384:].mean() > 0.05  # but not empty
        deep = ndimage.binary_erosion(s.amorphous, iterations=2)
        assert not np.any(deep[tuple(np.round(s.columns).astype(int).clip(0, 511).T)])
    _, s, _ = named_frame("vacuum_edge")
    far = ndimage.binary_erosion(s.vacuum, iterations=8)
    assert far.sum() > 0.3 * far.size
    assert np.abs(s.clean[far]).max() < 1e-3


def test_mixed_scene_has_crystal_amorphous_and_vacuum():
    rng = np.random.default_rng(4)
    s = random_scene((192, 192), rng, layouts="mixed")
    kinds = [p["kind"] for p in s.params["phases"]]
    assert kinds[1:] == ["amorphous", "vacuum"]
    np.testing.assert_array_equal(s.amorphous, s.region == 1)
    np.testing.assert_array_equal(s.vacuum, s.region == 2)


def test_blur_widens_columns_at_constant_integral():
    phase = Phase("perovskite", 16.0, 0.0, (40.0, 40.0))
    sharp = build_scene((96, 96), [phase], [], np.random.default_rng(0), sigma_px=1.5)
    soft = build_scene((96, 96), [phase], [], np.random.default_rng(0), sigma_px=1.5, blur_px=2.0)
    assert soft.params["target_sigma_px"] == pytest.approx(2.5)
    assert soft.clean.sum() == pytest.approx(sharp.clean.sum(), rel=1e-3)
    assert soft.clean[40, 40] == pytest.approx(sharp.clean[40, 40] * (1.5 / 2.5) ** 2, rel=1e-3)
    np.testing.assert_array_equal(soft.columns, sharp.columns)


# ---------------------------------------------------------------- the instrument


def test_poisson_gain_read_variance_matches_formula():
    scene = named_frame("noise_only", shape=(512, 1024))[1]  # a flat 0.25: 524,288 samples of one pixel
    x = scenes.NOISE_ONLY_LEVEL
    noise = dict(dose=6.0, gain_cv=0.4, read_sigma=0.3, line_jitter_px=0.0, line_gain=0.0, line_offset=0.0)
    noisy, params = corrupt_scene(scene, np.random.default_rng(0), **noise)
    assert params == noise and noisy.dtype == np.float32
    expect = x * (1 + 0.4**2) / 6.0 + (0.3 / 6.0) ** 2
    assert float(scenes.noise_variance(x, params)) == pytest.approx(expect)
    assert noisy.mean() == pytest.approx(x, rel=0.01)
    assert noisy.var() == pytest.approx(expect, rel=0.02)
    plain = scenes.apply_instrument(scene.clean, np.random.default_rng(1), {**noise, "gain_cv": 0.0, "read_sigma": 0.0})
    assert plain.var() == pytest.approx(x / 6.0, rel=0.02)
    assert np.allclose(plain * 6.0, np.round(plain * 6.0), atol=1e-4)  # integer counts / dose
    assert noisy.var() > 1.1 * plain.var()  # the gain noise is really there


def test_corrupt_scene_draws_documented_ranges_and_rejects_bad_input():
    s = named_frame("noise_only", shape=(32, 32))[1]
    rng = np.random.default_rng(0)
    doses = [corrupt_scene(s, rng)[1]["dose"] for _ in range(300)]
    assert 2.0 <= min(doses) < 4 and 100 < max(doses) <= 200.0
    assert 0.4 < np.mean(np.log(doses) < math.log(20.0)) < 0.6  # log-uniform: the geometric middle is 20
    assert corrupt_scene(s, rng, dose=7.0, gain_cv=(0.2, 0.3))[1]["dose"] == 7.0
    with pytest.raises(ValueError, match="gain"):
        corrupt_scene(s, rng, gain=0.3)
    with pytest.raises(ValueError, match="dose"):
        corrupt_scene(s, rng, dose=-1.0)
    with pytest.raises(ValueError, match="layouts"):
        random_scene((32, 32), rng, layouts="crystalline")
    with pytest.raises(ValueError, match="period_px"):
        random_scene((32, 32), rng, period_px=(20.0, 6.0))
    with pytest.raises(ValueError, match="colour"):
        random_scene((32, 32), rng, colour=1)


def test_line_artefacts_are_not_in_the_target():
    noisy, s, p = named_frame("perovskite_rp", shape=(128, 128), dose=1e6, gain_cv=0.0, read_sigma=0.0,
                              line_jitter_px=0.0, line_gain=0.0, line_offset=0.0)
    assert np.abs(noisy - s.clean).max() < 0.01  # huge dose, no artefacts: noisy -> target
    jit, _, _ = named_frame("perovskite_rp", shape=(128, 128), dose=1e6, gain_cv=0.0, read_sigma=0.0,
                            line_jitter_px=0.5, line_gain=0.0, line_offset=0.0)
    assert np.abs(jit - s.clean).max() > 0.1


# ---------------------------------------------------------------- benchmark frames


def test_named_frames_are_deterministic_with_ground_truth():
    for kind in scenes.NAMED_FRAMES:
        noisy, s, p = named_frame(kind, shape=(160, 192), seed=3, dose=20.0)
        again, s2, _ = named_frame(kind, shape=(160, 192), seed=3, dose=20.0)
        np.testing.assert_array_equal(noisy, again)
        np.testing.assert_array_equal(s.columns, s2.columns)
        assert noisy.shape == s.clean.shape == (160, 192) and p["dose"] == 20.0
        has_defect = kind not in ("noise_only",)
        assert (s.near_defect.any() if has_defect else len(s.columns) == 0), kind
    assert named_frame("vacuum_edge", (160, 192))[1].vacuum.mean() > 0.2
    flat = named_frame("noise_only", (64, 64))[1].clean
    assert np.all(flat == scenes.NOISE_ONLY_LEVEL)
    with pytest.raises(ValueError, match="kind"):
        named_frame("perfect")


def test_dopants_are_brighter_a_sites_and_host_clean_undoes_every_defect():
    phase = Phase("perovskite", 10.0, 15.0, (2.0, 3.0))
    kw = dict(sigma_px=1.3, blur_px=0.6, drift_px=(0.8, 0.5), intensity_cv=0.04)
    s = build_scene((160, 160), [phase], [], np.random.default_rng(5), vacancy_frac=0.05, dopant_frac=0.08, **kw)
    plain = build_scene((160, 160), [phase], [], np.random.default_rng(5), **kw)
    d = s.params["defects"]
    counts = np.bincount(d["kind"], minlength=len(DEFECT_KINDS))
    assert counts[1] > 3 and counts[2] > 3 and counts[3] > 5  # empty, partial, dopant
    assert np.all(d["missing"][d["kind"] == 3] < 0) and np.all(d["missing"][d["kind"] != 3] > 0)
    dop = cKDTree(d["seen"][d["kind"] == 3]).query(s.columns)[0] < 1e-6
    assert dop.sum() > 5 and np.all(s.intensities[dop] > 1.3) and s.intensities[dop].min() > s.intensities[~dop].max()
    assert np.abs(s.clean - plain.clean).max() > 0.3
    np.testing.assert_allclose(host_clean(s), plain.clean, atol=1e-5)  # the defect-free scene, same seed
    np.testing.assert_array_equal(host_clean(plain), plain.clean)


def test_dopant_options_are_checked():
    phase = Phase("perovskite", 10.0, 0.0)
    with pytest.raises(ValueError, match="dopant_frac"):
        build_scene((64, 64), [phase], [], np.random.default_rng(0), sigma_px=1.3, dopant_frac=1.5)
    with pytest.raises(ValueError, match="dopant_gain"):
        build_scene((64, 64), [phase], [], np.random.default_rng(0), sigma_px=1.3, dopant_gain=(2.0, 1.0))


def _defect_ratios(s):
    """Per in-frame defect: (kind, intensity / host intensity), matched to the scene's columns."""
    d = s.params["defects"]
    inside = np.all((d["seen"] > 0) & (d["seen"] < np.array(s.clean.shape) - 1), axis=1) & (d["kind"] != 1)
    dist, idx = cKDTree(s.columns).query(d["seen"][inside])
    assert np.all(dist < 1e-6)  # every kept defect is one of the scene's columns
    amp = s.intensities[idx]
    return d["kind"][inside], amp, amp + d["missing"][inside]


def test_random_scene_draws_every_point_defect_at_the_asked_density_and_strength():
    rng = np.random.default_rng(11)
    s = random_scene((256, 256), rng, layouts="perfect", structures="perovskite", period_px=10.0, intensity_cv=0.0,
                     vacancy_frac=0.06, dopant_frac=0.06, lighter_frac=0.06, adatom_frac=0.04)
    kind, amp, host = _defect_ratios(s)
    n = len(s.columns)
    sites = n - int(np.sum(kind == 5))  # crystal columns in the frame (removed ones not counted)
    count = np.bincount(kind, minlength=len(DEFECT_KINDS))
    assert 0.5 * 0.03 * sites < count[2] < 1.6 * 0.03 * sites  # half the vacancies are partial
    assert 0.5 * 0.06 * sites / 2 < count[3] < 1.6 * 0.06 * sites / 2  # dopants: the A sublattice only
    assert 0.5 * 0.06 * sites < count[4] < 1.6 * 0.06 * sites
    assert 0.5 * 0.04 * sites / 2 < count[5] < 1.6 * 0.04 * sites / 2  # one per A column at most
    ratio = amp / np.where(host > 0, host, 1.0)
    for k, (lo, hi) in ((2, scenes.SCENE_RANGES["partial_intensity"]), (3, scenes.SCENE_RANGES["dopant_gain"]),
                        (4, scenes.SCENE_RANGES["lighter_gain"])):
        r = ratio[kind == k]
        assert lo - 1e-9 <= r.min() and r.max() <= hi + 1e-9, DEFECT_KINDS[k]
        assert r.max() - r.min() > 0.5 * (hi - lo), DEFECT_KINDS[k]  # spread over the range, not one value
    assert np.all(host[kind == 3] == 1.0)  # heavier substitutions on the brightest sublattice
    lo, hi = scenes.SCENE_RANGES["adatom_intensity"]
    assert np.all(host[kind == 5] == 0) and lo <= amp[kind == 5].min() and amp[kind == 5].max() <= hi
    ad = s.columns[cKDTree(s.params["defects"]["seen"][s.params["defects"]["kind"] == 5]).query(s.columns)[0] < 1e-6]
    nearest = cKDTree(s.columns).query(ad, k=2)[0][:, 1]
    np.testing.assert_allclose(nearest, 5.0, atol=0.3)  # at the cell edge's centre, half a period from A and B


def test_random_scene_defaults_carry_every_defect_kind():
    rng = np.random.default_rng(2)
    counts = sum(np.bincount(random_scene((192, 192), rng, layouts="perfect").params["defects"]["kind"],
                             minlength=len(DEFECT_KINDS)) for _ in range(6))
    assert np.all(counts[1:] > 0), counts
    with pytest.raises(ValueError, match="dopant_gain"):
        random_scene((32, 32), rng, dopant_gain=(2.0, 1.0))
    with pytest.raises(ValueError, match="lighter_frac"):
        random_scene((32, 32), rng, lighter_frac=2.0)


def test_lighter_substitutions_and_adatoms_are_undone_by_host_clean():
    phase = Phase("hexagonal", 12.0, 10.0, (2.0, 3.0))
    kw = dict(sigma_px=1.5, blur_px=0.5, drift_px=(0.6, 0.4), intensity_cv=0.03)
    s = build_scene((160, 160), [phase], [], np.random.default_rng(4), lighter_frac=0.1, adatom_frac=0.1, **kw)
    plain = build_scene((160, 160), [phase], [], np.random.default_rng(4), **kw)
    counts = np.bincount(s.params["defects"]["kind"], minlength=len(DEFECT_KINDS))
    assert counts[4] > 5 and counts[5] > 3 and counts[1:4].sum() == 0
    assert len(s.columns) > len(plain.columns)  # adatoms are extra columns
    np.testing.assert_allclose(host_clean(s), plain.clean, atol=1e-5)


@pytest.mark.parametrize("layout", ["particle", "grains"])
def test_particle_and_grain_layouts(layout):
    s = random_scene((192, 192), np.random.default_rng(8), layouts=layout, period_px=8.0)
    kinds = [p["kind"] for p in s.params["phases"]]
    crystal = ~s.amorphous & ~s.vacuum
    assert not s.vacuum.any() and len(s.columns) > 50
    if layout == "particle":
        assert kinds[0] in scenes.STRUCTURES and set(kinds[1:]) == {"amorphous"}
        assert 0.05 < crystal.mean() < 0.7 and s.amorphous[0, 0] | s.amorphous[-1, -1]
        lab, parts = ndimage.label(crystal)
        assert parts == 1  # one compact disc
    else:
        assert len(kinds) >= 3 and set(kinds) == {kinds[0]} and kinds[0] in scenes.STRUCTURES
        assert len(np.unique(s.region)) >= 2 and len({p["rotation_deg"] for p in s.params["phases"]}) == len(kinds)
