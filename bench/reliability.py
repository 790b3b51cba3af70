"""Reliability of the real daemon under faults and hostile input: issue 15's scenarios replayed with figures.

    python -m bench.reliability                  # every scenario, a few minutes
    python -m bench.reliability --quick --no-write
    python -m bench.reliability --only fuzz,oversize --model stemd/models/paper_ae.pt

Each scenario runs its own `stemd run` process, fed over loopback by an XPUB publisher in this process (with
XPUB_NODROP where the scenario is lossless) and watched by a subscriber on its output. Per scenario: messages
sent, valid frames published / expected, frames lost uncounted (frame messages sent minus those published,
dropped, rejected or counted as missing upstream, from the daemon's own counters: must be 0), the daemon's RSS
before / after / peak (VmHWM), its open file descriptors before / after, and its log lines. A second table
measures the memory a frame costs the model per pixel, the figure behind the default queue.max_batch_pixels.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import tifffile
import zmq
import zmq.asyncio

from bench._report import BENCHMARKS, machine_line, publish
from stemd.live import protocol as p
from stemd.live.engine import PIXEL_COST_BYTES
from stemd.sim.lattice import simulate_frame

PIXEL_M = 3.905e-11  # SrTiO3's a over the simulated frames' 10 px period
MIB = 2**20


def lattice_frame(side: int, seed: int = 0, dose: float = 20.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.poisson(simulate_frame((side, side), rng).clean * dose).astype(np.uint16)


def frame_msg(series: str, fid: int, data: np.ndarray, **extra: Any) -> list:
    header = p.frame_header(series, fid, data.shape, data.dtype.name, pixel_size_m=PIXEL_M, **extra)
    return p.encode_frame(p.FRAME, header, data)


@dataclass
class Row:
    scenario: str
    sent: int = 0  # messages sent
    published: int = 0  # valid frames published
    expected: int = 0  # valid frames sent
    lost: int = 0  # frames lost uncounted
    rss: tuple[float, float, float] = (0.0, 0.0, 0.0)  # MiB before, after, peak
    fds: tuple[int, int] = (0, 0)
    log_lines: int = 0
    note: str = ""


@dataclass
class Daemon:
    """One `stemd run` process, its publisher (XPUB, bound here; the daemon connects) and a subscriber."""

    workdir: Path
    settings: dict[str, Any]
    model: Path | None
    ctx: zmq.asyncio.Context = field(default_factory=zmq.asyncio.Context)
    stats: dict[str, Any] = field(default_factory=dict)
    denoised: list[dict[str, Any]] = field(default_factory=list)
    nonfinite: int = 0
    events: int = 0

    async def start(self, nodrop: bool = True, hwm: int = 1000) -> None:
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.SNDHWM, hwm)
        self.pub.setsockopt(zmq.XPUB_NODROP, int(nodrop))
        self.pub.linger = 2000
        self.pub.bind("tcp://127.0.0.1:*")
        cfg: dict[str, Any] = {"model": {"device": "cpu"}, "output": {"endpoint": "tcp://127.0.0.1:*"},
                               "input": {"endpoint": self.pub.getsockopt_string(zmq.LAST_ENDPOINT)},
                               "stats": {"interval_s": 0.2}}
        if self.model is not None:
            cfg["model"]["path"] = str(self.model)
        for key, value in self.settings.items():
            section, name = key.split(".")
            cfg.setdefault(section, {})[name] = value
        self.config = self.workdir / "stemd.yaml"
        self.config.write_text(json.dumps(cfg))
        self.log = self.workdir / "daemon.log"
        notify = self.workdir / "notify"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.listener.bind(str(notify))
        self.listener.setblocking(False)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "stemd.apps.cli", "run", "--config", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "NOTIFY_SOCKET": str(notify)})
        loop = asyncio.get_running_loop()
        msg = await asyncio.wait_for(loop.sock_recv(self.listener, 4096), 120)
        assert msg.startswith(b"READY=1"), msg
        self._systemd = asyncio.create_task(self._read_notify(loop))
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        for topic in (p.DENOISED, p.SERIES, p.STATS):
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.connect(msg.decode().split("output ")[1].split(",")[0])
        self._reader = asyncio.create_task(self._read())
        await self.until(lambda st: True)
        while (await self.pub.recv())[1:] != p.FRAME:  # the daemon's subscription: nothing sent is lost to joining
            pass
        await self.send(frame_msg("warm-up", 0, lattice_frame(128)))  # the baseline is a daemon that has worked
        await self.until(lambda st: st["frames_out"] >= 1)
        await asyncio.sleep(0.3)
        self.rss_before, self.fds_before = self.vm("VmRSS"), self.fds()

    async def _read_notify(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:  # systemd reads every notification; a full socket would block the daemon
            await loop.sock_recv(self.listener, 4096)

    async def _read(self) -> None:
        while True:
            parts = await self.sub.recv_multipart()
            if parts[0] == p.DENOISED:
                frame = p.decode_frame(parts, min_side=1)
                self.denoised.append(frame.header)
                self.nonfinite += not bool(np.isfinite(frame.data).all())
            elif parts[0] == p.SERIES:
                self.events += 1
            else:
                self.stats = p.decode_event(parts)[1]

    async def send(self, parts: list) -> None:
        while True:
            try:
                return await self.pub.send_multipart(parts, copy=False)
            except zmq.Again:
                await asyncio.sleep(0.002)

    async def until(self, done: Callable[[dict[str, Any]], bool], timeout: float = 60.0) -> bool:
        """Wait for a STATS message that satisfies `done` (False at the timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats and done(self.stats):
                return True
            await asyncio.sleep(0.05)
        return False

    def vm(self, key: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    async def stop(self) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(self.proc.wait, 60)
        return rc, time.monotonic() - t0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for task in (self._systemd, self._reader):
            task.cancel()
        self.listener.close()
        self.ctx.destroy(linger=0)

    def log_lines(self) -> int:
        return len(self.log.read_text(errors="replace").splitlines())

    def final(self) -> dict[str, Any]:
        """The counters of the daemon's last log line "final stats: ..."."""
        line = next(ln for ln in self.log.read_text(errors="replace").splitlines() if "final stats:" in ln)
        m = re.search(r"in (\d+) out (\d+) dropped (\d+) (\{.*?\} )?rejected (\d+) (\{.*?\} )?fps", line)
        assert m is not None, line
        return {"frames_in": int(m[1]), "frames_out": int(m[2]), "dropped": ast.literal_eval(m[4] or "{}"),
                "rejected": ast.literal_eval(m[6] or "{}")}

    def row(self, name: str, sent: int, expected: int, series: str, counted: dict[str, Any], frames: int | None = None,
            upstream: bool = False, **kw: Any) -> Row:
        """The scenario's row: `sent` messages, `frames` of them frame messages (default: all); with `upstream`, frames
        the publisher itself lost (a connection replaced) count as counted when the daemon saw the gap."""
        published = sum(h["series_id"] == series for h in self.denoised)
        lost = (sent if frames is None else frames) + 1 - counted["frames_out"] - sum(counted["dropped"].values()) \
            - sum(counted["rejected"].values()) - (counted.get("missing_upstream", 0) if upstream else 0)
        rss = (self.rss_before, self.rss_after, self.vm("VmHWM") if self.proc.poll() is None else self.peak)
        return Row(name, sent, published, expected, lost, rss, (self.fds_before, self.fds_after), self.log_lines(),
                   **kw)

    async def finish(self, settle: Callable[[dict[str, Any]], bool] = lambda st: st["queue_depth"] == 0) -> dict:
        """Wait until the counters settle, note RSS and fds, stop; the counters of the last STATS message, those of
        the final log line over them (a frame still queued at the stop is counted there, as shutdown), rc and took."""
        await self.until(settle, timeout=180)
        await asyncio.sleep(0.5)
        self.rss_after, self.fds_after, self.peak = self.vm("VmRSS"), self.fds(), self.vm("VmHWM")
        counted = dict(self.stats)
        counted["rc"], counted["took"] = await self.stop()
        counted.update(self.final())
        return counted


def balanced(sent: int, upstream: bool = False) -> Callable[[dict[str, Any]], bool]:
    """Every frame message sent (and the warm-up frame) published or counted, nothing queued."""
    return lambda st: (st["frames_out"] + sum(st["dropped"].values()) + sum(st["rejected"].values())
                       + upstream * st["missing_upstream"]) >= sent + 1 and st["queue_depth"] == 0


# ---- scenarios ---------------------------------------------------------------------------------------------


def malformed(rng: np.random.Generator, good: np.ndarray) -> list:
    """One malformed message of a class drawn at random (every reject reason decode_frame has, and a topic)."""
    h = p.frame_header("fuzz", int(rng.integers(1 << 30)), good.shape, "uint16", pixel_size_m=PIXEL_M)
    buf = good.tobytes()
    kind = int(rng.integers(14))
    if kind == 0:
        return [p.FRAME, msgpack.packb(h)]
    if kind == 1:
        return [p.FRAME, rng.bytes(int(rng.integers(1, 200))), buf]
    if kind == 2:
        return [p.FRAME, msgpack.packb([1, 2, 3]), buf]
    if kind == 3:
        del h[["series_id", "frame_id", "shape", "dtype"][int(rng.integers(4))]]
    elif kind == 4:
        h["frame_id"] = "x"
    elif kind == 5:
        h["v"] = 99
    elif kind == 6:
        h["dtype"] = "float64"
    elif kind == 7:
        h["byte_order"] = "="
    elif kind == 8:
        buf = buf[: int(rng.integers(len(buf)))]
    elif kind == 9:
        h["shape"] = [8, 8]
        buf = bytes(128)
    elif kind == 10:
        h["dtype"], buf = "float32", np.full(good.shape, np.nan, np.float32).tobytes()
    elif kind == 11:
        h[b"bytes-key"] = 1
    elif kind == 12:
        deep: dict = {}
        for _ in range(int(rng.integers(33, 1000))):
            deep = {"a": deep}
        h["deep"] = deep
    else:
        return [b"frame-" + rng.bytes(4), msgpack.packb(h), buf]  # not a topic the daemon takes
    return [p.FRAME, msgpack.packb(h, use_bin_type=True), buf]


FUZZ_MESSAGES: int | None = None  # --fuzz


async def fuzz(workdir: Path, model: Path | None, quick: bool) -> Row:
    n, every = (2_000, 100) if quick else (10_000, 200)
    n = FUZZ_MESSAGES or n
    good = lattice_frame(128)
    d = Daemon(workdir, {"queue.mode": "lossless"}, model)
    await d.start()
    try:
        rng, valid = np.random.default_rng(0), 0
        for i in range(n):
            if i % every == 0:
                await d.send(frame_msg("valid", valid, good))
                valid += 1
            else:
                await d.send(malformed(rng, good))
        counted = await d.finish(balanced(n))
        return d.row("malformed-message fuzz", n, valid, "valid", counted,
                     note=f"{len(counted['rejected'])} reject reasons, {sum(counted['rejected'].values())} rejected")
    finally:
        d.close()


async def sighup_input(workdir: Path, model: Path | None, quick: bool) -> Row:
    n = 120 if quick else 400
    good = lattice_frame(128)
    d = Daemon(workdir, {"queue.mode": "lossless", "input.hwm": 16}, model)
    await d.start(hwm=64)
    try:
        for i in range(n):
            await d.send(frame_msg("hup", i, good))
            if i == n // 3:
                cfg = json.loads(d.config.read_text())
                cfg["input"]["hwm"] = 32
                d.config.write_text(json.dumps(cfg))
                d.proc.send_signal(signal.SIGHUP)
        counted = await d.finish(balanced(n, upstream=True))
        reloaded = "reloaded" in d.log.read_text()
        return d.row("SIGHUP changing input.hwm, lossless", n, n, "hup", counted, upstream=True,
                     note=f"reloaded: {reloaded}; missing upstream {counted['missing_upstream']}")
    finally:
        d.close()


async def sigterm_lossless(workdir: Path, model: Path | None, quick: bool) -> Row:
    n = 24 if quick else 48
    good = lattice_frame(256)
    d = Daemon(workdir, {"queue.mode": "lossless", "queue.maxsize": 4, "input.hwm": 64}, model)
    await d.start(hwm=64)
    try:
        for i in range(n):
            await d.send(frame_msg("term", i, good))
        d.rss_after, d.fds_after, d.peak = d.vm("VmRSS"), d.fds(), d.vm("VmHWM")
        rc, took = await d.stop()
        counted = d.final()
        return d.row("SIGTERM, lossless", n, n, "term", counted,
                     note=f"exit {rc} in {took:.1f} s; dropped {counted['dropped'] or 0}")
    finally:
        d.close()


async def event_flood(workdir: Path, model: Path | None, quick: bool) -> Row:
    n, frames = (3_000 if quick else 20_000), 4
    big = lattice_frame(512)
    # live mode: the receiver never waits, so every event reaches the queue; an output HWM that holds the events
    d = Daemon(workdir, {"queue.mode": "live", "output.hwm": 200}, model)
    await d.start()
    try:
        for i in range(frames):
            await d.send(frame_msg("flood", i, big))
        pad = {f"note{k}": "x" * 16_000 for k in range(3)}  # 48 KB events, each field within the 16 KiB limit
        for i in range(n):
            await d.send(p.encode_event(p.SERIES, p.series_header("start", f"ev{i}", **pad)))
        counted = await d.finish(balanced(frames))
        return d.row("series-event flood (48 KB events)", n + frames, frames, "flood", counted, frames=frames,
                     note=f"events dropped {counted['events_dropped']} (counted), passed on {d.events}")
    finally:
        d.close()


async def bad_headers(workdir: Path, model: Path | None, quick: bool) -> Row:
    good, n = lattice_frame(128), 14
    bad = [{b"k": 1}, {"x": [{b"k": 2}]}, {"deep": {}}]
    for _ in range(1000):
        bad[2]["deep"] = {"a": bad[2]["deep"]}
    d = Daemon(workdir, {"recording.enabled": True, "recording.directory": str(workdir / "rec"),
                         "queue.mode": "lossless"}, model)
    await d.start()
    try:
        valid = 0
        for i in range(n):
            extra = bad[i // 4] if i % 4 == 3 and i // 4 < len(bad) else {}
            h = p.frame_header("hdr", i, good.shape, "uint16", pixel_size_m=PIXEL_M)
            h.update(extra)
            await d.send([p.FRAME, msgpack.packb(h, use_bin_type=True), good.tobytes()])
            valid += not extra
        counted = await d.finish(balanced(n))
        pages = {}
        for kind in ("raw", "denoised"):
            with tifffile.TiffFile(workdir / "rec" / f"hdr_{kind}.tif") as tf:
                pages[kind] = len(tf.pages)
        return d.row("bad header keys, 1,000-deep nesting, recorded", n, valid, "hdr", counted,
                     note=f"pages recorded raw/denoised {pages['raw']}/{pages['denoised']}, "
                          f"recording errors {counted['recording_errors']}")
    finally:
        d.close()


async def huge_values(workdir: Path, model: Path | None, quick: bool) -> Row:
    base = lattice_frame(128).astype(np.float32)
    scales = [1.0, 1e18, 1e24, 1e30, 1e36, 3e38 / max(float(base.max()), 1.0)]
    d = Daemon(workdir, {"queue.mode": "lossless"}, model)
    await d.start()
    try:
        for i, scale in enumerate(scales):
            await d.send(frame_msg("huge", i, (base * np.float32(scale)).astype(np.float32)))
        counted = await d.finish(balanced(len(scales)))
        return d.row("finite float32 up to 3e38", len(scales), len(scales), "huge", counted,
                     note=f"NaN/inf frames published: {d.nonfinite}")
    finally:
        d.close()


async def crashed_series(workdir: Path, model: Path | None, quick: bool) -> Row:
    series = 20 if quick else 60
    good = lattice_frame(64)
    d = Daemon(workdir, {"recording.enabled": True, "recording.directory": str(workdir / "rec"),
                         "recording.idle_close_s": 1.0, "queue.mode": "lossless"}, model)
    await d.start()
    try:
        for s in range(series):  # each publisher "crashes": a start, two frames, never an end
            await d.send(p.encode_event(p.SERIES, p.series_header("start", f"crash{s}")))
            for i in range(2):
                await d.send(frame_msg(f"crash{s}", i, good))
        await d.until(balanced(2 * series))
        await asyncio.sleep(0.3)
        open_at_peak = d.fds()
        await asyncio.sleep(2.0)  # past recording.idle_close_s
        counted = await d.finish(balanced(2 * series))
        published = sum(h["series_id"].startswith("crash") for h in d.denoised)
        row = d.row(f"{series} crashed-publisher series, recorded", 2 * series, 2 * series, "", counted,
                    note=f"fds right after the frames {open_at_peak}")
        row.published = published
        return row
    finally:
        d.close()


async def non_utf8_config(workdir: Path, model: Path | None, quick: bool) -> Row:
    bad = workdir / "bad.yaml"
    bad.write_bytes(b"queue: {maxsize: 3}\n# caf\xe9\n")
    done = subprocess.run([sys.executable, "-m", "stemd.apps.cli", "run", "--config", str(bad)],
                          capture_output=True, text=True, timeout=120)
    err = [ln for ln in done.stderr.splitlines() if ln.strip()]
    d = Daemon(workdir, {}, model)
    await d.start()
    try:
        d.config.write_bytes(b"queue: {maxsize: 3}\n# caf\xe9\n")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reload rejected" not in d.log.read_text(errors="replace") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await d.send(frame_msg("after", 0, lattice_frame(128)))
        counted = await d.finish(balanced(1))
        said = [ln for ln in d.log.read_text(errors="replace").splitlines() if "reload rejected" in ln]
        return d.row("non-UTF-8 config (start, then SIGHUP)", 1, 1, "after", counted,
                     note=f"start: exit {done.returncode}, {len(err)} line `{err[0][:60] if err else ''}`; "
                          f"SIGHUP: {'reload rejected' if said else 'NOT rejected'}, frame after published")
    finally:
        d.close()


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Any:
    """A tmpfs of `size` at `path` (needs root); None where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    try:
        yield path if ok else None
    finally:
        if ok:
            subprocess.run(["umount", str(path)], capture_output=True)


async def disk_full(workdir: Path, model: Path | None, quick: bool) -> Row:
    n, good = 30, lattice_frame(256)
    with small_disk(workdir / "rec", "3m") as rec:
        if rec is None:
            return Row("disk full while recording", note="skipped: cannot mount a small tmpfs (not root)")
        d = Daemon(workdir, {"recording.enabled": True, "recording.directory": str(rec), "queue.mode": "lossless"},
                   model)
        await d.start()
        try:
            for i in range(n):
                await d.send(frame_msg("full", i, good))
            counted = await d.finish(balanced(n))
            readable, broken, empty = 0, 0, 0
            for f in sorted(rec.glob("full_*.tif")):
                empty += f.stat().st_size == 0
                try:
                    with tifffile.TiffFile(f) as tf:
                        for page in tf.pages:
                            ok = page.asarray().shape == good.shape and json.loads(page.description)["frame_id"] >= 0
                            readable, broken = readable + ok, broken + (not ok)
                except Exception:  # a file tifffile cannot open at all
                    broken += 1
            named = "no space left" in d.log.read_text(errors="replace")
            return d.row("disk full while recording (3 MB tmpfs)", n, n, "full", counted,
                         note=f"{readable} pages in the files, all intact: {broken == 0}; empty files {empty}; "
                              f"ENOSPC named: {named}; recording errors {counted['recording_errors']}")
        finally:
            d.close()


async def oversize(workdir: Path, model: Path | None, quick: bool) -> Row:
    big = (64 if quick else 512) * MIB
    good = lattice_frame(128)
    d = Daemon(workdir, {"limits.max_pixels": 256 * 256}, model)
    await d.start()
    try:
        await d.send(frame_msg("over", 0, good))
        await d.until(lambda st: st["frames_out"] == 2)
        peak = d.vm("VmHWM")
        h = p.frame_header("huge", 0, (16384, 8192), "uint32")
        await d.send([p.FRAME, msgpack.packb(h), np.zeros(big, np.uint8)])
        await d.until(lambda st: st["rejected"].get("oversize", 0) == 1, timeout=30)
        grew = d.vm("VmHWM") - peak
        sent = 2
        while not await d.until(lambda st: st["frames_out"] >= 3, timeout=0.5) and sent < 60:
            await d.send(frame_msg("over", sent - 1, good))  # the dropped connection is made again
            sent += 1
        counted = await d.finish(balanced(sent, upstream=True))
        return d.row(f"one {big // MIB} MiB message (max 256² px)", sent, sent - 1, "over", counted, upstream=True,
                     note=f"rejected {counted['rejected']}, peak RSS grew {grew:.0f} MiB across it")
    finally:
        d.close()


SCENARIOS = {"fuzz": fuzz, "hup": sighup_input, "term": sigterm_lossless, "flood": event_flood,
             "headers": bad_headers, "huge": huge_values, "crashed": crashed_series, "config": non_utf8_config,
             "diskfull": disk_full, "oversize": oversize}

PIXEL_COST = """
import resource, sys, time, numpy as np, torch
from stemd.live.engine import Engine
from stemd.sim.lattice import simulate_frame
eng = Engine.load(path=sys.argv[2] if len(sys.argv) > 2 else None, device="cpu")
rng = np.random.default_rng(0)
eng.denoise([rng.poisson(simulate_frame((128, 128), rng).clean * 20).astype(np.uint16)], 3.905e-11)
side = int(sys.argv[1])
frame = rng.poisson(simulate_frame((side, side), rng).clean * 20).astype(np.uint16)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
eng.denoise([frame], 3.905e-11)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
"""


def pixel_cost(sides: list[int], model: Path | None) -> list[tuple[int, float, float]]:
    """(side, seconds, peak bytes over the loaded model) of one frame, each in a fresh process."""
    out = []
    for side in sides:
        args = [sys.executable, "-c", PIXEL_COST, str(side)] + ([str(model)] if model else [])
        seconds, grew = subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()[-2:]
        out.append((side, float(seconds), float(grew)))
    return out


def report(rows: list[Row], costs: list[tuple[int, float, float]], quick: bool) -> str:
    lines = [
        f"Command: `python -m bench.reliability{' --quick' if quick else ''}`; machine: {machine_line()}; "
        f"{time.strftime('%Y-%m-%d')}. Each scenario is its own `stemd run` process on loopback ZeroMQ.",
        "",
        "| scenario | messages | valid published / expected | lost uncounted | RSS MiB before / after / peak | "
        "fds before / after | log lines | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rss = "/".join(f"{v:.0f}" for v in r.rss)
        lines.append(f"| {r.scenario} | {r.sent} | {r.published} / {r.expected} | {r.lost} | {rss} | "
                     f"{r.fds[0]} / {r.fds[1]} | {r.log_lines} | {r.note} |")
    lines += [
        "",
        "Lost uncounted = frame messages sent − published − dropped − rejected − missing upstream, from the "
        "daemon's counters (SIGTERM: its final log line). Peak is the daemon's VmHWM since it started (the model "
        "load included).",
        "",
        "Memory a frame costs the model (one frame, CPU, fresh process, peak RSS over the loaded model):",
        "",
        "| frame | seconds | peak MiB | bytes per pixel |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {s}² | {t:.1f} | {g / MIB:.0f} | {g / s / s:.0f} |" for s, t, g in costs]
    lines += [
        "",
        f"The daemon's memory bound: `queue.max_batch_pixels` (0 = half the free memory at start over "
        f"{PIXEL_COST_BYTES} B/px, stemd.live.engine.PIXEL_COST_BYTES, the table's largest with a margin) caps a batch "
        "and so a frame; ZeroMQ's MAXMSGSIZE refuses any message part over 4 B × that many pixels + 64 KiB "
        "before allocating it; the input queue holds queue.maxsize frames, events queue.max_events.",
    ]
    return "\n".join(lines)


async def run_all(names: list[str], model: Path | None, quick: bool) -> list[Row]:
    rows = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"stemd-rel-{name}-") as tmp:
            t = time.monotonic()
            row = await SCENARIOS[name](Path(tmp), model, quick)
            print(f"{name}: {row} ({time.monotonic() - t:.0f} s)", file=sys.stderr)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer messages, smaller sizes (about a minute)")
    ap.add_argument("--only", default=",".join(SCENARIOS), help=f"scenarios, comma-separated: {','.join(SCENARIOS)}")
    ap.add_argument("--fuzz", type=int, help="malformed messages in the fuzz scenario (default 10,000; quick 2,000)")
    ap.add_argument("--model", type=Path, help="checkpoint (default: the shipped model)")
    ap.add_argument("--cost-sides", default="", help="frame sides for the per-pixel cost (default 512,1024; "
                    "quick 512); 0: skip")
    ap.add_argument("--out", type=Path, default=BENCHMARKS)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenario(s) {sorted(unknown)}; choose from {sorted(SCENARIOS)}")
    global FUZZ_MESSAGES
    FUZZ_MESSAGES = args.fuzz
    rows = asyncio.run(run_all(names, args.model, args.quick))
    sides = args.cost_sides or ("512" if args.quick else "512,1024")
    costs = pixel_cost([int(s) for s in sides.split(",") if int(s)], args.model)
    publish(report(rows, costs, args.quick), args.out, "Reliability (bench/reliability.py)", write=not args.no_write)
    return 1 if any(r.lost for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
