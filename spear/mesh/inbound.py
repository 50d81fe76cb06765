"""What the application receives from the mesh: Inbound messages and the reply capability."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from spear.mesh.frames import CONTROL_CODEC, Failure, FrameKind, StreamEnd
from spear.mesh.links import Connection, RequestCancelledError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Inbound:
    """A message for the application: who sent it, and how to answer (None for a send)."""

    peer_id: str
    peer_address: str
    message: Any
    reply: Responder | None


class Responder:
    """The capability to answer one request; calls after the final answer are ignored.

    A unary request takes one `send` (or `fail`); a stream takes `item`s then `end` (or `fail`).
    Each call queues a frame on the connection the request came from. `send`, `end` and `fail`
    never block: if the queue is full or the link is gone the answer is dropped (logged at
    debug) and the requester times out or sees its link close. `item` waits for room, so a
    fast producer follows a slow link; it raises RequestCancelledError once the requester has
    stopped waiting (so a producer loop ends) and LinkClosedError once the link is gone.
    """

    def __init__(self, conn: Connection, request_id: int, *, stream: bool) -> None:
        self._conn = conn
        self._id = request_id
        self.stream = stream
        self._done = False
        conn.answering.add(request_id)

    @property
    def cancelled(self) -> bool:
        """Whether the requester stopped waiting (long handlers may check and give up): it
        cancelled the request, or the connection it came on is gone (no answer can reach it;
        a requester killed outright sends no cancel)."""
        return self._id in self._conn.cancelled or self._conn.ws.closed is not None

    @property
    def done(self) -> bool:
        """Whether the final answer was given."""
        return self._done

    async def send(self, message: object) -> None:
        """Answer a unary request with `message` (a message of the application codec)."""
        self._final(FrameKind.REPLY, self._conn.codec.encode(message, id=self._id, sender=self._me))

    async def item(self, message: object) -> None:
        """Send one stream item."""
        if self._id in self._conn.cancelled:
            self._finish()
            raise RequestCancelledError(f"{self._conn.peer_id} cancelled request {self._id}")
        if not self._done:
            payload = self._conn.codec.encode(message, id=self._id, sender=self._me)
            await self._conn.enqueue_wait(FrameKind.ITEM, payload)

    async def end(self) -> None:
        """End a stream normally."""
        self._final(FrameKind.END, CONTROL_CODEC.encode(StreamEnd(), id=self._id, sender=self._me))

    async def fail(self, code: str, message: str) -> None:
        """Fail the request: the requester raises RemoteError(message, code=code)."""
        self.fail_nowait(code, message)

    def fail_nowait(self, code: str, message: str) -> None:
        """`fail` for synchronous callers."""
        failure = Failure(code=code, message=message)
        self._final(FrameKind.ERROR, CONTROL_CODEC.encode(failure, id=self._id, sender=self._me))

    @property
    def _me(self) -> str:
        return self._conn.node_id

    def _finish(self) -> None:
        self._done = True
        self._conn.answering.discard(self._id)
        self._conn.cancelled.discard(self._id)

    def _final(self, kind: FrameKind, payload: bytes) -> None:
        if self._done:
            return
        self._finish()
        if not self._conn.enqueue(kind, payload):
            log.debug("answer to request %d for %s dropped", self._id, self._conn.peer_id)
