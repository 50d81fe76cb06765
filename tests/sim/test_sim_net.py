"""The simulator's own parts: SimNet faults, SimDisk crash semantics, Process lifecycle."""

from __future__ import annotations

import itertools
import random

import pytest
import trio
import trio.testing

from tests.sim.disk import RaftDurable, SimDisk
from tests.sim.net import Latency, SimNet
from tests.sim.process import Process
from tests.sim.seeds import seed_trio_scheduler


class EchoDriver:
    """A pure fake core: answers "ping" with "pong", sends a ping to its peer every second."""

    def __init__(self, proc: Process, peer: str, log: list[tuple[float, str, str, object]]):
        self._proc = proc
        self._peer = peer
        self._log = log
        self._next = trio.current_time() + 1.0
        self._count = 0

    @property
    def next_deadline(self) -> float:
        return self._next

    def on_message(self, src: str, message: object, now: float) -> None:
        self._log.append((now, src, self._proc.name, message))
        if isinstance(message, tuple) and message[0] == "ping":
            self._proc.net.send(self._proc.name, src, ("pong", message[1]))

    def on_tick(self, now: float) -> None:
        self._count += 1
        self._proc.net.send(self._proc.name, self._peer, ("ping", self._count))
        self._next = now + 1.0


async def run_pair(
    seed: int, setup: object = None, duration_s: float = 20.0
) -> tuple[SimNet, list[tuple[float, str, str, object]], dict[str, Process]]:
    net = SimNet(seed, latency=Latency(min_s=0.01, max_s=0.5, spike_probability=0.0))
    log: list[tuple[float, str, str, object]] = []
    procs: dict[str, Process] = {}
    for name, peer in (("a", "b"), ("b", "a")):
        procs[name] = Process(
            name,
            net=net,
            disk=SimDisk(random.Random(f"{seed}:disk:{name}")),
            factory=lambda p, peer=peer: EchoDriver(p, peer, log),  # type: ignore[misc]
        )
    async with trio.open_nursery() as nursery:
        for proc in procs.values():
            proc.start(nursery)
        if callable(setup):
            await setup(net, procs, nursery)
        await trio.sleep(duration_s)
        nursery.cancel_scope.cancel()
    return net, log, procs


async def test_messages_arrive_with_latency_and_reorder(autojump_clock: trio.abc.Clock) -> None:
    net, log, _ = await run_pair(1)
    pings = [m[1] for (_, src, _, m) in log if src == "a" and m[0] == "ping"]  # type: ignore[index]
    assert net.statistics.delivered == len(log) > 30
    # Latency up to 0.5 s with 1 s between pings keeps pings in order; pongs follow pings.
    assert pings == sorted(pings)


async def test_reordering_happens_when_latency_exceeds_spacing(
    autojump_clock: trio.abc.Clock,
) -> None:
    net = SimNet(3, latency=Latency(min_s=0.0, max_s=1.0, spike_probability=0.0))
    inbox = net.add_node("b")
    net.add_node("a")
    for i in range(50):
        net.send("a", "b", i)
        await trio.sleep(0.1)
    await trio.sleep(2)
    got = []
    while (item := net.receive("b", trio.current_time())) is not None:
        got.append(item[1])
    assert sorted(got) == list(range(50))  # type: ignore[type-var]
    assert got != list(range(50))
    assert inbox.next_arrival == float("inf")


async def test_drop_duplicate_block_and_clog(autojump_clock: trio.abc.Clock) -> None:
    net = SimNet(5)
    for name in "abc":
        net.add_node(name)
    net.set_rule("a", "b", drop_probability=0.5)
    net.set_rule("a", "c", duplicate_probability=0.5)
    for _ in range(400):
        net.send("a", "b", "x")
        net.send("a", "c", "y")
    await trio.sleep(1)
    now = trio.current_time()
    got_b = sum(1 for _ in iter(lambda: net.receive("b", now), None))
    got_c = sum(1 for _ in iter(lambda: net.receive("c", now), None))
    assert 150 < got_b < 250
    assert 550 < got_c < 650
    net.partition(["a"], ["b", "c"])
    net.send("a", "b", "lost")
    net.send("b", "c", "kept")
    net.clog("c", until=trio.current_time() + 10)
    net.send("b", "c", "held")
    await trio.sleep(1)
    assert net.receive("b", trio.current_time()) is None
    assert net.receive("c", trio.current_time()) == ("b", "kept")
    assert net.receive("c", trio.current_time()) is None
    await trio.sleep(10)
    assert net.receive("c", trio.current_time()) == ("b", "held")
    net.heal()
    net.send("a", "b", "back")
    await trio.sleep(1)
    assert net.receive("b", trio.current_time()) in (("a", "back"), None)  # 50 % loss stays


async def test_swizzle_clog_holds_until_unclogged_then_delivers(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def setup(net: SimNet, procs: dict[str, Process], nursery: trio.Nursery) -> None:
        await trio.sleep(2)
        net.clog_until_unclogged("a")
        net.clog_until_unclogged("b")
        await trio.sleep(5)
        net.unclog("a")  # a-b stays held: b is still clogged
        await trio.sleep(3)
        net.unclog("b")

    net, log, _ = await run_pair(5, setup, duration_s=15)
    held = [t for (t, _, _, _) in log if 2.6 < t < 10.0]
    assert not held, held
    after = [t for (t, _, _, _) in log if 10.0 <= t < 10.6]
    assert len(after) >= 10  # the backlog of both directions, each with a fresh latency
    assert net.statistics.dropped == 0


async def test_non_transitive_and_asymmetric_links(autojump_clock: trio.abc.Clock) -> None:
    net = SimNet(7, latency=Latency(spike_probability=0.0))
    for name in "abc":
        net.add_node(name)
    net.cut("a", "c")
    net.block("b", "a")
    for src, dst in (("a", "b"), ("b", "c"), ("c", "b"), ("a", "c"), ("c", "a"), ("b", "a")):
        net.send(src, dst, f"{src}{dst}")
    await trio.sleep(1)
    now = trio.current_time()
    arrived = {
        m
        for n in "abc"
        for (_, m) in iter(lambda n=n: net.receive(n, now), None)  # type: ignore[misc]
    }
    assert arrived == {"ab", "bc", "cb"}


async def test_pause_holds_the_backlog_and_crash_loses_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def setup(net: SimNet, procs: dict[str, Process], nursery: trio.Nursery) -> None:
        await trio.sleep(5)
        procs["b"].pause(5)
        await trio.sleep(10)
        procs["a"].crash()
        await trio.sleep(5)
        procs["a"].start(nursery)

    _, log, procs = await run_pair(2, setup, duration_s=10)
    at_b = [t for (t, _, dst, _) in log if dst == "b"]
    # Nothing is handled by b while it is paused (5 s..10 s), then the backlog at once.
    assert not [t for t in at_b if 5.6 < t < 10.0]
    assert sum(1 for t in at_b if t == pytest.approx(10.0, abs=1e-3)) >= 3
    # While a is down (15 s..20 s) it handles nothing.
    assert not [t for (t, _, dst, _) in log if dst == "a" and 15.0 < t < 20.0]
    assert procs["a"].incarnation == 2


async def test_starved_process_handles_each_message_late(autojump_clock: trio.abc.Clock) -> None:
    async def setup(net: SimNet, procs: dict[str, Process], nursery: trio.Nursery) -> None:
        procs["b"].starve_delay = lambda: 0.7

    _, log, _ = await run_pair(4, setup, duration_s=10)
    handled_b = [t for (t, _, dst, _) in log if dst == "b"]
    gaps = [b - a for a, b in itertools.pairwise(handled_b)]
    assert gaps and min(gaps) >= 0.7 - 1e-9


def test_disk_loses_unsynced_writes_on_crash() -> None:
    disk = SimDisk(random.Random(0))
    disk.write(("hard_state", 1))
    disk.fsync()
    disk.write(("hard_state", 2))
    disk.crash()
    assert RaftDurable.replay(disk.durable()).hard_state == 1
    prefix = SimDisk(random.Random(1), lose="prefix")
    kept = set()
    for i in range(40):
        prefix.write(("hard_state", (i, 1)))
        prefix.write(("hard_state", (i, 2)))
        prefix.crash()
        kept.add(len(prefix.durable()))
    assert len(kept) > 5  # sometimes none, one or both of the two records survive


def test_a_seed_replays_the_same_trace() -> None:
    def trace(seed: int) -> list[tuple[float, str, str, object]]:
        seed_trio_scheduler(seed)

        async def main() -> list[tuple[float, str, str, object]]:
            _, log, _ = await run_pair(seed, duration_s=30)
            return log

        return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    assert trace(11) == trace(11)
    assert trace(11) != trace(12)
