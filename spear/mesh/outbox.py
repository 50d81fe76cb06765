"""Messages one call into the membership core produces, with updates piggybacked on them."""

from __future__ import annotations

from spear.mesh.member_table import MemberTable
from spear.mesh.swim_messages import Update
from spear.mesh.swim_timings import SwimTimings


class Outbox:
    """Collects (address, message) pairs until the core returns them in its Output."""

    __slots__ = ("_messages", "_table", "_timings", "sent")

    def __init__(self, *, table: MemberTable, timings: SwimTimings) -> None:
        self._table = table
        self._timings = timings
        self._messages: list[tuple[str, object]] = []
        #: messages handed out so far
        self.sent = 0

    def send(self, address: str, message: object) -> None:
        """Queue `message` for `address`; messages to our own address are dropped (a stale
        member entry may still point at it)."""
        if address and address != self._table.own.meta.mesh_address:
            self.sent += 1
            self._messages.append((address, message))

    def piggyback(self, recipient: str, limit: int | None = None) -> tuple[Update, ...]:
        """Updates to ride on a message to node `recipient` (each counts as a transmission)."""
        if limit is None:
            limit = self._timings.max_updates_per_message
        return self._table.queue.take(limit, self._table.live_count(), recipient=recipient)

    def drain(self) -> tuple[tuple[str, object], ...]:
        """Everything queued since the last drain, in order."""
        messages = tuple(self._messages)
        self._messages.clear()
        return messages
