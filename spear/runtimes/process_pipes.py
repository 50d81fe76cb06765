"""The pipes of one worker process, multiplexed: frames out to stdin, frames and logs in.

One epoll set watches the worker's stdout and stderr, its pidfd (readable once the main
process exits) and, while frames wait to be written, its stdin. trio waits on the epoll
descriptor itself, so a single task moves bytes both ways with no helper tasks: whichever
caller holds the pump role (see process_worker) calls `wait()`, then the non-blocking
`flush()`, `read_stdout()` and `read_stderr()` (and `exited()` when nothing was read).
Writing never blocks: a frame the pipe cannot take yet stays queued (a worker busy writing a
large answer is still read meanwhile, so the two sides cannot deadlock on full pipes).

Deadlines without a cancel scope per request: entering and leaving a trio cancel scope cost
about 12 us on the development VM, as much as the rest of a warm round trip. So the epoll set
also holds a timerfd (CLOCK_MONOTONIC, the clock of trio's SystemClock), armed at the earliest
deadline in flight: the pump wakes at it like at any other event. Where no timerfd can be
made (`has_timer` False) or trio runs on another clock (a test's MockClock), callers keep
using cancel scopes."""

from __future__ import annotations

import ctypes
import math
import os
import select
import time
from collections import deque
from typing import Final

import trio

READ_CHUNK_BYTES: Final = 256 * 1024
_CLOCK_MONOTONIC: Final = 1
_TFD_NONBLOCK_CLOEXEC: Final = os.O_NONBLOCK | os.O_CLOEXEC
_TFD_TIMER_ABSTIME: Final = 1


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.timerfd_settime.argtypes = (
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.c_void_p,
        )
    except (OSError, AttributeError):  # pragma: no cover - not glibc/musl on Linux
        return None
    return libc


_LIBC: Final = _load_libc()


class WorkerPipes:
    """The parent's ends of a worker's stdin, stdout and stderr, plus its pidfd.

    Create before spawning, pass `child_fds()` to the spawn, then `attach(pid)`.
    `sending` (read-only) is True while queued bytes wait for stdin: only then has `flush()`
    anything to do.
    """

    def __init__(self) -> None:
        stdin_r, self._stdin = os.pipe()
        self._stdout, stdout_w = os.pipe()
        self._stderr, stderr_w = os.pipe()
        self._child = (stdin_r, stdout_w, stderr_w)
        for fd in (self._stdin, self._stdout, self._stderr):
            os.set_blocking(fd, False)
        self._epoll = select.epoll()
        self._epoll.register(self._stdout, select.EPOLLIN)
        self._epoll.register(self._stderr, select.EPOLLIN)
        self._pidfd = -1
        self._exit_poll = select.poll()
        self._stderr_open = True
        self._stdout_open = True
        self._outbox: deque[memoryview] = deque()
        self.sending = False  # bytes wait in the outbox, stdin is watched
        self._closed = False
        self._timer = (
            -1 if _LIBC is None else _LIBC.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK_CLOEXEC)
        )
        self._armed = math.inf
        self._timespec = _Itimerspec()
        if self._timer >= 0:
            self._epoll.register(self._timer, select.EPOLLIN)

    @property
    def has_timer(self) -> bool:
        """Whether `arm` works (a timerfd could be made)."""
        return self._timer >= 0

    def arm(self, at: float) -> None:
        """Make `wait()` return by `at` (CLOCK_MONOTONIC seconds, as `time.perf_counter()`)
        unless the timer is armed earlier already; `disarm_fired` re-arms it after it fires."""
        if at >= self._armed or self._timer < 0:
            return
        self._armed = at
        seconds = max(at, 1e-9)  # 0 would disarm the timer
        value = self._timespec.it_value
        value.tv_sec = int(seconds)
        value.tv_nsec = int((seconds - int(seconds)) * 1e9)
        _LIBC.timerfd_settime(self._timer, _TFD_TIMER_ABSTIME, self._timespec, None)  # type: ignore[union-attr]

    def disarm_fired(self) -> bool:
        """Whether the timer fired since it was armed (it is then unarmed)."""
        if self._timer < 0 or time.perf_counter() < self._armed:
            return False  # not armed, or not due yet: no read needed
        try:
            os.read(self._timer, 8)
        except BlockingIOError:
            return False
        self._armed = math.inf
        return True

    def child_fds(self) -> tuple[int, int, int]:
        """The child's stdin, stdout and stderr ends (closed here by `attach`)."""
        return self._child

    def attach(self, pid: int) -> None:
        """Close the child's ends in this process and watch the child's exit."""
        for fd in self._child:
            os.close(fd)
        self._child = (-1, -1, -1)
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:  # pragma: no cover - kernels before 5.3: stdout EOF tells the exit
            return
        self._epoll.register(self._pidfd, select.EPOLLIN)
        self._exit_poll.register(self._pidfd, select.POLLIN)

    async def wait(self) -> None:
        """Wait until something may be read, the process exited, or stdin takes bytes.

        Returns at once, without waiting, after `close()`.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            await trio.lowlevel.wait_readable(self._epoll)
        except trio.ClosedResourceError:  # not suppress(): a context manager per wait costs
            return  # closed while waiting: the caller sees that the instance is gone

    def send(self, frame: bytes) -> None:
        """Queue `frame` and write what the pipe takes now.

        Raises:
            BrokenPipeError: the worker closed its stdin (it exited, most likely).
        """
        if not self._outbox:  # the usual case: the pipe takes the whole frame at once
            try:
                written = os.write(self._stdin, frame)
            except BlockingIOError:
                written = 0
            if written == len(frame):
                return
            self._outbox.append(memoryview(frame)[written:])
        else:
            self._outbox.append(memoryview(frame))
        self.flush()

    def flush(self) -> None:
        """Write queued bytes until the pipe is full; watch stdin while some remain.

        Raises:
            BrokenPipeError: the worker closed its stdin.
        """
        while self._outbox:
            head = self._outbox[0]
            try:
                written = os.write(self._stdin, head)
            except BlockingIOError:
                break
            if written == len(head):
                self._outbox.popleft()
            else:
                self._outbox[0] = head[written:]
        self._watch_stdin(bool(self._outbox))

    def read_stdout(self) -> bytes | None:
        """What stdout holds now (b"" if nothing), or None at end of file."""
        if not self._stdout_open:
            return None
        try:  # inline, no helper: this runs on every wake-up
            chunk: bytes | None = os.read(self._stdout, READ_CHUNK_BYTES) or None
        except BlockingIOError:
            return b""
        if chunk is None:
            # Closed: stop watching it (epoll would report it forever); the exit comes next.
            self._epoll.unregister(self._stdout)
            self._stdout_open = False
        return chunk

    @property
    def watches_exit(self) -> bool:
        """Whether `wait()` also wakes when the process exits (pidfd support)."""
        return self._pidfd >= 0

    def read_stderr(self) -> bytes:
        """What stderr holds now (b"" if nothing or at end of file)."""
        try:  # inline, no helper: this runs on every wake-up
            chunk: bytes | None = os.read(self._stderr, READ_CHUNK_BYTES) or None
        except BlockingIOError:
            return b""
        if chunk is None:
            # The worker closed its stderr: stop watching it, or epoll reports it forever.
            if self._stderr_open:
                self._epoll.unregister(self._stderr)
                self._stderr_open = False
            return b""
        return chunk

    def exited(self) -> bool:
        """Whether the main process has exited (not reaped: its group id stays reserved)."""
        return bool(self._exit_poll.poll(0)) if self._pidfd >= 0 else False

    def close(self) -> None:
        """Close every descriptor; idempotent."""
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self._epoll.fileno())
        self._epoll.close()
        for fd in (self._stdin, self._stdout, self._stderr, self._pidfd, self._timer, *self._child):
            if fd >= 0:
                os.close(fd)
        self._outbox.clear()

    def _watch_stdin(self, on: bool) -> None:
        if on != self.sending:
            if on:
                self._epoll.register(self._stdin, select.EPOLLOUT)
            else:
                self._epoll.unregister(self._stdin)
            self.sending = on
