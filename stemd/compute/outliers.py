"""Detector outliers treated as missing data: saturated pixels and isolated hot pixels (pure torch, no I/O).

A real frame holds pixels that are not signal: the detector's maximum (65535 on a uint16 detector, where
the counter saturated or a cosmic ray hit) and isolated hot pixels far above everything around them. A few of
them dominate a frame's mean and variance, so normalisation takes the frame for a much brighter and noisier
one and the model returns a speckled mess (tk_r_em's low-dose frame x[4]: mean 3 counts, with 65535s). They
are replaced by the mean of their valid neighbours before anything else sees the frame; the model then writes
its own estimate there. Elementwise and pooling operations only (no host sync on a GPU); on the CPU a frame
without outliers costs ~5 ms per 512² frame on one thread (`python -m bench.stages`).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from stemd.compute import hostsync

HOT_OVER_NEIGHBOURS = 2.0  # a hot pixel is this many times brighter than its brightest neighbour ...
HOT_OVER_TOP = 2.0  # ... and than the frame's 99.9th percentile: atom columns are many, a hot pixel alone
TOP_QUANTILE = 0.999
QUANTILE_STRIDE = 4  # the percentile from every 4th pixel along each axis: 20x faster, the same within noise


def _neighbour_max(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> each pixel's brightest of its 8 neighbours in the frame (a border pixel has 3 or 5: replicated
    edges made it its own neighbour, so a hot pixel on the border was never found)."""
    p = F.pad(x[:, None], (1, 1, 1, 1), mode="constant", value=-torch.inf)[:, 0]
    h, w = x.shape[-2:]
    shifts = [p[:, i : i + h, j : j + w] for i in range(3) for j in range(3) if (i, j) != (1, 1)]
    return torch.stack(shifts).amax(0)


def outlier_mask(frames: torch.Tensor, saturation: float | None) -> torch.Tensor:
    """(B, H, W) raw frames -> bool mask of pixels that are not signal: at or above `saturation` (None: no
    saturation level, e.g. float data), or hot: over HOT_OVER_NEIGHBOURS x their brightest neighbour and
    HOT_OVER_TOP x the frame's TOP_QUANTILE (so a sharp atom column at high dose, one of many, is kept)."""
    x = frames.to(torch.float32)
    saturated = x >= saturation if saturation is not None else torch.zeros_like(x, dtype=torch.bool)
    values = torch.where(saturated, 0.0, x)[:, ::QUANTILE_STRIDE, ::QUANTILE_STRIDE].flatten(1)
    top = values.kthvalue(max(1, int(TOP_QUANTILE * values.shape[1])), dim=1).values.clamp_min(0)
    near = _neighbour_max(torch.where(saturated, 0.0, x))
    hot = (x > HOT_OVER_NEIGHBOURS * near.clamp_min(0)) & (x > HOT_OVER_TOP * top[:, None, None]) & (x > 0)
    return saturated | hot


def repair(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) frames with the `mask`ed pixels replaced by the mean of their valid neighbours within 1, else
    2 px, else the frame's valid mean; float32."""
    x = frames.to(torch.float32)
    if hostsync.free(x.device) and not bool(mask.any()):  # the usual case; a host check only where it is free
        return x
    valid = (~mask).to(torch.float32)[:, None]
    kept = x[:, None] * valid
    fill = (kept.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1))[:, None, None, None].expand_as(kept)
    for size in (5, 3):  # the nearer ring where it has valid pixels
        total = F.avg_pool2d(kept, size, stride=1, padding=size // 2, count_include_pad=False)
        count = F.avg_pool2d(valid, size, stride=1, padding=size // 2, count_include_pad=False)
        fill = torch.where(count > 0, total / count.clamp_min(1e-12), fill)
    return torch.where(mask, fill[:, 0], x)
