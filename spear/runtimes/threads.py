"""Guests on worker threads: runs that a cancel really stops, and the epoch ticker.

A thread cannot be killed, so a blocking guest call is always paired with a way to make it
return (an epoch interrupt for wasm). `run_stoppable` is the trio side of that pairing: on
cancel it asks the guest to stop and waits, shielded and bounded, until the thread is gone.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TypeVar, cast

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")


async def run_stoppable(
    fn: Callable[[], T],
    *,
    limiter: trio.CapacityLimiter,
    acquire_timeout_s: float,
    stop: Callable[[], None],
    grace_s: float,
    name: str,
) -> T:
    """`fn()` in a worker thread holding a `limiter` token; on cancel, `stop()` it.

    When the caller is cancelled, `stop()` is called (from the trio thread) and this waits
    up to `grace_s` for the thread to finish before `trio.Cancelled` propagates; a thread
    that outlives the grace is logged (it still holds its limiter token until it ends).

    Only the wait for a token has a trio timeout: a running guest keeps its own deadline in
    real time, which also keeps a MockClock (autojump) from timing it out in virtual time.

    Raises:
        trio.TooSlowError: no token became free within `acquire_timeout_s`.
    """
    slot = _ThreadSlot(limiter, acquire_timeout_s)
    try:
        return await trio.to_thread.run_sync(
            fn, abandon_on_cancel=True, limiter=cast(trio.CapacityLimiter, slot)
        )
    except trio.Cancelled:
        stop()
        if slot.acquired and not await slot.wait_released(grace_s):
            log.warning("a stopped guest of %s is still running after %s s", name, grace_s)
        raise


class _ThreadSlot:
    """The CapacityLimiter-like object trio sees for one thread.

    trio calls `acquire_on_behalf_of` right before it starts the thread and
    `release_on_behalf_of` once the thread has finished, even an abandoned one (its
    documented contract); so `acquired` says whether a thread exists, and `wait_released`
    waits for it to be gone.
    """

    __slots__ = ("_event", "_limiter", "_timeout_s", "acquired", "released")

    def __init__(self, limiter: trio.CapacityLimiter, timeout_s: float) -> None:
        self._limiter = limiter
        self._timeout_s = timeout_s
        self._event: trio.Event | None = None
        self.acquired = False
        self.released = False

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        try:
            self._limiter.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            with trio.fail_after(self._timeout_s):
                await self._limiter.acquire_on_behalf_of(borrower)
        self.acquired = True

    def release_on_behalf_of(self, borrower: object) -> None:
        self._limiter.release_on_behalf_of(borrower)
        self.released = True
        if self._event is not None:
            self._event.set()

    async def wait_released(self, grace_s: float) -> bool:
        """Wait (shielded) up to `grace_s` for the thread to finish; False if it did not."""
        if self.released:
            return True
        self._event = trio.Event()
        with trio.move_on_after(grace_s) as scope:
            scope.shield = True
            await self._event.wait()
        return self.released


class EpochTicker:
    """Calls `tick()` every `tick_s` from its own thread while guests run, and for `linger_s`
    after the last one stopped.

    A thread rather than a trio task: the epoch must advance in real time whatever the event
    loop is doing (a busy gateway, a test's MockClock). It sleeps on a condition once no guest
    has run for `linger_s`, so an idle node does not wake up every tick. The linger spares a
    busy node one wake-up of this thread per short run (a futex wake and a GIL hand-off
    against the event loop's thread, for a run of a tenth of a millisecond): while runs keep
    coming it ticks on its own, and `enter` and `exit` only count.
    """

    def __init__(self, tick: Callable[[], None], tick_s: float, linger_s: float = 1.0) -> None:
        self._tick = tick
        self._tick_s = tick_s
        self._linger_s = linger_s
        self._cond = threading.Condition()
        self._active = 0
        self._last_exit = -math.inf
        self._idle = False
        self._closed = False
        self.ticks = 0
        self._thread = threading.Thread(target=self._main, name="spear-epoch-ticker", daemon=True)
        self._thread.start()

    def enter(self) -> None:
        """A guest starts running (any thread)."""
        with self._cond:
            self._active += 1
            if self._idle:
                self._cond.notify()

    def exit(self) -> None:
        """A guest stopped running."""
        with self._cond:
            self._active -= 1
            if self._active == 0:
                self._last_exit = time.monotonic()

    def close(self) -> None:
        """Stop the thread and wait for it (blocking)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _main(self) -> None:
        with self._cond:
            while not self._closed:
                if self._active == 0 and time.monotonic() - self._last_exit >= self._linger_s:
                    self._idle = True
                    self._cond.wait()
                    self._idle = False
                    continue
                # Only close() notifies a ticking thread, so every other wake-up is a tick.
                self._cond.wait(self._tick_s)
                self._tick()
                self.ticks += 1
