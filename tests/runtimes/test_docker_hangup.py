"""A client that hangs up on a sync invocation of a docker task stops its container, through
a real `spear node` process and the real daemon (the WASM and process versions are in
tests/roles/test_disconnect.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any, Final

import docker
import httpx
import pytest

from spear.runtimes.docker import LABEL_TASK
from tests.docker_env import BUSYBOX
from tests.subprocesses import NodeProcess

pytestmark = pytest.mark.docker

#: how long the container may take to start, and to die once the client is gone (bounds on
#: waiting for the daemon's events, far below the task's timeout: only the hang-up can stop it)
EVENT_WITHIN_S: Final = 60
STOP_WITHIN_S: Final = 20
TASK_TIMEOUT_MS: Final = 600_000


def serving(client: httpx.Client) -> None:
    """Return once the node serves its API (503 with Retry-After while leadership settles;
    a process outside the test's clock: bounded backoff)."""
    delay_s = 0.05
    for _ in range(40):
        resp = client.get("/api/v1/nodes")
        if resp.status_code != 503:
            return
        time.sleep(min(delay_s, float(resp.headers.get("retry-after", delay_s))))
        delay_s = min(delay_s * 2, 1.0)
    pytest.fail(f"the node did not serve /api/v1/nodes: {resp.text}")


def events(
    api: docker.APIClient, task_id: str, kinds: list[str], since: float, within_s: float
) -> Iterator[dict[str, Any]]:
    """The daemon's container events of `kinds` for the task's containers from `since`,
    ending `within_s` after it (the daemon closes the stream then)."""
    found: Iterator[dict[str, Any]] = api.events(
        since=int(since),
        until=int(since + within_s) + 1,
        filters={"type": "container", "event": kinds, "label": f"{LABEL_TASK}={task_id}"},
        decode=True,
    )
    return found


def invoke_raw(http: str, task: str) -> socket.socket:
    """Send a sync invocation on a socket of our own, so the test decides when it hangs up."""
    host, port = http.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=EVENT_WITHIN_S)
    request = (
        f"POST /api/v1/tasks/{task}/invoke HTTP/1.1\r\nHost: {http}\r\n"
        "Content-Length: 1\r\nContent-Type: application/octet-stream\r\n\r\nx"
    )
    sock.sendall(request.encode())
    return sock


def test_a_client_that_hangs_up_stops_the_container(
    docker_api: docker.APIClient, spear_node: NodeProcess
) -> None:
    with httpx.Client(base_url=spear_node.url, timeout=60) as client:
        serving(client)
        created = client.post(
            "/api/v1/tasks",
            json={
                "name": "sleeper",
                "runtime": "docker",
                "image": BUSYBOX,
                "command": ["sleep", "600"],
                "timeout_ms": TASK_TIMEOUT_MS,
            },
        )
        assert created.status_code == 201, created.text
        task_id = created.json()["task_id"]
        since = time.time() - 1
        sock = invoke_raw(spear_node.http, "sleeper")
        try:
            started = next(
                iter(events(docker_api, task_id, ["start"], since, EVENT_WITHIN_S)), None
            )
            assert started is not None, "the container never started"
        finally:
            sock.close()  # the hang-up, while the container runs
        hung_up = time.time()
        died = next(iter(events(docker_api, task_id, ["die"], hung_up - 1, STOP_WITHIN_S)), None)
        assert died is not None, f"the container still ran {STOP_WITHIN_S} s after the hang-up"
        assert died["id"] == started["id"]
        listed = client.get("/api/v1/executions", params={"task": "sleeper"}).json()
        (execution,) = listed["executions"]
        record = client.get(
            f"/api/v1/executions/{execution['execution_id']}", params={"wait_ms": 20000}
        ).json()
        assert record["status"] == "cancelled", record
        # and the container is removed, not only stopped
        gone = next(
            iter(events(docker_api, task_id, ["destroy"], hung_up - 1, STOP_WITHIN_S)), None
        )
        assert gone is not None, "the stopped container was not removed"
        left = docker_api.containers(all=True, filters={"label": f"{LABEL_TASK}={task_id}"})
        assert left == []
