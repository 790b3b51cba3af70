"""How a run scores a model: validation figures, the loss best.pt minimises, and PSNR on simulated frames."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from stemd.apps.training.data import ValidationSet
from stemd.compute import metrics
from stemd.config import TrainSettings
from stemd.sim import lattice as synthetic

LOG_MSE_FLOOR = 1e-6  # keeps log10(MSE) finite for a perfect sample (a 60 dB PSNR cap)
FRAME_DOSES = (5.0, 20.0, 100.0)
FRAME_ROTATIONS = (-12.0, 8.0, 61.0)
FRAME_SEED = 20_250_001  # not a training or validation stream (those derive from the run's seed)


def sample_log_mse(pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per-sample 10*log10(MSE) (minus each sample's PSNR at peak 1.0), shape (n,)."""
    mse = (pred - clean).flatten(1).pow(2).mean(dim=1)
    return 10.0 * torch.log10(mse + LOG_MSE_FLOOR)


def quality(pred: torch.Tensor, clean: torch.Tensor) -> dict[str, float]:
    """MSE, mean absolute per-pixel error, PSNR (peak 1.0, the clean lattice maximum) and the mean of the
    per-sample PSNRs (what `loss: log_mse` maximises)."""
    mse = float(F.mse_loss(pred, clean))
    mae = float((pred - clean).abs().mean())
    return {"mse": mse, "mae": mae, "psnr_db": 10.0 * math.log10(1.0 / max(mse, 1e-12)),
            "mean_psnr_db": -float(sample_log_mse(pred, clean).mean())}


def val_loss(settings: TrainSettings, q: dict[str, float]) -> float:
    """The validation number best.pt minimises: MSE, or minus the mean per-sample PSNR for `loss: log_mse`."""
    return q["mse"] if settings.loss == "mse" else -q["mean_psnr_db"]


@torch.no_grad()
def predict(model: nn.Module, val: ValidationSet, device: torch.device) -> torch.Tensor:
    """The model's output for the validation samples and their auxiliary inputs, `val.batch` at a time, on the
    CPU."""
    was_training = model.training
    model.eval()
    noisy, b = val.noisy, val.batch
    pred = torch.cat([
        model(noisy[i : i + b].to(device), **{k: v[i : i + b].to(device) for k, v in val.inputs.items()}).float().cpu()
        for i in range(0, len(noisy), b)
    ])
    model.train(was_training)
    return pred


def evaluate(
    model: nn.Module, val: ValidationSet, device: torch.device
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """`quality` of the model on the whole validation set, and on each of its parts."""
    pred = predict(model, val, device)
    return quality(pred, val.clean), [quality(pred[part], val.clean[part]) for part in val.parts]


def frame_quality(denoise: Callable[[np.ndarray], np.ndarray], doses: tuple[float, ...] = FRAME_DOSES,
                  size: int = 192, seed: int = FRAME_SEED) -> list[dict[str, float]]:
    """PSNR (dB) on simulated fast-scan frames: an RP fault, Poisson counts at each dose over a 0.1 background.

    Three frames per dose, rotated -12, 8 and 61 degrees (inside and outside the paper's 0-45 degree
    training range), in detector counts, through `denoise` (e.g. a `Denoiser`). Each output is mapped
    onto the clean scale by the least-squares gain and offset (`stemd.compute.metrics.fit_scale`) and scored
    on the whole frame (`psnr_db`) and away from its border (`inner_psnr_db`, 28 px in). The noisy
    frames, scored the same way, are the baseline.
    """
    rng = np.random.default_rng(seed)
    sims = [
        synthetic.simulate_frame((size, size), rng, rotation_deg=r, offset_px=(3.3, 1.7), defect="rp")
        for r in FRAME_ROTATIONS
    ]
    regions = {"": (slice(None), slice(None)), "inner_": (slice(28, -28), slice(28, -28))}
    rows = []
    for dose in doses:
        noise = synthetic.NoiseSpec(kind="poisson", dose=dose, background=0.1)
        err: dict[str, list[float]] = {}
        for i, sim in enumerate(sims):
            counts = (
                synthetic.corrupt(sim.clean, noise, np.random.default_rng([seed, i, int(dose * 1000)])) + 0.1
            ) * dose
            for kind, image in (("noisy_", counts), ("", denoise(counts.astype(np.float32)))):
                sq = (metrics.fit_scale(image, sim.clean) - sim.clean) ** 2
                for region, where in regions.items():
                    err.setdefault(f"{kind}{region}psnr_db", []).append(float(sq[where].mean()))
        rows.append({"dose": dose, **{key: float(-10 * np.log10(np.mean(v))) for key, v in sorted(err.items())}})
    return rows


def parameter_count(model: nn.Module) -> int:
    """Trainable and frozen parameters of `model`, stored in checkpoint metadata."""
    return sum(p.numel() for p in model.parameters())
