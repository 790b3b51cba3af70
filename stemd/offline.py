"""`stemd denoise IN OUT`: denoise a TIFF frame or stack offline with `stemd.denoiser.Denoiser`.

The output is float32 with the input's shape, pixel size (resolution tags, ImageJ spacing/unit)
and description, plus a note of the model id and step. Stacks are denoised frame by frame and
streamed into a temporary file beside OUT that is renamed into place only on success.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from stemd import __version__
from stemd.errors import ConfigError, InputError, StemdError

MAX_STEP = 28
# ImageJ keys that describe the old pixel values or file layout; tifffile rewrites the layout ones
_IMAGEJ_DROP = {"ImageJ", "images", "frames", "slices", "channels", "hyperstack", "mode",
                "min", "max", "Ranges", "LUTs", "ROI", "Overlays", "Plot", "axes"}
_IMAGEJ_STACK_AXES = ("TYX", "ZYX", "CYX")
_BIGTIFF_BYTES = 2**32 - 2**25  # leave room for tags below the classic TIFF 4 GiB limit


@dataclass(frozen=True)
class TiffImage:
    """Pixels of a TIFF's first series and the metadata `stemd denoise` carries over."""

    data: np.ndarray  # (H, W) or (N, H, W)
    axes: str  # tifffile's axes codes, e.g. "YX", "TYX", "QYX"
    imagej: dict[str, Any] | None  # ImageJ metadata when the file is an ImageJ TIFF
    shaped: dict[str, Any] | None  # tifffile's JSON metadata (without "shape") when present
    description: str | None  # a plain ImageDescription (neither ImageJ nor tifffile JSON)
    resolution: tuple[float, float] | None  # pixels per `resolution_unit` in x and y
    resolution_unit: int | None


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
    import tifffile

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
            if "S" in series.axes or page.photometric in (
                tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR, tifffile.PHOTOMETRIC.PALETTE,
                tifffile.PHOTOMETRIC.SEPARATED,
            ):
                raise InputError(
                    f"{path} is a colour (RGB/palette) TIFF of shape {series.shape}; "
                    "stemd denoises single-channel greyscale images: convert it to greyscale first"
                )
            if len(series.shape) not in (2, 3):
                raise InputError(
                    f"{path} holds a {len(series.shape)}D image of shape {series.shape} (axes {series.axes}); "
                    "expected a 2D frame (H, W) or a 3D stack (N, H, W)"
                )
            data = series.asarray()
            descriptions = [t.value for t in page.tags if t.code == 270 and isinstance(t.value, str)]
            shaped = dict(tif.shaped_metadata[0]) if tif.is_shaped and tif.shaped_metadata else None
            if shaped is not None:
                shaped.pop("shape", None)
            resolution = page.resolution if 282 in page.tags and 283 in page.tags else None
            return TiffImage(
                data=data,
                axes=series.axes,
                imagej=dict(tif.imagej_metadata or {}) if tif.is_imagej else None,
                shaped=shaped,
                description=next((d for d in descriptions if _plain_description(d)), None),
                resolution=tuple(float(v) for v in resolution) if resolution else None,
                resolution_unit=int(page.resolutionunit) if resolution else None,
            )
    except StemdError:
        raise
    except Exception as exc:  # tifffile reports bad files with many exception types
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read {path} as a TIFF image: {reason}") from None


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that exists (unless overwrite), is a directory, or whose directory is missing."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"output {out} is a directory; give a file name")
    if out.exists() and not overwrite:
        raise InputError(f"output file {out} exists; pass --overwrite to replace it")
    parent = out.parent
    if not parent.is_dir():
        raise InputError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output directory {parent} is not writable")


def stemd_note(model_id: str, step: int) -> dict[str, Any]:
    return {"model": model_id, "step": step, "software": f"stemd {__version__}"}


def _write_kwargs(image: TiffImage, note: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """(imagej?, TiffWriter.write keyword arguments) that carry `image`'s metadata plus `note`."""
    kwargs: dict[str, Any] = {"photometric": "minisblack", "software": note["software"]}
    if image.resolution is not None:
        kwargs["resolution"] = image.resolution
        kwargs["resolutionunit"] = image.resolution_unit
    note_line = f"stemd: denoised by {note['software']}, model {note['model']}, step {note['step']}"
    if image.imagej is not None:
        meta = {k: v for k, v in image.imagej.items() if k not in _IMAGEJ_DROP}
        meta["Info"] = f"{meta['Info'].rstrip()}\n{note_line}" if meta.get("Info") else note_line
        if image.data.ndim == 3:
            meta["axes"] = image.axes if image.axes in _IMAGEJ_STACK_AXES else "TYX"
        kwargs["metadata"] = meta
        return True, kwargs
    meta = dict(image.shaped or {})
    if meta.get("axes") is not None and len(str(meta["axes"])) != image.data.ndim:
        meta.pop("axes")
    meta["stemd"] = note
    kwargs["metadata"] = meta
    if image.description is not None:
        text = image.description
        kwargs["description"] = text if text.isascii() else text.encode("utf-8")
    return False, kwargs


def write_tiff_atomic(out: Path, image: TiffImage, frames: Iterator[np.ndarray], note: dict[str, Any]) -> None:
    """Stream float32 `frames` (one per input frame) into OUT via a temporary file; OUT appears only on success."""
    import tifffile

    out = Path(out)
    shape = image.data.shape
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


def denoise_frames(image: np.ndarray, denoise: Callable[[np.ndarray], np.ndarray], progress: bool) -> Iterator[np.ndarray]:
    """Denoised float32 frames of a 2D frame or 3D stack, one at a time, with a progress bar for stacks."""
    stack = image if image.ndim == 3 else image[None]
    indices: Any = range(len(stack))
    if progress and len(stack) > 1:
        from tqdm import tqdm

        indices = tqdm(indices, unit="frame", desc="denoise", dynamic_ncols=True)
    for i in indices:
        yield np.ascontiguousarray(denoise(stack[i]), dtype=np.float32)


def denoise_file(
    inp: Path,
    out: Path,
    *,
    model: Path | None = None,
    step: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[TiffImage, dict[str, Any]]:
    """Denoise the TIFF `inp` into `out` (float32, same shape, metadata carried); returns (input, note)."""
    from stemd.denoiser import Denoiser, check_frames

    if step is not None and not 1 <= step <= MAX_STEP:
        raise ConfigError(f"--step must be from 1 to {MAX_STEP}, got {step}")
    check_output(out, overwrite)
    image = read_tiff(inp)
    denoiser = Denoiser.load(model, device=device, step=step)
    try:
        check_frames(image.data, denoiser.window)
    except InputError as exc:
        raise InputError(f"{inp}: {exc}") from None
    note = stemd_note(denoiser.model_id, denoiser.step)
    write_tiff_atomic(out, image, denoise_frames(image.data, denoiser, progress), note)
    return image, note


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, metavar="IN", help="TIFF file: a 2D frame or a 3D stack (N, H, W)")
    parser.add_argument("output", type=Path, metavar="OUT", help="float32 TIFF to write (same shape and metadata)")
    parser.add_argument("--model", type=Path, metavar="PATH", help="checkpoint (default: the shipped model)")
    parser.add_argument("--step", metavar="N", help=f"floating-window step 1..{MAX_STEP} (default: the model's, 2)")
    parser.add_argument("--device", default="auto", metavar="cpu|cuda|auto", help="where to run the model (default auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_step(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--step must be an integer from 1 to {MAX_STEP}, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    image, note = denoise_file(
        args.input,
        args.output,
        model=args.model,
        step=_parse_step(args.step),
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    frames = 1 if image.data.ndim == 2 else len(image.data)
    print(f"wrote {args.output}: {frames} frame(s) of {image.data.shape[-2]}x{image.data.shape[-1]}, "
          f"model {note['model']}, step {note['step']}, {time.perf_counter() - t0:.1f} s")
    return 0
