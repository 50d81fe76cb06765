"""The HTTP gateway: API v1 (DESIGN.md section 6) on hypercorn's trio worker.

The only module that imports hypercorn and FastAPI; invocations take the framework-free fast
path in `invoke_path`. Routes stay thin: they parse and check the
request, call the TaskService, and shape the answer. Every error is JSON
`{"error": CODE, "message": one sentence, "field": optional}`; client mistakes get a 4xx, and an
unexpected failure is logged once and answered 500 without a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, Literal, Protocol

import cbor2
import trio
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.exceptions import HTTPException as StarletteHTTPException

from spear.config import GatewayConfig, parse_hostport
from spear.errors import ConfigError, SpearError
from spear.model import ExecStatus, TaskRecord, TaskSpec
from spear.roles.invoke_path import (
    ASGIApp,
    Gateway,
    InvokeRequest,
    answer_invoke,
    error_doc_answer,
    read_limited,
)
from spear.roles.nodes import NodeService
from spear.roles.sms import TaskService

log = logging.getLogger(__name__)

API = "/api/v1"
OCTET_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    """What the gateway says about the node serving it."""

    node_id: str
    name: str
    http_address: str
    mesh_address: str
    labels: dict[str, str] = field(default_factory=dict)
    runtimes: dict[str, Any] = field(default_factory=dict)


class ErrorDoc(BaseModel):
    error: str
    message: str
    field: str | None = None


class FileDoc(BaseModel):
    file_id: str
    size: int
    name: str
    created_at: float


class TaskDoc(TaskSpec):
    task_id: str
    created_at: float


class ExecutionDoc(BaseModel):
    execution_id: str
    task_id: str
    task_name: str
    mode: Literal["sync", "async"]
    status: ExecStatus
    node_id: str | None
    attempts: int
    error: dict[str, str] | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    timings: dict[str, float]
    cold: bool | None
    exit_code: int | None
    output_bytes: int
    idempotency_key: str | None
    retry_at: float | None = None
    dead_letter: bool = False
    history: list[dict[str, Any]] = []


class AcceptedDoc(BaseModel):
    execution_id: str
    status: ExecStatus


class DrainRequest(BaseModel):
    """The optional body of `POST /api/v1/nodes/{node_id}/drain`."""

    model_config = ConfigDict(extra="forbid")

    enable: StrictBool = True


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorDoc} for code in (400, 404, 409, 413, 422, 429, 503)
}


def _doc(
    request: Request, doc: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """Answer JSON, or CBOR when the client asks for it with `Accept: application/cbor`."""
    if "application/cbor" in request.headers.get("accept", ""):
        return Response(cbor2.dumps(doc), status, headers, media_type="application/cbor")
    return JSONResponse(doc, status, headers)


def _error(exc: SpearError, request: Request) -> Response:
    answer = error_doc_answer(exc, f"{request.method} {request.url.path}")
    return Response(answer.body, answer.status, answer.headers, media_type=answer.media_type)


def _plain_error(status: int, code: str, message: str, field: str | None = None) -> Response:
    body: dict[str, Any] = {"error": code, "message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status)


def read_body(request: Request, limit: int, setting: str) -> Awaitable[bytes]:
    return read_limited(request.stream(), request.headers.get("content-length"), limit, setting)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _describe_validation(exc: RequestValidationError) -> tuple[int, str, str | None]:
    errors = exc.errors()
    fallback = {"loc": (), "msg": "invalid request", "type": ""}
    first: dict[str, Any] = errors[0] if errors else fallback
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    where = ".".join(loc) or None
    if where is None and first.get("type") == "task_field":  # a rule of the whole body
        return 422, str(first.get("msg", "is invalid")), str(first["ctx"]["field"])
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return 400, f"request body is not valid JSON: {detail}".rstrip(": "), None
    if first.get("type") in ("model_attributes_type", "dict_type", "model_type") and not where:
        message = "the request body must be a JSON object (Content-Type: application/json)"
        return 422, message, None
    if first.get("type") == "missing":
        return 422, f"{where or 'body'} is required", where
    if first.get("type") == "extra_forbidden":
        return 422, f"{where} is not a known field", where
    rule = str(first.get("msg", "is invalid")).replace("Input should be", "must be")
    rule = rule.replace("String should", "must")
    rule = rule.replace("Value error, ", "")
    got = f", got {_short(first['input'])}" if "input" in first and where else ""
    message = f"{where} {rule[0].lower()}{rule[1:]}{got}" if where else rule
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return 422, message, where


def build_app(
    service: TaskService,
    node: NodeInfo,
    config: GatewayConfig,
    *,
    watchers: trio.Nursery,
    cluster: ClusterView,
    nodes: NodeService,
) -> Gateway:
    """The gateway's ASGI application: the invoke fast path in front of the control app.
    `watchers` runs the tasks that watch for clients hanging up (it outlives requests)."""
    control = build_control_app(service, node, config, cluster=cluster, nodes=nodes)
    return Gateway(service, control, config, watchers)


class ClusterView(Protocol):
    """What the gateway asks of the mesh role (spear.roles.cluster.ClusterHandle).

    The changes return the cluster document once committed; they raise NotFoundError for
    an unknown node and ConflictError when a rule refuses the change."""

    def status(self) -> dict[str, Any]: ...

    async def promote(self, ref: str) -> dict[str, Any]: ...

    async def demote(self, ref: str) -> dict[str, Any]: ...

    async def remove(self, ref: str) -> dict[str, Any]: ...

    async def transfer_leadership(self, ref: str) -> dict[str, Any]: ...


class LeaderTransferRequest(BaseModel):
    """The body of `POST /api/v1/cluster/leader`."""

    model_config = ConfigDict(extra="forbid")

    node_id: Annotated[str, Field(min_length=1, max_length=256)]


def build_control_app(
    service: TaskService,
    node: NodeInfo,
    config: GatewayConfig,
    *,
    cluster: ClusterView,
    nodes: NodeService,
) -> FastAPI:
    """The FastAPI app serving every route, with the OpenAPI description and /docs.

    Args:
        cluster: the mesh role, for `GET /api/v1/cluster` and the voter changes.
        nodes: the node registry, for the node routes.
    """
    app = FastAPIOffline(
        title="spear",
        version="0.1.0",
        description="spear HTTP API v1: files, tasks, invocations and executions.",
        openapi_url="/api/openapi.json",
        redoc_url=None,
    )

    @app.exception_handler(SpearError)
    async def _spear_error(request: Request, exc: SpearError) -> Response:
        return _error(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        status, message, where = _describe_validation(exc)
        return _plain_error(status, "invalid_request", message, field=where)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route for {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return _plain_error(exc.status_code, code, message)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("request %s %s failed unexpectedly", request.method, request.url.path)
        return _plain_error(500, "internal", "the server failed unexpectedly; see the node's log")

    @app.get("/health", tags=["node"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "node_id": node.node_id, "name": node.name, "role": "leader"}

    @app.get(f"{API}/cluster", tags=["cluster"])
    async def cluster_doc(request: Request) -> Response:
        return _doc(request, cluster.status())

    @app.post(f"{API}/cluster/voters/{{node_id}}", responses=ERRORS, tags=["cluster"])
    async def promote_voter(request: Request, node_id: str) -> Response:
        """Promote a learner (by id or name) to voter once it has caught up with the log.
        Answers the cluster document once the change is committed."""
        return _doc(request, await cluster.promote(node_id))

    @app.delete(f"{API}/cluster/voters/{{node_id}}", responses=ERRORS, tags=["cluster"])
    async def demote_voter(request: Request, node_id: str) -> Response:
        """Demote a voter (by id or name) to learner: it keeps the log but no longer votes.
        Refused if the voters left could not reach their quorum."""
        return _doc(request, await cluster.demote(node_id))

    @app.delete(f"{API}/cluster/members/{{node_id}}", responses=ERRORS, tags=["cluster"])
    async def remove_member(request: Request, node_id: str) -> Response:
        """Remove a failed member (dead or left in the mesh) from the Raft configuration.
        Refused for a member still alive, and if the voters left could not reach quorum."""
        return _doc(request, await cluster.remove(node_id))

    @app.post(f"{API}/cluster/leader", responses=ERRORS, tags=["cluster"])
    async def transfer_leader(request: Request, body: LeaderTransferRequest) -> Response:
        """Hand leadership to another voter; answers once this node no longer leads."""
        return _doc(request, await cluster.transfer_leadership(body.node_id))

    def with_statistics(doc: dict[str, Any]) -> dict[str, Any]:
        # The serving node adds its own figures (the registry holds only reports).
        if doc["node_id"] == node.node_id:
            doc["statistics"] = service.statistics()
            doc["runtime_details"] = node.runtimes  # versions; why a runtime is unavailable
        return doc

    @app.get(f"{API}/nodes", tags=["cluster"])
    async def list_nodes(request: Request) -> Response:
        listed = nodes.nodes(trio.current_time())["nodes"]
        return _doc(request, {"nodes": [with_statistics(doc) for doc in listed]})

    @app.get(f"{API}/nodes/{{node_id}}", responses=ERRORS, tags=["cluster"])
    async def get_node(request: Request, node_id: str) -> Response:
        """A node by id or name."""
        return _doc(request, with_statistics(nodes.node(node_id, trio.current_time())))

    @app.post(f"{API}/nodes/{{node_id}}/drain", responses=ERRORS, tags=["cluster"])
    async def drain_node(
        request: Request, node_id: str, body: DrainRequest | None = None
    ) -> Response:
        """Drain a node (by id or name): no new work is placed on it while its running work
        finishes. `{"enable": false}` undoes it. Answers the node's document once committed."""
        drained = await nodes.drain(node_id, True if body is None else body.enable)
        return _doc(request, with_statistics(nodes.node(drained, trio.current_time())))

    @app.get(f"{API}/resources", tags=["cluster"])
    async def resources(request: Request) -> Response:
        return _doc(request, nodes.resources(trio.current_time()))

    # --- files ------------------------------------------------------------------------------

    @app.post(
        f"{API}/files",
        status_code=201,
        response_model=FileDoc,
        responses=ERRORS,
        openapi_extra=OCTET_BODY,
        tags=["files"],
    )
    async def upload_file(
        request: Request, name: Annotated[str, Query(max_length=256)] = ""
    ) -> Response:
        data = await read_body(request, config.max_upload_bytes, "gateway.max_upload_bytes")
        return _doc(request, await service.upload_file(data, name=name), 201)

    @app.get(f"{API}/files", tags=["files"])
    async def list_files(request: Request) -> Response:
        return _doc(request, {"files": service.list_files()})

    @app.get(f"{API}/files/{{file_id}}", response_model=FileDoc, responses=ERRORS, tags=["files"])
    async def get_file(request: Request, file_id: str) -> Response:
        return _doc(request, service.get_file(file_id))

    @app.get(
        f"{API}/files/{{file_id}}/content",
        responses=ERRORS,
        tags=["files"],
        response_class=Response,
    )
    async def get_file_content(file_id: str) -> Response:
        return Response(await service.read_file(file_id), media_type="application/octet-stream")

    # --- tasks ------------------------------------------------------------------------------

    @app.post(
        f"{API}/tasks", status_code=201, response_model=TaskDoc, responses=ERRORS, tags=["tasks"]
    )
    async def register_task(request: Request, spec: TaskSpec) -> Response:
        return _doc(request, (await service.register_task(spec)).to_doc(), 201)

    @app.get(f"{API}/tasks", tags=["tasks"])
    async def list_tasks(request: Request) -> Response:
        return _doc(request, {"tasks": [t.to_doc() for t in service.list_tasks()]})

    @app.get(f"{API}/tasks/{{task}}", response_model=TaskDoc, responses=ERRORS, tags=["tasks"])
    async def get_task(request: Request, task: str) -> Response:
        return _doc(request, service.get_task(task).to_doc())

    @app.delete(f"{API}/tasks/{{task}}", response_model=TaskDoc, responses=ERRORS, tags=["tasks"])
    async def delete_task(request: Request, task: str) -> Response:
        record: TaskRecord = await service.delete_task(task)
        return _doc(request, record.to_doc())

    @app.post(
        f"{API}/tasks/{{task}}/invoke",
        responses={
            **ERRORS,
            200: {
                "description": "the function's output (sync)",
                "content": {"application/octet-stream": {}},
            },
            202: {"model": AcceptedDoc, "description": "accepted (mode=async)"},
            502: {"model": ExecutionDoc, "description": "the function failed"},
            504: {"model": ExecutionDoc, "description": "the function timed out"},
        },
        openapi_extra=OCTET_BODY,
        response_class=Response,
        tags=["invocations"],
    )
    async def invoke(
        request: Request,
        task: str,
        mode: Literal["sync", "async"] = "sync",
        timeout_ms: Annotated[int | None, Query(ge=1)] = None,
        idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
    ) -> Response:
        """Invoke a task: the body is its stdin (see docs/api.md).

        The gateway serves this route on its fast path (`invoke_path.Gateway`) without going
        through the framework; this handler is the same logic for the control app alone.
        """
        del mode, timeout_ms, idempotency_key  # checked by FastAPI, read again from the scope
        data = await read_body(
            request, config.max_invoke_body_bytes, "gateway.max_invoke_body_bytes"
        )
        answer = await answer_invoke(service, InvokeRequest(request.scope, task), data)
        return Response(answer.body, answer.status, answer.headers, media_type=answer.media_type)

    # --- executions -------------------------------------------------------------------------

    @app.get(f"{API}/executions", tags=["executions"])
    async def list_executions(
        request: Request,
        task: str | None = None,
        status: ExecStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        dead_letter: Annotated[
            bool, Query(description="only the dead-letter list (async attempts used up)")
        ] = False,
    ) -> Response:
        if dead_letter:
            records = service.dead_letters(limit=limit)
            if task is not None:
                task_id = service.get_task(task).task_id
                records = [r for r in records if r.task_id == task_id]
            if status is not None:
                records = [r for r in records if r.status is status]
        else:
            records = service.list_executions(
                task=task, status=status.value if status else None, limit=limit
            )
        return _doc(request, {"executions": [r.to_doc() for r in records]})

    @app.get(
        f"{API}/executions/{{execution_id}}",
        response_model=ExecutionDoc,
        responses=ERRORS,
        tags=["executions"],
    )
    async def get_execution(
        request: Request,
        execution_id: str,
        wait_ms: Annotated[
            int, Query(ge=0, le=60_000, description="long-poll: wait up to this long for the end")
        ] = 0,
    ) -> Response:
        record = await service.wait_execution(execution_id, timeout_s=wait_ms / 1000)
        return _doc(request, record.to_doc())

    @app.get(
        f"{API}/executions/{{execution_id}}/output",
        responses=ERRORS,
        response_class=Response,
        tags=["executions"],
    )
    async def get_output(execution_id: str) -> Response:
        data = await service.execution_blob(execution_id, "output")
        return Response(data, media_type="application/octet-stream")

    @app.get(
        f"{API}/executions/{{execution_id}}/logs",
        responses=ERRORS,
        response_class=Response,
        tags=["executions"],
    )
    async def get_logs(execution_id: str) -> Response:
        data = await service.execution_blob(execution_id, "logs")
        return Response(data, media_type="text/plain; charset=utf-8")

    @app.post(
        f"{API}/executions/{{execution_id}}/cancel",
        response_model=ExecutionDoc,
        responses=ERRORS,
        tags=["executions"],
    )
    async def cancel(request: Request, execution_id: str) -> Response:
        return _doc(request, (await service.cancel(execution_id)).to_doc())

    @app.post(
        f"{API}/executions/{{execution_id}}/redrive",
        response_model=ExecutionDoc,
        responses=ERRORS,
        tags=["executions"],
    )
    async def redrive(request: Request, execution_id: str) -> Response:
        """Run a dead-lettered async execution again, with a fresh budget of attempts."""
        return _doc(request, (await service.redrive(execution_id)).to_doc())

    return app


async def serve_gateway(
    app: ASGIApp,
    config: GatewayConfig,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the gateway until cancelled; `task_status.started(url)` once it listens."""
    host, port = parse_hostport(config.http)
    hc = HypercornConfig()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("spear.gateway.hypercorn")
    hc.keep_alive_max_requests = config.keep_alive_max_requests
    hc.graceful_timeout = config.graceful_timeout_s
    async with trio.open_nursery() as nursery:
        asgi: Any = app  # FastAPI is an ASGI app; hypercorn's type names its own protocol
        try:
            urls: list[str] = await nursery.start(partial(serve, asgi, hc))
        except* OSError as group:
            exc: BaseException = group
            while isinstance(exc, BaseExceptionGroup):
                exc = exc.exceptions[0]
            reason = (getattr(exc, "strerror", None) or str(exc)).lower()
            raise ConfigError(f"gateway.http {config.http} cannot be used: {reason}") from exc
        task_status.started(urls[0] if urls else f"http://{config.http}")
