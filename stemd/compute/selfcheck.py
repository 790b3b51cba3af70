"""Plan-time self-check: which way of running the model does best on a series' own first frame, by split dose.

The frame's counts (gain/offset fitted from it, `fidelity.fit_gain_offset`) are thinned into two independent
half-dose frames (`split`); each candidate denoises half A and is scored against half B (`registered_mse`: each
output line shifted and levelled onto the target's first, so scan jitter and stripes that both halves share, which
the pipeline takes out on purpose, count neither for nor against it). The blend weight of the model's output with
the frame as given to it (`BLENDS`) is chosen the same way (`best`). Pure numpy, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from stemd.compute.fidelity import (
    correlated,
    dilate,
    fit_gain_offset,
    levelled,
    mse,
    noise_flatness,
    saturated_mask,
    thin,
    to_counts,
)

MAX_SHIFT = 1.5  # px: the largest line shift the registered score allows
REG_BORDER = 2  # px at each end of a line left out of the registered score (the shift wraps there)
BLENDS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)  # the model's weight; the rest: its input
MIN_COUNTS = 2.0  # mean counts per pixel below which the gain fit is off by 10-20 % (named frames): no split
MARGIN = 0.02  # a blend must beat the model alone by more than a 2 % count overdispersion could fake (`best`)
SEED = 20_260_512  # the split is drawn from a fixed seed: one frame, one decision


def line_shifts(out: np.ndarray, target: np.ndarray, max_shift: float = MAX_SHIFT) -> np.ndarray:
    """Per line, the shift s (px, |s| <= max_shift) that moves `out`'s line onto `target`'s: the integer
    peak of their circular cross-correlation refined by a parabola."""
    o = out - out.mean(1, keepdims=True)
    t = target - target.mean(1, keepdims=True)
    spec = np.fft.rfft(t, axis=1) * np.conj(np.fft.rfft(o, axis=1))
    cc = np.fft.irfft(spec, n=o.shape[1], axis=1)  # cc[s] = Σ_x t(x) o(x - s), circular
    k = int(np.ceil(max_shift))
    lags = np.arange(-k - 1, k + 2)
    c = cc[:, lags % o.shape[1]]
    inner = c[:, 1:-1]
    peak = np.argmax(inner, 1) + 1
    rows = np.arange(c.shape[0])
    left, mid, right = c[rows, peak - 1], c[rows, peak], c[rows, peak + 1]
    denom = left - 2 * mid + right
    frac = np.where(denom < 0, 0.5 * (left - right) / np.where(denom < 0, denom, -1.0), 0.0)
    shifts: np.ndarray = np.clip(lags[peak] + np.clip(frac, -0.5, 0.5), -max_shift, max_shift)
    return shifts


def shift_lines(image: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Each line moved by its shift (px, positive: to larger x), in Fourier: the noise power is kept (linear
    interpolation would average neighbours and flatter a noisy line)."""
    w = image.shape[1]
    k = np.fft.rfftfreq(w)
    spec = np.fft.rfft(image, axis=1) * np.exp(-2j * np.pi * k[None, :] * shifts[:, None])
    return np.fft.irfft(spec, n=w, axis=1)


def registered_mse(out: np.ndarray, target: np.ndarray, mask: np.ndarray, lines: str = "rows") -> float:
    """`mse` after each scan line of `out` (rows, or columns) is shifted (`line_shifts`) and levelled (given the
    offset that fits it) onto `target`'s, line ends left out: scan jitter and stripes that both halves share
    are not counted as signal."""
    out, target = np.asarray(out, np.float64), np.asarray(target, np.float64)
    if lines == "columns":
        out, target, mask = out.T, target.T, mask.T
    moved = shift_lines(out, line_shifts(out, target))
    inner = mask.copy()
    inner[:, :REG_BORDER] = inner[:, -REG_BORDER:] = False
    return mse(levelled(moved, target, inner), target, inner)


@dataclass(frozen=True)
class Split:
    """Two independent half-dose frames of one frame's counts, and the pixels to score (not saturated)."""

    a: np.ndarray  # float64 counts
    b: np.ndarray
    mask: np.ndarray


def split(raw: np.ndarray, saturation: float | None = None, seed: int = SEED) -> Split | None:
    """The frame's counts thinned into two halves, or None where a split would not rank candidates: the gain fit
    fails (the noise does not grow with the signal) or is unreliable (under MIN_COUNTS per pixel), or the noise is
    correlated (processed or resampled data)."""
    x = np.asarray(raw, np.float64)
    bad = saturated_mask(x, saturation)
    if correlated(noise_flatness(np.where(bad, np.median(x), x))):
        return None
    try:
        fit = fit_gain_offset(x, saturation)
    except ValueError:
        return None
    counts = to_counts(x, fit)
    if counts[~bad].mean() < MIN_COUNTS:
        return None
    a, b = thin(counts, np.random.default_rng(seed))
    return Split(a.astype(np.float64), b.astype(np.float64), ~dilate(bad, 3))


def best(candidates: Mapping[str, tuple[np.ndarray, np.ndarray]], half: Split, lines: str = "rows",
         blends: tuple[float, ...] = BLENDS, margin: float = MARGIN,
         ) -> tuple[str, float, dict[tuple[str, float], float]]:
    """(candidate, blend weight, every score) of `candidates` {key: (output for half a, the frame as the model
    was given it)} and blends w * output + (1 - w) * given: the lowest registered held-out error against half b,
    each blend charged (1 - w) * margin * the noise variance of a half. Counts whose variance exceeds their mean
    (a gain fitted low, a detector's gain spread) correlate the halves, which favours the input: the charge is
    what a relative excess of `margin` could fake."""
    noise = mse(half.a, half.b, half.mask) / 2
    errors = {(key, w): registered_mse(w * out + (1 - w) * given, half.b, half.mask, lines)
              + (1 - w) * margin * noise
              for key, (out, given) in candidates.items() for w in blends}
    key, w = min(errors, key=lambda k: errors[k])
    return key, w, errors
