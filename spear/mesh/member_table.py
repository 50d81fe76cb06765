"""The member table: every known member's state and the incarnation rules that change it.

Precedence (SWIM, as memberlist implements it; research/mesh.md rule 7):

- alive(i) replaces what is known at incarnation j only if i > j (a new member is taken as is);
- suspect(i) applies to an alive member when i >= j; to a suspect it is a confirmation;
- dead(i) applies to an alive or suspect member when i >= j; dead and left are final until a
  higher-incarnation alive arrives; dead with accuser == subject means "left";
- about self: any suspect or dead at >= our incarnation, or an alive that disagrees with us,
  is refuted with incarnation max(own, accused) + 1 (only a node raises its own incarnation);
  an accusation below our incarnation only re-queues our current alive update;
- in a push-pull merge a remote dead becomes a local suspect, never a local dead.

Every accepted change is queued for dissemination and reported as an event.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spear.mesh.awareness import Awareness
from spear.mesh.broadcasts import BroadcastQueue
from spear.mesh.members import GONE, EventKind, Member, MemberEvent, MemberState
from spear.mesh.probing import ProbeOrder
from spear.mesh.suspicion import Suspicion, suspicion_bounds
from spear.mesh.swim_messages import (
    AliveUpdate,
    DeadUpdate,
    MemberEntry,
    MemberMeta,
    SuspectUpdate,
)
from spear.mesh.swim_timings import SwimTimings

if TYPE_CHECKING:
    import random  # annotations only: randomness is passed in, never created


@dataclass(slots=True, kw_only=True)
class MemberRecord:
    """The mutable state kept for one member (Member is its frozen view)."""

    meta: MemberMeta
    state: MemberState
    incarnation: int
    changed_at: float
    #: the push-pull entry last built for this record (rebuilt when it no longer matches)
    entry: MemberEntry | None = field(default=None, compare=False, repr=False)

    def as_entry(self) -> MemberEntry:
        """This record as a push-pull entry (cached: a large table is sent whole often)."""
        entry = self.entry
        if (
            entry is None
            or entry.incarnation != self.incarnation
            or entry.state != self.state
            or entry.meta is not self.meta
        ):
            entry = self.entry = MemberEntry(
                meta=self.meta, incarnation=self.incarnation, state=str(self.state)
            )
        return entry

    def view(self) -> Member:
        return Member(
            meta=self.meta,
            state=self.state,
            incarnation=self.incarnation,
            state_changed_at=self.changed_at,
        )


class MemberTable:
    """Members by node id (self included), their suspicions, and the update queue."""

    def __init__(
        self,
        *,
        meta: MemberMeta,
        incarnation: int,
        timings: SwimTimings,
        rng: random.Random,
        awareness: Awareness,
        now: float,
    ) -> None:
        self.own = MemberRecord(
            meta=meta, state=MemberState.ALIVE, incarnation=incarnation, changed_at=now
        )
        self.records: dict[str, MemberRecord] = {meta.node_id: self.own}
        #: the incarnation of every other member, as in `records`: the hot path (news already
        #: heard) then reads one small dict, not a record per update (self is absent, so an
        #: update about self always reaches apply_alive)
        self._incarnations: dict[str, int] = {}
        self.suspicions: dict[str, Suspicion] = {}
        self.order = ProbeOrder(rng)
        self.queue = BroadcastQueue(timings.retransmit_mult)
        self.events: list[MemberEvent] = []
        #: other members that are dead or left, oldest first (kept apart so per-event work
        #: does not scan the whole table in large clusters)
        self.gone: dict[str, MemberRecord] = {}
        self._live = 1
        self.refutations = 0
        self.suspicions_started = 0
        self._timings = timings
        self._awareness = awareness

    @property
    def own_id(self) -> str:
        return self.own.meta.node_id

    @property
    def left(self) -> bool:
        """Whether this node has left the cluster (it then refutes nothing)."""
        return self.own.state is MemberState.LEFT

    def live_count(self) -> int:
        """Members alive or suspect, self included: the `n` of every formula."""
        return self._live

    def own_alive(self) -> AliveUpdate:
        return AliveUpdate(
            node_id=self.own_id, incarnation=self.own.incarnation, meta=self.own.meta
        )

    def entries(self) -> tuple[MemberEntry, ...]:
        """The whole table as push-pull entries."""
        return tuple(r.as_entry() for r in self.records.values())

    def apply_updates(self, updates: Iterable[object], now: float) -> None:
        """Apply gossiped updates in order; anything else in the tuple is ignored."""
        incarnation_of, alive = self._incarnations.get, AliveUpdate
        for update in updates:
            if type(update) is alive:
                # Most updates in a large cluster are news already heard: the same verdict
                # as apply_alive's, without the call (-1: unknown, or self).
                if update.incarnation <= incarnation_of(update.node_id, -1):
                    continue
                self.apply_alive(update, now)
            elif isinstance(update, SuspectUpdate):
                self.apply_suspect(update, now)
            elif isinstance(update, DeadUpdate):
                self.apply_dead(update, now)

    def merge_entry(self, entry: MemberEntry, sender: str, now: float) -> None:
        """Merge one push-pull entry from `sender` (anti-entropy)."""
        node_id, incarnation = entry.meta.node_id, entry.incarnation
        if entry.state == MemberState.ALIVE:
            if incarnation <= self._incarnations.get(node_id, -1):
                return  # what apply_alive would decide, without building the update
            self.apply_alive(
                AliveUpdate(node_id=node_id, incarnation=incarnation, meta=entry.meta), now
            )
        elif entry.state == MemberState.LEFT:
            self.apply_dead(
                DeadUpdate(node_id=node_id, incarnation=incarnation, accuser=node_id), now
            )
        elif entry.state in (MemberState.DEAD, MemberState.SUSPECT):
            self.apply_suspect(
                SuspectUpdate(node_id=node_id, incarnation=incarnation, accuser=sender), now
            )

    def apply_alive(self, update: AliveUpdate, now: float) -> None:
        if update.meta.node_id != update.node_id:
            return
        if update.node_id == self.own_id:
            own = self.own
            stale = update.incarnation < own.incarnation or (
                update.incarnation == own.incarnation and update.meta == own.meta
            )
            if not stale:
                self.refute(update.incarnation)
            return
        record = self.records.get(update.node_id)
        if record is None:
            self._add(update, now)
            return
        if update.incarnation <= record.incarnation:
            return
        old_state, old_meta = record.state, record.meta
        record.incarnation, record.meta = update.incarnation, update.meta
        self._incarnations[update.node_id] = update.incarnation
        self.suspicions.pop(update.node_id, None)
        self.queue.queue(update)
        if old_state is not MemberState.ALIVE:
            kind = EventKind.JOINED if old_state is MemberState.LEFT else EventKind.ALIVE
            self._set_state(record, MemberState.ALIVE, now, kind)
        elif old_meta != update.meta:
            self.events.append(MemberEvent(kind=EventKind.UPDATED, member=record.view()))

    def apply_suspect(self, update: SuspectUpdate, now: float) -> None:
        record = self.records.get(update.node_id)
        if record is self.own:
            self.refute(update.incarnation)
            return
        if record is None or update.incarnation < record.incarnation:
            return
        if record.state is MemberState.SUSPECT:
            suspicion = self.suspicions.get(update.node_id)
            if suspicion is not None and suspicion.confirm(update.accuser):
                self.queue.queue(update)  # spread the confirmation: it shortens others' timers
            return
        if record.state in GONE:
            return
        record.incarnation = self._incarnations[update.node_id] = update.incarnation
        bounds = suspicion_bounds(self._timings, self.live_count())
        self.suspicions[update.node_id] = Suspicion(accuser=update.accuser, bounds=bounds, now=now)
        self.queue.queue(update)
        if update.accuser == self.own_id:
            self.suspicions_started += 1
        self._set_state(record, MemberState.SUSPECT, now, EventKind.SUSPECT)

    def apply_dead(self, update: DeadUpdate, now: float) -> None:
        record = self.records.get(update.node_id)
        if record is self.own:
            self.refute(update.incarnation)
            return
        if record is None or update.incarnation < record.incarnation or record.state in GONE:
            return
        record.incarnation = self._incarnations[update.node_id] = update.incarnation
        self.suspicions.pop(update.node_id, None)
        self.queue.queue(update)
        if update.accuser == update.node_id:
            self._set_state(record, MemberState.LEFT, now, EventKind.LEFT)
        else:
            self._set_state(record, MemberState.DEAD, now, EventKind.DEAD)

    def refute(self, accused_incarnation: int) -> None:
        """Answer an accusation about self: incarnation max(own, accused) + 1, gossiped.

        A stale accusation (below our incarnation) only re-queues our current alive update.
        A node that has left refutes nothing. Each refutation also raises the local-health
        score: being accused is a sign our own messages are late or lost.
        """
        if self.left:
            return
        if accused_incarnation < self.own.incarnation:
            # Already refuted, but the accuser has not heard: say it again (this is what
            # makes the buddy system work when every copy of the refutation was lost).
            if self.queue.pending(self.own_id) is None:
                self.queue.queue(self.own_alive())
            return
        self.own.incarnation = max(self.own.incarnation, accused_incarnation) + 1
        self._awareness.apply(1)
        self.refutations += 1
        self.queue.queue(self.own_alive())

    def leave(self, now: float) -> None:
        """Mark self left and queue the self-signed dead update that says so."""
        own = self.own
        self._set_state(own, MemberState.LEFT, now, EventKind.LEFT)
        self.queue.queue(
            DeadUpdate(node_id=self.own_id, incarnation=own.incarnation, accuser=self.own_id)
        )

    def update_own_meta(self, meta: MemberMeta) -> None:
        """Adopt new metadata under a new incarnation and queue it."""
        self.own.meta = meta
        self.own.incarnation += 1
        self.queue.queue(self.own_alive())
        self.events.append(MemberEvent(kind=EventKind.UPDATED, member=self.own.view()))

    def expire_suspicions(self, now: float) -> int:
        """Declare dead every suspect whose timer ran out; returns how many."""
        expired = [key for key, s in self.suspicions.items() if now >= s.deadline]
        for node_id in expired:
            del self.suspicions[node_id]
            record = self.records[node_id]
            self.apply_dead(
                DeadUpdate(node_id=node_id, incarnation=record.incarnation, accuser=self.own_id),
                now,
            )
        return len(expired)

    def expire_tombstones(self, now: float) -> None:
        """Forget dead and left members older than the tombstone expiry."""
        expiry = self._timings.tombstone_expiry_s
        for node_id, record in list(self.gone.items()):
            if now - record.changed_at >= expiry:
                del self.records[node_id]
                del self._incarnations[node_id]
                del self.gone[node_id]
                self.order.remove(node_id)
                self.events.append(MemberEvent(kind=EventKind.REMOVED, member=record.view()))

    def _add(self, update: AliveUpdate, now: float) -> None:
        record = MemberRecord(
            meta=update.meta,
            state=MemberState.ALIVE,
            incarnation=update.incarnation,
            changed_at=now,
        )
        self.records[update.node_id] = record
        self._incarnations[update.node_id] = update.incarnation
        self._live += 1
        self.order.add(update.node_id)
        self.queue.queue(update)
        self.events.append(MemberEvent(kind=EventKind.JOINED, member=record.view()))

    def _set_state(
        self, record: MemberRecord, state: MemberState, now: float, kind: EventKind
    ) -> None:
        was_gone, is_gone = record.state in GONE, state in GONE
        self._live += int(was_gone) - int(is_gone)
        record.state = state
        record.changed_at = now
        if record is not self.own:
            # re-inserted at the end, so the dict stays ordered oldest first
            self.gone.pop(record.meta.node_id, None)
            if is_gone:
                self.gone[record.meta.node_id] = record
        self.events.append(MemberEvent(kind=kind, member=record.view()))
