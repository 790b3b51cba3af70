"""Realistic HAADF scenes with ground truth, for training and for faithfulness benchmarks (issue 5).

Several structures (perovskite [001], a dumbbell projection, a hexagonal lattice), defects
(vacancies, a Ruddlesden-Popper fault, interfaces, grain boundaries), amorphous and vacuum
regions, probe blur and scan drift; then the instrument: line jitter and flicker, Poisson
counting, detector gain noise and read noise. Pure numpy/scipy, seeded, no I/O. Every formula
is in docs/noise.md, "Realistic scenes (issue 5)".

Conventions are those of `stemd.sim.lattice`: pixel (r, c) has its centre at (y, x) = (r, c);
a phase rotated by theta has unit vectors e1 = (sin t, cos t), e2 = (cos t, -sin t) in (y, x).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from stemd.sim.lattice import PAPER_INTENSITIES, RP_GAP, NoiseSpec, _basis, _lattice_columns, corrupt

STRUCTURES = ("perovskite", "dumbbell", "hexagonal")
PHASE_KINDS = STRUCTURES + ("amorphous", "vacuum")
LAYOUTS = ("perfect", "rp", "interface", "grain_boundary", "amorphous", "vacuum", "mixed", "particle", "grains")
NAMED_FRAMES = ("perovskite_rp", "interface", "grain_boundary", "amorphous", "vacuum_edge", "vacancies", "noise_only")

# Structures in period units, coordinates along (e1, e2): lattice vectors (rows) and column sites.
_SQRT2, _SQRT3 = math.sqrt(2.0), math.sqrt(3.0)
DUMBBELL_SPLIT = _SQRT2 / 4  # zincblende [110]: a/4 between the dumbbell's columns, period a/sqrt(2)
CELLS = {  # public: benchmarks derive the reciprocal lattice (Bragg peaks) from these
    "perovskite": np.array([[1.0, 0.0], [0.0, 1.0]]),
    "dumbbell": np.array([[1.0, 0.0], [0.0, _SQRT2]]),
    "hexagonal": np.array([[1.0, 0.0], [0.5, _SQRT3 / 2]]),
}
_MOTIFS = {  # (c1, c2, sublattice): sublattice 0 has intensity 1, sublattice 1 `Phase.second`
    "perovskite": [(0.0, 0.0, 0), (0.5, 0.5, 1)],
    "dumbbell": [(0.0, -DUMBBELL_SPLIT / 2, 0), (0.0, DUMBBELL_SPLIT / 2, 1),
                 (0.5, _SQRT2 / 2 - DUMBBELL_SPLIT / 2, 0), (0.5, _SQRT2 / 2 + DUMBBELL_SPLIT / 2, 1)],
    "hexagonal": [(0.5, _SQRT3 / 6, 0), (1.0, _SQRT3 / 3, 1)],
}
SECOND_RANGES = {"perovskite": (0.5, 0.8), "dumbbell": (0.8, 1.0), "hexagonal": (0.3, 1.0)}  # random_scene
SECOND_DEFAULTS = {"perovskite": 0.7, "dumbbell": 0.9, "hexagonal": 0.6}  # SrTiO3 B site, GaAs, GaN-like
AMORPHOUS_SPACING = 0.4  # mean blob spacing of an amorphous phase, in its period_px
AMORPHOUS_INTENSITY = (0.1, 0.4)  # blob peak heights, uniform
NEAR_PERIODS = 1.05  # near_defect radius around a vacancy, in periods (nearest neighbours included)
DEFECT_KINDS = ("intact", "vacancy", "partial", "dopant", "lighter", "adatom")  # params["defects"]["kind"] indexes this
DOPANT_GAIN = (1.4, 2.0)  # a heavier substitution's intensity / the host column's (La, Bi on Sr-like)
PARTIAL_RANGE = (0.2, 0.6)  # a partly empty column's intensity / the host column's (build_scene's default)
LIGHTER_GAIN = (0.4, 0.8)  # a lighter substitution's intensity / the host column's
ADATOM_INTENSITY = (0.1, 0.4)  # an adatom's peak (a weak extra column at an interstitial site), absolute
_INTERSTITIAL = {  # an empty site of each structure (period units along e1, e2), where adatoms sit
    "perovskite": (0.5, 0.0),  # the cell edge's centre: the O column, dark in HAADF
    "dumbbell": (0.5, 0.0),  # the channel between dumbbells
    "hexagonal": (0.0, 0.0),  # the hexagon's centre
}
MIN_SEPARATION = 0.3  # columns of a later phase closer than this (x its period) to an earlier one are dropped

# Default ranges. A (lo, hi) tuple is drawn uniformly (log-uniformly for period_px and dose);
# a number is used as is. Widths, blur and drift scale with the period / frame height.
SCENE_RANGES: dict[str, Any] = {
    "period_px": (6.0, 20.0),
    "width_frac": (0.10, 0.16),  # column Gaussian sigma / period
    "blur_frac": (0.0, 0.10),  # probe Gaussian sigma / period
    "drift_frac": (0.0, 0.02),  # drift over the whole frame / frame height, random direction
    "vacancy_frac": (0.0, 0.02),  # fraction of crystal columns that are vacancies (half empty, half partial)
    "partial_intensity": (0.2, 0.8),  # a partial vacancy's intensity / its host's, uniform (a range, not drawn)
    "dopant_frac": (0.0, 0.02),  # fraction of brightest-sublattice columns that are heavier substitutions
    "dopant_gain": (1.2, 2.0),  # their intensity / the host's, uniform (a range, not drawn)
    "lighter_frac": (0.0, 0.02),  # fraction of crystal columns that are lighter substitutions
    "lighter_gain": LIGHTER_GAIN,  # their intensity / the host's, uniform (a range, not drawn)
    "adatom_frac": (0.0, 0.01),  # adatoms per brightest-sublattice column, at interstitial sites
    "adatom_intensity": ADATOM_INTENSITY,  # their peak, uniform (a range, not drawn)
    "intensity_cv": (0.02, 0.06),  # column-to-column intensity variation
    "mismatch": (0.85, 1.15),  # period ratio of the second crystal at an interface
    "misorientation_deg": (5.0, 40.0),  # rotation between the grains at a grain boundary
    "layouts": LAYOUTS,
    "structures": STRUCTURES,
}
NOISE_RANGES: dict[str, Any] = {
    "dose": (2.0, 200.0),  # expected counts for a clean value of 1 (brightest column peak before blur)
    "gain_cv": (0.2, 0.5),  # coefficient of variation of the detector's gain per counted electron
    "read_sigma": (0.0, 0.5),  # Gaussian read noise, in counts
    "line_jitter_px": (0.0, 0.5),
    "line_gain": (0.0, 0.06),
    "line_offset": (0.0, 0.02),  # per-line offset flicker, clean units
}
_LOG_UNIFORM = ("period_px", "dose")
_RANGE_KEYS = ("partial_intensity", "dopant_gain", "lighter_gain", "adatom_intensity")  # passed on as (lo, hi)


@dataclass(frozen=True)
class Phase:
    """What fills one region: a crystal (structure, period, rotation, origin) or amorphous / vacuum.

    `second` is the peak of the second column type (perovskite B site, the dumbbell's lighter
    column, the hexagonal B sublattice), default `SECOND_DEFAULTS`. `rp_fault_at`
    (perovskite only) puts `stemd.sim.lattice`'s Ruddlesden-Popper fault through the A-site plane
    nearest that (y, x). For amorphous, `period_px` sets the blob spacing (x AMORPHOUS_SPACING).
    """

    kind: str = "perovskite"
    period_px: float = 10.0
    rotation_deg: float = 0.0
    offset_px: tuple[float, float] = (0.0, 0.0)
    second: float | None = None
    rp_fault_at: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in PHASE_KINDS:
            raise ValueError(f"kind: unknown phase {self.kind!r}; expected one of {PHASE_KINDS}")
        if not (math.isfinite(self.period_px) and self.period_px > 2):
            raise ValueError(f"period_px: must be a finite number > 2, got {self.period_px!r}")
        if self.rp_fault_at is not None and self.kind != "perovskite":
            raise ValueError(f"rp_fault_at: only a perovskite has a Ruddlesden-Popper fault, not {self.kind!r}")


@dataclass(frozen=True)
class Cut:
    """A straight boundary: points p with (p - point) . (sin a, cos a) > 0 lie beyond it."""

    point: tuple[float, float]  # (y, x) in specimen (undrifted) pixels
    angle_deg: float  # direction of the normal, atan2(ny, nx)


@dataclass(frozen=True)
class Scene:
    """A clean target image and its ground truth; positions are where the target shows them."""

    clean: np.ndarray  # (H, W) float32: blurred, drifted, noise- and artefact-free
    columns: np.ndarray  # (N, 2) float64 (y, x) of every crystal column centre inside the frame
    intensities: np.ndarray  # (N,) float64 peak heights before blur (brightest ~1)
    near_defect: np.ndarray  # (N,) bool: within ~1 period of a fault, boundary or vacancy
    amorphous: np.ndarray  # (H, W) bool
    vacuum: np.ndarray  # (H, W) bool
    region: np.ndarray  # (H, W) int8: index into params["phases"] of the phase each pixel shows
    params: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- drawing parameters


def _draw(name: str, spec: Any, rng: np.random.Generator) -> float:
    """A number from a fixed value or a (lo, hi) range (log-uniform for period and dose)."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        value = float(spec)
        if not math.isfinite(value):
            raise ValueError(f"{name}: must be finite, got {spec!r}")
        return value
    try:
        lo, hi = (float(v) for v in spec)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number or a (lo, hi) pair, got {spec!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"{name}: need finite lo <= hi, got {spec!r}")
    if name in _LOG_UNIFORM:
        if lo <= 0:
            raise ValueError(f"{name}: a log-uniform range needs lo > 0, got {spec!r}")
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return float(rng.uniform(lo, hi))


def _pair(name: str, spec: Any, low: float = 0.0) -> tuple[float, float]:
    """A (lo, hi) range with low <= lo <= hi, both finite, or ValueError naming `name`."""
    try:
        lo, hi = (float(v) for v in spec)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a (lo, hi) pair, got {spec!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and low <= lo <= hi):
        raise ValueError(f"{name}: need finite {low:g} <= lo <= hi, got {spec!r}")
    return lo, hi


def _merge(defaults: Mapping[str, Any], given: Mapping[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown {what} parameter; expected one of {sorted(defaults)}")
    return {**defaults, **given}


def draw_noise(rng: np.random.Generator, **noise: Any) -> dict[str, float]:
    """Concrete instrument parameters: NOISE_RANGES, overridden by numbers or (lo, hi) ranges."""
    spec = _merge(NOISE_RANGES, noise, "noise")
    out = {name: _draw(name, spec[name], rng) for name in NOISE_RANGES}
    if out["dose"] <= 0:
        raise ValueError(f"dose: must be > 0, got {out['dose']!r}")
    for name, value in out.items():
        if value < 0:
            raise ValueError(f"{name}: must be >= 0, got {value!r}")
    return out


# ---------------------------------------------------------------- geometry


def _frame_bounds(shape: tuple[int, int], margin: float) -> np.ndarray:
    h, w = shape
    return np.array([[-margin, -margin], [-margin, w + margin], [h + margin, -margin], [h + margin, w + margin]])


def _inside(pos: np.ndarray, shape: tuple[int, int], margin: float) -> np.ndarray:
    h, w = shape
    return (pos[:, 0] >= -margin) & (pos[:, 0] <= h + margin) & (pos[:, 1] >= -margin) & (pos[:, 1] <= w + margin)


def _in_frame(pos: np.ndarray, shape: tuple[int, int], mask: bool = False) -> np.ndarray:
    """The positions (or a mask of those) whose nearest pixel is in the frame: [-1/2, H - 1/2) x [-1/2, W - 1/2)."""
    ok = (pos[:, 0] >= -0.5) & (pos[:, 0] < shape[0] - 0.5) & (pos[:, 1] >= -0.5) & (pos[:, 1] < shape[1] - 0.5)
    return ok if mask else pos[ok]


def _crystal(phase: Phase, shape: tuple[int, int], margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Specimen (y, x) of every column of `phase` near the frame, its sublattice (0/1), near-fault flag."""
    if phase.rp_fault_at is not None:
        return _rp_crystal(phase, shape, margin)
    a = float(phase.period_px)
    e = np.stack(_basis(phase.rotation_deg))  # rows e1, e2 in (y, x)
    origin = np.asarray(phase.offset_px, dtype=np.float64)
    c = (_frame_bounds(shape, margin) - origin) @ e.T / a  # corners in period units along e1, e2
    cell = CELLS[phase.kind]
    f = c @ np.linalg.inv(cell)
    i = np.arange(math.floor(f[:, 0].min()) - 2, math.ceil(f[:, 0].max()) + 3)
    j = np.arange(math.floor(f[:, 1].min()) - 2, math.ceil(f[:, 1].max()) + 3)
    ij = np.stack(np.meshgrid(i, j, indexing="ij"), axis=-1).reshape(-1, 2).astype(np.float64)
    motif = np.array(_MOTIFS[phase.kind])
    sites = (ij @ cell)[:, None, :] + motif[None, :, :2]
    pos = origin + a * (sites.reshape(-1, 2) @ e)
    sub = np.broadcast_to(motif[:, 2].astype(np.int8), sites.shape[:2]).ravel()
    keep = _inside(pos, shape, margin)
    return pos[keep], sub[keep], np.zeros(int(keep.sum()), dtype=bool)


def _rp_crystal(phase: Phase, shape: tuple[int, int], margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`synthetic`'s RP-faulted perovskite, its fault moved to the A plane nearest `rp_fault_at`.

    synthetic puts the fault through its frame centre, so it is asked for a frame (h + 2|dy|,
    w + 2|dx|) whose centre is the requested point, and the result shifted back.
    """
    h, w = shape
    fy, fx = phase.rp_fault_at  # type: ignore[misc]
    dy, dx = round(fy - (h - 1) / 2), round(fx - (w - 1) / 2)
    shift = np.array([abs(dy) - dy, abs(dx) - dx], dtype=np.float64)  # our frame's origin in theirs
    origin = tuple(np.asarray(phase.offset_px, dtype=np.float64) + shift)
    big = (h + 2 * abs(dy), w + 2 * abs(dx))
    pos, peak, near = _lattice_columns(big, phase.period_px, phase.rotation_deg, origin, margin, "rp", RP_GAP)
    pos = pos - shift
    keep = _inside(pos, shape, margin)
    sub = np.where(peak == PAPER_INTENSITIES[0], 0, 1).astype(np.int8)
    return pos[keep], sub[keep], near[keep]


def _amorphous(phase: Phase, shape: tuple[int, int], margin: float, rng: np.random.Generator) -> np.ndarray:
    """Random close-packed blob centres: Poisson points thinned so no two are within 0.6 spacing."""
    s = AMORPHOUS_SPACING * phase.period_px
    h, w = shape
    area = (h + 2 * margin) * (w + 2 * margin)
    n = rng.poisson(1.6 * area / (s * s))
    pts = rng.uniform((-margin, -margin), (h + margin, w + margin), (n, 2))
    pairs = cKDTree(pts).query_pairs(0.6 * s, output_type="ndarray")
    drop = np.zeros(n, dtype=bool)
    drop[pairs.max(axis=1)] = True
    return pts[~drop]


def _labels(points: np.ndarray, cuts: list[Cut]) -> np.ndarray:
    """The phase index at each specimen point: cut k paints everything beyond it with phase k + 1."""
    lab = np.zeros(points.shape[:-1], dtype=np.int8)
    for k, cut in enumerate(cuts):
        t = math.radians(cut.angle_deg)
        beyond = (points[..., 0] - cut.point[0]) * math.sin(t) + (points[..., 1] - cut.point[1]) * math.cos(t) > 0
        lab[beyond] = k + 1
    return lab


def _near_boundary(pos: np.ndarray, lab: np.ndarray, radius: np.ndarray, cuts: list[Cut]) -> np.ndarray:
    """True where a point `radius` away (8 directions) lies in another phase."""
    near = np.zeros(len(pos), dtype=bool)
    if not cuts:
        return near
    for t in np.arange(8) * (math.pi / 4):
        probe = pos + radius[:, None] * np.array([math.sin(t), math.cos(t)])
        near |= _labels(probe, cuts) != lab
    return near


# ---------------------------------------------------------------- rendering


def _render(shape: tuple[int, int], pos: np.ndarray, amp: np.ndarray, sigma: float, k: tuple[float, float],
            chunk: int = 4096) -> np.ndarray:
    """Sum of round Gaussians amp * exp(-|p - p0|^2 / 2 sigma^2) seen through a linear scan drift.

    Pixel (r, c) sees the specimen point (r (1 - ky), c - kx r); each Gaussian is evaluated on its
    own +-4.5 sigma neighbourhood and the sums are accumulated band by band with `np.bincount`.
    """
    h, w = shape
    ky, kx = k
    reach = math.ceil(4.5 * sigma * (1 + abs(kx)) / (1 - abs(ky))) + 1
    pad = 2 * reach + 2
    hp, wp = h + 2 * pad, w + 2 * pad
    y = pos[:, 0] / (1 - ky)
    x = pos[:, 1] + kx * y
    ok = (y > -reach - 1) & (y < h + reach) & (x > -reach - 1) & (x < w + reach)
    order = np.argsort(y[ok], kind="stable")  # row bands: each chunk touches a narrow band of rows
    y0, x0, y, x, amp = pos[ok, 0][order], pos[ok, 1][order], y[ok][order], x[ok][order], amp[ok][order]
    canvas = np.zeros(hp * wp, dtype=np.float32)
    off = np.arange(-reach, reach + 1)
    c = np.float32(-0.5 / sigma**2)
    for start in range(0, len(y), chunk):
        sl = slice(start, start + chunk)
        rows = np.round(y[sl]).astype(np.intp)[:, None] + off  # (n, K)
        cols = np.round(x[sl]).astype(np.intp)[:, None] + off
        dy = (rows * (1 - ky) - y0[sl, None]).astype(np.float32)
        dx = (cols - x0[sl, None]).astype(np.float32)[:, None, :]  # (n, 1, K)
        if kx:
            dx = dx - (np.float32(kx) * rows.astype(np.float32))[:, :, None]  # sheared: (n, K, K)
        gy = np.exp(c * dy * dy) * amp[sl, None].astype(np.float32)
        val = gy[:, :, None] * np.exp(c * dx * dx)
        flat = ((rows + pad) * wp)[:, :, None] + (cols + pad)[:, None, :]
        lo, hi = (int(rows[:, 0].min()) + pad) * wp, (int(rows[:, -1].max()) + pad + 1) * wp
        canvas[lo:hi] += np.bincount((flat - lo).ravel(), weights=np.broadcast_to(val, flat.shape).ravel(),
                                     minlength=hi - lo).astype(np.float32)
    return canvas.reshape(hp, wp)[pad:pad + h, pad:pad + w].copy()


def build_scene(
    shape: tuple[int, int],
    phases: list[Phase],
    cuts: list[Cut],
    rng: np.random.Generator,
    *,
    sigma_px: float,
    blur_px: float = 0.0,
    drift_px: tuple[float, float] = (0.0, 0.0),
    vacancy_frac: float = 0.0,
    intensity_cv: float = 0.0,
    layout: str = "custom",
    dopant_frac: float = 0.0,
    dopant_gain: tuple[float, float] = DOPANT_GAIN,
    partial_range: tuple[float, float] = PARTIAL_RANGE,
    lighter_frac: float = 0.0,
    lighter_gain: tuple[float, float] = LIGHTER_GAIN,
    adatom_frac: float = 0.0,
    adatom_intensity: tuple[float, float] = ADATOM_INTENSITY,
) -> Scene:
    """A scene of `phases` separated by `cuts` (phase k + 1 beyond cut k), rendered as the target.

    Columns are Gaussians of sigma `sigma_px`; the probe blur (Gaussian, `blur_px`) is applied
    exactly by widening them to sqrt(sigma^2 + blur^2) at constant integrated intensity. Drift is
    synthetic's row-by-row drift: row r sees the specimen displaced by drift * r / (H - 1).
    A fraction `vacancy_frac` of the crystal columns are vacancies: half removed, half kept at
    uniform `partial_range` of their intensity; each column's intensity is scaled by 1 + N(0, intensity_cv).
    A fraction `dopant_frac` of the remaining brightest-sublattice columns are heavier substitutions,
    their intensity times uniform `dopant_gain`; then `lighter_frac` of the remaining columns lighter ones
    (times `lighter_gain`), and `adatom_frac` adatoms per brightest-sublattice column of each unfaulted
    crystal, weak columns (peak uniform `adatom_intensity`) at its interstitial site (each drawn only when
    asked for: a scene without them is unchanged). params["defects"] lists every point defect for `host_clean`.
    """
    h, w = (int(v) for v in shape)
    if h < 2 or w < 2:
        raise ValueError(f"shape: need at least 2 x 2 pixels, got {shape!r}")
    if len(phases) != len(cuts) + 1:
        raise ValueError(f"phases: need one more phase than cuts, got {len(phases)} and {len(cuts)}")
    if not 0 <= dopant_frac <= 1 or not 0 < dopant_gain[0] <= dopant_gain[1]:
        raise ValueError(f"need 0 <= dopant_frac <= 1 and 0 < dopant_gain[0] <= dopant_gain[1]; got "
                         f"{dopant_frac!r}, {dopant_gain!r}")
    for name, frac in (("lighter_frac", lighter_frac), ("adatom_frac", adatom_frac)):
        if not 0 <= frac <= 1:
            raise ValueError(f"{name}: must be in [0, 1], got {frac!r}")
    partial_range, lighter_gain, adatom_intensity = (
        _pair(n, v) for n, v in (("partial_range", partial_range), ("lighter_gain", lighter_gain),
                                 ("adatom_intensity", adatom_intensity)))
    if not (sigma_px > 0 and blur_px >= 0 and 0 <= vacancy_frac <= 1 and intensity_cv >= 0):
        raise ValueError(f"need sigma_px > 0, blur_px >= 0, 0 <= vacancy_frac <= 1, intensity_cv >= 0; got "
                         f"{sigma_px!r}, {blur_px!r}, {vacancy_frac!r}, {intensity_cv!r}")
    k = (float(drift_px[0]) / (h - 1), float(drift_px[1]) / (h - 1))
    if abs(k[0]) >= 0.5 or abs(k[1]) >= 0.5:
        raise ValueError(f"drift_px: drift {tuple(drift_px)} too large for {h} rows")
    sigma = math.hypot(sigma_px, blur_px)
    margin = math.ceil(4.5 * sigma) + 2 + abs(drift_px[0]) + abs(drift_px[1])

    pos_l, amp_l, near_l, per_l, lab_l, site_l = [], [], [], [], [], []
    blobs = []
    support: dict[float, np.ndarray] = {}  # amorphous phases of one spacing share one set of blobs
    for index, phase in enumerate(phases):
        if phase.kind == "vacuum":
            continue
        if phase.kind == "amorphous":
            if phase.period_px not in support:
                support[phase.period_px] = _amorphous(phase, (h, w), margin, rng)
            pts = support[phase.period_px]
            blobs.append(pts[_labels(pts, cuts) == index])
            continue
        pos, sub, near = _crystal(phase, (h, w), margin)
        mine = _labels(pos, cuts) == index
        second = SECOND_DEFAULTS[phase.kind] if phase.second is None else float(phase.second)
        pos_l.append(pos[mine])
        amp_l.append(np.where(sub[mine] == 0, 1.0, second))
        near_l.append(near[mine])
        per_l.append(np.full(int(mine.sum()), float(phase.period_px)))
        lab_l.append(np.full(int(mine.sum()), index, dtype=np.int8))
        site_l.append(sub[mine])
    pos = np.concatenate(pos_l) if pos_l else np.zeros((0, 2))
    amp = np.concatenate(amp_l) if amp_l else np.zeros(0)
    near = np.concatenate(near_l) if near_l else np.zeros(0, dtype=bool)
    period = np.concatenate(per_l) if per_l else np.zeros(0)
    lab = np.concatenate(lab_l) if lab_l else np.zeros(0, dtype=np.int8)
    site = np.concatenate(site_l) if site_l else np.zeros(0, dtype=np.int8)

    # a later phase's columns that crowd an earlier phase's are dropped (boundaries in place of overlaps)
    if len(pos) and len(cuts):
        keep = np.ones(len(pos), dtype=bool)
        for index in np.unique(lab)[1:]:
            earlier = keep & (lab < index)
            if earlier.any():
                d, _ = cKDTree(pos[earlier]).query(pos[lab == index])
                keep[np.flatnonzero(lab == index)[d < MIN_SEPARATION * period[lab == index]]] = False
        pos, amp, near, period, lab, site = pos[keep], amp[keep], near[keep], period[keep], lab[keep], site[keep]
    near |= _near_boundary(pos, lab, period, cuts)
    amp = amp * np.clip(1 + intensity_cv * rng.standard_normal(len(amp)), 0.5, 1.5)

    vacancies = weakened = np.zeros((0, 2))
    host = amp.copy()
    kind = np.zeros(len(pos), dtype=np.int8)  # index into DEFECT_KINDS, 0: intact
    if vacancy_frac > 0 and len(pos):
        hit = rng.random(len(pos)) < vacancy_frac
        removed = hit & (rng.random(len(pos)) < 0.5)
        amp = np.where(hit & ~removed, amp * rng.uniform(*partial_range, len(pos)), amp)
        if hit.any():
            near |= cKDTree(pos[hit]).query(pos)[0] <= NEAR_PERIODS * period
        kind[removed], kind[hit & ~removed] = 1, 2
        vacancies, weakened = pos[removed], pos[hit & ~removed]
    if dopant_frac > 0 and len(pos):
        dope = (site == 0) & (kind == 0) & (rng.random(len(pos)) < dopant_frac)
        amp = np.where(dope, amp * rng.uniform(*dopant_gain, len(pos)), amp)
        if dope.any():
            near |= cKDTree(pos[dope]).query(pos)[0] <= NEAR_PERIODS * period
        kind[dope] = 3
    if lighter_frac > 0 and len(pos):
        light = (kind == 0) & (rng.random(len(pos)) < lighter_frac)
        amp = np.where(light, amp * rng.uniform(*lighter_gain, len(pos)), amp)
        if light.any():
            near |= cKDTree(pos[light]).query(pos)[0] <= NEAR_PERIODS * period
        kind[light] = 4
    if adatom_frac > 0 and len(pos):
        add = _adatoms(phases, cuts, pos, lab, site, adatom_frac, rng)
        if len(add):
            m, a_lab = len(add), _labels(add, cuts)
            a_per = np.array([phases[i].period_px for i in a_lab])
            near |= cKDTree(add).query(pos)[0] <= NEAR_PERIODS * period
            pos, period, lab = np.concatenate([pos, add]), np.concatenate([period, a_per]), np.concatenate([lab, a_lab])
            amp = np.concatenate([amp, rng.uniform(*adatom_intensity, m)])
            host, near = np.concatenate([host, np.zeros(m)]), np.concatenate([near, np.ones(m, dtype=bool)])
            site, kind = np.concatenate([site, np.full(m, 2, np.int8)]), np.concatenate([kind, np.full(m, 5, np.int8)])
    missing = np.where(kind == 1, host, host - amp)
    defect_pos, defect_delta, defect_kind = pos[kind > 0], missing[kind > 0], kind[kind > 0]
    if vacancy_frac > 0 and len(pos):
        pos, amp, near = pos[kind != 1], amp[kind != 1], near[kind != 1]

    blob_pos = np.concatenate(blobs) if blobs else np.zeros((0, 2))
    if len(blob_pos) and len(pos):
        d, _ = cKDTree(pos).query(blob_pos)
        blob_pos = blob_pos[d >= MIN_SEPARATION * float(np.min(period))]
    blob_amp = rng.uniform(*AMORPHOUS_INTENSITY, len(blob_pos))
    peak_scale = (sigma_px / sigma) ** 2
    clean = _render((h, w), np.concatenate([pos, blob_pos]), np.concatenate([amp, blob_amp]) * peak_scale, sigma, k)

    if cuts:
        rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
        region = _labels(np.stack([rr * np.float32(1 - k[0]), cc - np.float32(k[1]) * rr], axis=-1), cuts)
    else:
        region = np.zeros((h, w), dtype=np.int8)
    kinds = [p.kind for p in phases]

    def seen(p: np.ndarray) -> np.ndarray:  # where the drifting scan shows a specimen point
        y = p[:, 0] / (1 - k[0])
        return np.stack([y, p[:, 1] + k[1] * y], axis=1)

    columns = seen(pos)
    inside = _in_frame(columns, (h, w), mask=True)
    params = {
        "layout": layout,
        "phases": [asdict(p) for p in phases],
        "cuts": [asdict(c) for c in cuts],
        "sigma_px": float(sigma_px),
        "blur_px": float(blur_px),
        "target_sigma_px": float(sigma),
        "peak_scale": float(peak_scale),
        "drift_px": (float(drift_px[0]), float(drift_px[1])),
        "vacancy_frac": float(vacancy_frac),
        "intensity_cv": float(intensity_cv),
        "vacancies": _in_frame(seen(vacancies), (h, w)),  # (M, 2) where removed columns would be seen
        "weakened": _in_frame(seen(weakened), (h, w)),  # (M, 2) columns kept at 0.2-0.6 of their intensity
        "dopant_frac": float(dopant_frac),
        "dopant_gain": (float(dopant_gain[0]), float(dopant_gain[1])),
        "defects": {  # every point defect, also outside the frame: `host_clean` undoes them
            "specimen": defect_pos,  # (M, 2) specimen (undrifted) position
            "seen": seen(defect_pos),  # (M, 2) where the target shows it
            "kind": defect_kind,  # (M,) index into DEFECT_KINDS
            "missing": defect_delta,  # (M,) host peak - actual peak, before blur (< 0: a dopant)
        },
    }
    return Scene(
        clean=clean,
        columns=columns[inside],
        intensities=amp[inside].astype(np.float64),
        near_defect=near[inside],
        amorphous=np.array([kd == "amorphous" for kd in kinds])[region],
        vacuum=np.array([kd == "vacuum" for kd in kinds])[region],
        region=region,
        params=params,
    )


def _adatoms(phases: list[Phase], cuts: list[Cut], pos: np.ndarray, lab: np.ndarray, site: np.ndarray,
             frac: float, rng: np.random.Generator) -> np.ndarray:
    """Specimen (y, x) of adatoms: each brightest-sublattice column of an unfaulted crystal, with chance `frac`,
    gives one at the interstitial site beside it, kept if it stays in its phase and clear of every column."""
    out = []
    for index, phase in enumerate(phases):
        if phase.kind not in STRUCTURES or phase.rp_fault_at is not None:
            continue
        hosts = pos[(lab == index) & (site == 0)]
        pick = hosts[rng.random(len(hosts)) < frac]
        step = np.asarray(_INTERSTITIAL[phase.kind]) - np.asarray(_MOTIFS[phase.kind][0][:2])
        cand = pick + phase.period_px * (step @ np.stack(_basis(phase.rotation_deg)))
        out.append(cand[_labels(cand, cuts) == index])
    add = np.concatenate(out) if out else np.zeros((0, 2))
    if len(add) and len(pos):
        spacing = np.array([phases[i].period_px for i in _labels(add, cuts)])
        clear = cKDTree(pos).query(add)[0] >= MIN_SEPARATION * spacing
        add = add[clear]
    return add


def host_clean(scene: Scene) -> np.ndarray:
    """The scene's clean image with every point defect undone: vacancies filled, dopants back to host."""
    d = scene.params["defects"]
    h, w = scene.clean.shape
    k = (scene.params["drift_px"][0] / (h - 1), scene.params["drift_px"][1] / (h - 1))
    add = _render((h, w), d["specimen"], d["missing"] * scene.params["peak_scale"], scene.params["target_sigma_px"], k)
    return scene.clean + add


def _choose(name: str, options: Any, allowed: tuple[str, ...], rng: np.random.Generator) -> str:
    options = (options,) if isinstance(options, str) else tuple(options)
    bad = [o for o in options if o not in allowed]
    if not options or bad:
        raise ValueError(f"{name}: expected a non-empty choice from {allowed}, got {options!r}")
    return str(options[rng.integers(len(options))])


def random_scene(shape: tuple[int, int], rng: np.random.Generator, **ranges: Any) -> Scene:
    """A random scene: layout, structures, period, rotation, widths, drift and defects drawn from
    SCENE_RANGES, each overridable by a number or a (lo, hi) range (`layouts`, `structures`: names).

    Layouts: perfect (one crystal), rp (perovskite with an RP fault), interface (two structures),
    grain_boundary (one structure, two rotations), amorphous / vacuum (crystal beside it),
    mixed (crystal, amorphous and vacuum), particle (a crystal disc, an irregular octagon, on an
    amorphous support) and grains (3-4 grains of one structure). Every crystal layout also gets
    random point defects: vacancies (empty or partial), heavier and lighter substitutions, adatoms.
    """
    spec = _merge(SCENE_RANGES, ranges, "scene")
    h, w = (int(v) for v in shape)
    layout = _choose("layouts", spec["layouts"], LAYOUTS, rng)
    kind = _choose("structures", spec["structures"], STRUCTURES, rng)
    a = _draw("period_px", spec["period_px"], rng)
    if not 2 < a:
        raise ValueError(f"period_px: must be > 2, got {a!r}")
    width, blur = (_draw(n, spec[n], rng) * a for n in ("width_frac", "blur_frac"))
    drift = _draw("drift_frac", spec["drift_frac"], rng) * h
    t = rng.uniform(0, 2 * math.pi)
    vacancy_frac, intensity_cv = (_draw(n, spec[n], rng) for n in ("vacancy_frac", "intensity_cv"))
    rotation = rng.uniform(0.0, 360.0)
    defects = {n: _draw(n, spec[n], rng) for n in ("dopant_frac", "lighter_frac", "adatom_frac")}
    for n in defects:
        if not 0 <= defects[n] <= 1:
            raise ValueError(f"{n}: must be in [0, 1], got {defects[n]!r}")
    ranges = {n: _pair(n, spec[n], 1e-6) for n in _RANGE_KEYS}

    def crystal(kind: str, period: float, rotation: float, **extra: Any) -> Phase:
        offset = (float(rng.uniform(0, period)), float(rng.uniform(0, period)))
        return Phase(kind, period, rotation, offset, float(rng.uniform(*SECOND_RANGES[kind])), **extra)

    def cut() -> Cut:
        return Cut((rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w), rng.uniform(0.0, 360.0))

    cuts: list[Cut]
    if layout == "rp":
        fault = (rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w)
        phases, cuts = [crystal("perovskite", a, rotation, rp_fault_at=fault)], []
    else:
        phases, cuts = [crystal(kind, a, rotation)], []
    if layout == "interface":
        others = [s for s in spec["structures"] if s != kind] or [kind]
        other = str(others[rng.integers(len(others))])
        a2 = a * _draw("mismatch", spec["mismatch"], rng)
        if not isinstance(spec["period_px"], (int, float)):
            a2 = float(np.clip(a2, *spec["period_px"]))  # stays in the period range
        phases.append(crystal(other, a2, rng.uniform(0.0, 360.0)))
        cuts.append(cut())
    elif layout == "grain_boundary":
        turn = _draw("misorientation_deg", spec["misorientation_deg"], rng) * rng.choice([-1, 1])
        phases.append(crystal(kind, a, rotation + turn))
        cuts.append(cut())
    elif layout in ("amorphous", "vacuum"):
        phases.append(Phase(layout, a))
        cuts.append(cut())
    elif layout == "mixed":
        phases += [Phase("amorphous", a), Phase("vacuum", a)]
        cuts += [cut(), cut()]
    elif layout == "particle":
        centre = (rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w)
        radius = rng.uniform(0.2, 0.4) * min(h, w)
        start = rng.uniform(0.0, 45.0)
        for side in range(8):
            angle = start + 45.0 * side
            r = radius * rng.uniform(0.9, 1.1)
            t_side = math.radians(angle)
            cuts.append(Cut((centre[0] + r * math.sin(t_side), centre[1] + r * math.cos(t_side)), angle))
            phases.append(Phase("amorphous", a))
    elif layout == "grains":
        for _ in range(int(rng.integers(2, 4))):
            turn = _draw("misorientation_deg", spec["misorientation_deg"], rng) * rng.choice([-1, 1])
            phases.append(crystal(kind, a, rotation + turn))
            cuts.append(cut())
    return build_scene((h, w), phases, cuts, rng, sigma_px=width, blur_px=blur,
                       drift_px=(drift * math.sin(t), drift * math.cos(t)), vacancy_frac=vacancy_frac,
                       intensity_cv=intensity_cv, layout=layout, dopant_frac=defects["dopant_frac"],
                       dopant_gain=ranges["dopant_gain"], partial_range=ranges["partial_intensity"],
                       lighter_frac=defects["lighter_frac"], lighter_gain=ranges["lighter_gain"],
                       adatom_frac=defects["adatom_frac"], adatom_intensity=ranges["adatom_intensity"])


# ---------------------------------------------------------------- the instrument


def scan_artefacts(image: np.ndarray, rng: np.random.Generator, noise: Mapping[str, float]) -> np.ndarray:
    """Line jitter and line gain flicker (synthetic.corrupt): the beam misplaced / its current varying."""
    x = np.asarray(image, dtype=np.float32)
    if noise["line_jitter_px"] > 0 or noise["line_gain"] > 0:
        spec = NoiseSpec(kind="none", line_jitter_px=noise["line_jitter_px"], line_gain=noise["line_gain"])
        x = corrupt(x, spec, rng)
    return x


def detect(signal: np.ndarray, rng: np.random.Generator, noise: Mapping[str, float],
           dose: float | np.ndarray | None = None) -> np.ndarray:
    """Counting and the detector chain, in the signal's units, float32: Poisson counts at `dose`
    per unit, each count weighted by a Gamma(1/cv^2, cv^2) gain, line offset flicker, read noise.

    `dose` (broadcastable to the leading axes, e.g. (n, 1, 1)) overrides noise["dose"].
    """
    d = np.asarray(noise["dose"] if dose is None else dose, dtype=np.float64)
    cv, read = float(noise["gain_cv"]), float(noise["read_sigma"])
    counts = rng.poisson(np.maximum(signal, 0, dtype=np.float64) * d)
    if cv > 0:  # the sum of n Gamma(k, t) gains is Gamma(n k, t); zero counts stay zero
        y = np.zeros(counts.shape, dtype=np.float32)
        hit = counts > 0
        y[hit] = rng.standard_gamma((counts[hit] * (1 / (cv * cv))).astype(np.float32), dtype=np.float32)
        y *= (cv * cv / d).astype(np.float32)
    else:
        y = (counts / d).astype(np.float32)
    if noise["line_offset"] > 0:
        y = corrupt(y, NoiseSpec(kind="none", line_offset=noise["line_offset"]), rng)
    if read > 0:
        y += rng.standard_normal(y.shape, dtype=np.float32) * (read / d).astype(np.float32)
    return y


def apply_instrument(image: np.ndarray, rng: np.random.Generator, noise: Mapping[str, float],
                     dose: float | np.ndarray | None = None) -> np.ndarray:
    """What the microscope records for a target `image` (..., H, W): `detect(scan_artefacts(.))`."""
    return detect(scan_artefacts(image, rng, noise), rng, noise, dose)


def noise_variance(clean: np.ndarray | float, noise: Mapping[str, float]) -> np.ndarray:
    """Per-pixel variance of `apply_instrument` without line artefacts: x (1 + cv^2) / D + (r / D)^2."""
    d = noise["dose"]
    return np.maximum(clean, 0) * (1 + noise["gain_cv"] ** 2) / d + (noise["read_sigma"] / d) ** 2


def corrupt_scene(scene: Scene, rng: np.random.Generator, dose: float | None = None,
                  **noise: Any) -> tuple[np.ndarray, dict[str, float]]:
    """The noisy frame (float32, the clean's units) and the instrument parameters used.

    Parameters not given are drawn from NOISE_RANGES; give a number to fix one or a (lo, hi)
    range to draw it from (dose log-uniformly).
    """
    if dose is not None:
        noise["dose"] = dose
    params = draw_noise(rng, **noise)
    return apply_instrument(scene.clean, rng, params), params


# ---------------------------------------------------------------- benchmark frames

NAMED_NOISE = {"gain_cv": 0.3, "read_sigma": 0.2, "line_jitter_px": 0.2, "line_gain": 0.01, "line_offset": 0.003}
NOISE_ONLY_LEVEL = 0.25  # the flat signal of the "noise_only" frame


def named_frame(kind: str, shape: tuple[int, int] = (512, 512), seed: int = 0, dose: float = 50.0,
                **noise: Any) -> tuple[np.ndarray, Scene, dict[str, float]]:
    """A deterministic benchmark frame: (noisy, scene, noise parameters). Kinds: NAMED_FRAMES.

    Period 10-12 px, column sigma 0.13 period, probe blur 0.6 px, drift (0.006, 0.004) x H;
    instrument NAMED_NOISE (overridable) at `dose`. "noise_only" is a flat signal of
    NOISE_ONLY_LEVEL: noise and no structure.
    """
    if kind not in NAMED_FRAMES:
        raise ValueError(f"kind: unknown frame {kind!r}; expected one of {NAMED_FRAMES}")
    h, w = (int(v) for v in shape)
    rng = np.random.default_rng([seed, NAMED_FRAMES.index(kind)])
    noise = {**NAMED_NOISE, **noise, "dose": dose}
    centre = ((h - 1) / 2, (w - 1) / 2)

    def crystal(kind: str, period: float, rotation: float, **extra: Any) -> Phase:
        return Phase(kind, period, rotation, (float(rng.uniform(0, period)), float(rng.uniform(0, period))), **extra)

    vacancy_frac = 0.0
    if kind == "noise_only":
        zeros = np.zeros((h, w), dtype=bool)
        scene = Scene(np.full((h, w), NOISE_ONLY_LEVEL, dtype=np.float32), np.zeros((0, 2)), np.zeros(0),
                      np.zeros(0, dtype=bool), zeros, zeros, np.zeros((h, w), dtype=np.int8),
                      {"layout": kind, "level": NOISE_ONLY_LEVEL, "phases": [], "cuts": []})
        noisy, params = corrupt_scene(scene, rng, **noise)
        return noisy, scene, params
    if kind == "perovskite_rp":
        phases, cuts = [crystal("perovskite", 10.0, 3.0, rp_fault_at=centre)], []
    elif kind == "interface":
        phases, cuts = [crystal("perovskite", 10.0, 0.0), crystal("dumbbell", 11.0, 0.0)], [Cut(centre, 5.0)]
    elif kind == "grain_boundary":
        phases, cuts = [crystal("perovskite", 10.0, 8.0), crystal("perovskite", 10.0, 28.0)], [Cut(centre, -4.0)]
    elif kind == "amorphous":
        phases, cuts = [crystal("perovskite", 10.0, 12.0), Phase("amorphous", 10.0)], [Cut((centre[0], 0.4 * w), 10.0)]
    elif kind == "vacuum_edge":
        phases, cuts = [crystal("hexagonal", 12.0, 7.0), Phase("vacuum", 12.0)], [Cut(centre, -70.0)]
    else:  # vacancies
        phases, cuts, vacancy_frac = [crystal("perovskite", 10.0, 15.0)], [], 0.03
    period = phases[0].period_px
    scene = build_scene((h, w), phases, cuts, rng, sigma_px=0.13 * period, blur_px=0.6,
                        drift_px=(0.006 * h, 0.004 * h), vacancy_frac=vacancy_frac, intensity_cv=0.04, layout=kind)
    noisy, params = corrupt_scene(scene, rng, **noise)
    return noisy, scene, params
