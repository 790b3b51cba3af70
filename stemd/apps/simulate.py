"""`stemd simulate`: a ZeroMQ PUB publisher that stands in for the microscope.

Frames come from `stemd.sim.microscope` (pure functions, no I/O) and are published by `Simulator`,
an asyncio class usable in-process (tests, `stemd demo`) and from the CLI.

- Sockets: the PUB binds (default) or connects (`--connect`). After bind/connect it waits
  `startup_delay_s` (0.3 s) before frame 0, so subscribers that join at once miss nothing
  (ZeroMQ's slow joiner). A SUB that binds passes its subscription to a connecting PUB only
  once it polls/receives (a libzmq quirk), so start receiving before the simulator sends.
  `lossless` (`--lossless`) uses an XPUB with XPUB_NODROP instead: frame 0 waits for a
  subscriber, and a full subscriber slows the feed rather than losing frames.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from stemd.config import InputSettings, is_local_endpoint
from stemd.errors import ConfigError
from stemd.live import protocol
from stemd.sim.microscope import SimSpec, SimulatedFrame, Specimen, build_specimen, make_frame, require

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = InputSettings().endpoint
DETECTOR = "HAADF (simulated)"
SLOW_JOINER_DELAY_S = 0.3  # after bind/connect, so subscribers are attached before frame 0


def frame_metadata(spec: SimSpec, series_id: str, frame_id: int, frame: SimulatedFrame) -> dict[str, Any]:
    """The protocol header of a simulated frame: scan metadata, `simulated: true`, the drift offset."""
    return protocol.frame_header(
        series_id,
        frame_id,
        spec.shape,
        "uint16",
        dwell_time_s=spec.dwell_us * 1e-6,
        pixel_size_m=spec.pixel_size_m,
        detector=DETECTOR,
        scan_rotation_deg=spec.scan_rotation_deg,
        simulated=True,
        sim_index=frame.index,
        sim_drift_px=[round(v, 4) for v in frame.offset_px],
        sim_dose=spec.dose,
    )


@dataclass
class SimReport:
    """What a run published."""

    frames: int = 0
    series: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0


class Simulator:
    """Publishes simulated frames on a PUB socket, paced like a scan; `await sim.run(n)`.

    Pacing: `max_rate` publishes as fast as frames are made; else `fps`; else one frame per
    `spec.frame_period_s`. `series_length` frames per series, each wrapped in SERIES
    start/end events; without it a run is one series. The next frame is generated in a
    worker thread while the current one waits for its slot, so the event loop stays free.
    """

    def __init__(
        self,
        spec: SimSpec | None = None,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        connect: bool = False,
        fps: float | None = None,
        max_rate: bool = False,
        series_length: int | None = None,
        publish_clean: bool = False,
        startup_delay_s: float = SLOW_JOINER_DELAY_S,
        hwm: int = 32,
        lossless: bool = False,
        run_id: str | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.spec = spec or SimSpec()
        require(endpoint.startswith(("tcp://", "ipc://", "inproc://")), "--endpoint",
                 "must start with tcp://, ipc:// or inproc://", endpoint)
        require(fps is None or (fps > 0 and math.isfinite(fps)), "--fps", "must be > 0", fps)
        require(series_length is None or series_length >= 1, "--series-length", "must be >= 1", series_length)
        require(startup_delay_s >= 0, "--startup-delay-s", "must be >= 0", startup_delay_s)
        require(hwm >= 1, "--hwm", "must be >= 1", hwm)
        self.requested_endpoint = endpoint
        self.connect = connect
        self.period_s = 0.0 if max_rate else (1.0 / fps if fps else self.spec.frame_period_s)
        self.series_length = series_length
        self.publish_clean = publish_clean
        self.startup_delay_s = startup_delay_s
        self.hwm = hwm
        self.lossless = lossless
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._stop = asyncio.Event()
        self._scene: Specimen | None = None
        self.endpoint = endpoint

    @property
    def scene(self) -> Specimen:
        if self._scene is None:
            self._scene = build_specimen(self.spec)
        return self._scene

    def open(self) -> str:
        """Bind (or connect) the PUB socket; returns the actual endpoint (resolves `tcp://host:*`).

        `lossless`: an XPUB with XPUB_NODROP, so a full subscriber makes sends wait instead of
        dropping frames (docs/protocol.md, "Backpressure and lossless publishing")."""
        if self._sock is not None:
            return self.endpoint
        if not self.connect and not is_local_endpoint(self.requested_endpoint):
            log.warning("binding %s: reachable from other machines", self.requested_endpoint)
        sock = self._ctx.socket(zmq.XPUB if self.lossless else zmq.PUB)
        if self.lossless:
            sock.setsockopt(zmq.XPUB_NODROP, 1)
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.LINGER, 1000)
        try:
            if self.connect:
                sock.connect(self.requested_endpoint)
            else:
                sock.bind(self.requested_endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            verb = "connect to" if self.connect else "bind"
            raise ConfigError(f"--endpoint: cannot {verb} {self.requested_endpoint}: {exc}") from None
        self._sock = sock
        if not self.connect:
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def stop(self) -> None:
        """Ask a running `run` to finish after the current frame (closing its series)."""
        self._stop.set()

    async def __aenter__(self) -> Simulator:
        self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _open_sock(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            raise RuntimeError("the simulator's socket is not open: call open() (or use `async with`) first")
        return self._sock

    async def _send(self, parts: list[Any]) -> None:
        """Send; a lossless socket answers EAGAIN while a subscriber is full: wait and retry."""
        sock = self._open_sock()
        while True:
            try:
                await sock.send_multipart(parts, copy=False)
                return
            except zmq.Again:
                await asyncio.sleep(0.002)

    async def _send_event(self, kind: str, series_id: str, frames: int) -> None:
        header = protocol.series_header(kind, series_id, frames=frames, simulated=True)
        await self._send(protocol.encode_event(protocol.SERIES, header))

    async def _wait_for_subscriber(self, topic: bytes = protocol.FRAME) -> None:
        """Lossless: frame 0 waits until someone subscribes to frames (or `stop()`)."""
        sock = self._open_sock()

        async def subscribed() -> None:
            while (await sock.recv())[:1 + len(topic)] != b"\x01" + topic:
                pass

        waiter = asyncio.ensure_future(subscribed())
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            stopper.cancel()

    async def _wait_until(self, deadline: float) -> None:
        delay = deadline - asyncio.get_running_loop().time()
        if delay > 0:
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def run(self, n_frames: int | None = None) -> SimReport:
        """Publish `n_frames` (None: until `stop()`), series events around them; returns a report."""
        require(n_frames is None or n_frames >= 0, "--frames", "must be >= 0", n_frames)
        self.open()
        loop = asyncio.get_running_loop()
        report = SimReport()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemd-sim")
        scene = await loop.run_in_executor(pool, lambda: self.scene)
        if self.lossless:
            await self._wait_for_subscriber()
        else:
            await self._wait_until(loop.time() + self.startup_delay_s)
        start = deadline = loop.time()
        series_id, in_series = "", 0
        pending = loop.run_in_executor(pool, make_frame, scene, 0)
        try:
            i = 0
            while not self._stop.is_set() and (n_frames is None or i < n_frames):
                frame = await pending
                pending = loop.run_in_executor(pool, make_frame, scene, i + 1)
                await self._wait_until(deadline)
                if self._stop.is_set():
                    break
                if in_series == 0:
                    series_id = f"sim-{self.run_id}-{len(report.series):04d}"
                    report.series.append(series_id)
                    await self._send_event("start", series_id, 0)
                header = frame_metadata(self.spec, series_id, in_series, frame)
                await self._send(protocol.encode_frame(protocol.FRAME, header, frame.raw))
                if self.publish_clean:
                    await self._send(protocol.encode_frame(protocol.CLEAN, header, frame.clean))
                in_series += 1
                i += 1
                report.frames = i
                if self.series_length is not None and in_series >= self.series_length:
                    await self._send_event("end", series_id, in_series)
                    in_series = 0
                now = loop.time()
                deadline = max(deadline + self.period_s, now - self.period_s)
        finally:
            if in_series and self._sock is not None:
                await self._send_event("end", series_id, in_series)
            pending.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            report.elapsed_s = loop.time() - start
        return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="PUB endpoint (default %(default)s)")
    parser.add_argument("--connect", action="store_true", help="connect to the endpoint instead of binding it")
    parser.add_argument("--size", type=int, default=512, help="frame side in pixels (default %(default)s)")
    parser.add_argument("--dwell-us", type=float, default=2.0, help="pixel dwell time, us (default %(default)s)")
    parser.add_argument("--dose-per-us", type=float, default=10.0,
                        help="expected counts per us at the brightest column (default %(default)s)")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--fps", type=float, help="frames per second (default: size^2 x dwell per frame)")
    rate.add_argument("--max-rate", action="store_true", help="publish as fast as possible (benchmarks)")
    parser.add_argument("--frames", type=int, help="frames to publish (default: until stopped)")
    parser.add_argument("--series-length", type=int, help="frames per series (default: one series)")
    parser.add_argument("--publish-clean", action="store_true", help="also publish the noise-free frame (topic clean)")
    parser.add_argument("--defect", choices=["rp"], help="add a Ruddlesden-Popper defect")
    parser.add_argument("--no-artefacts", action="store_true", help="no line jitter, line gain or flicker")
    parser.add_argument("--drift-px", type=float, default=0.1, help="sample drift per frame, px (default %(default)s)")
    parser.add_argument("--rotation-deg", type=float, default=0.0, help="lattice rotation (default %(default)s)")
    parser.add_argument("--scan-rotation-deg", type=float, default=0.0, help="scan rotation metadata")
    parser.add_argument("--pixel-size-m", type=float, default=None,
                        help="pixel size metadata, m (default: SrTiO3's 0.3905 nm over the 10 px lattice period)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    parser.add_argument("--startup-delay-s", type=float, default=SLOW_JOINER_DELAY_S,
                        help="wait after bind so subscribers join before frame 0 (default %(default)s)")
    parser.add_argument("--lossless", action="store_true",
                        help="XPUB with XPUB_NODROP: wait for a subscriber, then never drop a frame (a full "
                             "subscriber slows the feed instead); pair with `stemd run --mode lossless`")


def spec_from_args(args: argparse.Namespace) -> SimSpec:
    """The `SimSpec` of parsed CLI options; ConfigError names a bad option."""
    return SimSpec(
        shape=(args.size, args.size), dwell_us=args.dwell_us, dose_per_us=args.dose_per_us,
        pixel_size_m=args.pixel_size_m, rotation_deg=args.rotation_deg,
        scan_rotation_deg=args.scan_rotation_deg, defect=args.defect, drift_px=args.drift_px,
        artefacts=not args.no_artefacts, seed=args.seed,
    )


async def _serve(sim: Simulator, n_frames: int | None) -> SimReport:
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, sim.stop)
        except (RuntimeError, ValueError, NotImplementedError):  # not the main thread
            pass
    endpoint = sim.open()
    rate = "max rate" if sim.period_s == 0 else f"{1 / sim.period_s:.2f} fps"
    log.info("simulating %dx%d frames, dose %.1f counts, %s, %s %s", *sim.spec.shape, sim.spec.dose,
             rate, "connected to" if sim.connect else "bound", endpoint)
    try:
        return await sim.run(n_frames)
    finally:
        sim.close()


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    sim = Simulator(
        spec, args.endpoint, connect=args.connect, fps=args.fps, max_rate=args.max_rate,
        series_length=args.series_length, publish_clean=args.publish_clean,
        startup_delay_s=args.startup_delay_s, lossless=args.lossless,
    )
    require(args.frames is None or args.frames >= 0, "--frames", "must be >= 0", args.frames)
    report = asyncio.run(_serve(sim, args.frames))
    log.info("published %d frames in %d series, %.2f fps", report.frames, len(report.series), report.fps)
    return 0
