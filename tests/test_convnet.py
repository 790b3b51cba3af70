"""ConvDenoiser: any-size frames, identity at start, receptive field, checkpoints, and it learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stemd.compute.fourier import bragg_filter, noise_level
from stemd.compute.normalize import denormalize, normalize
from stemd.errors import CheckpointError
from stemd.models.checkpoint import build_model, load_checkpoint, save_checkpoint
from stemd.models.conv_unet import MIN_SIZE, ConvDenoiser
from stemd.pipeline import Denoiser

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_head(model: ConvDenoiser, seed: int = 0) -> ConvDenoiser:
    """A model whose output is not the identity (the head starts at zero)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.1)
        model.head.bias.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("shape", [(1, 1, 28, 28), (2, 1, 31, 45), (1, 1, 64, 100), (3, 1, 97, 29)])
@pytest.mark.parametrize("unshuffle, guide, level", [(1, "none", False), (2, "none", False), (2, "bragg", False),
                                                     (2, "bragg", True), (1, "none", True)])
def test_any_size_in_and_out(shape, unshuffle, guide, level):
    model = _random_head(ConvDenoiser((4, 6, 8), unshuffle, guide, level))
    x = torch.randn(shape)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert not torch.allclose(y, x)


def test_starts_as_identity_and_ignores_step():
    model = ConvDenoiser((4, 6, 8)).eval()
    x = torch.randn(2, 1, 40, 52)
    with torch.no_grad():
        assert torch.equal(model.denoise_frames(x, 2), x)
        _random_head(model)
        assert torch.equal(model.denoise_frames(x, 1), model.denoise_frames(x, 7))


@pytest.mark.parametrize("shape", [(1, 1, MIN_SIZE - 1, 64), (1, 2, 64, 64), (64, 64)])
def test_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="frames must"):
        ConvDenoiser((4, 6)).eval()(torch.zeros(shape))


@pytest.mark.parametrize("channels, unshuffle", [((16, 32, 48, 64), 2), ((4, 4, 4), 1)])
def test_receptive_field_is_as_documented(channels, unshuffle):
    """The gradient of one output pixel reaches exactly `reach` pixels away (over the grid alignments)."""
    model = _random_head(ConvDenoiser(channels, unshuffle), seed=1)
    size = 2 * model.reach + 4 * model.multiple
    size += -size % model.multiple  # no reflect padding: distances stay plain
    x = torch.randn(1, 1, size, size, requires_grad=True)
    y = model(x)
    c = size // 2 - size // 2 % model.multiple
    farthest = 0
    for p in range(c, c + model.multiple):
        (grad,) = torch.autograd.grad(y[0, 0, p, p], x, retain_graph=True)
        rows, cols = torch.nonzero(grad[0, 0]).unbind(1)
        farthest = max(farthest, int(torch.maximum((rows - p).abs(), (cols - p).abs()).max()))
    assert farthest == model.reach
    if channels == (16, 32, 48, 64):
        assert model.reach >= 60  # spans several lattice periods of 6-20 px


def test_checkpoint_round_trip_and_denoiser(tmp_path):
    model = _random_head(ConvDenoiser((4, 6, 8)))
    meta = {"normalization": {"mean": 0.17, "signal_std": 0.16}, "sampling": {"period_px": [6.0, 20.0]}}
    path = tmp_path / "conv.pt"
    save_checkpoint(path, model, meta)
    loaded, meta2 = load_checkpoint(path)
    assert isinstance(loaded, ConvDenoiser)
    assert loaded.arch() == model.arch() == {
        "name": "conv_unet", "channels": [4, 6, 8], "unshuffle": 2, "guide": "none", "window": MIN_SIZE}
    assert meta2 == meta
    frame = np.random.default_rng(0).poisson(20, (45, 61)).astype(np.uint16)
    out = Denoiser.load(path, device="cpu", recover=False)(frame)  # the model alone
    x, lo, hi = normalize(frame[None], reference=(0.17, 0.16))
    with torch.no_grad():
        expected = denormalize(model(torch.from_numpy(x)[:, None])[:, 0].numpy(), lo, hi)[0]
    assert out.shape == frame.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


def _lattice(size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from stemd.sim.lattice import NoiseSpec, corrupt, simulate_frame

    rng = np.random.default_rng(seed)
    clean = simulate_frame((size, size), rng, period_px=9.0, sigma_px=1.3, rotation_deg=11.0).clean
    return clean, corrupt(clean, NoiseSpec(kind="poisson", dose=10.0), rng)


def test_bragg_filter_keeps_the_lattice_and_drops_noise():
    clean, noisy = _lattice()
    out = bragg_filter(torch.from_numpy(noisy)[None, None])[0, 0].numpy()
    assert out.shape == noisy.shape and out.dtype == np.float32
    assert np.mean((out - clean) ** 2) < 0.3 * np.mean((noisy - clean) ** 2)
    assert out.mean() == pytest.approx(noisy.mean(), abs=1e-5)
    flat = np.random.default_rng(1).poisson(10.0, (128, 128)).astype(np.float32) / 10  # noise and no lattice
    kept = bragg_filter(torch.from_numpy(flat)[None, None])[0, 0].numpy()
    assert kept.std() < 0.1 * flat.std()


def test_guided_model_round_trip_and_explicit_guide(tmp_path):
    model = _random_head(ConvDenoiser((4, 6), guide="bragg"))
    _, noisy = _lattice(64)
    x = torch.from_numpy(noisy)[None, None]
    path = tmp_path / "guided.pt"
    save_checkpoint(path, model, {})
    loaded, _ = load_checkpoint(path)
    assert loaded.arch()["guide"] == "bragg"
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x, bragg_filter(x)), atol=1e-6)
        assert not torch.allclose(model(x), model(x, torch.zeros_like(x)), atol=1e-4)  # the guide is used


def test_noise_level_adds_pixel_noise_in_quadrature_to_the_lattices_own():
    clean, _ = _lattice(256)
    rng = np.random.default_rng(5)
    x = torch.from_numpy(clean)[None, None]
    base = float(noise_level(x))
    assert 0 < base < 0.2 * float(x.std())  # a sharp lattice's pixel-to-pixel change counts a little
    for sigma in (0.05, 0.2):
        noisy = x + sigma * torch.from_numpy(rng.standard_normal(clean.shape).astype(np.float32))
        assert float(noise_level(noisy)) ** 2 - base**2 == pytest.approx(sigma**2, rel=0.1)
        assert float(noise_level(3 * noisy + 7)) == pytest.approx(3 * float(noise_level(noisy)), rel=1e-4)
    assert noise_level(torch.zeros(2, 1, 32, 32)).tolist() == [0.0, 0.0]


def test_noise_level_model_round_trip_and_uses_the_level(tmp_path):
    model = _random_head(ConvDenoiser((4, 6), guide="bragg", noise_level=True))
    torch.nn.init.normal_(model.enc[0][0].weight, std=0.3)
    _, noisy = _lattice(64)
    x = torch.from_numpy(noisy)[None, None]
    path = tmp_path / "level.pt"
    save_checkpoint(path, model, {})
    loaded, _ = load_checkpoint(path)
    assert loaded.arch()["noise_level"] is True and "noise_level" not in ConvDenoiser((4, 6)).arch()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x, level=noise_level(x)), atol=1e-6)
        assert not torch.allclose(model(x), model(x, level=torch.zeros(1)), atol=1e-4)  # the level is used
    with pytest.raises(CheckpointError, match="arch.noise_level"):
        build_model({"name": "conv_unet", "channels": [8], "noise_level": "yes"})


def test_init_adds_the_noise_level_input_without_changing_the_output(tmp_path):
    from stemd.apps.training import load_init
    from stemd.errors import CheckpointError as Error

    source = _random_head(ConvDenoiser((4, 6), guide="bragg"))
    save_checkpoint(tmp_path / "s.pt", source, {})
    widened = ConvDenoiser((4, 6), guide="bragg", noise_level=True).eval()
    load_init(widened, tmp_path / "s.pt")
    _, noisy = _lattice(64)
    x = torch.from_numpy(noisy)[None, None]
    with torch.no_grad():
        torch.testing.assert_close(widened(x), source(x), rtol=0, atol=1e-6)
    with pytest.raises(Error, match="init: .* these settings build"):
        load_init(ConvDenoiser((4, 6), guide="none", noise_level=True), tmp_path / "s.pt")  # not only the level


def test_registry_errors():
    with pytest.raises(CheckpointError, match=r"unknown model architecture 'nope' \(known: conv_unet, window_ae\)"):
        build_model({"name": "nope"})
    with pytest.raises(CheckpointError, match="arch.channels"):
        build_model({"name": "conv_unet", "channels": [8, 0]})
    with pytest.raises(CheckpointError, match="arch.unshuffle"):
        build_model({"name": "conv_unet", "channels": [8], "unshuffle": 3})
    with pytest.raises(CheckpointError, match="arch.guide"):
        build_model({"name": "conv_unet", "channels": [8], "guide": "fourier"})
    assert build_model(ConvDenoiser((5, 7)).arch()).arch()["channels"] == [5, 7]


def test_a_few_seconds_of_training_reduce_the_error():
    from stemd.sim.lattice import NoiseSpec, corrupt, simulate_frame

    rng = np.random.default_rng(0)
    clean = simulate_frame((256, 256), rng, period_px=8.0, sigma_px=1.2, rotation_deg=17.0).clean
    noise = NoiseSpec(kind="poisson", dose=10.0)
    torch.manual_seed(0)
    model = ConvDenoiser((8, 16, 16))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    train_clean = torch.from_numpy(clean[:, :192]).view(1, 1, 256, 192)
    for _ in range(120):
        noisy = torch.from_numpy(corrupt(train_clean.numpy(), noise, rng))
        rows, cols = rng.integers(0, 256 - 64 + 1, 4), rng.integers(0, 192 - 64 + 1, 4)
        x = torch.cat([noisy[..., r:r + 64, c:c + 64] for r, c in zip(rows, cols)])
        y = torch.cat([train_clean[..., r:r + 64, c:c + 64] for r, c in zip(rows, cols)])
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_clean = clean[:, 192:]  # columns the training never saw
    test_noisy = corrupt(test_clean, noise, rng)
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(test_noisy)[None, None])[0, 0].numpy()
    raw_mse = float(np.mean((test_noisy - test_clean) ** 2))
    assert float(np.mean((out - test_clean) ** 2)) < 0.6 * raw_mse  # measured 0.39


def test_stemd_train_fits_a_conv_model_and_resumes_exactly(tmp_path):
    from stemd.apps.training import train
    from stemd.config import load_train_settings

    def settings(out, samples):
        return load_train_settings(None, {
            "model": "conv_unet", "samples": samples, "batch_size": 4, "val_every": 16, "lr": 2e-3, "lr_decay": "none",
            "warmup": 8, "grad_clip": 1.0, "threads": 1, "device": "cpu", "out": str(out),
            "conv": {"channels": [4, 8], "patch": 32, "scene_size": 64, "val_scenes": 3, "dose": [5.0, 50.0]}})

    quiet = {"progress": False, "log": lambda _: None}
    whole = train(settings(tmp_path / "whole", 32), frame_check=True, **quiet)
    assert [row["samples"] for row in whole.history] == [0, 16, 32]
    model, meta = load_checkpoint(whole.best_path)
    assert isinstance(model, ConvDenoiser) and model.arch()["guide"] == "bragg"
    assert meta["sampling"] == {"period_px": [6.0, 20.0]} and set(meta["normalization"]) == {"mean", "signal_std"}
    doses = [row["dose"] for row in meta["quality_by_noise"]]  # one scene per third, log-evenly spread
    np.testing.assert_allclose(doses, [[5.0, 5.0], [50**0.5 * 5**0.5] * 2, [50.0, 50.0]])
    assert len(meta["frame_quality"]) == 3
    assert Denoiser.load(whole.best_path, device="cpu")(np.ones((40, 40), np.uint16)).shape == (40, 40)
    half = train(settings(tmp_path / "split", 16), **quiet, frame_check=False)
    resumed = train(settings(tmp_path / "split", 32), resume=half.last_path, **quiet, frame_check=False)
    for a, b in zip(
        load_checkpoint(whole.last_path)[0].state_dict().values(),
        load_checkpoint(resumed.last_path)[0].state_dict().values(),
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 1, 100, 90), (2, 1, 61, 130)])
def test_row_bands_give_the_whole_frame_result(shape):
    model = _random_head(ConvDenoiser((4, 6, 8), guide="bragg"), seed=2)
    x = torch.randn(shape)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)  # far pixels matter more: 8 rows less context than `reach` changes the output by ~1e-3
        whole = model(x)
        banded = model(x, band_pixels=1)  # one coarse-grid row per band: many bands
    torch.testing.assert_close(banded, whole, rtol=0, atol=1e-6)


def test_bfloat16_training_autocasts_and_tracks_float32(tmp_path):
    """`precision: bfloat16` autocasts the forward passes: same seed and data, other arithmetic, a similar loss."""
    from stemd.apps.training import train
    from stemd.config import load_train_settings

    def run(precision):
        settings = load_train_settings(None, {
            "model": "conv_unet", "samples": 64, "batch_size": 8, "val_every": 64, "lr": 3e-3, "lr_decay": "none",
            "warmup": 16, "grad_clip": 1.0, "threads": 1, "device": "cpu", "out": str(tmp_path / precision),
            "precision": precision,
            "conv": {"channels": [4, 8], "patch": 32, "scene_size": 64, "val_scenes": 3, "dose": [5.0, 50.0]}})
        return train(settings, progress=False, log=lambda _: None, frame_check=False)

    f32, bf16 = run("float32"), run("bfloat16")
    assert load_checkpoint(bf16.best_path)[1]["train_settings"]["precision"] == "bfloat16"
    w32, w16 = (load_checkpoint(r.last_path)[0].state_dict() for r in (f32, bf16))
    assert any(not torch.equal(w32[k], w16[k]) for k in w32)
    loss32, loss16 = f32.history[-1]["train_loss"], bf16.history[-1]["train_loss"]
    assert loss32 != loss16 and abs(loss16 - loss32) < 0.1 * loss32


def test_stemd_train_feeds_the_noise_level_of_each_patchs_scene(tmp_path, monkeypatch):
    """`conv.noise_level`: the model is built with the input, and every training step passes the level."""
    from stemd.apps.training import train
    from stemd.config import load_train_settings

    seen = []
    forward = ConvDenoiser.forward

    def spy(self, x, guide=None, level=None, **kw):
        if self.training:
            seen.append((guide is not None, level))
        return forward(self, x, guide, level, **kw)

    monkeypatch.setattr(ConvDenoiser, "forward", spy)
    settings = load_train_settings(None, {
        "model": "conv_unet", "samples": 16, "batch_size": 8, "val_every": 16, "threads": 1, "device": "cpu",
        "out": str(tmp_path / "level"), "loss": "log_mse",
        "conv": {"channels": [4, 8], "patch": 32, "scene_size": 64, "val_scenes": 3, "noise_level": True}})
    result = train(settings, progress=False, log=lambda _: None, frame_check=False)
    assert load_checkpoint(result.best_path)[0].arch()["noise_level"] is True
    assert len(seen) == 2 and all(g and level.shape == (8,) and (level > 0).all() for g, level in seen)
