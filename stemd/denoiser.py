"""`Denoiser`: a checkpoint on a device that maps raw arrays to denoised arrays.

CONTRACT STUB: the signatures below are fixed; bodies to be written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU raises InputError... (ConfigError)."""
    raise NotImplementedError


def check_frames(image: np.ndarray, window: int = 28) -> None:
    """Raise InputError naming the problem: not 2D/3D, smaller than the window, NaN/inf, not numeric."""
    raise NotImplementedError


def normalize(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, H, W) any dtype -> (float32 normalised, lo (B,), hi (B,)); robust, documented."""
    raise NotImplementedError


def denormalize(frames: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Inverse of `normalize`, back to the input's scale, float32."""
    raise NotImplementedError


class Denoiser:
    """A loaded model on a device; call it with a 2D frame or a 3D batch."""

    model: torch.nn.Module
    metadata: dict[str, Any]
    device: torch.device
    step: int
    window: int

    def __init__(self, model: torch.nn.Module, metadata: dict[str, Any], device: str = "auto", step: int | None = None) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, path: Path | str | None = None, device: str = "auto", step: int | None = None) -> "Denoiser":
        """From a checkpoint file; `None` is the shipped default model."""
        raise NotImplementedError

    @property
    def model_id(self) -> str:
        """Short stable id of the weights (e.g. 'window_ae-<sha256[:12]>')."""
        raise NotImplementedError

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """2D (H, W) or 3D (B, H, W) in any units -> float32 of the same shape and scale."""
        raise NotImplementedError

    def denoise_tensor(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) normalised float tensor on self.device -> same; no host copies (for the engine)."""
        raise NotImplementedError
