"""WASI preview 1 `poll_oneoff`, answered so that a sleeping guest can be stopped.

wasmtime's own poll_oneoff blocks its thread in the host, where no epoch interrupt reaches
it: a guest sleeping an hour would hold a worker thread for an hour after its timeout or
cancel. This one sleeps through a callback that returns early when the run is stopped.

In spear's per-call sandbox stdin is a file and stdout/stderr are callbacks, so fd
subscriptions are always ready at once. Clock subscriptions may be relative (any clock) or
absolute on the realtime clock; absolute waits on other clocks are refused (ENOTSUP) because
the guest's monotonic clock has an origin only wasmtime knows.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Final

#: userdata u64, tag u8, then the union at offset 16: clock id (or fd) u32, timeout u64,
#: precision u64, flags u16 (48 bytes in all)
SUBSCRIPTION: Final = struct.Struct("<QB7xI4xQQH6x")
#: userdata u64, errno u16, type u8, then fd_readwrite: nbytes u64, flags u16 (32 bytes)
EVENT: Final = struct.Struct("<QHB5xQH6x")
TAG_CLOCK, TAG_FD_READ, TAG_FD_WRITE = 0, 1, 2
CLOCK_REALTIME: Final = 0
SUBSCRIPTION_CLOCK_ABSTIME: Final = 1
ERRNO_SUCCESS, ERRNO_FAULT, ERRNO_INTR, ERRNO_INVAL, ERRNO_NOTSUP = 0, 21, 27, 28, 58


def answer_poll(raw: bytes | bytearray, sleep: Callable[[float], bool]) -> tuple[int, bytes, int]:
    """Answer the subscriptions packed in `raw`: `(errno, packed events, event count)`.

    `sleep(seconds)` waits and returns False if the run was stopped meanwhile (then the
    answer is EINTR; the guest traps at its next epoch check).
    """
    count = len(raw) // SUBSCRIPTION.size
    if count == 0:
        return ERRNO_INVAL, b"", 0
    entries = [SUBSCRIPTION.unpack_from(raw, i * SUBSCRIPTION.size) for i in range(count)]
    ready = [(user, tag) for user, tag, *_ in entries if tag in (TAG_FD_READ, TAG_FD_WRITE)]
    if not ready:
        waits: list[tuple[int, int]] = []
        for user, tag, clock, timeout_ns, _precision, flags in entries:
            if tag != TAG_CLOCK:
                return ERRNO_INVAL, b"", 0
            if flags & SUBSCRIPTION_CLOCK_ABSTIME:
                if clock != CLOCK_REALTIME:
                    return ERRNO_NOTSUP, b"", 0
                timeout_ns = max(0, timeout_ns - time.time_ns())
            waits.append((timeout_ns, user))
        wait_ns = min(ns for ns, _ in waits)
        if not sleep(wait_ns / 1e9):
            return ERRNO_INTR, b"", 0
        ready = [(user, TAG_CLOCK) for ns, user in waits if ns <= wait_ns]
    events = b"".join(EVENT.pack(user, ERRNO_SUCCESS, tag, 0, 0) for user, tag in ready)
    return ERRNO_SUCCESS, events, len(ready)
