"""The Spearlet: every node's FunctionService and TaskExecutionManager.

FunctionService is the endpoint the leader dispatches to (`execute`); the TaskExecutionManager
part resolves a task's limits against the config, enforces one deadline per invocation, keeps
the cancel scope of every running execution (so the cancel API can stop it) and refuses to run
one execution id twice at once.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import trio

from spear.config import RuntimesConfig
from spear.errors import ConflictError, ValidationError
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
from spear.runtimes import RuntimeManager


class Spearlet:
    """Runs functions on this node."""

    def __init__(
        self,
        *,
        node_id: str,
        runtimes: RuntimeManager,
        limits: RuntimesConfig,
        artifacts: ArtifactStore,
    ) -> None:
        self.node_id = node_id
        self._runtimes = runtimes
        self._limits = limits
        self._artifacts = artifacts
        self._specs: dict[TaskId, FunctionSpec] = {}
        self._running: dict[ExecutionId, trio.CancelScope] = {}
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

    async def prepare(self, task: TaskRecord) -> None:
        """Validate a task against this node's runtimes and warm it (compile, cache).

        Raises:
            ValidationError: the runtime is unavailable or refuses the definition.
            ArtifactError: the artifact is not valid for the runtime.
        """
        spec = self._resolve(task)
        runtime = self._runtimes.get(spec.runtime)
        runtime.validate_task(spec)
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

    def forget(self, task_id: TaskId) -> None:
        self._specs.pop(task_id, None)

    async def execute(
        self,
        task: TaskRecord,
        execution_id: ExecutionId,
        data: bytes,
        *,
        timeout_s: float | None = None,
    ) -> RunOutcome:
        """Run one invocation; the deadline is the task's timeout, shortened by `timeout_s`.

        Raises:
            ConflictError: this execution id is already running here.
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
                outcome = await runtime.run(spec, data, deadline=deadline)
            finally:
                del self._running[execution_id]
        if outcome is None:
            outcome = RunOutcome(
                status=ExecStatus.CANCELLED,
                error_code=ErrorCode.CANCELLED,
                error_message="the execution was cancelled by request",
            )
        self._outcomes[outcome.status.value] += 1
        return outcome

    def cancel(self, execution_id: ExecutionId) -> bool:
        """Cancel a running execution; False if it is not running here."""
        scope = self._running.get(execution_id)
        if scope is None:
            return False
        scope.cancel()
        return True

    def statistics(self) -> dict[str, Any]:
        return {
            "running": len(self._running),
            "outcomes": dict(self._outcomes),
            "runtimes": self._runtimes.statistics(),
        }
