"""Three in-process nodes on real loopback sockets form one cluster: one leader serves the API
through every node's HTTP port, and what it acknowledged survives its loss."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from spear.config import load_config
from spear.node import NodeHandle, serve_node
from spear.roles.cluster import JOIN_TOKEN_FILE
from tests.roles.api_helpers import cluster_client, register_wasm


async def start_three(
    tmp_path: Path,
    nursery: trio.Nursery,
    per_node: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[NodeHandle], dict[str, trio.CancelScope]]:
    """Three voters (n1, n2, n3) with bootstrap_expect = 3; each runs in a scope a test may
    cancel. `per_node` adds settings by node name."""
    per_node = per_node or {}
    scopes: dict[str, trio.CancelScope] = {}

    async def run(
        name: str, extra: dict[str, Any], task_status: trio.TaskStatus[NodeHandle]
    ) -> None:
        settings: dict[str, Any] = {
            "node.name": name,
            "node.data_dir": str(tmp_path / name),
            "gateway.http": "127.0.0.1:0",
            "mesh.listen": "127.0.0.1:0",
            "mesh.profile": "lan-fast",
            "raft.bootstrap_expect": 3,
        }
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as own:
                overrides = settings | per_node.get(name, {}) | extra
                config = load_config(env={}, overrides=overrides)
                handle: NodeHandle = await own.start(serve_node, config)
                scopes[handle.node_id] = scope
                task_status.started(handle)

    first: NodeHandle = await nursery.start(run, "n1", {})
    token = (tmp_path / "n1" / JOIN_TOKEN_FILE).read_text().strip()
    joining = {"mesh.join": [first.cluster.mesh_address], "mesh.join_token": token}
    nodes = [first] + [await nursery.start(run, name, joining) for name in ("n2", "n3")]
    return nodes, scopes


async def wait_leader(nodes: Sequence[NodeHandle]) -> NodeHandle:
    """The leader, once it serves and every node in `nodes` knows it.

    The change watchers are started before each check, so a change between a check and the
    wait is never missed."""
    while True:
        async with trio.open_nursery() as race:
            for node in nodes:
                await race.start(then_cancel, node.cluster.replicator.wait_soft_state_change, race)
                await race.start(then_cancel, node.leader.wait_change, race)
            serving = [n for n in nodes if n.leader.service is not None]
            if len(serving) == 1:
                leader = serving[0]
                known = {n.cluster.replicator.soft_state.leader_id for n in nodes}
                if known == {leader.node_id}:
                    race.cancel_scope.cancel()
                    return leader


async def then_cancel(
    wait: Callable[[], Awaitable[object]],
    race: trio.Nursery,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    waiting = wait()  # runs up to its event's wait once awaited, with no checkpoint before
    task_status.started()
    await waiting
    race.cancel_scope.cancel()


async def test_three_nodes_elect_one_leader_and_every_node_serves_the_api(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    nodes, _ = await start_three(tmp_path, nursery)
    with trio.fail_after(30):
        leader = await wait_leader(nodes)
    followers = [n for n in nodes if n is not leader]
    async with cluster_client(followers[0].http_url) as api:
        await register_wasm(api, "upper", "upper")
        answer = await api.post("/api/v1/tasks/upper/invoke", content=b"via a follower")
        assert answer.content == b"VIA A FOLLOWER"
        # The leader placed it on one of the three Spearlets (the artifact travels there).
        assert answer.headers["x-spear-node"] in {n.node_id for n in nodes}
        cluster = (await api.get("/api/v1/cluster")).json()
    assert cluster["leader_id"] == leader.node_id
    assert sorted(cluster["voters"]) == sorted(n.node_id for n in nodes)
    assert {m["state"] for m in cluster["members"]} == {"alive"}
    for node in nodes:
        async with cluster_client(node.http_url) as api:
            tasks = (await api.get("/api/v1/tasks")).json()["tasks"]
            assert [t["name"] for t in tasks] == ["upper"]
            health = (await api.get("/health")).json()
            assert health["leader_id"] == leader.node_id


async def test_a_write_acknowledged_by_a_lost_leader_is_served_by_the_next(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    nodes, scopes = await start_three(tmp_path, nursery)
    with trio.fail_after(30):
        leader = await wait_leader(nodes)
    async with cluster_client(leader.http_url) as api:
        await register_wasm(api, "upper", "upper")
        accepted = await api.post("/api/v1/tasks/upper/invoke?mode=async", content=b"later")
        assert accepted.status_code == 202
    scopes[leader.node_id].cancel()
    survivors = [n for n in nodes if n is not leader]
    with trio.fail_after(30):
        successor = await wait_leader(survivors)
    async with cluster_client(successor.http_url) as api:
        tasks = (await api.get("/api/v1/tasks")).json()["tasks"]
        assert [t["name"] for t in tasks] == ["upper"]
        execution_id = accepted.json()["execution_id"]
        record = await api.get(f"/api/v1/executions/{execution_id}", params={"wait_ms": 20000})
        assert record.json()["status"] == "succeeded", record.text
        output = await api.get(f"/api/v1/executions/{execution_id}/output")
        assert output.content == b"LATER"
