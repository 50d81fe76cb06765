"""End to end: `spear node` as a real process, real compiled WASM, restarts and kills."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.roles.api_helpers import wasm
from tests.roles.test_gateway import BAD_REQUESTS
from tests.subprocesses import NodeProcess


def _register(client: httpx.Client, module: bytes, **spec: Any) -> dict[str, Any]:
    file_id = client.post("/api/v1/files", content=module).json()["file_id"]
    resp = client.post("/api/v1/tasks", json={"runtime": "wasm", "artifact": file_id, **spec})
    assert resp.status_code == 201, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


def _wait(client: httpx.Client, execution_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = client.get(
        f"/api/v1/executions/{execution_id}", params={"wait_ms": 30_000}
    ).json()
    return doc


@pytest.mark.compiler
def test_compiled_c_functions_survive_restart(
    spear_node: NodeProcess, compiled_wasm: dict[str, Path]
) -> None:
    with httpx.Client(base_url=spear_node.url, timeout=60) as client:
        upper = _register(client, compiled_wasm["upper"].read_bytes(), name="upper")
        _register(client, compiled_wasm["wordcount"].read_bytes(), name="wc", timeout_ms=5000)
        resp = client.post("/api/v1/tasks/upper/invoke", content=b"compiled from C")
        assert (resp.status_code, resp.content) == (200, b"COMPILED FROM C")
        resp = client.post("/api/v1/tasks/wc/invoke", content=b"one two  three\nfour")
        assert resp.content == b"4\n"
        logs = client.get(f"/api/v1/executions/{resp.headers['x-spear-execution-id']}/logs")
        assert logs.text == "wordcount: 19 bytes read\n"
        accepted = client.post(
            "/api/v1/tasks/wc/invoke",
            params={"mode": "async"},
            content=b"a b c",
            headers={"Idempotency-Key": "k1"},
        )
        assert accepted.status_code == 202
        execution_id = accepted.json()["execution_id"]
        assert _wait(client, execution_id)["status"] == "succeeded"

    spear_node.restart()  # SIGTERM: exit 0, no traceback (checked by the fixture)

    with httpx.Client(base_url=spear_node.url, timeout=60) as client:
        tasks = {t["name"]: t for t in client.get("/api/v1/tasks").json()["tasks"]}
        assert set(tasks) == {"upper", "wc"}
        assert tasks["upper"] == upper
        assert client.get(f"/api/v1/files/{upper['artifact']}").status_code == 200
        record = client.get(f"/api/v1/executions/{execution_id}").json()
        assert record["status"] == "succeeded"
        assert client.get(f"/api/v1/executions/{execution_id}/output").content == b"3\n"
        again = client.post(
            "/api/v1/tasks/wc/invoke",
            params={"mode": "async"},
            content=b"x",
            headers={"Idempotency-Key": "k1"},
        )
        assert again.json()["execution_id"] == execution_id
        resp = client.post("/api/v1/tasks/upper/invoke", content=b"after restart")
        assert resp.content == b"AFTER RESTART"


def test_acknowledged_async_work_survives_sigkill(spear_node: NodeProcess) -> None:
    with httpx.Client(base_url=spear_node.url, timeout=60) as client:
        _register(client, wasm("upper"), name="upper")
        _register(client, wasm("spin"), name="spin", timeout_ms=600_000, retry={"max_attempts": 1})
        accepted = [
            client.post(
                "/api/v1/tasks/upper/invoke", params={"mode": "async"}, content=f"n{i}".encode()
            ).json()["execution_id"]
            for i in range(20)
        ]
        stuck = client.post("/api/v1/tasks/spin/invoke", params={"mode": "async"}).json()
    spear_node.kill()  # SIGKILL, mid-stream
    spear_node.start()
    with httpx.Client(base_url=spear_node.url, timeout=60) as client:
        for i, execution_id in enumerate(accepted):
            record = _wait(client, execution_id)
            assert record["status"] == "succeeded", record
            out = client.get(f"/api/v1/executions/{execution_id}/output").content
            assert out == f"N{i}".encode()
        # the spinning one was running or pending when the node died; with one attempt
        # allowed it either ends as node_lost, or (if it never started) runs again now.
        record = client.get(f"/api/v1/executions/{stuck['execution_id']}").json()
        if record["status"] == "failed":
            assert record["error"]["code"] == "node_lost"
        else:
            assert record["status"] in ("pending", "running")
            client.post(f"/api/v1/executions/{stuck['execution_id']}/cancel")


def test_sigint_stops_cleanly(spear_node: NodeProcess) -> None:
    assert spear_node.proc is not None
    spear_node.proc.send_signal(signal.SIGINT)
    assert spear_node.proc.wait(timeout=30) == 0
    assert "Traceback" not in spear_node.output
    spear_node.proc = None


def test_bad_input_against_the_real_process(spear_node: NodeProcess) -> None:
    with httpx.Client(base_url=spear_node.url, timeout=60) as client:
        _register(client, wasm("upper"), name="upper")
        for method, path, kwargs, status, message in BAD_REQUESTS:
            resp = client.request(method, path, **kwargs)
            assert resp.status_code == status, (method, path, resp.text)
            assert message in resp.json()["message"]
            assert client.post("/api/v1/tasks/upper/invoke", content=b"ok").content == b"OK"
        assert [t["name"] for t in client.get("/api/v1/tasks").json()["tasks"]] == ["upper"]


def test_a_clean_stop_does_not_use_up_an_attempt(spear_node: NodeProcess) -> None:
    with httpx.Client(base_url=spear_node.url, timeout=60) as client:
        resp = client.post(
            "/api/v1/tasks",
            json={
                "name": "sleeper",
                "runtime": "process",
                "command": ["/bin/sleep", "600"],
                "timeout_ms": 600_000,
                "retry": {"max_attempts": 1},
            },
        )
        assert resp.status_code == 201, resp.text
        execution_id = client.post("/api/v1/tasks/sleeper/invoke", params={"mode": "async"}).json()[
            "execution_id"
        ]
        # An external process: a bounded probe until it runs (no fixed sleep).
        for delay_s in [0.02 * 2**i for i in range(10)]:
            if client.get(f"/api/v1/executions/{execution_id}").json()["status"] == "running":
                break
            time.sleep(delay_s)
        else:
            pytest.fail("the async execution never started")
    spear_node.restart()  # SIGTERM while it runs, then start again
    with httpx.Client(base_url=spear_node.url, timeout=60) as client:
        record = client.get(f"/api/v1/executions/{execution_id}").json()
        # With one attempt allowed, a counted interrupted run would now be failed (node_lost).
        assert record["status"] in ("pending", "running"), record["error"]
        assert record["attempts"] <= 1
        client.post(f"/api/v1/executions/{execution_id}/cancel")
