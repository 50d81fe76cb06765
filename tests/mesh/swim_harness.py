"""A pure multi-node harness for the membership core: no trio, just a heap of deliveries.

Nodes are `Membership` cores addressed by mesh address; the harness delivers their messages
after a seeded latency (plus optional loss and per-node extra delay), calls `tick` at each
core's `next_deadline`, and records every event with the virtual time it happened. One
`random.Random(seed)` drives the network; each core gets its own seeded RNG.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass, field

from spear.mesh.codec import MessageCodec
from spear.mesh.members import EventKind, MemberEvent, MemberState
from spear.mesh.membership import Membership, Output
from spear.mesh.swim_messages import MemberMeta
from spear.mesh.swim_timings import SIM, SwimTimings


@dataclass(frozen=True, slots=True)
class Seen:
    """`observer` reported `event` at virtual time `at`."""

    at: float
    observer: str
    event: MemberEvent


@dataclass(slots=True)
class SwimCluster:
    """N membership cores on a seeded in-memory network."""

    seed: int = 0
    timings: SwimTimings = SIM
    loss: float = 0.0
    latency_s: tuple[float, float] = (0.0005, 0.005)
    now: float = 0.0
    nodes: dict[str, Membership] = field(default_factory=dict)
    crashed: set[str] = field(default_factory=set)
    #: extra one-way delay (min, max) for messages sent by a node: a CPU-starved node
    slow: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: directed links that lose everything (partitions)
    blocked: set[tuple[str, str]] = field(default_factory=set)
    seen: list[Seen] = field(default_factory=list)
    #: when set, every message is encoded and decoded on its way (exercises the wire format)
    codec: MessageCodec | None = None
    delivered: int = 0
    _heap: list[tuple[float, int, str, str, object]] = field(default_factory=list)
    _deadlines: dict[str, float] = field(default_factory=dict)
    #: (deadline, address) entries; stale ones (not the node's current deadline) are skipped
    _timers: list[tuple[float, str]] = field(default_factory=list)
    _order: itertools.count[int] = field(default_factory=itertools.count)
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(f"{self.seed}:net")

    @staticmethod
    def address(name: str) -> str:
        return f"{name}:7946"

    def add(self, name: str, *, incarnation: int = 0, voter: bool = True) -> Membership:
        """Start a node called `name` (its id is `name` too) at the current time."""
        meta = MemberMeta(node_id=name, name=name, mesh_address=self.address(name), voter=voter)
        core = Membership(
            meta=meta,
            timings=self.timings,
            rng=random.Random(f"{self.seed}:{name}"),
            now=self.now,
            incarnation=incarnation,
        )
        self.nodes[meta.mesh_address] = core
        self._set_deadline(meta.mesh_address, core, force=True)
        self.crashed.discard(meta.mesh_address)
        return core

    def core(self, name: str) -> Membership:
        return self.nodes[self.address(name)]

    def start(self, count: int) -> list[str]:
        """Start `count` nodes n1..n<count>; every node after the first joins via n1."""
        names = [f"n{i}" for i in range(1, count + 1)]
        for name in names:
            core = self.add(name)
            if name != names[0]:
                self.apply(core, core.join([self.address(names[0])], self.now))
        return names

    def apply(self, core: Membership, output: Output) -> None:
        """Record `output`'s events and put its messages on the network."""
        source = core.node_id
        for event in output.events:
            self.seen.append(Seen(self.now, source, event))
        src = self.address(source)
        self._set_deadline(src, core)
        for to, message in output.messages:
            if (src, to) in self.blocked or self._rng.random() < self.loss:
                continue
            if self.codec is not None:
                message = self.codec.decode(self.codec.encode(message, sender=source)).message
            delay = self._rng.uniform(*self.latency_s)
            if src in self.slow:
                delay += self._rng.uniform(*self.slow[src])
            heapq.heappush(self._heap, (self.now + delay, next(self._order), to, src, message))

    def _set_deadline(self, address: str, core: Membership, *, force: bool = False) -> None:
        # Only a call into a core can change its deadline, so it is read after each call.
        deadline = core.next_deadline
        if force or self._deadlines.get(address) != deadline:
            self._deadlines[address] = deadline
            heapq.heappush(self._timers, (deadline, address))

    def _next_timer(self) -> tuple[float, str]:
        while self._timers:
            deadline, address = self._timers[0]
            if address not in self.crashed and self._deadlines.get(address) == deadline:
                return deadline, address
            heapq.heappop(self._timers)
        return math.inf, ""

    def crash(self, name: str) -> None:
        """Stop a node: it neither sends, receives nor ticks until revived."""
        self.crashed.add(self.address(name))

    def revive(self, name: str) -> None:
        """Resume a crashed node with its state intact (a long pause, not a restart)."""
        address = self.address(name)
        self.crashed.discard(address)
        self._set_deadline(address, self.nodes[address], force=True)

    def partition(self, *groups: list[str]) -> None:
        """Cut every link between different groups (both directions)."""
        for a, b in itertools.permutations(range(len(groups)), 2):
            for x in groups[a]:
                for y in groups[b]:
                    self.blocked.add((self.address(x), self.address(y)))

    def run_for(self, duration_s: float) -> None:
        """Advance virtual time by `duration_s`, delivering and ticking in time order."""
        end = self.now + duration_s
        while True:
            next_tick, tick_address = self._next_timer()
            next_delivery = self._heap[0][0] if self._heap else end + 1
            when = min(next_tick, next_delivery)
            if when > end:
                self.now = end
                return
            self.now = max(self.now, when)
            if next_delivery <= next_tick:
                _, _, to, src, message = heapq.heappop(self._heap)
                core = self.nodes.get(to)
                if core is not None and to not in self.crashed:
                    self.delivered += 1
                    self.apply(core, core.step(src, message, self.now))
            else:
                core = self.nodes[tick_address]
                self.apply(core, core.tick(self.now))

    def states(self, observer: str) -> dict[str, MemberState]:
        """What `observer` believes about every member."""
        return {m.node_id: m.state for m in self.core(observer).members()}

    def first_seen(self, kind: EventKind, subject: str, observer: str) -> float | None:
        """When `observer` first reported `kind` about `subject`."""
        for item in self.seen:
            if (
                item.observer == observer
                and item.event.kind is kind
                and item.event.member.node_id == subject
            ):
                return item.at
        return None

    def verdicts(self, kind: EventKind) -> list[Seen]:
        """Every event of `kind` reported by any node about another node."""
        return [
            s for s in self.seen if s.event.kind is kind and s.event.member.node_id != s.observer
        ]
