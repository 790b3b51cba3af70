"""Floating-window reconstruction: every window of a frame cleaned, overlaps averaged.

CONTRACT STUB: the signatures below are fixed; bodies to be written.
"""

from __future__ import annotations

import torch


def reconstruct(model: torch.nn.Module, frames: torch.Tensor, step: int) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1, H, W): the exact strided-conv / transposed-conv form."""
    raise NotImplementedError


def reconstruct_naive(model: torch.nn.Module, frame: torch.Tensor, step: int) -> torch.Tensor:
    """(H, W) -> (H, W) by an explicit loop over windows; the reference the fast form is tested against."""
    raise NotImplementedError
