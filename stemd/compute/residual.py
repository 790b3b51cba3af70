"""What the model took out beyond the noise, put back: a Wiener filter on its residual.

The model learnt from simulated frames whose truth is a clean lattice, so on a real frame it also smooths away
what it has not seen: the fine texture of a particle or a thick region, column shapes a scan distortion gives,
detail at counts above its training range. Those are in the residual (frame − output) beside the white
counting noise, and there they stand out: concentrated at a few frequencies, above the noise's flat spectrum.
`recover` estimates that floor from the residual's high frequencies, smooths the residual's power spectrum and
puts back, frequency by frequency, the share above the floor (the Wiener gain 1 − floor / power), only where the
power clears the floor by THRESHOLD. Where the model took out only noise, nothing clears it and the output is
unchanged. Line artefacts the line-jitter correction and destripe left (each scan line's offset, gain and
sub-pixel shift) are fitted line by line and left out first: they are the scan's, not the specimen's
(docs/benchmarks.md, "Real data"). Tensor operations only: no host sync.
"""

from __future__ import annotations

import functools
import math

import torch

THRESHOLD = 1.5  # the smoothed residual power, over the noise floor, from which a frequency is put back
BOX = 9  # side of the box (frequency bins) the residual's power spectrum is averaged over
RING = 0.35  # the noise floor is the median power beyond this radius (cycles per pixel): few structures reach it
RING_SAMPLES = 20_000  # ... over at most this many of those bins


@functools.lru_cache(maxsize=16)
def _ring(shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Flat indices of (at most RING_SAMPLES of) the bins beyond RING cycles per pixel in an (H, W) frame's rfft2,
    found on the host once per shape (their count is data: on a GPU, finding them there would sync)."""
    radius = torch.hypot(torch.fft.fftfreq(shape[0])[:, None], torch.fft.rfftfreq(shape[1])[None])
    ring = torch.nonzero(radius.flatten() > RING).flatten()
    return ring[::max(1, len(ring) // RING_SAMPLES)].to(device)


def noise_floor(power: torch.Tensor, width: int) -> torch.Tensor:
    """(B, 1, H, W // 2 + 1) rfft2 power spectra of frames `width` wide -> (B, 1, 1, 1): the white noise's power
    per bin, the median beyond RING over ln 2 (the median of an exponential variable, which a complex Gaussian
    bin's power is)."""
    ring = power.flatten(-2)[..., _ring((power.shape[-2], width), power.device)]
    return (ring.kthvalue(max(1, ring.shape[-1] // 2), dim=-1).values / math.log(2))[..., None, None]


def _box(power: torch.Tensor, width: int, box: int) -> torch.Tensor:
    """The mean of a full spectrum's power over a box × box neighbourhood (wrapping round), on its rfft2 half:
    the bins past either end of the half are the mirrored ones (the power at -k is the power at k)."""
    pad = box // 2
    mirrored = torch.roll(power.flip(-2), 1, -2)  # row -ky of the half spectrum
    last = width // 2 - (1 if width % 2 == 0 else 0)  # the last bin whose mirror is not in the half
    left = mirrored[..., 1:pad + 1].flip(-1)
    right = mirrored[..., last - pad + 1:last + 1].flip(-1)
    x = torch.cat([left, power, right], -1).double()  # cumulative sums: float32 would lose a bin beside DC
    x = torch.cat([x[..., -pad:, :], x, x[..., :pad, :]], -2)
    for dim in (-1, -2):
        c = torch.cumsum(x, dim)
        c = torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c], dim)
        x = c.narrow(dim, box, c.shape[dim] - box) - c.narrow(dim, 0, c.shape[dim] - box)
    return (x / (box * box)).to(power.dtype)


def line_free(residual: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) residual less, on each row (a scan line), its least-squares fit on an offset, the output
    (a gain) and the output's derivative along the row (a small shift): what the line-jitter correction and
    destripe left of the line artefacts, which a line-by-line fit explains and which are not the specimen's."""
    y = out.float()
    gain = y - y.mean(-1, keepdim=True)  # centred, as is the shift's regressor: both orthogonal to the offset
    shift = torch.gradient(y, dim=-1)[0]
    shift = shift - shift.mean(-1, keepdim=True)
    r = residual - residual.mean(-1, keepdim=True)
    gg, gs, ss = ((a * b).sum(-1, keepdim=True) for a, b in ((gain, gain), (gain, shift), (shift, shift)))
    rg, rs = (r * gain).sum(-1, keepdim=True), (r * shift).sum(-1, keepdim=True)
    det = (gg * ss - gs * gs).clamp_min(1e-12)
    free: torch.Tensor = r - ((ss * rg - gs * rs) / det) * gain - ((gg * rs - gs * rg) / det) * shift
    return free


def _line_free_along(residual: torch.Tensor, out: torch.Tensor, lines: str) -> torch.Tensor:
    """`line_free` with the scan lines along `lines` ("rows" or "columns")."""
    if lines == "columns":
        return line_free(residual.transpose(-2, -1), out.transpose(-2, -1)).transpose(-2, -1)
    return line_free(residual, out)


def line_artefacts(residual: torch.Tensor, out: torch.Tensor, lines: str = "rows") -> torch.Tensor:
    """(B, 1, H, W) the part of `residual` that a fit on each scan line (along `lines`) explains by the output:
    an offset, a gain and a small shift (`line_free`), the line artefacts a frame and its halves share."""
    return residual - _line_free_along(residual, out, lines)


def recover(frames: torch.Tensor, out: torch.Tensor, threshold: float = THRESHOLD, box: int = BOX,
            lines: str | None = None) -> torch.Tensor:
    """(B, 1, H, W) frames as the model was given them and its output at the same sampling -> the output with
    the residual's structure above its noise floor put back (float32). With `lines` ("rows" or "columns", the
    scan lines' axis) the residual's line artefacts are taken out first (`line_free`)."""
    x = frames.float()
    y = out.float()
    safe = torch.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)  # a bad output pixel stays one bad pixel
    residual = torch.nan_to_num(x - y, nan=0.0, posinf=0.0, neginf=0.0)
    if lines in ("rows", "columns"):
        residual = _line_free_along(residual, safe, lines)
    width = residual.shape[-1]
    spectrum = torch.fft.rfft2(residual)
    power = spectrum.real.square() + spectrum.imag.square()
    floor = noise_floor(power, width)
    smooth = _box(power, width, box)
    gain = (1 - floor / smooth.clamp_min(torch.finfo(smooth.dtype).tiny)).clamp(0, 1)
    gain = torch.where(smooth > threshold * floor, gain, torch.zeros_like(gain))
    recovered: torch.Tensor = y + torch.fft.irfft2(spectrum * gain, s=residual.shape[-2:])
    return recovered
