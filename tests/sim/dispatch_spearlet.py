"""What runs in DispatchSim, and where: the fake Spearlet, its runs (checked for I6) and the
real FunctionService observed for I7 (see tests.sim.dispatch_sim)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from spear.errors import ConflictError
from spear.model import (
    ErrorCode,
    ExecStatus,
    ExecutionId,
    FunctionSpec,
    RunOutcome,
    TaskId,
    TaskRecord,
)
from spear.roles.dispatch import (
    Dispatch,
)
from spear.roles.function_service import Answer, FunctionService

if TYPE_CHECKING:
    from tests.sim.dispatch_sim import DispatchSim

T = TypeVar("T")


@dataclass(slots=True)
class Run:
    """One run of an execution on a Spearlet (virtual times; `end` None while it runs)."""

    execution_id: str
    node_id: str
    incarnation: int
    start: float
    end: float | None = None
    #: how the function ended; None when it was cut (cancelled, or its node crashed)
    status: str | None = None


class RunTracker:
    """Every run of every execution, checked for I6 as each one starts."""

    def __init__(self, sim: DispatchSim) -> None:
        self._sim = sim
        self.runs: dict[str, list[Run]] = {}

    def start(self, execution_id: str, node_id: str, incarnation: int) -> Run:
        now = trio.current_time()
        runs = self.runs.setdefault(execution_id, [])
        for other in runs:
            if other.end is None:
                self._sim.fail(
                    "I6",
                    f"execution {execution_id} starts on {node_id} while it runs on "
                    f"{other.node_id} (incarnation {other.incarnation}) since t={other.start:.3f}",
                    known=self._sim.why_rerun(execution_id, node_id),
                )
        run = Run(execution_id, node_id, incarnation, now)
        runs.append(run)
        self._sim.changed()
        return run

    def end(self, run: Run, status: str | None) -> None:
        run.end = trio.current_time()
        run.status = status
        self._sim.changed()


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How a task's function behaves in the simulation, read from its `env`."""

    run_s: tuple[float, float] = (0.2, 3.0)
    fail_probability: float = 0.0

    @classmethod
    def of(cls, task: TaskRecord) -> Behaviour:
        env = task.spec.env
        low, _, high = env.get("SIM_RUN_S", "0.2-3.0").partition("-")
        return cls((float(low), float(high)), float(env.get("SIM_FAIL", "0")))

    def env(self) -> dict[str, str]:
        return {
            "SIM_RUN_S": f"{self.run_s[0]}-{self.run_s[1]}",
            "SIM_FAIL": str(self.fail_probability),
        }


class SimSpearlet:
    """A fake Spearlet (the duck type the FunctionService, Dispatcher and TaskService use).

    `execute` sleeps a seeded virtual time, then succeeds or fails per the task's `Behaviour`
    (or times out when that time exceeds the deadline); `cancel` stops it as the real one does
    (reason "lease" ends it as a `node_lost` failure, any other reason as cancelled).
    """

    def __init__(
        self, *, node_id: str, incarnation: int, rng: random.Random, sim: DispatchSim
    ) -> None:
        self.node_id = node_id
        self._incarnation = incarnation
        self._rng = rng
        self._sim = sim
        self._prepared: set[TaskId] = set()
        self._running: dict[ExecutionId, trio.CancelScope] = {}
        self._reasons: dict[ExecutionId, str] = {}
        self._outcomes: Counter[str] = Counter()

    def function_spec(self, task: TaskRecord) -> FunctionSpec:
        s = task.spec
        return FunctionSpec(
            task_id=task.task_id,
            name=s.name,
            runtime=s.runtime,
            mode=s.mode,
            artifact_path=None,
            artifact_sha256=None,
            command=tuple(s.command),
            image=None,
            env=dict(s.env),
            timeout_s=(s.timeout_ms or 30_000) / 1000,
            memory_limit_bytes=s.memory_limit_bytes or 128 << 20,
            max_output_bytes=1 << 20,
            max_log_bytes=1 << 20,
        )

    def offers(self, runtime: str) -> bool:
        return runtime == "process"

    def why_not(self, runtime: str) -> str:
        return f"runtime {runtime!r} is not simulated"

    async def prepare(self, task: TaskRecord) -> None:
        """The first prepare of a task takes a while (a compile), later ones nothing."""
        if task.task_id not in self._prepared:
            await trio.sleep(self._rng.uniform(0, self._sim.timings.prepare_s))
            self._prepared.add(task.task_id)

    def prewarm(self, task: TaskRecord) -> None:
        """Per-call tasks only: nothing to warm."""

    async def forget(self, task_id: TaskId) -> None:
        self._prepared.discard(task_id)

    async def execute(
        self,
        task: TaskRecord,
        execution_id: ExecutionId,
        data: bytes,
        *,
        timeout_s: float | None = None,
        acquire_timeout_s: float | None = None,
    ) -> RunOutcome:
        if execution_id in self._running:
            raise ConflictError(f"execution {execution_id} is already running on this node")
        spec = self.function_spec(task)
        budget = spec.timeout_s if timeout_s is None else min(spec.timeout_s, timeout_s)
        behaviour = Behaviour.of(task)
        duration = self._rng.uniform(*behaviour.run_s)
        fails = self._rng.random() < behaviour.fail_probability
        run = self._sim.tracker.start(execution_id, self.node_id, self._incarnation)
        status: ExecStatus | None = None
        try:
            with trio.CancelScope() as scope:
                self._running[execution_id] = scope
                try:
                    await trio.sleep(min(duration, budget))
                    if duration > budget:
                        status = ExecStatus.TIMEOUT
                    else:
                        status = ExecStatus.FAILED if fails else ExecStatus.SUCCEEDED
                finally:
                    del self._running[execution_id]
        finally:
            self._sim.tracker.end(run, None if status is None else status.value)
        outcome = self._outcome(execution_id, status, data)
        self._outcomes[outcome.status.value] += 1
        return outcome

    def _outcome(
        self, execution_id: ExecutionId, status: ExecStatus | None, data: bytes
    ) -> RunOutcome:
        reason = self._reasons.pop(execution_id, None)
        if status is ExecStatus.SUCCEEDED:
            return RunOutcome(status=status, output=b"done:" + data)
        if status is ExecStatus.FAILED:
            return RunOutcome(
                status=status,
                error_code=ErrorCode.EXIT_NONZERO,
                error_message="the function failed (simulated)",
                exit_code=1,
            )
        if status is ExecStatus.TIMEOUT:
            return RunOutcome(
                status=status, error_code=ErrorCode.TIMEOUT, error_message="it timed out"
            )
        if reason == "lease":
            return RunOutcome(
                status=ExecStatus.FAILED,
                error_code=ErrorCode.NODE_LOST,
                error_message=f"node {self.node_id} lost contact with the leader and stopped it",
            )
        return RunOutcome(
            status=ExecStatus.CANCELLED,
            error_code=ErrorCode.CANCELLED,
            error_message="the execution was cancelled by request",
        )

    def cancel(self, execution_id: ExecutionId, *, reason: str = "request") -> bool:
        scope = self._running.get(execution_id)
        if scope is None:
            return False
        self._reasons[execution_id] = reason
        scope.cancel()
        return True

    def running_count(self) -> int:
        return len(self._running)

    def statistics(self) -> dict[str, Any]:
        return {"running": len(self._running), "outcomes": dict(self._outcomes), "pools": {}}


@dataclass(frozen=True, slots=True)
class DispatchSeen:
    """How a FunctionService answered one dispatch."""

    node_id: str
    incarnation: int
    attempt: int
    term: int
    arrived_at: float
    lease_left_s: float
    answer: str  # "accepted" or the refusal code


class ObservedFunctionService(FunctionService):
    """The real FunctionService, with the I7 check around every dispatch it answers."""

    def __init__(self, *, sim: DispatchSim, incarnation: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sim = sim
        self.incarnation = incarnation

    async def handle(self, dispatch: Dispatch) -> Answer:
        seen = self.fence.term
        lease_left_s = self.fence.lease_until - trio.current_time()
        answer = await super().handle(dispatch)
        self._sim.on_dispatch_answer(self, dispatch, seen, lease_left_s, answer)
        return answer
