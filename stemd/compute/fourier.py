"""Fourier filters on whole frames: the Bragg filter (the lattice averaged over the frame) and the
frame's noise level. Pure torch, no I/O; the conv model's guide, the line-jitter correction and the
planar-defect guide are built on them."""

from __future__ import annotations

import torch
from torch.nn import functional as F

BRAGG_STRENGTH = 3.0  # Fourier bins are kept in proportion to how far their power exceeds this x the noise floor


def bragg_filter(frames: torch.Tensor, strength: float = BRAGG_STRENGTH, dynamic_range: float = 0.0) -> torch.Tensor:
    """(B, 1, H, W) -> same: each frame with its Fourier components shrunk by a Wiener-like gain.

    The frame (mean removed) is zero-padded to 2H x 2W, so a lattice need not fit the frame a whole
    number of times (no wrapped, out-of-phase lattice along the borders: it fades out instead). Its
    power spectrum, averaged over 5x5 bins, is compared with its median, the white-noise floor:
    gain = clip(1 - strength * floor / power, 0, 1) keeps the lattice's Bragg peaks and drops the
    noise between them; the filtered frame is cropped back and the mean restored. `dynamic_range` > 0
    raises the floor to that fraction of the strongest (smoothed) bin: only the main peaks pass, not the
    faint streaks that line jitter spreads from them (`stemd.compute.dejitter`).
    """
    h, w = frames.shape[-2:]
    x = frames.float()
    mean = x.mean((-2, -1), keepdim=True)
    spectrum = torch.fft.rfft2(x - mean, s=(2 * h, 2 * w))
    gain = bragg_gain(spectrum, strength, dynamic_range)
    out: torch.Tensor = torch.fft.irfft2(spectrum * gain, s=(2 * h, 2 * w))[..., :h, :w] + mean
    return out.to(frames.dtype)


def bragg_gain(spectrum: torch.Tensor, strength: float = BRAGG_STRENGTH, dynamic_range: float = 0.0) -> torch.Tensor:
    """The Bragg filter's gain on a frame's (zero-padded, mean-removed) rfft2 `spectrum`, in [0, 1]: > 0 on
    the lattice's Bragg band (`bragg_filter`; `stemd.compute.fidelity` measures a residual's power there)."""
    power = F.avg_pool2d(spectrum.abs().square(), 5, stride=1, padding=2, count_include_pad=False)
    floor = power.flatten(-2).median(-1).values[..., None, None]
    if dynamic_range > 0:
        floor = torch.maximum(floor, dynamic_range * power.flatten(-2).amax(-1)[..., None, None])
    return (1 - strength * floor / power.clamp_min(torch.finfo(power.dtype).tiny)).clamp(0, 1)


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
