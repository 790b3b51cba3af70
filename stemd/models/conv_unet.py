"""`ConvDenoiser`: a compact fully convolutional U-Net with a residual output (issue 5).

Unlike the paper's window AE it has no windows to average: one pass maps a whole normalised frame
(B, 1, H, W) to its cleaned version. The first layer folds 2x2 pixel blocks into channels
(`unshuffle`, lossless) so the costly full-resolution layers run at a quarter of the pixels; then
`len(channels)` levels of two 3x3 convolutions, each level below the first at half the resolution
of the one above, joined by 2x2 stride-2 convolutions down and transposed convolutions up, with
the encoder features added (not concatenated) to the decoder's. The receptive field spans several
lattice periods (`reach`), so the network can use the lattice's periodicity; the output is
`input + correction`, so where it cannot do better it can stay faithful to the input.

With `guide="bragg"` the network also sees a second channel, `bragg_filter` of the whole frame:
the frame's Fourier components that stand well above the white-noise floor, i.e. the lattice
averaged over the entire frame. It is parameter-free and global; the network learns where to
trust it (lattice) and where not (defects, amorphous and vacuum regions, where the input rules).

With `noise_level=True` it also sees a constant channel, the frame's `noise_level`: the network need
not guess from a patch how strongly to denoise, so one model serves doses 2 to 200 (a blind network
is pulled towards the noisiest frames it was trained on, and over-smooths clean ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from stemd.compute.fourier import bragg_filter, noise_level
from stemd.config import MIN_SIDE
from stemd.errors import CheckpointError

DEFAULT_CHANNELS = (48, 64, 96, 128)
MIN_SIZE = MIN_SIDE  # the smallest frame side accepted, as for the paper's 28 px window
GUIDES = ("none", "bragg")
DEFAULT_BAND_PIXELS = (
    2**20
)  # pixels (x batch) run at once; larger frames go in row bands (~250 MB at the default widths)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(inplace=True))


class ConvDenoiser(nn.Module):
    """U-Net on (B, 1, H, W) normalised frames, any H, W >= MIN_SIZE; predicts input + correction.

    `channels[i]` is the width of level i (level 0 at half the input resolution after the 2x2
    unshuffle when `unshuffle` is 2, full resolution when 1). `guide` "bragg" adds the
    `bragg_filter` channel, `noise_level` a constant channel of the frame's `noise_level`.
    """

    def __init__(self, channels: Sequence[int] = DEFAULT_CHANNELS, unshuffle: int = 2, guide: str = "none",
                 noise_level: bool = False) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1 or int(unshuffle) not in (1, 2) or guide not in GUIDES:
            raise ValueError(f"ConvDenoiser needs positive channels, unshuffle 1 or 2 and guide in {GUIDES}, "
                             f"got {channels}, {unshuffle}, {guide!r}")
        self.channels, self.unshuffle, self.guide, self.noise_level = channels, int(unshuffle), guide, bool(noise_level)
        s2 = self.unshuffle**2
        c_in = s2 * (1 + (guide == "bragg") + self.noise_level)
        self.enc = nn.ModuleList(_block(c_in if i == 0 else c, c) for i, c in enumerate(channels))
        self.down = nn.ModuleList(nn.Conv2d(a, b, 2, stride=2) for a, b in zip(channels, channels[1:]))
        self.up = nn.ModuleList(nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(channels, channels[1:]))
        self.dec = nn.ModuleList(_block(c, c) for c in channels[:-1])
        self.head = nn.Conv2d(channels[0], s2, 1)
        nn.init.zeros_(self.head.weight)  # starts as the identity: output = input
        assert self.head.bias is not None  # Conv2d(bias=True)
        nn.init.zeros_(self.head.bias)
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs omit memory_format; measured 1.5x faster on CPU (oneDNN); kept by load_state_dict

    @property
    def multiple(self) -> int:
        """Frame sides are padded up to a multiple of this before the network runs."""
        return int(self.unshuffle * 2 ** (len(self.channels) - 1))

    @property
    def reach(self) -> int:
        """Input pixels on either side of an output pixel that can influence it (receptive radius).

        Exact for the deepest path (the skips are shorter): an output pixel's dependency interval is
        followed back through every layer, for each alignment of the pixel to the coarsest grid.
        """
        n, s = len(self.channels), self.unshuffle
        worst = 0
        for p in range(self.multiple):
            lo = hi = p // s  # level-0 feature under the 1x1 head and the pixel shuffle
            for _ in range(n - 1):  # decoder block (two 3x3), then the 2x2 stride-2 transposed conv
                lo, hi = (lo - 2) // 2, (hi + 2) // 2
            lo, hi = lo - 2, hi + 2  # the bottom block
            for _ in range(n - 1):  # 2x2 stride-2 conv down, then the encoder block above it
                lo, hi = 2 * lo - 2, 2 * hi + 3
            worst = max(worst, p - s * lo, s * hi + s - 1 - p)
        return worst

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None, level: torch.Tensor | None = None, *,
                band_pixels: int = DEFAULT_BAND_PIXELS) -> torch.Tensor:
        """(B, 1, H, W) -> (B, 1, H, W); sides padded (reflect) to `multiple` and cropped back.

        `guide` (same shape) replaces `bragg_filter(x)`, `level` (B,) `noise_level(x)`: training cuts
        patches from the guide and level of a whole frame, as inference computes them. Frames larger
        than `band_pixels` (times the batch) are run in row bands (`_bands`) with the same result.
        """
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"frames must be (B, 1, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if min(h, w) < MIN_SIZE:
            raise ValueError(f"frames must be at least {MIN_SIZE} px on each side, got {h}x{w}")
        inputs = [x]
        if self.guide == "bragg":
            inputs.append(bragg_filter(x) if guide is None else guide)
        if self.noise_level:
            level = noise_level(x) if level is None else level
            inputs.append(level.to(x.dtype).view(-1, 1, 1, 1).expand(-1, 1, h, w))
        xin = torch.cat(inputs, 1) if len(inputs) > 1 else x
        m = self.multiple
        ph, pw = -h % m, -w % m
        xp = F.pad(xin, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="reflect") if ph or pw else xin
        return x + self._bands(xp, band_pixels)[:, :, ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]

    def _bands(self, xp: torch.Tensor, band_pixels: int) -> torch.Tensor:
        """The correction for a padded input, computed in bands of rows at most `band_pixels` (x batch).

        Each band is run with `reach` rows (rounded up to `multiple`) of context above and below and
        starts on the network's coarsest grid, so its rows come out exactly as from the whole frame.
        """
        b, _, hp, wp = xp.shape
        m = self.multiple
        rows = max(m, band_pixels // max(b * wp, 1) // m * m)
        if rows >= hp:
            return self._correction(xp)
        margin = -(-self.reach // m) * m
        out = xp.new_empty(b, 1, hp, wp)
        for c0 in range(0, hp, rows):
            c1 = min(hp, c0 + rows)
            a0, a1 = max(0, c0 - margin), min(hp, c1 + margin)
            out[:, :, c0:c1] = self._correction(xp[:, :, a0:a1])[:, :, c0 - a0 : c1 - a0]
        return out

    def _correction(self, xp: torch.Tensor) -> torch.Tensor:
        """The U-Net on a padded input (sides multiples of `multiple`): the correction to add."""
        y = F.pixel_unshuffle(xp, self.unshuffle) if self.unshuffle > 1 else xp
        y = y.contiguous(memory_format=torch.channels_last)
        skips = []
        for i, block in enumerate(self.enc):
            y = block(y)
            if i < len(self.down):
                skips.append(y)
                y = self.down[i](y)
        for i in reversed(range(len(self.dec))):
            y = self.dec[i](self.up[i](y) + skips[i])
        y = self.head(y)
        return F.pixel_shuffle(y, self.unshuffle) if self.unshuffle > 1 else y

    @property
    def inputs(self) -> tuple[str, ...]:
        """The auxiliary inputs it takes (`stemd.models.base`): the guide with guide "bragg", the noise level."""
        return (("guide",) if self.guide == "bragg" else ()) + (("level",) if self.noise_level else ())

    def denoise_frames(self, frames: torch.Tensor, step: int = 0, guide: torch.Tensor | None = None,
                       level: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, H, W) normalised frames -> same shape; `step` is the window models' and is ignored."""
        out: torch.Tensor = self(frames, guide, level)
        return out

    def arch(self) -> dict[str, Any]:
        """{"name": "conv_unet", "channels": [...], "unshuffle": s, "guide": g, "window": MIN_SIZE}, plus
        "noise_level": true when it has that input (older checkpoints lack the key).

        `window` is the smallest frame side it takes; `Denoiser` checks frames against it.
        """
        return {"name": "conv_unet", "channels": list(self.channels), "unshuffle": self.unshuffle,
                "guide": self.guide, "window": MIN_SIZE} | ({"noise_level": True} if self.noise_level else {})


def conv_from_arch(arch: dict[str, Any]) -> ConvDenoiser:
    """The registry factory: validate the plain-data arch and build the model."""
    channels, unshuffle = arch.get("channels", list(DEFAULT_CHANNELS)), arch.get("unshuffle", 2)
    if not isinstance(channels, (list, tuple)) or not channels or not all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels
    ):
        raise CheckpointError(f"arch.channels must be a non-empty list of positive integers, got {channels!r}")
    if unshuffle not in (1, 2) or isinstance(unshuffle, bool):
        raise CheckpointError(f"arch.unshuffle must be 1 or 2, got {unshuffle!r}")
    guide = arch.get("guide", "none")
    if guide not in GUIDES:
        raise CheckpointError(f"arch.guide must be one of {', '.join(GUIDES)}, got {guide!r}")
    level = arch.get("noise_level", False)
    if not isinstance(level, bool):
        raise CheckpointError(f"arch.noise_level must be true or false, got {level!r}")
    return ConvDenoiser(channels, unshuffle, guide, level)
