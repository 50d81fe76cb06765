"""Raft-lite safety under random schedules (hypothesis): delivery in any order, drops,
duplicates, crashes with restart from durable state, compaction and time steps, on 3-5
voters. The harness checks election safety, log matching, leader completeness, state
machine safety and monotone commit after every step; a final liveness phase heals
everything and requires a leader that commits a write."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spear.mesh.raft_types import SIM
from tests.mesh.raft_harness import Cluster

KINDS = ("deliver", "time", "drop", "dup", "crash", "restart", "propose", "compact", "cut", "heal")

# Hypothesis draws the fault mix, the length and the seed; the schedule itself comes from a
# seeded random.Random, so examples are long enough to elect, commit, crash and re-elect
# many times (hypothesis' own lists shrink towards a handful of steps that never elect).
weights = st.tuples(
    st.integers(20, 60),  # deliver
    st.integers(2, 12),  # time
    st.integers(0, 8),  # drop
    st.integers(0, 4),  # dup
    st.integers(0, 2),  # crash
    st.integers(0, 4),  # restart
    st.integers(1, 10),  # propose
    st.integers(0, 2),  # compact
    st.integers(0, 2),  # cut
    st.integers(0, 3),  # heal
)


def apply(cluster: Cluster, kind: str, rng: random.Random) -> None:
    node_id = rng.choice(list(cluster.nodes))
    leaders = [n for n in cluster.up() if cluster.core(n).role == "leader"]
    if kind in ("propose", "crash") and leaders and rng.random() < 0.7:
        node_id = rng.choice(leaders)  # writes and crashes where they matter most
    up = node_id not in cluster.down
    if kind == "deliver" and cluster.pool:
        cluster.deliver(rng.randrange(len(cluster.pool)))
    elif kind == "drop" and cluster.pool:
        cluster.pool.pop(rng.randrange(len(cluster.pool)))
    elif kind == "dup" and cluster.pool:
        cluster.pool.append(rng.choice(cluster.pool))
    elif kind == "time":
        step = rng.choice((0.05, 0.1, 0.3, 1.0, 2.0))
        cluster.advance(rng.uniform(0, step), deliver=False)
    elif kind == "crash" and up and len(cluster.down) < len(cluster.nodes) - 1:
        cluster.crash(node_id)
    elif kind == "restart" and not up:
        cluster.restart(node_id)
    elif kind == "propose" and up and cluster.core(node_id).role == "leader":
        cluster.propose(node_id, f"w{rng.randrange(10**6)}".encode())
    elif kind == "compact" and up:
        core = cluster.core(node_id)
        if core.applied_index > core._log.snapshot_index:
            cluster.compact(node_id)
    elif kind == "cut":
        other = rng.choice(list(cluster.nodes))
        cluster.blocked |= {(node_id, other), (other, node_id)}
    elif kind == "heal":
        cluster.heal()
    cluster.check()


def run_schedule(size: int, seed: int, mix: tuple[int, ...], steps: int, batch: int = 1) -> Cluster:
    """Run one random schedule and its liveness phase; return the cluster for inspection.

    Small batches (`batch` entries per AppendEntries) let an older term's entries reach a
    majority without the new leader's no-op: the Figure 8 situation.
    """
    timings = dataclasses.replace(SIM, max_entries_per_append=batch)
    cluster = Cluster([f"n{i}" for i in range(size)], seed=seed, timings=timings)
    rng = random.Random(f"schedule:{seed}")
    for _ in range(steps):
        apply(cluster, rng.choices(KINDS, weights=mix)[0], rng)
    # Liveness: heal everything, restart the dead, and a leader must commit a write.
    for node_id in list(cluster.down):
        cluster.restart(node_id)
    cluster.heal()
    leader = cluster.elect(timeout=20 * SIM.election_timeout_max_s)
    index, term = cluster.propose(leader, b"final")
    every = lambda: all(n.core.commit_index >= index for n in cluster.nodes.values())  # noqa: E731
    cluster.run_until(every, timeout=10.0)
    for node in cluster.nodes.values():
        assert node.applied[index].term == term or node.core._log.snapshot_index >= index
    return cluster


schedules = {
    "size": st.integers(min_value=3, max_value=5),
    "seed": st.integers(0, 2**32),
    "mix": weights,
    "steps": st.integers(200, 1000),
    "batch": st.integers(1, 4),
}


@settings(max_examples=25, deadline=None, database=None)
@given(**schedules)
def test_safety_under_random_schedules(
    size: int, seed: int, mix: tuple[int, ...], steps: int, batch: int
) -> None:
    run_schedule(size, seed, mix, steps, batch)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, database=None)
@given(**schedules)
def test_safety_under_many_random_schedules(
    size: int, seed: int, mix: tuple[int, ...], steps: int, batch: int
) -> None:
    run_schedule(size, seed, mix, steps, batch)
