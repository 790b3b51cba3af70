"""The simulator: pure frame generation, then the publisher on real loopback sockets."""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
import zmq.asyncio

from stemd.apps.cli import main
from stemd.apps.simulate import Simulator, frame_metadata
from stemd.errors import ConfigError
from stemd.live import protocol
from stemd.sim.microscope import SimSpec, build_specimen, crop, drift_offset, make_frame, poisson_table, sample_poisson

SMALL = SimSpec(shape=(64, 80), margin_px=8)


@pytest.fixture(scope="module")
def scene():
    return build_specimen(SMALL)


# --- pure generation -------------------------------------------------------------------------


def test_frame_is_uint16_counts_with_clean_expected_counts(scene):
    f = make_frame(scene, 0)
    assert f.raw.dtype == np.uint16 and f.raw.shape == (64, 80)
    assert f.clean.dtype == np.float32 and f.clean.shape == (64, 80)
    assert 0.8 * SMALL.dose < f.clean.max() <= 1.05 * SMALL.dose
    assert f.raw.max() > 0


def test_header_carries_full_metadata_and_decodes(scene):
    f = make_frame(scene, 3)
    header = frame_metadata(SMALL, "sim-x-0000", 7, f)
    decoded = protocol.decode_frame(protocol.encode_frame(protocol.FRAME, header, f.raw))
    h = decoded.header
    assert (h["series_id"], h["frame_id"], h["shape"], h["dtype"]) == ("sim-x-0000", 7, [64, 80], "uint16")
    assert h["dwell_time_s"] == pytest.approx(SMALL.dwell_us * 1e-6)
    assert h["pixel_size_m"] == SMALL.pixel_size_m
    assert h["detector"] == "HAADF (simulated)"
    assert h["scan_rotation_deg"] == SMALL.scan_rotation_deg
    assert h["simulated"] is True
    assert abs(h["acquired_at"] - time.time()) < 60
    np.testing.assert_array_equal(decoded.data, f.raw)


def test_crop_at_integer_offset_is_the_shifted_field(scene):
    a, b = crop(scene, (0.0, 0.0)), crop(scene, (3.0, -2.0))
    np.testing.assert_allclose(b[:-3, 2:], a[3:, :-2], atol=1e-6)
    assert not np.allclose(a, b, atol=1e-3)


def test_drift_is_continuous_across_frames_and_stays_in_the_field():
    spec = SimSpec(shape=(64, 64), margin_px=8, drift_px=0.5)
    sc = build_specimen(spec)
    offsets = np.array([drift_offset(sc, i) for i in range(400)])
    steps = np.hypot(*np.diff(offsets, axis=0).T)
    assert np.all(steps <= 0.5 + 1e-9) and np.median(steps) == pytest.approx(0.5)
    assert np.all(np.abs(offsets) <= 8)
    assert np.ptp(offsets, axis=0).max() > 8  # it really travels, and bounces back
    f0, f9 = make_frame(sc, 0), make_frame(sc, 9)
    assert f9.offset_px == drift_offset(sc, 9)
    assert not np.allclose(f0.clean, f9.clean, atol=0.05 * spec.dose)


def test_dose_scales_with_dwell_time():
    means = {}
    for dwell in (1.0, 4.0):
        spec = SimSpec(shape=(96, 96), dwell_us=dwell, dose_per_us=10.0, artefacts=False, margin_px=4)
        f = make_frame(build_specimen(spec), 0)
        assert f.clean.max() == pytest.approx(10.0 * dwell, rel=0.05)
        means[dwell] = f.raw.astype(np.float64).mean()
        residual = f.raw - f.clean.astype(np.float64)
        assert residual.mean() == pytest.approx(0.0, abs=0.05 * means[dwell])
        assert residual.var() == pytest.approx(f.clean.mean(), rel=0.1)  # Poisson: variance = mean
    assert means[4.0] / means[1.0] == pytest.approx(4.0, rel=0.05)


def test_reproducible_by_seed_and_independent_of_order(scene):
    again = build_specimen(SMALL)
    np.testing.assert_array_equal(make_frame(scene, 5).raw, make_frame(again, 5).raw)
    other = build_specimen(SimSpec(shape=(64, 80), margin_px=8, seed=1))
    assert not np.array_equal(make_frame(scene, 5).raw, make_frame(other, 5).raw)
    assert not np.array_equal(make_frame(scene, 5).raw, make_frame(scene, 6).raw)


def test_artefacts_off_gives_pure_poisson_of_the_clean_frame():
    spec = SimSpec(shape=(64, 64), artefacts=False, margin_px=4)
    f = make_frame(build_specimen(spec), 2)
    assert f.beam_gain == 1.0
    on = make_frame(build_specimen(SimSpec(shape=(64, 64), margin_px=4)), 2)
    assert on.beam_gain != 1.0


@pytest.mark.parametrize("lam", [0.05, 0.8, 3.3, 12.0, 27.0])
def test_alias_sampler_matches_poisson(lam):
    table = poisson_table(30.0)
    counts = sample_poisson(np.full((500, 400), lam, np.float32), np.random.default_rng(1), table).astype(float)
    n = counts.size
    step = table.lam_max / (table.levels - 1)  # lam is rounded to the nearest level
    assert abs(counts.mean() - lam) < 6 * math.sqrt(lam / n) + step
    assert counts.var() == pytest.approx(lam, rel=0.05, abs=step + 0.01)
    p0 = math.exp(-lam)
    assert abs((counts == 0).mean() - p0) < 6 * math.sqrt(p0 * (1 - p0) / n) + 1e-4 + step


def test_sampler_falls_back_above_its_table():
    lam = np.array([[5.0, 500.0, 0.0]], np.float32)
    out = sample_poisson(lam, np.random.default_rng(0), poisson_table(30.0))
    assert out.dtype == np.uint16 and out[0, 2] == 0 and 400 < out[0, 1] < 600


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"dwell_us": 0}, "--dwell-us"),
        ({"shape": (8, 8)}, "--size"),
        ({"dose_per_us": -1}, "--dose-per-us"),
        ({"dose_per_us": 1e5}, "--dose-per-us"),
        ({"seed": -3}, "--seed"),
        ({"line_jitter_px": 2.0}, "--line-jitter-px"),
        ({"rotation_deg": float("nan")}, "--rotation-deg"),
    ],
)
def test_bad_spec_names_the_option(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        SimSpec(**kwargs)


@pytest.mark.parametrize(
    "kwargs, option",
    [({"fps": 0}, "--fps"), ({"series_length": 0}, "--series-length"), ({"endpoint": "5555"}, "--endpoint")],
)
def test_bad_publisher_options_name_the_option(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        Simulator(SMALL, **kwargs)


def test_cli_bad_option_is_one_line_error(capsys):
    assert main(["simulate", "--size", "5", "--frames", "1"]) == 2
    err = capsys.readouterr().err
    assert "--size" in err and "Traceback" not in err


# --- publishing on real sockets --------------------------------------------------------------


def _sub(ctx: zmq.asyncio.Context, endpoint: str, *topics: bytes, bind: bool = False) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.SUB)
    for t in topics:
        sock.setsockopt(zmq.SUBSCRIBE, t)
    sock.bind(endpoint) if bind else sock.connect(endpoint)
    return sock


async def _drain(sock: zmq.asyncio.Socket, idle_s: float = 0.5) -> list[list[bytes]]:
    out = []
    while await sock.poll(int(idle_s * 1000)):
        out.append(await sock.recv_multipart())
    return out


async def test_subscriber_gets_frames_in_order_with_series_events_and_clean():
    ctx = zmq.asyncio.Context()
    sim = Simulator(SMALL, "tcp://127.0.0.1:*", fps=200, series_length=3, publish_clean=True,
                    run_id="t", startup_delay_s=1.0, context=ctx)  # a generous slow-joiner wait
    sub = _sub(ctx, sim.open(), protocol.FRAME, protocol.CLEAN, protocol.SERIES)
    try:
        report = await sim.run(7)
        msgs = await _drain(sub)
    finally:
        sub.close(0)
        sim.close()
        ctx.term()
    assert report.frames == 7 and report.series == ["sim-t-0000", "sim-t-0001", "sim-t-0002"]
    events = [protocol.decode_event(m)[1] for m in msgs if m[0] == protocol.SERIES]
    assert [(e["event"], e["series_id"]) for e in events] == [
        ("start", "sim-t-0000"), ("end", "sim-t-0000"), ("start", "sim-t-0001"),
        ("end", "sim-t-0001"), ("start", "sim-t-0002"), ("end", "sim-t-0002")]
    assert [e["frames"] for e in events if e["event"] == "end"] == [3, 3, 1]
    frames = [protocol.decode_frame(m) for m in msgs if m[0] == protocol.FRAME]
    ids = [(f.header["series_id"], f.header["frame_id"]) for f in frames]
    assert ids == [(f"sim-t-000{i // 3}", i % 3) for i in range(7)]
    assert all(f.header["detector"] == "HAADF (simulated)" and f.header["simulated"] for f in frames)
    assert [f.header["sim_index"] for f in frames] == list(range(7))
    cleans = [protocol.decode_frame(m) for m in msgs if m[0] == protocol.CLEAN]
    assert [(c.header["series_id"], c.header["frame_id"]) for c in cleans] == ids
    expected = make_frame(build_specimen(SMALL), 4)
    np.testing.assert_array_equal(frames[4].data, expected.raw)
    np.testing.assert_array_equal(cleans[4].data, expected.clean)
    assert cleans[4].data.dtype == np.float32


async def test_pacing_follows_the_dwell_derived_period():
    spec = SimSpec(shape=(64, 64), dwell_us=0.05 / (64 * 64) * 1e6, margin_px=4)  # 20 frames/s
    assert spec.frame_period_s == pytest.approx(0.05)
    ctx = zmq.asyncio.Context()
    sim = Simulator(spec, "tcp://127.0.0.1:*", startup_delay_s=0.0, context=ctx)
    task = asyncio.create_task(sim.run())
    await asyncio.sleep(1.0)
    sim.stop()
    report = await asyncio.wait_for(task, 5)
    sim.close()
    ctx.term()
    assert 8 <= report.frames <= 30  # ~20 expected; loose on purpose
    assert report.series and report.elapsed_s < 3


async def test_connect_mode_reaches_a_bound_subscriber():
    ctx = zmq.asyncio.Context()
    sub = _sub(ctx, "tcp://127.0.0.1:*", protocol.FRAME, bind=True)
    endpoint = sub.getsockopt_string(zmq.LAST_ENDPOINT)
    sim = Simulator(SMALL, endpoint, connect=True, max_rate=True, startup_delay_s=1.0, context=ctx)
    try:
        # a bound SUB forwards its subscription to a connecting PUB only while it is polled (libzmq)
        collecting = asyncio.create_task(_drain(sub, idle_s=2.0))
        await sim.run(3)
        got = await collecting
    finally:
        sub.close(0)
        sim.close()
        ctx.term()
    assert [protocol.decode_frame(m).header["frame_id"] for m in got] == [0, 1, 2]


async def test_bind_conflict_is_a_config_error():
    ctx = zmq.asyncio.Context()
    first = Simulator(SMALL, "tcp://127.0.0.1:*", context=ctx)
    second = Simulator(SMALL, first.open(), context=ctx)
    with pytest.raises(ConfigError, match="--endpoint"):
        second.open()
    first.close()
    ctx.term()


def test_cli_runs_until_sigint_and_closes_the_series():
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stemd.apps.cli", "simulate", "--connect", "--endpoint", f"tcp://127.0.0.1:{port}",
         "--size", "64", "--fps", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        topics = []
        deadline = time.monotonic() + 30
        while protocol.FRAME not in topics and time.monotonic() < deadline:
            if sub.poll(500):
                topics.append(sub.recv_multipart()[0])
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
        while sub.poll(500):
            topics.append(sub.recv_multipart()[0])
    finally:
        proc.kill()
        sub.close(0)
        ctx.term()
    assert proc.returncode == 0, err
    assert topics[0] == protocol.SERIES and protocol.FRAME in topics and topics[-1] == protocol.SERIES


async def test_lossless_waits_for_a_subscriber_and_never_drops():
    """A slow subscriber with a tiny queue at max rate: a plain PUB would drop, the lossless one waits."""
    ctx = zmq.asyncio.Context()
    sim = Simulator(SMALL, "tcp://127.0.0.1:*", max_rate=True, hwm=1, lossless=True, run_id="l", context=ctx)
    endpoint = sim.open()
    n = 30
    run = asyncio.ensure_future(sim.run(n))
    await asyncio.sleep(0.3)
    assert not run.done()  # nobody subscribed yet: frame 0 waits
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 1)
    sub.setsockopt(zmq.SUBSCRIBE, protocol.FRAME)
    sub.connect(endpoint)
    ids = []
    try:
        while len(ids) < n:
            msg = await asyncio.wait_for(sub.recv_multipart(), 10)
            ids.append(protocol.decode_frame(msg).header["frame_id"])
            await asyncio.sleep(0.01)  # slower than the publisher
        report = await asyncio.wait_for(run, 10)
    finally:
        sub.close(0)
        sim.close()
        ctx.term()
    assert ids == list(range(n)) and report.frames == n


def test_pixel_size_follows_the_lattice_period_unless_given():
    assert SimSpec().pixel_size_m == pytest.approx(3.905e-11)
    assert SimSpec(period_px=20.0).pixel_size_m == pytest.approx(3.905e-10 / 20)
    assert SimSpec(period_px=20.0, pixel_size_m=1e-11).pixel_size_m == 1e-11
