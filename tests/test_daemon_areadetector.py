"""`input.format: array-1.0`: an areaDetector ADZMQ producer (PUB or PUSH, both header conventions) sends
frames to the real daemon over loopback; they come out denoised with frame ids and attributes kept."""

from __future__ import annotations

import numpy as np
import pytest
import zmq
from test_daemon import CLEAN, RAW, Sub, denoised, make_settings, running

from stemd.config import load_settings
from stemd.errors import ConfigError
from stemd.live import protocol as p
from stemd.live.engine import Engine


@pytest.fixture(scope="module")
def engine(checkpoint):
    eng = Engine.load(path=checkpoint, device="cpu")
    yield eng
    eng.close()


def adzmq_message(data: np.ndarray, frame: int, legacy: bool) -> list[bytes]:
    """Exactly what NDPluginZMQ::sendNDArray sends: a JSON header then the raw array."""
    rows, cols = data.shape
    htype = '["array-1.0"]' if legacy else '"array-1.0"'
    shape = f"[{cols},{rows}]" if legacy else f"[{rows},{cols}]"
    header = (f'{{"htype":{htype}, "type":"{data.dtype.name}", "shape":{shape}, "frame":{frame}, '
              f'"timeStamp":1070000000.25, "encoding":"", "ndattr":{{"NumImages":1,"Gain":"high"}}}}')
    return [header.encode(), data.tobytes()]


@pytest.mark.parametrize("socket, legacy", [("sub", True), ("sub", False), ("pull", False)])
async def test_areadetector_stream_is_denoised(zctx, checkpoint, engine, socket: str, legacy: bool) -> None:
    over = {"input.format": "array-1.0", "input.socket": socket, "queue.mode": "lossless"}
    if socket == "pull":
        over.update({"input.mode": "bind", "input.endpoint": "tcp://127.0.0.1:*"})
        producer = zctx.socket(zmq.PUSH)
        settings = make_settings(checkpoint, "tcp://127.0.0.1:*", **over)
    else:
        producer = zctx.socket(zmq.XPUB)
        port = producer.bind_to_random_port("tcp://127.0.0.1")
        settings = make_settings(checkpoint, f"tcp://127.0.0.1:{port}", **over)
    async with running(settings, engine=engine) as d:
        if socket == "pull":
            producer.connect(d.input_endpoint)
        else:
            assert await producer.recv() == b"\x01"  # the daemon subscribes to every message: they have no topic
        sub = Sub(zctx, d.output_endpoint)
        await sub.ready()
        for i in range(3):
            await producer.send_multipart(adzmq_message(RAW[i], 100 + i, legacy))
        await producer.send_multipart([b'{"htype": "array-1.0", "type": "uint16"}', b""])
        msgs = await sub.until(lambda m: len(denoised(m)) == 3)
    producer.close(0)
    outs, raws = denoised(msgs), [m for m in msgs if m[0] == p.RAW]
    assert [h["frame_id"] for _, h, _ in outs] == [100, 101, 102]
    for (_, h, den), (_, hr, raw), clean in zip(outs, raws, CLEAN):
        assert h["series_id"] == hr["series_id"] == p.ARRAY_SERIES and h["frame_id"] == hr["frame_id"]
        assert h["ndattr"] == hr["ndattr"] == {"NumImages": 1, "Gain": "high"}
        np.testing.assert_array_equal(raw, RAW[h["frame_id"] - 100])
        assert np.mean((den - clean) ** 2) < 0.5 * np.mean((raw.astype(np.float32) - clean) ** 2)
    assert d.frames_in == 4 and dict(d.rejected) == {"missing_field": 1} and not d.dropped


def test_config_names_the_allowed_formats() -> None:
    with pytest.raises(ConfigError, match="input.format"):
        load_settings(None, {"input.format": "hdf5"})
    with pytest.raises(ConfigError, match="input.socket"):
        load_settings(None, {"input.socket": "xsub"})
