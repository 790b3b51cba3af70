"""The plan-time self-check's split and choice (stemd.compute.selfcheck)."""

import numpy as np
from scipy.ndimage import gaussian_filter

from stemd.compute import fidelity, selfcheck
from stemd.compute.fidelity import gaussian


def _scene(shape=(256, 256), period=16.0) -> np.ndarray:
    """A smooth lattice of mean about 1 (columns on a background), float64."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    return 0.4 + (np.cos(2 * np.pi * yy / period) * np.cos(2 * np.pi * xx / period) + 1) ** 2 / 2


def _raw(counts_scale: float, seed=0, gain=40.0, offset=500.0) -> tuple[np.ndarray, np.ndarray]:
    """(a detector frame, its mean in counts): Poisson counts of the scene times `counts_scale`, through gain/offset."""
    mean = _scene() * counts_scale
    counts = np.random.default_rng(seed).poisson(mean)
    return (gain * counts + offset).astype(np.uint16), mean


def test_split_gives_two_half_dose_frames_of_the_counts():
    raw, mean = _raw(40.0)
    half = selfcheck.split(raw, 65535)
    assert half is not None and half.mask.all()
    assert abs(half.a.mean() / (mean.mean() / 2) - 1) < 0.08 and abs(half.b.mean() / (mean.mean() / 2) - 1) < 0.08
    noise = half.a - half.b
    assert abs(np.corrcoef(noise[:, 1:].ravel(), noise[:, :-1].ravel())[0, 1]) < 0.03


def test_split_refuses_frames_it_cannot_rank_on():
    assert selfcheck.split(_raw(0.5)[0]) is None  # under MIN_COUNTS per pixel: the gain fit is unreliable
    blurred = gaussian(_raw(40.0)[0].astype(np.float64), 1.0)  # processed data: correlated noise
    assert selfcheck.split(blurred) is None
    assert selfcheck.split(_raw(40.0)[0]) is not None


def test_best_rejects_a_wrong_candidate_and_keeps_a_good_output_alone():
    raw, mean = _raw(40.0)
    half = selfcheck.split(raw)
    assert half is not None
    truth = mean / 2
    wrong = np.roll(truth, 8, axis=1)  # a lattice moved half a period: clearly worse than the input
    key, blend, errors = selfcheck.best({"good": (truth, half.a), "wrong": (wrong, half.a)}, half)
    assert key == "good" and blend == 1.0
    assert errors[("wrong", 1.0)] > errors[("good", 1.0)]


def test_best_blends_in_the_input_where_the_output_lost_detail():
    raw, mean = _raw(200.0)
    half = selfcheck.split(raw)
    assert half is not None
    flat = np.full_like(half.a, half.a.mean())  # an output that kept nothing of the lattice
    _, blend, errors = selfcheck.best({"flat": (flat, half.a)}, half)
    assert blend == min(selfcheck.BLENDS) and errors[("flat", blend)] < errors[("flat", 1.0)]


def test_line_registration_undoes_known_line_shifts():
    rng = np.random.default_rng(5)
    target = gaussian_filter(rng.standard_normal((64, 256)), (0, 2.0))
    shifts = rng.uniform(-1.2, 1.2, 64)
    moved = selfcheck.shift_lines(target, shifts)
    found = selfcheck.line_shifts(moved, target)
    assert np.abs(found + shifts).max() < 0.1
    mask = np.ones(target.shape, bool)
    assert selfcheck.registered_mse(moved, target, mask) < 0.01 * fidelity.mse(moved, target, mask)


def test_line_registration_levels_stripes_along_the_scan_axis():
    """Stripes both halves share (a column offset each, when the lines are columns) are not scored as error,
    and only along the axis the lines run."""
    rng = np.random.default_rng(3)
    image = gaussian_filter(rng.normal(size=(64, 80)), 2.0)
    striped = image + rng.normal(0, 0.5, 80)[None, :]
    mask = np.ones(image.shape, bool)
    assert selfcheck.registered_mse(image, striped, mask, "columns") < 1e-3 * fidelity.mse(image, striped, mask)
    assert selfcheck.registered_mse(image, striped, mask, "rows") > 0.5 * fidelity.mse(image, striped, mask)
