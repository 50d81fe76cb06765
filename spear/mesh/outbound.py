"""The link a node dials to one peer address: dial on demand, queue while connecting, back off.

States: IDLE (no connection; the next frame dials), CONNECTING (frames queue, bounded), UP
(frames go to the connection's queue), BACKOFF (the last attempt failed: frames are dropped and
requests refused at once until the jittered, doubling delay is over; then IDLE again). A link
that breaks after it was up goes back to IDLE at once (its waiting requests fail with
LinkClosedError) and redials only when there is something to send.
The transport (spear.mesh.transport) owns the links and is told, through LinkOwner, when the
requests waiting on a link must fail.
"""

from __future__ import annotations

import enum
import logging
import random
from typing import NoReturn, Protocol

import trio

from spear.errors import FrameTooLargeError
from spear.mesh import links
from spear.mesh.frames import FrameKind
from spear.mesh.links import (
    LINK_ERRORS,
    Connection,
    LinkClosedError,
    LinkParams,
    PeerUnreachableError,
    TransportSettings,
    describe_link_error,
)

log = logging.getLogger(__name__)


class LinkState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    UP = "up"
    BACKOFF = "backoff"


class LinkOwner(Protocol):
    """What an outbound link needs from the transport that owns it."""

    def link_params(self) -> LinkParams:
        """This node's side of every link (read at each dial)."""
        ...

    async def serve_outbound(self, address: str, conn: Connection) -> None:
        """Serve an authenticated connection until it ends."""
        ...

    def fail_requests(self, address: str, error: Exception) -> None:
        """Fail every request waiting for an answer over this link."""
        ...

    def fail_request(self, request_id: int, error: Exception) -> None:
        """Fail one waiting request (its frame could not be sent)."""
        ...


class OutboundLink:
    """The link to one peer address, across reconnects; see the module docstring."""

    def __init__(self, address: str, *, settings: TransportSettings, rng: random.Random) -> None:
        self.address = address
        self.state = LinkState.IDLE
        self.conn: Connection | None = None
        self.last_error = ""
        self._settings = settings
        self._rng = rng
        self._queue: list[tuple[FrameKind, bytes, int]] = []  # (kind, payload, request id)
        self._demand = trio.Event()
        self._failures = 0
        self._backoff: trio.CancelScope | None = None
        #: counters since the link was made
        self.sent = self.dropped_full = self.dropped_unreachable = 0
        self.dials = self.dial_failures = 0

    def enqueue(self, kind: FrameKind, payload: bytes, request_id: int) -> bool:
        """Queue a frame (request_id 0 for a send); False if dropped. Never blocks.

        Raises:
            FrameTooLargeError: the link is up and the frame is over the peer's frame cap.
        """
        if self.state is LinkState.BACKOFF:
            self.dropped_unreachable += 1
            return False
        if self.conn is not None:
            _check_cap(payload, self.conn)
            ok = self.conn.enqueue(kind, payload)
        elif len(self._queue) < self._settings.send_queue_frames:
            self._queue.append((kind, payload, request_id))
            self._demand.set()
            ok = True
        else:
            ok = False
        if ok:
            self.sent += 1
        else:
            self.dropped_full += 1
        return ok

    async def run(self, owner: LinkOwner) -> NoReturn:
        """Dial whenever frames wait, serve each connection, back off after failed attempts."""
        while True:
            await self._demand.wait()
            self.state = LinkState.CONNECTING
            self.dials += 1
            was_up = False
            try:
                async with links.dial(self.address, owner.link_params()) as conn:
                    self._up(conn, owner)
                    was_up = True
                    try:
                        await owner.serve_outbound(self.address, conn)
                    finally:
                        self._down(owner)
            except LINK_ERRORS as exc:
                if was_up:
                    log.debug("closing the mesh link to %s: %s", self.address, exc)
                else:
                    await self._back_off(describe_link_error(exc), owner)
            if not self._queue:  # frames queued while the old connection closed: dial again
                self._demand = trio.Event()

    def _down(self, owner: LinkOwner) -> None:
        """The connection ended: its waiting requests fail; new frames queue for a new dial."""
        self.conn, self.state = None, LinkState.IDLE
        log.info("mesh link to %s closed", self.address)
        owner.fail_requests(
            self.address, LinkClosedError(f"the mesh link to {self.address} closed")
        )

    def _up(self, conn: Connection, owner: LinkOwner) -> None:
        self.state, self.conn, self._failures = LinkState.UP, conn, 0
        queued, self._queue = self._queue, []
        for kind, payload, request_id in queued:
            try:
                _check_cap(payload, conn)
            except FrameTooLargeError as exc:
                # queued before the peer's cap was known
                log.warning("dropped a frame queued for %s: %s", self.address, exc)
                if request_id:
                    owner.fail_request(request_id, exc)
                continue
            conn.enqueue(kind, payload)
        log.debug("mesh link to %s (%s) up", self.address, conn.peer_id)

    def peer_seen(self) -> None:
        """The peer just dialled us and proved the cluster key, so it is up: end a backoff
        at once and start the next one from the shortest delay. (A restarted node's peers
        back off towards it while it starts; without this they could miss its first
        seconds, e.g. the votes of an election it takes part in.)"""
        self._failures = 0
        if self._backoff is not None:
            self._backoff.cancel()
            self.state = LinkState.IDLE  # sends queue (and dial) from now on

    async def _back_off(self, error: str, owner: LinkOwner) -> None:
        self._failures += 1
        self.dial_failures += 1
        self.last_error = error
        self.state = LinkState.BACKOFF
        self.dropped_unreachable += len(self._queue)
        self._queue.clear()
        owner.fail_requests(
            self.address, PeerUnreachableError(f"cannot reach mesh peer {self.address}: {error}")
        )
        delay = backoff_delay(self._failures, self._settings, self._rng)
        log.info("cannot reach mesh peer %s (%s); retry after %.2f s", self.address, error, delay)
        with trio.CancelScope() as self._backoff:
            await trio.sleep(delay)
        self._backoff = None
        self.state = LinkState.IDLE


def backoff_delay(failures: int, settings: TransportSettings, rng: random.Random) -> float:
    """The wait after `failures` (>= 1) failed attempts in a row: doubling from backoff_min_s,
    capped at backoff_max_s, times a random factor in [0.5, 1) so that the peers of a node that
    went away do not all redial in step."""
    base: float = settings.backoff_min_s * 2.0 ** min(failures - 1, 60)
    return min(settings.backoff_max_s, base) * rng.uniform(0.5, 1.0)


def _check_cap(payload: bytes, conn: Connection) -> None:
    cap = conn.session.peer_max_frame_bytes
    if len(payload) > cap:
        raise FrameTooLargeError(
            f"a {len(payload)}-byte frame is over the mesh.max_frame_bytes of {conn.peer_id}"
            f" ({cap})"
        )
