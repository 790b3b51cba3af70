"""Recording sink: raw and/or denoised frames appended to TIFF, one file per series and kind.

Every file operation runs on the recorder's own worker thread, never on the event loop. Each page carries
its frame header as JSON in the TIFF ImageDescription. A write error (a full disk, named as such;
permissions) is logged and counted, that series' recording of that kind stops, a file whose first page
never completed is removed, a longer one is cut back to its last complete page (every page it reports
written stays readable), and the daemon keeps running. A header that cannot be described as JSON loses
that one page (counted, logged). Any other failure on the worker thread is a bug: counted and logged with
its traceback too, never lost with an unread future (`errors` counts every failure). Open files are
bounded: at most `max_open` (the least recently written one is closed to open another), and the daemon
closes a series' files after `recording.idle_close_s` without a frame (a publisher that crashed never
sends the series' end); a later frame of it starts `<series>_<kind>-1.tif`. Another file format is a subclass
that sets `suffix` and overrides `_open_writer` and `_append` (`stemd.live.hspy_writer`: HyperSpy zspy/hspy).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import tifffile

log = logging.getLogger(__name__)

KINDS = ("raw", "denoised")


def file_stem(series_id: str) -> str:
    """A safe file-name stem for a series id from the wire."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", series_id)[:100].lstrip(".") or "series"


def describe(header: dict[str, Any]) -> str:
    """The header as JSON for a page's ImageDescription.

    A space before the colon of "shape" keeps it valid JSON but stops tifffile from reading
    the description as its own shaped metadata, which would split the file into 1-page series.
    """
    return json.dumps(header, default=str).replace('"shape":', '"shape" :')


@dataclass
class _Written:
    """An open recording's file and its complete part: pages, size, and where the last page's next-page pointer is."""

    path: Path
    pages: int = 0
    size: int = 0
    next_ifd: int = 0


async def _settled(fut: Future[None]) -> None:
    """Wait for a scheduled call; a failure was already counted and logged by `Recorder._check`."""
    try:
        await asyncio.wrap_future(fut)
    except Exception:
        pass


class Recorder:
    """Appends frames to `<directory>/<series>_<kind>.tif`; async methods schedule, never block."""

    suffix = ".tif"

    def __init__(
        self, directory: Path | str, *, raw: bool = True, denoised: bool = True, max_backlog: int = 64,
        max_open: int = 32,
    ) -> None:
        self.directory = Path(directory)
        self.kinds = {k for k, on in zip(KINDS, (raw, denoised)) if on}
        self.max_backlog, self.max_open = max_backlog, max_open
        self.errors = 0
        self.pages = 0
        self.files: list[Path] = []
        # least recently written first; each with the monotonic time of its last page
        self._writers: collections.OrderedDict[tuple[str, str], tuple[Any, Any]] = collections.OrderedDict()
        self._written: dict[tuple[str, str], float] = {}
        self._paths: dict[tuple[str, str], _Written] = {}  # each open file's path and what it holds complete
        self._failed: set[tuple[str, str]] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemd-recorder")
        self._inflight: collections.deque[Future[None]] = collections.deque()

    async def write(self, kind: str, header: dict[str, Any], data: np.ndarray) -> None:
        """Queue one page; waits only when more than `max_backlog` writes are pending."""
        if kind not in self.kinds:
            return
        self._schedule(self._write, kind, header, data)
        while len(self._inflight) > self.max_backlog:
            await _settled(self._inflight[0])
            self._prune()

    async def end_series(self, series_id: str) -> None:
        """Close this series' files (on a series end event)."""
        await _settled(self._schedule(self._close_series, series_id))

    async def close_idle(self, idle_s: float) -> None:
        """Close the files no frame was written to for `idle_s` seconds (series whose end never came)."""
        await _settled(self._schedule(self._close_idle, idle_s))

    async def close(self) -> None:
        """Close every open file after the pending writes, then stop the worker."""
        await _settled(self._schedule(self._close_all))
        self._executor.shutdown(wait=True)

    def _schedule(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        fut = self._executor.submit(fn, *args)
        fut.add_done_callback(self._check)
        self._inflight.append(fut)
        self._prune()
        return fut

    def _check(self, fut: Future[None]) -> None:
        """Every scheduled call's outcome is read: what escaped it is counted and logged, never dropped."""
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            self.errors += 1
            log.error("recorder task failed: %s", exc, exc_info=exc)

    def _prune(self) -> None:
        while self._inflight and self._inflight[0].done():
            self._inflight.popleft()

    def _open_file(self, path: Path) -> IO[bytes]:
        return open(path, "xb")

    def _open_writer(self, path: Path, kind: str) -> tuple[Any, Any]:
        """(writer, file) for a new recording of `kind`; `_close` closes both."""
        fh = self._open_file(path)
        return tifffile.TiffWriter(fh, bigtiff=True), fh

    def _append(self, writer: Any, fh: Any, header: dict[str, Any], data: np.ndarray, description: str) -> None:
        """One frame onto an open recording, on disk when this returns."""
        writer.write(data, description=description, metadata=None)
        fh.flush()

    def _completed(self, key: tuple[str, str], writer: Any) -> None:
        """The page just written to `key`'s file is complete: what `_keep_complete_pages` keeps after a failure."""
        done = self._paths[key]
        done.pages, done.size, done.next_ifd = done.pages + 1, done.path.stat().st_size, writer._ifdoffset

    def _path(self, series_id: str, kind: str) -> Path:
        stem = f"{file_stem(series_id)}_{kind}"
        path, n = self.directory / f"{stem}{self.suffix}", 1
        while path.exists():
            path, n = self.directory / f"{stem}-{n}{self.suffix}", n + 1
        return path

    def _write(self, kind: str, header: dict[str, Any], data: np.ndarray) -> None:
        key = (str(header.get("series_id", "")), kind)
        if key in self._failed:
            return
        try:
            description = describe(header)
        except (TypeError, ValueError, RecursionError) as exc:  # keys that are not str, too deep, circular
            self.errors += 1
            log.error("frame %r of %s series %r not recorded: its header is not JSON: %s",
                      header.get("frame_id"), kind, key[0], exc)
            return
        path = None
        try:
            if key not in self._writers:
                while len(self._writers) >= self.max_open:  # bounded file descriptors, whatever the input
                    self._close(next(iter(self._writers)))
                self.directory.mkdir(parents=True, exist_ok=True)
                path = self._path(*key)
                self._paths[key] = _Written(path)
                self._writers[key] = self._open_writer(path, kind)
                self.files.append(path)
                log.info("recording %s frames of series %r to %s", kind, key[0], path)
            writer, fh = self._writers[key]
            self._append(writer, fh, header, data, description)
            self.pages += 1
            self._completed(key, writer)
            self._writers.move_to_end(key)
            self._written[key] = time.monotonic()
        except Exception as exc:  # OSError: full disk, permissions; anything else is a bug, so its traceback
            self.errors += 1
            self._failed.add(key)
            log.error("recording of %s series %r stopped: %s", kind, key[0], self._cause(exc),
                      exc_info=not isinstance(exc, OSError))
            self._close(key, after_error=True)
            self._keep_complete_pages(key)

    def _cause(self, exc: Exception) -> str:
        """The error in words, naming a full disk (tifffile reports a short write as "N requested and M written")."""
        try:
            full = getattr(exc, "errno", None) == errno.ENOSPC or shutil.disk_usage(self.directory).free < 2**20
        except OSError:
            full = False
        return f"no space left on the device of {self.directory} ({exc})" if full else str(exc)

    def _keep_complete_pages(self, key: tuple[str, str]) -> None:
        """After a failed write: a file whose first page never completed is not a TIFF, so it is removed; a longer
        one is cut back to its last complete page, whose next-page pointer (already aimed at the failed page) is
        zeroed, so every page counted in `pages` reads back intact. Both shrink the file: no space is needed."""
        done = self._paths.pop(key, None)
        if done is None:
            return
        if done.pages == 0:
            done.path.unlink(missing_ok=True)
            if done.path in self.files:
                self.files.remove(done.path)
            return
        try:
            with open(done.path, "r+b") as fh:
                fh.truncate(done.size)
                fh.seek(done.next_ifd)
                fh.write(bytes(8))  # BigTIFF offsets are 8 bytes; 0 ends the chain of pages
        except OSError as exc:
            log.error("cutting %s back to its %d complete page(s) failed: %s", done.path, done.pages, exc)

    def _close_idle(self, idle_s: float) -> None:
        now = time.monotonic()
        for key in [k for k in self._writers if now - self._written.get(k, now) >= idle_s]:
            log.info("recording of %s series %r closed after %.0f s without a frame", key[1], key[0], idle_s)
            self._close(key)

    def _close(self, key: tuple[str, str], after_error: bool = False) -> None:
        self._written.pop(key, None)
        if not after_error:
            self._paths.pop(key, None)
        entry = self._writers.pop(key, None)
        if entry is None:
            return
        failure = None
        for close in entry[0].close, entry[1].close:
            try:
                close()
            except Exception as exc:  # OSError, or tifffile failing on a half-written file
                failure = failure or exc
        if failure is not None and not after_error:
            self.errors += 1
            log.error("closing recording of %s series %r failed: %s", key[1], key[0], failure)

    def _close_series(self, series_id: str) -> None:
        for kind in KINDS:
            self._close((series_id, kind))
            self._failed.discard((series_id, kind))

    def _close_all(self) -> None:
        for key in list(self._writers):
            self._close(key, after_error=True)
