"""`stemd denoise IN OUT`: denoise a TIFF frame or stack offline with `stemd.pipeline.Denoiser`.

The output is float32 with the input's shape, pixel size (resolution tags, ImageJ spacing/unit)
and description, plus a note of the model id and step. Stacks are read, denoised and written
frame by frame (a memory map or one TIFF page at a time), streamed into a temporary file beside
OUT that is renamed into place only on success. The pixel size (`--pixel-size`, else the
resolution tags) lets the denoiser resample a frame into the model's lattice-period range.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from stemd.apps.distributed import denoise_file_on_cluster
from stemd.apps.filejob import prepare
from stemd.apps.tiffio import TiffImage, write_tiff_atomic
from stemd.config import MODEL_KEYS, ModelSettings, add_setting_options, load_settings, setting_overrides
from stemd.errors import ConfigError, InputError, ModelOutputError
from stemd.pipeline import Plan


def denoise_frames(image: TiffImage, denoise: Callable[..., np.ndarray], plan: Plan,
                   progress: bool) -> Iterator[np.ndarray]:
    """Denoised float32 frames of `image`, read and denoised one at a time by one `plan`, with a progress bar
    for stacks. `denoise(frame, plan=...)` is a `Denoiser`; an InputError names the frame it came from."""
    n = image.shape[0] if image.ndim == 3 else 1
    frames: Any = image.frames()
    if progress and n > 1:
        frames = tqdm(frames, total=n, unit="frame", desc="denoise", dynamic_ncols=True)
    for i, frame in enumerate(frames):
        try:
            yield np.ascontiguousarray(denoise(frame, plan=plan), dtype=np.float32)
        except (InputError, ModelOutputError) as exc:
            raise type(exc)(f"{image.path}: frame {i + 1} of {n}: {exc}" if n > 1 else f"{image.path}: {exc}") from None


def denoise_file(inp: Path, out: Path, settings: ModelSettings | None = None, *, overwrite: bool = False,
                 progress: bool = True, pixel_size_m: float | None = None) -> tuple[TiffImage, dict[str, Any]]:
    """Denoise the TIFF `inp` into `out` with the model `settings` name (float32, same shape, metadata carried);
    returns (input, note). `pixel_size_m` None: the one the resolution tags give, if any (`pixel_size_from_tags`)."""
    job = prepare(inp, out, settings or ModelSettings(), overwrite=overwrite, pixel_size_m=pixel_size_m)
    write_tiff_atomic(out, job.image, denoise_frames(job.image, job.denoiser, job.plan, progress), job.note)
    return job.image, job.note


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, metavar="IN", help="TIFF file: a 2D frame or a 3D stack (N, H, W)")
    parser.add_argument("output", type=Path, metavar="OUT", help="float32 TIFF to write (same shape and metadata)")
    parser.add_argument("--config", type=Path,
                        help="YAML settings; its model section is used (config/stemd.yaml documents every key)")
    add_setting_options(parser, MODEL_KEYS)
    parser.add_argument("--pixel-size", metavar="METRES",
                        help="pixel size, e.g. 3.9e-11 (default: from the TIFF's resolution tags, if they give one)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="denoise on a Dask cluster: 'local' (a LocalCluster of --workers processes) or a "
                             "scheduler's address, tcp://host:8786 (needs the dask extra)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="processes of the local cluster (default 2; one thread each)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_metres(text: str | None, option: str) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{option} must be a number of metres, e.g. 3.9e-11, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    settings = load_settings(args.config, setting_overrides(args), os.environ).model
    pixel_size_m = _parse_metres(args.pixel_size, "--pixel-size")
    if args.scheduler:
        if args.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {args.workers}")
        image, note = denoise_file_on_cluster(args.input, args.output, settings, args.scheduler, args.workers,
                                              overwrite=args.overwrite, progress=not args.no_progress,
                                              pixel_size_m=pixel_size_m)
    else:
        image, note = denoise_file(args.input, args.output, settings, overwrite=args.overwrite,
                                   progress=not args.no_progress, pixel_size_m=pixel_size_m)
    frames = 1 if image.ndim == 2 else image.shape[0]
    print(f"wrote {args.output}: {frames} frame(s) of {image.shape[-2]}x{image.shape[-1]}, "
          f"model {note['model']}, step {note['step']}, {describe_sampling(note.get('sampling'))}, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def describe_sampling(used: dict[str, Any] | None) -> str:
    """How the frames were sampled for the model, in a few words for the summary line."""
    if used is None:
        return "sampling off: run as is"
    how = "in the model's range" if used["factor"] == 1.0 else f"resampled x{used['factor']:.4g} and back"
    if used["source"] == "frame":
        return f"lattice measured in the frame ({used['lattice_scale_px']:.3g} px), {how}"
    if used["source"] == "pixel size":
        return f"pixel size {used['pixel_size_m']:.4g} m ({used['pixel_size_source']}), {how}"
    return "no lattice measured and pixel size unknown: run as is"
