"""Sync invocations a follower received, run without passing through the leader: the
leader's side.

The follower asks the leader to place the invocation (`SyncPlace`). The leader opens its
record (the records of sync invocations live on the leader, whichever node received them),
places it, preferring the follower itself among equally good nodes, and answers with the
`Dispatch` to send: the `(term, leader_id)` fence, the task and the deadline. The input stays
on the follower, which sends it to the chosen node itself (or runs it on its own Spearlet) and
reports how it ended (`SyncOutcome`); the leader holds the placement's ticket meanwhile, so
that node counts as busy. Placed on the leader itself, the invocation runs there: its input
comes with the placement request when it is small, else in a `SyncRun` request, and the
leader keeps the output it makes (it never comes back in a report).

A follower lost before it reports (no report of it for its lease plus the margin of
`LeaseBook`), or silent past the invocation's deadline plus twice `REPLY_GRACE_S` (its
placement's answer was lost on the way, say), leaves nobody waiting: the record ends `failed`
with `node_lost` naming the follower, and the node running it is told to stop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import trio

from spear import wire
from spear.errors import SpearError, UnavailableError
from spear.model import ErrorCode, ExecStatus, ExecutionId, ExecutionRecord, RunOutcome, TaskRecord
from spear.roles.dispatch import (
    DispatchRefused,
    SyncOutcome,
    SyncPlace,
    SyncPlaced,
    SyncRecorded,
    SyncRun,
    SyncWithdraw,
)
from spear.roles.dispatcher import REPLY_GRACE_S, Dispatcher
from spear.roles.function_service import outcome_of
from spear.roles.placement import Ticket
from spear.roles.sms import TaskService

log = logging.getLogger(__name__)

#: how often the leader looks for followers lost while they waited for a sync invocation
ORIGIN_CHECK_S = 0.25
#: how often the leader checks whether the follower of an inline run it runs still waits
ABANDON_CHECK_S = 0.05
#: withdrawals that came before their placement, and runs ended node_lost, remembered at most
MAX_REMEMBERED = 1000

Answer = SyncPlaced | SyncRecorded | DispatchRefused


@dataclass(slots=True)
class _Run:
    """A sync invocation placed for a follower, until it reports how it ended (or, run on
    this node, until that run ends)."""

    origin: str  # the follower that received it and waits for it
    node_id: str
    ticket: Ticket
    report_by: float  # trio time: the follower has certainly given up on it by then
    placement_id: str = ""  # the follower's name of its placement request, if it gave one
    here: bool = False  # running on this node now: that run ends it, and frees the ticket


class SyncDesk:
    """Places the sync invocations followers received and keeps their records (leader only)."""

    def __init__(self, *, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._runs: dict[ExecutionId, _Run] = {}
        self._placements: dict[str, ExecutionId] = {}  # placement id -> its execution
        self._withdrawn: dict[str, None] = {}  # withdrawn before placed (insertion-ordered)
        self._lost_origins: dict[ExecutionId, str] = {}  # ended node_lost here: their origin
        self._placed_count = 0
        self._lost = 0
        self._service: TaskService | None = None  # the TaskService of this node's terms

    def reset(self) -> None:
        """This node starts or stops leading: the runs it placed before are given up (their
        followers' reports go to the leader of the day, which does not know them), their
        records here end `failed` (`node_lost`: the outcome is unknown here). A run on this
        node goes on and records its own outcome."""
        runs = self._runs
        self._runs = {e: run for e, run in runs.items() if run.here}
        self._placements = {
            run.placement_id: e for e, run in self._runs.items() if run.placement_id
        }
        service = self._service
        for execution_id, run in runs.items():
            if run.here:
                continue
            self._dispatcher.placer.release(run.ticket)
            if service is not None:
                message = (
                    f"this node stopped leading while node {run.node_id} ran it for node"
                    f" {run.origin}; its outcome is not known here"
                )
                outcome = RunOutcome(
                    status=ExecStatus.FAILED, error_code=ErrorCode.NODE_LOST, error_message=message
                )
                service.close_sync(execution_id, outcome, run.node_id)
                self._note_lost(execution_id, run.origin)

    async def place(
        self,
        service: TaskService,
        message: SyncPlace,
        origin: str,
        abandoned: Callable[[], bool] = lambda: False,
    ) -> Answer:
        """Open the record and place the invocation, or place it again elsewhere; an inline
        one placed here runs here at once (stopped if the follower stops waiting:
        `abandoned`)."""
        self._service = service
        try:
            if message.execution_id:
                execution_id = ExecutionId(message.execution_id)
                task = self._unplace(service, execution_id, message.task, origin)
            else:
                key = message.idempotency_key or None
                task, record, output = await service.open_sync(message.task, key)
                if output is not None:
                    return SyncRecorded(record=_dumps(record), output=output)
                execution_id = record.execution_id
            try:
                run = self._place(service, task, execution_id, message, origin)
                if self._withdrawn.pop(message.placement_id, 0) is None:
                    self.withdraw(service, execution_id)  # it came first: nobody waits
                    raise UnavailableError("the placement was withdrawn by its follower")
                if not (message.inline and run.node_id == self._dispatcher.node_id):
                    return self._placed(service, task, execution_id, run, message)
            except SpearError:
                self._drop(service, execution_id)
                raise
            timeout_s = message.timeout_ms / 1000 if message.timeout_ms > 0 else None
            return await self._run_here(
                service, task, execution_id, message.data, timeout_s, abandoned
            )
        except SpearError as exc:
            return _refused(message.execution_id, exc)

    async def run(
        self,
        service: TaskService,
        message: SyncRun,
        origin: str,
        abandoned: Callable[[], bool] = lambda: False,
    ) -> SyncRecorded | DispatchRefused:
        """Run, with its input, an invocation placed on this node for `origin` (a large
        input: it did not travel with the placement request)."""
        execution_id = ExecutionId(message.execution_id)
        try:
            run = self._runs.get(execution_id)
            if (
                run is None
                or run.here
                or run.origin != origin
                or run.node_id != self._dispatcher.node_id
            ):
                raise UnavailableError(
                    f"execution {execution_id} is not placed on this node for node {origin}; retry"
                )
            try:
                task = service.get_task(service.get_execution(execution_id).task_id)
            except SpearError:
                self._drop(service, execution_id)
                raise
            timeout_s = message.timeout_ms / 1000
            return await self._run_here(
                service, task, execution_id, message.data, timeout_s, abandoned
            )
        except SpearError as exc:
            return _refused(message.execution_id, exc)

    def _unplace(
        self, service: TaskService, execution_id: ExecutionId, ref: str, origin: str
    ) -> TaskRecord:
        """Take back a placement whose node could not be reached; its task."""
        run = self._runs.get(execution_id)
        if run is None or run.origin != origin or run.here:
            raise UnavailableError(
                f"execution {execution_id} is not placed by this leader (it changed); retry"
            )
        self._forget(execution_id)
        self._dispatcher.placer.release(run.ticket)
        try:
            return service.get_task(ref)
        except SpearError:
            service.close_sync(execution_id, None, "")
            raise

    def _place(
        self,
        service: TaskService,
        task: TaskRecord,
        execution_id: ExecutionId,
        message: SyncPlace,
        origin: str,
    ) -> _Run:
        demand = self._dispatcher.demand(task, frozenset(message.exclude))
        ticket = self._dispatcher.placer.place(replace(demand, prefer=origin))
        if service.place_sync(execution_id, ticket.node_id) is None:
            self._dispatcher.placer.release(ticket)
            raise UnavailableError(f"execution {execution_id} is no longer open")
        run = _Run(origin, ticket.node_id, ticket, math.inf, message.placement_id)
        self._runs[execution_id] = run
        if run.placement_id:
            self._placements[run.placement_id] = execution_id
        self._placed_count += 1
        return run

    def _placed(
        self,
        service: TaskService,
        task: TaskRecord,
        execution_id: ExecutionId,
        run: _Run,
        message: SyncPlace,
    ) -> SyncPlaced:
        """The answer for a run the follower dispatches itself."""
        timeout_s = message.timeout_ms / 1000 if message.timeout_ms > 0 else None
        dispatch = self._dispatcher.sync_dispatch(task, execution_id, run.node_id, timeout_s)
        run.report_by = trio.current_time() + dispatch.timeout_ms / 1000 + 2 * REPLY_GRACE_S
        record = _dumps(service.get_execution(execution_id))
        return SyncPlaced(node_id=run.node_id, dispatch=dispatch, record=record)

    def _forget(self, execution_id: ExecutionId) -> _Run | None:
        """No longer track the run (the caller frees its ticket unless it runs here)."""
        run = self._runs.pop(execution_id, None)
        if run is not None and run.placement_id:
            self._placements.pop(run.placement_id, None)
        return run

    def _drop(self, service: TaskService, execution_id: ExecutionId) -> None:
        """It did not run: no placement, no record."""
        run = self._forget(execution_id)
        if run is not None:
            self._dispatcher.placer.release(run.ticket)
        service.close_sync(execution_id, None, "")

    async def _run_here(
        self,
        service: TaskService,
        task: TaskRecord,
        execution_id: ExecutionId,
        data: bytes,
        timeout_s: float | None,
        abandoned: Callable[[], bool],
    ) -> SyncRecorded:
        """Run an invocation placed on this node, as the leader runs its own (its record ends
        here whatever happens to the leadership). It stays tracked while it runs: a follower
        judged lost meanwhile has it stopped (`watch_origins`), and so does one that stops
        waiting (`abandoned`: it cancelled its request, or its connection is gone)."""
        run = self._runs[execution_id]
        run.here = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_when, abandoned, execution_id)
                outcome = await self._dispatcher.run_here(task, execution_id, data, timeout_s)
                nursery.cancel_scope.cancel()
        except SpearError:
            service.close_sync(execution_id, None, "")  # it did not start: no record
            raise
        finally:
            if self._runs.get(execution_id) is run:
                self._forget(execution_id)
            self._dispatcher.placer.release(run.ticket)
        record = service.close_sync(execution_id, outcome, run.node_id)
        assert record is not None
        return SyncRecorded(record=_dumps(record), output=outcome.output)

    async def _stop_when(self, abandoned: Callable[[], bool], execution_id: ExecutionId) -> None:
        """Cancel the run here once its follower stops waiting (its client hung up)."""
        # Polled: the mesh marks a request given up by its requester, but wakes nobody.
        while True:
            await trio.sleep(ABANDON_CHECK_S)
            if abandoned():
                self._dispatcher.cancel(self._dispatcher.node_id, execution_id)
                return

    def withdraw(self, service: TaskService, execution_id: str) -> None:
        """The follower stopped waiting for its placement (its client hung up) before the
        answer reached it: nobody sends the dispatch, the record ends cancelled (a run here
        is stopped: it ends its record itself)."""
        run = self._runs.get(ExecutionId(execution_id))
        if run is None:
            return
        if run.here:
            self._dispatcher.cancel(self._dispatcher.node_id, execution_id)
            return
        self._forget(ExecutionId(execution_id))
        self._dispatcher.placer.release(run.ticket)
        outcome = RunOutcome(
            status=ExecStatus.CANCELLED,
            error_code=ErrorCode.CANCELLED,
            error_message="the execution was cancelled: its client disconnected",
        )
        service.close_sync(ExecutionId(execution_id), outcome, run.node_id)

    def withdraw_placement(self, service: TaskService, message: SyncWithdraw) -> None:
        """`withdraw` the placement the follower named (its answer may have crossed the
        withdrawal, or not be made yet: then it is withdrawn as soon as it is)."""
        execution_id = self._placements.get(message.placement_id)
        if execution_id is not None:
            self.withdraw(service, execution_id)
            return
        self._withdrawn[message.placement_id] = None
        while len(self._withdrawn) > MAX_REMEMBERED:
            del self._withdrawn[next(iter(self._withdrawn))]

    def settle(self, service: TaskService, message: SyncOutcome, origin: str) -> Answer:
        """Record how a run ended (its result from the follower that placed it).

        A run this node declared lost (or gave up on, at a change of leadership) takes the
        real result its follower reports late; the records of other runs (the ones this node
        runs itself, the ones its own gateway received) are not the follower's to end.
        """
        execution_id = ExecutionId(message.execution_id)
        result = message.result
        outcome = None if result is None else outcome_of(result)
        run = self._runs.get(execution_id)
        if run is not None and (run.origin != origin or run.here):
            return _refused(message.execution_id, UnavailableError("not placed for this report"))
        if run is None:
            if self._lost_origins.get(execution_id) == origin and result is not None:
                record = service.close_sync(execution_id, outcome, result.node_id, amend_lost=True)
            else:
                record = service.sync_record(execution_id)
        else:
            self._forget(execution_id)
            self._dispatcher.placer.release(run.ticket)
            record = service.close_sync(execution_id, outcome, run.node_id)
        return SyncRecorded(record=b"" if record is None else _dumps(record))

    async def watch_origins(self, service: Callable[[], TaskService | None]) -> None:
        """Until cancelled: end the runs whose follower is lost (see the module docstring),
        and give them all up when this node stops leading (`service` answers None)."""
        while True:
            await trio.sleep(ORIGIN_CHECK_S)
            current = service()
            if current is None:
                if any(not run.here for run in self._runs.values()):
                    self.reset()
                continue
            now = trio.current_time()
            leases = self._dispatcher.leases
            for execution_id, run in list(self._runs.items()):
                if leases.lost(run.origin, now):
                    why = f"no report for {leases.lease_s:g} s, sms.spearlet_lease_ms"
                elif now >= run.report_by and not run.here:
                    why = "it did not report within the invocation's deadline"
                else:
                    continue
                self._lose(current, execution_id, run, why)

    def _lose(self, service: TaskService, execution_id: ExecutionId, run: _Run, why: str) -> None:
        self._forget(execution_id)
        if not run.here:
            self._dispatcher.placer.release(run.ticket)
        self._lost += 1
        message = (
            f"node {run.origin}, which received the invocation, was lost before it reported"
            f" how it ended ({why})"
        )
        log.warning("sync execution %s: %s", execution_id, message)
        outcome = RunOutcome(
            status=ExecStatus.FAILED, error_code=ErrorCode.NODE_LOST, error_message=message
        )
        service.close_sync(execution_id, outcome, run.node_id)
        if not run.here:
            self._note_lost(execution_id, run.origin)
        if run.node_id != run.origin:
            self._dispatcher.cancel(run.node_id, execution_id)  # nobody waits for it now

    def _note_lost(self, execution_id: ExecutionId, origin: str) -> None:
        """Its follower may still report its real outcome (see `settle`)."""
        self._lost_origins[execution_id] = origin
        while len(self._lost_origins) > MAX_REMEMBERED:
            del self._lost_origins[next(iter(self._lost_origins))]

    def statistics(self) -> dict[str, int]:
        return {
            "placed": self._placed_count,
            "running": len(self._runs),
            "origins_lost": self._lost,
        }


def _dumps(record: ExecutionRecord) -> bytes:
    return wire.dumps(record.to_doc())


def _refused(execution_id: str, exc: SpearError) -> DispatchRefused:
    return DispatchRefused(
        execution_id=execution_id,
        code=exc.code,
        message=str(exc),
        retry_after_s=float(getattr(exc, "retry_after_s", 0.0)),
        field=getattr(exc, "field", None) or "",
    )
