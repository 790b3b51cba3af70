"""Synthetic SrTiO3-like HAADF data: clean lattices of Gaussians and the noise models.

Pure numpy, no I/O. Geometry, noise formulas and the SNR definition are in docs/noise.md.

Conventions: pixel (r, c) has its centre at (y, x) = (r, c); positions are (y, x) in pixels.
A lattice rotated by theta has basis vectors e1 = (sin t, cos t) and e2 = (cos t, -sin t) in
(y, x), so theta = atan2(dy, dx) of the Sr-Sr bond that is horizontal at theta = 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np

PAPER_WINDOW = 28
PAPER_PERIOD_PX = 10.0  # Sr-Sr distance in pixels of the training lattice
PAPER_SIGMA_PX = 1.5
PAPER_INTENSITIES = (1.0, 0.7)  # Sr, TiO columns relative to the image maximum
RP_GAP = 0.67  # rock-salt SrO-SrO plane spacing in Sr-Sr periods (Sr2TiO4: 2.62 A / 3.905 A)
NOISE_KINDS = ("uniform", "poisson", "gaussian", "none")


@dataclass(frozen=True)
class NoiseSpec:
    """How a clean image (max 1.0) is corrupted; applied in this order by `corrupt`:

    1. line jitter: row r of the clean image is shifted right by s_r ~ N(0, line_jitter_px),
       out[r, c] = clean[r, c - s_r] by linear interpolation (edge values repeated);
    2. line gain: row r is multiplied by (1 + g_r), g_r ~ N(0, line_gain);
    3. counting noise `kind`, with S = the lattice's signal std (`lattice_std`):
       uniform:  x + U(-A, A),  A = sqrt(3) * S / snr   (noise std = S / snr);
       gaussian: x + N(0, S / snr);
       poisson:  Poisson(dose * (max(x, 0) + background)) / dose - background;
       none:     x;
    4. line offset: row r gets + o_r, o_r ~ N(0, line_offset);
    5. read noise: every pixel gets + N(0, read_sigma).
    `dose` is the expected count at the brightest column peak (clean value 1.0); `background`
    is a flat signal under the lattice in the same units (counted, then subtracted again).
    """

    kind: Literal["uniform", "poisson", "gaussian", "none"] = "uniform"
    snr: float = 0.33
    dose: float = 50.0
    read_sigma: float = 0.0
    line_jitter_px: float = 0.0
    line_gain: float = 0.0
    line_offset: float = 0.0
    background: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"kind: unknown noise kind {self.kind!r}; expected one of {NOISE_KINDS}")
        for name in ("snr", "dose"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
        for name in ("read_sigma", "line_jitter_px", "line_gain", "line_offset", "background"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")

    @classmethod
    def from_settings(cls, settings: Any) -> NoiseSpec:
        """The spec for a `stemd.config.NoiseSettings` (or any object with these attributes)."""
        names = [f.name for f in fields(cls)]
        return cls(**{n: getattr(settings, n) for n in names if hasattr(settings, n)})


@dataclass(frozen=True)
class SimFrame:
    """A clean full frame and its ground truth."""

    clean: np.ndarray  # (H, W) float32, brightest column peak = 1.0
    columns: np.ndarray  # (N, 2) float64 (y, x) pixel positions of every column in the frame
    intensities: np.ndarray  # (N,) float64 column peak heights (1.0 Sr, 0.7 TiO, ...)
    near_defect: np.ndarray  # (N,) bool, True for columns within ~one period of a defect


def _check_lattice(period_px: float, sigma_px: float) -> None:
    if not (math.isfinite(period_px) and period_px > 0):
        raise ValueError(f"period_px: must be a finite number > 0, got {period_px!r}")
    if not (math.isfinite(sigma_px) and sigma_px > 0):
        raise ValueError(f"sigma_px: must be a finite number > 0, got {sigma_px!r}")


def _comb_terms(period_px: float, sigma_px: float) -> range:
    """Site offsets k whose Gaussians matter for a fractional coordinate f in [0, 1)."""
    k = max(0, math.ceil(6.0 * sigma_px / period_px) - 1)
    return range(-k, k + 2)


def _comb(u: np.ndarray, period_px: float, sigma_px: float) -> np.ndarray:
    """Periodic 1D Gaussian comb sum_k exp(-(a (u - k))^2 / 2 s^2), u in lattice units."""
    f = u - np.floor(u)
    c = np.asarray(-0.5 * (period_px / sigma_px) ** 2, dtype=u.dtype)
    out: np.ndarray = np.zeros_like(f)
    for k in _comb_terms(period_px, sigma_px):
        d = f - np.asarray(k, dtype=u.dtype)
        out += np.exp(c * d * d)
    return out


@functools.lru_cache(maxsize=64)
def _amplitudes(period_px: float, sigma_px: float) -> tuple[float, float]:
    """Gaussian amplitudes that make the infinite lattice peak exactly at 1.0 (Sr) and 0.7 (TiO)."""
    p0, ph = (float(_comb(np.array([v]), period_px, sigma_px)[0]) for v in (0.0, 0.5))
    m = np.array([[p0 * p0, ph * ph], [ph * ph, p0 * p0]])
    a_sr, a_ti = np.linalg.solve(m, np.array(PAPER_INTENSITIES))
    return float(a_sr), float(a_ti)


@functools.lru_cache(maxsize=64)
def lattice_std(period_px: float = PAPER_PERIOD_PX, sigma_px: float = PAPER_SIGMA_PX) -> float:
    """Standard deviation of the infinite clean lattice image: the 'signal' of the SNR."""
    _check_lattice(period_px, sigma_px)
    a_sr, a_ti = _amplitudes(period_px, sigma_px)
    u = (np.arange(4096) + 0.5) / 4096
    p, q = _comb(u, period_px, sigma_px), _comb(u - 0.5, period_px, sigma_px)
    mean = (a_sr + a_ti) * p.mean() ** 2
    mean_sq = a_sr**2 * (p * p).mean() ** 2 + 2 * a_sr * a_ti * (p * q).mean() ** 2 + a_ti**2 * (q * q).mean() ** 2
    return float(math.sqrt(mean_sq - mean * mean))


_TABLE_BITS = 16  # comb lookup table of 65536 samples per unit cell: max error ~1e-4 * a/sigma


@functools.lru_cache(maxsize=16)
def _comb_table(period_px: float, sigma_px: float) -> np.ndarray:
    """The comb C(u) sampled at u = k / 2**_TABLE_BITS over one period, float32."""
    n = 1 << _TABLE_BITS
    return _comb(np.arange(n, dtype=np.float64) / n, period_px, sigma_px).astype(np.float32)


def clean_windows(
    n: int,
    rng: np.random.Generator,
    *,
    size: int = PAPER_WINDOW,
    period_px: float = PAPER_PERIOD_PX,
    sigma_px: float = PAPER_SIGMA_PX,
    max_rotation_deg: float = 45.0,
) -> np.ndarray:
    """`n` clean windows (n, size, size) float32, randomly translated and rotated.

    Translation is uniform over a unit cell, rotation uniform in [0, max_rotation_deg] about the
    window centre. Lattice coordinates are computed as fixed-point integers (2**16 per period)
    and the comb is read from a table: the image is I(p) of docs/noise.md to within ~1e-4.
    """
    if n < 0 or size < 1:
        raise ValueError(f"n must be >= 0 and size >= 1, got n={n}, size={size}")
    _check_lattice(period_px, sigma_px)
    if not (math.isfinite(max_rotation_deg) and max_rotation_deg >= 0):
        raise ValueError(f"max_rotation_deg: must be >= 0, got {max_rotation_deg!r}")
    theta = np.deg2rad(rng.uniform(0.0, max_rotation_deg, n))
    frac = rng.random((n, 2))
    one = 1 << _TABLE_BITS
    mask = np.int32(one - 1)
    d = (np.arange(size) - (size - 1) / 2) * (one / period_px)
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]
    shift = (math.ceil(size / period_px) + 2) * one + 0.5  # keeps indices positive; rounds
    # u1 = dy sin + dx cos + f1 (along e1), u2 = dy cos - dx sin + f2 (along e2), in 1/2**16 cells
    row1 = np.floor(d * sin + frac[:, :1] * one + shift).astype(np.int32)[:, :, None]
    col1 = np.floor(d * cos).astype(np.int32)[:, None, :]
    row2 = np.floor(d * cos + frac[:, 1:] * one + shift).astype(np.int32)[:, :, None]
    col2 = np.floor(d * sin).astype(np.int32)[:, None, :]
    i1 = row1 + col1
    i1 &= mask
    i2 = row2 - col2
    i2 &= mask
    table = _comb_table(float(period_px), float(sigma_px))
    a_sr, a_ti = _amplitudes(float(period_px), float(sigma_px))
    out: np.ndarray = table.take(i1)
    out *= table.take(i2)
    out *= np.float32(a_sr)
    half = np.int32(one // 2)
    i1 += half
    i1 &= mask
    i2 += half
    i2 &= mask
    ti = table.take(i1)
    ti *= table.take(i2)
    ti *= np.float32(a_ti)
    out += ti
    return out


def _row_shape(x: np.ndarray) -> tuple[int, ...]:
    return x.shape[:-1] + (1,)


def _jitter_rows(x: np.ndarray, rms_px: float, rng: np.random.Generator) -> np.ndarray:
    """Each row shifted right by its own N(0, rms_px) offset, linear interpolation, edges repeated."""
    w = x.shape[-1]
    shift = rng.standard_normal(_row_shape(x)).astype(np.float32) * np.float32(rms_px)
    src = np.arange(w, dtype=np.float32) - shift
    left = np.floor(src)
    t = src - left
    left = left.astype(np.intp)
    i0 = np.clip(left, 0, w - 1)
    i1 = np.clip(left + 1, 0, w - 1)
    out: np.ndarray = (1 - t) * np.take_along_axis(x, i0, axis=-1) + t * np.take_along_axis(x, i1, axis=-1)
    return out


def corrupt(
    clean: np.ndarray,
    noise: NoiseSpec,
    rng: np.random.Generator,
    *,
    signal_std: float | None = None,
) -> np.ndarray:
    """A noisy copy of `clean` (any shape, last two axes are rows, cols), float32, same scale.

    See `NoiseSpec` for the exact steps. `signal_std` is S in the SNR; by default the std of
    the paper's lattice (`lattice_std()`), so every window and frame of it gets the same noise.
    """
    x = np.array(clean, dtype=np.float32, copy=True)
    if x.ndim < 2:
        raise ValueError(f"clean must have at least 2 dimensions (rows, cols), got shape {x.shape}")
    s = lattice_std() if signal_std is None else float(signal_std)
    if noise.line_jitter_px > 0:
        x = _jitter_rows(x, noise.line_jitter_px, rng)
    if noise.line_gain > 0:
        x *= 1 + np.float32(noise.line_gain) * rng.standard_normal(_row_shape(x), dtype=np.float32)
    if noise.kind == "uniform":
        half = np.float32(math.sqrt(3.0) * s / noise.snr)
        x += rng.random(x.shape, dtype=np.float32) * (2 * half) - half
    elif noise.kind == "gaussian":
        x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(s / noise.snr)
    elif noise.kind == "poisson":
        lam = noise.dose * (np.maximum(x, 0, dtype=np.float64) + noise.background)
        x = (rng.poisson(lam) / noise.dose - noise.background).astype(np.float32)
    if noise.line_offset > 0:
        x += np.float32(noise.line_offset) * rng.standard_normal(_row_shape(x), dtype=np.float32)
    if noise.read_sigma > 0:
        x += np.float32(noise.read_sigma) * rng.standard_normal(x.shape, dtype=np.float32)
    return x


def training_batches(
    n_samples: int,
    batch_size: int,
    noise: NoiseSpec,
    seed: int,
    **lattice: float,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(noisy, clean) float32 batches of windows, generated on the fly, reproducible by seed.

    `lattice` goes to `clean_windows` (size, period_px, sigma_px, max_rotation_deg); the noise
    level follows that lattice's own `lattice_std`. The last batch may be smaller.
    """
    if n_samples < 0 or batch_size < 1:
        raise ValueError(f"need n_samples >= 0 and batch_size >= 1, got {n_samples}, {batch_size}")
    rng = np.random.default_rng(seed)
    s = lattice_std(float(lattice.get("period_px", PAPER_PERIOD_PX)), float(lattice.get("sigma_px", PAPER_SIGMA_PX)))
    done = 0
    while done < n_samples:
        b = min(batch_size, n_samples - done)
        clean = clean_windows(b, rng, **lattice)  # type: ignore[arg-type]
        yield corrupt(clean, noise, rng, signal_std=s), clean
        done += b


def _basis(rotation_deg: float) -> tuple[np.ndarray, np.ndarray]:
    t = math.radians(rotation_deg)
    return np.array([math.sin(t), math.cos(t)]), np.array([math.cos(t), -math.sin(t)])


def _lattice_columns(
    shape: tuple[int, int],
    period_px: float,
    rotation_deg: float,
    offset_px: tuple[float, float],
    margin_px: float,
    defect: str | None,
    rp_gap: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undrifted (y, x) of every column within `margin_px` of the frame, their peaks, near-defect."""
    h, w = shape
    e1, e2 = _basis(rotation_deg)
    origin = np.asarray(offset_px, dtype=np.float64)
    corners = np.array([[-margin_px, -margin_px], [-margin_px, w + margin_px],
                        [h + margin_px, -margin_px], [h + margin_px, w + margin_px]]) - origin
    u1, u2 = corners @ e1 / period_px, corners @ e2 / period_px  # e1, e2 orthonormal
    i = np.arange(math.floor(u1.min()) - 2, math.ceil(u1.max()) + 3, dtype=np.float64)
    j = np.arange(math.floor(u2.min()) - 2, math.ceil(u2.max()) + 3, dtype=np.float64)
    ii, jj = (g.ravel() for g in np.meshgrid(i, j, indexing="ij"))
    a_sr, a_ti = PAPER_INTENSITIES
    # lattice coordinates (along e1, along e2) and peak of every site of the perfect lattice
    c1 = np.concatenate([ii, ii + 0.5])
    c2 = np.concatenate([jj, jj + 0.5])
    peak = np.concatenate([np.full(ii.size, a_sr), np.full(ii.size, a_ti)])
    near = np.zeros(c1.size, dtype=bool)
    if defect == "rp":
        centre = (np.array([(h - 1) / 2, (w - 1) / 2]) - origin) @ e1 / period_px
        fault = float(np.round(centre))  # last Sr plane of the unshifted side
        left = c1 <= fault
        right = c1 >= fault  # these sites, shifted by (rp_gap, 1/2), repeat the Sr plane at `fault`
        c1 = np.concatenate([c1[left], c1[right] + rp_gap])
        c2 = np.concatenate([c2[left], c2[right] + 0.5])
        peak = np.concatenate([peak[left], peak[right]])
        near = np.abs(c1 - (fault + rp_gap / 2)) <= 1.0
    elif defect is not None:
        raise ValueError(f"defect: unknown defect {defect!r}; expected 'rp' or None")
    pos = origin + period_px * (c1[:, None] * e1 + c2[:, None] * e2)
    keep = ((pos[:, 0] >= -margin_px) & (pos[:, 0] <= h + margin_px)
            & (pos[:, 1] >= -margin_px) & (pos[:, 1] <= w + margin_px))
    return pos[keep], peak[keep], near[keep]


def simulate_frame(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    period_px: float = PAPER_PERIOD_PX,
    sigma_px: float = PAPER_SIGMA_PX,
    rotation_deg: float = 0.0,
    offset_px: tuple[float, float] = (0.0, 0.0),
    drift_px: tuple[float, float] = (0.0, 0.0),
    defect: Literal["rp"] | None = None,
    position_jitter_px: float = 0.0,
    rp_gap: float = RP_GAP,
    chunk: int = 2048,
) -> SimFrame:
    """A full clean frame of any size, with optional drift across the frame and a defect.

    An Sr column sits at `offset_px` (before drift). Drift is a row-by-row scan drift: pixel
    row r sees the specimen displaced by drift * r / (H - 1). `position_jitter_px` adds a static
    random N(0, .) displacement to each column (drawn from `rng`; no other use of `rng`).
    Columns are rendered one neighbourhood at a time, `chunk` columns at once.
    """
    h, w = (int(v) for v in shape)
    if h < 1 or w < 1:
        raise ValueError(f"shape: need positive sides, got {shape!r}")
    _check_lattice(period_px, sigma_px)
    if position_jitter_px < 0:
        raise ValueError(f"position_jitter_px: must be >= 0, got {position_jitter_px!r}")
    ky, kx = (float(d) / max(h - 1, 1) for d in drift_px)
    if abs(ky) >= 0.5 or abs(kx) >= 0.5:
        raise ValueError(f"drift_px: drift {tuple(drift_px)} too large for {h} rows")
    reach = math.ceil(5.0 * sigma_px * (1.0 + abs(kx)) / (1.0 - abs(ky))) + 1
    margin = reach + 1.0 + abs(drift_px[0]) + abs(drift_px[1]) + 5 * position_jitter_px
    pos, peak, near = _lattice_columns((h, w), period_px, rotation_deg, offset_px, margin, defect, rp_gap)
    if position_jitter_px > 0:
        pos = pos + rng.normal(0.0, position_jitter_px, pos.shape)
    # where each column appears: row y satisfies y - ky*y = y0; x = x0 + kx*y
    y = pos[:, 0] / (1.0 - ky)
    x = pos[:, 1] + kx * y
    order = np.argsort(y, kind="stable")  # row bands: each chunk touches a narrow band of rows
    pos, peak, near, y, x = pos[order], peak[order], near[order], y[order], x[order]
    a_sr, a_ti = _amplitudes(float(period_px), float(sigma_px))
    amp = np.where(peak == PAPER_INTENSITIES[0], a_sr, a_ti)
    image = np.zeros(h * w, dtype=np.float32)
    off = np.arange(-reach, reach + 1)
    inv2s2 = 1.0 / (2.0 * sigma_px**2)
    for start in range(0, len(pos), chunk):
        sl = slice(start, start + chunk)
        rows = np.round(y[sl])[:, None] + off  # (n, k)
        cols = np.round(x[sl])[:, None] + off
        dy = rows * (1.0 - ky) - pos[sl, 0, None]  # undrifted offsets of each pixel from the column
        dx = cols[:, None, :] - kx * rows[:, :, None] - pos[sl, 1, None, None]
        val = amp[sl, None, None] * np.exp(-(dy[:, :, None] ** 2 + dx**2) * inv2s2)
        ok = (rows[:, :, None] >= 0) & (rows[:, :, None] < h) & (cols[:, None, :] >= 0) & (cols[:, None, :] < w)
        if not ok.any():
            continue
        flat = (rows[:, :, None] * w + cols[:, None, :])[ok].astype(np.intp)
        lo, hi = flat.min(), flat.max() + 1
        image[lo:hi] += np.bincount(flat - lo, weights=val[ok], minlength=hi - lo)
    inside = (y >= -0.5) & (y < h - 0.5) & (x >= -0.5) & (x < w - 0.5)
    return SimFrame(
        clean=image.reshape(h, w),
        columns=np.stack([y, x], axis=1)[inside],
        intensities=peak[inside].astype(np.float64),
        near_defect=near[inside],
    )
