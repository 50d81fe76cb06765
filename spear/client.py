"""A small synchronous client for spear's HTTP API v1 (DESIGN.md section 6), over httpx.

Every method is one endpoint. Error answers (`{"error": CODE, "message": ...}`) become spear's
own exceptions (NotFoundError, ConflictError, ValidationError, UnavailableError...), and httpx's
transport errors become ServerUnreachableError, so a caller catches SpearError and nothing else.
A function that fails is not an exception: `invoke` returns an Invocation whose status says so.
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import quote

import httpx

from spear.errors import (
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    SaturatedError,
    SpearError,
    UnavailableError,
    ValidationError,
    rebuild,
)

API = "/api/v1"
#: a sync invocation runs at most the server's runtimes.max_timeout_ms (default 900 s); the
#: client waits that long (or a shorter `timeout_ms`) plus its own timeout before giving up.
#: A larger `timeout_ms` is still sent: the server caps it or refuses it with a 422.
MAX_FUNCTION_TIMEOUT_MS = 900_000
#: the longest long poll of `GET /executions/{id}?wait_ms=` the API accepts
MAX_WAIT_MS = 60_000

#: a JSON object as the server sent it (narrowed to a dict, fields not checked)
Doc = dict[str, Any]


class ApiError(SpearError):
    """The server answered an error that has no narrower type here (a 500, an unknown code)."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ServerUnreachableError(UnavailableError):
    """The server could not be reached or did not answer in time (nothing was received)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Invocation:
    """The outcome of a sync invocation: the function's output, or its failure record."""

    execution_id: str
    status: str
    output: bytes
    node_id: str | None
    cold: bool | None
    duration_ms: float | None
    #: the execution record, present when the function did not succeed (502/504 body)
    record: Doc | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


def _by_code(*kinds: type[SpearError]) -> dict[str, type[SpearError]]:
    return {kind.code: kind for kind in kinds}


_ERROR_BY_CODE = _by_code(
    ValidationError,
    PayloadTooLargeError,
    NotFoundError,
    ConflictError,
    SaturatedError,
    UnavailableError,
)
_ERROR_BY_STATUS: dict[int, type[SpearError]] = {
    400: ValidationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: ValidationError,
    429: SaturatedError,
    503: UnavailableError,
}


class SpearClient:
    """A synchronous client for one spear gateway; use it as a context manager or `close()` it.

    Args:
        base_url: the gateway, e.g. "http://127.0.0.1:8080".
        timeout_s: connect/read/write timeout of each request (sync invocations wait longer:
            the function's deadline plus this).
        transport: an httpx transport to use instead of the network (tests).
        retry_s: how long to keep retrying a request the cluster answered with 503 because
            no leader was serving it yet (an election or a failover): the request never
            reached a leader, so sending it again is safe. 0 = never retry.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        retry_s: float = 15.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout_s,
            transport=transport,
            headers={"Accept": "application/json", "User-Agent": "spear-cli"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- node and cluster -----------------------------------------------------------------

    def health(self) -> Doc:
        return self._json("GET", "/health")

    def cluster(self) -> Doc:
        return self._json("GET", f"{API}/cluster")

    def list_nodes(self) -> list[Doc]:
        """Every member with its status, draining flag and last resource report."""
        return _items(self._json("GET", f"{API}/nodes"), "nodes")

    def get_node(self, node: str) -> Doc:
        """One node, by id or name."""
        return self._json("GET", f"{API}/nodes/{_seg(node)}")

    def resources(self) -> Doc:
        """Each node's resources and pool capacity, and the cluster's totals."""
        return self._json("GET", f"{API}/resources")

    def drain_node(self, node: str, *, enable: bool = True) -> Doc:
        """Drain a node (no new work for it; its running work finishes), or undo it."""
        return self._json("POST", f"{API}/nodes/{_seg(node)}/drain", json={"enable": enable})

    # --- files ----------------------------------------------------------------------------

    def upload_file(self, data: bytes | IO[bytes], *, name: str | None = None) -> Doc:
        """Upload an artifact (bytes, or a binary file streamed); equal bytes get equal ids."""
        params = {"name": name} if name else None
        return self._json(
            "POST",
            f"{API}/files",
            content=data,
            params=params,
            headers={"Content-Type": "application/octet-stream"},
        )

    def list_files(self) -> list[Doc]:
        return _items(self._json("GET", f"{API}/files"), "files")

    def get_file(self, file_id: str) -> Doc:
        return self._json("GET", f"{API}/files/{_seg(file_id)}")

    def file_content(self, file_id: str) -> bytes:
        return self._request("GET", f"{API}/files/{_seg(file_id)}/content").content

    # --- tasks ----------------------------------------------------------------------------

    def register_task(self, spec: Mapping[str, Any]) -> Doc:
        return self._json("POST", f"{API}/tasks", json=dict(spec))

    def list_tasks(self) -> list[Doc]:
        return _items(self._json("GET", f"{API}/tasks"), "tasks")

    def get_task(self, task: str) -> Doc:
        return self._json("GET", f"{API}/tasks/{_seg(task)}")

    def delete_task(self, task: str) -> Doc:
        return self._json("DELETE", f"{API}/tasks/{_seg(task)}")

    # --- invocations ----------------------------------------------------------------------

    def invoke(
        self,
        task: str,
        data: bytes = b"",
        *,
        timeout_ms: int | None = None,
        idempotency_key: str | None = None,
    ) -> Invocation:
        """Invoke a task and wait for its outcome (a failed function is not an exception)."""
        wait_ms = MAX_FUNCTION_TIMEOUT_MS if timeout_ms is None else timeout_ms
        response = self._request(
            "POST",
            f"{API}/tasks/{_seg(task)}/invoke",
            content=data,
            params=_params(timeout_ms=timeout_ms),
            headers=_invoke_headers(idempotency_key),
            timeout=self._waiting(wait_ms, cap_ms=MAX_FUNCTION_TIMEOUT_MS),
            ok=(200, 502, 504),
        )
        headers = response.headers
        record: Doc | None = None
        if response.status_code != 200:
            record = _object(response)
            if "execution_id" not in record:  # a gateway error, not a function's record
                raise _error_from(response, self.base_url)
        duration = headers.get("x-spear-duration-ms")
        cold = headers.get("x-spear-cold-start")
        return Invocation(
            execution_id=headers.get("x-spear-execution-id", "")
            or str((record or {}).get("execution_id", "")),
            status=headers.get("x-spear-status", "") or str((record or {}).get("status", "")),
            output=response.content if record is None else b"",
            node_id=headers.get("x-spear-node") or None,
            cold=None if cold is None else cold == "true",
            duration_ms=float(duration) if duration else None,
            record=record,
        )

    def invoke_async(
        self, task: str, data: bytes = b"", *, idempotency_key: str | None = None
    ) -> str:
        """Submit an async invocation; return its execution id once the server accepted it."""
        doc = self._json(
            "POST",
            f"{API}/tasks/{_seg(task)}/invoke",
            content=data,
            params={"mode": "async"},
            headers=_invoke_headers(idempotency_key),
        )
        return str(doc["execution_id"])

    # --- executions -----------------------------------------------------------------------

    def list_executions(
        self,
        *,
        task: str | None = None,
        status: str | None = None,
        limit: int | None = None,
        dead_letter: bool = False,
    ) -> list[Doc]:
        """Execution records, newest first; `dead_letter`: the dead-letter list instead."""
        params = _params(
            task=task, status=status, limit=limit, dead_letter="true" if dead_letter else None
        )
        return _items(self._json("GET", f"{API}/executions", params=params), "executions")

    def get_execution(self, execution_id: str, *, wait_ms: int | None = None) -> Doc:
        """The execution record; with `wait_ms`, the server holds the answer until the
        execution ends or that long has passed (a long poll, at most MAX_WAIT_MS; the server
        refuses more with a ValidationError naming `wait_ms`)."""
        return self._json(
            "GET",
            f"{API}/executions/{_seg(execution_id)}",
            params=_params(wait_ms=wait_ms),
            timeout=self._waiting(wait_ms or 0, cap_ms=MAX_WAIT_MS),
        )

    def execution_output(self, execution_id: str) -> bytes:
        return self._request("GET", f"{API}/executions/{_seg(execution_id)}/output").content

    def execution_logs(self, execution_id: str) -> bytes:
        return self._request("GET", f"{API}/executions/{_seg(execution_id)}/logs").content

    def cancel_execution(self, execution_id: str) -> Doc:
        return self._json("POST", f"{API}/executions/{_seg(execution_id)}/cancel")

    def redrive_execution(self, execution_id: str) -> Doc:
        """Run a dead-lettered async execution again, with a fresh budget of attempts."""
        return self._json("POST", f"{API}/executions/{_seg(execution_id)}/redrive")

    # --- plumbing -------------------------------------------------------------------------

    def _waiting(self, wait_ms: int, *, cap_ms: int) -> httpx.Timeout:
        """Timeouts for a request the server may hold for `wait_ms` before answering.

        The wait is capped at `cap_ms`, the most the server holds a request: a user's value
        can be any integer, and a socket timeout of 10**20 ms overflows the OS's time type.
        """
        wait_s = max(0, min(wait_ms, cap_ms)) / 1000
        return httpx.Timeout(self.timeout_s, read=wait_s + self.timeout_s)

    def _json(self, method: str, path: str, **kwargs: Any) -> Doc:
        return _object(self._request(method, path, **kwargs))

    def _request(
        self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201, 202), **kwargs: Any
    ) -> httpx.Response:
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise _unreachable(self.base_url, exc) from exc
            if response.status_code in ok:
                return response
            error = _error_from(response, self.base_url)
            remaining_s = deadline - time.monotonic()
            if error.code not in _NO_LEADER_YET or remaining_s <= 0:
                raise error
            time.sleep(min(_retry_after(response), remaining_s))


def _seg(value: str) -> str:
    """One URL path segment: a name or id typed by a user must not change the route."""
    return quote(value, safe="")


def _params(**values: str | int | None) -> dict[str, str | int] | None:
    params = {key: value for key, value in values.items() if value is not None}
    return params or None


def _invoke_headers(idempotency_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/octet-stream"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return headers


def _object(response: httpx.Response) -> Doc:
    try:
        doc = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(
            f"{response.request.url} answered {response.status_code} with a body that is not JSON",
            status=response.status_code,
            code="bad_response",
        ) from exc
    if not isinstance(doc, dict):
        raise ApiError(
            f"{response.request.url} answered {response.status_code} with JSON that is not an "
            "object",
            status=response.status_code,
            code="bad_response",
        )
    return doc


def _items(doc: Doc, key: str) -> list[Doc]:
    items = doc.get(key)
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ApiError(
            f"the server's answer has no list of objects under {key!r}",
            status=200,
            code="bad_response",
        )
    return items


def _error_from(response: httpx.Response, base_url: str) -> SpearError:
    """The spear exception for an error answer, keeping the server's code and field."""
    status = response.status_code
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not (isinstance(body, dict) and isinstance(body.get("message"), str)):
        phrase = response.reason_phrase or "error"
        return ApiError(
            f"spear at {base_url} answered {status} {phrase}", status=status, code="http_error"
        )
    code = str(body.get("error", "http_error"))
    message: str = body["message"]
    kind = _ERROR_BY_CODE.get(code) or _ERROR_BY_STATUS.get(status)
    if kind is None:
        return ApiError(message, status=status, code=code)
    field = body.get("field")
    field = field if isinstance(field, str) else None
    exc = rebuild(kind, message, field=field, retry_after_s=_retry_after(response))
    exc.code = code
    return exc


#: 503s that mean the request reached no leader (retrying it cannot apply it twice)
_NO_LEADER_YET = frozenset({"unavailable", "not_leader"})


def _retry_after(response: httpx.Response) -> float:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else 1.0


def _unreachable(base_url: str, exc: httpx.TransportError) -> ServerUnreachableError:
    if isinstance(exc, httpx.TimeoutException):
        phase = "connect to" if isinstance(exc, httpx.ConnectTimeout) else "get an answer from"
        return ServerUnreachableError(f"timed out trying to {phase} spear at {base_url}")
    if isinstance(exc, httpx.ConnectError):
        return ServerUnreachableError(
            f"cannot reach spear at {base_url}: {_reason(exc)}; is `spear node` running? "
            "(--server URL)"
        )
    if isinstance(exc, httpx.UnsupportedProtocol):
        return ServerUnreachableError(
            f"cannot reach spear at {base_url}: the URL must start with http:// or https://"
        )
    return ServerUnreachableError(f"the connection to spear at {base_url} failed: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    """The OS-level reason behind an httpx error, e.g. "connection refused"."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno is not None:
            if cause.errno == errno.ECONNREFUSED:
                return "connection refused"
            if cause.strerror:
                return cause.strerror.lower()
        cause = cause.__cause__ or cause.__context__
    text = str(exc).strip()
    if "Connection refused" in text:
        return "connection refused"
    return text.lower() or type(exc).__name__
