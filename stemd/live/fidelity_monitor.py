"""The daemon's live fidelity check (`fidelity.*` settings): how well the model does on the frames it denoises.

Every N-th frame of a series (or as often as a budget in % of the model's time allows) a published frame is
split into two independent half-dose frames (`stemd.compute.fidelity`); one half is denoised by the resident
`Denoiser` and scored against the other, beside a Gaussian reference whose sigma is chosen on the same split;
the residual (the frame as the model was given it, less the output) is checked for lattice. The check runs
after the frame is published, on the engine's thread when it is idle (or once it has waited OVERDUE_FRAMES
frames). A series whose running estimate is below the reference, or whose residual holds lattice, is flagged:
a WARNING (rate-limited), `fidelity.flagged` in its frames' header, the STATUS= line, and with action
`fallback` the reference's output published instead.
"""

from __future__ import annotations

import collections
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stemd.compute import fidelity as fid
from stemd.config import FidelitySettings
from stemd.pipeline import Denoiser, Plan, check_finite

log = logging.getLogger(__name__)

MAX_SERIES = 64  # series whose running estimates are kept (the least recently checked forgotten first)
STATS_SERIES = 16  # series listed in the stats message (the most recently checked)
OVERDUE_FRAMES = 8  # a due check waits for an idle engine at most this many published frames


@dataclass(frozen=True)
class Check:
    """One check of one frame."""

    series_id: str
    frame_id: int
    scores: fid.HeldOut
    residual: float | None  # `fid.residual_ratio`; None: no Bragg band (no lattice, no structure)
    fit: fid.GainFit
    detector: str  # where gain/offset came from: "header" or "fit"
    seconds: float
    valid: bool = True  # False: the frame's noise is correlated (drift-corrected, processed): no valid split


def saturation_of(raw: np.ndarray) -> float | None:
    """An integer dtype's maximum (the detector's saturation), None for floats."""
    return float(np.iinfo(raw.dtype).max) if np.issubdtype(raw.dtype, np.integer) else None


def detector_fit(header: dict[str, Any], raw: np.ndarray, saturation: float | None) -> tuple[fid.GainFit, str]:
    """Gain (raw units per detected electron) and offset (raw units) from the header's `gain` and `offset` when
    both are finite numbers with gain > 0, else fitted to the frame (`fidelity.fit_gain_offset`)."""
    gain, offset = header.get("gain"), header.get("offset")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (gain, offset)) \
            and float(gain) > 0:  # type: ignore[arg-type]
        return fid.GainFit(float(gain), float(offset), 0, int(fid.saturated_mask(raw, saturation).sum())), "header"  # type: ignore[arg-type]
    return fid.fit_gain_offset(raw, saturation), "fit"


def check_frame(denoiser: Denoiser, raw: np.ndarray, denoised: np.ndarray, plan: Plan, header: dict[str, Any],
                rng: np.random.Generator) -> Check:
    """Split `raw`, denoise half A with `denoiser` run by `plan`, score it against half B beside the reference,
    and check the residual for lattice: the frame as the model was given it (`Denoiser.prepared`: the line-jitter
    and stripe corrections are the pipeline's, not signal lost) less the published output. Engine thread only."""
    t0 = time.perf_counter()
    saturation = saturation_of(raw)
    fit, source = detector_fit(header, raw, saturation)
    counts = fid.to_counts(raw, fit)
    mask = ~fid.dilate(fid.saturated_mask(raw, saturation), 3)
    valid = not fid.correlated(fid.noise_flatness(np.where(mask, raw, np.median(raw))))
    y1, y2 = fid.thin(counts, rng)
    with torch.inference_mode():
        half = torch.from_numpy(y1.astype(np.float32))[None].to(denoiser.device)
        f1 = denoiser.run(half, plan)[0].cpu().numpy()
        given = denoiser.prepared(torch.from_numpy(np.ascontiguousarray(raw))[None].to(denoiser.device), plan)
    check_finite(f1)
    level = plan.lines if plan.stripes and denoiser.settings.destripe else None  # stripes removed on purpose
    scores, _ = fid.held_out(y1, y2, f1, mask, level=level)
    residual = fid.residual_ratio((given[0].cpu().numpy().astype(np.float64) - fit.offset) / fit.gain,
                                  (np.asarray(denoised, np.float64) - fit.offset) / fit.gain, y1 - y2, mask)
    return Check(str(header.get("series_id", "")), int(header.get("frame_id", -1)), scores, residual, fit, source,
                 time.perf_counter() - t0, valid)


def reference_frame(raw: np.ndarray, sigma: float) -> np.ndarray:
    """The fallback output: `raw` (saturated pixels set to the median of the rest) Gaussian-filtered with the
    sigma the series' last check chose, float32 in raw units."""
    x = np.asarray(raw, np.float64)
    bad = fid.saturated_mask(raw, saturation_of(raw))
    if bad.any():
        x = np.where(bad, np.median(x[~bad]) if (~bad).any() else 0.0, x)
    return fid.gaussian(x, sigma).astype(np.float32)


@dataclass
class SeriesFidelity:
    """One series' running estimates and flag."""

    window: int
    gain: fid.Running = field(init=False)
    over_reference: fid.Running = field(init=False)
    residual: fid.Running = field(init=False)
    checks: int = 0
    invalid: int = 0  # checks left out: the frame's noise was correlated, so its split ranks nothing
    flagged: bool = False
    reasons: list[str] = field(default_factory=list)
    sigma: float | None = None  # the reference's sigma at the last check
    detector: str = ""
    warned_at: float = -math.inf

    def __post_init__(self) -> None:
        self.gain, self.over_reference, self.residual = (fid.Running(self.window) for _ in range(3))


@dataclass
class Due:
    """A frame waiting for its check."""

    header: dict[str, Any]
    raw: np.ndarray
    denoised: np.ndarray
    plan: Plan
    waited: int = 0  # frames published since


def _rounded(e: fid.Estimate | None) -> tuple[float | None, float | None]:
    return (None, None) if e is None else (round(e.mean, 3), round(e.spread, 3))


class FidelityMonitor:
    """Schedules checks, keeps per-series running estimates (bounded), flags, and says so."""

    def __init__(self, settings: FidelitySettings) -> None:
        self.settings = settings
        self.series: collections.OrderedDict[str, SeriesFidelity] = collections.OrderedDict()
        self._frames: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.pending: Due | None = None
        self.model_s = 0.0  # model time seen (batches' submit + collect)
        self.check_s = 0.0  # time spent checking
        self.checks = 0
        self.failures = 0

    def configure(self, settings: FidelitySettings, model_changed: bool) -> None:
        """New settings (a reload); estimates made by another model or window are forgotten."""
        if model_changed or settings.window != self.settings.window:
            self.series.clear()
            self.pending = None
        self.settings = settings

    # ---- scheduling ------------------------------------------------------------------------

    def note_model_time(self, seconds: float) -> None:
        self.model_s += seconds

    def _due(self, series_id: str) -> bool:
        n = self._frames.pop(series_id, 0)
        self._frames[series_id] = n + 1
        while len(self._frames) > MAX_SERIES:
            self._frames.popitem(last=False)
        if self.settings.every:
            return n % self.settings.every == 0
        return self.check_s <= self.settings.budget_pct / 100 * self.model_s

    def offer(self, header: dict[str, Any], raw: np.ndarray | None, denoised: np.ndarray, plan: Plan | None) -> None:
        """A frame just published; kept for a check when one is due and none is waiting (one at most)."""
        if not self.settings.enabled or plan is None or raw is None:
            return
        if self.pending is not None:
            self.pending.waited += 1
            self._due(str(header.get("series_id", "")))
            return
        if self._due(str(header.get("series_id", ""))):
            self.pending = Due(header, raw, denoised, plan)

    @property
    def overdue(self) -> bool:
        return self.pending is not None and self.pending.waited >= OVERDUE_FRAMES

    def take(self) -> Due | None:
        due, self.pending = self.pending, None
        return due

    def run(self, denoiser: Denoiser, due: Due) -> Check:
        """The check of a due frame (engine thread), seeded by its series and frame id (reproducible)."""
        sid, fid_ = str(due.header.get("series_id", "")), int(due.header.get("frame_id", 0))
        rng = np.random.default_rng([zlib.crc32(sid.encode()), max(fid_, 0)])
        return check_frame(denoiser, due.raw, due.denoised, due.plan, due.header, rng)

    # ---- estimates and flags ---------------------------------------------------------------

    def failed(self, due: Due, exc: Exception, seconds: float) -> None:
        """A check that raised (a frame without counting noise, say): counted and logged once."""
        self.check_s += seconds
        self.failures += 1
        if self.failures == 1:
            log.warning("fidelity check of series %r frame %s failed: %s; further failures are counted in the "
                        "stats", due.header.get("series_id"), due.header.get("frame_id"), exc)

    def record(self, check: Check) -> SeriesFidelity:
        """Add a check to its series' running estimates; flag, and warn (rate-limited), as the settings say."""
        s = self.settings
        self.check_s += check.seconds
        self.checks += 1
        state = self.series.pop(check.series_id, None) or SeriesFidelity(s.window)
        self.series[check.series_id] = state
        while len(self.series) > MAX_SERIES:
            self.series.popitem(last=False)
        state.checks += 1
        if not check.valid:
            state.invalid += 1
            if state.invalid == 1:
                log.warning("fidelity: series %r has correlated noise (drift-corrected or processed frames?): "
                            "its splits are not independent, so its checks are left out", check.series_id)
            return state
        state.gain.add(check.scores.gain_db)
        state.over_reference.add(check.scores.over_reference_db)
        if check.residual is not None:
            state.residual.add(check.residual)
        state.sigma, state.detector = check.scores.sigma, check.detector
        over, res = state.over_reference.estimate(), state.residual.estimate()
        reasons = []
        if over is not None and over.mean < s.min_over_reference_db:
            reasons.append(f"below the reference ({over.mean:+.2f} dB < {s.min_over_reference_db:g} dB)")
        if res is not None and res.mean > s.max_residual:
            reasons.append(f"lattice in the residual ({res.mean:.2f} > {s.max_residual:g}: removed or invented)")
        was, state.flagged, state.reasons = state.flagged, bool(reasons), reasons
        now = time.monotonic()
        if state.flagged and (not was or now - state.warned_at >= s.warn_interval_s):
            state.warned_at = now
            action = "publishing the Gaussian reference instead" if s.action == "fallback" else "still publishing it"
            log.warning("fidelity: the model is not to be trusted on series %r: %s; %s", check.series_id,
                        "; ".join(reasons), action)
        elif was and not state.flagged:
            log.info("fidelity: series %r no longer flagged", check.series_id)
        log.debug("fidelity: series %r frame %d: %+.2f dB over raw, %+.2f over the reference (σ %g), residual %s, "
                  "%.0f ms", check.series_id, check.frame_id, check.scores.gain_db, check.scores.over_reference_db,
                  check.scores.sigma, "-" if check.residual is None else f"{check.residual:.2f}", check.seconds * 1e3)
        return state

    def fallback_sigma(self, series_id: str) -> float | None:
        """With action `fallback`, the reference's sigma for a flagged series (its frames get the reference)."""
        state = self.series.get(series_id)
        if self.settings.action != "fallback" or state is None or not state.flagged:
            return None
        return state.sigma

    # ---- what is published -----------------------------------------------------------------

    def summary(self, series_id: str) -> dict[str, Any]:
        """The `fidelity` map of a series' frame headers (docs/protocol.md)."""
        state = self.series.get(series_id)
        if state is None:
            return {"checks": 0, "flagged": False, "output": "model"}
        gain, gain_s = _rounded(state.gain.estimate())
        over, over_s = _rounded(state.over_reference.estimate())
        res, res_s = _rounded(state.residual.estimate())
        return {"checks": state.checks, "invalid_checks": state.invalid, "gain_db": gain, "gain_spread_db": gain_s,
                "over_reference_db": over,
                "over_reference_spread_db": over_s, "residual": res, "residual_spread": res_s,
                "reference_sigma_px": state.sigma, "flagged": state.flagged, "reasons": list(state.reasons),
                "detector": state.detector,
                "output": "reference" if self.fallback_sigma(series_id) is not None else "model"}

    def header(self, series_id: str, output: str) -> dict[str, Any]:
        """The header field for one published frame; `output` is what it holds: "model" or "reference"."""
        if not self.settings.enabled:
            return {}
        return {"fidelity": {**self.summary(series_id), "output": output}}

    def status(self) -> str:
        """One word or phrase for the log and STATUS=: off, waiting (no check yet), ok, or FLAGGED and where."""
        if not self.settings.enabled:
            return "off"
        flagged = [sid for sid, st in self.series.items() if st.flagged]
        if flagged:
            return f"FLAGGED ({', '.join(repr(s) for s in flagged[-3:])}{' …' if len(flagged) > 3 else ''})"
        if not self.series:
            return "waiting"
        sid = next(reversed(self.series))
        over = self.series[sid].over_reference.estimate()
        return "ok" if over is None else f"ok ({over.mean:+.1f} dB over the reference)"

    def stats(self) -> dict[str, Any]:
        """The `fidelity` map of the stats message."""
        recent = list(self.series)[-STATS_SERIES:]
        return {"enabled": self.settings.enabled, "status": self.status(), "checks": self.checks,
                "failures": self.failures,
                "cost_pct": round(100 * self.check_s / self.model_s, 2) if self.model_s > 0 else None,
                "series": {sid: self.summary(sid) for sid in recent}}
