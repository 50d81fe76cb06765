"""The data plane of the gateway: `POST /api/v1/tasks/{task}/invoke` as plain ASGI.

Invocations are the hot path, so they skip the web framework (its routing, dependency
injection and middleware cost about as much as a whole WASM run). Everything else goes to the
FastAPI control-plane app. The error shapes are the same on both: `error_answer` is shared.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import types
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    MutableMapping,
)
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

import cbor2
import trio

from spear.config import GatewayConfig
from spear.errors import (
    ArtifactError,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    SaturatedError,
    SpearError,
    UnavailableError,
    ValidationError,
)
from spear.model import ExecStatus, ExecutionRecord
from spear.roles.sms import TaskService

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

INVOKE_PATH = re.compile(r"^/api/v1/tasks/([^/]+)/invoke$")
MAX_IDEMPOTENCY_KEY = 256
_STATUS_BY_ERROR: list[tuple[type[SpearError], int]] = [
    (PayloadTooLargeError, 413),
    (ValidationError, 422),
    (ArtifactError, 422),
    (NotFoundError, 404),
    (ConflictError, 409),
    (SaturatedError, 429),  # before its base class UnavailableError
    (UnavailableError, 503),
]
STATUS_BY_OUTCOME = {
    ExecStatus.SUCCEEDED: 200,
    ExecStatus.FAILED: 502,
    ExecStatus.TIMEOUT: 504,
    ExecStatus.CANCELLED: 409,
}


def error_answer(exc: SpearError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The status, JSON body and headers that answer a SpearError."""
    body: dict[str, Any] = {"error": exc.code, "message": str(exc)}
    field = getattr(exc, "field", None)
    if field is not None:
        body["field"] = field
    headers: dict[str, str] = {}
    if isinstance(exc, UnavailableError):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    for kind, status in _STATUS_BY_ERROR:
        if isinstance(exc, kind):
            return status, body, headers
    return 500, body, headers


async def read_limited(
    chunks: AsyncIterator[bytes], declared: str | None, limit: int, setting: str
) -> bytes:
    """A request body, refused with PayloadTooLargeError once it exceeds `limit` bytes."""
    if declared is not None:
        if not declared.isdigit():
            raise ValidationError(f"content-length must be a number, got {declared!r}")
        if int(declared) > limit:
            raise PayloadTooLargeError(
                f"body of {declared} bytes exceeds the limit of {limit} bytes ({setting})"
            )
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"body exceeds the limit of {limit} bytes ({setting})")
        parts.append(chunk)
    return b"".join(parts)


def execution_headers(record: ExecutionRecord) -> dict[str, str]:
    duration = 0.0
    if record.finished_at is not None and record.started_at is not None:
        duration = (record.finished_at - record.started_at) * 1000
    return {
        "X-Spear-Execution-Id": record.execution_id,
        "X-Spear-Status": record.status.value,
        "X-Spear-Node": record.node_id or "",
        "X-Spear-Cold-Start": "true" if record.cold else "false",
        "X-Spear-Duration-Ms": f"{duration:.3f}",
    }


class InvokeRequest:
    """The parts of an invoke request the service needs, checked."""

    def __init__(self, scope: Scope, task: str) -> None:
        self.task = task
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.headers = headers
        self.mode = "sync"
        self.timeout_ms: int | None = None
        for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
            if name == "mode":
                if value not in ("sync", "async"):
                    raise ValidationError(
                        f"mode must be 'sync' or 'async', got {value!r}", field="mode"
                    )
                self.mode = value
            elif name == "timeout_ms":
                if not value.isdigit() or int(value) < 1:
                    raise ValidationError(
                        f"timeout_ms must be a whole number >= 1, got {value!r}",
                        field="timeout_ms",
                    )
                self.timeout_ms = int(value)
        key = headers.get("idempotency-key")
        if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
            raise ValidationError(
                f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters, got {len(key)}",
                field="Idempotency-Key",
            )
        self.idempotency_key = key

    @property
    def wants_cbor(self) -> bool:
        return "application/cbor" in self.headers.get("accept", "")


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive (none after a disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        yield message.get("body", b"")
        if not message.get("more_body"):
            return


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer, framework-free."""

    status: int
    body: bytes
    media_type: str
    headers: dict[str, str]

    @classmethod
    def doc(cls, status: int, doc: Any, headers: dict[str, str], *, cbor: bool = False) -> Answer:
        if cbor:
            return cls(status, cbor2.dumps(doc), "application/cbor", headers)
        body = json.dumps(doc, separators=(",", ":")).encode()
        return cls(status, body, "application/json", headers)

    async def send(self, send: Send) -> None:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        raw.append((b"content-type", self.media_type.encode()))
        raw.append((b"content-length", str(len(self.body)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": raw})
        await send({"type": "http.response.body", "body": self.body})


async def answer_invoke(service: TaskService, request: InvokeRequest, data: bytes) -> Answer:
    """Run (sync) or accept (async) one invocation and shape its answer."""
    if request.mode == "async":
        record, _ = await service.invoke_async(
            request.task, data, idempotency_key=request.idempotency_key
        )
        doc = {"execution_id": record.execution_id, "status": record.status.value}
        location = {"Location": f"/api/v1/executions/{record.execution_id}"}
        return Answer.doc(202, doc, location, cbor=request.wants_cbor)
    record, output = await service.invoke_sync(
        request.task,
        data,
        timeout_ms=request.timeout_ms,
        idempotency_key=request.idempotency_key,
    )
    return sync_answer(request, record, output)


def sync_answer(request: InvokeRequest, record: ExecutionRecord, output: bytes) -> Answer:
    """The answer to a sync invocation that ran: its output, or its record on failure."""
    headers = execution_headers(record)
    if record.status is ExecStatus.SUCCEEDED:
        return Answer(200, output, "application/octet-stream", headers)
    status = STATUS_BY_OUTCOME.get(record.status, 502)
    return Answer.doc(status, record.to_doc(), headers, cbor=request.wants_cbor)


def error_doc_answer(exc: SpearError, what: str) -> Answer:
    status, body, headers = error_answer(exc)
    if status == 500:
        log.error("%s failed: %s", what, exc)
    return Answer.doc(status, body, headers)


async def unless_disconnected(
    receive: Receive, call: Coroutine[Any, Any, Answer], watchers: trio.Nursery | None = None
) -> Answer | None:
    """Await `call`, cancelling it if the client disconnects first (then None): a sync
    invocation nobody waits for is stopped, on whichever node runs it.

    Most invocations never suspend (an inline WASM run has no checkpoint on its whole path),
    and while a call does not suspend nothing can be watched anyway. A task watching
    `receive` costs about a tenth of such a request (its spawn and its cancellation take
    three scheduler passes), so `call` is first stepped by hand: if it finishes at its first
    step, that is its answer. Only once it suspends is a watcher started, in `watchers` (a
    nursery that outlives requests: a per-request one would itself cost a scheduler pass),
    and `call` goes on from where it stopped, in this task and under this cancel scope.
    With no `watchers`, a nursery of this call's own holds the watcher.
    """
    if watchers is None:
        answer: Answer | None = None
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            try:
                answer = await unless_disconnected(receive, call, nursery)
            except Exception as exc:  # raised below, as itself (not in an exception group)
                failure = exc
        if failure is not None:
            raise failure
        return answer
    with trio.CancelScope() as scope:
        try:
            trap = call.send(None)
        except StopIteration as done:
            finished: Answer = done.value
            return finished
        stop_watching = trio.CancelScope()
        with contextlib.suppress(RuntimeError):  # the nursery is closed: the node stops
            watchers.start_soon(_watch_disconnect, receive, scope, stop_watching)
        try:
            return await _resume(call, trap)
        finally:
            stop_watching.cancel()
    return None  # cancelled by the watcher: the client disconnected


async def _watch_disconnect(
    receive: Receive, call: trio.CancelScope, stop_watching: trio.CancelScope
) -> None:
    with stop_watching:
        while (await receive())["type"] != "http.disconnect":
            pass
        call.cancel()


@types.coroutine
def _resume(call: Coroutine[Any, Any, Answer], trap: Any) -> Generator[Any, Any, Answer]:
    """Go on awaiting `call`, suspended at `trap`: the event loop's answer to each trap goes
    to `call`, as a plain `await call` would have passed it."""
    while True:
        try:
            sent = yield trap
        except BaseException as exc:  # thrown in by the event loop: `call` handles it
            step = partial(call.throw, exc)
        else:
            step = partial(call.send, sent)
        try:
            trap = step()
        except StopIteration as done:
            answer: Answer = done.value
            return answer


class Gateway:
    """The gateway's ASGI app: invocations here, everything else to the control-plane app."""

    def __init__(
        self,
        service: TaskService,
        control: ASGIApp,
        config: GatewayConfig,
        watchers: trio.Nursery,
    ) -> None:
        self._service = service
        self._control = control
        self._config = config
        self._watchers = watchers

    @property
    def control(self) -> ASGIApp:
        """The control-plane app every request but an invocation goes to."""
        return self._control

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INVOKE_PATH.match(scope["path"])
            if match is not None:
                await self._invoke(scope, receive, send, match.group(1))
                return
        await self._control(scope, receive, send)

    async def _invoke(self, scope: Scope, receive: Receive, send: Send, task: str) -> None:
        try:
            request = InvokeRequest(scope, task)
            data = await read_limited(
                body_chunks(receive),
                request.headers.get("content-length"),
                self._config.max_invoke_body_bytes,
                "gateway.max_invoke_body_bytes",
            )
            if request.mode == "sync":
                answer = await unless_disconnected(
                    receive, answer_invoke(self._service, request, data), self._watchers
                )
                if answer is None:
                    log.info("invocation of %s cancelled: its client disconnected", task)
                    return
            else:
                answer = await answer_invoke(self._service, request, data)
        except SpearError as exc:
            answer = error_doc_answer(exc, f"invocation of {task}")
        except Exception:
            log.exception("invocation of %s failed unexpectedly", task)
            body = {"error": "internal", "message": "the server failed unexpectedly; see its log"}
            answer = Answer.doc(500, body, {})
        await answer.send(send)
