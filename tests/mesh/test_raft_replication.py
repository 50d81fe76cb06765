"""Raft-lite log replication: commit, catch-up, conflicts, Figure 8, snapshots."""

from __future__ import annotations

import dataclasses

import pytest

from spear.mesh.raft_messages import AppendEntries, AppendReply
from spear.mesh.raft_types import SIM, Entry, NotLeaderError
from tests.mesh.raft_harness import Cluster, Envelope


def campaign(cluster: Cluster, node_id: str) -> None:
    """Fire `node_id`'s election timer before anyone else's (others are not ticked)."""
    cluster.now += SIM.election_timeout_max_s
    cluster.tick(node_id)


def test_replication_commits_on_a_majority_and_applies_everywhere() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    index, term = cluster.propose(leader, b"x")
    assert cluster.core(leader).commit_index < index
    cluster.deliver_all()
    assert cluster.core(leader).commit_index == index
    cluster.advance(SIM.heartbeat_interval_s)  # followers learn the commit on the next beat
    for node in cluster.nodes.values():
        assert node.applied[index] == Entry(index=index, term=term, kind="command", data=b"x")


def test_no_commit_without_a_majority() -> None:
    cluster = Cluster(["a", "b", "c", "d", "e"])
    leader = cluster.elect()
    others = [n for n in cluster.nodes if n != leader]
    cluster.partition([leader, others[0]], others[1:])
    index, _ = cluster.propose(leader, b"x")
    cluster.advance(0.5 * SIM.election_timeout_min_s)
    assert cluster.core(leader).commit_index < index
    assert all(index not in cluster.nodes[n].applied for n in cluster.nodes)


def test_follower_far_behind_catches_up_in_batches() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    lagging = next(n for n in cluster.nodes if n != leader)
    cluster.isolate(lagging)
    for i in range(40):
        cluster.propose(leader, f"v{i}".encode())
    cluster.deliver_all()
    cluster.heal()
    cluster.run_until(lambda: cluster.core(lagging).last_index == cluster.core(leader).last_index)
    assert cluster.core(lagging).last_index == cluster.core(leader).last_index
    cluster.advance(SIM.heartbeat_interval_s)
    assert cluster.core(lagging).commit_index == cluster.core(leader).commit_index


def test_appends_are_batched_and_not_pipelined() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    for i in range(20):
        cluster.propose(leader, f"v{i}".encode())
    appends = [m for _, _, m in cluster.pool if isinstance(m, AppendEntries) and m.entries]
    # One batch in flight per follower; later proposals wait for the reply.
    assert len(appends) == 2
    cluster.deliver_all()
    assert cluster.core(leader).commit_index == cluster.core(leader).last_index


def test_lost_append_is_resent_after_the_append_timeout() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    index, _ = cluster.propose(leader, b"x")
    cluster.pool.clear()  # every append of the entry is lost
    cluster.advance(SIM.append_timeout_s + SIM.heartbeat_interval_s)
    assert cluster.core(leader).commit_index >= index


def test_conflicting_follower_entries_are_truncated() -> None:
    cluster = Cluster(["a", "b", "c"], seed=2)
    old = cluster.elect()
    cluster.isolate(old)
    lost = [cluster.propose(old, f"lost{i}".encode()) for i in range(5)]
    cluster.pool.clear()
    new = cluster.elect(other_than=old)
    kept = [cluster.propose(new, f"kept{i}".encode()) for i in range(3)]
    cluster.deliver_all()
    cluster.heal()
    cluster.run_until(lambda: cluster.core(old).commit_index == cluster.core(new).commit_index)
    log = cluster.core(old)._log
    for index, term in lost:
        assert log.term_at(index) != term  # the uncommitted suffix was replaced
    for index, term in kept:
        assert cluster.nodes[old].applied[index].term == term
    assert cluster.core(old).role == "follower"


def test_reject_hint_skips_a_whole_conflicting_term() -> None:
    cluster = Cluster(["a", "b", "c"], seed=2)
    old = cluster.elect()
    cluster.isolate(old)
    for i in range(20):
        cluster.propose(old, f"lost{i}".encode())
    cluster.pool.clear()
    new = cluster.elect(other_than=old)
    for i in range(30):
        cluster.propose(new, f"kept{i}".encode())
        cluster.deliver_all()
    # A fresh leader (new progress: next = its last index + 1) meets the stale log.
    cluster.crash(new)
    cluster.restart(new)
    fresh = cluster.elect(other_than=old)
    cluster.heal()
    rejects = 0
    while cluster.core(old).commit_index < cluster.core(fresh).commit_index:
        cluster.advance(SIM.heartbeat_interval_s, deliver=False)
        while cluster.pool:
            env = cluster.deliver()
            if env is not None and isinstance(env[2], AppendReply) and not env[2].success:
                rejects += 1
    # Without the hint the leader would back off one entry per round trip (~30 rejects):
    # one for the short log, one to skip the whole conflicting term.
    assert rejects <= 2
    assert cluster.core(old)._log.last_term == cluster.core(fresh).term


def test_figure_8_previous_term_entry_is_not_committed_by_counting() -> None:
    timings = dataclasses.replace(SIM, max_entries_per_append=1)
    cluster = Cluster(["s1", "s2", "s3", "s4", "s5"], timings=timings)
    # (a) s1 leads term 2 and replicates entry 3 only to s2.
    campaign(cluster, "s1")
    cluster.deliver_all()
    assert cluster.core("s1").role == "leader" and cluster.core("s1").term == 2
    cluster.advance(timings.heartbeat_interval_s)
    old_index, old_term = cluster.propose("s1", b"figure8")
    cluster.deliver_where(lambda env: "s2" in env[:2])
    assert cluster.core("s2")._log.term_at(old_index) == old_term
    assert cluster.core("s1").commit_index < old_index
    # (b) s1 crashes; s5 wins term 3 with s3, s4 and appends its own entry at that index.
    cluster.crash("s1")
    campaign(cluster, "s5")
    cluster.deliver_where(lambda env: not isinstance(env[2], AppendEntries))
    assert cluster.core("s5").role == "leader" and cluster.core("s5").term == 3
    cluster.pool.clear()
    cluster.crash("s5")
    # (c) s1 restarts, wins term 4 (after catching up on terms) and copies the term-2 entry
    # to s3: it sits on a majority (s1, s2, s3) but is from an older term.
    cluster.restart("s1")
    for _ in range(2):
        campaign(cluster, "s1")
        cluster.deliver_where(lambda env: not isinstance(env[2], AppendEntries))
    s1 = cluster.core("s1")
    assert s1.role == "leader" and s1.term == 4

    def no_term_4(env: Envelope) -> bool:
        message = env[2]
        return not (
            isinstance(message, AppendEntries) and any(e.term == 4 for e in message.entries)
        )

    for _ in range(6):
        cluster.tick("s1")
        cluster.deliver_where(no_term_4)
        cluster.now += timings.heartbeat_interval_s
    assert cluster.core("s3")._log.term_at(old_index) == old_term
    assert s1._progress["s2"].match_index >= old_index
    assert s1._progress["s3"].match_index >= old_index
    assert s1.commit_index < old_index  # the Figure 8 rule
    # (d) s1 crashes again; s5 (last term 3) wins and overwrites the term-2 entry.
    cluster.crash("s1")
    cluster.restart("s5")
    for _ in range(3):
        if cluster.core("s5").role == "leader":
            break
        campaign(cluster, "s5")
        cluster.deliver_where(lambda env: not isinstance(env[2], AppendEntries))
    assert cluster.core("s5").role == "leader"
    cluster.run_until(lambda: all(cluster.core(n).commit_index >= old_index for n in cluster.up()))
    for node_id in cluster.up():
        assert cluster.nodes[node_id].applied[old_index].term == 3


def test_figure_8_previous_term_entry_commits_with_a_current_term_entry() -> None:
    cluster = Cluster(["s1", "s2", "s3", "s4", "s5"])
    campaign(cluster, "s1")
    cluster.deliver_all()
    old_index, old_term = cluster.propose("s1", b"figure8")
    cluster.deliver_where(lambda env: "s2" in env[:2])
    cluster.crash("s1")
    cluster.restart("s1")
    campaign(cluster, "s1")
    cluster.deliver_all()
    s1 = cluster.core("s1")
    assert s1.role == "leader"
    assert s1.commit_index > old_index  # committed with the new term's no-op
    assert cluster.nodes["s1"].applied[old_index].term == old_term


def test_snapshot_compaction_and_install_snapshot() -> None:
    cluster = Cluster(["a", "b", "c"], auto_compact=True)
    leader = cluster.elect()
    lagging = next(n for n in cluster.nodes if n != leader)
    cluster.isolate(lagging)
    for i in range(3 * SIM.snapshot_threshold_entries):
        cluster.propose(leader, f"v{i}".encode())
        cluster.deliver_all()
    assert cluster.core(leader)._log.snapshot_index > cluster.core(lagging).last_index
    cluster.heal()
    cluster.run_until(
        lambda: cluster.core(lagging).commit_index == cluster.core(leader).commit_index
    )
    core = cluster.core(lagging)
    assert core.commit_index == cluster.core(leader).commit_index
    assert cluster.nodes[lagging].disk.snapshot is not None
    assert cluster.nodes[lagging].applied == cluster.nodes[leader].applied
    # And the follower restarts from its snapshot + log.
    cluster.crash(lagging)
    cluster.restart(lagging)
    assert cluster.core(lagging)._log.snapshot_index >= SIM.snapshot_threshold_entries


def test_make_snapshot_refuses_unapplied_indexes() -> None:
    cluster = Cluster(["a"])
    core = cluster.core("a")
    with pytest.raises(ValueError, match="applied index"):
        core.make_snapshot(core.applied_index + 1, b"")


def test_proposal_lost_to_another_term_is_visible_to_the_driver() -> None:
    cluster = Cluster(["a", "b", "c"], seed=2)
    old = cluster.elect()
    cluster.isolate(old)
    index, term = cluster.propose(old, b"doomed")
    cluster.pool.clear()
    new = cluster.elect(other_than=old)
    cluster.heal()
    cluster.run_until(lambda: cluster.core(old).commit_index >= index)
    assert cluster.core(new).term > term
    assert cluster.nodes[old].applied[index].term != term  # lost: the driver reports it


def test_propose_on_a_follower_names_the_leader() -> None:
    cluster = Cluster(["a", "b", "c"])
    leader = cluster.elect()
    follower = next(n for n in cluster.nodes if n != leader)
    with pytest.raises(NotLeaderError) as info:
        cluster.core(follower).propose(b"x", cluster.now)
    assert info.value.leader_id == leader
