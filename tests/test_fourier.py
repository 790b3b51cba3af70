"""stemd.compute.fourier: the transposed, pruned transforms are rfft2 / irfft2 to the bit; the Bragg gain is laid
out as rfft2's bins."""

from __future__ import annotations

import pytest
import torch

from stemd.compute import fourier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("shape, size", [((2, 1, 64, 64), (128, 128)), ((1, 1, 97, 130), (194, 260)),
                                         ((3, 1, 40, 56), (101, 75))])
def test_padded_transform_and_cropped_inverse_are_rfft2_and_irfft2(shape, size):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    values = fourier.padded_transform(x, size)
    reference = torch.fft.rfft2(x, s=size)
    assert values.shape == (*shape[:2], size[1] // 2 + 1, size[0])
    torch.testing.assert_close(values, reference.transpose(-2, -1), rtol=0, atol=0)
    gain = torch.rand(reference.shape, generator=torch.Generator().manual_seed(1))
    back = fourier.cropped_inverse(values * gain.transpose(-2, -1), size, shape[-2:])
    torch.testing.assert_close(back, torch.fft.irfft2(reference * gain, s=size)[..., :shape[-2], :shape[-1]],
                               rtol=0, atol=0)


def test_bragg_gain_is_laid_out_as_rfft2_bins_and_passes_the_lattice_peak():
    """A cosine of 8 px period along x, 64² zero-padded to 128²: its peak is at rfft2 bin (0, 16), and the
    filter keeps it."""
    x = torch.cos(2 * torch.pi * torch.arange(64) / 8.0).expand(1, 1, 64, 64)
    gain = fourier.bragg_gain(fourier.bragg_spectrum(x))
    assert gain.shape == (1, 1, 128, 65)
    assert gain[0, 0, 0, 16] > 0.9 and gain[0, 0, 64, 40] == 0
    inner = (..., slice(8, -8), slice(8, -8))  # the filtered lattice fades towards the edges
    torch.testing.assert_close(fourier.bragg_filter(x)[inner], x[inner], rtol=0, atol=0.05)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 1001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_lower_median_is_torch_median(n, dtype):
    x = torch.rand(3, 2, n, generator=torch.Generator().manual_seed(n)).to(dtype)
    torch.testing.assert_close(fourier.lower_median(x), x.median(-1).values, rtol=0, atol=0)


def test_fast_size_is_the_smallest_2_3_5_smooth_length():
    from scipy.fft import next_fast_len

    assert [fourier.fast_size(n) for n in range(1, 2000)] == [next_fast_len(n, real=True) for n in range(1, 2000)]


def test_a_smaller_grid_is_a_different_filter_and_the_default_grid_the_same():
    wave = lambda n, period: torch.cos(2 * torch.pi * torch.arange(n) / period)  # noqa: E731
    lattice = wave(80, 7.3) * wave(64, 6.1)[:, None]
    x = lattice + 0.3 * torch.randn(2, 1, 64, 80, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(fourier.bragg_filter(x, size=(128, 160)), fourier.bragg_filter(x), rtol=0, atol=0)
    assert fourier.bragg_spectrum(x, (80, 100)).values.shape == (2, 1, 51, 80)
    assert not torch.equal(fourier.bragg_filter(x, size=(80, 100)), fourier.bragg_filter(x))
