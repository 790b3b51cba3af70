"""stemd.compute.planar: lattice translations, plane averages, and the planar-defect guide (Bragg guide elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stemd.compute import hostsync, planar
from stemd.compute.fourier import bragg_filter
from stemd.compute.planar import lattice_vectors, planar_guide, plane_averages, switch_mask
from stemd.sim import scenes
from stemd.sim.lattice import NoiseSpec, corrupt, simulate_frame

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROTATION = 7.0


def _frame(size: int = 256, defect: str | None = "rp", dose: float | None = None, seed: int = 1):
    """A perovskite (period 10 px, rotated ROTATION degrees), an RP fault across the middle: (frame, SimFrame)."""
    f = simulate_frame((size, size), np.random.default_rng(0), period_px=10.0, sigma_px=1.3, rotation_deg=ROTATION,
                       offset_px=(3.0, 4.0), defect=defect)
    x = f.clean if dose is None else corrupt(f.clean, NoiseSpec(kind="poisson", dose=dose), np.random.default_rng(seed))
    return torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None], f


def _cell(period: float, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return period * np.array([[np.sin(t), np.cos(t)], [np.cos(t), -np.sin(t)]])  # e1, e2 in (y, x)


def _fault_error(image, f) -> float:
    """RMS difference from the clean frame over 7x7 px around the fault's columns, 32 px inside a 256² frame."""
    ij = np.round(f.columns[f.near_defect]).astype(int)
    ij = ij[((ij >= 32) & (ij < 224)).all(1)]
    patch = lambda img: np.stack([np.asarray(img)[i - 3:i + 4, j - 3:j + 4] for i, j in ij])  # noqa: E731
    return float(np.sqrt(np.mean((patch(image) - patch(f.clean)) ** 2)))


def _matches(vec, cells, tol: float) -> bool:
    return any(np.allclose(vec, c, atol=tol) or np.allclose(vec, -c, atol=tol) for c in cells)


def test_lattice_vectors_are_the_half_diagonals_refined_at_long_lags():
    """A perovskite's shortest translations in its image are the half diagonals (its two columns look alike
    at low dose), so u + v and u - v are its cell vectors: to 0.01 px after the long-lag refinement. Across
    an RP fault only the vector along the fault is a translation of the whole frame."""
    perfect, _ = _frame(defect=None, dose=20.0)
    faulted, _ = _frame(dose=20.0)
    (u, v), none, (p, q) = lattice_vectors(torch.cat([bragg_filter(perfect), torch.zeros_like(perfect),
                                                      bragg_filter(faulted)]))
    assert none is None  # a flat guide: no lattice
    cells = _cell(10.0, ROTATION)
    assert _matches(np.add(u, v), cells, 0.01) and _matches(np.subtract(u, v), cells, 0.01), (u, v)
    assert _matches(np.add(p, q), cells[1:], 0.01) or _matches(np.subtract(p, q), cells[1:], 0.01), (p, q)


def test_plane_averages_keep_a_planar_fault_and_average_noise_down():
    """By the RP fault, the average along the fault is close to the clean frame (dose 20), closer than the
    Bragg guide and the noisy frame; along every direction it cuts white noise."""
    x, f = _frame(dose=20.0)
    (vectors,) = lattice_vectors(bragg_filter(x))
    averages = plane_averages(x[0, 0], vectors)
    assert averages.shape == (4, 256, 256)
    err = lambda img: _fault_error(img, f)  # noqa: E731
    best = min(err(a) for a in averages.numpy())
    assert best < 0.5 * err(bragg_filter(x)[0, 0].numpy()) and best < 0.3 * err(x[0, 0].numpy())
    noise = torch.from_numpy(np.random.default_rng(2).normal(0, 0.3, (256, 256)).astype(np.float32))
    clean = torch.from_numpy(f.clean)
    left = plane_averages(clean + noise, vectors) - plane_averages(clean, vectors)
    assert float(left[:, 32:-32, 32:-32].std()) < 0.3 * float(noise.std())


def test_planar_guide_takes_the_plane_average_only_across_the_fault():
    x, f = _frame(dose=5.0)
    bragg = bragg_filter(x)
    guide = planar_guide(x)
    changed = (guide - bragg).abs()[0, 0].numpy() > 1e-6
    t = np.deg2rad(ROTATION)
    across = np.add.outer(np.arange(256) * np.sin(t), np.arange(256) * np.cos(t))  # distance along e1
    fault = f.columns[f.near_defect]
    mid = float(np.median(fault[:, 0] * np.sin(t) + fault[:, 1] * np.cos(t)))
    assert changed[np.abs(across - mid) < 5].mean() > 0.9  # the fault's band ...
    assert not changed[np.abs(across - mid) > 25].any()  # ... and nothing else
    assert _fault_error(guide[0, 0], f) < 0.7 * _fault_error(bragg[0, 0], f)  # measured 0.037 against 0.069


@pytest.mark.parametrize("dose", [5.0, 20.0, 200.0])
def test_planar_guide_is_the_bragg_guide_without_a_fault(dose):
    x, _ = _frame(defect=None, dose=dose, seed=2)
    torch.testing.assert_close(planar_guide(x), bragg_filter(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind, period, rotation_deg", [("perovskite", 12.0, 28.6), ("dumbbell", 8.0, 0.0),
                                                         ("hexagonal", 14.0, 14.3)])
def test_no_pixel_switches_on_a_fault_free_crystal_with_the_named_instrument(kind, period, rotation_deg):
    """The issue's case: a perfect crystal at dose 20 with drift and line artefacts (512²) switched 2-35 % of
    its pixels to plane averages; none now."""
    rng = np.random.default_rng(7)
    phase = scenes.Phase(kind, period, rotation_deg, (2.0, 3.0))
    scene = scenes.build_scene((512, 512), [phase], [], rng, sigma_px=0.13 * period, blur_px=0.6, drift_px=(3.0, 2.0),
                               intensity_cv=0.04)
    noisy = scenes.apply_instrument(scene.clean, rng, {**scenes.NAMED_NOISE, "dose": 20.0})
    assert not switch_mask(torch.from_numpy(noisy)[None, None]).any()


def test_the_rp_named_frame_switches_its_fault_band_only():
    noisy, scene, _ = scenes.named_frame("perovskite_rp", (512, 512), seed=20_250_005, dose=2.0)
    mask = switch_mask(torch.from_numpy(noisy)[None, None])[0, 0].numpy()
    ij = np.round(scene.columns[scene.near_defect]).astype(int)
    ij = ij[((ij >= 48) & (ij < 464)).all(1)]
    assert mask[ij[:, 0], ij[:, 1]].mean() > 0.95  # the fault's columns
    assert 0.02 < mask.mean() < 0.1  # a band, not the frame (measured 5.3 %)


def test_planar_guide_of_flat_and_small_frames_is_the_bragg_guide():
    flat = torch.full((2, 1, 256, 256), 0.3)
    torch.testing.assert_close(planar_guide(flat), bragg_filter(flat), rtol=0, atol=0)
    small, _ = _frame(size=96, dose=20.0)  # too short a profile to tell a band from chance
    torch.testing.assert_close(planar_guide(small), bragg_filter(small), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device tool's machines)")
def test_planar_guide_on_cuda_matches_the_cpu():
    x, _ = _frame(dose=5.0)
    cpu = planar_guide(x)
    assert (cpu - bragg_filter(x)).abs().max() > 0.05  # the fault's band is taken
    torch.testing.assert_close(planar_guide(x.cuda()).cpu(), cpu, rtol=0, atol=1e-3)


def test_a_series_lattice_gives_the_guide_the_frames_own_gives():
    """The planar guide from the lattice a series' plan measured on its first frame (and the Bragg spectrum
    shared with the Bragg guide) is the guide measured on a later frame's own lattice, within noise: RMS 0.002
    (the column peak is 1; 0.2 % of pixels, at the band's edges, differ by over 0.02), the same pixels switched
    to the plane average, the fault's columns as close (measured 0.041 against 0.040)."""
    from stemd.compute.fourier import bragg_spectrum

    first, _ = _frame(dose=5.0, seed=2)
    later, f = _frame(dose=5.0, seed=1)
    (vectors,) = lattice_vectors(bragg_filter(first))
    (own,) = lattice_vectors(bragg_filter(later))
    assert vectors is not None and vectors != own  # measured on different noise: not the same floats
    spectrum = bragg_spectrum(later)
    cached, cached_blend = planar.planar_blend(later, bragg_filter(later, spectrum=spectrum), vectors, spectrum)
    fresh, fresh_blend = planar.planar_blend(later)
    difference = (cached - fresh).abs()
    assert difference.square().mean().sqrt() < 0.005 and (difference > 0.02).float().mean() < 0.005
    switched, fresh_switched = cached_blend > 0, fresh_blend > 0
    assert fresh_switched.sum() > 1000  # the fault's band
    assert (switched & fresh_switched).sum() >= 0.98 * (switched | fresh_switched).sum()
    assert _fault_error(cached[0, 0], f) < 1.05 * _fault_error(fresh[0, 0], f)


def test_frames_sharing_a_lattice_are_searched_as_a_batch_as_each_alone():
    """A batch given one lattice is searched in tensor operations over the batch: each frame's guide is the one
    it gets alone (a fault-free frame beside an RP frame stays its Bragg guide)."""
    rp, _ = _frame(dose=5.0, seed=1)
    plain, _ = _frame(defect=None, dose=5.0, seed=3)
    (vectors,) = lattice_vectors(bragg_filter(rp))
    batch = planar_guide(torch.cat([rp, plain]), vectors=vectors)
    torch.testing.assert_close(batch[:1], planar_guide(rp, vectors=vectors), rtol=0, atol=1e-5)
    torch.testing.assert_close(batch[1:], bragg_filter(plain), rtol=0, atol=1e-5)
    assert (batch[:1] - bragg_filter(rp)).abs().max() > 0.05


@pytest.mark.parametrize("size", [256, 600])
def test_plane_averages_from_the_bragg_spectrum_are_those_of_a_larger_padding(size):
    """The plane averages taken from the Bragg filter's 2H x 2W transform are those from a larger zero padding,
    also where the shifts reach past the frame (256 < REACH_PX): no shift wraps into the frame. Sub-pixel Fourier
    shifts ring at the frame's edges, differently for each padding (two larger paddings differ as much): RMS
    under 1e-3 of a frame whose std is 0.2, and under 3e-3 BORDER_PX inside, where the band search looks."""
    from stemd.compute.fourier import bragg_spectrum

    x, _ = _frame(size=size, dose=20.0)
    (vectors,) = lattice_vectors(bragg_filter(x))
    geometry = planar._geometry((size, size), vectors, planar.REACH_PX, x.device)
    larger = planar._make_geometry((size, size), vectors, planar.REACH_PX, x.device, (3 * size, 3 * size + 4))
    assert geometry.size == (2 * size, 2 * size)
    shared = planar._plane_averages(x, geometry, bragg_spectrum(x))[0]
    difference = shared - planar._plane_averages(x, larger, None)[0]
    assert difference.square().mean().sqrt() < 1e-3
    assert difference[..., planar.BORDER_PX:-planar.BORDER_PX, planar.BORDER_PX:-planar.BORDER_PX].abs().max() < 3e-3


@pytest.mark.parametrize("defect", ["rp", None])
def test_the_band_search_skips_directions_without_a_band_at_no_change(monkeypatch, defect):
    """On the CPU a direction without a band skips its per-pixel blend: the guide is the one the device path (every
    direction blended, as on a GPU) gives, to the bit; a fault-free frame gets its Bragg guide back as is."""
    x, _ = _frame(defect=defect, dose=5.0)
    (vectors,) = lattice_vectors(bragg_filter(x))
    bragg = bragg_filter(x)
    skipped = planar.planar_blend(x, bragg, vectors)
    monkeypatch.setattr(hostsync, "free", lambda device: False)
    every = planar.planar_blend(x, bragg, vectors)
    torch.testing.assert_close(skipped, every, rtol=0, atol=0)
    assert (skipped[0] is bragg) == (defect is None)
    assert bool((every[1] > 0).any()) == (defect == "rp")


def test_plane_averages_are_those_of_the_whole_padded_transform():
    """One direction at a time on the transposed transform: the averages of rfft2 x kernel, irfft2 (the former
    computation), to float32 rounding."""
    x, _ = _frame(dose=20.0)
    (vectors,) = lattice_vectors(bragg_filter(x))
    geometry = planar._geometry((256, 256), vectors, planar.REACH_PX, x.device)
    mean = x.mean((-2, -1), keepdim=True)
    values = torch.fft.rfft2(x - mean, s=geometry.size)
    former = torch.fft.irfft2(values * geometry.kernels.transpose(-2, -1), s=geometry.size)[..., :256, :256]
    torch.testing.assert_close(planar._plane_averages(x, geometry, None)[0], former / geometry.fraction + mean,
                               rtol=0, atol=1e-6)


def test_a_plan_searches_only_the_directions_its_frame_has_a_fault_along():
    """`fault_directions` on a series' first frame finds the RP fault's direction and none on a fault-free frame;
    a later frame searched only along those gets the guide a search of all four gives, to the bit, and a series
    without a fault its Bragg guide with no plane average taken."""
    first, _ = _frame(dose=5.0, seed=2)
    later, _ = _frame(dose=5.0, seed=1)
    plain, _ = _frame(defect=None, dose=5.0, seed=3)
    (vectors,) = lattice_vectors(bragg_filter(first))
    faults = planar.fault_directions(first, bragg_filter(first), vectors)
    assert len(faults) == 1
    assert planar.fault_directions(plain, bragg_filter(plain), vectors) == ()
    bragg = bragg_filter(later)
    only, only_blend = planar.planar_blend(later, bragg, vectors, directions=faults)
    every, every_blend = planar.planar_blend(later, bragg, vectors)
    torch.testing.assert_close(only, every, rtol=0, atol=0)
    assert bool((only_blend > 0).any())
    others = tuple(c for c in range(4) if c not in faults)
    assert not bool((planar.planar_blend(later, bragg, vectors, directions=others)[1] > 0).any())
    torch.testing.assert_close(planar.planar_guide(plain, bragg_filter(plain), vectors, directions=()),
                               bragg_filter(plain), rtol=0, atol=0)
