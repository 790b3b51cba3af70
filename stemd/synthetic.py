"""Synthetic SrTiO3-like HAADF data: clean lattices of Gaussians and the noise models.

Pure numpy, no I/O. CONTRACT STUB: the signatures below are fixed; bodies to be written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np

PAPER_WINDOW = 28
PAPER_PERIOD_PX = 10.0  # Sr-Sr distance in pixels of the training lattice
PAPER_SIGMA_PX = 1.5
PAPER_INTENSITIES = (1.0, 0.7)  # Sr, TiO columns relative to the image maximum


@dataclass(frozen=True)
class NoiseSpec:
    """How a clean image (max 1.0) is corrupted. Formulas in docs/noise.md and below."""

    kind: Literal["uniform", "poisson", "gaussian", "none"] = "uniform"
    snr: float = 0.33
    dose: float = 50.0
    read_sigma: float = 0.0
    line_jitter_px: float = 0.0
    line_gain: float = 0.0
    line_offset: float = 0.0


@dataclass(frozen=True)
class SimFrame:
    """A clean full frame and its ground truth."""

    clean: np.ndarray  # (H, W) float32, brightest column peak = 1.0
    columns: np.ndarray  # (N, 2) float64 (y, x) pixel positions of every column in the frame
    intensities: np.ndarray  # (N,) float64 column peak heights (1.0 Sr, 0.7 TiO, ...)
    near_defect: np.ndarray  # (N,) bool, True for columns within ~one period of a defect


def clean_windows(
    n: int,
    rng: np.random.Generator,
    *,
    size: int = PAPER_WINDOW,
    period_px: float = PAPER_PERIOD_PX,
    sigma_px: float = PAPER_SIGMA_PX,
    max_rotation_deg: float = 45.0,
) -> np.ndarray:
    """`n` clean windows (n, size, size) float32, randomly translated and rotated."""
    raise NotImplementedError


def corrupt(clean: np.ndarray, noise: NoiseSpec, rng: np.random.Generator) -> np.ndarray:
    """A noisy copy of `clean` (any shape, last two axes are rows, cols), float32, same scale."""
    raise NotImplementedError


def training_batches(
    n_samples: int,
    batch_size: int,
    noise: NoiseSpec,
    seed: int,
    **lattice: float,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(noisy, clean) float32 batches of windows, generated on the fly, reproducible by seed."""
    raise NotImplementedError


def simulate_frame(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    period_px: float = PAPER_PERIOD_PX,
    sigma_px: float = PAPER_SIGMA_PX,
    rotation_deg: float = 0.0,
    offset_px: tuple[float, float] = (0.0, 0.0),
    drift_px: tuple[float, float] = (0.0, 0.0),
    defect: Literal["rp"] | None = None,
) -> SimFrame:
    """A full clean frame of any size, with optional drift across the frame and a defect."""
    raise NotImplementedError
