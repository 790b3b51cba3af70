"""Prometheus metrics for the daemon: `/metrics` over HTTP, on its own registry.

A custom collector reads the daemon's own counters at scrape time (no second bookkeeping); the one
thing the daemon does not keep is a latency distribution, so `_publish` hands each published
frame's receive->publish latency to the `stemd_latency_seconds` histogram (`Daemon.latency_observer`).
The server runs in its own threads; a scrape reads plain ints and copies of small dicts, which is
safe under the GIL. Import this module only when `metrics.endpoint` is set: it needs the optional
`prometheus_client` (pip install stemd[metrics]).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sized
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from stemd.config import is_local_host, parse_metrics_endpoint
from stemd.errors import ConfigError
from stemd.live.engine import Engine
from stemd.live.recorder import Recorder

log = logging.getLogger(__name__)

# receive -> publish latency: 1 ms (a small frame, batched, on a GPU) to 10 s (a stalled CPU)
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Counted(Protocol):
    """What the collector reads from the daemon (`stemd.live.daemon.Daemon`; not imported: no cycle)."""

    @property
    def frames_in(self) -> int: ...
    @property
    def frames_out(self) -> int: ...
    @property
    def dropped(self) -> Mapping[str, int]: ...
    @property
    def rejected(self) -> Mapping[str, int]: ...
    @property
    def recorder(self) -> Recorder | None: ...
    @property
    def queue(self) -> Sized: ...
    @property
    def engine(self) -> Engine | None: ...


class DaemonCollector(Collector):
    """The daemon's counters as Prometheus metrics, read when scraped."""

    def __init__(self, daemon: Counted) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        yield CounterMetricFamily("stemd_frames_received", "frame messages received (valid or not)", d.frames_in)
        yield CounterMetricFamily("stemd_frames_published", "frames denoised and published", d.frames_out)
        dropped = CounterMetricFamily("stemd_frames_dropped", "valid frames not published, by reason",
                                      labels=["reason"])
        for reason, count in sorted(dict(d.dropped).items()):
            dropped.add_metric([reason], count)
        yield dropped
        rejected = CounterMetricFamily("stemd_frames_rejected", "malformed or out-of-limits messages, by reason",
                                       labels=["reason"])
        for reason, count in sorted(dict(d.rejected).items()):
            rejected.add_metric([reason], count)
        yield rejected
        recorder = d.recorder
        yield CounterMetricFamily("stemd_recording_errors", "recording writes that failed (the current recorder)",
                                  recorder.errors if recorder is not None else 0)
        yield GaugeMetricFamily("stemd_queue_depth", "frames waiting for the model", len(d.queue))
        engine = d.engine
        if engine is not None:
            info = InfoMetricFamily("stemd_model", "the resident model")
            info.add_metric([], {"model_id": engine.model_id, "device": engine.device_name,
                                 "precision": engine.precision})
            yield info


class MetricsServer:
    """`/metrics` for one daemon on `endpoint` (host:port or http://host:port); `close()` stops it."""

    def __init__(self, daemon: Counted, endpoint: str) -> None:
        host, port = parse_metrics_endpoint(endpoint)
        if not is_local_host(host):
            log.warning("metrics.endpoint %s is not a loopback address: anyone who can reach it can scrape it",
                        endpoint)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(daemon))
        self.latency = Histogram("stemd_latency_seconds", "receive->publish latency of each published frame",
                                 buckets=LATENCY_BUCKETS_S, registry=self.registry)
        try:
            self._server: WSGIServer
            self.thread: threading.Thread
            self._server, self.thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics.endpoint: cannot serve on {endpoint}: {exc.strerror or exc}") from None
        self.host, self.port = host, self._server.server_port
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{self.port}/metrics"
        log.info("metrics on %s", self.url)

    def close(self) -> None:
        """Stop serving and release the port (blocks up to the server's 0.5 s poll)."""
        self._server.shutdown()
        self._server.server_close()
        self.thread.join(timeout=5)
