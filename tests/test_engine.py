"""The engine: batched denoising on one worker thread, same results as the Denoiser, no sockets."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from stemd.live.engine import Engine
from stemd.pipeline import Denoiser
from stemd.sim.lattice import simulate_frame


def _noisy(n: int, shape=(64, 72), seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    clean = [simulate_frame(shape, rng, rotation_deg=5.0 * i).clean * 20 for i in range(n)]
    return [rng.poisson(c).astype(np.uint16) for c in clean], clean


@pytest.fixture(scope="module")
def engine(checkpoint):
    eng = Engine.load(path=checkpoint, device="cpu")
    yield eng
    eng.close()


def test_batch_matches_denoiser_frame_by_frame(engine: Engine) -> None:
    frames, clean = _noisy(3)
    out = engine.denoise(frames)
    assert len(out) == 3
    plan = engine.plan(frames[0].shape, None, frames[0])  # the series' plan (its self-check blend: the first frame's)
    for f, o, c in zip(frames, out, clean):
        assert o.dtype == np.float32 and o.shape == f.shape
        np.testing.assert_allclose(o, engine.denoiser(f, plan=plan), rtol=1e-4, atol=1e-3)
        assert np.mean((o - c) ** 2) < np.mean((f - c) ** 2)


def test_mixed_shapes_refused_and_empty_batch(engine: Engine) -> None:
    a, _ = _noisy(1, (64, 64))
    b, _ = _noisy(1, (64, 80))
    with pytest.raises(ValueError, match="one shape"):
        engine.submit(a + b, engine.plan((64, 64)))
    assert engine.denoise([]) == []


async def test_runs_on_one_dedicated_thread(engine: Engine) -> None:
    names = {await engine.run(lambda: threading.current_thread().name) for _ in range(3)}
    assert len(names) == 1 and names.pop().startswith("stemd-engine")
    assert threading.current_thread().name == "MainThread"


def test_describe_and_memory(engine: Engine) -> None:
    assert "no GPU" in engine.describe() and engine.model_id in engine.describe()
    assert engine.device_name == "cpu" and engine.memory_bytes() > 0
    assert engine.window == 28 and isinstance(engine.model_version, str)


def test_replace_swaps_the_model(checkpoint) -> None:
    from stemd.models.window_ae import WindowAE

    eng = Engine.load(path=checkpoint, device="cpu")
    try:
        before = eng.model_id
        eng.replace(Denoiser(WindowAE(28, [8]), {}, device="cpu", step=7))
        assert eng.model_id != before and eng.denoiser.step == 7
        assert eng.denoise(_noisy(1)[0])[0].shape == (64, 72)
    finally:
        eng.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pipeline_matches_cpu(checkpoint) -> None:
    """Batches in flight on the GPU's three streams come out as on the CPU, also with three pending at once:
    a pinned staging slot is read before a later batch reuses it."""
    frames, _ = _noisy(6)
    cpu = Engine.load(path=checkpoint, device="cpu")
    gpu = Engine.load(path=checkpoint, device="cuda")
    try:
        assert "GPU" in gpu.describe()
        plan = gpu.plan(frames[0].shape, None, frames[0])
        expected = cpu.collect(cpu.submit(frames, plan))
        first = gpu.submit(frames[:3], plan)
        second = gpu.submit(frames[3:], plan)  # uploaded while the first batch computes
        third = gpu.submit(frames[3:][::-1], plan)  # reuses the first slot, its batch not yet collected
        got = gpu.collect(first) + gpu.collect(second) + gpu.collect(third)
        for e, g in zip(expected + expected[3:][::-1], got):
            np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-2)
        for pixel in (3.905e-10 / 14.0, 3.905e-10 / 7.0):  # shrunk, then enlarged, on the compute stream
            sized = gpu.plan(frames[0].shape, pixel)
            got = gpu.collect(gpu.submit(frames[:3], sized))
            for e, g in zip(cpu.collect(cpu.submit(frames[:3], sized)), got):
                assert g.shape == e.shape
                np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-2)
    finally:
        cpu.close()
        gpu.close()


def test_engine_uses_the_checkpoints_normalization(checkpoint) -> None:
    """A checkpoint trained on another lattice carries its own reference levels; the engine must use them."""
    from stemd.models.checkpoint import load_checkpoint

    model, meta = load_checkpoint(checkpoint)
    meta = dict(meta, normalization={"mean": 0.31, "signal_std": 0.12})
    den = Denoiser(model, meta, device="cpu")
    assert den.reference == (0.31, 0.12)
    eng = Engine(den)
    try:
        frames, _ = _noisy(2)
        plan = den.plan(frames[0].shape, None, frames[0])
        for f, o in zip(frames, eng.denoise(frames)):
            np.testing.assert_allclose(o, den(f, plan=plan), rtol=1e-4, atol=1e-3)
    finally:
        eng.close()


def test_batch_at_a_pixel_size_matches_the_denoiser_and_refusals_come_first(checkpoint) -> None:
    """Frames said to be at 14 px (the paper AE's range is about 10 px) are resampled alike in a batch and alone."""
    from stemd.compute.sampling import SamplingError

    # so 3.905e-11 m px -> 14 px
    eng = Engine.load(path=checkpoint, device="cpu", lattice_period_m=1.4 * 3.905e-10, calibrate=False)
    try:
        frames, _ = _noisy(2)
        assert eng.plan(frames[0].shape, 3.905e-11).factor == pytest.approx(eng.denoiser.period_range[1] / 14.0)
        out = eng.denoise(frames, 3.905e-11)
        for f, o in zip(frames, out):
            assert o.shape == f.shape
            np.testing.assert_allclose(o, eng.denoiser(f, pixel_size_m=3.905e-11), rtol=1e-4, atol=1e-3)
            assert not np.allclose(o, eng.denoiser(f), atol=1e-2)  # the pixel size made a difference
        eng.replace(Denoiser.load(checkpoint, device="cpu", sampling="refuse", calibrate=False))
        with pytest.raises(SamplingError, match="sampling policy: refuse"):
            eng.plan(frames[0].shape, 2e-11)
        assert "sampling refuse" in eng.describe()
    finally:
        eng.close()
