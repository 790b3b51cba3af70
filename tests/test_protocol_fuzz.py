"""Property-based fuzzing of the wire decoders: whatever arrives, the only exception is ProtocolError,
and every accepted header is plain data with string keys (so the recorder's JSON always takes it)."""

from __future__ import annotations

import json

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stemd.live import protocol as p
from stemd.live.recorder import describe

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# msgpack-able values including what the protocol must refuse: bytes keys, ext types, deep nesting
_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=20),
    st.binary(max_size=20), st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=2)),
)
_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=4)), inner, max_size=4),
    ),
    max_leaves=40,
)


def _valid_header(sid: str, fid: int) -> dict:
    return p.frame_header(sid, fid, (4, 4), "uint8")


@st.composite
def _frame_messages(draw) -> list:
    """Mostly a valid frame header with fuzzed extra/replaced fields, sometimes raw bytes or a bare value."""
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "bytes", "value"]))
    if kind == "bytes":
        header = draw(st.binary(max_size=200))
    else:
        if kind == "value":
            obj = draw(_values)
        else:
            obj = _valid_header(draw(st.text(max_size=10)), draw(st.integers(0, 10)))
            obj.update(draw(st.dictionaries(st.one_of(st.sampled_from(sorted(obj)), st.text(max_size=8),
                                                      st.binary(max_size=4)), _values, min_size=1, max_size=4)))
        header = msgpack.packb(obj, use_bin_type=draw(st.booleans()))
        if draw(st.integers(0, 3)) == 0:  # flip a byte somewhere
            i = draw(st.integers(0, len(header) - 1))
            header = header[:i] + bytes([draw(st.integers(0, 255))]) + header[i + 1:]
    pixels = draw(st.sampled_from([bytes(16)] * 4 + [b""])) if draw(st.integers(0, 4)) else draw(st.binary())
    n = draw(st.sampled_from([3] * 8 + [2, 4]))
    return [p.FRAME, header, pixels, b"x"][:n]


def _assert_plain(header: dict) -> None:
    stack = [header]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            assert all(isinstance(k, str) for k in value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        else:
            assert value is None or isinstance(value, (bool, int, float, str, bytes)), type(value)
    packed = msgpack.packb(header, use_bin_type=True)
    assert msgpack.unpackb(packed, raw=False, strict_map_key=True) is not None
    assert json.loads(describe(header)).keys() == header.keys()  # what the recorder writes beside each page


def _decoded_or_refused(decode, parts: list) -> None:
    """`decode` either refuses with a known reason or gives a frame of an allowed dtype and a plain header."""
    try:
        frame = decode(parts, min_side=1)
    except p.ProtocolError as exc:
        assert exc.reason in p.REASONS
        return
    assert isinstance(frame.data, np.ndarray) and frame.data.dtype.name in p.DTYPES
    _assert_plain(frame.header)


@FUZZ
@given(_frame_messages())
def test_decode_frame_raises_only_protocol_error(parts: list) -> None:
    _decoded_or_refused(p.decode_frame, parts)


@FUZZ
@given(st.sampled_from([p.SERIES, p.STATS, b"other"]), st.one_of(_values, st.builds(
    lambda extra, event: {"v": 1, "event": event, "series_id": "s", **extra},
    st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=4)), _values, max_size=4),
    st.sampled_from(["start", "end", "middle"]))), st.booleans())
def test_decode_event_raises_only_protocol_error(topic: bytes, obj: object, bin_type: bool) -> None:
    try:
        _, header = p.decode_event([topic, msgpack.packb(obj, use_bin_type=bin_type)])
    except p.ProtocolError as exc:
        assert exc.reason in p.REASONS
        return
    _assert_plain(header)


_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=40,
)


@st.composite
def _array_messages(draw) -> list:
    """areaDetector array-1.0 messages: a valid header with fuzzed fields, or raw bytes, and odd part counts."""
    if draw(st.integers(0, 4)):
        header = {"htype": draw(st.sampled_from(["array-1.0", ["array-1.0"], "chunk-1.0"])), "type": "uint8",
                  "shape": [4, 4], "frame": 0}
        header.update(draw(st.dictionaries(st.sampled_from(["htype", "type", "shape", "frame", "ndattr", "encoding",
                                                            "endianness"]), _json_values, max_size=3)))
        raw = json.dumps(header).encode()
    else:
        raw = draw(st.binary(max_size=200))
    pixels = bytes(16) if draw(st.integers(0, 3)) else draw(st.binary(max_size=64))
    return [raw, pixels, b"x"][: draw(st.sampled_from([2] * 8 + [1, 3]))]


@FUZZ
@given(_array_messages())
def test_decode_array_raises_only_protocol_error(parts: list) -> None:
    _decoded_or_refused(p.decode_array, parts)
