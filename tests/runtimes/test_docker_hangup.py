"""A client that hangs up on a sync invocation of a docker task stops its container, through
a real `spear node` process and the real daemon (the WASM and process versions are in
tests/roles/test_disconnect.py)."""

from __future__ import annotations

import socket
import time
from contextlib import closing
from typing import Any, Final

import docker
import httpx
import pytest

from spear.runtimes.docker import LABEL_TASK
from tests.docker_env import BUSYBOX
from tests.runtimes.test_docker_node import serving
from tests.subprocesses import NodeProcess

pytestmark = pytest.mark.docker

#: how long the container may take to start, and to die once the client is gone (bounds on
#: waiting for the daemon's events, far below the task's timeout: only the hang-up can stop it)
EVENT_WITHIN_S: Final = 60
STOP_WITHIN_S: Final = 20
TASK_TIMEOUT_MS: Final = 600_000


def first_event(
    api: docker.APIClient, task_id: str, kind: str, since: float, within_s: float
) -> dict[str, Any] | None:
    """The daemon's first container event `kind` for the task's containers from `since`, or
    None if there is none by `within_s` after it (the daemon ends the stream then)."""
    stream = api.events(
        since=int(since),
        until=int(since + within_s) + 1,
        filters={"type": "container", "event": [kind], "label": f"{LABEL_TASK}={task_id}"},
        decode=True,
    )
    with closing(stream):  # its HTTP response, left open, would warn when collected
        found: dict[str, Any] | None = next(iter(stream), None)
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
            started = first_event(docker_api, task_id, "start", since, EVENT_WITHIN_S)
            assert started is not None, "the container never started"
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):  # no answer yet: the call is in flight
                sock.recv(1)
        finally:
            sock.close()  # the hang-up, while the container runs
        hung_up = time.time()
        died = first_event(docker_api, task_id, "die", hung_up - 1, STOP_WITHIN_S)
        assert died is not None, f"the container still ran {STOP_WITHIN_S} s after the hang-up"
        assert died["id"] == started["id"]
        listed = client.get("/api/v1/executions", params={"task": "sleeper"}).json()
        (execution,) = listed["executions"]
        record = client.get(
            f"/api/v1/executions/{execution['execution_id']}", params={"wait_ms": 20000}
        ).json()
        assert record["status"] == "cancelled", record
        # and the container is removed, not only stopped
        gone = first_event(docker_api, task_id, "destroy", hung_up - 1, STOP_WITHIN_S)
        assert gone is not None, "the stopped container was not removed"
        left = docker_api.containers(all=True, filters={"label": f"{LABEL_TASK}={task_id}"})
        assert left == []
