"""The fast floating-window reconstruction against the explicit loop, and its geometry."""

import numpy as np
import pytest
import torch

from bench.borders import pad_amounts, pad_frames
from stemd.compute.normalize import normalize
from stemd.compute.window import reconstruct, reconstruct_naive, window_starts
from stemd.models.checkpoint import PAPER_AE_PATH, load_checkpoint
from stemd.models.window_ae import WindowAE
from stemd.sim import lattice as synthetic


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


def _lattice_pca_model(k: int = 40, n: int = 500) -> WindowAE:
    """A linear AE fitted to clean lattice windows (rotation 0): projection on their top `k` principal components.

    The hidden layer holds +code and -code, so relu(a) - relu(-a) keeps the projection linear."""
    windows = (
        synthetic.clean_windows(n, np.random.default_rng(0), max_rotation_deg=0.0).reshape(n, -1).astype(np.float64)
    )
    mean = windows.mean(axis=0)
    basis = torch.tensor(np.linalg.svd(windows - mean, full_matrices=False)[2][:k], dtype=torch.float32)
    mean = torch.tensor(mean, dtype=torch.float32)
    model = WindowAE(28, (2 * k,)).eval()
    enc, dec = model.linear_layers()
    with torch.no_grad():
        enc.weight.copy_(torch.cat([basis, -basis]))
        enc.bias.copy_(torch.cat([-basis @ mean, basis @ mean]))
        dec.weight.copy_(torch.cat([basis, -basis]).t())
        dec.bias.copy_(mean)
    return model


@pytest.mark.parametrize("size", [28, 29, 30, 41, 57, 64])
@pytest.mark.parametrize("step", [1, 2, 3, 4, 5, 9, 28])
def test_window_starts_cover_every_pixel_from_inside_the_frame(size, step):
    starts = window_starts(size, 28, step)
    assert starts[0] == 0 and starts[-1] == size - 28  # no window leaves the frame
    assert all(s % step == 0 for s in starts[:-1]) and starts == sorted(set(starts))
    assert len(starts) == (size - 28) // step + 1 + ((size - 28) % step > 0)  # the grid, plus the edge window if missed
    covered = np.zeros(size, int)
    for s in starts:
        covered[s : s + 28] += 1
    assert covered.min() >= 1


@pytest.mark.parametrize("shape", [(28, 28), (29, 31), (64, 100), (45, 28), (37, 53), (41, 30)])
@pytest.mark.parametrize("step", [1, 2, 3, 4, 5, 28])
def test_fast_matches_naive_and_forward(shape, step):
    model = _random_model()
    frame = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        naive = reconstruct_naive(model, frame, step)
        fast = reconstruct(model, frame[None, None], step)[0, 0]
    assert fast.shape == frame.shape == naive.shape
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape, step", [((29, 31), 1), ((64, 100), 3), ((37, 53), 5), ((41, 30), 4)])
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


@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_corner_pixels_come_from_the_corner_window_alone(step):
    """A corner pixel lies in one window inside the frame: no padded or mirrored window may reach it."""
    model = _random_model()
    frame = torch.rand(41, 30, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        out = reconstruct(model, frame[None, None], step)[0, 0]
        for rows, cols in ((slice(0, 28), slice(0, 28)), (slice(0, 28), slice(-28, None)),
                           (slice(-28, None), slice(0, 28)), (slice(-28, None), slice(-28, None))):
            corner = model(frame[rows, cols].reshape(1, -1)).view(28, 28)
            for r, c in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
                if (r == 0) == (rows.start == 0) and (c == 0) == (cols.start == 0):
                    torch.testing.assert_close(out[r, c], corner[r, c], atol=1e-5, rtol=0)


def test_frame_of_the_window_size_is_one_window():
    model = _random_model()
    frame = torch.rand(28, 28, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        want = model(frame.reshape(1, -1)).view(28, 28)
        for step in (1, 2, 3, 28):
            torch.testing.assert_close(reconstruct(model, frame[None, None], step)[0, 0], want, atol=1e-5, rtol=0)


def test_frames_smaller_than_the_window_are_refused():
    model = _random_model(hidden=(8, 4))
    with pytest.raises(ValueError, match="smaller than the window"):
        reconstruct(model, torch.rand(1, 1, 27, 40), 2)
    with pytest.raises(ValueError, match="smaller than the window"):
        reconstruct_naive(model, torch.rand(40, 27), 2)


def test_border_of_a_denoised_lattice_is_about_as_good_as_the_interior():
    """A lattice-fitted AE cleans border pixels nearly as well as interior ones; with reflect padding
    (the former geometry) mirrored windows, unlike any lattice window, made the border 4x worse."""
    model = _lattice_pca_model()
    band, step = 14, 2

    def border_over_interior(pad: bool) -> float:
        border = interior = 0.0
        for seed in (0, 1):
            rng = np.random.default_rng(seed)
            clean = synthetic.simulate_frame((64, 64), rng, offset_px=(3.3, 1.7)).clean
            noisy = torch.from_numpy(clean + 0.3 * rng.standard_normal(clean.shape, dtype=np.float32))[None, None]
            with torch.inference_mode():
                if pad:
                    x, (top, left) = pad_frames(noisy, 28, step)
                    out = reconstruct(model, x, step)[0, 0, top : top + 64, left : left + 64]
                else:
                    out = reconstruct(model, noisy, step)[0, 0]
            sq = (out.numpy() - clean) ** 2
            inner = np.zeros(sq.shape, bool)
            inner[band:-band, band:-band] = True
            border, interior = border + sq[~inner].mean(), interior + sq[inner].mean()
        return border / interior

    # the outermost pixels average fewer windows, so some excess remains (about 1.3x here)
    assert border_over_interior(pad=False) < 2.0
    assert border_over_interior(pad=True) > 3.0  # the check can tell mirrored windows apart


@pytest.mark.parametrize("size", [28, 29, 40, 57])
@pytest.mark.parametrize("step", [1, 2, 3, 5, 9, 28])
def test_former_padding_covers_every_window_of_the_infinite_grid(size, step):
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


def test_former_pad_reflects_and_replicates_when_too_small():
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
        torch.testing.assert_close(
            reconstruct(model, frame[None, None], 3)[0, 0], reconstruct_naive(model, frame, 3), atol=1e-5, rtol=0
        )
        assert reconstruct(model, torch.rand(0, 1, 30, 30), 2).shape == (0, 1, 30, 30)


def test_bad_step_is_refused():
    model = _random_model(hidden=(8, 4))
    for step in (0, 29):
        with pytest.raises(ValueError, match="step"):
            reconstruct(model, torch.rand(1, 1, 30, 30), step)


@pytest.mark.parametrize("shape", [(28, 75), (75, 28), (28, 28), (64, 80)])
def test_bf16_autocast_stays_finite_and_near_float32(shape):
    """Strips one window wide or high run in float32 and the overlap-add is float32 under bf16 autocast:
    the shipped paper AE stays finite and within 1% of the float32 result's peak (a bf16 overlap-add was 7% off)."""
    model, _ = load_checkpoint(PAPER_AE_PATH)
    rng = np.random.default_rng(3)
    clean = synthetic.simulate_frame(shape, rng, rotation_deg=7.0).clean[None]
    x, _, _ = normalize(synthetic.corrupt(clean, synthetic.NoiseSpec(kind="poisson", dose=20.0), rng))
    x = torch.from_numpy(x)[:, None]
    with torch.inference_mode():
        ref = reconstruct(model, x, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = reconstruct(model, x, 2)
    assert low.dtype == x.dtype and torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.01 * ref.abs().max()
