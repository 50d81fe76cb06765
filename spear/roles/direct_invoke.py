"""Sync invocations a follower received, run without passing through the leader: the
follower's side.

`DirectInvoke` answers `POST /api/v1/tasks/{task}/invoke` (sync) on a follower in place of
the relay to the leader's gateway (spear.roles.forwarding). It asks the leader over the mesh
to place the invocation (`SyncPlace`), sends the leader's `Dispatch` with the input straight
to the chosen node, or runs it on its own Spearlet when that is this node (then no data moves
at all), reports the outcome to the leader (`SyncOutcome`: the record, output and logs are
kept there as for every sync invocation) and answers with the status, headers and body the
leader's gateway gives. Placed on the leader itself, the invocation is run there with one
request (`SyncRun`, or with the placement request itself for a small input) and the leader
keeps the output it makes: no output is sent back to it.

The rules of docs/dispatch.md hold: a node that cannot be reached is left out and the
invocation placed again; one lost while it ran fails it (`node_lost`, never run twice); a
client that hangs up stops it on its node. The chosen Spearlet's `Fence` judges the leader's
`(term, leader_id)` in the dispatch, whoever carries it, so a deposed leader's placement
does not run. No leader known, or none answering: 503 with `Retry-After`.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl

import trio

from spear import wire
from spear.errors import (
    ArtifactError,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    SaturatedError,
    SpearError,
    UnavailableError,
    ValidationError,
    rebuild,
)
from spear.mesh import LinkClosedError, PeerUnreachableError, RemoteError, RequestTimeoutError
from spear.model import ErrorCode, ExecStatus, ExecutionRecord, NodeId, RunOutcome
from spear.roles.dispatch import (
    Dispatch,
    DispatchCancel,
    DispatchRefused,
    ExecutionResult,
    SyncOutcome,
    SyncPlace,
    SyncPlaced,
    SyncRecorded,
    SyncRun,
    SyncWithdraw,
)
from spear.roles.dispatcher import REPLY_GRACE_S, lost_outcome, refusal_error
from spear.roles.function_service import FunctionService, result_of
from spear.roles.invoke_path import (
    INVOKE_PATH,
    Answer,
    InvokeRequest,
    Receive,
    Scope,
    Send,
    body_chunks,
    error_doc_answer,
    read_limited,
    sync_answer,
    unless_disconnected,
)

log = logging.getLogger(__name__)

#: placements of one invocation at most (each leaves out the nodes that could not be reached)
MAX_PLACEMENTS = 3
#: inputs up to this size travel with the placement request: placed on the leader, they run
#: there at once (one round trip, not three); larger ones never touch the leader
INLINE_INPUT_BYTES = 64 * 1024
#: how long the leader may take to record an outcome
REPORT_TIMEOUT_S = 5.0
#: how long a follower whose client hung up tries to tell the leader
CANCEL_REPORT_S = 1.0

Request = Callable[[str, object, float], Awaitable[Any]]
SendOneWay = Callable[[str, object], None]
#: what a request that was sent but not answered raises (it may have run); any other error
#: means it was not sent (as in Dispatcher._run_remote)
_AMBIGUOUS = (LinkClosedError, RequestTimeoutError, RemoteError)
_ERRORS: dict[str, type[SpearError]] = {
    cls.code: cls
    for cls in (
        ValidationError,
        PayloadTooLargeError,
        NotFoundError,
        ConflictError,
        ArtifactError,
        SaturatedError,
    )
}


class DirectInvoke:
    """A follower's sync invocations, placed by the leader and run without it."""

    def __init__(
        self,
        *,
        functions: FunctionService,
        request: Request,
        send: SendOneWay,
        leader_id: Callable[[], str | None],
        speaks_direct: Callable[[str], bool],
        term: Callable[[], int],
        max_body_bytes: int,
        place_timeout_s: float,
        retry_after_s: float = 1.0,
    ) -> None:
        """
        Args:
            functions: this node's FunctionService (runs what is placed on this node).
            request, send: a request and a one-way message to a node by id (the mesh).
            leader_id: the leader this node knows for the current term, if any.
            speaks_direct: whether a node takes the direct path's messages (it lists
                SYNC_DIRECT in its gossiped features; a node of an older version does not,
                and requests to it are relayed instead).
            term: this node's Raft term (a placement on this node from an older term is a
                deposed leader's and is refused).
            max_body_bytes: the largest input taken (gateway.max_invoke_body_bytes).
            place_timeout_s: how long the leader may take to place (a repeated
                idempotency key waits there for the first invocation to end).
            retry_after_s: what `Retry-After` says when no leader can be asked.
        """
        self.node_id = functions.node_id
        self._functions = functions
        self._request = request
        self._send = send
        self._leader_id = leader_id
        self._speaks_direct = speaks_direct
        self._max_body_bytes = max_body_bytes
        self._place_timeout_s = place_timeout_s
        self._retry_after_s = retry_after_s
        self._runs = 0
        self._local_runs = 0
        self._term = term
        self._leader_answers = 0

    def takes(self, scope: Scope) -> str | None:
        """The task of a sync invocation request (the ones served here), else None (those
        are relayed to the leader: all others, and all while the leader runs a version
        without the direct path)."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        leader = self._leader_id()
        if leader is not None and not self._speaks_direct(leader):
            return None
        match = INVOKE_PATH.match(scope["path"])
        if match is None:
            return None
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
        if any(name == "mode" and value == "async" for name, value in query):
            return None  # committed by the leader before its 202: relayed there
        return match.group(1)

    async def serve(self, scope: Scope, receive: Receive, send: Send, task: str) -> None:
        """Answer one sync invocation request (see `takes`)."""
        try:
            request = InvokeRequest(scope, task)
            data = await read_limited(
                body_chunks(receive),
                request.headers.get("content-length"),
                self._max_body_bytes,
                "gateway.max_invoke_body_bytes",
            )
            answer = await unless_disconnected(receive, self.invoke(request, data))
            if answer is None:
                log.info("invocation of %s cancelled: its client disconnected", task)
                return
        except SpearError as exc:
            answer = error_doc_answer(exc, f"invocation of {task}")
        except Exception:
            log.exception("invocation of %s failed unexpectedly", task)
            body = {"error": "internal", "message": "the server failed unexpectedly; see its log"}
            answer = Answer.doc(500, body, {})
        await answer.send(send)

    async def invoke(self, request: InvokeRequest, data: bytes) -> Answer:
        """Have the invocation placed, run it there, report it; its answer.

        Raises:
            SaturatedError, UnavailableError, NotFoundError, ValidationError: it did not run.
        """
        inline = len(data) <= INLINE_INPUT_BYTES
        place = SyncPlace(
            task=request.task,
            input_bytes=len(data),
            timeout_ms=request.timeout_ms or 0,
            idempotency_key=request.idempotency_key or "",
            inline=inline,
            data=data if inline else b"",
            placement_id=secrets.token_hex(8),
        )
        placed: SyncPlaced | None = None  # the last placement, to report on if none took
        for _ in range(MAX_PLACEMENTS):
            # Shielded unless it may run on the leader (which stops it when this request is
            # given up): once placed elsewhere, a run is reported, even one whose client hangs
            # up meanwhile (it is abandoned at the checkpoint below).
            with trio.CancelScope(shield=not place.inline):
                reply = await self._ask_leader(place)
            if isinstance(reply, SyncRecorded):  # it ran on the leader, or ran before
                self._leader_answers += 1
                return sync_answer(request, _record(reply.record), reply.output)
            if isinstance(reply, DispatchRefused):
                raise _placement_error(reply)
            if not isinstance(reply, SyncPlaced):
                raise UnavailableError(f"the leader answered {type(reply).__name__}; retry")
            placed, placed_at = reply, trio.current_time()
            if reply.node_id == reply.dispatch.leader_id:
                answer = await self._run_on_leader(request, reply, data, placed_at)
                if answer is not None:
                    return answer
                place = _without(place, reply)
                continue
            try:
                await trio.lowlevel.checkpoint()
                result = await self._run(reply, data)
            except PeerUnreachableError:
                place = _without(place, reply)
                continue
            except SpearError as exc:  # not sent: it did not run
                await self._report(reply, None, placed_at)
                raise _not_sent(reply.node_id, exc) from exc
            except Exception as exc:  # a failure of this node's own: the run's fate unknown
                with trio.CancelScope(shield=True):
                    await self._report(reply, _lost(reply.dispatch, reply.node_id, exc), placed_at)
                raise
            except BaseException:  # the client hung up, or this node stops
                with trio.CancelScope(shield=True):
                    await self._abandon(reply)
                raise
            if isinstance(result, DispatchRefused):
                await self._report(reply, None, placed_at)
                raise refusal_error(reply.node_id, result)
            record = await self._report(reply, result, placed_at)
            return sync_answer(request, record, result.output)
        if placed is not None:  # to the leader that placed it (it holds the record)
            await self._report_to(placed.dispatch.leader_id, place.execution_id, None)
        raise UnavailableError("no reachable node could take the invocation; retry later")

    async def _ask_leader(self, place: SyncPlace) -> object:
        leader = self._leader_id()
        if leader is None:
            raise UnavailableError(
                "no leader is known yet; retry shortly", retry_after_s=self._retry_after_s
            )
        if leader == self.node_id:
            raise UnavailableError(
                "this node is becoming the leader; retry shortly", retry_after_s=self._retry_after_s
            )
        try:
            return await self._request(leader, place, self._place_timeout_s)
        except SpearError as exc:
            log.info("the leader %s did not place an invocation: %s", leader, exc)
            self._withdraw(leader, place)
            raise UnavailableError(
                f"the leader {leader} cannot be reached; retry", retry_after_s=self._retry_after_s
            ) from exc
        except BaseException:
            # Given up (the client hung up): an answer crossing the cancel would be dropped,
            # its placement held by nobody until its deadline.
            self._withdraw(leader, place)
            raise

    def _withdraw(self, leader: str, place: SyncPlace) -> None:
        """Tell the leader no answer to `place` will be used (one-way, never blocks)."""
        try:
            self._send(leader, SyncWithdraw(placement_id=place.placement_id))
        except SpearError as exc:
            log.info("withdrawal of a placement not sent to %s: %s", leader, exc)

    async def _run_on_leader(
        self, request: InvokeRequest, placed: SyncPlaced, data: bytes, placed_at: float
    ) -> Answer | None:
        """Have the leader run what it placed on itself (`SyncRun`: it keeps the output it
        makes); None if it cannot be reached at all (placed again without it)."""
        dispatch = placed.dispatch
        message = SyncRun(
            execution_id=dispatch.execution_id, data=data, timeout_ms=dispatch.timeout_ms
        )
        self._runs += 1
        try:
            reply = await self._request(
                placed.node_id, message, dispatch.timeout_ms / 1000 + REPLY_GRACE_S
            )
        except PeerUnreachableError:
            return None
        except _AMBIGUOUS as exc:  # the link broke, or no answer in time: it may have run
            result = _lost(dispatch, placed.node_id, exc)
            record = _finished(_record(placed.record), result, placed.node_id, placed_at)
            return sync_answer(request, record, b"")
        except SpearError as exc:  # not sent: it did not run
            await self._report(placed, None, placed_at)
            raise _not_sent(placed.node_id, exc) from exc
        if isinstance(reply, SyncRecorded):
            self._leader_answers += 1
            return sync_answer(request, _record(reply.record), reply.output)
        if isinstance(reply, DispatchRefused):
            raise _placement_error(reply)
        raise UnavailableError(f"the leader answered {type(reply).__name__}; retry")

    async def _run(self, placed: SyncPlaced, data: bytes) -> ExecutionResult | DispatchRefused:
        """Send the dispatch with its input to its node (or run it here); its answer.

        Raises:
            PeerUnreachableError: no link to the node could be made (it certainly did not run).
            SpearError: the dispatch could not be sent (it did not run).
        """
        dispatch = replace(placed.dispatch, data=data)
        node_id = placed.node_id
        self._runs += 1
        if node_id == self.node_id:
            self._local_runs += 1
            # This node's Spearlet hears of new terms from the leader's acks and dispatches,
            # later than its Raft state does: let its fence know, so that it refuses a
            # placement by a leader deposed meanwhile as any other Spearlet would.
            self._functions.fence.observe(self._term())
            answer: object = await self._functions.handle(dispatch)
        else:
            try:
                answer = await self._request(
                    node_id, dispatch, dispatch.timeout_ms / 1000 + REPLY_GRACE_S
                )
            except PeerUnreachableError:
                raise
            except _AMBIGUOUS as exc:  # the link broke, or no answer in time: it may have run
                return _lost(dispatch, node_id, exc)
        if isinstance(answer, ExecutionResult | DispatchRefused):
            return answer
        return _lost(dispatch, node_id, SpearError(f"unexpected reply {type(answer).__name__}"))

    async def _abandon(self, placed: SyncPlaced) -> None:
        """The client hung up (or this node stops): stop the run on its node, tell the leader.
        Bounded; called shielded."""
        dispatch = placed.dispatch
        if placed.node_id != self.node_id:  # here the cancellation has stopped it already
            cancel = DispatchCancel(
                term=dispatch.term, leader_id=dispatch.leader_id, execution_id=dispatch.execution_id
            )
            try:
                self._send(placed.node_id, cancel)
            except SpearError as exc:
                log.info("cancel of %s not sent: %s", dispatch.execution_id, exc)
        outcome = RunOutcome(
            status=ExecStatus.CANCELLED,
            error_code=ErrorCode.CANCELLED,
            error_message="the execution was cancelled: its client disconnected",
        )
        result = result_of(dispatch.execution_id, dispatch.attempt, placed.node_id, outcome)
        with trio.move_on_after(CANCEL_REPORT_S):
            await self._report_to(dispatch.leader_id, dispatch.execution_id, result)

    async def _report(
        self, placed: SyncPlaced, result: ExecutionResult | None, placed_at: float
    ) -> ExecutionRecord:
        """Report the outcome to the leader that placed it; the record to answer with (built
        here from the placed one if that leader no longer answers, or if it ended the record
        otherwise meanwhile: this node holds the real result, and answers with it).
        `placed_at`: trio's clock when the placement arrived here."""
        dispatch = placed.dispatch
        kept = await self._report_to(dispatch.leader_id, dispatch.execution_id, result)
        if kept is not None and (result is None or kept.status.value == result.status):
            return kept
        return _finished(_record(placed.record), result, placed.node_id, placed_at)

    async def _report_to(
        self, leader: str | None, execution_id: str, result: ExecutionResult | None
    ) -> ExecutionRecord | None:
        if leader is None:
            return None
        message = SyncOutcome(execution_id=execution_id, result=result)
        try:
            reply = await self._request(leader, message, REPORT_TIMEOUT_S)
        except SpearError as exc:
            log.info("outcome of %s not recorded by the leader %s: %s", execution_id, leader, exc)
            return None
        if isinstance(reply, SyncRecorded) and reply.record:
            return _record(reply.record)
        return None

    def statistics(self) -> dict[str, int]:
        """Invocations run without the leader (in all, and on this node itself), and those
        the leader answered at once (run there on an inline input, or run before)."""
        return {
            "runs": self._runs,
            "local_runs": self._local_runs,
            "leader_answers": self._leader_answers,
        }


def _without(place: SyncPlace, placed: SyncPlaced) -> SyncPlace:
    """The placement request again, for the same execution, leaving out the node just
    tried (the input no longer travels with it)."""
    return replace(
        place,
        execution_id=placed.dispatch.execution_id,
        exclude=(*place.exclude, placed.node_id),
        inline=False,
        data=b"",
    )


def _lost(dispatch: Dispatch, node_id: str, exc: Exception) -> ExecutionResult:
    return result_of(dispatch.execution_id, dispatch.attempt, node_id, lost_outcome(node_id, exc))


def _not_sent(node_id: str, exc: SpearError) -> UnavailableError:
    return UnavailableError(
        f"the invocation could not be sent to node {node_id} ({exc}); retry", retry_after_s=1.0
    )


def _placement_error(reply: DispatchRefused) -> SpearError:
    kind = _ERRORS.get(reply.code, UnavailableError)
    retry_after_s = max(reply.retry_after_s, 1.0)
    return rebuild(kind, reply.message, field=reply.field or None, retry_after_s=retry_after_s)


def _record(doc: bytes) -> ExecutionRecord:
    return ExecutionRecord.from_doc(wire.loads(doc))


def _finished(
    record: ExecutionRecord, result: ExecutionResult | None, node_id: str, placed_at: float
) -> ExecutionRecord:
    """The record of an ended run as the leader would keep it (when it cannot be asked).

    The leader stamped `started_at` by its clock; the end is that plus the time this node
    saw pass since the placement arrived, so a duration never mixes two machines' clocks.
    """
    elapsed_s = max(0.0, trio.current_time() - placed_at)
    finished_at = time.time() if record.started_at is None else record.started_at + elapsed_s
    if result is None:
        return replace(record, status=ExecStatus.FAILED, finished_at=finished_at)
    error = None
    if result.error_code is not None:
        error = {"code": result.error_code, "message": result.error_message or ""}
    return replace(
        record,
        status=ExecStatus(result.status),
        node_id=NodeId(node_id),
        error=error,
        finished_at=finished_at,
        timings_ms=dict(result.timings_ms),
        cold=result.cold,
        exit_code=result.exit_code,
        output_bytes=len(result.output),
    )
