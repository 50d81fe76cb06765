"""Raft chaos scenarios (mesh.md §C 1-11, 13, 14, 24), each over many seeds.

Every scenario runs the global invariants after every step (tests/sim/invariants.py), then a
liveness phase (`RaftSim.settle`): all faults healed, a leader within bounds, every client
write finished, every node caught up, every acknowledged write in every node's state.
A failing seed prints its replay command (`SPEAR_SEED=<n> pytest <test>`).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.sim.cluster import open_raft_sim
from tests.sim.net import EnvelopeCodec
from tests.sim.raft_adapter import raft_codec
from tests.sim.scenarios import crash_storm, figure_8, vote_storm
from tests.sim.seeds import seed_trio_scheduler, sim_seeds

SEEDS = sim_seeds(50, slow_count=150)


@pytest.mark.parametrize("seed", SEEDS)
async def test_leader_crash_mid_writes(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C1: kill the leader while clients write; restart it later."""
    async with open_raft_sim(seed, voters=3) as sim:
        sim.start_clients(3, writes=8)
        leader = await sim.wait_for_leader()
        await trio.sleep(sim.rng.uniform(0.1, 1.0))
        sim.crash(leader.name)
        crashed_at = trio.current_time()
        new = await sim.wait_for_leader()
        assert new.name != leader.name
        # D2b-like bound for the SIM profile: a new leader within a few election timeouts.
        assert trio.current_time() - crashed_at < 6 * sim.timings.election_timeout_max_s
        await trio.sleep(sim.rng.uniform(0.5, 3.0))
        sim.restart(leader.name)
        await sim.settle()


@pytest.mark.parametrize("seed", SEEDS)
async def test_crash_between_append_and_commit(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C2: the leader appends a write, its followers never hear of it, then it crashes."""
    async with open_raft_sim(seed, voters=3) as sim:
        sim.start_clients(2, writes=5)
        leader = await sim.wait_for_leader()
        for other in sim.others(leader.name):
            sim.net.block(leader.name, other)
        # The write is appended (and fsynced) on the leader only.
        proposal = leader.propose(b"orphan=1")
        await trio.sleep(sim.rng.uniform(0.0, 0.3))
        sim.crash(leader.name)
        sim.net.heal()
        await sim.wait_for_leader()
        await trio.sleep(sim.rng.uniform(0.0, 2.0))
        sim.restart(leader.name)
        await sim.settle()
        assert proposal.outcome == "pending"  # never acknowledged
        # Either absent or present exactly once, never half-applied.
        for node in sim.up_nodes():
            assert node.kv.values.get("orphan") in (None, "1")


@pytest.mark.parametrize("seed", SEEDS)
async def test_figure_8(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C3: the Raft paper's Figure 8 sequence (tests/sim/scenarios.py)."""
    async with open_raft_sim(seed, voters=5) as sim:
        await figure_8(sim)


@pytest.mark.parametrize("seed", SEEDS)
async def test_vote_storm(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C13/§C14 for votes: quick crash-restarts while slow links make candidacies overlap."""
    async with open_raft_sim(seed, voters=3) as sim:
        await vote_storm(sim)


@pytest.mark.parametrize("seed", SEEDS)
async def test_crash_storm(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C1/§C13 stress: random crashes and restarts every 0.2-1.5 s during writes."""
    async with open_raft_sim(seed, voters=3) as sim:
        await crash_storm(sim)


@pytest.mark.parametrize("seed", SEEDS)
async def test_leader_isolated_in_minority(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C4: the leader loses every link; it steps down within the check-quorum window and the
    majority elects a new leader; clients keep writing on both sides."""
    async with open_raft_sim(seed, voters=5) as sim:
        sim.start_clients(3, writes=8)
        old = await sim.wait_for_leader()
        await trio.sleep(sim.rng.uniform(0.0, 0.5))
        sim.net.isolate(old.name)
        cut_at = trio.current_time()
        await sim.wait_for(lambda: old.core.role != "leader", 10.0, "the old leader stepping down")
        # D3: steps down within one check-quorum window (plus a heartbeat of slack).
        window = sim.timings.election_timeout_max_s + sim.timings.heartbeat_interval_s
        assert trio.current_time() - cut_at <= window
        new = await sim.wait_for_leader()
        assert new.name != old.name
        await trio.sleep(sim.rng.uniform(0.0, 2.0))
        await sim.settle()


@pytest.mark.parametrize("seed", SEEDS)
async def test_partition_two_three_then_heal(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C5: 5 voters split 2/3 (leader on a random side); the majority progresses; heal."""
    async with open_raft_sim(seed, voters=5) as sim:
        sim.start_clients(3, writes=8)
        await sim.wait_for_leader()
        names = list(sim.names)
        sim.rng.shuffle(names)
        sim.net.partition(names[:2], names[2:])
        await sim.wait_for_leader(among=names[2:])
        await trio.sleep(sim.rng.uniform(1.0, 5.0))
        await sim.settle()


@pytest.mark.parametrize("seed", SEEDS)
async def test_non_transitive_partition(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C6: A-B and B-C fine, A-C cut. Leaders never change faster than one per election
    timeout (on average over the fault window)."""
    async with open_raft_sim(seed, voters=3) as sim:
        sim.start_clients(2, writes=8)
        await sim.wait_for_leader()
        a, _, c = sim.names
        sim.net.cut(a, c)
        start = len(sim.observer.leader_changes)
        fault_s = 20.0
        await trio.sleep(fault_s)
        changes = len(sim.observer.leader_changes) - start
        assert changes <= fault_s / sim.timings.election_timeout_min_s
        await sim.settle()


@pytest.mark.parametrize("seed", SEEDS)
async def test_asymmetric_link(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C7: leader -> follower works, follower -> leader is dropped; no false commit."""
    async with open_raft_sim(seed, voters=3) as sim:
        sim.start_clients(2, writes=8)
        leader = await sim.wait_for_leader()
        follower = sim.others(leader.name)[0]
        sim.net.block(follower, leader.name)
        await trio.sleep(sim.rng.uniform(2.0, 10.0))
        await sim.settle()


@pytest.mark.parametrize("seed", SEEDS)
async def test_follower_cut_off_long_then_rejoins(
    seed: int, autojump_clock: trio.abc.Clock
) -> None:
    """§C8: a follower partitioned for 10x the election timeout rejoins: with pre-vote the
    majority's term is unchanged and the leader stays."""
    async with open_raft_sim(seed, voters=3) as sim:
        leader = await sim.wait_for_leader()
        follower = sim.others(leader.name)[0]
        term = leader.core.term
        sim.net.isolate(follower)
        await trio.sleep(10 * sim.timings.election_timeout_max_s)
        assert sim.node(follower).core.term == term  # pre-vote: no term inflation
        sim.net.heal()
        await trio.sleep(5 * sim.timings.election_timeout_max_s)
        assert sim.leader() is leader
        assert leader.core.term == term
        await sim.settle()


@pytest.mark.parametrize("seed", SEEDS)
async def test_leader_paused_past_election_timeout(
    seed: int, autojump_clock: trio.abc.Clock
) -> None:
    """§C11: the leader stops (GC, SIGSTOP) for 3x the election timeout, then resumes with its
    backlog; its stale messages are fenced by term."""
    async with open_raft_sim(seed, voters=3) as sim:
        sim.start_clients(3, writes=8)
        old = await sim.wait_for_leader()
        await trio.sleep(sim.rng.uniform(0.0, 0.5))
        sim.pause(old.name, 3 * sim.timings.election_timeout_max_s)
        await sim.wait_for_leader(among=sim.others(old.name))
        await sim.settle()


@pytest.mark.parametrize("seed", SEEDS)
async def test_all_voters_crash_and_restart(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C14 (+ §C13 with torn unsynced writes): every voter crashes at once mid-writes and
    restarts in a random order; nothing acknowledged is lost."""
    async with open_raft_sim(seed, voters=3, disk_lose="prefix") as sim:
        sim.start_clients(3, writes=8)
        await sim.wait_for_leader()
        await trio.sleep(sim.rng.uniform(0.2, 2.0))
        for name in sim.names:
            sim.crash(name)
        order = list(sim.names)
        sim.rng.shuffle(order)
        for name in order:
            await trio.sleep(sim.rng.uniform(0.0, 1.0))
            sim.restart(name)
        await sim.settle()


@pytest.mark.parametrize("seed", SEEDS)
async def test_duplicate_and_reorder_every_message(
    seed: int, autojump_clock: trio.abc.Clock
) -> None:
    """§C24: every link duplicates 10 % and has latency wide enough to reorder, plus 5 % loss,
    with a crash-restart of a random node in the middle. Messages travel CBOR-encoded through
    spear.mesh.codec, so every Raft message kind is encoded and decoded."""
    codec = EnvelopeCodec(raft_codec())
    async with open_raft_sim(seed, voters=3, codec=codec) as sim:
        sim.net.set_all(duplicate_probability=0.1, drop_probability=0.05)
        sim.start_clients(3, writes=8)
        await sim.wait_for_leader()
        await trio.sleep(sim.rng.uniform(0.5, 2.0))
        victim = sim.rng.choice(sim.names)
        sim.crash(victim)
        await trio.sleep(sim.rng.uniform(0.5, 2.0))
        sim.restart(victim)
        await sim.settle()


@pytest.mark.parametrize("seed", SEEDS)
async def test_crash_between_write_and_fsync(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C13: nodes crash in the middle of persisting (a random prefix of the unsynced records
    survives, like a torn write) and restart; none votes twice or loses an acked write."""
    async with open_raft_sim(seed, voters=3, disk_lose="prefix") as sim:
        sim.start_clients(3, writes=8)
        await sim.wait_for_leader()
        for _ in range(4):
            await trio.sleep(sim.rng.uniform(0.1, 1.5))
            victim = sim.rng.choice(sim.names)
            sim.crash_during_persist[victim] = True
            await trio.sleep(sim.rng.uniform(0.5, 1.5))
            sim.crash_during_persist.pop(victim, None)
            if not sim.procs[victim].up:
                sim.restart(victim)
        await sim.settle()


def test_a_seed_replays_exactly() -> None:
    """The same seed gives the same run: same leaders at the same virtual times, same client
    history, same number of checked steps (what makes a printed failing seed useful)."""

    def run(seed: int) -> tuple[object, ...]:
        seed_trio_scheduler(seed)

        async def main() -> tuple[object, ...]:
            async with open_raft_sim(seed, voters=3) as sim:
                await crash_storm(sim, duration_s=10.0)
                return (sim.observer.leader_changes, sim.history, sim.observer.steps)

        return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    first = run(3)
    assert run(3) == first
    assert run(4) != first
