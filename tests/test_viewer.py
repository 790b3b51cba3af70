"""The viewer: snapshot of a matched raw/denoised pair from a live PUB on loopback, errors."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import zmq
from PIL import Image

from stemd.apps.cli import main
from stemd.apps.viewer import LiveStats, NoFramesError, PairMatcher, fidelity_text, show, snapshot
from stemd.errors import ConfigError
from stemd.live import protocol


def _frame(topic: bytes, series: str, fid: int, value: float, dtype=np.uint16) -> protocol.Frame:
    data = np.full((32, 40), value, dtype)
    header = protocol.frame_header(series, fid, data.shape, data.dtype.name)
    return protocol.decode_frame(protocol.encode_frame(topic, header, data), min_side=1)


FIDELITY = {"checks": 3, "gain_db": 12.3, "gain_spread_db": 0.4, "over_reference_db": -0.52,
            "over_reference_spread_db": 0.1, "residual": 4.2, "residual_spread": 0.3, "flagged": True,
            "reasons": ["below the reference (-0.52 dB < 0 dB)"], "output": "reference"}


class DaemonLikePub:
    """Publishes like a daemon's output: raw(i), an unmatched denoised, denoised(i), stats."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _send(self, topic: bytes, fid: int, data: np.ndarray, series: str = "s-1") -> None:
        extra = {"fidelity": FIDELITY} if topic == protocol.DENOISED else {}
        header = protocol.frame_header(series, fid, data.shape, data.dtype.name, model_id="m-test", latency_s=0.02,
                                       **extra)
        self.sock.send_multipart(protocol.encode_frame(topic, header, data), copy=False)

    def _loop(self) -> None:
        fid = 0
        while not self.stop.is_set():
            self._send(protocol.RAW, fid, np.full((48, 64), fid, np.uint16))
            self._send(protocol.DENOISED, fid + 1000, np.full((48, 64), -1, np.float32), series="other")
            self.sock.send_multipart([b"denoised", b"\xc1 not msgpack", b""])
            self._send(protocol.DENOISED, fid, np.full((48, 64), fid + 0.5, np.float32))
            self.sock.send_multipart(protocol.encode_event(protocol.STATS, {"fps": 12.5, "latency_p50_s": 0.02,
                                                                            "latency_p99_s": 0.05}))
            fid += 1
            time.sleep(0.02)

    def __enter__(self) -> DaemonLikePub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def test_matcher_pairs_by_ids_out_of_order_and_stays_bounded():
    m = PairMatcher(keep=4)
    assert m.add("denoised", _frame(protocol.DENOISED, "a", 1, 1.5, np.float32)) is None
    assert m.add("raw", _frame(protocol.RAW, "a", 2, 2)) is None
    pair = m.add("raw", _frame(protocol.RAW, "a", 1, 1))
    assert pair is not None and m.latest is pair
    assert pair["raw"].header["frame_id"] == pair["denoised"].header["frame_id"] == 1
    assert m.add("raw", _frame(protocol.RAW, "b", 1, 1)) is None  # same frame id, other series
    for i in range(10):
        m.add("raw", _frame(protocol.RAW, "c", i, i))
    assert len(m._partial) == 4
    assert m.add("clean", _frame(protocol.CLEAN, "a", 2, 2)) is None  # not a kind it matches


def test_live_stats_prefers_daemon_figures():
    s = LiveStats()
    for i in range(5):
        s.frame({"latency_s": 0.01 * (i + 1)}, now=100.0 + i * 0.5)
    assert s.fps(102.0) == pytest.approx(2.0)
    assert "2.0 fps" in s.text(102.0) and "p50 30 ms" in s.text(102.0)
    s.stats({"fps": 9.0, "latency_p50_s": 0.1, "latency_p99_s": 0.2})
    assert s.text(102.0) == "9.0 fps, latency p50 100 ms, p99 200 ms"


def test_snapshot_writes_the_matched_pair(tmp_path):
    png = tmp_path / "snap.png"
    with DaemonLikePub() as pub:
        pair = snapshot(pub.endpoint, png, timeout_s=10)
    raw, den = pair["raw"], pair["denoised"]
    assert raw.header["series_id"] == den.header["series_id"] == "s-1"
    fid = raw.header["frame_id"]
    assert den.header["frame_id"] == fid
    assert np.all(raw.data == fid) and np.all(den.data == fid + 0.5)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
        assert im.text["stemd:series_id"] == "s-1" and im.text["stemd:frame_id"] == str(fid)
        assert im.text["stemd:fidelity"] == fidelity_text(den.header) and "FLAGGED" in im.text["stemd:fidelity"]
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 0  # not a blank canvas


def test_cli_snapshot_headless(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    png = tmp_path / "cli.png"
    with DaemonLikePub() as pub:
        assert main(["view", "--endpoint", pub.endpoint, "--snapshot", str(png), "--timeout", "10"]) == 0
    assert png.stat().st_size > 0 and "wrote" in capsys.readouterr().out


def test_timeout_is_a_clear_error(tmp_path):
    ctx = zmq.Context()
    silent = ctx.socket(zmq.PUB)
    endpoint = f"tcp://127.0.0.1:{silent.bind_to_random_port('tcp://127.0.0.1')}"
    t0 = time.monotonic()
    try:
        with pytest.raises(NoFramesError, match="no matched raw/denoised frame pair .* within 0.5 s"):
            snapshot(endpoint, tmp_path / "x.png", timeout_s=0.5)
    finally:
        silent.close(0)
        ctx.term()
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "x.png").exists()


def test_cli_timeout_exits_2_with_one_line(tmp_path, capsys):
    code = main(["view", "--endpoint", "tcp://127.0.0.1:9", "--snapshot", str(tmp_path / "y.png"),
                 "--timeout", "0.3"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("stemd: error: no matched") and err.count("\n") == 1


def test_headless_without_snapshot_says_use_snapshot(monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert main(["view", "--timeout", "0.2"]) == 2
    assert "--snapshot" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--snapshot", "out.jpg"], "--snapshot"),
        (["--snapshot", "/nonexistent-dir/out.png"], "--snapshot"),
        (["--snapshot", "x.png", "--timeout", "0"], "--timeout"),
        (["--snapshot", "x.png", "--endpoint", "localhost:5556"], "--endpoint"),
    ],
)
def test_bad_options_name_the_option(argv, option, capsys):
    assert main(["view", *argv]) == 2
    assert option in capsys.readouterr().err


def test_snapshot_bad_path_fails_before_waiting():
    with pytest.raises(ConfigError, match="--snapshot"):
        snapshot("tcp://127.0.0.1:9", "out.tiff", timeout_s=30)


def test_live_window_loop_updates_then_stops():
    import matplotlib

    matplotlib.use("Agg", force=True)  # the window loop itself, drawn off screen
    with DaemonLikePub() as pub, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Agg is non-interactive"
        shown = show(pub.endpoint, timeout_s=10, duration_s=1.5)
    assert shown > 0


def test_live_window_times_out_when_nothing_arrives():
    import matplotlib

    matplotlib.use("Agg", force=True)
    with pytest.raises(NoFramesError, match="within 0.3 s"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        show("tcp://127.0.0.1:9", timeout_s=0.3)


def test_fidelity_text_says_the_estimate_and_the_flag():
    t = fidelity_text({"fidelity": FIDELITY})
    assert t.startswith("fidelity (3 checks): -0.52 ± 0.10 dB over the reference, +12.30 ± 0.40 dB over raw, "
                        "residual 4.20 ± 0.30")
    assert t.endswith("FLAGGED: below the reference (-0.52 dB < 0 dB), showing the reference filter")
    one = fidelity_text({"fidelity": {**FIDELITY, "checks": 1, "flagged": False, "residual": None}})
    assert "±" not in one and "residual n/a" in one and "FLAGGED" not in one
    assert fidelity_text({}) == "" and fidelity_text({"fidelity": {"checks": 0}}) == "fidelity: not checked yet"
