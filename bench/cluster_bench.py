"""Warm WASM invocations through the gateway: a three-node cluster against one node.

    .venv/bin/python bench/cluster_bench.py [--seconds 2] [--rounds 3] [--concurrency 16]
        [--body-bytes N]

Starts one lone `spear node` and a three-node cluster (real processes on loopback, profile
lan-fast), registers the worker-mode WASM upper-caser (a reactor module) on both, and sends
sync invocations to the leader of each, and to a follower of the cluster (placed by the
leader: on itself, where the instances are warm; and pinned to that follower, which then
runs it with no data moving at all), measured in alternating rounds with the same lean
keep-alive client as bench/gateway_bench.py (medians reported). Every invocation on the
cluster is placed by its leader, so its rate is also the end-to-end placement rate on the
leader (issue target: >= 500/s). On a 2-core machine the ratio measures the overhead of
distribution (placement, the mesh hop to the chosen Spearlet and back), not scaling: the
three nodes share the same two cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import httpx
import trio
import wasmtime

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.gateway_bench import (  # noqa: E402
    BODY,
    REACTOR,
    Figures,
    free_port,
    load,
    median_figures,
    process,
)
from spear.mesh.handshake import join_token, new_cluster_key  # noqa: E402

TASK = "/api/v1/tasks/upper-w/invoke"
PINNED_TASK = "/api/v1/tasks/upper-p/invoke"


def node_argv(work: Path, name: str, http: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "spear",
        "node",
        "--name",
        name,
        "--data-dir",
        str(work / name),
        "--http",
        f"127.0.0.1:{http}",
        "--listen",
        f"127.0.0.1:{free_port()}",
        *extra,
    ]


def wait_leader(ports: list[int]) -> int:
    """The HTTP port of the node that leads, once every node knows it and it serves."""
    for _ in range(600):
        try:
            docs = [httpx.get(f"http://127.0.0.1:{p}/health", timeout=2).json() for p in ports]
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        leaders = {d.get("leader_id") for d in docs}
        serving = [p for p, d in zip(ports, docs, strict=True) if d.get("serving")]
        if len(leaders) == 1 and None not in leaders and len(serving) == 1:
            return serving[0]
        time.sleep(0.1)
    raise RuntimeError("the cluster elected no leader")


def register(port: int, *, pinned_to: int | None = None) -> None:
    """Register the worker-mode upper-caser as `upper-w`, and as `upper-p`: pinned to the node
    serving HTTP on `pinned_to` (unpinned without it), warmed through that node."""
    base = f"http://127.0.0.1:{port}"
    reactor = bytes(wasmtime.wat2wasm(REACTOR.read_text()))
    for _ in range(100):
        resp = httpx.post(f"{base}/api/v1/files", content=reactor, timeout=10)
        if resp.status_code == 201:
            break
        time.sleep(0.1)
    file_id = resp.json()["file_id"]
    spec = {"name": "upper-w", "runtime": "wasm", "mode": "worker", "artifact": file_id}
    httpx.post(f"{base}/api/v1/tasks", json=spec, timeout=30).raise_for_status()
    pinned: dict[str, object] = {**spec, "name": "upper-p"}
    via = base
    if pinned_to is not None:
        via = f"http://127.0.0.1:{pinned_to}"
        node_id = httpx.get(f"{via}/health", timeout=5).json()["node_id"]
        pinned["placement"] = {"node_id": node_id}
    httpx.post(f"{base}/api/v1/tasks", json=pinned, timeout=30).raise_for_status()
    # warm every node's pool: each node that gets a call starts an instance
    for task, url in ((TASK, base), (PINNED_TASK, via)):
        for _ in range(60):
            for _ in range(100):  # a pinned node is placeable once the leader has its report
                resp = httpx.post(f"{url}{task}", content=BODY, timeout=30)
                if resp.status_code != 503:
                    break
                time.sleep(0.1)
            resp.raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--body-bytes", type=int, default=0, help="input size (default: a 30-byte greeting)"
    )
    args = parser.parse_args()
    body = (BODY * (args.body_bytes // len(BODY) + 1))[: args.body_bytes] or BODY

    work = Path(tempfile.mkdtemp(prefix="spear-cluster-bench-"))
    env = {**os.environ, "SPEAR_NODE__LOG_LEVEL": "warning", "SPEAR_MESH__PROFILE": "lan-fast"}
    lone = free_port()
    cluster = [free_port() for _ in range(3)]
    token = join_token(new_cluster_key())
    seed_mesh = free_port()
    common = ["--join-token", token, "--bootstrap-expect", "3"]
    first = node_argv(work, "c1", cluster[0], *common)
    first[first.index("--listen") + 1] = f"127.0.0.1:{seed_mesh}"
    joiners = [
        node_argv(work, f"c{i + 2}", port, *common, "--join", f"127.0.0.1:{seed_mesh}")
        for i, port in enumerate(cluster[1:])
    ]
    with (
        process(node_argv(work, "lone", lone), "is serving", env=env),
        process(first, "serving", env=env),
        process(joiners[0], "serving", env=env),
        process(joiners[1], "serving", env=env),
    ):
        leader = wait_leader(cluster)
        follower = next(port for port in cluster if port != leader)
        register(lone)
        register(leader, pinned_to=follower)
        targets = {
            "1 node": (lone, TASK),
            "3 nodes (via the leader)": (leader, TASK),
            "3 nodes (via a follower)": (follower, TASK),
            "3 nodes (via a follower, run there)": (follower, PINNED_TASK),
        }
        runs: dict[tuple[str, int], list[Figures]] = {
            (name, c): [] for name in targets for c in (1, args.concurrency)
        }
        for _ in range(args.rounds):
            for (name, clients), figures in runs.items():
                port, path = targets[name]
                run = partial(
                    load,
                    port,
                    path,
                    clients=clients,
                    seconds=args.seconds,
                    expect=body.upper(),
                    body=body,
                )
                figures.append(trio.run(run))
    header = f"{'':<34} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9}"
    for clients in (1, args.concurrency):
        print(f"\n== {clients} client(s)\n{header}")
        for name in targets:
            print(median_figures(runs[(name, clients)]).row(name))
        one = median_figures(runs[("1 node", clients)])
        for way in ("the leader", "a follower", "a follower, run there"):
            three = median_figures(runs[(f"3 nodes (via {way})", clients)])
            print(
                f"3 nodes via {way} / 1 node: throughput {three.rps / one.rps:.2f}x"
                f"   p50 {three.p50_ms / one.p50_ms:.2f}x   p99 {three.p99_ms / one.p99_ms:.2f}x"
            )
    print(
        "\nplacements on the leader, end to end: "
        f"{median_figures(runs[('3 nodes (via the leader)', args.concurrency)]).rps:.0f}/s"
        " (target >= 500/s)"
    )


if __name__ == "__main__":
    main()
