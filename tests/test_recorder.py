"""The TIFF recording sink: pages with headers, one file per series and kind, errors survived."""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path

import numpy as np
import tifffile

from stemd.live.recorder import Recorder, file_stem


def _frames(n: int, dtype=np.uint16) -> list[np.ndarray]:
    return [np.full((30, 40), i, dtype) for i in range(n)]


async def test_pages_and_headers_per_series_and_kind(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "rec", raw=True, denoised=True)
    for i, f in enumerate(_frames(3)):
        await rec.write("raw", {"series_id": "a/b", "frame_id": i, "shape": [30, 40], "blob": b"\x00"}, f)
        await rec.write("denoised", {"series_id": "a/b", "frame_id": i}, f.astype(np.float32) + 0.5)
    await rec.end_series("a/b")
    await rec.write("raw", {"series_id": "a/b", "frame_id": 0}, _frames(1)[0])  # same id again: new file
    await rec.close()
    names = sorted(p.name for p in rec.files)
    assert names == ["a_b_denoised.tif", "a_b_raw-1.tif", "a_b_raw.tif"]
    with tifffile.TiffFile(tmp_path / "rec" / "a_b_raw.tif") as tf:
        stack = tf.asarray()
        ids = [json.loads(p.description)["frame_id"] for p in tf.pages]
        assert json.loads(tf.pages[0].description)["shape"] == [30, 40]
    np.testing.assert_array_equal(stack, np.stack(_frames(3)))
    assert ids == [0, 1, 2]
    with tifffile.TiffFile(tmp_path / "rec" / "a_b_denoised.tif") as tf:
        assert tf.asarray().dtype == np.float32 and len(tf.pages) == 3
    assert rec.errors == 0 and rec.pages == 7


async def test_only_configured_kinds_recorded(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, raw=False, denoised=True)
    await rec.write("raw", {"series_id": "s"}, _frames(1)[0])
    await rec.close()
    assert rec.files == [] and list(tmp_path.iterdir()) == []


class FullDisk(Recorder):
    def _open_file(self, path: Path):
        return open("/dev/full", "wb")


async def test_full_disk_counted_and_recording_stopped(tmp_path: Path) -> None:
    rec = FullDisk(tmp_path)
    big = np.zeros((600, 600), np.uint16)
    for i in range(5):
        await rec.write("raw", {"series_id": "s", "frame_id": i}, big)
    await rec.close()
    assert rec.errors == 1 and rec.pages == 0


async def test_unwritable_directory_counted(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    rec = Recorder(tmp_path / "file" / "rec")
    await rec.write("raw", {"series_id": "s"}, _frames(1)[0])
    await rec.write("denoised", {"series_id": "s"}, _frames(1)[0])
    await rec.close()
    assert rec.errors == 2


def test_file_stem_is_safe() -> None:
    assert file_stem("../../etc/passwd") == "_.._etc_passwd"
    assert file_stem("") == "series"
    assert "/" not in file_stem("a/b\0c")


def _deep(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


async def test_unrecordable_headers_are_counted_and_logged_not_lost(tmp_path: Path, caplog) -> None:
    """A header JSON cannot take (a bytes key, a nested one, 1,000-deep nesting) loses only its own page,
    and is counted in `errors` and logged: before, a TypeError died in the worker thread, uncounted."""
    rec = Recorder(tmp_path, raw=True, denoised=False)
    bad = [{b"k": 1}, {"x": [{b"k": 2}]}, {"deep": _deep(1000)}]
    for i, f in enumerate(_frames(14)):
        extra = bad[i // 4] if i % 4 == 3 and i // 4 < len(bad) else {}
        await rec.write("raw", {"series_id": "s", "frame_id": i, **extra}, f)
    await rec.close()
    assert rec.errors == 3 and rec.pages == 11
    with tifffile.TiffFile(tmp_path / "s_raw.tif") as tf:
        ids = [json.loads(pg.description)["frame_id"] for pg in tf.pages]
    assert ids == [i for i in range(14) if i not in (3, 7, 11)]
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(said) == 3 and all("not recorded" in m for m in said)


class BrokenWriter(Recorder):
    """A bug, not an OSError, in the worker thread: writing fails with a RuntimeError, closing with a KeyError."""

    def _open_file(self, path: Path):
        raise RuntimeError("a bug in the writer")

    def _close_series(self, series_id: str) -> None:
        raise KeyError(series_id)


async def test_worker_bugs_are_counted_and_logged_with_traceback(tmp_path: Path, caplog) -> None:
    rec = BrokenWriter(tmp_path)
    await rec.write("raw", {"series_id": "s", "frame_id": 0}, _frames(1)[0])
    await rec.write("raw", {"series_id": "s", "frame_id": 1}, _frames(1)[0])  # recording of s stopped: not counted
    await rec.end_series("s")  # the future's exception is read, counted and logged; the caller goes on
    await rec.close()
    assert rec.errors == 2 and rec.pages == 0
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and all(r.exc_info for r in errors)
    assert "a bug in the writer" in errors[0].getMessage() and "recorder task failed" in errors[1].getMessage()


def _open_fds(directory: Path) -> int:
    """File descriptors of this process open on files in `directory`."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if str(fd.resolve()).startswith(str(directory)))


async def test_open_files_are_bounded_and_every_page_kept(tmp_path: Path) -> None:
    """Series that never end (a crashed publisher) cannot exhaust file descriptors: at most max_open files are
    open; closing the least recently written one loses no page."""
    rec = Recorder(tmp_path / "rec", raw=True, denoised=False, max_open=2)
    for i in range(6):
        await rec.write("raw", {"series_id": f"s{i}", "frame_id": 0}, _frames(1)[0])
        await rec.write("raw", {"series_id": f"s{i}", "frame_id": 1}, _frames(2)[1])
        assert _open_fds(tmp_path / "rec") <= 2
    await rec.close()
    assert _open_fds(tmp_path / "rec") == 0 and rec.errors == 0
    for i in range(6):
        assert tifffile.imread(tmp_path / "rec" / f"s{i}_raw.tif").shape == (2, 30, 40)


async def test_idle_series_files_are_closed_and_a_later_frame_opens_a_new_file(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "rec", raw=True, denoised=False)
    await rec.write("raw", {"series_id": "crashed", "frame_id": 0}, _frames(1)[0])
    await rec.close_idle(3600.0)
    assert _open_fds(tmp_path / "rec") == 1  # recent: kept open
    await rec.close_idle(0.0)
    assert _open_fds(tmp_path / "rec") == 0
    await rec.write("raw", {"series_id": "crashed", "frame_id": 1}, _frames(2)[1])
    await rec.close()
    assert sorted(p.name for p in rec.files) == ["crashed_raw-1.tif", "crashed_raw.tif"]
    assert tifffile.imread(tmp_path / "rec" / "crashed_raw.tif").shape == (30, 40)


class _Budget:
    """A real file on disk that runs out of space after `budget` bytes, as a full disk does (ENOSPC)."""

    def __init__(self, path: Path, budget: int) -> None:
        self._fh, self._left = open(path, "xb"), budget

    def write(self, data) -> int:
        if len(data) > self._left:  # what fits is written, as a short write to a full disk does
            self._fh.write(bytes(memoryview(data).cast("B")[: self._left]))
            self._left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left -= len(data)
        return self._fh.write(data)

    def fileno(self) -> int:  # no descriptor: numpy's tofile would write past the budget
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._fh, name)


class SmallDisk(Recorder):
    budget = 100

    def _open_file(self, path: Path):
        return _Budget(path, self.budget)


async def test_a_full_disk_is_named_and_leaves_no_empty_file(tmp_path: Path, caplog) -> None:
    rec = SmallDisk(tmp_path / "rec", denoised=False)
    await rec.write("raw", {"series_id": "s", "frame_id": 0}, np.zeros((300, 300), np.uint16))
    await rec.close()
    assert rec.errors == 1 and rec.pages == 0 and rec.files == []
    assert list((tmp_path / "rec").iterdir()) == []  # the file whose first page never completed is gone
    assert any("no space left" in r.getMessage() for r in caplog.records)


async def test_a_disk_full_mid_file_keeps_every_complete_page_readable(tmp_path: Path, caplog) -> None:
    """The disk fills while a page is half written: the file is cut back to its complete pages, each reads back
    intact with its header (before, the previous page pointed at the torn one and reading it failed)."""
    for budget in (50_000, 81_234, 120_001):  # the disk fills in different places of a page
        SmallDisk.budget = budget
        rec = SmallDisk(tmp_path / str(budget), denoised=False)
        frames = [np.full((100, 120), 7 * i + 1, np.uint16) for i in range(8)]  # 24 KB each
        for i, f in enumerate(frames):
            await rec.write("raw", {"series_id": "s", "frame_id": i}, f)
        await rec.close()
        assert rec.errors == 1 and 1 <= rec.pages < len(frames)
        with tifffile.TiffFile(tmp_path / str(budget) / "s_raw.tif") as tf:
            assert len(tf.pages) == rec.pages
            for i, page in enumerate(tf.pages):
                np.testing.assert_array_equal(page.asarray(), frames[i])
                assert json.loads(page.description)["frame_id"] == i
        assert tifffile.imread(tmp_path / str(budget) / "s_raw.tif").shape == (rec.pages, 100, 120)
        assert any("no space left" in r.getMessage() for r in caplog.records)
