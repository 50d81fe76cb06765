"""The SWIM + Lifeguard membership core: pure, fed messages and `now`, returning what to send.

Modelled on hashicorp/memberlist; the rules are research/mesh.md §A 1-11. No I/O, no clock,
no global randomness: the driver (or the simulator) owns sockets and time.

API (stable; the trio driver and tests/sim drive exactly this):

    core = Membership(meta=MemberMeta(...), timings=LAN, rng=random.Random(seed), now=t0,
                      incarnation=0)
    core.join(seed_addresses, now) -> Output    # push-pull to seeds by address; retried
                                                # every probe interval until a peer is known
    core.step(from_address, message, now) -> Output   # one received SWIM message
    core.tick(now) -> Output                    # call at (or after) core.next_deadline
    core.leave(now) -> Output                   # graceful: self-declared "left", gossiped
    core.update_meta(meta, now) -> Output       # bump incarnation, gossip the new meta
    core.next_deadline: float                   # when tick() next has work
    core.members() -> tuple[Member, ...]        # the view (self included), sorted by id
    core.member(node_id) -> Member | None
    core.statistics() -> MembershipStatistics
    core.node_id, core.incarnation, core.health_score

    Output(messages=((to_address, message), ...), events=(MemberEvent, ...), health_score)

Where things live: MemberMeta, the messages and SWIM_MESSAGES in spear.mesh.swim_messages;
SwimTimings and the LAN / LAN_FAST / LOOPBACK / SIM profiles in spear.mesh.swim_timings;
Member, MemberState, MemberEvent, EventKind, MembershipStatistics in spear.mesh.members. The
parts: member_table (incarnation rules, suspicion, refutation), prober (probe rounds,
indirect probes, nacks), suspicion, awareness, broadcasts (retransmit queue), outbox.

Messages are the dataclasses of spear.mesh.swim_messages (tags in SWIM_MESSAGES); they are
addressed by mesh address ("host:port"), and node ids are learned from what arrives.
`from_address` is informational only: replies go to the address a message names, and the
core never reads meaning into a link opening or closing.

Departures from memberlist, each deliberate: the probe timeout is stretched by local health
like the interval (the Lifeguard paper does this; memberlist's code does not), so a starved
node waits longer for acks it will process late; a second direct ping replaces the TCP
fallback probe; a node never receives its own alive update (a wasted transmission); and a
stale accusation about self (below our incarnation) re-queues our current alive update, so a
buddy-system probe gets the refutation its sender missed (without this, 10 % loss for an
hour produced a false death in the harness). Gossip runs only while updates are queued, and
the first round after an idle spell goes out at once rather than on the next interval
boundary, so news travels in a few network delays (measured: an update reached all of 50
nodes within 1.5 gossip intervals at p99) while idle clusters send no gossip at all.

Timers are driven by `tick`: it is harmless to call it early or often, and after any `step`
the driver must re-read `next_deadline` (a received message can create earlier work).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spear.errors import ConfigError
from spear.mesh.awareness import Awareness
from spear.mesh.member_table import MemberTable
from spear.mesh.members import GONE, Member, MemberEvent, MembershipStatistics, MemberState
from spear.mesh.outbox import Outbox
from spear.mesh.prober import Prober
from spear.mesh.swim_messages import (
    PROTOCOL_MAX,
    PROTOCOL_MIN,
    Ack,
    Gossip,
    MemberMeta,
    Nack,
    Ping,
    PingRequest,
    PushPull,
)
from spear.mesh.swim_timings import SwimTimings

if TYPE_CHECKING:
    import random  # annotations only: randomness is passed in, never created


@dataclass(frozen=True, slots=True, kw_only=True)
class Output:
    """What one call into the core produced.

    Attributes:
        messages: (mesh address, SWIM message) pairs to send, in order.
        events: member changes, in the order they happened.
        health_score: the local-health score after the call (0 = healthy).
    """

    messages: tuple[tuple[str, object], ...] = ()
    events: tuple[MemberEvent, ...] = ()
    health_score: int = 0


class Membership:
    """One node's SWIM membership state machine (see the module docstring for the API)."""

    def __init__(
        self,
        *,
        meta: MemberMeta,
        timings: SwimTimings,
        rng: random.Random,
        now: float,
        incarnation: int = 0,
    ) -> None:
        self._timings = timings
        self._rng = rng
        self._awareness = Awareness(timings.awareness_max_multiplier)
        self._table = MemberTable(
            meta=meta,
            incarnation=incarnation,
            timings=timings,
            rng=rng,
            awareness=self._awareness,
            now=now,
        )
        self._members = self._table.records
        self._own = self._table.own
        self._outbox = Outbox(table=self._table, timings=timings)
        self._prober = Prober(
            table=self._table,
            timings=timings,
            rng=rng,
            awareness=self._awareness,
            outbox=self._outbox,
            now=now,
        )
        self._seeds: tuple[str, ...] = ()
        self._next_gossip = now
        self._next_push_pull = now + rng.uniform(0.5, 1.0) * timings.push_pull_interval_s
        self._next_reconnect = now + timings.reconnect_interval_s
        self._next_join = math.inf
        self._push_pulls = 0
        self._incompatible_peers = 0
        self._deaths_declared = 0
        #: outbox.sent at the last flush (equal: nothing to send)
        self._sent_flushed = 0
        self._handlers: dict[type, Callable[[Any, float], None]] = {
            Ping: self._handle_ping,
            PingRequest: self._handle_ping_request,
            Ack: self._handle_ack,
            Nack: self._handle_nack,
            Gossip: self._handle_gossip,
            PushPull: self._handle_push_pull,
        }

    # --- public API --------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self._own.meta.node_id

    @property
    def incarnation(self) -> int:
        return self._own.incarnation

    @property
    def health_score(self) -> int:
        return self._awareness.score

    def members(self) -> tuple[Member, ...]:
        """Every known member, self included, sorted by node id."""
        return tuple(self._members[key].view() for key in sorted(self._members))

    def member(self, node_id: str) -> Member | None:
        """The member with `node_id`, or None if unknown (or forgotten)."""
        record = self._members.get(node_id)
        return None if record is None else record.view()

    def join(self, seed_addresses: Iterable[str], now: float) -> Output:
        """Start a push-pull exchange with every seed; node ids come from the replies.

        The exchange is repeated every probe interval while no other live member is known
        (so a node started before its seeds joins once they are up).
        """
        self._seeds = tuple(a for a in seed_addresses if a != self._own.meta.mesh_address)
        self._send_join(now, always=True)
        return self._flush()

    def step(self, from_address: str, message: object, now: float) -> Output:
        """Handle one received message. Unknown message types are ignored."""
        del from_address  # replies go to the address the message names
        handler = self._handlers.get(type(message))
        if handler is not None:
            handler(message, now)
        return self._flush()

    def tick(self, now: float) -> Output:
        """Run every timer that is due at `now`."""
        self._deaths_declared += self._table.expire_suspicions(now)
        active = not self._table.left
        self._prober.tick(now, probing=active)
        if active:
            self._tick_push_pull(now)
            self._tick_reconnect(now)
            if now >= self._next_join:
                self._send_join(now)
        if now >= self._next_gossip and len(self._table.queue):
            self._gossip(now)
        self._table.expire_tombstones(now)
        return self._flush()

    def leave(self, now: float) -> Output:
        """Leave gracefully: declare self "left" and push that to a few members at once.

        Keep ticking for a few gossip intervals before closing so the news spreads; a left
        node stops probing and is never reconnected to.
        """
        if not self._table.left:
            self._table.leave(now)
            self._gossip(now)
        return self._flush()

    def update_meta(self, meta: MemberMeta, now: float) -> Output:
        """Replace this node's metadata: bump the incarnation and gossip it."""
        if meta.node_id != self.node_id:
            raise ConfigError(
                f"node_id is permanent: cannot change {self.node_id!r} to {meta.node_id!r}"
            )
        self._table.update_own_meta(meta)
        return self._flush()

    @property
    def next_deadline(self) -> float:
        """The earliest time at which `tick` has work to do (math.inf if none)."""
        # Read after every call into the core (the hottest path in a large simulation):
        # one running minimum, no list, no calls.
        table = self._table
        active = not table.left
        deadline = self._prober.deadline(probing=active)
        if self._next_join < deadline:
            deadline = self._next_join
        for suspicion in table.suspicions.values():
            if suspicion.deadline < deadline:
                deadline = suspicion.deadline
        if len(table.queue) and self._next_gossip < deadline:
            deadline = self._next_gossip
        if active and self._next_push_pull < deadline:
            deadline = self._next_push_pull
        gone = table.gone
        if gone:
            oldest = next(iter(gone.values()))
            deadline = min(deadline, oldest.changed_at + self._timings.tombstone_expiry_s)
            if active and any(r.state is MemberState.DEAD for r in gone.values()):
                deadline = min(deadline, self._next_reconnect)
        return deadline

    def statistics(self) -> MembershipStatistics:
        """Counts per state, this node's incarnation and health, and protocol counters."""
        states = [r.state for r in self._members.values()]
        return MembershipStatistics(
            alive=states.count(MemberState.ALIVE),
            suspect=states.count(MemberState.SUSPECT),
            dead=states.count(MemberState.DEAD),
            left=states.count(MemberState.LEFT),
            incarnation=self._own.incarnation,
            health_score=self._awareness.score,
            probes=self._prober.probes,
            probes_failed=self._prober.probes_failed,
            indirect_probes=self._prober.indirect_probes,
            refutations=self._table.refutations,
            suspicions=self._table.suspicions_started,
            deaths_declared=self._deaths_declared,
            push_pulls=self._push_pulls,
            incompatible_peers=self._incompatible_peers,
            queued_updates=len(self._table.queue),
            messages_sent=self._outbox.sent,
        )

    # --- message handlers --------------------------------------------------------------------

    def _handle_ping(self, message: Ping, now: float) -> None:
        self._table.apply_updates(message.updates, now)
        self._prober.handle_ping(message)

    def _handle_ping_request(self, message: PingRequest, now: float) -> None:
        self._table.apply_updates(message.updates, now)
        self._prober.handle_ping_request(message, now)

    def _handle_ack(self, message: Ack, now: float) -> None:
        self._table.apply_updates(message.updates, now)
        self._prober.handle_ack(message)

    def _handle_nack(self, message: Nack, now: float) -> None:
        self._prober.handle_nack(message)

    def _handle_gossip(self, message: Gossip, now: float) -> None:
        self._table.apply_updates(message.updates, now)

    def _handle_push_pull(self, message: PushPull, now: float) -> None:
        if max(PROTOCOL_MIN, message.protocol_min) > min(PROTOCOL_MAX, message.protocol_max):
            self._incompatible_peers += 1
            return
        if not message.reply:
            self._outbox.send(message.source_address, self._push_pull(join=False, reply=True))
        for entry in message.members:
            self._table.merge_entry(entry, message.source_id, now)

    # --- dissemination and anti-entropy (rules 8-10) --------------------------------------

    def _gossip(self, now: float) -> None:
        interval = self._timings.gossip_interval_s
        self._next_gossip = max(self._next_gossip + interval, now + interval / 2)
        outbox, source_id = self._outbox, self._own.meta.node_id
        for target in self._gossip_targets(now):
            updates = outbox.piggyback(target.node_id)
            if updates:
                outbox.send(target.mesh_address, Gossip(source_id=source_id, updates=updates))

    def _gossip_targets(self, now: float) -> list[MemberMeta]:
        """Up to fanout random members: alive, suspect, or dead recently enough to refute."""
        window = self._timings.gossip_to_dead_s
        members = self._members

        def eligible(node_id: str) -> bool:
            record = members[node_id]
            if record.state is MemberState.DEAD:
                return now - record.changed_at < window
            return record.state is not MemberState.LEFT

        chosen = self._table.order.sample(self._timings.gossip_fanout, eligible)
        return [members[node_id].meta for node_id in chosen]

    def _tick_push_pull(self, now: float) -> None:
        if now < self._next_push_pull:
            return
        self._next_push_pull = now + self._timings.push_pull_period_s(self._table.live_count())
        self._push_pull_with(MemberState.ALIVE)

    def _tick_reconnect(self, now: float) -> None:
        """Serf's reconnect loop: a push-pull to one dead member lets a healed partition merge."""
        if now < self._next_reconnect:
            return
        self._next_reconnect = now + self._timings.reconnect_interval_s
        self._push_pull_with(MemberState.DEAD)

    def _push_pull_with(self, state: MemberState) -> None:
        candidates = sorted(
            key for key, r in self._members.items() if r.state is state and r is not self._own
        )
        if candidates:
            target = self._members[self._rng.choice(candidates)]
            self._push_pulls += 1
            self._outbox.send(target.meta.mesh_address, self._push_pull(join=False, reply=False))

    def _send_join(self, now: float, *, always: bool = False) -> None:
        alone = bool(self._seeds) and all(
            r.state in GONE for r in self._members.values() if r is not self._own
        )
        self._next_join = now + self._timings.probe_interval_s if alone else math.inf
        if not (alone or always):
            return
        for address in self._seeds:
            self._push_pulls += 1
            self._outbox.send(address, self._push_pull(join=True, reply=False))

    def _push_pull(self, *, join: bool, reply: bool) -> PushPull:
        return PushPull(
            source_id=self.node_id,
            source_address=self._own.meta.mesh_address,
            protocol_min=PROTOCOL_MIN,
            protocol_max=PROTOCOL_MAX,
            join=join,
            reply=reply,
            members=self._table.entries(),
        )

    def _flush(self) -> Output:
        score = self._awareness.score
        events = self._table.events
        outbox = self._outbox
        if not events and outbox.sent == self._sent_flushed:
            # Most calls (a message of news already heard) produce nothing: one shared,
            # immutable Output per health score instead of a new one each time.
            quiet = _QUIET.get(score)
            if quiet is None:
                quiet = _QUIET[score] = Output(health_score=score)
            return quiet
        self._sent_flushed = outbox.sent
        output = Output(messages=outbox.drain(), events=tuple(events), health_score=score)
        events.clear()
        return output


#: health score -> the Output of a call that produced nothing (frozen, so shared)
_QUIET: dict[int, Output] = {}
