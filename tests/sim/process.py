"""Simulated processes: one node's driver stepped by the simulation's scheduler, with crash,
restart, pause, CPU starvation and a skewed clock.

A `Driver` wraps a pure core (Raft, SWIM) exactly as the real trio driver will: it is fed a
message or a timer tick with the current time, and does the I/O the core asks for (persist +
fsync, then send, then apply) synchronously. The `Process` owns the loop around it:

    wait for the next arrival or the core's next_deadline
    -> deliver one arrived message (after the starvation delay, if any), or tick
    -> repeat

Every process of a simulation runs from one trio task, the `Scheduler`: a heap of wake-up
times, one per process, popped in (time, sequence) order. When no other task is runnable and
no other trio deadline comes first, the scheduler moves the mock clock straight to the next
wake-up instead of sleeping until it (a discrete-event loop: the same virtual times, without
one trio scheduling round per message, which is what a 1,000-node simulation spends its wall
time on otherwise). Other tasks (clients, the scenario) run whenever they are runnable or
their deadline comes first, so they see every instant they would have seen.

- crash: the driver object (volatile state) is thrown away, the disk loses its unsynced
  writes, the messages that had reached the process die with it;
- restart: a new driver built by the factory from what the disk kept;
- pause(d): the process neither ticks nor handles messages for d seconds, then the backlog
  is handled at once (a SIGSTOP or a long GC pause);
- starve(delay): each message is handled only after `delay()` seconds of "CPU" time, and
  arrivals queue meanwhile;
- clock: the time the process reads is `offset + rate * t` for virtual time t (§C12 clock
  skew and rate); its timers are converted back to virtual time to wait for them.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio
import trio.testing

from tests.sim.invariants import LivenessViolation

if TYPE_CHECKING:
    from tests.sim.disk import SimDisk
    from tests.sim.net import SimNet

#: ticks at one virtual instant after which a core counts as spinning
MAX_TICKS_AT_ONE_INSTANT = 100


class Driver(Protocol):
    """What a Process runs: a core plus its I/O, stepped synchronously."""

    @property
    def next_deadline(self) -> float: ...

    def on_message(self, src: str, message: object, now: float) -> None: ...

    def on_tick(self, now: float) -> None: ...


@dataclass(frozen=True, slots=True)
class NodeClock:
    """A process's own clock: `offset_s + rate * t` for virtual time t."""

    offset_s: float = 0.0
    rate: float = 1.0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"clock rate must be > 0, got {self.rate}")

    @property
    def exact(self) -> bool:
        return self.offset_s == 0.0 and self.rate == 1.0

    def local(self, t: float) -> float:
        return self.offset_s + self.rate * t

    def virtual(self, local: float) -> float:
        """The earliest virtual time at which the local clock reads at least `local`."""
        if math.isinf(local):
            return local
        t = (local - self.offset_s) / self.rate
        while self.local(t) < local:  # float rounding: never wake a timer early
            t = math.nextafter(t, math.inf)
        return t


class Scheduler:
    """Steps every process of one simulation from a single trio task (see the module doc)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Process, int]] = []
        self._seq = itertools.count()
        self._scope: trio.CancelScope | None = None
        self._running = False
        #: the virtual time while a process is being stepped on a frozen mock clock (which
        #: only this task moves then), else None: what the net reads instead of asking trio
        self.now: float | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Start the scheduler task in `nursery` (once; later calls do nothing)."""
        if not self._running:
            self._running = True
            nursery.start_soon(self._run, name="sim:scheduler")

    def wake(self, proc: Process, at: float) -> None:
        """Have `proc` stepped at virtual time `at` (or earlier, if already asked)."""
        if at >= proc.wake_at:
            return
        proc.wake_at = at
        heapq.heappush(self._heap, (at, next(self._seq), proc, proc.generation))
        scope = self._scope
        if scope is not None and at < scope.deadline:
            scope.deadline = at

    async def _run(self) -> None:
        clock = trio.lowlevel.current_clock()
        mock = clock if isinstance(clock, trio.testing.MockClock) else None
        current_time = clock.current_time  # what trio.current_time() reads, one call less
        # A mock clock at rate 0 moves only when jumped: a time read stays valid until then.
        frozen = mock is not None and mock.rate == 0
        run_state = _run_state_reader()
        # True while every other task is known to be blocked: set once they all blocked,
        # kept while our own steps wake no one (a woken task lands on the run queue, which
        # the statistics count), dropped whenever this task sleeps.
        settled = False
        heap, heappop = self._heap, heapq.heappop
        # On a frozen clock, the time read before a step still holds after it (a step
        # neither awaits nor jumps the clock): no new read until this task next awaits.
        now, fresh = 0.0, False
        while True:
            # The earliest live wake-up (entries of an earlier life or superseded by an
            # earlier wake-up are dropped on the way).
            at, proc = math.inf, None
            while heap:
                at, _, proc, generation = heap[0]
                if generation == proc.generation and at == proc.wake_at:
                    break
                heappop(heap)
                at, proc = math.inf, None
            if not fresh:
                now = current_time()
            fresh = frozen
            if at > now:
                runnable, to_deadline = run_state(now)
                if not settled or runnable:
                    # Let every other task run until it blocks (and take a cancellation):
                    # it may add an earlier wake-up or a deadline of its own.
                    await trio.testing.wait_all_tasks_blocked()
                    settled = True
                    fresh = False
                    continue
                if mock is None or to_deadline <= at - now:
                    self._scope = trio.CancelScope(deadline=at)
                    with self._scope:
                        await trio.sleep_forever()
                    self._scope = None
                    settled = False
                    fresh = False
                    continue
                # Nothing else can run before `at`: move the clock there at once.
                mock.jump(at - now)
                now = current_time()
                while now < at:
                    mock.jump(math.ulp(at))
                    now = current_time()
            elif not frozen:
                now = current_time()
            assert proc is not None
            heappop(heap)
            proc.wake_at = math.inf
            t = max(now, at)
            if frozen:
                self.now = t
                try:
                    proc.step(t)
                finally:
                    self.now = None
            else:
                proc.step(t)


def _run_state_reader() -> Callable[[float], tuple[int, float]]:
    """A function of the current time giving (tasks runnable, seconds to the next trio
    deadline), what `trio.lowlevel.current_statistics()` reports.

    The scheduler asks before every jump of the clock, about once per simulated message,
    and the public call also gathers I/O and task statistics it does not need (5 % of a
    1,000-node run). So it reads the two values from trio's runner directly, falling back
    to the public call if trio's internals move (private API, as in seeds.py).
    """
    context = getattr(getattr(trio._core, "_run", None), "GLOBAL_RUN_CONTEXT", None)
    runner = getattr(context, "runner", None)
    runq = getattr(runner, "runq", None)
    next_deadline = getattr(getattr(runner, "deadlines", None), "next_deadline", None)
    if runq is not None and callable(next_deadline):
        return lambda now: (len(runq), next_deadline() - now)

    def public(now: float) -> tuple[int, float]:
        stats = trio.lowlevel.current_statistics()
        return stats.tasks_runnable, stats.seconds_to_next_deadline

    return public


class Process:
    """One simulated node process.

    Args:
        name: the node's name (its address) on the SimNet.
        net: the network (the process reads its inbox; the net's scheduler steps it).
        disk: survives crashes; the factory rebuilds a driver from it.
        factory: builds a fresh driver (called on start and on every restart).
        clock: the process's clock (default: virtual time itself).
    """

    def __init__(
        self,
        name: str,
        *,
        net: SimNet,
        disk: SimDisk,
        factory: Callable[[Process], Driver],
        clock: NodeClock | None = None,
    ) -> None:
        self.name = name
        self.net = net
        self.disk = disk
        self.clock = clock or NodeClock()
        self._factory = factory
        self._scheduler: Scheduler = net.scheduler
        self._inbox = net.add_node(name)
        self._inbox.waker = self._on_arrival
        self.driver: Driver | None = None
        self.paused_until = 0.0
        self.starve_delay: Callable[[], float] | None = None
        self.incarnation = 0
        self.crashes = 0
        #: bumped on every start and crash: wake-ups of an earlier life are ignored
        self.generation = 0
        #: when the scheduler steps this process next (inf: only an arrival wakes it)
        self.wake_at = math.inf
        self._held: tuple[str, object] | None = None
        self._busy_until = 0.0
        self._spins = 0

    @property
    def up(self) -> bool:
        return self.driver is not None

    def now(self) -> float:
        """The time on this process's clock now."""
        t = trio.current_time()
        return t if self.clock.exact else self.clock.local(t)

    def start(self, nursery: trio.Nursery) -> None:
        """Build a driver from the disk and have the scheduler step it."""
        if self.driver is not None:
            raise RuntimeError(f"process {self.name} is already running")
        # Anything that arrived while the process was down had no one to receive it.
        self.net.crash(self.name, trio.current_time())
        self.incarnation += 1
        self.generation += 1
        self.wake_at = math.inf
        self._held = None
        self._spins = 0
        self.driver = self._factory(self)
        self._scheduler.start(nursery)
        self._scheduler.wake(self, trio.current_time())

    def crash(self) -> None:
        """Kill the process: volatile state and unsynced writes are lost."""
        self.generation += 1
        self.wake_at = math.inf
        self._held = None
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

    def _on_arrival(self, at: float) -> None:
        if at < self.wake_at and self.driver is not None:  # (wake's own test, first)
            self._scheduler.wake(self, at)

    def step(self, t: float) -> None:
        """Do everything due at virtual time `t`, then ask to be woken for what comes next."""
        driver = self.driver
        if driver is None:
            return
        exact = self.clock.exact
        now = t if exact else self.clock.local(t)
        # Once per message of the whole simulation: bound methods hoisted out of the loop.
        receive, name, on_message = self.net.receive, self.name, driver.on_message
        while self.driver is driver:
            if self.paused_until > t:
                self._scheduler.wake(self, self.paused_until)
                return
            if self._held is not None:
                if self._busy_until > t:
                    self._scheduler.wake(self, self._busy_until)
                    return
                src, message = self._held
                self._held = None
                on_message(src, message, now)
                continue
            item = receive(name, t)
            if item is not None:
                if self.starve_delay is not None:
                    self._held = item
                    self._busy_until = t + self.starve_delay()
                    continue
                on_message(item[0], item[1], now)
                continue
            deadline = driver.next_deadline
            if deadline <= now:
                driver.on_tick(now)
                self._check_timer_advanced(driver, now)
                continue
            self._spins = 0
            wake = deadline if exact else self.clock.virtual(deadline)
            self._scheduler.wake(self, min(wake, self._inbox.next_arrival))
            return

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
