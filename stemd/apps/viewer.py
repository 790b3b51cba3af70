"""`stemd view`: raw and denoised frames from a running daemon, side by side.

With a display (DISPLAY or WAYLAND_DISPLAY set and an interactive matplotlib backend that
loads) it opens a window updated live with fps, latency and the series' live fidelity estimate.
`--snapshot PNG` instead writes
the latest raw/denoised pair (matched by series_id and frame_id) to a PNG and exits; it
works headless (Agg). The pieces (`PairMatcher`, `LiveStats`, `render_panels`, `write_png`)
are pure or file-only and shared with `stemd demo`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from stemd.config import OutputSettings
from stemd.errors import ConfigError, StemdError
from stemd.live import protocol

if TYPE_CHECKING:
    from matplotlib.figure import Figure  # imported on first use at run time (start-up cost)

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = OutputSettings().endpoint
KINDS = {protocol.RAW: "raw", protocol.DENOISED: "denoised", protocol.CLEAN: "clean"}
INTERACTIVE_BACKENDS = ("QtAgg", "TkAgg", "GTK4Agg", "GTK3Agg", "WXAgg", "MacOSX")


class NoFramesError(StemdError):
    """Nothing usable arrived from the endpoint within the timeout."""


FrameKey = tuple[str, int]


def frame_key(header: dict[str, Any]) -> FrameKey:
    return (str(header["series_id"]), int(header["frame_id"]))


@dataclass
class PairMatcher:
    """Collects frames of several kinds and yields the set once every kind of one id is in.

    Memory is bounded: at most `keep` incomplete ids are held, the oldest forgotten first.
    """

    kinds: tuple[str, ...] = ("raw", "denoised")
    keep: int = 64
    latest: dict[str, protocol.Frame] | None = None
    _partial: OrderedDict[FrameKey, dict[str, protocol.Frame]] = field(default_factory=OrderedDict)

    def add(self, kind: str, frame: protocol.Frame) -> dict[str, protocol.Frame] | None:
        """Add one frame; returns {kind: frame} when this completes an id (also kept as `latest`)."""
        if kind not in self.kinds:
            return None
        key = frame_key(frame.header)
        got = self._partial.setdefault(key, {})
        got[kind] = frame
        if len(got) < len(self.kinds):
            while len(self._partial) > self.keep:
                self._partial.popitem(last=False)
            return None
        del self._partial[key]
        self.latest = got
        return got


@dataclass
class LiveStats:
    """fps and latency seen by a viewer: from the daemon's STATS when it sends them, else local."""

    window_s: float = 5.0
    daemon: dict[str, Any] | None = None
    _arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    _latencies: deque[float] = field(default_factory=lambda: deque(maxlen=256))

    def frame(self, header: dict[str, Any], now: float) -> None:
        self._arrivals.append(now)
        latency = header.get("latency_s")
        if isinstance(latency, (int, float)) and math.isfinite(latency):
            self._latencies.append(float(latency))

    def stats(self, header: dict[str, Any]) -> None:
        self.daemon = header

    def fps(self, now: float) -> float:
        recent = [t for t in self._arrivals if now - t <= self.window_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-9)

    def text(self, now: float) -> str:
        """One line: fps and latency p50/p99, the daemon's figures when known."""
        d = self.daemon or {}
        fps = d.get("fps") if isinstance(d.get("fps"), (int, float)) else self.fps(now)
        p50, p99 = d.get("latency_p50_s"), d.get("latency_p99_s")
        if not isinstance(p50, (int, float)) and self._latencies:
            p50, p99 = (float(np.percentile(self._latencies, q)) for q in (50, 99))
        lat = f"latency p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms" if isinstance(p50, (int, float)) \
            and isinstance(p99, (int, float)) else "latency n/a"
        return f"{fps:.1f} fps, {lat}"


def fidelity_text(header: dict[str, Any]) -> str:
    """One line from a denoised header's `fidelity` map (docs/protocol.md): the series' running held-out gain over
    the reference and over raw (mean ± spread), the residual check, and the flag; "" when the header has none."""
    f = header.get("fidelity")
    if not isinstance(f, dict):
        return ""
    if not f.get("checks"):
        return "fidelity: not checked yet"

    def pm(key: str, spread_key: str, unit: str = " dB", sign: str = "+") -> str:
        mean, spread = f.get(key), f.get(spread_key)
        if not isinstance(mean, (int, float)):
            return "n/a"
        text = f"{mean:{sign}.2f}"
        return text + (f" ± {spread:.2f}" if isinstance(spread, (int, float)) and f["checks"] > 1 else "") + unit

    over, gain = pm("over_reference_db", "over_reference_spread_db"), pm("gain_db", "gain_spread_db")
    line = (f"fidelity ({f['checks']} checks): {over} over the reference, {gain} over raw, "
            f"residual {pm('residual', 'residual_spread', '', '')}")
    if f.get("invalid_checks"):
        line += f"  ({f['invalid_checks']} left out: correlated noise, no valid split)"
    if f.get("flagged"):
        reasons = "; ".join(str(r) for r in f.get("reasons", []))
        shown = ", showing the reference filter" if f.get("output") == "reference" else ""
        line += f"  FLAGGED: {reasons}{shown}"
    return line


def _limits(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image, (0.5, 99.5))
    return (float(lo), float(hi) if hi > lo else float(lo) + 1.0)


def render_panels(panels: Sequence[tuple[str, np.ndarray]], title: str = "") -> Figure:
    """A matplotlib Figure (no pyplot, any backend) with the images side by side, grey scale."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(panels), 4.4), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, image) in zip(axes, panels):
        lo, hi = _limits(image)
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def check_png_path(path: Path | str, option: str) -> Path:
    """A writable-looking .png path, checked before any waiting; ConfigError names `option`."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"{option} must name a .png file (got {str(path)!r})")
    if not path.parent.is_dir():
        raise ConfigError(f"{option}: directory {str(path.parent)!r} does not exist")
    return path


def write_png(path: Path | str, panels: Sequence[tuple[str, np.ndarray]], title: str = "",
              metadata: dict[str, str] | None = None) -> Path:
    """Write the panels to a PNG; `metadata` goes into the PNG's text chunks."""
    path = Path(path)
    fig = render_panels(panels, title)
    try:
        fig.savefig(path, format="png", metadata=metadata)
    except OSError as exc:
        raise StemdError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def describe(pair: dict[str, protocol.Frame]) -> str:
    """A title line for a matched set: series, frame, shape and the model that denoised it."""
    some = next(iter(pair.values())).header
    model = (pair.get("denoised") or next(iter(pair.values()))).header.get("model_id", "?")
    h, w = some["shape"]
    return f"{some['series_id']} frame {some['frame_id']} ({h}x{w}), model {model}"


def pair_metadata(pair: dict[str, protocol.Frame]) -> dict[str, str]:
    some = next(iter(pair.values())).header
    fidelity = fidelity_text((pair.get("denoised") or next(iter(pair.values()))).header)
    return {"Software": "stemd", "Description": describe(pair),
            "stemd:series_id": str(some["series_id"]), "stemd:frame_id": str(some["frame_id"]),
            **({"stemd:fidelity": fidelity} if fidelity else {})}


def title(pair: dict[str, protocol.Frame], stats: LiveStats, now: float) -> str:
    """The figure title: the pair, fps and latency, and the series' fidelity when the daemon checks it."""
    fidelity = fidelity_text(pair["denoised"].header) if "denoised" in pair else ""
    return "\n".join(filter(None, [describe(pair), stats.text(now), fidelity]))


class Subscription:
    """A SUB socket on a daemon's output that decodes what it receives; bad messages are skipped."""

    def __init__(self, endpoint: str, topics: Iterable[bytes], context: zmq.SyncContext | None = None) -> None:
        if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(f"--endpoint must start with tcp://, ipc:// or inproc:// (got {endpoint!r})")
        self.endpoint = endpoint
        self.skipped = 0
        self._sock = (context or zmq.Context.instance()).socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, 16)
        self._sock.setsockopt(zmq.LINGER, 0)
        for topic in topics:
            self._sock.setsockopt(zmq.SUBSCRIBE, topic)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close()
            raise ConfigError(f"--endpoint: cannot connect to {endpoint}: {exc}") from None

    def receive(self, timeout_s: float, limit: int | None = None) -> list[tuple[bytes, Any]]:
        """Everything waiting, at most `limit` messages (after up to `timeout_s` for the first; 0: never
        waits): (topic, Frame or header)."""
        out: list[tuple[bytes, Any]] = []
        wait_ms, taken = max(0, int(timeout_s * 1000)), 0
        while (limit is None or taken < limit) and self._sock.poll(wait_ms):
            wait_ms, taken = 0, taken + 1
            parts = self._sock.recv_multipart(copy=False)
            topic = bytes(parts[0].buffer)
            try:
                if topic in (protocol.STATS, protocol.SERIES):
                    out.append(protocol.decode_event(parts))
                else:
                    out.append((topic, protocol.decode_frame(parts, min_side=1)))
            except protocol.ProtocolError as exc:
                self.skipped += 1
                log.debug("skipped a malformed %r message: %s", topic, exc)
        return out

    def close(self) -> None:
        self._sock.close(linger=0)


def feed(messages: list[tuple[bytes, Any]], matcher: PairMatcher, stats: LiveStats, now: float) -> bool:
    """Route received messages; True when a new matched pair completed."""
    new = False
    for topic, item in messages:
        if topic == protocol.STATS:
            stats.stats(item)
        elif topic in KINDS:
            if topic == protocol.DENOISED:
                stats.frame(item.header, now)
            new = matcher.add(KINDS[topic], item) is not None or new
    return new


def snapshot(endpoint: str, png: Path | str, timeout_s: float = 10.0,
             context: zmq.SyncContext | None = None) -> dict[str, protocol.Frame]:
    """Wait for the first matched raw/denoised pair, write it to `png`, return it."""
    if not timeout_s > 0:
        raise ConfigError(f"--timeout must be > 0 (got {timeout_s!r})")
    check_png_path(png, "--snapshot")
    sub = Subscription(endpoint, (protocol.RAW, protocol.DENOISED, protocol.STATS), context)
    matcher, stats = PairMatcher(), LiveStats()
    deadline = time.monotonic() + timeout_s
    try:
        while matcher.latest is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoFramesError(_nothing_message(endpoint, timeout_s, sub.skipped))
            feed(sub.receive(min(left, 0.2)), matcher, stats, time.time())
    finally:
        sub.close()
    pair = matcher.latest
    write_png(png, [("raw", pair["raw"].data), ("denoised", pair["denoised"].data)],
              title(pair, stats, time.time()), pair_metadata(pair))
    return pair


def _nothing_message(endpoint: str, timeout_s: float, skipped: int) -> str:
    bad = f" ({skipped} malformed messages skipped)" if skipped else ""
    return (f"no matched raw/denoised frame pair from {endpoint} within {timeout_s:g} s{bad}: "
            "is `stemd run` running there with output.publish_raw on?")


def interactive_backend() -> str | None:
    """The name of an interactive matplotlib backend that loads, or None when headless."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return None
    import matplotlib

    for name in INTERACTIVE_BACKENDS:
        try:
            matplotlib.use(name, force=True)
            import matplotlib.pyplot  # noqa: F401  (fails here when the toolkit is missing)
            return name
        except (ImportError, RuntimeError, ValueError):
            continue
    return None


def show(endpoint: str, timeout_s: float = 10.0, duration_s: float | None = None) -> int:
    """A live window until it is closed (or `duration_s` passes); returns the pairs shown.

    NoFramesError when no pair arrives within `timeout_s`.
    """
    import matplotlib.pyplot as plt

    sub = Subscription(endpoint, (protocol.RAW, protocol.DENOISED, protocol.STATS))
    matcher, stats = PairMatcher(), LiveStats()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4), layout="constrained")
    images = None
    shown = 0
    started = time.monotonic()
    try:
        while plt.fignum_exists(fig.number):
            if duration_s is not None and time.monotonic() - started > duration_s:
                break
            if feed(sub.receive(0.02), matcher, stats, time.time()):
                shown += 1
                pair = matcher.latest
                assert pair is not None  # feed said a pair completed
                if images is None:
                    images = [ax.imshow(pair[k].data, cmap="gray") for ax, k in zip(axes, ("raw", "denoised"))]
                    for ax, k in zip(axes, ("raw", "denoised")):
                        ax.set_title(k)
                        ax.set_axis_off()
                for im, k in zip(images, ("raw", "denoised")):
                    im.set_data(pair[k].data)
                    im.set_clim(*_limits(pair[k].data))
                fig.suptitle(title(pair, stats, time.time()), fontsize=10)
            elif images is None and time.monotonic() - started > timeout_s:
                raise NoFramesError(_nothing_message(endpoint, timeout_s, sub.skipped))
            plt.pause(0.03)
    finally:
        sub.close()
        plt.close(fig)
    return shown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="the daemon's output (default %(default)s)")
    parser.add_argument("--snapshot", metavar="PNG", type=Path,
                        help="write the latest raw/denoised pair to PNG and exit (works headless)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="give up when no frame pair arrives within S seconds (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be > 0 (got {args.timeout!r})")
    if args.snapshot is not None:
        pair = snapshot(args.endpoint, args.snapshot, args.timeout)
        print(f"wrote {args.snapshot}: {describe(pair)}")
        return 0
    backend = interactive_backend()
    if backend is None:
        raise StemdError("no display (DISPLAY/WAYLAND_DISPLAY unset or no interactive matplotlib backend): "
                         "use --snapshot PNG to write the latest raw/denoised pair to a file")
    log.info("showing %s with the %s backend; close the window to stop", args.endpoint, backend)
    show(args.endpoint, args.timeout)
    return 0
