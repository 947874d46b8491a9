"""The live wire protocol, version 1 (the page's live.js speaks the same; change both together).

Client -> server: a text `{"type": "hello", "protocol": 1}` first, then binary frames (uint32 LE sequence number +
JPEG bytes) and finally an optional text `{"type": "stop"}`.
Server -> client: text `ready` / `error` / `dropped` / `behind` messages, and one binary audio message per frame
(uint32 LE sequence number, float32 LE step time in ms, then samples_per_frame x 2 float32, interleaved stereo).
"""

from __future__ import annotations

import json
import struct

import numpy as np

PROTOCOL = 1
FPS = 30
SEQ = struct.Struct("<I")
AUDIO_HEADER = struct.Struct("<If")
SEQ_LIMIT = 2**32


class ProtocolError(ValueError):
    """A message the server refuses; `code` is the protocol's error code, `fatal` whether the socket closes."""

    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.code, self.fatal = code, fatal


def max_frame_bytes(frame_hw: tuple[int, int]) -> int:
    """The largest frame message taken: a JPEG never needs more than the raw RGB pixels plus its headers and
    tables (64 KiB covers those), so anything bigger is not a frame of this session."""
    h, w = frame_hw
    return SEQ.size + 3 * h * w + 65536


def message(kind: str, **fields: object) -> str:
    return json.dumps({"type": kind, **fields})


def error(code: str, text: str) -> str:
    return message("error", code=code, message=text)


def parse_text(data: str) -> dict:
    """A text message as a dict with a string `type`, or ProtocolError bad_message."""
    try:
        parsed = json.loads(data)
    except ValueError:
        raise ProtocolError("bad_message", f"text messages must be JSON objects, got {data[:40]!r}") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("type"), str):
        raise ProtocolError("bad_message", 'text messages must be JSON objects with a "type" field')
    return parsed


def check_hello(parsed: dict) -> None:
    if parsed["type"] != "hello":
        raise ProtocolError(
            "bad_protocol",
            f'the first message must be {{"type": "hello", "protocol": {PROTOCOL}}}',
            fatal=True,
        )
    if parsed.get("protocol") != PROTOCOL:
        raise ProtocolError(
            "bad_protocol",
            f"this server speaks live protocol {PROTOCOL}, the page asked for {parsed.get('protocol')!r}: "
            "reload the page from this server",
            fatal=True,
        )


def split_frame(data: bytes, limit: int) -> tuple[int, bytes]:
    """A binary frame message -> (sequence number, JPEG bytes)."""
    if len(data) > limit:
        raise ProtocolError(
            "too_large",
            f"frame message of {len(data)} bytes exceeds the limit of {limit}: send the frame scaled to the "
            "session's frame_size (GET /config) as JPEG",
        )
    if len(data) <= SEQ.size:
        raise ProtocolError(
            "bad_frame", f"frame message of {len(data)} bytes: expected a 4-byte sequence number and a JPEG"
        )
    return SEQ.unpack_from(data)[0], data[SEQ.size :]


def pack_audio(seq: int, step_ms: float, audio: np.ndarray) -> bytes:
    """audio float32 [2, samples] -> the binary message, samples interleaved L0 R0 L1 R1 ..."""
    return AUDIO_HEADER.pack(seq, step_ms) + np.ascontiguousarray(audio.T, dtype="<f4").tobytes()


def unpack_audio(data: bytes, channels: int = 2) -> tuple[int, float, np.ndarray]:
    """The inverse of pack_audio (for clients and tests): (seq, step_ms, float32 [channels, samples])."""
    seq, step_ms = AUDIO_HEADER.unpack_from(data)
    samples = np.frombuffer(data, dtype="<f4", offset=AUDIO_HEADER.size)
    return seq, step_ms, samples.reshape(-1, channels).T.copy()
