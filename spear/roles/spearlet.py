"""The Spearlet: every node's FunctionService, TaskExecutionManager and instance pools.

FunctionService is the endpoint the leader dispatches to (`execute`); the TaskExecutionManager
part resolves a task's limits against the config, enforces one deadline per invocation, keeps
the cancel scope of every running execution (so the cancel API can stop it) and refuses to run
one execution id twice at once. Tasks in mode `worker` run on warm instances of their
InstancePool (the pools run in `serve`, inside the node's nursery); mode `per-call` runs a
fresh instance per invocation.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import trio

from spear.config import PoolConfig, RuntimesConfig
from spear.errors import ConflictError, SpearError, UnavailableError, ValidationError
from spear.model import (
    ErrorCode,
    ExecStatus,
    ExecutionId,
    FunctionSpec,
    RunOutcome,
    TaskId,
    TaskRecord,
)
from spear.roles.artifacts import ArtifactStore
from spear.roles.pool_contract import PoolSettings
from spear.roles.pool_manager import PoolManager
from spear.runtimes import RuntimeManager
from spear.runtimes.base import WORKER

log = logging.getLogger(__name__)


class Spearlet:
    """Runs functions on this node."""

    def __init__(
        self,
        *,
        node_id: str,
        runtimes: RuntimeManager,
        limits: RuntimesConfig,
        artifacts: ArtifactStore,
        pool: PoolConfig | None = None,
    ) -> None:
        """
        Args:
            pool: the `[pool]` defaults of worker-mode tasks (default: built-in defaults).
        """
        self.node_id = node_id
        self._runtimes = runtimes
        self._limits = limits
        self._artifacts = artifacts
        self._pools = PoolManager(pool or PoolConfig())
        self._specs: dict[TaskId, FunctionSpec] = {}
        self._pool_settings: dict[TaskId, PoolSettings] = {}
        self._running: dict[ExecutionId, trio.CancelScope] = {}
        self._cancel_reasons: dict[ExecutionId, str] = {}
        self._outcomes: Counter[str] = Counter()

    def function_spec(self, task: TaskRecord) -> FunctionSpec:
        """The task's FunctionSpec with every limit resolved (cached per task)."""
        spec = self._specs.get(task.task_id)
        if spec is None:
            spec = self._resolve(task)
            self._specs[task.task_id] = spec
        return spec

    def _resolve(self, task: TaskRecord) -> FunctionSpec:
        s = task.spec
        limits = self._limits
        timeout_ms = s.timeout_ms if s.timeout_ms is not None else limits.default_timeout_ms
        if timeout_ms > limits.max_timeout_ms:
            raise ValidationError(
                f"timeout_ms must be at most runtimes.max_timeout_ms ({limits.max_timeout_ms}),"
                f" got {timeout_ms}",
                field="timeout_ms",
            )
        memory = s.memory_limit_bytes or limits.default_memory_limit_bytes
        return FunctionSpec(
            task_id=task.task_id,
            name=s.name,
            runtime=s.runtime,
            mode=s.mode,
            artifact_path=self._artifacts.path(s.artifact) if s.artifact else None,
            artifact_sha256=s.artifact,
            command=tuple(s.command),
            image=s.image,
            env=dict(s.env),
            timeout_s=timeout_ms / 1000,
            memory_limit_bytes=memory,
            max_output_bytes=limits.max_output_bytes,
            max_log_bytes=limits.max_log_bytes,
        )

    def _settings(self, task: TaskRecord) -> PoolSettings:
        """The task's pool settings (cached per task)."""
        settings = self._pool_settings.get(task.task_id)
        if settings is None:
            settings = self._pools.settings_for(task.spec.pool)
            self._pool_settings[task.task_id] = settings
        return settings

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the instance pools until cancelled (then every instance is closed).

        Pools prewarmed before this runs (tasks prepared at node start) start with it.
        """
        await self._pools.serve(task_status=task_status)

    async def prepare(self, task: TaskRecord) -> None:
        """Validate a task against this node's runtimes and warm it (compile, cache).

        Starts no instance: `prewarm` does, once the task is stored.

        Raises:
            ValidationError: the runtime is unavailable or refuses the definition.
            ArtifactError: the artifact is not valid for the runtime.
        """
        spec = self._resolve(task)
        settings = self._pools.settings_for(task.spec.pool) if spec.mode == WORKER else None
        runtime = self._runtimes.get(spec.runtime)
        runtime.validate_task(spec)
        if settings is not None:
            _check_concurrency(spec.runtime, runtime.describe(), settings)
        if spec.artifact_sha256 is not None:
            if not self._artifacts.has(spec.artifact_sha256):
                raise ValidationError(
                    f"artifact {spec.artifact_sha256} was not uploaded (POST /api/v1/files first)",
                    field="artifact",
                )
            data = await trio.to_thread.run_sync(self._artifacts.read, spec.artifact_sha256)
            await trio.to_thread.run_sync(runtime.validate_artifact, data)
        await runtime.prepare(spec)
        self._specs[task.task_id] = spec
        if settings is not None:
            self._pool_settings[task.task_id] = settings

    def prewarm(self, task: TaskRecord) -> None:
        """Give a prepared worker-mode task its pool, starting `pool.min_instances` instances.

        A no-op for mode `per-call` and for a task `prepare` refused; idempotent; never
        raises (a pool that cannot be made now is made by the first call). Before `serve`
        runs the pool waits for it.
        """
        spec = self._specs.get(task.task_id)
        if spec is None or spec.mode != WORKER:
            return
        try:
            self._pools.ensure(spec, self._runtimes.get(spec.runtime), self._settings(task))
        except SpearError as exc:  # the node is stopping, or the task was just deleted
            log.info("task %s is not prewarmed: %s", spec.name, exc)

    async def forget(self, task_id: TaskId) -> None:
        """Drop what this node holds for a deleted task, closing its pool's instances."""
        self._specs.pop(task_id, None)
        self._pool_settings.pop(task_id, None)
        await self._pools.remove(task_id)

    async def execute(
        self,
        task: TaskRecord,
        execution_id: ExecutionId,
        data: bytes,
        *,
        timeout_s: float | None = None,
        acquire_timeout_s: float | None = None,
    ) -> RunOutcome:
        """Run one invocation; the deadline is the task's timeout, shortened by `timeout_s`.

        In mode `worker` the wait for a pool instance counts against that one deadline, and
        lasts at most `acquire_timeout_s` (default: the task's `pool.acquire_timeout_ms`;
        `math.inf` waits until the deadline, as an async execution may).

        Raises:
            ConflictError: this execution id is already running here.
            SaturatedError: (mode worker) no instance was free within the acquire deadline.
            UnavailableError: (mode worker) the instance pools are not running.
            NotFoundError: (mode worker) the task was deleted while this call began.
        """
        if execution_id in self._running:
            raise ConflictError(f"execution {execution_id} is already running on this node")
        spec = self.function_spec(task)
        runtime = self._runtimes.get(spec.runtime)
        budget = spec.timeout_s if timeout_s is None else min(spec.timeout_s, timeout_s)
        deadline = trio.current_time() + budget
        outcome: RunOutcome | None = None
        with trio.CancelScope() as scope:
            self._running[execution_id] = scope
            try:
                if spec.mode == WORKER:
                    outcome = await self._invoke_pooled(
                        task, spec, data, execution_id, deadline, acquire_timeout_s
                    )
                else:
                    outcome = await runtime.run(
                        spec, data, deadline=deadline, execution_id=execution_id
                    )
            finally:
                del self._running[execution_id]
        reason = self._cancel_reasons.pop(execution_id, None)
        if outcome is None and reason == "lease":
            outcome = RunOutcome(
                status=ExecStatus.FAILED,
                error_code=ErrorCode.NODE_LOST,
                error_message=f"node {self.node_id} lost contact with the leader and stopped it",
            )
        elif outcome is None:
            outcome = RunOutcome(
                status=ExecStatus.CANCELLED,
                error_code=ErrorCode.CANCELLED,
                error_message="the execution was cancelled by request",
            )
        self._outcomes[outcome.status.value] += 1
        return outcome

    async def _invoke_pooled(
        self,
        task: TaskRecord,
        spec: FunctionSpec,
        data: bytes,
        execution_id: ExecutionId,
        deadline: float,
        acquire_timeout_s: float | None,
    ) -> RunOutcome:
        if not self._pools.serving:
            raise UnavailableError(
                f"task {spec.name!r} runs in mode 'worker' but this node's instance pools are"
                " not running (starting or stopping); retry later"
            )
        pool = self._pools.ensure(spec, self._runtimes.get(spec.runtime), self._settings(task))
        return await pool.invoke(
            data, deadline=deadline, execution_id=execution_id, acquire_timeout_s=acquire_timeout_s
        )

    def cancel(self, execution_id: ExecutionId, *, reason: str = "request") -> bool:
        """Cancel a running execution; False if it is not running here.

        Args:
            reason: "request" (its outcome is `cancelled`) or "lease" (this node lost its
                lease from the leader: the outcome is a failure `node_lost`, to be retried).
        """
        scope = self._running.get(execution_id)
        if scope is None:
            return False
        self._cancel_reasons[execution_id] = reason
        scope.cancel()
        return True

    def offers(self, runtime: str) -> bool:
        """Whether this node can run functions on `runtime`."""
        return runtime in self._runtimes.available

    def why_not(self, runtime: str) -> str:
        """Why this node cannot run `runtime` (its runtime manager's reason)."""
        try:
            self._runtimes.get(runtime)
        except ValidationError as exc:
            return str(exc)
        return "it is available"

    def running_count(self) -> int:
        """Executions running on this node now."""
        return len(self._running)

    def statistics(self) -> dict[str, Any]:
        return {
            "running": len(self._running),
            "outcomes": dict(self._outcomes),
            "runtimes": self._runtimes.statistics(),
            "pools": self._pools.statistics(),
        }


def _check_concurrency(name: str, described: dict[str, Any], settings: PoolSettings) -> None:
    """Refuse more requests per instance than the runtime's instances serve at once."""
    limit = described.get("worker_max_concurrency")
    if isinstance(limit, int) and settings.max_concurrency > limit:
        raise ValidationError(
            f"pool.max_concurrency must be at most {limit} for runtime {name!r} in mode"
            f" 'worker', got {settings.max_concurrency}; raise pool.max_instances instead",
            field="pool.max_concurrency",
        )
