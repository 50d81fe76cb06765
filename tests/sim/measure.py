"""Simulator figures (not a test: tests never assert on wall time).

    .venv/bin/python -m tests.sim.measure [raft|swim5|swim100|swim1000 ...]

- raft: virtual seconds per wall second for 5 Raft voters under a client write load;
- swim5: the same for 5 SWIM nodes (LAN timings);
- swimN: N SWIM nodes join one seed node; wall time to a converged view; then rounds of
  gossip (virtual time / gossip interval) until a metadata update reaches all N nodes
  (D4: <= 8 rounds at p99 for 100), and crash -> dead everywhere time (D1c);
- failover: per timing profile, 3 voters with that profile's Raft timings on the simulated
  LAN (0.5-5 ms one way): virtual time from a leader crash to a new leader that a majority
  follows, over 150 seeds (D2, without the real processes' fsync, HTTP and scheduling).
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import trio
import trio.testing

from spear.mesh import RAFT_PROFILES
from spear.mesh.swim_messages import MemberMeta
from tests.sim.cluster import open_raft_sim
from tests.sim.seeds import seed_trio_scheduler
from tests.sim.swim_sim import SwimSim, large_heap_gc, open_swim_sim


def run(main: Callable[[], Awaitable[None]], seed: int = 1) -> None:
    seed_trio_scheduler(seed)
    with large_heap_gc():
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def measure_raft(virtual_s: float = 60.0, *, clients: int = 5, gap_s: float = 0.05) -> None:
    async def main() -> None:
        async with open_raft_sim(1, voters=5) as sim:
            sim.start_clients(clients, writes=10**6, gap_s=gap_s)
            await sim.wait_for_leader()
            wall = time.perf_counter()
            await trio.sleep(virtual_s)
            took = time.perf_counter() - wall
            acks = len(sim.observer.acks)
            print(
                f"raft 5 voters, {clients} clients: {virtual_s:.0f} s virtual in {took:.2f} s wall "
                f"({virtual_s / took:.0f}x); {sim.net.statistics.delivered} messages, "
                f"{acks} acked writes, {sim.observer.steps} checked steps"
            )

    run(main)


def measure_swim(nodes: int, virtual_s: float = 300.0, updates: int = 20) -> None:
    async def main() -> None:
        wall = time.perf_counter()
        async with open_swim_sim(1, nodes=nodes, join_spread_s=min(30.0, nodes / 10)) as sim:
            took = await sim.wait_converged(600.0, poll_s=1.0)
            print(
                f"swim {nodes}: joined and converged in {took:.1f} s virtual, "
                f"{time.perf_counter() - wall:.1f} s wall"
            )
            if nodes <= 10:
                wall = time.perf_counter()
                await trio.sleep(virtual_s)
                took = time.perf_counter() - wall
                print(
                    f"swim {nodes}: {virtual_s:.0f} s virtual in {took:.2f} s wall "
                    f"({virtual_s / took:.0f}x)"
                )
                return
            await dissemination(sim, updates)
            wall = time.perf_counter()
            victim = sim.names[-1]
            crashed = trio.current_time()
            sim.crash(victim)
            took = await sim.wait_converged(300.0, poll_s=0.5)
            dead = sim.observer.first_learned(victim, "dead")
            print(
                f"swim {nodes}: crash -> dead at first node {min(dead.values()) - crashed:.1f} s,"
                f" at all {took:.1f} s virtual ({time.perf_counter() - wall:.1f} s wall)"
            )

    run(main)


def measure_failover(profile: str, seeds: int = 150) -> None:
    timings = RAFT_PROFILES[profile]
    times: list[float] = []

    async def main(seed: int) -> None:
        async with open_raft_sim(seed, voters=3, timings=timings) as sim:
            sim.start_clients(1, writes=10**6, gap_s=0.2)
            leader = await sim.wait_for_leader()
            await trio.sleep(sim.rng.uniform(1.0, 2.0))
            leader = await sim.wait_for_leader()
            sim.crash(leader.name)
            crashed = trio.current_time()
            await sim.wait_for_leader(among=sim.others(leader.name))
            times.append(trio.current_time() - crashed)

    for seed in range(seeds):
        run(functools.partial(main, seed), seed)
    times.sort()
    print(
        f"failover {profile} ({timings.election_timeout_min_s}-{timings.election_timeout_max_s} s,"
        f" heartbeat {timings.heartbeat_interval_s} s): crash -> new leader p50"
        f" {statistics.median(times):.3f} s, p99 {times[int(0.99 * len(times))]:.3f} s,"
        f" max {times[-1]:.3f} s ({seeds} seeds, virtual time)"
    )


async def dissemination(sim: SwimSim, updates: int) -> None:
    """Update metadata on random nodes; count gossip rounds until every node has it."""
    rounds = []
    wall = time.perf_counter()
    for i in range(updates):
        name = sim.rng.choice(sim.names)
        node = sim.node(name)
        start = trio.current_time()
        meta = MemberMeta(node_id=name, name=name, mesh_address=name, cpu_count=i + 1)
        node.handle(node.core.update_meta(meta, start), start)
        key = (name, "alive", node.core.incarnation)
        while True:  # virtual-time cadence: a quarter gossip round resolves the count
            if len(sim.observer.learned.get(key, {})) >= len(sim.names) - 1:
                break
            await trio.sleep(sim.timings.gossip_interval_s / 4)
        took = max(sim.observer.learned[key].values()) - start
        rounds.append(took / sim.timings.gossip_interval_s)
    rounds.sort()
    p99 = rounds[min(len(rounds) - 1, int(0.99 * len(rounds)))]
    print(
        f"swim {len(sim.names)}: update reaches all in {statistics.median(rounds):.1f} gossip "
        f"rounds p50, {p99:.1f} p99, max {max(rounds):.1f} ({updates} updates, "
        f"{time.perf_counter() - wall:.1f} s wall)"
    )


def main(argv: list[str]) -> None:
    what = argv or ["raft", "swim5", "swim100"]
    for item in what:
        if item == "raft":
            measure_raft(clients=1, gap_s=2.0)
            measure_raft()
        elif item == "failover":
            for profile in ("lan", "lan-fast", "loopback"):
                measure_failover(profile)
        elif item.startswith("swim"):
            measure_swim(int(item[4:]))
        else:
            raise SystemExit(
                f"unknown measurement {item!r}; use raft, failover, swim5, swim100, swim1000"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
