"""Point defects kept: the lattice guide steps aside at a column its own frame contradicts.

The conv model's guide is the lattice averaged over the frame (`stemd.compute.fourier.bragg_filter`), so at a
vacancy, a partly empty column or a dopant it shows a host column, and the model, which trusts its guide,
fills the vacancy and dims the dopant (issue 17, docs/benchmarks.md "Point defects"). `keep_columns` fits,
around every pixel, the scale by which the frame's columns differ from the guide's (a least-squares fit of
the residual onto the guide's column profile over one column's footprint, so its noise is one column's), tests
it against its own noise and puts the columns it is sure of back into the guide at their own height. How sure
adapts to the frame (Benjamini-Hochberg): on a frame with many defects the threshold drops until a fifth of
what it puts back may be noise; on a frame with none it stays where noise alone is rarely put back. A column
where the guide has none (an adatom) is sought the same way between the guide's columns, more strictly, and
added to the guide. Tensor operations only: no host sync.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from stemd.compute import hostsync

FOOTPRINT_FRAC = 0.25  # Gaussian weight sigma of a column's footprint, in lattice scales (the shortest translation)
BACKGROUND_FRAC = 0.5  # the floor between columns: the guide's minimum within this radius (lattice scales)
THRESHOLD = 3.5  # the fitted scale's z at which a column starts to be put back (3.0 cost fault-free frames 0.4 dB)
FDR = 0.2  # ... or lower, down to LOWEST, where that keeps the share of false discoveries under FDR
LOWEST = 2.5
RAMP = 1.0  # ... and is put back whole at threshold + RAMP
SPREAD_FRAC = 0.3  # a column's decision spreads over this radius (lattice scales) around it
EDGE_FRAC = 1.5  # no column within this many lattice scales of the border is put back: the guide fades there
MAX_SKEW = 1.0  # the skew correction's cap (a sum of a few counts)
EXTRA_EMPTY = 0.2  # an extra column (an adatom) is sought where the guide's column profile is under this share
EXTRA_HIGH = 4.0  # ... and put back from z THRESHOLD (many found) to this (none else): stricter than for the
# guide's own columns, as a false one there is a column invented (a lower range cost the RP frame 0.1 dB at dose 2)
TRIM_ROUNDS = 3  # noise-variance fits, each without the pixels the previous one put beyond the threshold


def _kernel(sigma: float, power: int = 1) -> list[float]:
    """A normalised Gaussian's taps (to 3 sigma) raised to `power`, without the taps under 1e-4 of the peak."""
    r = max(1, math.ceil(3 * sigma))
    w = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-r, r + 1)]
    w = [(v / sum(w)) ** power for v in w]
    keep = sum(v >= 1e-4 * max(w) for v in w) // 2
    return w[r - keep:r + keep + 1]


def _along(x: torch.Tensor, weights: list[float], dim: int, pad: str = "reflect") -> torch.Tensor:
    """Correlate (B, 1, H, W) `x` with odd-length `weights` along `dim` (-2 or -1) as a sum of shifted copies:
    on the CPU 4-8x faster than a single-channel conv2d. pad "reflect" mirrors the edges; "max" takes the
    running maximum instead of the weighted sum (weights ignored but their length)."""
    r = len(weights) // 2
    n = x.shape[dim]
    widths = (0, 0, r, r) if dim == -2 else (r, r, 0, 0)
    if pad == "max":
        p = F.pad(x, widths, value=float("-inf"))
        out = p.narrow(dim, 0, n).clone()
        for i in range(1, 2 * r + 1):
            torch.maximum(out, p.narrow(dim, i, n), out=out)
        return out
    p = F.pad(x, widths, mode="reflect")
    out = p.narrow(dim, 0, n) * weights[0]
    for i in range(1, 2 * r + 1):
        out.add_(p.narrow(dim, i, n), alpha=weights[i])
    return out


def blur(x: torch.Tensor, sigma: float, power: int = 1) -> torch.Tensor:
    """(B, 1, H, W) -> same: a separable Gaussian of std `sigma` px, edges mirrored (`power` 2 or 3: the
    kernel's square or cube, for the variance or third cumulant of a blurred field)."""
    w = _kernel(sigma, power)
    r = len(w) // 2
    h, wd = x.shape[-2:]
    if r >= min(h, wd):
        return x.mean((-2, -1), keepdim=True).expand_as(x) * sum(w) ** 2
    return _along(_along(x, w, -2), w, -1)


def max_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 1, H, W) -> the maximum over the (2 radius + 1)² square around each pixel (inside the frame)."""
    k = [0.0] * (2 * radius + 1)
    return _along(_along(x, k, -2, "max"), k, -1, "max")


def _noise_variance(residual: torch.Tensor, level: torch.Tensor, threshold: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel noise variance of `residual` (frame - guide), fitted per frame as a + b level (Poisson-like
    noise grows with the signal) by least squares over the pixels within `threshold` of the previous fit, so
    defects and what the guide misses do not inflate it; never below 5 % of the mean square. Also b, (B, 1, 1,
    1): counts scaled by b have variance b level and third cumulant b^2 level."""
    y = residual[..., ::2, ::2].square().flatten(1)  # every 2nd pixel along each axis: the same fit, 4x cheaper
    x = level[..., ::2, ::2].flatten(1)
    floor = 0.05 * y.mean(1, keepdim=True)
    keep = torch.ones_like(y)
    xm, ym, slope = x.mean(1, keepdim=True), y.mean(1, keepdim=True), torch.zeros_like(floor)
    for _ in range(TRIM_ROUNDS):
        n = keep.sum(1, keepdim=True).clamp_min(1)
        xm, ym = (x * keep).sum(1, keepdim=True) / n, (y * keep).sum(1, keepdim=True) / n
        cov = ((x - xm) * (y - ym) * keep).sum(1, keepdim=True) / n
        var_x = ((x - xm).square() * keep).sum(1, keepdim=True).div(n).clamp_min(1e-12)
        slope = (cov / var_x).clamp_min(0)
        keep = (y < threshold * threshold * (ym + slope * (x - xm)).clamp_min(floor)).to(y.dtype)
    per = (-1, 1, 1, 1)
    fit = (ym.view(per) + slope.view(per) * (level - xm.view(per))).clamp_min(floor.view(per))
    return fit, slope.view(per)


def _unskewed(z: torch.Tensor, skew: torch.Tensor) -> torch.Tensor:
    """A standard score of a skewed (Poisson-like) sum mapped to the normal's (Cornish-Fisher, first order):
    at low dose a bright fluctuation is likelier than a dark one of the same size. Kept monotone."""
    g = skew.clamp(0, MAX_SKEW)
    zc = z.clamp(max=3 / g.clamp_min(1e-6) - 1e-3)
    return zc - g * (zc.square() - 1) / 6


def _fdr_threshold(z: torch.Tensor, q: float, low: float, high: float) -> torch.Tensor:
    """(B, 1, H, W) standard scores -> (B, 1, 1, 1): the |z| above which the share of false discoveries is `q`
    (Benjamini-Hochberg over every 3rd pixel along each axis; a column's pixels count alike for true and false
    ones, so the share is the columns'), within [low, high]: many defects lower it, none leave it at `high`.
    Where a read is free (`hostsync`) only p-values up to q are sorted (no larger one can be a discovery): the
    same count, 4x cheaper."""
    p = torch.special.erfc(z[..., ::3, ::3].abs().flatten(1) / math.sqrt(2))
    m = p.shape[1]
    if hostsync.free(p.device):
        found = torch.stack([_discoveries(row[row <= q].sort().values, q, m) for row in p])
    else:
        found = _discoveries(p.sort(1).values, q, m)
    cut: torch.Tensor = torch.special.ndtri(1 - q * found / (2 * m))
    return cut.clamp(low, high).view(-1, 1, 1, 1)


def _discoveries(p: torch.Tensor, q: float, m: int) -> torch.Tensor:
    """Sorted p-values (..., n), the smallest n of m -> the Benjamini-Hochberg count: the largest k with
    p_k <= q k / m."""
    k = torch.arange(1, p.shape[-1] + 1, device=p.device, dtype=p.dtype)
    return torch.where(p <= q * k / m, k, 0).amax(-1) if p.shape[-1] else p.new_zeros(())


def keep_columns(frames: torch.Tensor, guide: torch.Tensor, scale_px: float, threshold: float | None = None,
                 extra: bool = True) -> torch.Tensor:
    """(B, 1, H, W) frames and their lattice `guide` (same units) -> the guide with each column the frame
    contradicts (its fitted height off by more than `threshold` x its noise) rescaled to the frame's height
    and, with `extra`, the columns the frame shows where the guide has none (`extra_columns`) added;
    `scale_px`: the lattice's shortest translation in pixels. Fields blurred alike are blurred as one tensor."""
    t = THRESHOLD if threshold is None else threshold
    x, g = frames.float(), guide.float()
    r = max(1, round(BACKGROUND_FRAC * scale_px))
    floor = blur(-max_filter(-g, r), BACKGROUND_FRAC * scale_px / 2)
    profile = (g - floor).clamp_min_(0)  # the guide's columns above the floor between them
    residual = x - g
    v, b = _noise_variance(residual, g, t)
    s = FOOTPRINT_FRAC * scale_px
    p2 = profile.square()
    third = g.clamp_min(0).mul_(b.square())  # the third cumulant of the counts (`_noise_variance`)
    sums = blur(torch.cat([p2, residual * profile], 1), s)
    norm, num = sums[:, :1].clamp_min(1e-12), sums[:, 1:]
    variances = blur(torch.cat([v * p2, v] if extra else [v * p2], 1), s, 2).clamp_min_(1e-12)
    skews = blur(torch.cat([third * p2 * profile, third] if extra else [third * p2 * profile], 1), s, 3)
    skews.div_(variances * variances.sqrt())
    beta = num / norm  # the column's height off the guide's, as a fraction of it
    z = _unskewed(num / variances[:, :1].sqrt(), skews[:, :1])
    edge = min(math.ceil(EDGE_FRAC * scale_px), min(z.shape[-2:]) // 2)
    inner = z[..., edge:-edge or None, edge:-edge or None]
    gate = (inner.abs() - _fdr_threshold(inner, FDR, LOWEST, t)).div_(RAMP).clamp_(0, 1)
    gate = F.pad(gate, (edge,) * 4) if edge else gate
    reach = max(1, round(SPREAD_FRAC * scale_px))
    gate = max_filter(gate, reach)  # one decision over the whole column
    kept = g + gate * beta * profile
    if extra:
        kept = kept + extra_columns(x - kept, profile, variances[:, 1:], skews[:, 1:], s, edge, t, reach)
    return kept.to(guide.dtype)


def extra_columns(residual: torch.Tensor, profile: torch.Tensor, variance: torch.Tensor, skew: torch.Tensor,
                  s: float, edge: int, t: float, reach: int) -> torch.Tensor:
    """What to add to the guide for columns where it has none (adatoms, interstitials): the residual's
    Gaussian-weighted mean over one column's footprint (`s` px) tested against its noise (`variance` and `skew`:
    the noise's, blurred alike) where the guide's column `profile` is under EXTRA_EMPTY of its peak; where that
    is sure (z from `t` to EXTRA_HIGH, Benjamini-Hochberg), the residual itself over `reach` px."""
    z = _unskewed(blur(residual, s) / variance.sqrt(), skew)
    empty = (profile < EXTRA_EMPTY * profile.amax((-2, -1), keepdim=True)).to(z.dtype)
    z = z * empty
    inner = z[..., edge:-edge or None, edge:-edge or None].clamp_min(0)
    cut = _fdr_threshold(inner, FDR, t, EXTRA_HIGH)
    gate = (inner - cut).div_(RAMP).clamp_(0, 1)
    gate = F.pad(gate, (edge,) * 4) if edge else gate
    gate = max_filter(gate, reach)
    return gate * residual * empty
