"""Sampling: bring a frame's lattice period, in pixels, into the range a model was trained on.

A frame's lattice period in pixels is the specimen's projected lattice period (metres) divided by
the pixel size (metres). A model sees a lattice only at the periods it was trained on; a frame
outside that range is resampled into it before the model and back to its own shape after, or
refused, by `plan`. Pure compute: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F

from stemd.errors import CheckpointError, ConfigError, InputError

POLICIES = ("resample", "refuse", "off")  # off: the pixel size is ignored
LATTICE_PERIOD_RANGE_M = (1e-11, 1e-8)  # 0.01-10 nm: outside it, a unit slip (Å or nm for metres) is likelier
# A model trained on one period p (the paper's window AE: 10 px) runs frames as is only within
# p ÷/× this factor ([9.9, 10.1] px). Measured (docs/benchmarks.md, "Sampling"): as is the AE loses
# about 2 dB 5 % away from 10 px and 7-13 dB 20 % away; resampled to 9.9-10.1 px it stays within a dB
# of its 10 px score from 7 to 20 px; 1 % away, as is costs nothing measurable (a 256² check).
SINGLE_PERIOD_TOLERANCE = 1.01
MIN_PERIOD_PX = 2.0  # Nyquist: a lattice below 2 px per period is aliased; no interpolation restores it
MAX_UPSAMPLE = 4.0  # upsampling adds no information and costs factor² in compute and memory
MAX_PIXELS = 8192 * 8192  # a resampled frame above this is refused (the daemon's default limits.max_pixels)
OVERRIDE_HINT = ("give the right pixel size, or the specimen's lattice period (model.lattice_period_m, "
                 "--lattice-period), or set model.sampling / --sampling to off to run the model as is")


class SamplingError(InputError):
    """A frame's sampling lies outside what the model can be given (refused by `plan`)."""


def period_range(metadata: Mapping[str, Any]) -> tuple[float, float] | None:
    """The lattice periods (px) a checkpoint was trained on; None when it records none.

    `metadata["sampling"]["period_px"]` = [lo, hi] (conv models); else a single training lattice
    `metadata["lattice"]["period_px"]` = p (the window AE) widened to p ÷/x SINGLE_PERIOD_TOLERANCE.
    """
    sampling, lattice = metadata.get("sampling"), metadata.get("lattice")
    try:
        if sampling is not None:
            lo, hi = (float(v) for v in sampling["period_px"])
        elif lattice is not None:
            p = float(lattice["period_px"])
            lo, hi = p / SINGLE_PERIOD_TOLERANCE, p * SINGLE_PERIOD_TOLERANCE
        else:
            return None
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"metadata.sampling.period_px must be [low, high] px (or metadata.lattice.period_px "
                              f"a number), got sampling={sampling!r}, lattice={lattice!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise CheckpointError(f"metadata: the period range must be finite with 0 < low <= high, got [{lo!r}, {hi!r}]")
    return lo, hi


def check_policy(policy: str, key: str = "model.sampling") -> str:
    """`policy` if it is one of POLICIES, else ConfigError naming `key` and the allowed values."""
    if policy not in POLICIES:
        raise ConfigError(f"{key}: unknown sampling policy {policy!r} (allowed: {', '.join(POLICIES)})")
    return policy


def check_lattice_period(lattice_period_m: float, key: str = "model.lattice_period_m") -> float:
    """`lattice_period_m` if it lies in LATTICE_PERIOD_RANGE_M (metres), else ConfigError naming `key`."""
    lo, hi = LATTICE_PERIOD_RANGE_M
    if isinstance(lattice_period_m, bool) or not isinstance(lattice_period_m, (int, float)) \
            or not lo < lattice_period_m < hi:
        raise ConfigError(f"{key}: must be a lattice period in metres between {lo:g} and {hi:g} "
                          f"(SrTiO3: 3.905e-10), got {lattice_period_m!r}")
    return float(lattice_period_m)


def target_period(period_px: float, period_range: tuple[float, float]) -> float:
    """The period a frame is resampled to: itself inside the range, else the nearer end of the range."""
    lo, hi = period_range
    return min(max(period_px, lo), hi)


def resampled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """(H, W) scaled by `factor`, rounded to whole pixels."""
    return max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))


def plan(pixel_size_m: float | None, lattice_period_m: float, period_range: tuple[float, float] | None,
         shape: tuple[int, int], policy: str = "resample", min_side: int = 28) -> float:
    """The factor to resample a frame of `shape` by (1.0: run it as is), or SamplingError saying why not.

    1.0 when the policy is off, the pixel size is unknown (None), the model records no range, or
    the implied period lattice_period_m / pixel_size_m (px) lies in the range. Otherwise, with
    policy "resample", the factor that takes the period to the nearer end of the range, unless the
    lattice is not resolved (period < MIN_PERIOD_PX), the upsampling exceeds MAX_UPSAMPLE, or the
    resampled frame would be below `min_side` or above MAX_PIXELS; with "refuse", SamplingError.
    """
    check_policy(policy)
    if policy == "off" or pixel_size_m is None or period_range is None:
        return 1.0
    if isinstance(pixel_size_m, bool) or not isinstance(pixel_size_m, (int, float)) \
            or not (math.isfinite(pixel_size_m) and pixel_size_m > 0):
        raise SamplingError(f"pixel size must be a positive number of metres, got {pixel_size_m!r}")
    check_lattice_period(lattice_period_m)
    period = lattice_period_m / pixel_size_m
    lo, hi = period_range
    if lo <= period <= hi:
        return 1.0
    where = (f"pixel size {pixel_size_m:.4g} m with lattice period {lattice_period_m:.4g} m is {period:.3g} px "
             f"per period; the model was trained on {lo:g}-{hi:g} px")
    if policy == "refuse":
        raise SamplingError(f"{where} (sampling policy: refuse); {OVERRIDE_HINT}")
    if period < MIN_PERIOD_PX:
        raise SamplingError(f"{where}, and below {MIN_PERIOD_PX:g} px the lattice is not resolved (aliased), so "
                            f"resampling cannot help; {OVERRIDE_HINT}")
    factor = target_period(period, period_range) / period
    if factor > MAX_UPSAMPLE:
        raise SamplingError(
            f"{where}: that needs {factor:.2f}x upsampling, more than {MAX_UPSAMPLE:g}x; {OVERRIDE_HINT}"
        )
    h, w = resampled_shape(shape, factor)
    if min(h, w) < min_side:
        raise SamplingError(f"{where}: resampled by {factor:.3g} the {shape[0]}x{shape[1]} frame becomes {h}x{w}, "
                            f"below the model's {min_side} px; {OVERRIDE_HINT}")
    if h * w > MAX_PIXELS:
        raise SamplingError(f"{where}: resampled by {factor:.3g} the {shape[0]}x{shape[1]} frame becomes {h}x{w}, "
                            f"over {MAX_PIXELS} pixels; {OVERRIDE_HINT}")
    return factor


def resample(frames: torch.Tensor, factor: float) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, round(H·factor), round(W·factor)), bicubic, antialiased when shrinking."""
    size = resampled_shape((frames.shape[-2], frames.shape[-1]), factor)
    if size == tuple(frames.shape[-2:]):
        return frames
    return F.interpolate(frames, size=size, mode="bicubic", align_corners=False, antialias=factor < 1)


def restore(frames: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """`resample`'s output (after the model) back to (H, W): bicubic, never antialiased (any device).

    After upsampling, the frame holds nothing finer than the original grid resolves, so sampling it
    back at the original pixel centres is faithful, where an antialiasing filter would blur it
    (a clean lattice at period 4 px, up 1.5x and back: 38 dB without the filter, 27 dB with it)."""
    shape = (int(shape[0]), int(shape[1]))
    if tuple(frames.shape[-2:]) == shape:
        return frames
    return F.interpolate(frames, size=shape, mode="bicubic", align_corners=False)
