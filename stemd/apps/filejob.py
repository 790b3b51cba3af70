"""A denoising job on one TIFF file, prepared the same way wherever its frames are denoised (here or on a cluster):
the input read and checked, OUT checked, the model loaded, one plan for every frame, and the note OUT records."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stemd.apps.tiffio import TiffImage, check_output, pixel_size_from_tags, read_tiff, stemd_note
from stemd.compute.normalize import check_frames
from stemd.config import ModelSettings
from stemd.errors import ConfigError, InputError
from stemd.pipeline import Denoiser, Plan


@dataclass(frozen=True)
class FileJob:
    """What denoising a file needs: its image, the model, the plan its frames share, OUT's note."""

    image: TiffImage
    denoiser: Denoiser
    plan: Plan
    note: dict[str, Any]


def prepare(inp: Path, out: Path, settings: ModelSettings, *, overwrite: bool = False,
            pixel_size_m: float | None = None) -> FileJob:
    """Check OUT and the input, load the model, plan from the first frame (its own lattice, else `pixel_size_m`,
    else the resolution tags) and write the note; every refusal is a one-line StemdError naming the file."""
    if pixel_size_m is not None and not (math.isfinite(pixel_size_m) and pixel_size_m > 0):
        raise ConfigError(f"--pixel-size must be a positive number of metres, got {pixel_size_m!r}")
    check_output(out, overwrite)
    image = read_tiff(inp)
    source = "--pixel-size"
    if pixel_size_m is None and settings.sampling != "off":
        pixel_size_m, source = pixel_size_from_tags(image), "resolution tags"
    denoiser = Denoiser.load(None, settings)
    try:
        frames = image.frames()
        first = next(frames)
        check_frames(first, denoiser.window)
        frames.close()
        plan = denoiser.plan(image.shape[-2:], pixel_size_m, first)
    except InputError as exc:
        raise InputError(f"{inp}: {exc}") from None
    used = None if settings.sampling == "off" else plan.describe()
    if used is not None and pixel_size_m is not None:
        used.update(pixel_size_source=source, lattice_period_m=settings.lattice_period_m)
    note = stemd_note(denoiser.model_id, denoiser.step, used)
    note.update(precision=settings.precision, flips=settings.flips, dejitter=settings.dejitter, planar=settings.planar)
    return FileJob(image, denoiser, plan, note)
