"""The membership driver: runs the SWIM core over the mesh transport; the node's cluster view.

It is the only caller of its core. Calls are synchronous (the core does no I/O and sending
never blocks), so the driver needs no lock: it steps the core for each inbound message, ticks
it at its deadline, hands the messages to the transport and publishes the view's changes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import trio

from spear.mesh import Member, MemberEvent, MemberMeta, Membership, MemberState, Output

log = logging.getLogger(__name__)

#: inbound SWIM messages that may wait for the driver; more are dropped (SWIM tolerates loss)
INBOX_SIZE = 1024
_REACHABLE = (MemberState.ALIVE, MemberState.SUSPECT)


class GossipDriver:
    """One node's membership; start `serve` in the node's nursery before using it."""

    def __init__(self, core: Membership, send: Callable[[str, object], object]) -> None:
        """
        Args:
            core: the membership core of this node.
            send: best-effort delivery of a message to a mesh address (never blocks).
        """
        self._core = core
        self._send = send
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[str, object] | None](
            INBOX_SIZE
        )
        self._changed = trio.Event()
        self.dropped_messages = 0

    # --- the view -------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self._core.node_id

    def members(self) -> tuple[Member, ...]:
        """Every member this node knows of (itself included), sorted by id."""
        return self._core.members()

    def member(self, node_id: str) -> Member | None:
        return self._core.member(node_id)

    def address_of(self, node_id: str) -> str | None:
        """The mesh address of a member that is alive or suspect, else None."""
        member = self._core.member(node_id)
        if member is None or member.state not in _REACHABLE:
            return None
        return member.meta.mesh_address

    def last_address(self, node_id: str) -> str | None:
        """The mesh address a member last announced, whatever its state (Raft keeps talking
        to every voter: a SWIM verdict is no reason to stop trying)."""
        member = self._core.member(node_id)
        return None if member is None else member.meta.mesh_address

    def peer_addresses(self) -> list[str]:
        """The mesh addresses of every other member that has not left, sorted."""
        return sorted(
            m.meta.mesh_address
            for m in self._core.members()
            if m.node_id != self.node_id and m.state is not MemberState.LEFT
        )

    def statistics(self) -> dict[str, Any]:
        stats = self._core.statistics()
        doc = {name: getattr(stats, name) for name in stats.__dataclass_fields__}
        return doc | {"dropped_messages": self.dropped_messages}

    async def wait_change(self) -> None:
        """Wait until the view changes (a member joined, changed state or metadata)."""
        await self._changed.wait()

    # --- inputs ---------------------------------------------------------------------------

    def deliver(self, from_address: str, message: object) -> None:
        """Queue a SWIM message from the mesh; dropped if the inbox is full."""
        try:
            self._inbox_send.send_nowait((from_address, message))
        except trio.WouldBlock:
            self.dropped_messages += 1

    def join(self, seeds: Sequence[str]) -> None:
        """Start joining through `seeds` (mesh addresses); the core retries until it works."""
        self._carry_out(self._core.join(list(seeds), trio.current_time()))

    def update_meta(self, meta: MemberMeta) -> None:
        """Publish new metadata about this node (gossiped with a new incarnation)."""
        self._carry_out(self._core.update_meta(meta, trio.current_time()))

    def leave(self) -> None:
        """Announce a graceful leave; the caller lets it spread before stopping the mesh."""
        self._carry_out(self._core.leave(trio.current_time()))

    # --- the loop ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run probes, gossip and timers and handle inbound messages until cancelled."""
        task_status.started()
        while True:
            item: tuple[str, object] | None = None
            with trio.move_on_at(self._core.next_deadline):
                item = await self._inbox.receive()
            now = trio.current_time()
            if item is not None:
                self._carry_out(self._core.step(item[0], item[1], now), wake=False)
            elif now >= self._core.next_deadline:
                self._carry_out(self._core.tick(now), wake=False)

    def _carry_out(self, output: Output, *, wake: bool = True) -> None:
        for address, message in output.messages:
            self._send(address, message)
        if output.events:
            for event in output.events:
                _log_event(event)
            self._changed.set()
            self._changed = trio.Event()
        if wake:
            # The loop sleeps until the deadline it saw; a call from outside may need sooner.
            with contextlib.suppress(trio.WouldBlock):
                self._inbox_send.send_nowait(None)


def _log_event(event: MemberEvent) -> None:
    meta = event.member.meta
    log.info("member %s (%s) %s", meta.name, meta.node_id, event.kind.value)
