"""Changing a running cluster's voters through the HTTP API of in-process nodes on real
loopback sockets, and a snapshot many times the mesh's frame cap reaching a new member in
pieces."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from spear.config import load_config
from spear.mesh import MemberState
from spear.node import NodeHandle, serve_node
from spear.roles.cluster import JOIN_TOKEN_FILE, raft_payload_bytes
from tests.roles.api_helpers import cluster_client, register
from tests.roles.test_cluster import then_cancel, wait_leader

FRAME_CAP = 64 * 1024


class Nodes:
    """In-process nodes started in a test's nursery, each in a scope the test may cancel."""

    def __init__(self, tmp_path: Path, nursery: trio.Nursery, **settings: Any) -> None:
        self._tmp = tmp_path
        self._nursery = nursery
        self._settings = settings
        self.scopes: dict[str, trio.CancelScope] = {}
        self.by_name: dict[str, NodeHandle] = {}

    async def start(self, name: str, **extra: Any) -> NodeHandle:
        """Start node `name`; every node after the first joins the first."""
        settings: dict[str, Any] = {
            "node.name": name,
            "node.data_dir": str(self._tmp / name),
            "gateway.http": "127.0.0.1:0",
            "mesh.listen": "127.0.0.1:0",
            "mesh.profile": "lan-fast",
        }
        if self.by_name:
            first = next(iter(self.by_name.values()))
            token = (first.data_dir / JOIN_TOKEN_FILE).read_text().strip()
            settings |= {"mesh.join": [first.cluster.mesh_address], "mesh.join_token": token}
        overrides = settings | self._settings | extra

        async def run(task_status: trio.TaskStatus[NodeHandle]) -> None:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as own:
                    config = load_config(env={}, overrides=overrides)
                    handle: NodeHandle = await own.start(serve_node, config)
                    self.scopes[handle.node_id] = scope
                    task_status.started(handle)

        handle: NodeHandle = await self._nursery.start(run)
        self.by_name[name] = handle
        return handle

    def stop(self, node: NodeHandle) -> None:
        self.scopes[node.node_id].cancel()


async def until(node: NodeHandle, condition: Callable[[], bool]) -> None:
    """Wait until `condition()` holds, checking it whenever `node` applies an entry, its
    view of the mesh changes or its role changes (the watchers start before each check, so a
    change between a check and the wait is never missed)."""
    replicator, gossip = node.cluster.replicator, node.cluster.gossip
    while True:
        async with trio.open_nursery() as race:
            applied = partial(replicator.wait_applied, replicator.core.applied_index + 1)
            for wait in (applied, gossip.wait_change, replicator.wait_soft_state_change):
                await race.start(then_cancel, wait, race)
            if condition():
                race.cancel_scope.cancel()
                return


def is_learner(leader: NodeHandle, node_id: str) -> Callable[[], bool]:
    return lambda: node_id in leader.cluster.replicator.core.learners


def state_of(leader: NodeHandle, node_id: str) -> MemberState | None:
    member = leader.cluster.gossip.member(node_id)
    return None if member is None else member.state


async def register_process(api: httpx.AsyncClient, name: str, pad_bytes: int = 0) -> None:
    env = {"PAD": "x" * pad_bytes} if pad_bytes else {}
    await register(
        api, name=name, runtime="process", command=[sys.executable, "-c", "pass"], env=env
    )


def voters(doc: dict[str, Any]) -> list[str]:
    return sorted(doc["voters"])


async def test_promote_a_learner_then_remove_a_failed_voter(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    nodes = Nodes(tmp_path, nursery, **{"raft.bootstrap_expect": 3})
    originals = [await nodes.start(name) for name in ("n1", "n2", "n3")]
    spare = await nodes.start("n4", **{"raft.bootstrap_expect": 1})  # joins as a learner
    with trio.fail_after(60):
        leader = await wait_leader(originals)
        await until(leader, is_learner(leader, spare.node_id))
    follower, other = (n for n in originals if n is not leader)

    async with cluster_client(follower.http_url) as api:  # a follower forwards to the leader
        # Bad input first: an unknown node, a voter to promote, a live member to remove.
        missing = await api.post("/api/v1/cluster/voters/n9")
        assert missing.status_code == 404, missing.text
        assert missing.json()["field"] == "node_id" and "'n9'" in missing.json()["message"]
        voter = await api.post(f"/api/v1/cluster/voters/{other.node_id}")
        assert voter.status_code == 409, voter.text
        assert voter.json()["error"] == "config_change_refused"
        assert "is not a learner" in voter.json()["message"]
        alive = await api.delete(f"/api/v1/cluster/members/{other.node_id}")
        assert alive.status_code == 409 and "alive in the mesh" in alive.json()["message"]

        # Promote by name: answered once committed, the new voter listed.
        promoted = await api.post("/api/v1/cluster/voters/n4")
        assert promoted.status_code == 200, promoted.text
        assert spare.node_id in promoted.json()["voters"]
        assert spare.node_id not in promoted.json()["raft"]["learners"]

        # Four voters need three: with `follower` gone, a write commits only with n4's ack.
        nodes.stop(follower)
    async with cluster_client(leader.http_url) as api:
        await register_process(api, "needs-n4")
        with trio.fail_after(60):
            await until(leader, lambda: state_of(leader, follower.node_id) is MemberState.DEAD)
        removed = await api.delete(f"/api/v1/cluster/members/{follower.node_id}")
        assert removed.status_code == 200, removed.text
        assert voters(removed.json()) == sorted([leader.node_id, other.node_id, spare.node_id])
        await register_process(api, "after-removal")  # three voters commit without it
        tasks = (await api.get("/api/v1/tasks")).json()["tasks"]
        assert {t["name"] for t in tasks} == {"needs-n4", "after-removal"}

        # With `other` gone too, demoting n4 would leave the leader and a silent voter.
        nodes.stop(other)
        with trio.fail_after(60):
            await until(leader, lambda: state_of(leader, other.node_id) is MemberState.DEAD)
        refused = await api.delete(f"/api/v1/cluster/voters/{spare.node_id}")
        assert refused.status_code == 409, refused.text
        assert "fewer than their quorum of 2" in refused.json()["message"]
        assert refused.json()["field"] == "node_id"


async def test_demote_a_voter_and_transfer_leadership(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    nodes = Nodes(tmp_path, nursery, **{"raft.bootstrap_expect": 3})
    originals = [await nodes.start(name) for name in ("n1", "n2", "n3")]
    with trio.fail_after(60):
        leader = await wait_leader(originals)
    follower, other = (n for n in originals if n is not leader)
    async with cluster_client(follower.http_url) as api:
        demoted = await api.delete(f"/api/v1/cluster/voters/{follower.name}")
        assert demoted.status_code == 200, demoted.text
        assert voters(demoted.json()) == sorted([leader.node_id, other.node_id])
        assert demoted.json()["raft"]["learners"] == [follower.node_id]
        again = await api.delete(f"/api/v1/cluster/voters/{follower.node_id}")
        assert again.status_code == 409 and "is not a voter" in again.json()["message"]
        # The demoted node still follows the log: a write reaches it.
        await register_process(api, "seen-by-learner")
    with trio.fail_after(60):
        await until(follower, lambda: follower.cluster.replicator.core.role == "learner")
        await until(
            follower,
            lambda: any(t.name == "seen-by-learner" for t in _tasks(follower)),
        )

    async with cluster_client(leader.http_url) as api:
        bad = await api.post("/api/v1/cluster/leader", json={"node": other.node_id})
        assert bad.status_code == 422 and bad.json()["field"] == "node_id"
        assert bad.json()["message"].startswith("node_id is required")
        learner = await api.post("/api/v1/cluster/leader", json={"node_id": follower.node_id})
        assert learner.status_code == 409 and "not another voter" in learner.json()["message"]
        moved = await api.post("/api/v1/cluster/leader", json={"node_id": other.name})
        assert moved.status_code == 200, moved.text
    with trio.fail_after(60):
        new = await wait_leader([leader, other])
    assert new is other


async def test_a_snapshot_larger_than_the_frame_cap_reaches_a_new_member_in_pieces(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The loopback profile compacts every 256 entries; a member joining afterwards can only
    catch up from the snapshot, which is several times mesh.max_frame_bytes."""
    nodes = Nodes(tmp_path, nursery, **{"mesh.max_frame_bytes": FRAME_CAP})
    first = await nodes.start("n1", **{"mesh.profile": "loopback"})
    async with cluster_client(first.http_url) as api:
        limit = trio.CapacityLimiter(8)

        async def one(i: int) -> None:
            async with limit:
                await register_process(api, f"t{i:03d}", pad_bytes=1500)

        async with trio.open_nursery() as writers:
            for i in range(300):
                writers.start_soon(one, i)
    raft = first.cluster.status()["raft"]
    assert raft["snapshot_index"] > 0
    assert raft["snapshot_bytes"] > 4 * FRAME_CAP > 4 * raft_payload_bytes(FRAME_CAP)

    second = await nodes.start("n2", **{"mesh.profile": "loopback"})
    with trio.fail_after(60):
        await until(second, lambda: len(_tasks(second)) == 300)
    status = second.cluster.status()["raft"]
    assert status["role"] == "learner" and status["snapshot_index"] >= raft["snapshot_index"]
    names = {t.name for t in _tasks(second)}
    assert names == {f"t{i:03d}" for i in range(300)}

    # An entry larger than the frame cap cannot reach the learner; the leader (the only
    # voter) still commits it and keeps running.
    async with cluster_client(first.http_url) as api:
        await register_process(api, "huge", pad_bytes=2 * FRAME_CAP)
        await register_process(api, "after-huge")
        assert len((await api.get("/api/v1/tasks")).json()["tasks"]) == 302


def _tasks(node: NodeHandle) -> Sequence[Any]:
    return node.cluster.replicator._state.tasks()
