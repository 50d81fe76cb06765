"""The failure detector: probe rounds, indirect probes, and relaying probes for others.

One round (research/mesh.md rules 2-4, 6): ping the next member of the randomized
round-robin order; if no ack arrives within the awareness-scaled probe timeout, ask k alive
helpers to ping it (PingRequest) and ping it once more directly; if no ack by the end of the
awareness-scaled probe interval, suspect it. Helpers answer a Nack when the target stays
silent for a probe timeout; each missing nack raises our local-health score (our own links
may be the problem), each ack lowers it. A ping to a suspect carries the suspicion first
(Lifeguard's buddy system) so the suspect can refute at once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from spear.mesh.awareness import Awareness
from spear.mesh.member_table import MemberTable
from spear.mesh.members import GONE, MemberState
from spear.mesh.outbox import Outbox
from spear.mesh.probing import ProbeRound, Relay
from spear.mesh.swim_messages import Ack, Nack, Ping, PingRequest, SuspectUpdate, Update
from spear.mesh.swim_timings import SwimTimings

if TYPE_CHECKING:
    import random  # annotations only: randomness is passed in, never created


class Prober:
    """One node's probing state: the round in flight and the probes relayed for others."""

    def __init__(
        self,
        *,
        table: MemberTable,
        timings: SwimTimings,
        rng: random.Random,
        awareness: Awareness,
        outbox: Outbox,
        now: float,
    ) -> None:
        self._table = table
        self._timings = timings
        self._rng = rng
        self._awareness = awareness
        self._outbox = outbox
        self._probe: ProbeRound | None = None
        self._relays: dict[int, Relay] = {}
        self._seq = 0
        # Stagger the first round so nodes started together do not probe in lockstep.
        self._next_probe = now + rng.uniform(0.0, timings.probe_interval_s)
        self.probes = 0
        self.probes_failed = 0
        self.indirect_probes = 0

    def deadline(self, *, probing: bool) -> float:
        """When `tick` next has work (relay nacks and expiries; probe steps if `probing`)."""
        # Read after every call into the core: one running minimum, no calls.
        if not probing:
            deadline = math.inf
        elif (probe := self._probe) is None:
            deadline = self._next_probe
        elif not probe.acked and not probe.indirect_sent:
            deadline = probe.direct_deadline
        else:
            deadline = probe.end
        for r in self._relays.values():
            at = r.expires if r.nacked else r.nack_deadline
            if at < deadline:
                deadline = at
        return deadline

    def tick(self, now: float, *, probing: bool) -> None:
        """Send due nacks; when `probing`, advance the round in flight or start the next."""
        self._tick_relays(now)
        if not probing:
            self._probe = None
            return
        probe = self._probe
        if probe is not None:
            if not probe.acked and not probe.indirect_sent and now >= probe.direct_deadline:
                self._send_indirect(probe)
            if now >= probe.end:
                self._probe = None
                self._finish(probe, now)
        if self._probe is None and now >= self._next_probe:
            self._start(now)

    # --- probes from others ---------------------------------------------------------------

    def handle_ping(self, message: Ping) -> None:
        if message.target_id and message.target_id != self._table.own_id:
            return  # meant for a node that used to live at this address
        updates = self._outbox.piggyback(message.source_id)
        self._outbox.send(
            message.source_address,
            Ack(seq=message.seq, source_id=self._table.own_id, updates=updates),
        )

    def handle_ping_request(self, message: PingRequest, now: float) -> None:
        seq = self._next_seq()
        self._relays[seq] = Relay(
            requester_id=message.source_id,
            requester_address=message.source_address,
            requester_seq=message.seq,
            nack_deadline=now + self._timings.probe_timeout_s,
            expires=now + self._timings.probe_interval_s,
        )
        ping = Ping(
            seq=seq,
            target_id=message.target_id,
            source_id=self._table.own_id,
            source_address=self._table.own.meta.mesh_address,
            updates=self._outbox.piggyback(message.target_id),
        )
        self._outbox.send(message.target_address, ping)

    def handle_ack(self, message: Ack) -> None:
        probe = self._probe
        if probe is not None and message.seq == probe.seq:
            if not probe.acked:
                probe.acked = True
                self._awareness.apply(-1)
            return
        relay = self._relays.pop(message.seq, None)
        if relay is not None:
            updates = self._outbox.piggyback(relay.requester_id)
            ack = Ack(seq=relay.requester_seq, source_id=self._table.own_id, updates=updates)
            self._outbox.send(relay.requester_address, ack)

    def handle_nack(self, message: Nack) -> None:
        probe = self._probe
        if probe is not None and message.seq == probe.seq:
            probe.nacks += 1

    # --- our own rounds -------------------------------------------------------------------

    def _start(self, now: float) -> None:
        self._next_probe = now + self._awareness.scale(self._timings.probe_interval_s)
        target = self._table.order.next(self._probeable)
        if target is None:
            return
        record = self._table.records[target]
        address = record.meta.mesh_address
        self._probe = ProbeRound(
            seq=self._next_seq(),
            target_id=target,
            target_address=address,
            incarnation=record.incarnation,
            direct_deadline=now + self._awareness.scale(self._timings.probe_timeout_s),
            end=self._next_probe,
        )
        self.probes += 1
        self._outbox.send(address, self._ping(self._probe))

    def _ping(self, probe: ProbeRound) -> Ping:
        """A probe ping; to a suspect it carries the suspicion first (the buddy system)."""
        record = self._table.records[probe.target_id]
        first: tuple[Update, ...] = ()
        suspicion = self._table.suspicions.get(probe.target_id)
        if record.state is MemberState.SUSPECT and suspicion is not None:
            buddy = SuspectUpdate(
                node_id=probe.target_id, incarnation=record.incarnation, accuser=suspicion.accuser
            )
            first = (buddy,)
        limit = self._timings.max_updates_per_message - len(first)
        return Ping(
            seq=probe.seq,
            target_id=probe.target_id,
            source_id=self._table.own_id,
            source_address=self._table.own.meta.mesh_address,
            updates=first + self._outbox.piggyback(probe.target_id, limit),
        )

    def _send_indirect(self, probe: ProbeRound) -> None:
        probe.indirect_sent = True
        excluded = (self._table.own_id, probe.target_id)
        candidates = [
            key
            for key, r in self._table.records.items()
            if r.state is MemberState.ALIVE and key not in excluded
        ]
        helpers = self._rng.sample(candidates, min(self._timings.indirect_checks, len(candidates)))
        probe.expected_nacks = len(helpers)
        for helper in helpers:
            request = PingRequest(
                seq=probe.seq,
                target_id=probe.target_id,
                target_address=probe.target_address,
                source_id=self._table.own_id,
                source_address=self._table.own.meta.mesh_address,
                updates=self._outbox.piggyback(helper),
            )
            self._outbox.send(self._table.records[helper].meta.mesh_address, request)
        self.indirect_probes += len(helpers)
        # A second direct ping stands in for memberlist's TCP fallback: one lost message on
        # the direct path must not be enough to suspect a member.
        self._outbox.send(probe.target_address, self._ping(probe))

    def _finish(self, probe: ProbeRound, now: float) -> None:
        if probe.acked:
            return
        self.probes_failed += 1
        # Missed nacks mean our own links are failing: blame ourselves, not only the target.
        missed = probe.expected_nacks - probe.nacks if probe.expected_nacks else 1
        self._awareness.apply(max(0, missed))
        record = self._table.records.get(probe.target_id)
        if record is not None and record.state not in GONE:
            # The incarnation probed, not the current one (as memberlist does): a member that
            # restarted at a new address meanwhile is not accused for its old address's
            # silence (the table ignores a suspicion below the incarnation it holds).
            accusation = SuspectUpdate(
                node_id=probe.target_id, incarnation=probe.incarnation, accuser=self._table.own_id
            )
            self._table.apply_suspect(accusation, now)

    def _tick_relays(self, now: float) -> None:
        for seq, relay in list(self._relays.items()):
            if not relay.nacked and now >= relay.nack_deadline:
                relay.nacked = True
                nack = Nack(seq=relay.requester_seq, source_id=self._table.own_id)
                self._outbox.send(relay.requester_address, nack)
            if now >= relay.expires:
                del self._relays[seq]

    def _probeable(self, node_id: str) -> bool:
        record = self._table.records.get(node_id)
        return record is not None and record is not self._table.own and record.state not in GONE

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq
