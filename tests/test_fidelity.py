"""stemd.compute.fidelity and the daemon's FidelityMonitor: the split, the gain/offset fit, the held-out
estimate against the truth, the residual check, the running estimate, and the flag of a wrong model."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, gaussian_filter

from stemd.compute import fidelity as fid
from stemd.config import FidelitySettings
from stemd.live.fidelity_monitor import FidelityMonitor, check_frame, detector_fit, reference_frame
from stemd.models.checkpoint import PAPER_AE_PATH
from stemd.pipeline import Denoiser
from stemd.sim.scenes import Phase, build_scene, named_frame

Z = 5.0  # tolerances below are Z standard errors, each derived from the number of pixels


def scene(kind: str, size: int, seed: int = 1) -> np.ndarray:
    """A named scene's clean frame (peak 1), or a perovskite lattice of 25 px period ("lattice25")."""
    if kind == "lattice25":
        rng = np.random.default_rng(seed)
        return build_scene((size, size), [Phase("perovskite", 25.0, 5.0, (3.0, 7.0))], [], rng,
                           sigma_px=3.25, blur_px=0.6).clean.astype(np.float64)
    return named_frame(kind, (size, size), seed=seed)[1].clean.astype(np.float64)


def detector_frame(mean_counts: np.ndarray, gain: float, offset: float, seed: int) -> np.ndarray:
    """Poisson counts of `mean_counts` through a detector (raw = gain * counts + offset), uint16."""
    counts = np.random.default_rng(seed).poisson(mean_counts)
    return np.clip(np.rint(gain * counts + offset), 0, 65535).astype(np.uint16)


# ---------------------------------------------------------------- the split


def test_split_halves_are_independent_poisson_with_half_the_mean():
    rng = np.random.default_rng(0)
    lam = 2 + 30 * rng.random((300, 300))  # a varying Poisson mean
    y = rng.poisson(lam)
    y1, y2 = fid.thin(y, np.random.default_rng(1))
    assert (y1 + y2 == y).all() and (y1 >= 0).all() and (y2 >= 0).all()
    n, half = lam.size, lam / 2
    for yk in (y1, y2):
        d = (yk - half).ravel()
        assert abs(d.mean()) < Z * math.sqrt(half.mean() / n)  # mean λ/2
        # Poisson: the variance equals the mean; var(d²) = μ4 - σ⁴ = λ + 2λ² for Poisson
        assert abs(np.mean(d**2) - half.mean()) < Z * math.sqrt(np.mean(half + 2 * half**2) / n)
        # and its third central moment too (λ): a Gaussian or a binomial of another p would miss it
        assert abs(np.mean(d**3) - half.mean()) < Z * math.sqrt(np.mean(15 * half**3 + 24 * half**2 + half) / n)
    d1, d2 = (y1 - half).ravel(), (y2 - half).ravel()
    r = np.corrcoef(d1, d2)[0, 1]
    assert abs(r) < Z / math.sqrt(n)  # independent
    naive = y // 2  # a deterministic split: correlated halves, which the same check catches
    assert np.corrcoef((naive - half).ravel(), (y - naive - half).ravel())[0, 1] > Z / math.sqrt(n)


@pytest.mark.parametrize(("kind", "gain", "offset"), [("perovskite_rp", 40.0, 500.0), ("interface", 7.0, 2000.0)])
def test_gain_offset_fit_recovers_the_detector(kind, gain, offset):
    raw = detector_frame(60 * scene(kind, 256, 3), gain, offset, seed=3)
    fit = fid.fit_gain_offset(raw, 65535)
    assert fit.gain == pytest.approx(gain, rel=0.06)
    assert fit.offset == pytest.approx(offset, rel=0.03)
    counts = fid.to_counts(raw, fit)
    assert counts.dtype == np.int64 and counts.min() >= 0


@pytest.mark.parametrize("dose", [20.0, 200.0])
def test_a_frame_half_vacuum_fits_the_gain_of_its_specimen(dose):
    """Vacuum blocks (read noise only, their means spread by line offsets) fit a flat line of their own; they
    must not outweigh the specimen's blocks, whose variance grows with the counts (the gain is 1 / dose)."""
    noisy, _, _ = named_frame("vacuum_edge", (192, 192), dose=dose)
    assert fid.fit_gain_offset(noisy, None).gain == pytest.approx(1 / dose, rel=0.2)


def test_saturated_pixels_stay_out_of_the_fit():
    raw = detector_frame(60 * scene("perovskite_rp", 256, 3), 40.0, 500.0, seed=3)
    hot = raw.copy()
    hot[100:140, 100:140] = 65535
    fit, clean_fit = fid.fit_gain_offset(hot, 65535), fid.fit_gain_offset(raw, 65535)
    assert fit.saturated == 1600 and clean_fit.saturated == 0
    assert fit.gain == pytest.approx(clean_fit.gain, rel=0.05)


def test_a_frame_without_counting_noise_is_refused():
    with pytest.raises(ValueError, match="gain fit"):
        fid.fit_gain_offset(np.full((64, 64), 100.0))


def test_filters_match_scipy():
    x = np.random.default_rng(2).poisson(20.0, (60, 75)).astype(np.float64)
    for sigma in fid.REFERENCE_SIGMAS:
        np.testing.assert_allclose(fid.gaussian(x, sigma), gaussian_filter(x, sigma), atol=1e-10)
    mask = np.random.default_rng(3).random((50, 40)) > 0.98
    for size in (3, 5):
        assert (fid.dilate(mask, size) == binary_dilation(mask, np.ones((size, size), bool))).all()


# ---------------------------------------------------------------- the held-out estimate


def _tolerance_db(mu: np.ndarray, f: np.ndarray) -> float:
    """Z standard errors, in dB, of the estimated gain of `f` over the raw half (true mean `mu` per pixel).

    With centred half noises n1, n2 (independent Poisson), the estimated error of f, MSE(f, y2) - MSE(y1, y2) / 2,
    misses the true one by the mean over N pixels of (n2² - n1²) / 2 + n1 n2 - 2 (f - μ) n2, whose per-pixel
    variance is (μ + 2μ²) / 2 + μ² + 4 (f - μ)² μ (the Poisson fourth moment); the raw half's estimated error
    MSE(y1, y2) / 2 misses mean(n1²) by (n2² - n1²) / 2 - n1 n2, of variance (μ + 2μ²) / 2 + μ²."""
    n = mu.size
    model_err, noise = float(np.mean((f - mu) ** 2)), float(mu.mean())
    se_model = math.sqrt(np.mean(0.5 * mu + 2 * mu**2 + 4 * (f - mu) ** 2 * mu) / n) / model_err
    se_noise = math.sqrt(np.mean(0.5 * mu + 2 * mu**2) / n) / noise
    return 10 / math.log(10) * Z * math.hypot(se_model, se_noise)


@pytest.mark.parametrize("dose", [2.0, 8.0, 32.0])
def test_estimate_tracks_the_true_gain_of_a_linear_denoiser(dose):
    x = dose * (0.1 + scene("perovskite_rp", 192))
    y = np.random.default_rng(4).poisson(x)
    y1, y2 = fid.thin(y, np.random.default_rng(5))
    mask = np.ones(x.shape, bool)
    for sigma in (0.75, 1.5):
        f = fid.gaussian(y1.astype(np.float64), sigma)
        scores, ref = fid.held_out(y1, y2, f, mask)
        mu = x / 2
        true = 10 * math.log10(np.mean((y1 - mu) ** 2) / np.mean((f - mu) ** 2))
        assert scores.gain_db == pytest.approx(true, abs=_tolerance_db(mu, f))
        assert scores.held_out_db < fid.CEILING_DB  # the plain held-out gain is bounded by a perfect denoiser's
        true_ref = 10 * math.log10(np.mean((ref - mu) ** 2) / np.mean((f - mu) ** 2))
        assert scores.over_reference_db == pytest.approx(true_ref, abs=2 * _tolerance_db(mu, f))
        assert scores.sigma in fid.REFERENCE_SIGMAS


@pytest.fixture(scope="module")
def conv(one_torch_thread_module):
    return Denoiser.load(device="cpu")


@pytest.fixture(scope="module")
def one_torch_thread_module():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dose", [4.0, 30.0])
def test_daemon_check_tracks_the_models_true_gain(conv, dose):
    """check_frame (what the daemon runs) with the detector's gain/offset in the header: the model's estimated
    gain at half dose matches its true one on the same split, within the sample-size tolerance."""
    gain, offset = 20.0, 300.0
    x = dose * (0.1 + scene("interface", 160))
    raw = detector_frame(x, gain, offset, seed=6)
    plan = conv.plan(raw.shape, None, raw)
    out = conv(raw, plan=plan)
    check = check_frame(conv, raw, out, plan, {"series_id": "s", "frame_id": 3, "gain": gain, "offset": offset},
                        np.random.default_rng(7))
    assert check.detector == "header" and check.fit.gain == gain
    y1, _ = fid.thin(fid.to_counts(raw, check.fit), np.random.default_rng(7))  # the same split
    f1 = conv(y1.astype(np.float32), plan=plan).astype(np.float64)
    mu = x / 2
    true = 10 * math.log10(np.mean((y1 - mu) ** 2) / np.mean((f1 - mu) ** 2))
    assert check.scores.gain_db == pytest.approx(true, abs=_tolerance_db(mu, f1))
    assert check.scores.over_reference_db > 0 and check.residual is not None and check.residual < 1.5


def test_header_gain_offset_need_both_and_a_positive_gain():
    raw = detector_frame(50 * scene("perovskite_rp", 128), 10.0, 100.0, seed=1)
    assert detector_fit({"gain": 10.0, "offset": 100.0}, raw, 65535)[1] == "header"
    for header in ({"gain": 10.0}, {"gain": 0.0, "offset": 1.0}, {"gain": "10", "offset": 1.0},
                   {"gain": math.nan, "offset": 1.0}, {"gain": True, "offset": 1.0}):
        assert detector_fit(header, raw, 65535)[1] == "fit"


# ---------------------------------------------------------------- the residual check


def _split_noise(counts: np.ndarray) -> np.ndarray:
    y1, y2 = fid.thin(counts, np.random.default_rng(9))
    return (y1 - y2).astype(np.float64)


def test_residual_check_passes_the_truth_and_flags_removed_or_invented_lattice():
    dose = 20.0
    x = dose * (0.1 + scene("perovskite_rp", 192))
    y = np.random.default_rng(8).poisson(x)
    noise = _split_noise(y)
    truth = fid.residual_ratio(y, x, noise)
    assert truth is not None and abs(truth - 1) < 0.5  # an oracle leaves exactly noise
    removed = fid.residual_ratio(y, fid.gaussian(y.astype(np.float64), 4.0), noise)  # lattice blurred away
    assert removed is not None and removed > 3
    yy, xx = np.mgrid[:192, :192]
    fake = 0.3 * dose * np.cos(2 * np.pi * (yy + 0.4 * xx) / 17.0)  # a lattice the specimen does not have
    invented = fid.residual_ratio(y, x + fake, noise)
    assert invented is not None and invented > 3
    flat = np.full((192, 192), 0.3 * dose)  # amorphous / vacuum: a lattice invented on nothing
    yf = np.random.default_rng(10).poisson(flat)
    on_nothing = fid.residual_ratio(yf, flat + fake, _split_noise(yf))
    assert on_nothing is not None and on_nothing > 3
    honest = fid.residual_ratio(yf, flat, _split_noise(yf))
    assert honest is None or honest < 1.5


def test_running_estimate_is_bounded_mean_and_spread():
    r = fid.Running(3)
    assert r.estimate() is None
    r.add(1.0)
    assert r.estimate() == fid.Estimate(1.0, 0.0, 1)
    for v in (2.0, 3.0, 4.0, math.nan):
        r.add(v)
    e = r.estimate()
    assert e is not None and e.n == 3 and e.mean == pytest.approx(3.0) and e.spread == pytest.approx(1.0)


# ---------------------------------------------------------------- the monitor


def test_wrong_model_is_flagged_and_warned_once(caplog):
    """The paper AE (trained on a 10 px lattice) run as is on a 25 px lattice: worse than the reference and
    lattice in its residual; the shipped conv model on the same frames is not flagged."""
    x = 20.0 * (0.1 + scene("lattice25", 128))
    ae = Denoiser.load(PAPER_AE_PATH, device="cpu", sampling="off", calibrate=False)
    good = Denoiser.load(device="cpu")
    flagged = {}
    for name, den in (("ae", ae), ("conv", good)):
        mon = FidelityMonitor(FidelitySettings())
        with caplog.at_level(logging.WARNING, logger="stemd.live.fidelity_monitor"):
            caplog.clear()
            for i in range(3):
                raw = detector_frame(x, 5.0, 50.0, seed=20 + i)
                plan = den.plan(raw.shape, None, raw)
                state = mon.record(check_frame(den, raw, den(raw, plan=plan), plan,
                                               {"series_id": name, "frame_id": i}, np.random.default_rng(i)))
        flagged[name] = state.flagged
        if name == "ae":
            summary = mon.summary("ae")
            assert summary["over_reference_db"] < 0 and summary["residual"] > FidelitySettings().max_residual
            assert len(state.reasons) == 2 and "FLAGGED" in mon.status()
            assert len([r for r in caplog.records if "not to be trusted" in r.getMessage()]) == 1  # rate-limited
    assert flagged == {"ae": True, "conv": False}


def test_monitor_schedules_by_every_and_by_budget_and_stays_bounded():
    raw, den = np.zeros((32, 32), np.uint16), np.zeros((32, 32), np.float32)
    plan = Denoiser.load(device="cpu").plan((32, 32))
    mon = FidelityMonitor(FidelitySettings(every=3))
    due = []
    for i in range(7):
        mon.offer({"series_id": "a", "frame_id": i}, raw, den, plan)
        taken = mon.take()
        due.append(taken is not None)
    assert due == [True, False, False, True, False, False, True]
    mon = FidelityMonitor(FidelitySettings(budget_pct=10))
    mon.offer({"series_id": "a", "frame_id": 0}, raw, den, plan)
    assert mon.take() is not None  # nothing spent yet
    mon.check_s = 0.5  # a check cost 0.5 s: the next waits for 5 s of model time
    mon.note_model_time(4.0)
    mon.offer({"series_id": "a", "frame_id": 1}, raw, den, plan)
    assert mon.pending is None
    mon.note_model_time(1.0)
    mon.offer({"series_id": "a", "frame_id": 2}, raw, den, plan)
    assert mon.pending is not None and not mon.overdue
    for i in range(8):
        mon.offer({"series_id": "a", "frame_id": 3 + i}, raw, den, plan)
    assert mon.overdue  # waited 8 frames for an idle engine
    off = FidelityMonitor(FidelitySettings(enabled=False))
    off.offer({"series_id": "a", "frame_id": 0}, raw, den, plan)
    assert off.pending is None and off.header("a", "model") == {} and off.status() == "off"


def test_frames_with_correlated_noise_are_left_out_not_judged(conv):
    """A drift-corrected frame (sub-pixel linear interpolation: correlated noise) gives no valid split: the check
    says so and the series' estimate and flag are left as they were."""
    from scipy.ndimage import shift

    raw = detector_frame(20 * (0.1 + scene("perovskite_rp", 128)), 10.0, 100.0, seed=2)
    moved = np.clip(np.rint(shift(raw.astype(np.float64), (0.3, 0.4), order=1, mode="nearest")), 0, 65535)
    mon = FidelityMonitor(FidelitySettings(min_over_reference_db=30.0))  # any valid check would flag
    for frame, valid in ((moved.astype(np.uint16), False), (raw, True)):
        plan = conv.plan(frame.shape, None, frame)
        check = check_frame(conv, frame, conv(frame, plan=plan), plan, {"series_id": "d", "frame_id": 0},
                            np.random.default_rng(0))
        assert check.valid is valid
        state = mon.record(check)
        assert state.flagged is valid and mon.summary("d")["invalid_checks"] == 1
        assert (mon.summary("d")["gain_db"] is None) is not valid


def test_reference_frame_ignores_saturated_pixels():
    raw = np.full((40, 40), 100, np.uint16)
    raw[20, 20] = 65535
    out = reference_frame(raw, 1.0)
    assert out.dtype == np.float32 and np.allclose(out, 100.0)


def test_the_pipelines_own_corrections_are_not_flagged(conv):
    """A frame with line jitter and line flicker (what `stemd simulate` sends): the line-jitter and stripe
    corrections move the lattice on purpose, so the residual is taken against the frame as the model was given
    it (`Denoiser.prepared`), and a good model is not flagged; against the raw frame it would be."""
    noisy, scene_, _ = named_frame("perovskite_rp", (192, 192), seed=4, dose=20.0, line_jitter_px=0.4,
                                   line_gain=0.05, line_offset=0.05)
    raw = np.rint(noisy * 20.0).clip(0).astype(np.uint16)
    plan = conv.plan(raw.shape, None, raw)
    out = conv(raw, plan=plan)
    check = check_frame(conv, raw, out, plan, {"series_id": "j", "frame_id": 0, "gain": 1.0, "offset": 0.0},
                        np.random.default_rng(2))
    assert check.residual is not None and check.residual < FidelitySettings().max_residual
    y1, y2 = fid.thin(raw.astype(np.int64), np.random.default_rng(2))
    against_raw = fid.residual_ratio(raw.astype(np.float64), out.astype(np.float64), (y1 - y2).astype(np.float64))
    assert against_raw is not None and against_raw > FidelitySettings().max_residual, (against_raw, check.residual)


def test_levelled_scores_ignore_line_offsets_both_halves_share():
    """Stripes in both halves (the frame's) are signal to a plain score, so removing them costs a model; levelled
    along the scan lines, a model that removes them scores as one that keeps them."""
    rng = np.random.default_rng(8)
    x = 20 * (0.2 + scene("perovskite_rp", 128))
    stripes = rng.normal(0, 2.0, 128)[None, :]  # one offset per column: lines are columns
    y1, y2 = (rng.poisson(np.clip(x / 2 + stripes / 2, 0, None)).astype(np.float64) for _ in range(2))
    mask = np.ones(x.shape, bool)
    kept, removed = gaussian_filter(y1, 1.0), gaussian_filter(y1, 1.0) - stripes / 2
    plain = [fid.held_out(y1, y2, f, mask)[0].gain_db for f in (kept, removed)]
    level = [fid.held_out(y1, y2, f, mask, level="columns")[0].gain_db for f in (kept, removed)]
    assert plain[1] < plain[0] - 0.5
    assert level[1] == pytest.approx(level[0], abs=0.05)
