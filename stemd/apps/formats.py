"""Microscopy file formats for `stemd denoise`, through RosettaSciIO (the `formats` extra): read and write.

`open_sources` turns an input file into the images it holds (`Source`: frames read one at a time, the pixel size
from the file's axes in metres, the metadata to carry over) and says which signals it skipped and why (spectra,
4D data, diffraction patterns); TIFF keeps the tifffile path (`stemd.apps.tiffio`). `write_signal_atomic`
writes a HyperSpy file (.hspy, .zspy) frame by frame beside OUT and moves it into place on success;
`tiff_carrier` describes a non-TIFF source for an ImageJ TIFF (pixel size in nm, the metadata as JSON in Info).
rsciio is imported here only; without it a non-TIFF file is refused with one line naming the extra.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from stemd.apps.tiffio import SQUARE_TOLERANCE, TiffImage, pixel_size_from_tags, read_tiff
from stemd.errors import ConfigError, InputError, StemdError

try:
    import rsciio
except ImportError:  # the formats extra is optional: TIFF needs none of it
    rsciio = None

EXTRA_HINT = "pip install 'stemd[formats]'"
TIFF_SUFFIXES = (".tif", ".tiff")
# input suffix -> RosettaSciIO plugin (the formats a STEM user meets)
READERS = {".dm3": "digitalmicrograph", ".dm4": "digitalmicrograph", ".emd": "emd", ".ser": "tia", ".emi": "tia",
           ".mrc": "mrc", ".hspy": "hspy", ".hdf5": "hspy", ".zspy": "zspy"}
WRITERS = {".hspy": "hspy", ".zspy": "zspy"}
# --format -> the output's suffix
OUTPUT_SUFFIXES = {"tif": ".tif", "hspy": ".hspy", "zspy": ".zspy"}
_LENGTH_M = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "μm": 1e-6, "micron": 1e-6, "nm": 1e-9,
             "å": 1e-10, "a": 1e-10, "angstrom": 1e-10, "pm": 1e-12}
_ENERGY_UNITS = {"ev", "kev", "mev"}
_METADATA_ARRAY_MAX = 4096  # metadata arrays above this many elements travel to a TIFF as a short description


def known_input(path: Path) -> bool:
    """True for a suffix `stemd denoise` reads (TIFF, or one of READERS)."""
    return path.suffix.lower() in TIFF_SUFFIXES or path.suffix.lower() in READERS


def output_kind(out: Path) -> str:
    """'tif', 'hspy' or 'zspy' from OUT's suffix; ConfigError for anything else."""
    suffix = out.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return "tif"
    if suffix in WRITERS:
        return WRITERS[suffix]
    raise ConfigError(f"output {out}: name it .tif, .tiff, .hspy or .zspy (the suffix chooses the format)")


def _plugin(suffix: str, action: str, name: str) -> ModuleType:
    if rsciio is None:
        raise InputError(f"{action} {suffix} needs the formats extra: {EXTRA_HINT}")
    try:
        return importlib.import_module(f"rsciio.{name}")
    except ImportError as exc:  # h5py or zarr missing
        raise InputError(f"{action} {suffix} needs the formats extra ({exc.name or exc} missing): {EXTRA_HINT}") \
            from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


@dataclass(frozen=True)
class Source:
    """One image (a 2D frame or a 3D stack) of an input file: its frames, pixel size and metadata."""

    path: Path
    title: str
    shape: tuple[int, ...]  # (H, W) or (N, H, W)
    read: Callable[[], Iterator[np.ndarray]] = field(repr=False)
    axes: list[dict[str, Any]]  # HyperSpy axis dicts (name, scale, offset, units, size, navigate)
    metadata: dict[str, Any] = field(repr=False)
    original_metadata: dict[str, Any] = field(repr=False)
    tiff: TiffImage | None = None  # the TIFF itself when the input is one
    pixel_source: str = "file axes"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def frames(self) -> Generator[np.ndarray, None, None]:
        """Each (H, W) frame in turn, read when reached."""
        yield from self.read()

    def pixel_size_m(self) -> float | None:
        """The pixel size in metres the file gives (axes scale and units, or TIFF tags); None when it gives none."""
        if self.tiff is not None:
            return pixel_size_from_tags(self.tiff)
        return axes_pixel_size_m(self.axes, self.path, self.title)


def length_m(units: Any) -> float | None:
    """Metres per unit for a length unit name (nm, Å, pm, µm, ...); None for anything else."""
    if not isinstance(units, str):
        return None
    return _LENGTH_M.get(units.strip().lower().replace("angstroms", "angstrom"))


def axes_pixel_size_m(axes: list[dict[str, Any]], path: Path, title: str) -> float | None:
    """Pixel size in metres from the last two axes' scale and units; None when uncalibrated or not a length.
    Non-square pixels raise InputError, as they do for TIFF tags."""
    sizes = []
    for axis in axes[-2:]:
        per_unit = length_m(axis.get("units"))
        try:
            scale = float(axis.get("scale", float("nan")))
        except (TypeError, ValueError):
            return None
        if per_unit is None or not (math.isfinite(scale) and scale > 0):
            return None
        sizes.append(scale * per_unit)
    y, x = sizes
    if abs(x - y) > SQUARE_TOLERANCE * max(x, y):
        raise InputError(f"{path}: {title}: its axes give non-square pixels ({x:.4g} x {y:.4g} m); "
                         "pass --pixel-size METRES or --sampling off")
    return x


def _skip_reason(data: Any, axes: list[dict[str, Any]]) -> str | None:
    """Why a signal is not an image stemd denoises, or None when it is a 2D frame or a stack of them."""
    shape = tuple(int(v) for v in data.shape)
    kind = np.dtype(data.dtype).kind
    if kind not in "biuf":
        return f"its data are {np.dtype(data.dtype)}, not real greyscale values"
    navigate = [a.get("navigate") for a in axes]
    signal_dims = sum(1 for n in navigate if n is False) if all(isinstance(n, bool) for n in navigate) else None
    units = [str(a.get("units") or "").strip().lower() for a in axes]
    if len(shape) == 1 or signal_dims == 1 or (units and units[-1] in _ENERGY_UNITS):
        return f"a spectrum or spectrum image of shape {shape} (signal dimension 1)"
    if len(shape) > 3:
        return f"a {len(shape)}D dataset of shape {shape} (e.g. 4D-STEM); stemd denoises 2D frames and 3D stacks"
    if len(shape) == 3 and signal_dims == 3 and length_m(units[0]) is not None:
        return f"a 3D volume of shape {shape} (three length axes), not a stack of frames"
    if any("1/" in u or "^-1" in u for u in units[-2:]):
        return f"a diffraction pattern (reciprocal-space axes in {units[-1]}); stemd denoises real-space images"
    if min(shape[-2:]) < 2:
        return f"of shape {shape}, not an image"
    return None


def _signal_frames(data: Any, path: Path, title: str) -> Callable[[], Iterator[np.ndarray]]:
    def frames() -> Iterator[np.ndarray]:
        stack = data if data.ndim == 3 else data[None]
        for i in range(stack.shape[0]):
            try:
                frame = np.asarray(stack[i])
            except Exception as exc:  # the readers report bad data with many exception types
                raise InputError(f"cannot read frame {i + 1} of {path} ({title}): {_reason(exc)}") from None
            yield frame
    return frames


def _axes(axes: list[dict[str, Any]], shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """HyperSpy axis dicts for `shape`: the file's own where it gave them, the last two signal axes."""
    out = []
    for i, size in enumerate(shape):
        axis = dict(axes[i]) if i < len(axes) else {}
        axis.setdefault("name", ("frame", "y", "x")[i + 3 - len(shape)])
        axis.setdefault("scale", 1.0)
        axis.setdefault("offset", 0.0)
        axis.setdefault("units", "")
        axis["size"] = int(size)
        axis["navigate"] = i < len(shape) - 2
        axis.pop("index_in_array", None)
        out.append(axis)
    return out


def open_sources(path: Path) -> tuple[list[Source], list[str]]:
    """The images of an input file and, for each signal skipped, the reason; InputError if it cannot be read."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise InputError(f"input file {path} does not exist")
    if suffix in TIFF_SUFFIXES:
        return [tiff_source(path)], []
    if suffix not in READERS:
        raise InputError(f"{path}: no reader for {suffix or 'a file without a suffix'}; stemd denoise reads "
                         f"{', '.join(TIFF_SUFFIXES + tuple(READERS))}")
    if path.is_dir() and suffix != ".zspy":
        raise InputError(f"input {path} is a directory, not a {suffix} file")
    reader = _plugin(suffix, "reading", READERS[suffix]).file_reader
    try:
        signals = reader(str(path), lazy=True)
    except StemdError:
        raise
    except Exception as exc:  # each reader reports a bad file its own way
        raise InputError(f"cannot read {path} as {suffix}: {_reason(exc)}") from None
    sources, skipped, titles = [], [], set()
    for i, signal in enumerate(signals):
        data, metadata = signal["data"], dict(signal.get("metadata") or {})
        title = str(metadata.get("General", {}).get("title") or f"signal {i + 1}")
        axes = list(signal.get("axes") or [])
        why = _skip_reason(data, axes)
        if why is not None:
            skipped.append(f"{title}: {why}")
            continue
        while title in titles:
            title = f"{title}_{i + 1}"
        titles.add(title)
        shape = tuple(int(v) for v in data.shape)
        sources.append(Source(path=path, title=title, shape=shape, read=_signal_frames(data, path, title),
                              axes=_axes(axes, shape), metadata=metadata,
                              original_metadata=dict(signal.get("original_metadata") or {})))
    return sources, skipped


def tiff_source(path: Path) -> Source:
    """A TIFF read the streaming tifffile way, described for a HyperSpy output too."""
    image = read_tiff(path)
    pixel_nm = None
    try:
        metres = pixel_size_from_tags(image)
        pixel_nm = None if metres is None else metres * 1e9
    except InputError:
        pass  # non-square pixels: refused only when the sampling plan needs them (Source.pixel_size_m)
    axes = _axes([{"scale": pixel_nm, "units": "nm"}] * 2 if pixel_nm else [], image.shape[-2:])
    if image.ndim == 3:
        axes.insert(0, {"name": "frame", "scale": 1.0, "offset": 0.0, "units": "", "size": image.shape[0],
                        "navigate": True})
    tiff_meta = {k: v for k, v in (("imagej", image.imagej), ("tifffile", image.shaped),
                                   ("description", image.description), ("resolution", image.resolution),
                                   ("resolution_unit", image.resolution_unit)) if v is not None}
    metadata = {"General": {"title": path.stem, "original_filename": path.name}, "Signal": {"signal_type": ""}}
    return Source(path=path, title=path.stem, shape=image.shape, read=image.frames, axes=axes, metadata=metadata,
                  original_metadata={"TIFF": plain(tiff_meta)}, tiff=image, pixel_source="resolution tags")


def output_names(out: Path, sources: list[Source]) -> list[Path]:
    """OUT for a file with one image; OUT's stem + `_<title>` for each of several."""
    if len(sources) == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{re.sub(r'[^A-Za-z0-9._-]', '_', s.title)[:60]}{out.suffix}")
            for s in sources]


def plain(value: Any, array_max: int | None = _METADATA_ARRAY_MAX) -> Any:
    """`value` as JSON-able Python (dicts, lists, str, numbers, bool, None); dask arrays read; arrays above
    `array_max` elements as a short description (None: kept whole)."""
    if isinstance(value, dict):
        return {str(k): plain(v, array_max) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, array_max) for v in value]
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, np.generic):
        return plain(value.item(), array_max)
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        size = int(np.prod(value.shape))
        if array_max is not None and size > array_max:
            return f"<array of shape {tuple(value.shape)}, {value.dtype}>"
        return plain(np.asarray(value).tolist(), array_max)
    return str(value)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def tiff_carrier(source: Source, pixel_size_m: float | None) -> TiffImage:
    """An ImageJ TIFF description of a non-TIFF source: pixel size in nm (resolution + unit), the file's metadata
    and axes as JSON in Info (arrays of more than a few thousand values described, not copied)."""
    if source.tiff is not None:
        return source.tiff
    info = json.dumps({"source": source.path.name, "title": source.title, "axes": plain(source.axes),
                       "metadata": plain(source.metadata), "original_metadata": plain(source.original_metadata)})
    imagej: dict[str, Any] = {"Info": f"stemd: metadata of {source.path.name} ({source.title}): {info}"}
    resolution = None
    if pixel_size_m is not None:
        imagej["unit"] = "nm"
        per_nm = 1e-9 / pixel_size_m
        resolution = (per_nm, per_nm)
    return TiffImage(path=source.path, shape=source.shape, dtype=np.dtype(np.float32),
                     axes="TYX" if source.ndim == 3 else "YX", imagej=imagej, shaped=None, description=None,
                     resolution=resolution, resolution_unit=1 if resolution else None)


def _signal_dict(source: Source, data: Any, note: dict[str, Any]) -> dict[str, Any]:
    metadata = plain(source.metadata, None)
    metadata.setdefault("General", {})["title"] = source.title
    metadata.setdefault("Signal", {}).setdefault("signal_type", "")
    metadata["stemd"] = _drop_none(plain(note, None))
    return {"data": data, "axes": source.axes, "metadata": metadata,
            "original_metadata": plain(source.original_metadata, None), "learning_results": {},
            "attributes": {"_lazy": False}, "models": {}, "package_info": {"package": "", "package_version": ""},
            "tmp_parameters": {}}


def _experiment(root: Any) -> Any:
    """The one signal group under Experiments/ of a HyperSpy file (h5py or zarr)."""
    return next(iter(root["Experiments"].values()))


def write_signal_atomic(out: Path, source: Source, frames: Iterable[np.ndarray], note: dict[str, Any]) -> None:
    """Write float32 `frames` (one per frame of `source`) as a HyperSpy .hspy or .zspy with the source's axes and
    metadata (+ `note` under metadata.stemd): the file is laid out by RosettaSciIO's writer, then filled a frame
    at a time (memory: one frame), in a temporary beside OUT that replaces OUT only on success."""
    kind = output_kind(out)
    module = _plugin(out.suffix.lower(), "writing", kind)
    import dask.array as da  # rsciio's own dependencies, imported when needed: seconds a TIFF job need not pay

    shape, frame_shape = source.shape, source.shape[-2:]
    chunks = (1, *frame_shape) if len(shape) == 3 else frame_shape
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # zarr 2 on its own deprecation of the store rsciio uses
            placeholder = da.zeros(shape, dtype=np.float32, chunks=chunks)
            module.file_writer(str(tmp), _signal_dict(source, placeholder, note), chunks=chunks,
                               show_progressbar=False)
            if kind == "hspy":
                import h5py

                with h5py.File(tmp, "r+") as f:
                    _fill(_experiment(f)["data"], frames, shape)
            else:
                import zarr

                group = zarr.open_group(zarr.storage.NestedDirectoryStore(str(tmp)), mode="r+")
                _fill(_experiment(group)["data"], frames, shape)
        _replace(tmp, out)
    except StemdError:
        raise
    except OSError as exc:
        raise InputError(f"cannot write {out}: {exc.strerror or exc}") from None
    except Exception as exc:  # h5py/zarr/rsciio failing on metadata they cannot store
        raise InputError(f"cannot write {out}: {_reason(exc)}") from None
    finally:
        _remove(tmp)


def _fill(dataset: Any, frames: Iterable[np.ndarray], shape: tuple[int, ...]) -> None:
    if len(shape) == 2:
        dataset[...] = next(iter(frames))
        return
    n = 0
    for i, frame in enumerate(frames):
        dataset[i] = frame
        n += 1
    if n != shape[0]:
        raise InputError(f"{n} frames denoised for a stack of {shape[0]}")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _replace(tmp: Path, out: Path) -> None:
    """Move `tmp` onto `out`; a directory OUT (a .zspy) is moved aside first and removed after."""
    if out.is_dir():
        old = out.with_name(f".{out.name}.{secrets.token_hex(4)}.old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
