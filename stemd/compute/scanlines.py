"""Scan lines told by the frame itself: which axis they run along, and their offset flicker (stripes).

Line-to-line artefacts (the beam current or the detector's offset flickering from one scan line to the
next) make the means of the scan lines vary more than pixel noise allows, and only across lines. That
tells the scan axis (several of tk_r_em's experimental frames are stored with their lines as columns) and
gives the stripes to take out before the model, which never saw stripes running down a frame
(`stemd.pipeline`: `Plan.lines`, `Plan.stripes`; docs/benchmarks.md "Scan lines").
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Lines = Literal["rows", "columns"]

TREND_LINES = 7  # running-median width (lines) that takes the slow trend (edges, particles) out of line means
PERIODIC = 10.0  # a line-mean spectrum bin this many times its median is lattice (planes along the lines)
NOTCH_BINS = 2  # bins either side of such a peak dropped too: a lattice in part of the frame broadens its peak
SEGMENTS = 4  # parts of each line whose flicker is compared (`_excess`)
MIN_EXCESS = 4.0  # line flicker variance over what pixel noise gives a line mean: below it, no line artefacts
DOMINANCE = 2.0  # columns are taken only when their excess is this many times the rows'


def _detrended(means: torch.Tensor) -> torch.Tensor:
    """(N, L) line means -> their line-to-line part: less their running median (edges and particles are
    slow), with the periodic bins of their spectrum and their neighbours removed (lattice planes along the
    lines are signal, not flicker)."""
    pad = TREND_LINES // 2
    trend = F.pad(means[:, None], (pad, pad), mode="reflect")[:, 0].unfold(-1, TREND_LINES, 1).median(-1).values
    spectrum = torch.fft.rfft(means - trend)
    power = spectrum.abs().square()
    floor = power[:, 1:].median(-1, keepdim=True).values
    peaks = (power > PERIODIC * floor).float()[:, None]
    periodic = F.max_pool1d(peaks, 2 * NOTCH_BINS + 1, stride=1, padding=NOTCH_BINS)[:, 0] > 0
    spectrum = torch.where(periodic, torch.zeros_like(spectrum), spectrum)
    spectrum[:, 0] = 0
    flicker: torch.Tensor = torch.fft.irfft(spectrum, n=means.shape[-1])
    return flicker


def line_flicker(frames: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, H): each row's offset flicker (stripe), the line-to-line part of the row means."""
    return _detrended(frames.float().mean(-1))


def _excess(frames: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B,): the row flicker's variance over what pixel noise gives a row mean.

    Flicker is common to a whole line; noise and most structure are not. So the variance is the mean product
    of the flicker measured on different SEGMENTS of the rows (noise cancels in it, and so does structure in
    part of a line: an interface, a particle), and the pixel noise is measured from differences along the
    rows (a lattice can only raise it: the excess errs low). ≈ 0 without line artefacts."""
    x = frames.float()
    b, h, w = x.shape
    seg = w // SEGMENTS
    r = _detrended(x[..., : seg * SEGMENTS].reshape(b, h, SEGMENTS, seg).mean(-1).transpose(1, 2).reshape(-1, h))
    r = r.reshape(b, SEGMENTS, h)
    total = r.sum(1)
    cross = (total.square() - r.square().sum(1)).mean(-1) / (SEGMENTS * (SEGMENTS - 1))
    pixel_var = x.diff(dim=-1).square().mean((-2, -1)) / 2
    return cross / (pixel_var / w).clamp_min(1e-12)


def line_excess(frames: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, 2): line-artefact excess with the lines taken as rows, then as columns (≈ 0: none)."""
    return torch.stack((_excess(frames), _excess(frames.transpose(-2, -1))), dim=-1)


def scan_lines(frame: torch.Tensor, lines: Lines | None = None) -> tuple[Lines, bool]:
    """(axis, stripes) of a (H, W) frame: 'columns' when its line artefacts run clearly across columns, else
    'rows' (a frame without line artefacts keeps the default); `lines` fixes the axis instead. stripes: the
    line flicker along that axis stands out of the pixel noise (excess >= MIN_EXCESS)."""
    if min(frame.shape[-2:]) < TREND_LINES:
        return lines or "rows", False
    rows, columns = line_excess(frame.reshape(1, *frame.shape[-2:])).tolist()[0]
    if lines is None:
        lines = "columns" if columns >= MIN_EXCESS and columns >= DOMINANCE * rows else "rows"
    return lines, (columns if lines == "columns" else rows) >= MIN_EXCESS


def destripe(frames: torch.Tensor, lines: Lines = "rows") -> torch.Tensor:
    """(B, H, W) frames less each scan line's offset flicker (`line_flicker` along `lines`), shrunk by
    excess / (excess + 1) per frame (the flicker estimate carries the line mean's own noise: a Wiener weight)."""
    x = frames.float() if lines == "rows" else frames.float().transpose(-2, -1)
    excess = _excess(x).clamp_min(0)[:, None]
    out = x - (excess / (excess + 1) * line_flicker(x))[..., None]
    return out if lines == "rows" else out.transpose(-2, -1)
