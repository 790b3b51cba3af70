"""Per-frame normalisation: raw frames in any units to the scale a model was trained on, and back.

Raw frames come in arbitrary units (uint16 counts, floats with offsets); a model works on the scale
it was trained on (background 0, brightest column peak 1.0, noise around that). `normalize` maps
each frame to that scale from two statistics the noise leaves unbiased; `denormalize` maps back.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from stemd.config import MIN_SIDE
from stemd.errors import InputError

Array = TypeVar("Array", np.ndarray, torch.Tensor)

# Mean and signal std (see `normalize`) of the training lattice in clean units: the paper's
# SrTiO3-like lattice, period 10 px, column sigma 1.5 px, peaks 1.0 / 0.7 (measured on
# stemd.sim.lattice.simulate_frame over rotations).
REFERENCE_LEVELS = (0.2405, 0.1974)
MIN_SIGNAL_FRACTION = 0.05  # signal std floor, as a fraction of the frame's total std


def check_frames(image: np.ndarray, window: int = MIN_SIDE) -> None:
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


def _tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    return frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))


def mean_and_signal_std(frames: Array) -> tuple[Array, Array, Array]:
    """Per frame of (B, H, W): mean, sqrt(covariance of vertically adjacent pixels), total std; float64 (the
    statistics of frames of any range, e.g. 1e18 counts, stay finite), the same kind (numpy or torch) as given."""
    x = _tensor(frames).to(torch.float64)
    h, w = x.shape[-2:]
    mean = x.mean((-2, -1))
    d = x - mean[:, None, None]
    cov = (d[:, 1:] * d[:, :-1]).sum((-2, -1)) / max((h - 1) * w, 1)
    var = d.square().mean((-2, -1))
    stats = mean, cov.clamp_min(0.0).sqrt(), var.sqrt()
    return stats if isinstance(frames, torch.Tensor) else tuple(t.numpy() for t in stats)  # type: ignore[return-value]


def normalize(frames: Array, *, reference: tuple[float, float] = REFERENCE_LEVELS) -> tuple[Array, Array, Array]:
    """(B, H, W) any real dtype -> (float32 normalised, lo (B,), hi (B,) float64), robust to gain, offset and
    noise; torch tensors stay on their device, numpy arrays give numpy arrays.

    A frame is taken to be `gain * (clean + noise) + offset`, with pixel noise independent from
    pixel to pixel and `clean` statistically like the training lattice. Two statistics that the
    noise leaves unbiased fix gain and offset: the frame mean, and the signal std, the square root
    of the covariance between vertically adjacent pixels (rows are scan lines, so line offsets
    and gains do not correlate across them). They are matched to `reference` = (mean, signal std)
    of the training lattice in clean units. `lo` and `hi` are the input values of clean 0
    (background) and 1 (column peak); the result is (x - lo) / (hi - lo), so `a * x + b`
    normalises to the same array as `x` for any a > 0. The signal std is floored at
    MIN_SIGNAL_FRACTION of the frame's std (a frame of pure noise is not blown up); a flat frame
    gets lo = hi = its level and normalises to zeros. Arithmetic is float64 until the result.
    """
    if frames.ndim != 3:
        raise ValueError(f"normalize expects (B, H, W), got shape {tuple(frames.shape)}")
    x = _tensor(frames).to(torch.float64)
    mean, signal, total = mean_and_signal_std(x)
    ref_mean, ref_std = reference
    gain = torch.maximum(signal, MIN_SIGNAL_FRACTION * total) / ref_std
    flat = gain <= 8 * torch.finfo(torch.float32).eps * mean.abs().clamp_min(1e-30)
    gain = torch.where(flat, 0.0, gain)
    lo = mean - gain * ref_mean
    hi = lo + gain
    scale = torch.where(flat, 0.0, 1.0 / torch.where(flat, 1.0, gain))
    out = ((x - lo[:, None, None]) * scale[:, None, None]).to(torch.float32)
    if isinstance(frames, torch.Tensor):
        return out, lo, hi
    return out.numpy(), lo.numpy(), hi.numpy()


def denormalize(frames: Array, lo: Array, hi: Array) -> Array:
    """Inverse of `normalize`, back to the input's scale, float32: y * (hi - lo) + lo per frame (in float64)."""
    y = _tensor(frames).to(torch.float64)
    lo_t, hi_t = _tensor(lo).to(y), _tensor(hi).to(y)
    out = (y * (hi_t - lo_t)[:, None, None] + lo_t[:, None, None]).to(torch.float32)
    return out if isinstance(frames, torch.Tensor) else out.numpy()
