"""Three real `spear node` processes while a Spearlet (a follower running async work) is
killed with SIGKILL: every accepted async execution finishes, each attempt is recorded, none
runs more often than its retry policy allows, and the lost node's attempts name it."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_cluster_chaos import ChaosNode, Client, invoke_async, three_nodes

CONFIG = """
[node]
report_interval_ms = 200

[mesh]
profile = "lan-fast"

[sms]
spearlet_lease_ms = 1500
"""
MAX_ATTEMPTS = 3


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[ChaosNode]]:
    with three_nodes(tmp_path, CONFIG) as nodes:
        yield nodes


def test_async_work_survives_the_loss_of_a_spearlet(cluster: list[ChaosNode]) -> None:
    with httpx.Client(timeout=30) as http:
        client = Client(cluster, http)
        spec = {
            "name": "slow",
            "runtime": "process",
            # long enough that work seen running is still running when its node is killed
            "command": ["/bin/sh", "-c", "sleep 3; cat"],
            "retry": {"max_attempts": MAX_ATTEMPTS, "backoff_ms": 100},
        }
        quick = {"name": "quick", "runtime": "process", "command": ["cat"]}
        for task in (spec, quick):
            response = client.call("POST", "/api/v1/tasks", json=task)
            assert response.status_code in (201, 409), response.text
        leader = client.leader()
        accepted: dict[str, str] = {}

        def invoke(i: int) -> None:
            accepted[f"k{i}"] = invoke_async(client, f"k{i}", "slow")

        for i in range(12):
            invoke(i)
        # Find a follower whose Spearlet reports work running (its own count, not a record
        # that may still be rolled back), and kill it mid-run.
        victim = None
        for _ in range(200):
            reported = client.call("GET", "/api/v1/nodes").json()["nodes"]
            busy = {n["node_id"] for n in reported if (n.get("running") or 0) > 0}
            followers = [n for n in cluster if n is not leader and n.node_id in busy]
            if followers:
                victim = followers[0]
                break
            time.sleep(0.02)
        assert victim is not None and victim.proc is not None, "no follower ran any work"
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        # Work keeps coming while the loss is detected; sync calls fail cleanly or succeed.
        for i in range(12, 24):
            invoke(i)
            answer = client.call("POST", "/api/v1/tasks/quick/invoke", content=b"sync")
            assert answer.status_code in (200, 502, 429), answer.text
            if answer.status_code == 502:
                error = answer.json()["error"]
                assert error["code"] == "node_lost" and victim.node_id in error["message"]
        lost_attempts = 0
        for key, execution_id in accepted.items():
            record = client.call(
                "GET", f"/api/v1/executions/{execution_id}", params={"wait_ms": 30000}
            ).json()
            assert record["status"] == "succeeded", record
            assert 1 <= record["attempts"] <= MAX_ATTEMPTS, record
            assert len(record["history"]) == record["attempts"], record
            for attempt in record["history"][:-1]:
                assert attempt["error"]["code"] == "node_lost", record
                assert attempt["node_id"] == victim.node_id, record
                lost_attempts += 1
            if record["attempts"] > 1:  # run again elsewhere (done before the kill: kept)
                assert record["node_id"] != victim.node_id, record
            output = client.call("GET", f"/api/v1/executions/{execution_id}/output")
            assert output.content == key.encode()
        assert lost_attempts >= 1, "the killed node's work was not run again"
        dead = client.call("GET", "/api/v1/nodes").json()["nodes"]
        assert {n["node_id"]: n["status"] for n in dead}.get(victim.node_id) != "online"
