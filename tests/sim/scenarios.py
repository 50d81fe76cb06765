"""Nemesis programs shared by the scenario tests and the "test the tester" tests.

Each takes a running RaftSim, draws every choice from `sim.rng`, and leaves faults in place
for `sim.settle()` to heal.
"""

from __future__ import annotations

import trio

from tests.sim.cluster import RaftSim
from tests.sim.net import Latency
from tests.sim.raft_adapter import APPEND_TYPES


async def crash_storm(sim: RaftSim, duration_s: float = 20.0) -> None:
    """Crash and restart random nodes every 0.2-1.5 s while clients write and elections run:
    the schedule most likely to hit a node between voting (or appending) and crashing."""
    sim.start_clients(3, writes=10)
    end = trio.current_time() + duration_s
    while trio.current_time() < end:
        await trio.sleep(sim.rng.uniform(0.2, 1.5))
        victim = sim.rng.choice(sim.names)
        if sim.procs[victim].up:
            sim.crash(victim)
        else:
            sim.restart(victim)
    await sim.settle()


async def vote_storm(sim: RaftSim, duration_s: float = 30.0) -> None:
    """Slow links (50-600 ms) make candidacies overlap; nodes crash and come back within
    0-300 ms, often in the term they just voted in: a node that forgets its vote then votes
    twice in one term."""
    sim.net.set_all(latency=Latency(min_s=0.05, max_s=0.6, spike_probability=0.0))
    end = trio.current_time() + duration_s
    while trio.current_time() < end:
        await trio.sleep(sim.rng.uniform(0.1, 0.8))
        victim = sim.rng.choice(sim.names)
        if sim.procs[victim].up:
            sim.crash(victim)
            await trio.sleep(sim.rng.uniform(0.0, 0.3))
            sim.restart(victim)
    sim.net.set_all(latency=Latency())
    await sim.settle()


async def figure_8(sim: RaftSim) -> None:
    """The Raft paper's Figure 8 over 5 voters (s1..s5 as in the paper):

    1. s1 leads and replicates entry A (its term) to s2 only, then crashes;
    2. s5 is elected by s3, s4 and itself (AppendEntries are dropped meanwhile, so its no-op
       and its entry B reach no one), then crashes;
    3. s1 (or s2) leads again and gets A onto s3: a broken leader now commits A by counting
       replicas; s1 and s2 crash the moment the leader's commit index covers A;
    4. s5 returns with B of a later term at A's index: it can win s3's and s4's votes and
       overwrite A.

    With the current-term commit rule, A counts as committed only once the new leader's
    no-op is on a majority, and then s5 can no longer win; I3/I5 catch the broken rule.
    """
    s1 = await sim.wait_for_leader()
    s2, s3, s4, s5 = sim.others(s1.name)
    for other in (s3, s4, s5):
        sim.net.cut(s1.name, other)
    index_a = s1.propose(b"fig8-a=1").index
    await sim.wait_for(lambda: sim.node(s2).entry_at(index_a) is not None, 5.0, "A on s2")
    sim.crash(s1.name)
    sim.net.heal()
    for other in (s3, s4, s5):
        sim.net.cut(s2, other)
    no_appends = lambda src, dst, m: isinstance(m, APPEND_TYPES)  # noqa: E731
    sim.net.filters.append(no_appends)
    leader = await sim.wait_for_leader(among=(s3, s4, s5), quorum=False)
    leader.propose(b"fig8-b=2")
    sim.crash(leader.name)
    sim.net.filters.remove(no_appends)
    sim.net.heal()
    sim.restart(s1.name)
    back = await sim.wait_for_leader(among=(s1.name, s2), quorum=False)
    await sim.wait_for(
        lambda: not back.proc.up or back.core.commit_index >= index_a, 10.0, "A committed"
    )
    # Both holders of A go down, and what they had in flight is lost with them.
    holders = (s1.name, s2)
    for name in holders:
        if sim.procs[name].up:
            sim.crash(name)
    from_holders = lambda src, dst, m: src in holders  # noqa: E731
    sim.net.filters.append(from_holders)
    sim.restart(leader.name)
    await sim.wait_for_leader(among=(s3, s4, s5), quorum=False)
    await trio.sleep(sim.rng.uniform(0.5, 3.0))
    sim.net.filters.remove(from_holders)
    sim.restart(s1.name)
    sim.restart(s2)
    await sim.settle()
