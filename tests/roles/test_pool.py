"""The InstancePool's logic with a fake runtime and fake instances, under trio's autojump clock."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
import trio
import trio.testing

from spear.config import PoolConfig, load_config
from spear.errors import (
    ConfigError,
    NotFoundError,
    RuntimeFailure,
    SaturatedError,
    UnavailableError,
    ValidationError,
)
from spear.model import ErrorCode, ExecStatus, FunctionSpec, PoolSpec, RunOutcome, TaskId
from spear.roles.invoke_path import error_answer
from spear.roles.pool import InstancePool, open_instance_pool
from spear.roles.pool_contract import START_RETRY_S, PoolSettings
from spear.roles.pool_manager import PoolManager
from tests.runtimes.conftest import function_spec

START_S = 0.5  # a fake instance's cold start
RUN_S = 1.0  # a fake invocation


class FakeInstance:
    """Serves b"hold" until the runtime's gate opens, b"crash" by turning unhealthy."""

    def __init__(self, runtime: FakeRuntime, number: int) -> None:
        self.runtime = runtime
        self.number = number
        self.healthy = True
        self.closed = False
        self.max_concurrency = runtime.instance_concurrency
        self.in_flight = 0
        self.most_in_flight = 0

    async def invoke(self, data: bytes, *, deadline: float, execution_id: str) -> RunOutcome:
        assert not self.closed, "a closed instance was given a request"
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if data == b"hold":
                await self.runtime.gate.wait()
            else:
                await trio.sleep(RUN_S)
            if data == b"crash":
                self.healthy = False
                return RunOutcome(status=ExecStatus.FAILED, error_code=ErrorCode.EXIT_NONZERO)
            self.runtime.served_by.append((data, self.number))
            return RunOutcome(
                status=ExecStatus.SUCCEEDED, output=data.upper(), cold=False, timings_ms={"run": 1}
            )
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.runtime.open -= 1


class FakeRuntime:
    """Starts FakeInstances in START_S; counts instances open at once (starting included)."""

    def __init__(self) -> None:
        self.instances: list[FakeInstance] = []
        self.open = 0
        self.most_open = 0
        self.failures = 0  # the next this-many starts fail
        self.gate = trio.Event()
        self.served_by: list[tuple[bytes, int]] = []
        self.instance_concurrency = 1024  # what each instance announces (a worker's hello)

    async def start_instance(self, spec: FunctionSpec) -> FakeInstance:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await trio.sleep(START_S)
            if self.failures:
                self.failures -= 1
                raise RuntimeFailure("the worker exited with code 3 before its hello")
        except BaseException:
            self.open -= 1
            raise
        instance = FakeInstance(self, len(self.instances))
        self.instances.append(instance)
        return instance


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


PoolOpener = Callable[..., Any]


@pytest.fixture
def open_pool(runtime: FakeRuntime) -> PoolOpener:
    """`async with open_pool(max_instances=2, ...) as pool:` on the fake runtime."""

    @asynccontextmanager
    async def opener(**settings: Any) -> AsyncIterator[InstancePool]:
        spec = function_spec(mode="worker", runtime="process")
        async with open_instance_pool(spec, runtime, PoolSettings(**settings)) as pool:
            yield pool

    return opener


async def settle(seconds: float) -> None:
    """Let `seconds` pass, then let every task that woke up run until it blocks again."""
    await trio.sleep(seconds)
    await trio.testing.wait_all_tasks_blocked()


async def call(pool: InstancePool, data: bytes = b"x", **kw: Any) -> RunOutcome:
    deadline = kw.pop("deadline", math.inf)
    return await pool.invoke(data, deadline=deadline, execution_id="ex-1", **kw)


# --- sharing, bounds, FIFO, saturation -----------------------------------------------------


async def test_parallel_calls_share_bounded_instances(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    outcomes: list[RunOutcome] = []
    async with open_pool(max_instances=3, max_concurrency=2) as pool:

        async def one(i: int) -> None:
            outcomes.append(await call(pool, b"job%d" % i))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
        stats = pool.statistics()
    assert [o.status for o in outcomes] == [ExecStatus.SUCCEEDED] * 20
    assert runtime.most_open == 3
    assert len(runtime.instances) == 3
    assert max(i.most_in_flight for i in runtime.instances) == 2
    assert sum(o.cold for o in outcomes) == 3  # the first request of each started instance
    assert stats["cold_starts"] == 3 and stats["warm_hits"] == 17
    assert stats["starts"] == 3 and stats["in_flight"] == 0 and stats["waiting"] == 0


async def test_an_instance_gets_no_more_than_it_announced(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    runtime.instance_concurrency = 1
    async with open_pool(max_instances=2, max_concurrency=4) as pool:
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(call, pool)
        stats = pool.statistics()
    assert [i.most_in_flight for i in runtime.instances] == [1, 1]
    assert stats["warm_hits"] + stats["cold_starts"] == 6


async def test_waiters_are_served_in_arrival_order(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool(max_instances=1) as pool, trio.open_nursery() as nursery:
        nursery.start_soon(call, pool, b"hold")
        await trio.testing.wait_all_tasks_blocked()
        await settle(START_S)  # the instance is up and held
        for i in range(5):
            nursery.start_soon(call, pool, b"w%d" % i)
            await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics()["waiting"] == 5
        runtime.gate.set()
    assert [data for data, _ in runtime.served_by] == [b"hold"] + [b"w%d" % i for i in range(5)]


async def test_acquire_deadline_answers_saturated(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        open_pool(max_instances=1, acquire_timeout_s=2.0) as pool,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(call, pool, b"hold")
        await settle(START_S)
        began = trio.current_time()
        with pytest.raises(SaturatedError, match=r"pool\.acquire_timeout_ms") as caught:
            await call(pool)
        assert trio.current_time() - began == pytest.approx(2.0)
        # A shorter invocation deadline bounds the wait instead.
        with pytest.raises(SaturatedError, match="the invocation's timeout"):
            await call(pool, deadline=trio.current_time() + 0.5)
        stats = pool.statistics()
        runtime.gate.set()
    assert stats["saturated"] == 2 and stats["waiting"] == 0
    status, body, headers = error_answer(caught.value)
    assert (status, body["error"], headers) == (429, "saturated", {"Retry-After": "1"})


async def test_a_cold_start_is_waited_for_past_the_acquire_timeout(
    open_pool: PoolOpener, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool(acquire_timeout_s=START_S / 10) as pool:
        outcome = await call(pool)
        stats = pool.statistics()
    assert outcome.status is ExecStatus.SUCCEEDED and outcome.cold is True
    assert stats["saturated"] == 0


async def test_a_cold_start_past_the_deadline_is_a_timeout(
    open_pool: PoolOpener, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool(acquire_timeout_s=START_S / 10) as pool:
        outcome = await call(pool, deadline=trio.current_time() + START_S / 2)
        await settle(START_S)
        stats = pool.statistics()
    assert outcome.status is ExecStatus.TIMEOUT and outcome.error_code is ErrorCode.TIMEOUT
    assert outcome.error_message is not None and "was not ready" in outcome.error_message
    assert outcome.cold is True and outcome.timings_ms["acquire"] == START_S / 2 * 1000
    assert stats["saturated"] == 0 and stats["idle"] == 1  # the start went on, for the next


async def test_a_caller_may_wait_longer_than_the_pool_default(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        open_pool(max_instances=1, acquire_timeout_s=1.0) as pool,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(call, pool, b"hold")
        await settle(START_S)

        async def release_later() -> None:
            await trio.sleep(60)
            runtime.gate.set()

        nursery.start_soon(release_later)
        outcome = await call(pool, b"patient", acquire_timeout_s=math.inf)
    assert outcome.status is ExecStatus.SUCCEEDED
    assert outcome.timings_ms["acquire"] == pytest.approx(60_000)


async def test_waiting_line_is_bounded(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool(max_instances=1, max_waiters=2) as pool, trio.open_nursery() as nursery:
        nursery.start_soon(call, pool, b"hold")
        await settle(START_S)
        for data in (b"a", b"b"):
            nursery.start_soon(call, pool, data)
            await trio.testing.wait_all_tasks_blocked()
        began = trio.current_time()
        with pytest.raises(SaturatedError, match=r"pool\.max_waiters"):
            await call(pool)
        assert trio.current_time() == began  # refused at once, not after a wait
        runtime.gate.set()
    assert sorted(data for data, _ in runtime.served_by) == [b"a", b"b", b"hold"]


# --- cold and warm, prewarm, failed starts -------------------------------------------------


async def test_first_call_is_cold_then_warm(
    open_pool: PoolOpener, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool() as pool:
        first = await call(pool)
        second = await call(pool)
    assert first.cold is True and first.timings_ms["acquire"] == pytest.approx(START_S * 1000)
    assert first.timings_ms["run"] == 1
    assert second.cold is False and second.timings_ms["acquire"] == 0


async def test_min_instances_are_prewarmed_and_serve_warm(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool(min_instances=2, max_instances=3) as pool:
        await settle(START_S)
        assert pool.statistics()["idle"] == 2 and runtime.open == 2
        outcome = await call(pool)
    assert outcome.cold is False
    assert runtime.open == 0  # closed with the pool


async def test_failed_start_fails_its_caller_and_is_counted(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    runtime.failures = 1
    async with open_pool() as pool:
        failed = await call(pool)
        ok = await call(pool)
        stats = pool.statistics()
    assert failed.status is ExecStatus.FAILED and failed.error_code is ErrorCode.START_FAILED
    assert failed.error_message is not None and "before its hello" in failed.error_message
    assert ok.status is ExecStatus.SUCCEEDED and ok.cold is True
    assert stats["failed_starts"] == 1 and stats["starts"] == 1


async def test_failed_prewarm_is_retried_later(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    runtime.failures = 1
    async with open_pool(min_instances=1) as pool:
        await settle(START_S + 0.1)
        assert pool.statistics()["failed_starts"] == 1 and pool.statistics()["instances"] == 0
        await settle(START_RETRY_S + START_S)
        assert pool.statistics()["idle"] == 1


# --- eviction, recycling, reaping -----------------------------------------------------------


async def test_unhealthy_instance_is_evicted_and_replaced(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool(max_instances=1) as pool:
        crashed = await call(pool, b"crash")
        after = await call(pool)
        stats = pool.statistics()
    assert crashed.status is ExecStatus.FAILED
    assert runtime.instances[0].closed
    assert after.status is ExecStatus.SUCCEEDED and after.cold is True
    assert runtime.served_by == [(b"x", 1)]
    assert stats["evictions"] == 1 and stats["instances"] == 1


async def test_instance_dying_while_idle_is_not_used(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool() as pool:
        await call(pool)
        runtime.instances[0].healthy = False  # e.g. the worker process was killed
        outcome = await call(pool)
    assert outcome.status is ExecStatus.SUCCEEDED and runtime.served_by[-1] == (b"x", 1)


async def test_instance_is_recycled_after_max_requests(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool(max_requests=2) as pool:
        for _ in range(5):
            await call(pool)
        stats = pool.statistics()
    assert [n for _, n in runtime.served_by] == [0, 0, 1, 1, 2]
    assert stats["recycled"] == 2 and stats["starts"] == 3
    assert runtime.instances[0].closed and runtime.instances[1].closed


async def test_recycled_instance_drains_before_it_closes(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool(max_concurrency=2, max_requests=1) as pool:
        async with trio.open_nursery() as nursery:
            for data in (b"hold", b"quick"):  # both wait for the same start
                nursery.start_soon(call, pool, data)
                await trio.testing.wait_all_tasks_blocked()
            await settle(START_S + RUN_S)
            first = runtime.instances[0]
            assert runtime.served_by == [(b"quick", 0)] and first.in_flight == 1
            assert not first.closed and pool.statistics()["recycled"] == 1
            runtime.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics()["instances"] == 0
    assert [i.closed for i in runtime.instances] == [True]


async def test_idle_instances_above_min_are_reaped(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool(min_instances=1, max_instances=3, idle_timeout_s=60) as pool:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(call, pool)
        assert pool.statistics()["instances"] == 3
        await trio.sleep(59)
        assert pool.statistics()["instances"] == 3
        await trio.sleep(2)
        stats = pool.statistics()
        assert stats["instances"] == 1 and stats["reaped"] == 2 and runtime.open == 1
        await trio.sleep(3600)  # min_instances stay
        assert pool.statistics()["instances"] == 1


async def test_use_postpones_reaping(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool(idle_timeout_s=60) as pool:
        await call(pool)
        await trio.sleep(50)
        await call(pool)
        await trio.sleep(50)
        assert pool.statistics()["instances"] == 1
        await trio.sleep(15)
        assert pool.statistics()["instances"] == 0 and runtime.instances[0].closed


# --- cancellation and close -----------------------------------------------------------------


async def test_cancelled_waiter_leaves_no_trace(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool(max_instances=1) as pool, trio.open_nursery() as nursery:
        nursery.start_soon(call, pool, b"hold")
        await settle(START_S)
        with trio.move_on_after(1):
            await call(pool, b"gave-up")
        assert pool.statistics()["waiting"] == 0
        runtime.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        outcome = await call(pool)
        stats = pool.statistics()
    assert outcome.cold is False and stats["in_flight"] == 0 and stats["busy"] == 0
    assert b"gave-up" not in [data for data, _ in runtime.served_by]


async def test_cancelled_running_call_frees_its_slot(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool(max_instances=1) as pool:
        with trio.move_on_after(START_S + 1):
            await call(pool, b"hold")
        assert pool.statistics()["in_flight"] == 0 and runtime.instances[0].in_flight == 0
        outcome = await call(pool)
    assert outcome.status is ExecStatus.SUCCEEDED and outcome.cold is False


async def test_caller_giving_up_on_a_cold_start_leaves_the_instance(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool() as pool:
        with trio.move_on_after(START_S / 2):
            await call(pool)
        await settle(START_S)
        assert pool.statistics()["idle"] == 1
        outcome = await call(pool)
    assert outcome.cold is False and len(runtime.instances) == 1


async def test_close_closes_every_instance_and_fails_waiters(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    errors: list[Exception] = []

    async def waiter(pool: InstancePool) -> None:
        try:
            await call(pool)
        except UnavailableError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        async with open_pool(min_instances=2, max_instances=2) as pool:
            await settle(START_S)
            for _ in range(2):
                nursery.start_soon(call, pool, b"hold")
                await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter, pool)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics()["waiting"] == 1
        assert runtime.open == 0 and all(i.closed for i in runtime.instances)
        runtime.gate.set()
    assert len(errors) == 1 and "is closed" in str(errors[0])
    with pytest.raises(UnavailableError, match="is closed"):
        await call(pool)


async def test_close_during_a_start_closes_what_it_started(
    open_pool: PoolOpener, runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pool(min_instances=1) as pool:
        await settle(START_S / 2)
        assert pool.statistics()["starting"] == 1
    assert runtime.open == 0


# --- settings and the manager ---------------------------------------------------------------


def test_settings_take_the_task_over_the_defaults() -> None:
    defaults = PoolConfig(max_instances=8, acquire_timeout_ms=250)
    settings = PoolSettings.resolve(defaults, PoolSpec(max_instances=2, max_requests=10))
    assert settings.max_instances == 2 and settings.max_requests == 10
    assert settings.acquire_timeout_s == 0.25 and settings.max_concurrency == 1


def test_settings_refuse_min_above_max() -> None:
    with pytest.raises(ValidationError, match=r"pool\.min_instances") as caught:
        PoolSettings.resolve(PoolConfig(), PoolSpec(min_instances=5, max_instances=2))
    assert caught.value.field == "pool.min_instances"


def test_config_refuses_min_above_max() -> None:
    env = {"SPEAR_POOL__MIN_INSTANCES": "5", "SPEAR_POOL__MAX_INSTANCES": "2"}
    with pytest.raises(ConfigError) as caught:
        load_config(env=env)
    assert str(caught.value) == "pool.min_instances (5) must be at most max_instances (2)"


async def test_manager_starts_early_pools_with_it_and_removes_them(
    runtime: FakeRuntime, autojump_clock: trio.testing.MockClock
) -> None:
    manager = PoolManager(PoolConfig(min_instances=1))
    spec = function_spec(mode="worker", runtime="process", task_id=TaskId("tk-00000000000000aa"))
    pool = manager.ensure(spec, runtime, manager.settings_for(PoolSpec()))
    assert manager.ensure(spec, runtime, manager.settings_for(PoolSpec())) is pool
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        await settle(START_S)
        assert manager.statistics()[spec.task_id]["idle"] == 1
        await manager.remove(spec.task_id)
        assert runtime.open == 0 and manager.statistics() == {}
        with pytest.raises(NotFoundError, match="was deleted"):  # a call that raced the delete
            manager.ensure(spec, runtime, manager.settings_for(PoolSpec()))
        other = replace(spec, task_id=TaskId("tk-00000000000000cc"))
        manager.ensure(other, runtime, manager.settings_for(PoolSpec()))
        await settle(START_S)
        assert runtime.open == 1
        nursery.cancel_scope.cancel()
    assert runtime.open == 0
    with pytest.raises(UnavailableError, match="stopping"):
        manager.ensure(
            function_spec(task_id=TaskId("tk-00000000000000bb")),
            runtime,
            manager.settings_for(PoolSpec()),
        )
