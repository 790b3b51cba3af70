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
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from stemd.compute import hostsync
from stemd.compute.fourier import Spectrum, bragg_filter, cropped_inverse, padded_transform

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
PLAN_MARGIN = 0.75  # a plan keeps the directions whose band reaches this x the threshold (`fault_directions`)

Vectors = tuple[tuple[float, float], tuple[float, float]]
_INNER = (..., slice(BORDER_PX, -BORDER_PX), slice(BORDER_PX, -BORDER_PX))  # the pixels whose gains are profiled


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
    geometry = _geometry((frame.shape[-2], frame.shape[-1]), vectors, reach, frame.device)
    return _plane_averages(frame[None, None], geometry, None)[0][0]


@dataclass(frozen=True)
class _Direction:
    """One of the four `translations` as the band search sees it: which profile bin each pixel's line falls in."""

    norm: float  # |t|, px
    bins: torch.Tensor  # (H * W,) long: the profile bin of each pixel (its distance across t)
    length: int  # bins in the profile
    inner_bins: torch.Tensor  # (inner pixels,) long: `bins` of the pixels BORDER_PX inside the frame (row-major)
    inner_halves: torch.Tensor  # (inner pixels,) long: their bin, + length where not in the first half of the line
    valid: torch.Tensor  # (n,) long: the bins the robust z is taken over (`_robust_z`)
    valid_mask: torch.Tensor  # (length,) bool: the same as a mask
    searched: bool  # whether the profile has MIN_PROFILE_BINS valid bins (else this direction finds nothing)


@dataclass(frozen=True)
class _Geometry:
    """What `planar_blend` needs of a frame shape and its lattice vectors, apart from the frame: computed once
    per series (the vectors come with the `Plan`) and kept (`_geometry`'s cache), so a frame costs only its
    transforms and the band search, with no host reads."""

    size: tuple[int, int]  # the zero-padded transform's size: (2H, 2W), the Bragg spectrum's, where it is as cheap
    kernels: torch.Tensor  # (4, size[1] // 2 + 1, size[0]) the Dirichlet kernel of each direction's shifts, on the
    # transposed bins of `fourier.padded_transform`; complex (real values): multiplied with the transform unconverted
    shifts: torch.Tensor  # (4, H, W) how many shifts land inside the frame at each pixel (at least 1)
    fraction: torch.Tensor  # (4, H, W) those as a fraction of the shifts the kernel sums (its 1 / n)
    directions: tuple[_Direction, ...]


_GEOMETRIES: OrderedDict[tuple[object, ...], _Geometry] = OrderedDict()
_GEOMETRIES_LOCK = threading.Lock()  # a plan (`prepare`) may be made on another thread than the frames' runs
GEOMETRY_CACHE = 4  # shapes x lattices kept, e.g. one series' four flips (a 512² one holds ~47 MB, ~ pixels)


def prepare(shape: tuple[int, int], vectors: Vectors, device: torch.device | str = "cpu") -> None:
    """Compute and keep what `planar_blend` needs of frames of `shape` along `vectors` (host reads included),
    so that their guides then read nothing back: made with a series' plan."""
    _geometry(shape, vectors, REACH_PX, torch.device(device))


def _geometry(shape: tuple[int, int], vectors: Vectors, reach: float, device: torch.device) -> _Geometry:
    """The cached `_Geometry` of frames of `shape` along `vectors` (the least recently used dropped first)."""
    key = (shape, vectors, reach, str(device))
    with _GEOMETRIES_LOCK:
        geometry = _GEOMETRIES.pop(key, None)
    geometry = geometry or _make_geometry(shape, vectors, reach, device)
    with _GEOMETRIES_LOCK:
        _GEOMETRIES[key] = geometry
        while len(_GEOMETRIES) > GEOMETRY_CACHE:
            _GEOMETRIES.popitem(last=False)
    return geometry


def _make_geometry(shape: tuple[int, int], vectors: Vectors, reach: float, device: torch.device,
                   size: tuple[int, int] | None = None) -> _Geometry:
    """Per direction t: shifts k t, |k| <= half, half = reach // |t| but no more than still overlap the frame
    (a shift that leaves it adds nothing to any pixel's average, so the averages are the same), their Dirichlet
    kernel on the transform's grid (`size`, default the smallest that does not wrap, or 2H x 2W if not much
    larger), and how many land inside at each pixel; the band search's bins."""
    from scipy.fft import next_fast_len  # imported on first use: scipy.fft adds ~0.2 s to start-up

    h, w = shape
    halves = []
    for ty, tx in translations(vectors):
        limit = min((h - 1) / abs(ty) if abs(ty) > 1e-9 else math.inf,
                    (w - 1) / abs(tx) if abs(tx) > 1e-9 else math.inf)  # a lattice vector is never 0
        halves.append(max(1, min(int(reach // math.hypot(ty, tx)), int(limit))))
    sy = max(math.ceil(half * abs(t[0])) for half, t in zip(halves, translations(vectors)))
    sx = max(math.ceil(half * abs(t[1])) for half, t in zip(halves, translations(vectors)))
    own = (next_fast_len(h + sy + 1, real=True), next_fast_len(w + sx + 1, real=True))  # no wrap into the frame
    if size is None:
        size = (2 * h, 2 * w) if own[0] * own[1] >= 0.75 * 4 * h * w else own  # 2H x 2W never wraps either
    qy = torch.fft.fftfreq(size[0], device=device, dtype=torch.float64)[None, :]
    qx = torch.fft.rfftfreq(size[1], device=device, dtype=torch.float64)[:, None]  # transposed, as the transforms
    rows = torch.arange(h, device=device, dtype=torch.float32)
    cols = torch.arange(w, device=device, dtype=torch.float32)
    kernels, counts, fractions = [], [], []
    for half, (ty, tx) in zip(halves, translations(vectors)):
        n = 2 * half + 1
        phase = (math.pi * (qy * ty + qx * tx)).float()  # the mean of exp(2 pi i k q.t) over |k| <= half
        sine = torch.sin(phase)
        small = sine.abs() < 1e-6
        kernels.append(torch.where(small, 1.0, torch.sin(n * phase) / (n * torch.where(small, 1.0, sine))))
        k = torch.arange(-half, half + 1, device=device, dtype=torch.float32)[:, None]
        inside_y = ((rows + k * ty >= 0) & (rows + k * ty <= h - 1)).float()  # (n, H): shift k keeps row y inside
        inside_x = ((cols + k * tx >= 0) & (cols + k * tx <= w - 1)).float()
        counts.append((inside_y.T @ inside_x).clamp_min(1.0))
        fractions.append(counts[-1] / n)
    inner = torch.zeros(h, w, dtype=torch.bool, device=device)
    inner[BORDER_PX:h - BORDER_PX, BORDER_PX:w - BORDER_PX] = True
    weight_inner = inner.float().flatten()
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")
    directions = []
    for ty, tx in translations(vectors):
        norm = math.hypot(ty, tx)
        across = (xx * ty - yy * tx) / norm  # distance along the normal to t
        along = (xx * tx + yy * ty) / norm
        first = along < along[h // 2, w // 2]  # the lines' halves either side of the centre
        grid = (across - across.min()).round().long()  # long: int32 takes index_add_'s slow path (100x)
        bins = grid.flatten()
        length = int(bins.max()) + 1
        inner_bins = grid[_INNER].flatten()
        inner_halves = torch.where(first[_INNER].flatten(), inner_bins, inner_bins + length)
        lines = torch.bincount(bins, weight_inner, minlength=length)
        enough = (lines > MIN_LINE_FRACTION * lines.max()).float()
        valid = F.max_pool1d(F.pad(1 - enough, (TRIM_PX, TRIM_PX), value=1.0)[None], 2 * TRIM_PX + 1,
                             stride=1)[0] == 0
        directions.append(_Direction(norm, bins, length, inner_bins, inner_halves, valid.nonzero()[:, 0], valid,
                                     int(valid.sum()) >= MIN_PROFILE_BINS))
    return _Geometry(size, torch.stack(kernels).to(torch.complex64), torch.stack(counts), torch.stack(fractions),
                     tuple(directions))


def _plane_averages(frames: torch.Tensor, geometry: _Geometry, spectrum: Spectrum | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, H, W) -> (B, 4, H, W) `plane_averages` and (4, H, W) how many shifts each pixel's average took
    (its noise variance is the pixel's over that many). `spectrum`: the frames' `bragg_spectrum`, used where the
    transform's size is the Bragg filter's."""
    values, mean = _transform(frames, geometry, spectrum)
    shape = (frames.shape[-2], frames.shape[-1])
    return torch.cat([_plane_average(values, mean, geometry, c, shape) for c in range(4)], 1), geometry.shifts


def _transform(frames: torch.Tensor, geometry: _Geometry, spectrum: Spectrum | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mean-free frames' `padded_transform` on the geometry's grid, their means): the Bragg `spectrum`'s
    where the grid is its own."""
    h, w = frames.shape[-2:]
    if spectrum is not None and spectrum.size == geometry.size:
        return spectrum.values, spectrum.mean
    x = frames.float()
    mean = x.mean((-2, -1), keepdim=True)
    return padded_transform(x - mean, geometry.size), mean


def _plane_average(values: torch.Tensor, mean: torch.Tensor, geometry: _Geometry, c: int,
                   shape: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) the plane averages along direction `c` from the frames' `_transform` (one direction at a time:
    the temporaries stay a quarter of the size, 1.5x faster on the CPU)."""
    total = cropped_inverse(values * geometry.kernels[c], geometry.size, shape)
    return total / geometry.fraction[c] + mean


def planar_guide(frames: torch.Tensor, guide: torch.Tensor | None = None, vectors: Vectors | None = None,
                 spectrum: Spectrum | None = None, directions: tuple[int, ...] | None = None) -> torch.Tensor:
    """(B, 1, H, W) -> the Bragg `guide` (computed if None), replaced by a plane average across planar faults
    (`planar_blend`, which says what `vectors`, `spectrum` and `directions` are)."""
    return planar_blend(frames, guide, vectors, spectrum, directions)[0]


def switch_mask(frames: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, H, W) -> bool, where the planar guide departs from the Bragg guide (takes some plane average):
    what bench/planar_fp.py counts as switched."""
    return planar_blend(frames, guide)[1] > 0


def fault_directions(frames: torch.Tensor, guide: torch.Tensor, vectors: Vectors,
                     spectrum: Spectrum | None = None) -> tuple[int, ...]:
    """The directions (indices into `translations`) along which any of the (B, 1, H, W) frames shows a band at
    PLAN_MARGIN x the detection threshold: a series' plan measures them once, and its frames search only those
    (`planar_blend`'s `directions`), so a fault-free series pays for no plane average. Reads values back."""
    x = frames.float()
    geometry = _geometry((x.shape[-2], x.shape[-1]), vectors, REACH_PX, x.device)
    return tuple(c for c, _, z in _searched(x, guide.float(), geometry, spectrum, None, PLAN_MARGIN)
                 if bool(torch.isfinite(z).any()))


def planar_blend(frames: torch.Tensor, guide: torch.Tensor | None = None, vectors: Vectors | None = None,
                 spectrum: Spectrum | None = None, directions: tuple[int, ...] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
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
    band, keeps its Bragg guide.

    `vectors`: the lattice of every frame in the batch (a series' `Plan` carries it, measured once), so the
    frames are searched together with no host read; None: each frame's own, measured here (`lattice_vectors`,
    which reads values back). `spectrum`: the frames' `bragg_spectrum`, shared with their Bragg guide.
    `directions`: with `vectors`, only these directions are searched (the plan's `fault_directions`; none: the
    Bragg guide as it is); None: all four."""
    x = frames.float()
    guide = bragg_filter(x, spectrum=spectrum) if guide is None else guide.float()
    h, w = x.shape[-2:]
    if h <= 2 * BORDER_PX or w <= 2 * BORDER_PX or (vectors is not None and directions == ()):
        return guide.to(frames.dtype), torch.zeros_like(guide)
    if vectors is not None:
        return _blend(x, guide, _geometry((h, w), vectors, REACH_PX, x.device), spectrum, frames.dtype, directions)
    outs, blends = [], []
    for b, found in enumerate(lattice_vectors(guide)):
        if found is None:
            outs.append(guide[b:b + 1].to(frames.dtype))
            blends.append(torch.zeros_like(guide[b:b + 1]))
        else:
            out, blend = _blend(x[b:b + 1], guide[b:b + 1], _geometry((h, w), found, REACH_PX, x.device), None,
                                frames.dtype)
            outs.append(out)
            blends.append(blend)
    return torch.cat(outs), torch.cat(blends)


def _searched(x: torch.Tensor, guide: torch.Tensor, geometry: _Geometry, spectrum: Spectrum | None,
              directions: tuple[int, ...] | None, margin: float = 1.0
              ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per searched direction c (of `directions`, None: all): (c, the frames' plane average (B, H * W), the band z
    per profile bin (B, L), -inf off its bands, the detection threshold scaled by `margin`). The gains and their
    null variance are taken on the BORDER_PX-inner pixels only (the profiles sum no others)."""
    n, (h, w) = x.shape[0], x.shape[-2:]
    values, mean = _transform(x, geometry, spectrum)
    fit = _noise_fit(x, guide)
    x_inner = x[_INNER].flatten(-2)[:, 0]  # (B, inner pixels)
    residual = (x_inner - guide[_INNER].flatten(-2)[:, 0]).square()
    for c, d in enumerate(geometry.directions):
        if not d.searched or (directions is not None and c not in directions):
            continue
        average = _plane_average(values, mean, geometry, c, (h, w)).flatten(-2)[:, 0]  # (B, H * W)
        inner = average.reshape(n, h, w)[_INNER].flatten(-2)
        gain = residual - (x_inner - inner).square()
        variance = _null_variance(inner, geometry.shifts[c][_INNER].flatten(), fit)
        yield c, average, _bands(_band_z(d, gain, variance), margin * Z_SCALE * math.sqrt(2 * math.log(4 * d.length)))


def _blend(x: torch.Tensor, guide: torch.Tensor, geometry: _Geometry, spectrum: Spectrum | None,
           dtype: torch.dtype, directions: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`planar_blend` of (B, 1, H, W) frames that share one lattice: batched tensor operations, no host read.

    On the CPU a direction without a band, where a host read is free, skips its per-pixel blend (it would change
    nothing), so a frame without a fault costs only the search."""
    n, (h, w) = x.shape[0], x.shape[-2:]
    best_z = best = None
    for c, average, z in _searched(x, guide, geometry, spectrum, directions):
        if hostsync.free(x.device) and not bool(torch.isfinite(z).any()):  # no band along c: nothing to blend
            continue
        k = round(WIDEN * geometry.directions[c].norm)
        z = (F.max_pool1d(z[:, None], 2 * k + 1, stride=1, padding=k)[:, 0] if k else z)[:, geometry.directions[c].bins]
        if best_z is None or best is None:
            best_z, best = x.new_full((n, h * w), -math.inf), guide.flatten(-2)[:, 0]
        better = z > best_z
        best_z = torch.where(better, z, best_z)
        best = torch.where(better, average, best)
    if best_z is None or best is None:
        return guide.to(dtype), torch.zeros_like(guide)
    weight = (best_z - Z_EXTENT).clamp(0, 1)
    g = guide.flatten(-2)[:, 0]
    out = (g + weight * (best - g)).reshape(n, 1, h, w)
    return out.to(dtype), weight.reshape(n, 1, h, w)


def _bands(z: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, L) z where it lies in a run of bins above Z_EXTENT whose peak exceeds `threshold`, -inf elsewhere: a
    band's extent is where it stands out, its detection the search-size-corrected test (no host read)."""
    above = z > Z_EXTENT
    run = torch.cumsum((~above).long(), -1)  # the bins of one run above share an id
    peak = z.new_full((z.shape[0], z.shape[-1] + 1), -math.inf).scatter_reduce(-1, run, z, "amax")
    return torch.where(above & (peak.gather(-1, run) > threshold), z, -math.inf)


def _noise_fit(x: torch.Tensor, guide: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha, beta, floor), each (B, 1): the noise variance s^2 = alpha guide + beta fitted to (x - guide)^2 over
    the inner frame (photon noise grows with the signal), and the least s^2 taken (`_null_variance`)."""
    r2, gi = (x - guide).square()[_INNER], guide[_INNER]  # slices of whole frames: the means' order as ever
    g_mean = gi.mean((-2, -1), keepdim=True)
    centred = gi - g_mean
    tiny = torch.finfo(torch.float32).tiny
    alpha = (centred * r2).mean((-2, -1), keepdim=True) / centred.square().mean((-2, -1), keepdim=True).clamp_min(tiny)
    r2_mean = r2.mean((-2, -1), keepdim=True)
    beta = r2_mean - alpha * g_mean
    return alpha.flatten(1), beta.flatten(1), (1e-3 * r2_mean + tiny).flatten(1)


def _null_variance(averages: torch.Tensor, shifts: torch.Tensor,
                   fit: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(B, n) the variance of each pixel's gain were there no fault, 4 s^4 / shifts, up to a constant factor, for
    the plane `averages` and their `shifts` (n,) given, s^2 from `_noise_fit`. Without it bright planes and short
    lines (fewer pixels) looked like bands."""
    alpha, beta, floor = fit
    s2 = (alpha * averages).add_(beta).clamp_min_(floor)
    return s2.square_().mul_(4).div_(shifts)


def _band_z(direction: _Direction, gain: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """(B, inner pixels) -> (B, L) per profile bin: min(z of the whole lines, sqrt 2 x z of each half), z =
    `_robust_z` of the smoothed gain over its smoothed null deviation."""
    d = direction
    both = torch.cat([gain, variance])
    total_gain, total_variance = _profile(both, d.inner_bins, d.length).chunk(2)
    first_gain, first_variance = _profile(both, d.inner_halves, 2 * d.length)[:, :d.length].chunk(2)
    z = _robust_z(torch.cat([total_gain, first_gain, total_gain - first_gain]),
                  torch.cat([total_variance, first_variance, total_variance - first_variance]), d).chunk(3)
    return torch.minimum(z[0], math.sqrt(2) * torch.minimum(z[1], z[2]))


def _profile(values: torch.Tensor, bins: torch.Tensor, length: int) -> torch.Tensor:
    """(B, n) -> (B, length): the values summed per bin (a batched bincount, in the pixels' order)."""
    return values.new_zeros(values.shape[0], length).index_add_(1, bins, values)


def _robust_z(total: torch.Tensor, variance: torch.Tensor, direction: _Direction) -> torch.Tensor:
    """(B, L) per bin: the smoothed gain over its smoothed null deviation, as a robust z-score (median, 1.4826 MAD)
    over the direction's valid bins; -inf elsewhere, and everywhere if the profile is flat."""
    radius = int(3 * PROFILE_SIGMA_PX)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, device=total.device) / PROFILE_SIGMA_PX) ** 2)

    def smooth(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.conv1d(v.float()[:, None], t[None, None], padding=radius)[:, 0]

    deviation = smooth(variance, taps.square()).clamp_min(torch.finfo(torch.float32).tiny).sqrt()
    profile = smooth(total, taps) / deviation
    inside = profile[:, direction.valid]
    median = inside.median(-1, keepdim=True).values
    spread = 1.4826 * (inside - median).abs().median(-1, keepdim=True).values
    return torch.where(direction.valid_mask & (spread > 0),
                       (profile - median) / spread.clamp_min(torch.finfo(torch.float32).tiny), -math.inf)


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
