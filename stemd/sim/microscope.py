"""The simulated microscope: a drifting specimen field scanned frame by frame (pure, no I/O).

`stemd simulate` (stemd.apps.simulate) publishes these frames; `stemd demo` and the tests use them too.

The physics, kept simple and documented:
- The sample is one large clean field rendered once by `stemd.sim.lattice.simulate_frame`
  (oversampled 2x when it fits in memory). Each frame is a crop of that field at the current
  drift offset, bilinearly interpolated, so the sample drifts smoothly from frame to frame.
  The drift runs in a straight line at `drift_px` per frame in a random (seeded) direction
  and bounces off the edges of a `margin_px` border, so it can go on for ever.
- Dose: the expected counts at the brightest column are `dose_per_us * dwell_us`
  (e.g. 10 counts/us x 2 us = 20 counts); the recorded counts are Poisson around that.
- Scan artefacts (on by default, `artefacts=False` turns them off): line jitter and line
  gain from `stemd.sim.lattice.corrupt`, and frame flicker (beam current varying from frame
  to frame by `flicker` relative standard deviation, applied to the dose before the noise).
- Counting noise is exact Poisson, sampled by alias tables (`PoissonTable`) because numpy's
  sampler alone would cap 512^2 frames near 40 fps on one core.
- Raw frames are uint16 counts clipped at 65535. The CLEAN frame is the expected counts
  (`clean * dose`, float32) of the drifted field, without noise, flicker or scan artefacts.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from stemd.config import MAX_SIDE, MIN_SIDE, SRTIO3_A_M
from stemd.errors import ConfigError
from stemd.sim.lattice import NoiseSpec, corrupt, simulate_frame

MAX_COUNTS = 65535
OVERSAMPLE_MAX_PIXELS = 1 << 22  # oversample the field 2x only up to ~2048^2 frame pixels
POISSON_HEADROOM = 1.5  # table covers flicker and line gain above the brightest column
POISSON_TABLE_MAX = 64.0  # larger expected counts use numpy's sampler (tables would be big)


def require(ok: bool, option: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{option} {message} (got {value!r})")


@dataclass(frozen=True)
class SimSpec:
    """What the simulated microscope images and how; errors name the matching CLI option."""

    shape: tuple[int, int] = (512, 512)
    dwell_us: float = 2.0
    dose_per_us: float = 10.0  # expected counts per microsecond at the brightest column
    pixel_size_m: float | None = None  # None: SrTiO3's 0.3905 nm Sr-Sr over period_px (3.905e-11 m at 10 px)
    period_px: float = 10.0
    sigma_px: float = 1.5
    rotation_deg: float = 0.0  # lattice orientation in the image
    scan_rotation_deg: float = 0.0  # metadata only
    defect: Literal["rp"] | None = None
    drift_px: float = 0.1  # sample drift per frame, pixels
    margin_px: int = 32  # drift bounces inside this border around the first frame
    artefacts: bool = True
    line_jitter_px: float = 0.3
    line_gain: float = 0.03
    flicker: float = 0.03
    seed: int = 0

    def __post_init__(self) -> None:
        h, w = self.shape
        require(self.period_px > 2, "--period-px", "must be > 2", self.period_px)
        pixel_size_m = SRTIO3_A_M / self.period_px if self.pixel_size_m is None else self.pixel_size_m
        object.__setattr__(self, "pixel_size_m", pixel_size_m)
        require(
            MIN_SIDE <= min(h, w) and max(h, w) <= MAX_SIDE,
            "--size",
            f"must be between {MIN_SIDE} and {MAX_SIDE}",
            self.shape,
        )
        require(self.dwell_us > 0 and math.isfinite(self.dwell_us), "--dwell-us", "must be > 0", self.dwell_us)
        require(self.dose_per_us > 0 and math.isfinite(self.dose_per_us), "--dose-per-us", "must be > 0",
                self.dose_per_us)
        require(self.dose <= MAX_COUNTS, "--dose-per-us", f"x --dwell-us must be <= {MAX_COUNTS} counts", self.dose)
        require(pixel_size_m > 0 and math.isfinite(pixel_size_m), "--pixel-size-m", "must be > 0", pixel_size_m)
        for option, value in (("--rotation-deg", self.rotation_deg), ("--scan-rotation-deg", self.scan_rotation_deg)):
            require(math.isfinite(value), option, "must be a finite angle", value)
        require(self.sigma_px > 0, "--sigma-px", "must be > 0", self.sigma_px)
        require(self.defect in (None, "rp"), "--defect", "must be 'rp' or absent", self.defect)
        require(0 <= self.drift_px <= self.margin_px, "--drift-px", f"must be between 0 and {self.margin_px}",
                self.drift_px)
        require(self.margin_px >= 1, "--margin-px", "must be >= 1", self.margin_px)
        for option, value in (("--line-jitter-px", self.line_jitter_px), ("--line-gain", self.line_gain),
                              ("--flicker", self.flicker)):
            require(0 <= value < 1, option, "must be in [0, 1)", value)
        require(self.seed >= 0, "--seed", "must be >= 0", self.seed)

    @property
    def dose(self) -> float:
        """Expected counts at the brightest column in one frame."""
        return self.dose_per_us * self.dwell_us

    @property
    def frame_period_s(self) -> float:
        """Time to scan one frame: pixels x dwell (512^2 at 2 us -> 0.524 s)."""
        return self.shape[0] * self.shape[1] * self.dwell_us * 1e-6


@dataclass(frozen=True)
class Specimen:
    """The clean sample field, rendered once, and the drift path across it."""

    spec: SimSpec
    field: np.ndarray  # (oversample*(H+2m), oversample*(W+2m)) float32, brightest column = 1.0
    oversample: int
    direction: tuple[float, float]  # unit vector of the drift, (dy, dx)
    poisson: PoissonTable | None  # fast counting noise; None: numpy's sampler (high doses)


@dataclass(frozen=True)
class SimulatedFrame:
    """One frame: the raw counts, the expected (clean) counts and where the sample was."""

    index: int
    raw: np.ndarray  # (H, W) uint16 counts
    clean: np.ndarray  # (H, W) float32 expected counts, no noise or artefacts
    offset_px: tuple[float, float]  # drift offset of this frame from the first, (dy, dx)
    beam_gain: float  # flicker factor applied to the dose of this frame


def build_specimen(spec: SimSpec) -> Specimen:
    """Render the sample once: a field larger than a frame by the drift margin, oversampled."""
    h, w = spec.shape
    m = spec.margin_px
    oversample = 2 if (h + 2 * m) * (w + 2 * m) <= OVERSAMPLE_MAX_PIXELS else 1
    rng = np.random.default_rng((spec.seed, 0))
    oy, ox = rng.uniform(0, spec.period_px * oversample, size=2)
    offset = (float(oy), float(ox))
    sim = simulate_frame(
        ((h + 2 * m) * oversample, (w + 2 * m) * oversample),
        rng,
        period_px=spec.period_px * oversample,
        sigma_px=spec.sigma_px * oversample,
        rotation_deg=spec.rotation_deg,
        offset_px=offset,
        defect=spec.defect,
    )
    angle = rng.uniform(0, 2 * math.pi)
    field = np.ascontiguousarray(sim.clean, dtype=np.float32)
    lam_max = spec.dose * POISSON_HEADROOM * max(1.0, float(field.max()))
    table = poisson_table(round(lam_max, 3)) if lam_max <= POISSON_TABLE_MAX else None
    return Specimen(spec, field, oversample, (math.sin(angle), math.cos(angle)), table)


def _bounce(x: float, span: float) -> float:
    """Reflect a coordinate into [0, span] (a triangle wave), so drift never leaves the field."""
    x = math.fmod(abs(x), 2 * span)
    return 2 * span - x if x > span else x


def drift_offset(scene: Specimen, index: int) -> tuple[float, float]:
    """Drift offset (dy, dx) of frame `index` from frame 0, pixels; continuous across frames."""
    m = scene.spec.margin_px
    travel = index * scene.spec.drift_px
    dy, dx = scene.direction
    return (_bounce(m + travel * dy, 2 * m) - m, _bounce(m + travel * dx, 2 * m) - m)


def crop(scene: Specimen, offset_px: tuple[float, float]) -> np.ndarray:
    """The (H, W) clean frame at a sub-pixel drift offset, bilinear between field samples."""
    h, w = scene.spec.shape
    s = scene.oversample
    m = scene.spec.margin_px
    py, px = ((m + offset_px[0]) * s, (m + offset_px[1]) * s)
    iy, ix = int(math.floor(py)), int(math.floor(px))
    fy, fx = py - iy, px - ix
    iy, ix = min(iy, scene.field.shape[0] - s * h - 1), min(ix, scene.field.shape[1] - s * w - 1)

    def tap(y: int, x: int) -> np.ndarray:
        return scene.field[y:y + s * h:s, x:x + s * w:s]

    top = tap(iy, ix) * np.float32(1 - fx) + tap(iy, ix + 1) * np.float32(fx)
    bottom = tap(iy + 1, ix) * np.float32(1 - fx) + tap(iy + 1, ix + 1) * np.float32(fx)
    return top * np.float32(1 - fy) + bottom * np.float32(fy)


@dataclass(frozen=True)
class PoissonTable:
    """Walker alias tables of Poisson(lam) for `levels` values of lam evenly spaced in [0, lam_max].

    Sampling is O(1) per pixel with one uniform (about 3x faster than numpy's `poisson` on
    512^2 frames); lam is rounded to the nearest level, i.e. by at most lam_max / (2 (levels-1)).
    """

    lam_max: float
    levels: int
    k: int  # counts 0..k-1 are represented; the tail beyond has probability < 1e-15
    prob: np.ndarray  # (levels * k,) float32 acceptance probability of column j
    alias: np.ndarray  # (levels * k,) uint16 count taken when column j is not accepted


@functools.lru_cache(maxsize=8)
def poisson_table(lam_max: float, levels: int = 4096) -> PoissonTable:
    """Build the alias tables (Vose's pairing of a short and a tall column, all levels at once)."""
    k = int(math.ceil(lam_max + 10 * math.sqrt(lam_max) + 10))
    lam = np.linspace(0.0, lam_max, levels)[:, None]
    counts = np.arange(k)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, k)))])
    pmf = np.exp(counts * np.log(np.maximum(lam, 1e-300)) - lam - log_fact)
    pmf[0] = 0.0
    pmf[0, 0] = 1.0
    p = pmf / pmf.sum(axis=1, keepdims=True) * k
    prob = np.ones((levels, k))
    alias = np.broadcast_to(counts, (levels, k)).copy()
    rows = np.arange(levels)
    done = np.zeros((levels, k), dtype=bool)
    for _ in range(k - 1):
        short = np.where(done, np.inf, p).argmin(axis=1)
        tall = np.where(done, -np.inf, p).argmax(axis=1)
        ps = p[rows, short]
        prob[rows, short] = np.minimum(ps, 1.0)
        alias[rows, short] = tall
        p[rows, tall] -= 1.0 - ps
        done[rows, short] = True
    return PoissonTable(lam_max, levels, k, prob.astype(np.float32).ravel(), alias.astype(np.uint16).ravel())


def sample_poisson(lam: np.ndarray, rng: np.random.Generator, table: PoissonTable | None = None) -> np.ndarray:
    """Poisson counts (uint16, clipped at 65535) around `lam`; by `table` where lam fits in it."""
    lam = np.maximum(lam, 0, dtype=np.float32)
    if table is None:
        return np.minimum(rng.poisson(lam.astype(np.float64)), MAX_COUNTS).astype(np.uint16)
    over = lam > table.lam_max
    level = (np.minimum(lam, table.lam_max) * np.float32((table.levels - 1) / table.lam_max) + np.float32(0.5))
    u = rng.random(lam.shape, dtype=np.float32) * np.float32(table.k)
    column = u.astype(np.int32)
    flat = level.astype(np.int32) * table.k + column
    out = np.where(u - column < table.prob[flat], column, table.alias[flat]).astype(np.uint16)
    if over.any():
        out[over] = np.minimum(rng.poisson(lam[over].astype(np.float64)), MAX_COUNTS)
    return out


def artefact_spec(spec: SimSpec) -> NoiseSpec:
    """The scan artefacts (line jitter, line gain) as `stemd.sim.lattice.corrupt` applies them."""
    return NoiseSpec(kind="none", line_jitter_px=spec.line_jitter_px, line_gain=spec.line_gain)


def make_frame(scene: Specimen, index: int) -> SimulatedFrame:
    """Frame `index` of the run: pure and reproducible from (seed, index), independent of order."""
    spec = scene.spec
    rng = np.random.default_rng((spec.seed, 1, index))
    offset = drift_offset(scene, index)
    clean = crop(scene, offset)
    signal, gain = clean, 1.0
    if spec.artefacts:
        gain = float(max(0.0, 1.0 + spec.flicker * rng.standard_normal()))
        signal = corrupt(clean, artefact_spec(spec), rng)
    raw = sample_poisson(signal * np.float32(spec.dose * gain), rng, scene.poisson)
    return SimulatedFrame(index, raw, clean * np.float32(spec.dose), offset, gain)
