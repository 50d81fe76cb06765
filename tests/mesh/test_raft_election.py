"""Raft-lite elections: bootstrap, timeouts, pre-vote, stickiness, check-quorum, terms."""

from __future__ import annotations

import random

import pytest

from spear.mesh.raft import RaftCore
from spear.mesh.raft_messages import (
    AppendEntries,
    AppendReply,
    PreVote,
    PreVoteReply,
    RaftMessage,
    RequestVote,
    VoteReply,
)
from spear.mesh.raft_types import (
    SIM,
    BootstrapError,
    HardState,
    NotLeaderError,
    Ready,
)
from tests.mesh.raft_harness import Cluster


def fresh(node_id: str = "a", seed: int = 0) -> RaftCore:
    return RaftCore(node_id=node_id, timings=SIM, rng=random.Random(seed), now=0.0)


def test_single_node_bootstrap_commits_immediately() -> None:
    core = fresh()
    ready = core.bootstrap(["a"], now=0.0)
    assert core.role == "leader" and core.term == 2 and core.leader_id == "a"
    assert [e.kind for e in ready.entries] == ["config", "noop"]
    assert [e.index for e in ready.committed] == [1, 2]
    assert ready.hard_state == HardState(term=2, voted_for="a")
    index, term, ready = core.propose(b"x", now=0.0)
    assert (index, term) == (3, 2)
    assert [e.data for e in ready.committed] == [b"x"] and ready.entries == ready.committed


def test_a_lone_voter_leads_again_at_its_first_tick_after_a_restart() -> None:
    first = fresh()
    ready = first.bootstrap(["a"], now=0.0)
    restarted = RaftCore(
        node_id="a",
        timings=SIM,
        rng=random.Random(1),
        now=50.0,
        hard_state=ready.hard_state,
        entries=ready.entries,
        applied=2,
    )
    assert restarted.status()["role"] == "follower" and restarted.next_deadline == 50.0
    restarted.tick(50.0)
    assert restarted.status()["role"] == "leader" and restarted.term == 3


def test_bootstrap_only_on_empty_state_and_only_as_a_voter() -> None:
    core = fresh()
    with pytest.raises(BootstrapError, match="not among the bootstrap voters"):
        core.bootstrap(["b", "c"], now=0.0)
    core.bootstrap(["a", "b", "c"], now=0.0)
    with pytest.raises(BootstrapError, match="already has raft state"):
        core.bootstrap(["a", "b", "c"], now=0.0)


@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("seed", range(3))
def test_cluster_elects_one_leader_within_bounds(size: int, seed: int) -> None:
    cluster = Cluster([f"n{i}" for i in range(size)], seed=seed)
    leader = cluster.elect(timeout=10 * SIM.election_timeout_max_s)
    term = cluster.core(leader).term
    assert all(cluster.core(n).leader_id == leader for n in cluster.nodes)
    assert all(cluster.core(n).term == term for n in cluster.nodes)
    # A healthy network keeps the leader: no spurious elections (heartbeats reset timers).
    cluster.advance(10 * SIM.election_timeout_max_s)
    assert cluster.leader() == leader and cluster.core(leader).term == term
    # The no-op of the new term is committed everywhere.
    assert all(cluster.core(n).commit_index == 2 for n in cluster.nodes)


def test_election_timeouts_are_randomized_per_election_within_range() -> None:
    draws = set()
    for seed in range(20):
        core = fresh(seed=seed)
        core.bootstrap(["a", "b", "c"], now=10.0)
        deadline = core.next_deadline
        assert 10.0 + SIM.election_timeout_min_s <= deadline < 10.0 + SIM.election_timeout_max_s
        core.tick(deadline)  # becomes a pre-candidate; a new timeout is drawn
        assert core.role == "pre-candidate"
        second = core.next_deadline - deadline
        assert SIM.election_timeout_min_s <= second < SIM.election_timeout_max_s
        draws |= {deadline, second}
    assert len(draws) == 40


def test_pre_vote_does_not_raise_the_term() -> None:
    core = fresh()
    core.bootstrap(["a", "b", "c"], now=0.0)
    ready = core.tick(core.next_deadline)
    assert core.role == "pre-candidate" and core.term == 1
    assert ready.hard_state is None
    assert {to for to, _ in ready.messages} == {"b", "c"}
    assert all(isinstance(m, PreVote) and m.term == 2 for _, m in ready.messages)


def test_vote_is_persisted_before_it_is_sent() -> None:
    core = fresh("b")
    core.bootstrap(["a", "b", "c"], now=0.0)
    ready = core.step(RequestVote(term=2, sender="a", last_log_index=1, last_log_term=1), now=0.0)
    assert ready.hard_state == HardState(term=2, voted_for="a")
    assert ready.messages == (("a", VoteReply(term=2, sender="b", granted=True)),)


def test_restart_never_votes_twice_in_a_term() -> None:
    core = fresh("b")
    core.bootstrap(["a", "b", "c"], now=0.0)
    ready = core.step(RequestVote(term=2, sender="a", last_log_index=1, last_log_term=1), 0.0)
    durable, entries = ready.hard_state, [e for e in core._log.slice(1, 2)]
    restarted = RaftCore(
        node_id="b",
        timings=SIM,
        rng=random.Random(1),
        now=0.0,
        hard_state=durable,
        entries=entries,
    )
    ready = restarted.step(
        RequestVote(term=2, sender="c", last_log_index=1, last_log_term=1), now=0.0
    )
    assert ready.messages == (("c", VoteReply(term=2, sender="b", granted=False)),)
    ready = restarted.step(
        RequestVote(term=2, sender="a", last_log_index=1, last_log_term=1), now=0.0
    )
    assert ready.messages == (("a", VoteReply(term=2, sender="b", granted=True)),)


def test_vote_denied_to_a_less_up_to_date_log() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    cluster.propose(leader, b"x")
    cluster.deliver_all()
    follower = next(n for n in cluster.nodes if n != leader)
    core = cluster.core(follower)
    last = core.last_index
    for last_index, last_term, granted in [
        (last - 1, core.term, False),  # same term, shorter
        (last + 5, core.term - 1, False),  # longer but older last term
        (last, core.term, True),
    ]:
        term = core.term + 1
        ready = core.step(
            RequestVote(
                term=term,
                sender="z",
                last_log_index=last_index,
                last_log_term=last_term,
                transfer=True,
            ),
            cluster.now,
        )
        assert ready.messages[-1][1] == VoteReply(term=term, sender=follower, granted=granted)


def test_stale_term_messages_are_rejected_with_the_newer_term() -> None:
    core = fresh("b")
    core.bootstrap(["a", "b", "c"], now=0.0)
    core.step(RequestVote(term=5, sender="a", last_log_index=1, last_log_term=1), 0.0)
    stale: list[tuple[RaftMessage, type]] = [
        (PreVote(term=3, sender="c", last_log_index=9, last_log_term=3), PreVoteReply),
        (RequestVote(term=4, sender="c", last_log_index=9, last_log_term=3), VoteReply),
        (
            AppendEntries(
                term=4, sender="c", prev_index=1, prev_term=1, entries=(), commit_index=1
            ),
            AppendReply,
        ),
    ]
    for message, reply_type in stale:
        ready = core.step(message, 0.0)
        ((to, reply),) = ready.messages
        assert to == "c" and isinstance(reply, reply_type) and reply.term == 5
        assert not getattr(reply, "granted", getattr(reply, "success", None))
    assert core.term == 5 and core.leader_id is None
    # Stale replies are dropped silently.
    assert not core.step(VoteReply(term=2, sender="c", granted=True), 0.0).messages


def test_stale_leader_steps_down_on_reply_with_newer_term() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    core = cluster.core(leader)
    ready = core.step(AppendReply(term=core.term + 3, sender="x", success=False), cluster.now)
    assert ready.hard_state is not None
    assert core.role == "follower" and core.term == ready.hard_state.term
    assert ready.soft_state is not None and ready.soft_state.role == "follower"


def test_pre_vote_keeps_a_rejoining_partitioned_follower_from_disrupting() -> None:
    cluster = Cluster(["a", "b", "c"], seed=3)
    leader = cluster.elect()
    term = cluster.core(leader).term
    outsider = next(n for n in cluster.nodes if n != leader)
    cluster.isolate(outsider)
    cluster.advance(10 * SIM.election_timeout_max_s)
    assert cluster.core(outsider).term == term  # pre-votes failed: no term inflation
    assert cluster.core(outsider).role == "pre-candidate"
    cluster.heal()
    cluster.advance(5 * SIM.election_timeout_max_s)
    assert cluster.leader() == leader and cluster.core(leader).term == term
    assert cluster.core(outsider).leader_id == leader


def test_sticky_leader_rejects_votes_while_leader_is_alive() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    follower = next(n for n in cluster.nodes if n != leader)
    core = cluster.core(follower)
    term = core.term
    last_index, last_term = core.last_index, core._log.last_term
    for message in (
        PreVote(term=term + 1, sender="z", last_log_index=last_index, last_log_term=last_term),
        RequestVote(term=term + 1, sender="z", last_log_index=last_index, last_log_term=last_term),
    ):
        ready = core.step(message, cluster.now)
        assert ready.messages[0][1] in (
            PreVoteReply(term=term, sender=follower, granted=False),
            VoteReply(term=term, sender=follower, granted=False),
        )
    assert core.term == term and core.leader_id == leader
    # A transfer request is the exception.
    ready = core.step(
        RequestVote(
            term=term + 1,
            sender="z",
            last_log_index=last_index,
            last_log_term=last_term,
            transfer=True,
        ),
        cluster.now,
    )
    assert ready.messages[0][1] == VoteReply(term=term + 1, sender=follower, granted=True)


def test_rejected_pre_vote_with_a_higher_term_catches_the_node_up() -> None:
    core = fresh("a")
    core.bootstrap(["a", "b", "c"], now=0.0)
    core.tick(core.next_deadline)
    assert core.role == "pre-candidate"
    core.step(PreVoteReply(term=7, sender="b", granted=False), 5.0)
    assert (core.term, core.role) == (7, "follower")


def test_check_quorum_steps_down_an_isolated_leader() -> None:
    cluster = Cluster(["a", "b", "c"], seed=1)
    leader = cluster.elect()
    cluster.isolate(leader)
    cut_at = cluster.now
    cluster.run_until(lambda: cluster.core(leader).role != "leader")
    # Within one check-quorum window (+ one heartbeat of tick granularity).
    window = SIM.election_timeout_min_s + SIM.heartbeat_interval_s
    assert cluster.now - cut_at <= window
    with pytest.raises(NotLeaderError):
        cluster.core(leader).propose(b"late", cluster.now)
    # The majority side elects a new leader of a higher term.
    new = cluster.elect()
    assert new != leader and cluster.core(new).term > cluster.core(leader).term


def test_learners_and_non_members_never_campaign() -> None:
    core = fresh("z")
    assert core.next_deadline == float("inf")
    assert not core.tick(1e6)
    assert core.role == "follower" and core.term == 0


def test_empty_ready_is_falsy() -> None:
    assert not Ready()
    assert Ready(failed_reads=("r",))


def test_a_leader_cut_off_past_the_check_quorum_window_knows_before_its_tick() -> None:
    cluster = Cluster(["a", "b", "c"], seed=4)
    leader = cluster.elect(timeout=10 * SIM.election_timeout_max_s)
    core = cluster.core(leader)
    assert core.holds_quorum_contact(cluster.now)
    # A pause (SIGSTOP, a long GC): no tick ran, no reply arrived, the window has passed.
    late = cluster.now + SIM.election_timeout_min_s + 0.01
    assert core.status()["role"] == "leader"
    assert not core.holds_quorum_contact(late)
    follower = next(n for n in ("a", "b", "c") if n != leader)
    assert not cluster.core(follower).holds_quorum_contact(cluster.now)
