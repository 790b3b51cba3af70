"""Point defects kept: the lattice guide steps aside at a column its own frame contradicts.

The conv model's guide is the lattice averaged over the frame (`stemd.compute.fourier.bragg_filter`), so at a
vacancy, a partly empty column or a dopant it shows a host column, and the model, which trusts its guide,
fills the vacancy and dims the dopant (issue 17, docs/benchmarks.md "Point defects"). `keep_columns` fits,
around every pixel, the scale by which the frame's columns differ from the guide's (a least-squares fit of
the residual onto the guide's column profile over one column's footprint, so its noise is one column's), tests
it against its own noise and puts the columns it is sure of back into the guide at their own height.
Elementwise, convolutions and pooling only: no host sync.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

FOOTPRINT_FRAC = 0.25  # Gaussian weight sigma of a column's footprint, in lattice scales (the shortest translation)
BACKGROUND_FRAC = 0.5  # the floor between columns: the guide's minimum within this radius (lattice scales)
THRESHOLD = 3.5  # the fitted scale's z at which a column starts to be put back (3.0 cost fault-free frames 0.4 dB)
RAMP = 1.0  # ... and is put back whole at threshold + RAMP
SPREAD_FRAC = 0.3  # a column's decision spreads over this radius (lattice scales) around it
EDGE_FRAC = 1.5  # no column within this many lattice scales of the border is put back: the guide fades there
MAX_SKEW = 1.0  # the skew correction's cap (a sum of a few counts)
TRIM_ROUNDS = 3  # noise-variance fits, each without the pixels the previous one put beyond the threshold


def _kernel(sigma: float, device: torch.device) -> torch.Tensor:
    r = max(1, math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def blur(x: torch.Tensor, sigma: float, power: int = 1) -> torch.Tensor:
    """(B, 1, H, W) -> same: a separable Gaussian of std `sigma` px, edges mirrored (`power` 2 or 3: the
    kernel's square or cube, for the variance or third cumulant of a blurred field)."""
    w = _kernel(sigma, x.device) ** power
    r = len(w) // 2
    h, wd = x.shape[-2:]
    if r >= min(h, wd):
        return x.mean((-2, -1), keepdim=True).expand_as(x) * w.sum() ** 2
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), w.view(1, 1, -1, 1))
    return F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), w.view(1, 1, 1, -1))


def _noise_variance(residual: torch.Tensor, level: torch.Tensor, threshold: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel noise variance of `residual` (frame - guide), fitted per frame as a + b level (Poisson-like
    noise grows with the signal) by least squares over the pixels within `threshold` of the previous fit, so
    defects and what the guide misses do not inflate it; never below 5 % of the mean square. Also b, (B, 1, 1,
    1): counts scaled by b have variance b level and third cumulant b^2 level."""
    y = residual.square().flatten(1)
    x = level.flatten(1)
    floor = 0.05 * y.mean(1, keepdim=True)
    keep = torch.ones_like(y)
    fit = y.mean(1, keepdim=True).expand_as(y)
    slope = torch.zeros_like(floor)
    for _ in range(TRIM_ROUNDS):
        n = keep.sum(1, keepdim=True).clamp_min(1)
        xm, ym = (x * keep).sum(1, keepdim=True) / n, (y * keep).sum(1, keepdim=True) / n
        cov = ((x - xm) * (y - ym) * keep).sum(1, keepdim=True) / n
        var_x = ((x - xm).square() * keep).sum(1, keepdim=True).div(n).clamp_min(1e-12)
        slope = (cov / var_x).clamp_min(0)
        fit = (ym + slope * (x - xm)).clamp_min(floor)
        keep = (y < threshold * threshold * fit).to(y.dtype)
    return fit.view_as(residual), slope[..., None, None]


def _unskewed(z: torch.Tensor, skew: torch.Tensor) -> torch.Tensor:
    """A standard score of a skewed (Poisson-like) sum mapped to the normal's (Cornish-Fisher, first order):
    at low dose a bright fluctuation is likelier than a dark one of the same size. Kept monotone."""
    g = skew.clamp(0, MAX_SKEW)
    zc = z.clamp(max=3 / g.clamp_min(1e-6) - 1e-3)
    return zc - g * (zc.square() - 1) / 6


def keep_columns(frames: torch.Tensor, guide: torch.Tensor, scale_px: float, threshold: float | None = None
                 ) -> torch.Tensor:
    """(B, 1, H, W) frames and their lattice `guide` (same units) -> the guide with each column the frame
    contradicts (its fitted height off by more than `threshold` x its noise) rescaled to the frame's height;
    `scale_px`: the lattice's shortest translation in pixels."""
    t = THRESHOLD if threshold is None else threshold
    x, g = frames.float(), guide.float()
    r = max(1, round(BACKGROUND_FRAC * scale_px))
    floor = blur(-F.max_pool2d(-g, 2 * r + 1, stride=1, padding=r), BACKGROUND_FRAC * scale_px / 2)
    profile = (g - floor).clamp_min(0)  # the guide's columns above the floor between them
    residual = x - g
    v, b = _noise_variance(residual, g, t)
    s = FOOTPRINT_FRAC * scale_px
    norm = blur(profile.square(), s).clamp_min(1e-12)
    beta = blur(residual * profile, s) / norm  # the column's height off the guide's, as a fraction of it
    spread = blur(v * profile.square(), s, 2).clamp_min(1e-12)  # the variance of beta x norm
    skew = blur(b.square() * g.clamp_min(0) * profile.pow(3), s, 3) / spread.pow(1.5)
    z = _unskewed(beta * norm / spread.sqrt(), skew)
    gate = (z.abs() - t).div(RAMP).clamp(0, 1)
    edge = min(math.ceil(EDGE_FRAC * scale_px), min(gate.shape[-2:]) // 2)
    gate = F.pad(gate[..., edge:-edge or None, edge:-edge or None], (edge,) * 4) if edge else gate
    reach = max(1, round(SPREAD_FRAC * scale_px))
    gate = F.max_pool2d(gate, 2 * reach + 1, stride=1, padding=reach)  # one decision over the whole column
    return (g + gate * beta * profile).to(guide.dtype)
