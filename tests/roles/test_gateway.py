"""The HTTP API v1 on a real in-process node: real sockets, real wasmtime, real SQLite."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
from openapi_spec_validator import validate

from spear.node import NodeHandle
from spear.roles.invoke_path import Gateway
from tests.roles.api_helpers import register, register_wasm, upload, wasm


async def test_health_and_cluster(api: httpx.AsyncClient, node: NodeHandle) -> None:
    health = (await api.get("/health")).json()
    assert health == {
        "status": "ok",
        "node_id": node.node_id,
        "name": node.name,
        "role": "leader",
        "leader_id": node.node_id,
        "serving": True,
        "members": {"alive": 1},
    }
    cluster = (await api.get("/api/v1/cluster")).json()
    assert cluster["leader_id"] == node.node_id
    assert cluster["term"] >= 1
    assert cluster["voters"] == [node.node_id]
    (member,) = cluster["members"]
    assert (member["node_id"], member["state"], member["voter"]) == (node.node_id, "alive", True)
    assert member["mesh_address"] == node.cluster.mesh_address
    assert "wasm" in member["runtimes"]


async def test_nodes_and_resources(api: httpx.AsyncClient, node: NodeHandle) -> None:
    await register_wasm(api, "upper", "upper")
    await api.post("/api/v1/tasks/upper/invoke", content=b"x")
    (doc,) = (await api.get("/api/v1/nodes")).json()["nodes"]
    assert (doc["node_id"], doc["status"], doc["leader"]) == (node.node_id, "online", True)
    assert doc["resources"]["cpu_count"] >= 1
    assert doc["resources"]["memory_available_bytes"] > 0
    assert doc["statistics"]["tasks"] == 1
    wasm_stats = doc["statistics"]["spearlet"]["runtimes"]["wasm"]
    assert wasm_stats["inline_runs"] + wasm_stats["inline_fallbacks"] >= 1
    assert (await api.get(f"/api/v1/nodes/{node.node_id}")).json()["node_id"] == node.node_id
    assert (await api.get("/api/v1/nodes/nd-nobody")).status_code == 404
    (report,) = (await api.get("/api/v1/resources")).json()["resources"]
    assert report["node_id"] == node.node_id and report["disk_free_bytes"] > 0


async def test_openapi_is_valid_and_docs_are_served_offline(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/api/openapi.json")).json()
    validate(spec)
    for path in (
        "/api/v1/files",
        "/api/v1/tasks",
        "/api/v1/tasks/{task}/invoke",
        "/api/v1/executions/{execution_id}/output",
    ):
        assert path in spec["paths"]
    page = await api.get("/docs")
    assert page.status_code == 200
    assert "https://" not in page.text  # nothing fetched from a CDN
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/static-offline-docs/{asset}" in page.text
        assert (await api.get(f"/static-offline-docs/{asset}")).status_code == 200


async def test_files_are_content_addressed(api: httpx.AsyncClient) -> None:
    data = b"\x00\x01 spear artifact"
    first = await api.post("/api/v1/files", content=data, params={"name": "a.bin"})
    second = await api.post("/api/v1/files", content=data)
    assert first.status_code == second.status_code == 201
    assert first.json()["file_id"] == second.json()["file_id"] == hashlib.sha256(data).hexdigest()
    assert first.json()["size"] == len(data)
    file_id = first.json()["file_id"]
    assert (await api.get(f"/api/v1/files/{file_id}/content")).content == data
    listed = (await api.get("/api/v1/files")).json()["files"]
    assert [f["file_id"] for f in listed] == [file_id]


async def test_task_lifecycle_by_id_and_name(api: httpx.AsyncClient) -> None:
    doc = await register_wasm(api, "upper", "upper", env={"A": "1"}, timeout_ms=5000)
    task_id = doc["task_id"]
    assert doc["name"] == "upper" and doc["runtime"] == "wasm" and doc["mode"] == "per-call"
    assert (await api.get(f"/api/v1/tasks/{task_id}")).json() == doc
    assert (await api.get("/api/v1/tasks/upper")).json() == doc
    assert [t["task_id"] for t in (await api.get("/api/v1/tasks")).json()["tasks"]] == [task_id]
    dup = await api.post(
        "/api/v1/tasks", json={"name": "upper", "runtime": "wasm", "artifact": doc["artifact"]}
    )
    assert dup.status_code == 409 and dup.json()["error"] == "conflict"
    assert (await api.delete("/api/v1/tasks/upper")).json()["task_id"] == task_id
    gone = await api.get(f"/api/v1/tasks/{task_id}")
    assert gone.status_code == 404 and "does not exist" in gone.json()["message"]


async def test_sync_invoke_returns_output_and_headers(
    api: httpx.AsyncClient, node: NodeHandle
) -> None:
    await register_wasm(api, "upper", "upper")
    resp = await api.post("/api/v1/tasks/upper/invoke", content=b"hello, spear")
    assert resp.status_code == 200
    assert resp.content == b"HELLO, SPEAR"
    assert resp.headers["x-spear-status"] == "succeeded"
    assert resp.headers["x-spear-node"] == node.node_id
    assert resp.headers["x-spear-cold-start"] in ("true", "false")
    assert float(resp.headers["x-spear-duration-ms"]) >= 0
    record = (await api.get(f"/api/v1/executions/{resp.headers['x-spear-execution-id']}")).json()
    assert record["status"] == "succeeded" and record["mode"] == "sync"
    assert record["output_bytes"] == len(b"HELLO, SPEAR")
    out = await api.get(f"/api/v1/executions/{record['execution_id']}/output")
    assert out.content == b"HELLO, SPEAR"


async def test_async_invoke_and_long_poll(api: httpx.AsyncClient) -> None:
    await register_wasm(api, "upper", "upper")
    accepted = await api.post(
        "/api/v1/tasks/upper/invoke", params={"mode": "async"}, content=b"later"
    )
    assert accepted.status_code == 202
    execution_id = accepted.json()["execution_id"]
    record = (await api.get(f"/api/v1/executions/{execution_id}", params={"wait_ms": 20000})).json()
    assert record["status"] == "succeeded" and record["attempts"] == 1
    assert (await api.get(f"/api/v1/executions/{execution_id}/output")).content == b"LATER"
    listed = (await api.get("/api/v1/executions", params={"task": "upper"})).json()
    assert execution_id in [r["execution_id"] for r in listed["executions"]]
    # a deleted task's executions stay listed, by its name or its id
    task_id = listed["executions"][0]["task_id"]
    assert (await api.delete("/api/v1/tasks/upper")).status_code in (200, 204)
    for ref in ("upper", task_id):
        listed = (await api.get("/api/v1/executions", params={"task": ref})).json()
        assert [r["execution_id"] for r in listed["executions"]] == [execution_id], ref
    nobody = (await api.get("/api/v1/executions", params={"task": "nobody"})).json()
    assert nobody["executions"] == []


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_idempotency_key_returns_the_first_execution(
    api: httpx.AsyncClient, mode: str
) -> None:
    await register_wasm(api, "upper", "upper")
    headers = {"Idempotency-Key": "order-42"}
    params = {"mode": mode}
    first = await api.post(
        "/api/v1/tasks/upper/invoke", content=b"a", headers=headers, params=params
    )
    again = await api.post(
        "/api/v1/tasks/upper/invoke", content=b"b", headers=headers, params=params
    )
    if mode == "sync":
        assert first.headers["x-spear-execution-id"] == again.headers["x-spear-execution-id"]
        assert again.content == b"A"
    else:
        assert first.json()["execution_id"] == again.json()["execution_id"]
    listed = (await api.get("/api/v1/executions", params={"task": "upper"})).json()["executions"]
    assert len(listed) == 1


@pytest.mark.parametrize(
    ("module", "spec", "http_status", "status", "code"),
    [
        ("exit3", {}, 502, "failed", "exit_nonzero"),
        ("trap", {}, 502, "failed", "trap"),
        ("spin", {"timeout_ms": 200}, 504, "timeout", "timeout"),
        ("grow", {"memory_limit_bytes": 4 * 65536}, 502, "failed", "memory_limit"),
    ],
)
async def test_function_failures_are_records_not_crashes(
    api: httpx.AsyncClient,
    module: str,
    spec: dict[str, Any],
    http_status: int,
    status: str,
    code: str,
) -> None:
    await register_wasm(api, module, module, **spec)
    resp = await api.post(f"/api/v1/tasks/{module}/invoke", content=b"")
    assert resp.status_code == http_status, resp.text
    record = resp.json()
    assert (record["status"], record["error"]["code"]) == (status, code)
    assert resp.headers["x-spear-status"] == status
    if module == "exit3":
        assert record["exit_code"] == 3
    # the node keeps serving
    assert (await api.get("/health")).status_code == 200


async def test_output_limit(start_node: Callable[..., Any]) -> None:
    node = await start_node(runtimes__max_output_bytes=100_000)
    async with httpx.AsyncClient(base_url=node.http_url) as api:
        await register_wasm(api, "flood", "flood", timeout_ms=10_000)
        await register(api, name="yes", runtime="process", command=["/usr/bin/yes"])
        for task in ("flood", "yes"):
            resp = await api.post(f"/api/v1/tasks/{task}/invoke")
            assert resp.status_code == 502
            record = resp.json()
            assert record["error"]["code"] == "output_limit"
            out = await api.get(f"/api/v1/executions/{record['execution_id']}/output")
            assert len(out.content) == 100_000  # exactly the first max_output_bytes


async def test_sync_records_beyond_their_limits_go_oldest_first(
    start_node: Callable[..., Any],
) -> None:
    node = await start_node(sms__sync_record_limit=3, sms__sync_record_bytes=10_000)
    async with httpx.AsyncClient(base_url=node.http_url) as api:
        await register_wasm(api, "upper", "upper")

        async def invoke(data: bytes) -> str:
            resp = await api.post("/api/v1/tasks/upper/invoke", content=data)
            assert resp.status_code == 200, resp.text
            return str(resp.headers["x-spear-execution-id"])

        async def kept(ids: list[str]) -> list[bool]:
            return [(await api.get(f"/api/v1/executions/{i}")).status_code == 200 for i in ids]

        ids = [await invoke(b"x%d" % i) for i in range(5)]
        assert await kept(ids) == [False, False, True, True, True]  # the count limit
        big = await invoke(b"y" * 9_999)  # its output and the others: over the byte budget
        assert await kept([*ids[2:], big]) == [False, False, False, True]
        assert node.service.statistics()["sync_records"] == 1


async def test_request_timeout_may_only_shorten(api: httpx.AsyncClient) -> None:
    await register_wasm(api, "spin", "spin", timeout_ms=60_000)
    resp = await api.post("/api/v1/tasks/spin/invoke", params={"timeout_ms": 100})
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "timeout"


async def test_process_task(api: httpx.AsyncClient) -> None:
    await register(api, name="cat", runtime="process", command=["/bin/cat"])
    resp = await api.post("/api/v1/tasks/cat/invoke", content=b"as is")
    assert (resp.status_code, resp.content) == (200, b"as is")
    await register(
        api, name="fail", runtime="process", command=["/bin/sh", "-c", "echo oops >&2; exit 4"]
    )
    resp = await api.post("/api/v1/tasks/fail/invoke")
    assert resp.status_code == 502
    record = resp.json()
    assert (record["error"]["code"], record["exit_code"]) == ("exit_nonzero", 4)
    logs = await api.get(f"/api/v1/executions/{record['execution_id']}/logs")
    assert logs.text == "oops\n"


async def test_cancel_a_running_async_execution(api: httpx.AsyncClient) -> None:
    await register_wasm(api, "spin", "spin", timeout_ms=600_000)
    execution_id = (await api.post("/api/v1/tasks/spin/invoke", params={"mode": "async"})).json()[
        "execution_id"
    ]
    cancelled = await api.post(f"/api/v1/executions/{execution_id}/cancel")
    assert cancelled.status_code == 200
    record = (await api.get(f"/api/v1/executions/{execution_id}", params={"wait_ms": 20000})).json()
    assert record["status"] == "cancelled"
    again = await api.post(f"/api/v1/executions/{execution_id}/cancel")
    assert again.status_code == 409


async def test_cbor_on_request(api: httpx.AsyncClient) -> None:
    doc = await register_wasm(api, "upper", "upper")
    resp = await api.get("/api/v1/tasks/upper", headers={"Accept": "application/cbor"})
    assert resp.headers["content-type"] == "application/cbor"
    assert cbor2.loads(resp.content) == doc


BAD_REQUESTS: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("GET", "/api/v1/tasks/nope", {}, 404, "task 'nope' does not exist"),
    ("POST", "/api/v1/tasks/nope/invoke", {"content": b"x"}, 404, "task 'nope' does not exist"),
    ("GET", "/api/v1/executions/ex-0", {}, 404, "execution 'ex-0' does not exist"),
    ("GET", "/api/v1/files/abc", {}, 404, "file 'abc' does not exist"),
    (
        "POST",
        "/api/v1/tasks",
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        400,
        "request body is not valid JSON",
    ),
    ("POST", "/api/v1/tasks", {"json": {"runtime": "wasm"}}, 422, "name is required"),
    (
        "POST",
        "/api/v1/tasks",
        {"json": {"name": "x", "runtime": "wasm", "timeout_ms": "soon"}},
        422,
        "timeout_ms must be a valid integer",
    ),
    (
        "POST",
        "/api/v1/tasks",
        {"json": {"name": "x", "runtime": "cobol"}},
        422,
        "runtime must be 'wasm', 'process' or 'docker', got 'cobol'",
    ),
    (
        "POST",
        "/api/v1/tasks",
        {"json": {"name": "x", "runtime": "wasm"}},
        422,
        "runtime 'wasm' needs an artifact",
    ),
    (
        "POST",
        "/api/v1/tasks",
        {"json": {"name": "x", "runtime": "process", "command": ["a"], "colour": "red"}},
        422,
        "colour is not a known field",
    ),
    (
        "POST",
        "/api/v1/tasks",
        {"json": {"name": "x", "runtime": "wasm", "artifact": "0" * 64}},
        422,
        "was not uploaded",
    ),
    (
        "POST",
        "/api/v1/tasks",
        {"json": {"name": "x", "runtime": "docker", "image": "a:b"}},
        422,
        "docker",
    ),
    (
        "POST",
        "/api/v1/tasks",
        {"json": {"name": "tk-x", "runtime": "process", "command": ["a"]}},
        422,
        "may not start with 'tk-'",
    ),
    ("POST", "/api/v1/tasks/upper/invoke", {"params": {"mode": "later"}}, 422, "mode must be"),
    (
        "POST",
        "/api/v1/tasks",
        {"json": {"name": "x", "runtime": "process", "command": ["a"], "env": {"A": "x\0y"}}},
        422,
        "env value of 'A' may not contain NUL bytes",
    ),
    (
        "POST",
        "/api/v1/tasks",
        {"json": {"name": "x", "runtime": "process", "command": ["a"], "timeout_ms": True}},
        422,
        "timeout_ms must be a valid integer",
    ),
    (
        "POST",
        "/api/v1/tasks",
        {
            "json": {
                "name": "x",
                "runtime": "process",
                "command": ["a"],
                "memory_limit_bytes": 10**26,
            }
        },
        422,
        "memory_limit_bytes must be less than or equal to 1099511627776",
    ),
    (
        "POST",
        "/api/v1/tasks",
        {
            "json": {
                "name": "x",
                "runtime": "process",
                "command": ["a"],
                "placement": {"node_id": "nd-elsewhere"},
            }
        },
        422,
        "placement.node_id 'nd-elsewhere' is not a member of this cluster",
    ),
    (
        "POST",
        "/api/v1/tasks",
        {"content": b"name=x", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        422,
        "the request body must be a JSON object",
    ),
    (
        "POST",
        "/api/v1/tasks",
        {"json": {"name": "x", "runtime": "process", "command": ["a"], "description": "d" * 5000}},
        422,
        "(5002 characters)",
    ),
    ("GET", "/api/v1/nowhere", {}, 404, "no route for GET /api/v1/nowhere"),
    (
        "POST",
        "/api/v1/tasks",
        {"json": {"name": "9lives", "runtime": "process", "command": ["a"]}},
        422,
        "name must match pattern '^[A-Za-z]",
    ),
    ("PUT", "/api/v1/tasks", {}, 405, "method PUT is not allowed"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "message"), BAD_REQUESTS)
async def test_bad_requests_get_clear_json_errors(
    api: httpx.AsyncClient,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    message: str,
) -> None:
    await register_wasm(api, "upper", "upper")
    resp = await api.request(method, path, **kwargs)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) <= {"error", "message", "field"}
    assert message in body["message"]
    # nothing stored was damaged and the node still serves
    ok = await api.post("/api/v1/tasks/upper/invoke", content=b"still")
    assert ok.content == b"STILL"


SHA = "ab" * 32
FIELD_RULES = [
    ({"name": "x", "runtime": "wasm"}, "artifact", "runtime 'wasm' needs an artifact"),
    ({"name": "x", "runtime": "process"}, "command", "needs a command or an artifact"),
    ({"name": "x", "runtime": "docker"}, "image", "runtime 'docker' needs an image"),
    ({"name": "tk-x", "runtime": "process", "command": ["a"]}, "name", "may not start with 'tk-'"),
    ({"name": "x", "runtime": "process", "command": ["a"], "env": {"A=B": "1"}}, "env", "env key"),
    ({"name": "x", "runtime": "wasm", "artifact": SHA, "image": "b"}, "image", "docker' only"),
    ({"name": "x", "runtime": "docker", "image": "b", "artifact": SHA}, "artifact", "not 'docker'"),
    (
        {"name": "x", "runtime": "process", "command": ["a"], "pool": {"max_instances": 2}},
        "pool",
        "pool applies to mode 'worker' only",
    ),
]


@pytest.mark.parametrize(("body", "field", "message"), FIELD_RULES)
async def test_a_rule_of_the_whole_definition_names_its_field(
    api: httpx.AsyncClient, body: dict[str, Any], field: str, message: str
) -> None:
    resp = await api.post("/api/v1/tasks", json=body)
    assert resp.status_code == 422, resp.text
    doc = resp.json()
    assert doc["field"] == field and message in doc["message"], doc
    assert (await api.get("/api/v1/tasks")).json()["tasks"] == []  # nothing registered


async def test_bad_artifacts_and_oversized_bodies(start_node: Callable[..., Any]) -> None:
    node = await start_node(gateway__max_upload_bytes=4096, gateway__max_invoke_body_bytes=16)
    async with httpx.AsyncClient(base_url=node.http_url) as api:
        big = await api.post("/api/v1/files", content=b"x" * 5000)
        assert big.status_code == 413 and "gateway.max_upload_bytes" in big.json()["message"]
        not_wasm = await upload(api, b"#!/bin/sh\necho hi\n")
        resp = await api.post(
            "/api/v1/tasks", json={"name": "w", "runtime": "wasm", "artifact": not_wasm}
        )
        assert resp.status_code == 422 and resp.json()["error"] == "bad_artifact"
        no_start = await upload(api, wasm("noentry"))
        resp = await api.post(
            "/api/v1/tasks", json={"name": "w", "runtime": "wasm", "artifact": no_start}
        )
        assert resp.status_code == 422 and "_start" in resp.json()["message"]
        await register_wasm(api, "upper", "upper")
        resp = await api.post("/api/v1/tasks/upper/invoke", content=b"y" * 17)
        assert resp.status_code == 413
        assert "gateway.max_invoke_body_bytes" in resp.json()["message"]
        assert (await api.post("/api/v1/tasks/upper/invoke", content=b"ok")).content == b"OK"


async def test_control_app_alone_serves_the_documented_invoke_route(
    api: httpx.AsyncClient, node: NodeHandle, tmp_path: Path
) -> None:
    """The fast path and the FastAPI route of invoke give the same answers."""
    await register_wasm(api, "upper", "upper")
    await register_wasm(api, "exit3", "exit3")
    gateway = node.leader.app
    assert isinstance(gateway, Gateway)
    transport = httpx.ASGITransport(app=gateway.control)
    async with httpx.AsyncClient(transport=transport, base_url="http://control") as direct:
        for client in (api, direct):
            ok = await client.post("/api/v1/tasks/upper/invoke", content=b"same")
            assert (ok.status_code, ok.content) == (200, b"SAME")
            assert ok.headers["x-spear-status"] == "succeeded"
            failed = await client.post("/api/v1/tasks/exit3/invoke")
            assert failed.status_code == 502
            assert failed.json()["error"]["code"] == "exit_nonzero"
            bad = await client.post("/api/v1/tasks/upper/invoke", params={"mode": "x"})
            assert bad.status_code == 422 and bad.json()["field"] == "mode"
            missing = await client.post("/api/v1/tasks/nope/invoke")
            assert missing.status_code == 404
