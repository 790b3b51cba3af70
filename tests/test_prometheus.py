"""Prometheus /metrics: the real daemon over loopback, scraped over HTTP; counters match its stats."""

from __future__ import annotations

import asyncio
import socket
import sys
import urllib.error
import urllib.request

import pytest
from conftest import TestPublisher
from test_daemon import Sub, denoised, frame_parts, make_settings, running, wait_until

from stemd.errors import ConfigError
from stemd.live import daemon as daemon_module
from stemd.live import protocol as p
from stemd.live.daemon import Daemon
from stemd.live.engine import Engine
from stemd.live.notify import Notifier

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from stemd.live.prometheus import LATENCY_BUCKETS_S  # noqa: E402


@pytest.fixture(scope="module")
def engine(checkpoint):
    eng = Engine.load(path=checkpoint, device="cpu")
    yield eng
    eng.close()


def scrape(url: str) -> dict[str, list]:
    """Metric family name (a counter's without `_total`, as the parser gives it) -> its samples."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {fam.name: fam.samples for fam in text_string_to_metric_families(text)}


def value(families: dict, sample_name: str, **labels) -> float:
    """The value of the one sample named `sample_name` with exactly `labels`."""
    found = [s.value for samples in families.values() for s in samples if s.name == sample_name and s.labels == labels]
    assert len(found) == 1, f"{sample_name}{labels}: {len(found)} samples in {sorted(families)}"
    return found[0]


async def test_metrics_match_the_daemon_counters(zctx, checkpoint, engine) -> None:
    pub = TestPublisher(zctx)
    settings = make_settings(checkpoint, pub.endpoint, **{"metrics.endpoint": "127.0.0.1:0"})
    async with running(settings, engine=engine) as d:
        assert d.metrics is not None and d.metrics.port > 0
        url = d.metrics.url
        sub = Sub(zctx, d.output_endpoint)
        await sub.ready()
        await pub.wait_subscribed()
        await pub.send([p.FRAME, b"not msgpack", b"x"])  # malformed: counted as rejected
        for fid in range(3):
            await pub.send(frame_parts("prom", fid))
        await sub.until(lambda m: len(denoised(m)) == 3)
        await wait_until(lambda: d.frames_in == 4)
        fams = await asyncio.to_thread(scrape, url)
        st = d.stats()
        assert value(fams, "stemd_frames_received_total") == st["frames_in"] == 4
        assert value(fams, "stemd_frames_published_total") == st["frames_out"] == 3
        assert st["rejected"] and sum(st["rejected"].values()) == 1
        for reason, count in st["rejected"].items():
            assert value(fams, "stemd_frames_rejected_total", reason=reason) == count
        assert not st["dropped"] and not fams["stemd_frames_dropped"]
        assert value(fams, "stemd_recording_errors_total") == st["recording_errors"] == 0
        assert value(fams, "stemd_queue_depth") == st["queue_depth"] == 0
        assert fams["stemd_queue_depth"][0].name == "stemd_queue_depth"
        (info,) = [s for samples in fams.values() for s in samples if s.name == "stemd_model_info"]
        assert info.value == 1
        assert info.labels == {"model_id": engine.model_id, "device": engine.device_name,
                               "precision": engine.precision}
        hist = {(s.name, s.labels.get("le")): s.value for s in fams["stemd_latency_seconds"]}
        assert hist[("stemd_latency_seconds_count", None)] == 3
        assert hist[("stemd_latency_seconds_bucket", "+Inf")] == 3
        assert len([k for k in hist if k[0] == "stemd_latency_seconds_bucket"]) == len(LATENCY_BUCKETS_S) + 1
        assert 0 < hist[("stemd_latency_seconds_sum", None)] < 3 * 10

        # counters move with the daemon between scrapes (read at scrape time, not copied at start)
        await pub.send(frame_parts("prom", 3))
        await sub.until(lambda m: len(denoised(m)) == 1)
        fams = await asyncio.to_thread(scrape, url)
        assert value(fams, "stemd_frames_published_total") == d.frames_out == 4
        assert value(fams, "stemd_latency_seconds_count") == 4
    # stopped: the server thread ended and the port is released
    assert d.metrics is not None and not d.metrics.thread.is_alive()
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(urllib.request.urlopen, url, timeout=2)
    pub.close()


async def test_two_daemons_have_separate_registries(zctx, checkpoint, engine) -> None:
    pub = TestPublisher(zctx)
    settings = make_settings(checkpoint, pub.endpoint, **{"metrics.endpoint": "http://127.0.0.1:0"})
    async with running(settings, engine=engine) as a, running(settings, engine=engine) as b:
        assert a.metrics is not None and b.metrics is not None and a.metrics.port != b.metrics.port
        a.frames_in = 7
        assert value(await asyncio.to_thread(scrape, a.metrics.url), "stemd_frames_received_total") == 7
        assert value(await asyncio.to_thread(scrape, b.metrics.url), "stemd_frames_received_total") == 0
    pub.close()


async def test_off_by_default_nothing_listens(zctx, checkpoint, engine, monkeypatch) -> None:
    started = []
    monkeypatch.setattr(daemon_module, "start_metrics", lambda *a: started.append(a))
    pub = TestPublisher(zctx)
    settings = make_settings(checkpoint, pub.endpoint)
    assert settings.metrics.endpoint is None
    async with running(settings, engine=engine) as d:
        assert d.metrics is None and d.latency_observer is None
    assert started == []
    pub.close()


def free_port_in_use() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


async def test_port_in_use_is_a_config_error(zctx, checkpoint, engine) -> None:
    taken = free_port_in_use()
    port = taken.getsockname()[1]
    pub = TestPublisher(zctx)
    d = Daemon(make_settings(checkpoint, pub.endpoint, **{"metrics.endpoint": f"127.0.0.1:{port}"}),
               engine=engine, notifier=Notifier(""))
    with pytest.raises(ConfigError, match=rf"^metrics.endpoint: cannot serve on 127.0.0.1:{port}: [^\n]+$"):
        await d.start()
    await d.stop()
    taken.close()
    pub.close()


@pytest.mark.parametrize("endpoint", ["9108", "127.0.0.1", "127.0.0.1:99999", "tcp://127.0.0.1:9108",
                                      "http://127.0.0.1:9108/metrics", ":9108"])
def test_bad_endpoint_is_a_config_error(checkpoint, endpoint) -> None:
    with pytest.raises(ConfigError, match="metrics.endpoint"):
        make_settings(checkpoint, "tcp://127.0.0.1:5555", **{"metrics.endpoint": endpoint})


async def test_address_not_here_is_a_config_error(zctx, checkpoint, engine) -> None:
    pub = TestPublisher(zctx)
    d = Daemon(make_settings(checkpoint, pub.endpoint, **{"metrics.endpoint": "192.0.2.1:0"}),  # TEST-NET-1
               engine=engine, notifier=Notifier(""))
    with pytest.raises(ConfigError, match="metrics.endpoint"):
        await d.start()
    await d.stop()
    pub.close()


async def test_non_loopback_host_warns(zctx, checkpoint, engine, caplog) -> None:
    pub = TestPublisher(zctx)
    async with running(make_settings(checkpoint, pub.endpoint, **{"metrics.endpoint": "0.0.0.0:0"}),
                       engine=engine) as d:
        assert d.metrics is not None
    assert any("metrics.endpoint" in r.getMessage() and "not a loopback" in r.getMessage() for r in caplog.records)
    pub.close()


async def test_without_prometheus_client_one_line_error(zctx, checkpoint, engine, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import prometheus_client raises ImportError
    monkeypatch.delitem(sys.modules, "stemd.live.prometheus")
    pub = TestPublisher(zctx)
    d = Daemon(make_settings(checkpoint, pub.endpoint, **{"metrics.endpoint": "127.0.0.1:0"}),
               engine=engine, notifier=Notifier(""))
    with pytest.raises(ConfigError, match=r"^metrics.endpoint needs the metrics extra: pip install stemd\[metrics\]$"):
        await d.start()
    await d.stop()
    pub.close()


def test_run_metrics_option_and_environment() -> None:
    from stemd.apps.cli import build_parser
    from stemd.config import load_settings
    from stemd.live.daemon import overrides_from_args

    args = build_parser().parse_args(["run", "--metrics", "127.0.0.1:9108"])
    assert load_settings(None, overrides_from_args(args)).metrics.endpoint == "127.0.0.1:9108"
    env = {"STEMD_METRICS__ENDPOINT": "http://localhost:9108"}
    assert load_settings(None, None, env).metrics.endpoint == "http://localhost:9108"
