"""Floating-window reconstruction: every window of a frame cleaned, overlaps averaged.

Geometry: only windows lying wholly inside the frame are used. Along each axis they start at
0, step, 2*step, ... while they fit, plus one window aligned to the far edge when that grid stops
short of it (`window_starts`); the windows are all pairs of row and column starts, so every pixel
is covered and none sees data from outside the frame (a padded frame would feed the model mirrored
windows along the border, unlike anything it was trained on). The cleaned windows are summed back
in place and divided by the per-pixel window count. Frames must be at least the window in size.

`reconstruct` computes this exactly without extracting windows: for a stacked AE (Linear layers
with ReLU between them), the first Linear applied at every window of a regular grid is a Conv2d(1,
h1, window, stride=step) with the Linear weight reshaped; inner Linears act on the channel axis; the
last Linear followed by overlap-add is a conv_transpose2d(h_last -> 1, window, stride=step) plus the
output bias overlap-added. The frame's windows form up to four such grids (the regular one, the
edge row, the edge column, the corner). Hidden activations are processed in horizontal bands of
window rows so that memory stays bounded for any frame size. Under bf16 autocast the overlap-add runs
in float32 (in bf16 it sums ~200 overlapping windows at 3 significant digits: 0.07 of the peak off),
and so does a strip one window wide or high (oneDNN's bf16 kernels on AMX CPUs return ±1e37 for it).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

DEFAULT_BAND_BYTES = 64 * 2**20  # working memory per band of window rows
_CACHE_SIZE = 4  # frame shapes whose count/bias maps are kept per model

# (h, w, step, device, dtype, bias storage, bias version) -> (1/count, offset) maps
_MapsKey = tuple[int, int, int, torch.device, torch.dtype, int, int]
_MapsCache = dict[_MapsKey, tuple[torch.Tensor, torch.Tensor]]


class WindowModel(Protocol):
    """What `reconstruct` needs of a model (`stemd.models.window_ae.WindowAE` has it): the window side and
    its Linear layers in order, a ReLU between consecutive ones; `reconstruct_naive` calls it on
    (windows, window*window) batches. A `_window_cache` dict attribute, if present, keeps the count/bias maps
    of the last frame shapes."""

    window: int

    def linear_layers(self) -> list[torch.nn.Linear]: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def window_starts(size: int, window: int, step: int) -> list[int]:
    """Window starts along an axis of length `size`: 0, step, ... while a window fits, plus size - window if missed."""
    if size < window:
        raise ValueError(f"a frame side of {size} px is smaller than the window ({window} px)")
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def _runs(size: int, window: int, step: int) -> list[tuple[int, int]]:
    """`window_starts` as (first start, count) runs of stride `step`: the regular grid, then the edge window."""
    runs = [(0, (size - window) // step + 1)]
    if (size - window) % step:
        runs.append((size - window, 1))
    return runs


def _grids(h: int, w: int, window: int, step: int) -> list[tuple[int, int, int, int]]:
    """The frame's windows as regular grids (top, left, rows, columns) of stride `step`."""
    return [(r0, c0, n_r, n_c) for r0, n_r in _runs(h, window, step) for c0, n_c in _runs(w, window, step)]


def _check(model: WindowModel, step: int, shape: tuple[int, ...]) -> tuple[int, list[torch.nn.Linear]]:
    window = int(model.window)
    if not 1 <= step <= window:
        raise ValueError(f"step must be between 1 and the window ({window}), got {step}")
    if min(shape) < window:
        raise ValueError(f"frames of {'x'.join(map(str, shape))} px are smaller than the window ({window} px)")
    return window, model.linear_layers()


def _maps(
    model: WindowModel, bias: torch.Tensor, shape: tuple[int, int], step: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/count, overlap-added output bias / count) for a frame shape; cached on the model when no grad."""
    h, w = shape
    cache: _MapsCache | None = None if torch.is_grad_enabled() else getattr(model, "_window_cache", None)
    # an inference tensor cannot change after creation, so it needs no version counter in the key
    version = -1 if bias.is_inference() else bias._version
    key: _MapsKey = (h, w, step, bias.device, bias.dtype, bias.data_ptr(), version)
    if cache is not None and key in cache:
        return cache[key]
    with torch.autocast(bias.device.type, enabled=False):  # maps stay float32 under bf16 autocast
        kernel = torch.stack([torch.ones_like(bias), bias]).view(1, 2, window, window)
        sums = bias.new_zeros(1, 2, h, w)
        for r0, c0, n_r, n_c in _grids(h, w, window, step):
            ones = torch.ones(1, 1, n_r, n_c, device=bias.device, dtype=bias.dtype)
            part = F.conv_transpose2d(ones, kernel, stride=step)
            sums[:, :, r0 : r0 + part.shape[-2], c0 : c0 + part.shape[-1]] += part
        inv_count = sums[:, :1].reciprocal()
        offset = sums[:, 1:] * inv_count
    if cache is not None:
        while len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = (inv_count, offset)
    return inv_count, offset


def reconstruct(
    model: WindowModel, frames: torch.Tensor, step: int, *, band_bytes: int = DEFAULT_BAND_BYTES
) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1, H, W): the exact strided-conv / transposed-conv form; H, W >= the window.

    `model` must have `window` and `linear_layers()` (Linear layers with ReLU between them), like
    `stemd.models.checkpoint.WindowAE`. `band_bytes` bounds the per-band working memory (the unfolded windows
    and hidden activations of one band of window rows); frame-sized buffers come on top.
    """
    if frames.ndim != 4 or frames.shape[1] != 1:
        raise ValueError(f"frames must be (B, 1, H, W), got shape {tuple(frames.shape)}")
    b, _, h, w = frames.shape
    window, linears = _check(model, step, (h, w))
    if b == 0:
        return frames.clone()
    first, last = linears[0], linears[-1]
    widths = [lin.out_features for lin in linears[:-1]]
    # per window: the window pixels a CPU conv unfolds (im2col) plus two live hidden layers
    per_window = b * frames.element_size() * (window * window + max(a + c for a, c in zip(widths, widths[1:] + [0])))
    w_in = first.weight.view(-1, 1, window, window)
    w_out = last.weight.t().reshape(-1, 1, window, window)
    acc = frames.new_zeros(b, 1, h, w, dtype=torch.float32)
    device = frames.device.type
    autocast = torch.is_autocast_enabled(device)
    for r0, c0, n_r, n_c in _grids(h, w, window, step):
        rows = max(1, band_bytes // (per_window * n_c))
        c1 = c0 + (n_c - 1) * step + window
        for k0 in range(0, n_r, rows):
            k1 = min(n_r, k0 + rows)
            top = r0 + k0 * step
            x = frames[:, :, top : top + (k1 - k0 - 1) * step + window, c0:c1]
            # a strip one window wide or high: oneDNN's bf16 kernels on AMX return garbage for it, so float32
            mixed = autocast and min(k1 - k0, n_c) > 1
            with torch.autocast(device, dtype=torch.get_autocast_dtype(device), enabled=mixed):
                act = F.conv2d(x, w_in, first.bias, stride=step).relu_()
                flat = act.flatten(2)  # (B, h1, window rows * window columns): inner layers act on channels
                for lin in linears[1:-1]:
                    flat = torch.matmul(lin.weight, flat).add_(lin.bias[:, None]).relu_()
            with torch.autocast(device, enabled=False):  # the overlap-add sums ~(window/step)² terms:
                out = F.conv_transpose2d(flat.view(b, -1, k1 - k0, n_c).float(), w_out.float(), stride=step)  # float32
            acc[:, :, top : top + out.shape[-2], c0:c1] += out
    inv_count, offset = _maps(model, last.bias, (h, w), step, window)
    return torch.addcmul(offset, acc, inv_count).to(frames.dtype)


@torch.no_grad()
def reconstruct_naive(model: WindowModel, frame: torch.Tensor, step: int) -> torch.Tensor:
    """(H, W) -> (H, W) by an explicit loop over windows; the reference the fast form is tested against."""
    window, _ = _check(model, step, tuple(frame.shape))
    h, w = frame.shape
    starts = [(i, j) for i in window_starts(h, window, step) for j in window_starts(w, window, step)]
    cleaned = model(torch.stack([frame[i : i + window, j : j + window].reshape(-1) for i, j in starts]))
    acc, count = torch.zeros_like(frame), torch.zeros_like(frame)
    for (i, j), out in zip(starts, cleaned):
        acc[i : i + window, j : j + window] += out.view(window, window)
        count[i : i + window, j : j + window] += 1
    return acc / count
