"""More Raft chaos scenarios (mesh.md §C 9, 10, 12, 15, 16, 23, 25), each over many seeds.

Like test_sim_raft.py: the global invariants I1-I7 run after every step, each scenario checks
its own invariant, then `RaftSim.settle` heals everything and requires every client to
finish and every acknowledged write to be in every member's state. A failing seed prints
its replay command (`SPEAR_SEED=<n> pytest <test>`).
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import trio

from spear.mesh import RAFT_PROFILES
from spear.mesh.raft_config import Membership
from tests.sim.cluster import RaftSim, open_raft_sim
from tests.sim.invariants import InvariantViolation
from tests.sim.net import Latency
from tests.sim.process import NodeClock
from tests.sim.seeds import sim_seeds

SEEDS = sim_seeds(50, slow_count=150)


def election_bound(sim: RaftSim, timeouts: float) -> float:
    return timeouts * sim.timings.election_timeout_max_s


@pytest.mark.parametrize("seed", SEEDS)
async def test_lower_term_node_rejoins_while_the_leader_crashes(
    seed: int, autojump_clock: trio.abc.Clock
) -> None:
    """§C9 (etcd #8243 class): a follower cut off while the others moved on through two
    leader crashes (its term and log are behind) rejoins the moment the current leader
    crashes; with pre-vote a leader must still be elected within 3 election timeouts (a
    stale pre-candidate learns the higher term from the rejections; no deadlock)."""
    async with open_raft_sim(seed, voters=5) as sim:
        sim.start_clients(2, writes=10)
        leader = await sim.wait_for_leader()
        stale = sim.rng.choice(sim.others(leader.name))
        sim.net.isolate(stale)
        for _ in range(2):
            await trio.sleep(sim.rng.uniform(0.2, 1.0))
            sim.crash(leader.name)
            others = [n for n in sim.others(leader.name) if n != stale]
            new = await sim.wait_for_leader(among=others)
            sim.restart(leader.name)
            leader = new
        assert sim.node(stale).core.term < leader.core.term
        await trio.sleep(sim.rng.uniform(0.0, 1.0))
        sim.net.heal()
        sim.crash(leader.name)
        crashed_at = trio.current_time()
        await sim.wait_for_leader(election_bound(sim, 3), among=sim.others(leader.name))
        assert trio.current_time() - crashed_at <= election_bound(sim, 3)
        sim.restart(leader.name)
        await sim.settle()


@pytest.mark.parametrize("seed", SEEDS)
async def test_isolated_leader_and_split_pre_votes_still_elect(
    seed: int, autojump_clock: trio.abc.Clock
) -> None:
    """§C10 (etcd #9586 class): the leader is isolated while slow links (50-400 ms) make the
    followers' pre-vote rounds overlap and split; with pre-vote and check-quorum (a
    pre-candidate forgets its leader, so it does not refuse the others) a leader is elected
    within the liveness bound (D2c: no election longer than 10 election timeouts)."""
    async with open_raft_sim(seed, voters=5) as sim:
        sim.start_clients(2, writes=8)
        old = await sim.wait_for_leader()
        sim.net.set_all(latency=Latency(min_s=0.05, max_s=0.4, spike_probability=0.0))
        await trio.sleep(sim.rng.uniform(0.0, 1.0))
        sim.net.isolate(old.name)
        cut_at = trio.current_time()
        await sim.wait_for_leader(election_bound(sim, 10), among=sim.others(old.name))
        assert trio.current_time() - cut_at <= election_bound(sim, 10)
        assert old.core.role != "leader"  # check-quorum: it stepped down
        sim.net.set_all(latency=Latency())
        await sim.settle()


@pytest.mark.parametrize("seed", SEEDS)
async def test_clock_skew_and_rate_on_one_voter(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C12: one voter's clock is offset by up to +-500 ms and runs up to 5 % fast or slow.
    Safety does not depend on timing (every invariant holds); while the network is healthy
    the leader never changes (D8); a leader crash still elects a new one."""
    rng_name = f"n{1 + seed % 3}"
    sign = 1 if seed % 2 else -1
    clock = NodeClock(offset_s=sign * 0.5 * ((seed % 7) / 6), rate=1 + sign * 0.05)
    async with open_raft_sim(seed, voters=3, clocks={rng_name: clock}) as sim:
        sim.start_clients(3, writes=8)
        await sim.wait_for_leader()
        changes = len(sim.observer.leader_changes)
        await trio.sleep(20.0)
        assert len(sim.observer.leader_changes) == changes, sim.observer.leader_changes
        leader = sim.leader()
        assert leader is not None
        sim.crash(leader.name)
        crashed_at = trio.current_time()
        await sim.wait_for_leader(among=sim.others(leader.name))
        assert trio.current_time() - crashed_at < election_bound(sim, 6)
        sim.restart(leader.name)
        await sim.settle()


@pytest.mark.parametrize("seed", sim_seeds(20, slow_count=80))
@pytest.mark.parametrize("profile", ["lan", "lan-fast", "loopback"])
async def test_healthy_network_keeps_its_leader_with_each_profile(
    profile: str, seed: int, autojump_clock: trio.abc.Clock
) -> None:
    """D8 with the real timings of each profile: on a healthy network (0.5-5 ms, a rare
    200 ms spike) with clients writing, and a random node's event loop stalling every
    0.5-2 s for up to a quarter of the shortest election timeout (a GC pause, a slow fsync),
    the first leader leads throughout: a shorter election timeout must not buy failover
    speed with spurious elections."""
    timings = RAFT_PROFILES[profile]
    async with open_raft_sim(seed, voters=3, timings=timings) as sim:
        sim.start_clients(3, writes=50, gap_s=0.2)
        await sim.wait_for_leader()
        changes = list(sim.observer.leader_changes)
        stall_s = timings.election_timeout_min_s / 4
        end = trio.current_time() + 30.0
        while trio.current_time() < end:
            await trio.sleep(sim.rng.uniform(0.5, 2.0))
            sim.pause(sim.rng.choice(sim.names), sim.rng.uniform(0.0, stall_s))
        assert sim.observer.leader_changes == changes
        await sim.settle()


def check_config_entries(sim: RaftSim, min_voters: int) -> None:
    """§C15: every configuration ever written keeps `min_voters` voters, and no log holds
    more than one configuration past its commit index."""
    for node in sim.up_nodes():
        configs = [e for e in node.log if e.kind == "config"]
        for entry in configs:
            voters = Membership.decode(entry.data).voters
            if len(voters) < min_voters:
                raise InvariantViolation(f"config {entry.index} has voters {voters}")
        pending = [e.index for e in configs if e.index > node.core.commit_index]
        if node.core.role == "leader" and len(pending) > 1:
            raise InvariantViolation(
                f"{node.name} leads with {len(pending)} uncommitted configs {pending} "
                f"(seed {sim.seed})"
            )


@pytest.mark.parametrize("seed", SEEDS)
async def test_membership_changes_while_a_voter_is_partitioned(
    seed: int, autojump_clock: trio.abc.Clock
) -> None:
    """§C15: with one voter crashed and another partitioned, the leader adds a standby as a
    learner, promotes it once caught up, and removes the crashed voter, while clients
    write. One uncommitted configuration at a time; never fewer than 3 voters; every
    acknowledged write survives; the final configuration is the one asked for."""
    async with open_raft_sim(seed, voters=5, standbys=1) as sim:
        standby = sim.names[-1]
        sim.start_clients(2, writes=10)
        leader = await sim.wait_for_leader()
        dead, cut = sim.rng.sample([n for n in sim.voters if n != leader.name], 2)
        sim.crash(dead)
        sim.net.isolate(cut)
        watch = sim.observer
        checks = 0

        async def watcher() -> None:
            nonlocal checks
            while True:
                await watch.wait_step()
                check_config_entries(sim, 3)
                checks += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher)
            await sim.change_config("add_learner", standby)
            await sim.change_config("promote", standby)
            await sim.change_config("remove_node", dead)
            nursery.cancel_scope.cancel()
        assert checks > 0
        sim.net.heal()
        await sim.settle()
        final = sim.leader()
        assert final is not None
        assert set(final.core.voters) == set(sim.names) - {dead}


@pytest.mark.parametrize("seed", SEEDS)
async def test_removed_voter_keeps_running_with_an_old_config(
    seed: int, autojump_clock: trio.abc.Clock
) -> None:
    """§C16: a voter is removed while partitioned, so it never learns of it and keeps
    running with the old configuration; after the partition heals it campaigns, but the
    members ignore it (leader stickiness): no leader change, no term change."""
    async with open_raft_sim(seed, voters=5) as sim:
        sim.start_clients(2, writes=8)
        leader = await sim.wait_for_leader()
        removed = sim.rng.choice(sim.others(leader.name))
        sim.net.isolate(removed)
        await sim.change_config("remove_node", removed)
        assert removed in sim.node(removed).core.voters  # it still believes it votes
        await trio.sleep(sim.rng.uniform(0.0, 3.0))
        sim.net.heal()
        leader = await sim.wait_for_leader()
        term, changes = leader.core.term, len(sim.observer.leader_changes)
        await trio.sleep(election_bound(sim, 10))
        assert sim.leader() is leader and leader.core.term == term
        assert len(sim.observer.leader_changes) == changes
        await sim.settle()
        assert removed not in {n.name for n in sim.members()}


@pytest.mark.parametrize("seed", SEEDS)
async def test_swizzle_clog(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C23 (FoundationDB's swizzle-clog): clog 2-4 random voters' links one by one (held,
    not lost), then unclog them in a random order; safety holds throughout and a leader
    serves within 10 election timeouts of the last unclog."""
    async with open_raft_sim(seed, voters=5) as sim:
        sim.start_clients(3, writes=8)
        await sim.wait_for_leader()
        victims = sim.rng.sample(sim.names, sim.rng.randint(2, 4))
        for name in victims:
            await trio.sleep(sim.rng.uniform(0.1, 1.0))
            sim.net.clog_until_unclogged(name)
        await trio.sleep(sim.rng.uniform(0.5, 3.0))
        sim.rng.shuffle(victims)
        for name in victims:
            await trio.sleep(sim.rng.uniform(0.1, 1.0))
            sim.net.unclog(name)
        await sim.wait_for_leader(election_bound(sim, 10))
        await sim.settle()


def check_client_histories(sim: RaftSim) -> int:
    """§C25: every write acknowledged before a read began is seen by that read (with the
    acknowledged value), and one client's reads never go back in time (the applied index
    they were served at never decreases; a key once seen stays seen). Returns the number
    of reads checked."""
    acked = {ack.key: ack for ack in sim.observer.acks}
    last_index: dict[str, int] = defaultdict(int)
    seen: dict[str, set[str]] = defaultdict(set)
    for op in sorted(sim.reads, key=lambda r: (r.client, r.invoked)):
        ack = acked.get(op.key)
        if ack is not None and ack.at < op.invoked and op.value != ack.value:
            raise InvariantViolation(
                f"stale read: {op.client} read {op.key}={op.value!r} at t={op.invoked:.3f} "
                f"from {op.node}, acked as {ack.value!r} at t={ack.at:.3f} (seed {sim.seed})"
            )
        if op.served_at < last_index[op.client]:
            raise InvariantViolation(
                f"{op.client}'s read went back in time: index {op.served_at} after "
                f"{last_index[op.client]} (seed {sim.seed})"
            )
        if op.value is None and op.key in seen[op.client]:
            raise InvariantViolation(
                f"{op.client} saw {op.key} vanish at t={op.invoked:.3f} (seed {sim.seed})"
            )
        last_index[op.client] = op.served_at
        if op.value is not None:
            seen[op.client].add(op.key)
    return len(sim.reads)


@pytest.mark.parametrize("seed", SEEDS)
async def test_client_histories_under_faults(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C25: writers and readers (read-index reads) run through one of the §C1/C4/C5/C11
    nemeses (leader crash, leader isolated, 2/3 partition, leader paused past the election
    timeout); the client histories must show no stale read and no read going back."""
    async with open_raft_sim(seed, voters=5) as sim:
        sim.start_clients(3, writes=8)
        sim.start_readers(3, reads=15)
        leader = await sim.wait_for_leader()
        await trio.sleep(sim.rng.uniform(0.1, 1.0))
        nemesis = sim.rng.choice(["crash", "isolate", "partition", "pause"])
        if nemesis == "crash":
            sim.crash(leader.name)
            await trio.sleep(sim.rng.uniform(1.0, 4.0))
            sim.restart(leader.name)
        elif nemesis == "isolate":
            sim.net.isolate(leader.name)
            await trio.sleep(sim.rng.uniform(2.0, 5.0))
        elif nemesis == "partition":
            names = list(sim.names)
            sim.rng.shuffle(names)
            sim.net.partition(names[:2], names[2:])
            await trio.sleep(sim.rng.uniform(2.0, 5.0))
        else:
            sim.pause(leader.name, 3 * sim.timings.election_timeout_max_s)
            await trio.sleep(3 * sim.timings.election_timeout_max_s)
        await sim.settle()
        assert check_client_histories(sim) > 0
