"""TIFF in and out for the offline and cluster commands: frames read one at a time, metadata carried over.

`read_tiff` takes a file's first image series and what describes it (resolution tags, ImageJ spacing/unit,
descriptions); `TiffImage.frames` streams its frames (a memory map or one page at a time);
`write_tiff_atomic` streams float32 frames into a temporary file beside OUT, renamed into place only on
success, with the input's metadata and a note of how the frames were made.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from stemd import __version__
from stemd.errors import InputError, StemdError

# ImageJ keys that describe the old pixel values or file layout; tifffile rewrites the layout ones
_IMAGEJ_DROP = {"ImageJ", "images", "frames", "slices", "channels", "hyperstack", "mode",
                "min", "max", "Ranges", "LUTs", "ROI", "Overlays", "Plot", "axes"}
_IMAGEJ_STACK_AXES = ("TYX", "ZYX", "CYX")
_BIGTIFF_BYTES = 2**32 - 2**25  # leave room for tags below the classic TIFF 4 GiB limit
# metres per resolution unit: TIFF ResolutionUnit codes (4, 5: tifffile's extensions) and ImageJ "unit" names
_RESUNIT_M = {2: 0.0254, 3: 1e-2, 4: 1e-3, 5: 1e-6}
_IMAGEJ_UNIT_M = {"m": 1.0, "cm": 1e-2, "mm": 1e-3, "micron": 1e-6, "microns": 1e-6, "um": 1e-6, "\\u00b5m": 1e-6,
                  "µm": 1e-6, "μm": 1e-6, "nm": 1e-9, "a": 1e-10, "å": 1e-10, "angstrom": 1e-10, "pm": 1e-12}
# Tags giving a pixel of 1 µm or more are a print resolution (72 dpi is 0.35 mm), not a microscope's
PRINT_PIXEL_M = 1e-6
SQUARE_TOLERANCE = 0.01  # x and y pixel sizes closer than this (relative) are one pixel size


@dataclass(frozen=True)
class TiffImage:
    """A TIFF's first series (read lazily, frame by frame) and the metadata `stemd denoise` carries over."""

    path: Path
    shape: tuple[int, ...]  # (H, W) or (N, H, W)
    dtype: np.dtype
    axes: str  # tifffile's axes codes, e.g. "YX", "TYX", "QYX"; "SYX": the planes of a non-colour RGB page
    imagej: dict[str, Any] | None  # ImageJ metadata when the file is an ImageJ TIFF
    shaped: dict[str, Any] | None  # tifffile's JSON metadata (without "shape") when present
    description: str | None  # a plain ImageDescription (neither ImageJ nor tifffile JSON)
    resolution: tuple[float, float] | None  # pixels per `resolution_unit` in x and y
    resolution_unit: int | None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def frames(self) -> Generator[np.ndarray, None, None]:
        """Each (H, W) frame in turn, read when reached: from a memory map when the pixels lie
        uncompressed in one block, else one TIFF page at a time; a 2D image is one frame."""
        try:
            with tifffile.TiffFile(self.path) as tif:
                series = tif.series[0]
                stack = series.shape if self.ndim == 3 else (1, *self.shape)
                if series.dataoffset is not None:
                    dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
                    mapped = np.memmap(self.path, dtype=dtype, mode="r", offset=series.dataoffset, shape=stack)
                    yield from mapped
                    del mapped
                elif len(series.pages) == stack[0] and all(
                    p is not None and p.shape == stack[1:] for p in series.pages
                ):
                    for page in series.pages:
                        assert page is not None  # checked above
                        yield page.asarray()
                else:  # an unusual layout (e.g. several frames in one compressed page): read it whole
                    yield from series.asarray().reshape(stack)
        except StemdError:
            raise
        except Exception as exc:  # tifffile and numpy report bad files with many exception types
            raise InputError(f"cannot read {self.path} as a TIFF image: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def pixel_size_from_tags(image: TiffImage) -> float | None:
    """Pixel size in metres from the resolution tags (or ImageJ's unit); None when they give no
    physical size or only a print resolution (>= PRINT_PIXEL_M). Non-square pixels raise InputError."""
    if image.resolution is None:
        return None
    per_unit = _RESUNIT_M.get(image.resolution_unit or 0)
    if per_unit is None and image.imagej is not None:
        per_unit = _IMAGEJ_UNIT_M.get(str(image.imagej.get("unit", "")).strip().lower())
    xres, yres = image.resolution
    if per_unit is None or not (xres > 0 and yres > 0 and math.isfinite(xres) and math.isfinite(yres)):
        return None
    x, y = per_unit / xres, per_unit / yres
    if x >= PRINT_PIXEL_M or y >= PRINT_PIXEL_M:
        return None
    if abs(x - y) > SQUARE_TOLERANCE * max(x, y):
        raise InputError(f"{image.path}: its resolution tags give non-square pixels ({x:.4g} x {y:.4g} m); "
                         "pass --pixel-size METRES or --sampling off")
    return x


def _stack_of_planes(page: Any, series: Any, shaped: dict[str, Any] | None) -> bool:
    """True when an RGB-tagged page is a stack of 3 or 4 greyscale frames, not a colour image.

    tifffile writes an (S, H, W) array with S = 3 or 4 and no `photometric` as RGB with separate
    planes (axes "SYX"; 4 planes get an alpha tag). Colour images almost always interleave their
    samples (axes "YXS"), 8 bits each. So: separate planes, and either wider than 8 bits (detector
    data) or tifffile's own shape record saying an (S, H, W) array was written.
    """
    if page.photometric != tifffile.PHOTOMETRIC.RGB or page.planarconfig != tifffile.PLANARCONFIG.SEPARATE:
        return False
    if series.axes != "SYX":
        return False
    written_as_stack = shaped is not None and list(shaped.get("shape", [])) == list(series.shape)
    return np.dtype(series.dtype).itemsize > 1 or written_as_stack


def _plain_description(text: str) -> bool:
    if text.startswith("ImageJ="):
        return False
    if text.startswith("{"):
        try:
            return "shape" not in json.loads(text)
        except ValueError:
            return True
    return True


def read_tiff(path: Path) -> TiffImage:
    """The first image series of a TIFF and its metadata; InputError for anything unusable."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input file {path} does not exist")
    if path.is_dir():
        raise InputError(f"input {path} is a directory, not a TIFF file")
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise InputError(f"{path} holds no image")
            series = tif.series[0]
            page = tif.pages.first
            shaped = dict(tif.shaped_metadata[0]) if tif.is_shaped and tif.shaped_metadata else None
            planes = _stack_of_planes(page, series, shaped)
            if not planes and ("S" in series.axes or page.photometric in (
                tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR, tifffile.PHOTOMETRIC.PALETTE,
                tifffile.PHOTOMETRIC.SEPARATED,
            )):
                raise InputError(
                    f"{path} is a colour (RGB/palette) TIFF of shape {series.shape}; "
                    "stemd denoises single-channel greyscale images: convert it to greyscale first"
                )
            if len(series.shape) not in (2, 3):
                raise InputError(
                    f"{path} holds a {len(series.shape)}D image of shape {series.shape} (axes {series.axes}); "
                    "expected a 2D frame (H, W) or a 3D stack (N, H, W)"
                )
            descriptions = [t.value for t in page.tags if t.code == 270 and isinstance(t.value, str)]
            if shaped is not None:
                shaped.pop("shape", None)
            resolution = page.resolution if 282 in page.tags and 283 in page.tags else None
            return TiffImage(
                path=path,
                shape=tuple(int(v) for v in series.shape),
                dtype=np.dtype(series.dtype),
                axes=series.axes,
                imagej=dict(tif.imagej_metadata or {}) if tif.is_imagej else None,
                shaped=shaped,
                description=next((d for d in descriptions if _plain_description(d)), None),
                resolution=(float(resolution[0]), float(resolution[1])) if resolution else None,
                resolution_unit=int(page.resolutionunit) if resolution else None,
            )
    except StemdError:
        raise
    except Exception as exc:  # tifffile reports bad files with many exception types
        raise InputError(f"cannot read {path} as a TIFF image: {_reason(exc)}") from None


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that exists (unless overwrite), is a directory (but a .zspy, which is one), or whose directory
    is missing."""
    out = Path(out)
    if out.is_dir() and out.suffix.lower() != ".zspy":
        raise InputError(f"output {out} is a directory; give a file name")
    if out.exists() and not overwrite:
        raise InputError(f"output file {out} exists; pass --overwrite to replace it")
    parent = out.parent
    if not parent.is_dir():
        raise InputError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output directory {parent} is not writable")


def stemd_note(model_id: str, step: int, sampling: dict[str, Any] | None = None) -> dict[str, Any]:
    """What OUT records of how it was made; `sampling`: the pixel size used and the resampling factor."""
    note = {"model": model_id, "step": step, "software": f"stemd {__version__}"}
    if sampling is not None:
        note["sampling"] = sampling
    return note


def _write_kwargs(image: TiffImage, note: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """(imagej?, TiffWriter.write keyword arguments) that carry `image`'s metadata plus `note`."""
    kwargs: dict[str, Any] = {"photometric": "minisblack", "software": note["software"]}
    if image.resolution is not None:
        kwargs["resolution"] = image.resolution
        kwargs["resolutionunit"] = image.resolution_unit
    note_line = f"stemd: denoised by {note['software']}, model {note['model']}, step {note['step']}"
    if note.get("sampling", {}).get("factor", 1.0) != 1.0:
        note_line += f", resampled x{note['sampling']['factor']:.4g} for the model and back"
    if image.imagej is not None:
        meta = {k: v for k, v in image.imagej.items() if k not in _IMAGEJ_DROP}
        meta["Info"] = f"{meta['Info'].rstrip()}\n{note_line}" if meta.get("Info") else note_line
        if image.ndim == 3:
            meta["axes"] = image.axes if image.axes in _IMAGEJ_STACK_AXES else "TYX"
        kwargs["metadata"] = meta
        return True, kwargs
    meta = dict(image.shaped or {})
    if meta.get("axes") is not None and len(str(meta["axes"])) != image.ndim:
        meta.pop("axes")
    meta["stemd"] = note
    kwargs["metadata"] = meta
    if image.description is not None:
        text = image.description
        kwargs["description"] = text if text.isascii() else text.encode("utf-8")
    return False, kwargs


def write_tiff_atomic(out: Path, image: TiffImage, frames: Iterator[np.ndarray], note: dict[str, Any]) -> None:
    """Stream float32 `frames` (one per input frame) into OUT via a temporary file; OUT appears only on success."""
    out = Path(out)
    shape = image.shape
    imagej, kwargs = _write_kwargs(image, note)
    bigtiff = not imagej and 4 * int(np.prod(shape)) > _BIGTIFF_BYTES
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff, imagej=imagej) as writer:
            if len(shape) == 2:
                writer.write(next(frames), **kwargs)
            else:
                writer.write(frames, shape=shape, dtype=np.float32, **kwargs)
        os.replace(tmp, out)
    except OSError as exc:
        raise InputError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
