"""stemd.compute.residual: the model's residual put back where it stands clear of the noise, and only there."""

import numpy as np
import torch
from torch.nn import functional as F

from stemd.compute.residual import _box, line_artefacts, line_free, noise_floor, recover


def _lattice(size: int = 256) -> torch.Tensor:
    """A smooth lattice (what a model trained on clean lattices returns), peak 1, as (1, 1, H, W)."""
    y, x = np.mgrid[:size, :size] / 9.0
    return torch.from_numpy((0.5 + 0.25 * (np.cos(2 * np.pi * x) + np.cos(2 * np.pi * y))).astype(np.float32))[
        None, None]


def _noise(sigma: float, seed: int, size: int = 256) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0, sigma, (1, 1, size, size)).astype(np.float32))


def test_the_noise_floor_is_the_white_noise_power_per_bin():
    for sigma in (0.05, 0.3):
        noise = _noise(sigma, seed=1)
        spectrum = torch.fft.rfft2(noise)
        power = spectrum.real.square() + spectrum.imag.square()
        floor = float(noise_floor(power, noise.shape[-1])) / noise.numel()  # power / N per bin: sigma²
        assert abs(floor / sigma**2 - 1) < 0.03, (sigma, floor)


def test_a_residual_of_noise_alone_is_left_out():
    clean = _lattice()
    frames = clean + _noise(0.2, seed=2)
    out = recover(frames, clean)
    added = (out - clean).square().mean() / 0.2**2
    assert added < 0.001, float(added)  # under 0.1 % of the noise's power comes back


def test_structure_the_model_took_out_is_put_back_without_the_noise():
    """A model that returns the clean lattice but drops a texture the frame shows (stripes and a slow wave):
    the texture comes back, the noise does not."""
    size = 256
    y, x = np.mgrid[:size, :size]
    texture = torch.from_numpy((0.15 * np.sin(2 * np.pi * x / 23.0) * np.cos(2 * np.pi * y / 61.0)
                                + 0.1 * np.sin(2 * np.pi * x / 5.3)).astype(np.float32))[None, None]
    truth = _lattice(size) + texture
    frames = truth + _noise(0.2, seed=3, size=size)
    model = _lattice(size)
    before = float((model - truth).square().mean())
    after = float((recover(frames, model) - truth).square().mean())
    assert after < 0.05 * before, (before, after)
    assert after < 0.02 * 0.2**2  # and it is not the noisy frame: 2 % of the noise's power at most


def test_frames_of_a_batch_are_each_judged_against_their_own_noise():
    clean = _lattice()
    quiet, loud = clean + _noise(0.02, seed=4), clean + _noise(0.5, seed=5)
    batch = recover(torch.cat([quiet, loud]), torch.cat([clean, clean]))
    torch.testing.assert_close(batch[:1], recover(quiet, clean))
    torch.testing.assert_close(batch[1:], recover(loud, clean))


def test_the_half_spectrum_box_is_the_full_spectrum_box():
    """The power is smoothed on rfft2's half spectrum, its missing half mirrored in: the same as a wrapping box
    over the whole spectrum, for even and odd sides, and exact beside a large DC term."""
    for h, w in ((64, 64), (63, 65), (40, 71)):
        x = torch.randn(2, 1, h, w, generator=torch.Generator().manual_seed(h)) + 100
        full = torch.fft.fft2(x)
        whole = F.avg_pool2d(F.pad((full.real.square() + full.imag.square()).double(), (4, 4, 4, 4), mode="circular"),
                             9, stride=1)[..., :w // 2 + 1]
        half = torch.fft.rfft2(x)
        smooth = _box(half.real.square() + half.imag.square(), w, 9)
        assert ((smooth - whole) / whole).abs().max() < 1e-4, (h, w)


def test_line_artefacts_in_the_residual_are_not_put_back():
    """Per scan line offsets, gains and sub-pixel shifts (what the line-jitter correction and destripe leave) are
    fitted line by line and left out: `recover` with `lines` does not put them back, without it does."""
    clean = _lattice()
    rng = np.random.default_rng(6)
    h, w = clean.shape[-2:]
    offset, gain, shift = (torch.from_numpy(rng.normal(0, s, (h, 1)).astype(np.float32)) for s in (0.05, 0.05, 0.3))
    slope = torch.gradient(clean, dim=-1)[0]
    artefacts = offset + gain * (clean - clean.mean(-1, keepdim=True)) + shift * slope
    frames = clean + artefacts + _noise(0.1, seed=7)
    assert float(line_free(artefacts, clean).square().mean()) < 1e-3 * float(artefacts.square().mean())
    kept = float((recover(frames, clean, lines="rows") - clean).square().mean())
    unfiltered = float((recover(frames, clean) - clean).square().mean())
    assert kept < 0.1 * unfiltered, (kept, unfiltered)


def test_line_artefacts_are_each_scan_lines_offset_and_gain_and_not_its_noise():
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    out = (torch.cos(2 * torch.pi * xx / 9) * torch.cos(2 * torch.pi * yy / 11))[None, None]
    gains, offsets = torch.randn(1, 1, 96, 1, generator=g) * 0.05, torch.randn(1, 1, 96, 1, generator=g) * 0.1
    flicker = gains * (out - out.mean(-1, keepdim=True)) + offsets
    torch.testing.assert_close(line_artefacts(flicker, out), flicker, atol=1e-4, rtol=1e-4)
    along_columns = line_artefacts(flicker.transpose(-2, -1), out.transpose(-2, -1), "columns")
    torch.testing.assert_close(along_columns, flicker.transpose(-2, -1), atol=1e-4, rtol=1e-4)
    noise = torch.randn(1, 1, 96, 96, generator=g)
    assert line_artefacts(noise, out).square().mean() < 0.05 * noise.square().mean()
