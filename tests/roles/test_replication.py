"""The Raft driver over real cores and stores: writes are acknowledged once committed and
applied, on every replica, and survive restarts, leader loss and snapshot installs."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from spear.errors import ConflictError
from spear.mesh.raft import RaftCore
from spear.mesh.raft_messages import RaftMessage
from spear.mesh.raft_types import SIM, NotLeaderError, RaftTimings
from spear.model import TaskRecord, TaskSpec, new_task_id
from spear.roles.raft_storage import RaftStorage
from spear.roles.replication import Replicator
from spear.roles.state import RegisterTask, SmsState
from spear.store import Store, open_store

_created = itertools.count(1)


def task(name: str) -> RegisterTask:
    """A task registration; tasks list in the order these were made."""
    spec = TaskSpec.model_validate({"name": name, "runtime": "process", "command": ["cat"]})
    record = TaskRecord(task_id=new_task_id(), spec=spec, created_at=float(next(_created)))
    return RegisterTask(record=record)


@dataclass
class Node:
    node_id: str
    store: Store
    state: SmsState
    replicator: Replicator
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class Cluster:
    """Replicators wired by direct delivery; links can be cut per node."""

    def __init__(self, nursery: trio.Nursery, timings: RaftTimings = SIM) -> None:
        self._nursery = nursery
        self._timings = timings
        self.nodes: dict[str, Node] = {}
        self.cut: set[str] = set()

    def _send(self, sender: str, to: str, message: RaftMessage) -> None:
        target = self.nodes.get(to)
        if target is not None and sender not in self.cut and to not in self.cut:
            target.replicator.deliver(message)

    async def start(self, node_id: str, store: Store, *, in_thread: bool = False) -> Node:
        state = SmsState(store)
        state.load()
        storage = RaftStorage(store, state)
        durable = storage.load()
        core = RaftCore(
            node_id=node_id,
            timings=self._timings,
            rng=random.Random(f"test:{node_id}"),
            now=trio.current_time(),
            hard_state=durable.hard_state,
            entries=durable.entries,
            snapshot=durable.snapshot,
            applied=durable.applied,
        )
        replicator = Replicator(
            core=core,
            storage=storage,
            state=state,
            send=lambda to, m: self._send(node_id, to, m),
            blocking_in_thread=in_thread,
        )
        node = self.nodes[node_id] = Node(node_id, store, state, replicator)

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with node.scope:
                await replicator.serve(task_status=task_status)

        await self._nursery.start(run)
        return node

    def crash(self, node_id: str) -> None:
        self.nodes.pop(node_id).scope.cancel()

    async def wait_leader(self) -> Node:
        """The leader of the highest term, once one is elected."""
        while True:
            leaders = [n for n in self.nodes.values() if n.replicator.soft_state.role == "leader"]
            if leaders:
                return max(leaders, key=lambda n: n.replicator.soft_state.term)
            async with trio.open_nursery() as nursery:
                for node in self.nodes.values():
                    nursery.start_soon(_first_change, node.replicator, nursery.cancel_scope)


async def _first_change(replicator: Replicator, scope: trio.CancelScope) -> None:
    await replicator.wait_soft_state_change()
    scope.cancel()


@pytest.fixture
async def cluster(nursery: trio.Nursery) -> AsyncIterator[Cluster]:
    yield Cluster(nursery)


async def start_three(cluster: Cluster) -> list[Node]:
    nodes = [await cluster.start(n, open_store("memory", None)) for n in ("a", "b", "c")]
    for node in nodes:
        await node.replicator.bootstrap(("a", "b", "c"))
    return nodes


async def test_a_lone_voter_commits_at_once_and_keeps_everything_across_a_restart(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cluster = Cluster(nursery)
    path = tmp_path / "store.sqlite"
    node = await cluster.start("solo", open_store("sqlite", path), in_thread=True)
    await node.replicator.bootstrap(("solo",))
    assert node.replicator.soft_state.role == "leader"
    await node.replicator.commit(task("first"))
    with pytest.raises(ConflictError):
        await node.replicator.commit(task("first"))
    cluster.crash("solo")
    node.store.close()

    again = await cluster.start("solo", open_store("sqlite", path), in_thread=True)
    assert [t.name for t in again.state.tasks()] == ["first"]
    await cluster.wait_leader()
    await again.replicator.commit(task("second"))
    assert [t.name for t in again.state.tasks()] == ["first", "second"]
    again.store.close()


async def test_three_voters_elect_one_leader_and_apply_every_write_everywhere(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = await start_three(cluster)
    leader = await cluster.wait_leader()
    for name in ("one", "two", "three"):
        await leader.replicator.commit(task(name))
    await leader.replicator.read_barrier()
    for node in nodes:
        await node.replicator.wait_applied(leader.replicator.core.commit_index)
        assert [t.name for t in node.state.tasks()] == ["one", "two", "three"]


async def test_a_follower_refuses_writes_and_names_the_leader(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    await start_three(cluster)
    leader = await cluster.wait_leader()
    follower = next(n for n in cluster.nodes.values() if n is not leader)
    await follower.replicator.wait_applied(1)  # it has heard from the leader
    with pytest.raises(NotLeaderError) as info:
        await follower.replicator.commit(task("x"))
    assert info.value.leader_id == leader.node_id
    with pytest.raises(NotLeaderError):
        await follower.replicator.read_barrier()


async def test_acknowledged_writes_survive_the_loss_of_the_leader(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    await start_three(cluster)
    leader = await cluster.wait_leader()
    await leader.replicator.commit(task("before"))
    cluster.crash(leader.node_id)
    survivor = await cluster.wait_leader()
    assert survivor is not leader
    await survivor.replicator.commit(task("after"))
    assert [t.name for t in survivor.state.tasks()] == ["before", "after"]


async def test_a_follower_far_behind_catches_up_through_a_snapshot(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    await start_three(cluster)
    leader = await cluster.wait_leader()
    behind = next(n for n in cluster.nodes.values() if n is not leader)
    cluster.cut.add(behind.node_id)
    names = [f"t{i:03d}" for i in range(SIM.snapshot_threshold_entries + 10)]
    for name in names:
        await leader.replicator.commit(task(name))
    assert leader.replicator.core.status()["snapshot_index"] > 0
    cluster.cut.clear()
    with trio.fail_after(30):
        await behind.replicator.wait_applied(leader.replicator.core.commit_index)
    assert sorted(t.name for t in behind.state.tasks()) == names
