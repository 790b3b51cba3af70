"""Self-supervised fine-tuning of a frame model on one frame's own counts (test-time adaptation).

A frame's counts y are thinned into an input a ~ Binomial(y, f) and a target (y - a) f / (1 - f): for counting
noise the two are independent and the target's expectation is the input's clean signal, so the MSE of the
model's output against the target is, up to a constant, its error against the truth (Noise2Noise). A few hundred
steps on random crops teach the model what our simulator does not show it: a real probe, real column shapes, a
real specimen. The pipeline (`Denoiser.adapted`) prepares the pair and keeps the result only where a held-out
split says it helps: at low counts, or where the model already fits, the gradients are mostly noise. No I/O.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from stemd.models.base import FrameModel

INPUT_FRACTION = 0.7  # the input's share of the counts; the target (the rest) is scaled up to its expectation
CROP = 128  # px: side of the training crops
BATCH = 4  # crops per step
LR = 1e-4  # Adam's step size (measured on tk_r_em's real frames: 3e-4 no better, 1e-5 a third of the gain)


def thinned_pair(counts: np.ndarray, rng: np.random.Generator,
                 fraction: float = INPUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) float32 from non-negative integer `counts`: input ~ Binomial(counts, fraction), target the
    rest scaled by fraction / (1 - fraction), so both expect the input's signal."""
    counts = np.asarray(counts, np.int64)
    a = rng.binomial(counts, fraction)
    return a.astype(np.float32), ((counts - a) * (fraction / (1.0 - fraction))).astype(np.float32)


def _cut(image: torch.Tensor, corners: list[tuple[int, int]], side: int) -> torch.Tensor:
    """The side² crops of a (1, C, H, W) image at (top, left) `corners`, as a batch."""
    return torch.cat([image[..., y:y + side, x:x + side] for y, x in corners])


def finetune(model: FrameModel, frames: torch.Tensor, target: torch.Tensor, aux: dict[str, torch.Tensor],
             steps: int, *, step: int = 1, lr: float | None = None, crop: int = CROP, batch: int = BATCH,
             seed: int = 0) -> FrameModel:
    """A copy of `model` after `steps` Adam steps on random crops of (1, 1, H, W) normalised `frames` against
    `target` (same shape, same normalisation), the MSE of `denoise_frames`; `aux` are the frame's auxiliary
    inputs (`FrameModel.inputs`: "guide" cropped with the frame, "level" per crop); `step`: the window models'
    stride (`denoise_frames`); `lr` None: LR. The model is left as it is."""
    if frames.ndim != 4 or frames.shape[:2] != (1, 1) or target.shape != frames.shape:
        raise ValueError(f"finetune takes one (1, 1, H, W) frame and a target of its shape, got "
                         f"{tuple(frames.shape)} and {tuple(target.shape)}")
    tuned = copy.deepcopy(model)
    if not isinstance(tuned, torch.nn.Module):
        raise TypeError(f"finetune needs a torch module, got {type(model).__name__}")
    h, w = frames.shape[-2:]
    side = min(crop, h, w)
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), torch.enable_grad():
        x, t = frames.detach().clone().float(), target.detach().clone().float()  # normal tensors, not inference ones
        inputs = {k: v.detach().clone() for k, v in aux.items()}
        for p in tuned.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(tuned.parameters(), lr=LR if lr is None else lr)
        tuned.train()
        for _ in range(steps):
            corners = list(zip(torch.randint(0, h - side + 1, (batch,), generator=generator).tolist(),
                               torch.randint(0, w - side + 1, (batch,), generator=generator).tolist()))
            extra = {k: (_cut(v, corners, side) if k == "guide" else v.expand(batch)) for k, v in inputs.items()}
            loss = F.mse_loss(tuned.denoise_frames(_cut(x, corners, side), step, **extra), _cut(t, corners, side))
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
        tuned.eval()
    for p in tuned.parameters():
        p.requires_grad_(False)
    return tuned
