"""Three real `spear node` processes under a nemesis: the leader is killed with SIGKILL,
restarted, and paused with SIGSTOP past the election timeout, while a client keeps writing
through whichever node answers. Every write the cluster acknowledged must be there at the
end, exactly once; every accepted async execution must finish."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from spear.mesh.handshake import join_token, new_cluster_key
from tests.subprocesses import NodeProcess

#: a client's patience for one write across failovers (attempts x backoff)
ATTEMPTS = 200
BACKOFF_S = 0.05


class ChaosNode(NodeProcess):
    """A node process that knows its id and whether the nemesis paused it."""

    paused: bool = False
    node_id: str = ""

    def start(self) -> None:
        super().start()
        self.node_id = httpx.get(f"{self.url}/health", timeout=5).json()["node_id"]


class Client:
    """Writes through any live node, retrying 503s and dead nodes as a cluster client must."""

    def __init__(self, nodes: list[ChaosNode], http: httpx.Client) -> None:
        self.nodes = nodes
        self.http = http

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(ATTEMPTS):
            node = self.nodes[attempt % len(self.nodes)]
            if node.proc is None or node.proc.poll() is not None or node.paused:
                continue
            try:
                response = self.http.request(method, f"{node.url}{path}", **kwargs)
            except httpx.TransportError:
                time.sleep(BACKOFF_S)
                continue
            if response.status_code != 503:
                return response
            time.sleep(BACKOFF_S)
        pytest.fail(f"{method} {path}: no node answered in {ATTEMPTS} attempts")

    def leader(self) -> ChaosNode:
        for _ in range(ATTEMPTS):
            doc = self.call("GET", "/api/v1/cluster").json()
            by_id = {n.node_id: n for n in self.nodes if n.node_id}
            if doc["leader_id"] in by_id:
                return by_id[doc["leader_id"]]
            time.sleep(BACKOFF_S)
        pytest.fail("no leader emerged")


@contextmanager
def three_nodes(tmp_path: Path, config_text: str) -> Iterator[list[ChaosNode]]:
    """Three `spear node` processes forming one cluster (bootstrap_expect 3); all killed at
    the end (resumed first if paused)."""
    config = tmp_path / "spear.toml"
    config.write_text(config_text)
    token = join_token(new_cluster_key())
    common = ["--config", str(config), "--join-token", token, "--bootstrap-expect", "3"]
    first = ChaosNode(
        tmp_path / "n1", extra_args=[*common, "--name", "n1"], ready_when_serving=False
    )
    nodes = [first]
    for name in ("n2", "n3"):
        join = ["--join", first.listen, "--name", name]
        nodes.append(
            ChaosNode(tmp_path / name, extra_args=[*common, *join], ready_when_serving=False)
        )
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            if node.proc is not None:
                node.proc.send_signal(signal.SIGCONT)
            node.kill()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[ChaosNode]]:
    with three_nodes(tmp_path, '[mesh]\nprofile = "lan-fast"\n') as nodes:
        yield nodes


def register(client: Client, name: str) -> None:
    """Register a task; acknowledged by 201 (or 409: a retry of a write that committed)."""
    spec = {"name": name, "runtime": "process", "command": ["cat"]}
    response = client.call("POST", "/api/v1/tasks", json=spec)
    assert response.status_code in (201, 409), response.text


def invoke_async(client: Client, key: str, task: str = "echo") -> str:
    """Accept an async invocation with `key` as its input and idempotency key."""
    response = client.call(
        "POST",
        f"/api/v1/tasks/{task}/invoke?mode=async",
        content=key.encode(),
        headers={"Idempotency-Key": key},
    )
    assert response.status_code == 202, response.text
    execution_id: str = response.json()["execution_id"]
    return execution_id


def test_acknowledged_writes_survive_kill_restart_and_pause_of_leaders(
    cluster: list[ChaosNode],
) -> None:
    with httpx.Client(timeout=10) as http:
        run_the_nemesis(Client(cluster, http))


def run_the_nemesis(client: Client) -> None:
    cluster = client.nodes
    register(client, "echo")
    acked: list[str] = []
    executions: dict[str, str] = {}

    def write_some(round_: int) -> None:
        for i in range(5):
            name = f"t{round_}-{i}"
            register(client, name)
            acked.append(name)
            key = f"k{round_}-{i}"
            executions[key] = invoke_async(client, key)

    write_some(0)
    victim = client.leader()
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    write_some(1)
    victim.start()  # restarts from its data dir and rejoins
    write_some(2)

    paused = client.leader()
    assert paused.proc is not None
    paused.proc.send_signal(signal.SIGSTOP)
    paused.paused = True
    write_some(3)  # the others elect a new leader meanwhile
    paused.proc.send_signal(signal.SIGCONT)
    paused.paused = False
    write_some(4)

    tasks = client.call("GET", "/api/v1/tasks").json()["tasks"]
    names = [t["name"] for t in tasks]
    assert sorted(names) == sorted(set(names)), "a task was registered twice"
    assert set(acked) <= set(names), f"lost: {set(acked) - set(names)}"
    for key, execution_id in executions.items():
        again = invoke_async(client, key)
        assert again == execution_id, f"idempotency key {key} ran twice"
        record = client.call(
            "GET", f"/api/v1/executions/{execution_id}", params={"wait_ms": 20000}
        ).json()
        assert record["status"] == "succeeded", record
        output = client.call("GET", f"/api/v1/executions/{execution_id}/output")
        assert output.content == key.encode()
    for node in cluster:  # every node serves the same state (through the leader)
        through = Client([node], client.http).call("GET", "/api/v1/tasks").json()["tasks"]
        assert sorted(t["name"] for t in through) == sorted(names)
