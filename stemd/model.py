"""The paper's stacked auto-encoder and its checkpoint file format.

CONTRACT STUB: the signatures below are fixed; bodies to be written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

CHECKPOINT_FORMAT = "stemd-checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_MODEL_PATH = Path(__file__).parent / "models" / "default.pt"


class WindowAE(nn.Module):
    """Stacked fully connected AE on window*window pixels: encoder widths `hidden`, mirrored decoder."""

    def __init__(self, window: int = 28, hidden: Sequence[int] = (256, 64)) -> None:
        super().__init__()
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, window*window) -> (B, window*window)."""
        raise NotImplementedError

    def denoise_frames(self, frames: torch.Tensor, step: int) -> torch.Tensor:
        """(B, 1, H, W) normalised frames -> same shape, by the floating window (stemd.window)."""
        raise NotImplementedError

    def arch(self) -> dict[str, Any]:
        """Plain-data description that rebuilds this model: {"name": "window_ae", ...}."""
        raise NotImplementedError


def build_model(arch: dict[str, Any]) -> nn.Module:
    """Rebuild a model from `arch()`; raises CheckpointError for unknown architectures."""
    raise NotImplementedError


def save_checkpoint(path: Path, model: nn.Module, metadata: dict[str, Any]) -> None:
    """One file: format tag, version, arch, float32 weights, metadata (plain data only)."""
    raise NotImplementedError


def load_checkpoint(path: Path | None = None, map_location: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, metadata); `None` loads the shipped default. weights_only=True."""
    raise NotImplementedError
