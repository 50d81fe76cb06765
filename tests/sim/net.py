"""SimNet: a seeded, faulty, in-memory network for the cluster simulator.

Every node owns an `Inbox`: a heap of deliveries ordered by (arrival time, send sequence). A
send consults the directed link `src -> dst`:

- blocked (partitions: symmetric, asymmetric, non-transitive): the message is lost;
- drop probability: the message is lost;
- latency (a `Latency` distribution, sampled per copy): later messages may overtake earlier
  ones, which is how reordering happens;
- duplicate probability: a second copy with its own latency;
- clogged until `t`: the message is held and arrives no earlier than `t` (FoundationDB's
  "clog": delayed, not lost);
- `filters`: drop-by-content rules (e.g. "no AppendEntries for now") for directed scenarios,
  applied at send and again on arrival (so they also lose messages already in flight).

All randomness comes from one seed: each directed link draws from its own `LinkRandom`
stream seeded with `f"{seed}:net:{src}->{dst}"`, so what one link does never depends on how
busy another link was. When a codec is given, messages travel as encoded bytes and are
decoded on arrival, so the wire encoding of every message kind is exercised.

Time is trio's (`trio.current_time()`, virtual under MockClock). Each inbox tells its
process (through `Inbox.waker`) when a message will arrive, so the simulation's `Scheduler`
(tests/sim/process.py, owned by the net) steps that process then; nothing here starts tasks.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeAlias

import trio

from tests.sim.process import Scheduler


class Codec(Protocol):
    """What SimNet needs from a message codec (spear.mesh.codec.MessageCodec fits)."""

    def encode(self, message: object) -> bytes: ...

    def decode(self, data: bytes) -> object: ...


class EnvelopeCodec:
    """Adapts spear.mesh.codec.MessageCodec (whose decode returns a `Decoded` envelope) to
    the `Codec` shape SimNet uses."""

    def __init__(self, codec: Any) -> None:
        self._codec = codec

    def encode(self, message: object) -> bytes:
        data: bytes = self._codec.encode(message)
        return data

    def decode(self, data: bytes) -> object:
        return self._codec.decode(data).message


class Draws(Protocol):
    """The draws a `Latency` takes (random.Random and LinkRandom fit)."""

    def random(self) -> float: ...

    def uniform(self, a: float, b: float) -> float: ...


_MASK64 = (1 << 64) - 1


class LinkRandom:
    """One directed link's random stream: splitmix64 over a 64-bit state seeded by a string.

    A link needs a few draws per message, but a 1,000-node simulation talks over up to a
    million links: a `random.Random` each (a 2.5 KB Mersenne Twister state, seeded through
    SHA-512) cost gigabytes and a sixth of the run, where this keeps one integer per link.
    splitmix64 (Steele, Lea, Flood 2014) passes BigCrush, ample for fault injection.
    """

    __slots__ = ("_state",)

    def __init__(self, seed: str) -> None:
        digest = hashlib.blake2b(seed.encode(), digest_size=8).digest()
        self._state = int.from_bytes(digest, "big")

    def random(self) -> float:
        """A float uniform in [0, 1) with 53 random bits."""
        state = self._state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return ((z ^ (z >> 31)) >> 11) * 2.0**-53

    def pair(self) -> tuple[float, float]:
        """Two draws of `random()` in one call (a message's latency and spike draws)."""
        state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        first = ((z ^ (z >> 31)) >> 11) * 2.0**-53
        state = self._state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return first, ((z ^ (z >> 31)) >> 11) * 2.0**-53

    def uniform(self, a: float, b: float) -> float:
        """A float uniform in [a, b) (as random.Random.uniform)."""
        return a + (b - a) * self.random()


@dataclass(frozen=True, slots=True, kw_only=True)
class Latency:
    """One-way latency: uniform in [min_s, max_s), with a rare spike of `spike_s` added."""

    min_s: float = 0.0005
    max_s: float = 0.005
    spike_probability: float = 0.001
    spike_s: float = 0.2

    def sample(self, rng: Draws) -> float:
        """Draw one latency in seconds."""
        value = rng.uniform(self.min_s, self.max_s)
        if self.spike_probability and rng.random() < self.spike_probability:
            value += self.spike_s
        return value


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkRule:
    """The fault settings of one directed link."""

    blocked: bool = False
    drop_probability: float = 0.0
    duplicate_probability: float = 0.0
    latency: Latency = field(default_factory=Latency)
    clogged_until: float = 0.0


@dataclass(slots=True)
class NetStatistics:
    """Counters over the whole network."""

    sent: int = 0
    delivered: int = 0
    dropped: int = 0
    blocked: int = 0
    duplicated: int = 0
    lost_in_crash: int = 0
    encoded_bytes: int = 0


#: one message in flight: [arrival time, send sequence, source, payload]. A plain list, so
#: the heap compares (time, sequence) in C and a send builds no object of its own (a
#: 1,000-node simulation moves millions); the sequence is unique, so the comparison never
#: reaches the source. A list rather than a tuple: a clogged message gets its time later.
_Delivery: TypeAlias = list[Any]
_AT, _SRC, _PAYLOAD = 0, 2, 3


class Inbox:
    """One node's incoming messages, in arrival order, with a wake-up for its driver."""

    def __init__(self) -> None:
        self._heap: list[_Delivery] = []
        #: called with the arrival time of every message pushed (the process's wake-up)
        self.waker: Callable[[float], None] | None = None

    @property
    def next_arrival(self) -> float:
        """When the earliest pending message arrives (inf when none is in flight)."""
        return self._heap[0][_AT] if self._heap else math.inf

    def push(self, delivery: _Delivery) -> None:
        heapq.heappush(self._heap, delivery)
        if self.waker is not None:
            self.waker(delivery[_AT])

    def pop_due(self, now: float) -> _Delivery | None:
        """The earliest message that has arrived by `now`, or None."""
        heap = self._heap
        if heap and heap[0][_AT] <= now:
            return heapq.heappop(heap)
        return None

    def held(self) -> list[_Delivery]:
        """Messages held indefinitely by a clog (arrival time infinite)."""
        return [d for d in self._heap if d[_AT] == math.inf]

    def retime(self, delivery: _Delivery, at: float) -> None:
        """Give a held message its arrival time."""
        self._heap.remove(delivery)
        heapq.heapify(self._heap)
        delivery[_AT] = at
        self.push(delivery)

    def drop_arrived(self, now: float) -> int:
        """Forget messages that reached the (crashed) process; return how many."""
        kept = [d for d in self._heap if d[_AT] > now]
        lost = len(self._heap) - len(kept)
        heapq.heapify(kept)
        self._heap = kept
        return lost


class SimNet:
    """The network: named nodes, directed link rules, seeded faults.

    Args:
        seed: the simulation seed; every link's RNG derives from it.
        latency: the default latency of every link.
        codec: when given, messages are encoded on send and decoded on delivery.
    """

    def __init__(
        self, seed: int, *, latency: Latency | None = None, codec: Codec | None = None
    ) -> None:
        self._seed = seed
        self._default = LinkRule(latency=latency or Latency())
        self._rules: dict[tuple[str, str], LinkRule] = {}
        self._rngs: dict[tuple[str, str], LinkRandom] = {}
        self._inboxes: dict[str, Inbox] = {}
        self._codec = codec
        self._seq = itertools.count()
        self.statistics = NetStatistics()
        #: steps every process attached to this net (one trio task for the simulation)
        self.scheduler = Scheduler()
        #: drop-by-content rules: a message for which any filter returns True is lost
        self.filters: list[Callable[[str, str, object], bool]] = []
        self._clogged: set[str] = set()

    def add_node(self, name: str) -> Inbox:
        """Attach a node; return its inbox (the same one after a restart)."""
        return self._inboxes.setdefault(name, Inbox())

    @property
    def nodes(self) -> list[str]:
        return list(self._inboxes)

    def rule(self, src: str, dst: str) -> LinkRule:
        return self._rules.get((src, dst), self._default)

    def set_rule(self, src: str, dst: str, **changes: object) -> None:
        """Change some settings of the directed link `src -> dst`."""
        self._rules[(src, dst)] = replace(self.rule(src, dst), **changes)  # type: ignore[arg-type]

    def set_all(self, **changes: object) -> None:
        """Change settings on every directed link between attached nodes (and the default)."""
        self._default = replace(self._default, **changes)  # type: ignore[arg-type]
        for key in list(self._rules):
            self._rules[key] = replace(self._rules[key], **changes)  # type: ignore[arg-type]

    def block(self, src: str, dst: str) -> None:
        """Cut the directed link `src -> dst` (an asymmetric fault if only one way)."""
        self.set_rule(src, dst, blocked=True)

    def cut(self, a: str, b: str) -> None:
        """Cut both directions between a and b."""
        self.block(a, b)
        self.block(b, a)

    def partition(self, *groups: Iterable[str]) -> None:
        """Symmetric partition: links between different groups are cut; nodes not named form
        one more group."""
        sets = [list(g) for g in groups]
        named = {n for g in sets for n in g}
        rest = [n for n in self._inboxes if n not in named]
        if rest:
            sets.append(rest)
        side = {n: i for i, g in enumerate(sets) for n in g}
        for a in self._inboxes:
            for b in self._inboxes:
                if a != b and side[a] != side[b]:
                    self.block(a, b)

    def isolate(self, name: str) -> None:
        """Cut every link to and from `name`."""
        for other in self._inboxes:
            if other != name:
                self.cut(name, other)

    def clog(self, name: str, until: float) -> None:
        """Hold every message to and from `name` until virtual time `until`."""
        for other in self._inboxes:
            if other != name:
                self.set_rule(name, other, clogged_until=until)
                self.set_rule(other, name, clogged_until=until)

    def clog_until_unclogged(self, name: str) -> None:
        """Hold every message to and from `name` until `unclog(name)` (or `heal()`)."""
        self._clogged.add(name)
        self.clog(name, math.inf)

    def unclog(self, name: str) -> None:
        """Release `name`'s links (those to a node still clogged stay held) and send on the
        messages they held, each with a fresh latency (FoundationDB's swizzle-clog)."""
        self._clogged.discard(name)
        for other in self._inboxes:
            if other != name:
                until = math.inf if other in self._clogged else 0.0
                self.set_rule(name, other, clogged_until=until)
                self.set_rule(other, name, clogged_until=until)
        self._release_held()

    def heal(self) -> None:
        """Unblock and unclog every link; loss, duplication and latency settings stay."""
        self._clogged.clear()
        for key, rule in list(self._rules.items()):
            self._rules[key] = replace(rule, blocked=False, clogged_until=0.0)
        self._release_held()

    def _release_held(self) -> None:
        now = trio.current_time()
        for dst, inbox in self._inboxes.items():
            for delivery in inbox.held():
                src = delivery[_SRC]
                rule = self.rule(src, dst)
                if rule.clogged_until < math.inf:
                    at = now + rule.latency.sample(self._rng(src, dst))
                    inbox.retime(delivery, max(at, rule.clogged_until))

    def _rng(self, src: str, dst: str) -> LinkRandom:
        rng = self._rngs.get((src, dst))
        if rng is None:
            rng = self._rngs[(src, dst)] = LinkRandom(f"{self._seed}:net:{src}->{dst}")
        return rng

    def send(self, src: str, dst: str, message: object) -> None:
        """Send one message now; faults apply per the link rule. Never blocks."""
        stats = self.statistics
        stats.sent += 1
        inbox = self._inboxes.get(dst)
        link = (src, dst)
        rule = self._rules.get(link, self._default)
        filters = self.filters
        if (
            inbox is None
            or rule.blocked
            or (filters and any(f(src, dst, message) for f in filters))
        ):
            stats.blocked += 1
            return
        rng = self._rngs.get(link) or self._rng(src, dst)
        if rule.drop_probability and rng.random() < rule.drop_probability:
            stats.dropped += 1
            return
        payload: object = message
        if self._codec is not None:
            encoded = self._codec.encode(message)
            stats.encoded_bytes += len(encoded)
            payload = encoded
        copies = 1
        if rule.duplicate_probability and rng.random() < rule.duplicate_probability:
            copies = 2
            stats.duplicated += 1
        # Inside a step the scheduler knows the time (one trio call less per message).
        now = self.scheduler.now
        if now is None:
            now = trio.current_time()
        latency, clogged_until = rule.latency, rule.clogged_until
        for _ in range(copies):
            # Latency.sample, inlined (the same draws and arithmetic: the same times).
            if latency.spike_probability:
                draw, spike = rng.pair()
                value = latency.min_s + (latency.max_s - latency.min_s) * draw
                if spike < latency.spike_probability:
                    value += latency.spike_s
            else:
                value = latency.min_s + (latency.max_s - latency.min_s) * rng.random()
            at = now + value
            if at < clogged_until:
                at = clogged_until
            inbox.push([at, next(self._seq), src, payload])

    def receive(self, name: str, now: float) -> tuple[str, object] | None:
        """The next message that has arrived at `name` by `now`, decoded: (src, message)."""
        inbox = self._inboxes[name]
        while (delivery := inbox.pop_due(now)) is not None:
            src, payload = delivery[_SRC], delivery[_PAYLOAD]
            if self._codec is not None:
                payload = self._codec.decode(payload)
            if self.filters and any(f(src, name, payload) for f in self.filters):
                self.statistics.blocked += 1  # lost in flight
                continue
            self.statistics.delivered += 1
            return src, payload
        return None

    def crash(self, name: str, now: float) -> None:
        """Messages that reached `name`'s process but were not handled die with it."""
        self.statistics.lost_in_crash += self._inboxes[name].drop_arrived(now)
