"""Raft-lite configuration: bootstrap choice, learners, promotion, removal, one at a time."""

from __future__ import annotations

import math

import pytest

from spear.mesh.raft import BootstrapCandidate, choose_bootstrap_voters
from spear.mesh.raft_config import Membership
from spear.mesh.raft_messages import AppendEntries
from spear.mesh.raft_types import SIM, ConfigChangeError
from tests.mesh.raft_harness import Cluster


def cand(node_id: str, *, state: bool = False, expect: int = 3) -> BootstrapCandidate:
    return BootstrapCandidate(node_id=node_id, has_raft_state=state, bootstrap_expect=expect)


def test_choose_bootstrap_voters_waits_for_expect_and_picks_the_lowest_ids() -> None:
    assert choose_bootstrap_voters([cand("c"), cand("a")], 3) is None
    assert choose_bootstrap_voters([cand("d"), cand("b"), cand("a"), cand("c")], 3) == (
        "a",
        "b",
        "c",
    )
    # Duplicates in the gossip view count once.
    assert choose_bootstrap_voters([cand("a"), cand("a"), cand("b")], 3) is None


def test_choose_bootstrap_voters_refuses_when_anyone_has_state_or_disagrees() -> None:
    assert choose_bootstrap_voters([cand("a"), cand("b"), cand("c", state=True)], 3) is None
    assert choose_bootstrap_voters([cand("a"), cand("b"), cand("c", expect=5)], 3) is None
    assert choose_bootstrap_voters([cand("a", expect=1)], 1) == ("a",)


def test_membership_encoding_is_canonical() -> None:
    one = Membership(voters=("b", "a"), learners=("z",))
    two = Membership(voters=("a", "b"), learners=("z",))
    assert one.encode() == two.encode()
    assert Membership.decode(one.encode()) == two


def grow(cluster: Cluster, leader: str, node_id: str) -> None:
    cluster.add_node(node_id)
    _, _, ready = cluster.core(leader).add_learner(node_id, cluster.now)
    cluster.handle(leader, ready)
    cluster.deliver_all()
    cluster.advance(SIM.heartbeat_interval_s)


def test_learner_receives_the_log_but_never_votes_or_counts() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    grow(cluster, leader, "d")
    d = cluster.core("d")
    assert d.role == "learner" and d.learners == ("d",)
    assert d.commit_index == cluster.core(leader).commit_index
    assert d.next_deadline == math.inf
    # A learner does not count towards a quorum.
    followers = [n for n in ("a", "b", "c") if n != leader]
    cluster.partition([leader, "d"], followers)
    index, _ = cluster.propose(leader, b"x")
    cluster.advance(0.5 * SIM.election_timeout_min_s)
    assert cluster.core(leader).commit_index < index
    assert cluster.core("d").last_index >= index


def test_promote_only_a_caught_up_learner_then_it_votes() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    cluster.add_node("d")
    cluster.isolate("d")
    _, _, ready = cluster.core(leader).add_learner("d", cluster.now)
    cluster.handle(leader, ready)
    cluster.deliver_all()
    cluster.advance(SIM.heartbeat_interval_s)
    with pytest.raises(ConfigChangeError, match="behind the commit index"):
        cluster.core(leader).promote("d", cluster.now)
    cluster.heal()
    cluster.advance(SIM.heartbeat_interval_s)
    _, _, ready = cluster.core(leader).promote("d", cluster.now)
    cluster.handle(leader, ready)
    cluster.deliver_all()
    cluster.advance(SIM.heartbeat_interval_s)
    for node_id in cluster.nodes:
        assert cluster.core(node_id).voters == ("a", "b", "c", "d")
    assert cluster.core("d").role == "follower" and cluster.core("d").next_deadline < math.inf
    # Four voters: a quorum is three.
    others = [n for n in ("a", "b", "c") if n != leader]
    cluster.partition([leader, others[0]], [others[1], "d"])
    index, _ = cluster.propose(leader, b"x")
    cluster.advance(0.5 * SIM.election_timeout_min_s)
    assert cluster.core(leader).commit_index < index


def test_one_config_change_at_a_time() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    cluster.add_node("d")
    _, _, ready = cluster.core(leader).add_learner("d", cluster.now)
    cluster.handle(leader, ready)
    with pytest.raises(ConfigChangeError, match="one change at a time"):
        cluster.core(leader).add_learner("e", cluster.now)
    cluster.deliver_all()
    _, _, ready = cluster.core(leader).add_learner("e", cluster.now)  # committed: allowed


def test_config_change_needs_a_commit_in_the_leaders_term() -> None:
    cluster = Cluster(["a", "b", "c"])
    cluster.now += SIM.election_timeout_max_s
    cluster.tick("a")  # a campaigns first; its no-op is not delivered yet
    cluster.deliver_where(lambda env: not isinstance(env[2], AppendEntries))
    core = cluster.core("a")
    assert core.role == "leader" and core.commit_index < core.last_index
    with pytest.raises(ConfigChangeError, match="has not committed an entry"):
        core.add_learner("z", cluster.now)
    cluster.tick("a")
    cluster.advance(SIM.heartbeat_interval_s)
    cluster.handle("a", core.add_learner("z", cluster.now)[2])
    assert core.learners == ("z",)


def test_refusals_name_the_node() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    core = cluster.core(leader)
    with pytest.raises(ConfigChangeError, match="already a member"):
        core.add_learner("b", cluster.now)
    with pytest.raises(ConfigChangeError, match="not a learner"):
        core.promote("b", cluster.now)
    with pytest.raises(ConfigChangeError, match="not a member"):
        core.remove_node("q", cluster.now)
    solo = Cluster(["a"])
    with pytest.raises(ConfigChangeError, match="no voter"):
        solo.core("a").remove_node("a", solo.now)


def test_removed_voter_cannot_disrupt_the_cluster() -> None:
    cluster = Cluster(["a", "b", "c", "d"])
    leader = cluster.elect()
    victim = next(n for n in cluster.nodes if n != leader)
    _, _, ready = cluster.core(leader).remove_node(victim, cluster.now)
    cluster.handle(leader, ready)
    cluster.deliver_all()
    cluster.advance(SIM.heartbeat_interval_s)
    term = cluster.core(leader).term
    cluster.advance(10 * SIM.election_timeout_max_s)
    assert cluster.leader() == leader and cluster.core(leader).term == term
    for node_id in cluster.nodes:
        if node_id != victim:
            assert victim not in cluster.core(node_id).voters


def test_removed_leader_steps_down_once_the_change_commits() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    index, _, ready = cluster.core(leader).remove_node(leader, cluster.now)
    cluster.handle(leader, ready)
    assert cluster.core(leader).role == "leader"  # until the change commits
    cluster.deliver_all()
    old = cluster.core(leader)
    assert old.role == "follower" and old.commit_index >= index
    assert old.next_deadline == math.inf  # it never campaigns again
    new = cluster.elect(other_than=leader)
    assert cluster.core(new).voters == tuple(n for n in ("a", "b", "c") if n != leader)
    # The two remaining voters commit on their own.
    idx, _ = cluster.propose(new, b"after")
    cluster.deliver_all()
    assert cluster.core(new).commit_index >= idx


def test_configuration_survives_restart_from_the_log() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    grow(cluster, leader, "d")
    for node_id in list(cluster.nodes):
        cluster.crash(node_id)
    for node_id in list(cluster.nodes):
        cluster.restart(node_id)
    assert all(cluster.core(n).learners == ("d",) for n in cluster.nodes)
    cluster.elect()
