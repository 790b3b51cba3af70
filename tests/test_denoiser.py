"""Device choice, input checks, normalisation and the Denoiser front end."""

import collections
import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from stemd.compute import hostsync
from stemd.compute.metrics import fit_scale, psnr
from stemd.compute.normalize import REFERENCE_LEVELS, check_frames, denormalize, mean_and_signal_std, normalize
from stemd.errors import CheckpointError, ConfigError, InputError, ModelOutputError
from stemd.models.checkpoint import save_checkpoint
from stemd.models.conv_unet import ConvDenoiser
from stemd.models.window_ae import WindowAE
from stemd.pipeline import Denoiser, resolve_device
from stemd.sim import scenes
from stemd.sim.lattice import NoiseSpec, corrupt, simulate_frame


def _lattice(shape=(64, 80), seed=0) -> np.ndarray:
    """A clean training-like lattice (background about 0, column peak 1.0)."""
    rng = np.random.default_rng(seed)
    return simulate_frame(shape, rng, rotation_deg=rng.uniform(0, 90), offset_px=tuple(rng.uniform(0, 10, 2))).clean


def _model(seed=0) -> WindowAE:
    torch.manual_seed(seed)
    return WindowAE(28, (32, 8)).eval()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="allowed: auto, cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without a GPU")
def test_resolve_device_cuda_without_gpu():
    with pytest.raises(ConfigError, match="model.device: cuda requested but no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.parametrize(
    "image, message",
    [
        ([[1.0] * 30] * 30, "expected a numpy array, got list"),
        (np.zeros((30, 30), dtype=complex), "complex128"),
        (np.zeros((30, 30), dtype=bool), "bool"),
        (np.zeros((30, 30), dtype=object), "object"),
        (np.zeros(30), "got 1D array of shape \\(30,\\)"),
        (np.zeros((2, 2, 30, 30)), "expected a 2D frame or a 3D stack, got 4D array of shape \\(2, 2, 30, 30\\)"),
        (np.zeros((0, 30, 30)), "empty"),
        (np.zeros((20, 300)), "frame is 20×300 px; the model's window is 28 px"),
        (np.zeros((3, 300, 27)), "300×27 px"),
    ],
)
def test_check_frames_errors(image, message):
    with pytest.raises(InputError, match=message):
        check_frames(image)


def test_check_frames_counts_non_finite():
    image = np.zeros((2, 30, 30), dtype=np.float32)
    image[0, 1, 1] = image[1, 2, 2] = np.nan
    image[1, 0, 0] = -np.inf
    with pytest.raises(InputError, match="2 NaN and 1 inf"):
        check_frames(image)
    check_frames(np.zeros((30, 40), dtype=np.uint16))  # fine: no error


def test_normalize_is_invariant_to_gain_and_offset():
    rng = np.random.default_rng(1)
    clean = np.stack([_lattice(seed=0), _lattice(seed=1)])
    noisy = clean + rng.normal(0, 0.2, clean.shape).astype(np.float32)
    ref, lo, hi = normalize(noisy)
    for gain, offset in [(1000.0, 200.0), (0.01, -3.0), (7.0, 0.0)]:
        out, lo2, hi2 = normalize(gain * noisy + offset)
        np.testing.assert_allclose(out, ref, atol=2e-3)
        np.testing.assert_allclose(lo2, gain * lo + offset, rtol=1e-4, atol=1e-3 * abs(offset) + 1e-6)
        np.testing.assert_allclose(denormalize(out, lo2, hi2), gain * noisy + offset, rtol=1e-4, atol=1e-3 * gain)
    counts = np.clip(np.round(500 * noisy + 1000), 0, 65535).astype(np.uint16)  # detector-like counts
    out, _, _ = normalize(counts)
    np.testing.assert_allclose(out, ref, atol=5e-3)


@pytest.mark.parametrize(
    "noise", [NoiseSpec("none"), NoiseSpec("uniform", snr=0.33), NoiseSpec("poisson", dose=10, background=0.5),
              NoiseSpec("uniform", snr=0.33, line_offset=0.1, line_gain=0.05)],
)
def test_normalize_maps_a_noisy_lattice_to_the_clean_scale(noise):
    rng = np.random.default_rng(2)
    clean = _lattice((192, 192), seed=5)
    noisy = corrupt(clean, noise, rng)
    out, lo, hi = normalize((50 * noisy + 300)[None])
    assert lo[0] == pytest.approx(300, abs=0.1 * 50)  # background within 10% of the peak height
    assert hi[0] == pytest.approx(350, abs=0.1 * 50)  # column peak
    assert np.abs(out[0] - noisy).mean() < 0.05


def lattice_reference(period_px: float, sigma_px: float, size: int = 128) -> tuple[float, float]:
    """(mean, signal std) of the clean training lattice over four rotations."""
    rng = np.random.default_rng(0)
    clean = np.stack([simulate_frame((size, size), rng, period_px=period_px, sigma_px=sigma_px, rotation_deg=r).clean
                      for r in (0.0, 15.0, 30.0, 45.0)])
    mean, signal, _ = mean_and_signal_std(clean)
    return float(mean.mean()), float(signal.mean())


def test_reference_levels_match_the_synthetic_lattice():
    mean, std = lattice_reference(10.0, 1.5, size=128)
    assert mean == pytest.approx(REFERENCE_LEVELS[0], rel=0.02) and std == pytest.approx(REFERENCE_LEVELS[1], rel=0.02)
    assert lattice_reference(14.0, 1.5, size=128)[0] < mean  # sparser lattice, darker on average


def test_pure_noise_is_not_blown_up():
    noise = np.random.default_rng(6).normal(100, 5, (1, 64, 64)).astype(np.float32)
    out, lo, hi = normalize(noise)
    assert np.isfinite(out).all() and np.abs(out).max() < 100


def test_normalize_flat_frame():
    flat = np.full((2, 30, 30), 7.0, dtype=np.float32)
    out, lo, hi = normalize(flat)
    assert out.dtype == np.float32 and np.all(out == 0) and np.all(lo == 7.0) and np.all(hi == 7.0)
    np.testing.assert_array_equal(denormalize(out, lo, hi), flat)


def test_denoiser_shapes_batch_and_scale(tmp_path: Path):
    den = Denoiser(_model(), {"step": 3}, device="cpu")
    assert den.step == 3 and den.window == 28 and den.metadata == {"step": 3}
    rng = np.random.default_rng(3)
    frames = np.stack([_lattice((40, 52), seed=s) + rng.normal(0, 0.2, (40, 52)) for s in range(3)])
    frames = (100 * frames + 50).astype(np.float32)
    frames[1] *= 3  # different content and scale per frame
    batch = den(frames)
    assert batch.shape == frames.shape and batch.dtype == np.float32
    for i in range(3):
        single = den(frames[i])
        assert single.shape == frames[i].shape and single.dtype == np.float32
        np.testing.assert_allclose(batch[i], single, rtol=1e-5, atol=1e-3)
    # units follow the input: a gain and offset on the input give the same on the output
    np.testing.assert_allclose(den(2 * frames[0] + 10), 2 * batch[0] + 10, rtol=1e-4, atol=0.05)
    with pytest.raises(InputError):
        den(np.zeros((10, 10)))


def test_denoiser_step_and_model_id(tmp_path: Path):
    model = _model()
    assert Denoiser(model, {}, device="cpu").step == 2
    assert Denoiser(model, {"step": 4}, device="cpu", step=5).step == 5
    for bad in (0, 29, 2.5):
        with pytest.raises(ConfigError, match="model.step"):
            Denoiser(model, {}, device="cpu", step=bad)
    with pytest.raises(CheckpointError, match="checkpoint metadata step"):
        Denoiser(model, {"step": 40}, device="cpu")
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, {"step": 4})
    a, b = Denoiser(model, {}, device="cpu"), Denoiser.load(path, device="cpu")
    assert b.step == 4 and a.model_id == b.model_id
    assert a.model_id.startswith("window_ae-") and len(a.model_id) == len("window_ae-") + 12
    assert Denoiser(_model(seed=1), {}, device="cpu").model_id != a.model_id
    frame = np.random.default_rng(4).random((30, 35)).astype(np.float32)
    np.testing.assert_allclose(Denoiser.load(path, device="cpu", step=2)(frame), a(frame), rtol=0, atol=1e-6)


def test_checkpoint_normalization_reference(tmp_path: Path):
    assert Denoiser(_model(), {}, device="cpu").reference == REFERENCE_LEVELS
    den = Denoiser(_model(), {"normalization": {"mean": 0.3, "signal_std": 0.25}}, device="cpu")
    assert den.reference == (0.3, 0.25)
    for bad in ({"mean": 0.3}, {"mean": 0.3, "signal_std": -1.0}, [1, 2]):
        with pytest.raises(CheckpointError, match="metadata.normalization"):
            Denoiser(_model(), {"normalization": bad}, device="cpu")


def test_denoise_tensor_stays_on_device():
    den = Denoiser(_model(), {}, device="cpu")
    frames = torch.rand(2, 1, 30, 30)
    with torch.inference_mode():
        out = den.denoise_tensor(frames)
    assert out.shape == frames.shape and out.device == frames.device


@pytest.mark.parametrize("kind", ["window_ae", "conv_unet"])
def test_bf16_precision_tracks_float32(tmp_path: Path, kind):
    """bf16 autocast (CPU here) changes the arithmetic, not the answer: within 1% of the frame's range."""
    from stemd.models.conv_unet import ConvDenoiser

    torch.manual_seed(0)
    model = WindowAE(28, (64, 16)) if kind == "window_ae" else ConvDenoiser((8, 16), guide="bragg")
    if kind == "conv_unet":
        torch.nn.init.normal_(model.head.weight, std=0.1)  # not the identity it starts as
    save_checkpoint(tmp_path / "m.pt", model, {"step": 3})
    rng = np.random.default_rng(0)
    frame = corrupt(simulate_frame((64, 72), rng).clean, NoiseSpec(kind="poisson", dose=20.0), rng)
    ref = Denoiser.load(tmp_path / "m.pt", device="cpu")(frame)
    low = Denoiser.load(tmp_path / "m.pt", device="cpu", precision="bf16")(frame)
    assert low.dtype == np.float32 and not np.array_equal(low, ref)
    assert np.abs(low - ref).max() < 0.01 * np.ptp(ref)
    with pytest.raises(ConfigError, match="model.precision.*'float32', 'tf32' or 'bf16'"):
        Denoiser.load(tmp_path / "m.pt", device="cpu", precision="half")


# ---- sampling: the frame's pixel size against the model's trained lattice periods (stemd.compute.sampling)

SRTIO3_M = 3.905e-10


class _ShapeSpy(torch.nn.Module):
    """A stand-in model that records the frame sizes it is given and returns its input."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    inputs = ()

    def arch(self) -> dict:
        return {"name": "spy", "window": 28}

    def denoise_frames(self, frames: torch.Tensor, step: int) -> torch.Tensor:
        self.seen.append(tuple(frames.shape[-2:]))
        return frames


def test_denoiser_resamples_into_the_range_and_back():
    spy = _ShapeSpy()
    den = Denoiser(spy, {"sampling": {"period_px": [6, 20]}}, device="cpu", calibrate=False)
    assert den.period_range == (6.0, 20.0) and den.sampling == "resample" and den.lattice_period_m == SRTIO3_M
    frame = _lattice((90, 120))
    for pixel, seen in [(None, (90, 120)), (SRTIO3_M / 12, (90, 120)), (SRTIO3_M / 30, (60, 80)),
                        (SRTIO3_M / 4, (135, 180))]:
        out = den(frame, pixel_size_m=pixel)
        assert spy.seen.pop() == seen and out.shape == frame.shape and out.dtype == np.float32
    with torch.inference_mode():
        y = den.denoise_tensor(torch.rand(2, 1, 90, 120), SRTIO3_M / 30)
    assert y.shape == (2, 1, 90, 120) and spy.seen.pop() == (60, 80)


def test_denoiser_refuses_before_running_the_model():
    spy = _ShapeSpy()
    den = Denoiser(spy, {"sampling": {"period_px": [6, 20]}}, device="cpu", sampling="refuse", calibrate=False)
    with pytest.raises(InputError, match="40 px per period; the model was trained on 6-20 px"):
        den(_lattice(), pixel_size_m=SRTIO3_M / 40)
    assert spy.seen == [] and den(_lattice(), pixel_size_m=SRTIO3_M / 10).shape == (64, 80)
    off = Denoiser(spy, {"sampling": {"period_px": [6, 20]}}, device="cpu", sampling="off")
    off(_lattice(), pixel_size_m=SRTIO3_M / 40)
    assert spy.seen.pop() == (64, 80)


def test_denoiser_sampling_settings_name_the_key(tmp_path: Path):
    save_checkpoint(tmp_path / "m.pt", _model(), {})
    with pytest.raises(ConfigError, match="model.sampling.*'resample', 'refuse' or 'off'"):
        Denoiser.load(tmp_path / "m.pt", device="cpu", sampling="always")
    with pytest.raises(ConfigError, match="model.lattice_period_m"):
        Denoiser.load(tmp_path / "m.pt", device="cpu", lattice_period_m=3.905)
    with pytest.raises(CheckpointError, match="period"):
        Denoiser(_model(), {"sampling": {"period_px": "wide"}}, device="cpu")


def test_resampling_rescues_a_single_period_model(tmp_path: Path):
    """A window model of the 10 px lattice (PCA projection) on a 14 px lattice: told the pixel size, it
    resamples the frame to ~10 px and cleans it far better than when run as is."""
    from conftest import pca_model

    save_checkpoint(tmp_path / "pca.pt", pca_model(), {"lattice": {"period_px": 10.0}, "step": 4})
    den = Denoiser.load(tmp_path / "pca.pt", device="cpu", calibrate=False)
    rng = np.random.default_rng(1)
    clean = simulate_frame((112, 126), rng, period_px=14.0, sigma_px=2.1, rotation_deg=20.0).clean
    noisy = corrupt(clean, NoiseSpec(kind="poisson", dose=20.0), rng)
    mse = lambda x: float(np.mean((x - clean)[8:-8, 8:-8] ** 2))  # noqa: E731
    as_is, resampled = mse(den(noisy)), mse(den(noisy, pixel_size_m=SRTIO3_M / 14.0))
    assert resampled < 0.5 * as_is and resampled < 0.2 * mse(noisy)


def test_conv_guide_is_taken_at_the_frames_own_sampling(monkeypatch):
    """Resampling a Bragg-guided conv model: the guide is the original frame's, resampled with it, and
    the noise level the original frame's (interpolation would smooth the noise away)."""
    from stemd.compute.fourier import bragg_filter, noise_level
    from stemd.compute.sampling import resample
    from stemd.models.conv_unet import ConvDenoiser

    model = ConvDenoiser((4, 8), guide="bragg", noise_level=True)
    seen = []
    monkeypatch.setattr(model, "forward", lambda x, guide=None, level=None: seen.append((x, guide, level)) or x)
    den = Denoiser(model, {"sampling": {"period_px": [6, 20]}}, device="cpu")
    frames = torch.from_numpy(_lattice((60, 64)))[None, None]
    with torch.inference_mode():
        den.denoise_tensor(frames, SRTIO3_M / 4)  # 4 px per period: upsampled 1.5x
    (x, guide, level), = seen
    assert x.shape[-2:] == (90, 96) and guide is not None
    torch.testing.assert_close(guide, resample(bragg_filter(frames), 1.5))
    torch.testing.assert_close(level, noise_level(frames))
    assert float(noise_level(x)) < 0.8 * float(level)
    with torch.inference_mode():
        den.denoise_tensor(frames, SRTIO3_M / 10)  # in range: the frame's own guide and level, as they are
    torch.testing.assert_close(seen[-1][0], frames)
    torch.testing.assert_close(seen[-1][1], bragg_filter(frames))  # (too small a frame for a planar band)
    torch.testing.assert_close(seen[-1][2], noise_level(frames))


def test_conv_model_is_guided_by_the_planar_guide_unless_told_not_to(monkeypatch):
    """planar (default): the model's guide is stemd.compute.planar's, which differs from the Bragg guide across an RP
    fault; planar=False: the Bragg guide."""
    from stemd.compute.fourier import bragg_filter
    from stemd.compute.planar import planar_guide
    from stemd.models.conv_unet import ConvDenoiser

    model = ConvDenoiser((4, 8), guide="bragg")
    seen = []
    monkeypatch.setattr(model, "forward", lambda x, guide=None, level=None: seen.append(guide) or x)
    clean = simulate_frame((256, 256), np.random.default_rng(0), period_px=10.0, sigma_px=1.3, rotation_deg=7.0,
                           defect="rp").clean
    noisy = corrupt(clean, NoiseSpec(kind="poisson", dose=20.0), np.random.default_rng(1))
    frames = torch.from_numpy(noisy)[None, None]
    with torch.inference_mode():
        for planar in (True, False):
            Denoiser(model, {}, device="cpu", dejitter=0, planar=planar).denoise_tensor(frames)
    torch.testing.assert_close(seen[0], planar_guide(frames))
    torch.testing.assert_close(seen[1], bragg_filter(frames))
    assert (seen[0] - seen[1]).abs().max() > 0.05
    with pytest.raises(ConfigError, match="model.planar.*valid boolean"):
        Denoiser(model, {}, device="cpu", planar="yes")


def test_a_plan_records_its_frames_planar_faults_and_a_fault_free_series_skips_the_search(one_torch_thread):
    """The plan measures along which directions its frame shows a planar fault (`Plan.faults`): one on the RP
    named frame, none on the vacancies frame. Frames run by it give the output a search of all four gives, to the
    bit."""
    from dataclasses import replace

    den = Denoiser.load(device="cpu")
    for name, count in (("perovskite_rp", 1), ("vacancies", 0)):
        noisy = scenes.named_frame(name, (256, 256), seed=3, dose=5.0)[0]
        plan = den.plan(noisy.shape, None, noisy)
        assert plan.faults is not None and len(plan.faults) == count, (name, plan.faults)
        later = torch.from_numpy(scenes.named_frame(name, (256, 256), seed=4, dose=5.0)[0])[None]
        with torch.inference_mode():
            torch.testing.assert_close(den.run(later, plan), den.run(later, replace(plan, faults=None)),
                                       rtol=0, atol=0)


def test_flips_average_the_model_over_the_four_flips(tmp_path: Path):
    """flips=True is the mean of the model on the frame's left-right/up-down flips, each flipped back."""
    from stemd.models.conv_unet import ConvDenoiser

    torch.manual_seed(0)
    model = ConvDenoiser((4, 8), guide="bragg")
    torch.nn.init.normal_(model.head.weight, std=0.1)  # not the identity it starts as
    save_checkpoint(tmp_path / "m.pt", model, {})
    plain = Denoiser.load(tmp_path / "m.pt", device="cpu", recover=False)
    flips = Denoiser.load(tmp_path / "m.pt", device="cpu", flips=True, recover=False)
    x = torch.from_numpy(_lattice((64, 72)))[None, None]
    with torch.inference_mode():
        expected = sum(plain.denoise_tensor(x.flip(d)).flip(d) for d in ([], [-1], [-2], [-2, -1])) / 4
        got = flips.denoise_tensor(x)
        torch.testing.assert_close(got, expected)
        assert not torch.allclose(got, plain.denoise_tensor(x))
    with pytest.raises(ConfigError, match="model.flips"):
        Denoiser.load(tmp_path / "m.pt", device="cpu", flips="yes")


class _Broken(_ShapeSpy):
    """A model whose output is NaN at one pixel: what a bad kernel or weights would give."""

    def denoise_frames(self, frames: torch.Tensor, step: int) -> torch.Tensor:
        out = frames.clone()
        out[..., 3, 4] = float("nan")
        return out


def test_non_finite_output_is_never_returned():
    den = Denoiser(_Broken(), {}, device="cpu", dejitter=0)
    with pytest.raises(ModelOutputError, match="1 non-finite pixel"):
        den(_lattice((64, 64)))


def test_huge_finite_frames_normalise_and_come_back_finite():
    """Frames of ~1e18 and above stay finite through the float64 statistics (float32 ones overflowed to NaN)."""
    den = Denoiser(_ShapeSpy(), {}, device="cpu", dejitter=0)
    frame = (_lattice((64, 64)) * 3e37).astype(np.float32)
    out = den(frame)
    assert np.isfinite(out).all() and np.allclose(out, frame, rtol=1e-5, atol=1e-6 * float(frame.max()))


def test_a_coarse_lattice_without_a_pixel_size_is_measured_and_shrunk():
    """No pixel size, no lattice period: the shipped model measures the 25 px lattice in the frame, shrinks it into
    its trained range and back, and beats running it as is at low dose (0.9 dB on this 256² frame)."""
    rng = np.random.default_rng(5)
    scene = scenes.random_scene((256, 256), rng, period_px=25.0, structures=("perovskite",), layouts=("perfect",))
    noisy = scenes.apply_instrument(scene.clean, rng, scenes.draw_noise(rng, dose=2.0), dose=2.0)
    den, as_is = Denoiser.load(device="cpu"), Denoiser.load(device="cpu", calibrate=False)
    plan = den.plan(noisy.shape, None, noisy)
    assert plan.source == "frame" and plan.scale_px == pytest.approx(25.0 * math.sqrt(0.5), rel=0.03)
    assert plan.factor == pytest.approx(den.scale_range[1] / plan.scale_px)
    gain = psnr(fit_scale(den(noisy), scene.clean), scene.clean, 1.0) - psnr(
        fit_scale(as_is(noisy), scene.clean), scene.clean, 1.0)
    assert gain > 0.5


def test_no_line_jitter_correction_without_a_lattice_to_fit_lines_against():
    """A particle-like frame with no measurable lattice: the plan says so and the line-jitter correction is skipped
    (fitted against a smooth reference it moved real scan lines the wrong way); a lattice frame still gets it."""
    rng = np.random.default_rng(8)
    yy, xx = np.mgrid[:128, :128]
    blob = 40.0 * np.exp(-((yy - 60.0) ** 2 + (xx - 70.0) ** 2) / (2 * 25.0**2)) + 5.0
    particle = rng.poisson(blob).astype(np.float32)
    with_dejitter, without = Denoiser.load(device="cpu", dejitter=2), Denoiser.load(device="cpu", dejitter=0)
    plan = with_dejitter.plan(particle.shape, None, particle)
    assert plan.lattice is False and plan.scale_px is None
    np.testing.assert_array_equal(with_dejitter(particle), without(particle))
    lattice = (_lattice((128, 128)) * 30).astype(np.float32)
    jittered = np.stack([np.roll(row, int(s)) for row, s in zip(lattice, rng.integers(-1, 2, 128))])
    noisy = rng.poisson(jittered + 2).astype(np.float32)
    assert with_dejitter.plan(noisy.shape, None, noisy).lattice is True
    assert not np.array_equal(with_dejitter(noisy), without(noisy))


@pytest.mark.parametrize("kind", ["perovskite_rp", "amorphous"])
def test_sane_below_one_count_per_pixel(kind):
    """Dose 0.5 (under one count per pixel on average): the shipped pipeline stays finite and beats the best
    Gaussian filter by more than 1 dB (measured 7.0 and 2.7 dB on 256² frames)."""
    noisy, scene, _ = scenes.named_frame(kind, (192, 192), dose=0.5)
    assert noisy.mean() * 0.5 < 1.0
    out = Denoiser.load(device="cpu")(noisy)
    best = max(psnr(fit_scale(gaussian_filter(noisy.astype(np.float64), s), scene.clean), scene.clean, 1.0)
               for s in (1.0, 1.5, 2.0, 3.0, 4.0))
    assert np.isfinite(out).all() and psnr(fit_scale(out, scene.clean), scene.clean, 1.0) > best + 1.0


def test_threads_setting_sets_torch_threads_on_the_cpu():
    before = torch.get_num_threads()
    try:
        Denoiser(_ShapeSpy(), {}, device="cpu", threads=1)
        assert torch.get_num_threads() == 1
        Denoiser(_ShapeSpy(), {}, device="cpu")  # 0: torch's default, left as it is
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu", "nonzero",
              "masked_select")


@contextlib.contextmanager
def counting_host_reads():
    """Count what would read a device tensor back to the host (each a CUDA sync): the Tensor methods in
    HOST_READS and indexing by a boolean mask (its size is data). Yields a Counter of method names."""
    seen: collections.Counter[str] = collections.Counter()
    saved = {name: getattr(torch.Tensor, name) for name in (*HOST_READS, "__getitem__", "__setitem__")}

    def counted(name):
        original = saved[name]

        def wrapper(self, *args, **kwargs):
            if name in HOST_READS:
                seen[name] += 1
            else:
                index = args[0] if isinstance(args[0], tuple) else (args[0],)
                if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                    seen[f"{name} by a mask"] += 1
            return original(self, *args, **kwargs)
        return wrapper

    try:
        for name in saved:
            setattr(torch.Tensor, name, counted(name))
        yield seen
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def test_the_per_frame_path_reads_nothing_back_once_the_plan_is_made(one_torch_thread, monkeypatch):
    """After a series' plan (its lattice measured once), `Denoiser.run` of a batch reads no device value back
    to the host where a read is a sync (`hostsync.free` false, as on a GPU): outliers, line-jitter correction,
    the planar guide with the plan's lattice, the point-defect guide, the model, all as tensor operations. On the
    CPU the shortcuts `hostsync.free` allows read some back, and give the same output."""
    noisy = scenes.named_frame("perovskite_rp", (256, 256), seed=3, dose=5.0)[0]
    frames = torch.from_numpy(np.stack([noisy, noisy[::-1].copy()]).astype(np.uint16))
    den = Denoiser.load(device="cpu")
    plan = den.plan(frames.shape, None, frames.numpy())
    assert plan.vectors is not None
    with torch.inference_mode(), counting_host_reads() as seen:
        shortcut = den.run(frames, plan)
    assert sum(seen.values()) > 0, "the CPU shortcuts read values back (else this test checks nothing)"
    monkeypatch.setattr(hostsync, "free", lambda device: False)
    with torch.inference_mode(), counting_host_reads() as seen:
        out = den.run(frames, plan)
        den.run(frames, plan)
    assert sum(seen.values()) == 0, dict(seen)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, shortcut)
    with counting_host_reads() as seen:  # the counter sees a read when there is one
        assert float(torch.ones(())) == 1.0 and torch.arange(4)[torch.arange(4) > 1].tolist() == [2, 3]
    assert seen == {"__float__": 1, "__getitem__ by a mask": 1, "tolist": 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device tool's machines)")
def test_the_per_frame_path_does_not_sync_on_cuda():
    """As above on the GPU, checked by torch itself: `set_sync_debug_mode("error")` raises on any sync."""
    noisy = scenes.named_frame("perovskite_rp", (256, 256), seed=3, dose=5.0)[0]
    frames = torch.from_numpy(np.stack([noisy, noisy]).astype(np.uint16))
    den = Denoiser.load(device="cuda")
    plan = den.plan(frames.shape, None, frames.numpy())
    raw = frames.cuda()
    with torch.inference_mode():
        den.run(raw, plan)  # first call: cuDNN's benchmark, cached geometry
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = den.run(raw, plan)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def test_the_default_model_keeps_dopants_the_guide_would_dim(one_torch_thread):
    """keep_defects (default): the guide steps aside at columns the frame contradicts (stemd.compute.columns), so
    heavier substitutions stay brighter than with the lattice guide alone; on intact columns the two agree."""
    rng = np.random.default_rng(5)
    phase = scenes.Phase("perovskite", 10.0, 15.0, (2.0, 5.0))
    scene = scenes.build_scene((192, 192), [phase], [], rng, sigma_px=1.3, blur_px=0.6, intensity_cv=0.03,
                               dopant_frac=0.1)
    noisy = scenes.apply_instrument(scene.clean, np.random.default_rng(6), {**scenes.NAMED_NOISE, "dose": 20.0})
    kept, pulled = (Denoiser.load(device="cpu", keep_defects=keep)(noisy) for keep in (True, False))
    d = scene.params["defects"]
    dopants = d["seen"][(d["kind"] == 3) & ((d["seen"] > 12) & (d["seen"] < 180)).all(1)]
    assert len(dopants) >= 5

    def height(image: np.ndarray, points: np.ndarray) -> np.ndarray:
        return np.array([image[int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2].mean()
                         for y, x in points])

    truth = height(scene.clean, dopants)
    assert np.abs(height(kept, dopants) - truth).mean() < 0.75 * np.abs(height(pulled, dopants) - truth).mean()
    intact = scene.columns[~scene.near_defect & ((scene.columns > 12) & (scene.columns < 180)).all(1)]
    assert np.abs(height(kept, intact) - height(pulled, intact)).mean() < 0.02


class _Flattener(_ShapeSpy):
    """A stand-in model that is clearly wrong: it returns each frame's mean, keeping nothing of the lattice."""

    def denoise_frames(self, frames: torch.Tensor, step: int) -> torch.Tensor:
        return frames.mean((-2, -1), keepdim=True).expand_as(frames)


def _counted(shape=(192, 192), counts=60.0, seed=3) -> np.ndarray:
    """A lattice counted as Poisson at `counts` per unit through a detector (gain 30, offset 400), uint16."""
    mean = (_lattice(shape, seed) + 0.2) * counts
    return (30 * np.random.default_rng(seed).poisson(mean) + 400).astype(np.uint16)


def test_self_check_blends_the_input_back_where_the_model_is_clearly_wrong():
    den = Denoiser(_Flattener(), {}, device="cpu", self_check=True, recover=False)  # recover would mend it
    raw = _counted()
    plan = den.plan(raw.shape, None, raw)
    assert plan.checked == "yes" and plan.blend == 0.5
    assert plan.describe()["self_check"] == {"result": "yes", "blend": 0.5}
    with torch.inference_mode():
        given = den.prepared(torch.from_numpy(raw)[None], plan)[0].numpy()
    np.testing.assert_allclose(den(raw, plan=plan), 0.5 * given + 0.5 * given.mean(), rtol=1e-4, atol=1e-2)
    off = Denoiser(_Flattener(), {}, device="cpu").plan(raw.shape, None, raw)  # off by default
    assert off.checked == "no" and off.blend == 1.0 and "self_check" not in off.describe()


@pytest.mark.parametrize("kind", ["interface", "vacuum_edge"])
def test_self_check_keeps_the_shipped_model_alone_on_a_simulated_frame(kind):
    """Where the model is right (its own simulated frames, half vacuum too) the check keeps its output (true PSNR
    within 0.05 dB), and at under one count per pixel, where the gain fit is unreliable, it does not run."""
    den = Denoiser.load(device="cpu", self_check=True)
    noisy, scene, _ = scenes.named_frame(kind, (192, 192), dose=200.0)
    plan = den.plan(noisy.shape, None, noisy)
    assert plan.checked == "yes" and plan.blend >= 0.95
    alone = den(noisy, plan=Denoiser.load(device="cpu").plan(noisy.shape, None, noisy))
    assert psnr(den(noisy, plan=plan), scene.clean, 1.0) > psnr(alone, scene.clean, 1.0) - 0.05
    low, _, _ = scenes.named_frame(kind, (192, 192), dose=0.5)
    assert den.plan(low.shape, None, low).checked.startswith("skipped")



class _Mirror(_ShapeSpy):
    """A stand-in model that is clearly wrong: each frame mirrored left to right."""

    def denoise_frames(self, frames: torch.Tensor, step: int) -> torch.Tensor:
        return frames.flip(-1)


def _identity_net() -> ConvDenoiser:
    """An untrained conv model: its head starts at zero, so it returns its input (keeps all the noise)."""
    torch.manual_seed(0)
    return ConvDenoiser((8, 16), guide="none").eval()


def test_adapt_fine_tunes_a_model_that_does_not_fit_the_frame_and_keeps_it_for_the_series(monkeypatch):
    monkeypatch.setattr("stemd.models.adapt.LR", 3e-3)  # an untrained model: larger steps than a trained one's
    raw = _counted(counts=20.0)
    truth = (_lattice((192, 192), 3) + 0.2) * 20.0 * 30 + 400
    den = Denoiser(_identity_net(), {}, device="cpu", adapt=40, recover=False)
    plan = den.plan(raw.shape, None, raw)
    assert plan.adapted.startswith("yes") and plan.model is not None
    assert plan.describe()["adapt"] == plan.adapted
    plain = Denoiser(_identity_net(), {}, device="cpu", recover=False)
    off = plain.plan(raw.shape, None, raw)
    assert off.adapted == "no" and off.model is None and "adapt" not in off.describe()
    assert psnr(den(raw, plan=plan), truth) > psnr(plain(raw, plan=off), truth) + 0.5
    assert den(raw[None].repeat(2, 0), plan=plan).shape == (2, 192, 192)  # the series' frames run through it


def test_adapt_keeps_the_shipped_model_where_the_fine_tune_scores_worse_and_skips_too_few_counts(monkeypatch):
    raw = _counted(counts=20.0)
    monkeypatch.setattr("stemd.pipeline.finetune", lambda *args, **kwargs: _Mirror())  # a fine-tune gone wrong
    den = Denoiser(_identity_net(), {}, device="cpu", adapt=5)
    plan = den.plan(raw.shape, None, raw)
    assert plan.adapted.startswith("rejected") and plan.model is None
    np.testing.assert_array_equal(den(raw, plan=plan), Denoiser(_identity_net(), {}, device="cpu")(raw))
    low = _counted(counts=0.5)
    assert den.plan(low.shape, None, low).adapted.startswith("skipped")

def test_recover_puts_back_detail_above_the_trained_counts_and_leaves_low_dose_frames_alone(one_torch_thread):
    """`recover` (default): at 1000 counts per column, beyond the 2-200 the model learnt, its residual holds
    structure above the noise and putting it back brings the output closer to the truth; at 5 counts the
    residual is noise and the output stays as the model gave it."""
    for dose, least, most in ((1000.0, 0.5, None), (5.0, -0.02, 0.02)):
        noisy, scene, _ = scenes.named_frame("perovskite_rp", (256, 256), seed=4, dose=dose, line_jitter_px=0.0)
        with_it, without = (Denoiser.load(device="cpu", recover=on)(noisy) for on in (True, False))
        gain = psnr(fit_scale(with_it, scene.clean), scene.clean) - psnr(fit_scale(without, scene.clean),
                                                                         scene.clean)
        assert gain > least and (most is None or gain < most), (dose, gain)
