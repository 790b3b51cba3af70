"""Per-frame normalisation: raw frames in any units to the scale a model was trained on, and back.

Raw frames come in arbitrary units (uint16 counts, floats with offsets); a model works on the scale
it was trained on (background 0, brightest column peak 1.0, noise around that). `normalize` maps
each frame to that scale from two statistics the noise leaves unbiased; `denormalize` maps back.
"""

from __future__ import annotations

import numpy as np

from stemd.errors import InputError

# Mean and signal std (see `normalize`) of the training lattice in clean units: the paper's
# SrTiO3-like lattice, period 10 px, column sigma 1.5 px, peaks 1.0 / 0.7 (measured on
# stemd.sim.lattice.simulate_frame over rotations).
REFERENCE_LEVELS = (0.2405, 0.1974)
MIN_SIGNAL_FRACTION = 0.05  # signal std floor, as a fraction of the frame's total std


def check_frames(image: np.ndarray, window: int = 28) -> None:
    """Raise InputError naming the problem: not 2D/3D, smaller than the window, NaN/inf, not numeric."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"expected a numpy array, got {type(image).__name__}")
    kind = image.dtype.kind
    if kind not in "uif":
        raise InputError(f"expected real numbers (integer or float pixels), got dtype {image.dtype}")
    if image.ndim not in (2, 3):
        raise InputError(f"expected a 2D frame or a 3D stack, got {image.ndim}D array of shape {image.shape}")
    if image.size == 0:
        raise InputError(f"empty array of shape {image.shape}")
    h, w = image.shape[-2:]
    if h < window or w < window:
        raise InputError(f"frame is {h}×{w} px; the model's window is {window} px")
    if kind == "f" and not np.isfinite(image).all():
        n_nan = int(np.count_nonzero(np.isnan(image)))
        n_inf = int(np.count_nonzero(np.isinf(image)))
        raise InputError(f"frame contains {n_nan} NaN and {n_inf} inf pixel(s)")


def mean_and_signal_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame of (B, H, W) float32: mean, sqrt(covariance of vertically adjacent pixels), total std."""
    mean = x.mean(axis=(1, 2), dtype=np.float64)
    d = x - mean[:, None, None].astype(np.float32)
    h, w = x.shape[1:]
    cov = np.einsum("bij,bij->b", d[:, 1:], d[:, :-1]).astype(np.float64) / max((h - 1) * w, 1)
    var = np.einsum("bij,bij->b", d, d).astype(np.float64) / (h * w)
    return mean, np.sqrt(np.maximum(cov, 0.0)), np.sqrt(var)


def normalize(
    frames: np.ndarray, *, reference: tuple[float, float] = REFERENCE_LEVELS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, H, W) any dtype -> (float32 normalised, lo (B,), hi (B,)); robust to gain, offset and noise.

    A frame is taken to be `gain * (clean + noise) + offset`, with pixel noise independent from
    pixel to pixel and `clean` statistically like the training lattice. Two statistics that the
    noise leaves unbiased fix gain and offset: the frame mean, and the signal std, the square root
    of the covariance between vertically adjacent pixels (rows are scan lines, so line offsets
    and gains do not correlate across them). They are matched to `reference` = (mean, signal std)
    of the training lattice in clean units. `lo` and `hi` are the input values of clean 0
    (background) and 1 (column peak); the result is (x - lo) / (hi - lo), so `a * x + b`
    normalises to the same array as `x` for any a > 0. The signal std is floored at
    MIN_SIGNAL_FRACTION of the frame's std (a frame of pure noise is not blown up); a flat frame
    gets lo = hi = its level and normalises to zeros.
    """
    x = np.asarray(frames, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"normalize expects (B, H, W), got shape {x.shape}")
    mean, signal, total = mean_and_signal_std(x)
    ref_mean, ref_std = reference
    gain = np.maximum(signal, MIN_SIGNAL_FRACTION * total) / ref_std
    flat = gain <= 8 * np.finfo(np.float32).eps * np.maximum(np.abs(mean), 1e-30)
    gain = np.where(flat, 0.0, gain)
    lo = mean - gain * ref_mean
    hi = lo + gain
    scale = np.where(flat, 0.0, 1.0 / np.where(flat, 1.0, gain))
    out = (x - lo[:, None, None].astype(np.float32)) * scale[:, None, None].astype(np.float32)
    return out, lo, hi


def denormalize(frames: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Inverse of `normalize`, back to the input's scale, float32: y * (hi - lo) + lo per frame."""
    lo = np.asarray(lo, dtype=np.float64)[:, None, None]
    hi = np.asarray(hi, dtype=np.float64)[:, None, None]
    return (frames * (hi - lo) + lo).astype(np.float32)
