"""The PoolManager: one InstancePool per worker-mode task of this node, run as one service.

The Spearlet owns it; the node runs it in its nursery (`await nursery.start(spearlet.serve)`).
Pools made before the service runs (prewarm at node start) start with it; pools made while it
runs start at once; a task's pool is closed when the task is deleted, and every pool is closed
(its instances shielded, bounded) when the node stops.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

import trio

from spear.config import PoolConfig
from spear.errors import NotFoundError, UnavailableError
from spear.model import FunctionSpec, PoolSpec, TaskId
from spear.roles.pool import InstancePool
from spear.roles.pool_contract import InstanceStarter, PoolSettings

#: deleted tasks remembered, so that a call that raced the deletion starts no new pool
REMEMBER_REMOVED: Final = 4096


class PoolManager:
    """The instance pools of this node, by task id."""

    def __init__(self, defaults: PoolConfig) -> None:
        self._defaults = defaults
        self._pools: dict[TaskId, InstancePool] = {}
        self._removed: OrderedDict[TaskId, None] = OrderedDict()
        self._nursery: trio.Nursery | None = None
        self._stopped = False

    def settings_for(self, spec: PoolSpec) -> PoolSettings:
        """A task's pool settings over the `[pool]` defaults.

        Raises:
            ValidationError: the combination breaks a rule (min above max).
        """
        return PoolSettings.resolve(self._defaults, spec)

    @property
    def serving(self) -> bool:
        """Whether pools can start instances now (the service runs)."""
        return self._nursery is not None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every pool until cancelled; on the way out each closes its instances."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for pool in self._pools.values():
                    nursery.start_soon(pool.serve)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._stopped = True

    def get(self, task_id: TaskId) -> InstancePool | None:
        return self._pools.get(task_id)

    def ensure(
        self, spec: FunctionSpec, starter: InstanceStarter, settings: PoolSettings
    ) -> InstancePool:
        """The task's pool, made (and prewarming `min_instances`) if it has none yet.

        A pool made before the service runs starts with it.

        Raises:
            UnavailableError: the service has stopped (the node is stopping).
            NotFoundError: the task was deleted (a call that raced its deletion).
        """
        pool = self._pools.get(spec.task_id)
        if pool is not None:
            return pool
        if spec.task_id in self._removed:
            raise NotFoundError(f"task {spec.name!r} was deleted")
        if self._stopped:
            raise UnavailableError("the node is stopping: its instance pools are closed")
        pool = InstancePool(spec, starter, settings)
        self._pools[spec.task_id] = pool
        if self._nursery is not None:
            self._nursery.start_soon(pool.serve)
        return pool

    async def remove(self, task_id: TaskId) -> None:
        """Close a task's pool and its instances (a no-op if it has none)."""
        self._removed[task_id] = None
        if len(self._removed) > REMEMBER_REMOVED:
            self._removed.popitem(last=False)
        pool = self._pools.pop(task_id, None)
        if pool is not None:
            await pool.aclose()

    def statistics(self) -> dict[str, dict[str, Any]]:
        """`{task_id: {"task", "max_instances", **InstancePool.statistics()}}` for every pool."""
        return {
            task_id: {
                "task": pool.spec.name,
                "max_instances": pool.settings.max_instances,
                **pool.statistics(),
            }
            for task_id, pool in self._pools.items()
        }
