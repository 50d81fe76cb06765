"""The Spearlet's FunctionService: the endpoint the leader dispatches invocations to.

Every node runs one. `handle` takes a `Dispatch` (over the mesh, or called directly when the
leader dispatches to itself): it checks the command against the `Fence` (stale terms, an
execution already running here, the lease of async work), makes sure the task's artifact is
here (fetched from a peer and verified when it is not) and the task is prepared, then runs it
on the Spearlet. A sync dispatch is answered with its result. An async one is answered at once
and runs in this service's nursery; its result waits in an outbox that delivers it to the
current leader until a `ResultAck` comes back. If the lease lapses (no acknowledged report for
`lease_s`), the async executions still running here are cancelled: by then the leader may run
them elsewhere.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from spear import wire
from spear.errors import SpearError, UnavailableError, WireError
from spear.model import ErrorCode, ExecStatus, ExecutionId, RunOutcome, TaskId, TaskRecord
from spear.roles.dispatch import (
    Dispatch,
    DispatchAccepted,
    DispatchCancel,
    DispatchProbe,
    DispatchRefused,
    ExecutionResult,
    Fence,
    ProbeAnswer,
    ResultAck,
)
from spear.roles.spearlet import Spearlet

log = logging.getLogger(__name__)

#: how often undelivered async results are offered to the leader again
RESULT_RETRY_S = 0.5
#: results kept for delivery at most (the oldest is dropped beyond: its attempt is then
#: declared lost by the leader and run again)
MAX_UNDELIVERED = 10_000
#: cancels of executions not (yet) running here that are remembered
MAX_EARLY_CANCELS = 1000

Deliver = Callable[[ExecutionResult], Awaitable[ResultAck | None]]
EnsureFile = Callable[[str], Awaitable[bool]]
Answer = ExecutionResult | DispatchAccepted | DispatchRefused


@dataclass(frozen=True, slots=True)
class _Key:
    execution_id: str
    attempt: int


def result_of(
    execution_id: str, attempt: int, node_id: str, outcome: RunOutcome
) -> ExecutionResult:
    return ExecutionResult(
        execution_id=execution_id,
        attempt=attempt,
        node_id=node_id,
        status=outcome.status.value,
        error_code=None if outcome.error_code is None else outcome.error_code.value,
        error_message=outcome.error_message,
        exit_code=outcome.exit_code,
        cold=outcome.cold,
        timings_ms=dict(outcome.timings_ms),
        output=outcome.output,
        logs=outcome.logs,
    )


def outcome_of(result: ExecutionResult) -> RunOutcome:
    return RunOutcome(
        status=ExecStatus(result.status),
        output=result.output,
        logs=result.logs,
        error_code=None if result.error_code is None else ErrorCode(result.error_code),
        error_message=result.error_message,
        exit_code=result.exit_code,
        cold=result.cold,
        timings_ms=result.timings_ms,
    )


class FunctionService:
    """Runs what leaders dispatch to this node."""

    def __init__(
        self,
        *,
        spearlet: Spearlet,
        deliver: Deliver,
        ensure_file: EnsureFile,
    ) -> None:
        """
        Args:
            deliver: offers an async result to the current leader; the leader's ResultAck,
                or None when no leader took it (it is offered again later).
            ensure_file: holds an artifact locally, fetched from a peer; False if no one has it.
        """
        self.node_id = spearlet.node_id
        self.fence = Fence()
        self._spearlet = spearlet
        self._deliver = deliver
        self._ensure_file = ensure_file
        self._prepared: set[TaskId] = set()
        self._outbox: dict[_Key, ExecutionResult] = {}
        self._outbox_changed = trio.Event()
        self._lease_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._cancel_early: dict[str, None] = {}  # insertion-ordered, bounded
        self._changed = trio.Event()

    # --- the lease ---------------------------------------------------------------------------

    def renew(self, term: int, sent_at: float, lease_s: float) -> None:
        """A leader acknowledged the report sent at `sent_at` (trio time): extend the lease."""
        self.fence.renew(term, sent_at, lease_s, now=trio.current_time())
        self._lease_changed.set()
        self._lease_changed = trio.Event()

    # --- dispatches --------------------------------------------------------------------------

    async def handle(self, dispatch: Dispatch) -> Answer:
        """Run (sync) or start (async) a dispatched execution."""
        try:
            task = TaskRecord.from_doc(wire.loads(dispatch.task))
        except (WireError, KeyError, TypeError, ValueError) as exc:
            return _refused(dispatch, "refused", f"the task in the dispatch is malformed: {exc}")
        refusal = self.fence.admit(dispatch, trio.current_time())
        if refusal is not None:
            return _refused(dispatch, *refusal)
        try:
            try:
                await self._ready(task)
            except SpearError as exc:
                return _refused(dispatch, exc.code, str(exc), getattr(exc, "retry_after_s", 0.0))
            if dispatch.mode == "sync":
                return await self._run(task, dispatch)
            if self._nursery is None:
                message = "this node's function service is not running (starting or stopping)"
                return _refused(dispatch, "unavailable", message, 1.0)
            self._nursery.start_soon(self._run_async, task, dispatch)
        except BaseException:
            self.fence.finish(dispatch.execution_id)
            raise
        return DispatchAccepted(execution_id=dispatch.execution_id, attempt=dispatch.attempt)

    def cancel(self, message: DispatchCancel) -> bool:
        """Stop an execution if the command is not from a stale term (see
        `Fence.may_cancel`). One whose dispatch is still on its way here is remembered, and
        ends cancelled as soon as it arrives."""
        if not self.fence.may_cancel(message.execution_id, message.term):
            log.info("cancel of %s from stale term %d ignored", message.execution_id, message.term)
            return False
        if self._spearlet.cancel(ExecutionId(message.execution_id)):
            log.info("execution %s cancelled by the leader", message.execution_id)
            return True
        self._cancel_early[message.execution_id] = None
        while len(self._cancel_early) > MAX_EARLY_CANCELS:
            del self._cancel_early[next(iter(self._cancel_early))]
        return False

    async def _ready(self, task: TaskRecord) -> None:
        """Hold the task's artifact and have the task prepared on this node (once)."""
        if task.task_id in self._prepared:
            return
        artifact = task.spec.artifact
        if artifact is not None and not await self._ensure_file(artifact):
            raise UnavailableError(
                f"no member holds artifact {artifact} of task {task.name!r}", retry_after_s=1.0
            )
        await self._spearlet.prepare(task)
        self._prepared.add(task.task_id)

    async def wait_change(self) -> None:
        """Wait until an execution here ends or its result is delivered."""
        await self._changed.wait()

    def _note_change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def probe(self, message: DispatchProbe) -> ProbeAnswer:
        """Which of the probed attempts this node holds (running, or a result to deliver);
        one it does not hold is refused if its dispatch arrives later."""
        if not self.fence.observe(message.term):
            return ProbeAnswer(held=tuple(True for _ in message.attempts))  # not answered
        held = []
        for execution_id, attempt in zip(message.execution_ids, message.attempts, strict=False):
            pending = _Key(execution_id, attempt) in self._outbox
            held.append(pending or self.fence.probe(execution_id, attempt))
        return ProbeAnswer(held=tuple(held))

    def holds(self, execution_id: str) -> bool:
        """Whether an execution runs here, or its result waits here for the leader."""
        return self.fence.running(execution_id) or any(
            key.execution_id == execution_id for key in self._outbox
        )

    def forget(self, task_id: TaskId) -> None:
        self._prepared.discard(task_id)

    async def _run(self, task: TaskRecord, dispatch: Dispatch) -> ExecutionResult:
        if self._cancel_early.pop(dispatch.execution_id, "no") is None:
            self.fence.finish(dispatch.execution_id)
            outcome = RunOutcome(
                status=ExecStatus.CANCELLED,
                error_code=ErrorCode.CANCELLED,
                error_message="the execution was cancelled by request",
            )
            return result_of(dispatch.execution_id, dispatch.attempt, self.node_id, outcome)
        try:
            outcome = await self._spearlet.execute(
                task,
                ExecutionId(dispatch.execution_id),
                dispatch.data,
                timeout_s=dispatch.timeout_ms / 1000,
                acquire_timeout_s=(
                    math.inf
                    if dispatch.acquire_timeout_ms < 0
                    else dispatch.acquire_timeout_ms / 1000
                ),
            )
        except SpearError as exc:
            outcome = RunOutcome(
                status=ExecStatus.FAILED,
                error_code=ErrorCode.START_FAILED,
                error_message=f"it could not start on node {self.node_id}: {exc}",
            )
        except Exception as exc:
            # A bug or a broken part below must cost this attempt, never the node.
            log.exception("execution %s could not be run", dispatch.execution_id)
            outcome = RunOutcome(
                status=ExecStatus.FAILED,
                error_code=ErrorCode.START_FAILED,
                error_message=f"spear could not run it: {exc}",
            )
        finally:
            self.fence.finish(dispatch.execution_id)
            self._note_change()
        return result_of(dispatch.execution_id, dispatch.attempt, self.node_id, outcome)

    async def _run_async(self, task: TaskRecord, dispatch: Dispatch) -> None:
        result = await self._run(task, dispatch)
        if len(self._outbox) >= MAX_UNDELIVERED:
            dropped = next(iter(self._outbox))
            del self._outbox[dropped]
            log.warning("result of %s dropped: too many undelivered", dropped.execution_id)
        self._outbox[_Key(dispatch.execution_id, dispatch.attempt)] = result
        self._outbox_changed.set()

    # --- serving -------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run async executions, deliver their results, and enforce the lease, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._deliver_results)
            nursery.start_soon(self._enforce_lease)
            task_status.started()

    async def _deliver_results(self) -> None:
        while True:
            for key, result in list(self._outbox.items()):
                try:
                    ack = await self._deliver(result)
                except SpearError as exc:
                    log.debug("result of %s not delivered yet: %s", key.execution_id, exc)
                    break  # the leader is unreachable: retry them all later
                if ack is not None:
                    self._outbox.pop(key, None)
                    self._note_change()
            if not self._outbox:
                await self._outbox_changed.wait()
                self._outbox_changed = trio.Event()
            else:
                with trio.move_on_after(RESULT_RETRY_S):
                    await self._outbox_changed.wait()
                    self._outbox_changed = trio.Event()

    async def _enforce_lease(self) -> None:
        while True:
            now = trio.current_time()
            for execution_id in self.fence.lapsed(now):
                if self._spearlet.cancel(ExecutionId(execution_id), reason="lease"):
                    log.warning(
                        "execution %s stopped: this node lost its lease from the leader",
                        execution_id,
                    )
            until = self.fence.lease_until
            with trio.move_on_at(until if until > now else math.inf):
                await self._lease_changed.wait()

    def statistics(self) -> dict[str, int]:
        return {"undelivered_results": len(self._outbox), "term": self.fence.term}


def _refused(dispatch: Dispatch, code: str, message: str, retry_after_s: float = 0.0) -> Answer:
    return DispatchRefused(
        execution_id=dispatch.execution_id,
        code=code,
        message=message,
        retry_after_s=retry_after_s,
    )
