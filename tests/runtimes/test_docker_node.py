"""End to end: a `spear node` process runs docker tasks through its gateway, and reaps at
its next start the container it left when it was killed mid-call."""

from __future__ import annotations

import time
from typing import Any

import docker
import httpx
import pytest

from spear.runtimes.docker import LABEL_TASK
from tests.docker_env import BUSYBOX
from tests.subprocesses import NodeProcess

pytestmark = pytest.mark.docker


def register(client: httpx.Client, **spec: Any) -> httpx.Response:
    return client.post("/api/v1/tasks", json={"runtime": "docker", "image": BUSYBOX, **spec})


def serving(client: httpx.Client) -> str:
    """`GET /api/v1/nodes` once the node serves it: a node answers 503 with Retry-After while
    its leadership settles (a process outside the test's clock, so: bounded backoff, as
    NodeProcess does for /health)."""
    delay_s = 0.05
    for _ in range(40):
        resp = client.get("/api/v1/nodes")
        if resp.status_code != 503:
            return resp.text
        time.sleep(min(delay_s, float(resp.headers.get("retry-after", delay_s))))
        delay_s = min(delay_s * 2, 1.0)
    pytest.fail(f"the node did not serve /api/v1/nodes: {resp.text}")


def containers_of(api: docker.APIClient, task_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = api.containers(
        all=True, filters={"label": f"{LABEL_TASK}={task_id}"}
    )
    return found


def test_docker_tasks_through_the_gateway(
    docker_api: docker.APIClient, spear_node: NodeProcess
) -> None:
    with httpx.Client(base_url=spear_node.url, timeout=60) as client:
        nodes = serving(client)
        # the node reports the runtime available, with the daemon's version
        assert docker_api.version()["Version"] in nodes, nodes
        created = register(client, name="upper", command=["tr", "a-z", "A-Z"])
        assert created.status_code == 201, created.text
        resp = client.post("/api/v1/tasks/upper/invoke", content=b"from a container")
        assert (resp.status_code, resp.content) == (200, b"FROM A CONTAINER")
        assert resp.headers["x-spear-cold-start"] == "true"
        failing = register(client, name="fails", command=["sh", "-c", "exit 4"])
        assert failing.status_code == 201, failing.text
        resp = client.post("/api/v1/tasks/fails/invoke", content=b"")
        assert resp.status_code == 502
        assert resp.json()["error"]["code"] == "exit_nonzero"
        missing = register(client, name="missing", image="spear/never-loaded:0")
        assert missing.status_code == 422
        assert "pull_policy is 'never'" in missing.text
    assert containers_of(docker_api, created.json()["task_id"]) == []


def test_a_docker_worker_task_is_served_warm(
    docker_api: docker.APIClient, spear_node: NodeProcess
) -> None:
    with httpx.Client(base_url=spear_node.url, timeout=60) as client:
        serving(client)
        created = register(
            client, name="warm", mode="worker", image="spear/busybox-worker:1", command=[]
        )
        assert created.status_code == 201, created.text
        colds = []
        for word in (b"first", b"second", b"third"):
            resp = client.post("/api/v1/tasks/warm/invoke", content=word)
            assert (resp.status_code, resp.content) == (200, word.upper()), resp.text
            colds.append(resp.headers["x-spear-cold-start"])
        assert colds == ["true", "false", "false"]
        containers = containers_of(docker_api, created.json()["task_id"])
        assert len(containers) == 1
        assert client.delete("/api/v1/tasks/warm").status_code in (200, 204)


def test_a_killed_node_reaps_its_container_at_restart(
    docker_api: docker.APIClient, spear_node: NodeProcess
) -> None:
    with httpx.Client(base_url=spear_node.url, timeout=60) as client:
        serving(client)
        created = register(client, name="sleeper", command=["sleep", "600"], timeout_ms=600_000)
        assert created.status_code == 201, created.text
        task_id = created.json()["task_id"]
        since = int(time.time()) - 1
        accepted = client.post("/api/v1/tasks/sleeper/invoke", params={"mode": "async"})
        assert accepted.status_code == 202, accepted.text
    events = docker_api.events(
        since=since,
        until=since + 60,
        filters={"event": "start", "label": f"{LABEL_TASK}={task_id}"},
        decode=True,
    )
    assert next(iter(events), None) is not None, "the container never started"
    spear_node.kill()  # SIGKILL: the container stays behind
    (orphan,) = containers_of(docker_api, task_id)
    spear_node.start()
    # Reaped at start (a retried async execution may have started a container of its own).
    assert orphan["Id"] not in {c["Id"] for c in containers_of(docker_api, task_id)}
