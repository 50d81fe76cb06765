"""What an InstancePool promises and needs: its settings, leases, start errors and timings.

A task's settings are its `pool` in the task definition over the `[pool]` defaults
(docs/pool.md explains each); a pool needs from its runtime only `start_instance`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

from spear.config import PoolConfig
from spear.errors import RuntimeFailure, ValidationError
from spear.model import FunctionSpec, PoolSpec
from spear.runtimes.base import Instance

#: how long closing one instance may take (it runs shielded, at eviction and at shutdown)
CLOSE_TIMEOUT_S: Final = 5.0
#: the longest an instance may take to start (runtimes bound their own starts; this is a backstop)
START_TIMEOUT_S: Final = 120.0
#: after a failed start, how long before `min_instances` is topped up again
START_RETRY_S: Final = 5.0
#: the Retry-After a saturated caller is given
SATURATED_RETRY_AFTER_S: Final = 1.0


class InstanceStartError(RuntimeFailure):
    """The instance a caller waited for could not be started (a failed cold start)."""

    code = "start_failed"


class InstanceStartTimeout(RuntimeFailure):
    """The instance a caller waited for was still starting at the caller's deadline."""

    code = "start_timeout"


class InstanceStarter(Protocol):
    """What a pool needs from a runtime (every `Runtime` is one)."""

    async def start_instance(self, spec: FunctionSpec) -> Instance: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    """An instance lent to one caller until the `acquire` block ends."""

    instance: Instance
    #: the caller waited for this instance to start (its first request)
    cold: bool
    #: how long the caller waited for the instance, cold start included
    acquire_ms: float


#: the counters of `InstancePool.statistics()`, after its gauges
COUNTERS: Final = (
    "starts",
    "failed_starts",
    "start_ms_total",
    "cold_starts",
    "warm_hits",
    "evictions",
    "recycled",
    "reaped",
    "saturated",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolSettings:
    """One task's pool settings, resolved (docs/pool.md explains each)."""

    min_instances: int = 0
    max_instances: int = 4
    max_concurrency: int = 1
    idle_timeout_s: float = 300.0
    #: requests before an instance is recycled; 0 = never
    max_requests: int = 0
    #: the longest a caller waits for a free instance (its invocation deadline may cut it)
    acquire_timeout_s: float = 10.0
    max_waiters: int = 1000

    @classmethod
    def resolve(cls, defaults: PoolConfig, spec: PoolSpec) -> PoolSettings:
        """The task's settings; what it leaves unset (None) comes from `defaults`.

        Raises:
            ValidationError: (field "pool.min_instances") min_instances exceeds max_instances.
        """
        merged = defaults.model_dump() | spec.model_dump(exclude_none=True)
        merged["acquire_timeout_s"] = merged.pop("acquire_timeout_ms") / 1000
        settings = cls(**merged)
        if settings.min_instances > settings.max_instances:
            raise ValidationError(
                f"pool.min_instances ({settings.min_instances}) must be at most"
                f" pool.max_instances ({settings.max_instances})",
                field="pool.min_instances",
            )
        return settings
