"""Floating-window reconstruction: every window of a frame cleaned, overlaps averaged.

Geometry: a frame is padded (reflect, or replicate when too small to reflect) by window-step on
each side, plus up to step-1 extra rows/columns at the bottom/right so that (padded - window) is a
multiple of step. Windows start at every multiple of step in the padded frame, so each input pixel
is covered by every window of that grid that would contain it in an infinite image. The cleaned
windows are summed back in place, divided by the per-pixel window count, and cropped to the input.

`reconstruct` computes this exactly without extracting windows: for a stacked AE (Linear layers
with ReLU between them), the first Linear applied at every window is a Conv2d(1, h1, window,
stride=step) with the Linear weight reshaped; inner Linears act on the channel axis; the last Linear
followed by overlap-add is a conv_transpose2d(h_last -> 1, window, stride=step) plus the output
bias overlap-added. Hidden activations are processed in horizontal bands of window rows so that
memory stays bounded for any frame size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_BAND_BYTES = 64 * 2**20  # working memory per band of window rows
_CACHE_SIZE = 4  # padded shapes whose count/bias maps are kept per model


def pad_amounts(size: int, window: int, step: int) -> tuple[int, int]:
    """(before, after) padding of one axis of length `size` for the window grid."""
    before = window - step
    padded = size + 2 * before
    return before, before + (window - padded) % step


def pad_frames(frames: torch.Tensor, window: int, step: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, 1, H, W) -> (padded frames, (top, left) offset of the input inside them)."""
    h, w = frames.shape[-2:]
    top, bottom = pad_amounts(h, window, step)
    left, right = pad_amounts(w, window, step)
    mode = "reflect" if max(top, bottom) < h and max(left, right) < w else "replicate"
    return F.pad(frames, (left, right, top, bottom), mode=mode), (top, left)


def _check(model: torch.nn.Module, step: int) -> tuple[int, list[torch.nn.Linear]]:
    window = int(model.window)
    if not 1 <= step <= window:
        raise ValueError(f"step must be between 1 and the window ({window}), got {step}")
    return window, model.linear_layers()


def _maps(model: torch.nn.Module, bias: torch.Tensor, shape: tuple[int, int], step: int, window: int):
    """(1/count, overlap-added output bias / count) for a padded shape; cached on the model when no grad."""
    hp, wp = shape
    cache = getattr(model, "_window_cache", None)
    # an inference tensor cannot change after creation, so it needs no version counter in the key
    version = -1 if bias.is_inference() else bias._version
    key = (hp, wp, step, bias.device, bias.dtype, bias.data_ptr(), version)
    use_cache = cache is not None and not torch.is_grad_enabled()
    if use_cache and key in cache:
        return cache[key]
    n_h, n_w = (hp - window) // step + 1, (wp - window) // step + 1
    with torch.autocast(bias.device.type, enabled=False):  # maps stay float32 under bf16 autocast
        ones = torch.ones(1, 1, n_h, n_w, device=bias.device, dtype=bias.dtype)
        count = F.conv_transpose2d(ones, torch.ones_like(bias).view(1, 1, window, window), stride=step)
        inv_count = count.reciprocal()
        offset = F.conv_transpose2d(ones, bias.view(1, 1, window, window), stride=step) * inv_count
    if use_cache:
        while len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = (inv_count, offset)
    return inv_count, offset


def reconstruct(
    model: torch.nn.Module, frames: torch.Tensor, step: int, *, band_bytes: int = DEFAULT_BAND_BYTES
) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1, H, W): the exact strided-conv / transposed-conv form.

    `model` must have `window` and `linear_layers()` (Linear layers with ReLU between them), like
    `stemd.model.WindowAE`. `band_bytes` bounds the per-band working memory (the unfolded windows
    and hidden activations of one band of window rows); frame-sized buffers come on top.
    """
    window, linears = _check(model, step)
    if frames.ndim != 4 or frames.shape[1] != 1:
        raise ValueError(f"frames must be (B, 1, H, W), got shape {tuple(frames.shape)}")
    b, _, h, w = frames.shape
    if b == 0:
        return frames.clone()
    x, (top, left) = pad_frames(frames, window, step)
    hp, wp = x.shape[-2:]
    n_h, n_w = (hp - window) // step + 1, (wp - window) // step + 1
    first, last = linears[0], linears[-1]
    widths = [lin.out_features for lin in linears[:-1]]
    # per window row: the window pixels a CPU conv unfolds (im2col) plus two live hidden layers
    per_row = b * n_w * x.element_size() * (window * window + max(a + c for a, c in zip(widths, widths[1:] + [0])))
    rows = max(1, band_bytes // per_row)

    w_in = first.weight.view(-1, 1, window, window)
    w_out = last.weight.t().reshape(-1, 1, window, window)
    acc = x.new_zeros(b, 1, hp, wp, dtype=torch.float32)
    for k0 in range(0, n_h, rows):
        k1 = min(n_h, k0 + rows)
        act = F.conv2d(x[:, :, k0 * step : (k1 - 1) * step + window], w_in, first.bias, stride=step).relu_()
        flat = act.flatten(2)  # (B, h1, window rows * window columns): inner layers act on channels
        for lin in linears[1:-1]:
            flat = torch.matmul(lin.weight, flat).add_(lin.bias[:, None]).relu_()
        out = F.conv_transpose2d(flat.view(b, -1, k1 - k0, n_w), w_out, stride=step)
        acc[:, :, k0 * step : k0 * step + out.shape[-2]] += out
    inv_count, offset = _maps(model, last.bias, (hp, wp), step, window)
    return torch.addcmul(offset, acc, inv_count)[:, :, top : top + h, left : left + w].to(frames.dtype)


@torch.no_grad()
def reconstruct_naive(model: torch.nn.Module, frame: torch.Tensor, step: int) -> torch.Tensor:
    """(H, W) -> (H, W) by an explicit loop over windows; the reference the fast form is tested against."""
    window, _ = _check(model, step)
    h, w = frame.shape
    x, (top, left) = pad_frames(frame[None, None], window, step)
    x = x[0, 0]
    starts = [(i, j) for i in range(0, x.shape[0] - window + 1, step) for j in range(0, x.shape[1] - window + 1, step)]
    cleaned = model(torch.stack([x[i : i + window, j : j + window].reshape(-1) for i, j in starts]))
    acc, count = torch.zeros_like(x), torch.zeros_like(x)
    for (i, j), out in zip(starts, cleaned):
        acc[i : i + window, j : j + window] += out.view(window, window)
        count[i : i + window, j : j + window] += 1
    return (acc / count)[top : top + h, left : left + w]
