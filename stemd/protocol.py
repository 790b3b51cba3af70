"""The wire protocol (docs/protocol.md): multipart ZeroMQ messages, msgpack headers, raw pixels.

Pure encode/decode/validate, no sockets. Nothing from the wire is ever unpickled.
CONTRACT STUB: the names below are fixed; bodies to be written.

Message = [topic, msgpack(header)] or [topic, msgpack(header), pixel buffer] for frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

PROTOCOL_VERSION = 1

# Topics (ZeroMQ SUB prefix filters).
FRAME = b"frame"  # raw frames from the microscope / simulator into the daemon
CLEAN = b"clean"  # simulator only: the noise-free frame, for measuring quality live
RAW = b"raw"  # daemon out: the raw frame republished
DENOISED = b"denoised"  # daemon out: the cleaned frame
SERIES = b"series"  # series start/end events (header only), passed through by the daemon
STATS = b"stats"  # daemon out: periodic statistics (header only)

DTYPES = {"uint8", "uint16", "uint32", "float32"}


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
    raise NotImplementedError


def encode_frame(topic: bytes, header: dict[str, Any], data: np.ndarray) -> list[Any]:
    """Multipart parts; the pixel buffer is passed as a memoryview (send with copy=False)."""
    raise NotImplementedError


def decode_frame(parts: Sequence[Any], *, max_side: int = 8192, max_pixels: int = 8192 * 8192, min_side: int = 28) -> Frame:
    """Validate and decode a frame message; raises ProtocolError with a reason key."""
    raise NotImplementedError


def encode_event(topic: bytes, header: dict[str, Any]) -> list[bytes]:
    """Header-only message (series start/end, stats)."""
    raise NotImplementedError


def decode_event(parts: Sequence[Any]) -> tuple[bytes, dict[str, Any]]:
    """Inverse of encode_event; raises ProtocolError."""
    raise NotImplementedError
