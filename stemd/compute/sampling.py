"""Sampling: bring a frame's lattice, in pixels, into the range a model was trained on.

A model sees a lattice only at the scales it was trained on; a frame outside that range is
resampled into it before the model and back to its own shape after, or refused. The frame tells
its own scale (`measure_scale`: the shortest lattice translation, from its Bragg guide's
autocorrelation), compared with the scales the model saw (`scale_range`) by `plan_from_scale`;
a frame without a lattice falls back on `plan`: the specimen's projected lattice period (metres)
over the pixel size (metres), against the trained periods. Pure compute: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F

from stemd.compute.fourier import bragg_filter
from stemd.compute.planar import Vectors, lattice_vectors
from stemd.config import MAX_SIDE, MIN_SIDE
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
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # a resampled frame above this is refused (the daemon's default limits.max_pixels)
OVERRIDE_HINT = ("give the right pixel size, or the specimen's lattice period (model.lattice_period_m, "
                 "--lattice-period) with model.calibrate / --calibrate off, or set model.sampling / --sampling "
                 "to off to run the model as is")


# The shortest lattice translation (what `measure_scale` finds) per lattice period, for the structures the
# scenes train on; measured on stemd.sim.scenes frames: perovskite 0.707 (its two column types alike enough
# that the half diagonal repeats; so on the paper's lattice too), dumbbell 0.866, hexagonal 1.000.
SCALE_PER_PERIOD = {"perovskite": math.sqrt(0.5), "dumbbell": math.sqrt(0.75), "hexagonal": 1.0}
# A frame's Bragg guide must hold this share of its variance to count as a lattice: measured on 256² scenes,
# pure noise 0.0000-0.0003 at doses 0.5-200, a half-crystal frame 0.015 at dose 0.5, whole crystals 0.03 up
MIN_LATTICE_POWER = 0.005


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


def scale_range(metadata: Mapping[str, Any]) -> tuple[float, float] | None:
    """The lattice scales (shortest translation, px) a checkpoint was trained on, from its period range: for
    scene-trained models (every structure) where every structure was seen, [lo x the largest ratio, hi x the
    smallest]; for the paper's lattice (a perovskite), the period range x its ratio. None: no range recorded."""
    periods = period_range(metadata)
    if periods is None:
        return None
    lo, hi = periods
    if metadata.get("sampling") is None:
        ratio = SCALE_PER_PERIOD["perovskite"]
        return lo * ratio, hi * ratio
    low, high = lo * max(SCALE_PER_PERIOD.values()), hi * min(SCALE_PER_PERIOD.values())
    return (low, high) if low <= high else (math.sqrt(low * high),) * 2


def measure_scale(frames: torch.Tensor) -> list[float | None]:
    """(B, 1, H, W) frames (any units) -> each frame's lattice scale: its shortest lattice translation in px
    (`planar.lattice_vectors` of its Bragg guide), or None where the frame shows no lattice: the guide holds
    under MIN_LATTICE_POWER of the frame's variance (noise, amorphous, vacuum) or no two translations. With
    several lattices (grains, particles) the strongest one's."""
    return [scale for scale, _ in measure_lattice(frames)]


def measure_lattice(frames: torch.Tensor) -> list[tuple[float | None, Vectors | None]]:
    """(B, 1, H, W) -> per frame (`measure_scale`'s scale, the two lattice translations `lattice_vectors` found
    whatever the lattice's power, None if none): the lattice analysis a series' plan carries for its frames."""
    x = frames.float()
    guide = bragg_filter(x)
    power = guide.var((-2, -1)).flatten() / x.var((-2, -1)).flatten().clamp_min(torch.finfo(torch.float32).tiny)
    strong = (power >= MIN_LATTICE_POWER).tolist()
    return [(None if v is None or not ok else min(math.hypot(*v[0]), math.hypot(*v[1])), v)
            for v, ok in zip(lattice_vectors(guide), strong)]


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
         shape: tuple[int, int], policy: str = "resample", min_side: int = MIN_SIDE) -> float:
    """The factor to resample a frame of `shape` by (1.0: run it as is), or SamplingError saying why not,
    from its pixel size: the period lattice_period_m / pixel_size_m (px) against `period_range`.

    1.0 when the policy is off, the pixel size is unknown (None) or the model records no range; else
    as `_factor`.
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
    where = (f"pixel size {pixel_size_m:.4g} m with lattice period {lattice_period_m:.4g} m is {period:.3g} px "
             f"per period; the model was trained on {lo:g}-{hi:g} px")
    return _factor(period, period_range, where, shape, policy, min_side)


def plan_from_scale(scale_px: float, scale_range: tuple[float, float], shape: tuple[int, int],
                    policy: str = "resample", min_side: int = MIN_SIDE) -> float:
    """The factor to resample a frame of `shape` by, from its measured lattice scale (`measure_scale`) against
    the scales the model saw (`scale_range`), or SamplingError; 1.0 when the policy is off or the lattice is
    finer than the range: upsampling correlates the noise, and the default model then does worse than as is
    (perovskite at 4.5 px, dose 2: 25.0 dB as is, 20.2 dB upsampled 1.87x; dose 20: 26.8 / 26.8), where
    shrinking a coarse lattice gains at low dose (25 px, dose 2: 25.1 -> 27.3 dB; 35 px: 29.4 -> 30.8 dB)
    and costs 0.1-0.2 dB at dose 20."""
    check_policy(policy)
    lo, hi = scale_range
    if policy == "off" or scale_px < lo:  # never upsampled on a measurement: see MEASURED_UPSAMPLING
        return 1.0
    where = (f"the frame's lattice repeats every {scale_px:.3g} px (measured); the model was trained on "
             f"{lo:.3g}-{hi:.3g} px")
    return _factor(scale_px, scale_range, where, shape, policy, min_side)


def _factor(value: float, value_range: tuple[float, float], where: str, shape: tuple[int, int], policy: str,
            min_side: int) -> float:
    """1.0 when `value` (px) lies in `value_range`; else, with policy "resample", the factor that takes it to the
    nearer end, unless the lattice is not resolved (below MIN_PERIOD_PX), the upsampling exceeds MAX_UPSAMPLE, or
    the resampled frame would be below `min_side` or above MAX_PIXELS; with "refuse", SamplingError."""
    lo, hi = value_range
    if lo <= value <= hi:
        return 1.0
    if policy == "refuse":
        raise SamplingError(f"{where} (sampling policy: refuse); {OVERRIDE_HINT}")
    if value < MIN_PERIOD_PX:
        raise SamplingError(f"{where}, and below {MIN_PERIOD_PX:g} px the lattice is not resolved (aliased), so "
                            f"resampling cannot help; {OVERRIDE_HINT}")
    factor = target_period(value, value_range) / value
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
