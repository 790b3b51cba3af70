"""The wire protocol: round trips and every malformed class mapped to its reason key."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest

from stemd.live import protocol as p


def _frame(dtype: str = "uint16", shape: tuple[int, int] = (32, 40)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random(shape) * 200).astype(dtype)


def _parts(header_overrides: dict | None = None, data: np.ndarray | None = None, drop: str | None = None) -> list:
    data = _frame() if data is None else data
    parts = p.encode_frame(p.FRAME, p.frame_header("s1", 3, data.shape, data.dtype.name), data)
    header = msgpack.unpackb(parts[1])
    header.update(header_overrides or {})
    if drop:
        del header[drop]
    return [parts[0], msgpack.packb(header), bytes(parts[2])]


@pytest.mark.parametrize("dtype", sorted(p.DTYPES))
@pytest.mark.parametrize("order", ["<", ">"])
def test_round_trip_every_dtype_and_byte_order(dtype: str, order: str) -> None:
    data = _frame(dtype).astype(np.dtype(dtype).newbyteorder(order))
    header = p.frame_header("s1", 7, data.shape, dtype, dwell_time_s=2e-6, detector="HAADF", custom={"a": [1, 2]})
    parts = p.encode_frame(p.FRAME, header, data)
    assert isinstance(parts[2], memoryview)
    frame = p.decode_frame([bytes(x) for x in parts])
    assert frame.topic == p.FRAME
    assert frame.data.dtype.isnative and frame.data.dtype.name == dtype
    np.testing.assert_array_equal(frame.data, data)
    assert frame.header["byte_order"] == (order if data.dtype.itemsize > 1 else p.NATIVE_BYTE_ORDER)
    assert frame.header["custom"] == {"a": [1, 2]}
    assert frame.header["detector"] == "HAADF" and frame.header["frame_id"] == 7


def test_frame_header_has_every_documented_field() -> None:
    header = p.frame_header("s", 0, (28, 28), "uint8", pixel_size_m=1e-11)
    for key in ("v", "series_id", "frame_id", "acquired_at", "shape", "dtype", "byte_order", *p.SCAN_FIELDS):
        assert key in header
    assert header["v"] == p.PROTOCOL_VERSION and header["pixel_size_m"] == 1e-11


def test_encode_frame_sets_shape_and_dtype_from_data() -> None:
    data = _frame("float32", (30, 50))
    parts = p.encode_frame(p.RAW, p.frame_header("s", 0, (1, 1), "uint8"), data)
    header = msgpack.unpackb(parts[1])
    assert header["shape"] == [30, 50] and header["dtype"] == "float32"


def test_encode_frame_refuses_bad_arrays() -> None:
    with pytest.raises(ValueError):
        p.encode_frame(p.FRAME, {}, np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError):
        p.encode_frame(p.FRAME, {}, np.zeros((28, 28), np.float64))


def test_event_round_trip_and_series_validation() -> None:
    topic, header = p.decode_event(p.encode_event(p.SERIES, p.series_header("end", "s9", frames=12)))
    assert topic == p.SERIES and header["event"] == "end" and header["frames"] == 12
    topic, header = p.decode_event(p.encode_event(p.STATS, {"fps": np.float32(2.5)}))
    assert header["fps"] == 2.5 and header["v"] == p.PROTOCOL_VERSION
    with pytest.raises(p.ProtocolError) as err:
        p.decode_event(p.encode_event(p.SERIES, {"event": "pause", "series_id": "s"}))
    assert err.value.reason == "field_type"
    with pytest.raises(p.ProtocolError) as err:
        p.decode_event(p.encode_event(p.SERIES, {"event": "start"}))
    assert err.value.reason == "missing_field"
    with pytest.raises(p.ProtocolError) as err:
        p.decode_event([p.SERIES])
    assert err.value.reason == "parts"


def test_decode_accepts_zmq_frames() -> None:
    zmq = pytest.importorskip("zmq")
    data = _frame()
    parts = p.encode_frame(p.FRAME, p.frame_header("s", 1, data.shape, "uint16"), data)
    frame = p.decode_frame([zmq.Frame(bytes(x)) for x in parts])
    np.testing.assert_array_equal(frame.data, data)


NAN = _frame("float32")
NAN[3, 4] = np.nan
INF = _frame("float32")
INF[0, 0] = -np.inf

MALFORMED = {
    "parts": lambda: _parts()[:2],
    "parts4": lambda: _parts() + [b"x"],
    "msgpack": lambda: [p.FRAME, b"\xc1\xff\x00", b""],
    "msgpack_trailing": lambda: [p.FRAME, msgpack.packb({"v": 1}) + b"\x01", b""],
    "msgpack_ext": lambda: [p.FRAME, msgpack.packb({"v": 1, "t": msgpack.ExtType(5, b"abcd")}), b""],
    "msgpack_int_key": lambda: [p.FRAME, msgpack.packb({1: 2}), b""],
    "header_size": lambda: [p.FRAME, msgpack.packb({"v": 1, "x": "a" * 70_000}), b""],
    "header_type": lambda: [p.FRAME, msgpack.packb([1, 2, 3]), b""],
    "missing_field": lambda: _parts(drop="frame_id"),
    "missing_v": lambda: _parts(drop="v"),
    "field_type": lambda: _parts({"frame_id": "3"}),
    "field_type_shape": lambda: _parts({"shape": [32]}),
    "field_type_negative": lambda: _parts({"frame_id": -1}),
    "field_type_scan": lambda: _parts({"dwell_time_s": "fast"}),
    "field_type_pixel_size": lambda: _parts({"pixel_size_m": -3.9e-11}),
    "field_type_pixel_size_nan": lambda: _parts({"pixel_size_m": float("nan")}),
    "field_type_dwell_zero": lambda: _parts({"dwell_time_s": 0.0}),
    "field_type_bool": lambda: _parts({"frame_id": True}),
    "version": lambda: _parts({"v": 2}),
    "dtype": lambda: _parts({"dtype": "float64"}),
    "byte_order": lambda: _parts({"byte_order": "|"}),
    "size_mismatch": lambda: _parts()[:2] + [bytes(_parts()[2])[:-2]],
    "size_mismatch_shape": lambda: _parts({"shape": [32, 41]}),
    "too_small": lambda: _parts(data=_frame(shape=(27, 64))),
    "too_large": lambda: _parts({"shape": [9000, 9000]}),
    "nonfinite": lambda: _parts(data=NAN),
    "nonfinite_inf": lambda: _parts(data=INF),
    # docs/protocol.md: keys are strings at every depth, no extension types, bounded nesting
    "header_schema_bytes_key": lambda: _parts({b"k": 1}),
    "header_schema_nested_bytes_key": lambda: _parts({"extra": {"list": [{b"k": 1}]}}),
    "header_schema_ext0": lambda: _parts({"t": msgpack.ExtType(1, b"")}),
    "header_schema_deep": lambda: _parts({"deep": _nested(1000)}),
    "header_schema_deep_33": lambda: _parts({"deep": _nested(p.MAX_HEADER_DEPTH)}),
}
EXPECTED = {"parts4": "parts", "missing_v": "missing_field", "size_mismatch_shape": "size_mismatch"}


def _nested(depth: int) -> object:
    """`depth` maps and arrays inside each other around a 1."""
    value: object = 1
    for i in range(depth):
        value = {"a": value} if i % 2 else [value]
    return value


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frame_rejected_with_reason(case: str) -> None:
    reason = EXPECTED.get(case, case.split("_")[0] if case.startswith(("msgpack", "nonfinite")) else case)
    if case.startswith(("field_type", "header_schema")):
        reason = "header_schema" if case.startswith("header_schema") else "field_type"
    with pytest.raises(p.ProtocolError) as err:
        p.decode_frame(MALFORMED[case]())
    assert err.value.reason == reason
    assert err.value.reason in p.REASONS
    assert err.value.detail


def test_limits_are_parameters() -> None:
    parts = _parts(data=_frame(shape=(40, 40)))
    assert p.decode_frame(parts, min_side=40).data.shape == (40, 40)
    with pytest.raises(p.ProtocolError, match="too_large"):
        p.decode_frame(parts, max_pixels=1000)
    with pytest.raises(p.ProtocolError, match="too_small"):
        p.decode_frame(parts, min_side=41)


def test_header_nesting_up_to_the_limit_is_taken() -> None:
    """The header itself is depth 1: MAX_HEADER_DEPTH - 1 containers inside it are accepted, one more is not."""
    frame = p.decode_frame(_parts({"deep": _nested(p.MAX_HEADER_DEPTH - 1)}))
    assert frame.header["deep"] == _nested(p.MAX_HEADER_DEPTH - 1)
    parts = p.encode_event(p.SERIES, p.series_header("start", "s", extra={b"k": 1}))
    with pytest.raises(p.ProtocolError, match="header_schema"):
        p.decode_event(parts)


def test_every_reason_is_documented() -> None:
    """REASONS and the reject table of docs/protocol.md name the same keys (the daemon's "topic" too)."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    table = doc.split("## Reject reasons")[1].split("\n## ")[0]
    documented = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    assert documented == set(p.REASONS)
    assert "topic" in p.REASONS and "header_schema" in p.REASONS


def adzmq_parts(data: np.ndarray, frame_id: int, *, legacy: bool = False, **extra) -> list[bytes]:
    """An areaDetector NDPluginZMQ message as the plugin composes it: before 1.4 `htype` is a list and
    `shape` is x first; since 1.4 `htype` is a string and `shape` is slowest axis first."""
    rows, cols = data.shape
    header = {
        "htype": ["array-1.0"] if legacy else "array-1.0", "type": data.dtype.name,
        "shape": [cols, rows] if legacy else [rows, cols], "frame": frame_id, "timeStamp": 1.0e9,
        "encoding": "", "ndattr": {"ColdHead": 12.5, "Detector": "HAADF"},
    }
    header.update(extra)
    return [json.dumps(header).encode(), data.tobytes()]


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "int32", "uint32", "float32", "float64"])
def test_array_1_0_decodes_both_conventions(legacy: bool, dtype: str) -> None:
    data = (np.arange(40 * 56).reshape(40, 56) % 200).astype(dtype)
    f = p.decode_array(adzmq_parts(data, 7, legacy=legacy))
    assert f.topic == p.FRAME and f.data.shape == (40, 56)
    assert f.data.dtype.name in p.DTYPES and f.data.dtype.name == (dtype if dtype in p.DTYPES else "float32")
    np.testing.assert_array_equal(f.data, data)
    assert f.header["frame_id"] == 7 and f.header["series_id"] == p.ARRAY_SERIES
    assert f.header["ndattr"] == {"ColdHead": 12.5, "Detector": "HAADF"}
    assert f.header["shape"] == [40, 56] and f.header["v"] == p.PROTOCOL_VERSION


def test_array_1_0_big_endian_and_singleton_axes() -> None:
    data = np.arange(32 * 48, dtype=">u2").reshape(32, 48)
    f = p.decode_array(adzmq_parts(data, 0, endianness="big", shape=[1, 32, 48]))
    assert f.data.dtype.isnative and f.data.shape == (32, 48)
    np.testing.assert_array_equal(f.data, data.astype("u2"))


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"htype": "chunk-2.0"}, "version"),
        ({"htype": []}, "version"),
        ({"type": "complex64"}, "dtype"),
        ({"frame": -1}, "field_type"),
        ({"frame": "3"}, "field_type"),
        ({"shape": [2, 40, 56]}, "field_type"),
        ({"shape": "40x56"}, "field_type"),
        ({"shape": [40, 57]}, "size_mismatch"),
        ({"shape": [8, 8]}, "too_small"),
        ({"encoding": "lz4"}, "field_type"),
        ({"endianness": "middle"}, "byte_order"),
    ],
)
def test_array_1_0_malformed_rejected_with_reason(change: dict, reason: str) -> None:
    parts = adzmq_parts(np.zeros((40, 56), np.uint16), 1, **change)
    with pytest.raises(p.ProtocolError) as err:
        p.decode_array(parts)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "parts, reason",
    [
        ([b"{not json", b""], "json"),
        ([b"[1, 2]", b""], "json"),
        ([b"\xff\xfe", b""], "json"),
        ([b"[" * 60_000, b""], "json"),
        ([b"{}", b"", b""], "parts"),
        ([b'{"htype": "array-1.0", "a": ' + b"[" * 40 + b"]" * 40 + b"}", b""], "header_schema"),
        ([b'{"htype": "array-1.0"}', b""], "missing_field"),
        ([b" " * (p.MAX_HEADER_BYTES + 1), b""], "header_size"),
    ],
)
def test_array_1_0_bad_headers(parts: list[bytes], reason: str) -> None:
    with pytest.raises(p.ProtocolError) as err:
        p.decode_array(parts)
    assert err.value.reason == reason
