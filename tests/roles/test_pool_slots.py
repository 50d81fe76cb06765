"""The pool's bookkeeping (pure): choice of instance, capacity, room, idle expiry."""

from __future__ import annotations

import math

from spear.model import ExecStatus, RunOutcome
from spear.roles.pool_contract import PoolSettings
from spear.roles.pool_slots import Slots


class Stub:
    def __init__(self, max_concurrency: int | None = None) -> None:
        self.healthy = True
        if max_concurrency is not None:
            self.max_concurrency = max_concurrency

    async def invoke(self, data: bytes, *, deadline: float, execution_id: str) -> RunOutcome:
        return RunOutcome(status=ExecStatus.SUCCEEDED)

    async def aclose(self) -> None:
        pass


def test_least_busy_then_most_recently_used_takes_the_request() -> None:
    slots = Slots(PoolSettings(max_concurrency=2))
    old, new, full = (slots.add(Stub(), now) for now in (1.0, 2.0, 3.0))
    full.busy = 2
    assert slots.free() is new
    new.busy = 1
    assert slots.free() is old
    old.busy = new.busy = 2
    assert slots.free() is None


def test_capacity_is_what_the_instance_announces_when_less() -> None:
    slots = Slots(PoolSettings(max_concurrency=8))
    assert slots.add(Stub(max_concurrency=3), 0.0).capacity == 3
    assert slots.add(Stub(max_concurrency=16), 0.0).capacity == 8
    assert slots.add(Stub(), 0.0).capacity == 8


def test_room_counts_open_and_starting_instances() -> None:
    slots = Slots(PoolSettings(min_instances=2, max_instances=3))
    assert (slots.room(), slots.missing()) == (3, 2)
    slots.starting = 1
    gone = slots.add(Stub(), 0.0)
    slots.usable.remove(gone)  # retired, still closing: it still counts against the max
    assert (slots.room(), slots.missing()) == (1, 1)


def test_expiry_keeps_min_instances_and_takes_the_oldest_first() -> None:
    slots = Slots(PoolSettings(min_instances=1, idle_timeout_s=10))
    a, b, c = (slots.add(Stub(), now) for now in (0.0, 1.0, 2.0))
    assert slots.next_expiry() == 10.0
    assert slots.expired(9.0) == []
    assert slots.expired(12.0) == [a, b]
    c.busy = 1
    a.busy = 1
    assert slots.expired(12.0) == [b]
    slots.usable[:] = [a]
    assert slots.next_expiry() == math.inf  # only min_instances left
