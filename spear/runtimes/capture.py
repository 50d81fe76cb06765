"""Bounded capture of a guest's stdout (output) and stderr (logs).

Output has a hard limit: past it the run fails with OUTPUT_LIMIT and the runtime stops the
guest, so a capture never holds more than its limit. Logs are best effort: past the limit the
rest is dropped, the run goes on, and the captured logs end with a note saying how much was
dropped.
"""

from __future__ import annotations

from typing import Final


class OutputCapture:
    """Collects a stream up to `limit` bytes; `overflowed` once a write would pass it.

    Writes arrive from one thread at a time (a guest's thread or a reader task), so no lock.
    """

    __slots__ = ("_chunks", "limit", "overflowed", "size")

    def __init__(self, limit: int) -> None:
        self.limit: Final = limit
        self.size = 0
        self.overflowed = False
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> bool:
        """Keep `data` if it fits; return False (and drop it) once the limit is passed."""
        if self.overflowed:
            return False
        if self.size + len(data) > self.limit:
            self.overflowed = True
            return False
        self._chunks.append(data)
        self.size += len(data)
        return True

    def getvalue(self) -> bytes:
        return b"".join(self._chunks)


class LogCapture:
    """Collects a stream up to `limit` bytes, then counts what it drops."""

    __slots__ = ("_chunks", "dropped", "limit", "size")

    def __init__(self, limit: int) -> None:
        self.limit: Final = limit
        self.size = 0
        self.dropped = 0
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        room = self.limit - self.size
        if len(data) <= room:
            self._chunks.append(data)
            self.size += len(data)
            return
        if room > 0:
            self._chunks.append(data[:room])
            self.size += room
        self.dropped += len(data) - max(room, 0)

    def note(self, text: str) -> None:
        """Append a line from spear itself (kept even when the guest's logs were cut)."""
        self._chunks.append(f"[spear] {text}\n".encode())

    def getvalue(self) -> bytes:
        body = b"".join(self._chunks)
        if self.dropped:
            body += (
                f"\n[spear] logs truncated: {self.dropped} more bytes were dropped after"
                f" runtimes.max_log_bytes ({self.limit})\n"
            ).encode()
        return body
