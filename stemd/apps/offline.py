"""`stemd denoise IN OUT`: denoise an image file offline with `stemd.pipeline.Denoiser`; `stemd denoise DIR_OR_GLOB
OUT_DIR`: many files, each reported, a bad one skipped.

TIFF in and out streams frame by frame (a memory map or one TIFF page at a time) into a temporary file beside OUT,
renamed into place only on success: float32, the input's shape, pixel size (resolution tags, ImageJ spacing/unit),
description, and a note of the model id and step. Other formats (Gatan dm3/dm4, Velox/Berkeley EMD, TIA ser/emi,
mrc, HyperSpy hspy/zspy) are read through RosettaSciIO (`stemd.apps.formats`, the formats extra), one image signal
at a time, with the pixel size from their axes; OUT's suffix chooses TIFF (ImageJ, with the pixel size) or HyperSpy
(.hspy/.zspy, the original axes and metadata). The pixel size (`--pixel-size`, else the file's) lets the denoiser
resample a frame into the model's lattice-period range.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from stemd.apps import formats
from stemd.apps.distributed import denoise_file_on_cluster
from stemd.apps.filejob import FrameSource, check_pixel_size, prepare, prepare_image
from stemd.apps.tiffio import TiffImage, check_output, write_tiff_atomic
from stemd.config import MODEL_KEYS, ModelSettings, add_setting_options, load_settings, setting_overrides
from stemd.errors import ConfigError, InputError, ModelOutputError, StemdError
from stemd.pipeline import Denoiser, Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Written:
    """One output written: its path, the image's shape and the note it records."""

    path: Path
    shape: tuple[int, ...]
    note: dict[str, Any]


def denoise_frames(image: FrameSource, denoise: Callable[..., np.ndarray], plan: Plan,
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
                 progress: bool = True, pixel_size_m: float | None = None,
                 denoiser: Denoiser | None = None) -> tuple[TiffImage, dict[str, Any]]:
    """Denoise the TIFF `inp` into the TIFF `out` with the model `settings` name (float32, same shape, metadata
    carried); returns (input, note). `pixel_size_m` None: the one the resolution tags give, if any."""
    job = prepare(inp, out, settings or ModelSettings(), overwrite=overwrite, pixel_size_m=pixel_size_m,
                  denoiser=denoiser)
    write_tiff_atomic(out, job.image, denoise_frames(job.image, job.denoiser, job.plan, progress), job.note)
    return job.image, job.note


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def denoise_any(inp: Path, out: Path, settings: ModelSettings | None = None, *, overwrite: bool = False,
                progress: bool = True, pixel_size_m: float | None = None, denoiser: Denoiser | None = None,
                warn: Callable[[str], None] | None = None) -> list[Written]:
    """Denoise every image of `inp` (any format `stemd.apps.formats` reads) into OUT, whose suffix chooses TIFF or
    HyperSpy; a file of several images writes OUT_<title> for each. `warn` hears of each signal skipped."""
    settings = settings or ModelSettings()
    check_pixel_size(pixel_size_m)
    kind = formats.output_kind(out)
    if _same_file(inp, out):
        raise InputError(f"output {out} is the input itself; give another name")
    if inp.suffix.lower() in formats.TIFF_SUFFIXES and kind == "tif":
        image, note = denoise_file(inp, out, settings, overwrite=overwrite, progress=progress,
                                   pixel_size_m=pixel_size_m, denoiser=denoiser)
        return [Written(out, image.shape, note)]
    sources, skipped = formats.open_sources(inp)
    if not sources:
        raise InputError(f"{inp} holds no image stemd denoises ({'; '.join(skipped) or 'no signal'})")
    for why in skipped:
        (warn or _stderr)(f"stemd: {inp}: skipped {why}")
    outs = formats.output_names(out, sources)
    for path in outs:
        check_output(path, overwrite)
    written = []
    for source, path in zip(sources, outs):
        job = prepare_image(source, source.pixel_size_m, source.pixel_source, settings, pixel_size_m=pixel_size_m,
                            denoiser=denoiser)
        denoiser = job.denoiser
        frames = denoise_frames(source, job.denoiser, job.plan, progress)
        if kind == "tif":
            pixel = pixel_size_m if pixel_size_m is not None else _quiet_pixel(source)
            write_tiff_atomic(path, formats.tiff_carrier(source, pixel), frames, job.note)
        else:
            formats.write_signal_atomic(path, source, frames, job.note)
        written.append(Written(path, source.shape, job.note))
    return written


def _quiet_pixel(source: formats.Source) -> float | None:
    """The file's pixel size for OUT's tags, where the sampling plan did not ask for it (non-square: none)."""
    try:
        return source.pixel_size_m()
    except InputError:
        return None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, metavar="IN",
                        help="image file: TIFF, Gatan .dm3/.dm4, .emd (Velox, Berkeley), TIA .ser/.emi, .mrc, "
                             "HyperSpy .hspy/.zspy (all but TIFF need the formats extra); or a directory or a "
                             "quoted glob ('runs/*.dm4') to denoise many files into OUT_DIR")
    parser.add_argument("output", type=Path, metavar="OUT",
                        help="file to write: .tif (ImageJ, float32, the pixel size and metadata carried), .hspy or "
                             ".zspy (HyperSpy: the original axes and metadata); for many inputs, a directory")
    parser.add_argument("--format", choices=sorted(formats.OUTPUT_SUFFIXES),
                        help="output format of a directory/glob run (default tif); for one file OUT's suffix says it")
    parser.add_argument("--config", type=Path,
                        help="YAML settings; its model section is used (config/stemd.yaml documents every key)")
    add_setting_options(parser, MODEL_KEYS)
    parser.add_argument("--pixel-size", metavar="METRES",
                        help="pixel size, e.g. 3.9e-11 (default: from the file's axes or TIFF resolution tags)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="denoise on a Dask cluster: 'local' (a LocalCluster of --workers processes) or a "
                             "scheduler's address, tcp://host:8786 (needs the dask extra; TIFF in and out)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="processes of the local cluster (default 2; one thread each)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT (or files in OUT_DIR) if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_metres(text: str | None, option: str) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{option} must be a number of metres, e.g. 3.9e-11, got {text!r}") from None


def is_batch(inp: Path) -> bool:
    """A directory (but a .zspy, which is one file) or a glob pattern: many files."""
    return any(c in str(inp) for c in "*?[") or (inp.is_dir() and inp.suffix.lower() != ".zspy")


def batch_inputs(inp: Path) -> list[Path]:
    """The files a directory (those of a known suffix, not hidden) or a glob names, sorted; a TIA .ser read with
    its .emi (name.emi, name_1.ser) is left to the .emi."""
    if inp.is_dir() and not any(c in str(inp) for c in "*?["):
        paths = [p for p in inp.iterdir() if formats.known_input(p) and (p.is_file() or p.suffix.lower() == ".zspy")]
    else:
        paths = [Path(p) for p in glob.glob(str(inp))]
        paths = [p for p in paths if not p.is_dir() or p.suffix.lower() == ".zspy"]
    paths = [p for p in paths if not p.name.startswith(".")]
    emi = {p.with_suffix("").name for p in paths if p.suffix.lower() == ".emi"}
    paths = [p for p in paths if not (p.suffix.lower() == ".ser" and p.stem.rpartition("_")[0] in emi)]
    return sorted(paths)


def run_batch(args: argparse.Namespace, settings: ModelSettings, pixel_size_m: float | None) -> int:
    """Denoise many files into OUT_DIR: one progress bar, a line per file, a summary; 1 if any failed."""
    t0 = time.perf_counter()
    check_pixel_size(pixel_size_m)
    if args.scheduler:
        raise ConfigError("--scheduler takes one TIFF file, not a directory or glob")
    paths = batch_inputs(args.input)
    if not paths:
        raise InputError(f"no file to denoise in {args.input} (stemd reads {', '.join(formats.TIFF_SUFFIXES)}, "
                         f"{', '.join(formats.READERS)})")
    outdir: Path = args.output
    if (outdir.exists() and not outdir.is_dir()) or outdir.suffix.lower() in (*formats.TIFF_SUFFIXES, *formats.WRITERS):
        raise InputError(f"output {outdir} names a file; for many inputs give a directory (and --format)")
    if not outdir.parent.is_dir():
        raise InputError(f"output directory {outdir.parent} does not exist")
    outdir.mkdir(exist_ok=True)
    suffix = formats.OUTPUT_SUFFIXES[args.format or "tif"]
    denoiser = Denoiser.load(None, settings)
    claimed: dict[Path, Path] = {}
    failed: list[str] = []
    skipped = 0
    bar = tqdm(total=len(paths), unit="file", desc="denoise", dynamic_ncols=True, disable=args.no_progress)

    def warn(line: str) -> None:
        nonlocal skipped
        skipped += 1
        tqdm.write(line, file=sys.stderr)

    for path in paths:
        t1 = time.perf_counter()
        out = outdir / f"{path.stem}{suffix}"
        try:
            if out in claimed:
                raise InputError(f"its output {out} is also {claimed[out].name}'s; rename one of them")
            claimed[out] = path
            written = denoise_any(path, out, settings, overwrite=args.overwrite, progress=False,
                                  pixel_size_m=pixel_size_m, denoiser=denoiser, warn=warn)
        except StemdError as exc:
            failed.append(path.name)
            tqdm.write(f"failed {path}: {exc}", file=sys.stderr)
        except Exception as exc:  # a reader's bug on one odd file must not stop the others
            failed.append(path.name)
            log.debug("%s failed", path, exc_info=True)
            tqdm.write(f"failed {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            names = ", ".join(w.path.name for w in written)
            frames = sum(1 if len(w.shape) == 2 else w.shape[0] for w in written)
            tqdm.write(f"ok {path} -> {names}: {frames} frame(s) of {written[0].shape[-2]}x{written[0].shape[-1]}, "
                       f"{describe_sampling(written[0].note.get('sampling'))}, {time.perf_counter() - t1:.1f} s")
        bar.update(1)
    bar.close()
    summary = (f"denoised {len(paths) - len(failed)} of {len(paths)} file(s) into {outdir} in "
               f"{time.perf_counter() - t0:.1f} s")
    if skipped:
        summary += f"; {skipped} signal(s) skipped (not images)"
    if failed:
        summary += f"; {len(failed)} failed: {', '.join(failed)}"
    print(summary, file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    settings = load_settings(args.config, setting_overrides(args), os.environ).model
    pixel_size_m = _parse_metres(args.pixel_size, "--pixel-size")
    if is_batch(args.input):
        return run_batch(args, settings, pixel_size_m)
    kind = formats.output_kind(args.output)
    if args.format is not None and args.format != kind:
        raise ConfigError(f"--format {args.format} but OUT {args.output} names {kind}; for one file OUT's suffix "
                          "chooses the format")
    if args.scheduler:
        if args.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {args.workers}")
        if kind != "tif" or args.input.suffix.lower() not in formats.TIFF_SUFFIXES:
            raise ConfigError("--scheduler reads and writes TIFF only")
        image, note = denoise_file_on_cluster(args.input, args.output, settings, args.scheduler, args.workers,
                                              overwrite=args.overwrite, progress=not args.no_progress,
                                              pixel_size_m=pixel_size_m)
        written = [Written(args.output, image.shape, note)]
    else:
        written = denoise_any(args.input, args.output, settings, overwrite=args.overwrite,
                              progress=not args.no_progress, pixel_size_m=pixel_size_m)
    for w in written:
        frames = 1 if len(w.shape) == 2 else w.shape[0]
        tuned = (w.note.get("sampling") or {}).get("adapt")
        print(f"wrote {w.path}: {frames} frame(s) of {w.shape[-2]}x{w.shape[-1]}, "
              f"model {w.note['model']}, step {w.note['step']}, {describe_sampling(w.note.get('sampling'))}, "
              + (f"fine-tune on the frame: {tuned}, " if tuned else "") + f"{time.perf_counter() - t0:.1f} s")
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
