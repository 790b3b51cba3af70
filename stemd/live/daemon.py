"""`stemd run`: the live denoising daemon (ZeroMQ frames in, denoised frames out).

One asyncio loop does all the I/O and never blocks: a receiver task validates each message
(protocol.decode_frame) and puts frames on a bounded queue; a worker task takes batches of
same-shape frames, hands them to the `Engine` (its own thread) and publishes RAW and DENOISED;
a stats task publishes STATS. Every input frame is published, or counted as dropped or
rejected with a reason. `Daemon` runs in-process (tests, `stemd demo`) or from `run(args)`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from stemd.compute.sampling import SamplingError
from stemd.config import MODEL_KEYS, Settings, add_setting_options, is_local_endpoint, load_settings, setting_overrides
from stemd.errors import ConfigError, ModelOutputError, StemdError
from stemd.live import protocol
from stemd.live.engine import Engine, Pending
from stemd.live.fidelity_monitor import FidelityMonitor, reference_frame
from stemd.live.hspy_writer import HyperSpyRecorder
from stemd.live.notify import Notifier
from stemd.live.recorder import Recorder
from stemd.pipeline import Denoiser, Plan, check_finite

if TYPE_CHECKING:
    from stemd.live.prometheus import MetricsServer

log = logging.getLogger(__name__)

STOP_CLOSE_SHARE = 0.25  # of queue.stop_timeout_s kept for closing recordings and sockets after the drain
LINGER_MS = 500  # how long closing sockets may keep flushing
DRAIN_QUIET_S, DRAIN_SOCKET_S = 0.05, 2.0  # an input socket is drained until quiet this long, at most that long
MAX_SERIES_TRACKED = 64
RECONNECT_WAIT_S = 1.0  # a dropped input connection ZeroMQ does not retry within this was refused, not closed
EVENT_LOG_PER_S = 5.0  # series-event log lines per second at most: a flood of events is counted, not logged


@dataclass
class Item:
    """One queued entry: a frame, a SERIES event to pass through, or an internal series restart."""

    kind: str  # "frame" | "event" | "restart"
    header: dict[str, Any]
    data: np.ndarray | None = None
    received_at: float = 0.0
    plan: Plan | None = None  # how the model runs this frame (its series'); None: yet to be measured, by `_work`
    generation: int = 0  # the engine's model the plan was made for
    planned: list[Any] | None = None  # its series' plan entry (`Daemon._plan`), which `_work` fills if plan is None


def _batch_key(item: Item) -> tuple[Any, ...]:
    """Frames batched together share this: one series, shape and pixel size (one plan: sampling and lattice)."""
    assert item.data is not None  # only frames are batched, and a frame carries its data
    return item.data.shape, item.header.get("pixel_size_m"), item.header.get("series_id"), id(item.planned)


class FrameQueue:
    """Bounded FIFO of frames; events ride along in order, bounded apart (a flood of them drops the oldest event,
    never a frame, and never blocks)."""

    def __init__(self, maxsize: int, mode: str, max_events: int = 64) -> None:
        self.maxsize, self.mode, self.max_events = maxsize, mode, max_events
        self._items: collections.deque[Item] = collections.deque()
        self._frames = 0
        self._changed = asyncio.Event()
        self.closed = False

    def __len__(self) -> int:
        return self._frames

    @property
    def empty(self) -> bool:
        return not self._items

    def put_event(self, item: Item) -> Item | None:
        """Append an event; when max_events are queued, remove and return the oldest queued event."""
        full = len(self._items) - self._frames >= self.max_events
        return self._append(item, self._remove_oldest(frame=False) if full else None)

    def put_frame(self, item: Item) -> Item | None:
        """Append a frame; in live mode, when full, remove and return the oldest queued frame."""
        full = self._frames >= self.maxsize and self.mode == "live"
        return self._append(item, self._remove_oldest(frame=True) if full else None)

    def _remove_oldest(self, frame: bool) -> Item:
        """Remove the oldest queued frame (or, with frame False, the oldest event)."""
        i = next(i for i, it in enumerate(self._items) if (it.kind == "frame") == frame)
        item = self._items[i]
        del self._items[i]
        self._frames -= frame
        return item

    def _append(self, item: Item, dropped: Item | None) -> Item | None:
        self._items.append(item)
        self._frames += item.kind == "frame"
        self._changed.set()
        return dropped

    def head(self) -> Item | None:
        return self._items[0] if self._items else None

    def pop(self) -> Item:
        item = self._items.popleft()
        self._frames -= item.kind == "frame"
        self._changed.set()
        return item

    def pop_batch(self, max_batch: int, max_pixels: int | None = None) -> list[Item]:
        """Leading frames of the head frame's shape and pixel size, at most `max_batch` and (but for the first)
        `max_pixels` pixels in all."""
        key = _batch_key(self._items[0])
        assert self._items[0].data is not None
        size = self._items[0].data.size
        batch: list[Item] = []
        while (
            self._items
            and len(batch) < max_batch
            and (max_pixels is None or not batch or (len(batch) + 1) * size <= max_pixels)
            and self._items[0].kind == "frame"
            and _batch_key(self._items[0]) == key
        ):
            batch.append(self.pop())
        return batch

    def drain(self) -> list[Item]:
        items = list(self._items)
        self._items.clear()
        self._frames = 0
        self._changed.set()
        return items

    async def wait_for(self, predicate) -> None:
        while not predicate():
            self._changed.clear()
            await self._changed.wait()

    def close(self) -> None:
        self.closed = True
        self._changed.set()


class RateLimit:
    """At most `per_s` allowances a second (a token bucket of one second's worth): bounds log lines input drives."""

    def __init__(self, per_s: float) -> None:
        self.per_s, self._tokens, self._at = per_s, per_s, time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.per_s, self._tokens + (now - self._at) * self.per_s)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Daemon:
    """The daemon, runnable in-process: `await start()`, then `await stop()` (or `serve()`)."""

    def __init__(
        self,
        settings: Settings,
        *,
        config_path: Path | None = None,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        engine: Engine | None = None,
        notifier: Notifier | None = None,
        manage_log_level: bool = False,
    ) -> None:
        self.settings = settings
        self.manage_log_level = manage_log_level
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.environ = None if environ is None else dict(environ)  # STEMD_* variables, re-read on reload
        self.engine = engine
        self._owns_engine = engine is None
        self.notifier = notifier if notifier is not None else Notifier()
        self.ctx = zmq.asyncio.Context()
        self.queue = FrameQueue(settings.queue.maxsize, settings.queue.mode, settings.queue.max_events)
        self.events_dropped = 0
        self._event_log = RateLimit(EVENT_LOG_PER_S)
        self.recorder: Recorder | None = None
        self.sub: zmq.asyncio.Socket | None = None
        self.pub: zmq.asyncio.Socket | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.restarts = 0
        self.missing_upstream = 0  # forward gaps in a series' frame ids: frames that never arrived
        self.reloads = 0
        self.reload_failures = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self.rejected: collections.Counter[str] = collections.Counter()
        self.dropped_ids: collections.deque[tuple[str, int, str]] = collections.deque(maxlen=100_000)
        self.failed = False
        self._recording_errors = 0  # of recorders replaced by a reload
        self._inflight: list[Item] = []
        self._latencies: list[float] = []
        self._last_ids: collections.OrderedDict[str, int] = collections.OrderedDict()
        # per (series, shape, pixel size): [plan or refusal, frames planned by it, engine generation]
        self._plans: collections.OrderedDict[tuple[Any, ...], list[Any]] = collections.OrderedDict()
        self._started_at = time.time()
        self._last_stats = (time.monotonic(), 0)
        self._tasks: dict[str, asyncio.Task] = {}
        self._stop_requested = asyncio.Event()
        self._stopping = False
        self._reload_lock = asyncio.Lock()
        self._sampling_said = ""  # the last sampling refusal logged (a new one is logged when it changes)
        self.batch_pixels = settings.queue.max_batch_pixels  # set by start: the pixels a batch may hold
        self._derived_batch_pixels = 0
        self.metrics: MetricsServer | None = None  # /metrics when metrics.endpoint is set (start to stop)
        self.latency_observer: Callable[[float], None] | None = None  # given each published frame's latency_s
        self.fidelity = FidelityMonitor(settings.fidelity)  # live split-dose checks, run when the engine is idle

    # ---- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model (if none was given), open the sockets, start the tasks, tell systemd."""
        s = self.settings
        self._apply_log_level(s)
        if self.engine is None:
            self.engine = await asyncio.to_thread(Engine.load, s.model)
        if s.metrics.endpoint is not None:
            self.metrics = start_metrics(self, s.metrics.endpoint)
            self.latency_observer = self.metrics.latency.observe
        self._derived_batch_pixels = self.engine.batch_pixels()
        self.batch_pixels = s.queue.max_batch_pixels or self._derived_batch_pixels
        self.pub = self._open_output(s)
        self.sub = self._open_input(s)
        self.recorder = self._make_recorder(s)
        self._started_at = time.time()
        self._last_stats = (time.monotonic(), 0)
        self._spawn("receiver", self._receive(self.sub, _connected(s)))
        self._spawn("worker", self._work())
        self._spawn("stats", self._stats_loop())
        interval = self.notifier.watchdog_interval()
        if interval:
            self._spawn("watchdog", self._watchdog_loop(interval))
        line = (
            f"ready: input {self.input_endpoint} ({s.input.mode}), output {self.output_endpoint}, {s.queue.mode} mode"
        )
        log.info("%s; model %s on %s; at most %d pixels a frame and %d a batch", line, self.engine.model_id,
                 self.engine.device_name, self._frame_pixels(s), self.batch_pixels)
        self.notifier.ready(line)

    def _apply_log_level(self, s: Settings) -> None:
        if self.manage_log_level:
            logging.getLogger("stemd").setLevel(s.log_level)

    def request_stop(self) -> None:
        """Ask `serve` to shut down (signal handlers call this)."""
        self._stop_requested.set()

    async def serve(self) -> int:
        """Start, run until `request_stop`, stop; 0 on a clean exit, 1 if a task failed."""
        await self.start()
        await self._stop_requested.wait()
        await self.stop()
        return 1 if self.failed else 0

    async def stop(self) -> None:
        """Stop receiving, drain the queue, close recordings and sockets, all within queue.stop_timeout_s:
        what the drain cannot finish in time is counted as dropped (shutdown)."""
        if self._stopping:
            return
        self._stopping = True
        timeout = self.settings.queue.stop_timeout_s
        deadline = time.monotonic() + timeout
        self.notifier.stopping()
        log.info("stopping: draining %d queued frames", len(self.queue))
        await self._cancel("receiver")
        if self.sub is not None:  # frames already handed to ZeroMQ are taken, not lost uncounted
            await self._drain_socket(self.sub, min(DRAIN_SOCKET_S, timeout * STOP_CLOSE_SHARE))
        self.queue.close()
        worker = self._tasks.pop("worker", None)
        abandoned = False
        if worker is not None:
            left = deadline - time.monotonic() - timeout * STOP_CLOSE_SHARE
            try:
                await asyncio.wait_for(asyncio.shield(worker), max(left, 0.0))
            except asyncio.TimeoutError:
                log.warning("drain would take over queue.stop_timeout_s (%g s); dropping what is left", timeout)
                abandoned = True
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)
            except Exception:
                pass  # already logged by the task's done callback
        for item in self._inflight + self.queue.drain():
            if item.kind == "frame":
                self._drop(item, "shutdown")
        self._inflight = []
        await self._cancel("stats")
        await self._cancel("watchdog")
        log.info("final %s", self.stats_line(self.stats()))
        if self.recorder is not None:
            try:
                await asyncio.wait_for(self.recorder.close(), max(deadline - time.monotonic(), 1.0))
            except asyncio.TimeoutError:
                log.error("recordings still being written at queue.stop_timeout_s; the last pages may be cut")
        for sock in (self.sub, self.pub):
            if sock is not None:
                sock.close(linger=LINGER_MS)
        await asyncio.to_thread(self.ctx.term)
        if self.metrics is not None:
            self.latency_observer = None
            await asyncio.to_thread(self.metrics.close)
        if self.engine is not None and self._owns_engine:
            await asyncio.to_thread(self.engine.close, not abandoned)  # a batch still running is left behind
        self.notifier.close()
        log.info("stopped")

    def _spawn(self, name: str, coro: Any) -> None:
        task = asyncio.create_task(coro, name=f"stemd-{name}")
        task.add_done_callback(self._task_done)
        self._tasks[name] = task

    def _task_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("task %s failed; shutting down", task.get_name(), exc_info=task.exception())
        self.failed = True
        self.request_stop()

    async def _cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # ---- sockets ----------------------------------------------------------------------

    # The engine and both sockets are set by `start` (the engine may be given); what runs after it uses these.
    @property
    def _engine(self) -> Engine:
        assert self.engine is not None, "the engine is loaded by start()"
        return self.engine

    @property
    def _pub(self) -> zmq.asyncio.Socket:
        assert self.pub is not None, "the output socket is opened by start()"
        return self.pub

    @property
    def _sub(self) -> zmq.asyncio.Socket:
        assert self.sub is not None, "the input socket is opened by start()"
        return self.sub

    @property
    def input_endpoint(self) -> str:
        """The input endpoint; when bound, the actual one (a `*` port resolved)."""
        if self.sub is not None and self.settings.input.mode == "bind":
            return self.sub.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.settings.input.endpoint

    @property
    def output_endpoint(self) -> str:
        """The actual bound output endpoint (a `*` port resolved)."""
        return self.pub.getsockopt_string(zmq.LAST_ENDPOINT) if self.pub is not None else self.settings.output.endpoint

    def _bind(self, sock: zmq.asyncio.Socket, endpoint: str, key: str) -> None:
        if not is_local_endpoint(endpoint):
            log.warning("%s %s is not a loopback address: anyone who can reach it can connect", key, endpoint)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigError(f"{key}: cannot bind {endpoint}: {exc}") from None

    def _open_output(self, s: Settings) -> zmq.asyncio.Socket:
        pub = self.ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, s.output.hwm)
        self._bind(pub, s.output.endpoint, "output.endpoint")
        return pub

    def _frame_pixels(self, s: Settings) -> int:
        """The most pixels a frame may have: limits.max_pixels, and no more than one batch may hold."""
        return min(s.limits.max_pixels, self.batch_pixels)

    def _open_input(self, s: Settings, subscribe: bool = True) -> zmq.asyncio.Socket:
        """The input socket (SUB or PULL, input.socket); without `subscribe`, a publisher sends a SUB nothing
        until `_subscribe`."""
        sub = self.ctx.socket(zmq.PULL if s.input.socket == "pull" else zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, s.input.hwm)
        sub.setsockopt(zmq.MAXMSGSIZE, protocol.max_part_bytes(self._frame_pixels(s)))  # ZeroMQ refuses larger
        if subscribe:
            _subscribe(sub, s)
        if s.input.mode == "bind":
            self._bind(sub, s.input.endpoint, "input.endpoint")
        else:
            try:
                sub.connect(s.input.endpoint)
            except zmq.ZMQError as exc:
                sub.close(linger=0)
                raise ConfigError(f"input.endpoint: cannot connect to {s.input.endpoint}: {exc}") from None
        return sub

    @staticmethod
    def _make_recorder(s: Settings) -> Recorder | None:
        r = s.recording
        if not r.enabled or not (r.raw or r.denoised):
            return None
        if r.format != "tiff":
            return HyperSpyRecorder(r.directory, fmt=r.format, raw=r.raw, denoised=r.denoised, max_open=r.max_open)
        return Recorder(r.directory, raw=r.raw, denoised=r.denoised, max_open=r.max_open)

    # ---- receiving --------------------------------------------------------------------

    async def _drain_socket(self, sub: zmq.asyncio.Socket, limit_s: float = DRAIN_SOCKET_S) -> int:
        """Take every message a socket already holds (until it has been quiet DRAIN_QUIET_S, at most
        `limit_s`): each is handled, so a frame is queued or counted, never dropped by closing the socket."""
        taken, deadline = 0, time.monotonic() + limit_s
        while time.monotonic() < deadline and await sub.poll(DRAIN_QUIET_S * 1e3):
            self.handle_message(await sub.recv_multipart(copy=False))
            taken += 1
        if taken:
            log.info("took %d message(s) still buffered on the input socket", taken)
        return taken

    async def _receive(self, sub: zmq.asyncio.Socket, connected: str | None) -> None:
        """Messages from `sub` (connected to the endpoint `connected`, or None when bound) to `handle_message`."""
        watch = asyncio.create_task(self._watch_input(sub, connected)) if connected else None
        try:
            while True:
                if self.settings.queue.mode == "lossless":
                    await self.queue.wait_for(lambda: len(self.queue) < self.queue.maxsize)
                parts = await sub.recv_multipart(copy=False)
                self.handle_message(parts)
        finally:
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)

    async def _watch_input(self, sub: zmq.asyncio.Socket, endpoint: str) -> None:
        """A connection ZeroMQ ends for breaking its rules (a part over MAXMSGSIZE) is never made again on its own,
        unlike one the peer closed: counted as rejected (oversize), said, and connected again."""
        mon = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CONNECT_DELAYED)
        try:
            while True:
                event = parse_monitor_message(await mon.recv_multipart())
                if event["event"] != zmq.EVENT_DISCONNECTED or await mon.poll(RECONNECT_WAIT_S * 1e3):
                    continue  # a retry follows a disconnect ZeroMQ recovers from by itself
                self._reject("oversize", f"ZeroMQ refused a message part over {int(sub.getsockopt(zmq.MAXMSGSIZE))} "
                             f"bytes from {endpoint} (limits.max_pixels, queue.max_batch_pixels) and dropped the "
                             f"connection; connecting again")
                with contextlib.suppress(zmq.ZMQError):
                    sub.disconnect(endpoint)
                sub.connect(endpoint)
        finally:
            sub.disable_monitor()
            mon.close(linger=0)

    def handle_message(self, parts: list[Any]) -> None:
        """Validate one message and queue it, or count it as rejected; never raises."""
        if self.settings.input.format == "array-1.0":
            self._take_frame(parts, protocol.decode_array)
            return
        topic = parts[0].bytes if hasattr(parts[0], "bytes") else bytes(parts[0])
        if topic == protocol.FRAME:
            self._take_frame(parts, protocol.decode_frame)
        elif topic == protocol.SERIES:
            try:
                _, header = protocol.decode_event(parts)
            except protocol.ProtocolError as exc:
                self._reject(exc.reason, exc.detail)
                return
            self._last_ids.pop(header["series_id"], None)
            self._put_event(Item("event", header, None, time.time()))
        else:
            self._reject("topic", f"unexpected topic {topic[:32]!r}")

    def _take_frame(self, parts: list[Any], decode: Callable[..., protocol.Frame]) -> None:
        """Decode a frame message with `decode` (the input format's), plan it and queue it, or count why not."""
        now = time.time()
        self.frames_in += 1
        lim = self.settings.limits
        try:
            frame = decode(
                parts, max_side=lim.max_side, max_pixels=self._frame_pixels(self.settings),
                min_side=max(lim.min_side, self._engine.window),
            )
        except protocol.ProtocolError as exc:
            self._reject(exc.reason, exc.detail)
            return
        self._track_series(frame.header)
        try:
            entry = self._plan(frame.header, frame.data)
        except SamplingError as exc:  # never queued, so it takes no place from a frame the model can take
            self._refuse([Item("frame", frame.header, frame.data, now)], exc)
            return
        dropped = self.queue.put_frame(
            Item("frame", frame.header, frame.data, now, entry[0], self._engine.generation, entry))
        if dropped is not None:
            self._drop(dropped, "queue_full")

    def _plan(self, header: dict[str, Any], data: np.ndarray) -> list[Any]:
        """The series' plan entry, [plan, frames planned by it, engine generation, the plan (or entry) it
        replaced]: the plan (`Denoiser.plan`, from the first frame's own lattice) remade every
        model.calibrate_every frames (keeping the replaced plan's fine-tuned model, `model.adapt`) or when the
        model changes, a refusal raised (SamplingError, kept likewise). Its plan is None until `_work` measures it
        on the engine's thread, never on this loop."""
        key = (header["series_id"], data.shape, header.get("pixel_size_m"))
        entry = self._plans.pop(key, None)
        if entry is None or entry[2] != self._engine.generation:
            entry = [None, 0, self._engine.generation, None]
        elif entry[1] >= self.settings.model.calibrate_every:
            entry = [None, 0, self._engine.generation, entry[0] if isinstance(entry[0], Plan) else entry]
        entry[1] += 1
        self._plans[key] = entry
        while len(self._plans) > MAX_SERIES_TRACKED:
            self._plans.popitem(last=False)
        if isinstance(entry[0], SamplingError):
            raise entry[0]
        return entry

    async def _measured_plan(self, item: Item) -> Plan:
        """The plan of a frame queued without one: its entry's if made meanwhile, else measured on this frame
        on the engine's worker thread (~0.1 s per 512² frame) and kept in the entry; or SamplingError."""
        assert item.data is not None
        entry = item.planned
        current = entry is not None and entry[2] == self._engine.generation
        made: Plan | SamplingError | None = entry[0] if entry is not None and current else None
        if made is None:
            try:
                previous = entry[3] if entry is not None and current else None
                while isinstance(previous, list):  # the replaced entry, if its plan was not yet made when replaced
                    previous = previous[0] if isinstance(previous[0], Plan) else previous[3]
                made = await self._engine.run(self._engine.plan, item.data.shape, item.header.get("pixel_size_m"),
                                              item.data, previous)
            except SamplingError as exc:
                made = exc
            if entry is not None and current:
                entry[0] = made
        if isinstance(made, SamplingError):
            raise made
        return made

    def _track_series(self, header: dict[str, Any]) -> None:
        """Notice frame ids going backwards in a series (a restarted publisher) and ids skipped forwards
        (frames lost before the daemon: a PUB drops silently at its high-water mark)."""
        sid, fid = header["series_id"], header["frame_id"]
        last = self._last_ids.pop(sid, None)
        if last is not None and fid <= last:
            self.restarts += 1
            log.info("series %r restarted at frame %d after frame %d (publisher restart?)", sid, fid, last)
            self._put_event(Item("restart", {"series_id": sid}))
        elif last is not None and fid > last + 1:
            if self.missing_upstream == 0:
                log.warning("series %r jumped from frame %d to %d: %d frame(s) never arrived (lost upstream?); "
                            "further gaps are counted in the stats", sid, last, fid, fid - last - 1)
            self.missing_upstream += fid - last - 1
        self._last_ids[sid] = fid
        while len(self._last_ids) > MAX_SERIES_TRACKED:
            self._last_ids.popitem(last=False)

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        if self.rejected[reason] == 1:
            log.warning(
                "rejected a message (%s): %s; further %r rejects are counted in the stats", reason, detail, reason
            )

    def _refuse(self, items: list[Item], exc: SamplingError) -> None:
        """Drop frames the sampling plan refuses (reason "sampling"); log why whenever the why changes."""
        detail = str(exc)
        if detail != self._sampling_said:
            self._sampling_said = detail
            log.warning("refusing frames (sampling): %s", detail)
        for item in items:
            self._drop(item, "sampling")

    def _drop(self, item: Item, reason: str) -> None:
        self.dropped[reason] += 1
        self.dropped_ids.append((item.header.get("series_id", ""), item.header.get("frame_id", -1), reason))
        if self.dropped[reason] == 1:
            log.warning("dropped a frame (%s); further drops are counted in the stats", reason)

    # ---- denoising and publishing -------------------------------------------------------

    async def _work(self) -> None:
        """Batches to the engine; batch k+1 is submitted before batch k is collected."""
        pending: tuple[list[Item], Pending] | None = None
        while True:
            head = self.queue.head()
            if head is None:
                if pending is not None:
                    await self._finish(*pending)
                    pending = None
                    continue
                if self.queue.closed:
                    return
                if self.fidelity.pending is not None:
                    await self._check_fidelity()
                    continue
                await self.queue.wait_for(lambda: not self.queue.empty or self.queue.closed)
                continue
            if head.kind != "frame":
                if pending is not None:
                    await self._finish(*pending)
                    pending = None
                await self._handle_event(self.queue.pop())
                continue
            batch = self.queue.pop_batch(self.settings.queue.max_batch, self.batch_pixels)
            self._inflight.extend(batch)
            try:
                plan = batch[0].plan
                if plan is None or batch[0].generation != self._engine.generation:  # new series, or a reload
                    plan = await self._measured_plan(batch[0])
                    for item in batch:
                        item.plan = plan  # the plan the header will describe
                started = time.perf_counter()
                handle = await self._engine.run(self._engine.submit, [it.data for it in batch], plan)
                self.fidelity.note_model_time(time.perf_counter() - started)
            except SamplingError as exc:  # the reloaded model refuses frames queued for the old one
                for item in batch:
                    self._inflight.remove(item)
                self._refuse(batch, exc)
                continue
            except Exception as exc:  # a model failure must not stop the daemon
                self._engine_failed(batch, exc)
                continue
            if pending is not None:
                await self._finish(*pending)
                pending = None
            if handle.result is not None:  # computed already (CPU): publish now, no added latency
                await self._finish(batch, handle)
            else:
                pending = (batch, handle)
            if self.fidelity.overdue:  # the engine is never idle: check now rather than never
                await self._check_fidelity()

    async def _check_fidelity(self) -> None:
        """Run the due fidelity check on the engine's thread and record it; a failure is counted, not raised."""
        due = self.fidelity.take()
        if due is None:
            return
        started = time.perf_counter()
        try:
            check = await self._engine.run(self.fidelity.run, self._engine.denoiser, due)
        except Exception as exc:
            self.fidelity.failed(due, exc, time.perf_counter() - started)
            return
        self.fidelity.record(check)

    def _engine_failed(self, batch: list[Item], exc: Exception) -> None:
        log.error("denoising a batch of %d failed: %s", len(batch), exc, exc_info=self.dropped["engine_error"] == 0)
        for item in batch:
            self._inflight.remove(item)
            self._drop(item, "engine_error")

    async def _finish(self, batch: list[Item], handle: Pending) -> None:
        try:
            started = time.perf_counter()
            results = (
                handle.result if handle.result is not None else await self._engine.run(self._engine.collect, handle)
            )
            self.fidelity.note_model_time(time.perf_counter() - started)
        except Exception as exc:
            self._engine_failed(batch, exc)
            return
        for item, denoised in zip(batch, results):
            self._inflight.remove(item)
            try:
                check_finite(denoised)
            except ModelOutputError as exc:
                log.error("frame %s of series %s: %s", item.header.get("frame_id"), item.header.get("series_id"), exc)
                self._drop(item, "nonfinite")
                continue
            sigma = self.fidelity.fallback_sigma(item.header["series_id"])
            output = denoised if sigma is None else await self._engine.run(reference_frame, item.data, sigma)
            await self._publish(item, output, "model" if sigma is None else "reference")
            fresh = item.plan if item.generation == self._engine.generation else None
            self.fidelity.offer(item.header, item.data, denoised, fresh)

    async def _publish(self, item: Item, denoised: np.ndarray, output: str = "model") -> None:
        assert item.data is not None  # a frame carries its data
        now = time.time()
        header = {
            **item.header,
            "model_id": self._engine.model_id,
            "model_version": self._engine.model_version,
            "received_at": item.received_at,
            "published_at": now,
            "latency_s": now - item.received_at,
            **({"sampling": item.plan.describe()} if item.plan is not None else {}),
            **self.fidelity.header(item.header["series_id"], output),
        }
        try:
            if self.settings.output.publish_raw:
                await self._pub.send_multipart(protocol.encode_frame(protocol.RAW, header, item.data), copy=False)
            await self._pub.send_multipart(protocol.encode_frame(protocol.DENOISED, header, denoised), copy=False)
        except zmq.ZMQError as exc:
            log.error("publishing frame %s failed: %s", item.header.get("frame_id"), exc)
            self._drop(item, "publish_error")
            return
        self.frames_out += 1
        self._latencies.append(header["latency_s"])
        if self.latency_observer is not None:
            self.latency_observer(header["latency_s"])
        if self.recorder is not None:
            await self.recorder.write("raw", _described(header, item.data), item.data)
            await self.recorder.write("denoised", _described(header, denoised), denoised)

    def _put_event(self, item: Item) -> None:
        """Queue an event; one pushed out by a flood is counted (`events_dropped`) and logged at a bounded rate."""
        if self.queue.put_event(item) is not None:
            self.events_dropped += 1
            if self._event_log.allow():
                log.warning("series events arrive faster than they are handled: %d dropped so far",
                            self.events_dropped)

    async def _handle_event(self, item: Item) -> None:
        sid = item.header["series_id"]
        if item.kind == "event":
            await self._pub.send_multipart(protocol.encode_event(protocol.SERIES, item.header))
            if self._event_log.allow():
                log.info("series %r %s", sid, item.header["event"])
        if self.recorder is not None:
            await self.recorder.end_series(sid)  # a start, end or restart all begin a new file

    # ---- stats and watchdog ---------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters since start; fps and latency percentiles since the previous call."""
        t, out_before = self._last_stats
        now = time.monotonic()
        lat = np.asarray(self._latencies, dtype=np.float64)
        self._latencies = []
        self._last_stats = (now, self.frames_out)
        return {
            "v": protocol.PROTOCOL_VERSION,
            "time": time.time(),
            "uptime_s": time.time() - self._started_at,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "dropped": dict(self.dropped),
            "rejected": dict(self.rejected),
            "restarts": self.restarts,
            "events_dropped": self.events_dropped,
            "missing_upstream": self.missing_upstream,
            "fps": (self.frames_out - out_before) / max(now - t, 1e-9),
            "latency_p50_s": float(np.percentile(lat, 50)) if lat.size else None,
            "latency_p99_s": float(np.percentile(lat, 99)) if lat.size else None,
            "queue_depth": len(self.queue),
            "device": self.engine.device_name if self.engine else "",
            "memory_bytes": self.engine.memory_bytes() if self.engine else 0,
            "model_id": self.engine.model_id if self.engine else "",
            "recording_errors": self._recording_errors + (self.recorder.errors if self.recorder else 0),
            "fidelity": self.fidelity.stats(),
        }

    @staticmethod
    def stats_line(st: dict[str, Any]) -> str:
        """One human line for the log and systemd STATUS=."""
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1e3:.1f}"

        return (
            f"stats: in {st['frames_in']} out {st['frames_out']} dropped {sum(st['dropped'].values())} "
            f"{st['dropped'] or ''} rejected {sum(st['rejected'].values())} {st['rejected'] or ''} "
            f"fps {st['fps']:.1f} latency p50 {ms(st['latency_p50_s'])} ms p99 {ms(st['latency_p99_s'])} ms "
            f"queue {st['queue_depth']} device {st['device']} mem {st['memory_bytes'] / 2**20:.0f} MiB"
            f"{' fidelity ' + st['fidelity']['status'] if 'fidelity' in st else ''}"
        ).replace("  ", " ")

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.stats.interval_s)
            st = self.stats()
            line = self.stats_line(st)
            log.info("%s", line)
            self.notifier.status(line, fidelity=st["fidelity"]["status"])
            await self._pub.send_multipart(protocol.encode_event(protocol.STATS, st))
            if self.recorder is not None:
                await self.recorder.close_idle(self.settings.recording.idle_close_s)

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            worker = self._tasks.get("worker")
            if worker is not None and not worker.done():
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    # ---- reload ---------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config file and the model; on any error keep the old ones (False)."""
        async with self._reload_lock:
            if self._stopping:
                return False
            old_batch_pixels = self.batch_pixels
            try:
                new = await asyncio.to_thread(load_settings, self.config_path, self.overrides, self.environ)
                denoiser = await asyncio.to_thread(Denoiser.load, None, new.model)
                old, old_frame_pixels = self.settings, self._frame_pixels(self.settings)
                self.batch_pixels = new.queue.max_batch_pixels or self._derived_batch_pixels
                pub = self._open_output(new) if new.output.endpoint != old.output.endpoint else None
                try:
                    reopen = new.input != old.input or self._frame_pixels(new) != old_frame_pixels  # MAXMSGSIZE
                    sub = self._open_input(new, subscribe=False) if reopen else None  # no copies while both are open
                except Exception:
                    if pub is not None:
                        pub.close(linger=0)
                    raise
            except Exception as exc:  # StemdError, OSError; anything else is a bug: its traceback too
                self.reload_failures += 1
                self.batch_pixels = old_batch_pixels
                log.error("reload rejected, keeping the running config and model: %s", exc,
                          exc_info=not isinstance(exc, (StemdError, OSError)))
                return False
            await self._engine.run(self._engine.replace, denoiser)
            self.fidelity.configure(new.fidelity, model_changed=True)
            if pub is not None:
                self._pub.close(linger=LINGER_MS)
                self.pub = pub
            else:
                self._pub.setsockopt(zmq.SNDHWM, new.output.hwm)
            if sub is not None:
                await self._cancel("receiver")
                await self._drain_socket(self._sub)  # the old input's backlog, before it is closed
                self._sub.close(linger=0)
                _subscribe(sub, new)  # what the publisher sent meanwhile is lost there: counted as missing_upstream
                self.sub = sub
                self._spawn("receiver", self._receive(sub, _connected(new)))
            self.queue.maxsize, self.queue.mode = new.queue.maxsize, new.queue.mode
            if new.recording != old.recording:
                if self.recorder is not None:
                    await self.recorder.close()
                    self._recording_errors += self.recorder.errors
                self.recorder = self._make_recorder(new)
            self._apply_log_level(new)
            self.settings = new
            self.reloads += 1
            log.info(
                "reloaded %s: model %s, output %s",
                self.config_path or "defaults",
                self._engine.model_id,
                self.output_endpoint,
            )
            return True


def start_metrics(daemon: Daemon, endpoint: str) -> MetricsServer:
    """Serve `daemon`'s Prometheus metrics on `endpoint`; ConfigError without prometheus_client."""
    try:
        from stemd.live.prometheus import MetricsServer
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("prometheus_client"):
            raise
        raise ConfigError("metrics.endpoint needs the metrics extra: pip install stemd[metrics]") from None
    return MetricsServer(daemon, endpoint)


def _subscribe(sub: zmq.asyncio.Socket, s: Settings) -> None:
    """A SUB input takes the stemd topics, or every message for array-1.0 (no topic part); PULL needs nothing."""
    if s.input.socket == "sub":
        for topic in (protocol.FRAME, protocol.SERIES) if s.input.format == "stemd" else (b"",):
            sub.setsockopt(zmq.SUBSCRIBE, topic)


def _connected(s: Settings) -> str | None:
    """The input endpoint the daemon connects to; None when it binds."""
    return s.input.endpoint if s.input.mode == "connect" else None


def _described(header: dict[str, Any], data: np.ndarray) -> dict[str, Any]:
    """The header as recorded beside `data`: its own dtype, native byte order."""
    return {**header, "dtype": data.dtype.name, "byte_order": protocol.NATIVE_BYTE_ORDER}


# ---- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML settings (config/stemd.yaml documents every key)")
    add_setting_options(
        parser,
        ("input.endpoint", "input.format", "input.socket", "output.endpoint", "queue.mode", "metrics.endpoint",
         *MODEL_KEYS),
    )
    parser.add_argument("--bind-input", action="store_true", help="bind the input endpoint instead of connecting")
    parser.add_argument("--record", type=Path, metavar="DIR", help="record TIFFs into DIR (enables recording)")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted-key overrides for `load_settings` from the command line (options not given are left out)."""
    overrides = setting_overrides(args)
    if args.bind_input:
        overrides["input.mode"] = "bind"
    if args.record:
        overrides.update({"recording.enabled": True, "recording.directory": str(args.record)})
    return overrides


async def serve(settings: Settings, config_path: Path | None = None, overrides: Mapping[str, Any] | None = None,
                manage_log_level: bool = True, environ: Mapping[str, str] | None = None) -> int:
    """Run a daemon until SIGTERM/SIGINT; SIGHUP reloads config and model."""
    daemon = Daemon(settings, config_path=config_path, overrides=overrides, environ=environ,
                    manage_log_level=manage_log_level)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    reloads: set[asyncio.Task[bool]] = set()  # referenced until done, so none is collected mid-reload

    def on_sighup() -> None:
        task = asyncio.ensure_future(daemon.reload())
        reloads.add(task)
        task.add_done_callback(_reload_done)

    def _reload_done(task: asyncio.Task[bool]) -> None:
        reloads.discard(task)
        if not task.cancelled() and task.exception() is not None:  # reload() catches all: a bug, said here
            log.error("reload failed: %s", task.exception(), exc_info=task.exception())

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    try:
        return await daemon.serve()
    except BaseException:
        await daemon.stop()
        raise


def run(args: argparse.Namespace) -> int:
    overrides = overrides_from_args(args)
    settings = load_settings(args.config, overrides, os.environ)
    rc = asyncio.run(serve(settings, args.config, overrides, manage_log_level=not getattr(args, "verbose", False),
                           environ=os.environ))
    ours = [t for t in threading.enumerate() if t.name.startswith("stemd-")]
    for t in ours:
        t.join(0.5)
    left = [t for t in ours if t.is_alive()]
    if left:  # a batch that missed queue.stop_timeout_s (its frames counted as dropped) must not hold up the exit
        log.warning("exiting without waiting for %s", ", ".join(t.name for t in left))
        logging.shutdown()
        os._exit(rc)
    return rc
