"""Self-supervised fine-tuning on a frame's own counts (`stemd.models.adapt`)."""

import numpy as np
import pytest
import torch

from stemd.models.adapt import finetune, thinned_pair
from stemd.models.conv_unet import ConvDenoiser
from stemd.sim.lattice import simulate_frame


def test_thinned_pair_splits_the_counts_into_an_input_and_a_target_of_the_same_expectation():
    counts = np.random.default_rng(0).poisson(40.0, (256, 256))
    inputs, target = thinned_pair(counts, np.random.default_rng(1), fraction=0.7)
    assert inputs.dtype == target.dtype == np.float32
    assert (inputs >= 0).all() and (inputs <= counts).all()
    np.testing.assert_allclose(inputs + target * 0.3 / 0.7, counts, rtol=1e-5)
    assert abs(inputs.mean() / target.mean() - 1) < 0.01
    assert abs(np.corrcoef(inputs.ravel(), target.ravel())[0, 1]) < 0.02  # Poisson: independent halves


def _frame(seed=0):
    """(clean, normalised noisy input, its thinned target) of a lattice at ~6 counts per pixel."""
    rng = np.random.default_rng(seed)
    clean = simulate_frame((160, 160), rng, rotation_deg=20.0).clean.astype(np.float64)
    counts = rng.poisson((clean + 0.2) * 6.0)
    inputs, target = thinned_pair(counts, rng)
    scale = inputs.mean()
    as_tensor = [torch.from_numpy((v / scale).astype(np.float32))[None, None] for v in (inputs, target)]
    return (clean + 0.2) * 6.0 * 0.7 / scale, *as_tensor


def test_finetune_teaches_an_untrained_model_to_denoise_from_the_frame_alone():
    torch.manual_seed(0)
    model = ConvDenoiser((8, 16), guide="none").eval()  # its head starts at zero: the identity
    before = {k: v.clone() for k, v in model.state_dict().items()}
    truth, x, t = _frame()
    tuned = finetune(model, x, t, {}, 80, lr=2e-3, crop=96)
    with torch.inference_mode():
        error = [float(((m.denoise_frames(x, 0)[0, 0].double().numpy() - truth) ** 2).mean()) for m in (model, tuned)]
    assert error[1] < 0.75 * error[0], error  # the identity it started as keeps all the noise
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy was trained
    assert not any(p.requires_grad for p in tuned.parameters()) and not tuned.training


def test_finetune_refuses_a_batch_or_a_target_of_another_shape():
    model = ConvDenoiser((8, 16), guide="none")
    x = torch.zeros(2, 1, 64, 64)
    with pytest.raises(ValueError, match="one \\(1, 1, H, W\\) frame"):
        finetune(model, x, x, {}, 1)
    with pytest.raises(ValueError, match="target of its shape"):
        finetune(model, x[:1], x[:1, :, :32], {}, 1)
