"""SWIM/Lifeguard chaos scenarios (mesh.md §C 18-22), each over many seeds, LAN timings.

The observer fails a run at once if a protected node (up, answering, reachable) is declared
dead by anyone. A failing seed prints its replay command.
"""

from __future__ import annotations

import pytest
import trio

from spear.mesh.codec import MessageCodec
from spear.mesh.swim_messages import SWIM_MESSAGES
from tests.sim.invariants import LivenessViolation
from tests.sim.net import EnvelopeCodec, Latency
from tests.sim.seeds import sim_seeds
from tests.sim.swim_sim import open_swim_sim

SEEDS = sim_seeds(50, slow_count=150)
#: D1b (LAN): crash -> dead known by all nodes, n <= 10, p99 <= 10 s; a single run is allowed
#: the Lifeguard maximum (no confirmations: 6x the 4 s minimum) plus dissemination.
DEAD_EVERYWHERE_BOUND_S = 30.0
#: D4b: healed partition -> one view within reconnect + push-pull intervals (30 s + 30 s).
MERGE_BOUND_S = 90.0


@pytest.mark.parametrize("seed", SEEDS)
async def test_crashed_node_is_dead_everywhere(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C18: crash one node of 8; every live node marks it dead in bounded time, nobody else
    is marked dead. Messages travel CBOR-encoded through spear.mesh.codec."""
    codec = EnvelopeCodec(MessageCodec(SWIM_MESSAGES))
    async with open_swim_sim(seed, nodes=8, codec=codec) as sim:
        await sim.wait_converged(30)
        victim = sim.rng.choice(sim.names)
        crashed_at = trio.current_time()
        sim.crash(victim)
        await sim.wait_converged(DEAD_EVERYWHERE_BOUND_S, poll_s=0.1)
        dead_at = sim.observer.first_learned(victim, "dead")
        assert set(dead_at) >= set(sim.up())
        assert min(dead_at.values()) - crashed_at >= sim.timings.probe_timeout_s


@pytest.mark.parametrize("seed", sim_seeds(50, slow_count=50))
async def test_loss_gives_no_false_deaths(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C19: 10 % loss and up to 5 ms jitter on every link; zero false deaths (D5). The normal
    run covers 1 virtual minute per seed; the slow seeds cover an hour."""
    hour = bool(isinstance(seed, int) and seed >= 50)
    async with open_swim_sim(seed, nodes=5, latency=Latency(min_s=0.0, max_s=0.005)) as sim:
        await sim.wait_converged(30)
        sim.net.set_all(drop_probability=0.1)
        await trio.sleep(3600.0 if hour else 60.0)
        assert not sim.observer.false_deaths
        sim.net.set_all(drop_probability=0.0)
        await sim.wait_converged(60)


@pytest.mark.parametrize("seed", SEEDS)
async def test_cpu_starved_node_kills_no_one(seed: int, autojump_clock: trio.abc.Clock) -> None:
    """§C20: one node handles each message 0.5-2 s late. Healthy nodes are never declared dead
    (Lifeguard's local health keeps the slow node from accusing them); the slow node may be
    suspected or even declared dead, and is alive in every view once it recovers."""
    async with open_swim_sim(seed, nodes=6) as sim:
        await sim.wait_converged(30)
        slow = sim.rng.choice(sim.names)
        sim.protected.discard(slow)
        starve_rng = sim.rng
        sim.procs[slow].starve_delay = lambda: starve_rng.uniform(0.5, 2.0)
        await trio.sleep(120)
        sim.procs[slow].starve_delay = None
        await sim.wait_converged(MERGE_BOUND_S)


@pytest.mark.parametrize("seed", SEEDS)
async def test_half_partition_then_heal_merges_views(
    seed: int, autojump_clock: trio.abc.Clock
) -> None:
    """§C21: 50/50 partition for twice the maximum suspicion time; each side marks the other
    dead; after healing, reconnect + push-pull restore one view (D4b)."""
    async with open_swim_sim(seed, nodes=6) as sim:
        await sim.wait_converged(30)
        names = list(sim.names)
        sim.rng.shuffle(names)
        left, right = names[:3], names[3:]
        sim.protected.clear()
        sim.net.partition(left, right)
        suspicion_max = (
            sim.timings.suspicion_mult
            * sim.timings.suspicion_max_mult
            * sim.timings.probe_interval_s
        )
        await trio.sleep(2 * suspicion_max)
        view = sim.observer.views[left[0]]
        assert {view.get(n) for n in right} == {"dead"}
        sim.net.heal()
        sim.protected.update(sim.names)
        took = await sim.wait_converged(MERGE_BOUND_S)
        assert took <= MERGE_BOUND_S


@pytest.mark.parametrize("seed", SEEDS)
async def test_restart_with_the_same_id_at_a_new_address(
    seed: int, autojump_clock: trio.abc.Clock
) -> None:
    """§C22: a node restarts with the same id at a new address, either at once (others
    still hold it alive at the old address) or after everyone declared it dead. Its
    higher incarnation wins everywhere, every view points at the new address, and then it
    does not flap: no suspect, dead or left verdict about it for the next minute."""
    async with open_swim_sim(seed, nodes=6) as sim:
        await sim.wait_converged(30)
        victim = sim.rng.choice(sim.names)
        sim.crash(victim)
        if sim.rng.random() < 0.5:
            await trio.sleep(sim.rng.uniform(0.0, 2.0))
        else:
            await sim.wait_converged(DEAD_EVERYWHERE_BOUND_S)
        address = f"{victim}-new"
        seed_node = sim.rng.choice([n for n in sim.names if n != victim])
        # Verdicts about the old process (declared dead late) are not false deaths.
        sim.restart_at(victim, address, [seed_node], protect=False)
        incarnation = sim.node(victim).core.incarnation

        def moved() -> bool:
            for name in sim.up():
                if name == victim:
                    continue
                member = sim.node(name).core.member(victim)
                if member is None or member.meta.mesh_address != address:
                    return False
                if member.state != "alive" or member.incarnation < incarnation:
                    return False
            return True

        for _ in range(int(MERGE_BOUND_S / 0.2)):
            if moved():
                break
            await trio.sleep(0.2)
        else:
            raise LivenessViolation(f"views did not move {victim} to {address} (seed {seed})")
        sim.protected.add(victim)
        mark = len(sim.observer.verdicts)
        await trio.sleep(60.0)
        flaps = [v for v in sim.observer.verdicts[mark:] if v[2] == victim]
        assert not flaps, f"{victim} flapped after moving to {address}: {flaps[:5]}"
        await sim.wait_converged(30)
