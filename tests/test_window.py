"""The fast floating-window reconstruction against the explicit loop, and its geometry."""

import pytest
import torch

from stemd.model import WindowAE
from stemd.window import pad_amounts, pad_frames, reconstruct, reconstruct_naive


def _random_model(window: int = 28, hidden=(48, 12), seed: int = 0) -> WindowAE:
    torch.manual_seed(seed)
    model = WindowAE(window, hidden).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases too, so the bias overlap-add is exercised
            p.normal_(0.0, 0.05)
    return model


def _identity_model(window: int) -> WindowAE:
    """Code as wide as the window, weights = identity: output window == input window for x >= 0."""
    n = window * window
    model = WindowAE(window, (n,)).eval()
    with torch.no_grad():
        for lin in model.linear_layers():
            lin.weight.copy_(torch.eye(n))
            lin.bias.zero_()
    return model


@pytest.mark.parametrize("shape", [(28, 28), (29, 31), (64, 100), (45, 28), (37, 53)])
@pytest.mark.parametrize("step", [1, 2, 3, 5, 28])
def test_fast_matches_naive_and_forward(shape, step):
    model = _random_model()
    frame = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        naive = reconstruct_naive(model, frame, step)
        fast = reconstruct(model, frame[None, None], step)[0, 0]
    assert fast.shape == frame.shape == naive.shape
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape, step", [((29, 31), 1), ((64, 100), 3), ((37, 53), 5)])
def test_one_window_row_per_band_matches_naive(shape, step):
    model = _random_model()
    frame = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        banded = reconstruct(model, frame[None, None], step, band_bytes=1)[0, 0]
        torch.testing.assert_close(banded, reconstruct_naive(model, frame, step), atol=1e-5, rtol=0)


def test_several_bands_and_batch_match_single_frames():
    model = _random_model(hidden=(32, 8))
    frames = torch.rand(3, 1, 70, 90, generator=torch.Generator().manual_seed(2))
    step = 3
    whole = reconstruct(model, frames, step)
    budget = 3 * 40 * 4 * 5 * (32 + 8)  # about five window rows per band for this batch
    banded = reconstruct(model, frames, step, band_bytes=budget)
    torch.testing.assert_close(banded, whole, atol=1e-5, rtol=0)
    for i in range(3):
        torch.testing.assert_close(whole[i, 0], reconstruct_naive(model, frames[i, 0], step), atol=1e-5, rtol=0)


@pytest.mark.parametrize("step", [2, 3, 4, 7, 28])  # step 1: the small-window test below
def test_identity_model_returns_input_exactly(step):
    model = _identity_model(28)
    frame = torch.rand(61, 47, generator=torch.Generator().manual_seed(3))
    out = reconstruct(model, frame[None, None], step, band_bytes=10_000)[0, 0]
    torch.testing.assert_close(out, frame, atol=1e-6, rtol=0)


def test_small_window_identity_and_naive():
    model = _identity_model(5)
    frame = torch.rand(9, 6, generator=torch.Generator().manual_seed(4))
    for step in range(1, 6):
        torch.testing.assert_close(reconstruct(model, frame[None, None], step)[0, 0], frame, atol=1e-6, rtol=0)
        torch.testing.assert_close(reconstruct_naive(model, frame, step), frame, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [28, 29, 40, 57])
@pytest.mark.parametrize("step", [1, 2, 3, 5, 9, 28])
def test_padding_covers_every_window_of_the_infinite_grid(size, step):
    window = 28
    before, after = pad_amounts(size, window, step)
    padded = size + before + after
    assert before == window - step and (padded - window) % step == 0 and 0 <= after - before < step
    starts = range(0, padded - window + 1, step)  # window starts, padded coordinates
    for r in range(size):
        p = r + before
        covered = sum(1 for s in starts if s <= p < s + window)
        # windows of the same grid, unbounded: starts at every multiple of step (any sign)
        infinite = sum(1 for k in range(-window, size + window) if k * step <= p < k * step + window)
        assert covered == infinite


def test_pad_reflects_and_replicates_when_too_small():
    frame = torch.arange(30.0 * 30).view(1, 1, 30, 30)
    padded, (top, left) = pad_frames(frame, 28, 2)
    assert (top, left) == (26, 26)
    torch.testing.assert_close(padded[0, 0, top : top + 30, left : left + 30], frame[0, 0])
    torch.testing.assert_close(padded[0, 0, top - 1, left:left + 30], frame[0, 0, 1])  # reflect
    tiny = torch.rand(1, 1, 4, 4)
    padded, (top, left) = pad_frames(tiny, 28, 2)
    torch.testing.assert_close(padded[0, 0, 0, left : left + 4], tiny[0, 0, 0])  # replicate


def test_output_bias_and_count_maps_follow_grad_mode():
    model = _random_model(hidden=(16, 4))
    frame = torch.rand(1, 1, 40, 40)
    with torch.no_grad():
        reconstruct(model, frame, 2)
    with torch.no_grad():
        model.linear_layers()[-1].bias.add_(1.0)  # a changed bias must not reuse a stale cached map
        after = reconstruct(model, frame, 2)[0, 0]
    torch.testing.assert_close(after, reconstruct_naive(model, frame[0, 0], 2), atol=1e-5, rtol=0)
    out = reconstruct(model, frame.requires_grad_(), 2)  # trainable: gradients flow through
    out.sum().backward()
    assert frame.grad is not None and model.linear_layers()[0].weight.grad is not None


def test_model_built_in_inference_mode_and_empty_batch():
    with torch.inference_mode():
        model = _random_model(hidden=(8, 4))
        frame = torch.rand(33, 30)
        torch.testing.assert_close(reconstruct(model, frame[None, None], 3)[0, 0], reconstruct_naive(model, frame, 3), atol=1e-5, rtol=0)
        assert reconstruct(model, torch.rand(0, 1, 30, 30), 2).shape == (0, 1, 30, 30)


def test_bad_step_is_refused():
    model = _random_model(hidden=(8, 4))
    for step in (0, 29):
        with pytest.raises(ValueError, match="step"):
            reconstruct(model, torch.rand(1, 1, 30, 30), step)
