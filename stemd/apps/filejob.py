"""A denoising job on one image, prepared the same way wherever its frames are denoised (here or on a cluster):
the input read and checked, OUT checked, the model loaded, one plan for every frame, and the note OUT records."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from stemd.apps.tiffio import TiffImage, check_output, pixel_size_from_tags, read_tiff, stemd_note
from stemd.compute.normalize import check_frames
from stemd.config import ModelSettings
from stemd.errors import ConfigError, InputError
from stemd.pipeline import Denoiser, Plan


class FrameSource(Protocol):
    """An image read frame by frame: a TIFF (`TiffImage`) or a signal of another format (`formats.Source`)."""

    @property
    def path(self) -> Path: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def ndim(self) -> int: ...

    def frames(self) -> Generator[np.ndarray, None, None]: ...


S = TypeVar("S", bound=FrameSource)


@dataclass(frozen=True)
class FileJob(Generic[S]):
    """What denoising an image needs: the image, the model, the plan its frames share, OUT's note."""

    image: S
    denoiser: Denoiser
    plan: Plan
    note: dict[str, Any]


def check_pixel_size(pixel_size_m: float | None) -> None:
    """Refuse a --pixel-size that is not a positive number of metres."""
    if pixel_size_m is not None and not (math.isfinite(pixel_size_m) and pixel_size_m > 0):
        raise ConfigError(f"--pixel-size must be a positive number of metres, got {pixel_size_m!r}")


def prepare(inp: Path, out: Path, settings: ModelSettings, *, overwrite: bool = False,
            pixel_size_m: float | None = None, denoiser: Denoiser | None = None) -> FileJob[TiffImage]:
    """Check OUT and the TIFF input, load the model (unless given), plan from the first frame (its own lattice, else
    `pixel_size_m`, else the resolution tags) and write the note; every refusal is a one-line StemdError."""
    check_pixel_size(pixel_size_m)
    check_output(out, overwrite)
    image = read_tiff(inp)
    return prepare_image(image, lambda: pixel_size_from_tags(image), "resolution tags", settings,
                         pixel_size_m=pixel_size_m, denoiser=denoiser)


def prepare_image(image: S, file_pixel_size: Callable[[], float | None], pixel_source: str, settings: ModelSettings,
                  *, pixel_size_m: float | None = None, denoiser: Denoiser | None = None) -> FileJob[S]:
    """The job for an image already read: `file_pixel_size()` (named `pixel_source` in the note) is asked only when
    the sampling plan may need it and no `pixel_size_m` was given."""
    check_pixel_size(pixel_size_m)
    source = "--pixel-size"
    if pixel_size_m is None and settings.sampling != "off":
        pixel_size_m, source = file_pixel_size(), pixel_source
    denoiser = denoiser or Denoiser.load(None, settings)
    try:
        frames = image.frames()
        first = next(frames)
        check_frames(first, denoiser.window)
        frames.close()
        plan = denoiser.plan(image.shape[-2:], pixel_size_m, first)
    except InputError as exc:
        raise InputError(f"{image.path}: {exc}") from None
    used = None if settings.sampling == "off" else plan.describe()
    if used is not None and pixel_size_m is not None:
        used.update(pixel_size_source=source, lattice_period_m=settings.lattice_period_m)
    note = stemd_note(denoiser.model_id, denoiser.step, used)
    note.update(precision=settings.precision, flips=settings.flips, dejitter=settings.dejitter, planar=settings.planar)
    return FileJob(image, denoiser, plan, note)
