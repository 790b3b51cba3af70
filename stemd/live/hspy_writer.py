"""HyperSpy recordings (`recording.format: zspy | hspy`, the formats extra): one file per series and kind that
HyperSpy and RosettaSciIO open as an (N, H, W) signal, the pixel size as the image axes' scale (nm), the first
frame's header in original_metadata.stemd.header and every frame's id in original_metadata.stemd.frame_ids.

Each file is laid out by RosettaSciIO's own writer from its first frame, then appended to a frame at a time, so
memory holds one frame whatever the series' length. zspy (Zarr, a directory): each frame is its own chunk file
and the array's size a small JSON rewrite, so a crash loses at most the frame being written (killed between a
frame's data and the frame axis' size, the data are one frame longer than the axis says; HyperSpy still opens it);
the safer choice.
hspy (HDF5): appended through h5py into resizable datasets and flushed after every frame; a crash in the middle of
a write can leave the HDF5 file itself inconsistent, which no append-only layout avoids.
"""

from __future__ import annotations

import importlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from stemd.errors import ConfigError
from stemd.live.recorder import Recorder

FORMATS = ("zspy", "hspy")
EXTRA_HINT = "pip install 'stemd[formats]'"


def _plain(header: dict[str, Any]) -> dict[str, Any]:
    """The header as JSON-able values (bytes and other objects as text), for HDF5/Zarr attributes."""
    value: dict[str, Any] = json.loads(json.dumps(header, default=str))
    return value


def _signal(header: dict[str, Any], kind: str, data: np.ndarray) -> dict[str, Any]:
    """The HyperSpy signal dict of a one-frame recording: axes (frame, y, x), metadata and the stream's header."""
    pixel = header.get("pixel_size_m")
    scale, units = (float(pixel) * 1e9, "nm") if isinstance(pixel, (int, float)) and pixel > 0 else (1.0, "")
    h, w = data.shape
    axes = [{"name": "frame", "scale": 1.0, "offset": 0.0, "units": "", "size": 1, "navigate": True},
            {"name": "y", "scale": scale, "offset": 0.0, "units": units, "size": h, "navigate": False},
            {"name": "x", "scale": scale, "offset": 0.0, "units": units, "size": w, "navigate": False}]
    series = str(header.get("series_id", ""))
    metadata: dict[str, Any] = {"General": {"title": f"{series} {kind}".strip()}, "Signal": {"signal_type": ""},
                "stemd": {"series_id": series, "kind": kind}}
    if header.get("detector"):
        metadata["Acquisition_instrument"] = {"TEM": {"Detector": {"name": str(header["detector"])}}}
    original = {"stemd": {"header": _plain(header), "frame_ids": np.array([_frame_id(header)], np.int64)}}
    return {"data": data[None], "axes": axes, "metadata": metadata, "original_metadata": original,
            "learning_results": {}, "attributes": {"_lazy": False}, "models": {},
            "package_info": {"package": "", "package_version": ""}, "tmp_parameters": {}}


def _frame_id(header: dict[str, Any]) -> int:
    fid = header.get("frame_id")
    return fid if isinstance(fid, int) and not isinstance(fid, bool) else -1


class SeriesFile:
    """One HyperSpy file of one series and kind, created on its first frame and appended to after."""

    def __init__(self, path: Path, fmt: str, kind: str) -> None:
        self.path, self.fmt, self.kind = path, fmt, kind
        self._root: Any = None
        self._data: Any = None
        self._ids: Any = None
        self._axis: Any = None
        self.frames = 0

    def append(self, header: dict[str, Any], data: np.ndarray) -> None:
        """Add one frame (and its id); on disk when this returns."""
        if self._data is None:
            self._create(header, data)
            return
        if data.shape != self._data.shape[1:] or data.dtype != self._data.dtype:
            raise OSError(f"frame {_frame_id(header)} of shape {data.shape} {data.dtype} does not fit {self.path} "
                          f"({self._data.shape[1:]} {self._data.dtype}); this series' recording stops")
        n = self.frames
        if self.fmt == "zspy":
            self._data.append(data[None])
            self._ids.append(np.array([_frame_id(header)], np.int64))
        else:
            self._data.resize(n + 1, axis=0)
            self._data[n] = data
            self._ids.resize(n + 1, axis=0)
            self._ids[n] = _frame_id(header)
        self._axis.attrs["size"] = n + 1
        if self.fmt == "hspy":
            self._root.flush()
        self.frames = n + 1

    def _create(self, header: dict[str, Any], data: np.ndarray) -> None:
        """rsciio's writer lays out the file with the first frame; the datasets that grow are made resizable."""
        h, w = data.shape
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # zarr 2 on the store rsciio uses
                writer = importlib.import_module(f"rsciio.{self.fmt}").file_writer
                writer(str(self.path), _signal(header, self.kind, data), chunks=(1, h, w), show_progressbar=False,
                       **({"compression": None} if self.fmt == "hspy" else {}))
                if self.fmt == "zspy":
                    zarr = importlib.import_module("zarr")
                    self._root = zarr.open_group(zarr.storage.NestedDirectoryStore(str(self.path)), mode="r+")
                    group = next(iter(self._root["Experiments"].values()))
                    self._data = group["data"]
                    self._ids = group["original_metadata"]["stemd"]["frame_ids"]
                else:
                    h5py = importlib.import_module("h5py")
                    self._root = h5py.File(self.path, "r+")
                    group = next(iter(self._root["Experiments"].values()))
                    for parent, name, chunks in ((group, "data", (1, h, w)),
                                                 (group["original_metadata"]["stemd"], "frame_ids", (1024,))):
                        values = parent[name][()]
                        del parent[name]
                        parent.create_dataset(name, data=values, maxshape=(None, *values.shape[1:]), chunks=chunks)
                    self._root.flush()
                    self._data = group["data"]
                    self._ids = group["original_metadata"]["stemd"]["frame_ids"]
                self._axis = group["axis-0"]
                self.frames = 1
        except BaseException:
            self.close()
            if self.path.is_dir():
                shutil.rmtree(self.path, ignore_errors=True)
            else:
                self.path.unlink(missing_ok=True)
            raise

    def close(self) -> None:
        """Close the file (HDF5); a Zarr store needs no closing. Safe to call twice."""
        root, self._root = self._root, None
        if root is not None and self.fmt == "hspy":
            root.close()


class HyperSpyRecorder(Recorder):
    """The recorder writing `<series>_<kind>.zspy` (or `.hspy`) instead of TIFF; the same bounds and error handling."""

    def __init__(self, directory: Path | str, *, fmt: str = "zspy", **kwargs: Any) -> None:
        if fmt not in FORMATS:
            raise ConfigError(f"recording.format: {fmt!r} is not one of {', '.join(FORMATS)}")
        try:
            importlib.import_module(f"rsciio.{fmt}")
        except ImportError:
            raise ConfigError(f"recording.format: {fmt} needs the formats extra: {EXTRA_HINT}") from None
        super().__init__(directory, **kwargs)
        self.fmt, self.suffix = fmt, f".{fmt}"

    def _open_writer(self, path: Path, kind: str) -> tuple[Any, Any]:
        series = SeriesFile(path, self.fmt, kind)
        return series, series

    def _append(self, writer: Any, fh: Any, header: dict[str, Any], data: np.ndarray, description: str) -> None:
        writer.append(header, data)

    def _completed(self, key: tuple[str, str], writer: Any) -> None:
        self._paths[key].pages += 1

    def _keep_complete_pages(self, key: tuple[str, str]) -> None:
        """Nothing to cut back: `SeriesFile` keeps every frame it finished (see its docstring)."""
        self._paths.pop(key, None)
