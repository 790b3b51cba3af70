"""The paper's stacked auto-encoder (`WindowAE`), applied to a frame by the floating window."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from stemd.compute.window import _MapsCache, reconstruct
from stemd.errors import CheckpointError


class WindowAE(nn.Module):
    """Stacked fully connected AE on window*window pixels: encoder widths `hidden`, mirrored decoder.

    Every Linear but the last is followed by a ReLU; the output has no activation. The paper uses a
    code (last of `hidden`) smaller than window*window; that is a training choice, not enforced.
    """

    def __init__(self, window: int, hidden: Sequence[int]) -> None:
        super().__init__()
        hidden = [int(h) for h in hidden]
        if int(window) < 1 or not hidden or min(hidden) < 1:
            raise ValueError(f"WindowAE needs window >= 1 and positive hidden widths, got {window}, {hidden}")
        self.window = int(window)
        self.hidden = hidden
        n = self.window * self.window
        widths = [n, *hidden, *reversed(hidden[:-1]), n]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self._window_cache: _MapsCache = {}  # stemd.compute.window keeps per-shape count/bias maps here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, window*window) or (B, 1, window, window) -> the same shape."""
        y: torch.Tensor = self.net(x.reshape(x.shape[0], -1))
        return y.reshape(x.shape)

    def linear_layers(self) -> list[nn.Linear]:
        """The Linear layers in order; a ReLU sits between consecutive ones (stemd.compute.window uses this)."""
        return [m for m in self.net if isinstance(m, nn.Linear)]

    @property
    def inputs(self) -> tuple[str, ...]:
        """No auxiliary inputs: each window is cleaned from its own pixels."""
        return ()

    def denoise_frames(
        self, frames: torch.Tensor, step: int, guide: torch.Tensor | None = None, level: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, 1, H, W) normalised frames -> same shape, by the floating window (stemd.compute.window);
        `guide` and `level` (FrameModel's auxiliary inputs) are not among its `inputs` and are ignored."""
        return reconstruct(self, frames, step)

    def arch(self) -> dict[str, Any]:
        """Plain-data description that rebuilds this model: {"name": "window_ae", ...}."""
        return {"name": "window_ae", "window": self.window, "hidden": list(self.hidden)}


def window_ae_from_arch(arch: dict[str, Any]) -> WindowAE:
    """The registry factory: validate the plain-data arch (its window and hidden widths) and build the model."""
    window, hidden = arch.get("window"), arch.get("hidden")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise CheckpointError(f"arch.window must be a positive integer, got {window!r}")
    if not isinstance(hidden, (list, tuple)) or not hidden or not all(
        isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden
    ):
        raise CheckpointError(f"arch.hidden must be a non-empty list of positive integers, got {hidden!r}")
    return WindowAE(window, hidden)
