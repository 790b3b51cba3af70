"""Fidelity without ground truth: split-dose scores of a denoiser on the very frame it denoises.

A detector frame is `raw = gain * counts + offset` with Poisson `counts`; `fit_gain_offset` finds gain and
offset from the frame itself. Binomial thinning of the counts, y1 ~ Binomial(y, 1/2), y2 = y - y1 (`thin`),
gives two independent Poisson half-dose frames, so E|f(y1) - y2|^2 = E|f(y1) - x/2|^2 + var(y2): the error of a
denoised half against the other half is its true error plus a known noise term (`held_out`). The reference is
a Gaussian filter whose sigma is chosen on the same split (`gaussian_held_out`). `residual_ratio` is the power
of raw - denoised in the frame's Bragg band over that of a pure-noise frame (y1 - y2): > 1 where lattice was
removed or invented. `Running` keeps a series' last checks. Pure numpy/torch, no I/O.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stemd.compute.fourier import bragg_gain, bragg_spectrum

A4 = np.array([1.0, -4.0, 6.0, -4.0, 1.0])  # 4th difference: kills smooth signal, passes noise near Nyquist
A4_UNIT = A4 / math.sqrt(float(A4 @ A4))  # HIGH_PASS = outer(A4_UNIT, A4_UNIT): unit noise gain, sum of squares 1
HIGH_PASS = np.outer(A4_UNIT, A4_UNIT)
REFERENCE_SIGMAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)  # px: the Gaussian reference picks one per split
CEILING_DB = 10 * math.log10(2.0)  # held-out gain of a perfect denoiser over the raw half
MAX_GAIN_DB = 30.0  # estimated true gains are capped here (the error estimate floored at 1e-3 of the noise)
HF_BAND, MF_BAND = (0.4, 0.5), (0.2, 0.3)  # cycles/px: where the noise-flatness ratio is measured
VAR_FLOOR = 0.05  # bins' variance floored at this x the 90th percentile's in the fit's weights (`fit_gain_offset`)
FLAT_LIMITS = (0.8, 1.25)  # a white-noise frame's HF/MF power ratio lies inside; outside: correlated noise


# ---------------------------------------------------------------- separable filters (scipy.ndimage's "reflect")


def correlate1d(image: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """`image` correlated with odd-length `weights` along `axis`, edges mirrored about the border (abc|cba:
    scipy.ndimage's mode "reflect"), float64."""
    x = np.moveaxis(np.asarray(image, np.float64), axis, 0)
    r = len(weights) // 2
    xp = np.pad(x, [(r, r)] + [(0, 0)] * (x.ndim - 1), mode="symmetric")
    n = x.shape[0]
    out = np.zeros_like(x)
    for k, wk in enumerate(weights):
        out += wk * xp[k:k + n]
    return np.moveaxis(out, 0, axis)


def gaussian(image: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Gaussian filter of std `sigma` px (radius round(truncate * sigma)), edges mirrored: scipy's
    gaussian_filter with its defaults."""
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w /= w.sum()
    return correlate1d(correlate1d(image, w, 0), w, 1)


def dilate(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary dilation of a 2D mask by a size x size square."""
    r = size // 2
    out = np.asarray(mask, bool)
    for axis in (0, 1):
        x = np.moveaxis(out, axis, 0)
        padded = np.pad(x, [(r, r), (0, 0)])
        out = np.moveaxis(np.logical_or.reduce([padded[k:k + x.shape[0]] for k in range(size)]), 0, axis)
    return out


# ---------------------------------------------------------------- detector model and splitting


@dataclass(frozen=True)
class GainFit:
    """raw ≈ gain * counts + offset; `offset` is the effective one (read noise folded in as extra counts)."""

    gain: float
    offset: float
    blocks: int  # blocks that entered the fit (0: given, not fitted)
    saturated: int  # pixels at the detector maximum


def saturated_mask(raw: np.ndarray, saturation: float | None) -> np.ndarray:
    """Pixels at or above the detector maximum (none when `saturation` is None)."""
    return np.zeros(np.shape(raw), bool) if saturation is None else np.asarray(raw) >= saturation


def noise_residual(raw: np.ndarray) -> np.ndarray:
    """High-pass residual with unit noise gain (4th differences along both axes): for white noise of
    variance v its mean square is v, while a smooth signal (probe-blurred columns) is suppressed."""
    return correlate1d(correlate1d(raw, A4_UNIT, 0), A4_UNIT, 1)


def fit_gain_offset(raw: np.ndarray, saturation: float | None = None, block: int = 4, bins: int = 24) -> GainFit:
    """Fit the Poisson-Gaussian detector line var = gain * (mean - offset) from the frame itself.

    The local noise variance (mean square of `noise_residual` over block x block pixels) against the
    local mean, averaged in `bins` quantile bins of the mean, then a weighted line fit that drops
    outlying bins (edges, defects: signal leaking into the residual). Read noise is folded into the
    offset, which makes (raw - offset) / gain counts whose variance equals their mean (what thinning
    needs). Blocks touching saturated pixels or the frame border are left out; ValueError when the
    variance does not grow with the mean (not counting noise)."""
    x = np.asarray(raw, np.float64)
    bad = dilate(saturated_mask(x, saturation), 5)
    r2 = noise_residual(x) ** 2
    sq = A4_UNIT**2
    x = correlate1d(correlate1d(x, sq, 0), sq, 1)  # the local mean r² follows: E r² = Σ K² var = gain (x_K² - offset)
    m = 2  # the residual's half support: the reflected border is not white
    x, r2, bad = x[m:-m, m:-m], r2[m:-m, m:-m], bad[m:-m, m:-m]
    h, w = (s - s % block for s in x.shape)

    def blocks(a: np.ndarray) -> np.ndarray:
        return a[:h, :w].reshape(h // block, block, w // block, block).swapaxes(1, 2).reshape(-1, block * block)

    keep = ~blocks(bad).any(1)
    mean, var = blocks(x).mean(1)[keep], blocks(r2).mean(1)[keep]
    if mean.size < 4 * bins:
        raise ValueError(f"gain fit: {mean.size} usable {block}x{block} blocks, at least {4 * bins} needed")
    edges = np.quantile(mean, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, mean, side="right") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(float)
    ok = count > 0
    bm = np.bincount(which, mean, bins)[ok] / count[ok]
    bv = np.bincount(which, var, bins)[ok] / count[ok]
    # the bin mean of var has variance ∝ var² / count; floored, so bins of vacuum (read noise and line offsets only,
    # their means spread by the offsets, not by signal) cannot outweigh the rest and flatten the line
    weight = count[ok] / np.maximum(bv, max(VAR_FLOOR * float(np.quantile(bv, 0.9)), 1e-12)) ** 2
    use = np.ones(bm.size, bool)
    slope = icpt = 0.0
    for _ in range(3):
        if use.sum() < 2:
            break
        slope, icpt = np.polyfit(bm[use], bv[use], 1, w=np.sqrt(weight[use]))
        rel = (bv - (slope * bm + icpt)) / np.maximum(slope * bm + icpt, 1e-12)
        mad = np.median(np.abs(rel[use] - np.median(rel[use]))) + 1e-12
        new = np.abs(rel - np.median(rel[use])) < 4 * 1.4826 * mad
        if new.sum() < 4 or (new == use).all():
            break
        use = new
    if not slope > 0:
        raise ValueError("gain fit: the local variance does not grow with the mean (not counting noise?)")
    return GainFit(float(slope), float(-icpt / slope), int(keep.sum()), int(saturated_mask(raw, saturation).sum()))


def to_counts(raw: np.ndarray, fit: GainFit) -> np.ndarray:
    """(raw - offset) / gain rounded and clipped to non-negative integers (int64)."""
    return np.clip(np.rint((np.asarray(raw, np.float64) - fit.offset) / fit.gain), 0, None).astype(np.int64)


def thin(counts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Binomial thinning: y1 ~ Binomial(y, 1/2), y2 = y - y1; for Poisson y, two independent half-dose frames."""
    y1 = rng.binomial(counts, 0.5)
    return y1, counts - y1


def noise_flatness(raw: np.ndarray) -> tuple[float, float]:
    """(along rows, along columns): median noise power near Nyquist over that at mid-high frequency.

    Independent pixel noise has a flat spectrum (ratios ≈ 1); interpolation (drift correction,
    resampling) or filtering removes power near Nyquist (< 1), sharpening adds it (> 1). Both
    bands stay at high frequency across the other axis, where a probe-blurred signal is weak, and
    medians ignore Bragg peaks."""
    x = np.asarray(raw, np.float64)
    power = np.abs(np.fft.fft2(x - x.mean())) ** 2
    fy, fx = (np.abs(np.fft.fftfreq(n))[:, None] if i == 0 else np.abs(np.fft.fftfreq(n))[None, :]
              for i, n in enumerate(x.shape))

    def band(f: np.ndarray, lo_hi: tuple[float, float]) -> np.ndarray:
        return (f >= lo_hi[0]) & (f <= lo_hi[1])

    across_y, across_x = band(fy, (MF_BAND[0], HF_BAND[1])), band(fx, (MF_BAND[0], HF_BAND[1]))
    rows = np.median(power[band(fx, HF_BAND) & across_y]) / np.median(power[band(fx, MF_BAND) & across_y])
    cols = np.median(power[band(fy, HF_BAND) & across_x]) / np.median(power[band(fy, MF_BAND) & across_x])
    return float(rows), float(cols)


def correlated(flatness: tuple[float, float]) -> bool:
    """True when either flatness ratio lies outside FLAT_LIMITS: the split is not a valid ranking."""
    return any(not FLAT_LIMITS[0] <= r <= FLAT_LIMITS[1] for r in flatness)


# ---------------------------------------------------------------- scores


def mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared difference over the pixels of `mask`."""
    return float(np.mean((np.asarray(a, np.float64)[mask] - np.asarray(b, np.float64)[mask]) ** 2))


def gain_db(reference_mse: float, method_mse: float) -> float:
    """10 log10(reference / method): how much a method lowers the error of the raw half."""
    return float(10 * np.log10(reference_mse / method_mse))


def levelled(out: np.ndarray, target: np.ndarray, mask: np.ndarray, lines: str = "rows") -> np.ndarray:
    """`out` with each scan line (rows, or columns) given the offset that fits it to `target`'s line over the
    pixels of `mask`: line offsets both halves share (stripes, which the pipeline takes out on purpose) are then
    not scored as error."""
    o, t, m = (np.asarray(a, np.float64) for a in (out, target, mask))
    axis = 1 if lines == "rows" else 0
    shift = ((t - o) * m).sum(axis, keepdims=True) / np.maximum(m.sum(axis, keepdims=True), 1)
    moved: np.ndarray = o + shift
    return moved


def gaussian_held_out(y1: np.ndarray, y2: np.ndarray, mask: np.ndarray,
                      sigmas: Sequence[float] = REFERENCE_SIGMAS) -> tuple[np.ndarray, float]:
    """The reference: a Gaussian filter of `y1` with the sigma of `sigmas` that has the lowest held-out error
    against y2 (a one-parameter choice on the scoring half: a slight optimism in the reference's favour)."""
    outs = {s: gaussian(y1, s) for s in sigmas}
    best = min(outs, key=lambda s: mse(outs[s], y2, mask))
    return outs[best], best


@dataclass(frozen=True)
class HeldOut:
    """One split's scores. `*_held_out_db`: the plain held-out gains (over the raw half; the ceiling is
    CEILING_DB); `gain_db`, `over_reference_db`: the estimated true gains at half dose (dB of MSE against
    the clean frame), the held-out errors less the other half's noise variance."""

    gain_db: float  # the model over the raw half
    over_reference_db: float  # the model over the Gaussian reference
    held_out_db: float  # plain: 10 log10(MSE(y1, y2) / MSE(f(y1), y2))
    reference_held_out_db: float  # plain, the reference's
    sigma: float  # the reference's sigma
    noise: float  # the per-pixel noise variance of a half, MSE(y1, y2) / 2


def held_out(y1: np.ndarray, y2: np.ndarray, denoised1: np.ndarray, mask: np.ndarray,
             sigmas: Sequence[float] = REFERENCE_SIGMAS, level: str | None = None) -> tuple[HeldOut, np.ndarray]:
    """Score `denoised1` (the model's output for half `y1`, in counts) against half `y2`, and the Gaussian
    reference likewise; returns the scores and the reference's output. The noise variance of a half is
    MSE(y1, y2) / 2 (independent halves of equal variance), so E MSE(f, y2) - noise = MSE(f, x/2). With `level`
    ("rows" or "columns": the scan lines) every estimate is `levelled` onto y2 first."""
    ref, sigma = gaussian_held_out(y1, y2, mask, sigmas)

    def err(estimate: np.ndarray) -> float:
        return mse(estimate if level is None else levelled(estimate, y2, mask, level), y2, mask)

    raw_err, model_err, ref_err = err(y1), err(denoised1), err(ref)
    noise = raw_err / 2
    floor = noise * 10 ** (-MAX_GAIN_DB / 10)
    model_true, ref_true = max(model_err - noise, floor), max(ref_err - noise, floor)
    scores = HeldOut(gain_db(noise, model_true), gain_db(ref_true, model_true), gain_db(raw_err, model_err),
                     gain_db(raw_err, ref_err), sigma, noise)
    return scores, ref


def residual_ratio(counts: np.ndarray, denoised: np.ndarray, noise: np.ndarray, mask: np.ndarray | None = None,
                   ) -> float | None:
    """Bragg-band power of counts - denoised over that of `noise` (a pure-noise frame with the frame's noise:
    y1 - y2), all in counts; the band is where the Bragg filter (`fourier.bragg_gain`) passes the frame's lattice
    or that of denoised + noise (the denoised frame over the frame's own noise floor). ~1: the residual is noise;
    < 1: the lattice kept with its noise; > 1: lattice removed, or invented (then it is in the band through the
    denoised frame). None without a band. Pixels off `mask` (saturated) count as 0 in the residual and noise."""
    stack = np.stack([counts, denoised + noise, counts - denoised, noise]).astype(np.float64)
    if mask is not None:
        stack[2:, ~mask] = 0.0
    x = torch.from_numpy(stack)[:, None]
    h, w = counts.shape
    spectra = torch.fft.rfft2(x[2:] - x[2:].mean((-2, -1), keepdim=True), s=(2 * h, 2 * w))
    band = (bragg_gain(bragg_spectrum(x[:2])) > 0).any(0)
    band[..., 0, 0] = False
    if not bool(band.any()):
        return None
    power = spectra.abs().square()[:, band].sum(-1)
    return float(power[0] / power[1].clamp_min(torch.finfo(power.dtype).tiny))


# ---------------------------------------------------------------- running estimate


@dataclass(frozen=True)
class Estimate:
    """mean ± spread (sample std; 0 from one value) of the last `n` values."""

    mean: float
    spread: float
    n: int


class Running:
    """The last `window` values of one figure (bounded); `estimate()` is None until one is added."""

    def __init__(self, window: int) -> None:
        self.values: collections.deque[float] = collections.deque(maxlen=window)

    def add(self, value: float) -> None:
        if math.isfinite(value):
            self.values.append(float(value))

    def estimate(self) -> Estimate | None:
        if not self.values:
            return None
        v = np.asarray(self.values)
        return Estimate(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size))
