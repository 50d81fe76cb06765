"""Raft-lite voter changes: promote, demote, remove, and the check that refuses a change
which would cost the cluster its quorum."""

from __future__ import annotations

import pytest

from spear.mesh.raft_messages import AppendEntries
from spear.mesh.raft_types import SIM, ConfigChangeError
from tests.mesh.raft_harness import Cluster


def commit_change(cluster: Cluster, leader: str, change: str, node_id: str) -> int:
    """Start a configuration change on the leader and deliver until it commits."""
    index, _, ready = getattr(cluster.core(leader), change)(node_id, cluster.now)
    cluster.handle(leader, ready)
    cluster.run_until(lambda: cluster.core(leader).commit_index >= index)
    return int(index)


def grown(ids: list[str], learner: str) -> tuple[Cluster, str]:
    """A cluster of voters `ids` with a caught-up learner `learner`, and its leader."""
    cluster = Cluster(ids)
    leader = cluster.elect()
    cluster.add_node(learner)
    commit_change(cluster, leader, "add_learner", learner)
    cluster.run_until(
        lambda: cluster.core(learner).commit_index == cluster.core(leader).commit_index
    )
    return cluster, leader


def test_a_promoted_learner_counts_towards_the_quorum() -> None:
    cluster, leader = grown(["a", "b", "c"], "d")
    commit_change(cluster, leader, "promote", "d")
    assert sorted(cluster.core(leader).voters) == ["a", "b", "c", "d"]
    cluster.run_until(lambda: "d" in cluster.core("d").voters)
    # Four voters: a quorum is three. With one old voter cut off, the leader needs d.
    other = next(n for n in ("a", "b", "c") if n != leader)
    cluster.isolate(other)
    cluster.blocked |= {(leader, "d"), ("d", leader)}
    index, _ = cluster.propose(leader, b"needs d")
    cluster.advance(SIM.election_timeout_min_s / 2)
    assert cluster.core(leader).commit_index < index
    cluster.blocked -= {(leader, "d"), ("d", leader)}
    cluster.run_until(lambda: cluster.core(leader).commit_index >= index)


def test_a_demoted_voter_keeps_the_log_but_no_longer_counts() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    victim = next(n for n in cluster.nodes if n != leader)
    commit_change(cluster, leader, "demote", victim)
    cluster.run_until(lambda: cluster.core(victim).role == "learner")
    assert cluster.core(leader).learners == (victim,)
    # The two voters left commit without it, and it still receives the log.
    index, _ = cluster.propose(leader, b"after")
    cluster.run_until(lambda: cluster.core(victim).commit_index >= index)
    cluster.isolate(victim)
    index, _ = cluster.propose(leader, b"without it")
    cluster.run_until(lambda: cluster.core(leader).commit_index >= index)


def test_a_demoted_leader_steps_down_once_the_change_commits() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    commit_change(cluster, leader, "demote", leader)
    cluster.deliver_all()
    assert cluster.core(leader).role == "learner"
    new = cluster.elect(other_than=leader)
    assert leader not in cluster.core(new).voters and leader in cluster.core(new).learners


def test_a_change_that_would_cost_the_quorum_is_refused() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    dead, alive = (n for n in cluster.nodes if n != leader)
    cluster.crash(dead)
    cluster.advance(SIM.election_timeout_max_s)  # the leader keeps its quorum with `alive`
    assert cluster.leader() == leader
    # Removing (or demoting) the live follower leaves the leader and a silent voter.
    for change in ("remove_node", "demote"):
        with pytest.raises(ConfigChangeError, match="fewer than their quorum of 2") as info:
            getattr(cluster.core(leader), change)(alive, cluster.now)
        assert alive in str(info.value) and "answered within" in str(info.value)
    # Removing the silent one is fine: the two left both answer.
    commit_change(cluster, leader, "remove_node", dead)
    assert sorted(cluster.core(leader).voters) == sorted([leader, alive])


def test_the_last_voter_cannot_go() -> None:
    solo = Cluster(["a"])
    solo.elect()
    for change in ("remove_node", "demote"):
        with pytest.raises(ConfigChangeError, match="would leave no voter"):
            getattr(solo.core("a"), change)("a", solo.now)


def test_refusals_name_the_node_and_the_rule() -> None:
    cluster, leader = grown(["a", "b", "c"], "d")
    core = cluster.core(leader)
    with pytest.raises(ConfigChangeError, match="node d is not a voter"):
        core.demote("d", cluster.now)
    with pytest.raises(ConfigChangeError, match="node b is not a learner"):
        core.promote("b", cluster.now)
    with pytest.raises(ConfigChangeError, match="node q is not a member"):
        core.remove_node("q", cluster.now)
    # A learner that stopped answering falls behind and is not promoted.
    cluster.isolate("d")
    for _ in range(3):
        cluster.propose(leader, b"x")
    cluster.deliver_all()
    with pytest.raises(ConfigChangeError, match=r"learner d has matched index .* caught up"):
        core.promote("d", cluster.now)


def test_a_removed_learner_no_longer_receives_the_log() -> None:
    cluster, leader = grown(["a", "b", "c"], "d")
    commit_change(cluster, leader, "remove_node", "d")
    cluster.deliver_all()
    cluster.propose(leader, b"after")
    assert not any(dst == "d" and isinstance(m, AppendEntries) for _, dst, m in cluster.pool)
    assert cluster.core(leader).membership.members == tuple(n for n in cluster.core(leader).voters)
