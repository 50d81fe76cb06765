"""The worker's end of the framed pipe: frames in from the host, responses out, and stdio kept
clear of them.

The protocol owns file descriptors 0 and 1. `Channel.open()` moves them to private
descriptors and points 0 at /dev/null and 1 at stderr, so a stray `print()` or a C library
writing to stdout lands in the logs instead of corrupting a frame.
"""

from __future__ import annotations

import _thread  # threading's lock without importing threading (a faster worker start)
import os
import sys

from spear.worker_protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    Hello,
    Message,
    MessageDecoder,
    Response,
    encode,
)

READ_CHUNK_BYTES = 64 * 1024


class Channel:
    """Reads host messages and writes worker messages over two file descriptors.

    `send` is safe from several threads (one frame is written whole under a lock); `receive`
    belongs to one reader.
    """

    def __init__(
        self, in_fd: int, out_fd: int, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    ) -> None:
        self._in = in_fd
        self._out = out_fd
        self._decoder = MessageDecoder("host", max_frame_bytes=max_frame_bytes)
        self._lock = _thread.allocate_lock()

    @classmethod
    def open(cls) -> Channel:
        """Take over stdin and stdout for the protocol and redirect fds 0 and 1 (see above)."""
        in_fd, out_fd = os.dup(0), os.dup(1)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdout.flush()
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        return cls(in_fd, out_fd)

    @property
    def in_fd(self) -> int:
        """The descriptor frames arrive on (for an event loop's reader callback)."""
        return self._in

    def receive(self) -> list[Message] | None:
        """Block until the host sent at least one whole message; None once it closed the pipe.

        Raises:
            WireError: the host broke the protocol.
        """
        while True:  # read_once inlined: this is the worker's hot path
            try:
                chunk = os.read(self._in, READ_CHUNK_BYTES)
            except BlockingIOError:
                continue
            if not chunk:
                return None
            messages = self._decoder.feed(chunk)
            if messages:
                return messages

    def read_once(self) -> list[Message] | None:
        """One read: the messages it completed (maybe none), or None once the pipe closed.

        On a non-blocking descriptor with nothing to read, returns [].

        Raises:
            WireError: the host broke the protocol.
        """
        try:
            chunk = os.read(self._in, READ_CHUNK_BYTES)
        except BlockingIOError:
            return []
        if not chunk:
            return None
        return self._decoder.feed(chunk)

    def send(self, message: Hello | Response) -> None:
        """Write one frame whole; stderr is flushed first so a request's logs precede its answer.

        Raises:
            BrokenPipeError: the host is gone.
        """
        self.send_frame(encode(message))

    def send_frame(self, encoded: bytes) -> None:
        """`send` of a frame encoded already (e.g. by `encode_answer`)."""
        sys.stderr.flush()
        with self._lock:
            written = os.write(self._out, encoded)
            if written < len(encoded):  # a frame larger than the pipe takes at once
                rest = memoryview(encoded)[written:]
                while rest:
                    rest = rest[os.write(self._out, rest) :]
