"""`FrameModel`: what the denoising pipeline needs of a model, whatever its architecture.

A model maps normalised frames (B, 1, H, W) to cleaned frames of the same shape. It declares in
`inputs` the auxiliary inputs it wants beside the frames; the pipeline computes exactly those, at
the frame's own sampling, and passes them by name:

- "guide": the frame's lattice guide (the Bragg filter, or the planar-defect guide), (B, 1, H, W);
- "level": the frame's noise standard deviation, (B,).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

AUX_INPUTS = ("guide", "level")


@runtime_checkable
class FrameModel(Protocol):
    """A denoising network behind one interface (an `nn.Module` that also has these)."""

    @property
    def inputs(self) -> tuple[str, ...]:
        """The auxiliary inputs (names from AUX_INPUTS) `denoise_frames` takes as keywords."""
        ...

    def arch(self) -> dict[str, Any]:
        """Plain data that rebuilds the model (`stemd.models.checkpoint.build_model`); has "name" and "window",
        the smallest frame side it takes."""
        ...

    def denoise_frames(
        self, frames: torch.Tensor, step: int, guide: torch.Tensor | None = None, level: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, 1, H, W) normalised frames -> the same shape; `step`: the window models' stride. The pipeline
        passes exactly the AUX_INPUTS that `inputs` names, by keyword; a model ignores those it does not take."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def to(self, device: torch.device) -> Any: ...

    def eval(self) -> Any: ...
