"""Where a tensor's value may be read back to the host to skip work: only where that costs no device sync.

On the CPU a read is free, so a frame without outliers, a direction without a planar band or a median can take a
shortcut; on a GPU each read stalls the stream, so every frame takes the same tensor-only path. The per-frame
tests switch `free` off to check, on the CPU, that the GPU's path reads nothing back.
"""

from __future__ import annotations

import torch


def free(device: torch.device) -> bool:
    """Whether reading a value back on `device` costs nothing (the CPU) rather than a sync (a GPU)."""
    return device.type == "cpu"
