"""SwimSim: N real SWIM/Lifeguard membership cores as simulated processes on a SimNet.

Each node's mesh address is its name, so the core's `(to_address, message)` pairs go straight
onto the SimNet. The observer keeps, per node, the view its events describe (member ->
state) and checks the one membership safety rule the simulator can judge:

- no node in `SwimSim.protected` (up, answering, reachable: the scenario says which) is ever
  declared dead by anyone ("false death").

It also records when each node learned each (member, state) so tests can measure detection
and dissemination times.

    async with open_swim_sim(seed, nodes=8) as sim:
        await sim.wait_converged()
        sim.crash("m3")
        ...
"""

from __future__ import annotations

import gc
import random
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from spear.mesh.members import EventKind, MemberEvent
from spear.mesh.membership import Membership
from spear.mesh.swim_messages import MemberMeta
from spear.mesh.swim_timings import SIM, SwimTimings
from tests.sim.disk import SimDisk
from tests.sim.invariants import InvariantViolation, LivenessViolation
from tests.sim.net import Codec, Latency, SimNet
from tests.sim.process import Process

_STATE_OF = {
    EventKind.JOINED: "alive",
    EventKind.UPDATED: "alive",
    EventKind.ALIVE: "alive",
    EventKind.SUSPECT: "suspect",
    EventKind.DEAD: "dead",
    EventKind.LEFT: "left",
}


@dataclass(slots=True)
class SwimObserver:
    """Views per node, false-death checks, and first-learned times (see the module doc)."""

    sim: SwimSim
    views: dict[str, dict[str, str]] = field(default_factory=dict)
    #: observer -> how many members its view holds alive (a cheap convergence pre-check)
    alive_counts: dict[str, int] = field(default_factory=dict)
    learned: dict[tuple[str, str, int], dict[str, float]] = field(default_factory=dict)
    false_deaths: list[tuple[float, str, str]] = field(default_factory=list)
    #: (time, observer, subject, state) for every suspect, dead and left event
    verdicts: list[tuple[float, str, str, str]] = field(default_factory=list)
    raise_on_false_death: bool = True

    def on_event(self, observer: str, event: MemberEvent, now: float) -> None:
        # Called for every member event of every node (a million in a 1,000-node join): no
        # throwaway dicts for setdefault.
        member = event.member
        subject = member.meta.node_id
        view = self.views.get(observer)
        if view is None:
            view = self.views[observer] = {}
        before = view.get(subject)
        if event.kind == EventKind.REMOVED:
            view.pop(subject, None)
            state = None
        else:
            state = _STATE_OF[event.kind]
            view[subject] = state
        if subject != observer and (before == "alive") != (state == "alive"):
            delta = 1 if state == "alive" else -1
            self.alive_counts[observer] = self.alive_counts.get(observer, 0) + delta
        if state is None:
            return
        key = (subject, state, member.incarnation)
        seen = self.learned.get(key)
        if seen is None:
            seen = self.learned[key] = {}
        if observer not in seen:
            seen[observer] = now
        if state != "alive":
            self.verdicts.append((now, observer, subject, state))
        if event.kind == EventKind.DEAD and subject in self.sim.protected:
            self.false_deaths.append((now, observer, subject))
            if self.raise_on_false_death:
                raise InvariantViolation(
                    f"false death at t={now:.3f}: {observer} declared {subject} dead while it "
                    f"was up and answering (seed {self.sim.seed})"
                )

    def first_learned(self, subject: str, state: str) -> dict[str, float]:
        """observer -> earliest time it saw `subject` in `state` (any incarnation)."""
        times: dict[str, float] = {}
        for (who, what, _), seen in self.learned.items():
            if who == subject and what == state:
                for node, at in seen.items():
                    times[node] = min(at, times.get(node, at))
        return times


class SwimDriver:
    """Drives one Membership core: step/tick, send what it returns, report its events."""

    def __init__(self, proc: Process, sim: SwimSim, node_id: str) -> None:
        self.proc = proc
        self.name = node_id
        self.address = proc.name
        self.sim = sim
        now = proc.now()
        meta = MemberMeta(node_id=node_id, name=node_id, mesh_address=self.address)
        rng = random.Random(f"{sim.seed}:swim:{self.name}:{proc.incarnation}")
        # A restarted node must come back above any incarnation others hold (rule 1): the
        # real node persists it; here the process count stands in for that.
        self.core = Membership(
            meta=meta, timings=sim.timings, rng=rng, now=now, incarnation=proc.incarnation * 1000
        )
        sim.observer.views[self.name] = {}
        sim.observer.alive_counts[self.name] = 0
        # Read once per call into the core (its docstring: re-read after every step); the
        # core computes it by scanning its members, so the loop must not ask twice.
        self.next_deadline = self.core.next_deadline

    def on_message(self, src: str, message: object, now: float) -> None:
        self.handle(self.core.step(src, message, now), now)

    def on_tick(self, now: float) -> None:
        self.handle(self.core.tick(now), now)

    def join(self, seeds: Iterable[str]) -> None:
        now = self.proc.now()
        self.handle(self.core.join(tuple(seeds), now), now)

    def handle(self, output: Any, now: float) -> None:
        self.next_deadline = self.core.next_deadline
        if output.messages:
            send, address = self.proc.net.send, self.address
            for to, message in output.messages:
                send(address, to, message)
        if output.events:
            on_event, name = self.sim.observer.on_event, self.name
            for event in output.events:
                on_event(name, event, now)


class SwimSim:
    """The simulated membership cluster.

    Args:
        seed: the one seed everything derives from.
        nodes: how many nodes (named m0001, m0002, ...).
        timings: SWIM timings (default: the SIM profile, LAN values).
        codec: deliver encoded bytes through this codec.
    """

    def __init__(
        self,
        seed: int,
        *,
        nodes: int,
        timings: SwimTimings = SIM,
        latency: Latency | None = None,
        codec: Codec | None = None,
    ) -> None:
        self.seed = seed
        self.timings = timings
        self.net = SimNet(seed, latency=latency, codec=codec)
        self.names = [f"m{i:04d}" for i in range(1, nodes + 1)]
        self.rng = random.Random(f"{seed}:nemesis")
        self.protected: set[str] = set(self.names)
        self.observer = SwimObserver(self)
        #: node id -> its process (a node restarted at a new address gets a new process)
        self.procs = {
            name: Process(
                name,
                net=self.net,
                disk=SimDisk(random.Random(f"{seed}:disk:{name}")),
                factory=self._factory(name),
            )
            for name in self.names
        }
        self._nursery: trio.Nursery | None = None

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "the simulation is not running"
        return self._nursery

    def node(self, name: str) -> SwimDriver:
        driver = self.procs[name].driver
        assert isinstance(driver, SwimDriver), f"{name} is down"
        return driver

    def up(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.up]

    async def start(self, nursery: trio.Nursery, *, join_spread_s: float = 1.0) -> None:
        """Start every node; each joins through the first node at a random time within
        `join_spread_s` (the first node joins no one)."""
        self._nursery = nursery
        first = self.names[0]
        self.procs[first].start(nursery)
        joins = sorted((self.rng.uniform(0, join_spread_s), n) for n in self.names[1:])
        elapsed = 0.0
        for at, name in joins:
            await trio.sleep(at - elapsed)
            elapsed = at
            self.procs[name].start(nursery)
            self.node(name).join([first])

    def _factory(self, node_id: str) -> Callable[[Process], SwimDriver]:
        return lambda proc: SwimDriver(proc, self, node_id)

    def restart_at(
        self, name: str, address: str, seeds: Iterable[str], *, protect: bool = True
    ) -> None:
        """Restart node `name` (same id, same disk, a higher incarnation) at a new mesh
        `address`, joining through the nodes named in `seeds`."""
        old = self.procs[name]
        if old.up:
            old.crash()
        proc = Process(address, net=self.net, disk=old.disk, factory=self._factory(name))
        proc.incarnation = old.incarnation
        self.procs[name] = proc
        proc.start(self.nursery)
        self.node(name).join(self.procs[s].name for s in seeds)
        if protect:
            self.protected.add(name)

    def crash(self, name: str) -> None:
        self.protected.discard(name)
        self.procs[name].crash()

    def restart(self, name: str, seeds: Iterable[str]) -> None:
        self.procs[name].restart(self.nursery)
        self.node(name).join(self.procs[s].name for s in seeds)
        self.protected.add(name)

    def converged(self, expected: dict[str, str] | None = None) -> bool:
        """True when every up node's view equals `expected` (default: every up node alive,
        everything else dead or left)."""
        if expected is None:
            up = set(self.up())
            counts = self.observer.alive_counts
            if any(counts.get(name, 0) != len(up) - 1 for name in up):
                return False  # O(n): the full check below is O(n^2)
            expected = {n: "alive" for n in up}
            gone = {"dead", "left"}
        else:
            gone = set()
        for name in self.up():
            view = self.observer.views.get(name, {})
            for subject in self.names:
                if subject == name:
                    continue
                want = expected.get(subject)
                have = view.get(subject)
                if want is None:
                    if have is not None and have not in gone:
                        return False
                elif have != want:
                    return False
        return True

    async def wait_converged(self, timeout_s: float, *, poll_s: float = 0.5) -> float:
        """Wait until `converged()`; return the virtual time it took, or fail at the bound."""
        start = trio.current_time()
        with trio.move_on_after(timeout_s):
            # Checking a view is O(n^2) for n nodes, so look at a fixed virtual cadence
            # rather than after every event (virtual time: the poll costs no wall time).
            while True:
                if self.converged():
                    return trio.current_time() - start
                await trio.sleep(poll_s)
        raise LivenessViolation(
            f"liveness: membership views did not converge within {timeout_s} s "
            f"(seed {self.seed}): {self.divergence()}"
        )

    def divergence(self, limit: int = 5) -> list[str]:
        up = set(self.up())
        out = []
        for name in sorted(up):
            view = self.observer.views.get(name, {})
            wrong = {
                s: view.get(s)
                for s in self.names
                if s != name and (view.get(s) == "alive") != (s in up)
            }
            if wrong:
                out.append(f"{name}: {dict(list(wrong.items())[:limit])}")
        return out[:limit]


@contextmanager
def large_heap_gc() -> Iterator[None]:
    """Collect garbage rarely while a large simulation runs (restored after).

    A 1,000-node simulation holds millions of live objects; with the default thresholds
    the cyclic collector rescans them so often that it takes a third or more of the wall
    time. What exists now is frozen out of every later scan; new objects are collected
    every 100,000 allocations instead of 700.
    """
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


@asynccontextmanager
async def open_swim_sim(
    seed: int, *, join_spread_s: float = 1.0, **kwargs: Any
) -> AsyncIterator[SwimSim]:
    """Run a SwimSim for the body of the `async with`; every process stops at exit."""
    sim = SwimSim(seed, **kwargs)
    async with trio.open_nursery() as nursery:
        await sim.start(nursery, join_spread_s=join_spread_s)
        yield sim
        nursery.cancel_scope.cancel()
