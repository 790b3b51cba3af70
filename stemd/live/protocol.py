"""The wire protocol (docs/protocol.md): multipart ZeroMQ messages, msgpack headers, raw pixels.

Pure encode/decode/validate, no sockets. Nothing from the wire is ever unpickled.

Message = [topic, msgpack(header)] or [topic, msgpack(header), pixel buffer] for frames.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import msgpack
import numpy as np

from stemd.config import MAX_SIDE, MIN_SIDE

PROTOCOL_VERSION = 1

# Topics (ZeroMQ SUB prefix filters).
FRAME = b"frame"  # raw frames from the microscope / simulator into the daemon
CLEAN = b"clean"  # simulator only: the noise-free frame, for measuring quality live
RAW = b"raw"  # daemon out: the raw frame republished
DENOISED = b"denoised"  # daemon out: the cleaned frame
SERIES = b"series"  # series start/end events (header only), passed through by the daemon
STATS = b"stats"  # daemon out: periodic statistics (header only)

DTYPES = {"uint8", "uint16", "uint32", "float32"}
BYTE_ORDERS = ("<", ">")
NATIVE_BYTE_ORDER = "<" if sys.byteorder == "little" else ">"
SERIES_EVENTS = ("start", "end")
SCAN_FIELDS = ("dwell_time_s", "pixel_size_m", "detector", "scan_rotation_deg")

# Every reason key decode_frame / decode_event can raise; stable, used for counting rejects.
REASONS = (
    "parts",  # wrong number of multipart parts
    "header_size",  # header part larger than MAX_HEADER_BYTES
    "msgpack",  # header is not valid msgpack within the limits
    "header_schema",  # a map key that is not a string, nesting deeper than MAX_HEADER_DEPTH, or an extension type
    "header_type",  # header is not a map
    "missing_field",  # a required header field is absent
    "field_type",  # a header field has the wrong type or an impossible value
    "version",  # protocol version not supported
    "dtype",  # dtype not one of DTYPES
    "byte_order",  # byte_order not "<" or ">"
    "size_mismatch",  # pixel buffer length != H * W * itemsize
    "too_small",  # a side below min_side
    "too_large",  # a side above max_side, or H * W above max_pixels
    "nonfinite",  # float32 frame with NaN or inf
    "topic",  # a topic the receiver does not take (the daemon counts these; decode_* never raise it)
    "json",  # input.format array-1.0: the header is not a JSON object within the limits
    "oversize",  # a part over max_part_bytes: ZeroMQ refused it and dropped the connection (the daemon counts these)
)

MAX_HEADER_BYTES = 64 * 1024
MAX_ITEMSIZE = 4  # bytes per pixel of the widest of DTYPES
MAX_HEADER_DEPTH = 32  # maps and arrays nested in a header, the header itself counted as 1
_PLAIN = (type(None), bool, int, float, str, bytes)


class _UnpackLimits(TypedDict):
    max_str_len: int
    max_bin_len: int
    max_array_len: int
    max_map_len: int
    max_ext_len: int


_UNPACK_LIMITS = _UnpackLimits(
    max_str_len=16 * 1024,
    max_bin_len=16 * 1024,
    max_array_len=1024,
    max_map_len=256,
    max_ext_len=0,
)

_FRAME_FIELDS: dict[str, tuple[type, ...]] = {
    "series_id": (str,),
    "frame_id": (int,),
    "acquired_at": (int, float),
    "shape": (list,),
    "dtype": (str,),
    "byte_order": (str,),
}
_SCAN_TYPES: dict[str, tuple[type, ...]] = {
    "dwell_time_s": (int, float),
    "pixel_size_m": (int, float),
    "detector": (str,),
    "scan_rotation_deg": (int, float),
}


def max_part_bytes(max_pixels: int) -> int:
    """The largest message part a frame of at most `max_pixels` pixels needs, with a header's worth to spare: the
    input's ZMQ_MAXMSGSIZE, so ZeroMQ refuses a larger part (and drops that connection) before allocating it."""
    return max_pixels * MAX_ITEMSIZE + MAX_HEADER_BYTES


class ProtocolError(ValueError):
    """A malformed message; `reason` is a short stable key used for counting rejects."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Frame:
    topic: bytes
    header: dict[str, Any]  # every field received, unknown ones kept for pass-through
    data: np.ndarray  # (H, W), dtype from the header, native byte order


def frame_header(series_id: str, frame_id: int, shape: tuple[int, int], dtype: str, **scan: Any) -> dict[str, Any]:
    """A valid frame header with version, timestamp (time.time()), byte order, and scan metadata."""
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "series_id": str(series_id),
        "frame_id": int(frame_id),
        "acquired_at": time.time(),
        "shape": [int(shape[0]), int(shape[1])],
        "dtype": str(dtype),
        "byte_order": NATIVE_BYTE_ORDER,
    }
    header.update({k: None for k in SCAN_FIELDS})
    header.update(scan)
    return header


def series_header(event: str, series_id: str, **extra: Any) -> dict[str, Any]:
    """A SERIES event header ("start" or "end") with version and timestamp."""
    if event not in SERIES_EVENTS:
        raise ValueError(f"series event must be one of {SERIES_EVENTS}, not {event!r}")
    return {"v": PROTOCOL_VERSION, "event": event, "series_id": str(series_id), "time": time.time(), **extra}


def _pack(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True, default=_plain)


def _plain(obj: Any) -> Any:
    """msgpack fallback: numpy scalars/arrays and tuples become plain data."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot encode {type(obj).__name__} in a header")


def encode_frame(topic: bytes, header: dict[str, Any], data: np.ndarray) -> list[Any]:
    """Multipart parts; the pixel buffer is passed as a memoryview (send with copy=False).

    shape, dtype and byte_order in the header are set from `data`, so they always match it.
    """
    if data.ndim != 2:
        raise ValueError(f"a frame must be 2D (H, W), got shape {data.shape}")
    if data.dtype.name not in DTYPES:
        raise ValueError(f"frame dtype must be one of {sorted(DTYPES)}, got {data.dtype}")
    data = np.ascontiguousarray(data)
    order = data.dtype.byteorder
    header = dict(header)
    header["shape"] = [int(data.shape[0]), int(data.shape[1])]
    header["dtype"] = data.dtype.name
    header["byte_order"] = order if order in BYTE_ORDERS else NATIVE_BYTE_ORDER
    header.setdefault("v", PROTOCOL_VERSION)
    return [bytes(topic), _pack(header), data.data.cast("B")]


def _buffer(part: Any) -> memoryview:
    """A byte view of a message part: bytes, bytearray, memoryview or zmq.Frame."""
    view = memoryview(getattr(part, "buffer", part))
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("header_schema", f"extension type {code} in the header (only plain msgpack data is taken)")


def _check_plain(header: dict[str, Any]) -> None:
    """Refuse what docs/protocol.md rules out but msgpack's unpacker lets through: a map key that is not
    a string (strict_map_key takes bytes keys) at any depth, nesting deeper than MAX_HEADER_DEPTH, and
    anything but plain data (a msgpack timestamp, say). Iterative, so no depth can exhaust the stack."""
    stack: list[tuple[Any, int]] = [(header, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_HEADER_DEPTH:
                raise ProtocolError("header_schema", f"header nests deeper than {MAX_HEADER_DEPTH} maps/arrays")
            if isinstance(value, dict):
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise ProtocolError("header_schema", f"map key {key!r:.60} is not a string")
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)
        elif not isinstance(value, _PLAIN):
            raise ProtocolError("header_schema", f"header holds a {type(value).__name__}, not plain msgpack data")


def _unpack_header(part: Any) -> dict[str, Any]:
    buf = _buffer(part)
    if buf.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("header_size", f"header of {buf.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(buf, raw=False, strict_map_key=True, ext_hook=_refuse_ext, **_UNPACK_LIMITS)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError("msgpack", f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header_type", f"header must be a map, got {type(header).__name__}")
    _check_plain(header)
    _check_version(header)
    return header


def _check_version(header: dict[str, Any]) -> None:
    if "v" not in header:
        raise ProtocolError("missing_field", "header lacks 'v' (protocol version)")
    v = header["v"]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError("field_type", f"'v' must be an integer, got {type(v).__name__}")
    if v != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {v} not supported (this is {PROTOCOL_VERSION})")


def _check_type(header: dict[str, Any], key: str, types: tuple[type, ...]) -> None:
    value = header[key]
    if isinstance(value, bool) or not isinstance(value, types):
        want = " or ".join(t.__name__ for t in types)
        raise ProtocolError("field_type", f"'{key}' must be {want}, got {type(value).__name__}")


def _check_frame_header(header: dict[str, Any]) -> tuple[int, int, np.dtype]:
    for key, types in _FRAME_FIELDS.items():
        if key not in header:
            raise ProtocolError("missing_field", f"header lacks '{key}'")
        _check_type(header, key, types)
    for key, types in _SCAN_TYPES.items():
        if header.get(key) is not None:
            _check_type(header, key, types)
    for key in ("dwell_time_s", "pixel_size_m"):  # sizes: a zero, negative or non-finite one is a broken header
        value = header.get(key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ProtocolError("field_type", f"'{key}' must be a positive number, got {value!r}")
    if header["frame_id"] < 0:
        raise ProtocolError("field_type", f"'frame_id' must be >= 0, got {header['frame_id']}")
    if not math.isfinite(header["acquired_at"]):
        raise ProtocolError("field_type", "'acquired_at' must be a finite unix time")
    shape = header["shape"]
    if len(shape) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise ProtocolError("field_type", f"'shape' must be [H, W] of non-negative integers, got {shape!r}")
    if header["dtype"] not in DTYPES:
        raise ProtocolError("dtype", f"dtype {header['dtype']!r} not one of {sorted(DTYPES)}")
    if header["byte_order"] not in BYTE_ORDERS:
        raise ProtocolError("byte_order", f"byte_order {header['byte_order']!r} must be '<' or '>'")
    return shape[0], shape[1], np.dtype(header["dtype"]).newbyteorder(header["byte_order"])


def decode_frame(
    parts: Sequence[Any], *, max_side: int = MAX_SIDE, max_pixels: int = MAX_SIDE * MAX_SIDE, min_side: int = MIN_SIDE
) -> Frame:
    """Validate and decode a frame message; raises ProtocolError with a reason key."""
    if len(parts) != 3:
        raise ProtocolError("parts", f"a frame has 3 parts (topic, header, pixels), got {len(parts)}")
    topic = bytes(_buffer(parts[0]))
    header = _unpack_header(parts[1])
    h, w, dtype = _check_frame_header(header)
    data = _pixels(parts[2], h, w, dtype, dtype.name, max_side=max_side, max_pixels=max_pixels, min_side=min_side)
    return Frame(topic=topic, header=header, data=data)


def _pixels(part: Any, h: int, w: int, dtype: np.dtype, as_dtype: str, *, max_side: int, max_pixels: int,
            min_side: int) -> np.ndarray:
    """The (H, W) frame a pixel part holds, as `as_dtype` in native byte order: its sides within the limits, its
    size that of H x W `dtype`, and finite if floating point (checked after the cast); else ProtocolError."""
    if min(h, w) < min_side:
        raise ProtocolError("too_small", f"frame {h}x{w} has a side below {min_side}")
    if max(h, w) > max_side or h * w > max_pixels:
        raise ProtocolError("too_large", f"frame {h}x{w} exceeds {max_side} per side or {max_pixels} pixels")
    buf = _buffer(part)
    if buf.nbytes != h * w * dtype.itemsize:
        raise ProtocolError(
            "size_mismatch", f"pixel buffer has {buf.nbytes} bytes, {h}x{w} {dtype.name} needs {h * w * dtype.itemsize}"
        )
    data = np.frombuffer(buf, dtype=dtype).reshape(h, w)
    if as_dtype != dtype.name or not dtype.isnative:
        data = data.astype(as_dtype)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise ProtocolError("nonfinite", "frame holds NaN or inf")
    return data


def encode_event(topic: bytes, header: dict[str, Any]) -> list[bytes]:
    """Header-only message (series start/end, stats)."""
    header = dict(header)
    header.setdefault("v", PROTOCOL_VERSION)
    return [bytes(topic), _pack(header)]


def decode_event(parts: Sequence[Any]) -> tuple[bytes, dict[str, Any]]:
    """Inverse of encode_event; raises ProtocolError. SERIES events need 'event' and 'series_id'."""
    if len(parts) != 2:
        raise ProtocolError("parts", f"an event has 2 parts (topic, header), got {len(parts)}")
    topic = bytes(_buffer(parts[0]))
    header = _unpack_header(parts[1])
    if topic == SERIES:
        for key in ("event", "series_id"):
            if key not in header:
                raise ProtocolError("missing_field", f"series event lacks '{key}'")
            _check_type(header, key, (str,))
        if header["event"] not in SERIES_EVENTS:
            raise ProtocolError("field_type", f"series 'event' must be one of {SERIES_EVENTS}, got {header['event']!r}")
    return topic, header


# EPICS areaDetector's ADZMQ plugin (NDPluginZMQ): [JSON header, raw bytes], no topic part, over PUB or PUSH.
ARRAY_HTYPES = ("array-1.0", "chunk-1.0")
ARRAY_SERIES = "areadetector"  # the series id given to its frames: the stream has no series of its own
_ARRAY_TYPES = {"int8", "uint8", "int16", "uint16", "int32", "uint32", "float32", "float64"}
_ENDIANNESS: dict[str, Literal["<", ">"]] = {"little": "<", "big": ">"}


def _array_header(part: Any) -> dict[str, Any]:
    buf = _buffer(part)
    if buf.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("header_size", f"header of {buf.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(buf).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("json", f"header is not valid UTF-8 JSON: {str(exc)[:80]}") from None
    if not isinstance(header, dict):
        raise ProtocolError("json", f"header must be a JSON object, got {type(header).__name__}")
    _check_plain(header)
    return header


def _array_shape(header: dict[str, Any], legacy: bool) -> tuple[int, int]:
    """(H, W) from `shape`: x first before ADZMQ 1.4 (htype a list, or chunk-1.0), slowest axis first since;
    axes of length 1 beyond two are dropped."""
    shape = header.get("shape")
    if not isinstance(shape, list) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise ProtocolError("field_type", f"'shape' must be a list of non-negative integers, got {shape!r:.60}")
    dims = list(reversed(shape)) if legacy else list(shape)
    while len(dims) > 2 and 1 in dims:
        dims.remove(1)
    if len(dims) != 2:
        raise ProtocolError("field_type", f"'shape' {shape} is not a 2D image")
    return dims[0], dims[1]


def decode_array(
    parts: Sequence[Any], *, max_side: int = MAX_SIDE, max_pixels: int = MAX_SIDE * MAX_SIDE, min_side: int = MIN_SIDE
) -> Frame:
    """Validate and decode an areaDetector ADZMQ `array-1.0` message into a stemd frame.

    `frame` becomes frame_id, `ndattr` (the NDArray's attributes) rides along as a pass-through field,
    the series is ARRAY_SERIES. Signed integers and float64 become float32 (the daemon's frame dtypes);
    compressed arrays (a non-empty `encoding` or `compression`) are refused."""
    if len(parts) != 2:
        raise ProtocolError("parts", f"an array-1.0 message has 2 parts (JSON header, data), got {len(parts)}")
    header = _array_header(parts[0])
    htype = header.get("htype")
    name = htype[0] if isinstance(htype, list) and htype else htype
    if name not in ARRAY_HTYPES:
        raise ProtocolError("version", f"htype {htype!r:.60} is not 'array-1.0'")
    legacy = isinstance(htype, list) or name == "chunk-1.0"
    for key in ("type", "shape", "frame"):
        if key not in header:
            raise ProtocolError("missing_field", f"array-1.0 header lacks '{key}'")
    frame_id = header["frame"]
    if isinstance(frame_id, bool) or not isinstance(frame_id, int) or frame_id < 0:
        raise ProtocolError("field_type", f"'frame' must be an integer >= 0, got {frame_id!r:.60}")
    if not isinstance(header["type"], str) or header["type"] not in _ARRAY_TYPES:
        raise ProtocolError("dtype", f"type {header['type']!r:.60} not one of {sorted(_ARRAY_TYPES)}")
    for key in ("encoding", "compression"):
        if header.get(key) not in (None, "", "none"):
            raise ProtocolError("field_type", f"compressed arrays ({key} {header[key]!r:.40}) are not supported")
    endianness = header.get("endianness", "little")
    order = _ENDIANNESS.get(endianness) if isinstance(endianness, str) else None
    if order is None:
        raise ProtocolError("byte_order", f"endianness {header['endianness']!r:.40} must be 'little' or 'big'")
    h, w = _array_shape(header, legacy)
    dtype = np.dtype(header["type"]).newbyteorder(order)
    data = _pixels(parts[1], h, w, dtype, dtype.name if dtype.name in DTYPES else "float32",
                   max_side=max_side, max_pixels=max_pixels, min_side=min_side)
    out = frame_header(ARRAY_SERIES, frame_id, (h, w), data.dtype.name)
    out["ndattr"] = header.get("ndattr", {})
    return Frame(topic=FRAME, header=out, data=data)
