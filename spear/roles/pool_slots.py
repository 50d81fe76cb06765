"""The instances of one InstancePool as plain bookkeeping: no I/O, no clock, no trio.

Which instance takes the next request, which are dead, which idled past their timeout, how
many more may start, and when the pool must look again. The pool (spear.roles.pool) does the
starting, closing and waiting around it and passes `now` in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spear.roles.pool_contract import PoolSettings
from spear.runtimes.base import Instance


@dataclass(eq=False, slots=True, kw_only=True)
class Slot:
    """One started instance and what the pool knows about it."""

    instance: Instance
    last_used: float
    #: requests it may serve at once: pool.max_concurrency, or less if the instance says so
    capacity: int
    busy: int = 0
    served: int = 0
    #: True only while the start that made it hands it to the waiters it was started for
    fresh: bool = True
    closing: bool = False


class Slots:
    """The instances of one pool: `usable` ones take requests, `open` ones are not closed yet."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.usable: list[Slot] = []
        self.open: set[Slot] = set()
        self.starting = 0

    def add(self, instance: Instance, now: float) -> Slot:
        """Take a freshly started instance into service."""
        # An instance may announce fewer concurrent requests than the pool allows (a worker's
        # hello does): more would only queue inside it, out of the pool's FIFO and deadline.
        own = getattr(instance, "max_concurrency", None)
        capacity = self.settings.max_concurrency
        if isinstance(own, int) and 0 < own < capacity:
            capacity = own
        slot = Slot(instance=instance, last_used=now, capacity=capacity)
        self.open.add(slot)
        self.usable.append(slot)
        return slot

    def free(self) -> Slot | None:
        """The instance for the next request: the least busy, then the most recently used
        (so that spare instances go idle and are reaped); None if all are full."""
        free = [s for s in self.usable if s.busy < s.capacity]
        return min(free, key=lambda s: (s.busy, -s.last_used), default=None)

    def dead(self) -> list[Slot]:
        return [s for s in self.usable if not s.instance.healthy]

    def room(self) -> int:
        """How many more instances may start (open and starting ones count)."""
        return self.settings.max_instances - len(self.open) - self.starting

    def missing(self) -> int:
        """How many instances `min_instances` still wants started."""
        return self.settings.min_instances - len(self.usable) - self.starting

    def expired(self, now: float) -> list[Slot]:
        """Idle instances past `idle_timeout_s` that may go, oldest first, keeping the min."""
        idle_for = self.settings.idle_timeout_s
        spare = len(self.usable) - self.settings.min_instances
        old = [s for s in self.usable if s.busy == 0 and now - s.last_used >= idle_for]
        return sorted(old, key=lambda s: s.last_used)[: max(spare, 0)]

    def next_expiry(self) -> float:
        """When an instance may next have idled out (`math.inf`: none can).

        Busy instances count too: one still busy then is looked at again, which spares
        waking the pool's maintenance at every release.
        """
        if len(self.usable) <= self.settings.min_instances:
            return math.inf
        return min(s.last_used for s in self.usable) + self.settings.idle_timeout_s

    def gauges(self) -> dict[str, int]:
        return {
            "instances": len(self.open),
            "starting": self.starting,
            "busy": sum(1 for s in self.open if s.busy > 0),
            "idle": sum(1 for s in self.usable if s.busy == 0),
            "in_flight": sum(s.busy for s in self.open),
        }
