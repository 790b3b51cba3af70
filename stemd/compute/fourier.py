"""Fourier filters on whole frames: the Bragg filter (the lattice averaged over the frame) and the
frame's noise level. Pure torch, no I/O; the conv model's guide, the line-jitter correction and the
planar-defect guide are built on them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from stemd.compute import hostsync

BRAGG_STRENGTH = 3.0  # Fourier bins are kept in proportion to how far their power exceeds this x the noise floor
SMOOTH_RADIUS = 2  # the power spectrum is averaged over (2 r + 1)² bins before it is compared with the floor
FLOOR_STRIDE = 2  # the floor is the median of every 2nd smoothed bin along each axis: within 0.2 %, 3x faster


@dataclass(frozen=True)
class Spectrum:
    """A frame's Fourier transform as `bragg_filter` takes it: computed once, shared by the Bragg guide and the
    planar guide's plane averages (`stemd.compute.planar`) of the same frames. Its bins are stored transposed,
    x frequency by y frequency, so the transforms along y run over contiguous memory (3x faster on the CPU)."""

    shape: tuple[int, int]  # the frames' (H, W)
    size: tuple[int, int]  # the grid the frame is zero-padded to before the transform: (2H, 2W) unless asked
    mean: torch.Tensor  # (B, 1, 1, 1) each frame's mean, removed before the transform
    values: torch.Tensor  # (B, 1, W + 1, 2H) complex: rfft2 of the mean-free, zero-padded frame, transposed
    power: torch.Tensor  # (B, 1, W + 1, 2H) its power, averaged over the bins within SMOOTH_RADIUS


def bragg_spectrum(frames: torch.Tensor, size: tuple[int, int] | None = None) -> Spectrum:
    """(B, 1, H, W) -> their `Spectrum` (float32 arithmetic) on the (2H, 2W) grid, or `size`."""
    h, w = frames.shape[-2:]
    size = (2 * h, 2 * w) if size is None else size
    x = frames.float()
    mean = x.mean((-2, -1), keepdim=True)
    values = padded_transform(x - mean, size)
    parts = torch.view_as_real(values)
    power = _box_mean(parts[..., 0].square() + parts[..., 1].square(), SMOOTH_RADIUS)
    return Spectrum((h, w), size, mean, values, power)


def fast_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: a transform length the FFT takes fast."""
    best = 1 << max(n - 1, 0).bit_length()
    p3 = 1
    while p3 < best:
        p5 = p3
        while p5 < best:
            p2 = p5
            while p2 < n:
                p2 *= 2
            best = min(best, p2)
            p5 *= 5
        p3 *= 3
    return best


def padded_transform(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) real -> (..., size[1] // 2 + 1, size[0]) complex: rfft2 of the frames zero-padded to `size`,
    transposed (x frequency first). The rows are transformed before the zero rows are added, so those cost
    nothing; the same values as `torch.fft.rfft2(frames, s=size)`."""
    rows = torch.fft.rfft(frames, n=size[1], dim=-1)
    values: torch.Tensor = torch.fft.fft(rows.transpose(-2, -1), n=size[0], dim=-1)
    return values


def cropped_inverse(values: torch.Tensor, size: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `padded_transform` cropped to the frame's (H, W) = `shape`: the transform along x runs over
    its H rows only (not the zero padding's); the same values as `torch.fft.irfft2(...)[..., :H, :W]`."""
    h, w = shape
    columns = torch.fft.ifft(values, n=size[0], dim=-1)[..., :h]
    frames: torch.Tensor = torch.fft.irfft(columns.transpose(-2, -1), n=size[1], dim=-1)[..., :w]
    return frames


def _box_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """(..., W, H) transposed bins -> the mean over the (2 r + 1)² window around each bin, of the bins inside: as
    `avg_pool2d(count_include_pad=False)`, separably (5x faster on the CPU, equal to float32 rounding), y first;
    the taps added in a fixed order, so the sums do not depend on the memory layout."""
    w, h = x.shape[-2:]
    total = _window_sum(_window_sum(x, -1, r), -2, r)
    iy = torch.arange(h, device=x.device)
    ix = torch.arange(w, device=x.device)
    cy = (iy.clamp(max=h - 1 - r) + r - (iy - r).clamp(min=0) + 1).to(x.dtype)
    cx = (ix.clamp(max=w - 1 - r) + r - (ix - r).clamp(min=0) + 1).to(x.dtype)
    return total / (cx[:, None] * cy[None, :])


def _window_sum(x: torch.Tensor, dim: int, r: int) -> torch.Tensor:
    """The sum over the 2 r + 1 bins around each along `dim` (zeros past the ends), taps added in order."""
    n = x.shape[dim]
    padded = F.pad(x, (r, r) if dim == -1 else (0, 0, r, r))
    total = padded.narrow(dim, 0, n).clone()
    for i in range(1, 2 * r + 1):
        total += padded.narrow(dim, i, n)
    return total


def bragg_filter(frames: torch.Tensor, strength: float = BRAGG_STRENGTH, dynamic_range: float = 0.0,
                 spectrum: Spectrum | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, 1, H, W) -> same: each frame with its Fourier components shrunk by a Wiener-like gain.

    The frame (mean removed) is zero-padded to 2H x 2W, so a lattice need not fit the frame a whole
    number of times (no wrapped, out-of-phase lattice along the borders: it fades out instead). Its
    power spectrum, averaged over 5x5 bins, is compared with its median (`FLOOR_STRIDE`), the white-noise floor:
    gain = clip(1 - strength * floor / power, 0, 1) keeps the lattice's Bragg peaks and drops the
    noise between them; the filtered frame is cropped back and the mean restored. `dynamic_range` > 0
    raises the floor to that fraction of the strongest (smoothed) bin: only the main peaks pass, not the
    faint streaks that line jitter spreads from them (`stemd.compute.dejitter`). `spectrum`: the frames'
    `bragg_spectrum`, if already computed; `size`: a smaller zero-padded grid than 2H x 2W (cheaper; its
    lattice fades less towards the edges and wraps a little).
    """
    h, w = frames.shape[-2:]
    s = bragg_spectrum(frames, size) if spectrum is None else spectrum
    gain = _gain(s, strength, dynamic_range)
    out = cropped_inverse(s.values * gain, s.size, (h, w)) + s.mean
    return out.to(frames.dtype)


def bragg_gain(s: Spectrum, strength: float = BRAGG_STRENGTH, dynamic_range: float = 0.0) -> torch.Tensor:
    """The Bragg filter's gain on a `Spectrum`, in [0, 1], shaped as rfft2's bins (B, 1, 2H, W + 1): > 0 on the
    lattice's Bragg band (`bragg_filter`; `stemd.compute.fidelity` measures a residual's power there)."""
    return _gain(s, strength, dynamic_range).transpose(-2, -1)


def _gain(s: Spectrum, strength: float, dynamic_range: float) -> torch.Tensor:
    """`bragg_gain` in the spectrum's own (transposed) layout."""
    power = s.power
    floor = lower_median(power[..., ::FLOOR_STRIDE, ::FLOOR_STRIDE].flatten(-2))[..., None, None]
    if dynamic_range > 0:
        floor = torch.maximum(floor, dynamic_range * power.flatten(-2).amax(-1)[..., None, None])
    return (1 - strength * floor / power.clamp_min(torch.finfo(power.dtype).tiny)).clamp(0, 1)


def lower_median(x: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (...): the median along the last dim, the lower middle value for even N, as `Tensor.median`; on
    the CPU by numpy's selection (10x faster than torch's on 1e5 values)."""
    k = (x.shape[-1] - 1) // 2
    if not hostsync.free(x.device) or x.requires_grad or x.dtype not in (torch.float32, torch.float64):
        return x.kthvalue(k + 1, -1).values
    return torch.from_numpy(np.partition(x.detach().numpy(), k, axis=-1)[..., k]).to(x.dtype)


def noise_level(frames: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B,): each frame's noise std: its variance less the signal's, which is extrapolated
    to lag 0 from the covariances of pixels 1, 2 and 3 scan lines apart, (15 C1 - 6 C2 + C3) / 10 (exact for a
    covariance quartic in the lag; pixel noise and line artefacts do not correlate across scan lines). A
    sharp lattice still adds a little (0.035 for a 9 px period, 1.3 px columns, peak 1, std 0.22): this is a
    feature for the network, consistent between training and use, not a calibrated measurement."""
    x = frames.float()
    d = x - x.mean((-2, -1), keepdim=True)
    var = d.square().mean((-3, -2, -1))
    c1, c2, c3 = ((d[..., k:, :] * d[..., :-k, :]).mean((-3, -2, -1)) for k in (1, 2, 3))
    return (var - ((15 * c1 - 6 * c2 + c3) / 10).clamp_min(0)).clamp_min(0).sqrt()
