"""The planar-defect guide: the Bragg guide, except across a planar fault, where the frame averaged along it.

The conv model follows its guide wherever the data allow: fed the clean frame as its guide, its column error
by the faithfulness bench's Ruddlesden-Popper fault falls from 23 to 1.1 pm at dose 2. The Bragg guide
(`stemd.compute.fourier.bragg_filter`) is the lattice averaged over the whole frame, so across a fault it shows both
domains' lattices superposed, and the model pulled the fault's columns 0.5 px towards each other. A straight
fault along a lattice plane is periodic along that plane: the frame averaged over its shifts by that lattice
translation (`plane_averages`) keeps the fault and still cuts the noise (over up to 2 x REACH_PX). `planar_guide`
finds, for four short translations, the bands across which that average fits the frame better than the
Bragg guide does (a profile across the whole frame: a fault that spans it), and takes the average there.
Pure torch, any device; docs/training.md, "Planar defects".
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from stemd.compute.fourier import bragg_filter

REACH_PX = 512.0  # plane averages take shifts k t with |k t| up to this (the whole of a 512² frame)
LAGS_PX = (3.0, 48.0)  # lattice translations are sought among autocorrelation peaks this long
PEAK_FRACTION = 0.5  # ... at least this fraction of the zero-lag value
Z_SCALE = 2.0  # a band is found where its z exceeds this x sqrt(2 ln(bins searched)) (~7.7 at 512²) ...
Z_EXTENT = 4.0  # ... and spans the bins around it above this: the guide ramps to the average from here to 1 above
PROFILE_SIGMA_PX = 2.0  # the gain profile across a direction is smoothed by this Gaussian
WIDEN = 0.5  # a band reaches this many of its translation's lengths past where its gain shows (outer columns)
BORDER_PX = 32  # the Bragg guide fades towards the frame's edges: gains are taken this far inside
TRIM_PX = 32  # and bands this close to the ends of a profile are not taken (the fade reaches further)
MIN_LINE_FRACTION = 0.5  # profile bins whose lines are shorter than this x the longest (frame corners) are left out
MIN_PROFILE_BINS = 64  # a shorter profile (a frame under ~200 px) is too short to tell a band from chance

Vectors = tuple[tuple[float, float], tuple[float, float]]


def lattice_vectors(guide: torch.Tensor) -> list[Vectors | None]:
    """(B, 1, H, W) Bragg guides -> per frame two short independent lattice translations (y, x) in px, or None
    where the guide shows no lattice: the shortest peaks of its autocorrelation of at least PEAK_FRACTION of the
    zero-lag value within LAGS_PX (parabola-refined), each refined again at its longest multiple within
    REACH_PX and half the frame.

    A perovskite's shortest are its half diagonals (its two columns look alike), so `translations` adds
    their sum and difference, its cell vectors."""
    from scipy.fft import next_fast_len  # imported on first use: scipy.fft adds ~0.2 s to start-up

    h, w = guide.shape[-2:]
    r = int(LAGS_PX[1]) + 1
    reach = min(REACH_PX, min(h, w) / 2)  # lags past half the frame overlap too little of it
    pad = max(r, int(reach) + 3)
    # padding past the longest lag
    size = (next_fast_len(h + pad + 1, real=True), next_fast_len(w + pad + 1, real=True))
    g = guide.float() - guide.float().mean((-2, -1), keepdim=True)
    acf = torch.fft.irfft2(torch.fft.rfft2(g, s=size).abs().square(), s=size)[:, 0]
    lag = torch.arange(-r, r + 1, device=guide.device)
    crop = acf[:, lag % size[0]][:, :, lag % size[1]]  # (B, 2r+1, 2r+1), lag 0 at [r, r]
    peak = crop == F.max_pool2d(crop[:, None], 3, stride=1, padding=1)[:, 0]
    dy, dx = torch.meshgrid(lag.float(), lag.float(), indexing="ij")
    length = torch.hypot(dy, dx)
    upper = (dy > 0) | ((dy == 0) & (dx > 0))  # one of each +-pair
    inner = torch.zeros_like(upper)
    inner[1:-1, 1:-1] = True
    found: list[Vectors | None] = []
    for b, (a, p) in enumerate(zip(crop, peak)):
        zero = float(a[r, r])
        keep = p & upper & inner & (length >= LAGS_PX[0]) & (length <= LAGS_PX[1]) & (a >= PEAK_FRACTION * zero)
        cands = sorted(((float(lag[i]) + _vertex(*a[i - 1:i + 2, j].tolist()),
                         float(lag[j]) + _vertex(*a[i, j - 1:j + 2].tolist())) for i, j in keep.nonzero().tolist()),
                       key=lambda t: math.hypot(*t))
        u = cands[0] if zero > 0 and cands else None
        v = next((c for c in cands[1:] if abs(u[0] * c[1] - u[1] * c[0]) > 0.5 * math.hypot(*u) * math.hypot(*c)),
                 None) if u else None
        found.append(None if u is None or v is None else (_refine(acf[b], u, reach), _refine(acf[b], v, reach)))
    return found


def translations(vectors: Vectors) -> list[tuple[float, float]]:
    """The four directions plane averages are taken along: u, v, u + v, u - v."""
    (uy, ux), (vy, vx) = vectors
    return [(uy, ux), (vy, vx), (uy + vy, ux + vx), (uy - vy, ux - vx)]


def plane_averages(frame: torch.Tensor, vectors: Vectors, reach: float = REACH_PX) -> torch.Tensor:
    """(H, W) -> (4, H, W): the frame averaged over its shifts by k t, |k t| <= reach, for each of the four
    `translations`; Fourier (sub-pixel) shifts of the zero-padded frame, each pixel averaged over the shifts
    that land inside the frame."""
    return _plane_averages(frame, vectors, reach)[0]


def _plane_averages(frame: torch.Tensor, vectors: Vectors, reach: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`plane_averages` and (4, H, W) how many shifts each pixel's average took (its noise variance is the
    pixel's over that many)."""
    from scipy.fft import next_fast_len

    h, w = frame.shape
    x = frame.float()
    mean = x.mean()
    size = (next_fast_len(h + int(reach) + 1, real=True), next_fast_len(w + int(reach) + 1, real=True))  # no wrap
    spectrum = torch.fft.rfft2(x - mean, s=size)
    qy = torch.fft.fftfreq(size[0], device=x.device)[:, None]
    qx = torch.fft.rfftfreq(size[1], device=x.device)[None, :]
    rows = torch.arange(h, device=x.device, dtype=torch.float32)
    cols = torch.arange(w, device=x.device, dtype=torch.float32)
    kernels, counts, sizes = [], [], []
    for ty, tx in translations(vectors):
        half = max(1, int(reach // math.hypot(ty, tx)))
        n = 2 * half + 1
        sizes.append(float(n))
        phase = math.pi * (qy * ty + qx * tx)  # the mean of exp(2 pi i k q.t) over |k| <= half (Dirichlet)
        s = torch.sin(phase)
        small = s.abs() < 1e-6
        kernels.append(torch.where(small, 1.0, torch.sin(n * phase) / (n * torch.where(small, 1.0, s))))
        k = torch.arange(-half, half + 1, device=x.device, dtype=torch.float32)[:, None]
        inside_y = ((rows + k * ty >= 0) & (rows + k * ty <= h - 1)).float()  # (n, H): shift k keeps row y inside
        inside_x = ((cols + k * tx >= 0) & (cols + k * tx <= w - 1)).float()
        counts.append((inside_y.T @ inside_x).clamp_min(1.0) / n)  # shifts inside, as a fraction of n
    # (complex x complex: faster)
    total: torch.Tensor = torch.fft.irfft2(spectrum * torch.stack(kernels).to(spectrum.dtype), s=size)[:, :h, :w]
    fraction = torch.stack(counts)
    return total / fraction + mean, fraction * torch.tensor(sizes, device=x.device)[:, None, None]


def planar_guide(frames: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, H, W) -> the Bragg `guide` (computed if None), replaced by a plane average across planar faults."""
    return planar_blend(frames, guide)[0]


def switch_mask(frames: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, H, W) -> bool, where the planar guide departs from the Bragg guide (takes some plane average):
    what bench/planar_fp.py counts as switched."""
    return planar_blend(frames, guide)[1] > 0


def planar_blend(frames: torch.Tensor, guide: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, H, W) -> (the planar guide, its weight 0..1 on the plane average per pixel; 0: the Bragg guide).

    For each direction t of `translations`: the gain (x - guide)^2 - (x - average_t)^2, summed over lines
    along t (a profile across t, 1 px bins, pixels BORDER_PX inside the frame), smoothed, and divided by its
    standard deviation were there no fault (`_null_variance`); that profile, and those of each half of the
    lines (either side of the frame's centre), as robust z (median, 1.4826 MAD over the bins whose lines
    are at least MIN_LINE_FRACTION of the longest and more than TRIM_PX from the profile's ends). A band
    scores the smaller of the whole lines' z and sqrt 2 x each half's (a fault spans the frame: both halves
    gain). A band is a run of bins above Z_EXTENT whose peak exceeds Z_SCALE x sqrt(2 ln(bins searched over the
    four directions)), widened by WIDEN translation lengths (a running maximum); there the guide ramps to the
    best direction's average (from Z_EXTENT, fully 1 above). A frame without a lattice, or without such a
    band, keeps its Bragg guide."""
    x = frames.float()
    guide = bragg_filter(x) if guide is None else guide.float()
    out = guide.clone()
    blend = torch.zeros_like(guide)
    h, w = x.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float32),
                            torch.arange(w, device=x.device, dtype=torch.float32), indexing="ij")
    inner = torch.zeros(h, w, dtype=torch.bool, device=x.device)
    inner[BORDER_PX:h - BORDER_PX, BORDER_PX:w - BORDER_PX] = True
    if not inner.any():
        return out.to(frames.dtype), blend
    weight_inner = inner.float().flatten()
    for b, vectors in enumerate(lattice_vectors(guide)):
        if vectors is None:
            continue
        frame, g = x[b, 0], guide[b, 0]
        averages, shifts = _plane_averages(frame, vectors, REACH_PX)
        variance = _null_variance(frame, g, averages, shifts, inner)
        best_z = torch.full((h, w), -math.inf, device=x.device)
        best = g
        for c, (ty, tx) in enumerate(translations(vectors)):
            gain = ((frame - g).square() - (frame - averages[c]).square()).flatten() * weight_inner
            norm = math.hypot(ty, tx)
            across = (xx * ty - yy * tx) / norm  # distance along the normal to t
            along = (xx * tx + yy * ty) / norm
            first = (along < along[h // 2, w // 2]).float().flatten()  # the lines' halves either side of the centre
            bins = (across - across.min()).round().long()
            flat, length = bins.flatten(), int(bins.max()) + 1
            z = _band_z(flat, length, gain, variance[c].flatten() * weight_inner, weight_inner, first)
            z = _bands(z, Z_SCALE * math.sqrt(2 * math.log(4 * length)))
            k = round(WIDEN * norm)
            z = F.max_pool1d(z[None, None], 2 * k + 1, stride=1, padding=k)[0, 0][bins] if k else z[bins]
            better = z > best_z
            best_z = torch.where(better, z, best_z)
            best = torch.where(better, averages[c], best)
        weight = (best_z - Z_EXTENT).clamp(0, 1)
        out[b, 0] = g + weight * (best - g)
        blend[b, 0] = weight
    return out.to(frames.dtype), blend


def _bands(z: torch.Tensor, threshold: float) -> torch.Tensor:
    """z where it lies in a run of bins above Z_EXTENT whose peak exceeds `threshold`, -inf elsewhere: a band's
    extent is where it stands out, its detection the search-size-corrected test (no host read)."""
    above = z > Z_EXTENT
    run = torch.cumsum((~above).long(), 0)  # the bins of one run above share an id
    peak = z.new_full((z.numel() + 1,), -math.inf).scatter_reduce(0, run, z, "amax")
    return torch.where(above & (peak[run] > threshold), z, -math.inf)


def _null_variance(frame: torch.Tensor, guide: torch.Tensor, averages: torch.Tensor, shifts: torch.Tensor,
                   inner: torch.Tensor) -> torch.Tensor:
    """(4, H, W) the variance of each pixel's gain were there no fault, 4 s^4 / shifts, up to a constant
    factor: s^2 = alpha guide + beta, the noise variance fitted to (x - guide)^2 over the inner frame (photon
    noise grows with the signal). Without it bright planes and short lines (fewer pixels) looked like bands."""
    r2, gi = (frame - guide).square()[inner], guide[inner]
    centred = gi - gi.mean()
    alpha = (centred * r2).mean() / centred.square().mean().clamp_min(torch.finfo(torch.float32).tiny)
    beta = r2.mean() - alpha * gi.mean()
    s2 = (alpha * averages + beta).clamp_min(1e-3 * r2.mean() + torch.finfo(torch.float32).tiny)
    return 4 * s2.square() / shifts


def _band_z(flat: torch.Tensor, length: int, gain: torch.Tensor, variance: torch.Tensor, count: torch.Tensor,
            first: torch.Tensor) -> torch.Tensor:
    """Per profile bin: min(z of the whole lines, sqrt 2 x z of each half), z = `_robust_z` of the smoothed
    gain over its smoothed null deviation; -inf where the profile is too short or its bins too few."""
    lines = torch.bincount(flat, count, minlength=length)
    enough = (lines > MIN_LINE_FRACTION * lines.max()).float()
    valid = F.max_pool1d(F.pad(1 - enough, (TRIM_PX, TRIM_PX), value=1.0)[None], 2 * TRIM_PX + 1, stride=1)[0] == 0
    if int(valid.sum()) < MIN_PROFILE_BINS:
        return torch.full((length,), -math.inf, device=gain.device)
    zs = [_robust_z(torch.bincount(flat, gain * part, minlength=length),
                    torch.bincount(flat, variance * part, minlength=length), valid)
          for part in (torch.ones_like(first), first, 1 - first)]
    return torch.minimum(zs[0], math.sqrt(2) * torch.minimum(zs[1], zs[2]))


def _robust_z(total: torch.Tensor, variance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per bin: the smoothed gain over its smoothed null deviation, as a robust z-score (median, 1.4826 MAD)
    over the `valid` bins; -inf elsewhere, and everywhere if the profile is flat."""
    radius = int(3 * PROFILE_SIGMA_PX)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, device=total.device) / PROFILE_SIGMA_PX) ** 2)

    def smooth(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.conv1d(v.float()[None, None], t[None, None], padding=radius)[0, 0]

    deviation = smooth(variance, taps.square()).clamp_min(torch.finfo(torch.float32).tiny).sqrt()
    profile = smooth(total, taps) / deviation
    median = profile[valid].median()
    spread = 1.4826 * (profile[valid] - median).abs().median()
    return torch.where(valid & (spread > 0), (profile - median) / spread.clamp_min(torch.finfo(torch.float32).tiny),
                       -math.inf)


def _vertex(left: float, mid: float, right: float) -> float:
    """Offset (-0.5..0.5) of the top of the parabola through three equally spaced values."""
    curve = left - 2 * mid + right
    return 0.0 if curve >= 0 else max(-0.5, min(0.5, 0.5 * (left - right) / curve))


def _refine(acf: torch.Tensor, t: tuple[float, float], reach: float) -> tuple[float, float]:
    """t from the autocorrelation's highest value within 2 px of m t, m = reach // |t| (parabola-refined),
    divided by m: m times the precision where the shifts reach; t itself where m < 2."""
    m = int(reach // math.hypot(*t))
    h, w = acf.shape
    cy, cx = round(m * t[0]), round(m * t[1])
    if m < 2:
        return t
    rows = torch.arange(cy - 3, cy + 4, device=acf.device) % h
    win = acf[rows][:, torch.arange(cx - 3, cx + 4, device=acf.device) % w]
    i, j = divmod(int(win[1:-1, 1:-1].argmax()), 5)
    i, j = i + 1, j + 1
    return ((cy - 3 + i + _vertex(*win[i - 1:i + 2, j].tolist())) / m,
            (cx - 3 + j + _vertex(*win[i, j - 1:j + 2].tolist())) / m)
