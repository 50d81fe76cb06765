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
import random
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
    SaturatedError,
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
from spear.roles.dispatch import ExecutionResult, ResultAck, retry_delay_s
from spear.roles.dispatcher import Dispatcher, DispatchRefusedError
from spear.roles.function_service import FunctionService, outcome_of
from spear.roles.placement import Ticket
from spear.roles.spearlet import Spearlet
from spear.roles.state import AddFile, Command, DeleteTask, PutExecution, RegisterTask, SmsState

log = logging.getLogger(__name__)

#: wait before placing again an async execution no node could take
PLACEMENT_RETRY_S = 0.5
#: how often the leader looks for lost Spearlet leases
LEASE_CHECK_S = 0.25
#: how long a stopping leader may take to put its own running attempts back to pending
STOP_GRACE_S = 2.0


@dataclass(slots=True)
class _InFlight:
    """An async attempt dispatched to a node, awaiting its result."""

    node_id: str
    attempt: int
    ticket: Ticket | None
    since: float  # trio time it was dispatched (or adopted by this leader)


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
        functions: FunctionService,
        dispatcher: Dispatcher,
        artifacts: ArtifactStore,
        commit: Callable[[Command], Awaitable[None]] | None = None,
        replicate_file: Callable[[str], Awaitable[None]] | None = None,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
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
        self._functions = functions
        self._dispatcher = dispatcher
        self._rng = rng or random.Random()
        self._artifacts = artifacts
        self._now = wall_clock
        self._sync: OrderedDict[ExecutionId, _SyncEntry] = OrderedDict()
        self._sync_bytes = 0
        self._sync_idem: dict[tuple[str, str], ExecutionId] = {}
        self._async_lock = trio.Lock()
        self._queue_send, self._queue_recv = trio.open_memory_channel[ExecutionId](math.inf)
        self._queued = 0
        self._waiters: dict[ExecutionId, trio.Event] = {}
        self._inflight: dict[ExecutionId, _InFlight] = {}
        self._nursery: trio.Nursery | None = None
        self._serving = False
        self._cancelled: set[ExecutionId] = set()

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
        inapplicable = spec.inapplicable_field()
        if inapplicable is not None:
            raise ValidationError(inapplicable[1], field=inapplicable[0])
        if self._state.find_task(spec.name) is not None:
            raise ConflictError(f"a task named {spec.name!r} already exists")
        pinned = spec.placement.node_id
        if pinned is not None and pinned not in {
            v.node_id for v in self._dispatcher.placer.views()
        }:
            raise ValidationError(
                f"placement.node_id {pinned!r} is not a member of this cluster",
                field="placement.node_id",
            )
        record = TaskRecord(task_id=new_task_id(), spec=spec, created_at=self._now())
        if self._spearlet.offers(spec.runtime):
            await self._spearlet.prepare(record)
        elif not any(spec.runtime in v.runtimes for v in self._dispatcher.placer.views()):
            raise ValidationError(
                f"{self._spearlet.why_not(spec.runtime)}; no other node of this cluster"
                " offers it either",
                field="runtime",
            )
        # else: the node it is placed on prepares it before its first run.
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

        def placed(node_id: str) -> None:
            entry.record = replace(entry.record, node_id=NodeId(node_id))

        try:
            outcome, node_id = await self._dispatcher.run_sync(
                task,
                record.execution_id,
                data,
                timeout_s=None if timeout_ms is None else timeout_ms / 1000,
                on_placed=placed,
            )
        except SpearError:
            # Refused before it ran (a saturated pool, a deleted task): the client gets the
            # error, and no record says it ran; a retry with the same key runs afresh.
            self._forget_sync(entry)
            raise
        except BaseException:
            entry.record = replace(
                entry.record, status=ExecStatus.CANCELLED, finished_at=self._now()
            )
            entry.done.set()
            raise
        entry.record = _finish(record, outcome, node_id, self._now())
        entry.output, entry.logs = outcome.output, outcome.logs
        self._sync_bytes += entry.size
        self._evict()
        entry.done.set()
        return entry.record, outcome.output

    # --- sync invocations a follower runs itself (spear.roles.direct_sync) -------------------

    async def open_sync(
        self, ref: str, idempotency_key: str | None
    ) -> tuple[TaskRecord, ExecutionRecord, bytes | None]:
        """Open the record of a sync invocation a follower runs: its task and new running
        record (no output); for a repeated idempotency key, the earlier invocation's record
        and output once it has ended."""
        task = self.get_task(ref)
        if idempotency_key is not None:
            first = self._sync_idem.get((task.task_id, idempotency_key))
            if first is not None and (entry := self._sync.get(first)) is not None:
                await entry.done.wait()
                return task, entry.record, entry.output
        record = self._new_record(task, "sync", idempotency_key)
        self._remember(_SyncEntry(record=record))
        return task, record, None

    def place_sync(self, execution_id: ExecutionId, node_id: str) -> ExecutionRecord | None:
        """The open sync record runs on `node_id` now (None: it is no longer open)."""
        entry = self._sync.get(execution_id)
        if entry is None or entry.done.is_set():
            return None
        entry.record = replace(entry.record, node_id=NodeId(node_id))
        return entry.record

    def close_sync(
        self,
        execution_id: ExecutionId,
        outcome: RunOutcome | None,
        node_id: str,
        *,
        amend_lost: bool = False,
    ) -> ExecutionRecord | None:
        """Record how an open sync invocation ended; `None`: it did not run (refused), its
        record is dropped. Returns the record kept (as it was, if it had already ended).

        Args:
            amend_lost: a record already ended `node_lost` takes `outcome` instead (the
                follower judged lost reported after all: its real outcome is known).
        """
        entry = self._sync.get(execution_id)
        if entry is None:
            return None
        if entry.done.is_set():
            error = entry.record.error or {}
            lost = error.get("code") == ErrorCode.NODE_LOST
            if not (amend_lost and outcome is not None and lost):
                return entry.record
            self._sync_bytes -= entry.size
        elif outcome is None:
            self._forget_sync(entry)
            return None
        entry.record = _finish(entry.record, outcome, node_id, self._now())
        entry.output, entry.logs = outcome.output, outcome.logs
        self._sync_bytes += entry.size
        self._evict()
        entry.done.set()
        return entry.record

    def sync_record(self, execution_id: ExecutionId) -> ExecutionRecord | None:
        """The kept record of a sync invocation, if any (open or ended)."""
        entry = self._sync.get(execution_id)
        return None if entry is None else entry.record

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
        """Drop the oldest ended records beyond the limits (running ones are skipped: a
        long run must not keep every later record)."""
        limit, budget = self._config.sync_record_limit, self._config.sync_record_bytes
        count, size = len(self._sync), self._sync_bytes
        if count <= limit and size <= budget:
            return
        # Oldest first, and only as far as needed: once full, every new record evicts about
        # one, so this looks at a few entries (the running ones at the front, at most), never
        # at all of them.
        victims: list[_SyncEntry] = []
        for entry in self._sync.values():
            if count <= limit and size <= budget:
                break
            if entry.done.is_set():
                victims.append(entry)
                count -= 1
                size -= entry.size
        for entry in victims:
            del self._sync[entry.record.execution_id]
            self._sync_bytes -= entry.size
            key = entry.record.idempotency_key
            if key is not None:
                self._sync_idem.pop((entry.record.task_id, key), None)

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

    def _schedule(self, execution_id: ExecutionId, at: float | None) -> None:
        """Queue an execution for its next attempt, now or at wall-clock time `at`."""
        delay = 0.0 if at is None else at - self._now()
        if delay <= 0 or self._nursery is None:
            self._enqueue(execution_id)
            return
        self._queued += 1  # it counts against the queue limit while it waits

        async def later() -> None:
            await trio.sleep(delay)
            self._queued -= 1
            self._enqueue(execution_id)

        self._nursery.start_soon(later)

    async def _run_async(self, execution_id: ExecutionId) -> None:
        """Place and dispatch the next attempt of an accepted execution."""
        async with self._async_lock:
            record = self._state.execution(execution_id)
            if record is None or record.status is not ExecStatus.PENDING:
                return  # finished, or (a duplicate queue entry) already dispatched
            task = self._state.find_task(record.task_id)
            if task is None:
                await self._end(
                    _failed(record, ErrorCode.START_FAILED, "its task was deleted", self._now())
                )
                return
            retry = task.spec.retry
            if record.attempts >= retry.max_attempts:
                message = f"its {record.attempts} attempt(s) are used up (retry.max_attempts)"
                await self._end(_dead(record, ErrorCode.NODE_LOST, message, self._now()))
                return
            if self._now() - _accepted_at(record) > retry.max_event_age_s:
                message = (
                    f"it did not start within retry.max_event_age_s ({retry.max_event_age_s} s)"
                )
                await self._end(_dead(record, ErrorCode.EXPIRED, message, self._now()))
                return
            last_node = record.history[-1].get("node_id") if record.history else None
            exclude = frozenset({last_node}) if isinstance(last_node, str) else frozenset()
            try:
                ticket = self._place(task, exclude)
            except SpearError as exc:
                # No node can take it now (full, or none fits yet): not an attempt; later.
                log.info("async execution %s waits for a node: %s", execution_id, exc)
                self._schedule(execution_id, self._now() + PLACEMENT_RETRY_S)
                return
            attempt = record.attempts + 1
            running = replace(
                record,
                status=ExecStatus.RUNNING,
                attempts=attempt,
                started_at=self._now(),
                node_id=NodeId(ticket.node_id),
                retry_at=None,
                error=None,
            )
            try:
                await self._apply(PutExecution(record=running))
            except BaseException:
                self._dispatcher.placer.release(ticket)
                raise
            self._inflight[execution_id] = _InFlight(
                ticket.node_id, attempt, ticket, trio.current_time()
            )
        data = await trio.to_thread.run_sync(self._state.execution_blob, "execin", execution_id)
        timeout_s = self._spearlet.function_spec(task).timeout_s
        try:
            await self._dispatcher.start_async(
                task,
                execution_id,
                attempt,
                data or b"",
                node_id=ticket.node_id,
                ticket=ticket,
                timeout_s=timeout_s,
            )
        except (DispatchRefusedError, SaturatedError) as exc:
            # It certainly did not start: the attempt does not count; placed again soon.
            log.info("async execution %s not taken: %s", execution_id, exc)
            async with self._async_lock:
                await self._undo_attempt(execution_id, attempt, ticket.node_id)

    def _place(self, task: TaskRecord, exclude: frozenset[str]) -> Ticket:
        """A placement, leaving out `exclude` unless nothing else fits."""
        placer = self._dispatcher.placer
        demand = self._dispatcher.demand(task, exclude)
        if not exclude:
            return placer.place(demand)
        try:
            return placer.place(demand)
        except SpearError:
            return placer.place(self._dispatcher.demand(task))

    async def _undo_attempt(self, execution_id: ExecutionId, attempt: int, node_id: str) -> None:
        flight = self._inflight.get(execution_id)
        if flight is None or flight.attempt != attempt:
            return
        self._release(execution_id)
        record = self._state.execution(execution_id)
        if record is None or record.status is not ExecStatus.RUNNING or record.attempts != attempt:
            return
        again = replace(_uncounted(record), retry_at=self._now() + PLACEMENT_RETRY_S)
        await self._apply(PutExecution(record=again))
        self._schedule(execution_id, again.retry_at)

    def _release(self, execution_id: ExecutionId) -> _InFlight | None:
        flight = self._inflight.pop(execution_id, None)
        if flight is not None and flight.ticket is not None:
            self._dispatcher.placer.release(flight.ticket)
        return flight

    async def on_result(self, result: ExecutionResult) -> ResultAck | None:
        """A Spearlet's result of an async attempt: commit it (or the retry it calls for).

        Returns the ack the Spearlet waits for, or None when this node cannot take it now
        (it is not leading): the Spearlet offers it again to the next leader.
        """
        ack = ResultAck(execution_id=result.execution_id, attempt=result.attempt)
        if not self._serving:
            return None
        try:
            async with self._async_lock:
                record = self._state.execution(result.execution_id)
                if (
                    record is None
                    or record.status is not ExecStatus.RUNNING
                    or record.attempts != result.attempt
                    or record.node_id != result.node_id
                ):
                    return ack  # an attempt already settled, or superseded: nothing to do
                self._release(record.execution_id)
                await self._settle(record, outcome_of(result), result.node_id)
        except SpearError as exc:
            log.info("result of %s not committed: %s", result.execution_id, exc)
            return None
        return ack

    async def _settle(self, record: ExecutionRecord, outcome: RunOutcome, node_id: str) -> None:
        """Commit how an attempt ended: the final record, or a retry after a backoff."""
        now = self._now()
        ended = _finish(record, outcome, node_id, now)
        history = (*record.history, _attempt_entry(ended))
        if record.execution_id in self._cancelled:
            self._cancelled.discard(record.execution_id)
            if outcome.status is not ExecStatus.SUCCEEDED:
                ended = replace(
                    ended,
                    status=ExecStatus.CANCELLED,
                    error={"code": ErrorCode.CANCELLED.value, "message": "cancelled by request"},
                )
                outcome = replace(outcome, status=ExecStatus.CANCELLED)
                history = (*record.history, _attempt_entry(ended))
        retryable = outcome.status in (ExecStatus.FAILED, ExecStatus.TIMEOUT)
        task = self._state.find_task(record.task_id)
        if retryable and task is not None and record.attempts < task.spec.retry.max_attempts:
            delay = retry_delay_s(task.spec.retry, record.attempts, self._rng)
            again = replace(
                ended,
                status=ExecStatus.PENDING,
                finished_at=None,
                retry_at=now + delay,
                history=history,
            )
            await self._apply(PutExecution(record=again))
            self._schedule(record.execution_id, again.retry_at)
            return
        final = replace(ended, history=history, dead_letter=retryable)
        await self._apply(PutExecution(record=final, output=outcome.output, logs=outcome.logs))
        self._notify(record.execution_id)

    async def _end(self, record: ExecutionRecord) -> None:
        await self._apply(PutExecution(record=record))
        self._notify(record.execution_id)

    async def _watch_leases(self) -> None:
        """Declare the attempts of Spearlets whose lease is lost, and retry them elsewhere;
        every lease period, probe the live Spearlets for the attempts they have not answered
        for a lease period (a dispatch or result lost on the way, a restart within the
        lease), and declare those they no longer hold."""
        last_probe = trio.current_time()
        while True:
            if trio.current_time() - last_probe >= self._dispatcher.leases.lease_s:
                last_probe = trio.current_time()
                await self._probe_attempts(last_probe)
            now = trio.current_time()
            leases = self._dispatcher.leases
            lost = [
                (execution_id, flight)
                for execution_id, flight in self._inflight.items()
                if leases.lost(flight.node_id, now)
            ]
            for execution_id, flight in lost:
                message = (
                    f"node {flight.node_id} was lost while it ran attempt {flight.attempt}"
                    f" (no report for {leases.lease_s:g} s, sms.spearlet_lease_ms)"
                )
                await self._lose_attempt(execution_id, flight, message)
            await trio.sleep(LEASE_CHECK_S)

    async def _probe_attempts(self, now: float) -> None:
        leases = self._dispatcher.leases
        by_node: dict[str, list[tuple[ExecutionId, _InFlight]]] = {}
        for execution_id, flight in self._inflight.items():
            if now - flight.since >= leases.lease_s and not leases.lost(flight.node_id, now):
                by_node.setdefault(flight.node_id, []).append((execution_id, flight))
        async with trio.open_nursery() as nursery:
            for node_id, flights in by_node.items():
                nursery.start_soon(self._probe_node, node_id, flights)

    async def _probe_node(self, node_id: str, flights: list[tuple[ExecutionId, _InFlight]]) -> None:
        held = await self._dispatcher.probe(node_id, [(e, f.attempt) for e, f in flights])
        if held is None:
            return  # unanswered: its lease decides
        for (execution_id, flight), is_held in zip(flights, held, strict=True):
            if not is_held:
                message = (
                    f"node {node_id} no longer held attempt {flight.attempt} (its dispatch or"
                    " its result was lost on the way, or the node restarted)"
                )
                await self._lose_attempt(execution_id, flight, message)

    async def _lose_attempt(
        self, execution_id: ExecutionId, flight: _InFlight, message: str
    ) -> None:
        """Settle an attempt that is still the one in flight as failed `node_lost` (retried
        per the task's policy)."""
        async with self._async_lock:
            record = self._state.execution(execution_id)
            if self._inflight.get(execution_id) is not flight or record is None:
                return
            self._release(execution_id)
            if record.status is not ExecStatus.RUNNING or record.attempts != flight.attempt:
                return
            log.warning("async execution %s: %s", execution_id, message)
            outcome = RunOutcome(
                status=ExecStatus.FAILED, error_code=ErrorCode.NODE_LOST, error_message=message
            )
            try:
                await self._settle(record, outcome, flight.node_id)
            except SpearError as exc:
                # Leadership was lost meanwhile (a paused leader resuming, say): the next
                # leader adopts the attempt and its own lease rule decides.
                log.info("loss of %s not committed: %s", execution_id, exc)

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
        """Prewarm the stored tasks' pools, then dispatch accepted async executions and settle
        their attempts, until cancelled (when this node stops leading).

        Each start (each leadership term) begins afresh from the replicated state: pending
        executions are queued, running ones are in flight on their node until their result
        comes or that node's lease is lost (an attempt that was running on this very node
        before it restarted is lost at once: nothing here runs it any more).
        """
        self._queue_send, self._queue_recv = trio.open_memory_channel[ExecutionId](
            math.inf  # bounded by the acceptance check against sms.async_queue_limit
        )
        self._queued = 0
        self._inflight = {}
        self._dispatcher.begin_term()
        for task in self._state.tasks():
            self._spearlet.prewarm(task)
        unfinished = await trio.to_thread.run_sync(self._state.unfinished_executions)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for record in unfinished:
                    if record.status is ExecStatus.RUNNING and record.node_id is not None:
                        flight = _InFlight(
                            record.node_id, record.attempts, None, trio.current_time()
                        )
                        self._inflight[record.execution_id] = flight
                        if record.node_id == self.node_id and not self._functions.holds(
                            record.execution_id
                        ):
                            message = (
                                f"node {self.node_id} stopped while it ran attempt {flight.attempt}"
                            )
                            nursery.start_soon(
                                self._lose_attempt, record.execution_id, flight, message
                            )
                    else:
                        self._schedule(record.execution_id, record.retry_at)
                for _ in range(self._config.async_workers):
                    nursery.start_soon(self._async_worker)
                nursery.start_soon(self._watch_leases)
                self._serving = True
                task_status.started()
        finally:
            self._serving = False
            self._nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(STOP_GRACE_S):
                await self._return_local_attempts()
            for execution_id in list(self._inflight):
                self._release(execution_id)

    async def _return_local_attempts(self) -> None:
        """This node stops leading (or stops): the attempts that ran on it and ended without a
        result go back to pending uncounted while this node may still commit that (a clean
        stop of a lone node). When it no longer leads the commit fails and the next leader
        counts them lost by the lease rule instead. Bounded by STOP_GRACE_S."""
        for execution_id, flight in list(self._inflight.items()):
            if flight.node_id != self.node_id:
                continue
            # Stopping, the node cancels the run at once; merely re-elected, it runs on
            # (its result will come): then it is left as it is.
            while self._functions.holds(execution_id):
                await self._functions.wait_change()
            record = self._state.execution(execution_id)
            if record is None or record.status is not ExecStatus.RUNNING:
                continue
            if record.attempts != flight.attempt:
                continue
            try:
                await self._apply(PutExecution(record=_uncounted(record)))
            except SpearError as exc:
                log.info(
                    "execution %s stays running until its lease is lost: %s", execution_id, exc
                )
                return

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
        self._release(execution_id)
        message = f"spear could not run it: {exc}"
        try:
            await self._end(_failed(record, ErrorCode.START_FAILED, message, self._now()))
        except Exception:
            log.exception("async execution %s could not be marked failed", execution_id)

    async def redrive(self, execution_id: str) -> ExecutionRecord:
        """Run a dead-lettered execution again, with a fresh budget of attempts.

        Raises:
            ConflictError: it is not in the dead-letter list.
        """
        async with self._async_lock:
            record = self.get_execution(execution_id)
            if not record.dead_letter:
                raise ConflictError(
                    f"execution {execution_id} is not dead-lettered ({record.status.value});"
                    " only dead-lettered executions can be redriven"
                )
            now = self._now()
            again = replace(
                record,
                status=ExecStatus.PENDING,
                attempts=0,
                dead_letter=False,
                error=None,
                finished_at=None,
                node_id=None,
                retry_at=None,
                history=(*record.history, {"redriven_at": now}),
            )
            await self._apply(PutExecution(record=again))
            self._enqueue(again.execution_id)
        return again

    # --- execution records -----------------------------------------------------------------

    def get_execution(self, execution_id: str) -> ExecutionRecord:
        entry = self._sync.get(ExecutionId(execution_id))
        if entry is not None:
            return entry.record
        record = self._state.execution(execution_id)
        if record is None:
            raise NotFoundError(f"execution {execution_id!r} does not exist (or is no longer kept)")
        return record

    def dead_letters(self, *, limit: int = 100) -> list[ExecutionRecord]:
        """Async executions whose attempts were used up (or that aged out), newest first."""
        return self._state.dead_letters(limit=limit)

    def list_executions(
        self, *, task: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[ExecutionRecord]:
        # A task is named by id or name; a deleted one's executions are still listed (by
        # its id, or by the name its records carry).
        found = self._state.find_task(task) if task else None
        task_id = found.task_id if found is not None else None
        wanted = ExecStatus(status) if status else None
        records = [e.record for e in self._sync.values()]
        records += self._state.executions(limit=max(limit, 1) * 4)

        def of_task(r: ExecutionRecord) -> bool:
            if task is None:
                return True
            if task_id is not None:
                return r.task_id == task_id
            return task in (r.task_id, r.task_name)

        out = [r for r in records if of_task(r) and (wanted is None or r.status is wanted)]
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
        entry = self._sync.get(record.execution_id)
        if entry is not None:
            if entry.record.node_id is not None:
                self._dispatcher.cancel(entry.record.node_id, record.execution_id)
            return record
        async with self._async_lock:
            record = self.get_execution(execution_id)
            flight = self._inflight.get(record.execution_id)
            if flight is not None and record.status is ExecStatus.RUNNING:
                # Its node stops it and reports it cancelled; if the node is lost meanwhile,
                # it is not run again.
                self._cancelled.add(record.execution_id)
                self._dispatcher.cancel(flight.node_id, record.execution_id)
            elif record.mode == "async" and not record.status.terminal:
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


def _dead(record: ExecutionRecord, code: ErrorCode, message: str, now: float) -> ExecutionRecord:
    """The record of an execution that lands in the dead-letter list."""
    return replace(_failed(record, code, message, now), dead_letter=True, retry_at=None)


def _accepted_at(record: ExecutionRecord) -> float:
    """When the execution was accepted, or last redriven (its event age counts from then)."""
    for entry in reversed(record.history):
        redriven = entry.get("redriven_at")
        if isinstance(redriven, int | float):
            return float(redriven)
    return record.created_at


def _attempt_entry(record: ExecutionRecord) -> dict[str, Any]:
    """One line of an execution's history: how one attempt ended."""
    return {
        "attempt": record.attempts,
        "node_id": record.node_id,
        "status": record.status.value,
        "error": dict(record.error) if record.error else None,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
    }


def _uncounted(record: ExecutionRecord) -> ExecutionRecord:
    """A running attempt that certainly did not run to its end here, back to pending without
    counting it."""
    return replace(
        record,
        status=ExecStatus.PENDING,
        attempts=record.attempts - 1,
        node_id=None,
        started_at=None,
    )
