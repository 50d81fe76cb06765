"""The SMS TaskService: task registry, files, invocations and execution records.

Sync invocations are not state-machine writes: their records live in a bounded in-memory table
(`sms.sync_record_limit` records, `sms.sync_record_bytes` of output and logs). Async
invocations are: a 202 is answered only after the pending record is durable, and the outcome
is made durable too. Async executions left unfinished by a stop are run again at start (the
attempt counted against the task's `retry.max_attempts`).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import trio

from spear.config import SmsConfig
from spear.errors import (
    ConflictError,
    NotFoundError,
    SpearError,
    UnavailableError,
    ValidationError,
)
from spear.model import (
    ErrorCode,
    ExecStatus,
    ExecutionId,
    ExecutionRecord,
    FileId,
    NodeId,
    RunOutcome,
    TaskRecord,
    TaskSpec,
    new_execution_id,
    new_task_id,
)
from spear.roles.artifacts import ArtifactStore
from spear.roles.spearlet import Spearlet
from spear.roles.state import AddFile, Command, DeleteTask, PutExecution, RegisterTask, SmsState

log = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class _SyncEntry:
    record: ExecutionRecord
    output: bytes = b""
    logs: bytes = b""
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def size(self) -> int:
        return len(self.output) + len(self.logs)


class TaskService:
    """The SMS TaskService of the leader (on one node: of this node)."""

    def __init__(
        self,
        *,
        config: SmsConfig,
        state: SmsState,
        spearlet: Spearlet,
        artifacts: ArtifactStore,
        commit: Callable[[Command], Awaitable[None]] | None = None,
        replicate_file: Callable[[str], Awaitable[None]] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """
        Args:
            commit: makes a command durable and applies it; on a cluster node the Raft
                driver's `commit` (acknowledged once committed). Default: apply locally.
            replicate_file: stores an uploaded blob on other nodes before its upload is
                committed (on a cluster node). Default: nothing to do.
        """
        self._config = config
        self._state = state
        self._commit = commit
        self._replicate_file = replicate_file
        self._spearlet = spearlet
        self._artifacts = artifacts
        self._now = wall_clock
        self._sync: OrderedDict[ExecutionId, _SyncEntry] = OrderedDict()
        self._sync_bytes = 0
        self._sync_idem: dict[tuple[str, str], ExecutionId] = {}
        self._async_lock = trio.Lock()
        self._queue_send, self._queue_recv = trio.open_memory_channel[ExecutionId](
            config.async_queue_limit
        )
        self._queued = 0
        self._waiters: dict[ExecutionId, trio.Event] = {}

    @property
    def node_id(self) -> str:
        return self._spearlet.node_id

    async def _apply(self, command: Command) -> None:
        if self._commit is not None:
            await self._commit(command)
        else:
            await trio.to_thread.run_sync(self._state.apply, command)

    # --- files -----------------------------------------------------------------------------

    async def upload_file(self, data: bytes, *, name: str = "") -> dict[str, Any]:
        file_id = FileId(await trio.to_thread.run_sync(self._artifacts.put, data))
        existing = self._state.file(file_id)
        if existing is not None:
            return existing
        if self._replicate_file is not None:
            await self._replicate_file(file_id)
        await self._apply(
            AddFile(file_id=file_id, size=len(data), name=name, created_at=self._now())
        )
        doc = self._state.file(file_id)
        assert doc is not None
        return doc

    def get_file(self, file_id: str) -> dict[str, Any]:
        doc = self._state.file(file_id)
        if doc is None:
            raise NotFoundError(f"file {file_id!r} does not exist")
        return doc

    def list_files(self) -> list[dict[str, Any]]:
        return self._state.files()

    async def read_file(self, file_id: str) -> bytes:
        self.get_file(file_id)
        return await trio.to_thread.run_sync(self._artifacts.read, file_id)

    # --- tasks -----------------------------------------------------------------------------

    async def register_task(self, spec: TaskSpec) -> TaskRecord:
        """Validate a definition against the runtimes, warm it, and store it.

        Raises:
            ConflictError: the name is taken.
            ValidationError, ArtifactError: the runtime refuses the definition.
        """
        if self._state.find_task(spec.name) is not None:
            raise ConflictError(f"a task named {spec.name!r} already exists")
        pinned = spec.placement.node_id
        if pinned is not None and pinned != self.node_id:
            raise ValidationError(
                f"placement.node_id {pinned!r} is not a member of this cluster",
                field="placement.node_id",
            )
        record = TaskRecord(task_id=new_task_id(), spec=spec, created_at=self._now())
        await self._spearlet.prepare(record)
        await self._apply(RegisterTask(record=record))
        self._spearlet.prewarm(record)  # only once stored: a refused write starts nothing
        return record

    def get_task(self, ref: str) -> TaskRecord:
        record = self._state.find_task(ref)
        if record is None:
            raise NotFoundError(f"task {ref!r} does not exist (give a task id or name)")
        return record

    def list_tasks(self) -> list[TaskRecord]:
        return self._state.tasks()

    async def delete_task(self, ref: str) -> TaskRecord:
        record = self.get_task(ref)
        await self._apply(DeleteTask(task_id=record.task_id))
        await self._spearlet.forget(record.task_id)
        return record

    # --- sync invocations ------------------------------------------------------------------

    async def invoke_sync(
        self,
        ref: str,
        data: bytes,
        *,
        timeout_ms: int | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[ExecutionRecord, bytes]:
        """Run an invocation now; return its record and output."""
        task = self.get_task(ref)
        if idempotency_key is not None:
            first = self._sync_idem.get((task.task_id, idempotency_key))
            if first is not None and (entry := self._sync.get(first)) is not None:
                await entry.done.wait()
                return entry.record, entry.output
        record = self._new_record(task, "sync", idempotency_key)
        entry = _SyncEntry(record=record)
        self._remember(entry)
        try:
            outcome = await self._spearlet.execute(
                task,
                record.execution_id,
                data,
                timeout_s=None if timeout_ms is None else timeout_ms / 1000,
            )
        except SpearError:
            # Refused before it ran (a saturated pool, a deleted task): the client gets the
            # error, and no record says it ran; a retry with the same key runs afresh.
            self._forget_sync(entry)
            raise
        except BaseException:
            entry.record = replace(record, status=ExecStatus.CANCELLED, finished_at=self._now())
            entry.done.set()
            raise
        entry.record = _finish(record, outcome, self.node_id, self._now())
        entry.output, entry.logs = outcome.output, outcome.logs
        self._sync_bytes += entry.size
        self._evict()
        entry.done.set()
        return entry.record, outcome.output

    def _new_record(
        self, task: TaskRecord, mode: Literal["sync", "async"], idempotency_key: str | None
    ) -> ExecutionRecord:
        """A new execution: a sync one starts running now, an async one waits its turn."""
        now = self._now()
        running = mode == "sync"
        return ExecutionRecord(
            execution_id=new_execution_id(now),
            task_id=task.task_id,
            task_name=task.name,
            mode=mode,
            status=ExecStatus.RUNNING if running else ExecStatus.PENDING,
            attempts=1 if running else 0,
            created_at=now,
            started_at=now if running else None,
            idempotency_key=idempotency_key,
        )

    def _remember(self, entry: _SyncEntry) -> None:
        record = entry.record
        self._sync[record.execution_id] = entry
        if record.idempotency_key is not None:
            self._sync_idem[(record.task_id, record.idempotency_key)] = record.execution_id
        self._evict()

    def _forget_sync(self, entry: _SyncEntry) -> None:
        record = entry.record
        self._sync.pop(record.execution_id, None)
        if record.idempotency_key is not None:
            self._sync_idem.pop((record.task_id, record.idempotency_key), None)
        entry.record = _failed(record, ErrorCode.START_FAILED, "it was refused", self._now())
        entry.done.set()  # a duplicate waiting on it learns it was refused

    def _evict(self) -> None:
        limit, budget = self._config.sync_record_limit, self._config.sync_record_bytes
        while self._sync and (len(self._sync) > limit or self._sync_bytes > budget):
            oldest = next(iter(self._sync.values()))
            if not oldest.done.is_set():
                break
            del self._sync[oldest.record.execution_id]
            self._sync_bytes -= oldest.size
            key = oldest.record.idempotency_key
            if key is not None:
                self._sync_idem.pop((oldest.record.task_id, key), None)

    # --- async invocations -----------------------------------------------------------------

    async def invoke_async(
        self, ref: str, data: bytes, *, idempotency_key: str | None = None
    ) -> tuple[ExecutionRecord, bool]:
        """Accept an invocation durably; return its record and whether it is new.

        Raises:
            UnavailableError: the async queue is full (`sms.async_queue_limit`).
        """
        task = self.get_task(ref)
        async with self._async_lock:
            if idempotency_key is not None:
                first = await trio.to_thread.run_sync(
                    self._state.idempotent_execution, task.task_id, idempotency_key
                )
                if first is not None and (existing := self._state.execution(first)) is not None:
                    return existing, False
            if self._queued >= self._config.async_queue_limit:
                raise UnavailableError(
                    f"the async queue is full ({self._config.async_queue_limit} executions,"
                    " sms.async_queue_limit); retry later",
                    retry_after_s=1.0,
                )
            record = self._new_record(task, "async", idempotency_key)
            # The input travels with the record: it is part of what was acknowledged.
            await self._apply(PutExecution(record=record, input=data))
            self._enqueue(record.execution_id)
        return record, True

    def _enqueue(self, execution_id: ExecutionId) -> None:
        self._queued += 1
        self._queue_send.send_nowait(execution_id)

    async def _run_async(self, execution_id: ExecutionId) -> None:
        async with self._async_lock:
            record = self._state.execution(execution_id)
            if record is None or record.status.terminal:
                return
            task = self._state.find_task(record.task_id)
            if task is None:
                await self._apply(
                    PutExecution(
                        record=_failed(
                            record, ErrorCode.START_FAILED, "its task was deleted", self._now()
                        )
                    )
                )
                self._notify(execution_id)
                return
            if record.attempts >= task.spec.retry.max_attempts:
                message = "the node stopped while it ran and its attempts are used up"
                failed = _failed(record, ErrorCode.NODE_LOST, message, self._now())
                await self._apply(PutExecution(record=failed))
                self._notify(execution_id)
                return
            record = replace(
                record,
                status=ExecStatus.RUNNING,
                attempts=record.attempts + 1,
                started_at=self._now(),
                node_id=NodeId(self.node_id),
            )
            await self._apply(PutExecution(record=record))
        data = await trio.to_thread.run_sync(self._state.execution_blob, "execin", execution_id)
        try:
            # Accepted work waits for an instance rather than failing on a busy pool.
            outcome = await self._spearlet.execute(
                task, execution_id, data or b"", acquire_timeout_s=math.inf
            )
        except BaseException as exc:
            if _is_cancellation(exc):
                # The node is stopping: this run does not count; it runs again at the next start.
                with trio.CancelScope(shield=True):
                    again = replace(record, status=ExecStatus.PENDING, attempts=record.attempts - 1)
                    await self._apply(PutExecution(record=again))
            raise
        final = _finish(record, outcome, self.node_id, self._now())
        async with self._async_lock:
            await self._apply(PutExecution(record=final, output=outcome.output, logs=outcome.logs))
        self._notify(execution_id)

    def _notify(self, execution_id: ExecutionId) -> None:
        event = self._waiters.pop(execution_id, None)
        if event is not None:
            event.set()

    async def wait_execution(self, execution_id: str, *, timeout_s: float) -> ExecutionRecord:
        """The execution's record once it has ended, or as it is after `timeout_s`."""
        record = self.get_execution(execution_id)
        if record.status.terminal or timeout_s <= 0:
            return record
        entry = self._sync.get(record.execution_id)
        event = (
            entry.done
            if entry is not None
            else self._waiters.setdefault(record.execution_id, trio.Event())
        )
        with trio.move_on_after(timeout_s):
            await event.wait()
        return self.get_execution(execution_id)

    async def serve_async_workers(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Prewarm the stored tasks' pools, then run accepted async executions,
        `sms.async_workers` at a time, until cancelled (when this node stops leading).

        Each start (each leadership term) begins with a fresh queue of every unfinished
        execution in the replicated state, so nothing queued in an earlier term runs twice.
        """
        self._queue_send, self._queue_recv = trio.open_memory_channel[ExecutionId](
            self._config.async_queue_limit
        )
        self._queued = 0
        for task in self._state.tasks():
            self._spearlet.prewarm(task)
        for record in await trio.to_thread.run_sync(self._state.unfinished_executions):
            self._enqueue(record.execution_id)
        async with trio.open_nursery() as nursery:
            for _ in range(self._config.async_workers):
                nursery.start_soon(self._async_worker)
            task_status.started()

    async def _async_worker(self) -> None:
        async for execution_id in self._queue_recv:
            self._queued -= 1
            try:
                await self._run_async(execution_id)
            except Exception as exc:
                # A bug or a broken store must cost this execution, never the node.
                log.exception("async execution %s could not be run", execution_id)
                await self._give_up(execution_id, exc)

    async def _give_up(self, execution_id: ExecutionId, exc: Exception) -> None:
        record = self._state.execution(execution_id)
        if record is None or record.status.terminal:
            return
        message = f"spear could not run it: {exc}"
        try:
            await self._apply(
                PutExecution(record=_failed(record, ErrorCode.START_FAILED, message, self._now()))
            )
        except Exception:
            log.exception("async execution %s could not be marked failed", execution_id)
        self._notify(execution_id)

    # --- execution records -----------------------------------------------------------------

    def get_execution(self, execution_id: str) -> ExecutionRecord:
        entry = self._sync.get(ExecutionId(execution_id))
        if entry is not None:
            return entry.record
        record = self._state.execution(execution_id)
        if record is None:
            raise NotFoundError(f"execution {execution_id!r} does not exist (or is no longer kept)")
        return record

    def list_executions(
        self, *, task: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[ExecutionRecord]:
        task_id = self.get_task(task).task_id if task else None
        wanted = ExecStatus(status) if status else None
        records = [e.record for e in self._sync.values()]
        records += self._state.executions(limit=max(limit, 1) * 4)
        out = [
            r
            for r in records
            if (task_id is None or r.task_id == task_id) and (wanted is None or r.status is wanted)
        ]
        out.sort(key=lambda r: r.execution_id, reverse=True)
        return out[:limit]

    async def execution_blob(self, execution_id: str, kind: str) -> bytes:
        """The output ("output") or logs ("logs") of a finished execution."""
        record = self.get_execution(execution_id)
        if not record.status.terminal:
            raise ConflictError(
                f"execution {execution_id} is {record.status.value}; its {kind} comes once it ends"
            )
        entry = self._sync.get(record.execution_id)
        if entry is not None:
            return entry.output if kind == "output" else entry.logs
        key = "execout" if kind == "output" else "execlog"
        blob = await trio.to_thread.run_sync(self._state.execution_blob, key, execution_id)
        return blob or b""

    async def cancel(self, execution_id: str) -> ExecutionRecord:
        """Cancel a pending or running execution.

        Raises:
            ConflictError: it has already finished.
        """
        record = self.get_execution(execution_id)
        if record.status.terminal:
            raise ConflictError(f"execution {execution_id} already ended as {record.status.value}")
        if self._spearlet.cancel(record.execution_id):
            return record
        async with self._async_lock:
            record = self.get_execution(execution_id)
            if record.mode == "async" and not record.status.terminal:
                record = replace(
                    record,
                    status=ExecStatus.CANCELLED,
                    error={"code": ErrorCode.CANCELLED.value, "message": "cancelled by request"},
                    finished_at=self._now(),
                )
                await self._apply(PutExecution(record=record))
                self._notify(record.execution_id)
        return record

    def statistics(self) -> dict[str, Any]:
        return {
            "tasks": len(self._state.tasks()),
            "sync_records": len(self._sync),
            "async_queued": self._queued,
            "spearlet": self._spearlet.statistics(),
        }


def _finish(
    record: ExecutionRecord, outcome: RunOutcome, node_id: str, now: float
) -> ExecutionRecord:
    error = None
    if outcome.error_code is not None:
        error = {"code": outcome.error_code.value, "message": outcome.error_message or ""}
    return replace(
        record,
        status=outcome.status,
        node_id=NodeId(node_id),
        error=error,
        finished_at=now,
        timings_ms=dict(outcome.timings_ms),
        cold=outcome.cold,
        exit_code=outcome.exit_code,
        output_bytes=len(outcome.output),
    )


def _failed(record: ExecutionRecord, code: ErrorCode, message: str, now: float) -> ExecutionRecord:
    return replace(
        record,
        status=ExecStatus.FAILED,
        error={"code": code.value, "message": message},
        finished_at=now,
    )


def _is_cancellation(exc: BaseException) -> bool:
    """Whether `exc` is trio's Cancelled, alone or inside nurseries' exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(trio.Cancelled) is not None
    return isinstance(exc, trio.Cancelled)
