"""The InstancePool: the warm worker instances of one task (DESIGN.md sections 4 and 5).

It lends each instance to at most its capacity of callers at once and keeps at most
`max_instances` open (starting and closing ones count). Callers with no free instance wait in a
bounded FIFO line until their acquire deadline (then `SaturatedError`), unless an instance is
starting for them: a cold start may use the rest of their invocation deadline. Instances start
and close in the pool's own nursery, so a caller that gives up never leaks a start or a slot.
Unhealthy instances are evicted, instances are recycled after `max_requests`, idle ones above
`min_instances` are reaped. docs/pool.md is the user's view of the same rules.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from spear.errors import RuntimeFailure, SaturatedError, SpearError, UnavailableError
from spear.model import ErrorCode, ExecStatus, FunctionSpec, RunOutcome
from spear.roles.pool_contract import (
    CLOSE_TIMEOUT_S,
    COUNTERS,
    SATURATED_RETRY_AFTER_S,
    START_RETRY_S,
    START_TIMEOUT_S,
    InstanceStarter,
    InstanceStartError,
    InstanceStartTimeout,
    Lease,
    PoolSettings,
)
from spear.roles.pool_slots import Slot, Slots

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    slot: Slot | None = None
    cold: bool = False
    error: SpearError | None = None


class InstancePool:
    """The warm instances of one task; run it with `serve` (or `open_instance_pool`)."""

    def __init__(self, spec: FunctionSpec, starter: InstanceStarter, settings: PoolSettings):
        self.spec = spec
        self.settings = settings
        self._starter = starter
        self._slots = Slots(settings)
        self._waiters: deque[_Waiter] = deque()
        self._counts: Counter[str] = Counter()
        self._retry_at = -math.inf
        self._nursery: trio.Nursery | None = None
        self._scope = trio.CancelScope()
        self._closed = False
        self._done = trio.Event()
        self._wake = trio.Event()
        self._wake_at = math.inf

    # --- lifetime ---------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the pool (prewarm, starts, reaping) until `aclose` or cancellation.

        On the way out every instance is closed, shielded, within CLOSE_TIMEOUT_S.
        """
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._maintain)
                    task_status.started()
        finally:
            self._closed = True
            self._nursery = None
            self._fail_waiters()
            await self._close_all()
            self._done.set()

    async def aclose(self) -> None:
        """Stop the pool and close its instances; returns once they are closed. Idempotent."""
        self._closed = True
        self._scope.cancel()
        if self._nursery is None and not self._done.is_set():
            self._fail_waiters()  # `serve` has not run: it has no instances to close
            return
        with trio.CancelScope(shield=True):
            await self._done.wait()

    def _fail_waiters(self) -> None:
        error = UnavailableError(
            f"the instance pool of task {self.spec.name!r} is closed (the task was deleted or"
            " the node is stopping)"
        )
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.error = error
            waiter.event.set()

    async def _close_all(self) -> None:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for slot in list(self._slots.open):
                    nursery.start_soon(self._close_slot, slot)

    async def _close_slot(self, slot: Slot) -> None:
        # Shielded: eviction and shutdown both must finish what they begin, within a bound.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLOSE_TIMEOUT_S) as bound:
                try:
                    await slot.instance.aclose()
                except Exception:
                    log.exception("closing an instance of task %s failed", self.spec.name)
            if bound.cancelled_caught:
                log.warning(
                    "an instance of task %s took over %.0f s to close",
                    self.spec.name,
                    CLOSE_TIMEOUT_S,
                )
        self._slots.open.discard(slot)
        self._dispatch()

    # --- acquire and release ----------------------------------------------------------------

    @asynccontextmanager
    async def acquire(
        self, *, deadline: float = math.inf, acquire_timeout_s: float | None = None
    ) -> AsyncIterator[Lease]:
        """Borrow an instance until the block ends; `deadline` is a `trio.current_time()`.

        `acquire_timeout_s` replaces the pool's for this caller (e.g. `math.inf` for an
        async execution, which may wait for an instance until its deadline).

        Raises:
            SaturatedError: no instance was free by the acquire deadline (and none was
                starting for this caller), or `max_waiters` callers are already queued.
            InstanceStartError: the instance started for this caller failed to start.
            InstanceStartTimeout: it was still starting at `deadline`.
            UnavailableError: the pool is closed.
        """
        slot, lease = await self._lease(deadline, acquire_timeout_s)
        try:
            yield lease
        finally:
            self._release(slot)

    async def invoke(
        self,
        data: bytes,
        *,
        deadline: float,
        execution_id: str,
        acquire_timeout_s: float | None = None,
    ) -> RunOutcome:
        """Acquire an instance, serve one invocation on it with the same deadline, release it.

        A failed cold start is an outcome (`failed`, error code `start_failed`), and so is a
        cold start still running at the deadline (`timeout`); the outcome says whether the
        request was cold and has the wait in `timings_ms["acquire"]`.

        Raises:
            SaturatedError: as `acquire`.
            UnavailableError: the pool is closed.
        """
        began = trio.current_time()
        try:
            # Not `acquire`: this is the hot path, and a context manager costs here.
            slot, lease = await self._lease(deadline, acquire_timeout_s)
        except (InstanceStartError, InstanceStartTimeout) as exc:
            failed = isinstance(exc, InstanceStartError)
            return RunOutcome(
                status=ExecStatus.FAILED if failed else ExecStatus.TIMEOUT,
                error_code=ErrorCode.START_FAILED if failed else ErrorCode.TIMEOUT,
                error_message=str(exc),
                cold=True,
                timings_ms={"acquire": (trio.current_time() - began) * 1000},
            )
        try:
            outcome = await lease.instance.invoke(
                data, deadline=deadline, execution_id=execution_id
            )
        finally:
            self._release(slot)
        # Built field by field: dataclasses.replace costs several times more on this path.
        return RunOutcome(
            status=outcome.status,
            output=outcome.output,
            logs=outcome.logs,
            content_type=outcome.content_type,
            error_code=outcome.error_code,
            error_message=outcome.error_message,
            exit_code=outcome.exit_code,
            cold=lease.cold,
            timings_ms={"acquire": lease.acquire_ms, **outcome.timings_ms},
        )

    async def _lease(self, deadline: float, acquire_timeout_s: float | None) -> tuple[Slot, Lease]:
        if self._closed:
            raise UnavailableError(f"the instance pool of task {self.spec.name!r} is closed")
        self._evict_dead()
        if not self._waiters and (slot := self._slots.free()) is not None:
            slot.busy += 1  # nobody is ahead: no queueing (the warm path)
            self._counts["warm_hits"] += 1
            return slot, Lease(instance=slot.instance, cold=False, acquire_ms=0.0)
        began = trio.current_time()
        if acquire_timeout_s is None:
            acquire_timeout_s = self.settings.acquire_timeout_s
        waiter = await self._wait_in_line(began, deadline, acquire_timeout_s)
        slot = waiter.slot
        assert slot is not None
        self._counts["cold_starts" if waiter.cold else "warm_hits"] += 1
        acquire_ms = (trio.current_time() - began) * 1000
        return slot, Lease(instance=slot.instance, cold=waiter.cold, acquire_ms=acquire_ms)

    async def _wait_in_line(
        self, began: float, deadline: float, acquire_timeout_s: float
    ) -> _Waiter:
        waiter = _Waiter()
        if len(self._waiters) >= self.settings.max_waiters:
            raise self._saturated("its waiting line is full", "pool.max_waiters")
        self._waiters.append(waiter)
        self._scale()
        try:
            await _wait(waiter, min(deadline, began + acquire_timeout_s))
            if not waiter.event.is_set() and self._awaits_start(waiter):
                # Not saturation: an instance is starting for this caller. Its cold start may
                # take what is left of the invocation's own deadline.
                await _wait(waiter, deadline)
        except BaseException:
            self._abandon(waiter)
            raise
        if waiter.slot is not None:
            return waiter
        if waiter.error is not None:
            raise waiter.error
        starting = self._awaits_start(waiter)
        self._abandon(waiter)
        waited_ms = (trio.current_time() - began) * 1000
        if starting:
            hint = ""
            if self.spec.runtime in ("process", "docker"):
                hint = "; a worker is ready once it sends its hello frame (docs/workers.md)"
            raise InstanceStartTimeout(
                f"the instance started for this call of task {self.spec.name!r} was not ready"
                f" within the call's deadline ({waited_ms:.0f} ms){hint}"
            )
        setting = "pool.acquire_timeout_ms"
        if deadline < began + acquire_timeout_s:
            setting = "the invocation's timeout"
        raise self._saturated(f"no instance became free within {waited_ms:.0f} ms", setting)

    def _awaits_start(self, waiter: _Waiter) -> bool:
        """Whether an instance now starting will serve this waiter (it is not saturation)."""
        return self._waiters.index(waiter) < self._slots.starting * self.settings.max_concurrency

    def _saturated(self, why: str, setting: str) -> SaturatedError:
        self._counts["saturated"] += 1
        s = self.settings
        return SaturatedError(
            f"task {self.spec.name!r} is saturated: {why} ({s.max_instances} instances x"
            f" {s.max_concurrency} requests, {len(self._waiters)} waiting; {setting} bounds"
            " the wait); retry later or raise pool.max_instances",
            retry_after_s=SATURATED_RETRY_AFTER_S,
        )

    def _abandon(self, waiter: _Waiter) -> None:
        """The caller left: give back what it was handed, or leave the line."""
        if waiter.slot is not None:
            slot, waiter.slot = waiter.slot, None
            self._release(slot, served=False)
            return
        with contextlib.suppress(ValueError):  # already failed, or served and given back
            self._waiters.remove(waiter)

    def _hand(self, slot: Slot, waiter: _Waiter) -> None:
        slot.busy += 1
        waiter.slot = slot
        waiter.cold, slot.fresh = slot.fresh, False
        waiter.event.set()

    def _release(self, slot: Slot, *, served: bool = True) -> None:
        slot.busy -= 1
        slot.served += served
        slot.last_used = trio.current_time()
        if self._closed:
            return
        if slot in self._slots.usable:
            if not slot.instance.healthy:
                self._retire(slot, "evictions")
            elif 0 < self.settings.max_requests <= slot.served:
                self._retire(slot, "recycled")
        elif slot.busy == 0:
            self._schedule_close(slot)  # recycled earlier, now drained
        self._dispatch()
        if slot.busy == 0:
            self._wake_by(slot.last_used + self.settings.idle_timeout_s)

    # --- instances --------------------------------------------------------------------------

    def _evict_dead(self) -> None:
        for slot in self._slots.dead():
            self._retire(slot, "evictions")

    def _retire(self, slot: Slot, reason: str) -> None:
        """Take an instance out of service; close it now if unhealthy, else once drained."""
        self._slots.usable.remove(slot)
        self._counts[reason] += 1
        if slot.busy == 0 or not slot.instance.healthy:
            self._schedule_close(slot)

    def _schedule_close(self, slot: Slot) -> None:
        if self._nursery is not None and not slot.closing:
            slot.closing = True
            self._nursery.start_soon(self._close_slot, slot)

    def _dispatch(self) -> None:
        """Hand free capacity to waiters in arrival order, then start what is still missing."""
        if self._closed:
            return
        self._evict_dead()
        while self._waiters and (slot := self._slots.free()) is not None:
            self._hand(slot, self._waiters.popleft())
        self._scale()

    def _scale(self) -> None:
        if self._closed or self._nursery is None:
            return
        slots = self._slots
        if not self._waiters and slots.missing() <= 0:
            return  # the common case, cheaply
        per = self.settings.max_concurrency
        uncovered = len(self._waiters) - slots.starting * per
        wanted = -(-uncovered // per) if uncovered > 0 else 0
        if trio.current_time() >= self._retry_at:
            wanted = max(wanted, slots.missing())
        for _ in range(min(wanted, slots.room())):
            slots.starting += 1
            self._nursery.start_soon(self._start_one)

    async def _start_one(self) -> None:
        began = trio.current_time()
        try:
            with trio.fail_after(START_TIMEOUT_S):
                instance = await self._starter.start_instance(self.spec)
        except BaseException as exc:
            self._slots.starting -= 1
            if not isinstance(exc, Exception):
                raise  # cancelled: the pool is closing
            if isinstance(exc, trio.TooSlowError):
                exc = RuntimeFailure(f"it did not start within {START_TIMEOUT_S:.0f} s")
            self._start_failed(exc)
            return
        self._slots.starting -= 1
        now = trio.current_time()
        slot = self._slots.add(instance, now)
        self._counts["starts"] += 1
        self._counts["start_ms_total"] += round((now - began) * 1000)
        if self._closed:
            self._slots.usable.remove(slot)
            await self._close_slot(slot)
            return
        self._dispatch()
        slot.fresh = False  # whoever comes later finds it warm
        self._wake_by(now + self.settings.idle_timeout_s)

    def _start_failed(self, exc: Exception) -> None:
        self._counts["failed_starts"] += 1
        self._retry_at = trio.current_time() + START_RETRY_S
        log.warning("an instance of task %s failed to start: %s", self.spec.name, exc)
        if self._closed:
            return
        error = InstanceStartError(
            f"the worker instance of task {self.spec.name!r} failed to start: {exc}"
        )
        error.__cause__ = exc
        # Fail the callers this start was for: those no other start in flight will serve.
        per = self.settings.max_concurrency
        uncovered = len(self._waiters) - self._slots.starting * per
        for _ in range(min(uncovered, per)):
            waiter = self._waiters.popleft()
            waiter.error = error
            waiter.event.set()
        self._dispatch()
        self._wake_by(self._retry_at)

    # --- idle reaping and min_instances -----------------------------------------------------

    async def _maintain(self) -> None:
        self._dispatch()  # callers that queued before the pool ran, and prewarm
        while True:
            now = trio.current_time()
            self._reap(now)
            self._scale()
            self._wake = trio.Event()
            self._wake_at = self._next_maintenance(now)
            with trio.move_on_at(self._wake_at):
                await self._wake.wait()

    def _wake_by(self, at: float) -> None:
        """Have the maintenance task look again by `at` (only woken if it would sleep past it).

        Under steady load this wakes nothing: a released instance expires after every idle one.
        """
        if at < self._wake_at:
            self._wake_at = at
            self._wake.set()

    def _reap(self, now: float) -> None:
        for slot in self._slots.expired(now):
            self._retire(slot, "reaped")

    def _next_maintenance(self, now: float) -> float:
        at = self._slots.next_expiry()
        if self._slots.missing() > 0 and self._retry_at > now:
            at = min(at, self._retry_at)  # top up min_instances after a failed start
        return at

    # --- observation ------------------------------------------------------------------------

    def statistics(self) -> dict[str, int]:
        """The gauges of this pool, then its COUNTERS (docs/pool.md explains each)."""
        counts = self._counts
        return {
            **self._slots.gauges(),
            "waiting": len(self._waiters),
            **{key: counts[key] for key in COUNTERS},
        }


@asynccontextmanager
async def open_instance_pool(
    spec: FunctionSpec, starter: InstanceStarter, settings: PoolSettings
) -> AsyncIterator[InstancePool]:
    """A running InstancePool, closed (instances and all) when the block ends."""
    pool = InstancePool(spec, starter, settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.serve)
        try:
            yield pool
        finally:
            await pool.aclose()


async def _wait(waiter: _Waiter, until: float) -> None:
    with trio.move_on_at(until):
        await waiter.event.wait()
