"""`stemd demo`: the simulator and the daemon together, in one process, for a while.

Both run as asyncio tasks on real loopback sockets on free ports: the simulator publishes
fast-scan frames (512^2, 2 us dwell by default: one frame per 0.524 s) and their clean
frames; the daemon denoises them with the shipped model (or `--model`); the demo subscribes
to the daemon's output and to the simulator's CLEAN topic, matches raw, denoised and clean
frames by (series_id, frame_id), and at the end prints a stats table and writes a PNG
(raw | denoised | clean of the last matched frame).

PSNR: raw counts and the float denoised frame are each mapped onto the clean frame's scale
by the least-squares gain and offset (`stemd.compute.metrics.fit_scale`, the same oracle fit for
both), then `stemd.compute.metrics.psnr` against the clean frame with its own range as the peak;
the table gives the mean over matched frames. Beside it, the daemon's own live fidelity estimate (the last
denoised header's `fidelity` map: held-out split-dose gains, no truth used; docs/protocol.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from stemd.apps.simulate import Simulator
from stemd.apps.viewer import KINDS, NoFramesError, PairMatcher, check_png_path, fidelity_text, write_png
from stemd.compute.metrics import fit_scale, psnr
from stemd.config import (
    MODEL_KEYS,
    InputSettings,
    OutputSettings,
    Settings,
    add_setting_options,
    load_settings,
    setting_overrides,
)
from stemd.errors import ConfigError
from stemd.live import protocol
from stemd.live.daemon import Daemon
from stemd.sim.microscope import SimSpec

log = logging.getLogger(__name__)

DRAIN_S = 5.0  # after the simulator stops, how long the daemon may take to finish its queue
OUTPUT_HWM = 64  # room for bursts of batches, so the collector sees every published frame


@dataclass
class DemoReport:
    """What the demo measured; `table()` is what it prints."""

    seconds: float
    shape: tuple[int, int]
    dwell_us: float
    dose: float
    model_id: str = "?"
    device: str = "?"
    sent: int = 0
    received: int = 0  # frames the daemon received (sent - received were lost on the way)
    denoised: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    psnr_raw: list[float] = field(default_factory=list)
    psnr_denoised: list[float] = field(default_factory=list)
    fidelity: dict[str, Any] | None = None  # the last denoised header's `fidelity` map (the daemon's live check)
    png: Path | None = None

    @property
    def fps(self) -> float:
        return self.denoised / self.seconds if self.seconds > 0 else 0.0

    def table(self) -> str:
        """The stats table, one figure a line."""
        def count(d: dict[str, int]) -> str:
            detail = ", ".join(f"{k} {v}" for k, v in sorted(d.items()))
            return f"{sum(d.values())}" + (f"  ({detail})" if detail else "")

        def mean_db(values: list[float]) -> str:
            return f"{np.mean(values):.2f} dB" if values else "n/a"

        lat = np.asarray(self.latencies_s) * 1e3
        latency = f"{np.percentile(lat, 50):.1f} / {np.percentile(lat, 99):.1f} ms" if lat.size else "n/a"
        h, w = self.shape
        rows = [
            ("frames sent", f"{self.sent}"),
            ("frames denoised", f"{self.denoised}"),
            ("frames dropped", count(self.dropped)),
            ("frames rejected", count(self.rejected)),
            ("frames lost before the daemon", f"{self.sent - self.received}"),
            ("denoised fps", f"{self.fps:.2f}"),
            ("latency p50 / p99", latency),
            ("PSNR raw vs clean", mean_db(self.psnr_raw)),
            ("PSNR denoised vs clean", mean_db(self.psnr_denoised)),
            ("frames in the PSNR means", f"{len(self.psnr_denoised)}"),
            ("fidelity, live (no truth)", self.fidelity_cell()),
        ]
        head = (f"stemd demo: {self.seconds:.1f} s of {h}x{w} frames, {self.dwell_us:g} us dwell "
                f"(dose {self.dose:g} counts), model {self.model_id} on {self.device}")
        width = max(len(k) for k, _ in rows)
        lines = [head, "-" * len(head)] + [f"{k:<{width}}  {v}" for k, v in rows]
        if self.png is not None:
            lines.append(f"{'side-by-side PNG':<{width}}  {self.png}")
        return "\n".join(lines)


    def fidelity_cell(self) -> str:
        """The daemon's own running estimate of the last series (held-out, half dose): beside the true PSNR above."""
        if self.fidelity is None:
            return "off"
        return fidelity_text({"fidelity": self.fidelity}).removeprefix("fidelity ").removeprefix("fidelity: ")


def frame_psnr(raw: np.ndarray, denoised: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    """(PSNR of raw, PSNR of denoised) against clean, after the least-squares gain/offset fit."""
    clean = np.asarray(clean, dtype=np.float64)
    return psnr(fit_scale(raw, clean), clean), psnr(fit_scale(denoised, clean), clean)


class Collector:
    """Subscribes to the daemon's RAW/DENOISED/STATS and the simulator's CLEAN; matches by ids."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoints: list[str]) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 1000)
        for topic in (protocol.RAW, protocol.DENOISED, protocol.CLEAN):
            self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        for ep in endpoints:
            self.sock.connect(ep)
        self.matcher = PairMatcher(kinds=("raw", "denoised", "clean"), keep=256)
        self.latencies: list[float] = []
        self.psnr: list[tuple[float, float]] = []
        self.skipped: Counter[str] = Counter()  # ProtocolError reasons
        self.fidelity: dict[str, Any] | None = None  # the latest denoised header's `fidelity` map

    def handle(self, parts: list[Any]) -> None:
        topic = bytes(parts[0].buffer)
        try:
            frame = protocol.decode_frame(parts, min_side=1)
        except protocol.ProtocolError as exc:
            self.skipped[exc.reason] += 1
            return
        if topic == protocol.DENOISED and isinstance(frame.header.get("latency_s"), (int, float)):
            self.latencies.append(float(frame.header["latency_s"]))
        if topic == protocol.DENOISED and isinstance(frame.header.get("fidelity"), dict):
            self.fidelity = frame.header["fidelity"]
        done = self.matcher.add(KINDS[topic], frame)
        if done is not None:
            self.psnr.append(frame_psnr(done["raw"].data, done["denoised"].data, done["clean"].data))

    async def run(self) -> None:
        while True:
            self.handle(await self.sock.recv_multipart(copy=False))

    async def drain(self, idle_s: float = 0.3) -> None:
        """Handle whatever is still arriving, until nothing has for `idle_s`."""
        while await self.sock.poll(int(idle_s * 1000)):
            self.handle(await self.sock.recv_multipart(copy=False))

    def close(self) -> None:
        self.sock.close(linger=0)


async def run_demo(
    seconds: float = 20.0,
    spec: SimSpec | None = None,
    *,
    settings: Settings | None = None,
    png: Path | None = Path("stemd-demo.png"),
) -> DemoReport:
    """Simulator + daemon + collector for `seconds`; returns the report (PNG written if `png`)."""
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(f"--seconds must be > 0 (got {seconds!r})")
    if png is not None:
        png = check_png_path(png, "--png")
    spec = spec or SimSpec()
    ctx = zmq.asyncio.Context()
    sim = Simulator(spec, "tcp://127.0.0.1:*", publish_clean=True, run_id="demo", context=ctx)
    sim_endpoint = sim.open()
    base = settings or Settings()
    daemon = Daemon(base.model_copy(update={
        "input": InputSettings(endpoint=sim_endpoint, mode="connect"),
        "output": OutputSettings(endpoint="tcp://127.0.0.1:*", publish_raw=True, hwm=OUTPUT_HWM),
    }))
    report = DemoReport(seconds, spec.shape, spec.dwell_us, spec.dose)
    collector = None
    try:
        await daemon.start()
        engine = daemon.engine
        assert engine is not None  # Daemon.start loads the model into its engine
        report.model_id, report.device = engine.model_id, engine.device_name
        collector = Collector(ctx, [daemon.output_endpoint, sim_endpoint])
        collecting = asyncio.create_task(collector.run())
        publishing = asyncio.create_task(sim.run())
        await asyncio.sleep(sim.startup_delay_s + seconds)
        sim.stop()
        sim_report = await publishing
        report.sent, report.seconds = sim_report.frames, sim_report.elapsed_s
        await _wait_for_daemon(daemon, report.sent)
        collecting.cancel()
        await asyncio.gather(collecting, return_exceptions=True)
        await collector.drain()
    finally:
        sim.close()
        await daemon.stop()
        if collector is not None:
            collector.close()
        ctx.term()
    report.received, report.denoised = daemon.frames_in, daemon.frames_out
    report.dropped, report.rejected = dict(daemon.dropped), dict(daemon.rejected)
    report.latencies_s = collector.latencies
    report.psnr_raw = [r for r, _ in collector.psnr]
    report.psnr_denoised = [d for _, d in collector.psnr]
    report.fidelity = collector.fidelity
    last = collector.matcher.latest
    if last is None:
        raise NoFramesError(
            f"no frame got through in {seconds:g} s: {report.sent} sent, {report.received} received, "
            f"{report.denoised} denoised, dropped {report.dropped or 0}, rejected {report.rejected or 0}"
        )
    if png is not None:
        r, d = frame_psnr(last["raw"].data, last["denoised"].data, last["clean"].data)
        panels = [(f"raw ({r:.1f} dB)", last["raw"].data), (f"denoised ({d:.1f} dB)", last["denoised"].data),
                  ("clean", last["clean"].data)]
        hdr = last["denoised"].header
        title = f"stemd demo: {hdr['series_id']} frame {hdr['frame_id']}, model {report.model_id}"
        report.png = write_png(png, panels, title, {"Software": "stemd demo", "Description": title})
    return report


async def _wait_for_daemon(daemon: Daemon, sent: int) -> None:
    """Until every frame the daemon received is published, dropped or rejected (or DRAIN_S)."""
    deadline = time.monotonic() + DRAIN_S
    settled_since = None
    while time.monotonic() < deadline:
        handled = daemon.frames_out + sum(daemon.dropped.values()) + sum(daemon.rejected.values())
        if handled >= daemon.frames_in:
            if daemon.frames_in >= sent:
                return
            settled_since = settled_since or time.monotonic()
            if time.monotonic() - settled_since > 0.5:  # the rest were lost on the way
                return
        else:
            settled_since = None
        await asyncio.sleep(0.05)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to run (default %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="frame side in pixels (default %(default)s)")
    parser.add_argument("--dwell-us", type=float, default=2.0, help="pixel dwell time, us (default %(default)s)")
    parser.add_argument("--dose-per-us", type=float, default=10.0,
                        help="expected counts per us at the brightest column (default %(default)s)")
    parser.add_argument("--defect", choices=["rp"], help="add a Ruddlesden-Popper defect to the sample")
    parser.add_argument("--seed", type=int, default=0, help="simulator seed (default %(default)s)")
    parser.add_argument("--config", type=Path, help="YAML settings; its model section is used")
    add_setting_options(parser, MODEL_KEYS)
    parser.add_argument("--png", type=Path, default=Path("stemd-demo.png"),
                        help="side-by-side raw | denoised | clean (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    spec = SimSpec(shape=(args.size, args.size), dwell_us=args.dwell_us, dose_per_us=args.dose_per_us,
                   defect=args.defect, seed=args.seed)
    settings = load_settings(args.config, setting_overrides(args), os.environ)
    report = asyncio.run(run_demo(args.seconds, spec, settings=settings, png=args.png))
    print(report.table())
    return 0
