"""HyperSpy recordings (recording.format zspy/hspy): appended frame by frame, read back with RosettaSciIO."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TestPublisher
from rsciio.hspy import file_reader as hspy_reader
from rsciio.zspy import file_reader as zspy_reader

from stemd.config import load_settings
from stemd.live import protocol as p
from stemd.live.daemon import Daemon
from stemd.live.hspy_writer import HyperSpyRecorder
from stemd.live.notify import Notifier
from stemd.sim.lattice import simulate_frame

pytestmark = pytest.mark.filterwarnings("ignore:The NestedDirectoryStore is deprecated:FutureWarning")
READERS = {"zspy": zspy_reader, "hspy": hspy_reader}
PIXEL_M = 3.905e-11


def read(path: Path) -> dict:
    [signal] = READERS[path.suffix[1:]](str(path))
    signal["data"] = np.asarray(signal["data"])
    return signal


def frames(n: int, dtype=np.uint16, shape=(30, 40)) -> list[np.ndarray]:
    return [(np.arange(np.prod(shape)).reshape(shape) % 97 + 7 * i).astype(dtype) for i in range(n)]


def header(series: str, fid: int, **extra) -> dict:
    return {"series_id": series, "frame_id": fid, "pixel_size_m": PIXEL_M, "detector": "HAADF", "shape": [30, 40],
            "blob": b"\x00\x01", **extra}


@pytest.mark.parametrize("fmt", ["zspy", "hspy"])
async def test_frames_ids_pixel_size_and_header_per_series_and_kind(tmp_path, fmt) -> None:
    rec = HyperSpyRecorder(tmp_path / "rec", fmt=fmt)
    raw = frames(4)
    for i, f in enumerate(raw):
        await rec.write("raw", header("a/b", 10 + i), f)
        await rec.write("denoised", header("a/b", 10 + i), f.astype(np.float32) + 0.5)
    await rec.end_series("a/b")
    await rec.write("raw", header("a/b", 0), raw[0])  # the same series again: a new file
    await rec.close()
    assert sorted(p.name for p in rec.files) == [f"a_b_denoised.{fmt}", f"a_b_raw-1.{fmt}", f"a_b_raw.{fmt}"]
    assert rec.errors == 0 and rec.pages == 9

    back = read(tmp_path / "rec" / f"a_b_raw.{fmt}")
    np.testing.assert_array_equal(back["data"], np.stack(raw))
    assert back["data"].dtype == np.uint16
    assert [(a["name"], int(a["size"]), a["navigate"]) for a in back["axes"]] == [
        ("frame", 4, True), ("y", 30, False), ("x", 40, False)]
    assert back["axes"][1]["units"] == "nm" and float(back["axes"][2]["scale"]) == pytest.approx(PIXEL_M * 1e9)
    stemd = back["original_metadata"]["stemd"]
    assert list(np.asarray(stemd["frame_ids"])) == [10, 11, 12, 13]
    assert stemd["header"]["series_id"] == "a/b" and stemd["header"]["detector"] == "HAADF"
    assert back["metadata"]["General"]["title"] == "a/b raw"
    assert back["metadata"]["Acquisition_instrument"]["TEM"]["Detector"]["name"] == "HAADF"

    den = read(tmp_path / "rec" / f"a_b_denoised.{fmt}")
    assert den["data"].dtype == np.float32 and den["data"].shape == (4, 30, 40)
    np.testing.assert_allclose(den["data"], np.stack(raw) + 0.5)
    assert read(tmp_path / "rec" / f"a_b_raw-1.{fmt}")["data"].shape == (1, 30, 40)


@pytest.mark.parametrize("fmt", ["zspy", "hspy"])
async def test_a_frame_that_does_not_fit_stops_the_series_and_keeps_what_was_written(tmp_path, fmt) -> None:
    rec = HyperSpyRecorder(tmp_path, fmt=fmt, denoised=False)
    for i, f in enumerate(frames(2)):
        await rec.write("raw", header("s", i), f)
    await rec.write("raw", header("s", 2), frames(1, shape=(20, 40))[0])
    await rec.write("raw", header("s", 3), frames(1)[0])  # the series' recording has stopped
    await rec.write("raw", header("t", 0), frames(1)[0])  # other series go on
    await rec.close()
    assert rec.errors == 1 and rec.pages == 3
    assert read(tmp_path / f"s_raw.{fmt}")["data"].shape == (2, 30, 40)
    assert read(tmp_path / f"t_raw.{fmt}")["data"].shape == (1, 30, 40)


@pytest.mark.parametrize("fmt", ["zspy", "hspy"])
async def test_memory_holds_one_frame_whatever_the_series_length(tmp_path, fmt) -> None:
    """The writer appends: the file grows on disk, the process does not keep the frames (a backlog of 2 pending
    writes, so that the recorder's queue does not hold them either)."""
    import tracemalloc

    rec = HyperSpyRecorder(tmp_path, fmt=fmt, denoised=False, max_backlog=2)
    frame = np.random.default_rng(0).random((256, 256)).astype(np.float32)  # 256 KiB
    await rec.write("raw", header("long", 0), frame)
    await rec.end_series("nothing")
    tracemalloc.start()
    for i in range(1, 60):  # 15 MiB of frames
        await rec.write("raw", header("long", i), frame + i)
    await rec.close()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 2**20 and read(tmp_path / f"long_raw.{fmt}")["data"].shape == (60, 256, 256)


@pytest.mark.parametrize("fmt", ["zspy", "hspy"])
def test_a_killed_recorder_leaves_every_frame_it_finished(tmp_path, fmt) -> None:
    """SIGKILL after three frames, the file never closed: all three frames and their ids read back."""
    path = tmp_path / f"s_raw.{fmt}"
    code = ("import os, signal, pathlib, numpy as np; from stemd.live.hspy_writer import SeriesFile\n"
            f"f = SeriesFile(pathlib.Path({str(path)!r}), {fmt!r}, 'raw')\n"
            "for i in range(3):\n"
            "    f.append({'series_id': 's', 'frame_id': 5 + i}, np.full((30, 40), i, np.uint16))\n"
            "os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    back = read(path)
    np.testing.assert_array_equal(back["data"], np.stack([np.full((30, 40), i, np.uint16) for i in range(3)]))
    assert list(np.asarray(back["original_metadata"]["stemd"]["frame_ids"])) == [5, 6, 7]


def test_format_without_the_extra_is_a_config_error() -> None:
    code = ("import sys; sys.modules['rsciio'] = None; from stemd.config import load_settings\n"
            "try:\n    load_settings(None, {'recording.format': 'zspy'})\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.startswith("ConfigError") and "recording.format" in out and "pip install 'stemd[formats]'" in out


async def test_daemon_records_zspy_over_loopback(zctx, checkpoint, tmp_path) -> None:
    """Simulated frames over real ZeroMQ sockets into the daemon, recorded as zspy, read back with rsciio."""
    shape, rng = (64, 72), np.random.default_rng(2)
    raw = [rng.poisson(simulate_frame(shape, rng, rotation_deg=4.0 * i).clean * 20).astype(np.uint16)
           for i in range(3)]
    pub = TestPublisher(zctx)
    settings = load_settings(None, {
        "model.path": str(checkpoint), "model.device": "cpu", "input.endpoint": pub.endpoint,
        "output.endpoint": "tcp://127.0.0.1:*", "stats.interval_s": 0.2, "recording.enabled": True,
        "recording.directory": str(tmp_path), "recording.format": "zspy"})
    d = Daemon(settings, notifier=Notifier(""))
    await d.start()
    try:
        await pub.wait_subscribed()
        for i, frame in enumerate(raw):
            head = p.frame_header("run 7", i, shape, "uint16", pixel_size_m=PIXEL_M, detector="HAADF")
            await pub.send(p.encode_frame(p.FRAME, head, frame))
        deadline = time.monotonic() + 60
        while d.recorder is None or d.recorder.pages < 6:
            assert time.monotonic() < deadline, "frames not recorded"
            await asyncio.sleep(0.05)
    finally:
        await d.stop()
        pub.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_7_denoised.zspy", "run_7_raw.zspy"]
    rec_raw, rec_den = read(tmp_path / "run_7_raw.zspy"), read(tmp_path / "run_7_denoised.zspy")
    np.testing.assert_array_equal(rec_raw["data"], np.stack(raw))
    assert rec_den["data"].shape == (3, *shape) and rec_den["data"].dtype == np.float32
    assert np.isfinite(rec_den["data"]).all() and not np.allclose(rec_den["data"], rec_raw["data"])
    for rec in (rec_raw, rec_den):
        assert float(rec["axes"][-1]["scale"]) == pytest.approx(PIXEL_M * 1e9) and rec["axes"][-1]["units"] == "nm"
        assert list(np.asarray(rec["original_metadata"]["stemd"]["frame_ids"])) == [0, 1, 2]
        assert rec["original_metadata"]["stemd"]["header"]["series_id"] == "run 7"
