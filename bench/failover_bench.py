"""Leader failover with real processes: `kill -9` of the leader until a write is accepted again.

Starts three `spear node` processes on loopback for each timing profile, then repeatedly:
finds the leader, kills it with SIGKILL, and times how long until a task registration
through a surviving node is acknowledged (201); the killed node is restarted and the
cluster settles before the next round. Then, as often, it kills a follower and times how
long until every other member's own gossip view (`/health` members) counts it dead.
Last, it kills a follower that runs an async execution and times how long until that
execution runs on another node (the lease rule of docs/dispatch.md).
Prints p50 / p99 per profile and their ratio to a floor: the profile's largest election
timeout for failover (no failover is faster than the followers' election timeout, drawn
from [min, max)), and suspicion mult x probe interval for detection (the shortest suspicion).

Usage: .venv/bin/python bench/failover_bench.py [--rounds 10] [--profiles lan,lan-fast]
       [--measure failover,detection,rerun]

The client polls every 10 ms (a write through the survivor, answered 503 at once while no
leader is known), so what is measured is the cluster's time, not a client's retry backoff.
Targets (issue: the mesh): lan p50 <= 1.5 s, p99 <= 2.5 s; lan-fast p50 <= 0.7 s;
crash -> dead at every member p50 <= 6 s (lan), <= 3 s (lan-fast); (issue: dispatch)
Spearlet kill -9 -> its async executions running elsewhere <= failure detection + 2 s.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from spear.mesh import RAFT_PROFILES, SWIM_PROFILES, join_token, new_cluster_key  # noqa: E402

POLL_S = 0.01


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Node:
    name: str
    data_dir: Path
    args: list[str]
    http: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    listen: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""

    def start(self, profile: str) -> None:
        argv = [sys.executable, "-m", "spear", "node", "--name", self.name]
        argv += ["--data-dir", str(self.data_dir), "--http", self.http, "--listen", self.listen]
        env = {**os.environ, "SPEAR_MESH__PROFILE": profile, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            argv + self.args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None


def wait_until(check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(POLL_S)
    raise SystemExit("the cluster did not settle in time")


def health(client: httpx.Client, node: Node) -> dict[str, object]:
    try:
        doc: dict[str, object] = client.get(f"http://{node.http}/health", timeout=1).json()
        return doc
    except (httpx.HTTPError, ValueError):
        return {}


def settled(client: httpx.Client, nodes: list[Node]) -> bool:
    """Every node up and agreeing on one leader that serves."""
    docs = [health(client, n) for n in nodes]
    leaders = {d.get("leader_id") for d in docs}
    serving = [d for d in docs if d.get("serving")]
    return len(leaders) == 1 and None not in leaders and len(serving) == 1


def write_ok(client: httpx.Client, node: Node, name: str) -> bool:
    spec = {"name": name, "runtime": "process", "command": ["cat"]}
    try:
        r = client.post(f"http://{node.http}/api/v1/tasks", json=spec, timeout=2)
    except httpx.HTTPError:
        return False
    return r.status_code in (201, 409)


def all_see_dead(client: httpx.Client, survivors: list[Node]) -> bool:
    """Every survivor's own gossip view counts a dead member."""
    views = [health(client, n).get("members") for n in survivors]
    return all(isinstance(v, dict) and v.get("dead", 0) >= 1 for v in views)


def none_dead(client: httpx.Client, nodes: list[Node]) -> bool:
    views = [health(client, n).get("members") for n in nodes]
    return all(isinstance(v, dict) and v.get("dead", 0) == 0 for v in views)


def running_on(client: httpx.Client, node: Node, execution_id: str) -> dict[str, object]:
    try:
        doc: dict[str, object] = client.get(
            f"http://{node.http}/api/v1/executions/{execution_id}", timeout=2
        ).json()
        return doc
    except (httpx.HTTPError, ValueError):
        return {}


def is_running(client: httpx.Client, via: Node, execution_id: str) -> bool:
    return running_on(client, via, execution_id).get("status") == "running"


def rerun_elsewhere(client: httpx.Client, via: Node, execution_id: str, victim: Node) -> bool:
    doc = running_on(client, via, execution_id)
    return doc.get("status") == "running" and doc.get("node_id") not in (None, victim.node_id)


def time_spearlet_loss(
    client: httpx.Client, nodes: list[Node], profile: str, rounds: int
) -> list[float]:
    """kill -9 of a follower running async work -> that work running on another node."""
    leader_id = health(client, nodes[0]).get("leader_id")
    leader = next(n for n in nodes if n.node_id == leader_id)
    spec = {
        "name": "slow",
        "runtime": "process",
        "command": ["/bin/sh", "-c", "sleep 60; cat"],
        "retry": {"max_attempts": 10, "backoff_ms": 0},
    }
    client.post(f"http://{leader.http}/api/v1/tasks", json=spec, timeout=10)
    times = []
    for _ in range(rounds):
        leader_id = health(client, nodes[0]).get("leader_id")
        leader = next(n for n in nodes if n.node_id == leader_id)
        victim, execution_id = None, ""
        while victim is None:
            r = client.post(
                f"http://{leader.http}/api/v1/tasks/slow/invoke?mode=async", content=b"x"
            )
            execution_id = r.json()["execution_id"]
            wait_until(partial(is_running, client, leader, execution_id))
            where = running_on(client, leader, execution_id).get("node_id")
            victim = next((n for n in nodes if n.node_id == where and n is not leader), None)
        victim.kill()
        started = time.monotonic()
        wait_until(partial(rerun_elsewhere, client, leader, execution_id, victim))
        times.append(time.monotonic() - started)
        victim.start(profile)
        wait_until(lambda: settled(client, nodes) and none_dead(client, nodes))
    return times


def run_profile(
    profile: str, rounds: int, work: Path, measure: set[str]
) -> tuple[list[float], list[float], list[float]]:
    token = join_token(new_cluster_key())
    common = ["--join-token", token, "--bootstrap-expect", "3"]
    nodes = [Node(f"n{i}", work / profile / f"n{i}", list(common)) for i in (1, 2, 3)]
    for node in nodes[1:]:
        node.args += ["--join", nodes[0].listen]
    times: list[float] = []
    detections: list[float] = []
    rerun: list[float] = []
    with httpx.Client() as client:
        try:
            for node in nodes:
                node.start(profile)
            wait_until(lambda: settled(client, nodes))
            for n in nodes:
                n.node_id = str(health(client, n)["node_id"])
            for i in range(rounds if "failover" in measure else 0):
                leader_id = health(client, nodes[0]).get("leader_id")
                victim = next(n for n in nodes if n.node_id == leader_id)
                survivor = next(n for n in nodes if n is not victim)
                victim.kill()
                started = time.monotonic()
                wait_until(partial(write_ok, client, survivor, f"{profile}-{i}"))
                times.append(time.monotonic() - started)
                victim.start(profile)
                wait_until(lambda: settled(client, nodes))
            for _ in range(rounds if "detection" in measure else 0):
                wait_until(lambda: none_dead(client, nodes))
                leader_id = health(client, nodes[0]).get("leader_id")
                victim = next(n for n in nodes if n.node_id != leader_id)
                survivors = [n for n in nodes if n is not victim]
                victim.kill()
                started = time.monotonic()
                wait_until(partial(all_see_dead, client, survivors))
                detections.append(time.monotonic() - started)
                victim.start(profile)
                wait_until(lambda: settled(client, nodes))
            if "rerun" in measure:
                wait_until(lambda: none_dead(client, nodes))
                rerun = time_spearlet_loss(client, nodes, profile, rounds)
        finally:
            for node in nodes:
                node.kill()
    return times, detections, rerun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--profiles", default="lan,lan-fast")
    parser.add_argument("--measure", default="failover,detection,rerun")
    args = parser.parse_args()
    measure = set(args.measure.split(","))
    with tempfile.TemporaryDirectory(prefix="spear-failover-") as tmp:
        for profile in args.profiles.split(","):
            times, detections, rerun = run_profile(profile, args.rounds, Path(tmp), measure)
            report(profile, times, detections, rerun)


def report(profile: str, times: list[float], detections: list[float], rerun: list[float]) -> None:
    if times:
        floor = RAFT_PROFILES[profile].election_timeout_max_s
        p50, p99 = _p50_p99(times)
        print(
            f"{profile:9s} kill -9 leader -> write accepted: p50 {p50:.3f} s"
            f" (x{p50 / floor:.2f} of the {floor} s max election timeout),"
            f" p99 {p99:.3f} s, over {len(times)} rounds"
        )
    detection_p50 = None
    if detections:
        swim = SWIM_PROFILES[profile]
        bound = swim.suspicion_mult * swim.probe_interval_s
        detection_p50, p99 = _p50_p99(detections)
        print(
            f"{profile:9s} kill -9 follower -> dead at every other member:"
            f" p50 {detection_p50:.3f} s (x{detection_p50 / bound:.2f} of suspicion mult x"
            f" probe interval, {bound} s), p99 {p99:.3f} s"
        )
    if rerun:
        p50, p99 = _p50_p99(rerun)
        ratio = (
            ""
            if detection_p50 is None
            else f" (x{p50 / (detection_p50 + 2.0):.2f} of detection p50 + 2 s)"
        )
        print(
            f"{profile:9s} kill -9 Spearlet -> its async work running elsewhere:"
            f" p50 {p50:.3f} s{ratio}, p99 {p99:.3f} s"
        )


def _p50_p99(values: list[float]) -> tuple[float, float]:
    p99 = max(values) if len(values) < 100 else statistics.quantiles(values, n=100)[98]
    return statistics.median(values), p99


if __name__ == "__main__":
    main()
