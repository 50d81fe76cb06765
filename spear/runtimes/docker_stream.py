"""Sockets to the Docker daemon: probing its address, owning an attach connection, and the
attach stream's framing (stdout and stderr multiplexed on one socket).

Each frame is an 8-byte header (stream id: 1 stdout, 2 stderr; 3 pad bytes; a big-endian
32-bit payload length) and the payload. Frames split anywhere across reads. Nothing here
imports the docker SDK.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any, Final

from spear.errors import RuntimeFailure

FRAME_HEADER: Final = struct.Struct(">BxxxL")
STDOUT: Final = 1
STDERR: Final = 2


class FrameReader:
    """Splits the attach stream into `(stream id, payload)` frames; no I/O."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        """Add received bytes; return every frame they complete, in order."""
        self._buffer += chunk
        frames: list[tuple[int, bytes]] = []
        start = 0
        size = FRAME_HEADER.size
        while len(self._buffer) - start >= size:
            stream_id, length = FRAME_HEADER.unpack_from(self._buffer, start)
            if len(self._buffer) - start - size < length:
                break
            frames.append((stream_id, bytes(self._buffer[start + size : start + size + length])))
            start += size + length
        del self._buffer[:start]
        return frames

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buffer)


def own_socket(attached: Any) -> socket.socket:
    """A socket of our own on the attach connection (a dup, so the SDK's objects can go)."""
    raw = getattr(attached, "_sock", attached)
    if type(raw) is not socket.socket:
        raise RuntimeFailure(
            "the docker runtime needs a unix:// or tcp:// daemon connection (no TLS or ssh);"
            " change runtimes.docker.host"
        )
    owned = socket.socket(fileno=os.dup(raw.fileno()))
    # Closing the response first lets it flush and release its connection in order.
    response = getattr(attached, "_response", None)
    if response is not None:
        response.close()
    attached.close()
    return owned


def probe(url: str, timeout_s: float) -> None:
    """Connect once to a unix:// or tcp:// daemon address (the SDK leaks the socket of a
    failed connect; this probe closes its own).

    Raises:
        OSError: nothing accepts connections there.
    """
    scheme, _, rest = url.partition("://")
    if scheme in ("unix", "http+unix"):
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(timeout_s)
            probe.connect(rest)
    elif scheme in ("tcp", "http"):
        host, _, port = rest.partition("/")[0].rpartition(":")
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
