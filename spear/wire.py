"""The CBOR wire codec: the mesh's versioned envelope and the worker protocol's framing.

The mesh's codec goes through here; the worker protocol (kept free of dataclasses so that a
worker starts fast) and the gateway's CBOR answers call cbor2 themselves. A mesh frame is
one CBOR map `{"v": 1, "type": str, "id": int, "from": str, "body": map}`; a worker frame is
a 4-byte big-endian length followed by one CBOR map. Decoding never trusts the peer: size is capped
before parsing, the shape is checked after, and every failure is a WireError.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

from spear.errors import FrameTooLargeError, WireError

WIRE_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
_LENGTH = struct.Struct(">I")


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """One mesh message: its type tag, correlation id, sender and body."""

    type: str
    id: int
    sender: str
    body: Mapping[str, Any] = field(default_factory=dict)
    v: int = WIRE_VERSION


def dumps(value: Any) -> bytes:
    """Encode a value as CBOR; raise WireError for values CBOR cannot carry."""
    try:
        return cbor2.dumps(value)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise WireError(f"cannot encode value as CBOR: {exc}") from exc


def loads(data: bytes, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Any:
    """Decode one CBOR value of at most `max_bytes`; raise WireError if it is malformed."""
    if len(data) > max_bytes:
        raise FrameTooLargeError(f"frame of {len(data)} bytes exceeds the cap of {max_bytes}")
    try:
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise WireError(f"malformed CBOR: {exc}") from exc


def encode_envelope(env: Envelope) -> bytes:
    """Encode a mesh envelope."""
    return dumps({"v": env.v, "type": env.type, "id": env.id, "from": env.sender, "body": env.body})


def decode_envelope(data: bytes, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Envelope:
    """Decode and shape-check a mesh envelope."""
    doc = loads(data, max_bytes=max_bytes)
    if not isinstance(doc, dict):
        raise WireError(f"envelope must be a CBOR map, got {type(doc).__name__}")
    v, type_, id_, sender, body = (doc.get(k) for k in ("v", "type", "id", "from", "body"))
    if v != WIRE_VERSION:
        raise WireError(f"unsupported envelope version {v!r}, this node speaks {WIRE_VERSION}")
    if not isinstance(type_, str) or not type_:
        raise WireError("envelope field 'type' must be a non-empty string")
    if not isinstance(id_, int) or isinstance(id_, bool) or id_ < 0:
        raise WireError("envelope field 'id' must be a non-negative integer")
    if not isinstance(sender, str):
        raise WireError("envelope field 'from' must be a string")
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise WireError("envelope field 'body' must be a map")
    return Envelope(type=type_, id=id_, sender=sender, body=body)


def encode_frame(doc: Mapping[str, Any]) -> bytes:
    """Encode one worker-protocol frame: 4-byte big-endian length + a CBOR map."""
    payload = dumps(dict(doc))
    return _LENGTH.pack(len(payload)) + payload


class FrameDecoder:
    """Incremental decoder of length-prefixed CBOR frames (the worker protocol).

    Feed it bytes as they arrive; `frames()` returns every complete frame so far.
    """

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_bytes

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add received bytes; return the frames they completed, in order."""
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buf)
            if length > self._max:
                raise FrameTooLargeError(f"frame of {length} bytes exceeds the cap of {self._max}")
            end = _LENGTH.size + length
            if len(self._buf) < end:
                break
            doc = loads(bytes(self._buf[_LENGTH.size : end]), max_bytes=self._max)
            del self._buf[:end]
            if not isinstance(doc, dict):
                raise WireError(f"frame must be a CBOR map, got {type(doc).__name__}")
            out.append(doc)
        return out

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buf)
