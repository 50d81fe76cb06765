"""Simulated processes: one node's driver loop in its own cancel scope, with crash, restart,
pause and CPU starvation.

A `Driver` wraps a pure core (Raft, SWIM) exactly as the real trio driver will: it is fed a
message or a timer tick with the current virtual time, and does the I/O the core asks for
(persist + fsync, then send, then apply) synchronously. The `Process` owns the loop around it:

    wait for the next arrival or the core's next_deadline
    -> deliver one arrived message (after the starvation delay, if any), or tick
    -> repeat

- crash: cancel the loop's scope, lose the disk's unsynced writes and the messages that had
  reached the process; the driver object (volatile state) is thrown away;
- restart: a new driver built by the factory from what the disk kept;
- pause(d): the loop neither ticks nor handles messages for d seconds, then the backlog is
  handled at once (a SIGSTOP or a long GC pause);
- starve(delay): each message is handled only after `delay()` seconds of "CPU" time, and
  arrivals queue meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from tests.sim.disk import SimDisk
from tests.sim.invariants import LivenessViolation
from tests.sim.net import SimNet

#: ticks at one virtual instant after which a core counts as spinning
MAX_TICKS_AT_ONE_INSTANT = 100


class Driver(Protocol):
    """What a Process runs: a core plus its I/O, stepped synchronously."""

    @property
    def next_deadline(self) -> float: ...

    def on_message(self, src: str, message: object, now: float) -> None: ...

    def on_tick(self, now: float) -> None: ...


class Process:
    """One simulated node process.

    Args:
        name: the node's name on the SimNet.
        net: the network (the process reads its inbox).
        disk: survives crashes; the factory rebuilds a driver from it.
        factory: builds a fresh driver (called on start and on every restart).
    """

    def __init__(
        self,
        name: str,
        *,
        net: SimNet,
        disk: SimDisk,
        factory: Callable[[Process], Driver],
    ) -> None:
        self.name = name
        self.net = net
        self.disk = disk
        self._factory = factory
        self._inbox = net.add_node(name)
        self._scope: trio.CancelScope | None = None
        self.driver: Driver | None = None
        self.paused_until = 0.0
        self.starve_delay: Callable[[], float] | None = None
        self.incarnation = 0
        self.crashes = 0
        self._spins = 0

    @property
    def up(self) -> bool:
        return self.driver is not None

    def start(self, nursery: trio.Nursery) -> None:
        """Build a driver from the disk and start its loop."""
        if self.driver is not None:
            raise RuntimeError(f"process {self.name} is already running")
        # Anything that arrived while the process was down had no one to receive it.
        self.net.crash(self.name, trio.current_time())
        self.incarnation += 1
        self.driver = self._factory(self)
        self._scope = trio.CancelScope()
        nursery.start_soon(self._run, self._scope, self.driver, name=f"sim:{self.name}")

    def crash(self) -> None:
        """Kill the process: volatile state and unsynced writes are lost."""
        if self._scope is not None:
            self._scope.cancel()
        self._scope = None
        self.driver = None
        self.crashes += 1
        self.disk.crash()
        self.net.crash(self.name, trio.current_time())

    def restart(self, nursery: trio.Nursery) -> None:
        """Crash (if running) and start again from the disk."""
        if self.driver is not None:
            self.crash()
        self.start(nursery)

    def pause(self, duration_s: float) -> None:
        """Stop ticking and handling messages for `duration_s`; the backlog waits."""
        self.paused_until = max(self.paused_until, trio.current_time() + duration_s)

    def _check_timer_advanced(self, driver: Driver, now: float) -> None:
        """A tick that leaves next_deadline <= now asks to be ticked again at once; a core that
        keeps doing so spins forever in virtual time (and burns CPU in real time)."""
        if driver.next_deadline > now:
            self._spins = 0
            return
        self._spins += 1
        if self._spins > MAX_TICKS_AT_ONE_INSTANT:
            raise LivenessViolation(
                f"liveness: {self.name}'s core was ticked {self._spins} times at t={now!r} and "
                f"still has next_deadline={driver.next_deadline!r} <= now (a timer that "
                "never advances, e.g. a float rounding mismatch between deadline and check)"
            )

    async def _run(self, scope: trio.CancelScope, driver: Driver) -> None:
        with scope:
            while True:
                await self._step(driver)

    async def _step(self, driver: Driver) -> None:
        now = trio.current_time()
        if self.paused_until > now:
            await trio.sleep_until(self.paused_until)
            return
        item = self.net.receive(self.name, now)
        if item is not None:
            if self.starve_delay is not None:
                await trio.sleep(self.starve_delay())
                now = trio.current_time()
                if self.paused_until > now:
                    await trio.sleep_until(self.paused_until)
                    now = trio.current_time()
            driver.on_message(item[0], item[1], now)
            # Let other nodes run between messages handled at one instant.
            await trio.lowlevel.checkpoint()
            return
        if driver.next_deadline <= now:
            driver.on_tick(now)
            self._check_timer_advanced(driver, now)
            await trio.lowlevel.checkpoint()
            return
        await self._inbox.wait_until(driver.next_deadline)
