"""Raft-lite read-index reads and leadership transfer."""

from __future__ import annotations

import pytest

from spear.mesh.raft_messages import AppendEntries, TimeoutNow
from spear.mesh.raft_types import SIM, ConfigChangeError, NotLeaderError, ReadState
from tests.mesh.raft_harness import Cluster


def test_single_voter_read_is_confirmed_at_once() -> None:
    cluster = Cluster(["a"])
    core = cluster.core("a")
    ready = core.read_index("r1", cluster.now)
    assert ready.read_states == (ReadState(request_id="r1", index=core.commit_index),)


def test_read_waits_for_a_quorum_heartbeat_round() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    cluster.propose(leader, b"x")
    cluster.deliver_all()
    core = cluster.core(leader)
    commit = core.commit_index
    ready = core.read_index("r1", cluster.now)
    cluster.handle(leader, ready)
    assert not ready.read_states
    beats = [m for _, _, m in cluster.pool if isinstance(m, AppendEntries)]
    assert len(beats) == 2 and all(m.read_context > 0 for m in beats)
    cluster.deliver()  # one heartbeat reaches a follower...
    assert not cluster.nodes[leader].read_states
    cluster.deliver()
    cluster.deliver()  # ...and its answer comes back: leader + 1 = a quorum
    assert cluster.nodes[leader].read_states == [ReadState(request_id="r1", index=commit)]


def test_read_on_a_new_leader_waits_for_its_first_commit() -> None:
    cluster = Cluster(["a", "b", "c"])
    cluster.now += SIM.election_timeout_max_s
    cluster.tick("a")
    cluster.deliver_where(lambda env: not isinstance(env[2], AppendEntries))
    core = cluster.core("a")
    assert core.role == "leader"
    cluster.handle("a", core.read_index("r1", cluster.now))
    assert not cluster.nodes["a"].read_states
    cluster.advance(SIM.heartbeat_interval_s)
    assert core.commit_index == core.last_index  # the no-op committed...
    cluster.deliver_all()
    (state,) = cluster.nodes["a"].read_states  # ...then the read was confirmed at it
    assert state == ReadState(request_id="r1", index=core.commit_index)


def test_leader_that_steps_down_fails_its_pending_reads() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    cluster.isolate(leader)
    cluster.handle(leader, cluster.core(leader).read_index("r1", cluster.now))
    cluster.run_until(lambda: cluster.core(leader).role != "leader")
    assert cluster.nodes[leader].read_states == []
    assert cluster.nodes[leader].failed_reads == ["r1"]


def test_read_on_a_follower_is_refused_with_the_leader() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    follower = next(n for n in cluster.nodes if n != leader)
    with pytest.raises(NotLeaderError) as info:
        cluster.core(follower).read_index("r1", cluster.now)
    assert info.value.leader_id == leader


def test_transfer_leadership_hands_over_without_waiting_for_a_timeout() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    target = next(n for n in cluster.nodes if n != leader)
    term = cluster.core(leader).term
    cluster.handle(leader, cluster.core(leader).transfer_leadership(target, cluster.now))
    with pytest.raises(NotLeaderError):
        cluster.core(leader).propose(b"x", cluster.now)
    assert any(isinstance(m, TimeoutNow) for _, to, m in cluster.pool if to == target)
    cluster.deliver_all()  # no time passes
    assert cluster.leader() == target and cluster.core(target).term == term + 1


def test_transfer_to_a_lagging_target_catches_it_up_first() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    target = next(n for n in cluster.nodes if n != leader)
    cluster.isolate(target)
    for i in range(12):
        cluster.propose(leader, f"v{i}".encode())
    cluster.deliver_all()
    cluster.heal()
    cluster.handle(leader, cluster.core(leader).transfer_leadership(target, cluster.now))
    assert not any(isinstance(m, TimeoutNow) for _, _, m in cluster.pool)
    term = cluster.core(leader).term
    cluster.advance(SIM.append_timeout_s + SIM.heartbeat_interval_s)
    assert cluster.leader() == target and cluster.core(target).term == term + 1


def test_transfer_times_out_and_the_leader_takes_writes_again() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    target = next(n for n in cluster.nodes if n != leader)
    cluster.crash(target)
    cluster.handle(leader, cluster.core(leader).transfer_leadership(target, cluster.now))
    cluster.advance(SIM.election_timeout_min_s + SIM.heartbeat_interval_s)
    assert cluster.leader() == leader
    cluster.propose(leader, b"x")
    with pytest.raises(ConfigChangeError):
        cluster.core(leader).transfer_leadership(leader, cluster.now)
