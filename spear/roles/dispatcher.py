"""The leader's side of dispatch: place an invocation, send it, keep the Spearlets' leases.

A sync invocation placed on this node runs on the local Spearlet directly (the hot path of a
single node); placed elsewhere it travels as a `Dispatch` request and its `ExecutionResult`
comes back as the reply. An async one always goes through a FunctionService (this node's own,
called directly, or a peer's over the mesh) and is answered `DispatchAccepted`; its result is
delivered to the leader later (see spear.roles.function_service).

Sending is either *definite* (the Spearlet refused it, or no link to it could be made: it did
not run) or *ambiguous* (the link broke or the request timed out after it was sent: it may be
running). An ambiguous async dispatch stays in flight until its result arrives or the
Spearlet's lease is lost (`LeaseBook`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import trio

from spear import wire
from spear.errors import SaturatedError, SpearError, UnavailableError
from spear.mesh import LinkClosedError, PeerUnreachableError, RemoteError, RequestTimeoutError
from spear.model import ErrorCode, ExecStatus, ExecutionId, RunOutcome, TaskRecord
from spear.roles.dispatch import (
    Dispatch,
    DispatchAccepted,
    DispatchCancel,
    DispatchProbe,
    DispatchRefused,
    ExecutionResult,
    LeaseBook,
    ProbeAnswer,
)
from spear.roles.function_service import FunctionService, outcome_of
from spear.roles.placement import Demand, Placer, Ticket
from spear.roles.spearlet import Spearlet

log = logging.getLogger(__name__)

#: time a dispatch request may take beyond the invocation's own deadline
REPLY_GRACE_S = 5.0
#: how long to wait for a Spearlet to take an async dispatch
ACCEPT_TIMEOUT_S = 10.0
#: how long to wait for a Spearlet to answer a probe of its attempts
PROBE_TIMEOUT_S = 5.0

Request = Callable[[str, object, float], Awaitable[Any]]
Send = Callable[[str, object], None]


class DispatchRefusedError(UnavailableError):
    """A Spearlet refused a dispatch, or could not be reached: the invocation did not run."""

    def __init__(self, node_id: str, code: str, message: str, *, retry_after_s: float = 1.0):
        super().__init__(f"node {node_id} did not take it: {message}", retry_after_s=retry_after_s)
        self.node_id = node_id
        self.refusal = code


@dataclass(frozen=True, slots=True)
class Started:
    """An async dispatch in flight: on which node, which attempt, its placement ticket."""

    node_id: str
    attempt: int
    ticket: Ticket | None
    outcome: Literal["accepted", "ambiguous"]


class Dispatcher:
    """Places and dispatches invocations for the leader (one per node, reset per term)."""

    def __init__(
        self,
        *,
        spearlet: Spearlet,
        functions: FunctionService,
        placer: Placer,
        request: Request,
        send: Send,
        term: Callable[[], int],
        lease_s: float,
    ) -> None:
        """
        Args:
            request: sends a request to a node by id and returns its reply (the mesh).
            send: sends a one-way message to a node by id.
            term: the current Raft term (the fence of every command sent).
        """
        self.node_id = spearlet.node_id
        self.placer = placer
        self.leases = LeaseBook(lease_s=lease_s, since=trio.current_time())
        self._spearlet = spearlet
        self._functions = functions
        self._request = request
        self._send = send
        self._term = term
        #: called when this node starts leading, after the leases are reset
        self.on_term_start: Callable[[], None] | None = None

    def begin_term(self) -> None:
        """This node starts leading: every Spearlet's lease counts from now at the earliest."""
        self.leases = LeaseBook(lease_s=self.leases.lease_s, since=trio.current_time())
        if self.on_term_start is not None:
            self.on_term_start()

    def demand(self, task: TaskRecord, exclude: frozenset[str] = frozenset()) -> Demand:
        spec = task.spec
        return Demand(
            task_id=task.task_id,
            runtime=spec.runtime,
            labels=dict(spec.placement.labels),
            node_id=spec.placement.node_id,
            memory_bytes=spec.memory_limit_bytes or 0,
            exclude=exclude,
            prefer=self.node_id,
        )

    def _dispatch(
        self,
        node_id: str,
        task: TaskRecord,
        execution_id: str,
        attempt: int,
        data: bytes,
        mode: Literal["sync", "async"],
        timeout_s: float,
        acquire_timeout_s: float | None,
    ) -> Dispatch:
        return Dispatch(
            term=self._term(),
            leader_id=self.node_id,
            execution_id=execution_id,
            attempt=attempt,
            mode=mode,
            task=wire.dumps(task.to_doc()),
            data=data,
            timeout_ms=max(1, int(timeout_s * 1000)),
            acquire_timeout_ms=-1 if acquire_timeout_s is None else int(acquire_timeout_s * 1000),
            # to itself the leader dispatches in one call: nothing is held up on the way
            lease_epoch=(
                self._functions.fence.epoch
                if node_id == self.node_id
                else self.leases.epoch_of(node_id)
            ),
        )

    # --- sync --------------------------------------------------------------------------------

    async def run_sync(
        self,
        task: TaskRecord,
        execution_id: ExecutionId,
        data: bytes,
        *,
        timeout_s: float | None,
        on_placed: Callable[[str], None] = lambda node_id: None,
    ) -> tuple[RunOutcome, str]:
        """Place and run a sync invocation; its outcome and the node that ran it.

        A node that cannot be reached (the dispatch was certainly not sent) is left out and
        the invocation placed once more; a node lost while it ran fails the invocation with an
        error naming it (a sync invocation is never run twice).

        Raises:
            SaturatedError, UnavailableError, ValidationError: no node could take it.
        """
        exclude: frozenset[str] = frozenset()
        for _ in range(3):
            ticket = self.placer.place(self.demand(task, exclude))
            node_id = ticket.node_id
            on_placed(node_id)
            try:
                if node_id == self.node_id:
                    outcome = await self._spearlet.execute(
                        task, execution_id, data, timeout_s=timeout_s
                    )
                    return outcome, node_id
                return await self._run_remote(task, execution_id, data, node_id, timeout_s), node_id
            except PeerUnreachableError:
                exclude = exclude | {node_id}
            finally:
                self.placer.release(ticket)
        raise UnavailableError("no reachable node could take the invocation; retry later")

    async def run_here(
        self, task: TaskRecord, execution_id: ExecutionId, data: bytes, timeout_s: float | None
    ) -> RunOutcome:
        """Run a sync invocation placed on this node, on its Spearlet (no message at all).

        Raises:
            SaturatedError, UnavailableError: it did not start.
        """
        return await self._spearlet.execute(task, execution_id, data, timeout_s=timeout_s)

    def sync_dispatch(
        self,
        task: TaskRecord,
        execution_id: str,
        node_id: str,
        timeout_s: float | None,
        data: bytes = b"",
    ) -> Dispatch:
        """The dispatch of a sync invocation to `node_id`: the task's timeout, shortened by
        the caller's `timeout_s`. A follower that received the invocation gets it without
        its input (`data`), adds the input and sends it itself."""
        budget = self._spearlet.function_spec(task).timeout_s
        if timeout_s is not None:
            budget = min(budget, timeout_s)
        return self._dispatch(node_id, task, execution_id, 1, data, "sync", budget, None)

    async def _run_remote(
        self,
        task: TaskRecord,
        execution_id: ExecutionId,
        data: bytes,
        node_id: str,
        timeout_s: float | None,
    ) -> RunOutcome:
        message = self.sync_dispatch(task, execution_id, node_id, timeout_s, data)
        budget = message.timeout_ms / 1000
        try:
            reply = await self._request(node_id, message, budget + REPLY_GRACE_S)
        except PeerUnreachableError:
            raise
        except (LinkClosedError, RequestTimeoutError, RemoteError) as exc:
            return lost_outcome(node_id, exc)
        except BaseException:
            self.cancel(node_id, execution_id)
            raise
        if isinstance(reply, ExecutionResult):
            return outcome_of(reply)
        if isinstance(reply, DispatchRefused):
            raise refusal_error(node_id, reply)
        return lost_outcome(node_id, SpearError(f"unexpected reply {type(reply).__name__}"))

    # --- async -------------------------------------------------------------------------------

    async def start_async(
        self,
        task: TaskRecord,
        execution_id: ExecutionId,
        attempt: int,
        data: bytes,
        *,
        node_id: str,
        ticket: Ticket | None,
        timeout_s: float,
    ) -> Started:
        """Send attempt `attempt` of an async execution to `node_id` (placed by the caller).

        Raises:
            DispatchRefusedError: it certainly did not start (the caller releases the ticket).
        """
        message = self._dispatch(
            node_id, task, execution_id, attempt, data, "async", timeout_s, None
        )
        try:
            if node_id == self.node_id:
                reply: object = await self._functions.handle(message)
            else:
                reply = await self._request(node_id, message, ACCEPT_TIMEOUT_S)
        except PeerUnreachableError as exc:
            raise DispatchRefusedError(node_id, "unreachable", str(exc)) from exc
        except (LinkClosedError, RequestTimeoutError, RemoteError) as exc:
            log.info("async dispatch of %s to %s is in doubt: %s", execution_id, node_id, exc)
            return Started(node_id=node_id, attempt=attempt, ticket=ticket, outcome="ambiguous")
        if isinstance(reply, DispatchAccepted):
            return Started(node_id=node_id, attempt=attempt, ticket=ticket, outcome="accepted")
        if isinstance(reply, DispatchRefused):
            raise refusal_error(node_id, reply)
        raise DispatchRefusedError(node_id, "refused", f"unexpected reply {type(reply).__name__}")

    async def probe(self, node_id: str, attempts: list[tuple[str, int]]) -> list[bool] | None:
        """Which of these attempts the node still holds; None if it did not answer."""
        message = DispatchProbe(
            term=self._term(),
            leader_id=self.node_id,
            execution_ids=tuple(e for e, _ in attempts),
            attempts=tuple(a for _, a in attempts),
        )
        if node_id == self.node_id:
            reply: object = self._functions.probe(message)
        else:
            try:
                reply = await self._request(node_id, message, PROBE_TIMEOUT_S)
            except SpearError as exc:
                log.info("probe of %s unanswered: %s", node_id, exc)
                return None
        if not isinstance(reply, ProbeAnswer) or len(reply.held) != len(attempts):
            return None
        return list(reply.held)

    def cancel(self, node_id: str, execution_id: str) -> None:
        """Ask a node to stop an execution (one-way; its result says how it ended)."""
        message = DispatchCancel(
            term=self._term(), leader_id=self.node_id, execution_id=execution_id
        )
        if node_id == self.node_id:
            self._functions.cancel(message)
            return
        try:
            self._send(node_id, message)
        except SpearError as exc:
            log.info("cancel of %s could not be sent to %s: %s", execution_id, node_id, exc)


def refusal_error(node_id: str, reply: DispatchRefused) -> SpearError:
    """The error a Spearlet's refusal of a dispatch means to the invocation's caller."""
    if reply.code == SaturatedError.code:
        return SaturatedError(
            f"node {node_id} is at capacity: {reply.message}",
            retry_after_s=max(reply.retry_after_s, 1.0),
        )
    return DispatchRefusedError(
        node_id, reply.code, reply.message, retry_after_s=max(reply.retry_after_s, 1.0)
    )


def lost_outcome(node_id: str, exc: Exception) -> RunOutcome:
    """How an invocation ends whose node was lost while it ran it (a sync one is never run
    again)."""
    return RunOutcome(
        status=ExecStatus.FAILED,
        error_code=ErrorCode.NODE_LOST,
        error_message=f"node {node_id} was lost while it ran the execution ({exc})",
    )
